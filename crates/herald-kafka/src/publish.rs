//! The send path of [`crate::KafkaTransport`].
//!
//! A batch is handed to librdkafka message by message without waiting (`send` never blocks),
//! each with a delivery opaque naming its batch and position; librdkafka's delivery callback,
//! on its polling thread, fills that position; the batch's future resolves when every
//! position is filled. No future per message, no await per message.
//!
//! At the attempt's deadline (the batch's first delivery deadline) the send purges librdkafka's
//! queue: what has not left for a broker is never sent and fails, not stored (but for a message
//! librdkafka sent once and queued again for its own retry, which that first request may have
//! stored: the guarantees say so). What is
//! already in a produce request is waited for, up to the transport's settle time, so that its
//! outcome is the broker's answer (see [`crate::KafkaConfig::settle_time`]). A send that is
//! dropped before its batch has every report (herald cut it off after the settle time too, or the
//! runtime stopped) purges the queue again on its way out (see [`Abandon`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::{Ack, BatchOutcome, Destination, EarlyAcks, Message, TransportError, Turn};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _, PurgeConfig};
use tokio::sync::Notify;

use crate::connection::{Client, Connection};
use crate::destination;
use crate::error::transport_error;

/// One batch's outcomes, filled by delivery callbacks.
///
/// A report takes one lock (`outcomes`): the slot, the count of what is missing and the count of
/// reports are one piece of state, so the polling thread pays one uncontended lock per message
/// rather than an atomic for each (this runs once per message, on the thread that also frees
/// librdkafka's messages).
pub(crate) struct BatchState {
    outcomes: std::sync::Mutex<Outcomes>,
    done: Notify,
    /// A delivery failed in a way that calls for a new producer (see `needs_new_producer`).
    pub(crate) producer_broken: AtomicBool,
    /// Where a delivery is told at once, before the batch has every report.
    early: Option<EarlyAcks>,
    /// Registered in [`InFlight`]: a report may reach it through the polling thread's cache
    /// only while it is (see [`InFlight::with`]).
    open: AtomicBool,
}

struct Outcomes {
    slots: Vec<Option<Result<Ack, TransportError>>>,
    /// Slots still empty.
    remaining: usize,
    /// Delivery reports received (each for a message handed to librdkafka).
    reports: usize,
}

impl BatchState {
    fn new(n: usize, early: Option<EarlyAcks>) -> Self {
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, || None);
        Self {
            early,
            outcomes: std::sync::Mutex::new(Outcomes {
                slots,
                remaining: n,
                reports: 0,
            }),
            done: Notify::new(),
            producer_broken: AtomicBool::new(false),
            open: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        self.outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The outcome of the message at `index`, set by herald itself (it was never handed to
    /// librdkafka).
    pub(crate) fn set(&self, index: usize, outcome: Result<Ack, TransportError>) {
        self.fill(index, outcome, false);
    }

    /// librdkafka's delivery report for the message at `index`.
    pub(crate) fn report(&self, index: usize, outcome: Result<Ack, TransportError>) {
        if let (Some(early), Ok(ack)) = (&self.early, &outcome) {
            early.ack(index, *ack);
        }
        self.fill(index, outcome, true);
    }

    fn fill(&self, index: usize, outcome: Result<Ack, TransportError>, report: bool) {
        let last = {
            let mut o = self.lock();
            o.reports += usize::from(report);
            // Out of range, or set before, only for a report that outlived its batch and found
            // its id reused (ids wrap after 2^32 batches, 2^16 on 32-bit targets): dropped,
            // never a panic in a librdkafka callback.
            match o.slots.get_mut(index) {
                Some(slot @ None) => *slot = Some(outcome),
                _ => return,
            }
            o.remaining -= 1;
            o.remaining == 0
        };
        if last {
            self.done.notify_one();
        }
    }

    /// Delivery reports received so far.
    fn reports(&self) -> usize {
        self.lock().reports
    }

    async fn wait(&self) {
        loop {
            let done = self.done.notified();
            if self.lock().remaining == 0 {
                return;
            }
            done.await;
        }
    }

    /// The outcomes, once no report is waited for any more (a report that comes later finds no
    /// slot and is dropped).
    fn take_outcomes(&self) -> BatchOutcome {
        std::mem::take(&mut self.lock().slots)
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(TransportError::transient(
                        "no delivery report for this message",
                    ))
                })
            })
            .collect()
    }
}

