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

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use super::completion::{BulkReceipt, Completion, Group};
use super::state::Shared;
use crate::error::{FailureReason, SendError};
use crate::message::{Message, MessageId};
use crate::store::{Durable, Store, StoreError, StoreToken};

/// Stored messages on their way to the admitter.
pub(crate) struct Pending {
    durable: Durable,
    entries: Vec<(Message, Completion, StoreToken)>,
    /// Told whether the messages became durable (an `enqueue` waits for it).
    accepted: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// The store and the queue to the admitter.
pub(crate) struct Stage {
    store: Arc<dyn Store>,
    /// `None` once the producer closes: nothing more is submitted, and the admitter ends when
    /// it has taken what is queued.
    queue: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    /// Bytes of the messages stored and not yet taken by the admitter: with
    /// `State::staged`, what bounds the memory they hold.
    bytes: AtomicUsize,
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
                store,
                queue: Mutex::new(Some(tx)),
                bytes: AtomicUsize::new(0),
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
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Stores `entries` (ids given first) and queues them for the admitter; `accepted` is told
    /// when they are durable. Refuses them all, handing them back, when the producer is closed
    /// or the store cannot take them ([`StoreError::is_full`]: the caller may wait for room).
    #[allow(clippy::result_large_err)] // handed straight back to the caller
    pub(crate) fn submit(
        &self,
        shared: &Shared,
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
        // worth (the submissions are serialised by `queue`, and the admitter only lowers it).
        let staged = shared.lock().staged;
        let bytes: usize = entries.iter().map(|(m, _)| m.size()).sum();
        let staged_bytes = self.bytes.load(Ordering::Acquire);
        if staged > 0
            && (staged + entries.len() > shared.config.max_buffered_messages
                || staged_bytes + bytes > shared.config.max_buffered_bytes)
        {
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
        let n = entries.len();
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        shared.accept_stored(n);
        let entries = entries
            .into_iter()
            .zip(submitted.tokens)
            .map(|((msg, done), token)| (msg, done, token))
            .collect();
        // The receiver lives as long as `shared` (the admitter holds it): a send cannot fail
        // while this stage's sender is in place.
        let _queued = tx.send(Pending {
            durable: submitted.durable,
            entries,
            accepted,
        });
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
/// durable, into the buffer as room frees. Ends when the stage is closed and its queue empty.
pub(crate) async fn run_admitter(
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    mut queue: mpsc::UnboundedReceiver<Pending>,
) {
    recover(&shared, &store).await;
    recovery_done(&shared);
    while let Some(pending) = queue.recv().await {
        let result = pending.durable.await;
        if let Some(tx) = pending.accepted {
            let _told = tx.send(result.clone());
        }
        match result {
            Ok(()) => admit_all(&shared, pending.entries).await,
            Err(e) => fail_unstored(&shared, pending.entries, &e),
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
    loop {
        let reader = store.clone();
        let read = tokio::task::spawn_blocking(move || reader.recover(READ)).await;
        let batch = match read {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                tracing::error!(
                    store = %store.describe(),
                    error = %e,
                    "reading back what the store holds from an earlier run failed; those \
                     messages stay stored"
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
        shared.accept_stored(n);
        group.add(n);
        let entries = batch
            .into_iter()
            .map(|(token, msg)| (msg, Completion::Group(group.clone()), token))
            .collect();
        admit_all(shared, entries).await;
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

/// Moves stored messages into the buffer, in order, waiting for room as needed.
async fn admit_all(shared: &Shared, entries: Vec<(Message, Completion, StoreToken)>) {
    let mut entries = entries.into_iter();
    let mut waiting: Option<(Message, Completion, StoreToken)> = None;
    loop {
        let mut space = pin!(shared.space.notified());
        space.as_mut().enable();
        let mut taken = 0;
        let next = std::iter::from_fn(|| waiting.take().or_else(|| entries.next())).map(
            |(msg, done, token)| {
                taken += msg.size();
                (msg, done, Some(token))
            },
        );
        let admission = shared.admit(next, true, |_| {});
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
            let mut tokens = Vec::new();
            let mut ended = Vec::with_capacity(refused.len());
            for r in refused {
                // A message closed unsent stays stored for the next producer.
                let kept = matches!(r.reason, FailureReason::Closed) && r.stored.is_some();
                if !kept {
                    tokens.extend(r.stored);
                }
                ended.push((r.msg, r.done, r.reason, kept));
            }
            end_unadmitted(shared, ended);
            if let (Some(store), false) = (&shared.store, tokens.is_empty()) {
                store.settle(&tokens);
            }
        }
        match admission.full {
            Some(full) => {
                waiting = Some((
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
fn fail_unstored(shared: &Shared, entries: Vec<(Message, Completion, StoreToken)>, e: &StoreError) {
    if let Some(stage) = &shared.stage {
        let bytes: usize = entries.iter().map(|(m, _, _)| m.size()).sum();
        stage.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
    {
        let mut st = shared.lock();
        st.staged -= entries.len();
        st.totals.accepted -= entries.len() as u64;
    }
    let ended = entries
        .into_iter()
        .map(|(msg, done, _)| (msg, done, FailureReason::Store(e.clone()), false))
        .collect();
    end_unadmitted(shared, ended);
    shared.wake.notify_one();
}

/// Ends staged messages that never entered the buffer: counted as refused, answered (marked
/// kept when they stay in the store), and no longer counted in `unsettled`.
fn end_unadmitted(shared: &Shared, ended: Vec<(Message, Completion, FailureReason, bool)>) {
    let n = ended.len();
    for (msg, done, reason, kept) in ended {
        shared.count_refused(&reason);
        let e = SendError::new(msg, reason, 0);
        done.complete(Err(if kept { e.kept() } else { e }), &shared.unclaimed);
    }
    shared.space.notify_waiters();
    if shared.unsettled.fetch_sub(n, Ordering::AcqRel) == n {
        shared.idle.notify_waiters();
    }
}
