//! The producer: a cheap, cloneable handle in front of the pipeline.
//!
//! Rooms, in the order a message passes them:
//! - `builder.rs`: [`ProducerBuilder`], every setting checked at `build`, which starts the tasks.
//! - this file: [`Producer`], the ways in (`send`, `enqueue`, `try_send`, `send_all`) and out
//!   (`flush`, `close`).
//! - `state.rs`: the state behind one mutex; acceptance (`Shared::admit`, the only door in)
//!   and a message's end (`Shared::finish`, then `Shared::complete` outside the lock).
//! - `dispatch.rs`: the dispatcher task: expiry, parked retries, batches out, outcomes in.
//! - `order.rs`: [`OrderingMode`] and everything strict ordering asks of the queues.
//! - `health.rs`: health evaluation and its task.
//! - `completion.rs`: how a fate reaches its caller: futures, receipts, unclaimed failures.

mod builder;
mod completion;
pub(crate) mod contain;
mod dispatch;
mod health;
mod order;
mod stage;
mod state;

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herald_retry::CircuitState;
use tokio::sync::oneshot;
#[cfg(test)]
use tokio::task::JoinHandle;

pub use builder::ProducerBuilder;
#[allow(deprecated)]
pub use completion::DeadLetterHook;
pub use completion::{BulkReceipt, BulkReport, Delivery, DeliveryFuture, FateSink, UnclaimedHook};
pub use order::OrderingMode;
pub use state::Totals;

use crate::error::{FailureReason, SendError};
use crate::health::Health;
use crate::message::Message;
use crate::store::StoreError;
use crate::transport::Transport;
use completion::{Completion, Group};
use stage::{NotStored, Stage};
pub(crate) use state::clock_now;
use state::{Refused, Shared};

/// What is happening inside a producer right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProducerStats {
    /// Messages accepted and not yet ended (queued, waiting to retry, or in flight).
    pub buffered_messages: usize,
    /// Their bytes.
    pub buffered_bytes: usize,
    /// Batches the transport is sending now.
    pub in_flight_batches: usize,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// Running totals since the producer was built.
    pub totals: Totals,
    /// Failed messages whose caller had stopped listening.
    pub unclaimed: u64,
}

/// What [`Producer::close`] could and could not do.
#[derive(Debug, Default)]
pub struct CloseReport {
    /// Whether everything accepted ended on its own (delivered, or failed for its own reason)
    /// before the deadline. False if the deadline passed and leftovers were failed with
    /// [`FailureReason::Closed`].
    pub drained: bool,
    /// Messages the transport was still sending when the deadline passed. Each still ends through
    /// its own future or receipt (a transient failure is no longer retried: it ends as
    /// [`FailureReason::Closed`]); if nobody listens, through the unclaimed hook, or in the
    /// `unclaimed` list of a later `close` call, which returns at once.
    pub in_flight: usize,
    /// Failed messages nobody was listening for (their future or receipt was dropped and no
    /// unclaimed hook is set), each with its error. This is where fire-and-forget sends end.
    pub unclaimed: Vec<SendError>,
    /// Running totals at the end.
    pub totals: Totals,
}

/// Closes the pipeline when the last `Producer` clone goes: the dispatcher keeps delivering what
/// was accepted (linger skipped), then closes the transport. Nothing accepted is dropped.
struct Handle {
    shared: Arc<Shared>,
    /// The dispatcher's task, for tests that end it as its runtime or a panic would.
    #[cfg(test)]
    dispatcher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.start_closing();
    }
}

