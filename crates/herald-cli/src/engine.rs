//! Sending a stream of messages through a producer and collecting every message's fate: the
//! loop shared by `produce`, `demo` and `bench`.
//!
//! The feeder hands messages over in runs ([`Engine::send_many`]): one
//! `Producer::enqueue_tagged` each, tagged with the input line, which waits for buffer space
//! (backpressure) and admits a run under one lock. Fates come through a sink to the collector
//! task in the order they happen: no future per message, and nothing waits behind a slow
//! message ahead of it. Memory stays bounded whatever the input's size: the producer's buffer
//! (or its spool), the copies of what it holds when a run may be cut off, and a fixed-size
//! latency histogram.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use herald::{Delivery, Destination, FateSink, Message, Producer, SendError};
use indicatif::ProgressBar;
use serde_json::Value;
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
/// increase with the input line (a key always lands in the same partition). Fates come in the
/// order they happen, which for one key may differ from the input's (two batches landing at
/// once): each acknowledgement is kept, and compared in input order at the end.
#[derive(Debug)]
pub(crate) struct OrderCheck {
    /// Key of the message on input line `n`: `key-{(n - 1) % keys}`.
    keys: u64,
    /// (input line, partition, offset) of every acknowledgement that had both.
    acks: Vec<(u64, i32, i64)>,
}

impl OrderCheck {
    pub(crate) fn new(keys: u64) -> Self {
        Self {
            keys: keys.max(1),
            acks: Vec::new(),
        }
    }

    fn observe(&mut self, line: u64, d: &Delivery) {
        if let (Some(p), Some(o)) = (d.ack.partition, d.ack.offset) {
            self.acks.push((line, p, o));
        }
    }

