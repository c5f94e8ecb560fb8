//! The pipeline's state: one mutex around the buffer, the parked retries and the totals, and
//! the two doors every message passes: acceptance ([`Shared::admit`]) and its end
//! ([`Shared::finish`], then [`Shared::complete`] once the lock is released).
//!
//! Invariants (docs/architecture.md names them):
//! - Every accepted message is in exactly one place: the accumulator, the parked retries, or an
//!   in-flight batch (one answered ahead of an earlier batch of its lane included: it waits in
//!   the lane, still counted in flight); and it leaves through exactly one
//!   `Completion::complete`. Drop guards on the state and on in-flight batches complete
//!   whatever is left with `Closed`, so even a runtime shutting down cannot drop a message
//!   silently.
//! - `buffered_*` counts messages from acceptance to completion; it is what backpressure bounds.
//! - `unsettled` counts an accepted message before the lock that accepted it is released, and
//!   stops counting it only after its completion ran: `flush` and `close` rely on it.
//! - The mutex is never held across an `.await`, and completions run after it is released.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use herald_batch::Accumulator;

use super::contain::ContainedPolicy;
use herald_retry::{CircuitBreaker, CircuitState, RetryBudget, RetryPolicy};
use tokio::sync::Notify;

use super::completion::{
    Completion, Delivery, Group, Outcome, TaggedRun, Unclaimed, UnclaimedHook,
};
use super::dispatch::Flight;
use super::health::HealthMonitor;
use super::order::{drain_early, Lanes, OrderingMode};
use crate::error::{FailureReason, SendError, TransportError};
use crate::health::HealthPolicy;
use crate::message::{Destination, Message, MessageId};
use crate::metrics::Metrics;
use crate::store::{Store, StoreToken};
use crate::transport::Transport;

/// The pipeline's clock: Tokio's, so that tests on a paused runtime run backoffs and timeouts in
/// virtual time. Outside such tests it is `std::time::Instant::now()`.
pub(crate) fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Settings fixed at build time.
pub(crate) struct Config {
    pub(crate) max_buffered_messages: usize,
    pub(crate) max_buffered_bytes: usize,
    pub(crate) max_message_bytes: usize,
    pub(crate) max_in_flight: usize,
    /// Batches of one destination in flight at once under strict ordering: the configured
    /// pipeline depth where the transport keeps order across calls, else 1.
    pub(crate) pipeline_depth: usize,
    pub(crate) delivery_timeout: Duration,
    pub(crate) ordering: OrderingMode,
    pub(crate) retry: Arc<dyn RetryPolicy>,
    pub(crate) health: HealthPolicy,
    /// The `producer` metric label, if set.
    pub(crate) name: Option<String>,
}

/// Bookkeeping for one message besides the message itself.
///
/// Kept small (it is moved several times per message on the hot path): the acceptance time is
/// derived from the deadline, and what only a failure needs ([`Past`]) is boxed.
pub(crate) struct Meta {
    pub(crate) done: Completion,
    pub(crate) deadline: Instant,
    pub(crate) size: usize,
    pub(crate) attempts: u32,
    pub(crate) previous_delay: Option<Duration>,
    pub(crate) past: Option<Box<Past>>,
    /// Its token in the producer's [`Store`], if it has one: settled once the message ends
    /// (unless it ends as `Closed`: then it stays stored for the next producer).
    pub(crate) stored: Option<StoreToken>,
}

pub(crate) type Entry = (Message, Meta);

/// What a message's earlier attempts left behind, kept only once an attempt failed.
#[derive(Default)]
pub(crate) struct Past {
    /// The last attempt's error, for a delivery timeout to report.
    pub(crate) last_error: Option<TransportError>,
    /// The broker's acknowledgement of a copy the per-key hold sent again (see
    /// [`crate::SendError::stored_copy`]): the first such copy, which is stored, possibly
    /// ahead of an earlier message of its key.
    pub(crate) stored_copy: Option<crate::Ack>,
}

impl Meta {
    /// The last attempt's error, if one failed.
    pub(crate) fn last_error(&self) -> Option<&TransportError> {
        self.past.as_ref()?.last_error.as_ref()
    }

    /// Records the last attempt's error.
    pub(crate) fn set_last_error(&mut self, error: TransportError) {
        self.past.get_or_insert_with(Box::default).last_error = Some(error);
    }

