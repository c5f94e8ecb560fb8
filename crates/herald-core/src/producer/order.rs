//! The ordering rule, in one place: what strict ordering asks of the accumulator, and where.
//!
//! Strict ordering keeps the messages of one destination and key in acceptance order, retries
//! included. It takes these gates, each applied here and nowhere else:
//! - **batches in flight per destination**: one, or up to the pipeline depth where the transport
//!   keeps order across calls ([`OrderingMode::in_flight_per_destination`], given to the
//!   accumulator when the producer is built). The batches of a destination form a [`Lane`]:
//!   they are started one after another ([`OrderingMode::start`]) and landed in the order they
//!   were sent ([`OrderingMode::landed`]), whatever order their answers come in;
//! - **a destination with retries waiting is held**: nothing of it goes out until they are
//!   queued again ([`OrderingMode::park`], when a batch lands with retries; the retries of
//!   later batches already in flight join the same group, behind);
//! - **retries go back in front, whole, and release the hold** ([`OrderingMode::requeue`]) once
//!   every batch sent before them has landed ([`OrderingMode::may_requeue`]), or the hold is
//!   released when they end without being queued again (expired or abandoned:
//!   [`OrderingMode::retries_ended`]).
//!
//! The per-key hold ([`crate::KeyHold`]) keeps a message delivered after a transient failure of
//! its key from staying ahead of that message's retry ([`OrderingMode::hold_keys`]): within a
//! batch, and across the batches of a lane, for as long as the lane has batches out or retries
//! parked.
//!
//! Relaxed ordering takes none of them: batches of a destination go out concurrently and
//! retries rejoin the back of the queue.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Waker;
use std::time::Instant;

use herald_batch::Accumulator;

use tokio::sync::oneshot;

use super::state::Entry;
use crate::error::TransportError;
use crate::key_hold::KeyHold;
use crate::message::{Destination, Message};
use crate::transport::{Ack, OrderEpoch};

/// How strictly the producer keeps order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingMode {
    /// Messages with the same destination and key reach the broker in the order they were
    /// accepted, retries included. Per destination, one batch is in flight at a time (several,
    /// up to the pipeline depth, where the transport keeps order across calls) and a retried
    /// message goes out before anything accepted after it.
    #[default]
    Strict,
    /// Batches of one destination go out concurrently (up to the producer's max in-flight) and
    /// retried messages rejoin the back of the queue: more throughput under faults, no order
    /// guarantee.
    Relaxed,
}

type Queue = Accumulator<Destination, Entry>;

/// A batch's outcomes, landed but not yet acted on.
pub(crate) struct Landed<F> {
    pub(crate) flight: F,
    pub(crate) outcomes: Vec<Result<Ack, TransportError>>,
}

/// One destination's batches under strict ordering, from the first sent to the last landed:
/// their sequence, the answers that came ahead of an earlier batch's, and the keys held by
/// transient failures while any of them, or their retries, are out.
pub(crate) struct Lane<F> {
    /// The sequence number of the next batch sent.
    next_seq: u64,
    /// The sequence number of the next batch to land.
    next_land: u64,
    /// Batches answered ahead of an earlier one, waiting for it, by sequence number.
    early: BTreeMap<u64, Landed<F>>,
    /// Keys failed transiently since the lane was last idle, each with its error.
    hold: KeyHold,
    /// The first poll of the batch sent last: the next batch's call starts after it.
    started: Option<oneshot::Receiver<()>>,
    /// A group of this destination's retries is parked.
    parked: bool,
    /// Batches sent before this sequence number were in flight when a failure of the lane was
    /// counted against the circuit breaker: they fail of the same cause and do not count again.
    failure_shadow: Option<u64>,
    /// The lane's order epoch, given to each call (see [`crate::Turns`]): a new one, never used
    /// before by any lane, each time the lane's retries go back into the queue or end, so that
    /// a transport forgets the keys that failed before.
    epoch: u64,
    /// Which of the lane's batches may answer their messages early.
    gate: Arc<AnswerGate>,
}

impl<F> Lane<F> {
    fn new(epoch: u64) -> Self {
        Self {
            next_seq: 0,
            next_land: 0,
            early: BTreeMap::new(),
            hold: KeyHold::default(),
            started: None,
            parked: false,
            failure_shadow: None,
            epoch,
            gate: Arc::default(),
        }
    }

