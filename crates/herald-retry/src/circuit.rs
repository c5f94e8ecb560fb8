//! A circuit breaker: stop sending to a destination that keeps failing, probe, recover.

use std::fmt;
use std::time::{Duration, Instant};

use crate::InvalidSetting;

/// The three states of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Normal operation: batches are sent, consecutive failures are counted.
    Closed,
    /// Too many consecutive failures: nothing is sent until `open_for` has passed, giving
    /// the broker room to recover instead of a flood of doomed requests.
    Open,
    /// Trial period after `open_for`: a few probe batches decide between closing again and
    /// reopening.
    HalfOpen,
}

impl CircuitState {
    /// The state as a gauge value (`Closed` 0, `HalfOpen` 1, `Open` 2): ordered by severity
    /// so that dashboards can plot it and alert on `> 0`.
    #[must_use]
    pub fn as_gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        }
    }

    /// A stable snake_case name (`"closed"`, `"open"`, `"half_open"`) for logs and labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings for a [`CircuitBreaker`], kept in the producer builder and validated there.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerConfig {
    /// Consecutive failed batches that open the circuit (default 5): high enough that one
    /// unlucky batch does not stop traffic.
    pub failure_threshold: u32,
    /// How long the circuit stays open before probing (default 5 s).
    pub open_for: Duration,
    /// Batches allowed in flight while half-open (default 1): few, so that a still-broken
    /// broker sees little load.
    pub half_open_probes: u32,
    /// `false` turns the breaker into a no-op that always allows (default `true`).
    pub enabled: bool,
}

impl Default for CircuitBreakerConfig {
    /// Opens after 5 consecutive failed batches, for 5 s, then probes with 1 batch.
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
            enabled: true,
        }
    }
}

impl CircuitBreakerConfig {
    /// The default settings with the breaker switched off, for callers who prefer every
    /// batch to be tried (their retry policy and budget still apply).
    #[must_use]
    pub fn disabled() -> Self {
        CircuitBreakerConfig {
            enabled: false,
            ..CircuitBreakerConfig::default()
        }
    }

    /// Checked when the producer is built (only when enabled): `failure_threshold >= 1`,
    /// `half_open_probes >= 1` and `open_for > 0`, each error naming its
    /// `circuit_breaker.*` field.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !self.enabled {
            return Ok(());
        }
        if self.failure_threshold == 0 {
            return Err(InvalidSetting::new(
                "circuit_breaker.failure_threshold",
                "must be at least 1 (use `enabled: false` to switch the breaker off)",
            ));
        }
        if self.half_open_probes == 0 {
            return Err(InvalidSetting::new(
                "circuit_breaker.half_open_probes",
                "must be at least 1, or the circuit could never close again",
            ));
        }
        if self.open_for.is_zero() {
            return Err(InvalidSetting::new(
                "circuit_breaker.open_for",
                "must be greater than zero (use `enabled: false` to switch the breaker off)",
            ));
        }
        Ok(())
    }

    /// Creates a closed breaker. Settings that `validate` rejects are raised to their
    /// minimum (threshold and probes 1) so that the breaker can never get stuck.
    #[must_use]
    pub fn build(&self) -> CircuitBreaker {
        CircuitBreaker {
            config: CircuitBreakerConfig {
                failure_threshold: self.failure_threshold.max(1),
                half_open_probes: self.half_open_probes.max(1),
                ..self.clone()
            },
            state: State::Closed { failures: 0 },
            generation: Generation(0),
        }
    }
}

/// Which opening of a [`CircuitBreaker`] a batch was sent under: take
/// [`CircuitBreaker::generation`] when [`CircuitBreaker::allow`] lets the batch go, and hand it
/// back with its outcome ([`CircuitBreaker::on_success_of`], [`CircuitBreaker::on_failure_of`]).
/// A batch sent before the breaker last opened is stale: its outcome says nothing about the
/// broker since, nor about the probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// Stops sending batches to a destination that keeps failing, then probes it.
///
/// Retries and budgets act per message; when a destination is down for longer, the breaker
/// spares both the broker and the producer's own resources by not sending at all for a
/// while. It counts batch outcomes, not messages: one broker outage is one signal.
///
/// State machine (`now` is passed in, never read):
///
/// * `Closed`: [`allow`](CircuitBreaker::allow) is `true`; [`on_failure`](CircuitBreaker::on_failure)
///   counts consecutive failures and opens at `failure_threshold`;
///   [`on_success`](CircuitBreaker::on_success) resets the count.
/// * `Open`: `allow` is `false` until `open_for` has passed since opening, then the breaker
///   turns `HalfOpen`. Outcomes of batches sent before it opened change nothing (a failure
///   does not extend the open period, a success does not close it).
/// * `HalfOpen`: each `allow` returning `true` starts a probe, at most `half_open_probes` in
///   flight; a success closes the circuit, a failure reopens it from `now`.
///
/// Batches in flight when the breaker opened can land later, even while it probes or after it
/// closed again: with [`on_success_of`](CircuitBreaker::on_success_of) and
/// [`on_failure_of`](CircuitBreaker::on_failure_of), given the [`Generation`] each batch was
/// sent under, their outcomes change nothing (a late failure would reopen a breaker whose
/// probe is about to succeed, a late success close it without a probe).
///
/// A disabled breaker always allows and stays `Closed`.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: CircuitBreakerConfig,
    state: State,
    /// Counts the openings: batches sent under an earlier one are stale.
    generation: Generation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { since: Instant },
    HalfOpen { in_flight: u32 },
}

