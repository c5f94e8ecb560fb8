//! The way in for a producer with a [`Store`]: a message is accepted once the store has it
//! durably, then one task (the admitter) moves stored messages into the buffer, in the store's
//! order, as room frees. What an earlier run left in the store goes in first.
//!
//! - [`Stage::submit`] gives messages their ids, hands them to the store and queues them for
//!   the admitter under one lock: the admitter's order is the store's order.
//! - Stored messages count in `Shared::unsettled` (flush and close wait for them) and in
//!   `State::staged` (the dispatcher does not stop before they are in) from the moment they are
//!   submitted; [`Shared::admit`] with `staged` takes them over.
//! - A store that fails to make messages durable fails them with
//!   [`FailureReason::Store`]: they were never accepted.
//! - Memory holds at most a buffer's worth of staged messages. Beyond that, with a store that
//!   [reads back](Store::reads_back), messages are *spilled*: once durable, their bodies are
//!   dropped and only their tokens and completions wait (for a `send_all` chunk, one
//!   completion for the chunk); the admitter reads the bodies back from the store when their
//!   turn comes. A store that does not read back makes submitters wait for room instead.
//! - Two tasks: the confirmer awaits each submission's durability in order (answering the
//!   submitters, dropping spilled bodies), never waiting for the buffer; the admitter moves
//!   confirmed messages into the buffer as room frees.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::completion::{BulkReceipt, Completion, FateSink, Group};
use super::state::{clock_now, Shared};
use crate::error::{FailureReason, SendError};
use crate::message::{Message, MessageId};
use crate::store::{Durable, Store, StoreError, StoreToken};

/// Stored messages on their way to the confirmer.
pub(crate) struct Pending {
    durable: Durable,
    entries: Entries,
    /// When they were submitted: their delivery deadline runs from then.
    accepted_at: Instant,
    /// Told whether the messages became durable (an `enqueue` waits for it).
    accepted: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// The messages of one submission.
enum Entries {
    /// Kept in memory until the pipeline takes them.
    Held(Staged),
    /// To be left in the store: their bodies are dropped once durable (not before: a store
    /// that fails hands them back).
    Spilling(Staged),
}

/// Stored messages with their completions, on their way through the stage's tasks. Dropped
/// with some still here (the tasks were dropped by their runtime shutting down), each is
/// answered as closed and kept in the store, for the next producer on it: a caller waiting on
/// another runtime hears of it instead of waiting for ever. Taken out whole ([`Staged::take`])
/// where the stage goes on with them.
struct Staged {
    items: Vec<(Message, Completion, StoreToken)>,
    shared: Arc<Shared>,
    /// To be left in the store once durable, counted in [`Stage::spilled`]; else held in
    /// memory, counted in [`Stage::bytes`].
    spilling: bool,
    /// The store made them durable (the confirmer saw it). Dropped before that, they are
    /// handed back as not kept: the store may never make them durable, and a caller told
    /// "kept" would not send them again.
    durable: bool,
}

impl Staged {
    fn len(&self) -> usize {
        self.items.len()
    }

