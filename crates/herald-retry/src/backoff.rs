//! Exponential backoff with jitter.

use std::time::Duration;

use crate::InvalidSetting;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// How randomness spreads the delays of many clients that failed at the same moment.
///
/// Without jitter, every producer that saw the same broker outage retries in lock-step and
/// hits the recovering broker together. The modes follow AWS's
/// "Exponential Backoff and Jitter" article; `base` is the exponential delay of
/// [`Backoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly `base`. Predictable, but clients stay synchronized; mostly for tests.
    None,
    /// Uniform in `[0, base]`. The least total work for the server, hence the default.
    #[default]
    Full,
    /// `base / 2` plus uniform in `[0, base / 2]`: never retries too eagerly, still spreads.
    Equal,
    /// `min(cap, uniform[initial, max(initial, previous * 3)])`: each delay grows from the
    /// previous one rather than from the retry number.
    Decorrelated,
}

/// Exponential backoff: `base = min(cap, initial * multiplier^(retry - 1))`, then [`Jitter`].
///
/// Plain data, cheap to clone, and deterministic given the random generator passed in, so
/// that policies built on it can be tested without sleeping.
///
/// Invariants kept for any input, valid or not (see [`Backoff::validate`]): no arithmetic
/// overflow or panic, even for retry number `u32::MAX`; every delay is at most `cap`; without
/// jitter the delay never decreases as the retry number grows.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Default for Backoff {
    /// 100 ms doubling up to 10 s with full jitter: quick recovery from a leader election,
    /// gentle on a broker that is down for longer.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// A backoff starting at `initial` and never longer than `cap`, doubling each retry with
    /// [`Jitter::Full`], the usual choice; adjust with the `with_*` methods.
    #[must_use]
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Backoff {
            initial,
            cap,
            multiplier: 2.0,
            jitter: Jitter::Full,
        }
    }

    /// Sets the growth factor per retry. Values below 1 (or NaN) are rejected by
    /// [`Backoff::validate`]; if used anyway they behave as 1 (a constant delay).
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets how delays are randomized; see [`Jitter`] for why it matters.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before the first retry (before jitter), for reporting the effective settings.
    #[must_use]
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay ever returned, for reporting the effective settings.
    #[must_use]
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The growth factor per retry, for reporting the effective settings.
    #[must_use]
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The jitter mode, for reporting the effective settings.
    #[must_use]
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// Checks the settings once, when the producer is built, so that a typo fails loudly
    /// instead of producing zero or runaway delays.
    ///
    /// Rules: `initial > 0` (a zero delay turns retries into a busy loop), `cap >= initial`,
    /// and `multiplier` finite and `>= 1` (a shrinking backoff defeats its purpose).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.initial.is_zero() {
            return Err(InvalidSetting::new(
                "retry.backoff.initial",
                "must be greater than zero (a zero delay makes retries a busy loop)",
            ));
        }
        if self.cap < self.initial {
            return Err(InvalidSetting::new(
                "retry.backoff.cap",
                format!(
                    "must be at least `retry.backoff.initial` ({:?}), got {:?}",
                    self.initial, self.cap
                ),
            ));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(InvalidSetting::new(
                "retry.backoff.multiplier",
                format!(
                    "must be a finite number >= 1.0 (2.0 doubles each retry), got {}",
                    self.multiplier
                ),
            ));
        }
        Ok(())
    }

    /// Delay before retry number `retry` (1 = first retry). `previous` is the delay used
    /// before the previous retry (`None` for the first), needed by [`Jitter::Decorrelated`].
    ///
    /// Retry number 0 is treated as 1. The result always lies in
    /// [`bounds(retry, previous)`](Backoff::bounds) and is at most `cap`.
    pub fn delay(
        &self,
        retry: u32,
        previous: Option<Duration>,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        let (lo, hi) = self.bounds_nanos(retry, previous);
        let nanos = match self.jitter {
            Jitter::None => hi,
            Jitter::Full | Jitter::Equal | Jitter::Decorrelated => rng.u128(lo..=hi),
        };
        from_nanos(nanos)
    }

    /// The closed interval every `delay(retry, previous, _)` result lies in, so that tests,
    /// docs and capacity planning can reason about delays without sampling them.
    #[must_use]
    pub fn bounds(&self, retry: u32, previous: Option<Duration>) -> (Duration, Duration) {
        let (lo, hi) = self.bounds_nanos(retry, previous);
        (from_nanos(lo), from_nanos(hi))
    }

    fn bounds_nanos(&self, retry: u32, previous: Option<Duration>) -> (u128, u128) {
        match self.jitter {
            Jitter::None => {
                let base = self.base_nanos(retry);
                (base, base)
            }
            Jitter::Full => (0, self.base_nanos(retry)),
            Jitter::Equal => {
                let base = self.base_nanos(retry);
                (base / 2, base)
            }
            Jitter::Decorrelated => {
                let cap = self.cap.as_nanos();
                let initial = self.initial.as_nanos();
                let previous = previous.map_or(initial, |p| p.as_nanos());
                // `Duration` nanoseconds fit in 94 bits, so `* 3` cannot overflow a u128;
                // saturate anyway to keep the reasoning local.
                let hi = initial.max(previous.saturating_mul(3));
                (initial.min(cap), hi.min(cap))
            }
        }
    }

    /// `min(cap, initial * multiplier^(retry - 1))` in nanoseconds.
    ///
    /// Computed so that it is non-decreasing in `retry` by construction (not just up to
    /// rounding): every step below is a monotone function of the previous one.
    fn base_nanos(&self, retry: u32) -> u128 {
        let cap = self.cap.as_nanos();
        let initial = self.initial.as_nanos();
        // NaN and values <= 1 mean "no growth" (rejected by `validate`).
        let grows = self.multiplier > 1.0; // false for NaN too
        if retry <= 1 || initial == 0 || !grows {
            return initial.min(cap);
        }
        // exponent = (retry - 1) * log2(multiplier): `retry - 1` is exact in f64 and the
        // logarithm is a fixed non-negative number, so the product is monotone in `retry`.
        let exponent = f64::from(retry - 1) * self.multiplier.log2();
        let grown = match exp2_monotone(exponent) {
            Some(factor) => initial as f64 * factor,
            None => f64::INFINITY,
        };
        // Clamp before converting back, so no conversion can overflow (`as` from f64 to
        // u128 saturates, but staying below `cap` keeps the intent explicit).
        let nanos = if grown < cap as f64 {
            (grown as u128).min(cap)
        } else {
            cap
        };
        // `initial as f64` may round down for very long delays; never go below retry 1.
        nanos.max(initial).min(cap)
    }
}

