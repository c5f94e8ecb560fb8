//! Sending a stream of messages through a producer with a bounded window, and collecting every
//! message's fate in input order: the loop shared by `produce`, `demo` and `bench`.
//!
//! The feeder calls [`Engine::send`] per message: `Producer::enqueue` waits for buffer space
//! (backpressure), and the message's `DeliveryFuture` goes into a bounded channel to the
//! collector task, which awaits them in order. Memory stays bounded whatever the input's size:
//! the producer's buffer, the window, and a fixed-size latency histogram.
//!
//! With a spool ([`Engine::start_spooled`]) there is no window: the spool bounds what waits,
//! and fates come through a sink (`Producer::enqueue_tagged`, tagged with the input line), in
//! the order they happen, so that a waiting message costs no memory of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use herald::{Delivery, DeliveryFuture, Destination, FateSink, Message, Producer, SendError};
use indicatif::ProgressBar;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dead_letter::{failed_record, malformed_record, unacknowledged_record, DeadLetter};

/// A latency histogram in microseconds with 32 sub-buckets per power of two (at most ~3 %
/// error), in fixed memory.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB: u64 = 32;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (SUB + 60 * SUB) as usize],
            total: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - u64::from(v.leading_zeros()); // >= 5
        let mantissa = v >> (e - 5); // 32..=63
        (SUB + (e - 5) * SUB + (mantissa - SUB)) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let e = (i - SUB) / SUB + 5;
        let mantissa = (i - SUB) % SUB + SUB;
        let upper = (u128::from(mantissa + 1) << (e - 5)) - 1;
        u64::try_from(upper).unwrap_or(u64::MAX)
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let v = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = Self::index(v).min(self.counts.len() - 1);
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    #[cfg(test)]
    fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), or `None` when empty.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(Self::upper(i).min(self.max)));
            }
        }
        Some(Duration::from_micros(self.max))
    }

    pub(crate) fn max(&self) -> Option<Duration> {
        (self.total > 0).then(|| Duration::from_micros(self.max))
    }
}

/// Checks per-key order from acknowledgements: for each key, the offsets the broker gave must
/// increase in sending order (a key always lands in the same partition).
#[derive(Debug)]
pub(crate) struct OrderCheck {
    /// Key of the message on input line `n`: `key-{(n - 1) % keys}`.
    keys: u64,
    last: Vec<Option<(i32, i64)>>,
    pub(crate) checked: u64,
    pub(crate) violations: u64,
}

impl OrderCheck {
    pub(crate) fn new(keys: u64) -> Self {
        Self {
            keys: keys.max(1),
            last: vec![None; keys.max(1) as usize],
            checked: 0,
            violations: 0,
        }
    }

    fn observe(&mut self, line: u64, d: &Delivery) {
        let (Some(p), Some(o)) = (d.ack.partition, d.ack.offset) else {
            return;
        };
        let slot = &mut self.last[((line - 1) % self.keys) as usize];
        if let Some((lp, lo)) = *slot {
            self.checked += 1;
            if lp != p || lo >= o {
                self.violations += 1;
            }
        }
        *slot = Some((p, o));
    }
}

/// What happened to the messages, counted as their fates arrive.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Acknowledged by the broker.
    pub(crate) delivered: u64,
    /// Given up on (each in the dead-letter file when there is one).
    pub(crate) failed: u64,
    /// Input lines that were not messages.
    pub(crate) malformed: u64,
    /// Not delivered but still in the spool, which the next run sends first: the run was
    /// interrupted (or its close timed out) before they were delivered. Never dead-lettered,
    /// which would send them twice.
    pub(crate) kept: u64,
    /// Acknowledged messages that took more than one attempt.
    pub(crate) retried: u64,
    /// From acceptance to acknowledgement, of acknowledged messages.
    pub(crate) latency: Histogram,
    /// The last few failures, to show.
    pub(crate) examples: Vec<String>,
    /// Of `failed`, messages still unacknowledged when the wait was cut off after an
    /// interrupt (they may yet reach the broker).
    pub(crate) cut_off: u64,
}

