//! Properties of `Backoff` and `ExponentialRetry` (deliverables 1 and 2).

use std::time::Duration;

use herald_retry::{
    Backoff, ErrorClass, ExponentialRetry, GiveUpReason, Jitter, RetryContext, RetryDecision,
    RetryPolicy,
};
use proptest::prelude::*;

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
    ]
}

/// Durations from nanoseconds to the largest representable one, biased to realistic values.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..1_000_000).prop_map(Duration::from_nanos),
        (0u64..600_000).prop_map(Duration::from_millis),
        (0u64..1_000_000_000_000).prop_map(Duration::from_micros),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        Just(Duration::MAX),
    ]
}

fn positive_duration() -> impl Strategy<Value = Duration> {
    duration().prop_map(|d| d.max(Duration::from_nanos(1)))
}

/// Valid multipliers, including the awkward ones just above 1 where rounding could make a
/// naive implementation non-monotone.
fn multiplier() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(1.0),
        Just(1.0 + f64::EPSILON),
        Just(2.0),
        Just(f64::MAX),
        1.0f64..1.000_000_001,
        1.0f64..4.0,
        1.0f64..1e6,
    ]
}

fn retry() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..70, any::<u32>(), Just(u32::MAX)]
}

/// A valid backoff: initial > 0, cap >= initial, multiplier finite and >= 1.
fn valid_backoff() -> impl Strategy<Value = Backoff> {
    (positive_duration(), duration(), multiplier(), jitter()).prop_map(|(initial, extra, m, j)| {
        let cap = initial.saturating_add(extra);
        Backoff::new(initial, cap).with_multiplier(m).with_jitter(j)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Property 1: `bounds` contains `delay`, everything is at most `cap`.
    #[test]
    fn delay_lies_in_bounds_and_below_cap(
        backoff in valid_backoff(),
        retry in retry(),
        previous in proptest::option::of(duration()),
        seed in any::<u64>(),
    ) {
        prop_assert_eq!(backoff.validate(), Ok(()));
        let mut rng = fastrand::Rng::with_seed(seed);
        let (lo, hi) = backoff.bounds(retry, previous);
        prop_assert!(lo <= hi, "empty bounds {:?}", (lo, hi));
        prop_assert!(hi <= backoff.cap());
        for _ in 0..8 {
            let d = backoff.delay(retry, previous, &mut rng);
            prop_assert!(lo <= d && d <= hi, "{:?} outside {:?}", d, (lo, hi));
            prop_assert!(d <= backoff.cap());
        }
    }

    /// Property 1: without jitter the delay never decreases as the retry number grows, for
    /// neighbouring and for distant retry numbers.
    #[test]
    fn no_jitter_is_non_decreasing(
        backoff in valid_backoff(),
        retry in retry(),
        step in prop_oneof![Just(1u32), 1u32..1000, any::<u32>()],
        seed in any::<u64>(),
    ) {
        let backoff = backoff.with_jitter(Jitter::None);
        let mut rng = fastrand::Rng::with_seed(seed);
        let a = backoff.delay(retry, None, &mut rng);
        let b = backoff.delay(retry.saturating_add(1), None, &mut rng);
        let c = backoff.delay(retry.saturating_add(step), None, &mut rng);
        prop_assert!(a <= b, "retry {} -> {:?}, retry+1 -> {:?}", retry, a, b);
        prop_assert!(a <= c, "retry {} -> {:?}, +{} -> {:?}", retry, a, step, c);
    }

    /// Property 1, aimed at the weak spot of any float implementation: retry numbers where
    /// the exponent `(retry - 1) * log2(multiplier)` crosses an integer.
    #[test]
    fn no_jitter_is_non_decreasing_where_the_exponent_crosses_integers(
        initial in (1u64..1_000_000_000).prop_map(Duration::from_nanos),
        k in 1u32..1000,
        n in 0u32..60,
        offset in 0u32..4,
    ) {
        let multiplier = 2f64.powf(1.0 / f64::from(k));
        let backoff = Backoff::new(initial, Duration::MAX)
            .with_multiplier(multiplier)
            .with_jitter(Jitter::None);
        let retry = (k * n + offset).max(1);
        let (a, _) = backoff.bounds(retry, None);
        let (b, _) = backoff.bounds(retry + 1, None);
        prop_assert!(a <= b, "retry {} -> {:?}, retry+1 -> {:?}", retry, a, b);
    }

    /// Property 1: each jitter mode is the documented function of the same base.
    #[test]
    fn jitter_modes_share_the_exponential_base(
        backoff in valid_backoff(),
        retry in retry(),
        previous in proptest::option::of(duration()),
        seed in any::<u64>(),
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let base = backoff.clone().with_jitter(Jitter::None).delay(retry, previous, &mut rng);
        prop_assert_eq!(backoff.clone().with_jitter(Jitter::Full).bounds(retry, previous), (Duration::ZERO, base));
        let (lo, hi) = backoff.clone().with_jitter(Jitter::Equal).bounds(retry, previous);
        prop_assert_eq!(hi, base);
        prop_assert!(lo <= base / 2 + Duration::from_nanos(1) && base / 2 <= lo + Duration::from_nanos(1));
        let (lo, hi) = backoff.clone().with_jitter(Jitter::Decorrelated).bounds(retry, previous);
        let initial = backoff.initial();
        let prev = previous.unwrap_or(initial);
        prop_assert_eq!(lo, initial.min(backoff.cap()));
        prop_assert_eq!(hi, initial.max(prev.saturating_mul(3)).min(backoff.cap()));
    }

    /// The base follows `min(cap, initial * multiplier^(retry - 1))` to within float precision.
    #[test]
    fn base_matches_the_formula(
        initial_ms in 1u64..10_000,
        cap_ms in 1u64..10_000_000,
        m in 1.0f64..10.0,
        retry in 1u32..200,
    ) {
        let initial = Duration::from_millis(initial_ms);
        let cap = Duration::from_millis(cap_ms).max(initial);
        let backoff = Backoff::new(initial, cap).with_multiplier(m).with_jitter(Jitter::None);
        let got = backoff.bounds(retry, None).0.as_secs_f64();
        let want = (initial.as_secs_f64() * m.powi(retry as i32 - 1)).min(cap.as_secs_f64());
        prop_assert!((got - want).abs() <= want * 1e-12 + 1e-9, "got {} want {}", got, want);
    }

    /// No input, valid or not, makes `delay` or `bounds` panic, and `cap` is always respected.
    #[test]
    fn arbitrary_settings_never_panic(
        initial in duration(),
        cap in duration(),
        m in prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(0.0), -10.0f64..10.0],
        jitter in jitter(),
        retry in retry(),
        previous in proptest::option::of(duration()),
        seed in any::<u64>(),
    ) {
        let backoff = Backoff::new(initial, cap).with_multiplier(m).with_jitter(jitter);
        let mut rng = fastrand::Rng::with_seed(seed);
        let d = backoff.delay(retry, previous, &mut rng);
        let (lo, hi) = backoff.bounds(retry, previous);
        prop_assert!(d <= cap);
        prop_assert!(lo <= d && d <= hi);
    }
}

fn class() -> impl Strategy<Value = ErrorClass> {
    prop_oneof![Just(ErrorClass::Transient), Just(ErrorClass::Permanent)]
}

fn policy() -> impl Strategy<Value = ExponentialRetry> {
    (
        valid_backoff(),
        proptest::option::of(prop_oneof![1u32..10, any::<u32>().prop_map(|n| n.max(1))]),
    )
        .prop_map(|(backoff, max)| {
            let p = ExponentialRetry::new(backoff);
            match max {
                Some(n) => p.max_attempts(n),
                None => p.unlimited_attempts(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Property 2, one decision: never past the deadline, never a permanent error, never
    /// beyond the attempt limit, and every reason to give up is justified.
    #[test]
    fn exponential_retry_single_decision(
        policy in policy(),
        attempts in prop_oneof![1u32..20, any::<u32>()],
        class in class(),
        arbitrary_time_left in duration(),
        time_left_choice in 0u8..6,
        previous in proptest::option::of(duration()),
        seed in any::<u64>(),
    ) {
        prop_assert_eq!(policy.validate(), Ok(()));
        let (lo, hi) = policy.backoff().bounds(attempts, previous);
        // Boundary values matter most: exactly the shortest or longest possible delay.
        let time_left = match time_left_choice {
            0 => Duration::ZERO,
            1 => lo,
            2 => hi,
            3 => hi.saturating_add(Duration::from_nanos(1)),
            _ => arbitrary_time_left,
        };
        let ctx = RetryContext { attempts, class, time_left, previous_delay: previous };
        let mut rng = fastrand::Rng::with_seed(seed);
        match policy.decide(&ctx, &mut rng) {
            RetryDecision::Retry { after } => {
                prop_assert!(after < time_left, "{:?} >= {:?}", after, time_left);
                prop_assert_eq!(class, ErrorClass::Transient);
                if let Some(max) = policy.attempts_limit() {
                    prop_assert!(attempts < max);
                }
                prop_assert!(lo <= after && after <= hi);
            }
            RetryDecision::GiveUp(GiveUpReason::Permanent) => {
                prop_assert_eq!(class, ErrorClass::Permanent);
            }
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted) => {
                prop_assert_eq!(class, ErrorClass::Transient);
                let max = policy.attempts_limit();
                prop_assert!(max.is_some_and(|m| attempts >= m), "{:?} {}", max, attempts);
            }
            RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose) => {
                prop_assert_eq!(class, ErrorClass::Transient);
                prop_assert!(hi >= time_left, "a delay in {:?} could not reach {:?}", (lo, hi), time_left);
            }
        }
        if class == ErrorClass::Permanent {
            prop_assert_eq!(policy.decide(&ctx, &mut rng), RetryDecision::GiveUp(GiveUpReason::Permanent));
        }
    }

    /// Property 2, a whole delivery: driving the policy as the pipeline does (each attempt
    /// takes some time, then the policy is asked), the total time never passes the deadline
    /// and the number of attempts never passes the limit.
    #[test]
    fn exponential_retry_whole_delivery(
        policy in policy(),
        deadline in (1u64..120_000).prop_map(Duration::from_millis),
        attempt_costs in proptest::collection::vec((0u64..2_000).prop_map(Duration::from_millis), 1..200),
        seed in any::<u64>(),
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut elapsed = Duration::ZERO;
        let mut previous = None;
        let mut attempts = 0u32;
        for cost in attempt_costs.iter().cycle().take(10_000) {
            attempts += 1;
            elapsed += *cost;
            if elapsed >= deadline {
                break; // the pipeline's deadline, not the policy's business
            }
            let ctx = RetryContext {
                attempts,
                class: ErrorClass::Transient,
                time_left: deadline - elapsed,
                previous_delay: previous,
            };
            match policy.decide(&ctx, &mut rng) {
                RetryDecision::Retry { after } => {
                    elapsed += after;
                    prop_assert!(elapsed < deadline, "retry scheduled at {:?} past {:?}", elapsed, deadline);
                    previous = Some(after);
                }
                RetryDecision::GiveUp(reason) => {
                    prop_assert_ne!(reason, GiveUpReason::Permanent);
                    break;
                }
            }
        }
        if let Some(max) = policy.attempts_limit() {
            prop_assert!(attempts <= max, "{} attempts, limit {}", attempts, max);
        }
    }
}
