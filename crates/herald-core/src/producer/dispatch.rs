//! The dispatcher: turns queued messages into batches within the in-flight limit and the
//! circuit breaker, sends them, and lands each batch's outcomes: deliveries, failures and
//! retries (parked for their backoff and a retry-budget token, then queued again). Where
//! strict ordering asks for more than that, it asks [`OrderingMode`] (see `order.rs`).
//!
//! It also says what an operator needs to hear (see [`Spoken`]): the retry budget running dry,
//! and delivery timeouts summed up, at most one line per [`SAY_EVERY`] each, never one per
//! message or per batch.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_retry::{
    CircuitState, ErrorClass, Generation, GiveUpReason, RetryContext, RetryDecision,
};

use super::completion::{Completion, TaggedRun};
use super::contain::contain;
use super::health::effective_circuit;
use super::order::{AnswerGate, GateSays, Landed, Turn};
use super::state::{clock_now, Entry, Finished, Latency, Meta, Parked, Shared, State};
use crate::error::{FailureReason, TransportError};
use crate::message::{Destination, Message};
use crate::transport::{Ack, BatchOutcome, EarlyAcks};

/// The code of the error herald gives the messages of an attempt it cut off at their deadline.
pub(crate) const ATTEMPT_TIMEOUT: &str = "herald_attempt_timeout";

/// The least time between two log lines of one kind (delivery timeouts, retry budget exhausted)
/// from one producer: what happens meanwhile is counted and said in the next line.
pub(crate) const SAY_EVERY: Duration = Duration::from_secs(10);

/// Destinations a delivery-timeout line names; more are shown as `...`.
const NAMED_DESTINATIONS: usize = 5;

/// At most one line per interval. Hand-written rather than taken from a crate (`governor`,
/// ...): it is one comparison of two instants under a lock the caller already holds, it must
/// read the pipeline's clock (Tokio's, which tests pause) rather than its own, and what it holds
/// back is not dropped but counted by the caller and said in the next line, which a limiter
/// crate does not do; a dependency for that would weigh on every user of herald-core.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
}

impl RateLimit {
    /// Whether a line may go out at `now`; if so, the next may go out `every` later.
    fn allow(&mut self, now: Instant, every: Duration) -> bool {
        if self.next(every).is_some_and(|at| at > now) {
            return false;
        }
        self.last = Some(now);
        true
    }

    /// When the next line may go out (`None`: at once).
    fn next(&self, every: Duration) -> Option<Instant> {
        self.last.and_then(|t| t.checked_add(every))
    }
}

/// Messages ended by their delivery timeout and not yet logged: how many, where to (the first
/// few destinations named), and the last transport error one of them had.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    count: u64,
    destinations: Vec<Destination>,
    /// Some went to destinations beyond those named.
    more_destinations: bool,
    last_error: Option<String>,
}

impl Tally {
    /// Counts one message to `destination` that timed out with `last_error` (cheap: the error
    /// is rendered once per tally, not per message).
    fn note(&mut self, destination: &Destination, last_error: Option<&TransportError>) {
        self.count += 1;
        if self.destinations.last() != Some(destination) {
            self.add_destination(destination);
        }
        if self.last_error.is_none() {
            self.last_error = last_error.map(ToString::to_string);
        }
    }

    fn add_destination(&mut self, destination: &Destination) {
        if self.destinations.contains(destination) {
            return;
        }
        if self.destinations.len() < NAMED_DESTINATIONS {
            self.destinations.push(destination.clone());
        } else {
            self.more_destinations = true;
        }
    }

    fn merge(&mut self, other: Tally) {
        self.count += other.count;
        for d in &other.destinations {
            self.add_destination(d);
        }
        self.more_destinations |= other.more_destinations;
        if other.last_error.is_some() {
            self.last_error = other.last_error;
        }
    }

    /// `orders, payments`, or `a, b, c, d, e, ...` beyond the names kept.
    fn names(&self) -> String {
        let mut names: Vec<&str> = self.destinations.iter().map(Destination::as_str).collect();
        if self.more_destinations {
            names.push("...");
        }
        names.join(", ")
    }
}

/// What the producer's log has said lately, so that it speaks on changes and at a bounded rate.
/// Locked, briefly, under the state's lock and never the other way round.
#[derive(Debug, Default)]
pub(crate) struct Spoken {
    /// Delivery timeouts not logged yet.
    timeouts: Tally,
    timeouts_limit: RateLimit,
    /// The budget held a retry group back, and none has gone since.
    budget_dry: bool,
    /// The last dry spell was logged: its end will be too.
    budget_said: bool,
    /// Dry spells that began since the last line about them.
    budget_spells: u64,
    budget_limit: RateLimit,
}