    /// The messages, answered by whoever takes them.
    fn take(mut self) -> Vec<(Message, Completion, StoreToken)> {
        std::mem::take(&mut self.items)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let items = std::mem::take(&mut self.items);
        if items.is_empty() {
            return;
        }
        let (bytes, spilled) = if self.spilling {
            (0, items.len())
        } else {
            (items.iter().map(|(m, _, _)| m.size()).sum(), 0)
        };
        let durable = self.durable;
        let ended = items
            .into_iter()
            .map(|(msg, done, _)| (msg, done, FailureReason::Closed, durable, None))
            .collect();
        end_orphaned(&self.shared, ended, bytes, spilled, durable);
    }
}

/// Ends staged messages whose stage task went away with them (its runtime shut down): closed
/// unsent, kept in the store when it had made them `durable` (else refused, no longer counted
/// as accepted), and taken out of every count that holds them (the stage's `bytes` and
/// `spilled`, `State::staged`, `unsettled`), so that a `flush` or `close` awaited on another
/// runtime ends.
fn end_orphaned(
    shared: &Shared,
    ended: Vec<Unadmitted>,
    bytes: usize,
    spilled: usize,
    durable: bool,
) {
    if let Some(stage) = &shared.stage {
        stage.bytes.fetch_sub(bytes, Ordering::AcqRel);
        stage.spilled.fetch_sub(spilled, Ordering::AcqRel);
    }
    {
        let mut st = shared.lock();
        st.staged -= ended.len();
        if !durable {
            st.totals.accepted -= ended.len() as u64;
        }
    }
    end_unadmitted(shared, ended, durable);
    shared.wake.notify_one();
}

/// Messages left in the store: what it takes to read them back and answer for them.
struct Spilled {
    tokens: Tokens,
    dones: Dones,
    /// For answering messages dropped unanswered (see [`Staged`]).
    shared: Arc<Shared>,
    /// When they were submitted (see [`Pending::accepted_at`]).
    accepted_at: Instant,
    /// Their producer spans (feature `otel`), kept so that each ends with its message's fate;
    /// `None` when none has one.
    #[cfg(feature = "otel")]
    spans: Option<std::vec::IntoIter<Option<Box<tracing::Span>>>>,
}

impl Spilled {
    /// Drops the bodies of durable messages, keeping what answers for them.
    fn new(staged: Staged, accepted_at: Instant) -> Self {
        let shared = staged.shared.clone();
        let entries = staged.take();
        #[cfg(feature = "otel")]
        let mut spans = Vec::with_capacity(entries.len());
        let (tokens, dones): (Vec<StoreToken>, Vec<Completion>) = entries
            .into_iter()
            .map(|(msg, done, token)| {
                #[cfg(feature = "otel")]
                spans.push({
                    let mut msg = msg;
                    msg.span.take()
                });
                #[cfg(not(feature = "otel"))]
                drop(msg);
                (token, done)
            })
            .unzip();
        Self {
            tokens: Tokens::new(tokens),
            dones: Dones::new(dones),
            shared,
            accepted_at,
            #[cfg(feature = "otel")]
            spans: spans.iter().any(Option::is_some).then(|| spans.into_iter()),
        }
    }

    /// The next message's completion, and its span back on `msg` (feature `otel`).
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    fn next_done(&mut self, msg: &mut Message) -> Completion {
        #[cfg(feature = "otel")]
        if let Some(spans) = &mut self.spans {
            msg.span = spans.next().flatten();
        }
        self.dones.next().expect("a completion per token")
    }
}

/// Spilled messages still unanswered when dropped (see [`Staged`]): closed, kept in the store,
/// each handed back with an empty message (its body is in the store).
impl Drop for Spilled {
    fn drop(&mut self) {
        let ended: Vec<Unadmitted> = self
            .dones
            .by_ref()
            .map(|done| {
                let msg = Message::new("", bytes::Bytes::new());
                (msg, done, FailureReason::Closed, true, None)
            })
            .collect();
        if !ended.is_empty() {
            let n = ended.len();
            end_orphaned(&self.shared, ended, 0, n, true);
        }
    }
}

/// Tokens of spilled messages: a run when consecutive (a store's usual way), else each.
enum Tokens {
    Run { first: StoreToken, len: usize },
    Each(Vec<StoreToken>),
}

impl Tokens {
    fn new(tokens: Vec<StoreToken>) -> Self {
        match tokens.first() {
            Some(&first)
                if tokens
                    .iter()
                    .enumerate()
                    .all(|(i, &t)| Some(t) == first.checked_add(i as u64)) =>
            {
                Tokens::Run {
                    first,
                    len: tokens.len(),
                }
            }
            _ => Tokens::Each(tokens),
        }
    }

    fn len(&self) -> usize {
        match self {
            Tokens::Run { len, .. } => *len,
            Tokens::Each(t) => t.len(),
        }
    }

