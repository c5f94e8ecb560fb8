//! Retry decisions: the [`RetryPolicy`] trait and the policies shipped with herald.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{Backoff, ErrorClass, InvalidSetting};

/// What the pipeline knows when a send attempt failed.
///
/// A plain value rather than a borrowed message, so that a policy cannot depend on message
/// contents (which would make retries unpredictable and metrics high-cardinality).
#[derive(Debug, Clone, Copy)]
pub struct RetryContext {
    /// Attempts made so far, including the one that just failed (so `>= 1`); deciding now
    /// means deciding about retry number `attempts`.
    pub attempts: u32,
    /// Whether the failure can go away on its own.
    pub class: ErrorClass,
    /// Time left until the message's delivery deadline: a retry that would start after it
    /// is pointless, the message will be reported as failed anyway.
    pub time_left: Duration,
    /// The delay used before the previous retry (`None` before the first retry), which
    /// decorrelated jitter grows from.
    pub previous_delay: Option<Duration>,
}

/// The outcome of [`RetryPolicy::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Send again once `after` has passed.
    Retry {
        /// How long to wait before the next attempt; always less than the time left.
        after: Duration,
    },
    /// Stop and report the message as failed, with the reason for the operator.
    GiveUp(GiveUpReason),
}

impl RetryDecision {
    /// `true` for [`RetryDecision::Retry`], for call sites that only branch on it.
    #[must_use]
    pub fn is_retry(&self) -> bool {
        matches!(self, RetryDecision::Retry { .. })
    }
}

/// Why a policy gave up: reported with the failed message and as a metric label, so that an
/// operator can tell a bad message from an overloaded broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The error is permanent; retrying cannot help.
    Permanent,
    /// The policy's maximum number of attempts was reached.
    AttemptsExhausted,
    /// The next retry could not start before the delivery deadline.
    DeadlineTooClose,
}

impl GiveUpReason {
    /// A stable snake_case name, meant as a low-cardinality metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::Permanent => "permanent",
            GiveUpReason::AttemptsExhausted => "attempts_exhausted",
            GiveUpReason::DeadlineTooClose => "deadline_too_close",
        }
    }
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUpReason::Permanent => "the error is permanent, so retrying cannot help",
            GiveUpReason::AttemptsExhausted => "the maximum number of attempts was reached",
            GiveUpReason::DeadlineTooClose => {
                "the next retry could not start before the delivery deadline"
            }
        })
    }
}

/// Decides whether a failed attempt is retried, and after how long.
///
/// Kept to one required method so that custom policies are a few lines and the pipeline
/// stays oblivious to how they decide. Object safe: the pipeline stores a
/// `Box<dyn RetryPolicy>` or `Arc<dyn RetryPolicy>`. Randomness is passed in, so a policy
/// is deterministic under a seeded generator.
///
/// Rate limiting retries across messages is a separate concern, see [`RetryBudget`](crate::RetryBudget).
///
/// # Example
///
/// A policy that retries transient errors at a fixed interval, three attempts in total:
///
/// ```
/// use std::time::Duration;
/// use herald_retry::{ErrorClass, GiveUpReason, RetryContext, RetryDecision, RetryPolicy};
///
/// #[derive(Debug)]
/// struct Fixed;
///
/// impl RetryPolicy for Fixed {
///     fn decide(&self, ctx: &RetryContext, _rng: &mut fastrand::Rng) -> RetryDecision {
///         let after = Duration::from_millis(50);
///         if !ctx.class.is_transient() {
///             RetryDecision::GiveUp(GiveUpReason::Permanent)
///         } else if ctx.attempts >= 3 {
///             RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
///         } else if after >= ctx.time_left {
///             RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
///         } else {
///             RetryDecision::Retry { after }
///         }
///     }
/// }
///
/// let policy: Box<dyn RetryPolicy> = Box::new(Fixed);
/// let ctx = RetryContext {
///     attempts: 1,
///     class: ErrorClass::Transient,
///     time_left: Duration::from_secs(1),
///     previous_delay: None,
/// };
/// let mut rng = fastrand::Rng::with_seed(7);
/// assert_eq!(
///     policy.decide(&ctx, &mut rng),
///     RetryDecision::Retry { after: Duration::from_millis(50) }
/// );
/// ```
pub trait RetryPolicy: Send + Sync + fmt::Debug + 'static {
    /// Decides about the attempt described by `ctx`. Must not block or sleep: the pipeline
    /// does the waiting.
    fn decide(&self, ctx: &RetryContext, rng: &mut fastrand::Rng) -> RetryDecision;

    /// Checked once when the producer is built, so that a bad setting fails there with the
    /// field named. Default: `Ok(())`.
    fn validate(&self) -> Result<(), InvalidSetting> {
        Ok(())
    }
}

// The pipeline stores policies as trait objects; fail the build if that ever breaks.
const _: Option<&dyn RetryPolicy> = None;