impl Shared {
    /// Fails every queued or parked entry past its deadline, counted in `tally`; recomputes
    /// `next_expiry`.
    fn expire(&self, st: &mut State, fin: &mut Finished, tally: &mut Tally, now: Instant) {
        if st.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        let expired = st.acc.remove_where(|(_, meta)| meta.deadline <= now);
        for (destination, entry) in expired {
            self.expire_one(st, fin, tally, &destination, entry, now);
        }
        for Reverse(mut p) in std::mem::take(&mut st.parked).into_vec() {
            let (gone, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut p.entries)
                .into_iter()
                .partition(|(_, m)| m.deadline <= now);
            p.entries = kept;
            for entry in gone {
                self.expire_one(st, fin, tally, &p.destination, entry, now);
            }
            if p.entries.is_empty() {
                self.config
                    .ordering
                    .retries_ended(&mut st.acc, &mut st.lanes, &p.destination);
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

    /// Ends `entry`, to `destination`, by its delivery timeout, counted in `tally`.
    fn expire_one(
        &self,
        st: &mut State,
        fin: &mut Finished,
        tally: &mut Tally,
        destination: &Destination,
        entry: Entry,
        now: Instant,
    ) {
        if !matches!(entry.1.done, Completion::Answered) {
            tally.note(destination, entry.1.last_error());
        }
        self.time_out(st, fin, entry, now);
    }

    fn spoken(&self) -> std::sync::MutexGuard<'_, Spoken> {
        self.health
            .spoken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `tally` to the delivery timeouts not logged yet, and logs them all in one line if
    /// the last such line is [`SAY_EVERY`] old (or `now_or_never`: the producer is stopping).
    /// Returns when to try again while some are left unsaid.
    fn say_timeouts(&self, tally: Tally, now: Instant, now_or_never: bool) -> Option<Instant> {
        let mut spoken = self.spoken();
        if tally.count > 0 {
            spoken.timeouts.merge(tally);
        }
        if spoken.timeouts.count == 0 {
            return None;
        }
        if !now_or_never && !spoken.timeouts_limit.allow(now, SAY_EVERY) {
            return spoken.timeouts_limit.next(SAY_EVERY);
        }
        let t = std::mem::take(&mut spoken.timeouts);
        tracing::warn!(
            producer = self.config.name.as_deref(),
            transport = self.transport.name(),
            count = t.count,
            destinations = t.names().as_str(),
            delivery_timeout_ms =
                u64::try_from(self.config.delivery_timeout.as_millis()).unwrap_or(u64::MAX),
            last_error = t.last_error.as_deref(),
            "messages failed: not delivered within the delivery timeout"
        );
        None
    }

    /// The retry budget held back the retries of `parked`: logged when a dry spell begins, at
    /// most once per [`SAY_EVERY`] (with the spells that began unsaid meanwhile).
    fn budget_denied(&self, st: &State, parked: &Parked, now: Instant) {
        let mut spoken = self.spoken();
        if spoken.budget_dry {
            return;
        }
        spoken.budget_dry = true;
        spoken.budget_spells += 1;
        if !spoken.budget_limit.allow(now, SAY_EVERY) {
            return;
        }
        tracing::warn!(
            producer = self.config.name.as_deref(),
            transport = self.transport.name(),
            destination = parked.destination.as_str(),
            held_back = parked.entries.len(),
            dry_spells = spoken.budget_spells,
            budget_ratio = st.budget.ratio(),
            budget_min_per_sec = st.budget.min_per_sec(),
            "retry budget exhausted: retries wait for a token (the broker is failing more than the budget allows retrying)"
        );
        spoken.budget_spells = 0;
        spoken.budget_said = true;
    }

    /// The retry budget let a retry group go: a dry spell, if there was one, is over.
    fn budget_granted(&self) {
        let mut spoken = self.spoken();
        if !spoken.budget_dry {
            return;
        }
        spoken.budget_dry = false;
        if std::mem::take(&mut spoken.budget_said) {
            tracing::info!(
                producer = self.config.name.as_deref(),
                transport = self.transport.name(),
                "retry budget available again: held-back retries go out"
            );
        }
    }

    /// A close ran out of time: fails everything queued or parked with `Closed` (each handed
    /// back to its caller), and from now on ends transient failures of the batches still in
    /// flight as `Closed` too. Returns how many messages those batches hold.
    pub(crate) fn abandon_queued(&self) -> usize {
        let mut fin = Finished::default();
        let in_flight = {
            let mut st = self.lock();
            self.abandon(&mut st, &mut fin);
            st.buffered_messages
        };
        self.complete(fin);
        self.wake.notify_one();
        in_flight
    }

    /// Fails everything queued or parked with `Closed` (a close whose deadline passed). Batches in
    /// flight are left to land.
    fn abandon(&self, st: &mut State, fin: &mut Finished) {
        st.abandoned = true;
        let now = clock_now();
        for (_, entry) in st.acc.drain_all() {
            self.finish(st, fin, entry, Err(FailureReason::Closed), now);
        }
        for Reverse(p) in std::mem::take(&mut st.parked) {
            self.config
                .ordering
                .retries_ended(&mut st.acc, &mut st.lanes, &p.destination);
            for entry in p.entries {
                self.finish(st, fin, entry, Err(FailureReason::Closed), now);
            }
        }
    }

    /// Moves parked retries whose backoff is over back into the queues, as budget allows.
    /// When the budget runs dry, the retries still due stay parked and the time to look again
    /// is returned. Under strict ordering, retries whose destination still has batches out that
    /// were sent before them stay parked until those land (a landing wakes the dispatcher).
    fn unpark(&self, st: &mut State, now: Instant) -> Option<Instant> {
        let mut waiting_for_lane = Vec::new();
        let mut again = None;
        while st.parked.peek().is_some_and(|Reverse(p)| p.ready_at <= now) {
            let Some(Reverse(mut p)) = st.parked.pop() else {
                break;
            };
            if !self.config.ordering.may_requeue(&st.lanes, &p.destination) {
                waiting_for_lane.push(p);
                continue;
            }
            if !st.budget.try_withdraw(now) {
                if !p.denied {
                    p.denied = true;
                    self.metrics.budget_denied.increment(1);
                }
                self.budget_denied(st, &p, now);
                // Look again when the floor alone would have refilled a token (traffic may
                // refill it sooner), at most every 100 ms and at least every 1 ms.
                let wait = match st.budget.min_per_sec() {
                    0 => Duration::from_millis(100),
                    n => Duration::from_secs(1) / n,
                };
                p.ready_at = now + wait.clamp(Duration::from_millis(1), Duration::from_millis(100));
                again = Some(p.ready_at);
                st.parked.push(Reverse(p));
                break;
            }
            self.budget_granted();
            let n = p.entries.len() as u64;
            st.totals.retries += n;
            self.metrics.retries.increment(n);
            let for_expiry = p.entries.iter().map(|(_, m)| m.deadline).min();
            st.expires_by(for_expiry);
            self.config.ordering.requeue(
                &mut st.acc,
                &mut st.lanes,
                &p.destination,
                p.entries,
                now,
            );
        }
        for p in waiting_for_lane {
            st.parked.push(Reverse(p));
        }
        again
    }

    /// One turn of the dispatcher: expire, unpark, take every batch that may go. Returns the
    /// batches to send and when to look again.
    fn plan(
        &self,
        st: &mut State,
        fin: &mut Finished,
        now: Instant,
    ) -> (Vec<Flight>, Option<Instant>) {
        let mut timed_out = Tally::default();
        self.expire(st, fin, &mut timed_out, now);
        let budget_again = self.unpark(st, now);
        let force = st.flushers > 0 || st.closing;
        let mut flights = Vec::new();
        while st.in_flight < self.config.max_in_flight {
            if st.breaker.state() == CircuitState::Open
                && st.breaker.retry_at().is_some_and(|t| t > now)
            {
                break;
            }
            let split = |capacity| Split {
                now,
                messages: Vec::with_capacity(capacity),
                metas: Vec::with_capacity(capacity),
                expired: Vec::new(),
            };
            let Some(batch) = st.acc.pop_ready_into(now, force, split) else {
                break;
            };
            let Split {
                messages,
                mut metas,
                expired,
                ..
            } = batch.items;
            for entry in expired {
                self.expire_one(st, fin, &mut timed_out, &batch.destination, entry, now);
            }
            if messages.is_empty() {
                st.acc.batch_done(&batch.destination);
                continue;
            }
            if !st.breaker.allow(now) {
                // Half-open with its probes out: put the batch back where it was (but what
                // has expired meanwhile).
                let items = messages.into_iter().zip(metas).map(|e| {
                    let size = e.1.size;
                    (e, size)
                });
                st.acc
                    .push_front(&batch.destination, items.collect::<Vec<_>>(), now);
                st.acc.batch_done(&batch.destination);
                break;
            }
            let mut first_attempts = 0u64;
            for meta in &mut metas {
                first_attempts += u64::from(meta.attempts == 0);
                meta.attempts += 1;
            }
            // One token's worth per batch carrying first attempts: the budget counts requests.
            st.budget.deposit(u64::from(first_attempts > 0), now);
            st.in_flight += 1;
            st.totals.batches += 1;
            self.metrics.batches.increment(1);
            self.metrics.batch_messages.record(messages.len() as f64);
            self.metrics.batch_bytes.record(batch.bytes as f64);
            let turn = self
                .config
                .ordering
                .start(&mut st.lanes, &batch.destination);
            flights.push(Flight {
                destination: batch.destination,
                messages,
                metas,
                turn,
                circuit: st.breaker.generation(),
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
        let say_again = self.say_timeouts(timed_out, now, false);

        // Only future times: everything due at `now` has just been acted on, and what is due
        // but still gated (an open circuit whose time has come, with every ready batch waiting
        // behind one in flight) is released by a notification (a landing, an acceptance), not
        // by time. Waking at a past time would spin the dispatcher at full CPU until then, and
        // in paused time it would stop the clock for good.
        let mut wake_at = st.acc.next_wakeup(now);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t.filter(|t| *t > now) {
                wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
            }
        };
        // Retries still due after `unpark` wait for the budget or for their lane's batches to
        // land, not for their own time: the earliest future one counts.
        consider(
            st.parked
                .iter()
                .map(|Reverse(p)| p.ready_at)
                .filter(|t| *t > now)
                .min(),
        );
        consider(budget_again);
        // Delivery timeouts held back by the log's rate limit are said when it allows.
        consider(say_again);
        if !st.acc.is_empty() || !st.parked.is_empty() {
            consider(st.next_expiry);
            if st.breaker.state() == CircuitState::Open {
                consider(st.breaker.retry_at());
            }
        }
        (flights, wake_at)
    }

    /// Handles the outcome of one batch, and of the batches of its lane answered ahead of it:
    /// under strict ordering, a destination's batches are acted on in the order they were sent.
    fn land(&self, flight: Flight, outcomes: BatchOutcome, fin: &mut Finished) {
        let now = clock_now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let destination = flight.destination.clone();
        let seq = flight.turn.seq;
        let ready = self.config.ordering.landed(
            &mut st.lanes,
            &destination,
            seq,
            Landed { flight, outcomes },
        );
        let seqs: Vec<u64> = ready.iter().map(|l| l.flight.turn.seq).collect();
        for landed in ready {
            self.land_one(st, landed, fin, now);
        }
        self.config
            .ordering
            .cleared(&mut st.lanes, &destination, seqs);
        self.config.ordering.settle(&mut st.lanes, &destination);
        drop(guard);
        self.wake.notify_one();
    }

    /// Handles the outcome of one batch: deliveries, permanent failures, retries.
    fn land_one(&self, st: &mut State, landed: Landed<Flight>, fin: &mut Finished, now: Instant) {
        let Landed { flight, outcomes } = landed;
        st.in_flight -= 1;
        st.acc.batch_done(&flight.destination);
        let messages = flight.messages;
        let mut metas = flight.metas;
        let n = messages.len();
        // Answered one by one (not a `send_all`'s group, counted instead): room for all made
        // once, not grown (and moved) ten times for a batch of 1 024.
        if metas
            .first()
            .is_some_and(|m| !matches!(m.done, Completion::Group(_)))
        {
            fin.reserve(n);
        }
        let mut outcomes = outcomes;
        outcomes.truncate(n);
        outcomes.resize_with(n, || {
            Err(TransportError::transient(format!(
                "transport returned fewer outcomes than the {n} messages of the batch"
            )))
        });
        // Answered early: delivered, whatever the batch's outcome says since (herald cut the
        // call off at its deadline, say). Never sent again: strict ordering answered it only
        // when no earlier message of its key could still fail (see `AnswerGate`), so the key
        // rule below has nothing to hold it for.
        for (meta, outcome) in metas.iter().zip(outcomes.iter_mut()) {
            if outcome.is_err() && matches!(meta.done, Completion::Answered) {
                *outcome = Ok(Ack::default());
            }
        }
        // The broker answered: a message it took counts for the breaker even if the key rule
        // below sends it again.
        let mut any_ok = outcomes.iter().any(Result::is_ok);
        let delivered_but_held = self.config.ordering.hold_keys(
            &mut st.lanes,
            &flight.destination,
            &messages,
            &mut outcomes,
        );
        if !delivered_but_held.is_empty() {
            let held: Vec<&Message> = delivered_but_held
                .iter()
                .map(|&(i, _)| &messages[i])
                .collect();
            // Under the state's lock: a transport's panic here would take every fate of the
            // batch with it. Contained, it is logged and counted; the messages are sent again
            // as held, whatever the transport makes of that.
            if let Err(message) = contain(|| {
                self.transport
                    .delivered_but_held(&flight.destination, &held)
            }) {
                self.metrics.panic_counter("transport").increment(1);
                tracing::error!(
                    producer = self.config.name.as_deref(),
                    transport = self.transport.name(),
                    panic = %message,
                    "the transport panicked when told of messages delivered but held; they are sent again all the same"
                );
            }
            // Their copy is stored: should the message end failed, its caller hears of it.
            for (i, ack) in delivered_but_held {
                metas[i].stored_a_copy(ack);
            }
        }
        let mut all_transient = !any_ok;
        let mut retry: Vec<Entry> = Vec::new();
        let mut retry_after = Duration::ZERO;
        let mut timed_out = Tally::default();
        if outcomes.iter().all(Result::is_ok) {
            // The common case, every message delivered: each ends where it lies, and the
            // batch is dropped whole (no entry moved out of it one by one).
            let (mut messages, mut metas) = (messages, metas);
            let entries = messages.iter_mut().zip(&mut metas);
            for ((msg, meta), outcome) in entries.zip(outcomes) {
                if let Ok(ack) = outcome {
                    self.deliver(st, fin, msg, meta, ack, now);
                }
            }
        } else {
            for ((msg, mut meta), outcome) in messages.into_iter().zip(metas).zip(outcomes) {
                let answered = matches!(meta.done, Completion::Answered);
                let error = match outcome {
                    Ok(ack) => {
                        any_ok = true;
                        all_transient = false;
                        self.finish(st, fin, (msg, meta), Ok(ack), now);
                        continue;
                    }
                    Err(e) => e,
                };
                // The gate of early answers keeps the key rule from holding an answered message;
                // should it ever, the message is sent again for its key's order (and stays
                // delivered).
                debug_assert!(
                    !answered,
                    "the key rule held a message answered early: {error}"
                );
                all_transient &= error.class() == ErrorClass::Transient;
                let ctx = RetryContext {
                    attempts: meta.attempts,
                    class: error.class(),
                    time_left: meta.deadline.saturating_duration_since(now),
                    previous_delay: meta.previous_delay,
                };
                let decision = if st.abandoned && error.class() == ErrorClass::Permanent {
                    // Refused for good, close or no close.
                    RetryDecision::GiveUp(GiveUpReason::Permanent)
                } else if st.abandoned {
                    // A close ran out of time: nothing more is retried.
                    RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
                } else {
                    let (policy, rng) = (&self.config.retry, &mut st.rng);
                    match contain(|| policy.decide(&ctx, rng)) {
                        Ok(decision) => decision,
                        Err(message) => {
                            // The user's policy panicked: this message ends, the producer goes on.
                            self.metrics.panic_counter("retry_policy").increment(1);
                            let reason = FailureReason::Panicked {
                                site: "retry_policy",
                                message,
                            };
                            self.finish(st, fin, (msg, meta), Err(reason), now);
                            continue;
                        }
                    }
                };
                // herald's own cut-off of a hung attempt says less than the transport's own last
                // error, if there was one: keep that as the error a delivery timeout reports.
                let remember = |meta: &mut Meta, error: TransportError| {
                    if error.code() != Some(ATTEMPT_TIMEOUT) || meta.last_error().is_none() {
                        meta.set_last_error(error);
                    }
                };
                let reason = match decision {
                    RetryDecision::GiveUp(_) if answered => {
                        // Delivered all the same (acknowledged early).
                        self.finish(st, fin, (msg, meta), Ok(Ack::default()), now);
                        continue;
                    }
                    RetryDecision::GiveUp(GiveUpReason::Permanent) if st.abandoned => {
                        FailureReason::Rejected(error)
                    }
                    RetryDecision::GiveUp(_) if st.abandoned => FailureReason::Closed,
                    RetryDecision::Retry { after } => {
                        // No later than the message's deadline, where its expiry ends it: a
                        // policy's longer pause (`Duration::MAX`, say) would overflow the clock.
                        let after = after.min(ctx.time_left);
                        meta.previous_delay = Some(after);
                        remember(&mut meta, error);
                        retry_after = retry_after.max(after);
                        retry.push((msg, meta));
                        continue;
                    }
                    RetryDecision::GiveUp(GiveUpReason::Permanent) => {
                        FailureReason::Rejected(error)
                    }
                    RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted) => {
                        FailureReason::RetriesExhausted(error)
                    }
                    RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose) => {
                        remember(&mut meta, error);
                        timed_out.note(&flight.destination, meta.last_error());
                        self.deadline_reason(&mut meta)
                    }
                };
                self.finish(st, fin, (msg, meta), Err(reason), now);
            }
        }
        if any_ok || !all_transient {
            st.breaker.on_success_of(flight.circuit, now);
        } else if flight.circuit == st.breaker.generation()
            && self.config.ordering.counts_as_failure(
                &mut st.lanes,
                &flight.destination,
                flight.turn.seq,
            )
        {
            // Only a batch of the breaker's current generation may shadow its lane's later
            // failures: a stale one (sent before the last opening) says nothing to the
            // breaker, and shadowing would hide a probe's failure, leaving it half-open with
            // its probe out for good.
            st.breaker.on_failure_of(flight.circuit, now);
        }
        self.note_circuit(st);
        // What the rate limit holds back, the dispatcher says later (woken below).
        let _later = self.say_timeouts(timed_out, now, false);
        if !retry.is_empty() {
            let earliest = retry.iter().map(|(_, m)| m.deadline).min();
            st.expires_by(earliest);
            let ready_at = now + retry_after;
            let State {
                acc, lanes, parked, ..
            } = st;
            let join = |entries| join_parked(parked, &flight.destination, entries, ready_at);
            let new_group = self
                .config
                .ordering
                .park(acc, lanes, &flight.destination, retry, join);
            if let Some(entries) = new_group {
                st.parked_seq += 1;
                let seq = st.parked_seq;
                st.parked.push(Reverse(Parked {
                    ready_at,
                    seq,
                    destination: flight.destination.clone(),
                    entries,
                    denied: false,
                }));
            }
        }
    }
}

/// Adds `entries`, behind, to the parked group of `destination` (strict ordering: the retries of
/// a batch that was in flight beside the one whose retries are parked), which then waits until
/// `ready_at` if that is later. Without such a group (which the lane says cannot happen), they
/// form one.
fn join_parked(
    parked: &mut BinaryHeap<Reverse<Parked>>,
    destination: &Destination,
    entries: Vec<Entry>,
    ready_at: Instant,
) {
    let mut groups = std::mem::take(parked).into_vec();
    match groups
        .iter_mut()
        .find(|Reverse(p)| &p.destination == destination)
    {
        Some(Reverse(p)) => {
            p.entries.extend(entries);
            p.ready_at = p.ready_at.max(ready_at);
        }
        None => {
            debug_assert!(false, "the lane of {destination} has no parked group");
            let seq = groups.iter().map(|Reverse(p)| p.seq).max().unwrap_or(0) + 1;
            groups.push(Reverse(Parked {
                ready_at,
                seq,
                destination: destination.clone(),
                entries,
                denied: false,
            }));
        }
    }
    *parked = BinaryHeap::from(groups);
}

/// A batch's entries as they leave the queue ([`herald_batch::Accumulator::pop_ready_into`]):
/// the messages, for the transport, apart from their bookkeeping, and those whose delivery
/// deadline has passed set aside. Each entry is moved once on its way out.
struct Split {
    now: Instant,
    messages: Vec<Message>,
    metas: Vec<Meta>,
    expired: Vec<Entry>,
}

impl Extend<Entry> for Split {
    fn extend<I: IntoIterator<Item = Entry>>(&mut self, entries: I) {
        for (msg, meta) in entries {
            if meta.deadline <= self.now {
                self.expired.push((msg, meta));
            } else {
                self.messages.push(msg);
                self.metas.push(meta);
            }
        }
    }
}

/// A batch being sent.
pub(crate) struct Flight {
    destination: Destination,
    messages: Vec<Message>,
    metas: Vec<Meta>,
    /// Its place in its destination's lane (strict ordering).
    turn: Turn,
    /// The breaker's generation it was sent under: landing after the breaker opened again,
    /// its outcome says nothing of the broker since, nor of the probes.
    circuit: Generation,
}

/// Owns a batch while the transport sends it. Dropped before the outcome lands (the transport
/// panicked, or the runtime shut down in the middle of the send), it lands the batch as a
/// transient failure: the in-flight slot is freed and the messages are retried, or, when the
/// producer itself is going away, end as `Closed` through the state's drop guard.
struct Sending {
    shared: Arc<Shared>,
    /// The batch, until it lands.
    flight: Option<Flight>,
}

impl Flight {
    /// Its messages with their bookkeeping.
    pub(crate) fn into_entries(self) -> impl Iterator<Item = Entry> {
        self.messages.into_iter().zip(self.metas)
    }
}

impl Sending {
    /// Takes charge of `flight` at once, before any task runs it: a runtime that shuts down
    /// drops tasks spawned during its shutdown without polling them, and the guard must exist
    /// by then.
    fn new(shared: Arc<Shared>, flight: Flight) -> Self {
        Self {
            shared,
            flight: Some(flight),
        }
    }

    fn land(&mut self, outcomes: BatchOutcome) {
        // Taken first: should landing itself panic (in a user's retry policy), it is not
        // repeated.
        let Some(flight) = self.flight.take() else {
            return;
        };
        let mut fin = Finished::default();
        self.shared.land(flight, outcomes, &mut fin);
        self.shared.complete(fin);
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if let Some(flight) = &self.flight {
            let e = TransportError::transient(
                "the transport's send was aborted: it panicked, or its task was cancelled",
            )
            .with_code("herald_send_aborted");
            let n = flight.messages.len();
            self.land(vec![Err(e); n]);
        }
    }
}

/// Sends one batch and lands its outcomes. Its argument, the guard, lives in the future from
/// the moment it is created: dropped unpolled, the future still lands the batch.
async fn send_flight(mut sending: Sending) {
    // Under strict ordering, a destination's calls start one after another (see
    // `Transport::keeps_order_across_calls`): this one after the first poll of the one before.
    let (after, started) = match sending.flight.as_mut() {
        Some(f) => (f.turn.after.take(), f.turn.started.take()),
        None => (None, None),
    };
    if let Some(after) = after {
        // Fired, or dropped with a call that will never start: either way, our turn.
        let _either_way: Result<(), _> = after.await;
    }
    // An attempt may not outlive the earliest deadline in the batch: a transport that hangs must
    // not keep any message past its delivery timeout. Messages with time left are retried. A
    // transport with a settle time gets that much longer to report what it had already handed to
    // the broker at the deadline (the truth, rather than a failure that may have been stored).
    let outcomes = {
        let now = clock_now();
        let Sending { shared, flight } = &mut sending;
        let Some(flight) = flight.as_mut() else {
            return;
        };
        let Flight {
            destination,
            messages,
            metas,
            turn,
            ..
        } = flight;
        let earliest = metas.iter().map(|m| m.deadline).min();
        let deadline = earliest.unwrap_or(now);
        let budget = deadline.saturating_duration_since(now);
        let n = messages.len();
        crate::trace::sending(messages);
        let transport = &shared.transport;
        let settle = transport.settle_time();
        let mut answering = Answering::new(turn.gate.clone().map(|g| (g, turn.seq)));
        let mut send = std::pin::pin!(transport.send_batch_answering(
            destination,
            messages,
            deadline,
            answering.early.clone()
        ));
        let mut started = started;
        let epoch = turn.epoch;
        let send = std::future::poll_fn(|cx| {
            let polled = send.as_mut().poll(cx);
            if let Some(started) = started.take() {
                // The next call of the lane may start now.
                // Nobody waits when no call follows yet: nothing to tell.
                let _unheard: Result<(), ()> = started.send(());
            }
            // Messages the broker acknowledged already: their callers are told now, not when
            // the batch's slowest answer comes.
            answering.answer(shared, cx.waker(), messages, metas);
            polled
        });
        // The call runs in its lane's order epoch, which `Turns` reads.
        let finished = {
            let mut send = std::pin::pin!(crate::transport::in_order_epoch(epoch, send));
            match tokio::time::timeout(budget.saturating_add(settle), send.as_mut()).await {
                Ok(outcomes) => Some(outcomes),
                // A call that spent Tokio's cooperative budget (reading answers it holds, say)
                // returned Pending with them in hand, and the timer, which `Timeout` then polls
                // past the budget, ended it: it is polled once more outside the budget, and
                // what it holds is the true outcome. (Only then: a call that was waiting is
                // not polled again, and a transport hands nothing new to its broker past the
                // deadline, see `Transport::send_batch_until`.)
                Err(_) if !tokio::task::coop::has_budget_remaining() => {
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    let mut last = tokio::task::coop::unconstrained(send.as_mut());
                    match std::pin::Pin::new(&mut last).poll(&mut cx) {
                        std::task::Poll::Ready(outcomes) => Some(outcomes),
                        std::task::Poll::Pending => None,
                    }
                }
                Err(_) => None,
            }
        };
        match finished {
            Some(outcomes) => outcomes,
            None => {
                let mut e = TransportError::transient(if settle.is_zero() {
                format!(
                    "the transport did not answer within {budget:?}, the time left before the batch's first delivery deadline"
                )
            } else {
                format!(
                    "the transport did not answer within {budget:?}, the time left before the batch's first delivery deadline, and the {settle:?} it may take past it to settle"
                )
            })
            .with_code(ATTEMPT_TIMEOUT);
                if let Some(diagnosis) = transport.diagnosis() {
                    e = e.with_context(diagnosis);
                }
                // Acknowledgements that came with the cut-off are true all the same: those it
                // may answer now are answered, and those its ordering still holds back (the
                // gate, an earlier message of their key) land as delivered, for the key rule
                // to judge with the rest.
                answering.answer(shared, std::task::Waker::noop(), messages, metas);
                let mut outcomes = vec![Err(e); n];
                for (o, ack) in outcomes.iter_mut().zip(answering.acked.iter_mut()) {
                    if let Some(ack) = ack.take() {
                        *o = Ok(ack);
                    }
                }
                outcomes
            }
        }
    };
    sending.land(outcomes);
}

/// Distinct keys of a batch still waiting for an earlier answer past which [`Answering::scan`]
/// stops looking (what it has not reached is answered on a later scan, or when the batch lands).
const KEYS_WAITING_SCANNED: usize = 32;

/// A batch's early acknowledgements (see [`crate::Transport::send_batch_answering`]), answered
/// as its ordering allows: all at once under relaxed ordering; under strict ordering when the
/// lane's [`AnswerGate`] is open for the batch, and each only after every earlier message of
/// its key in the batch.
struct Answering {
    early: EarlyAcks,
    /// Taken from `early` (kept for its allocation).
    taken: Vec<(usize, Ack)>,
    /// Strict ordering: the lane's gate and the batch's place in the lane.
    gate: Option<(Arc<AnswerGate>, u64)>,
    /// Strict ordering: acknowledgements not answered yet, by index (allocated on the first).
    acked: Vec<Option<Ack>>,
    /// Strict ordering: each message's [`key_print`], made with `acked`.
    prints: Vec<u64>,
    /// Scratch of [`Answering::scan`] (kept for its allocation): the keys waiting for an
    /// earlier answer, each as (print, index of a message with that key).
    keys_waiting: Vec<(u64, usize)>,
    /// How many `acked` holds.
    waiting: usize,
    /// Every message before this index is answered.
    first_open: usize,
    /// The gate was told that every message is answered.
    told: bool,
}

impl Answering {
    fn new(gate: Option<(Arc<AnswerGate>, u64)>) -> Self {
        Self {
            early: EarlyAcks::default(),
            taken: Vec::new(),
            gate,
            acked: Vec::new(),
            prints: Vec::new(),
            keys_waiting: Vec::new(),
            waiting: 0,
            first_open: 0,
            told: false,
        }
    }

    /// Answers what may be answered of what the transport acknowledged so far; `waker` is
    /// woken by the next acknowledgement, or by the gate opening.
    fn answer(
        &mut self,
        shared: &Shared,
        waker: &std::task::Waker,
        messages: &[Message],
        metas: &mut [Meta],
    ) {
        self.early.take(waker, &mut self.taken);
        let Some((gate, seq)) = &self.gate else {
            if !self.taken.is_empty() {
                let (now, mut latency) = (clock_now(), Latency::default());
                let mut run = TaggedRun::new(&shared.unclaimed, self.taken.len());
                for (index, ack) in self.taken.drain(..) {
                    if let Some(meta) = metas.get_mut(index) {
                        shared.answer_early(meta, ack, now, &mut latency, &mut run);
                    }
                }
                latency.flush(&shared.metrics.latency);
                run.flush();
            }
            return;
        };
        for (index, ack) in self.taken.drain(..) {
            if index >= metas.len() || matches!(metas[index].done, Completion::Answered) {
                continue;
            }
            if self.acked.is_empty() {
                self.acked = vec![None; metas.len()];
                self.prints = messages.iter().map(|m| key_print(m.key())).collect();
            }
            if self.acked[index].replace(ack).is_none() {
                self.waiting += 1;
            }
        }
        if self.waiting > 0 && gate.ask(*seq, waker) == GateSays::Open {
            self.scan(shared, messages, metas);
        }
    }

    /// Answers, in batch order, each acknowledged message with no earlier message of its key
    /// left unanswered; tells the gate when the whole batch is answered.
    fn scan(&mut self, shared: &Shared, messages: &[Message], metas: &mut [Meta]) {
        let (now, mut latency) = (clock_now(), Latency::default());
        let mut run = TaggedRun::new(&shared.unclaimed, self.waiting);
        self.keys_waiting.clear();
        for j in self.first_open..messages.len() {
            if matches!(metas[j].done, Completion::Answered) {
                if self.keys_waiting.is_empty() && self.first_open == j {
                    self.first_open = j + 1;
                }
                continue;
            }
            if self.waiting == 0 {
                // Nothing acknowledged is left to answer: what follows is unacknowledged.
                break;
            }
            let (key, print) = (messages[j].key(), self.prints[j]);
            // Prints first: the bytes of two keys are compared only when theirs are equal.
            let free = !self
                .keys_waiting
                .iter()
                .any(|&(p, i)| p == print && messages[i].key() == key);
            match self.acked[j].take() {
                Some(ack) if free => {
                    shared.answer_early(&mut metas[j], ack, now, &mut latency, &mut run);
                    self.waiting -= 1;
                    if self.keys_waiting.is_empty() && self.first_open == j {
                        self.first_open = j + 1;
                    }
                }
                back => {
                    self.acked[j] = back;
                    if free {
                        if self.keys_waiting.len() == KEYS_WAITING_SCANNED {
                            break;
                        }
                        self.keys_waiting.push((print, j));
                    }
                }
            }
        }
        // Handed over before the gate opens for the batches after this one, their latencies
        // counted before.
        latency.flush(&shared.metrics.latency);
        run.flush();
        if self.first_open == messages.len() && !self.told {
            self.told = true;
            if let Some((gate, seq)) = &self.gate {
                gate.clear(*seq, false);
            }
        }
    }
}

/// A fingerprint of a message key: equal keys have equal prints, so two keys with different
/// prints are different without a comparison of their bytes (the strict-order scan of early
/// answers compares each message's key with up to [`KEYS_WAITING_SCANNED`] others).
fn key_print(key: Option<&bytes::Bytes>) -> u64 {
    use std::hash::BuildHasher as _;
    // No key is a key of its own (one key for every keyless message), apart from every print
    // of bytes (those are odd).
    key.map_or(0, |k| {
        foldhash::fast::FixedState::default().hash_one(&k[..]) | 1
    })
}

/// Lives as long as the dispatcher runs: dropped before the producer stopped normally (the task
/// was dropped by its runtime, or a fault panicked it), it says so to the health task.
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.gone_unstopped();
        self.0.exited.store(true, Ordering::Release);
        self.0.exit.notify_waiters();
    }
}

impl Running {
    fn gone_unstopped(&self) {
        if self.0.stopped.load(Ordering::Acquire) {
            return;
        }
        self.0.dispatcher_gone.store(true, Ordering::Release);
        self.0.health.kick.notify_one();
        // A runtime shutting down at the end of a program drops it too: worth an error only
        // when messages were still waiting.
        let pending = self.0.unsettled.load(Ordering::Acquire);
        // Nothing will send them now: what is queued or parked ends `Closed`, as at a close
        // that gave up, and so does every batch in flight when it lands (its task dropped
        // too, or its call ending); new messages are refused. Otherwise a caller awaiting a
        // fate, `flush` or `close` on another runtime would wait for ever. Caught: this may
        // run in a runtime's shutdown, and should it panic (a state left half-updated by the
        // dispatcher's own panic), the rest still ends when the pipeline is dropped.
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(stage) = &self.0.stage {
                stage.close();
            }
            self.0.abandon_queued();
        }));
        if ended.is_err() {
            tracing::error!(
                producer = self.0.config.name.as_deref(),
                transport = self.0.transport.name(),
                "ending what the gone dispatcher left panicked"
            );
        }
        if pending > 0 {
            tracing::error!(
                producer = self.0.config.name.as_deref(),
                transport = self.0.transport.name(),
                pending,
                "the producer's dispatcher task ended without a close: nothing is sent any \
                 more, and what was pending is handed back as closed"
            );
        } else {
            tracing::debug!(
                producer = self.0.config.name.as_deref(),
                transport = self.0.transport.name(),
                "the producer's dispatcher task ended without a close, nothing pending"
            );
        }
    }
}