    /// Records that the broker acknowledged a copy the per-key hold sends again; the first
    /// one is kept.
    pub(crate) fn stored_a_copy(&mut self, ack: crate::Ack) {
        let past = self.past.get_or_insert_with(Box::default);
        past.stored_copy.get_or_insert(ack);
    }

    /// The acknowledgement of a stored copy, if the per-key hold sent this message again after
    /// one (see [`Meta::stored_a_copy`]).
    pub(crate) fn stored_copy(&self) -> Option<&crate::Ack> {
        self.past.as_ref()?.stored_copy.as_ref()
    }
}

/// The retries of one batch, waiting for their backoff and then for one retry-budget token:
/// the group goes back to the queue whole (strict ordering never splits it), as one retry
/// request.
pub(crate) struct Parked {
    pub(crate) ready_at: Instant,
    pub(crate) seq: u64,
    pub(crate) destination: Destination,
    pub(crate) entries: Vec<Entry>,
    /// Whether the budget has held this group back already (counted once).
    pub(crate) denied: bool,
}

impl PartialEq for Parked {
    fn eq(&self, other: &Self) -> bool {
        (self.ready_at, self.seq) == (other.ready_at, other.seq)
    }
}
impl Eq for Parked {}
impl PartialOrd for Parked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Parked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.ready_at, self.seq).cmp(&(other.ready_at, other.seq))
    }
}

/// Running totals, readable through `Producer::stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages accepted into the buffer.
    pub accepted: u64,
    /// Messages acknowledged by the broker. Counted when the outcomes of the message's batch
    /// land (its call returned, or was cut off at its deadline): a message answered early (the
    /// transport told herald of its acknowledgement before the call returned, see
    /// `Transport::send_batch_answering`) is counted a moment after its caller learnt it, so a
    /// caller reading this right after its send resolved may not see its message yet. A
    /// message's fate is what its receipt says.
    pub delivered: u64,
    /// Messages handed back with an error (after acceptance or before it).
    pub failed: u64,
    /// Message retries scheduled.
    pub retries: u64,
    /// Batches handed to the transport.
    pub batches: u64,
}

pub(crate) struct State {
    pub(crate) acc: Accumulator<Destination, Entry>,
    pub(crate) parked: BinaryHeap<Reverse<Parked>>,
    pub(crate) parked_seq: u64,
    /// Strict ordering's lanes: each destination's batches out, in sending order.
    pub(crate) lanes: Lanes<Flight>,
    pub(crate) buffered_messages: usize,
    pub(crate) buffered_bytes: usize,
    pub(crate) in_flight: usize,
    /// No new messages; drain what is there.
    pub(crate) closing: bool,
    /// `flush` calls waiting: linger is skipped while any is.
    pub(crate) flushers: usize,
    pub(crate) budget: RetryBudget,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) rng: fastrand::Rng,
    /// No queued or parked entry expires before this (it may be early, never late).
    pub(crate) next_expiry: Option<Instant>,
    pub(crate) totals: Totals,
    /// A close ran out of time: failures end as `Closed` instead of being retried.
    pub(crate) abandoned: bool,
    /// The circuit state health last saw, to tell the health task at once when it changes.
    pub(crate) circuit_seen: CircuitState,
    /// Numbers health evaluations in the order they read this state.
    pub(crate) health_ticket: u64,
    /// Of `totals.failed`, the messages refused before acceptance (full buffer, too large,
    /// closed): backpressure and caller mistakes, left out of the health error rate.
    pub(crate) refused: u64,
    /// Where leftovers go when the state itself is dropped.
    unclaimed: Arc<Unclaimed>,
    /// Gives accepted messages their ids.
    pub(crate) ids: IdClock,
    /// Messages stored (with a [`Store`]) and not yet admitted into the buffer or ended: the
    /// dispatcher does not stop while there are any.
    pub(crate) staged: usize,
    /// The admitter is still sending what the store held from an earlier run.
    pub(crate) recovering: bool,
}

/// The time part of message ids: Unix milliseconds, read once at build and then derived from
/// the pipeline's clock (no system call per message; ids follow a paused test clock too).
pub(crate) struct IdClock {
    unix_millis_at_start: u64,
    start: Instant,
    /// The millisecond (counted from `start`) of the last `now` asked about: from `.0` up to
    /// (not including) `.1`, and its Unix milliseconds. A `now` inside it needs two comparisons
    /// instead of a subtraction and a division: at a message per admission (`enqueue`) the
    /// conversion runs about once a millisecond, not once a message.
    window: (Instant, Instant, u64),
    /// The last `now` asked about.
    last: Instant,
}