    fn get(&self, i: usize) -> StoreToken {
        match self {
            Tokens::Run { first, .. } => first + i as u64,
            Tokens::Each(t) => t[i],
        }
    }
}

/// Completions of spilled messages: one group for all (a `send_all` chunk), one sink with
/// consecutive tags (`enqueue_tagged`), else each.
enum Dones {
    Group(Arc<Group>, usize),
    Tagged {
        sink: Arc<dyn FateSink>,
        next: u64,
        left: usize,
    },
    Each(std::vec::IntoIter<Completion>),
}

impl Dones {
    fn new(dones: Vec<Completion>) -> Self {
        match dones.first() {
            Some(Completion::Group(first))
                if dones
                    .iter()
                    .all(|d| matches!(d, Completion::Group(g) if Arc::ptr_eq(g, first))) =>
            {
                Dones::Group(first.clone(), dones.len())
            }
            Some(Completion::Tagged(first, tag))
                if dones.iter().enumerate().all(|(i, d)| {
                    matches!(d, Completion::Tagged(s, t)
                        if Arc::ptr_eq(s, first) && Some(*t) == tag.checked_add(i as u64))
                }) =>
            {
                Dones::Tagged {
                    sink: first.clone(),
                    next: *tag,
                    left: dones.len(),
                }
            }
            _ => Dones::Each(dones.into_iter()),
        }
    }
}

impl Iterator for Dones {
    type Item = Completion;
    fn next(&mut self) -> Option<Completion> {
        match self {
            Dones::Group(_, 0) | Dones::Tagged { left: 0, .. } => None,
            Dones::Group(g, n) => {
                *n -= 1;
                Some(Completion::Group(g.clone()))
            }
            Dones::Tagged { sink, next, left } => {
                *left -= 1;
                let tag = *next;
                // The last tag may be `u64::MAX`: nothing comes after it.
                *next = next.wrapping_add(1);
                Some(Completion::Tagged(sink.clone(), tag))
            }
            Dones::Each(each) => each.next(),
        }
    }
}

/// Confirmed submissions on their way to the admitter (held ones with the time they were
/// submitted).
enum Ready {
    Held(Staged, Instant),
    Spilled(Spilled),
}

/// The store and the queue to the admitter.
pub(crate) struct Stage {
    store: Arc<dyn Store>,
    /// `None` once the producer closes: nothing more is submitted, and the admitter ends when
    /// it has taken what is queued.
    queue: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    /// Bytes of the messages stored, held in memory and not yet taken by the admitter: with
    /// the count held (`State::staged` less `spilled`), what bounds the memory they hold.
    bytes: AtomicUsize,
    /// Messages spilled (left in the store) and not yet read back. While any are, every new
    /// submission is spilled too: the store's order is the admitter's.
    spilled: AtomicUsize,
    /// Whether the store reads back ([`Store::reads_back`]): whether messages may spill.
    reads_back: bool,
}

/// Why [`Stage::submit`] did not take messages: handed back with them (and with the sender
/// that was to be told they were durable, for the next try).
pub(crate) struct NotStored {
    pub(crate) entries: Vec<(Message, Completion)>,
    pub(crate) reason: FailureReason,
    pub(crate) durable: Option<oneshot::Sender<Result<(), StoreError>>>,
}

impl Stage {
    /// A stage over `store`, and the receiving end for [`run_admitter`].
    pub(crate) fn new(store: Arc<dyn Store>) -> (Self, mpsc::UnboundedReceiver<Pending>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                reads_back: store.reads_back(),
                store,
                queue: Mutex::new(Some(tx)),
                bytes: AtomicUsize::new(0),
                spilled: AtomicUsize::new(0),
            },
            rx,
        )
    }

    /// The store.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// No more submissions: the admitter ends once it has taken what is queued.
    pub(crate) fn close(&self) {
        let sender = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Dropped after the lock: with the receiver gone (a runtime shut down), the last
        // sender's drop drops what is left in the channel, whose guards answer those messages
        // (the caller's code, which may submit again).
        drop(sender);
    }

    /// Stores `entries` (ids given first) and queues them for the admitter; `accepted` is told
    /// when they are durable. Refuses them all, handing them back, when the producer is closed
    /// or the store cannot take them ([`StoreError::is_full`]: the caller may wait for room),
    /// or when memory holds a buffer's worth of stored messages and the store does not read
    /// back ([`FailureReason::BufferFull`]: likewise).
    #[allow(clippy::result_large_err)] // handed straight back to the caller
    pub(crate) fn submit(
        &self,
        shared: &Arc<Shared>,
        mut entries: Vec<(Message, Completion)>,
        accepted: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Result<(), NotStored> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let millis = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        for (msg, _) in &mut entries {
            msg.id_or_insert_with(|| MessageId::v7(millis, fastrand::u128(..)));
        }
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = queue.as_ref() else {
            return Err(NotStored {
                entries,
                reason: FailureReason::Closed,
                durable: accepted,
            });
        };
        // Stored messages wait in memory until the admitter takes them: at most a buffer's
        // worth (the submissions are serialised by `queue`, and the admitter only lowers it);
        // beyond that they are spilled, or refused when the store cannot read them back.
        let staged = shared.lock().staged;
        let spilled = self.spilled.load(Ordering::Acquire);
        let held = staged.saturating_sub(spilled);
        let bytes: usize = entries.iter().map(|(m, _)| m.size()).sum();
        let held_bytes = self.bytes.load(Ordering::Acquire);
        let over = held > 0
            && (held + entries.len() > shared.config.max_buffered_messages
                || held_bytes + bytes > shared.config.max_buffered_bytes);
        let spill = self.reads_back && (over || spilled > 0);
        if over && !spill {
            return Err(NotStored {
                entries,
                reason: FailureReason::BufferFull,
                durable: accepted,
            });
        }
        let messages: Vec<Message> = entries.iter().map(|(m, _)| m.clone()).collect();
        let submitted = match self.store.submit(&messages) {
            Ok(s) => s,
            Err(e) => {
                return Err(NotStored {
                    entries,
                    reason: FailureReason::Store(e),
                    durable: accepted,
                })
            }
        };
        drop(messages);
        let n = entries.len();
        shared.accept_stored(n, false);
        if spill {
            self.spilled.fetch_add(n, Ordering::AcqRel);
        } else {
            self.bytes.fetch_add(bytes, Ordering::AcqRel);
        }
        let entries = Staged {
            items: entries
                .into_iter()
                .zip(submitted.tokens)
                .map(|((msg, done), token)| (msg, done, token))
                .collect(),
            shared: shared.clone(),
            spilling: spill,
            durable: false,
        };
        let entries = if spill {
            Entries::Spilling(entries)
        } else {
            Entries::Held(entries)
        };
        // The send fails only when the stage's tasks are gone (their runtime shut down): the
        // submission is then answered as closed by its drop, after the queue's lock is let go
        // (an answer runs the caller's code, which may submit again).
        let unsent = tx
            .send(Pending {
                durable: submitted.durable,
                entries,
                accepted,
                accepted_at: clock_now(),
            })
            .err();
        drop(queue);
        drop(unsent);
        Ok(())
    }
}