    /// Nothing sent and not landed, nothing parked: the lane may be forgotten.
    fn idle(&self) -> bool {
        self.next_land == self.next_seq && !self.parked
    }
}

/// Pipelines made in this process, for their ids (see [`crate::Turns`]).
static PIPELINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Every destination's lane (strict ordering only; empty under relaxed).
pub(crate) struct Lanes<F> {
    /// This pipeline's id: a transport shared by two producers keeps their turns apart.
    pipeline: u64,
    map: HashMap<Destination, Lane<F>>,
    /// The next order epoch: epochs are never reused, across lanes and their re-creations.
    next_epoch: u64,
}

impl<F> Default for Lanes<F> {
    fn default() -> Self {
        Self {
            pipeline: PIPELINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            map: HashMap::new(),
            next_epoch: 1,
        }
    }
}

impl<F> Lanes<F> {
    fn epoch(&mut self) -> u64 {
        let e = self.next_epoch;
        self.next_epoch += 1;
        e
    }
}

/// Where a batch stands in its lane: its place, the start it waits for, the start it gives.
pub(crate) struct Turn {
    pub(crate) seq: u64,
    /// The lane's order epoch under strict ordering (see [`crate::Turns`]); `None` under relaxed.
    pub(crate) epoch: Option<OrderEpoch>,
    /// Fired by the first poll of the batch sent before this one (or dropped with it).
    pub(crate) after: Option<oneshot::Receiver<()>>,
    /// Fired by this batch's first poll.
    pub(crate) started: Option<oneshot::Sender<()>>,
    /// Strict ordering's say on which early acknowledgements may be answered (`None` under
    /// relaxed ordering: all of them).
    pub(crate) gate: Option<Arc<AnswerGate>>,
}

/// Strict ordering's rule for answering a message before its batch lands (an early
/// acknowledgement, see [`crate::Transport::send_batch_answering`]): an answer is final, so a
/// message is answered early only when herald can never have to send it again for its key's
/// order, that is, when no earlier message of its key can still fail:
/// - every earlier batch of the lane is *clear*: it landed, or every message of it was answered
///   early ([`AnswerGate::clear`]);
/// - the lane holds no key and has no retries parked (else the gate is shut for the lane's life,
///   which ends when it goes idle);
/// - every earlier message of its batch with its key was answered early (the batch's own
///   scan, in `dispatch.rs`).
///
/// Messages the gate holds back are answered when it opens, or when their batch lands.
#[derive(Default)]
pub(crate) struct AnswerGate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    /// Every batch below this sequence number is clear.
    clear_below: u64,
    /// Batches clear above `clear_below`, answered early ahead of an earlier one.
    cleared: BTreeSet<u64>,
    /// A key is held or retries are parked: no early answer until the lane is idle.
    shut: bool,
    /// Batches waiting for the gate to open.
    waiters: Vec<Waker>,
}

/// What the gate says to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GateSays {
    /// Answer what may be answered.
    Open,
    /// Not yet: the batch's task is woken when that changes.
    Wait,
    /// Not before the batch lands.
    Shut,
}

impl AnswerGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether batch `seq` may answer early now; if it must wait, `waker` is woken when that
    /// may have changed.
    pub(crate) fn ask(&self, seq: u64, waker: &Waker) -> GateSays {
        let mut st = self.lock();
        if st.shut {
            return GateSays::Shut;
        }
        if st.clear_below >= seq {
            return GateSays::Open;
        }
        if !st.waiters.iter().any(|w| w.will_wake(waker)) {
            st.waiters.push(waker.clone());
        }
        GateSays::Wait
    }

    /// Batch `seq` is clear (every message answered early, or the batch landed); with `shut`,
    /// the lane now holds a key or has retries parked.
    pub(crate) fn clear(&self, seq: u64, shut: bool) {
        let waiters = {
            let mut st = self.lock();
            let before = (st.clear_below, st.shut);
            st.shut |= shut;
            if seq >= st.clear_below {
                st.cleared.insert(seq);
            }
            loop {
                let next = st.clear_below;
                if !st.cleared.remove(&next) {
                    break;
                }
                st.clear_below += 1;
            }
            if (st.clear_below, st.shut) == before {
                Vec::new()
            } else {
                std::mem::take(&mut st.waiters)
            }
        };
        for w in waiters {
            w.wake();
        }
    }
}