    /// Consecutive same-key acknowledgements compared, and how many were out of order
    /// (another partition, or an offset not above the one before).
    pub(crate) fn verdict(&self) -> (u64, u64) {
        let mut acks = self.acks.clone();
        acks.sort_unstable_by_key(|(line, ..)| *line);
        let mut last = vec![None; usize::try_from(self.keys).unwrap_or(usize::MAX)];
        let (mut checked, mut violations) = (0, 0);
        for (line, p, o) in acks {
            let slot = &mut last[((line - 1) % self.keys) as usize];
            if let Some((lp, lo)) = *slot {
                checked += 1;
                if lp != p || lo >= o {
                    violations += 1;
                }
            }
            *slot = Some((p, o));
        }
        (checked, violations)
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
    /// Fates that came through the engine's sink before it finished or was cut off.
    seen: u64,
    /// Dead-letter records held back until every line before theirs has ended, so that the
    /// file is in input order (see [`Engine::start`]); `None`: written as they come.
    held: Option<BTreeMap<u64, Value>>,
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
            seen: 0,
            held: None,
        }
    }

    /// Writes `record`, of input line `line`, to the dead-letter file: at once, or once every
    /// line before it has ended.
    fn record(&mut self, line: Option<u64>, record: impl FnOnce() -> Value) {
        let Some(dl) = &mut self.dead_letter else {
            return;
        };
        match (&mut self.held, line) {
            (Some(held), Some(line)) => {
                held.insert(line, record());
                hold_at_most(held, dl);
            }
            _ => dl.write(&record()),
        }
    }

    /// Writes the records held back of the lines before `outstanding`, the first line whose
    /// fate is not known yet (`None`: every line handed over has ended).
    fn release(&mut self, outstanding: Option<u64>) {
        let (Some(held), Some(dl)) = (&mut self.held, &mut self.dead_letter) else {
            return;
        };
        while let Some(entry) = held.first_entry() {
            if outstanding.is_some_and(|o| *entry.key() >= o) {
                break;
            }
            dl.write(&entry.remove());
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

    fn fate(&mut self, line: u64, outcome: Result<Delivery, SendError>) {
        match outcome {
            Ok(d) => self.delivered(line, &d),
            Err(e) => self.failed(Some(line), &e),
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
        self.record(line, || failed_record(line, e));
        if let Some(p) = &self.progress {
            p.inc(1);
        }
    }

    /// A message whose fate was not waited for (the run was interrupted and its grace period
    /// is over; no spool): recorded as failed, with its copy when there is one.
    fn unacknowledged(&mut self, line: u64, msg: Option<&Message>) {
        self.tally.failed += 1;
        self.tally.cut_off += 1;
        if let Some(msg) = msg {
            self.example(format!("line {line}: {UNACKNOWLEDGED}"));
            self.record(Some(line), || {
                unacknowledged_record(line, msg, UNACKNOWLEDGED)
            });
        } else {
            self.example(UNACKNOWLEDGED.to_owned());
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
        // A clone (cheap, and malformed lines are rare): the record is made under `&mut self`.
        let destination = self.destination.clone();
        self.record(Some(line), || {
            malformed_record(line, &destination, raw, error)
        });
    }
}

/// Dead-letter records held back at most, waiting for a line before theirs to end: beyond
/// it the earliest are written (memory stays bounded when one message takes its whole delivery
/// timeout while many after it fail; the file is then in input order but for those).
const HELD_AT_MOST: usize = 65_536;

/// Writes the earliest of `held` while it holds more than [`HELD_AT_MOST`].
fn hold_at_most(held: &mut BTreeMap<u64, Value>, dl: &mut DeadLetter) {
    while held.len() > HELD_AT_MOST {
        if let Some((_, record)) = held.pop_first() {
            dl.write(&record);
        }
    }
}

/// What the feeder tells the collector besides fates.
enum Control {
    Refused(u64, SendError),
    Malformed(u64, Vec<u8>, String),
}

/// A fate reported through the engine's sink: (input line, outcome).
type Fate = (u64, Result<Delivery, SendError>);

/// Runs of fates the collector takes from its channel at a time.
const FATES_AT_ONCE: usize = 64;

/// The engine's sink: fates go to the collector, those that ended together in one piece.
struct ToCollector(mpsc::UnboundedSender<Vec<Fate>>);

impl FateSink for ToCollector {
    fn fate(&self, line: u64, outcome: Result<Delivery, SendError>) {
        // The collector gone (cut off): what comes late is read by `finish`.
        let _sent = self.0.send(vec![(line, outcome)]);
    }

    fn fates(&self, fates: &mut dyn Iterator<Item = Fate>) {
        let _sent = self.0.send(fates.collect());
    }
}

/// The lines handed over whose fates (or records) the collector has not taken yet, each with a
/// copy of its message, kept when the dead-letter file is written in input order (see
/// [`Engine::start`]).
type Outstanding = Arc<Mutex<crate::outstanding::Outstanding>>;

fn lock(outstanding: &Outstanding) -> std::sync::MutexGuard<'_, crate::outstanding::Outstanding> {
    outstanding.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A producer with its collector task.
pub(crate) struct Engine {
    producer: Producer,
    tx: mpsc::Sender<Control>,
    collector: JoinHandle<(Collector, Option<mpsc::UnboundedReceiver<Vec<Fate>>>)>,
    /// Where fates go: to the collector, in the order they happen.
    sink: Arc<dyn FateSink>,
    /// Messages the producer accepted.
    accepted: AtomicU64,
    /// The producer keeps what it accepts in a spool (see [`Collector::spool`]).
    spool: bool,
    /// `Some` when the dead-letter file is written in input order.
    outstanding: Option<Outstanding>,
    cut_off: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    held_records: HeldRecords,
}

impl Engine {
    /// Starts the collector. Every message goes through `Producer::enqueue_tagged`, tagged
    /// with its input line: no future per message, and fates come through a sink as they
    /// happen, so that nothing waits here behind a message ahead of it. What waits is bounded
    /// by the producer: its buffer, or with a spool (`collector.spool`), the spool. The
    /// collector ends once every accepted message's fate is in and the engine is finished
    /// (the sink's last clone gone), or at a cut-off.
    ///
    /// The dead-letter file, if the collector has one, is written in input order without a
    /// spool (a record waits until every line before it has ended, and a copy of each message
    /// the producer holds is kept, to record it if the wait is cut off: cheap, payloads are
    /// shared); with a spool, in the order messages end (what is cut off stays in the spool).
    pub(crate) fn start(producer: Producer, mut collector: Collector) -> Self {
        let (tx, mut rx) = mpsc::channel::<Control>(1024);
        let (fates_tx, mut fates) = mpsc::unbounded_channel::<Vec<Fate>>();
        let sink: Arc<dyn FateSink> = Arc::new(ToCollector(fates_tx));
        let spool = collector.spool;
        let outstanding = (!spool && collector.dead_letter.is_some()).then(Outstanding::default);
        if outstanding.is_some() {
            collector.held = Some(BTreeMap::new());
        }
        let cut_off = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let mut cut = cut_off.subscribe();
        let held_records = HeldRecords::default();
        let mut write_held = held_records.ask.subscribe();
        let held_written = held_records.written.clone();
        let tracked = outstanding.clone();
        let collector = tokio::spawn(async move {
            // Fates seen, and whether the wait for the rest was cut off.
            let mut seen = 0u64;
            let mut cut_now = false;
            let (mut fates_open, mut control_open) = (true, true);
            let mut got = Vec::with_capacity(FATES_AT_ONCE);
            // Lines ended in this turn of the loop (tracked: the file is in input order).
            let mut ended = Vec::new();
            while (fates_open && !cut_now) || control_open {
                tokio::select! {
                    biased;
                    n = fates.recv_many(&mut got, FATES_AT_ONCE), if fates_open && !cut_now => {
                        // None left: every accepted message's fate is in, and the engine is
                        // finished.
                        fates_open = n > 0;
                        for (line, outcome) in got.drain(..).flatten() {
                            seen += 1;
                            if tracked.is_some() {
                                ended.push(line);
                            }
                            collector.fate(line, outcome);
                        }
                    },
                    c = rx.recv(), if control_open => match c {
                        Some(Control::Refused(line, e)) => {
                            ended.push(line);
                            collector.failed(Some(line), &e);
                        }
                        Some(Control::Malformed(line, raw, error)) => {
                            ended.push(line);
                            collector.malformed(line, &raw, &error);
                        }
                        None => control_open = false,
                    },
                    // What has no fate yet is for `finish` to record.
                    Ok(()) = async { cut.wait_for(|c| *c).await.map(|_| ()) }, if !cut_now => {
                        cut_now = true;
                    }
                    // The process is about to end (a second signal): what is held goes now.
                    Ok(()) = write_held.changed() => {
                        collector.release(None);
                        held_written.notify_one();
                    }
                }
                if !ended.is_empty() {
                    if let Some(tracked) = &tracked {
                        let first = forget(tracked, ended.iter().copied());
                        collector.release(first);
                    }
                    ended.clear();
                }
            }
            collector.seen = seen;
            (collector, cut_now.then_some(fates))
        });
        Self {
            producer,
            tx,
            collector,
            sink,
            accepted: AtomicU64::new(0),
            spool,
            outstanding,
            cut_off,
            held_records,
        }
    }

    /// Lets another task write every dead-letter record held back at once, before the
    /// process ends without waiting for the rest ([`HeldRecords::write_now`]).
    pub(crate) fn held_records(&self) -> HeldRecords {
        self.held_records.clone()
    }

    /// Lets another task stop the wait for fates: every message not acknowledged by then is
    /// recorded as failed at once (with its copy, in the dead-letter file), or with a spool,
    /// counted as kept there for the next run.
    pub(crate) fn cut_off(&self) -> CutOff {
        CutOff(self.cut_off.clone())
    }

    async fn push(&self, c: Control) -> anyhow::Result<()> {
        self.tx
            .send(c)
            .await
            .map_err(|_| anyhow!("internal error: the collector task ended early"))
    }

    /// Sends `msg` (input line `line`), waiting for buffer space.
    pub(crate) async fn send(&self, line: u64, msg: Message) -> anyhow::Result<()> {
        self.send_many(vec![(line, msg)]).await
    }

    /// Sends messages (input line, message) in order, waiting for buffer space: one
    /// `Producer::enqueue_tagged`, so that they are admitted many under one lock, or with a
    /// spool, stored with one write.
    pub(crate) async fn send_many(&self, msgs: Vec<(u64, Message)>) -> anyhow::Result<()> {
        let n = msgs.len() as u64;
        if let Some(outstanding) = &self.outstanding {
            // Before the producer has them: a fate may come at once.
            let mut outstanding = lock(outstanding);
            for (line, msg) in &msgs {
                outstanding.add(*line, Some(msg.clone()));
            }
        }
        let refused = self.producer.enqueue_tagged(msgs, &self.sink).await;
        self.accepted
            .fetch_add(n - refused.len() as u64, Ordering::AcqRel);
        for (line, e) in refused {
            self.push(Control::Refused(line, e)).await?;
        }
        Ok(())
    }

    /// Records an input line that is not a message.
    pub(crate) async fn malformed(
        &self,
        line: u64,
        raw: Vec<u8>,
        error: String,
    ) -> anyhow::Result<()> {
        if let Some(outstanding) = &self.outstanding {
            lock(outstanding).add(line, None);
        }
        self.push(Control::Malformed(line, raw, error)).await
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
            sink,
            accepted,
            spool,
            outstanding,
            ..
        } = self;
        // The collector ends once the sink's last clone is gone: ours, then those of the
        // messages the producer still holds, as their fates come.
        drop((tx, sink));
        let accepted = accepted.into_inner();
        let (mut collector, late) = collector.await.context("the collector task failed")?;
        let Some(mut late) = late else {
            let close = producer.close(close_timeout).await;
            collector.release(None);
            for e in &close.unclaimed {
                collector.failed(None, e);
            }
            return Ok((collector, producer));
        };
        // Cut off: closed at once, and what ended meanwhile is read from `late`.
        let unclaimed = producer.close(Duration::ZERO).await.unclaimed;
        let mut late_fates = Vec::new();
        while let Ok(fates) = late.try_recv() {
            late_fates.extend(fates);
        }
        if spool {
            // What has no fate stays in the spool. One that failed for its own reason
            // (rejected, say) left the spool with its error, and is recorded, not kept.
            let mut kept = accepted.saturating_sub(collector.seen);
            for (line, outcome) in late_fates {
                if let Err(e) = outcome {
                    if !e.is_kept_in_store() {
                        kept = kept.saturating_sub(1);
                        collector.failed(Some(line), &e);
                    }
                }
            }
            for _ in 0..kept {
                collector.kept();
            }
        } else {
            // What ended meanwhile is recorded as it ended; the rest, still in flight, as not
            // acknowledged, with its copy.
            if let Some(outstanding) = &outstanding {
                forget(outstanding, late_fates.iter().map(|(line, _)| *line));
            }
            let left = accepted.saturating_sub(collector.seen + late_fates.len() as u64);
            for (line, outcome) in late_fates {
                collector.fate(line, outcome);
            }
            let copies = outstanding.map(|o| lock(&o).take());
            let mut copied = 0;
            for (line, msg) in copies.into_iter().flatten() {
                if let Some(msg) = msg {
                    copied += 1;
                    collector.unacknowledged(line, Some(&msg));
                }
            }
            // Without a dead-letter file no copies are kept: counted all the same.
            for _ in copied..left {
                collector.unacknowledged(0, None);
            }
        }
        collector.release(None);
        for e in &unclaimed {
            collector.failed(None, e);
        }
        Ok((collector, producer))
    }
}

/// Forgets the lines of `ended`: their fates are in. Returns the first line still outstanding.
fn forget(outstanding: &Outstanding, ended: impl Iterator<Item = u64>) -> Option<u64> {
    let mut outstanding = lock(outstanding);
    for line in ended {
        outstanding.end(line);
    }
    outstanding.first()
}

/// Writes the dead-letter records the collector holds back ([`Engine::held_records`]).
#[derive(Clone, Default)]
pub(crate) struct HeldRecords {
    /// Asks the collector to write them.
    ask: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    /// The collector wrote them.
    written: std::sync::Arc<tokio::sync::Notify>,
}

impl HeldRecords {
    /// Writes every record held back (records of lines that ended, waiting for an earlier line
    /// still in flight, so that the file stays in input order), out of order if need be, and
    /// returns once they are written, or after `within`: the process is about to end.
    pub(crate) async fn write_now(&self, within: Duration) {
        let written = self.written.notified();
        tokio::pin!(written);
        written.as_mut().enable();
        self.ask.send_replace(true);
        let _in_time = tokio::time::timeout(within, written).await;
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

    /// Rejects every message: those with the payload `slow` only once the gate opens.
    struct Gated(Arc<tokio::sync::Notify>);

    #[herald::async_trait]
    impl herald::Transport for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }
        async fn send_batch(&self, _: &Destination, batch: &[Message]) -> herald::BatchOutcome {
            if batch.iter().any(|m| m.payload().as_ref() == b"slow") {
                self.0.notified().await;
            }
            batch
                .iter()
                .map(|_| Err(herald::TransportError::permanent("rejected")))
                .collect()
        }
    }

    /// Fates come as messages end (line 1 last here), yet the dead-letter file is in input
    /// order, a malformed line handed over after them included.
    #[tokio::test]
    async fn the_dead_letter_file_is_in_input_order_whatever_order_fates_come_in() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let producer = Producer::builder(Gated(gate.clone()))
            .ordering(herald::OrderingMode::Relaxed)
            .batching(herald::batch::SizeOrLinger::new(1, 1 << 20, Duration::ZERO))
            .build()
            .expect("producer");
        let path =
            std::env::temp_dir().join(format!("herald-engine-order-{}.jsonl", std::process::id()));
        let _gone = std::fs::remove_file(&path);
        let mut collector = Collector::new(Destination::new("t"));
        collector.dead_letter = Some(DeadLetter::new(&path));
        let engine = Engine::start(producer.clone(), collector);
        let msgs = ["slow", "fast", "fast"]
            .into_iter()
            .zip(1u64..)
            .map(|(payload, line)| (line, Message::new("t", payload)))
            .collect();
        engine.send_many(msgs).await.expect("sent");
        engine
            .malformed(4, b"{".to_vec(), "line 4: not JSON".into())
            .await
            .expect("recorded");
        // Lines 2 and 3 end first (on this one-thread runtime their fates are handed over by
        // the time the producer counts them).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while producer.stats().totals.failed < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "lines 2 and 3 never failed"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        gate.notify_one();
        let (mut collector, _) = engine.finish(Duration::from_secs(5)).await.expect("finish");
        let mut dl = collector.dead_letter.take().expect("dead letter");
        dl.finish();
        assert_eq!((collector.tally.failed, collector.tally.malformed), (3, 1));
        let text = std::fs::read_to_string(&path).expect("dead-letter file");
        let _gone = std::fs::remove_file(&path);
        let lines: Vec<u64> = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("JSON");
                v["line"].as_u64().expect("line")
            })
            .collect();
        assert_eq!(lines, [1, 2, 3, 4], "{text}");
    }

    /// Acknowledges everything at once.
    struct Accepting;

    #[herald::async_trait]
    impl herald::Transport for Accepting {
        fn name(&self) -> &'static str {
            "accepting"
        }
        async fn send_batch(&self, _: &Destination, batch: &[Message]) -> herald::BatchOutcome {
            batch.iter().map(|_| Ok(herald::Ack::default())).collect()
        }
    }

    /// What the feeder says last (a malformed line) is recorded even when every fate is in
    /// before the collector reads it, with a spool and without: the collector reads what the
    /// feeder told it to the end, not only until the last fate.
    #[tokio::test]
    async fn a_line_handed_over_after_the_last_fate_is_still_recorded() {
        for spool in [false, true] {
            let dir = std::env::temp_dir()
                .join(format!("herald-engine-last-{}-{spool}", std::process::id()));
            let _gone = std::fs::remove_dir_all(&dir);
            let mut builder = Producer::builder(Accepting);
            if spool {
                use herald::spool::ProducerBuilderExt as _;
                builder = builder
                    .spool(herald::spool::SpoolConfig::new(&dir))
                    .expect("spool");
            }
            let producer = builder.build().expect("producer");
            let mut collector = Collector::new(Destination::new("t"));
            collector.spool = spool;
            let engine = Engine::start(producer.clone(), collector);
            engine
                .send_many(vec![(1, Message::new("t", "m"))])
                .await
                .expect("sent");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while producer.stats().totals.delivered < 1 {
                assert!(std::time::Instant::now() < deadline, "never delivered");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            engine
                .malformed(2, b"{".to_vec(), "line 2: not JSON".into())
                .await
                .expect("recorded");
            let (collector, _) = engine.finish(Duration::from_secs(5)).await.expect("finish");
            let t = &collector.tally;
            assert_eq!((t.delivered, t.malformed), (1, 1), "spool: {spool}");
            let _gone = std::fs::remove_dir_all(&dir);
        }
    }

    /// Records waiting for an earlier line are bounded: beyond the bound the earliest go out.
    #[test]
    fn at_most_so_many_records_wait() {
        let path =
            std::env::temp_dir().join(format!("herald-engine-held-{}.jsonl", std::process::id()));
        let _gone = std::fs::remove_file(&path);
        let mut dl = DeadLetter::new(&path);
        let mut held: BTreeMap<u64, Value> = (0..HELD_AT_MOST as u64 + 2)
            .map(|line| (line, serde_json::json!({ "line": line })))
            .collect();
        hold_at_most(&mut held, &mut dl);
        dl.finish();
        assert_eq!(held.len(), HELD_AT_MOST);
        assert_eq!(held.first_key_value().map(|(k, _)| *k), Some(2));
        let text = std::fs::read_to_string(&path).expect("dead-letter file");
        let _gone = std::fs::remove_file(&path);
        assert_eq!(text, "{\"line\":0}\n{\"line\":1}\n");
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
        // lines 1, 3, 5 are key 0; lines 2, 4 key 1. Line 3's fate comes before line 1's:
        // in order all the same.
        c.observe(3, &d(0, 11));
        c.observe(1, &d(0, 10));
        c.observe(2, &d(1, 5));
        c.observe(4, &d(1, 4));
        c.observe(5, &d(1, 12));
        assert_eq!(c.verdict(), (3, 2));
        let mut swapped = OrderCheck::new(1);
        swapped.observe(1, &d(0, 2));
        swapped.observe(2, &d(0, 1));
        assert_eq!(swapped.verdict(), (1, 1));
    }
}