impl CircuitBreaker {
    /// May a batch be sent now? Open -> HalfOpen once open_for has passed since opening;
    /// HalfOpen allows at most half_open_probes batches in flight. A disabled breaker always
    /// allows.
    ///
    /// Call it once per batch about to be sent: in `HalfOpen` a `true` counts as a probe in
    /// flight, ended by `on_success` or `on_failure`.
    pub fn allow(&mut self, now: Instant) -> bool {
        if !self.config.enabled {
            return true;
        }
        if let State::Open { since } = self.state {
            match since.checked_add(self.config.open_for) {
                Some(until) if now >= until => self.state = State::HalfOpen { in_flight: 0 },
                // Not yet, or never (an `open_for` too large to represent).
                _ => return false,
            }
        }
        match &mut self.state {
            State::Closed { .. } => true,
            State::HalfOpen { in_flight } => {
                if *in_flight < self.config.half_open_probes {
                    *in_flight += 1;
                    true
                } else {
                    false
                }
            }
            State::Open { .. } => false,
        }
    }

    /// When `allow` will next possibly return true if it is false now (None if Closed or
    /// allowed). Lets the dispatcher sleep exactly.
    ///
    /// `Some` only while `Open`: the end of the open period (possibly already past, in
    /// which case `allow` should be called now). `None` also while `HalfOpen`, where the
    /// answer depends on probe outcomes rather than on time, and when the end of the open
    /// period is too far away to be represented as an `Instant`.
    #[must_use]
    pub fn retry_at(&self) -> Option<Instant> {
        match self.state {
            State::Open { since } if self.config.enabled => since.checked_add(self.config.open_for),
            _ => None,
        }
    }

    /// The breaker's current generation: it changes each time the breaker opens. Taken when
    /// `allow` lets a batch go, handed back with the batch's outcome.
    #[must_use]
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// [`CircuitBreaker::on_success`] for a batch sent under `sent`: ignored when the breaker
    /// has opened since.
    pub fn on_success_of(&mut self, sent: Generation, now: Instant) {
        if sent == self.generation {
            self.on_success(now);
        }
    }

    /// [`CircuitBreaker::on_failure`] for a batch sent under `sent`: ignored when the breaker
    /// has opened since.
    pub fn on_failure_of(&mut self, sent: Generation, now: Instant) {
        if sent == self.generation {
            self.on_failure(now);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open { since: now };
        self.generation = Generation(self.generation.0.wrapping_add(1));
    }

    /// Records a successful batch: HalfOpen -> Closed; Closed resets the consecutive-failure
    /// count; ignored while Open (that batch was sent before the circuit opened).
    pub fn on_success(&mut self, _now: Instant) {
        if !self.config.enabled {
            return;
        }
        match self.state {
            State::Closed { .. } | State::HalfOpen { .. } => {
                self.state = State::Closed { failures: 0 };
            }
            State::Open { .. } => {}
        }
    }

    /// Records a failed batch: Closed counts it and opens at the threshold (from `now`);
    /// HalfOpen reopens from `now`; Open stays as it is (the open period is not extended).
    pub fn on_failure(&mut self, now: Instant) {
        if !self.config.enabled {
            return;
        }
        match self.state {
            State::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.config.failure_threshold {
                    self.open(now);
                } else {
                    self.state = State::Closed { failures };
                }
            }
            State::HalfOpen { .. } => self.open(now),
            State::Open { .. } => {}
        }
    }

    /// The current state, for the circuit-state gauge and logs. It changes only in the
    /// `allow`/`on_*` calls: an open breaker whose period has passed reports `Open` until
    /// the next `allow`.
    #[must_use]
    pub fn state(&self) -> CircuitState {
        match self.state {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// The effective settings (after `build` raised invalid minimums), for reporting.
    #[must_use]
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(threshold: u32, open_for_ms: u64, probes: u32) -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_millis(open_for_ms),
            half_open_probes: probes,
            enabled: true,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn defaults() {
        let c = CircuitBreakerConfig::default();
        assert_eq!(c, config(5, 5000, 1));
        assert_eq!(c.validate(), Ok(()));
        assert!(!CircuitBreakerConfig::disabled().enabled);
        assert_eq!(c.build().state(), CircuitState::Closed);
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = config(3, 1000, 1).build();
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success(t0); // resets
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow(t0));
        assert_eq!(b.retry_at(), None);
        b.on_failure(t0);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.allow(t0));
        assert_eq!(b.retry_at(), Some(t0 + ms(1000)));
    }

