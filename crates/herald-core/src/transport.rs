//! The one seam every broker implements.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;

use crate::error::TransportError;
use crate::health::TransportHealth;
use crate::key_hold::KeyHold;
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
    /// Past `deadline` a transport hands nothing new to its broker: check it ([`deadline_passed`])
    /// before each hand-over to the client and fail what is left as transient, code `NOT_SENT`. A
    /// call can start or resume late (it waited for its connection or for the calls ahead of it),
    /// and a call that returns Pending at the end of its time for want of Tokio's cooperative
    /// budget (not for an answer it waits for) is polled once more then, outside the budget, so
    /// that answers it holds are its outcome. The conformance suite checks this
    /// (`nothing_is_sent_past_the_deadline`).
    ///
    /// Default: [`Transport::send_batch`], which herald cuts off at `deadline` (settle time
    /// zero); it does not look at the deadline, so it may still hand a late call's messages
    /// over in its first poll: an adapter overrides it.
    async fn send_batch_until(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
    ) -> BatchOutcome {
        let _ = deadline;
        self.send_batch(destination, batch).await
    }

    /// Sends `batch` as [`Transport::send_batch_until`] does, and tells `early` of each message
    /// the broker acknowledges as soon as it does ([`EarlyAcks::ack`], with the message's index
    /// in `batch`), before the call returns: herald answers that message's caller then, instead
    /// of when the whole batch has its answers. A batch's slowest acknowledgement then no longer
    /// sets the latency of all its messages.
    ///
    /// herald always calls this method; the default ignores `early` and calls
    /// [`Transport::send_batch_until`], so a transport that does not override it answers as a
    /// whole batch, as before. A transport that wraps others and passes them other slices than
    /// `batch` (a fallback, a splitter) must not hand them `early` as it is: its indices would
    /// name other messages.
    ///
    /// An early acknowledgement is final: the call's outcome for that index should be the same
    /// `Ok`. If it says otherwise (herald cut the call off at its deadline, say), a message
    /// herald answered stays delivered and is not sent again. Under strict ordering herald
    /// answers an acknowledgement at once only when no earlier message of its key can still
    /// fail; the others are answered when that is so, or when the call returns.
    async fn send_batch_answering(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
        early: EarlyAcks,
    ) -> BatchOutcome {
        let _ = early;
        self.send_batch_until(destination, batch, deadline).await
    }

    /// How long past an attempt's deadline herald waits for [`Transport::send_batch_until`] to
    /// report messages already handed to the broker, so that a message the broker stored is not
    /// reported failed because its answer came late. A message may thus end up to this long after
    /// its delivery timeout. Default: zero (the call is cut off at the deadline).
    fn settle_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Whether messages sent through this transport can carry headers. When `false` (MQTT
    /// 3.1.1, whose messages are a topic and a payload), herald adds no header of its own: with
    /// the `otel` feature it records the message's span all the same but does not write the
    /// trace context (`traceparent`) into the message, which the transport would have to
    /// refuse. Headers the caller sets are the transport's to take or refuse. Default: `true`.
    fn carries_headers(&self) -> bool {
        true
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
    /// `tokio::sync::Mutex` locked before any other `.await`): [`Turns`] does that, and more.
    /// The pipeline lands the batches in the order they were sent and applies the per-key hold
    /// across them, so the last copies of a key's messages stay in order whatever the transport
    /// does after a failure; a transport that also takes [`Turns`] keeps the first copies in
    /// order across a lost connection.
    ///
    /// Default: `false` (one batch per destination at a time under strict ordering).
    fn keeps_order_across_calls(&self) -> bool {
        false
    }

    /// The pipeline depth ([`ProducerBuilder::pipeline_depth`](crate::ProducerBuilder::pipeline_depth))
    /// this transport works best at, used when the producer does not set one; the default
    /// in-flight limit rises to it. For a client that batches and pipelines on its own
    /// (librdkafka), herald's batches are small parts of its requests, and a shallow pipeline
    /// makes messages wait for a slot that the client does not need. Default: `None` (herald's
    /// default, 4).
    fn suggested_pipeline_depth(&self) -> Option<usize> {
        None
    }

    /// Messages this transport reported delivered that the pipeline holds back all the same,
    /// to send again behind the retry of an earlier message of their key that failed
    /// transiently (see [`KeyHold`](crate::KeyHold)): their first copy may be stored ahead of
    /// that message, and the copy sent again is the one in order. A transport whose broker
    /// drops a copy it already holds by the message's id (JetStream's `Nats-Msg-Id`) would
    /// keep only the copy out of order: it sends these again under an id of their own.
    /// Called on the pipeline's dispatcher with its state locked: must be quick. Default:
    /// nothing to do.
    fn delivered_but_held(&self, _destination: &Destination, _messages: &[&Message]) {}

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

/// Whether `deadline`, a deadline herald gave a call ([`Transport::send_batch_until`]), has
/// passed, on Tokio's clock as herald keeps it (so also under a paused test clock); `None`, no
/// deadline, never has. What a transport asks before each hand-over to its client.
pub fn deadline_passed(deadline: Option<std::time::Instant>) -> bool {
    deadline.is_some_and(|at| tokio::time::Instant::now() >= at.into())
}

/// Where a transport reports single messages of a call acknowledged before the call returns
/// (see [`Transport::send_batch_answering`]). Cheap to clone and to call from any thread (a
/// client library's callback thread, say): an acknowledgement is queued and the call's task is
/// woken, once for however many come before it runs; herald answers the callers there.
///
/// ```
/// use herald_core::{Ack, EarlyAcks};
/// let early = EarlyAcks::default();
/// early.ack(0, Ack::default()); // message 0 of the batch is stored
/// ```
#[derive(Clone, Default)]
pub struct EarlyAcks {
    inner: Arc<Mutex<Early>>,
}

#[derive(Default)]
struct Early {
    /// Acknowledgements not yet taken by the call's task: (index in the batch, ack).
    acks: Vec<(usize, Ack)>,
    /// The call's task, to wake when the first acknowledgement since it last looked comes.
    waker: Option<std::task::Waker>,
}

impl std::fmt::Debug for EarlyAcks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyAcks").finish_non_exhaustive()
    }
}