/// Counts the recovery as one unsettled message until it has read the store to the end, and
/// marks the state as recovering: a `flush` or `close` right after build waits for what the
/// store held, and the dispatcher does not stop before it is in. Called by `build`, before the
/// admitter starts.
pub(crate) fn hold_for_recovery(shared: &Shared) {
    shared.lock().recovering = true;
    shared.unsettled.fetch_add(1, Ordering::Relaxed);
}

/// Ends [`hold_for_recovery`].
fn recovery_done(shared: &Shared) {
    shared.lock().recovering = false;
    if shared.unsettled.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.idle.notify_waiters();
    }
    shared.wake.notify_one();
}

/// The admitter: first what the store recovered, then every submission in order, each once
/// durable (the confirmer's part), into the buffer as room frees. Ends when the stage is
/// closed and its queue empty.
///
/// The recovery's hold ([`hold_for_recovery`]) ends with the recovery, or when this task is
/// dropped before that (its runtime shut down, even before it first ran).
pub(crate) fn run_admitter(
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    queue: mpsc::UnboundedReceiver<Pending>,
) -> impl std::future::Future<Output = ()> {
    /// Ends the recovery's hold when dropped.
    struct Recovering(Arc<Shared>);
    impl Drop for Recovering {
        fn drop(&mut self) {
            recovery_done(&self.0);
        }
    }
    let recovering = Recovering(shared.clone());
    async move {
        let (ready_tx, ready) = mpsc::unbounded_channel();
        tokio::spawn(run_confirmer(shared.clone(), queue, ready_tx));
        recover(&shared, &store).await;
        drop(recovering);
        admit_confirmed(&shared, &store, ready).await;
    }
}

/// The admitter's part after the recovery: each confirmed submission into the buffer.
async fn admit_confirmed(
    shared: &Arc<Shared>,
    store: &Arc<dyn Store>,
    mut ready: mpsc::UnboundedReceiver<Ready>,
) {
    let mut reading = ReadBack::default();
    while let Some(confirmed) = ready.recv().await {
        match confirmed {
            Ready::Held(entries, accepted_at) => {
                admit_all(shared, entries.take(), accepted_at).await;
            }
            Ready::Spilled(spilled) => {
                admit_spilled(shared, store, &mut reading, spilled).await;
            }
        }
    }
}

/// Waits for `durable`; a panic of the store's future (user code, with a store of one's own)
/// is a failure of the store, counted at site `store`, rather than the end of the confirmer
/// (whose submissions would all be refused from then on).
async fn durable_contained(shared: &Shared, mut durable: Durable) -> Result<(), StoreError> {
    std::future::poll_fn(
        |cx| match super::contain::contain(|| durable.as_mut().poll(cx)) {
            Ok(poll) => poll,
            Err(panic) => {
                shared.metrics.panic_counter("store").increment(1);
                std::task::Poll::Ready(Err(StoreError::failed(format!(
                    "the store panicked making messages durable: {panic}"
                ))))
            }
        },
    )
    .await
}