impl IdClock {
    fn new(now: Instant) -> Self {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let unix_millis_at_start = u64::try_from(unix.as_millis()).unwrap_or(u64::MAX);
        Self {
            unix_millis_at_start,
            start: now,
            // The start's millisecond, as `millisecond_of(now)` gives it.
            window: (now, now + Duration::from_millis(1), unix_millis_at_start),
            last: now,
        }
    }

    /// The millisecond of `now` counted from `start` (the first before `start`, which only a
    /// clock going back could give), as in [`IdClock::window`].
    fn millisecond_of(&self, now: Instant) -> (Instant, Instant, u64) {
        let since = now.saturating_duration_since(self.start);
        let ms = since
            .as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(since.subsec_millis()));
        let from = self.start + Duration::from_millis(ms);
        (
            from,
            from + Duration::from_millis(1),
            self.unix_millis_at_start.saturating_add(ms),
        )
    }

    #[inline]
    pub(crate) fn next(&mut self, now: Instant, rng: &mut fastrand::Rng) -> MessageId {
        // The messages of one admission share one `now`: one comparison for all but the first.
        if now != self.last {
            let (from, until, _) = self.window;
            if now < from || now >= until {
                self.window = self.millisecond_of(now);
            }
            self.last = now;
        }
        MessageId::v7(self.window.2, rng.u128(..))
    }
}