impl<P: RetryPolicy + ?Sized> RetryPolicy for Box<P> {
    fn decide(&self, ctx: &RetryContext, rng: &mut fastrand::Rng) -> RetryDecision {
        (**self).decide(ctx, rng)
    }

    fn validate(&self) -> Result<(), InvalidSetting> {
        (**self).validate()
    }
}

impl<P: RetryPolicy + ?Sized> RetryPolicy for Arc<P> {
    fn decide(&self, ctx: &RetryContext, rng: &mut fastrand::Rng) -> RetryDecision {
        (**self).decide(ctx, rng)
    }

    fn validate(&self) -> Result<(), InvalidSetting> {
        (**self).validate()
    }
}

/// The default policy: exponential backoff, optional max attempts, never past the deadline.
///
/// By default attempts are unlimited and only the delivery deadline bounds them, like Kafka's
/// `delivery.timeout.ms`: the operator reasons about one duration, not attempts times delays.
#[derive(Debug, Clone, PartialEq)]
pub struct ExponentialRetry {
    backoff: Backoff,
    max_attempts: Option<u32>,
}

impl Default for ExponentialRetry {
    /// [`Backoff::default`] and no attempt limit (bounded by the delivery timeout).
    fn default() -> Self {
        ExponentialRetry::new(Backoff::default())
    }
}

impl ExponentialRetry {
    /// A policy using `backoff` for delays, with no attempt limit.
    #[must_use]
    pub fn new(backoff: Backoff) -> Self {
        ExponentialRetry {
            backoff,
            max_attempts: None,
        }
    }

    /// Gives up once `n` attempts (the first one included) have failed, for callers who
    /// prefer a count to a deadline. `1` means no retries; `0` is rejected by `validate`.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Removes the attempt limit, leaving the delivery deadline as the only bound.
    #[must_use]
    pub fn unlimited_attempts(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// The backoff in use, for reporting the effective settings.
    #[must_use]
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The attempt limit (`None`: only the deadline bounds retries).
    #[must_use]
    pub fn attempts_limit(&self) -> Option<u32> {
        self.max_attempts
    }
}

impl RetryPolicy for ExponentialRetry {
    /// Gives up on permanent errors, then on the attempt limit, then when the backoff delay
    /// would reach the deadline; otherwise retries after that delay.
    fn decide(&self, ctx: &RetryContext, rng: &mut fastrand::Rng) -> RetryDecision {
        if !ctx.class.is_transient() {
            return RetryDecision::GiveUp(GiveUpReason::Permanent);
        }
        if self.max_attempts.is_some_and(|max| ctx.attempts >= max) {
            return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted);
        }
        let after = self.backoff.delay(ctx.attempts, ctx.previous_delay, rng);
        if after >= ctx.time_left {
            return RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose);
        }
        RetryDecision::Retry { after }
    }

    fn validate(&self) -> Result<(), InvalidSetting> {
        self.backoff.validate()?;
        if self.max_attempts == Some(0) {
            return Err(InvalidSetting::new(
                "retry.max_attempts",
                "must be at least 1 (1 means no retries)",
            ));
        }
        Ok(())
    }
}

/// A policy that never retries, for callers who handle failures themselves or want
/// at-most-once-attempt semantics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoRetry;

