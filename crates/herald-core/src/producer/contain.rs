//! Panics in user code the producer runs (a retry or batch policy, the unclaimed hook) stop
//! here: the producer goes on, the messages concerned end with an error that names the panic
//! (or, for a batch policy, are batched one by one), and every panic is counted in
//! `herald_user_code_panics_total`.
//!
//! `catch_unwind` is cheap on the path where nothing panics, but the call it wraps is no longer
//! inlined (about 65 instructions a message for a batch policy's two questions), so herald's
//! own `SizeOrLinger`, which cannot panic, is asked without it (`builder::Batching`). The code
//! it wraps only reads
//! its arguments and returns a value, so no state of the producer is left half-changed by an
//! unwind: that is why `AssertUnwindSafe` is sound here.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_batch::{BatchPolicy, BatchStats, InvalidSetting};

/// Runs `f`; a panic becomes `Err` with the panic's message.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

/// The message a panic carried (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned())
}

/// A user's batch policy behind a guard: after its first panic it is no longer asked, and
/// every batch holds one message and goes at once (always valid, never stuck). The panic is
/// reported through `on_panic` once.
pub(crate) struct ContainedPolicy {
    inner: Box<dyn BatchPolicy>,
    broken: AtomicBool,
    on_panic: Box<dyn Fn() + Send + Sync>,
}

impl ContainedPolicy {
    pub(crate) fn new(inner: Box<dyn BatchPolicy>, on_panic: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            inner,
            broken: AtomicBool::new(false),
            on_panic,
        }
    }

    fn ask<T>(&self, ask: impl FnOnce(&dyn BatchPolicy) -> T, fallback: T) -> T {
        if self.broken.load(Ordering::Relaxed) {
            return fallback;
        }
        match contain(|| ask(&*self.inner)) {
            Ok(answer) => answer,
            Err(_) => {
                if !self.broken.swap(true, Ordering::Relaxed) {
                    (self.on_panic)();
                }
                fallback
            }
        }
    }
}

impl fmt::Debug for ContainedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl BatchPolicy for ContainedPolicy {
    fn admits(&self, batch: BatchStats, message_bytes: usize) -> bool {
        self.ask(|p| p.admits(batch, message_bytes), batch.messages == 0)
    }
    fn is_full(&self, batch: BatchStats) -> bool {
        self.ask(|p| p.is_full(batch), true)
    }
    fn linger(&self) -> Duration {
        self.ask(|p| p.linger(), Duration::ZERO)
    }
    fn validate(&self) -> Result<(), InvalidSetting> {
        self.inner.validate()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;

    #[derive(Debug)]
    struct Explodes;
    impl BatchPolicy for Explodes {
        fn admits(&self, _: BatchStats, _: usize) -> bool {
            panic!("admits exploded")
        }
        fn is_full(&self, _: BatchStats) -> bool {
            false
        }
        fn linger(&self) -> Duration {
            Duration::from_secs(3600)
        }
    }

    #[test]
    fn a_panicking_batch_policy_falls_back_to_one_message_per_batch_and_reports_once() {
        let panics = Arc::new(AtomicUsize::new(0));
        let seen = panics.clone();
        let policy = ContainedPolicy::new(
            Box::new(Explodes),
            Box::new(move || {
                seen.fetch_add(1, Ordering::Relaxed);
            }),
        );
        assert_eq!(
            policy.linger(),
            Duration::from_secs(3600),
            "fine until it panics"
        );
        let one = BatchStats {
            messages: 1,
            bytes: 10,
        };
        assert!(!policy.admits(one, 10));
        assert!(policy.admits(BatchStats::default(), 10));
        assert!(policy.is_full(one));
        assert_eq!(policy.linger(), Duration::ZERO);
        assert_eq!(panics.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn panic_messages_are_kept() {
        assert_eq!(
            contain(|| panic!("boom {}", 7)),
            Err::<(), _>("boom 7".to_owned())
        );
        assert_eq!(contain(|| 5), Ok(5));
    }
}
