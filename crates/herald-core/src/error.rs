//! Errors: what a transport reports, what a caller gets back, what a builder refuses.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use herald_retry::ErrorClass;

use crate::message::Message;
use crate::store::{Store, StoreToken};
use crate::transport::Ack;

/// A failure reported by a transport for one message (or for a whole batch, repeated per message).
///
/// It always carries a class: [`ErrorClass::Transient`] when retrying can help (connection lost,
/// leader moving, timeout, flow control, nack) and [`ErrorClass::Permanent`] when it cannot (too
/// large, unknown or unauthorized destination, unroutable). Adapters own the mapping from their
/// client's error codes and put the client's code in [`TransportError::code`].
///
/// Cheap to clone: the source is shared, so one connection error can stand for a whole batch.
#[derive(Clone)]
pub struct TransportError {
    class: ErrorClass,
    code: Option<Cow<'static, str>>,
    message: Cow<'static, str>,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl TransportError {
    /// An error worth retrying.
    pub fn transient(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorClass::Transient, message)
    }
    /// An error retrying cannot fix.
    pub fn permanent(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorClass::Permanent, message)
    }
    /// An error of the given class.
    pub fn new(class: ErrorClass, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            class,
            code: None,
            message: message.into(),
            source: None,
        }
    }
    /// Attaches the client's own error code (for example `MSG_SIZE_TOO_LARGE`).
    #[must_use]
    pub fn with_code(mut self, code: impl Into<Cow<'static, str>>) -> Self {
        self.code = Some(code.into());
        self
    }
    /// Adds what else is known, after the message (for example the last connection error
    /// behind a timeout).
    #[must_use]
    pub fn with_context(mut self, context: impl AsRef<str>) -> Self {
        self.message = format!("{} ({})", self.message, context.as_ref()).into();
        self
    }
    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
    /// Transient or permanent.
    pub fn class(&self) -> ErrorClass {
        self.class
    }
    /// The client's error code, if the adapter gave one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }
    /// What happened, in words.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} transport error", self.class)?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Debug for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportError")
            .field("class", &self.class)
            .field("code", &self.code)
            .field("message", &self.message)
            .field("source", &self.source.as_ref().map(|s| s.to_string()))
            .finish()
    }
}

impl StdError for TransportError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// Why herald gave up on a message.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FailureReason {
    /// The transport reported a permanent error: retrying cannot help.
    Rejected(TransportError),
    /// The retry policy allowed no more attempts.
    RetriesExhausted(TransportError),
    /// The delivery timeout passed (retries included), with the last error if an attempt failed.
    DeliveryTimeout {
        /// The configured delivery timeout.
        timeout: Duration,
        /// The last attempt's error, if there was an attempt.
        last: Option<TransportError>,
    },
    /// The message is larger than the producer's maximum message size.
    TooLarge {
        /// The message's size (payload, key and headers).
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// `try_send` found the buffer full.
    BufferFull,
    /// The producer was closed before the message could be delivered, or the runtime running
    /// its tasks shut down (their guards end what they held: see
    /// [`HealthIssue::PipelineStopped`](crate::HealthIssue::PipelineStopped)).
    Closed,
    /// The `send_all` call that held the message was cancelled (its future dropped) after
    /// taking the message from its iterator and before the producer accepted it: the message
    /// was never sent. Messages the call had not taken yet stay in the iterator.
    Cancelled,
    /// Code the producer runs on the message's behalf (a retry policy) panicked; the producer
    /// goes on, and this message is handed back. `site` names the code, `message` is the
    /// panic's message.
    Panicked {
        /// What panicked: `retry_policy`.
        site: &'static str,
        /// The panic's message, if it had one.
        message: String,
    },
    /// The producer's [`Store`](crate::Store) could not take the message: full (`try_send`
    /// does not wait for room) or failing (an unwritable directory, a full disk, a failed
    /// fsync): the message was not accepted (herald-spool cuts off what it wrote of it; a
    /// producer reopening the store may send it after all only if that cut fails, which the
    /// error then says, or a power loss undoes it). Or a spilled message the store could not
    /// read back: that one was accepted, and is still in the store
    /// ([`SendError::is_kept_in_store`]; its message is then empty).
    Store(crate::StoreError),
}

