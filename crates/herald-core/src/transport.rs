//! The one seam every broker implements.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;

use crate::error::TransportError;
use crate::health::TransportHealth;
use crate::message::{Destination, Message};

/// What a broker told us about one delivered message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ack {
    /// The partition it landed in, for brokers that partition (Kafka).
    pub partition: Option<i32>,
    /// Its offset in that partition, or a broker sequence number where the broker gives one.
    pub offset: Option<i64>,
    /// Which route of a [`Fallback`](crate::Fallback) took it: 0 the primary, 1 the first
    /// fallback, and so on. `None` from a transport used on its own.
    pub route: Option<u8>,
}

/// One outcome per message of a batch, in the batch's order.
pub type BatchOutcome = Vec<Result<Ack, TransportError>>;

/// Sends batches of messages to a broker. The producer pipeline owns batching, retries, ordering
/// and backpressure; a transport only sends and classifies.
///
/// # Contract
///
/// - [`Transport::send_batch`] returns exactly one outcome per message, in order. An `Ok` means
///   the broker acknowledged the message durably (Kafka `acks=all`, an AMQP publisher confirm).
/// - Every error carries a class (see [`TransportError`]): the pipeline retries transient errors
///   and hands permanent ones back at once.
/// - Order: messages of one call that share a key reach the broker in slice order, and if one of
///   them fails, the later ones with that key must not be delivered ahead of its retry (fail them
///   too, as transient). With this, the pipeline keeps per-key order across retries.
/// - A transport does not retry on its own beyond what its client library does internally; each
///   adapter documents that part.
/// - It may be called concurrently for different batches (up to the producer's max in-flight).
/// - Across calls, a transport promises no order unless it says it keeps it
///   ([`Transport::keeps_order_across_calls`]): then strict ordering sends several batches of one
///   destination at once instead of one after another.
///
/// The trait is object safe: the producer holds it as `Arc<dyn Transport>`.
///
/// # Example
///
/// ```
/// use async_trait::async_trait;
/// use herald_core::{Ack, BatchOutcome, Destination, Message, Transport, TransportError};
///
/// /// Accepts everything except empty payloads.
/// struct Picky;
///
/// #[async_trait]
/// impl Transport for Picky {
///     fn name(&self) -> &'static str { "picky" }
///     async fn send_batch(&self, _to: &Destination, batch: &[Message]) -> BatchOutcome {
///         batch.iter().map(|m| if m.payload().is_empty() {
///             Err(TransportError::permanent("empty payload"))
///         } else {
///             Ok(Ack::default())
///         }).collect()
///     }
/// }
/// ```
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// A short, stable, low-cardinality name (`kafka`, `amqp`, `memory`): the `transport` label of
    /// every metric.
    fn name(&self) -> &'static str;

    /// Sends `batch`, every message of which goes to `destination`, and reports one outcome per
    /// message in order.
    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome;

    /// Sends `batch` as [`Transport::send_batch`] does, knowing that the attempt's time ends at
    /// `deadline` (the earliest delivery deadline in the batch, on Tokio's clock: sleep with
    /// `tokio::time::sleep_until(deadline.into())`).
    ///
    /// At `deadline` a transport that can tell what has not left the process yet should stop it
    /// there and fail it (it was never stored: a true failure), and then wait for the broker's
    /// answer about what has left, for at most [`Transport::settle_time`]: that answer, delivered
    /// or not, is the outcome, and it is true. herald drops the call at `deadline` plus the
    /// settle time and fails what is left unanswered as cut off.
    ///
    /// Default: [`Transport::send_batch`], which herald cuts off at `deadline` (settle time zero).
    async fn send_batch_until(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
    ) -> BatchOutcome {
        let _ = deadline;
        self.send_batch(destination, batch).await
    }

    /// How long past an attempt's deadline herald waits for [`Transport::send_batch_until`] to
    /// report messages already handed to the broker, so that a message the broker stored is not
    /// reported failed because its answer came late. A message may thus end up to this long after
    /// its delivery timeout. Default: zero (the call is cut off at the deadline).
    fn settle_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Whether this transport keeps order across calls, so that strict ordering may keep several
    /// batches of one destination in flight (up to
    /// [`ProducerBuilder::pipeline_depth`](crate::ProducerBuilder::pipeline_depth)) instead of
    /// waiting for each batch's acknowledgements before sending the next.
    ///
    /// herald starts the calls of one destination one at a time: it polls a call for the first
    /// time only after the first poll of the call before it has returned. A transport that
    /// answers `true` promises that, for one destination, the messages of a call reach the
    /// broker ahead of those of every call started after it: by the end of its first poll, a
    /// call has taken its place (handed its messages to a client queue that keeps order, or
    /// queued for a turn that is served first come, first served, such as a
    /// `tokio::sync::Mutex` locked before any other `.await`). Failures need no care: the
    /// pipeline applies the per-key hold across the batches in flight, and lands them in the
    /// order they were sent.
    ///
    /// Default: `false` (one batch per destination at a time under strict ordering).
    fn keeps_order_across_calls(&self) -> bool {
        false
    }

    /// Called once when the producer closes, after the last batch: release connections, flush
    /// client-side queues. Default: nothing to do.
    async fn close(&self) {}

    /// What the transport knows about why sending is failing right now, if anything: the last
    /// connection error, say ("127.0.0.1:9092: Connection refused"). herald adds it to the error
    /// of an attempt it cuts off at its deadline, so that a delivery timeout says more than
    /// "timed out". Must be quick and never contain secrets. Default: nothing.
    fn diagnosis(&self) -> Option<String> {
        None
    }

    /// What the transport knows about its broker connection now: up, blocked by the broker, or
    /// down (and why). The producer's health ([`crate::Producer::health`]) and the
    /// `herald_transport_up` gauge read it about once a second. Must be quick and never contain
    /// secrets. Default: [`TransportHealth::Up`] (nothing known against it).
    fn health(&self) -> TransportHealth {
        TransportHealth::Up
    }

    /// Where the transport sends now, safe to show (never a secret): the broker node of the
    /// connection in use (`rabbit-2:5672`), or, for a [`Fallback`](crate::Fallback), the route
    /// that took the last batch. Part of the producer's health ([`crate::Health::endpoint`]).
    /// Must be quick. Default: nothing said.
    fn endpoint(&self) -> Option<String> {
        None
    }
}

const _: Option<&dyn Transport> = None;

/// Turns per destination, served first come, first served: what a transport that keeps order
/// across calls ([`Transport::keeps_order_across_calls`]) takes at the start of each call, before
/// any other `.await`, and holds while it hands the call's messages to its client. herald starts
/// a destination's calls one after another, so their turns come in that order, and the messages
/// of a call reach the client before those of the calls after it; the broker's answers are then
/// awaited without the turn, so the calls' round trips overlap.
///
/// ```
/// # async fn demo() {
/// use herald_core::{Destination, Turns};
/// let turns = Turns::default();
/// let orders = Destination::new("orders");
/// let turn = turns.take(&orders).await;
/// // ... hand the batch over ...
/// drop(turn);
/// // ... wait for the broker's answers ...
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Turns {
    queues: Mutex<HashMap<Destination, Arc<tokio::sync::Mutex<()>>>>,
}

impl Turns {
    /// Waits for `destination`'s turn: after every call that asked for it before (at its first
    /// poll). The turn ends when the guard is dropped.
    pub async fn take(&self, destination: &Destination) -> OwnedMutexGuard<()> {
        let queue = {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            queues.entry(destination.clone()).or_default().clone()
        };
        queue.lock_owned().await
    }
}