    #[test]
    fn full_cycle_open_half_open_closed() {
        let t0 = Instant::now();
        let mut b = config(1, 1000, 2).build();
        b.on_failure(t0);
        assert!(!b.allow(t0 + ms(999)));
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.allow(t0 + ms(1000)));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.allow(t0 + ms(1000)));
        assert!(!b.allow(t0 + ms(1000)), "only two probes in flight");
        assert_eq!(b.retry_at(), None);
        b.on_success(t0 + ms(1100));
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow(t0 + ms(1100)));
    }

    #[test]
    fn failed_probe_reopens_from_now() {
        let t0 = Instant::now();
        let mut b = config(1, 1000, 1).build();
        b.on_failure(t0);
        assert!(b.allow(t0 + ms(1500)));
        b.on_failure(t0 + ms(1600));
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(b.retry_at(), Some(t0 + ms(2600)));
        assert!(!b.allow(t0 + ms(2599)));
        assert!(b.allow(t0 + ms(2600)));
    }

    #[test]
    fn late_outcomes_while_open_change_nothing() {
        let t0 = Instant::now();
        let mut b = config(1, 1000, 1).build();
        b.on_failure(t0);
        b.on_success(t0 + ms(10));
        assert_eq!(b.state(), CircuitState::Open);
        b.on_failure(t0 + ms(500));
        assert_eq!(b.retry_at(), Some(t0 + ms(1000)), "not extended");
        assert!(b.allow(t0 + ms(1000)));
    }

    /// A batch sent before the breaker opened and landing while it probes (or after it
    /// closed again) changed its state before: a late failure reopened it with the probe
    /// still out (whose success was then ignored), a late success closed it without a probe.
    #[test]
    fn outcomes_of_batches_sent_before_it_opened_change_nothing() {
        let t0 = Instant::now();
        let mut b = config(1, 1000, 1).build();
        assert!(b.allow(t0));
        let early = b.generation();
        assert!(b.allow(t0));
        let opener = b.generation();
        b.on_failure_of(opener, t0);
        assert_eq!(b.state(), CircuitState::Open);
        // The probe goes; the early batch's failure lands first.
        assert!(b.allow(t0 + ms(1000)));
        let probe = b.generation();
        assert_ne!(probe, early);
        b.on_failure_of(early, t0 + ms(1100));
        assert_eq!(b.state(), CircuitState::HalfOpen, "a stale failure");
        b.on_success_of(early, t0 + ms(1100));
        assert_eq!(b.state(), CircuitState::HalfOpen, "a stale success");
        b.on_success_of(probe, t0 + ms(1200));
        assert_eq!(b.state(), CircuitState::Closed);
        // Closed again: a stale failure does not count toward the threshold of 1 either.
        b.on_failure_of(early, t0 + ms(1300));
        assert_eq!(b.state(), CircuitState::Closed);
        b.on_failure_of(b.generation(), t0 + ms(1300));
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn time_going_backwards_keeps_it_open() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = config(1, 1000, 1).build();
        b.on_failure(t0);
        assert!(!b.allow(t0 - Duration::from_secs(5)));
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn unrepresentable_open_period_stays_open_without_panic() {
        let t0 = Instant::now();
        let mut b = CircuitBreakerConfig {
            open_for: Duration::MAX,
            ..config(1, 0, 1)
        }
        .build();
        b.on_failure(t0);
        assert!(!b.allow(t0 + Duration::from_secs(1 << 40)));
        assert_eq!(b.retry_at(), None);
    }

    #[test]
    fn disabled_always_allows() {
        let t0 = Instant::now();
        let mut b = CircuitBreakerConfig::disabled().build();
        for _ in 0..100 {
            b.on_failure(t0);
        }
        assert!(b.allow(t0));
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.retry_at(), None);
        b.on_success(t0);
        assert!(b.allow(t0));
    }

    #[test]
    fn validate_names_the_field() {
        let field = |c: CircuitBreakerConfig| c.validate().expect_err("invalid").field;
        assert_eq!(
            field(config(0, 1000, 1)),
            "circuit_breaker.failure_threshold"
        );
        assert_eq!(
            field(config(1, 1000, 0)),
            "circuit_breaker.half_open_probes"
        );
        assert_eq!(field(config(1, 0, 1)), "circuit_breaker.open_for");
        let off = CircuitBreakerConfig {
            enabled: false,
            ..config(0, 0, 0)
        };
        assert_eq!(off.validate(), Ok(()));
    }

    #[test]
    fn invalid_settings_are_raised_by_build() {
        let t0 = Instant::now();
        let mut b = config(0, 1000, 0).build();
        assert_eq!(b.config().failure_threshold, 1);
        assert_eq!(b.config().half_open_probes, 1);
        b.on_failure(t0);
        assert!(b.allow(t0 + ms(1000)), "a probe is still possible");
    }

    #[test]
    fn state_names_and_gauge() {
        assert_eq!(CircuitState::Closed.as_gauge(), 0.0);
        assert_eq!(CircuitState::HalfOpen.as_gauge(), 1.0);
        assert_eq!(CircuitState::Open.as_gauge(), 2.0);
        assert_eq!(CircuitState::HalfOpen.to_string(), "half_open");
        assert_eq!(CircuitState::Open.to_string(), "open");
        assert_eq!(CircuitState::Closed.to_string(), "closed");
    }
}