/// Bits of a delivery opaque that hold a message's position in its part of a batch; the rest
/// hold the part's id.
const INDEX_BITS: u32 = usize::BITS / 2;
/// Messages per part: a batch longer than this registers one id per part.
const PART: usize = 1 << INDEX_BITS;

/// Batches waiting for delivery reports, by id. A message's delivery opaque is a plain `usize`
/// (part id and position), so handing a message to librdkafka allocates nothing; the delivery
/// callback finds the batch here. A report for a batch no longer registered (its send was
/// cancelled at the attempt deadline) finds nothing and is dropped, as nobody waits for it.
#[derive(Default)]
pub(crate) struct InFlight {
    /// Part id -> (batch, position of the part's first message).
    parts: std::sync::Mutex<HashMap<usize, (Arc<BatchState>, usize)>>,
    next_id: AtomicUsize,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, (Arc<BatchState>, usize)>> {
        self.parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers `state` (one id per `PART` messages); unregistered when the guard drops.
    fn register(&self, state: &Arc<BatchState>, len: usize) -> Registered<'_> {
        let id_limit = 1usize << (usize::BITS - INDEX_BITS);
        let mut parts = self.lock();
        let ids = (0..len.div_ceil(PART).max(1))
            .map(|part| loop {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed) % id_limit;
                if let std::collections::hash_map::Entry::Vacant(v) = parts.entry(id) {
                    v.insert((state.clone(), part * PART));
                    break id;
                }
            })
            .collect();
        Registered {
            in_flight: self,
            ids,
        }
    }

    /// Runs `f` with the batch and position an opaque names, if the batch is still registered.
    ///
    /// Reports come in runs of one batch, so the batch the last report on this thread found is
    /// kept (`LAST`) and used again without taking the lock while it is still registered: its
    /// `open` flag is cleared before its registration is removed, and an id is only given again
    /// once its batch is removed, so a kept batch that is still open is the one its id names.
    /// A report that races with the removal may still reach the batch; its send has every
    /// report it waits for by then (or was dropped), so nothing reads what it sets.
    pub(crate) fn with(&self, opaque: usize, f: impl FnOnce(&BatchState, usize)) {
        let (id, offset) = (opaque >> INDEX_BITS, opaque & (PART - 1));
        let owner = std::ptr::from_ref(self) as usize;
        LAST.with_borrow_mut(|last| {
            if let Some(kept) = last {
                if kept.owner == owner && kept.id == id && kept.batch.open.load(Ordering::Acquire) {
                    f(&kept.batch, kept.base + offset);
                    return;
                }
            }
            *last = None;
            let found = self.lock().get(&id).cloned();
            if let Some((batch, base)) = found {
                f(&batch, base + offset);
                *last = Some(Kept {
                    owner,
                    id,
                    batch,
                    base,
                });
            }
        });
    }
}

/// The batch the last delivery report on a thread found (see [`InFlight::with`]). A thread
/// keeps one at most, until its next report or its end: the polling thread's ends with its
/// producer; a blocking thread that ran reports while flushing a producer being replaced keeps
/// its last batch (its emptied slots and early-ack list) until then.
struct Kept {
    /// The `InFlight` it is registered in (its address; any batch kept from an `InFlight`
    /// since dropped is closed).
    owner: usize,
    id: usize,
    batch: Arc<BatchState>,
    base: usize,
}

thread_local! {
    static LAST: std::cell::RefCell<Option<Kept>> = const { std::cell::RefCell::new(None) };
}

/// A batch's registration in `InFlight`, removed on drop (also when the send is cancelled).
struct Registered<'a> {
    in_flight: &'a InFlight,
    ids: Vec<usize>,
}

impl Registered<'_> {
    /// The delivery opaque of the message at `index` of the batch.
    fn opaque(&self, index: usize) -> usize {
        (self.ids[index / PART] << INDEX_BITS) | (index % PART)
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut parts = self.in_flight.lock();
        for id in &self.ids {
            if let Some((batch, _)) = parts.remove(id) {
                batch.open.store(false, Ordering::Release);
            }
        }
    }
}

/// Room in librdkafka's queue: senders that found it full wait here for a delivery report.
#[derive(Default)]
pub(crate) struct Room {
    /// Senders waiting for room in librdkafka's queue.
    waiting: AtomicUsize,
    space: Notify,
}

