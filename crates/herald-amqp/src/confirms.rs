//! A channel's publishes and their confirms, with every `basic.return` given to the message it
//! belongs to.
//!
//! RabbitMQ answers an unroutable `mandatory` publish with a `basic.return` and then confirms
//! it, often together with other publishes in one `multiple` ack. lapin (4.12) keeps the
//! returned messages in a queue and hands the next one to each confirm it completes, and it
//! completes the publishes of one ack in a hash map's order: the returned message may go to
//! another publish of that ack, or of an earlier single ack. A channel carries the batches of
//! every destination whose keys share its slot, so a stored message could be reported
//! returned and the returned one delivered (lost).
//!
//! [`Confirms`] keeps every publish of its channel from its first poll to its verdict and polls
//! them itself, each with a waker that records it as woken. A returned message is matched to
//! its own publish by route, message id and payload, whichever confirm lapin gave it to. A
//! publish's verdict is final once every publish lapin completed in the same step can no
//! longer carry its return: after its confirm came, `settle` takes lapin's acknowledgement
//! lock once (which lapin holds for the whole of an ack, `multiple` included) and then polls
//! what was woken meanwhile.
//!
//! Hand-written: the confirm's return is lapin's, and no crate offers this matching.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use herald_core::Bytes;
use lapin::message::BasicReturnMessage;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, PublisherConfirm};

/// A `basic_publish` of the channel, owned (it may be polled by any task publishing on it).
pub(crate) type Publish =
    Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + 'static>>;

/// What a returned message is matched to its publish by: its route, its message id and its
/// payload, and without an id its headers too (a headers exchange routes by them). Two
/// publishes alike in all of these are copies of one message (a retry sent while the first
/// try's confirm is still out), and whichever of them the return goes to, one copy was taken
/// and one returned.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    pub(crate) message_id: Option<ShortString>,
    pub(crate) payload: Bytes,
    /// Its headers, kept when it has no message id.
    pub(crate) headers: Option<FieldTable>,
}

impl Identity {
    fn matches(&self, r: &BasicReturnMessage) -> bool {
        let d = &r.delivery;
        d.exchange == self.exchange
            && d.routing_key == self.routing_key
            && d.properties.message_id() == &self.message_id
            && d.data[..] == self.payload[..]
            && (self.message_id.is_some() || d.properties.headers() == &self.headers)
    }
}

/// The publishes of one channel, from their first poll to their verdict.
pub(crate) struct Confirms {
    channel: Channel,
    /// Whether the broker may return publishes (`mandatory`): if not, a confirm is final as it
    /// comes.
    returns: bool,
    book: Mutex<Book>,
    woken: Arc<Woken>,
}

/// The publishes woken since they were last polled.
#[derive(Default)]
struct Woken(Mutex<Vec<u64>>);

impl Woken {
    /// Swaps the woken publishes into `into` (emptied first), which keeps its capacity.
    fn take(&self, into: &mut Vec<u64>) {
        into.clear();
        std::mem::swap(
            &mut *self.0.lock().unwrap_or_else(PoisonError::into_inner),
            into,
        );
    }
}

#[derive(Default)]
struct Book {
    /// The number the next publish gets: publishes are numbered in delivery-tag order.
    next: u64,
    entries: BTreeMap<u64, Entry>,
    /// The publishes confirmed and not settled yet.
    unsettled: Vec<u64>,
    /// Where the woken publishes are taken to be polled (kept for its capacity).
    polling: Vec<u64>,
}

struct Entry {
    identity: Identity,
    /// When it was handed to lapin.
    started: tokio::time::Instant,
    /// The waker lapin's futures of this publish are polled with.
    waker: Waker,
    wake: Arc<EntryWake>,
    stage: Stage,
    /// Its own returned message, wherever lapin put it.
    returned: Option<BasicReturnMessage>,
    /// Whether a [`Ticket`] still waits for it; a publish whose caller gave up stays until its
    /// confirm came, so that its return cannot be taken for another's.
    owned: bool,
}

