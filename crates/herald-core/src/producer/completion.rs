//! How a message's fate reaches whoever is waiting for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use super::contain::contain;
use crate::error::SendError;
use crate::transport::Ack;

/// A message the broker acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// What the broker said (partition, offset) where it says anything.
    pub ack: Ack,
    /// Attempts it took (1 when no retry was needed).
    pub attempts: u32,
    /// From acceptance by the producer to acknowledgement.
    pub latency: Duration,
}

pub(crate) type Outcome = Result<Delivery, SendError>;

/// Where failures go when their caller no longer listens (a dropped [`DeliveryFuture`] or
/// [`BulkReceipt`]): the unclaimed hook if one is set, else a list that
/// [`crate::Producer::close`] returns. Never dropped on the floor.
pub(crate) struct Unclaimed {
    hook: Option<UnclaimedHook>,
    list: Mutex<Vec<SendError>>,
    count: AtomicU64,
    metric: metrics::Counter,
    hook_panics: metrics::Counter,
}

/// A function called with every failed message whose caller stopped listening (see
/// [`crate::ProducerBuilder::on_unclaimed`]).
pub type UnclaimedHook = Arc<dyn Fn(SendError) + Send + Sync>;

/// The old name of [`UnclaimedHook`].
#[deprecated(
    note = "renamed `UnclaimedHook`: \"dead letter\" names the herald command's file of every failure"
)]
pub type DeadLetterHook = UnclaimedHook;

impl Unclaimed {
    pub(crate) fn new(
        hook: Option<UnclaimedHook>,
        metric: metrics::Counter,
        hook_panics: metrics::Counter,
    ) -> Self {
        Self {
            hook,
            list: Mutex::new(Vec::new()),
            count: AtomicU64::new(0),
            metric,
            hook_panics,
        }
    }
    pub(crate) fn put(&self, e: SendError) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.metric.increment(1);
        let e = match &self.hook {
            // The hook gets a copy (a failure path: cheap enough), so that if it panics the
            // failure is kept for `close` instead of lost with the unwind.
            Some(hook) => match contain(|| hook(e.clone())) {
                Ok(()) => return,
                Err(_) => {
                    self.hook_panics.increment(1);
                    e
                }
            },
            None => e,
        };
        self.list
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(e);
    }
    pub(crate) fn take(&self) -> Vec<SendError> {
        std::mem::take(&mut *self.list.lock().unwrap_or_else(PoisonError::into_inner))
    }
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The last place an unclaimed failure can be lost: the producer went away (dropped, its runtime
/// stopped) without a `close` to hand the list back. The failures were counted
/// (`herald_messages_unclaimed_total`); this says so in the log too, once, with how many.
impl Drop for Unclaimed {
    fn drop(&mut self) {
        let left = self
            .list
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if left > 0 {
            tracing::warn!(
                unclaimed = left,
                "herald producer dropped without close(): failed messages nobody claimed are lost"
            );
        }
    }
}

/// The shared state of one [`crate::Producer::send_all`] call.
pub(crate) struct Group {
    /// Messages not yet ended, plus one while the call is still submitting.
    remaining: AtomicUsize,
    delivered: AtomicU64,
    /// Failures for the receipt; `None` once the receipt is gone, and then failures go to the
    /// unclaimed sink. One mutex for both, so a failure landing while the receipt is dropped
    /// goes to exactly one of the two places.
    failures: Mutex<Option<Vec<SendError>>>,
    done: Notify,
    unclaimed: Arc<Unclaimed>,
}

impl Group {
    pub(crate) fn new(unclaimed: Arc<Unclaimed>) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicUsize::new(1),
            delivered: AtomicU64::new(0),
            failures: Mutex::new(Some(Vec::new())),
            done: Notify::new(),
            unclaimed,
        })
    }
    /// Counts `n` more messages that will end through this group.
    pub(crate) fn add(&self, n: usize) {
        self.remaining.fetch_add(n, Ordering::Relaxed);
    }
    /// Records a failure that never entered the buffer.
    pub(crate) fn fail_now(&self, e: SendError) {
        self.add(1);
        self.end(Err(e));
    }
    fn end(&self, outcome: Outcome) {
        match outcome {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let orphan = {
                    let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
                    match failures.as_mut() {
                        Some(list) => {
                            list.push(e);
                            None
                        }
                        None => Some(e),
                    }
                };
                if let Some(e) = orphan {
                    self.unclaimed.put(e);
                }
            }
        }
        self.end_one();
    }
    /// Ends `n` messages at once, all delivered.
    pub(crate) fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if self.remaining.fetch_sub(n, Ordering::AcqRel) == n {
            self.done.notify_one();
        }
    }
    /// Ends the submission guard (or one message).
    pub(crate) fn end_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }
}