impl Room {
    async fn wait(&self) {
        /// Counts this sender among the waiting until dropped: the wait may be (a deadline, a
        /// call cut off), and a count left up would wake waiters at every delivery report.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        let room = self.space.notified();
        // Delivery reports free room and wake us; the timeout covers a report that came
        // between the failed send and this wait.
        let _woken = tokio::time::timeout(Duration::from_millis(5), room).await;
    }

    /// A delivery report freed a place in the queue.
    pub(crate) fn freed(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.space.notify_waiters();
        }
    }
}

/// The Kafka headers of `m`: its own, then its id under `id_header`, unless it already has a
/// header of that name (the user's own id stays the only one).
fn headers(m: &Message, id_header: Option<&str>) -> Option<OwnedHeaders> {
    let id = match (id_header, m.id()) {
        (Some(name), Some(id)) if !m.headers().iter().any(|h| h.name == name) => {
            Some((name, id.text()))
        }
        _ => None,
    };
    if m.headers().is_empty() && id.is_none() {
        return None;
    }
    let mut h = OwnedHeaders::new_with_capacity(m.headers().len() + usize::from(id.is_some()));
    for header in m.headers() {
        h = h.insert(Header {
            key: &header.name,
            value: Some(header.value.as_ref()),
        });
    }
    if let Some((name, text)) = &id {
        h = h.insert(Header {
            key: name,
            value: Some(text.as_bytes()),
        });
    }
    Some(h)
}

/// A message herald did not hand to librdkafka before the attempt's deadline (its queue was
/// full until then, or the call started late): not sent, so not stored.
fn not_sent_by_deadline() -> TransportError {
    TransportError::transient(
        "not sent: not handed to librdkafka before the attempt's deadline (its queue was full until then, or the attempt started too late); retried",
    )
    .with_code("NOT_SENT")
}

/// What a send does if it is dropped before its batch has every report: herald cut the attempt
/// off at the batch's first delivery deadline (the pipeline then reports those messages failed,
/// or retries them), or the runtime stopped. librdkafka would otherwise go on sending them until
/// its own `message.timeout.ms`, which starts again at every attempt: a message reported failed
/// would be stored later anyway (and twice if the user sends it again), a retried one twice.
///
/// So it purges librdkafka's queue (`rd_kafka_purge` with `RD_KAFKA_PURGE_F_QUEUE`, blocking,
/// so that it is done before the pipeline lands the attempt): every message not yet sent to a
/// broker is dropped by librdkafka, never sent, and reported `PurgeQueue` to a batch nobody
/// waits for. librdkafka's queue is one for the whole producer, so messages of other batches
/// still queued are purged too: they fail as transient (`PurgeQueue`, not stored) and herald
/// retries them, a resend, never a loss. Messages already in a produce request
/// to a broker are left alone: purging them would make librdkafka forget the answer the other
/// batches still wait for, and the broker may have stored them already. Those are the limit of
/// what a transport can do on its own (docs/guarantees.md, Kafka).
struct Abandon<'a> {
    producer: &'a Client,
    state: &'a BatchState,
    /// Messages handed to librdkafka.
    handed: usize,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        // Some message handed over has no report yet: librdkafka still holds it.
        if self.state.reports() < self.handed {
            self.producer.purge(PurgeConfig::default().queue());
        }
    }
}

/// Sends `batch` to `destination` on the connection's current producer and waits for every
/// message's delivery report. At `deadline` (if any), what librdkafka has not sent yet is purged
/// and fails; the reports of what it has sent are still waited for.
pub(crate) async fn send_batch(
    connection: &Connection,
    destination: &Destination,
    batch: &[Message],
    deadline: Option<Instant>,
    early: Option<EarlyAcks>,
) -> BatchOutcome {
    // The destination's turn first, before any other await: calls of one topic hand their
    // messages to librdkafka in the order herald started them (see
    // `Transport::keeps_order_across_calls`); the delivery reports are awaited after it.
    connection
        .shared()
        .turns
        .run(destination, batch, async |turn| {
            send_in_turn(connection, turn, destination, batch, deadline, early).await
        })
        .await
}