/// The confirmer: waits for each submission to be durable, in order, and tells its
/// submitter; drops the bodies of spilled messages then; passes the submission on to the
/// admitter, or fails it if the store could not make it durable. It never waits for the
/// buffer: a sender is answered as soon as its message is durable, however long the
/// pipeline is stalled.
async fn run_confirmer(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    ready: mpsc::UnboundedSender<Ready>,
) {
    while let Some(pending) = queue.recv().await {
        let result = durable_contained(&shared, pending.durable).await;
        // Counted before the submitter hears it was accepted.
        if result.is_ok() {
            let (Entries::Held(entries) | Entries::Spilling(entries)) = &pending.entries;
            shared.count_durable(entries.len());
        }
        if let Some(tx) = pending.accepted {
            let _told = tx.send(result.clone());
        }
        let confirmed = match (result, pending.entries) {
            (Ok(()), Entries::Held(mut entries)) => {
                entries.durable = true;
                Ready::Held(entries, pending.accepted_at)
            }
            (Ok(()), Entries::Spilling(entries)) => {
                Ready::Spilled(Spilled::new(entries, pending.accepted_at))
            }
            (Err(e), entries) => {
                fail_unstored(&shared, entries, &e);
                continue;
            }
        };
        // The admitter lives as long as this sender (it ends when this task does).
        let _queued = ready.send(confirmed);
    }
}

/// The admitter's reading back of spilled messages.
#[derive(Default)]
struct ReadBack {
    /// What a read returned beyond the submission that asked for it.
    ahead: VecDeque<(StoreToken, Message)>,
    /// The last read failed: the next is tried once, not waited for, so that a store that
    /// cannot read fails the spilled submissions behind it at once, not each after a wait.
    failing: bool,
}

/// Reads spilled messages back from the store, a batch at a time, and admits them in order.
/// A message the store cannot give back is handed back as failed.
async fn admit_spilled(
    shared: &Arc<Shared>,
    store: &Arc<dyn Store>,
    reading: &mut ReadBack,
    spilled: Spilled,
) {
    const READ: usize = 1024;
    let ahead = &mut reading.ahead;
    let mut spilled = spilled;
    let count = spilled.tokens.len();
    let mut next = 0;
    while next < count {
        if shared.lock().abandoned {
            // A close gave up on what is queued: the rest is closed unsent, kept in the store
            // for the next producer, and not read back only to be refused (a backlog can be
            // the whole store).
            let closed = (next..count)
                .map(|_| unread(&mut spilled, FailureReason::Closed, true))
                .collect();
            end_spilled(shared, closed);
            return;
        }
        if ahead.is_empty() {
            // A whole read's worth, whatever this submission's size: what comes back beyond it
            // is the next submissions' (spilled in store order), kept in `ahead` for them, so
            // that a backlog of single-message submissions (`try_send`, `enqueue`) is read
            // back a batch at a time, not with one blocking call per message.
            let want = READ;
            let tries = if reading.failing { 1 } else { READ_TRIES };
            match read_back(store, spilled.tokens.get(next), want, tries).await {
                Ok(batch) => {
                    reading.failing = false;
                    ahead.extend(batch);
                }
                Err(e) => {
                    reading.failing = true;
                    // What is left of this submission cannot be read now: handed back, and
                    // kept in the store (the next producer on it tries again).
                    let lost = (next..count).map(|_| unreadable(&mut spilled, e.clone(), true));
                    fail_unreadable(shared, store, lost.collect());
                    return;
                }
            }
        }
        let mut entries = Vec::new();
        let mut lost = Vec::new();
        let mut bytes = 0;
        while next < count {
            let Some(&(token, _)) = ahead.front() else {
                break;
            };
            let wanted = spilled.tokens.get(next);
            if token < wanted {
                // Not one of the spilled (held in memory): not needed.
                ahead.pop_front();
                continue;
            }
            next += 1;
            if token > wanted {
                let e = StoreError::failed(format!(
                    "{} could not give the message back (a damaged record)",
                    store.describe()
                ));
                // Its record is gone (the store skipped it as damaged): not kept.
                lost.push(unreadable(&mut spilled, e, false));
                continue;
            }
            let (token, mut msg) = ahead.pop_front().expect("looked at");
            bytes += msg.size();
            let done = spilled.next_done(&mut msg);
            entries.push((msg, done, token));
        }
        if let Some(stage) = &shared.stage {
            // (`fail_unreadable` counts the lost ones out.)
            stage.spilled.fetch_sub(entries.len(), Ordering::AcqRel);
            stage.bytes.fetch_add(bytes, Ordering::AcqRel);
        }
        if !lost.is_empty() {
            fail_unreadable(shared, store, lost);
        }
        admit_all(shared, entries, spilled.accepted_at).await;
    }
}