/// The dispatcher: turns queued messages into batches and hands them to the transport, within
/// the in-flight limit and the circuit breaker; runs until the producer is closed or dropped
/// and everything accepted has ended.
///
/// The guard that reports a dispatcher gone without a close exists before the task is first
/// polled: a runtime may drop a task it never ran.
pub(crate) fn run_dispatcher(shared: Arc<Shared>) -> impl Future<Output = ()> {
    let running = Running(shared.clone());
    async move {
        let _running = running;
        dispatch(shared).await;
    }
}

async fn dispatch(shared: Arc<Shared>) {
    loop {
        let now = clock_now();
        let mut fin = Finished::default();
        let (flights, wake_at, exit) = {
            let mut st = shared.lock();
            let (flights, wake_at) = shared.plan(&mut st, &mut fin, now);
            let exit = st.closing
                && st.buffered_messages == 0
                && st.in_flight == 0
                && st.staged == 0
                && !st.recovering;
            (flights, wake_at, exit)
        };
        shared.complete(fin);
        for flight in flights {
            tokio::spawn(send_flight(Sending::new(shared.clone(), flight)));
        }
        if exit {
            // The last delivery timeouts are said now, whatever the rate limit.
            let _none = shared.say_timeouts(Tally::default(), clock_now(), true);
            shared.transport.close().await;
            tracing::debug!(
                producer = shared.config.name.as_deref(),
                transport = shared.transport.name(),
                "producer stopped: everything accepted has ended and the transport is closed"
            );
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{async_trait, Destination, Message, OrderingMode, Producer, Transport};

    struct Accepts;
    #[async_trait]
    impl Transport for Accepts {
        fn name(&self) -> &'static str {
            "accepts"
        }
        async fn send_batch(&self, _: &Destination, batch: &[Message]) -> BatchOutcome {
            batch.iter().map(|_| Ok(Ack::default())).collect()
        }
    }

    /// Whether `f` has its output now (polled once, nothing waited for).
    fn ready_now<F: Future + Unpin>(f: &mut F) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(f).poll(&mut cx).is_ready()
    }

    /// One call of [`Early`]'s script.
    #[derive(Default)]
    struct Call {
        /// Indices acknowledged early, in this order, before the call waits for its gate.
        early: Vec<usize>,
        /// Indices failed transiently.
        fail: Vec<usize>,
        /// The call never returns once it has acknowledged early.
        hang: bool,
    }

    /// A transport that acknowledges messages early as its script says, then holds each call
    /// until its gate opens (`gates[n]` for call `n`); calls past the script pass at once.
    struct Early {
        script: Vec<Call>,
        gates: Vec<tokio::sync::Notify>,
        /// A call has given its early acknowledgements.
        acked: tokio::sync::Notify,
        ordered: bool,
        /// `delivered_but_held` panics.
        panics_on_held: bool,
        calls: std::sync::Mutex<Vec<Vec<bytes::Bytes>>>,
    }

    impl Early {
        fn new(script: Vec<Call>) -> std::sync::Arc<Self> {
            std::sync::Arc::new(Self {
                gates: script.iter().map(|_| tokio::sync::Notify::new()).collect(),
                script,
                acked: tokio::sync::Notify::new(),
                ordered: false,
                panics_on_held: false,
                calls: std::sync::Mutex::new(Vec::new()),
            })
        }
        /// [`Early::new`] keeping order across calls (pipelined strict order).
        fn ordered(script: Vec<Call>) -> std::sync::Arc<Self> {
            let mut transport = Self::new(script);
            std::sync::Arc::get_mut(&mut transport)
                .expect("not shared yet")
                .ordered = true;
            transport
        }
        fn calls(&self) -> Vec<Vec<bytes::Bytes>> {
            self.calls.lock().expect("calls").clone()
        }
    }

    fn early_ack() -> Ack {
        Ack {
            offset: Some(7),
            ..Ack::default()
        }
    }

    #[async_trait]
    impl Transport for std::sync::Arc<Early> {
        fn name(&self) -> &'static str {
            "early"
        }
        fn keeps_order_across_calls(&self) -> bool {
            self.ordered
        }
        fn delivered_but_held(&self, _: &Destination, _: &[&Message]) {
            assert!(!self.panics_on_held, "delivered_but_held exploded");
        }
        async fn send_batch(&self, _: &Destination, batch: &[Message]) -> BatchOutcome {
            batch.iter().map(|_| Ok(Ack::default())).collect()
        }
        async fn send_batch_answering(
            &self,
            _: &Destination,
            batch: &[Message],
            _deadline: std::time::Instant,
            early: EarlyAcks,
        ) -> BatchOutcome {
            let n = {
                let mut calls = self.calls.lock().expect("calls");
                calls.push(batch.iter().map(|m| m.payload().clone()).collect());
                calls.len() - 1
            };
            let Some(call) = self.script.get(n) else {
                return batch.iter().map(|_| Ok(Ack::default())).collect();
            };
            for &i in &call.early {
                early.ack(i, early_ack());
            }
            self.acked.notify_one();
            if call.hang {
                std::future::pending::<()>().await;
            }
            self.gates[n].notified().await;
            (0..batch.len())
                .map(|i| {
                    if call.fail.contains(&i) {
                        Err(TransportError::transient("connection lost"))
                    } else if call.early.contains(&i) {
                        Ok(early_ack())
                    } else {
                        Ok(Ack::default())
                    }
                })
                .collect()
        }
    }

    fn batches_of(n: usize) -> herald_batch::SizeOrLinger {
        herald_batch::SizeOrLinger::new(n, 1 << 20, Duration::from_secs(5))
    }

    /// A producer on `transport` in batches of `n`, retrying after 1 ms.
    fn retrying_in_batches_of(transport: &std::sync::Arc<Early>, n: usize) -> Producer {
        Producer::builder(transport.clone())
            .batching(batches_of(n))
            .retry(herald_retry::ExponentialRetry::new(
                herald_retry::Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
            ))
            .build()
            .expect("build")
    }

    /// A batch sent before the circuit opened, failing while a probe of its lane is out, is
    /// stale for the breaker; but it still set its lane's failure shadow, which then hid the
    /// probe's own failure from the breaker: half-open with its one probe "out" for good,
    /// nothing was sent again. Only batches of the breaker's current generation shadow now.
    #[tokio::test(start_paused = true)]
    async fn a_stale_failure_does_not_hide_the_probe_s_failure() {
        let fail = || Call {
            fail: vec![0],
            ..Call::default()
        };
        // d1-a (held until released, then fails), d2-a (fails at once), d1-b (the probe,
        // held, then fails); what comes after passes.
        let transport = Early::ordered(vec![fail(), fail(), fail()]);
        transport.gates[1].notify_one();
        let producer = Producer::builder(transport.clone())
            .batching(batches_of(1))
            .pipeline_depth(4)
            .retry(herald_retry::NoRetry)
            .circuit_breaker(herald_retry::CircuitBreakerConfig {
                failure_threshold: 1,
                open_for: Duration::from_millis(50),
                half_open_probes: 1,
                enabled: true,
            })
            .build()
            .expect("build");
        let d1a = producer
            .try_send(Message::new("d1", "a"))
            .expect("accepted");
        let d2a = producer
            .try_send(Message::new("d2", "a"))
            .expect("accepted");
        d2a.await.expect_err("d2-a fails: the circuit opens");
        assert_eq!(producer.stats().circuit, CircuitState::Open);
        let d1b = producer
            .try_send(Message::new("d1", "b"))
            .expect("accepted");
        tokio::time::timeout(Duration::from_secs(10), async {
            while transport.calls().len() < 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the probe goes once open_for has passed");
        assert_eq!(
            producer.stats().circuit,
            CircuitState::HalfOpen,
            "d1-b probes"
        );
        transport.gates[0].notify_one();
        d1a.await
            .expect_err("d1-a fails, sent before the circuit opened");
        transport.gates[2].notify_one();
        d1b.await.expect_err("the probe fails");
        let d1c = producer
            .try_send(Message::new("d1", "c"))
            .expect("accepted");
        tokio::time::timeout(Duration::from_secs(10), d1c)
            .await
            .expect("the circuit probes again: d1-c goes")
            .expect("delivered");
    }

    /// A message the transport acknowledges early is answered then, while its batch is still
    /// out; the rest of the batch when it returns; each counted once.
    #[tokio::test]
    async fn an_early_acknowledgement_answers_its_message_before_the_batch_returns() {
        for ordering in [OrderingMode::Strict, OrderingMode::Relaxed] {
            let transport = Early::new(vec![Call {
                early: vec![0],
                ..Call::default()
            }]);
            let producer = Producer::builder(transport.clone())
                .batching(batches_of(2))
                .ordering(ordering)
                .build()
                .expect("build");
            let first = producer.try_send(Message::new("t", "a")).expect("accepted");
            let mut second = producer.try_send(Message::new("t", "b")).expect("accepted");
            let delivered = tokio::time::timeout(Duration::from_secs(10), first)
                .await
                .expect("answered while the batch is out")
                .expect("delivered");
            assert_eq!(delivered.ack.offset, Some(7), "{ordering:?}");
            assert_eq!(delivered.attempts, 1);
            assert!(
                !ready_now(&mut second),
                "{ordering:?}: the other message waits for the batch"
            );
            assert_eq!(
                producer.stats().in_flight_batches,
                1,
                "the batch is still out"
            );
            transport.gates[0].notify_one();
            second.await.expect("delivered when the batch returns");
            producer.flush().await;
            let totals = producer.stats().totals;
            assert_eq!((totals.delivered, totals.failed), (2, 0), "{ordering:?}");
            assert_eq!(transport.calls().len(), 1, "nothing sent again");
        }
    }

    /// Strict ordering: a message acknowledged early behind an earlier message of its key that
    /// has no answer yet is not answered early (that one may fail, and it would then have to be
    /// sent again behind its retry); messages of other keys are. When the earlier one fails,
    /// it is sent again behind the retry and answered once, then.
    #[tokio::test]
    async fn an_early_acknowledgement_waits_behind_an_unanswered_message_of_its_key() {
        let transport = Early::new(vec![Call {
            early: vec![1, 2],
            fail: vec![0],
            ..Call::default()
        }]);
        let producer = retrying_in_batches_of(&transport, 3);
        let a = producer
            .try_send(Message::new("t", "a").with_key("k"))
            .expect("accepted");
        let mut b = producer
            .try_send(Message::new("t", "b").with_key("k"))
            .expect("accepted");
        let c = producer
            .try_send(Message::new("t", "c").with_key("j"))
            .expect("accepted");
        // b's acknowledgement came before c's: by the time c is answered, b's was seen too.
        let c = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("c, of another key, answered while the batch is out")
            .expect("delivered");
        assert_eq!((c.attempts, c.ack.offset), (1, Some(7)));
        assert!(!ready_now(&mut b), "b waits behind a, of its key");
        transport.gates[0].notify_one();
        let a = a.await.expect("a delivered on its retry");
        let b = b.await.expect("b delivered");
        assert_eq!((a.attempts, b.attempts), (2, 2), "b sent again behind a");
        let [pa, pb, pc] = ["a", "b", "c"].map(bytes::Bytes::from);
        assert_eq!(
            transport.calls(),
            vec![vec![pa.clone(), pb.clone(), pc], vec![pa, pb]]
        );
        producer.flush().await;
        let totals = producer.stats().totals;
        assert_eq!(
            (totals.delivered, totals.failed),
            (3, 0),
            "each counted once"
        );
    }

    /// Strict ordering with batches pipelined: a later batch's early acknowledgements wait until
    /// every batch before it is clear (landed, or answered whole), then go before the batch
    /// returns.
    #[tokio::test]
    async fn a_later_batch_answers_early_only_once_the_batches_before_it_are_clear() {
        let transport = Early::ordered(vec![
            Call::default(),
            Call {
                early: vec![0],
                ..Call::default()
            },
        ]);
        let producer = Producer::builder(transport.clone())
            .batching(batches_of(1))
            .pipeline_depth(2)
            .build()
            .expect("build");
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut fates = Vec::new();
        for p in ["a", "b"] {
            let fate = producer.try_send(Message::new("t", p)).expect("accepted");
            let order = order.clone();
            fates.push(tokio::spawn(async move {
                let d = fate.await.expect("delivered");
                order.lock().expect("order").push(p);
                d
            }));
        }
        // Both calls out; b's acknowledged early, a's not answered at all yet.
        transport.acked.notified().await;
        transport.acked.notified().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            order.lock().expect("order").is_empty(),
            "b waits for a's batch"
        );
        transport.gates[0].notify_one();
        let b = fates.pop().expect("b");
        let b = tokio::time::timeout(Duration::from_secs(10), b)
            .await
            .expect("b answered while its batch is still out")
            .expect("b's task");
        assert_eq!(b.ack.offset, Some(7), "answered early");
        assert_eq!(*order.lock().expect("order"), ["a", "b"]);
        assert_eq!(
            producer.stats().in_flight_batches,
            1,
            "b's batch is still out"
        );
        transport.gates[1].notify_one();
        producer.flush().await;
        assert_eq!(producer.stats().totals.delivered, 2);
    }

    /// A transport that panics when told of messages delivered but held: the panic is
    /// contained, the messages are sent again behind the failed one and delivered. Before, the
    /// panic unwound through the dispatcher under its state lock, and the batch's fates were
    /// lost with it.
    #[tokio::test]
    async fn a_transport_panicking_when_told_of_held_messages_loses_no_fate() {
        let mut transport = Early::new(vec![Call {
            fail: vec![0],
            ..Call::default()
        }]);
        std::sync::Arc::get_mut(&mut transport)
            .expect("not shared yet")
            .panics_on_held = true;
        let producer = retrying_in_batches_of(&transport, 2);
        let a = producer
            .try_send(Message::new("t", "a").with_key("k"))
            .expect("accepted");
        let b = producer
            .try_send(Message::new("t", "b").with_key("k"))
            .expect("accepted");
        transport.gates[0].notify_one();
        let (a, b) = tokio::time::timeout(Duration::from_secs(10), async { (a.await, b.await) })
            .await
            .expect("both end");
        assert_eq!(a.expect("a delivered").attempts, 2);
        assert_eq!(b.expect("b delivered").attempts, 2, "sent again behind a");
    }

    /// Strict ordering, two batches out: the later one's message, of another key, is
    /// acknowledged early but waits for the earlier batch (the gate). Both are cut off at their
    /// deadline: the acknowledged message is delivered all the same. Before, its acknowledgement
    /// was thrown away with the cut-off and it ended in `DeliveryTimeout`.
    #[tokio::test(start_paused = true)]
    async fn an_acknowledgement_held_by_the_gate_survives_the_cut_off() {
        let transport = Early::ordered(vec![
            Call {
                hang: true,
                ..Call::default()
            },
            Call {
                early: vec![0],
                hang: true,
                ..Call::default()
            },
        ]);
        let producer = Producer::builder(transport.clone())
            .batching(batches_of(1))
            .pipeline_depth(2)
            .delivery_timeout(Duration::from_secs(30))
            .build()
            .expect("build");
        let a = producer
            .try_send(Message::new("t", "a").with_key("x"))
            .expect("accepted");
        let b = producer
            .try_send(Message::new("t", "b").with_key("y"))
            .expect("accepted");
        let b = tokio::time::timeout(Duration::from_secs(120), b)
            .await
            .expect("b ends")
            .expect("b was acknowledged: delivered");
        assert_eq!(b.ack.offset, Some(7));
        let a = tokio::time::timeout(Duration::from_secs(120), a)
            .await
            .expect("a ends");
        assert!(a.is_err(), "a never got an answer");
    }

    /// Relaxed ordering: a message acknowledged early stays delivered when herald cuts its
    /// batch off at the deadline, and is not sent again; the other message of the batch times
    /// out.
    #[tokio::test(start_paused = true)]
    async fn a_message_acknowledged_early_stays_delivered_when_its_batch_is_cut_off() {
        for ordering in [OrderingMode::Strict, OrderingMode::Relaxed] {
            let transport = Early::new(vec![Call {
                early: vec![0],
                hang: true,
                ..Call::default()
            }]);
            let producer = Producer::builder(transport.clone())
                .batching(batches_of(2))
                .ordering(ordering)
                .delivery_timeout(Duration::from_secs(30))
                .build()
                .expect("build");
            let first = producer.try_send(Message::new("t", "a")).expect("accepted");
            let second = producer.try_send(Message::new("t", "b")).expect("accepted");
            assert_eq!(first.await.expect("delivered").ack.offset, Some(7));
            let e = second.await.expect_err("never acknowledged");
            assert!(
                matches!(e.reason(), crate::FailureReason::DeliveryTimeout { .. }),
                "{e}"
            );
            producer.flush().await;
            let totals = producer.stats().totals;
            assert_eq!((totals.delivered, totals.failed), (1, 1), "{ordering:?}");
            assert_eq!(
                transport.calls().len(),
                1,
                "the delivered message is not sent again"
            );
        }
    }

    /// A task the runtime drops before its first poll (one spawned while the runtime shuts
    /// down) must still land its batch: here the flight's future is made and dropped unpolled.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_flight_dropped_before_its_first_poll_still_lands_its_batch() {
        let linger = Duration::from_secs(3600);
        let producer = Producer::builder(Accepts)
            .batching(herald_batch::SizeOrLinger::new(100, 1 << 20, linger))
            .delivery_timeout(linger * 2)
            .build()
            .expect("build");
        let fate = producer.try_send(Message::new("t", "m")).expect("accepted");
        let shared = producer.handle.shared.clone();
        let flight = {
            let mut st = shared.lock();
            let (destination, (msg, mut meta)) =
                st.acc.drain_all().pop().expect("the message is queued");
            meta.attempts += 1;
            st.in_flight += 1;
            let turn = OrderingMode::Strict.start(&mut st.lanes, &destination);
            Flight {
                destination,
                messages: vec![msg],
                metas: vec![meta],
                turn,
                circuit: st.breaker.generation(),
            }
        };
        drop(send_flight(Sending::new(shared.clone(), flight)));
        {
            let st = shared.lock();
            assert_eq!(st.in_flight, 0, "the in-flight slot is freed");
            assert_eq!(
                st.parked.len(),
                1,
                "the batch landed as a transient failure, to retry"
            );
        }
        // And the message goes out on its retry.
        producer.flush().await;
        assert_eq!(fate.await.expect("delivered").attempts, 2);
    }

    /// A dispatcher task that ends without a close (here: aborted, as a runtime dropping it
    /// would) makes the producer unhealthy and says why; a closed one does not.
    #[tokio::test]
    async fn a_dispatcher_gone_without_a_close_shows_in_health() {
        let producer = Producer::builder(Accepts).build().expect("build");
        assert!(!producer
            .health()
            .issues
            .contains(&crate::HealthIssue::PipelineStopped));
        let task = producer
            .handle
            .dispatcher
            .lock()
            .expect("lock")
            .take()
            .expect("the dispatcher's handle");
        task.abort();
        let _aborted = task.await;
        let health = producer.health();
        assert!(
            health.issues.contains(&crate::HealthIssue::PipelineStopped),
            "{health:?}"
        );
        assert_eq!(health.status, crate::HealthStatus::Unhealthy);

        let closed = Producer::builder(Accepts).build().expect("build");
        closed.close(Duration::from_secs(5)).await;
        assert!(!closed
            .health()
            .issues
            .contains(&crate::HealthIssue::PipelineStopped));
    }

    /// A transport whose close takes a second, and says when it has finished.
    struct SlowClose(Arc<std::sync::atomic::AtomicBool>);
    #[async_trait]
    impl Transport for SlowClose {
        fn name(&self) -> &'static str {
            "slow-close"
        }
        async fn send_batch(&self, _: &Destination, batch: &[Message]) -> BatchOutcome {
            batch.iter().map(|_| Ok(Ack::default())).collect()
        }
        async fn close(&self) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.0.store(true, Ordering::Release);
        }
    }

    /// Two `close` calls at once (two clones, two tasks) both return after the transport is
    /// closed. The second returned at once, while the first waited: a program ending on it
    /// could stop before the transport had flushed.
    #[tokio::test(start_paused = true)]
    async fn every_close_waits_for_the_transport_s_close() {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let a = Producer::builder(SlowClose(done.clone()))
            .build()
            .expect("build");
        let b = a.clone();
        let closes = [a, b].map(|p| {
            let done = done.clone();
            tokio::spawn(async move {
                let report = p.close(Duration::from_secs(5)).await;
                (report.drained, done.load(Ordering::Acquire))
            })
        });
        for close in closes {
            assert_eq!(close.await.expect("no panic"), (true, true));
        }
    }
}
