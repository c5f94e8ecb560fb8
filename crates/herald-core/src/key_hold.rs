//! The per-key hold, herald's one rule for keeping per-key order when a message of a batch
//! fails: written here once, applied by the pipeline to every batch's outcomes, and offered to
//! transports so that they need not even send what the rule would hold.

use bytes::Bytes;

use crate::error::{ErrorClass, TransportError};
use crate::message::Message;
use crate::transport::Ack;

/// The error code of a message held back by the rule.
pub const KEY_HELD: &str = "herald_key_held";

/// The per-key hold: after a message fails transiently, the later messages of the batch with
/// the same key must not reach the broker ahead of its retry, so they fail too, transiently,
/// with code [`KEY_HELD`], and are retried behind it. Messages without a key form one key of
/// their own (the destination's keyless lane). A permanent failure holds nothing: that message
/// will not be sent again, so nothing can overtake it.
///
/// The pipeline applies [`KeyHold::apply`] to the outcomes of every batch under strict
/// ordering, whatever the transport did, so a transport that reports a later message of a
/// failed key as delivered costs a duplicate, never the order. A transport that hands messages
/// to its client one by one uses [`KeyHold::check`] and [`KeyHold::failed`] to not send them at
/// all:
///
/// ```
/// use herald_core::{KeyHold, Message, TransportError};
/// let batch = [Message::new("t", "a").with_key("k"), Message::new("t", "b").with_key("k")];
/// let mut hold = KeyHold::default();
/// assert!(hold.check(&batch[0]).is_none());
/// hold.failed(&batch[0], &TransportError::transient("connection reset"));
/// let held = hold.check(&batch[1]).expect("same key, after a transient failure");
/// assert_eq!(held.code(), Some(herald_core::KEY_HELD));
/// ```
#[derive(Debug, Default, Clone)]
pub struct KeyHold {
    /// Every key is held, with this error (an earlier call whose outcome is unknown).
    all: Option<TransportError>,
    /// Keys held, each with the error that held it. A batch rarely has more than a few
    /// failures, so a list beats a hash set; it stays empty (no allocation) without one. A key
    /// is kept as a `Bytes` clone: a reference count, not a copy.
    held: Vec<(Option<Bytes>, TransportError)>,
}

impl KeyHold {
    /// The error `msg` must end with if its key is held, or `None` if it may be sent.
    ///
    /// Asked for every message a transport hands over: the common case, nothing held, is
    /// inlined into the caller's loop.
    #[inline]
    pub fn check(&self, msg: &Message) -> Option<TransportError> {
        if self.all.is_none() && self.held.is_empty() {
            return None;
        }
        self.check_held(msg)
    }

    fn check_held(&self, msg: &Message) -> Option<TransportError> {
        if let Some(all) = &self.all {
            return Some(held_error(all));
        }
        let key = msg.key();
        self.held
            .iter()
            .find(|(held, _)| held.as_ref() == key)
            .map(|(_, first)| held_error(first))
    }

    /// Records that `msg` failed with `error`: a transient failure holds its key.
    pub fn failed(&mut self, msg: &Message, error: &TransportError) {
        if error.class() == ErrorClass::Transient && self.check(msg).is_none() {
            self.held.push((msg.key().cloned(), error.clone()));
        }
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.all.is_none()
    }

    /// Holds every key from now on, with `error` as the reason.
    pub(crate) fn hold_all(&mut self, error: TransportError) {
        self.all.get_or_insert(error);
    }

    /// Applies the rule to a batch's outcomes, in batch order: every `Ok` after a transient
    /// failure of its key becomes a held failure (the broker may have stored that message,
    /// which is then stored again after the retry: a duplicate, never a reordering); a later
    /// failure of its own is kept. `outcomes` pairs with
    /// `batch` by position. Returns how many outcomes it changed.
    pub fn apply(batch: &[Message], outcomes: &mut [Result<Ack, TransportError>]) -> usize {
        KeyHold::default().carry(batch, outcomes, |_, _| {})
    }