/// Reads back tried before a spilled submission is given up on: about 9 s of waiting.
const READ_TRIES: u32 = 50;

/// Up to `max` stored messages from `first` on, waiting (up to `tries` reads) for the store
/// to have any: spilled messages are durable, so it has, unless it lost them. An error when
/// it cannot read, or gives nothing for long.
async fn read_back(
    store: &Arc<dyn Store>,
    first: StoreToken,
    max: usize,
    tries: u32,
) -> Result<Vec<(StoreToken, Message)>, StoreError> {
    let mut last = None;
    for attempt in 0..tries {
        let reader = store.clone();
        match tokio::task::spawn_blocking(move || reader.read_from(first, max)).await {
            Ok(Ok(batch)) if !batch.is_empty() => return Ok(batch),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => last = Some(e),
            Err(e) => last = Some(StoreError::failed(format!("reading back failed: {e}"))),
        }
        if attempt + 1 < tries {
            tokio::time::sleep(Duration::from_millis(20) * attempt.min(10)).await;
        }
    }
    Err(last.unwrap_or_else(|| {
        StoreError::failed(format!(
            "{} gave nothing back from token {first} on (a damaged record?)",
            store.describe()
        ))
    }))
}

/// The next spilled message, which the store could not give back: an empty message (its body
/// is what could not be read), its completion and why.
/// `kept`: the store still holds it (a read that failed), and the next producer on it sends
/// it; else its record is lost.
fn unreadable(spilled: &mut Spilled, e: StoreError, kept: bool) -> Unadmitted {
    unread(spilled, FailureReason::Store(e), kept)
}

/// The next spilled message, ended unread: an empty message (its body stays in the store),
/// its completion, why, and whether the store still holds it.
fn unread(spilled: &mut Spilled, reason: FailureReason, kept: bool) -> Unadmitted {
    let mut msg = Message::new("", bytes::Bytes::new());
    let done = spilled.next_done(&mut msg);
    (msg, done, reason, kept, None)
}

/// Hands back spilled messages the store could not give back, failed with the store's error
/// (marked kept where the store still holds them). Not settled: the store keeps what it has
/// of them, and reports any damage itself.
fn fail_unreadable(shared: &Shared, store: &Arc<dyn Store>, lost: Vec<Unadmitted>) {
    tracing::error!(
        store = %store.describe(),
        messages = lost.len(),
        "messages accepted into the store could not be read back from it: handed back as failed"
    );
    end_spilled(shared, lost);
}

/// Ends spilled messages without admitting them (see [`unread`]).
fn end_spilled(shared: &Shared, ended: Vec<Unadmitted>) {
    if let Some(stage) = &shared.stage {
        stage.spilled.fetch_sub(ended.len(), Ordering::AcqRel);
    }
    shared.lock().staged -= ended.len();
    end_unadmitted(shared, ended, true);
    shared.wake.notify_one();
}

/// How long recovery waits before each new try at a read of the store that failed: about 3 s
/// in all, then it gives up on the rest.
const RECOVERY_RETRIES: [Duration; 5] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
];

/// Waits `pause`, or less if the producer starts closing meanwhile (which wakes every waiter
/// for space).
async fn pause_unless_closing(shared: &Shared, pause: Duration) {
    let until = tokio::time::Instant::now() + pause;
    loop {
        let mut woken = pin!(shared.space.notified());
        woken.as_mut().enable();
        if shared.lock().closing {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(until) => return,
            () = woken => {}
        }
    }
}