impl FailureReason {
    /// The class of the failure: permanent for a rejected or oversized message and for a panic
    /// in user code, transient for everything that could succeed later (exhausted retries,
    /// timeout, full buffer, close, a cancelled `send_all`).
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Rejected(e) => e.class(),
            Self::TooLarge { .. } => ErrorClass::Permanent,
            Self::Panicked { .. } => ErrorClass::Permanent,
            Self::RetriesExhausted(_)
            | Self::DeliveryTimeout { .. }
            | Self::BufferFull
            | Self::Closed
            | Self::Cancelled
            | Self::Store(_) => ErrorClass::Transient,
        }
    }
    /// A short stable label, used as the `reason` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Rejected(_) => "rejected",
            Self::RetriesExhausted(_) => "retries_exhausted",
            Self::DeliveryTimeout { .. } => "delivery_timeout",
            Self::TooLarge { .. } => "too_large",
            Self::BufferFull => "buffer_full",
            Self::Closed => "closed",
            Self::Cancelled => "cancelled",
            Self::Panicked { .. } => "panicked",
            Self::Store(e) if e.is_full() => "store_full",
            Self::Store(_) => "store_failed",
        }
    }
    /// The last transport error behind the failure, if any.
    pub fn transport_error(&self) -> Option<&TransportError> {
        match self {
            Self::Rejected(e) | Self::RetriesExhausted(e) => Some(e),
            Self::DeliveryTimeout { last, .. } => last.as_ref(),
            _ => None,
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(e) => write!(f, "rejected by the transport: {e}"),
            Self::RetriesExhausted(e) => write!(f, "retries exhausted; last error: {e}"),
            Self::DeliveryTimeout {
                timeout,
                last: Some(e),
            } => write!(f, "delivery timeout of {timeout:?} passed; last error: {e}"),
            Self::DeliveryTimeout {
                timeout,
                last: None,
            } => write!(
                f,
                "delivery timeout of {timeout:?} passed before the message could be sent"
            ),
            Self::TooLarge { size, max } => write!(
                f,
                "message of {size} bytes is larger than the producer's max_message_bytes ({max})"
            ),
            Self::BufferFull => {
                f.write_str("the producer's buffer is full (try_send does not wait)")
            }
            Self::Closed => f.write_str("the producer was closed before the message was delivered"),
            Self::Cancelled => f.write_str(
                "the send_all call was cancelled before the producer accepted this message; it was not sent",
            ),
            Self::Panicked { site, message } => {
                write!(f, "the producer's {site} panicked on this message: {message}")
            }
            Self::Store(e) if e.is_full() => write!(
                f,
                "the producer's store is full (try_send does not wait for room): {e}"
            ),
            Self::Store(e) => write!(f, "the producer's store could not take the message: {e}"),
        }
    }
}

/// A message herald could not deliver, handed back with why.
///
/// Nothing is lost without a record: every message accepted by a producer ends either as a
/// [`crate::Delivery`] or as a `SendError` holding the message itself.
///
/// Boxed inside, so that `Result<Delivery, SendError>` stays small on the path where all goes well.
///
/// With a [store](crate::ProducerBuilder::store), the message leaves the store when the
/// `SendError` (and every clone of it) is dropped, or its message taken with
/// [`SendError::into_message`]: handling it (writing it elsewhere, say) before letting it go
/// means a crash meanwhile sends it again rather than losing it.
#[derive(Debug, Clone)]
pub struct SendError(Box<SendErrorInner>);

#[derive(Debug, Clone)]
struct SendErrorInner {
    message: Message,
    reason: FailureReason,
    attempts: u32,
    settle: Option<Arc<SettleOnDrop>>,
    /// Closed unsent and still in the producer's store (see [`SendError::is_kept_in_store`]).
    kept: bool,
    /// See [`SendError::stored_copy`].
    stored_copy: Option<Ack>,
}

/// Settles a stored message when the last [`SendError`] holding it goes.
struct SettleOnDrop {
    store: Arc<dyn Store>,
    token: StoreToken,
}

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        // Contained: this runs wherever the last copy of the error goes, inside the pipeline's
        // completions too, and a store of one's own may panic (see `Shared::complete`).
        let (store, token) = (&self.store, self.token);
        let settled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.settle(&[token]);
        }));
        if let Err(panic) = settled {
            tracing::error!(
                panic = %crate::producer::contain::panic_message(&*panic),
                "the store panicked settling a failed message: it may keep it, and the next \
                 producer on it send it again"
            );
        }
    }
}

impl fmt::Debug for SettleOnDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stored")
    }
}

