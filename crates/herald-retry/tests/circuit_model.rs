//! Model-based test of `CircuitBreaker` (deliverable 4): an independent reference model of
//! the documented state machine, driven by random operation sequences, must agree with the
//! implementation at every step.

use std::time::{Duration, Instant};

use herald_retry::{CircuitBreaker, CircuitBreakerConfig, CircuitState};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Op {
    Advance(u64),
    Allow,
    Success,
    Failure,
    /// The outcome (success or not) of the batch of the last `Allow` that returned true,
    /// given with the generation it was sent under: possibly from before the breaker last
    /// opened.
    OutcomeOfLastAllowed(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => prop_oneof![0u64..50, 0u64..3_000].prop_map(Op::Advance),
        3 => Just(Op::Allow),
        2 => Just(Op::Success),
        3 => Just(Op::Failure),
        2 => any::<bool>().prop_map(Op::OutcomeOfLastAllowed),
    ]
}

/// The reference model, written from the specification as a transition table over plain
/// integers (milliseconds), sharing no code with the implementation.
#[derive(Debug, Clone)]
struct Model {
    threshold: u32,
    open_for_ms: u64,
    probes: u32,
    enabled: bool,
    /// "closed" | "open" | "half_open"
    state: &'static str,
    failures: u32,
    opened_at_ms: u64,
    in_flight: u32,
    /// How many times it opened: an outcome counts only from a batch allowed since the last.
    openings: u64,
}

impl Model {
    fn new(threshold: u32, open_for_ms: u64, probes: u32, enabled: bool) -> Self {
        Model {
            threshold,
            open_for_ms,
            probes,
            enabled,
            state: "closed",
            failures: 0,
            opened_at_ms: 0,
            in_flight: 0,
            openings: 0,
        }
    }

    fn allow(&mut self, now_ms: u64) -> bool {
        if !self.enabled {
            return true;
        }
        if self.state == "open" && now_ms - self.opened_at_ms >= self.open_for_ms {
            self.state = "half_open";
            self.in_flight = 0;
        }
        match self.state {
            "closed" => true,
            "half_open" if self.in_flight < self.probes => {
                self.in_flight += 1;
                true
            }
            _ => false,
        }
    }

    fn success(&mut self) {
        if self.enabled && self.state != "open" {
            self.state = "closed";
            self.failures = 0;
        }
    }

    fn failure(&mut self, now_ms: u64) {
        if !self.enabled {
            return;
        }
        let open = match self.state {
            "closed" => {
                self.failures += 1;
                self.failures >= self.threshold
            }
            "half_open" => true,
            _ => false,
        };
        if open {
            self.state = "open";
            self.opened_at_ms = now_ms;
            self.failures = 0;
            self.openings += 1;
        }
    }