/// Who hears about one message.
pub(crate) enum Completion {
    One(oneshot::Sender<Outcome>),
    Group(Arc<Group>),
    /// [`crate::Producer::enqueue_tagged`]: the sink, and the caller's tag for the message.
    Tagged(Arc<dyn FateSink>, u64),
    /// Told already: the transport acknowledged the message before its batch returned (see
    /// [`crate::Transport::send_batch_answering`]). Its batch may still be in flight, but its
    /// fate was given: it stays delivered and is not sent again.
    Answered,
}

/// Fates of tagged messages that end together, gathered per sink and handed over with one
/// [`FateSink::fates`] call per run of one sink, in the order the messages ended. Other
/// completions run at once. [`TaggedRun::flush`] hands over the last run (dropped unflushed,
/// it hands it over then).
pub(crate) struct TaggedRun<'a> {
    unclaimed: &'a Unclaimed,
    sink: Option<Arc<dyn FateSink>>,
    fates: Vec<(u64, Outcome)>,
    /// How many fates may come: room for them is made once, when a run starts, instead of
    /// the run's vector growing (and moving every fate) as they come.
    at_most: usize,
}

impl<'a> TaggedRun<'a> {
    /// A run for at most `at_most` completions.
    pub(crate) fn new(unclaimed: &'a Unclaimed, at_most: usize) -> Self {
        Self {
            unclaimed,
            sink: None,
            fates: Vec::new(),
            at_most,
        }
    }

    /// Completes `done` with `outcome`: a tagged fate joins the run of its sink.
    #[inline] // once per message: a call would move the outcome once more
    pub(crate) fn complete(&mut self, done: Completion, outcome: Outcome) {
        let Completion::Tagged(sink, tag) = done else {
            done.complete(outcome, self.unclaimed);
            return;
        };
        if !self.sink.as_ref().is_some_and(|s| Arc::ptr_eq(s, &sink)) {
            self.flush();
            self.sink = Some(sink);
            self.fates.reserve(self.at_most);
        }
        self.fates.push((tag, outcome));
    }

    /// Whether `done` would join the run gathered so far (a tagged fate for the same sink),
    /// rather than be told at once or make the run hand over what it holds first.
    pub(crate) fn joins(&self, done: &Completion) -> bool {
        matches!((done, &self.sink), (Completion::Tagged(sink, _), Some(s)) if Arc::ptr_eq(s, sink))
    }

    /// Hands the run gathered so far to its sink.
    pub(crate) fn flush(&mut self) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        let mut handing = Handing {
            fates: self.fates.drain(..),
            last_failure: None,
        };
        // A panicking sink loses only the news of a delivery: the failure it panicked on is
        // kept for `close`, and it is asked again with the rest (one that panicked before
        // taking anything gets the rest one by one, below).
        loop {
            let left = handing.fates.len();
            if contain(|| sink.fates(&mut handing)).is_ok() {
                break;
            }
            if let Some(e) = handing.last_failure.take() {
                self.unclaimed.put(e);
            }
            if handing.fates.len() == 0 || handing.fates.len() == left {
                break;
            }
        }
        // What a sink left untaken, one by one.
        for (tag, outcome) in handing.fates {
            Completion::Tagged(sink.clone(), tag).complete(outcome, self.unclaimed);
        }
    }
}