    /// As [`KeyHold::apply`], carrying on from the keys already held (by the earlier batches of
    /// a destination still out, when several are in flight), and keeping the keys this batch
    /// holds for the batches after it. `delivered_but_held` hears the index of every message
    /// whose `Ok` became a held failure, with the acknowledgement it replaced.
    pub(crate) fn carry(
        &mut self,
        batch: &[Message],
        outcomes: &mut [Result<Ack, TransportError>],
        mut delivered_but_held: impl FnMut(usize, Ack),
    ) -> usize {
        let transient = |o: &Result<Ack, TransportError>| matches!(o, Err(e) if e.class() == ErrorClass::Transient);
        if self.is_empty() && !outcomes.iter().any(transient) {
            return 0;
        }
        let mut changed = 0;
        for (i, (msg, outcome)) in batch.iter().zip(outcomes.iter_mut()).enumerate() {
            if let Some(held) = self.check(msg) {
                // A failure of its own stays: a permanent one is final, a transient one is
                // retried anyway and says more than "held".
                if let Ok(ack) = *outcome {
                    *outcome = Err(held);
                    changed += 1;
                    delivered_but_held(i, ack);
                }
            } else if let Err(e) = outcome {
                self.failed(msg, e);
            }
        }
        changed
    }
}

fn held_error(first: &TransportError) -> TransportError {
    TransportError::transient(format!(
        "held back: an earlier message with the same key failed ({}); sent again after it to keep per-key order",
        first.message()
    ))
    .with_code(KEY_HELD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(keys: &[Option<&'static str>]) -> Vec<Message> {
        keys.iter()
            .map(|k| match k {
                Some(k) => Message::new("t", "p").with_key(*k),
                None => Message::new("t", "p"),
            })
            .collect()
    }

    fn codes(outcomes: &[Result<Ack, TransportError>]) -> Vec<Option<&str>> {
        outcomes
            .iter()
            .map(|o| match o {
                Ok(_) => None,
                Err(e) => Some(e.code().unwrap_or("-")),
            })
            .collect()
    }

    #[test]
    fn a_transient_failure_holds_later_messages_of_its_key_only() {
        let b = batch(&[Some("a"), Some("b"), Some("a"), Some("b"), Some("a")]);
        let mut out = vec![
            Ok(Ack::default()),
            Err(TransportError::transient("reset").with_code("X")),
            Ok(Ack::default()),
            Ok(Ack::default()),
            Err(TransportError::permanent("too large").with_code("P")),
        ];
        assert_eq!(KeyHold::apply(&b, &mut out), 1);
        assert_eq!(
            codes(&out),
            [None, Some("X"), None, Some(KEY_HELD), Some("P")]
        );
    }

    #[test]
    fn keyless_messages_are_one_key_and_permanent_failures_hold_nothing() {
        let b = batch(&[None, None, Some("k"), None]);
        let mut out = vec![
            Err(TransportError::permanent("rejected").with_code("P")),
            Err(TransportError::transient("nack").with_code("N")),
            Ok(Ack::default()),
            Ok(Ack::default()),
        ];
        assert_eq!(KeyHold::apply(&b, &mut out), 1);
        assert_eq!(codes(&out), [Some("P"), Some("N"), None, Some(KEY_HELD)]);
        let held = out[3].as_ref().expect_err("held");
        assert!(held.message().contains("nack"), "{held}");
        assert_eq!(held.class(), ErrorClass::Transient);
    }

    #[test]
    fn without_a_transient_failure_nothing_changes() {
        let b = batch(&[Some("a"), Some("a")]);
        let mut out = vec![
            Err(TransportError::permanent("no").with_code("P")),
            Ok(Ack::default()),
        ];
        assert_eq!(KeyHold::apply(&b, &mut out), 0);
        assert_eq!(codes(&out), [Some("P"), None]);
    }
}