impl RetryPolicy for NoRetry {
    /// Gives up with [`GiveUpReason::Permanent`] for permanent errors (the more useful
    /// reason for the operator) and [`GiveUpReason::AttemptsExhausted`] otherwise.
    fn decide(&self, ctx: &RetryContext, _rng: &mut fastrand::Rng) -> RetryDecision {
        RetryDecision::GiveUp(if ctx.class.is_transient() {
            GiveUpReason::AttemptsExhausted
        } else {
            GiveUpReason::Permanent
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Jitter;

    fn ctx(attempts: u32, class: ErrorClass, time_left: Duration) -> RetryContext {
        RetryContext {
            attempts,
            class,
            time_left,
            previous_delay: None,
        }
    }

    fn no_jitter() -> ExponentialRetry {
        ExponentialRetry::new(Backoff::default().with_jitter(Jitter::None))
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let mut rng = fastrand::Rng::with_seed(1);
        let d = no_jitter().decide(
            &ctx(1, ErrorClass::Permanent, Duration::from_secs(100)),
            &mut rng,
        );
        assert_eq!(d, RetryDecision::GiveUp(GiveUpReason::Permanent));
        assert!(!d.is_retry());
    }

    #[test]
    fn transient_errors_retry_with_backoff() {
        let mut rng = fastrand::Rng::with_seed(1);
        let p = no_jitter();
        let t = Duration::from_secs(100);
        assert_eq!(
            p.decide(&ctx(1, ErrorClass::Transient, t), &mut rng),
            RetryDecision::Retry {
                after: Duration::from_millis(100)
            }
        );
        assert_eq!(
            p.decide(&ctx(3, ErrorClass::Transient, t), &mut rng),
            RetryDecision::Retry {
                after: Duration::from_millis(400)
            }
        );
    }

    #[test]
    fn attempts_limit() {
        let mut rng = fastrand::Rng::with_seed(1);
        let p = no_jitter().max_attempts(3);
        assert_eq!(p.attempts_limit(), Some(3));
        let t = Duration::from_secs(100);
        assert!(p
            .decide(&ctx(2, ErrorClass::Transient, t), &mut rng)
            .is_retry());
        for attempts in [3, 4, u32::MAX] {
            assert_eq!(
                p.decide(&ctx(attempts, ErrorClass::Transient, t), &mut rng),
                RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
            );
        }
        let once = no_jitter().max_attempts(1);
        assert_eq!(
            once.decide(&ctx(1, ErrorClass::Transient, t), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
        assert_eq!(p.unlimited_attempts().attempts_limit(), None);
    }

    #[test]
    fn deadline_is_respected() {
        let mut rng = fastrand::Rng::with_seed(1);
        let p = no_jitter();
        // Zero time left: not even a zero delay fits.
        assert_eq!(
            p.decide(&ctx(1, ErrorClass::Transient, Duration::ZERO), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
        );
        // Exactly the delay left: the retry would start at the deadline, give up.
        assert_eq!(
            p.decide(
                &ctx(1, ErrorClass::Transient, Duration::from_millis(100)),
                &mut rng
            ),
            RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
        );
        assert!(p
            .decide(
                &ctx(1, ErrorClass::Transient, Duration::from_millis(101)),
                &mut rng
            )
            .is_retry());
    }

    #[test]
    fn huge_attempt_numbers_unlimited() {
        let mut rng = fastrand::Rng::with_seed(1);
        let p = no_jitter();
        assert_eq!(
            p.decide(
                &ctx(u32::MAX, ErrorClass::Transient, Duration::MAX),
                &mut rng
            ),
            RetryDecision::Retry {
                after: Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn permanent_wins_over_other_reasons() {
        let mut rng = fastrand::Rng::with_seed(1);
        let p = no_jitter().max_attempts(1);
        assert_eq!(
            p.decide(&ctx(5, ErrorClass::Permanent, Duration::ZERO), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::Permanent)
        );
    }

    #[test]
    fn decorrelated_uses_previous_delay() {
        let mut rng = fastrand::Rng::with_seed(9);
        let p = ExponentialRetry::new(Backoff::default().with_jitter(Jitter::Decorrelated));
        let mut c = ctx(2, ErrorClass::Transient, Duration::from_secs(100));
        c.previous_delay = Some(Duration::from_secs(2));
        for _ in 0..100 {
            match p.decide(&c, &mut rng) {
                RetryDecision::Retry { after } => {
                    assert!(after >= Duration::from_millis(100));
                    assert!(after <= Duration::from_secs(6));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn validate_names_the_field() {
        let err = no_jitter()
            .max_attempts(0)
            .validate()
            .expect_err("0 attempts is invalid");
        assert_eq!(err.field, "retry.max_attempts");
        assert_eq!(err.reason, "must be at least 1 (1 means no retries)");
        let err = ExponentialRetry::new(Backoff::new(Duration::ZERO, Duration::from_secs(1)))
            .validate()
            .expect_err("zero initial is invalid");
        assert_eq!(err.field, "retry.backoff.initial");
        assert_eq!(ExponentialRetry::default().validate(), Ok(()));
        assert_eq!(no_jitter().max_attempts(1).validate(), Ok(()));
    }

    #[test]
    fn default_policy() {
        let p = ExponentialRetry::default();
        assert_eq!(p.backoff(), &Backoff::default());
        assert_eq!(p.attempts_limit(), None);
    }

    #[test]
    fn no_retry_always_gives_up() {
        let mut rng = fastrand::Rng::with_seed(1);
        let t = Duration::from_secs(100);
        assert_eq!(
            NoRetry.decide(&ctx(1, ErrorClass::Transient, t), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
        assert_eq!(
            NoRetry.decide(&ctx(1, ErrorClass::Permanent, t), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::Permanent)
        );
        assert_eq!(NoRetry.validate(), Ok(()));
    }

    #[test]
    fn boxed_and_shared_policies_delegate() {
        let mut rng = fastrand::Rng::with_seed(1);
        let bad: Box<dyn RetryPolicy> = Box::new(no_jitter().max_attempts(0));
        assert!(bad.validate().is_err());
        let shared: Arc<dyn RetryPolicy> = Arc::new(NoRetry);
        assert!(!shared
            .decide(&ctx(1, ErrorClass::Transient, Duration::MAX), &mut rng)
            .is_retry());
    }

    #[test]
    fn give_up_reasons_read_well() {
        for r in [
            GiveUpReason::Permanent,
            GiveUpReason::AttemptsExhausted,
            GiveUpReason::DeadlineTooClose,
        ] {
            let text = r.to_string();
            assert!(text.starts_with("the "), "{text}");
            assert!(!r.as_str().contains(' '));
        }
    }
}