/// Sends messages through a [`Transport`] with batching, retries, ordering and backpressure.
///
/// Cheap to clone; all clones share one pipeline. Build one with [`Producer::builder`] inside a
/// Tokio runtime.
///
/// Four ways to send, from simplest to fastest:
/// - [`Producer::send`]: waits for buffer space, then for the broker's acknowledgement.
/// - [`Producer::enqueue`]: waits for buffer space only, returns a [`DeliveryFuture`]; many
///   messages can then be in flight from one task, in order.
/// - [`Producer::try_send`]: never waits; a full buffer hands the message back at once.
/// - [`Producer::send_all`]: many messages, one [`BulkReceipt`] for all: no future per message.
///
/// # Example
///
/// ```
/// # use async_trait::async_trait;
/// # use herald_core::{Ack, BatchOutcome, Destination, Message, Transport};
/// # struct Null;
/// # #[async_trait]
/// # impl Transport for Null {
/// #     fn name(&self) -> &'static str { "null" }
/// #     async fn send_batch(&self, _: &Destination, b: &[Message]) -> BatchOutcome {
/// #         b.iter().map(|_| Ok(Ack::default())).collect()
/// #     }
/// # }
/// use std::time::Duration;
/// use herald_core::Producer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let producer = Producer::builder(Null).delivery_timeout(Duration::from_secs(30)).build()?;
/// let orders = Destination::new("orders");
/// let delivery = producer.send(Message::new(orders.clone(), "hello").with_key("k1")).await?;
/// assert_eq!(delivery.attempts, 1);
///
/// let receipt = producer.send_all((0..1000).map(|i| Message::new(orders.clone(), format!("m{i}")))).await;
/// assert_eq!(receipt.wait().await.delivered, 1000);
///
/// let report = producer.close(Duration::from_secs(5)).await;
/// assert!(report.drained && report.unclaimed.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Producer {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("transport", &self.handle.shared.transport.name())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Messages a `send_all` call has taken from its iterator and not yet handed to the
/// producer: the one that found the buffer full, then the rest of the chunk, in input order.
/// Dropped with messages left (the call was cancelled), it fails each as `Cancelled`.
struct Taken<'a> {
    shared: &'a Shared,
    group: &'a Group,
    pending: Option<Message>,
    chunk: VecDeque<Message>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let left = self.pending.take().into_iter().chain(self.chunk.drain(..));
        for msg in left {
            self.shared.count_refused(&FailureReason::Cancelled);
            self.group
                .fail_now(SendError::new(msg, FailureReason::Cancelled, 0));
        }
    }
}

/// Messages pulled from a `send_all` iterator per lock hold: enough to amortise the lock, few
/// enough that the dispatcher is never kept waiting long.
///
/// Between chunks the sending task yields, and `enqueue` takes from Tokio's cooperative
/// budget (a yield every 128 calls, as sending into a Tokio channel does): admission itself
/// never waits while the buffer has room, so without that a task sending in a loop on a
/// one-thread runtime would fill the whole buffer (100 000 messages, tens of MB) before the
/// dispatcher could send the first batch: later sends, and every message's bookkeeping moved
/// through memory instead of cache.
const CHUNK: usize = 1024;

impl Producer {
    /// Starts building a producer over `transport`.
    pub fn builder(transport: impl Transport) -> ProducerBuilder {
        ProducerBuilder::new(Arc::new(transport))
    }

