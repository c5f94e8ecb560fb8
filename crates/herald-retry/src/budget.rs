//! A retry budget: a token bucket that keeps retries proportional to real traffic.

use std::time::{Duration, Instant};

use crate::InvalidSetting;

/// Fixed-point scale: tokens are stored as integer micro-tokens so that the guarantee below
/// holds exactly instead of up to accumulated float error.
const SCALE: u128 = 1_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Number of one-second slots in the deposit window.
const SLOTS: usize = 10;
/// Largest accepted `ratio`: beyond that the budget no longer limits anything useful.
const MAX_RATIO: f64 = 1000.0;

fn validate_ratio(ratio: f64) -> Result<(), InvalidSetting> {
    if ratio == f64::INFINITY {
        // The documented "unlimited" marker.
        return Ok(());
    }
    if !ratio.is_finite() || !(0.0..=MAX_RATIO).contains(&ratio) {
        return Err(InvalidSetting::new(
            "retry.budget.ratio",
            format!(
                "must be a number between 0 and {MAX_RATIO} (0.2 allows one retry per five \
                 first attempts), got {ratio}"
            ),
        ));
    }
    Ok(())
}

/// Settings for a [`RetryBudget`], kept in the producer builder.
///
/// A budget holds a clock reading, so it cannot sensibly implement `Default`; this plain
/// configuration can, and the pipeline builds the bucket with [`RetryBudgetConfig::build`]
/// when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per first attempt (0.2 = 20 %). `f64::INFINITY` means unlimited,
    /// see [`RetryBudgetConfig::unlimited`].
    pub ratio: f64,
    /// Retries always allowed per second, even with no traffic, so that a quiet producer
    /// can still retry its few messages.
    pub min_per_sec: u32,
}

impl Default for RetryBudgetConfig {
    /// 20 % of first attempts plus 10 retries per second, as in `tower::retry::budget`. herald's
    /// producer counts requests: a batch sent deposits, the retry of a failed batch's messages
    /// (sent again together) withdraws one token. Enough for ordinary hiccups, far from
    /// multiplying load during an outage.
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_per_sec: 10,
        }
    }
}

impl RetryBudgetConfig {
    /// A configuration whose budget never refuses a retry, for callers who bound retries by
    /// other means (attempt limits, deadlines) and accept the storm risk.
    #[must_use]
    pub fn unlimited() -> Self {
        RetryBudgetConfig {
            ratio: f64::INFINITY,
            min_per_sec: 0,
        }
    }

    /// `true` if the built budget will never refuse.
    #[must_use]
    pub fn is_unlimited(&self) -> bool {
        self.ratio == f64::INFINITY
    }

    /// Checked when the producer is built: `ratio` must lie in `[0, 1000]` (or be
    /// `f64::INFINITY`, the unlimited marker); field `"retry.budget.ratio"`.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        validate_ratio(self.ratio)
    }

    /// Creates the bucket, starting its clock at `now`.
    #[must_use]
    pub fn build(&self, now: Instant) -> RetryBudget {
        RetryBudget::new(self.ratio, self.min_per_sec, now)
    }
}

/// Token bucket limiting retries to a fraction of first attempts, plus a floor per second,
/// so an outage cannot become a retry storm. (Like `tower::retry::budget` / Finagle's
/// `RetryBudget`.)
///
/// A [`RetryPolicy`](crate::RetryPolicy) decides per message; when a broker is down, every
/// message fails, and per-message retries alone would multiply the load on it just as it
/// tries to recover. The budget caps retries across all messages.
///
/// # How it works
///
/// * Every first attempt [deposits](RetryBudget::deposit) `ratio` tokens into the slot of the
///   current second. Deposits expire: the window keeps [`RetryBudget::DEPOSIT_WINDOW`]
///   (10 one-second slots), so a deposit is forgotten 9 to 10 seconds after it was made.
///   This is the cap on the stored balance: it never exceeds `ratio` times the deposits of
///   the last 10 seconds, so a long quiet period of successes does not fund a later storm.
/// * A separate floor bucket holds at most `min_per_sec` tokens, starts full, and refills
///   continuously at `min_per_sec` tokens per second.
/// * A [withdrawal](RetryBudget::try_withdraw) takes one whole token, from the oldest
///   deposits first (they expire soonest), then from the floor bucket.
///
/// Tokens are integer micro-tokens; `ratio` is rounded down to a multiple of 10⁻⁶.
///
/// # Guarantee
///
/// Over any interval `[t0, t]`:
///
/// ```text
/// withdrawals ≤ ratio × (deposits in [t0 − 10 s, t]) + min_per_sec × (elapsed seconds + 1)
/// ```
///
/// and, counting from the creation of the budget (nothing deposited before it),
/// `withdrawals ≤ ratio × deposits + min_per_sec × (elapsed seconds + 1)`.
///
/// *Proof.* Every withdrawn micro-token comes either from a deposit slot or from the floor
/// bucket. Slot tokens available during the interval were deposited in it or were still in
/// the window at `t0`, that is, deposited at most 10 s before it, and a deposit of `n` adds
/// at most `ratio × n` tokens. The floor bucket holds at most `min_per_sec` at `t0` and
/// gains `min_per_sec` per second of elapsed time (exactly, in integer arithmetic with the
/// remainder carried). Adding both sources gives the bound.
///
/// # Clock
///
/// Time is passed in (`now`), never read. A `now` earlier than one seen before is treated as
/// that later time: no refill, no expiry, no panic.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: u32,
    bucket: Option<Bucket>,
}