impl SendError {
    pub(crate) fn new(mut message: Message, reason: FailureReason, attempts: u32) -> Self {
        crate::trace::failed(&mut message, &reason, attempts);
        Self(Box::new(SendErrorInner {
            message,
            reason,
            attempts,
            settle: None,
            kept: false,
            stored_copy: None,
        }))
    }
    /// Marks a message that ended as [`FailureReason::Closed`] but stays in the store.
    pub(crate) fn kept(mut self) -> Self {
        self.0.kept = true;
        self
    }
    /// Whether the message is still in the producer's [store](crate::Store) (a spool): it
    /// ended unsent as [`FailureReason::Closed`] (the producer closed, or its close timed out,
    /// before it was delivered; or the runtime running the producer's tasks shut down while
    /// the message waited in them, durable), or as [`FailureReason::Store`] because the store
    /// could not read it back just then, and the next producer opened on the same store sends
    /// it, before anything new. Handing it on elsewhere too (a dead-letter file) would send it
    /// twice; the `herald` command counts such messages as kept, not failed.
    ///
    /// A message spilled to the store (its body left there, read back only when the buffer
    /// has room) comes back with an empty message when it ends this way, whether `Closed` or
    /// `Store`: the body is what the store keeps. Do not send `message()` of a kept error
    /// again.
    pub fn is_kept_in_store(&self) -> bool {
        self.0.kept
    }
    /// Records that the broker stored a copy of the message (see [`SendError::stored_copy`]).
    pub(crate) fn with_stored_copy(mut self, ack: Option<Ack>) -> Self {
        self.0.stored_copy = ack;
        self
    }
    /// The broker's acknowledgement of a copy of this message that it stored, although the
    /// message is handed back: `Some` only under strict ordering, when the broker took the
    /// message while an earlier message of its key had failed transiently. herald then held it
    /// back, to send it again behind that one's retry and keep the key's order (see
    /// [`crate::KeyHold`]), and what came after failed, with this error's reason: the copy sent
    /// again, or the wait to send it (its retries or its delivery timeout ran out, the producer
    /// closed).
    ///
    /// So the message is at the broker, at least once (this is the first copy acknowledged; a
    /// copy held back again is stored too), and possibly ahead of the earlier message of its
    /// key (if that one's retry got through). Sending it again stores it once more, behind that
    /// message, which restores the key's order at the cost of a duplicate; not sending it
    /// leaves it stored out of order. `None` says nothing either way: a message whose
    /// acknowledgement was lost may be stored too.
    pub fn stored_copy(&self) -> Option<&Ack> {
        self.0.stored_copy.as_ref()
    }
    /// This error settles `token` in `store` when it (and every clone) is dropped.
    pub(crate) fn settling(mut self, store: Arc<dyn Store>, token: StoreToken) -> Self {
        self.0.settle = Some(Arc::new(SettleOnDrop { store, token }));
        self
    }
    /// Why it failed.
    pub fn reason(&self) -> &FailureReason {
        &self.0.reason
    }
    /// Transient (could succeed later, for example on another producer) or permanent.
    pub fn class(&self) -> ErrorClass {
        self.0.reason.class()
    }
    /// How many times the message was handed to the transport.
    pub fn attempts(&self) -> u32 {
        self.0.attempts
    }
    /// The message, by reference.
    pub fn message(&self) -> &Message {
        &self.0.message
    }
    /// The message, to send again or store elsewhere.
    pub fn into_message(self) -> Message {
        let inner = *self.0;
        inner.message
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "message to `{}` not delivered ({}, {} attempt{}): {}",
            self.0.message.destination(),
            self.class(),
            self.0.attempts,
            if self.0.attempts == 1 { "" } else { "s" },
            self.0.reason
        )?;
        if self.0.stored_copy.is_some() {
            f.write_str(
                "; the broker stored an earlier copy of it, possibly ahead of an earlier message of its key",
            )?;
        }
        Ok(())
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .reason
            .transport_error()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A producer that cannot be built, with the setting to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting that cannot work.
    #[error("invalid setting `{field}`: {reason}")]
    Invalid {
        /// The setting, as the builder names it (for example `buffer.max_messages`).
        field: &'static str,
        /// What is wrong and what would work.
        reason: String,
    },
    /// `build()` was called outside a Tokio runtime; the producer spawns its dispatcher there.
    #[error("Producer::build() must be called from within a Tokio runtime (it spawns its dispatcher task)")]
    NoRuntime,
}

impl From<herald_retry::InvalidSetting> for BuildError {
    fn from(e: herald_retry::InvalidSetting) -> Self {
        Self::Invalid {
            field: e.field,
            reason: e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_happened() {
        let e = TransportError::permanent("message too large for topic")
            .with_code("MSG_SIZE_TOO_LARGE");
        assert_eq!(
            e.to_string(),
            "permanent transport error [MSG_SIZE_TOO_LARGE]: message too large for topic"
        );
        let s = SendError::new(Message::new("orders", "x"), FailureReason::Rejected(e), 1);
        assert_eq!(s.class(), ErrorClass::Permanent);
        let text = s.to_string();
        assert!(
            text.contains("`orders`") && text.contains("1 attempt)"),
            "{text}"
        );
        assert!(StdError::source(&s).is_some());
        assert_eq!(s.into_message().payload().as_ref(), b"x");
    }

    #[test]
    fn reasons_have_classes() {
        let t = TransportError::transient("down");
        assert_eq!(
            FailureReason::RetriesExhausted(t).class(),
            ErrorClass::Transient
        );
        assert_eq!(
            FailureReason::TooLarge { size: 2, max: 1 }.class(),
            ErrorClass::Permanent
        );
        assert_eq!(FailureReason::Closed.class(), ErrorClass::Transient);
    }
}