/// Why a message cut off after an interrupt is in the dead-letter file.
pub(crate) const UNACKNOWLEDGED: &str = "not acknowledged when herald was interrupted and its grace period ended: it was in flight and may still reach the broker";

/// Where fates go.
#[derive(Debug)]
pub(crate) struct Collector {
    pub(crate) tally: Tally,
    pub(crate) dead_letter: Option<DeadLetter>,
    pub(crate) order: Option<OrderCheck>,
    pub(crate) progress: Option<ProgressBar>,
    pub(crate) destination: Destination,
    /// The producer keeps every accepted message in a spool until its fate is handed over:
    /// what it did not deliver stays there for the next run.
    pub(crate) spool: bool,
    /// Some fates were not waited for (the run was interrupted and its grace period ended).
    stopped_waiting: bool,
    /// Fates that came through a spooled engine's sink.
    seen: u64,
}

impl Collector {
    pub(crate) fn new(destination: Destination) -> Self {
        Self {
            tally: Tally::default(),
            dead_letter: None,
            order: None,
            progress: None,
            destination,
            spool: false,
            stopped_waiting: false,
            seen: 0,
        }
    }

    fn delivered(&mut self, line: u64, d: &Delivery) {
        let t = &mut self.tally;
        t.delivered += 1;
        if d.attempts > 1 {
            t.retried += 1;
        }
        t.latency.record(d.latency);
        if let Some(o) = &mut self.order {
            o.observe(line, d);
        }
        if let Some(p) = &self.progress {
            p.inc(1);
        }
    }

    fn example(&mut self, text: String) {
        if self.tally.examples.len() < 3 {
            self.tally.examples.push(text);
        }
    }

    /// A message herald gave up on (or, `line` `None`, one returned by `close`).
    pub(crate) fn failed(&mut self, line: Option<u64>, e: &SendError) {
        if e.is_kept_in_store() {
            self.kept();
            return;
        }
        self.tally.failed += 1;
        let at = line.map_or_else(String::new, |l| format!("line {l}: "));
        self.example(format!("{at}{e}"));
        if let Some(dl) = &mut self.dead_letter {
            dl.write(&failed_record(line, e));
        }
        if let Some(p) = &self.progress {
            p.inc(1);
        }
    }

    /// A message whose fate was not waited for (the run was interrupted and its grace period
    /// is over): recorded as failed, with its copy.
    fn unacknowledged(&mut self, line: u64, msg: Option<&Message>) {
        self.stopped_waiting = true;
        if self.spool {
            // Not settled: the spool still holds it.
            self.kept();
            return;
        }
        self.tally.failed += 1;
        self.tally.cut_off += 1;
        let error = format!("line {line}: {UNACKNOWLEDGED}");
        self.example(error.clone());
        if let (Some(dl), Some(msg)) = (&mut self.dead_letter, msg) {
            dl.write(&unacknowledged_record(line, msg, UNACKNOWLEDGED));
        }
        if let Some(p) = &self.progress {
            p.inc(1);
        }
    }

    /// A message left in the spool for the next run.
    fn kept(&mut self) {
        self.tally.kept += 1;
        if let Some(p) = &self.progress {
            p.inc(1);
        }
    }

    pub(crate) fn malformed(&mut self, line: u64, raw: &[u8], error: &str) {
        self.tally.malformed += 1;
        self.example(error.to_owned());
        if let Some(dl) = &mut self.dead_letter {
            dl.write(&malformed_record(line, &self.destination, raw, error));
        }
    }
}

enum Pending {
    /// A message accepted by the producer, and a copy of it when the engine keeps copies
    /// (boxed: a slot without one takes a few words).
    Sent(u64, DeliveryFuture, Option<Box<Message>>),
    Refused(u64, SendError),
    Malformed(u64, Vec<u8>, String),
}