#[derive(Debug, Clone)]
struct Bucket {
    /// Micro-tokens deposited per first attempt.
    ratio_units: u128,
    /// Capacity and refill of the floor bucket, in micro-tokens (per second).
    floor_units: u128,
    start: Instant,
    /// The latest `now` seen; time never goes back before it.
    last: Instant,
    /// Seconds since `start` of the newest slot.
    epoch: u64,
    /// Deposited micro-tokens, slot `e % SLOTS` for the second `e`.
    slots: [u128; SLOTS],
    /// Micro-tokens in the floor bucket.
    floor: u128,
    /// Refill not yet credited, in micro-token-nanoseconds (always < 10⁹).
    floor_remainder: u128,
}

impl RetryBudget {
    /// How long a deposit funds retries (at most; at least 9 s), which is also what bounds
    /// the stored balance.
    pub const DEPOSIT_WINDOW: Duration = Duration::from_secs(SLOTS as u64);

    /// `ratio`: retries allowed per first attempt (0.2 = 20 %); `min_per_sec`: retries always
    /// allowed per second even with no traffic.
    ///
    /// `now` starts the clock; the floor bucket starts full so that the first failures of a
    /// fresh producer can be retried. `ratio == f64::INFINITY` builds an unlimited budget.
    /// Invalid ratios (rejected by [`RetryBudget::validate`]) are clamped to `[0, 1000]`,
    /// NaN counting as 0.
    #[must_use]
    pub fn new(ratio: f64, min_per_sec: u32, now: Instant) -> Self {
        if ratio == f64::INFINITY {
            return RetryBudget {
                ratio,
                min_per_sec,
                bucket: None,
            };
        }
        let clamped = if ratio > 0.0 {
            ratio.min(MAX_RATIO)
        } else {
            0.0
        };
        // Rounded down, so that deposits never exceed `ratio` per first attempt.
        let ratio_units = (clamped * SCALE as f64).floor() as u128;
        let floor_units = u128::from(min_per_sec) * SCALE;
        RetryBudget {
            ratio,
            min_per_sec,
            bucket: Some(Bucket {
                ratio_units,
                floor_units,
                start: now,
                last: now,
                epoch: 0,
                slots: [0; SLOTS],
                floor: floor_units,
                floor_remainder: 0,
            }),
        }
    }

    /// A budget that never refuses, for callers who accept the retry-storm risk.
    #[must_use]
    pub fn unlimited() -> Self {
        RetryBudget {
            ratio: f64::INFINITY,
            min_per_sec: 0,
            bucket: None,
        }
    }

    /// `true` if this budget never refuses a retry.
    #[must_use]
    pub fn is_unlimited(&self) -> bool {
        self.bucket.is_none()
    }

    /// Checks the ratio: finite and in `[0, 1000]` (or `f64::INFINITY`, the unlimited
    /// marker); field `"retry.budget.ratio"`.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        validate_ratio(self.ratio)
    }

    /// The configured ratio (`f64::INFINITY` when unlimited), for reporting.
    #[must_use]
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The configured floor of retries per second, for reporting.
    #[must_use]
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// Record `n` first attempts (deposits `n * ratio` tokens), which is what earns retries.
    pub fn deposit(&mut self, n: u64, now: Instant) {
        if let Some(bucket) = &mut self.bucket {
            bucket.advance(now);
            let amount = u128::from(n).saturating_mul(bucket.ratio_units);
            let slot = &mut bucket.slots[bucket.slot_index()];
            *slot = slot.saturating_add(amount);
        }
    }

    /// Take one retry token; `false` means "no budget, give up this retry".
    ///
    /// A refused retry should be reported as failed by the caller, not dropped.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let Some(bucket) = &mut self.bucket else {
            return true;
        };
        bucket.advance(now);
        if bucket.total() < SCALE {
            return false;
        }
        let mut need = SCALE;
        // Oldest slot first: slot `epoch + 1` (mod SLOTS) holds the second `epoch - 9`.
        for offset in 1..=SLOTS {
            let index = (bucket.slot_index() + offset) % SLOTS;
            let take = bucket.slots[index].min(need);
            bucket.slots[index] -= take;
            need -= take;
            if need == 0 {
                return true;
            }
        }
        // `total() >= SCALE` guarantees the floor covers the rest.
        bucket.floor -= need;
        true
    }

    /// Tokens available now (for metrics and tests); `f64::INFINITY` when unlimited.
    pub fn balance(&mut self, now: Instant) -> f64 {
        match &mut self.bucket {
            None => f64::INFINITY,
            Some(bucket) => {
                bucket.advance(now);
                bucket.total() as f64 / SCALE as f64
            }
        }
    }
}