    fn state(&self) -> CircuitState {
        match self.state {
            "closed" => CircuitState::Closed,
            "open" => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    fn retry_at_ms(&self) -> Option<u64> {
        (self.enabled && self.state == "open").then(|| self.opened_at_ms + self.open_for_ms)
    }
}

fn config() -> impl Strategy<Value = (u32, u64, u32, bool)> {
    (
        1u32..6,
        1u64..2_000,
        1u32..4,
        prop_oneof![9 => Just(true), 1 => Just(false)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The implementation agrees with the model on `allow`, `state` and `retry_at` after
    /// every operation.
    #[test]
    fn breaker_matches_model(
        (threshold, open_for_ms, probes, enabled) in config(),
        ops in proptest::collection::vec(op(), 0..300),
    ) {
        let base = Instant::now();
        let mut breaker: CircuitBreaker = CircuitBreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_millis(open_for_ms),
            half_open_probes: probes,
            enabled,
        }
        .build();
        let mut model = Model::new(threshold, open_for_ms, probes, enabled);
        let mut now_ms = 0u64;
        // The last allowed batch's generation, as the breaker and as the model have it.
        let mut sent = None;
        for (step, op) in ops.iter().enumerate() {
            let now = base + Duration::from_millis(now_ms);
            match *op {
                Op::Advance(ms) => now_ms += ms,
                Op::Allow => {
                    let got = breaker.allow(now);
                    let want = model.allow(now_ms);
                    prop_assert_eq!(got, want, "allow at step {} ({:?})", step, op);
                    if got {
                        sent = Some((breaker.generation(), model.openings));
                    }
                }
                Op::OutcomeOfLastAllowed(ok) => {
                    if let Some((generation, openings)) = sent {
                        if ok {
                            breaker.on_success_of(generation, now);
                        } else {
                            breaker.on_failure_of(generation, now);
                        }
                        if openings == model.openings {
                            if ok {
                                model.success();
                            } else {
                                model.failure(now_ms);
                            }
                        }
                    }
                }
                Op::Success => {
                    breaker.on_success(now);
                    model.success();
                }
                Op::Failure => {
                    breaker.on_failure(now);
                    model.failure(now_ms);
                }
            }
            prop_assert_eq!(breaker.state(), model.state(), "state after step {} ({:?})", step, op);
            prop_assert_eq!(
                breaker.retry_at(),
                model.retry_at_ms().map(|ms| base + Duration::from_millis(ms)),
                "retry_at after step {} ({:?})", step, op
            );
        }
    }

    /// Once open, `allow` is false until `open_for` has passed since opening (whatever else
    /// happens meanwhile), and true as soon as it has.
    #[test]
    fn open_blocks_until_open_for_has_passed(
        (threshold, open_for_ms, probes, _) in config(),
        ops in proptest::collection::vec(op(), 0..300),
    ) {
        let base = Instant::now();
        let open_for = Duration::from_millis(open_for_ms);
        let mut breaker = CircuitBreakerConfig {
            failure_threshold: threshold,
            open_for,
            half_open_probes: probes,
            enabled: true,
        }
        .build();
        let mut now = base;
        let mut opened_at: Option<Instant> = None;
        for op in ops {
            let was_open = breaker.state() == CircuitState::Open;
            match op {
                Op::Advance(ms) => now += Duration::from_millis(ms),
                Op::Allow => {
                    let allowed = breaker.allow(now);
                    if let (true, Some(at)) = (was_open, opened_at) {
                        prop_assert_eq!(allowed, now >= at + open_for, "opened at {:?}, now {:?}", at, now);
                    }
                    if allowed {
                        prop_assert_ne!(breaker.state(), CircuitState::Open);
                    }
                }
                Op::Success => breaker.on_success(now),
                Op::Failure => breaker.on_failure(now),
                // A batch of another generation: ignored, or as `Failure`.
                Op::OutcomeOfLastAllowed(_) => {
                    let stale = herald_retry::CircuitBreakerConfig::default().build().generation();
                    breaker.on_failure_of(stale, now);
                }
            }
            let is_open = breaker.state() == CircuitState::Open;
            if is_open && !was_open {
                opened_at = Some(now);
            }
            if is_open {
                prop_assert_eq!(breaker.retry_at(), opened_at.map(|at| at + open_for));
            }
        }
    }

    /// In half-open state, never more than `half_open_probes` batches are allowed before an
    /// outcome is reported.
    #[test]
    fn half_open_limits_probes(
        (threshold, open_for_ms, probes, _) in config(),
        allows in 0usize..20,
    ) {
        let t0 = Instant::now();
        let mut breaker = CircuitBreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_millis(open_for_ms),
            half_open_probes: probes,
            enabled: true,
        }
        .build();
        for _ in 0..threshold {
            breaker.on_failure(t0);
        }
        prop_assert_eq!(breaker.state(), CircuitState::Open);
        let later = t0 + Duration::from_millis(open_for_ms);
        let allowed = (0..allows).filter(|_| breaker.allow(later)).count();
        prop_assert_eq!(allowed, allows.min(probes as usize));
    }
}
