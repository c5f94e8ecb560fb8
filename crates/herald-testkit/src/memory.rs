//! An in-memory transport that records what it receives and fails when told to.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use herald_core::{
    async_trait, Ack, BatchOutcome, Destination, EarlyAcks, ErrorClass, KeyHold, Message,
    Transport, TransportError, TransportHealth,
};

/// What one call of `send_batch` does, in a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFault {
    /// Accept every message (but those matched by a reject rule).
    Pass,
    /// Fail every message of the call with an error of this class (a lost connection, say).
    FailAll(ErrorClass),
    /// Fail the messages at these positions of the batch (transient), and, to honour the
    /// transport ordering contract, every later message of the batch that shares a key with one
    /// of them; accept the rest.
    FailSome(Vec<usize>),
    /// Store the messages at these positions but report them failed (transient), as when an
    /// acknowledgement is lost after the broker wrote the message; accept the rest, later
    /// messages of the same keys included. Nothing is held back here: this is the transport
    /// that learns of a failure after the fact (an asynchronous delivery report, a confirm that
    /// never came), and the pipeline's per-key hold ([`herald_core::KeyHold`]) keeps order.
    StoreThenFail(Vec<usize>),
    /// Wait this long, then behave as `Pass`.
    Delay(Duration),
    /// Wait this long, then behave as the inner fault (an answer that comes late: with
    /// [`MemoryTransport::keep_order_across_calls`], the calls after it store their messages
    /// before its failures are known).
    Slow(Duration, Box<CallFault>),
}

impl CallFault {
    /// How long the call waits, and what it then does.
    fn unwrap_delay(self) -> (Duration, CallFault) {
        match self {
            CallFault::Delay(d) => (d, CallFault::Pass),
            CallFault::Slow(d, inner) => {
                let (more, fault) = inner.unwrap_delay();
                (d + more, fault)
            }
            other => (Duration::ZERO, other),
        }
    }
}

type RejectRule = Arc<dyn Fn(&Message) -> Option<TransportError> + Send + Sync>;

struct Inner {
    record: bool,
    log: Mutex<Vec<Message>>,
    script: Mutex<VecDeque<CallFault>>,
    reject: Mutex<Option<RejectRule>>,
    latency: Mutex<Duration>,
    settle: Mutex<Duration>,
    diagnosis: Mutex<Option<String>>,
    health: Mutex<TransportHealth>,
    calls: AtomicU64,
    attempts: AtomicU64,
    delivered: AtomicU64,
    closed: AtomicU64,
    /// Stores (or refuses) a call's messages at its first poll, and only then waits out its
    /// latency: order across calls is kept (see `Transport::keeps_order_across_calls`).
    ordered: AtomicBool,
    /// Answers each message it stores early ([`Transport::send_batch_answering`]), before its
    /// latency and scripted delay.
    early: AtomicBool,
    /// Open unless [`MemoryTransport::hold`]: calls wait at their start while it is shut.
    gate: tokio::sync::watch::Sender<bool>,
}