impl Bucket {
    fn slot_index(&self) -> usize {
        (self.epoch % SLOTS as u64) as usize
    }

    fn total(&self) -> u128 {
        self.slots
            .iter()
            .fold(self.floor, |sum, slot| sum.saturating_add(*slot))
    }

    /// Moves the clock to `now` (never backwards): refills the floor bucket and expires
    /// slots that left the window.
    fn advance(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.last);
        if delta.is_zero() {
            return;
        }
        self.last = now;

        let delta_nanos = delta.as_nanos();
        if delta_nanos >= NANOS_PER_SEC {
            // A full second refills the floor bucket completely.
            self.floor = self.floor_units;
            self.floor_remainder = 0;
        } else {
            // < 4.3e9 * 1e6 * 1e9 + 1e9, far below u128::MAX.
            let credit = self.floor_units * delta_nanos + self.floor_remainder;
            self.floor += credit / NANOS_PER_SEC;
            self.floor_remainder = credit % NANOS_PER_SEC;
            if self.floor >= self.floor_units {
                self.floor = self.floor_units;
                self.floor_remainder = 0;
            }
        }

        let epoch = now.saturating_duration_since(self.start).as_secs();
        if epoch > self.epoch {
            if epoch - self.epoch >= SLOTS as u64 {
                self.slots = [0; SLOTS];
            } else {
                for e in self.epoch + 1..=epoch {
                    self.slots[(e % SLOTS as u64) as usize] = 0;
                }
            }
            self.epoch = epoch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn drain(b: &mut RetryBudget, now: Instant) -> u32 {
        let mut n = 0;
        while b.try_withdraw(now) {
            n += 1;
            assert!(n < 1_000_000, "budget never ran out");
        }
        n
    }

    #[test]
    fn config_defaults_and_build() {
        let c = RetryBudgetConfig::default();
        assert_eq!(c.ratio, 0.2);
        assert_eq!(c.min_per_sec, 10);
        assert_eq!(c.validate(), Ok(()));
        let b = c.build(Instant::now());
        assert_eq!(b.ratio(), 0.2);
        assert_eq!(b.min_per_sec(), 10);
        assert!(!b.is_unlimited());
    }

    #[test]
    fn floor_allows_min_per_sec_then_refills() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.0, 10, t0);
        assert_eq!(b.balance(t0), 10.0);
        assert_eq!(drain(&mut b, t0), 10);
        // Half a second refills five tokens.
        assert_eq!(drain(&mut b, t0 + secs(0.5)), 5);
        // Much later, the floor is full again but never above min_per_sec.
        assert_eq!(drain(&mut b, t0 + secs(100.0)), 10);
    }

    #[test]
    fn floor_refill_is_exact_over_many_small_steps() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.0, 3, t0);
        assert_eq!(drain(&mut b, t0), 3);
        // 1000 steps of 1 ms add up to exactly 3 tokens: no refill lost to rounding.
        let mut now = t0;
        let mut got = 0;
        for _ in 0..1000 {
            now += Duration::from_millis(1);
            got += drain(&mut b, now);
        }
        assert_eq!(got, 3);
    }

    #[test]
    fn deposits_fund_retries() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.2, 0, t0);
        assert!(!b.try_withdraw(t0));
        b.deposit(4, t0);
        assert!(!b.try_withdraw(t0), "0.8 tokens are not a whole retry");
        b.deposit(1, t0);
        assert!(b.try_withdraw(t0));
        assert!(!b.try_withdraw(t0));
        b.deposit(100, t0);
        assert_eq!(drain(&mut b, t0), 20);
    }

    #[test]
    fn decimal_ratios_are_not_rounded_away() {
        let t0 = Instant::now();
        for (ratio, n, want) in [(0.1, 10, 1), (0.3, 10, 3), (0.7, 10, 7), (1.0, 7, 7)] {
            let mut b = RetryBudget::new(ratio, 0, t0);
            b.deposit(n, t0);
            assert_eq!(drain(&mut b, t0), want, "ratio {ratio}");
        }
    }

    #[test]
    fn deposits_expire_after_the_window() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(1.0, 0, t0);
        b.deposit(5, t0);
        assert_eq!(b.balance(t0 + secs(9.5)), 5.0);
        assert_eq!(b.balance(t0 + secs(10.0)), 0.0);
        // Spread deposits: each one expires on its own.
        let t1 = t0 + secs(20.0);
        b.deposit(1, t1);
        b.deposit(1, t1 + secs(5.0));
        assert_eq!(b.balance(t1 + secs(9.0)), 2.0);
        assert_eq!(b.balance(t1 + secs(10.0)), 1.0);
        assert_eq!(b.balance(t1 + secs(15.0)), 0.0);
    }

    #[test]
    fn withdrawals_use_oldest_deposits_first() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(1.0, 0, t0);
        b.deposit(1, t0);
        b.deposit(1, t0 + secs(5.0));
        assert!(b.try_withdraw(t0 + secs(6.0)));
        // The remaining token is the younger one, still there after the first would expire.
        assert_eq!(b.balance(t0 + secs(12.0)), 1.0);
    }

    #[test]
    fn floor_and_deposits_combine() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.5, 2, t0);
        b.deposit(1, t0); // 0.5 token
        assert_eq!(b.balance(t0), 2.5);
        assert!(b.try_withdraw(t0)); // 0.5 from deposits, 0.5 from the floor
        assert_eq!(b.balance(t0), 1.5);
        assert!(b.try_withdraw(t0));
        assert!(!b.try_withdraw(t0), "half a token left");
        assert_eq!(b.balance(t0), 0.5);
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now();
        let later = t0 + secs(30.0);
        let mut b = RetryBudget::new(1.0, 1, later);
        b.deposit(2, later);
        // Earlier than creation and than the last call: no panic, no refill, no expiry.
        assert_eq!(b.balance(t0), 3.0);
        assert_eq!(drain(&mut b, t0), 3);
        b.deposit(1, t0);
        assert_eq!(b.balance(t0), 1.0);
        assert_eq!(b.balance(later + secs(0.5)), 1.5);
    }

    #[test]
    fn huge_numbers_do_not_panic() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(1000.0, u32::MAX, t0);
        b.deposit(u64::MAX, t0);
        b.deposit(u64::MAX, t0);
        assert!(b.try_withdraw(t0 + Duration::from_secs(1 << 40)));
        assert!(b.balance(t0 + Duration::from_secs(1 << 41)) >= f64::from(u32::MAX) - 1.0);
    }

    #[test]
    fn unlimited_never_refuses() {
        let now = Instant::now();
        for mut b in [
            RetryBudget::unlimited(),
            RetryBudgetConfig::unlimited().build(now),
        ] {
            assert!(b.is_unlimited());
            assert_eq!(b.validate(), Ok(()));
            for _ in 0..10_000 {
                assert!(b.try_withdraw(now));
            }
            b.deposit(5, now);
            assert_eq!(b.balance(now), f64::INFINITY);
        }
        assert!(RetryBudgetConfig::unlimited().is_unlimited());
        assert_eq!(RetryBudgetConfig::unlimited().validate(), Ok(()));
    }

    #[test]
    fn invalid_ratio_names_the_field() {
        for ratio in [-0.1, f64::NAN, f64::NEG_INFINITY, 1000.5] {
            let c = RetryBudgetConfig {
                ratio,
                min_per_sec: 10,
            };
            let err = c.validate().expect_err("invalid ratio");
            assert_eq!(err.field, "retry.budget.ratio");
            let b = c.build(Instant::now());
            assert_eq!(b.validate().map_err(|e| e.field), Err("retry.budget.ratio"));
        }
        for ratio in [0.0, 0.2, 1000.0] {
            let c = RetryBudgetConfig {
                ratio,
                min_per_sec: 0,
            };
            assert_eq!(c.validate(), Ok(()));
        }
    }

    #[test]
    fn invalid_ratio_is_clamped_not_panicking() {
        let t0 = Instant::now();
        let mut nan = RetryBudget::new(f64::NAN, 0, t0);
        nan.deposit(100, t0);
        assert!(!nan.try_withdraw(t0));
        let mut big = RetryBudget::new(1e300, 0, t0);
        big.deposit(1, t0);
        assert_eq!(big.balance(t0), 1000.0);
    }
}