enum Stage {
    /// Handed to lapin, not written yet.
    Writing(Publish),
    /// Written: its confirm is to come.
    Confirming(PublisherConfirm),
    /// Not written: lapin failed it.
    WriteFailed(lapin::Error),
    /// Its confirm came (or its channel failed); `settled` once no other publish can hold its
    /// returned message any more.
    Confirmed {
        outcome: lapin::Result<Kind>,
        settled: bool,
    },
}

#[derive(Clone, Copy)]
enum Kind {
    Ack,
    Nack,
    NotRequested,
}

/// Records its publish as woken and wakes the task waiting for it, if any.
struct EntryWake {
    seq: u64,
    woken: Arc<Woken>,
    owner: Mutex<Option<Waker>>,
}

impl Wake for EntryWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.seq);
        if let Some(w) = self
            .owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            w.wake_by_ref();
        }
    }
}

impl EntryWake {
    fn own(&self, cx: &Context<'_>) {
        let mut owner = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
        if !owner.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *owner = Some(cx.waker().clone());
        }
    }
}

impl Confirms {
    /// The publishes of `channel`; `returns`: whether they are `mandatory`.
    pub(crate) fn new(channel: Channel, returns: bool) -> Self {
        Self {
            channel,
            returns,
            book: Mutex::default(),
            woken: Arc::default(),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls `publish` for the first time (lapin then takes its delivery tag and queues its
    /// frames) and keeps it. Under the book's lock: no other publish of the channel is in its
    /// first poll meanwhile, so the broker reads the publishes in delivery-tag order, and
    /// they are numbered in it.
    pub(crate) fn start(
        self: &Arc<Self>,
        identity: Identity,
        mut publish: Publish,
    ) -> lapin::Result<Ticket> {
        let mut book = self.book();
        let seq = book.next;
        book.next += 1;
        let wake = Arc::new(EntryWake {
            seq,
            woken: self.woken.clone(),
            owner: Mutex::new(None),
        });
        let waker = Waker::from(wake.clone());
        let (stage, written) = match publish.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Ready(Ok(confirm)) => (Stage::Confirming(confirm), true),
            Poll::Pending => (Stage::Writing(publish), false),
        };
        let entry = Entry {
            identity,
            started: tokio::time::Instant::now(),
            waker,
            wake,
            stage,
            returned: None,
            owned: true,
        };
        book.entries.insert(seq, entry);
        // Written already: its confirm is polled now, so that it is woken when it comes.
        if written {
            book.advance(seq);
        }
        Ok(Ticket {
            confirms: self.clone(),
            seq,
        })
    }

    /// How long the oldest publish of the channel still waiting for the broker (to be written,
    /// or confirmed) has waited, if one does: publishes whose callers gave up included (they
    /// stay until their confirm comes), so that a channel the broker stopped answering shows it
    /// to the next call even when every call on it was cut off before its own confirm timeout.
    pub(crate) fn unanswered_for(&self) -> Option<std::time::Duration> {
        let mut book = self.book();
        self.poll_woken(&mut book);
        book.entries
            .values()
            .find(|e| matches!(e.stage, Stage::Writing(_) | Stage::Confirming(_)))
            .map(|e| e.started.elapsed())
    }

    /// Polls every publish woken since the last time.
    fn poll_woken(&self, book: &mut Book) {
        let mut woken = std::mem::take(&mut book.polling);
        self.woken.take(&mut woken);
        for &seq in &woken {
            book.advance(seq);
        }
        book.polling = woken;
    }

    /// Makes final the verdicts of the publishes confirmed so far: lapin completes all the
    /// publishes of one ack under its acknowledgement lock, so once that lock was taken, each
    /// of them has been woken, and polled below with its returned message.
    fn settle(&self, book: &mut Book) {
        let confirmed = std::mem::take(&mut book.unsettled);
        if confirmed.is_empty() {
            return;
        }
        if self.returns {
            // `wait_for_confirms` takes lapin's acknowledgement lock in its first poll; what
            // it returns then are the returned messages of confirms dropped unawaited (none of
            // herald's: they stay here until they come). Nothing else calls it on a publishing
            // channel: it takes the promise a later call would wait for.
            let mut sync = std::pin::pin!(self.channel.wait_for_confirms());
            if let Poll::Ready(Ok(returned)) =
                sync.as_mut().poll(&mut Context::from_waker(Waker::noop()))
            {
                for r in returned {
                    book.attribute(r);
                }
            }
            self.poll_woken(book);
        }
        for seq in confirmed {
            let Some(entry) = book.entries.get_mut(&seq) else {
                continue;
            };
            if let Stage::Confirmed { settled, .. } = &mut entry.stage {
                *settled = true;
            }
            if !entry.owned {
                book.entries.remove(&seq);
            }
        }
    }

    fn poll_written(&self, seq: u64, cx: &Context<'_>) -> Poll<lapin::Result<()>> {
        let mut book = self.book();
        if let Some(entry) = book.entries.get(&seq) {
            entry.wake.own(cx);
        }
        self.poll_woken(&mut book);
        match book.entries.get(&seq).map(|e| &e.stage) {
            Some(Stage::Writing(_)) => Poll::Pending,
            // Its verdict: the write's error.
            Some(Stage::WriteFailed(_)) => Poll::Ready(
                book.entries
                    .remove(&seq)
                    .map_or_else(|| Err(gone()), |e| e.verdict().map(drop)),
            ),
            Some(_) => Poll::Ready(Ok(())),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_confirmed(&self, seq: u64, cx: &Context<'_>) -> Poll<lapin::Result<Confirmation>> {
        let mut book = self.book();
        if let Some(entry) = book.entries.get(&seq) {
            entry.wake.own(cx);
        }
        self.poll_woken(&mut book);
        if matches!(
            book.entries.get(&seq).map(|e| &e.stage),
            Some(Stage::Confirmed { settled: false, .. })
        ) {
            // Its confirm came: settling makes it final.
            self.settle(&mut book);
        }
        match book.entries.get(&seq).map(|e| &e.stage) {
            Some(Stage::Writing(_) | Stage::Confirming(_)) => Poll::Pending,
            Some(Stage::Confirmed { settled: true, .. } | Stage::WriteFailed(_)) => {
                let entry = book.entries.remove(&seq).expect("matched above");
                Poll::Ready(entry.verdict())
            }
            Some(Stage::Confirmed { settled: false, .. }) => {
                // Not reached: settling makes every confirm it found final. Should it not,
                // the next poll settles again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Ready(Err(gone())),
        }
    }

    fn abandon(&self, seq: u64) {
        let mut book = self.book();
        let Some(entry) = book.entries.get_mut(&seq) else {
            return;
        };
        *entry
            .wake
            .owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        match entry.stage {
            Stage::Writing(_) | Stage::Confirming(_) | Stage::Confirmed { settled: false, .. } => {
                entry.owned = false;
            }
            Stage::WriteFailed(_) | Stage::Confirmed { settled: true, .. } => {
                book.entries.remove(&seq);
            }
        }
    }
}

/// A publish asked about after its verdict was taken (herald never does).
fn gone() -> lapin::Error {
    lapin::ErrorKind::FutureCompleted.into()
}

impl Entry {
    /// Polls this publish's lapin future, if one is pending; returns the returned message its
    /// confirm carried, whoever's it is.
    fn advance(&mut self) -> Option<BasicReturnMessage> {
        let mut cx = Context::from_waker(&self.waker);
        if let Stage::Writing(publish) = &mut self.stage {
            match publish.as_mut().poll(&mut cx) {
                Poll::Pending => return None,
                Poll::Ready(Ok(confirm)) => self.stage = Stage::Confirming(confirm),
                Poll::Ready(Err(e)) => {
                    self.stage = Stage::WriteFailed(e);
                    return None;
                }
            }
        }
        let Stage::Confirming(confirm) = &mut self.stage else {
            return None;
        };
        let Poll::Ready(confirmation) = Pin::new(confirm).poll(&mut cx) else {
            return None;
        };
        let (outcome, returned) = match confirmation {
            Ok(Confirmation::Ack(r)) => (Ok(Kind::Ack), r),
            Ok(Confirmation::Nack(r)) => (Ok(Kind::Nack), r),
            Ok(Confirmation::NotRequested) => (Ok(Kind::NotRequested), None),
            Err(e) => (Err(e), None),
        };
        self.stage = Stage::Confirmed {
            outcome,
            settled: false,
        };
        returned
    }

    fn verdict(self) -> lapin::Result<Confirmation> {
        match self.stage {
            Stage::Confirmed { outcome, .. } => outcome.map(|kind| match kind {
                Kind::Ack => Confirmation::Ack(self.returned),
                Kind::Nack => Confirmation::Nack(self.returned),
                Kind::NotRequested => Confirmation::NotRequested,
            }),
            Stage::WriteFailed(e) => Err(e),
            Stage::Writing(_) | Stage::Confirming(_) => unreachable!("no verdict yet"),
        }
    }
}

impl Book {
    /// Polls publish `seq`'s lapin future, if it is still in the book; a confirm that came is
    /// noted unsettled, and the returned message it carried given to its own publish.
    fn advance(&mut self, seq: u64) {
        let Some(entry) = self.entries.get_mut(&seq) else {
            return;
        };
        let waiting = !matches!(entry.stage, Stage::Confirmed { .. });
        let returned = entry.advance();
        if !entry.owned && matches!(entry.stage, Stage::WriteFailed(_)) {
            // Nobody waits for it, and never sent: no return can be its.
            self.entries.remove(&seq);
            return;
        }
        if !waiting || !matches!(entry.stage, Stage::Confirmed { .. }) {
            return;
        }
        self.unsettled.push(seq);
        if let Some(r) = returned {
            // Its own, the usual case; else another's.
            if entry.returned.is_none() && entry.identity.matches(&r) {
                entry.returned = Some(r);
            } else {
                self.attribute(r);
            }
        }
    }

    /// Gives `returned` to its own publish: the first that matches it and has none yet, one
    /// still unsettled before a settled one (which cannot have a return to come).
    fn attribute(&mut self, returned: BasicReturnMessage) {
        let mut candidates = self
            .entries
            .values_mut()
            .filter(|e| e.returned.is_none() && e.identity.matches(&returned));
        let mut fallback = None;
        for e in &mut candidates {
            if matches!(e.stage, Stage::Confirmed { settled: true, .. }) {
                fallback.get_or_insert(e);
            } else {
                e.returned = Some(returned);
                return;
            }
        }
        if let Some(e) = fallback {
            tracing::warn!(
                transport = "amqp",
                "a returned message came after its publish's confirm was taken as final"
            );
            e.returned = Some(returned);
        } else {
            tracing::warn!(
                transport = "amqp",
                exchange = %returned.delivery.exchange,
                routing_key = %returned.delivery.routing_key,
                "the broker returned a message that matches no publish in flight on its channel"
            );
        }
    }
}

/// A publish [`Confirms`] keeps: what it waits for it with.
pub(crate) struct Ticket {
    confirms: Arc<Confirms>,
    seq: u64,
}

impl Ticket {
    /// Ends once lapin wrote the publish (`Err` if it could not; the ticket is then done).
    pub(crate) async fn written(&self) -> lapin::Result<()> {
        std::future::poll_fn(|cx| self.confirms.poll_written(self.seq, cx)).await
    }

    /// The publish's confirm, with its own returned message.
    pub(crate) async fn confirmed(&self) -> lapin::Result<Confirmation> {
        std::future::poll_fn(|cx| self.confirms.poll_confirmed(self.seq, cx)).await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.confirms.abandon(self.seq);
    }
}