/// A fate reported through the sink of a spooled engine: (input line, outcome).
type Fate = (u64, Result<Delivery, SendError>);

/// A producer with its collector task.
pub(crate) struct Engine {
    producer: Producer,
    tx: mpsc::Sender<Pending>,
    collector: JoinHandle<(Collector, Option<mpsc::UnboundedReceiver<Fate>>)>,
    /// Keep a copy of each message until its fate is known, to record it if the wait is cut off.
    copies: bool,
    cut_off: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    /// With a spool: where fates go, and how many messages were accepted.
    spooled: Option<Spooled>,
}

/// The sink side of a spooled engine.
struct Spooled {
    sink: Arc<dyn FateSink>,
    accepted: Arc<AtomicU64>,
}

impl Engine {
    /// Starts the collector; at most `window` messages wait for their fate beyond those in the
    /// producer's buffer.
    pub(crate) fn start(producer: Producer, window: usize, mut collector: Collector) -> Self {
        // A channel holds at most `Semaphore::MAX_PERMITS`; a larger window is as good as that.
        let window = window.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        let (tx, mut rx) = mpsc::channel::<Pending>(window);
        let cut_off = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let mut cut = cut_off.subscribe();
        let collector = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                match p {
                    Pending::Sent(line, fut, copy) => {
                        // Cut off only by `CutOff::now`: a sender gone (the engine dropped)
                        // means never, not now.
                        let cut_now = async {
                            if cut.wait_for(|c| *c).await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        };
                        let waited = tokio::select! {
                            biased;
                            outcome = fut => Some(outcome),
                            () = cut_now => None,
                        };
                        match waited {
                            Some(Ok(d)) => collector.delivered(line, &d),
                            Some(Err(e)) => collector.failed(Some(line), &e),
                            None => collector.unacknowledged(line, copy.as_deref()),
                        }
                    }
                    Pending::Refused(line, e) => collector.failed(Some(line), &e),
                    Pending::Malformed(line, raw, error) => {
                        collector.malformed(line, &raw, &error);
                    }
                }
            }
            (collector, None)
        });
        Self {
            producer,
            tx,
            collector,
            copies: false,
            cut_off,
            spooled: None,
        }
    }

    /// Starts the collector for a producer with a spool: no window (the spool bounds what
    /// waits, and `send_many` waits while it is full), no copies (what is cut off stays in the
    /// spool), and fates through a sink as they happen, so that a waiting message costs no
    /// memory here. The collector ends once every accepted message's fate is in and the
    /// engine is finished (the sink's last clone gone), or at a cut-off.
    pub(crate) fn start_spooled(producer: Producer, mut collector: Collector) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(1024);
        let (fates_tx, mut fates) = mpsc::unbounded_channel::<Fate>();
        let sink: Arc<dyn FateSink> = Arc::new(move |line, outcome| {
            // The collector gone (cut off): what comes late is read by `finish`.
            let _sent = fates_tx.send((line, outcome));
        });
        let accepted = Arc::new(AtomicU64::new(0));
        let cut_off = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let mut cut = cut_off.subscribe();
        let collector = tokio::spawn(async move {
            // Fates seen, and whether the wait for the rest was cut off.
            let mut seen = 0u64;
            let mut cut_now = false;
            let mut control_open = true;
            loop {
                tokio::select! {
                    biased;
                    fate = fates.recv(), if !cut_now => match fate {
                        Some((line, outcome)) => {
                            seen += 1;
                            match outcome {
                                Ok(d) => collector.delivered(line, &d),
                                Err(e) => collector.failed(Some(line), &e),
                            }
                        }
                        // Every accepted message's fate is in, and the engine is finished.
                        None => break,
                    },
                    p = rx.recv(), if control_open => match p {
                        Some(Pending::Refused(line, e)) => collector.failed(Some(line), &e),
                        Some(Pending::Malformed(line, raw, error)) => {
                            collector.malformed(line, &raw, &error);
                        }
                        Some(Pending::Sent(line, ..)) => {
                            unreachable!("line {line}: a spooled engine takes no futures")
                        }
                        None if cut_now => break,
                        None => control_open = false,
                    },
                    // What has no fate yet stays in the spool: `finish` counts it.
                    Ok(()) = async { cut.wait_for(|c| *c).await.map(|_| ()) }, if !cut_now => {
                        cut_now = true;
                        if !control_open {
                            break;
                        }
                    }
                }
            }
            collector.seen = seen;
            (collector, cut_now.then_some(fates))
        });
        Self {
            producer,
            tx,
            collector,
            copies: false,
            cut_off,
            spooled: Some(Spooled { sink, accepted }),
        }
    }

    /// Keeps a copy of every message until its fate is known (cheap: payloads are shared), so
    /// that [`CutOff::now`] can record what it stops waiting for.
    pub(crate) fn keep_copies(mut self) -> Self {
        self.copies = true;
        self
    }

    /// Stops the wait for fates, from another task: every message not yet acknowledged is
    /// recorded as failed at once (with its copy, see [`Engine::keep_copies`]).
    pub(crate) fn cut_off(&self) -> CutOff {
        CutOff(self.cut_off.clone())
    }

    async fn push(&self, p: Pending) -> anyhow::Result<()> {
        self.tx
            .send(p)
            .await
            .map_err(|_| anyhow!("internal error: the collector task ended early"))
    }

    /// Sends `msg` (input line `line`), waiting for buffer space.
    pub(crate) async fn send(&self, line: u64, msg: Message) -> anyhow::Result<()> {
        if self.spooled.is_some() {
            return self.send_many(vec![(line, msg)]).await;
        }
        let copy = self.copies.then(|| Box::new(msg.clone()));
        let p = match self.producer.enqueue(msg).await {
            Ok(fut) => Pending::Sent(line, fut, copy),
            Err(e) => Pending::Refused(line, e),
        };
        self.push(p).await
    }

    /// Sends messages (input line, message) in order, waiting for buffer space: one
    /// `Producer::enqueue_many`, so that with a spool they are stored with one write.
    pub(crate) async fn send_many(&self, msgs: Vec<(u64, Message)>) -> anyhow::Result<()> {
        if let Some(spooled) = &self.spooled {
            let n = msgs.len() as u64;
            let refused = self.producer.enqueue_tagged(msgs, &spooled.sink).await;
            spooled
                .accepted
                .fetch_add(n - refused.len() as u64, Ordering::AcqRel);
            for (line, e) in refused {
                self.push(Pending::Refused(line, e)).await?;
            }
            return Ok(());
        }
        let mut lines = Vec::with_capacity(msgs.len());
        let mut copies = Vec::with_capacity(msgs.len());
        let mut batch = Vec::with_capacity(msgs.len());
        for (line, msg) in msgs {
            lines.push(line);
            copies.push(self.copies.then(|| Box::new(msg.clone())));
            batch.push(msg);
        }
        let answers = self.producer.enqueue_many(batch).await;
        for ((line, copy), answer) in lines.into_iter().zip(copies).zip(answers) {
            let p = match answer {
                Ok(fut) => Pending::Sent(line, fut, copy),
                Err(e) => Pending::Refused(line, e),
            };
            self.push(p).await?;
        }
        Ok(())
    }

    /// Records an input line that is not a message, in its place in the input order.
    pub(crate) async fn malformed(
        &self,
        line: u64,
        raw: Vec<u8>,
        error: String,
    ) -> anyhow::Result<()> {
        self.push(Pending::Malformed(line, raw, error)).await
    }

    /// Waits for every fate, closes the producer (anything it still returns is recorded as
    /// failed) and hands back the collector.
    pub(crate) async fn finish(
        self,
        close_timeout: Duration,
    ) -> anyhow::Result<(Collector, Producer)> {
        let Self {
            producer,
            tx,
            collector,
            spooled,
            ..
        } = self;
        drop(tx);
        // The collector of a spooled engine ends once the sink's last clone is gone.
        let accepted = spooled.map(|s| s.accepted.load(Ordering::Acquire));
        let (mut collector, late) = collector.await.context("the collector task failed")?;
        if let (Some(accepted), Some(mut late)) = (accepted, late) {
            // Cut off: what has no fate yet stays in the spool. Fates that arrive meanwhile
            // are read once the producer is closed: one that failed for its own reason
            // (rejected, say) left the spool with its error, and is recorded, not kept.
            for _ in collector.seen..accepted {
                collector.stopped_waiting = true;
                collector.kept();
            }
            let late_unclaimed = producer.close(Duration::ZERO).await;
            while let Ok((line, outcome)) = late.try_recv() {
                if let Err(e) = outcome {
                    if !e.is_kept_in_store() {
                        collector.tally.kept = collector.tally.kept.saturating_sub(1);
                        collector.failed(Some(line), &e);
                    }
                }
            }
            for e in &late_unclaimed.unclaimed {
                collector.failed(None, e);
            }
            return Ok((collector, producer));
        }
        if collector.stopped_waiting {
            // The messages not waited for are recorded already (dead-lettered with their copy,
            // or, with a spool, counted as kept); those of them that fail later would come back
            // as unclaimed: not twice. Nothing else is unclaimed (every other future was
            // awaited), and what is in flight is not waited for.
            let late = producer.close(Duration::ZERO).await;
            if collector.spool {
                // With a spool they were counted as kept. One that failed for a reason of its
                // own since (rejected, say) has left the spool with its error: recorded now,
                // before that error is dropped, instead of lost.
                for e in late.unclaimed.iter().filter(|e| !e.is_kept_in_store()) {
                    collector.tally.kept = collector.tally.kept.saturating_sub(1);
                    collector.failed(None, e);
                }
            }
        } else {
            let close = producer.close(close_timeout).await;
            for e in &close.unclaimed {
                collector.failed(None, e);
            }
        }
        Ok((collector, producer))
    }
}