/// Sends what an earlier run left in the store, before anything new. Failures go to the
/// unclaimed hook (or `close`'s report): nobody is waiting for these messages.
async fn recover(shared: &Arc<Shared>, store: &Arc<dyn Store>) {
    const READ: usize = 1024;
    let receipt = BulkReceipt {
        group: Group::new(shared.unclaimed.clone()),
    };
    let group = receipt.group.clone();
    // Failures of recovered messages go to the unclaimed sink.
    drop(receipt);
    let mut recovered = 0u64;
    let mut failed_reads = 0;
    loop {
        if shared.lock().abandoned {
            // A close ran out of time: what is not read yet stays stored for the next
            // producer, rather than read here only to be refused as closed.
            tracing::info!(
                store = %store.describe(),
                "the close ran out of time while reading back an earlier run's messages; the \
                 rest stay stored for the next producer on it"
            );
            break;
        }
        let reader = store.clone();
        let read = tokio::task::spawn_blocking(move || reader.recover(READ)).await;
        let batch = match read {
            Ok(Ok(batch)) => {
                failed_reads = 0;
                batch
            }
            // New messages wait behind what the store holds from the earlier run, so that
            // they do not overtake stored messages of their keys: a read that fails (a disk
            // error for a moment) is tried again, for a few seconds, before the producer
            // gives up on the rest and goes on without it.
            Ok(Err(e)) if failed_reads < RECOVERY_RETRIES.len() && !shared.lock().closing => {
                let pause = RECOVERY_RETRIES[failed_reads];
                failed_reads += 1;
                tracing::warn!(
                    store = %store.describe(),
                    error = %e,
                    retry_in = ?pause,
                    "reading back what the store holds from an earlier run failed; trying again \
                     (new messages wait behind it)"
                );
                pause_unless_closing(shared, pause).await;
                continue;
            }
            Ok(Err(e)) if shared.lock().closing => {
                tracing::warn!(
                    store = %store.describe(),
                    error = %e,
                    "reading back what the store holds from an earlier run failed as the \
                     producer closes; the rest of those messages stay stored for the next \
                     producer on it"
                );
                break;
            }
            Ok(Err(e)) => {
                tracing::error!(
                    store = %store.describe(),
                    error = %e,
                    "reading back what the store holds from an earlier run failed; the rest of \
                     those messages stay stored for the next producer on it, and new messages \
                     go on without waiting for them (they may overtake stored messages of the \
                     same key)"
                );
                break;
            }
            Err(e) => {
                tracing::error!(store = %store.describe(), error = %e, "recovery task failed");
                break;
            }
        };
        if batch.is_empty() {
            break;
        }
        let n = batch.len();
        recovered += n as u64;
        if let Some(stage) = &shared.stage {
            let bytes: usize = batch.iter().map(|(_, m)| m.size()).sum();
            stage.bytes.fetch_add(bytes, Ordering::AcqRel);
        }
        shared.accept_stored(n, true);
        group.add(n);
        let entries = batch
            .into_iter()
            .map(|(token, msg)| (msg, Completion::Group(group.clone()), token))
            .collect();
        // What an earlier run accepted gets a whole delivery timeout in this one.
        admit_all(shared, entries, clock_now()).await;
    }
    group.end_one();
    if recovered > 0 {
        tracing::info!(
            store = %store.describe(),
            messages = recovered,
            "sending what an earlier run left in the store, before anything new"
        );
    }
}

/// Moves stored messages into the buffer, in order, waiting for room as needed; their delivery
/// deadline runs from `accepted_at`.
async fn admit_all(
    shared: &Shared,
    entries: Vec<(Message, Completion, StoreToken)>,
    accepted_at: Instant,
) {
    /// What is left to admit: answered as [`Staged`] is if this call is dropped half-way.
    struct Left<'a> {
        entries: std::vec::IntoIter<(Message, Completion, StoreToken)>,
        waiting: Option<(Message, Completion, StoreToken)>,
        shared: &'a Shared,
    }
    impl Drop for Left<'_> {
        fn drop(&mut self) {
            let mut bytes = 0;
            let ended: Vec<Unadmitted> = self
                .waiting
                .take()
                .into_iter()
                .chain(&mut self.entries)
                .map(|(msg, done, _)| {
                    bytes += msg.size();
                    (msg, done, FailureReason::Closed, true, None)
                })
                .collect();
            if !ended.is_empty() {
                end_orphaned(self.shared, ended, bytes, 0, true);
            }
        }
    }
    let mut left = Left {
        entries: entries.into_iter(),
        waiting: None,
        shared,
    };
    loop {
        let mut space = pin!(shared.space.notified());
        space.as_mut().enable();
        let mut taken = 0;
        let Left {
            entries, waiting, ..
        } = &mut left;
        let next = std::iter::from_fn(|| waiting.take().or_else(|| entries.next())).map(
            |(msg, done, token)| {
                taken += msg.size();
                (msg, done, Some(token))
            },
        );
        let admission = shared.admit(next, Some(accepted_at), |_| {});
        if let Some(full) = &admission.full {
            taken -= full.msg.size();
        }
        if let Some(stage) = &shared.stage {
            stage.bytes.fetch_sub(taken, Ordering::AcqRel);
        }
        if admission.accepted > 0 || !admission.refused.is_empty() {
            // Submitters may be waiting for the stage to have room. (Only when some left it:
            // this wakes the `space` future above too, and a wake-up for nothing, with the
            // buffer full, would spin.)
            shared.space.notify_waiters();
        }
        let refused = admission.refused;
        if !refused.is_empty() {
            let ended = refused
                .into_iter()
                .map(|r| {
                    // A message closed unsent stays stored for the next producer; any other
                    // leaves the store once its error is handed over (dropped).
                    let kept = matches!(r.reason, FailureReason::Closed) && r.stored.is_some();
                    let settle = if kept { None } else { r.stored };
                    (r.msg, r.done, r.reason, kept, settle)
                })
                .collect();
            end_unadmitted(shared, ended, true);
        }
        match admission.full {
            Some(full) => {
                left.waiting = Some((
                    full.msg,
                    full.done,
                    full.stored.expect("staged messages have a token"),
                ));
                space.await;
            }
            None => break,
        }
    }
}