/// Yields a run's fates to its sink, keeping a copy of the failure it yielded last: the one a
/// panicking sink may not have taken.
struct Handing<'a> {
    fates: std::vec::Drain<'a, (u64, Outcome)>,
    last_failure: Option<SendError>,
}

impl Iterator for Handing<'_> {
    type Item = (u64, Outcome);

    fn next(&mut self) -> Option<Self::Item> {
        let fate = self.fates.next()?;
        self.last_failure = fate.1.as_ref().err().cloned();
        Some(fate)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.fates.size_hint()
    }
}

impl Drop for TaggedRun<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Completion {
    pub(crate) fn complete(self, outcome: Outcome, unclaimed: &Unclaimed) {
        match self {
            Completion::One(tx) => {
                if let Err(Err(e)) = tx.send(outcome) {
                    unclaimed.put(e);
                }
            }
            Completion::Group(g) => g.end(outcome),
            Completion::Answered => {}
            Completion::Tagged(sink, tag) => match outcome {
                Ok(d) => {
                    // A panicking sink loses only the news of a delivery.
                    let _contained = contain(|| sink.fate(tag, Ok(d)));
                }
                Err(e) => {
                    // A failure the sink could not take (it panicked) is kept for `close`.
                    if contain(|| sink.fate(tag, Err(e.clone()))).is_err() {
                        unclaimed.put(e);
                    }
                }
            },
        }
    }
}

/// Where [`crate::Producer::enqueue_tagged`] reports each message's fate: once per message,
/// with the tag the caller gave it, from one of the producer's tasks (keep it short: count, or
/// send it on to a channel). A closure `Fn(u64, Result<Delivery, SendError>)` is one.
///
/// A sink instead of a future per message holds no memory per waiting message: with a
/// [store](crate::ProducerBuilder::store), millions can wait in it during an outage at the
/// cost of a few bytes each, or none for consecutive tags.
pub trait FateSink: Send + Sync + 'static {
    /// The fate of the message tagged `tag`: delivered, or handed back with why not.
    fn fate(&self, tag: u64, outcome: Result<Delivery, SendError>);

    /// The fates of several messages that ended together (the acknowledged messages of a batch,
    /// say), in the order they ended. By default each goes through [`FateSink::fate`]; a sink
    /// that sends fates on (to a channel) can send them in one piece here instead of paying for
    /// each. Take every fate from `fates`: any left are handed to `fate` one by one.
    ///
    /// A panic is contained as one of `fate` is: the failure taken last is kept for
    /// [`crate::Producer::close`]'s report, and the fates not taken yet are handed over in
    /// another call.
    fn fates(&self, fates: &mut dyn Iterator<Item = (u64, Result<Delivery, SendError>)>) {
        for (tag, outcome) in fates {
            self.fate(tag, outcome);
        }
    }
}

impl<F> FateSink for F
where
    F: Fn(u64, Result<Delivery, SendError>) + Send + Sync + 'static,
{
    fn fate(&self, tag: u64, outcome: Result<Delivery, SendError>) {
        self(tag, outcome);
    }
}

/// Resolves when the broker has acknowledged the message, or herald has given up on it.
///
/// Dropping it does not cancel the message: it is still delivered, and if it fails, its
/// [`SendError`] goes to the producer's unclaimed hook or to [`crate::Producer::close`]'s report.
#[must_use = "the message is sent either way; await this to learn its fate"]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Outcome>,
    unclaimed: Arc<Unclaimed>,
}

impl DeliveryFuture {
    pub(crate) fn new(rx: oneshot::Receiver<Outcome>, unclaimed: Arc<Unclaimed>) -> Self {
        Self { rx, unclaimed }
    }
}

