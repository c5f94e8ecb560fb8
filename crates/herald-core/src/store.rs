//! [`Store`]: where a producer keeps what it has accepted until each message's fate is final,
//! so that a crash does not lose it. herald-spool's `SpoolStore` (an on-disk spool) is the
//! implementation; the producer only knows this trait, so that the dependency points down.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::message::Message;

/// What a [`Store`] gives each stored message: handed back to [`Store::settle`].
pub type StoreToken = u64;

/// A future that resolves once stored messages are as durable as the store promises.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// Messages a [`Store`] has taken: their tokens, in order, and when they are durable.
pub struct Submitted {
    /// One per message, in the order given.
    pub tokens: Vec<StoreToken>,
    /// Resolves when the messages are durable (after the fsync that covers them, say).
    pub durable: Durable,
}

impl fmt::Debug for Submitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submitted")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

/// Why a [`Store`] could not take or keep messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    full: bool,
    message: String,
}

impl StoreError {
    /// The store is full (its size limit, or a full disk): it takes more once settled
    /// messages free room. `send` waits for room; `try_send` hands the message back.
    pub fn full(message: impl Into<String>) -> Self {
        Self {
            full: true,
            message: message.into(),
        }
    }

    /// Any other failure (an unwritable directory, a failed write or fsync): `message` says
    /// what and where.
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            full: false,
            message: message.into(),
        }
    }

    /// Whether the store is full (see [`StoreError::full`]).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {}

/// Durable storage between acceptance and the pipeline (see
/// [`ProducerBuilder::store`](crate::ProducerBuilder::store)).
///
/// With a store, a message is accepted once the store has it durably; it leaves the store
/// ([`Store::settle`]) once its fate is final and handed over: delivered, or failed and handed
/// back to its caller (future, receipt or unclaimed hook). A message failed as
/// [`Closed`](crate::FailureReason::Closed) is handed back *and* kept: the next producer on the
/// same store sends it again. What a crash leaves is read back with [`Store::recover`] and sent
/// before anything new.
///
/// Implementations must keep order: tokens and [`Store::recover`] follow the order of
/// [`Store::submit`] calls (the producer calls it under one lock).
pub trait Store: Send + Sync + 'static {
    /// Starts storing `messages` (their [`MessageId`](crate::MessageId)s already given), after
    /// everything submitted before. Fails at once when the store cannot take them now
    /// ([`StoreError::is_full`]) or at all.
    fn submit(&self, messages: &[Message]) -> Result<Submitted, StoreError>;

    /// The messages of `tokens` have ended: never to be sent again. Failures are the store's to
    /// report (a message it cannot settle comes back after a restart: a duplicate, not a loss).
    fn settle(&self, tokens: &[StoreToken]);

    /// Up to `max` of the messages an earlier run left unsettled, oldest first; empty once all
    /// have been read. May block on I/O: the producer calls it on a blocking thread. After an
    /// error, the next call starts where the failed one did (the producer tries again a few
    /// times before it goes on without the rest): none skipped, none twice.
    fn recover(&self, max: usize) -> Result<Vec<(StoreToken, Message)>, StoreError>;

    /// Whether the store reads back what it took ([`Store::read_from`]). A store that does
    /// lets the producer keep only a buffer's worth of accepted messages in memory and leave
    /// the rest in the store until the pipeline has room: `send` then waits only for the store
    /// to be full, not for the memory buffer. Default: no (every accepted message waits in
    /// memory, at most a buffer's worth beyond the buffer).
    fn reads_back(&self) -> bool {
        false
    }

    /// Up to `max` of the messages this run [submitted](Store::submit) and did not settle,
    /// with tokens at or after `first`, in token order, once durable. Called (on a blocking
    /// thread) only when [`Store::reads_back`], with `first` never going down. A token whose
    /// message the store cannot give back (a damaged record) is skipped: the producer hands
    /// that message back as failed. Empty when nothing from `first` on is readable yet.
    fn read_from(
        &self,
        first: StoreToken,
        max: usize,
    ) -> Result<Vec<(StoreToken, Message)>, StoreError> {
        let _unused = (first, max);
        Err(StoreError::failed(format!(
            "{} does not read messages back",
            self.describe()
        )))
    }

    /// What the store is, for errors and logs (a directory, say). No secrets.
    fn describe(&self) -> String;

    /// How full the store is, asked at every health evaluation (an implementation may refresh
    /// its own metrics there). `None`: it does not say. Above the health policy's
    /// `buffer_high_water` share of `max_bytes`, the producer is degraded
    /// ([`HealthIssue::StoreHighWater`](crate::HealthIssue::StoreHighWater)).
    fn usage(&self) -> Option<StoreUsage> {
        None
    }
}

/// How full a [`Store`] is (see [`Store::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreUsage {
    /// Messages stored and not settled.
    pub pending_messages: u64,
    /// Bytes the store takes (what its size limit bounds).
    pub used_bytes: u64,
    /// Its size limit.
    pub max_bytes: u64,
}

impl StoreUsage {
    /// A usage report.
    pub fn new(pending_messages: u64, used_bytes: u64, max_bytes: u64) -> Self {
        Self {
            pending_messages,
            used_bytes,
            max_bytes,
        }
    }
}
