//! The answers of one batch's publishes, in one table the connection's task writes as they come
//! and the batch reads when it needs them.
//!
//! Why a table and not a channel per message: a `oneshot` per message cost an allocation, two
//! locks and a wake-up of the batch's task for every acknowledgement, and with many batches in
//! flight (pipeline depth 16) the wake-ups were most of what herald spent over the raw client.
//! Here an acknowledgement is told to herald at once from the connection's task
//! ([`EarlyAcks`], which wakes the producer once per burst, not once per message), and the
//! batch's task is woken only when what it waits for is there: all of its answers at the end,
//! or room in its window while it publishes.

use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use herald_core::{Ack, EarlyAcks};

use crate::connection::Answer;

/// The answers of one batch: see the module's documentation.
pub(crate) struct Answers {
    table: Mutex<Table>,
    /// Where an acknowledgement is told as it comes.
    early: Option<EarlyAcks>,
}

struct Table {
    /// Each message's answer, by its index in the batch, until the batch takes it.
    answers: Vec<Option<Answer>>,
    /// How many answers came.
    answered: usize,
    /// Failures the batch has not looked at yet, by index.
    failed: Vec<usize>,
    /// The batch's task is woken once `answered` reaches this.
    wake_at: usize,
    waker: Option<Waker>,
    /// The batch took its outcome: later answers (after its deadline) are not told.
    closed: bool,
}

impl Answers {
    /// The table of a batch of `len` messages.
    pub(crate) fn new(len: usize, early: Option<EarlyAcks>) -> Self {
        Self {
            table: Mutex::new(Table {
                answers: std::iter::repeat_with(|| None).take(len).collect(),
                answered: 0,
                failed: Vec::new(),
                wake_at: usize::MAX,
                waker: None,
                closed: false,
            }),
            early,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The answer to the message at `index` came (from the connection's task). An
    /// acknowledgement is told to herald at once; the batch's task is woken if it waits for
    /// this many answers. An index out of the batch, a second answer while the first is still
    /// in the table, or an answer after the batch took its outcome is ignored. (Each slot is
    /// answered once: the connection's book hands it over by value.)
    pub(crate) fn put(&self, index: usize, answer: Answer) {
        let waker = {
            let mut t = self.table();
            if t.closed || t.answers.get(index).is_none_or(Option::is_some) {
                return;
            }
            match (&answer, &self.early) {
                (Answer::Acked, Some(early)) => early.ack(index, Ack::default()),
                (Answer::Acked, None) => {}
                _ => t.failed.push(index),
            }
            t.answers[index] = Some(answer);
            t.answered += 1;
            if t.answered >= t.wake_at {
                t.wake_at = usize::MAX;
                t.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ends once `n` answers in all have come.
    pub(crate) fn answered(&self, n: usize) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let mut t = self.table();
            if t.answered >= n {
                return Poll::Ready(());
            }
            t.wake_at = n;
            match &mut t.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }

    /// The failures that came since the last look, with their indexes, into `into` (emptied
    /// first): taken out of the table.
    pub(crate) fn take_failed(&self, into: &mut Vec<(usize, Answer)>) {
        into.clear();
        let mut t = self.table();
        let t = &mut *t;
        for i in t.failed.drain(..) {
            if let Some(a) = t.answers[i].take() {
                into.push((i, a));
            }
        }
    }

    /// The batch's outcome is being made: every answer still in the table (`None`: none came,
    /// or it was taken by [`Answers::take_failed`]); no later answer is told.
    pub(crate) fn close(&self) -> Vec<Option<Answer>> {
        let mut t = self.table();
        t.closed = true;
        t.failed.clear();
        std::mem::take(&mut t.answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Wake};

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn refused() -> Answer {
        Answer::Refused(crate::error::ack_code(0x87).expect("a failure"), "PUBACK")
    }

    #[test]
    fn the_batch_is_woken_once_what_it_waits_for_is_there_and_acks_are_told_at_once() {
        let early = EarlyAcks::default();
        let answers = Answers::new(4, Some(early.clone()));
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(answers.answered(3));
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        answers.put(2, Answer::Acked);
        answers.put(0, refused());
        // Acknowledgements go to herald as they come, the batch is not woken yet.
        assert_eq!(early.pending().len(), 1);
        assert_eq!(early.pending()[0].0, 2);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // A second answer for one index, or an index out of the batch, counts for nothing.
        answers.put(2, Answer::Lost);
        answers.put(9, Answer::Acked);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        answers.put(1, Answer::Lost);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "woken at the third answer"
        );
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        // The failures are taken once, in the order they came.
        let mut failed = Vec::new();
        answers.take_failed(&mut failed);
        let order: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, [0, 1]);
        answers.take_failed(&mut failed);
        assert!(failed.is_empty());
        // Closed: what is left, and nothing told after.
        let left = answers.close();
        assert!(matches!(
            left.as_slice(),
            [None, None, Some(Answer::Acked), None]
        ));
        answers.put(3, Answer::Acked);
        assert_eq!(
            early.pending().len(),
            1,
            "an answer after the close is not told"
        );
    }

    #[test]
    fn a_wait_given_up_leaves_the_next_one_woken() {
        let answers = Answers::new(3, None);
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let (w1, w2) = (Waker::from(first.clone()), Waker::from(second.clone()));
        assert!(std::pin::pin!(answers.answered(0))
            .poll(&mut Context::from_waker(&w1))
            .is_ready());
        {
            // Waited for 2, then dropped (the batch's timer won).
            let mut gone = std::pin::pin!(answers.answered(2));
            assert!(gone
                .as_mut()
                .poll(&mut Context::from_waker(&w1))
                .is_pending());
        }
        let mut next = std::pin::pin!(answers.answered(1));
        assert!(next
            .as_mut()
            .poll(&mut Context::from_waker(&w2))
            .is_pending());
        answers.put(1, Answer::Lost);
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the waiting task is woken"
        );
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert!(next.as_mut().poll(&mut Context::from_waker(&w2)).is_ready());
    }
}