impl std::fmt::Debug for DeliveryFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryFuture").finish_non_exhaustive()
    }
}

/// Dropped unpolled after its fate arrived (a `select!` that lost, a dropped
/// `FuturesUnordered`), a failure would vanish with it: it goes to the unclaimed sink instead.
/// Closing first settles the race with a fate arriving now: after `close`, the producer's send
/// fails and the producer itself diverts the failure; before it, `try_recv` finds the value.
impl Drop for DeliveryFuture {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Err(e)) = self.rx.try_recv() {
            self.unclaimed.put(e);
        }
    }
}

impl Future for DeliveryFuture {
    type Output = Result<Delivery, SendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            // Every pending entry is completed by a drop guard (see state.rs and stage.rs), so the sender
            // cannot vanish unanswered; if it ever did, pending forever would hide it, so say so.
            Poll::Ready(Err(_)) => {
                panic!("herald: a delivery was dropped unanswered (a bug: please report it)")
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What happened to the messages of one [`crate::Producer::send_all`] call.
#[derive(Debug, Default)]
pub struct BulkReport {
    /// Messages the broker acknowledged.
    pub delivered: u64,
    /// Messages herald gave up on, each handed back with its error.
    pub failed: Vec<SendError>,
}

impl BulkReport {
    /// Whether every message was delivered.
    pub fn all_delivered(&self) -> bool {
        self.failed.is_empty()
    }
}

/// The fate of a [`crate::Producer::send_all`] call's messages, as one future: one completion
/// for many messages, so sending in bulk costs no future per message.
///
/// Dropping it does not cancel anything; later failures go to the unclaimed hook or to
/// [`crate::Producer::close`]'s report.
#[must_use = "the messages are sent either way; await wait() to learn their fate"]
pub struct BulkReceipt {
    pub(crate) group: Arc<Group>,
}

impl BulkReceipt {
    /// Messages of the call not yet delivered or failed.
    pub fn pending(&self) -> usize {
        self.group.remaining.load(Ordering::Acquire)
    }

    /// Waits until every message of the call is delivered or failed.
    pub async fn wait(self) -> BulkReport {
        loop {
            let notified = self.group.done.notified();
            if self.group.remaining.load(Ordering::Acquire) == 0 {
                break;
            }
            notified.await;
        }
        let failed = self
            .group
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        BulkReport {
            delivered: self.group.delivered.load(Ordering::Acquire),
            failed,
        }
    }
}

impl std::fmt::Debug for BulkReceipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkReceipt")
            .field("pending", &self.pending())
            .finish()
    }
}

impl Drop for BulkReceipt {
    fn drop(&mut self) {
        let left = self
            .group
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        for e in left {
            self.group.unclaimed.put(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;
    use crate::error::FailureReason;
    use crate::message::Message;

    /// Counts warnings; just enough of a subscriber to see that one was written.
    #[derive(Default)]
    struct Warnings(Arc<AtomicUsize>);
    impl Subscriber for Warnings {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    fn unclaimed() -> Unclaimed {
        Unclaimed::new(None, metrics::Counter::noop(), metrics::Counter::noop())
    }

    #[test]
    fn unclaimed_failures_dropped_with_the_producer_are_logged() {
        let warnings = Arc::new(AtomicUsize::new(0));
        let subscriber = Warnings(warnings.clone());
        tracing::subscriber::with_default(subscriber, || {
            drop(unclaimed());
            assert_eq!(
                warnings.load(Ordering::Relaxed),
                0,
                "nothing lost, nothing said"
            );
            let list = unclaimed();
            list.put(SendError::new(
                Message::new("t", "m"),
                FailureReason::Closed,
                1,
            ));
            drop(list);
        });
        assert_eq!(warnings.load(Ordering::Relaxed), 1);
    }
}