/// `2^x` for `x >= 0`, monotone in `x` by construction, or `None` if it exceeds the f64 range.
///
/// The platform's `exp2`/`powf` are accurate but not documented to be monotone; a backoff that
/// shrinks by one nanosecond at some retry number would break the documented invariant, so
/// this splits `x` into an integer part (an exact power of two) and a fraction in `[0, 1)`
/// whose power is a Taylor polynomial with positive coefficients, evaluated by Horner's rule
/// (each step is monotone in a non-negative argument).
fn exp2_monotone(x: f64) -> Option<f64> {
    let in_range = x < 1000.0; // false for NaN and +inf too
    if !in_range {
        return None;
    }
    let x = x.max(0.0);
    let whole = x.floor();
    // Exact (Sterbenz): `x` lies in [whole, 2 * whole] when whole >= 1, and equals the
    // fraction when whole == 0.
    let frac = x - whole;

    const DEGREE: usize = 16;
    let mut coefficients = [1.0_f64; DEGREE + 1];
    for i in 1..=DEGREE {
        coefficients[i] = coefficients[i - 1] * std::f64::consts::LN_2 / i as f64;
    }
    let mut poly = 0.0_f64;
    for c in coefficients.iter().rev() {
        poly = poly * frac + c;
    }
    // 2^frac < 2; clamping keeps the jump to the next integer exponent non-decreasing.
    let poly = poly.min(2.0);
    // `whole` is an integer in [0, 1000), so this is an exact power of two.
    let power = f64::from_bits((whole as u64 + 1023) << 52);
    Some(power * poly)
}

