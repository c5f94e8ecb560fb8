//! Backoff, retry policies, retry budget and circuit breaker for herald.
//!
//! When a send fails, the producer pipeline (in `herald-core`) asks three independent
//! questions, each answered by one part of this crate:
//!
//! * **Should this message be retried, and after how long?** A [`RetryPolicy`] decides from
//!   a [`RetryContext`] (attempts so far, [`ErrorClass`], time left until the delivery
//!   deadline). [`ExponentialRetry`] is the default, built on [`Backoff`] with [`Jitter`];
//!   [`NoRetry`] never retries.
//! * **Can the producer afford another retry right now?** A [`RetryBudget`] keeps retries
//!   proportional to first attempts, so an outage does not turn into a retry storm.
//! * **Should anything be sent to this destination at all?** A [`CircuitBreaker`] stops
//!   sending after repeated failed batches and probes before resuming.
//!
//! Everything here is pure logic: the clock (`now: Instant`) and randomness
//! (`&mut fastrand::Rng`) are arguments, nothing sleeps or reads the time, so that tests and
//! property tests are deterministic. Settings are plain data with `Default` and a
//! `validate` method returning [`InvalidSetting`] naming the field, called once when the
//! producer is built.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use herald_retry::{
//!     Backoff, ErrorClass, ExponentialRetry, GiveUpReason, Jitter, RetryContext,
//!     RetryDecision, RetryPolicy,
//! };
//!
//! let policy = ExponentialRetry::new(
//!     Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
//!         .with_jitter(Jitter::None),
//! )
//! .max_attempts(5);
//! policy.validate()?;
//!
//! // A seeded generator makes jittered delays reproducible.
//! let mut rng = fastrand::Rng::with_seed(42);
//!
//! // The third attempt failed with a transient error; 30 s remain before the deadline.
//! let ctx = RetryContext {
//!     attempts: 3,
//!     class: ErrorClass::Transient,
//!     time_left: Duration::from_secs(30),
//!     previous_delay: Some(Duration::from_millis(200)),
//! };
//! assert_eq!(
//!     policy.decide(&ctx, &mut rng),
//!     RetryDecision::Retry { after: Duration::from_millis(400) } // 100 ms * 2^(3-1)
//! );
//!
//! // Not when the retry could not start before the deadline...
//! let late = RetryContext { time_left: Duration::from_millis(300), ..ctx };
//! assert_eq!(
//!     policy.decide(&late, &mut rng),
//!     RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
//! );
//!
//! // ...and never for a permanent error.
//! let permanent = RetryContext { class: ErrorClass::Permanent, ..ctx };
//! assert_eq!(
//!     policy.decide(&permanent, &mut rng),
//!     RetryDecision::GiveUp(GiveUpReason::Permanent)
//! );
//! # Ok::<(), herald_retry::InvalidSetting>(())
//! ```

mod backoff;
mod budget;
mod circuit;
mod error;
mod policy;

pub use backoff::{Backoff, Jitter};
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use circuit::{CircuitBreaker, CircuitBreakerConfig, CircuitState, Generation};
pub use error::{ErrorClass, InvalidSetting};
pub use policy::{
    ExponentialRetry, GiveUpReason, NoRetry, RetryContext, RetryDecision, RetryPolicy,
};