impl State {
    /// Brings the next expiry check forward to `deadline` if that is earlier.
    pub(crate) fn expires_by(&mut self, deadline: Option<Instant>) {
        self.next_expiry = match (self.next_expiry, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Whatever is still queued or parked when the state goes away (a runtime shutting down with the
/// dispatcher in it) ends as `Closed`, handed back to its caller.
impl Drop for State {
    fn drop(&mut self) {
        let left: Vec<Entry> = self
            .acc
            .drain_all()
            .into_iter()
            .map(|(_, e)| e)
            .chain(self.parked.drain().flat_map(|Reverse(p)| p.entries))
            .chain(
                drain_early(&mut self.lanes)
                    .into_iter()
                    .flat_map(|landed| landed.flight.into_entries()),
            )
            .collect();
        if left.is_empty() {
            return;
        }
        for (msg, meta) in left {
            let e = SendError::new(msg, FailureReason::Closed, meta.attempts)
                .with_stored_copy(meta.stored_copy().copied());
            // A stored message stays in the store for the next producer.
            let e = if meta.stored.is_some() { e.kept() } else { e };
            meta.done.complete(Err(e), &self.unclaimed);
        }
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the dispatcher: a new linger deadline, a full batch, a flush, a close, a freed slot.
    pub(crate) wake: Notify,
    /// Wakes senders waiting for buffer space.
    pub(crate) space: Notify,
    /// Wakes `flush`/`close` when the last accepted message has ended.
    pub(crate) idle: Notify,
    /// Messages accepted whose completion has not run yet. Unlike `State::buffered_messages`
    /// (freed under the lock, for backpressure), this drops only after the completion ran, so
    /// `flush` and `close` return when every caller has really been told.
    pub(crate) unsettled: AtomicUsize,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) unclaimed: Arc<Unclaimed>,
    pub(crate) health: HealthMonitor,
    /// The dispatcher has finished: everything accepted has ended and the transport is closed.
    pub(crate) stopped: AtomicBool,
    /// The dispatcher task ended without stopping normally (dropped by its runtime, or
    /// panicked): health says so, and liveness fails.
    pub(crate) dispatcher_gone: AtomicBool,
    /// The dispatcher task has ended, either way (set, then `exit` notified, as its last act):
    /// what every `close` waits for, however many run at once.
    pub(crate) exited: AtomicBool,
    pub(crate) exit: tokio::sync::Notify,
    /// Where accepted messages are kept until they end, if the producer has a store.
    pub(crate) store: Option<Arc<dyn Store>>,
    /// The way in through that store.
    pub(crate) stage: Option<super::stage::Stage>,
}

/// A message that could not be accepted, with its completion, to be retried or answered.
/// Returned by value (not boxed) on purpose: a full buffer in `send_all` meets it once per wait,
/// and it goes straight back into the next try.
pub(crate) struct Refused {
    pub(crate) msg: Message,
    pub(crate) done: Completion,
    pub(crate) reason: FailureReason,
    pub(crate) stored: Option<StoreToken>,
}

/// What [`Shared::admit`] did with the messages it was given.
pub(crate) struct Admission {
    /// Messages accepted.
    pub(crate) accepted: usize,
    /// The message that found the buffer full: admission stopped there. It may try again once
    /// space frees (`Shared::space`).
    pub(crate) full: Option<Refused>,
    /// Messages refused for good (too large, or the producer is closing), in input order.
    pub(crate) refused: Vec<Refused>,
}

/// Completions to run once the lock is released.
/// Latencies from acceptance of messages ending at one moment, worked out from their delivery
/// deadlines: messages accepted together share their deadline, so a run of them ending together
/// needs one clock subtraction, not one each.
#[derive(Default)]
pub(crate) struct Latency {
    /// The last (deadline, now, latency) worked out.
    last: Option<(Instant, Instant, Duration)>,
    /// Samples of the last latency taken with [`Latency::sample`] and not yet recorded: a run
    /// of them is recorded at once ([`Latency::flush`]), one bucket search and one add for a
    /// batch delivered together instead of one each.
    pending: usize,
}

impl Drop for Latency {
    fn drop(&mut self) {
        // Every sample taken is recorded before anyone hears of its message.
        if !std::thread::panicking() {
            debug_assert_eq!(self.pending, 0, "latency samples taken and never recorded");
        }
    }
}

impl Latency {
    /// As [`Latency::of`], counting the latency as a sample for `histogram`: recorded with
    /// the run it belongs to, at the latest by [`Latency::flush`].
    pub(crate) fn sample(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        now: Instant,
        histogram: &metrics::Histogram,
    ) -> Duration {
        if let Some((d, n, latency)) = self.last {
            if d == deadline && n == now {
                self.pending += 1;
                return latency;
            }
        }
        self.flush(histogram);
        self.pending = 1;
        self.of(deadline, timeout, now)
    }

    /// Records the samples not yet recorded.
    pub(crate) fn flush(&mut self, histogram: &metrics::Histogram) {
        if let (n @ 1.., Some((_, _, latency))) = (self.pending, self.last) {
            histogram.record_many(latency.as_secs_f64(), n);
        }
        self.pending = 0;
    }

    /// The latency of a message with delivery deadline `deadline` (accepted `timeout` before it)
    /// ending at `now`.
    pub(crate) fn of(&mut self, deadline: Instant, timeout: Duration, now: Instant) -> Duration {
        match self.last {
            Some((d, n, latency)) if d == deadline && n == now => latency,
            _ => {
                let latency = now.saturating_duration_since(deadline - timeout);
                self.last = Some((deadline, now, latency));
                latency
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Finished {
    items: Vec<(Completion, Outcome)>,
    /// Deliveries of `send_all` messages, as runs of one group: counted, not answered one by one.
    group_delivered: Vec<(Arc<Group>, u64)>,
    delivered: u64,
    /// Entries ended into this `Finished`.
    settled: usize,
    latency: Latency,
    /// Store tokens of the entries delivered: settled after the completions ran.
    stored: Vec<StoreToken>,
}

impl Finished {
    /// Makes room for `n` more completions to run.
    pub(crate) fn reserve(&mut self, n: usize) {
        self.items.reserve(n);
    }
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        batching: super::builder::Batching,
        budget: RetryBudget,
        breaker: CircuitBreaker,
        transport: Arc<dyn Transport>,
        on_unclaimed: Option<UnclaimedHook>,
        stage: Option<super::stage::Stage>,
    ) -> Self {
        let metrics = Metrics::new(
            transport.name(),
            config.name.as_deref(),
            config.max_buffered_messages,
            config.max_buffered_bytes,
        );
        let unclaimed = Arc::new(Unclaimed::new(
            on_unclaimed,
            metrics.unclaimed.clone(),
            metrics.panic_counter("unclaimed_hook"),
        ));
        // A user's policy is asked behind a guard against its panics; herald's own cannot panic.
        // The counter is made either way, so that its series is there at zero for every
        // producer, as before.
        let batch_panics = metrics.panic_counter("batch_policy");
        let batching = if batching.own {
            batching.policy
        } else {
            Box::new(ContainedPolicy::new(
                batching.policy,
                Box::new(move || batch_panics.increment(1)),
            ))
        };
        let acc = Accumulator::with_boxed_policy(
            batching,
            config
                .ordering
                .in_flight_per_destination(config.pipeline_depth),
        );
        Self {
            state: Mutex::new(State {
                acc,
                parked: BinaryHeap::new(),
                parked_seq: 0,
                lanes: Lanes::default(),
                buffered_messages: 0,
                buffered_bytes: 0,
                in_flight: 0,
                closing: false,
                flushers: 0,
                budget,
                breaker,
                rng: fastrand::Rng::new(),
                next_expiry: None,
                totals: Totals::default(),
                abandoned: false,
                circuit_seen: CircuitState::Closed,
                health_ticket: 0,
                refused: 0,
                unclaimed: unclaimed.clone(),
                ids: IdClock::new(clock_now()),
                staged: 0,
                recovering: false,
            }),
            wake: Notify::new(),
            space: Notify::new(),
            idle: Notify::new(),
            unsettled: AtomicUsize::new(0),
            transport,
            config,
            metrics,
            unclaimed,
            health: HealthMonitor::new(),
            stopped: AtomicBool::new(false),
            dispatcher_gone: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            exit: tokio::sync::Notify::new(),
            store: stage.as_ref().map(super::stage::Stage::store),
            stage,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops accepting messages: the dispatcher drains what was accepted, then closes the
    /// transport; health turns to closed at once.
    pub(crate) fn start_closing(&self) {
        // The store's door first: it waits for a submission under way, which counts its
        // messages as staged before closing is set, so that the dispatcher, seeing closing,
        // never finds nothing to do while an accepted message is still on its way in.
        if let Some(stage) = &self.stage {
            stage.close();
        }
        self.lock().closing = true;
        self.wake.notify_one();
        self.health.kick.notify_one();
        // Senders waiting for space try again, and are refused as `Closed` at once instead of
        // waiting for space that a stalled broker may never free.
        self.space.notify_waiters();
    }

    /// The store's half of the accept protocol: `n` messages are in the producer's store, so
    /// they are accepted now (counted in `unsettled`, under the lock, and in the totals) and
    /// staged until the admitter hands them to [`admit`](Self::admit) with `staged`, which
    /// takes them into the buffer without counting them again. The metric counts them once
    /// they are `durable` (here if they are already, else by [`Shared::count_durable`]): the
    /// totals take back those the store then fails to make durable, a counter cannot.
    pub(crate) fn accept_stored(&self, n: usize, durable: bool) {
        {
            let mut st = self.lock();
            st.staged += n;
            st.totals.accepted += n as u64;
            self.unsettled.fetch_add(n, Ordering::Relaxed);
        }
        if durable {
            self.count_durable(n);
        }
    }

    /// Counts in the accepted metric `n` stored messages that became durable.
    pub(crate) fn count_durable(&self, n: usize) {
        self.metrics.accepted.increment(n as u64);
    }

    /// The accept protocol, the one door into the pipeline: takes `msgs` in order under one
    /// hold of the lock until one finds the buffer full (handed back in
    /// [`Admission::full`], and nothing after it is taken from `msgs`), refusing those that are
    /// too large or come after a close ([`Admission::refused`], not yet counted: the caller
    /// answers and counts them). `counted` runs with the number accepted while the lock is
    /// still held, and `unsettled` grows by it there too: no accepted message can end, and no
    /// `flush` can return, before they are counted. Wakes the dispatcher if a batch became
    /// ready or a linger deadline was set.
    ///
    /// With `staged` (the time they were accepted), the messages come from the producer's
    /// store: they were accepted (and counted in `unsettled` and `State::staged`) when stored,
    /// so a close does not refuse them (only one that gave up waiting does), `State::staged`
    /// drops by each one taken, and their delivery deadline runs from their acceptance, not
    /// from now.
    pub(crate) fn admit(
        &self,
        msgs: impl Iterator<Item = (Message, Completion, Option<StoreToken>)>,
        staged: Option<Instant>,
        counted: impl FnOnce(usize),
    ) -> Admission {
        let mut admission = Admission {
            accepted: 0,
            full: None,
            refused: Vec::new(),
        };
        let mut wake = false;
        {
            let mut st = self.lock();
            let now = clock_now();
            for (msg, done, stored) in msgs {
                match self.push(&mut st, msg, done, stored, staged, now) {
                    Ok(w) => {
                        admission.accepted += 1;
                        wake |= w;
                    }
                    Err(refused) if matches!(refused.reason, FailureReason::BufferFull) => {
                        admission.full = Some(refused);
                        break;
                    }
                    Err(refused) => admission.refused.push(refused),
                }
            }
            counted(admission.accepted);
            if staged.is_some() {
                st.staged -= admission.accepted + admission.refused.len();
                // The dispatcher may be waiting for the last staged message to stop.
                wake |= st.staged == 0 && st.closing;
            } else {
                self.unsettled
                    .fetch_add(admission.accepted, Ordering::Relaxed);
            }
        }
        if staged.is_none() {
            // Staged messages were counted when stored.
            self.metrics.accepted.increment(admission.accepted as u64);
        }
        if wake {
            self.wake.notify_one();
        }
        admission
    }

    /// [`Shared::admit`] of one message not from the store, without an iterator to move it
    /// through (once per message on `enqueue`'s path): accepted, or handed back refused.
    #[allow(clippy::result_large_err)] // see `Refused`
    #[inline(always)]
    pub(crate) fn admit_one(&self, msg: Message, done: Completion) -> Result<(), Refused> {
        let wake = {
            let mut st = self.lock();
            let wake = self.push(&mut st, msg, done, None, None, clock_now())?;
            self.unsettled.fetch_add(1, Ordering::Relaxed);
            wake
        };
        self.metrics.accepted.increment(1);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Accepts one message into the buffer, or refuses it (full, too large, closed). Returns
    /// whether the dispatcher needs waking. Only [`Shared::admit`] and [`Shared::admit_one`]
    /// call it: they keep the protocol around it.
    #[allow(clippy::result_large_err)] // see `Refused`
    #[inline(always)]
    fn push(
        &self,
        st: &mut State,
        msg: Message,
        done: Completion,
        stored: Option<StoreToken>,
        staged: Option<Instant>,
        now: Instant,
    ) -> Result<bool, Refused> {
        let size = msg.size();
        #[allow(clippy::result_large_err)] // see `Refused`
        let refuse = |msg, done, reason| {
            Err(Refused {
                msg,
                done,
                reason,
                stored,
            })
        };
        if (st.closing && staged.is_none()) || st.abandoned {
            return refuse(msg, done, FailureReason::Closed);
        }
        if size > self.config.max_message_bytes {
            return refuse(
                msg,
                done,
                FailureReason::TooLarge {
                    size,
                    max: self.config.max_message_bytes,
                },
            );
        }
        if st.buffered_messages >= self.config.max_buffered_messages
            || st.buffered_bytes + size > self.config.max_buffered_bytes
        {
            return refuse(msg, done, FailureReason::BufferFull);
        }
        let mut msg = msg;
        let (ids, rng) = (&mut st.ids, &mut st.rng);
        msg.id_or_insert_with(|| ids.next(now, rng));
        st.buffered_messages += 1;
        st.buffered_bytes += size;
        if staged.is_none() {
            // Staged messages were counted when stored (`Shared::accept_stored`).
            st.totals.accepted += 1;
        }
        // From acceptance: a stored message may have waited for room since.
        let deadline = staged.unwrap_or(now).min(now) + self.config.delivery_timeout;
        // A stored message's deadline may come before those queued already (a new message's
        // never does): the dispatcher, which sleeps until the earliest it knows, is woken.
        let sooner = staged.is_some() && st.next_expiry.is_some_and(|e| deadline < e);
        if staged.is_some() {
            st.expires_by(Some(deadline));
        } else if st.next_expiry.is_none() {
            st.next_expiry = Some(deadline);
        }
        let slot = st.acc.slot(msg.destination());
        let meta = Meta {
            done,
            deadline,
            size,
            attempts: 0,
            previous_delay: None,
            past: None,
            stored,
        };
        Ok(st.acc.push_back_at(slot, (msg, meta), size, now) || sooner)
    }

    /// Counts a refusal (a message never accepted) in totals and metrics.
    pub(crate) fn count_refused(&self, reason: &FailureReason) {
        self.count_failed(reason, false);
    }

    /// Counts a failed message in totals and metrics: one `accepted` counts in the producer's
    /// error rate (its health), a refusal does not.
    pub(crate) fn count_failed(&self, reason: &FailureReason, accepted: bool) {
        let mut st = self.lock();
        st.totals.failed += 1;
        if !accepted {
            st.refused += 1;
        }
        drop(st);
        self.metrics.failed(reason, 1);
    }

    /// Ends `entry` with `outcome`: frees its buffer space, counts it, queues its completion.
    pub(crate) fn finish(
        &self,
        st: &mut State,
        fin: &mut Finished,
        entry: Entry,
        outcome: Result<crate::Ack, FailureReason>,
        now: Instant,
    ) {
        let (mut msg, mut meta) = entry;
        let reason = match outcome {
            Ok(ack) => return self.deliver(st, fin, &mut msg, &mut meta, ack, now),
            // Its caller heard it delivered when the broker acknowledged it (early); what came
            // after (its batch cut off at the deadline, say) does not change that, and it is
            // not sent again.
            Err(_) if matches!(meta.done, Completion::Answered) => {
                return self.deliver(st, fin, &mut msg, &mut meta, crate::Ack::default(), now)
            }
            Err(reason) => reason,
        };
        st.buffered_messages -= 1;
        st.buffered_bytes -= meta.size;
        fin.settled += 1;
        st.totals.failed += 1;
        self.metrics.failed(&reason, 1);
        // A failed message leaves the store once its `SendError` is dropped (handed over:
        // written elsewhere, say); one closed unsent stays stored for the next producer on the
        // store.
        let closed = matches!(reason, FailureReason::Closed);
        let kept = self.store.is_some() && meta.stored.is_some() && closed;
        let stored_copy = meta.stored_copy().copied();
        if stored_copy.is_some() {
            self.metrics.failed_stored_copy.increment(1);
        }
        let mut e = SendError::new(msg, reason, meta.attempts).with_stored_copy(stored_copy);
        if let (Some(store), Some(token), false) = (&self.store, meta.stored, closed) {
            e = e.settling(store.clone(), token);
        }
        if kept {
            e = e.kept();
        }
        fin.items.push((meta.done, Err(e)));
    }

    /// Ends a delivered entry where it lies: counts it, records its latency, queues its
    /// completion (taken out of `meta`, which is left answered). Its message and bookkeeping
    /// stay where they are, to be dropped with their batch: the common end of every message,
    /// done without moving the entry. One answered early is only counted (its caller was told).
    pub(crate) fn deliver(
        &self,
        st: &mut State,
        fin: &mut Finished,
        msg: &mut Message,
        meta: &mut Meta,
        ack: crate::Ack,
        now: Instant,
    ) {
        st.buffered_messages -= 1;
        st.buffered_bytes -= meta.size;
        fin.settled += 1;
        crate::trace::delivered(msg, &ack, meta.attempts);
        st.totals.delivered += 1;
        fin.delivered += 1;
        // A delivered message leaves the store once its caller is told.
        fin.stored.extend(meta.stored.take());
        let done = std::mem::replace(&mut meta.done, Completion::Answered);
        if matches!(done, Completion::Answered) {
            return;
        }
        let latency = fin.latency.sample(
            meta.deadline,
            self.config.delivery_timeout,
            now,
            &self.metrics.latency,
        );
        match done {
            Completion::Group(g) => match fin.group_delivered.last_mut() {
                Some((last, n)) if Arc::ptr_eq(last, &g) => *n += 1,
                _ => fin.group_delivered.push((g, 1)),
            },
            done => fin.items.push((
                done,
                Ok(Delivery {
                    ack,
                    attempts: meta.attempts,
                    latency,
                }),
            )),
        }
    }

    /// Runs completions and wakes whoever waits for space or for an empty buffer.
    pub(crate) fn complete(&self, mut fin: Finished) {
        // Counted before anyone is told: a caller who waits for an outcome and then scrapes
        // (or reads the metrics) must see it counted.
        fin.latency.flush(&self.metrics.latency);
        if fin.delivered > 0 {
            self.metrics.delivered.increment(fin.delivered);
        }
        for (group, n) in fin.group_delivered {
            group.delivered(n);
        }
        let mut run = TaggedRun::new(&self.unclaimed, fin.items.len());
        for (done, outcome) in fin.items {
            // Others at once, without a detour through the run.
            if matches!(done, Completion::Tagged(..)) {
                run.complete(done, outcome);
            } else {
                done.complete(outcome, &self.unclaimed);
            }
        }
        run.flush();
        // After the completions: a message leaves the store once its fate is handed over.
        if let (Some(store), false) = (&self.store, fin.stored.is_empty()) {
            // Contained (user code, with a store of one's own): the counts below must fall.
            if let Err(panic) = super::contain::contain(|| store.settle(&fin.stored)) {
                self.metrics.panic_counter("store").increment(1);
                tracing::error!(
                    producer = self.config.name.as_deref(),
                    transport = self.transport.name(),
                    messages = fin.stored.len(),
                    panic,
                    "the store panicked settling ended messages: it may keep them, and the \
                     next producer on it send them again"
                );
            }
        }
        if fin.settled > 0 {
            self.space.notify_waiters();
            if self.unsettled.fetch_sub(fin.settled, Ordering::AcqRel) == fin.settled {
                self.idle.notify_waiters();
            }
        }
    }

    /// Tells the caller of an entry in flight that the broker acknowledged it, before its batch
    /// lands (see [`crate::Transport::send_batch_answering`]): its completion runs now and
    /// becomes [`Completion::Answered`], and [`Shared::finish`] only counts it when it lands.
    /// Runs outside the lock. A second acknowledgement of the entry is ignored.
    pub(crate) fn answer_early(
        &self,
        meta: &mut Meta,
        ack: crate::Ack,
        now: Instant,
        latencies: &mut Latency,
        run: &mut TaggedRun<'_>,
    ) {
        let done = std::mem::replace(&mut meta.done, Completion::Answered);
        if matches!(done, Completion::Answered) {
            return;
        }
        let histogram = &self.metrics.latency;
        let latency = latencies.sample(meta.deadline, self.config.delivery_timeout, now, histogram);
        if !run.joins(&done) {
            // Told at once, or the run hands over its earlier fates first: every sample taken
            // so far is counted before (the caller flushes the rest before the run's end).
            latencies.flush(histogram);
        }
        let delivery = Delivery {
            ack,
            attempts: meta.attempts,
            latency,
        };
        run.complete(done, Ok(delivery));
    }

    pub(crate) fn deadline_reason(&self, meta: &mut Meta) -> FailureReason {
        FailureReason::DeliveryTimeout {
            timeout: self.config.delivery_timeout,
            last: meta.past.as_mut().and_then(|p| p.last_error.take()),
        }
    }

    /// Ends an entry whose delivery deadline has passed.
    pub(crate) fn time_out(&self, st: &mut State, fin: &mut Finished, entry: Entry, now: Instant) {
        let (msg, mut meta) = entry;
        let reason = self.deadline_reason(&mut meta);
        self.finish(st, fin, (msg, meta), Err(reason), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Unix milliseconds of a v7 id: its top 48 bits.
    fn millis(id: MessageId) -> u64 {
        u64::try_from(id.as_u128() >> 80).expect("48 bits")
    }

    #[test]
    fn ids_carry_the_milliseconds_of_the_now_they_were_made_at() {
        let start = Instant::now();
        let mut clock = IdClock::new(start);
        let mut rng = fastrand::Rng::with_seed(7);
        let at_start = millis(clock.next(start, &mut rng));
        let again = clock.next(start, &mut rng);
        assert_eq!(millis(again), at_start, "one `now`, one millisecond");
        let later = start + Duration::from_millis(1_500);
        assert_eq!(millis(clock.next(later, &mut rng)), at_start + 1_500);
        assert_eq!(millis(clock.next(start, &mut rng)), at_start, "asked again");
        assert_ne!(again, clock.next(start, &mut rng), "ids stay unique");
        // Within one millisecond and across its edges, forwards and back.
        let us = Duration::from_micros;
        for (at, want) in [
            (us(999), 0),
            (us(1_000), 1),
            (us(1_999), 1),
            (us(2_000), 2),
            (us(1_000), 1),
            (us(999), 0),
            (us(3_000_001), 3_000),
        ] {
            assert_eq!(
                millis(clock.next(start + at, &mut rng)),
                at_start + want,
                "{at:?} after the start"
            );
        }
        // A `now` before the start (a clock that went back) is the start's millisecond.
        if let Some(before) = start.checked_sub(us(1_500)) {
            assert_eq!(millis(clock.next(before, &mut rng)), at_start);
            assert_eq!(millis(clock.next(start + us(10), &mut rng)), at_start);
        }
    }

    #[test]
    fn a_latency_is_worked_out_again_for_another_deadline_or_another_now() {
        let (start, timeout) = (Instant::now(), Duration::from_secs(10));
        let mut latency = Latency::default();
        let deadline = start + timeout;
        let ms = Duration::from_millis;
        assert_eq!(latency.of(deadline, timeout, start + ms(5)), ms(5));
        assert_eq!(latency.of(deadline, timeout, start + ms(5)), ms(5), "kept");
        assert_eq!(
            latency.of(deadline, timeout, start + ms(8)),
            ms(8),
            "a later now"
        );
        assert_eq!(
            latency.of(deadline + ms(2), timeout, start + ms(8)),
            ms(6),
            "accepted later"
        );
    }
}