impl OrderingMode {
    /// The accumulator's limit of batches in flight per destination: `depth` under strict
    /// ordering (1 unless the transport keeps order across calls), none under relaxed.
    pub(crate) fn in_flight_per_destination(self, depth: usize) -> Option<usize> {
        match self {
            OrderingMode::Strict => Some(depth.max(1)),
            OrderingMode::Relaxed => None,
        }
    }

    /// A batch of `destination` is about to be sent: its turn in the lane.
    pub(crate) fn start<F>(self, lanes: &mut Lanes<F>, destination: &Destination) -> Turn {
        if self == OrderingMode::Relaxed {
            return Turn {
                seq: 0,
                epoch: None,
                after: None,
                started: None,
                gate: None,
            };
        }
        let pipeline = lanes.pipeline;
        let lane = lane(lanes, destination);
        let seq = lane.next_seq;
        lane.next_seq += 1;
        let (tx, rx) = oneshot::channel();
        Turn {
            seq,
            epoch: Some(OrderEpoch {
                pipeline,
                epoch: lane.epoch,
            }),
            after: lane.started.replace(rx),
            started: Some(tx),
            gate: Some(lane.gate.clone()),
        }
    }

    /// The batches `seqs` of `destination` were acted on (after [`OrderingMode::hold_keys`] and
    /// parking): they are clear for the gate of early answers, which shuts if the lane now
    /// holds a key or has retries parked.
    pub(crate) fn cleared<F>(
        self,
        lanes: &mut Lanes<F>,
        destination: &Destination,
        seqs: impl IntoIterator<Item = u64>,
    ) {
        if self == OrderingMode::Relaxed {
            return;
        }
        let Some(lane) = lanes.map.get(destination) else {
            return;
        };
        let shut = !lane.hold.is_empty() || lane.parked;
        for seq in seqs {
            lane.gate.clear(seq, shut);
        }
    }

    /// The batch `seq` of `destination` was answered: the batches to act on now, in the order
    /// they were sent (none while an earlier batch of the lane is still out).
    pub(crate) fn landed<F>(
        self,
        lanes: &mut Lanes<F>,
        destination: &Destination,
        seq: u64,
        landed: Landed<F>,
    ) -> Vec<Landed<F>> {
        if self == OrderingMode::Relaxed {
            return vec![landed];
        }
        let lane = lane(lanes, destination);
        if seq != lane.next_land {
            lane.early.insert(seq, landed);
            return Vec::new();
        }
        let mut ready = vec![landed];
        lane.next_land += 1;
        while let Some(next) = lane.early.remove(&lane.next_land) {
            ready.push(next);
            lane.next_land += 1;
        }
        ready
    }

    /// The per-key hold ([`KeyHold`]) on a batch's outcomes, landed in sending order: under
    /// strict ordering, a message delivered after a transient failure of its key (in this batch,
    /// or in an earlier batch of the lane still out or with retries parked) is sent again
    /// behind that message's retry. Relaxed ordering promises no order, so it keeps the
    /// delivery. Returns the indexes of the messages delivered and held all the same (see
    /// [`Transport::delivered_but_held`](crate::Transport::delivered_but_held)), each with the
    /// acknowledgement of the copy the broker took.
    pub(crate) fn hold_keys<F>(
        self,
        lanes: &mut Lanes<F>,
        destination: &Destination,
        batch: &[Message],
        outcomes: &mut [Result<Ack, TransportError>],
    ) -> Vec<(usize, Ack)> {
        let mut delivered_but_held = Vec::new();
        if self == OrderingMode::Strict {
            lane(lanes, destination)
                .hold
                .carry(batch, outcomes, |i, ack| delivered_but_held.push((i, ack)));
        }
        delivered_but_held
    }