/// Cuts the engine's wait for fates short ([`Engine::cut_off`]).
#[derive(Clone)]
pub(crate) struct CutOff(std::sync::Arc<tokio::sync::watch::Sender<bool>>);

impl CutOff {
    pub(crate) fn now(&self) {
        self.0.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_three_percent() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 10_000);
        for (q, exact) in [(0.5, 5_000.0), (0.99, 9_900.0), (0.001, 10.0)] {
            let got = h.quantile(q).expect("some").as_micros() as f64;
            assert!(
                (got - exact).abs() / exact <= 0.03,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.quantile(1.0), Some(Duration::from_micros(10_000)));
        assert_eq!(h.max(), Some(Duration::from_micros(10_000)));
        // Bucket bounds are consistent: every value falls in a bucket whose upper bound holds it.
        for v in [
            0u64,
            31,
            32,
            33,
            63,
            64,
            65,
            1 << 20,
            (1 << 40) + 12345,
            u64::MAX >> 4,
        ] {
            let i = Histogram::index(v);
            assert!(Histogram::upper(i) >= v, "{v}");
            if i > 0 {
                assert!(Histogram::upper(i - 1) < v, "{v}");
            }
        }
        let mut big = Histogram::default();
        big.record(Duration::MAX);
        assert!(big.quantile(0.5).is_some());
    }

    #[test]
    fn order_check_counts_violations() {
        let d = |p, o| Delivery {
            ack: herald::Ack {
                partition: Some(p),
                offset: Some(o),
                route: None,
            },
            attempts: 1,
            latency: Duration::ZERO,
        };
        let mut c = OrderCheck::new(2);
        // lines 1, 3, 5 are key 0; lines 2, 4 key 1.
        c.observe(1, &d(0, 10));
        c.observe(2, &d(1, 5));
        c.observe(3, &d(0, 11));
        c.observe(4, &d(1, 4));
        c.observe(5, &d(1, 12));
        assert_eq!((c.checked, c.violations), (3, 2));
    }
}