/// Fails messages the store could not make durable: they were never accepted.
fn fail_unstored(shared: &Shared, entries: Entries, e: &StoreError) {
    let entries = match (entries, &shared.stage) {
        (Entries::Held(entries), Some(stage)) => {
            let entries = entries.take();
            let bytes: usize = entries.iter().map(|(m, _, _)| m.size()).sum();
            stage.bytes.fetch_sub(bytes, Ordering::AcqRel);
            entries
        }
        (Entries::Spilling(entries), Some(stage)) => {
            stage.spilled.fetch_sub(entries.len(), Ordering::AcqRel);
            entries.take()
        }
        (Entries::Held(entries) | Entries::Spilling(entries), None) => entries.take(),
    };
    {
        let mut st = shared.lock();
        st.staged -= entries.len();
        st.totals.accepted -= entries.len() as u64;
    }
    let ended = entries
        .into_iter()
        .map(|(msg, done, _)| (msg, done, FailureReason::Store(e.clone()), false, None))
        .collect();
    end_unadmitted(shared, ended, false);
    shared.wake.notify_one();
}

/// A staged message that never entered the buffer: the message, its completion, why, whether
/// it stays in the store (marked kept), and the token to settle once its error is handed over.
type Unadmitted = (Message, Completion, FailureReason, bool, Option<StoreToken>);

/// Ends staged messages that never entered the buffer: counted as failed (as refused when
/// they were never `accepted`: the store could not make them durable), answered (marked kept
/// when they stay in the store; settled in it once their error is dropped when they carry a
/// token, as failed messages of the buffer are), and no longer counted in `unsettled`.
fn end_unadmitted(shared: &Shared, ended: Vec<Unadmitted>, accepted: bool) {
    let n = ended.len();
    for (msg, done, reason, kept, settle) in ended {
        shared.count_failed(&reason, accepted);
        let mut e = SendError::new(msg, reason, 0);
        if let (Some(store), Some(token)) = (&shared.store, settle) {
            e = e.settling(store.clone(), token);
        }
        done.complete(Err(if kept { e.kept() } else { e }), &shared.unclaimed);
    }
    shared.space.notify_waiters();
    if shared.unsettled.fetch_sub(n, Ordering::AcqRel) == n {
        shared.idle.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::completion::Delivery;

    struct Nowhere;

    impl FateSink for Nowhere {
        fn fate(&self, _: u64, _: Result<Delivery, SendError>) {}
    }

    /// A run of tags ending at `u64::MAX` (`enqueue_tagged` takes any tags) is handed back
    /// whole; counting past its last tag overflowed, a panic in debug builds.
    #[test]
    fn spilled_tags_may_end_at_the_largest_tag() {
        let sink: Arc<dyn FateSink> = Arc::new(Nowhere);
        let tags: Vec<u64> = Dones::new(vec![
            Completion::Tagged(sink.clone(), u64::MAX - 1),
            Completion::Tagged(sink, u64::MAX),
        ])
        .map(|done| match done {
            Completion::Tagged(_, tag) => tag,
            _ => panic!("a tagged run stays tagged"),
        })
        .collect();
        assert_eq!(tags, [u64::MAX - 1, u64::MAX]);
    }
}