impl EarlyAcks {
    /// The broker acknowledged the message at `index` of the call's batch. An index out of the
    /// batch, or one acknowledged before, is ignored.
    pub fn ack(&self, index: usize, ack: Ack) {
        let waker = {
            let mut early = lock(&self.inner);
            early.acks.push((index, ack));
            early.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The acknowledgements given and not yet taken by herald, in the order they came: for
    /// tests of a transport that calls it directly (inside a producer, herald takes them as
    /// they come).
    pub fn pending(&self) -> Vec<(usize, Ack)> {
        lock(&self.inner).acks.clone()
    }

    /// The acknowledgements queued since the last call, into `into` (emptied first); the task
    /// of `waker` is woken by the next one.
    pub(crate) fn take(&self, waker: &std::task::Waker, into: &mut Vec<(usize, Ack)>) {
        into.clear();
        let mut early = lock(&self.inner);
        std::mem::swap(&mut early.acks, into);
        match &mut early.waker {
            Some(w) if w.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
    }
}

/// Where a call stands in its producer's strict order (see [`Turns`]): which producer's pipeline
/// (two producers sharing one transport keep apart) and which order epoch of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OrderEpoch {
    pub(crate) pipeline: u64,
    pub(crate) epoch: u64,
}

tokio::task_local! {
    /// The order epoch of the call being made: set by the pipeline around each call under
    /// strict ordering (`None` under relaxed ordering; unset when a transport is called
    /// directly).
    static ORDER_EPOCH: Option<OrderEpoch>;
}

/// Runs `call` in `epoch` (see [`Turns`]).
pub(crate) fn in_order_epoch<F: std::future::Future>(
    epoch: Option<OrderEpoch>,
    call: F,
) -> impl std::future::Future<Output = F::Output> {
    ORDER_EPOCH.scope(epoch, call)
}

/// Turns per destination, served first come, first served: what a transport that keeps order
/// across calls ([`Transport::keeps_order_across_calls`]) takes at the start of each call, before
/// any other `.await`. herald starts a destination's calls one after another, so their turns come
/// in that order.
///
/// A call in its turn:
/// 1. [`Turn::enter`] with the *path* it is about to hand its messages over on (a generation
///    number that changes whenever the connection, or a channel of it, is replaced): if the calls
///    before it handed theirs over on another path (one was lost and replaced between them) and
///    have not finished,
///    it waits until they have, so that a message of a key cannot reach the broker through the
///    new connection while an earlier message of that key, sent through the old one, is still in
///    doubt. It gets back a [`KeyHold`] of the keys that failed transiently in the earlier calls:
///    messages it holds are failed as held, not sent (they are retried behind the failed ones);
/// 2. hands the call's messages over, tells [`Turn::failed`] of every failure known by then
///    (messages it did not send), then [`Turn::handed_over`]: the next call's turn begins, and
///    the broker's answers are awaited side by side;
/// 3. [`Turn::finish`] with the outcomes, so that its transient failures hold their keys for the
///    calls after it. A turn dropped unfinished (a call cut off) holds every key.
///
/// The keys held are forgotten when the pipeline has put the failed messages back in front of
/// the queue (the calls then come in a new *order epoch*). With this, the first copies of a key's
/// messages reach the broker in order, and not only the last copies (which the pipeline's
/// per-key hold keeps in order anyway). Turns take effect only in calls the producer makes
/// under strict ordering: under relaxed ordering, or for a transport called directly, a turn
/// neither waits nor holds.
///
/// ```
/// # async fn demo() {
/// use herald_core::{Destination, Message, Turns};
/// let turns = Turns::default();
/// let orders = Destination::new("orders");
/// let batch = [Message::new(orders.clone(), "a").with_key("k")];
/// let mut turn = turns.take(&orders).await;
/// let hold = turn.enter(1).await; // connection generation 1
/// assert!(hold.check(&batch[0]).is_none());
/// // ... hand the batch over ...
/// turn.handed_over();
/// // ... wait for the broker's answers ...
/// let outcomes = vec![Ok(herald_core::Ack::default())];
/// turn.finish(&batch, &outcomes);
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Turns {
    /// By producer pipeline and destination; a lane no call is in or waits for, holding no
    /// key, is forgotten (see `LaneRef`): a stream per user, say, does not make this
    /// grow without bound.
    lanes: Arc<Mutex<LaneMap>>,
}

type LaneMap = HashMap<(u64, Destination), Arc<TurnLane>>;

#[derive(Debug, Default)]
struct TurnLane {
    /// The order in which calls hand their messages over.
    queue: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<TurnState>,
    /// A call finished.
    finished: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct TurnState {
    next_ticket: u64,
    /// Calls that took a turn and have not finished, by ticket.
    open: BTreeSet<u64>,
    /// The path the last call handed its messages over on.
    path: Option<u64>,
    /// Keys failed transiently in calls of the order epoch `hold_epoch`.
    hold: KeyHold,
    hold_epoch: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Paths given out by [`Turns::fresh_path`].
static PATHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Turns {
    /// A path number no other call returns in this process: give each new connection one, and
    /// pass it (combined with anything else that, replaced, changes the path) to
    /// [`Turn::enter`].
    pub fn fresh_path() -> u64 {
        PATHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A transport's `send_batch` in `destination`'s turn: takes the turn (before any other
    /// await), runs `send` in it, and finishes the turn with the outcomes `send` returns
    /// ([`Turn::finish`]), so that no call can forget to.
    pub async fn run<F>(
        &self,
        destination: &Destination,
        batch: &[Message],
        send: F,
    ) -> BatchOutcome
    where
        F: AsyncFnOnce(&mut Turn) -> BatchOutcome,
    {
        let mut turn = self.take(destination).await;
        let outcomes = send(&mut turn).await;
        turn.finish(batch, &outcomes);
        outcomes
    }

    /// Waits for `destination`'s turn: after every call that asked for it before (at its first
    /// poll). The next call's turn begins at [`Turn::handed_over`], or when the turn is dropped.
    pub async fn take(&self, destination: &Destination) -> Turn {
        let Some(OrderEpoch { pipeline, epoch }) = ORDER_EPOCH.try_with(|e| *e).ok().flatten()
        else {
            return Turn {
                held: None,
                finished: false,
            };
        };
        let lane = LaneRef::take(&self.lanes, (pipeline, destination.clone()));
        // Cut off here (the caller gave up waiting), the lane is let go and forgotten if idle.
        let order = lane.queue.clone().lock_owned().await;
        let ticket = {
            let mut st = lock(&lane.state);
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            st.open.insert(ticket);
            if epoch > st.hold_epoch {
                // The failed messages of the epoch before are back in front of the queue.
                st.hold = KeyHold::default();
                st.hold_epoch = epoch;
            }
            ticket
        };
        Turn {
            held: Some(Held {
                lane,
                ticket,
                epoch,
                order: Some(order),
            }),
            finished: false,
        }
    }
}

/// One call's turn: see [`Turns`].
#[derive(Debug)]
pub struct Turn {
    /// `None`: a turn that neither waits nor holds (relaxed ordering, or no producer).
    held: Option<Held>,
    finished: bool,
}

#[derive(Debug)]
struct Held {
    lane: LaneRef,
    ticket: u64,
    epoch: u64,
    order: Option<OwnedMutexGuard<()>>,
}

/// A call's hold on its lane. Let go (the call finished, was cut off, or gave up waiting for
/// its turn), the lane is forgotten if nothing else holds it and it holds no key: the next
/// call starts a fresh one, which is the same thing. A lane that holds keys is kept until its
/// next call, whose epoch clears them.
#[derive(Debug)]
struct LaneRef {
    /// `None` once let go.
    lane: Option<Arc<TurnLane>>,
    /// Where the lane is kept, and under which key.
    lanes: Arc<Mutex<LaneMap>>,
    key: (u64, Destination),
}

impl LaneRef {
    fn take(lanes: &Arc<Mutex<LaneMap>>, key: (u64, Destination)) -> Self {
        let lane = lock(lanes).entry(key.clone()).or_default().clone();
        Self {
            lane: Some(lane),
            lanes: Arc::clone(lanes),
            key,
        }
    }
}

impl std::ops::Deref for LaneRef {
    type Target = TurnLane;

    fn deref(&self) -> &TurnLane {
        self.lane.as_ref().expect("held until dropped")
    }
}

impl Drop for LaneRef {
    fn drop(&mut self) {
        let mut lanes = lock(&self.lanes);
        // Let go under the map's lock (as every hold is taken): of holders letting go at once,
        // the last one finds the lane held by the map alone.
        drop(self.lane.take());
        let idle = lanes.get(&self.key).is_some_and(|lane| {
            if Arc::strong_count(lane) > 1 {
                return false;
            }
            let st = lock(&lane.state);
            st.open.is_empty() && st.hold.is_empty()
        });
        if idle {
            lanes.remove(&self.key);
        }
    }
}

impl Turn {
    /// The call is about to hand its messages over on `path` (a generation number that changes
    /// whenever the connection or a channel of it is replaced). Waits, if the calls before it
    /// used another path, until they have finished; returns the keys it must not send.
    pub async fn enter(&mut self, path: u64) -> KeyHold {
        let Some(h) = &self.held else {
            return KeyHold::default();
        };
        let changed = {
            let mut st = lock(&h.lane.state);
            let changed = st.path.is_some_and(|c| c != path);
            st.path = Some(path);
            changed
        };
        if changed {
            loop {
                let finished = h.lane.finished.notified();
                if !lock(&h.lane.state).open.iter().any(|t| *t < h.ticket) {
                    break;
                }
                finished.await;
            }
        }
        lock(&h.lane.state).hold.clone()
    }

    /// `msg` of this call failed with `error` before the call handed its messages over (it was
    /// not sent, or its failure is already known): a transient failure holds its key at once for
    /// the calls after this one, instead of from [`Turn::finish`]. Call it before
    /// [`Turn::handed_over`] for every failure known by then: the next call, on the same path,
    /// does not wait for this one to finish, so a key failed here and told only at the finish
    /// could go out in the next call ahead of its retry.
    pub fn failed(&mut self, msg: &Message, error: &TransportError) {
        let Some(h) = &self.held else {
            return;
        };
        let mut st = lock(&h.lane.state);
        if h.epoch == st.hold_epoch {
            st.hold.failed(msg, error);
        }
    }

    /// [`Turn::failed`] for every failure in `known` (paired with `batch` by position; `None`:
    /// no outcome yet), then [`Turn::handed_over`].
    pub fn hand_over(&mut self, batch: &[Message], known: &[Option<Result<Ack, TransportError>>]) {
        for (m, o) in batch.iter().zip(known) {
            if let Some(Err(e)) = o {
                self.failed(m, e);
            }
        }
        self.handed_over();
    }

    /// The call has handed its messages over: the next call's turn begins.
    pub fn handed_over(&mut self) {
        if let Some(h) = &mut self.held {
            h.order = None;
        }
    }

    /// The call's outcomes, paired with `batch` by position: its transient failures hold their
    /// keys for the calls after it.
    pub fn finish(mut self, batch: &[Message], outcomes: &[Result<Ack, TransportError>]) {
        self.finished = true;
        let Some(h) = &self.held else {
            return;
        };
        let mut st = lock(&h.lane.state);
        if h.epoch == st.hold_epoch {
            for (m, o) in batch.iter().zip(outcomes) {
                if let Err(e) = o {
                    st.hold.failed(m, e);
                }
            }
        }
        h.close(&mut st);
        // The lane is let go as the turn drops (see `LaneRef`).
    }
}

impl Held {
    fn close(&self, st: &mut TurnState) {
        st.open.remove(&self.ticket);
        self.lane.finished.notify_waiters();
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(h) = &self.held else {
            return;
        };
        let mut st = lock(&h.lane.state);
        if h.epoch == st.hold_epoch {
            // Cut off: what it handed over is in doubt, whatever its keys.
            st.hold.hold_all(TransportError::transient(
                "an earlier call of this destination was cut off before its answers came",
            ));
        }
        h.close(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &str) -> Message {
        Message::new("t", "p").with_key(key.to_owned())
    }

    /// Epoch `n` of pipeline 1.
    fn ep(n: u64) -> Option<OrderEpoch> {
        Some(OrderEpoch {
            pipeline: 1,
            epoch: n,
        })
    }

    fn failed() -> Vec<Result<Ack, TransportError>> {
        vec![Err(TransportError::transient("connection lost"))]
    }

    #[tokio::test]
    async fn an_idle_lane_holding_no_key_is_forgotten() {
        let turns = Turns::default();
        let lanes = || lock(&turns.lanes).len();
        for i in 0..100 {
            let d = Destination::new(format!("stream-{i}"));
            let mut t = in_order_epoch(ep(1), turns.take(&d)).await;
            assert!(t.enter(1).await.is_empty());
            t.handed_over();
            t.finish(&[keyed("k")], &[Ok(Ack::default())]);
        }
        assert_eq!(lanes(), 0, "one stream per call leaves nothing behind");
        // Two calls out: the first to finish leaves the lane to the second.
        let d = Destination::new("busy");
        let mut a = in_order_epoch(ep(1), turns.take(&d)).await;
        a.enter(1).await;
        a.handed_over();
        let mut b = in_order_epoch(ep(1), turns.take(&d)).await;
        b.enter(1).await;
        a.finish(&[], &[]);
        assert_eq!(lanes(), 1);
        // A failed key keeps its lane, for the next call to hold it.
        b.finish(&[keyed("k")], &failed());
        assert_eq!(lanes(), 1);
        let mut c = in_order_epoch(ep(1), turns.take(&d)).await;
        assert!(c.enter(1).await.check(&keyed("k")).is_some());
        c.finish(&[], &[]);
    }

    /// A call that gave up waiting for its turn (its future dropped: a caller's timeout) lets
    /// its lane go; before, the lane stayed for good when the call ahead finished while the
    /// waiting one still held it.
    #[tokio::test]
    async fn a_call_that_gave_up_waiting_leaves_no_lane_behind() {
        use std::future::Future as _;
        let turns = Turns::default();
        let d = Destination::new("gave-up");
        let mut a = in_order_epoch(ep(1), turns.take(&d)).await;
        a.enter(1).await;
        let mut waiting = Box::pin(in_order_epoch(ep(1), turns.take(&d)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending(), "behind a");
        a.handed_over();
        a.finish(&[keyed("k")], &[Ok(Ack::default())]);
        drop(waiting);
        assert_eq!(lock(&turns.lanes).len(), 0, "lane left behind");
    }

    #[tokio::test]
    async fn outside_strict_order_a_turn_neither_waits_nor_holds() {
        let turns = Turns::default();
        let d = Destination::new("t");
        let mut a = turns.take(&d).await;
        assert!(a.enter(1).await.is_empty());
        a.finish(&[keyed("k")], &failed());
        let mut b = turns.take(&d).await;
        assert!(b.enter(2).await.is_empty(), "nothing held without an epoch");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn after_a_reconnect_a_call_waits_for_the_ones_before_and_holds_their_failed_keys() {
        let turns = Arc::new(Turns::default());
        let d = Destination::new("t");
        let mut a = in_order_epoch(ep(1), turns.take(&d)).await;
        assert!(a.enter(1).await.is_empty());
        a.handed_over();
        let (t, dest) = (turns.clone(), d.clone());
        let b = tokio::spawn(in_order_epoch(ep(1), async move {
            let mut b = t.take(&dest).await;
            let hold = b.enter(2).await; // a new connection
            (b, hold)
        }));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !b.is_finished(),
            "waits while the call on the old connection is out"
        );
        a.finish(&[keyed("k")], &failed());
        let (b, hold) = b.await.expect("b");
        assert!(hold.check(&keyed("k")).is_some(), "the failed key is held");
        assert!(hold.check(&keyed("other")).is_none(), "other keys go");
        b.finish(&[], &[]);
    }

    #[tokio::test]
    async fn a_failure_told_before_handing_over_holds_its_key_for_the_next_call_at_once() {
        let turns = Turns::default();
        let d = Destination::new("t");
        let mut a = in_order_epoch(ep(1), turns.take(&d)).await;
        assert!(a.enter(1).await.is_empty());
        a.failed(&keyed("k"), &TransportError::transient("not sent"));
        a.failed(&keyed("gone"), &TransportError::permanent("too large"));
        a.handed_over();
        // Same path: b does not wait for a to finish, yet holds what a told.
        let mut b = in_order_epoch(ep(1), turns.take(&d)).await;
        let hold = b.enter(1).await;
        assert!(
            hold.check(&keyed("k")).is_some(),
            "told before handing over"
        );
        assert!(
            hold.check(&keyed("gone")).is_none(),
            "a permanent failure holds nothing"
        );
        assert!(hold.check(&keyed("other")).is_none());
        b.finish(&[], &[]);
        a.finish(&[], &[]);
    }

    #[tokio::test]
    async fn a_new_order_epoch_forgets_the_keys_held() {
        let turns = Turns::default();
        let d = Destination::new("t");
        let mut a = in_order_epoch(ep(1), turns.take(&d)).await;
        a.enter(1).await;
        a.finish(&[keyed("k")], &failed());
        let mut same = in_order_epoch(ep(1), turns.take(&d)).await;
        assert!(same.enter(1).await.check(&keyed("k")).is_some());
        same.finish(&[], &[]);
        let mut next = in_order_epoch(ep(2), turns.take(&d)).await;
        assert!(
            next.enter(1).await.is_empty(),
            "retries back in front: nothing held"
        );
    }

    #[tokio::test]
    async fn a_call_cut_off_holds_every_key() {
        let turns = Turns::default();
        let d = Destination::new("t");
        let mut a = in_order_epoch(ep(1), turns.take(&d)).await;
        a.enter(1).await;
        drop(a);
        let mut b = in_order_epoch(ep(1), turns.take(&d)).await;
        let hold = b.enter(1).await;
        assert!(hold.check(&keyed("any")).is_some());
        assert!(hold.check(&Message::new("t", "keyless")).is_some());
    }

    #[tokio::test]
    async fn two_producers_sharing_a_transport_keep_their_turns_apart() {
        let turns = Turns::default();
        let d = Destination::new("t");
        let mut a = in_order_epoch(ep(1), turns.take(&d)).await;
        a.enter(1).await;
        a.finish(&[keyed("k")], &failed());
        let other = Some(OrderEpoch {
            pipeline: 2,
            epoch: 1,
        });
        let mut b = in_order_epoch(other, turns.take(&d)).await;
        assert!(
            b.enter(1).await.is_empty(),
            "another producer's failures hold nothing here"
        );
    }
}
