//! The producer's moving parts: the shared state behind one mutex, the dispatcher task, and the
//! processing of a batch's outcomes.
//!
//! Invariants (see docs/architecture.md):
//! - Every accepted message is in exactly one place: the accumulator, the parked retries, or an
//!   in-flight batch; and it leaves through exactly one `Completion::complete`. Drop guards on the
//!   state and on in-flight batches complete whatever is left with `Closed`, so even a runtime
//!   shutting down cannot drop a message silently.
//! - `buffered_*` counts messages from acceptance to completion; it is what backpressure bounds.
//! - The mutex is never held across an `.await`, and completions run after it is released.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use herald_batch::Accumulator;
use herald_retry::{
    CircuitBreaker, CircuitState, ErrorClass, GiveUpReason, RetryBudget, RetryContext,
    RetryDecision, RetryPolicy,
};
use tokio::sync::{watch, Notify};

use super::completion::{Completion, DeadLetterHook, Delivery, Group, Outcome, Unclaimed};
use super::OrderingMode;
use crate::error::{FailureReason, SendError, TransportError};
use crate::health::{
    ErrorWindow, Health, HealthIssue, HealthPolicy, HealthStatus, TransportHealth,
};
use crate::message::{Destination, Message};
use crate::metrics::Metrics;
use crate::transport::{BatchOutcome, Transport};

/// The pipeline's clock: Tokio's, so that tests on a paused runtime run backoffs and timeouts in
/// virtual time. Outside such tests it is `std::time::Instant::now()`.
pub(crate) fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The code of the error herald gives the messages of an attempt it cut off at their deadline.
pub(crate) const ATTEMPT_TIMEOUT: &str = "herald_attempt_timeout";