/// An in-memory [`Transport`]: accepts messages, keeps them in arrival order (or only counts
/// them), and can be scripted to fail.
///
/// Clones share state: keep one to inspect what the producer sent.
///
/// ```
/// use herald_core::{ErrorClass, Message, Producer};
/// use herald_testkit::{CallFault, MemoryTransport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let transport = MemoryTransport::new();
/// transport.script([CallFault::FailAll(ErrorClass::Transient)]);
/// let producer = Producer::builder(transport.clone()).build().unwrap();
/// let delivery = producer.send(Message::new("t", "hi")).await.unwrap();
/// assert_eq!(delivery.attempts, 2, "the first call failed, the retry went through");
/// assert_eq!(transport.received().len(), 1);
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("record", &self.inner.record)
            .field("calls", &self.calls())
            .field("delivered", &self.delivered())
            .finish()
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// A transport that records every accepted message.
    pub fn new() -> Self {
        Self::with_recording(true)
    }

    /// A transport that only counts (for benchmarks: no memory grows with the run).
    pub fn counting() -> Self {
        Self::with_recording(false)
    }

    fn with_recording(record: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                record,
                log: Mutex::new(Vec::new()),
                script: Mutex::new(VecDeque::new()),
                reject: Mutex::new(None),
                latency: Mutex::new(Duration::ZERO),
                settle: Mutex::new(Duration::ZERO),
                diagnosis: Mutex::new(None),
                health: Mutex::new(TransportHealth::Up),
                calls: AtomicU64::new(0),
                attempts: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                closed: AtomicU64::new(0),
                ordered: AtomicBool::new(false),
                early: AtomicBool::new(false),
                gate: tokio::sync::watch::Sender::new(true),
            }),
        }
    }

    /// Makes every call wait, from its start, until [`release`](Self::release): a broker
    /// that stalls for as long as a test needs, with nothing lost.
    pub fn hold(&self) {
        self.inner.gate.send_replace(false);
    }

    /// Lets held calls (and later ones) go on.
    pub fn release(&self) {
        self.inner.gate.send_replace(true);
    }

    /// Appends to the script: each call of `send_batch` takes the next entry (a call past its
    /// deadline takes none: it fails `NOT_SENT`); once the script is used up, calls pass.
    pub fn script(&self, faults: impl IntoIterator<Item = CallFault>) {
        lock(&self.inner.script).extend(faults);
    }

    /// Rejects permanently every message whose payload starts with `prefix`, with a
    /// `POISON` error code.
    pub fn reject_payload_prefix(&self, prefix: impl Into<Bytes>) {
        let prefix = prefix.into();
        self.reject_with(move |m| {
            m.payload().starts_with(&prefix).then(|| {
                TransportError::permanent("message rejected by the memory transport")
                    .with_code("POISON")
            })
        });
    }

    /// Rejects messages with the error the rule returns for them.
    pub fn reject_with(
        &self,
        rule: impl Fn(&Message) -> Option<TransportError> + Send + Sync + 'static,
    ) {
        *lock(&self.inner.reject) = Some(Arc::new(rule));
    }

    /// Every call waits this long before answering.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.inner.latency) = latency;
    }

    /// What [`Transport::settle_time`] answers from now on: how long past an attempt's deadline
    /// the producer waits for this transport's answer (default zero: cut off at the deadline).
    pub fn set_settle_time(&self, settle: Duration) {
        *lock(&self.inner.settle) = settle;
    }

    /// What [`Transport::diagnosis`] answers from now on.
    pub fn set_diagnosis(&self, diagnosis: Option<&str>) {
        *lock(&self.inner.diagnosis) = diagnosis.map(str::to_owned);
    }

    /// What [`Transport::health`] answers from now on (as a real adapter would when its
    /// connection drops or the broker blocks it).
    pub fn set_health(&self, health: TransportHealth) {
        *lock(&self.inner.health) = health;
    }

    /// Keeps order across calls, as a broker client that queues each call's messages at once
    /// and waits for the broker's answer afterwards: a call stores (or refuses) its messages at
    /// its first poll, and its latency and scripted delay come after that, before it answers.
    /// Strict ordering then keeps several batches of a destination in flight (the pipeline
    /// depth). Off by default: a call waits first and stores when its wait is over, so calls
    /// with different delays store out of order.
    pub fn keep_order_across_calls(&self, on: bool) {
        self.inner.ordered.store(on, Ordering::Release);
    }

    /// Answers early ([`Transport::send_batch_answering`]): a call stores (or refuses) its
    /// messages at once, acknowledges each stored one early, and then waits out its latency
    /// and scripted delay before it returns; a call cut off meanwhile has stored them all the
    /// same. Off by default: answers come with the call's outcome.
    pub fn answer_early(&self, on: bool) {
        self.inner.early.store(on, Ordering::Release);
    }

    /// Messages accepted so far, in arrival order (empty for a counting transport).
    pub fn received(&self) -> Vec<Message> {
        lock(&self.inner.log).clone()
    }

    /// Calls of `send_batch` so far.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Acquire)
    }

    /// Messages handed to `send_batch` so far, retries included (not those of a call past its
    /// deadline, which fails them `NOT_SENT`).
    pub fn attempts(&self) -> u64 {
        self.inner.attempts.load(Ordering::Acquire)
    }

    /// Messages stored so far (those of [`CallFault::StoreThenFail`] included, though reported
    /// failed).
    pub fn delivered(&self) -> u64 {
        self.inner.delivered.load(Ordering::Acquire)
    }

    /// Times `close` was called.
    pub fn closes(&self) -> u64 {
        self.inner.closed.load(Ordering::Acquire)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryTransport {
    /// What a call does with its messages once its fault is known: stores them, or refuses them,
    /// and says so.
    fn answer(
        &self,
        destination: &Destination,
        batch: &[Message],
        fault: &CallFault,
    ) -> BatchOutcome {
        let inner = &self.inner;
        if let CallFault::FailAll(class) = fault {
            let class = *class;
            let e = TransportError::new(class, "scripted failure of the whole call")
                .with_code("SCRIPTED");
            return vec![Err(e); batch.len()];
        }
        let fail: HashSet<usize> = match fault {
            CallFault::FailSome(idx) => idx.iter().copied().collect(),
            _ => HashSet::new(),
        };
        let lost_ack: HashSet<usize> = match fault {
            CallFault::StoreThenFail(idx) => idx.iter().copied().collect(),
            _ => HashSet::new(),
        };
        let reject = lock(&inner.reject).clone();
        // herald's one per-key rule: after a scripted failure, later messages of its key are
        // not stored.
        let mut hold = KeyHold::default();
        let mut out = Vec::with_capacity(batch.len());
        let mut accepted = Vec::new();
        let mut lost = 0u64;
        for (i, m) in batch.iter().enumerate() {
            if let Some(held) = hold.check(m) {
                out.push(Err(held));
                continue;
            }
            if fail.contains(&i) {
                let e = TransportError::transient("scripted failure of this message")
                    .with_code("SCRIPTED");
                hold.failed(m, &e);
                out.push(Err(e));
                continue;
            }
            if let Some(e) = reject.as_ref().and_then(|r| r(m)) {
                out.push(Err(e));
                continue;
            }
            if lost_ack.contains(&i) {
                lost += 1;
                if inner.record {
                    lock(&inner.log).push(m.clone().with_destination(destination.clone()));
                }
                out.push(Err(TransportError::transient(
                    "scripted: stored, but the acknowledgement was lost",
                )
                .with_code("SCRIPTED_LOST_ACK")));
                continue;
            }
            out.push(Ok(Ack {
                partition: Some(0),
                offset: None,
                route: None,
            }));
            if inner.record {
                // Stored where the call said, as a broker does.
                accepted.push(m.clone().with_destination(destination.clone()));
            }
        }
        let n = out.iter().filter(|o| o.is_ok()).count() as u64;
        if inner.record {
            let mut log = lock(&inner.log);
            let base = log.len() as i64;
            log.extend(accepted);
            for (offset, ack) in (base..).zip(out.iter_mut().flatten()) {
                ack.offset = Some(offset);
            }
        }
        inner.delivered.fetch_add(n + lost, Ordering::AcqRel);
        out
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn settle_time(&self) -> Duration {
        *lock(&self.inner.settle)
    }

    fn keeps_order_across_calls(&self) -> bool {
        self.inner.ordered.load(Ordering::Acquire)
    }

    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome {
        self.send(destination, batch, None, None).await
    }

    async fn send_batch_until(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
    ) -> BatchOutcome {
        self.send(destination, batch, Some(deadline), None).await
    }

    async fn send_batch_answering(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
        early: EarlyAcks,
    ) -> BatchOutcome {
        let early = self.inner.early.load(Ordering::Acquire).then_some(early);
        self.send(destination, batch, Some(deadline), early).await
    }

    async fn close(&self) {
        self.inner.closed.fetch_add(1, Ordering::AcqRel);
    }

    fn diagnosis(&self) -> Option<String> {
        lock(&self.inner.diagnosis).clone()
    }

    fn health(&self) -> TransportHealth {
        lock(&self.inner.health).clone()
    }
}

impl MemoryTransport {
    /// A call: with `early`, its stored messages are answered at once, before its wait. Past
    /// `deadline` when the gate opens, nothing is stored: every message fails `NOT_SENT`, as
    /// `Transport::send_batch_until` asks, and the call takes no scripted fault and counts no
    /// attempts (it does count in `calls`). A call under way stores when its latency is over,
    /// deadline or not (herald cuts it off at the deadline plus the settle time).
    async fn send(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: Option<std::time::Instant>,
        early: Option<EarlyAcks>,
    ) -> BatchOutcome {
        let inner = &self.inner;
        inner.calls.fetch_add(1, Ordering::AcqRel);
        // The sender lives in `inner`: never closed while this call runs.
        let mut gate = inner.gate.subscribe();
        let _open = gate.wait_for(|open| *open).await.map(|_| ());
        if herald_core::deadline_passed(deadline) {
            let e = TransportError::transient("not sent: the attempt's deadline had passed")
                .with_code("NOT_SENT");
            return batch.iter().map(|_| Err(e.clone())).collect();
        }
        inner
            .attempts
            .fetch_add(batch.len() as u64, Ordering::AcqRel);
        let (delay, fault) = lock(&inner.script)
            .pop_front()
            .unwrap_or(CallFault::Pass)
            .unwrap_delay();
        let wait = *lock(&inner.latency) + delay;
        if inner.ordered.load(Ordering::Acquire) || early.is_some() {
            let out = self.answer(destination, batch, &fault);
            if let Some(early) = &early {
                for (index, outcome) in out.iter().enumerate() {
                    if let Ok(ack) = outcome {
                        early.ack(index, *ack);
                    }
                }
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            return out;
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.answer(destination, batch, &fault)
    }
}