    /// As [`Producer::builder`], for a transport already shared.
    pub fn builder_shared(transport: Arc<dyn Transport>) -> ProducerBuilder {
        ProducerBuilder::new(transport)
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Sends one message and waits for its fate: the broker's acknowledgement, or the message
    /// handed back with why herald gave up. Waits for buffer space first when the buffer is full.
    pub async fn send(&self, msg: Message) -> Result<Delivery, SendError> {
        self.enqueue(msg).await?.await
    }

    /// Puts one message into the buffer, waiting for space if needed, and returns a future of its
    /// fate. Messages enqueued one after another from a task keep that order (per key).
    ///
    /// Cancelling this call while it waits (for space, or for its turn when the task has used
    /// up Tokio's cooperative budget) drops the message, which was never accepted. With a
    /// [store](ProducerBuilder::store), a call cancelled after the store took the message
    /// (while it waits for the store to make it durable, the fsync) has not dropped it: the
    /// message is sent, as with a dropped future (a failure goes to the unclaimed hook or
    /// [`Producer::close`]'s report). (Cancelled while it waits for room in the store, it
    /// is handed to those as failed, [`FailureReason::Cancelled`].) Sending it again then
    /// sends it twice, under two ids.
    pub async fn enqueue(&self, msg: Message) -> Result<DeliveryFuture, SendError> {
        let msg = self.traced(msg);
        if let Some(stage) = &self.shared().stage {
            return self.enqueue_stored(stage, msg).await;
        }
        // A task enqueuing in a loop gives way now and then, as it would sending into a Tokio
        // channel (see `CHUNK`); before the message is accepted, so that a call cancelled
        // here has accepted nothing.
        tokio::task::coop::consume_budget().await;
        let (tx, rx) = oneshot::channel();
        // Tried first here, without registering for room (two locks of the waiters' list a
        // message, for nothing while the buffer has room) and without a future of its own
        // (the message moved into it, once per message).
        match self.push_one(msg, Completion::One(tx)) {
            Ok(()) => {}
            Err(Refused {
                msg,
                done,
                reason: FailureReason::BufferFull,
                ..
            }) => self.wait_for_room(msg, done).await?,
            Err(refused) => return Err(self.refused(refused)),
        }
        Ok(DeliveryFuture::new(rx, self.shared().unclaimed.clone()))
    }

    /// Puts one message that found the buffer full into it (no store), waiting for space:
    /// registered for room before trying again, so that room freed in between is not missed.
    #[allow(clippy::result_large_err)] // handed straight back to the caller
    async fn wait_for_room(&self, mut msg: Message, mut done: Completion) -> Result<(), SendError> {
        loop {
            let mut space = pin!(self.shared().space.notified());
            space.as_mut().enable();
            match self.push_one(msg, done) {
                Ok(()) => return Ok(()),
                Err(Refused {
                    msg: m,
                    done: d,
                    reason: FailureReason::BufferFull,
                    ..
                }) => {
                    msg = m;
                    done = d;
                    space.await;
                }
                Err(refused) => return Err(self.refused(refused)),
            }
        }
    }

    /// [`Producer::enqueue`] for several messages, in order, with one future each. With a
    /// [store](ProducerBuilder::store) they are stored with one write (and one fsync), which
    /// is why this exists: enqueuing them one by one would wait for one fsync each. Without a
    /// store they are accepted as many at a time as the buffer has room for (one lock, one
    /// wake-up of the dispatcher), the rest waiting for room in order. Returns once every
    /// message is accepted or refused.
    ///
    /// Cancelling this call while it waits (for space, or giving way between runs of 1 024)
    /// drops the messages not accepted yet, as with `enqueue`; the fates of those already
    /// accepted go to the unclaimed hook or [`Producer::close`]'s report, as with dropped
    /// futures.
    pub async fn enqueue_many(&self, msgs: Vec<Message>) -> Vec<Result<DeliveryFuture, SendError>> {
        let Some(stage) = &self.shared().stage else {
            return self.enqueue_many_unstored(msgs).await;
        };
        let mut out: Vec<Option<Result<DeliveryFuture, SendError>>> =
            Vec::with_capacity(msgs.len());
        let mut entries = Vec::with_capacity(msgs.len());
        // Where each stored message's answer goes, its receiver, and a copy to hand back if
        // the admitter is gone (cheap: payloads are shared).
        let mut waiting = Vec::with_capacity(msgs.len());
        for msg in msgs {
            match self.check_size(self.traced(msg)) {
                Ok(msg) => {
                    let (tx, rx) = oneshot::channel();
                    waiting.push((out.len(), rx, msg.clone()));
                    entries.push((msg, Completion::One(tx)));
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if !entries.is_empty() {
            let (durable_tx, durable_rx) = oneshot::channel();
            match self.submit_waiting(stage, entries, Some(durable_tx)).await {
                Err(not) => {
                    for ((at, _, _), (msg, _)) in waiting.iter().zip(not.entries) {
                        self.shared().count_refused(&not.reason);
                        out[*at] = Some(Err(SendError::new(msg, not.reason.clone(), 0)));
                    }
                }
                Ok(()) => {
                    let durable = matches!(durable_rx.await, Ok(Ok(())));
                    for (at, rx, msg) in waiting {
                        out[at] = Some(if durable {
                            Ok(DeliveryFuture::new(rx, self.shared().unclaimed.clone()))
                        } else {
                            // The admitter answered each with the store's error.
                            Err(match rx.await {
                                Ok(Err(e)) => e,
                                _ => SendError::new(msg, FailureReason::Closed, 0),
                            })
                        });
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.expect("every message answered"))
            .collect()
    }

    /// `enqueue_many` without a store: admitted in runs under one lock, waiting for room.
    async fn enqueue_many_unstored(
        &self,
        msgs: Vec<Message>,
    ) -> Vec<Result<DeliveryFuture, SendError>> {
        let unclaimed = &self.shared().unclaimed;
        let mut out: Vec<Option<Result<DeliveryFuture, SendError>>> =
            Vec::with_capacity(msgs.len());
        let mut answers = Vec::with_capacity(msgs.len());
        // Position, message and completion of each message still to admit, in order.
        let mut todo = VecDeque::with_capacity(msgs.len());
        for msg in msgs {
            match self.check_size(self.traced(msg)) {
                Ok(msg) => {
                    let (tx, rx) = oneshot::channel();
                    todo.push_back((out.len(), msg, Completion::One(tx)));
                    answers.push(Some(rx));
                    out.push(None);
                }
                Err(e) => {
                    answers.push(None);
                    out.push(Some(Err(e)));
                }
            }
        }
        self.admit_in_runs(todo, |at, answer| {
            out[at] = Some(match answer {
                Ok(()) => match answers[at].take() {
                    Some(rx) => Ok(DeliveryFuture::new(rx, unclaimed.clone())),
                    None => unreachable!("position {at} is answered once"),
                },
                Err(e) => Err(e),
            });
        })
        .await;
        out.into_iter()
            .map(|o| o.expect("every message is accepted or refused"))
            .collect()
    }

    /// Admits `todo` into the buffer (no store) in order, at most [`CHUNK`] under one lock (as
    /// `send_all`: landing batches needs the lock too), waiting for room, and tells `answer`
    /// each message's tag with whether it was accepted or why not (the producer is closed).
    /// Messages too large must be answered before: `admit` then refuses only when closed (all
    /// of what it is given) and stops only when full, so that tags follow from its counts.
    async fn admit_in_runs<T>(
        &self,
        mut todo: VecDeque<(T, Message, Completion)>,
        mut answer: impl FnMut(T, Result<(), SendError>),
    ) {
        let shared = self.shared();
        while !todo.is_empty() {
            // Lets the dispatcher send what the last run made ready first (see `CHUNK`).
            tokio::task::yield_now().await;
            let mut space = pin!(shared.space.notified());
            space.as_mut().enable();
            let mut given = VecDeque::with_capacity(CHUNK.min(todo.len()));
            let admission = shared.admit(
                std::iter::from_fn(|| {
                    if given.len() == CHUNK {
                        return None;
                    }
                    todo.pop_front().map(|(tag, msg, done)| {
                        given.push_back(tag);
                        (msg, done, None)
                    })
                }),
                None,
                |_| {},
            );
            debug_assert!(admission.accepted == 0 || admission.refused.is_empty());
            for tag in given.drain(..admission.accepted) {
                answer(tag, Ok(()));
            }
            for refused in admission.refused {
                if let Some(tag) = given.pop_front() {
                    answer(tag, Err(self.refused(refused)));
                }
            }
            if let (Some(full), Some(tag)) = (admission.full, given.pop_front()) {
                todo.push_front((tag, full.msg, full.done));
                space.await;
            }
        }
    }

    /// [`Producer::enqueue_many`] with the fates going to `sink` instead of a future each:
    /// every accepted message's fate reaches `sink` once, with the tag it is given here.
    /// Returns, once every message is accepted or refused, the refused ones with their tags
    /// (too large, producer closed, a store that cannot take them): `sink` hears nothing of
    /// those. A message a store takes but fails to make durable reaches `sink` as failed
    /// ([`FailureReason::Store`]).
    ///
    /// The fastest way in for a stream that needs each message's fate: no future (and no
    /// allocation) per message, and without a store, as many admitted under one lock as the
    /// buffer has room for (the `herald` command sends everything through it). Fates reach
    /// `sink` in the order they happen, not in the order given: per key, a message's fate may
    /// come after a later one's, when their batches land on different threads at once.
    ///
    /// For long streams through a [store](ProducerBuilder::store): a run of consecutive tags
    /// waiting in the store costs next to nothing, so memory stays flat however many wait.
    /// Messages given in one call are stored with one write, as with `enqueue_many`.
    ///
    /// Cancelling this call while it waits (for room, or giving way between runs of 1 024)
    /// drops the messages not accepted yet (they were never accepted, and `sink` hears
    /// nothing of them), as with `enqueue_many`; those already accepted reach `sink` as usual.
    /// With a [store](ProducerBuilder::store), the messages the call was waiting to store
    /// reach `sink` as failed, [`FailureReason::Cancelled`] (they were never stored), and those
    /// it had stored are accepted: their fates reach `sink` as usual.
    pub async fn enqueue_tagged(
        &self,
        msgs: Vec<(u64, Message)>,
        sink: &Arc<dyn FateSink>,
    ) -> Vec<(u64, SendError)> {
        let mut refused = Vec::new();
        let mut todo = VecDeque::with_capacity(msgs.len());
        for (tag, msg) in msgs {
            match self.check_size(self.traced(msg)) {
                Ok(msg) => todo.push_back((tag, msg, Completion::Tagged(sink.clone(), tag))),
                Err(e) => refused.push((tag, e)),
            }
        }
        let Some(stage) = &self.shared().stage else {
            self.admit_in_runs(todo, |tag, answer| {
                if let Err(e) = answer {
                    refused.push((tag, e));
                }
            })
            .await;
            return refused;
        };
        if todo.is_empty() {
            return refused;
        }
        let (tags, entries): (Vec<u64>, Vec<_>) = todo
            .into_iter()
            .map(|(tag, msg, done)| (tag, (msg, done)))
            .unzip();
        let (durable_tx, durable_rx) = oneshot::channel();
        match self.submit_waiting(stage, entries, Some(durable_tx)).await {
            Err(not) => {
                for (tag, (msg, _)) in tags.into_iter().zip(not.entries) {
                    self.shared().count_refused(&not.reason);
                    refused.push((tag, SendError::new(msg, not.reason.clone(), 0)));
                }
            }
            // Durable or not, each message's fate goes to the sink (a store's failure too).
            Ok(()) => drop(durable_rx.await),
        }
        refused
    }

    /// Puts one message into the buffer without waiting. A full buffer, a closed producer or an
    /// oversized message hands it back at once ([`FailureReason::BufferFull`],
    /// [`FailureReason::Closed`], [`FailureReason::TooLarge`]).
    pub fn try_send(&self, msg: Message) -> Result<DeliveryFuture, SendError> {
        let msg = self.traced(msg);
        let (tx, rx) = oneshot::channel();
        if let Some(stage) = &self.shared().stage {
            let msg = self.check_size(msg)?;
            return match stage.submit(&self.handle.shared, vec![(msg, Completion::One(tx))], None) {
                Ok(()) => Ok(DeliveryFuture::new(rx, self.shared().unclaimed.clone())),
                Err(not) => Err(self.not_stored(not)),
            };
        }
        match self.push_one(msg, Completion::One(tx)) {
            Ok(()) => Ok(DeliveryFuture::new(rx, self.shared().unclaimed.clone())),
            Err(refused) => Err(self.refused(refused)),
        }
    }

    #[allow(clippy::result_large_err)] // see `Refused`
    #[inline(always)] // once per message: a call would copy the message in and out
    fn push_one(&self, msg: Message, done: Completion) -> Result<(), Refused> {
        self.shared().admit_one(msg, done)
    }

    /// The message with its producer span started (feature `otel`; see `crate::trace`).
    #[inline(always)] // once per message: a call would copy the message in and out
    fn traced(&self, mut msg: Message) -> Message {
        crate::trace::accepting(&mut msg, &*self.shared().transport);
        msg
    }

    fn refused(&self, refused: Refused) -> SendError {
        self.shared().count_refused(&refused.reason);
        SendError::new(refused.msg, refused.reason, 0)
    }

    /// Sends many messages with one completion for all of them: the fastest way in. Waits for
    /// buffer space as needed, in input order, and returns once every message is accepted or
    /// refused; the [`BulkReceipt`] then resolves when all have ended. Refused messages (too large,
    /// producer closed) appear in the report's failures with the rest.
    ///
    /// # Cancellation
    ///
    /// Dropping this future before it returns (a timeout, a `select!`) loses nothing. The call
    /// takes messages from `msgs` up to 1 024 at a time; of those it has taken, every one is
    /// either accepted (and ends as usual, its failure if any going to the unclaimed hook or
    /// [`Producer::close`]'s report, as with a dropped receipt) or handed back there as failed
    /// with [`FailureReason::Cancelled`]: it was not sent. Messages not taken yet stay in the
    /// iterator: pass `iter.by_ref()` to keep them and send them later.
    pub async fn send_all<I>(&self, msgs: I) -> BulkReceipt
    where
        I: IntoIterator<Item = Message>,
    {
        let transport = &*self.shared().transport;
        let msgs = msgs.into_iter().map(move |mut msg| {
            crate::trace::accepting(&mut msg, transport);
            msg
        });
        if let Some(stage) = &self.shared().stage {
            return self.send_all_stored(stage, msgs).await;
        }
        let shared = self.shared();
        // Made first: if this call is cancelled midway, dropping the receipt sends later
        // failures of the messages already accepted to the unclaimed sink.
        let receipt = BulkReceipt {
            group: Group::new(shared.unclaimed.clone()),
        };
        let group = &receipt.group;
        let mut iter = msgs.into_iter();
        // Dropped before the receipt: on cancellation what it still holds fails as `Cancelled`
        // into the group, and from there, the receipt being dropped too, to the unclaimed sink.
        let mut taken = Taken {
            shared,
            group,
            pending: None,
            chunk: VecDeque::with_capacity(CHUNK),
        };
        loop {
            if taken.pending.is_none() && taken.chunk.is_empty() {
                // Lets the dispatcher send what the last chunk made ready first (see `CHUNK`).
                tokio::task::yield_now().await;
                taken.chunk.extend(iter.by_ref().take(CHUNK));
                if taken.chunk.is_empty() {
                    break;
                }
            }
            let mut space = pin!(shared.space.notified());
            space.as_mut().enable();
            let Taken { pending, chunk, .. } = &mut taken;
            let next = std::iter::from_fn(|| pending.take().or_else(|| chunk.pop_front()));
            let admission = shared.admit(
                next.map(|msg| (msg, Completion::Group(group.clone()), None)),
                None,
                |accepted| group.add(accepted),
            );
            for Refused { msg, reason, .. } in admission.refused {
                shared.count_refused(&reason);
                group.fail_now(SendError::new(msg, reason, 0));
            }
            if let Some(full) = admission.full {
                taken.pending = Some(full.msg);
                space.await;
            }
        }
        drop(taken);
        group.end_one();
        receipt
    }

    /// `enqueue` with a store: accepted once the store has the message durably.
    async fn enqueue_stored(
        &self,
        stage: &Stage,
        msg: Message,
    ) -> Result<DeliveryFuture, SendError> {
        let msg = self.check_size(msg)?;
        let (tx, rx) = oneshot::channel();
        let (durable_tx, durable_rx) = oneshot::channel();
        let kept = msg.clone();
        self.submit_waiting(stage, vec![(msg, Completion::One(tx))], Some(durable_tx))
            .await
            .map_err(|not| self.not_stored(not))?;
        match durable_rx.await {
            Ok(Ok(())) => Ok(DeliveryFuture::new(rx, self.shared().unclaimed.clone())),
            // The admitter answered the message with the store's error.
            _ => Err(match rx.await {
                Ok(Err(e)) => e,
                // The admitter is gone (a runtime shutting down): the message may be stored,
                // and the next producer on the store would send it.
                _ => SendError::new(kept, FailureReason::Closed, 0),
            }),
        }
    }

    /// Submits to the store, waiting for room while it is full and something accepted can
    /// still end and free some. Refuses at once when the producer is closed or the store
    /// fails, or is full with nothing left to free room.
    #[allow(clippy::result_large_err)] // handed straight back to the caller
    async fn submit_waiting(
        &self,
        stage: &Stage,
        entries: Vec<(Message, Completion)>,
        durable: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Result<(), NotStored> {
        /// The messages while this call waits for room: if it is cancelled then, each is
        /// handed back as `Cancelled` (to its caller's sink, the unclaimed hook if nobody
        /// listens), never dropped.
        struct Waiting<'a>(&'a Shared, Vec<(Message, Completion)>);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                for (msg, done) in self.1.drain(..) {
                    self.0.count_refused(&FailureReason::Cancelled);
                    let e = SendError::new(msg, FailureReason::Cancelled, 0);
                    match done {
                        // Its receiver is the cancelled call's own, dropped after this guard
                        // with the answer unread: straight to the hook.
                        Completion::One(_) => self.0.unclaimed.put(e),
                        done => done.complete(Err(e), &self.0.unclaimed),
                    }
                }
            }
        }
        let shared = self.shared();
        let mut durable = durable;
        let mut waiting = Waiting(shared, entries);
        loop {
            let mut space = pin!(shared.space.notified());
            space.as_mut().enable();
            match stage.submit(&self.handle.shared, std::mem::take(&mut waiting.1), durable) {
                Ok(()) => return Ok(()),
                Err(not)
                    if matches!(&not.reason, FailureReason::Store(e) if e.is_full())
                        && shared.unsettled.load(Ordering::Acquire) > 0
                        || matches!(not.reason, FailureReason::BufferFull) =>
                {
                    waiting.1 = not.entries;
                    durable = not.durable;
                    space.await;
                }
                Err(not) => return Err(not),
            }
        }
    }

    /// Refuses a message larger than the producer takes, before it is stored.
    #[allow(clippy::result_large_err)] // handed straight back to the caller
    #[inline(always)] // as `traced`
    fn check_size(&self, msg: Message) -> Result<Message, SendError> {
        let (size, max) = (msg.size(), self.shared().config.max_message_bytes);
        if size > max {
            let reason = FailureReason::TooLarge { size, max };
            self.shared().count_refused(&reason);
            return Err(SendError::new(msg, reason, 0));
        }
        Ok(msg)
    }

    /// The message of a one-message submission the store did not take, handed back.
    fn not_stored(&self, not: NotStored) -> SendError {
        self.shared().count_refused(&not.reason);
        let msg = not
            .entries
            .into_iter()
            .next()
            .map(|(m, _)| m)
            .expect("one message");
        SendError::new(msg, not.reason, 0)
    }

    /// `send_all` with a store: each chunk of up to 1 024 messages is one store write; returns
    /// once every chunk is durable (or refused).
    async fn send_all_stored<I>(&self, stage: &Stage, msgs: I) -> BulkReceipt
    where
        I: IntoIterator<Item = Message>,
    {
        let shared = self.shared();
        let receipt = BulkReceipt {
            group: Group::new(shared.unclaimed.clone()),
        };
        let group = &receipt.group;
        let mut last = None;
        let mut iter = msgs.into_iter();
        loop {
            let mut chunk = Vec::with_capacity(CHUNK);
            let mut took = 0;
            for msg in iter.by_ref().take(CHUNK) {
                took += 1;
                match self.check_size(msg) {
                    Ok(msg) => chunk.push((msg, Completion::Group(group.clone()))),
                    Err(e) => group.fail_now(e),
                }
            }
            if took == 0 {
                break;
            }
            if chunk.is_empty() {
                continue;
            }
            // Counted before the admitter can end any of them.
            group.add(chunk.len());
            let (tx, rx) = oneshot::channel();
            match self.submit_waiting(stage, chunk, Some(tx)).await {
                Ok(()) => last = Some(rx),
                Err(not) => {
                    for (msg, done) in not.entries {
                        shared.count_refused(&not.reason);
                        done.complete(
                            Err(SendError::new(msg, not.reason.clone(), 0)),
                            &shared.unclaimed,
                        );
                    }
                }
            }
        }
        // The admitter takes submissions in order: once the last is durable, all are.
        if let Some(rx) = last {
            let _durable = rx.await;
        }
        group.end_one();
        receipt
    }

    /// Waits until the buffer is empty: everything accepted (including what other tasks send
    /// meanwhile) has been delivered or has failed. Linger is skipped while a flush waits.
    pub async fn flush(&self) {
        let shared = self.shared();
        struct Flushing<'a>(&'a Shared);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.lock().flushers -= 1;
            }
        }
        shared.lock().flushers += 1;
        let _flushing = Flushing(shared);
        shared.wake.notify_one();
        self.wait_idle(None).await;
    }

    /// Waits until every accepted message has ended and its caller been told, or `deadline`
    /// passes; true if everything ended.
    async fn wait_idle(&self, deadline: Option<Instant>) -> bool {
        let shared = self.shared();
        let settled = || shared.unsettled.load(Ordering::Acquire) == 0;
        loop {
            let mut idle = pin!(shared.idle.notified());
            idle.as_mut().enable();
            if settled() {
                return true;
            }
            match deadline {
                None => idle.await,
                Some(d) => {
                    let timeout = tokio::time::sleep_until(tokio::time::Instant::from_std(d));
                    tokio::select! {
                        () = idle => {}
                        () = timeout => return settled(),
                    }
                }
            }
        }
    }

    /// Stops accepting messages, delivers what was accepted until `timeout` passes, then fails
    /// whatever is still queued or waiting to retry with [`FailureReason::Closed`] (each handed
    /// back through its future, receipt or the unclaimed hook), closes the transport once the
    /// last batch in flight has landed, and reports. Every clone of this producer is closed.
    pub async fn close(&self, timeout: Duration) -> CloseReport {
        let shared = self.shared();
        // A timeout too large to add to the clock means no deadline.
        let deadline = clock_now().checked_add(timeout);
        shared.start_closing();
        let drained = self.wait_idle(deadline).await;
        let in_flight = if drained { 0 } else { shared.abandon_queued() };
        if in_flight == 0 {
            // Let the dispatcher close the transport, within what is left of the deadline.
            // Every `close` waits for it: one running beside another must not report before
            // the transport is closed.
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(clock_now()));
            let exited = async {
                loop {
                    let mut exit = pin!(shared.exit.notified());
                    exit.as_mut().enable();
                    if shared.exited.load(Ordering::Acquire) {
                        return;
                    }
                    exit.await;
                }
            };
            let _closed_in_time = tokio::time::timeout(left, exited).await.is_ok();
        }
        let totals = shared.lock().totals;
        CloseReport {
            drained,
            in_flight,
            unclaimed: shared.unclaimed.take(),
            totals,
        }
    }

    /// A snapshot of the pipeline: buffer, in-flight batches, circuit state, totals.
    pub fn stats(&self) -> ProducerStats {
        let shared = self.shared();
        let st = shared.lock();
        ProducerStats {
            buffered_messages: st.buffered_messages,
            buffered_bytes: st.buffered_bytes,
            in_flight_batches: st.in_flight,
            circuit: st.breaker.state(),
            totals: st.totals,
            unclaimed: shared.unclaimed.count(),
        }
    }

    /// The producer's health now, evaluated on the spot: [`HealthStatus`](crate::HealthStatus)
    /// and its issues (circuit open, broker connection down or blocked, buffer above its
    /// high-water mark, error rate, closed). [`Producer::health_watch`] gets the same verdict
    /// at its next evaluation (this call does not publish, so it is safe while a `borrow()` of
    /// that channel is held).
    pub fn health(&self) -> Health {
        self.shared().evaluate_health(clock_now(), false)
    }

    /// A watch channel of the producer's health, evaluated every [`HealthPolicy::interval`](crate::HealthPolicy::interval) and
    /// at once when the circuit breaker changes state or the producer closes. Receivers are
    /// woken when the status or the set of issues changes (not when a count inside an issue
    /// does); the value is always the latest evaluation. After the producer has closed, it holds
    /// its last health (unhealthy: closed).
    pub fn health_watch(&self) -> tokio::sync::watch::Receiver<Health> {
        self.shared().health.tx.subscribe()
    }

    /// The name given with [`ProducerBuilder::name`], if any.
    pub fn name(&self) -> Option<&str> {
        self.shared().config.name.as_deref()
    }

    /// The transport's name.
    pub fn transport_name(&self) -> &'static str {
        self.shared().transport.name()
    }
}