/// [`send_batch`] in the topic's turn.
async fn send_in_turn(
    connection: &Connection,
    turn: &mut Turn,
    destination: &Destination,
    batch: &[Message],
    deadline: Option<Instant>,
    early: Option<EarlyAcks>,
) -> BatchOutcome {
    let shared = connection.shared();
    let topic = match destination::topic(destination) {
        Ok(topic) => topic,
        Err(e) => return vec![Err(e); batch.len()],
    };
    connection.check_durability_once(topic);
    let id_header = connection.id_header.as_deref();
    let state = Arc::new(BatchState::new(batch.len(), early));
    let registered = shared.in_flight.register(&state, batch.len());
    let (producer, generation) = connection.producer_for(topic);
    let mut abandon = Abandon {
        producer: &producer,
        state: &state,
        handed: 0,
    };
    // herald's per-key hold, before sending: a message whose key had a transient failure at
    // once (librdkafka refused it when handed over), or in an earlier call on a producer since
    // replaced, is not handed over, so that it does not go ahead of that message's retry.
    // Failures reported later, by delivery reports, are held by the pipeline itself
    // (`KeyHold::apply` on the batch's outcomes).
    let mut hold = turn.enter(generation).await;
    let at_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(at_deadline);
    // Nothing is handed over past the deadline (see `Transport::send_batch_until`): the turn
    // and the calls before it may have taken the time. The loop below awaits only for room in
    // librdkafka's queue, and looks at the clock again after that wait.
    let mut past_deadline = herald_core::deadline_passed(deadline);
    for (index, m) in batch.iter().enumerate() {
        if past_deadline {
            let e = not_sent_by_deadline();
            // Told to the turn now: the next call on this producer does not wait for this one.
            turn.failed(m, &e);
            state.set(index, Err(e));
            continue;
        }
        if let Some(held) = hold.check(m) {
            state.set(index, Err(held));
            continue;
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, registered.opaque(index))
                .payload(m.payload().as_ref());
        if let Some(key) = m.key() {
            record = record.key(key.as_ref());
        }
        if let Some(h) = headers(m, id_header) {
            record = record.headers(h);
        }
        loop {
            match producer.send(record) {
                Ok(()) => {
                    abandon.handed += 1;
                    break;
                }
                // librdkafka's queue is full: backpressure, wait for room (the pipeline's
                // attempt timeout bounds the wait), never drop.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    shared.metrics.queue_full.increment(1);
                    tokio::select! {
                        biased;
                        () = &mut at_deadline => past_deadline = true,
                        () = shared.room.wait() => past_deadline = herald_core::deadline_passed(deadline),
                    }
                    if past_deadline {
                        let e = not_sent_by_deadline();
                        turn.failed(m, &e);
                        state.set(index, Err(e));
                        break;
                    }
                }
                Err((e, _record)) => {
                    let error = transport_error(&e);
                    hold.failed(m, &error);
                    turn.failed(m, &error);
                    state.set(index, Err(error));
                    break;
                }
            }
        }
    }
    turn.handed_over();
    if !past_deadline {
        tokio::select! {
            () = state.wait() => {}
            () = &mut at_deadline => past_deadline = true,
        }
    }
    if past_deadline && state.reports() < abandon.handed {
        // What librdkafka has not sent yet is dropped and reported `PurgeQueue` (not stored);
        // what is with a broker gets its answer, which herald waits for (settle time).
        tracing::debug!(
            transport = "kafka",
            topic = %topic,
            messages = batch.len(),
            "the attempt's deadline passed: what librdkafka had not sent yet is purged"
        );
        producer.purge(PurgeConfig::default().queue());
    }
    state.wait().await;
    drop(abandon); // every message has its report: nothing to purge
    drop(registered);
    let fatal = producer.client().fatal_error();
    if state.producer_broken.load(Ordering::Acquire) || fatal.is_some() {
        // The failed messages are transient (herald retries them on the new producer), unless
        // the fatal error is one a new producer would hit again (`fail_for_good`).
        connection.rebuild(generation);
    }
    let mut outcomes = state.take_outcomes();
    if let Some((code, text)) = fatal {
        fail_for_good(&mut outcomes, code, &text);
    }
    outcomes
}

