//! herald-core: the vocabulary of herald and its producer pipeline. No broker code lives here.
//!
//! - [`Message`], [`Destination`], [`Header`]: what an application sends.
//! - [`Transport`]: the one seam every broker adapter implements (async, object safe, one
//!   outcome per message of a batch), with [`TransportError`] and its [`ErrorClass`].
//! - [`Producer`]: batching (a [`herald_batch::BatchPolicy`]), retries (a
//!   [`herald_retry::RetryPolicy`] with a retry budget and a circuit breaker), per-key ordering,
//!   backpressure through a bounded buffer, a delivery timeout, and every message's fate reported:
//!   a [`Delivery`], or a [`SendError`] that hands the message back.
//! - [`Health`]: how a producer is doing (healthy, degraded, unhealthy, and why), on demand and
//!   as a watch channel, from its circuit breaker, buffer, error rate and the transport's own
//!   [`TransportHealth`].
//! - [`Store`]: durable storage between acceptance and sending (herald-spool's on-disk spool),
//!   so that a crash loses nothing accepted.
//! - [`metrics`]: the names of every metric the pipeline emits through the `metrics` facade.
//!
//! Most users depend on the `herald` facade crate, which re-exports all of this.

mod error;
mod fallback;
mod health;
mod key_hold;
mod message;
pub mod metrics;
mod producer;
pub mod rotation;
mod store;
#[cfg(feature = "rustls")]
pub mod tls;
mod trace;
mod transport;
pub mod url;

pub use error::{BuildError, ErrorClass, FailureReason, SendError, TransportError};
pub use fallback::{Fallback, NO_ROUTE_OPEN};
pub use health::{Health, HealthIssue, HealthPolicy, HealthStatus, TransportHealth};
pub use key_hold::{KeyHold, KEY_HELD};
pub use message::{Destination, Header, IdText, InvalidMessageId, Message, MessageId};
#[allow(deprecated)]
pub use producer::DeadLetterHook;
pub use producer::{
    BulkReceipt, BulkReport, CloseReport, Delivery, DeliveryFuture, FateSink, OrderingMode,
    Producer, ProducerBuilder, ProducerStats, Totals, UnclaimedHook,
};
pub use store::{Durable, Store, StoreError, StoreToken, StoreUsage, Submitted};
pub use transport::{deadline_passed, Ack, BatchOutcome, EarlyAcks, Transport, Turn, Turns};

/// Re-exported so that adapters implement [`Transport`] with the same macro version.
pub use async_trait::async_trait;
/// Re-exported: payloads and keys are [`bytes::Bytes`].
pub use bytes::Bytes;