/// Converts nanoseconds back to a `Duration`, saturating instead of panicking.
fn from_nanos(nanos: u128) -> Duration {
    let secs = nanos / NANOS_PER_SEC;
    let sub = (nanos % NANOS_PER_SEC) as u32;
    match u64::try_from(secs) {
        Ok(secs) => Duration::new(secs, sub),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn default_settings() {
        let b = Backoff::default();
        assert_eq!(b.initial(), ms(100));
        assert_eq!(b.cap(), Duration::from_secs(10));
        assert_eq!(b.multiplier(), 2.0);
        assert_eq!(b.jitter(), Jitter::Full);
        assert_eq!(Jitter::default(), Jitter::Full);
        assert_eq!(b.validate(), Ok(()));
    }

    #[test]
    fn no_jitter_doubles_up_to_cap() {
        let b = Backoff::default().with_jitter(Jitter::None);
        let mut rng = fastrand::Rng::with_seed(1);
        let got: Vec<_> = (1..=9).map(|r| b.delay(r, None, &mut rng)).collect();
        let want: Vec<_> = [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn retry_zero_is_treated_as_first_retry() {
        let b = Backoff::default().with_jitter(Jitter::None);
        assert_eq!(b.bounds(0, None), b.bounds(1, None));
    }

    #[test]
    fn non_integer_multiplier() {
        let b = Backoff::new(ms(100), Duration::from_secs(60))
            .with_multiplier(1.5)
            .with_jitter(Jitter::None);
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(b.delay(1, None, &mut rng), ms(100));
        assert_eq!(b.delay(2, None, &mut rng), ms(150));
        assert_eq!(b.delay(3, None, &mut rng), ms(225));
        let d4 = b.delay(4, None, &mut rng).as_secs_f64();
        assert!((d4 - 0.3375).abs() < 1e-9, "{d4}");
    }

    #[test]
    fn huge_retry_numbers_saturate_at_cap() {
        let mut rng = fastrand::Rng::with_seed(7);
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            for multiplier in [1.0, 1.000_000_1, 2.0, 10.0, f64::MAX] {
                let b = Backoff::default()
                    .with_multiplier(multiplier)
                    .with_jitter(jitter);
                for retry in [u32::MAX - 1, u32::MAX] {
                    let d = b.delay(retry, Some(Duration::MAX), &mut rng);
                    assert!(d <= b.cap());
                    let (_, hi) = b.bounds(retry, None);
                    // Decorrelated grows from the previous delay, not the retry number.
                    if multiplier > 1.0 && jitter != Jitter::Decorrelated {
                        assert_eq!(hi, b.cap(), "{jitter:?} {multiplier}");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_durations_do_not_panic() {
        let mut rng = fastrand::Rng::with_seed(3);
        let b = Backoff::new(Duration::MAX, Duration::MAX).with_jitter(Jitter::None);
        assert_eq!(b.delay(1, None, &mut rng), Duration::MAX);
        assert_eq!(b.delay(u32::MAX, None, &mut rng), Duration::MAX);
        let b = b.with_jitter(Jitter::Decorrelated);
        assert_eq!(
            b.bounds(5, Some(Duration::MAX)),
            (Duration::MAX, Duration::MAX)
        );
        let tiny = Backoff::new(Duration::from_nanos(1), Duration::MAX)
            .with_multiplier(f64::MAX)
            .with_jitter(Jitter::None);
        assert_eq!(tiny.delay(2, None, &mut rng), Duration::MAX);
    }

    #[test]
    fn invalid_multipliers_behave_as_constant_and_do_not_panic() {
        let mut rng = fastrand::Rng::with_seed(3);
        for m in [f64::NAN, 0.5, -3.0, 0.0, f64::NEG_INFINITY] {
            let b = Backoff::default()
                .with_multiplier(m)
                .with_jitter(Jitter::None);
            assert_eq!(b.delay(10, None, &mut rng), ms(100), "{m}");
        }
        let b = Backoff::default()
            .with_multiplier(f64::INFINITY)
            .with_jitter(Jitter::None);
        assert_eq!(b.delay(1, None, &mut rng), ms(100));
        assert_eq!(b.delay(2, None, &mut rng), b.cap());
    }

    #[test]
    fn cap_below_initial_still_caps() {
        let mut rng = fastrand::Rng::with_seed(3);
        let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            let b = b.clone().with_jitter(jitter);
            assert!(b.delay(1, None, &mut rng) <= Duration::from_secs(1));
            assert!(b.delay(3, Some(ms(1)), &mut rng) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn jitter_bounds() {
        let b = Backoff::new(ms(100), Duration::from_secs(10));
        assert_eq!(
            b.clone().with_jitter(Jitter::None).bounds(3, None),
            (ms(400), ms(400))
        );
        assert_eq!(
            b.clone().with_jitter(Jitter::Full).bounds(3, None),
            (ms(0), ms(400))
        );
        assert_eq!(
            b.clone().with_jitter(Jitter::Equal).bounds(3, None),
            (ms(200), ms(400))
        );
        let d = b.clone().with_jitter(Jitter::Decorrelated);
        assert_eq!(d.bounds(1, None), (ms(100), ms(300)));
        assert_eq!(d.bounds(7, Some(ms(1000))), (ms(100), ms(3000)));
        assert_eq!(d.bounds(7, Some(ms(5000))), (ms(100), ms(10_000)));
        // A previous delay shorter than `initial` still allows up to `initial`.
        assert_eq!(d.bounds(2, Some(ms(10))), (ms(100), ms(100)));
    }

    #[test]
    fn jitter_actually_varies_and_is_deterministic_per_seed() {
        let b = Backoff::default();
        let sample = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..20)
                .map(|_| b.delay(5, None, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = sample(42);
        assert_eq!(a, sample(42));
        assert!(a.iter().any(|d| *d != a[0]), "full jitter should vary");
    }

    #[test]
    fn validate_names_the_field() {
        let err = |b: Backoff| b.validate().expect_err("should be invalid").field;
        assert_eq!(
            err(Backoff::new(Duration::ZERO, ms(10))),
            "retry.backoff.initial"
        );
        assert_eq!(err(Backoff::new(ms(10), ms(5))), "retry.backoff.cap");
        for m in [0.5, f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(
                err(Backoff::default().with_multiplier(m)),
                "retry.backoff.multiplier"
            );
        }
        assert_eq!(Backoff::default().with_multiplier(1.0).validate(), Ok(()));
        assert_eq!(Backoff::new(ms(10), ms(10)).validate(), Ok(()));
    }

    #[test]
    fn exp2_is_accurate_and_exact_at_integers() {
        for i in 0..64 {
            assert_eq!(exp2_monotone(f64::from(i)), Some(2f64.powi(i)));
        }
        for x in [0.1, 0.5, 0.75, 0.999_999, 3.3, 17.9] {
            let got = exp2_monotone(x).expect("in range");
            let want = x.exp2();
            assert!(((got - want) / want).abs() < 1e-14, "{x}: {got} vs {want}");
        }
        assert_eq!(exp2_monotone(f64::INFINITY), None);
        assert_eq!(exp2_monotone(f64::NAN), None);
        assert_eq!(exp2_monotone(5000.0), None);
    }

    #[test]
    fn exp2_is_monotone_across_integer_boundaries() {
        for i in 0..20 {
            let at = f64::from(i + 1);
            let below = f64::from_bits(at.to_bits() - 1);
            assert!(exp2_monotone(below) <= exp2_monotone(at));
        }
    }
}