/// A fatal error that a new producer would hit again (the cluster refuses idempotent writes
/// to this principal: `CLUSTER_AUTHORIZATION_FAILED`; the broker lacks a feature): the
/// messages it failed are handed back now with its code, rather than retried on new producers
/// until the delivery timeout. The producer is still rebuilt, so that a fix (a granted ACL)
/// takes effect for the messages sent after.
fn fail_for_good(outcomes: &mut BatchOutcome, code: RDKafkaErrorCode, text: &str) {
    if crate::error::class_of(code) != herald_core::ErrorClass::Permanent {
        return;
    }
    let e = TransportError::permanent(format!(
        "the Kafka producer hit a fatal error that a new producer would hit again: {code:?}: {text}"
    ))
    .with_code(format!("{code:?}"));
    // Only the failures the fatal error caused (librdkafka's `_FATAL`, and the queue it
    // purged): a message that failed for a reason of its own keeps it, and one in doubt (timed
    // out in flight: the broker may have it) stays transient.
    for o in outcomes.iter_mut() {
        if o.as_ref()
            .is_err_and(|f| matches!(f.code(), Some("Fatal" | "PurgeQueue")))
        {
            *o = Err(e.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::MessageId;

    /// A wait for room dropped before it ended (a deadline won, or the call was cut off) is
    /// no longer counted as waiting. It stayed counted, and every delivery report after woke
    /// the waiters for nothing.
    #[tokio::test]
    async fn a_dropped_wait_for_room_is_not_counted_waiting() {
        let room = Room::default();
        let mut wait = Box::pin(room.wait());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_pending());
        assert_eq!(room.waiting.load(Ordering::Acquire), 1);
        drop(wait);
        assert_eq!(room.waiting.load(Ordering::Acquire), 0);
        room.wait().await;
        assert_eq!(room.waiting.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_id_header_follows_the_message_s_own_headers_unless_it_has_one() {
        use rdkafka::message::Headers as _;
        let id = MessageId::from_u128(7);
        let m = Message::new("t", "p")
            .with_header("trace", "t1")
            .with_id(id);
        let h = headers(&m, Some("herald-message-id")).expect("two headers");
        assert_eq!(h.count(), 2);
        assert_eq!(h.get(1).key, "herald-message-id");
        assert_eq!(h.get(1).value, Some(id.to_string().as_bytes()));
        // Its own header of that name stays the only one.
        let own = m.clone().with_header("herald-message-id", "mine");
        let h = headers(&own, Some("herald-message-id")).expect("its headers");
        assert_eq!(h.count(), 2);
        assert_eq!(h.get(1).value, Some(&b"mine"[..]));
        // No header name, or no id (a transport driven without a producer): no id header.
        assert!(headers(&Message::new("t", "p").with_id(id), None).is_none());
        assert!(headers(&Message::new("t", "p"), Some("herald-message-id")).is_none());
    }

    #[test]
    fn delivery_opaques_find_their_batch_and_position_until_unregistered() {
        let in_flight = InFlight::default();
        let a = Arc::new(BatchState::new(3, None));
        let b = Arc::new(BatchState::new(2, None));
        let ra = in_flight.register(&a, 3);
        // An id still in use is skipped, even after the counter wraps onto it.
        in_flight.next_id.store(ra.ids[0], Ordering::Relaxed);
        let rb = in_flight.register(&b, 2);
        assert_ne!(ra.ids, rb.ids);
        let ok = || Ok(Ack::default());
        let filled =
            |s: &BatchState| -> Vec<bool> { s.lock().slots.iter().map(Option::is_some).collect() };
        // Runs of one batch and changes between batches: found through the thread's kept
        // batch and through the registry alike.
        for (registered, index) in [(&ra, 2), (&rb, 1), (&ra, 0)] {
            in_flight.with(registered.opaque(index), |batch, i| {
                assert_eq!(i, index);
                batch.report(i, ok());
            });
        }
        assert_eq!(filled(&a), [true, false, true]);
        assert_eq!(filled(&b), [false, true]);
        assert_eq!(a.reports(), 2);
        // Once unregistered, a late report reaches nothing, though `a` was the last found.
        let late = ra.opaque(1);
        let reused = ra.ids[0];
        drop(ra);
        in_flight.with(late, |_, _| {
            panic!("a report reached an unregistered batch")
        });
        assert_eq!(filled(&a), [true, false, true]);
        assert_eq!(in_flight.lock().len(), 1);
        // Its id given again: a report naming it reaches the new batch, never the old one.
        let c = Arc::new(BatchState::new(2, None));
        in_flight.next_id.store(reused, Ordering::Relaxed);
        let rc = in_flight.register(&c, 2);
        assert_eq!(rc.ids, [reused]);
        in_flight.with(late, |batch, i| batch.report(i, ok()));
        assert_eq!(filled(&c), [false, true]);
        assert_eq!(filled(&a), [true, false, true]);
        drop(rc);
        drop(rb);
        assert!(in_flight.lock().is_empty());
    }
}