    /// Whether a batch of `destination`, sent as `seq`, that failed whole (every message
    /// transiently) counts against the circuit breaker. Under strict ordering, the batches of a
    /// lane that were in flight when an earlier one's failure was counted fail of the same cause
    /// (a lost connection fails them all): only that first one counts, so that the pipeline
    /// depth does not open the circuit sooner than one batch at a time would.
    pub(crate) fn counts_as_failure<F>(
        self,
        lanes: &mut Lanes<F>,
        destination: &Destination,
        seq: u64,
    ) -> bool {
        if self == OrderingMode::Relaxed {
            return true;
        }
        let lane = lane(lanes, destination);
        if lane.failure_shadow.is_some_and(|until| seq < until) {
            return false;
        }
        lane.failure_shadow = Some(lane.next_seq);
        true
    }

    /// A batch of `destination` landed with `entries` to retry after `ready_at`. Returns them
    /// when they are to be parked as a new group (the destination is then held under strict
    /// ordering); `None` when they joined, behind, the destination's group already parked
    /// (`join` does that).
    pub(crate) fn park<F>(
        self,
        acc: &mut Queue,
        lanes: &mut Lanes<F>,
        destination: &Destination,
        entries: Vec<Entry>,
        join: impl FnOnce(Vec<Entry>),
    ) -> Option<Vec<Entry>> {
        if self == OrderingMode::Relaxed {
            return Some(entries);
        }
        let lane = lane(lanes, destination);
        if lane.parked {
            join(entries);
            return None;
        }
        lane.parked = true;
        acc.hold(destination);
        Some(entries)
    }

    /// Whether the parked retries of `destination` may go back into its queue: under strict
    /// ordering, only once every batch sent before them has landed (a later batch's retries
    /// join them until then).
    pub(crate) fn may_requeue<F>(self, lanes: &Lanes<F>, destination: &Destination) -> bool {
        self == OrderingMode::Relaxed
            || lanes
                .map
                .get(destination)
                .is_none_or(|l| l.next_land == l.next_seq)
    }

    /// Parked retries of `destination` go back into its queue.
    pub(crate) fn requeue<F>(
        self,
        acc: &mut Queue,
        lanes: &mut Lanes<F>,
        destination: &Destination,
        entries: Vec<Entry>,
        now: Instant,
    ) {
        let sized = entries.into_iter().map(|e| {
            let size = e.1.size;
            (e, size)
        });
        match self {
            OrderingMode::Strict => {
                acc.push_front(destination, sized.collect::<Vec<_>>(), now);
                self.retries_ended(acc, lanes, destination);
            }
            OrderingMode::Relaxed => {
                for (e, size) in sized {
                    acc.push_back(destination, e, size, now);
                }
            }
        }
    }

    /// Parked retries of `destination` left the parked set (queued again, expired, or
    /// abandoned by a close): the destination's hold is released. With nothing of the lane out
    /// any more, a new order epoch begins: transports forget the keys that failed before. While
    /// batches sent before are still out (the retries expired meanwhile), the epoch stays, so
    /// that what those batches fail keeps holding its keys.
    pub(crate) fn retries_ended<F>(
        self,
        acc: &mut Queue,
        lanes: &mut Lanes<F>,
        destination: &Destination,
    ) {
        if self == OrderingMode::Strict {
            acc.release(destination);
            let epoch = lanes.epoch();
            let lane = lane(lanes, destination);
            lane.parked = false;
            if lane.next_land == lane.next_seq {
                lane.epoch = epoch;
            }
            self.settle(lanes, destination);
        }
    }

    /// After a landing or the end of parked retries: a lane with nothing out and nothing parked
    /// holds no key any more and is forgotten.
    pub(crate) fn settle<F>(self, lanes: &mut Lanes<F>, destination: &Destination) {
        if lanes.map.get(destination).is_some_and(Lane::idle) {
            lanes.map.remove(destination);
        }
    }
}

fn lane<'a, F>(lanes: &'a mut Lanes<F>, destination: &Destination) -> &'a mut Lane<F> {
    if !lanes.map.contains_key(destination) {
        let epoch = lanes.epoch();
        lanes.map.insert(destination.clone(), Lane::new(epoch));
    }
    lanes
        .map
        .get_mut(destination)
        .expect("the lane was just made if it was missing")
}

/// What is left in the lanes when the pipeline's state goes away: the batches answered ahead of
/// an earlier one.
pub(crate) fn drain_early<F>(lanes: &mut Lanes<F>) -> Vec<Landed<F>> {
    lanes
        .map
        .drain()
        .flat_map(|(_, lane)| lane.early.into_values())
        .collect()
}