/// Settings fixed at build time.
pub(crate) struct Config {
    pub(crate) max_buffered_messages: usize,
    pub(crate) max_buffered_bytes: usize,
    pub(crate) max_message_bytes: usize,
    pub(crate) max_in_flight: usize,
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
/// derived from the deadline, and the last error, needed only after a failure, is boxed.
pub(crate) struct Meta {
    pub(crate) done: Completion,
    pub(crate) deadline: Instant,
    pub(crate) size: usize,
    pub(crate) attempts: u32,
    pub(crate) previous_delay: Option<Duration>,
    pub(crate) last_error: Option<Box<TransportError>>,
}

pub(crate) type Entry = (Message, Meta);

/// The retries of one batch, waiting for their backoff and then for one retry-budget token:
/// the group goes back to the queue whole (strict ordering never splits it), as one retry
/// request.
struct Parked {
    ready_at: Instant,
    seq: u64,
    destination: Destination,
    entries: Vec<Entry>,
    /// Whether the budget has held this group back already (counted once).
    denied: bool,
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
    /// Messages acknowledged by the broker.
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
    parked: BinaryHeap<Reverse<Parked>>,
    parked_seq: u64,
    pub(crate) buffered_messages: usize,
    pub(crate) buffered_bytes: usize,
    pub(crate) in_flight: usize,
    /// No new messages; drain what is there.
    pub(crate) closing: bool,
    /// `flush` calls waiting: linger is skipped while any is.
    pub(crate) flushers: usize,
    budget: RetryBudget,
    pub(crate) breaker: CircuitBreaker,
    rng: fastrand::Rng,
    /// No queued or parked entry expires before this (it may be early, never late).
    next_expiry: Option<Instant>,
    pub(crate) totals: Totals,
    /// A close ran out of time: failures end as `Closed` instead of being retried.
    pub(crate) abandoned: bool,
    /// The circuit state health last saw, to tell the health task at once when it changes.
    circuit_seen: CircuitState,
    /// Numbers health evaluations in the order they read this state.
    health_ticket: u64,
    /// Of `totals.failed`, the messages refused before acceptance (full buffer, too large,
    /// closed): backpressure and caller mistakes, left out of the health error rate.
    refused: u64,
    /// Where leftovers go when the state itself is dropped.
    unclaimed: Arc<Unclaimed>,
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
            .collect();
        if left.is_empty() {
            return;
        }
        for (msg, meta) in left {
            let attempts = meta.attempts;
            meta.done.complete(
                Err(SendError::new(msg, FailureReason::Closed, attempts)),
                &self.unclaimed,
            );
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
}

/// Health as last evaluated, published to subscribers.
pub(crate) struct HealthMonitor {
    window: Mutex<ErrorWindow>,
    pub(crate) tx: watch::Sender<Health>,
    /// Wakes the health task early: the circuit changed state, or the producer is closing.
    pub(crate) kick: Arc<Notify>,
    /// The ticket of the evaluation last published (see `Shared::evaluate_health`).
    published: AtomicU64,
}

/// A message that could not be accepted, with its completion, to be retried or answered.
/// Returned by value (not boxed) on purpose: a full buffer in `send_all` meets it once per wait,
/// and it goes straight back into the next try.
pub(crate) struct Refused {
    pub(crate) msg: Message,
    pub(crate) done: Completion,
    pub(crate) reason: FailureReason,
}

/// Completions to run once the lock is released.
#[derive(Default)]
pub(crate) struct Finished {
    items: Vec<(Completion, Outcome)>,
    /// Deliveries of `send_all` messages, as runs of one group: counted, not answered one by one.
    group_delivered: Vec<(Arc<Group>, u64)>,
    delivered: u64,
    /// Entries ended into this `Finished`.
    settled: usize,
    /// The last (deadline, latency) computed: messages accepted together share their deadline,
    /// so a batch needs few clock subtractions.
    latency: Option<(Instant, Duration)>,
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        acc: Accumulator<Destination, Entry>,
        budget: RetryBudget,
        breaker: CircuitBreaker,
        transport: Arc<dyn Transport>,
        dead_letter: Option<DeadLetterHook>,
    ) -> Self {
        let metrics = Metrics::new(
            transport.name(),
            config.name.as_deref(),
            config.max_buffered_messages,
            config.max_buffered_bytes,
        );
        let unclaimed = Arc::new(Unclaimed::new(dead_letter, metrics.unclaimed.clone()));
        Self {
            state: Mutex::new(State {
                acc,
                parked: BinaryHeap::new(),
                parked_seq: 0,
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
            }),
            wake: Notify::new(),
            space: Notify::new(),
            idle: Notify::new(),
            unsettled: AtomicUsize::new(0),
            transport,
            config,
            metrics,
            unclaimed,
            health: HealthMonitor {
                window: Mutex::new(ErrorWindow::starting(clock_now())),
                tx: watch::Sender::new(Health::default()),
                kick: Arc::new(Notify::new()),
                published: AtomicU64::new(0),
            },
            stopped: AtomicBool::new(false),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts one message into the buffer, or refuses it (full, too large, closed). Returns
    /// whether the dispatcher needs waking. The caller adds accepted messages to `unsettled`
    /// before it releases the lock (per message or per chunk), so no completion can run first.
    #[allow(clippy::result_large_err)] // see `Refused`
    pub(crate) fn push(
        &self,
        st: &mut State,
        msg: Message,
        done: Completion,
        now: Instant,
    ) -> Result<bool, Refused> {
        let size = msg.size();
        #[allow(clippy::result_large_err)] // see `Refused`
        let refuse = |msg, done, reason| Err(Refused { msg, done, reason });
        if st.closing {
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
        st.buffered_messages += 1;
        st.buffered_bytes += size;
        st.totals.accepted += 1;
        let deadline = now + self.config.delivery_timeout;
        if st.next_expiry.is_none() {
            st.next_expiry = Some(deadline);
        }
        let slot = st.acc.slot(msg.destination());
        let meta = Meta {
            done,
            deadline,
            size,
            attempts: 0,
            previous_delay: None,
            last_error: None,
        };
        Ok(st.acc.push_back_at(slot, (msg, meta), size, now))
    }

    /// Evaluates the producer's health now, sets its gauges and publishes it. Subscribers are
    /// woken only when the status or the set of issues changes, not when a count in one does.
    ///
    /// Each evaluation takes a ticket with its snapshot of the state; one that read the state
    /// earlier than the last published never publishes (a stale "healthy" read before a close
    /// must not overwrite the final "closed").
    ///
    /// `publish`: false for an evaluation on demand ([`crate::Producer::health`]), which
    /// neither takes the watch channel's lock (a caller may hold a `borrow()` of it) nor moves
    /// the gauges; the health task and the dispatcher's last word publish.
    pub(crate) fn evaluate_health(&self, now: Instant, publish: bool) -> Health {
        let (ticket, circuit, retry_at, messages, bytes, totals, refused, closing) = {
            let mut st = self.lock();
            st.health_ticket += 1;
            (
                st.health_ticket,
                st.breaker.state(),
                st.breaker.retry_at(),
                st.buffered_messages,
                st.buffered_bytes,
                st.totals,
                st.refused,
                st.closing,
            )
        };
        let policy = &self.config.health;
        let mut issues = Vec::new();
        if closing {
            issues.push(HealthIssue::Closed);
        }
        let open_past = circuit == CircuitState::Open && retry_at.is_some_and(|t| t <= now);
        let circuit = effective_circuit(circuit, retry_at, now);
        match circuit {
            // Open past its `open_for` (see `effective_circuit`): with messages waiting, the next
            // batch probes; with none, nothing is held back and nothing is known against the
            // broker, so an idle producer is not kept degraded until it sends again.
            CircuitState::HalfOpen if open_past && messages == 0 => {}
            CircuitState::Open => issues.push(HealthIssue::CircuitOpen),
            CircuitState::HalfOpen => issues.push(HealthIssue::CircuitHalfOpen),
            CircuitState::Closed => {}
        }
        let transport = self.transport.health();
        let up = !matches!(transport, TransportHealth::Down(_));
        match transport {
            TransportHealth::Down(why) => issues.push(HealthIssue::TransportDown(why)),
            TransportHealth::Blocked(why) => issues.push(HealthIssue::BrokerBlocked(why)),
            TransportHealth::Up => {}
        }
        let (max_messages, max_bytes) = (
            self.config.max_buffered_messages,
            self.config.max_buffered_bytes,
        );
        let high = |used: usize, max: usize| used as f64 > policy.buffer_high_water * max as f64;
        if high(messages, max_messages) || high(bytes, max_bytes) {
            issues.push(HealthIssue::BufferHighWater {
                messages,
                max_messages,
                bytes,
                max_bytes,
            });
        }
        let (failed, ended) = self
            .health
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(
                now,
                totals.delivered,
                totals.failed - refused,
                policy.error_window,
            );
        if ended > 0 && ended >= policy.min_messages {
            let rate = failed as f64 / ended as f64;
            let status = if rate >= policy.unhealthy_error_rate {
                HealthStatus::Unhealthy
            } else if rate >= policy.degraded_error_rate {
                HealthStatus::Degraded
            } else {
                HealthStatus::Healthy
            };
            if status != HealthStatus::Healthy {
                issues.push(HealthIssue::ErrorRate {
                    failed,
                    ended,
                    window: policy.error_window,
                    status,
                });
            }
        }
        let health = Health::from_issues(issues);
        if !publish {
            return health;
        }
        let stopped = self.stopped.load(Ordering::Acquire);
        self.health.tx.send_if_modified(|seen| {
            // Under the channel's lock: tickets are compared and published one at a time.
            if ticket < self.health.published.load(Ordering::Relaxed) {
                return false;
            }
            self.health.published.store(ticket, Ordering::Relaxed);
            // A producer that has finished closing reports "closed" to its watchers, but the
            // gauge goes back to 0: its series outlives it in the recorder, and an alert on a
            // producer closed on purpose would fire for the rest of the process's life.
            let gauge = if stopped {
                0.0
            } else {
                health.status.as_gauge()
            };
            self.metrics.health.set(gauge);
            self.metrics
                .transport_up
                .set(if up || stopped { 1.0 } else { 0.0 });
            self.metrics
                .circuit
                .set(if stopped { 0.0 } else { circuit.as_gauge() });
            let changed = seen.status != health.status
                || seen.issues.len() != health.issues.len()
                || seen
                    .issues
                    .iter()
                    .zip(&health.issues)
                    .any(|(a, b)| a.code() != b.code());
            *seen = health.clone();
            changed
        });
        health
    }

    /// Tells the health task when the circuit breaker changed state since it last looked.
    fn note_circuit(&self, st: &mut State) {
        let now = st.breaker.state();
        if now != st.circuit_seen {
            st.circuit_seen = now;
            self.health.kick.notify_one();
        }
    }

    /// Counts a refusal in totals and metrics.
    pub(crate) fn count_refused(&self, reason: &FailureReason) {
        let mut st = self.lock();
        st.totals.failed += 1;
        st.refused += 1;
        drop(st);
        self.metrics.failed(reason, 1);
    }

    /// Ends `entry` with `outcome`: frees its buffer space, counts it, queues its completion.
    fn finish(
        &self,
        st: &mut State,
        fin: &mut Finished,
        entry: Entry,
        outcome: Result<crate::Ack, FailureReason>,
        now: Instant,
    ) {
        let (msg, meta) = entry;
        st.buffered_messages -= 1;
        st.buffered_bytes -= meta.size;
        fin.settled += 1;
        match outcome {
            Ok(ack) => {
                st.totals.delivered += 1;
                fin.delivered += 1;
                let latency = match fin.latency {
                    Some((deadline, latency)) if deadline == meta.deadline => latency,
                    _ => {
                        let accepted_at = meta.deadline - self.config.delivery_timeout;
                        let latency = now.saturating_duration_since(accepted_at);
                        fin.latency = Some((meta.deadline, latency));
                        latency
                    }
                };
                self.metrics.latency.record(latency.as_secs_f64());
                match meta.done {
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
            Err(reason) => {
                st.totals.failed += 1;
                self.metrics.failed(&reason, 1);
                let e = SendError::new(msg, reason, meta.attempts);
                fin.items.push((meta.done, Err(e)));
            }
        }
    }

    /// Runs completions and wakes whoever waits for space or for an empty buffer.
    pub(crate) fn complete(&self, fin: Finished) {
        for (group, n) in fin.group_delivered {
            group.delivered(n);
        }
        for (done, outcome) in fin.items {
            done.complete(outcome, &self.unclaimed);
        }
        self.metrics.delivered.increment(fin.delivered);
        if fin.settled > 0 {
            self.space.notify_waiters();
            if self.unsettled.fetch_sub(fin.settled, Ordering::AcqRel) == fin.settled {
                self.idle.notify_waiters();
            }
        }
    }

    fn deadline_reason(&self, meta: &mut Meta) -> FailureReason {
        FailureReason::DeliveryTimeout {
            timeout: self.config.delivery_timeout,
            last: meta.last_error.take().map(|e| *e),
        }
    }

    /// Ends an entry whose delivery deadline has passed.
    fn time_out(&self, st: &mut State, fin: &mut Finished, entry: Entry, now: Instant) {
        let (msg, mut meta) = entry;
        let reason = self.deadline_reason(&mut meta);
        self.finish(st, fin, (msg, meta), Err(reason), now);
    }

    /// Fails every queued or parked entry past its deadline; recomputes `next_expiry`.
    fn expire(&self, st: &mut State, fin: &mut Finished, now: Instant) {
        if st.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        let expired = st.acc.remove_where(|(_, meta)| meta.deadline <= now);
        for (_, entry) in expired {
            self.time_out(st, fin, entry, now);
        }
        for Reverse(mut p) in std::mem::take(&mut st.parked).into_vec() {
            let (gone, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut p.entries)
                .into_iter()
                .partition(|(_, m)| m.deadline <= now);
            p.entries = kept;
            for entry in gone {
                self.time_out(st, fin, entry, now);
            }
            if p.entries.is_empty() {
                if self.config.ordering == OrderingMode::Strict {
                    st.acc.release(&p.destination);
                }
            } else {
                st.parked.push(Reverse(p));
            }
        }
        // The oldest remaining deadline: queues are in acceptance order but for retries, so scan.
        let queued = st.acc.iter().map(|(_, (_, m))| m.deadline);
        let parked = st
            .parked
            .iter()
            .flat_map(|Reverse(p)| p.entries.iter().map(|(_, m)| m.deadline));
        st.next_expiry = queued.chain(parked).min();
    }

    /// Fails everything queued or parked with `Closed` (a close whose deadline passed). Batches in
    /// flight are left to land.
    pub(crate) fn abandon(&self, st: &mut State, fin: &mut Finished) {
        st.abandoned = true;
        let now = clock_now();
        for (_, entry) in st.acc.drain_all() {
            self.finish(st, fin, entry, Err(FailureReason::Closed), now);
        }
        for Reverse(p) in std::mem::take(&mut st.parked) {
            if self.config.ordering == OrderingMode::Strict {
                st.acc.release(&p.destination);
            }
            for entry in p.entries {
                self.finish(st, fin, entry, Err(FailureReason::Closed), now);
            }
        }
    }

    /// Moves parked retries whose backoff is over back into the queues, as budget allows.
    fn unpark(&self, st: &mut State, now: Instant) {
        while st.parked.peek().is_some_and(|Reverse(p)| p.ready_at <= now) {
            let Some(Reverse(mut p)) = st.parked.pop() else {
                break;
            };
            if !st.budget.try_withdraw(now) {
                if !p.denied {
                    p.denied = true;
                    self.metrics.budget_denied.increment(1);
                }
                // Look again when the floor alone would have refilled a token (traffic may
                // refill it sooner), at most every 100 ms and at least every 1 ms.
                let wait = match st.budget.min_per_sec() {
                    0 => Duration::from_millis(100),
                    n => Duration::from_secs(1) / n,
                };
                p.ready_at = now + wait.clamp(Duration::from_millis(1), Duration::from_millis(100));
                st.parked.push(Reverse(p));
                break;
            }
            let n = p.entries.len() as u64;
            st.totals.retries += n;
            self.metrics.retries.increment(n);
            let for_expiry = p.entries.iter().map(|(_, m)| m.deadline).min();
            st.next_expiry = match (st.next_expiry, for_expiry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let entries = p.entries.into_iter().map(|e| {
                let size = e.1.size;
                (e, size)
            });
            match self.config.ordering {
                OrderingMode::Strict => {
                    st.acc
                        .push_front(&p.destination, entries.collect::<Vec<_>>(), now);
                    st.acc.release(&p.destination);
                }
                OrderingMode::Relaxed => {
                    for (e, size) in entries {
                        st.acc.push_back(&p.destination, e, size, now);
                    }
                }
            }
        }
    }

    /// One turn of the dispatcher: expire, unpark, take every batch that may go. Returns the
    /// batches to send and when to look again.
    fn plan(
        &self,
        st: &mut State,
        fin: &mut Finished,
        now: Instant,
    ) -> (Vec<Flight>, Option<Instant>) {
        self.expire(st, fin, now);
        self.unpark(st, now);
        let force = st.flushers > 0 || st.closing;
        let mut flights = Vec::new();
        while st.in_flight < self.config.max_in_flight {
            if st.breaker.state() == CircuitState::Open
                && st.breaker.retry_at().is_some_and(|t| t > now)
            {
                break;
            }
            let Some(batch) = st.acc.pop_ready(now, force) else {
                break;
            };
            if !st.breaker.allow(now) {
                // Half-open with its probes out: put the batch back where it was.
                let items = batch.items.into_iter().map(|e| {
                    let size = e.1.size;
                    (e, size)
                });
                st.acc
                    .push_front(&batch.destination, items.collect::<Vec<_>>(), now);
                st.acc.batch_done(&batch.destination);
                break;
            }
            let mut messages = Vec::with_capacity(batch.items.len());
            let mut metas = Vec::with_capacity(batch.items.len());
            let mut first_attempts = 0u64;
            for (msg, mut meta) in batch.items {
                if meta.deadline <= now {
                    self.time_out(st, fin, (msg, meta), now);
                    continue;
                }
                first_attempts += u64::from(meta.attempts == 0);
                meta.attempts += 1;
                messages.push(msg);
                metas.push(meta);
            }
            if messages.is_empty() {
                st.acc.batch_done(&batch.destination);
                continue;
            }
            // One token's worth per batch carrying first attempts: the budget counts requests.
            st.budget.deposit(u64::from(first_attempts > 0), now);
            st.in_flight += 1;
            st.totals.batches += 1;
            self.metrics.batches.increment(1);
            self.metrics.batch_messages.record(messages.len() as f64);
            self.metrics.batch_bytes.record(batch.bytes as f64);
            flights.push(Flight {
                destination: batch.destination,
                messages,
                metas,
            });
        }
        self.metrics.inflight.set(st.in_flight as f64);
        self.metrics
            .buffer_messages
            .set(st.buffered_messages as f64);
        self.metrics.buffer_bytes.set(st.buffered_bytes as f64);
        self.metrics
            .circuit
            .set(effective_circuit(st.breaker.state(), st.breaker.retry_at(), now).as_gauge());
        self.note_circuit(st);

        let mut wake_at = st.acc.next_wakeup(now);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
            }
        };
        consider(st.parked.peek().map(|Reverse(p)| p.ready_at));
        if !st.acc.is_empty() || !st.parked.is_empty() {
            consider(st.next_expiry);
            if st.breaker.state() == CircuitState::Open {
                consider(st.breaker.retry_at());
            }
        }
        (flights, wake_at)
    }

    /// Handles the outcome of one batch: deliveries, permanent failures, retries.
    fn land(&self, flight: &mut Flight, outcomes: BatchOutcome, fin: &mut Finished) {
        let now = clock_now();
        let mut st = self.lock();
        st.in_flight -= 1;
        st.acc.batch_done(&flight.destination);
        let messages = std::mem::take(&mut flight.messages);
        let metas = std::mem::take(&mut flight.metas);
        let n = messages.len();
        let mut outcomes = outcomes.into_iter();
        let mut any_ok = false;
        let mut all_transient = true;
        let mut retry: Vec<Entry> = Vec::new();
        let mut retry_after = Duration::ZERO;
        let missing = || {
            TransportError::transient(format!(
                "transport returned fewer outcomes than the {n} messages of the batch"
            ))
        };
        for (msg, mut meta) in messages.into_iter().zip(metas) {
            let outcome = outcomes.next().unwrap_or_else(|| Err(missing()));
            let error = match outcome {
                Ok(ack) => {
                    any_ok = true;
                    all_transient = false;
                    self.finish(&mut st, fin, (msg, meta), Ok(ack), now);
                    continue;
                }
                Err(e) => e,
            };
            all_transient &= error.class() == ErrorClass::Transient;
            let ctx = RetryContext {
                attempts: meta.attempts,
                class: error.class(),
                time_left: meta.deadline.saturating_duration_since(now),
                previous_delay: meta.previous_delay,
            };
            let decision = if st.abandoned {
                // A close ran out of time: nothing more is retried.
                RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
            } else {
                self.config.retry.decide(&ctx, &mut st.rng)
            };
            // herald's own cut-off of a hung attempt says less than the transport's own last
            // error, if there was one: keep that as the error a delivery timeout reports.
            let remember = |meta: &mut Meta, error: TransportError| {
                if error.code() != Some(ATTEMPT_TIMEOUT) || meta.last_error.is_none() {
                    meta.last_error = Some(Box::new(error));
                }
            };
            let reason = match decision {
                RetryDecision::GiveUp(_) if st.abandoned => FailureReason::Closed,
                RetryDecision::Retry { after } => {
                    meta.previous_delay = Some(after);
                    remember(&mut meta, error);
                    retry_after = retry_after.max(after);
                    retry.push((msg, meta));
                    continue;
                }
                RetryDecision::GiveUp(GiveUpReason::Permanent) => FailureReason::Rejected(error),
                RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted) => {
                    FailureReason::RetriesExhausted(error)
                }
                RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose) => {
                    remember(&mut meta, error);
                    self.deadline_reason(&mut meta)
                }
            };
            self.finish(&mut st, fin, (msg, meta), Err(reason), now);
        }
        if any_ok || !all_transient {
            st.breaker.on_success(now);
        } else {
            st.breaker.on_failure(now);
        }
        self.note_circuit(&mut st);
        if !retry.is_empty() {
            if self.config.ordering == OrderingMode::Strict {
                st.acc.hold(&flight.destination);
            }
            let earliest = retry.iter().map(|(_, m)| m.deadline).min();
            st.next_expiry = match (st.next_expiry, earliest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            st.parked_seq += 1;
            let seq = st.parked_seq;
            st.parked.push(Reverse(Parked {
                ready_at: now + retry_after,
                seq,
                destination: flight.destination.clone(),
                entries: retry,
                denied: false,
            }));
        }
        drop(st);
        self.wake.notify_one();
    }
}

/// A batch being sent.
pub(crate) struct Flight {
    destination: Destination,
    messages: Vec<Message>,
    metas: Vec<Meta>,
}

/// Owns a batch while the transport sends it. Dropped before the outcome lands (the transport
/// panicked, or the runtime shut down in the middle of the send), it lands the batch as a
/// transient failure: the in-flight slot is freed and the messages are retried, or, when the
/// producer itself is going away, end as `Closed` through the state's drop guard.
struct Sending {
    shared: Arc<Shared>,
    flight: Flight,
    landed: bool,
}

impl Sending {
    fn land(&mut self, outcomes: BatchOutcome) {
        // Set first: should landing itself panic (in a user's retry policy), it is not repeated.
        self.landed = true;
        let mut fin = Finished::default();
        self.shared.land(&mut self.flight, outcomes, &mut fin);
        self.shared.complete(fin);
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.landed {
            let e = TransportError::transient(
                "the transport's send was aborted: it panicked, or its task was cancelled",
            )
            .with_code("herald_send_aborted");
            let n = self.flight.messages.len();
            self.land(vec![Err(e); n]);
        }
    }
}

async fn send_flight(shared: Arc<Shared>, flight: Flight) {
    let mut sending = Sending {
        shared,
        flight,
        landed: false,
    };
    // An attempt may not outlive the earliest deadline in the batch: a transport that hangs must
    // not keep any message past its delivery timeout. Messages with time left are retried.
    let earliest = sending.flight.metas.iter().map(|m| m.deadline).min();
    let budget = earliest.map_or(Duration::ZERO, |d| d.saturating_duration_since(clock_now()));
    let send = sending
        .shared
        .transport
        .send_batch(&sending.flight.destination, &sending.flight.messages);
    let outcomes = match tokio::time::timeout(budget, send).await {
        Ok(outcomes) => outcomes,
        Err(_) => {
            let mut e = TransportError::transient(format!(
                "the transport did not answer within {budget:?}, the time left before the batch's first delivery deadline"
            ))
            .with_code(ATTEMPT_TIMEOUT);
            if let Some(diagnosis) = sending.shared.transport.diagnosis() {
                e = e.with_context(diagnosis);
            }
            vec![Err(e); sending.flight.messages.len()]
        }
    };
    sending.land(outcomes);
}

/// The dispatcher: turns queued messages into batches and hands them to the transport, within
/// the in-flight limit and the circuit breaker; runs until the producer is closed or dropped
/// and everything accepted has ended.
pub(crate) async fn run_dispatcher(shared: Arc<Shared>) {
    loop {
        let now = clock_now();
        let mut fin = Finished::default();
        let (flights, wake_at, exit) = {
            let mut st = shared.lock();
            let (flights, wake_at) = shared.plan(&mut st, &mut fin, now);
            let exit = st.closing && st.buffered_messages == 0 && st.in_flight == 0;
            (flights, wake_at, exit)
        };
        shared.complete(fin);
        for flight in flights {
            tokio::spawn(send_flight(shared.clone(), flight));
        }
        if exit {
            shared.transport.close().await;
            shared.stopped.store(true, Ordering::Release);
            // The last word (closed) is published here: when the producer was dropped, the
            // health task may find the pipeline gone before it evaluates again.
            shared.evaluate_health(clock_now(), true);
            shared.health.kick.notify_one();
            return;
        }
        let notified = shared.wake.notified();
        match wake_at {
            Some(at) => {
                let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(at));
                tokio::select! {
                    () = notified => {}
                    () = sleep => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Evaluates and publishes the producer's health every `interval`, and at once when kicked;
/// evaluates a last time (closed) and ends when the dispatcher has finished. Holds the pipeline
/// only while evaluating, so it never keeps a dropped producer alive.
pub(crate) async fn run_health(shared: Weak<Shared>, kick: Arc<Notify>, interval: Duration) {
    loop {
        let notified = kick.notified();
        {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.evaluate_health(clock_now(), true);
            if shared.stopped.load(Ordering::Acquire) {
                return;
            }
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// The breaker's state as operators should see it: open past its `open_for` is half-open (the
/// next batch probes), though the breaker itself moves there only when a batch asks.
fn effective_circuit(state: CircuitState, retry_at: Option<Instant>, now: Instant) -> CircuitState {
    match state {
        CircuitState::Open if retry_at.is_some_and(|t| t <= now) => CircuitState::HalfOpen,
        other => other,
    }
}
