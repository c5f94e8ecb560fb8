//! The producer: a cheap, cloneable handle in front of the pipeline.

mod completion;
mod pipeline;

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald_batch::{Accumulator, BatchPolicy, SizeOrLinger};
use herald_retry::{
    CircuitBreakerConfig, CircuitState, ExponentialRetry, RetryBudgetConfig, RetryPolicy,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use completion::{BulkReceipt, BulkReport, DeadLetterHook, Delivery, DeliveryFuture};
pub use pipeline::Totals;

use crate::error::{BuildError, FailureReason, SendError};
use crate::health::{Health, HealthPolicy};
use crate::message::Message;
use crate::transport::Transport;
use completion::{Completion, Group};
use pipeline::{clock_now, Config, Refused, Shared};

/// How strictly the producer keeps order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingMode {
    /// Messages with the same destination and key reach the broker in the order they were
    /// accepted, retries included. Per destination, one batch is in flight at a time and a
    /// retried message goes out before anything accepted after it.
    #[default]
    Strict,
    /// Batches of one destination go out concurrently (up to the producer's max in-flight) and
    /// retried messages rejoin the back of the queue: more throughput under faults, no order
    /// guarantee.
    Relaxed,
}

/// What is happening inside a producer right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProducerStats {
    /// Messages accepted and not yet ended (queued, waiting to retry, or in flight).
    pub buffered_messages: usize,
    /// Their bytes.
    pub buffered_bytes: usize,
    /// Batches the transport is sending now.
    pub in_flight_batches: usize,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// Running totals since the producer was built.
    pub totals: Totals,
    /// Failed messages whose caller had stopped listening.
    pub unclaimed: u64,
}

/// What [`Producer::close`] could and could not do.
#[derive(Debug, Default)]
pub struct CloseReport {
    /// Whether everything accepted ended on its own (delivered, or failed for its own reason)
    /// before the deadline. False if the deadline passed and leftovers were failed with
    /// [`FailureReason::Closed`].
    pub drained: bool,
    /// Messages the transport was still sending when the deadline passed. Each still ends through
    /// its own future or receipt (a transient failure is no longer retried: it ends as
    /// [`FailureReason::Closed`]); if nobody listens, through the dead-letter hook, or in the
    /// `unclaimed` list of a later `close` call, which returns at once.
    pub in_flight: usize,
    /// Failed messages nobody was listening for (their future or receipt was dropped and no
    /// dead-letter hook is set), each with its error. This is where fire-and-forget sends end.
    pub unclaimed: Vec<SendError>,
    /// Running totals at the end.
    pub totals: Totals,
}

/// Builds a [`Producer`]. Every setting has a default; [`ProducerBuilder::build`] checks them
/// all and names the first that cannot work.
pub struct ProducerBuilder {
    transport: Arc<dyn Transport>,
    batching: Box<dyn BatchPolicy>,
    retry: Arc<dyn RetryPolicy>,
    budget: RetryBudgetConfig,
    breaker: CircuitBreakerConfig,
    max_buffered_messages: usize,
    max_buffered_bytes: usize,
    max_message_bytes: usize,
    max_in_flight: usize,
    delivery_timeout: Duration,
    ordering: OrderingMode,
    dead_letter: Option<DeadLetterHook>,
    health: HealthPolicy,
    name: Option<String>,
}

impl std::fmt::Debug for ProducerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerBuilder")
            .field("transport", &self.transport.name())
            .field("batching", &self.batching)
            .field("retry", &self.retry)
            .field("budget", &self.budget)
            .field("breaker", &self.breaker)
            .field("max_buffered_messages", &self.max_buffered_messages)
            .field("max_buffered_bytes", &self.max_buffered_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("ordering", &self.ordering)
            .field("dead_letter", &self.dead_letter.is_some())
            .field("health", &self.health)
            .field("name", &self.name)
            .finish()
    }
}

impl ProducerBuilder {
    fn new(transport: Arc<dyn Transport>) -> Self {
        Self {
            transport,
            batching: Box::new(SizeOrLinger::default()),
            retry: Arc::new(ExponentialRetry::default()),
            budget: RetryBudgetConfig::default(),
            breaker: CircuitBreakerConfig::default(),
            max_buffered_messages: 100_000,
            max_buffered_bytes: 64 << 20,
            max_message_bytes: 1 << 20,
            max_in_flight: 8,
            delivery_timeout: Duration::from_secs(120),
            ordering: OrderingMode::Strict,
            dead_letter: None,
            health: HealthPolicy::default(),
            name: None,
        }
    }

    /// The batching policy. Default: [`SizeOrLinger::default`] (1 024 messages, 1 MiB, 5 ms).
    #[must_use]
    pub fn batching(mut self, policy: impl BatchPolicy) -> Self {
        self.batching = Box::new(policy);
        self
    }

    /// The retry policy. Default: [`ExponentialRetry::default`] (100 ms doubling to 10 s, full
    /// jitter, attempts bounded only by the delivery timeout).
    #[must_use]
    pub fn retry(mut self, policy: impl RetryPolicy) -> Self {
        self.retry = Arc::new(policy);
        self
    }

    /// The retry budget, counted in requests: each batch sent deposits `ratio` of a token, each
    /// retry of a failed batch's messages (sent again together) takes one, and `min_per_sec`
    /// tokens come per second regardless. A retry held back by the budget waits (within its
    /// delivery timeout) instead of failing. Default: [`RetryBudgetConfig::default`] (0.2 and
    /// 10/s, as tower's).
    #[must_use]
    pub fn retry_budget(mut self, budget: RetryBudgetConfig) -> Self {
        self.budget = budget;
        self
    }

    /// The circuit breaker consulted before each batch. Default: [`CircuitBreakerConfig::default`].
    #[must_use]
    pub fn circuit_breaker(mut self, breaker: CircuitBreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Buffer limits: messages and bytes accepted and not yet ended. When either is reached,
    /// `send` waits and `try_send` hands the message back. Default: 100 000 messages, 64 MiB.
    #[must_use]
    pub fn buffer(mut self, max_messages: usize, max_bytes: usize) -> Self {
        self.max_buffered_messages = max_messages;
        self.max_buffered_bytes = max_bytes;
        self
    }

    /// The largest message accepted (payload, key and headers); a larger one fails its own send
    /// with a permanent error at once. Default: 1 MiB.
    #[must_use]
    pub fn max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// Most batches the transport sends at once. Default: 8.
    #[must_use]
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max;
        self
    }

    /// The whole life of a message, from acceptance to acknowledgement, retries included (like
    /// Kafka's `delivery.timeout.ms`). Default: 120 s.
    #[must_use]
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Ordering mode. Default: [`OrderingMode::Strict`].
    #[must_use]
    pub fn ordering(mut self, ordering: OrderingMode) -> Self {
        self.ordering = ordering;
        self
    }

    /// Called with every failed message whose caller stopped listening (a dropped future or
    /// receipt), for example to write it to a dead-letter store. Without a hook, such messages
    /// are kept and returned by [`Producer::close`]. Runs on the producer's tasks: keep it quick.
    #[must_use]
    pub fn dead_letter(mut self, hook: impl Fn(SendError) + Send + Sync + 'static) -> Self {
        self.dead_letter = Some(Arc::new(hook));
        self
    }

    /// Names the producer: every metric it emits carries the label `producer` with this name,
    /// so that several producers on one transport in one process keep separate series. Up to
    /// 64 ASCII letters, digits, `_`, `-` or `.`; a name per producer, never per message.
    /// Default: no name and no `producer` label.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// When the producer counts as degraded or unhealthy, and how often health is evaluated.
    /// Default: [`HealthPolicy::default`].
    pub fn health(mut self, policy: HealthPolicy) -> Self {
        self.health = policy;
        self
    }

    fn validate(&self) -> Result<(), BuildError> {
        let invalid = |field, reason: &str| {
            Err(BuildError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.max_buffered_messages == 0 {
            return invalid("buffer.max_messages", "must be at least 1");
        }
        if self.max_buffered_bytes == 0 {
            return invalid("buffer.max_bytes", "must be at least 1");
        }
        if self.max_message_bytes == 0 {
            return invalid("max_message_bytes", "must be at least 1");
        }
        if self.max_message_bytes > self.max_buffered_bytes {
            return Err(BuildError::Invalid {
                field: "max_message_bytes",
                reason: format!(
                    "{} is larger than buffer.max_bytes ({}): such a message could never be buffered",
                    self.max_message_bytes, self.max_buffered_bytes
                ),
            });
        }
        if self.max_in_flight == 0 {
            return invalid("max_in_flight", "must be at least 1");
        }
        if self.delivery_timeout.is_zero() {
            return invalid("delivery_timeout", "must be more than zero");
        }
        if self.delivery_timeout > MAX_DELIVERY_TIMEOUT {
            return invalid(
                "delivery_timeout",
                "must be at most 365 days (a message is kept in memory until then)",
            );
        }
        self.batching.validate()?;
        if self.batching.linger() >= self.delivery_timeout {
            return Err(BuildError::Invalid {
                field: "batch.linger",
                reason: format!(
                    "{:?} is not shorter than delivery_timeout ({:?}): messages would expire while lingering",
                    self.batching.linger(),
                    self.delivery_timeout
                ),
            });
        }
        self.retry.validate()?;
        self.budget.validate()?;
        self.breaker.validate()?;
        if let Some(name) = &self.name {
            let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
            if name.is_empty() || name.len() > 64 || !name.chars().all(fine) {
                return Err(BuildError::Invalid {
                    field: "name",
                    reason: format!(
                        "{name:?}: use 1 to 64 ASCII letters, digits, `_`, `-` or `.` (it becomes a metric label)"
                    ),
                });
            }
        }
        self.health.check().map_err(|reason| BuildError::Invalid {
            field: "health",
            reason,
        })?;
        Ok(())
    }

    /// Checks every setting and starts the producer's dispatcher on the current Tokio runtime.
    pub fn build(self) -> Result<Producer, BuildError> {
        self.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let per_destination = match self.ordering {
            OrderingMode::Strict => Some(1),
            OrderingMode::Relaxed => None,
        };
        let acc = Accumulator::with_boxed_policy(self.batching, per_destination);
        let config = Config {
            max_buffered_messages: self.max_buffered_messages,
            max_buffered_bytes: self.max_buffered_bytes,
            max_message_bytes: self.max_message_bytes,
            max_in_flight: self.max_in_flight,
            delivery_timeout: self.delivery_timeout,
            ordering: self.ordering,
            retry: self.retry,
            health: self.health,
            name: self.name,
        };
        let shared = Arc::new(Shared::new(
            config,
            acc,
            self.budget.build(clock_now()),
            self.breaker.build(),
            self.transport,
            self.dead_letter,
        ));
        let dispatcher = runtime.spawn(pipeline::run_dispatcher(shared.clone()));
        runtime.spawn(pipeline::run_health(
            Arc::downgrade(&shared),
            shared.health.kick.clone(),
            self.health.interval,
        ));
        Ok(Producer {
            handle: Arc::new(Handle {
                shared,
                dispatcher: Mutex::new(Some(dispatcher)),
            }),
        })
    }
}

/// Closes the pipeline when the last `Producer` clone goes: the dispatcher keeps delivering what
/// was accepted (linger skipped), then closes the transport. Nothing accepted is dropped.
struct Handle {
    shared: Arc<Shared>,
    dispatcher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        self.shared.health.kick.notify_one();
    }
}

/// Sends messages through a [`Transport`] with batching, retries, ordering and backpressure.
///
/// Cheap to clone; all clones share one pipeline. Build one with [`Producer::builder`] inside a
/// Tokio runtime.
///
/// Four ways to send, from simplest to fastest:
/// - [`Producer::send`]: waits for buffer space, then for the broker's acknowledgement.
/// - [`Producer::enqueue`]: waits for buffer space only, returns a [`DeliveryFuture`]; many
///   messages can then be in flight from one task, in order.
/// - [`Producer::try_send`]: never waits; a full buffer hands the message back at once.
/// - [`Producer::send_all`]: many messages, one [`BulkReceipt`] for all: no future per message.
///
/// # Example
///
/// ```
/// # use async_trait::async_trait;
/// # use herald_core::{Ack, BatchOutcome, Destination, Message, Transport};
/// # struct Null;
/// # #[async_trait]
/// # impl Transport for Null {
/// #     fn name(&self) -> &'static str { "null" }
/// #     async fn send_batch(&self, _: &Destination, b: &[Message]) -> BatchOutcome {
/// #         b.iter().map(|_| Ok(Ack::default())).collect()
/// #     }
/// # }
/// use std::time::Duration;
/// use herald_core::Producer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let producer = Producer::builder(Null).delivery_timeout(Duration::from_secs(30)).build()?;
/// let orders = Destination::new("orders");
/// let delivery = producer.send(Message::new(orders.clone(), "hello").with_key("k1")).await?;
/// assert_eq!(delivery.attempts, 1);
///
/// let receipt = producer.send_all((0..1000).map(|i| Message::new(orders.clone(), format!("m{i}")))).await;
/// assert_eq!(receipt.wait().await.delivered, 1000);
///
/// let report = producer.close(Duration::from_secs(5)).await;
/// assert!(report.drained && report.unclaimed.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Producer {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("transport", &self.handle.shared.transport.name())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Messages pulled from a `send_all` iterator per lock hold: enough to amortise the lock, few
/// enough that the dispatcher is never kept waiting long.
const CHUNK: usize = 1024;

/// The longest delivery timeout accepted: long enough for any outage, short enough that
/// deadlines never overflow the clock.
const MAX_DELIVERY_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

impl Producer {
    /// Starts building a producer over `transport`.
    pub fn builder(transport: impl Transport) -> ProducerBuilder {
        ProducerBuilder::new(Arc::new(transport))
    }

    /// As [`Producer::builder`], for a transport already shared.
    pub fn builder_shared(transport: Arc<dyn Transport>) -> ProducerBuilder {
        ProducerBuilder::new(transport)
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Sends one message and waits for its fate: the broker's acknowledgement, or the message
    /// handed back with why herald gave up. Waits for buffer space first when the buffer is full.
    pub async fn send(&self, msg: Message) -> Result<Delivery, SendError> {
        self.enqueue(msg).await?.await
    }

    /// Puts one message into the buffer, waiting for space if needed, and returns a future of its
    /// fate. Messages enqueued one after another from a task keep that order (per key).
    ///
    /// Cancelling this call while it waits for space drops the message, which was never accepted.
    pub async fn enqueue(&self, msg: Message) -> Result<DeliveryFuture, SendError> {
        let (tx, rx) = oneshot::channel();
        let mut msg = msg;
        let mut done = Completion::One(tx);
        loop {
            let mut space = pin!(self.shared().space.notified());
            space.as_mut().enable();
            match self.push_one(msg, done) {
                Ok(()) => return Ok(DeliveryFuture { rx }),
                Err(Refused {
                    msg: m,
                    done: d,
                    reason: FailureReason::BufferFull,
                }) => {
                    msg = m;
                    done = d;
                    space.await;
                }
                Err(refused) => return Err(self.refused(refused)),
            }
        }
    }

    /// Puts one message into the buffer without waiting. A full buffer, a closed producer or an
    /// oversized message hands it back at once ([`FailureReason::BufferFull`],
    /// [`FailureReason::Closed`], [`FailureReason::TooLarge`]).
    pub fn try_send(&self, msg: Message) -> Result<DeliveryFuture, SendError> {
        let (tx, rx) = oneshot::channel();
        match self.push_one(msg, Completion::One(tx)) {
            Ok(()) => Ok(DeliveryFuture { rx }),
            Err(refused) => Err(self.refused(refused)),
        }
    }

    #[allow(clippy::result_large_err)] // see `Refused`
    fn push_one(&self, msg: Message, done: Completion) -> Result<(), Refused> {
        let shared = self.shared();
        let wake = {
            let mut st = shared.lock();
            let wake = shared.push(&mut st, msg, done, clock_now())?;
            shared.unsettled.fetch_add(1, Ordering::Relaxed);
            wake
        };
        shared.metrics.accepted.increment(1);
        if wake {
            shared.wake.notify_one();
        }
        Ok(())
    }

    fn refused(&self, refused: Refused) -> SendError {
        self.shared().count_refused(&refused.reason);
        SendError::new(refused.msg, refused.reason, 0)
    }

    /// Sends many messages with one completion for all of them: the fastest way in. Waits for
    /// buffer space as needed, in input order, and returns once every message is accepted or
    /// refused; the [`BulkReceipt`] then resolves when all have ended. Refused messages (too large,
    /// producer closed) appear in the report's failures with the rest.
    pub async fn send_all<I>(&self, msgs: I) -> BulkReceipt
    where
        I: IntoIterator<Item = Message>,
    {
        let shared = self.shared();
        // Made first: if this call is cancelled midway, dropping the receipt sends later
        // failures of the messages already accepted to the unclaimed sink.
        let receipt = BulkReceipt {
            group: Group::new(shared.unclaimed.clone()),
        };
        let group = &receipt.group;
        let mut iter = msgs.into_iter();
        let mut chunk: VecDeque<Message> = VecDeque::with_capacity(CHUNK);
        let mut pending: Option<Message> = None;
        loop {
            if pending.is_none() && chunk.is_empty() {
                chunk.extend(iter.by_ref().take(CHUNK));
                if chunk.is_empty() {
                    break;
                }
            }
            let mut space = pin!(shared.space.notified());
            space.as_mut().enable();
            let mut accepted = 0usize;
            let mut wake = false;
            let mut refused = Vec::new();
            let full = {
                let mut st = shared.lock();
                let now = clock_now();
                let mut full = false;
                while let Some(msg) = pending.take().or_else(|| chunk.pop_front()) {
                    match shared.push(&mut st, msg, Completion::Group(group.clone()), now) {
                        Ok(w) => {
                            accepted += 1;
                            wake |= w;
                        }
                        Err(Refused {
                            msg,
                            reason: FailureReason::BufferFull,
                            ..
                        }) => {
                            pending = Some(msg);
                            full = true;
                            break;
                        }
                        Err(Refused { msg, reason, .. }) => refused.push((msg, reason)),
                    }
                }
                // Counted before the lock is released: no accepted message can end before this.
                group.add(accepted);
                shared.unsettled.fetch_add(accepted, Ordering::Relaxed);
                full
            };
            shared.metrics.accepted.increment(accepted as u64);
            if wake {
                shared.wake.notify_one();
            }
            for (msg, reason) in refused {
                shared.count_refused(&reason);
                group.fail_now(SendError::new(msg, reason, 0));
            }
            if full {
                space.await;
            }
        }
        group.end_one();
        receipt
    }

    /// Waits until the buffer is empty: everything accepted (including what other tasks send
    /// meanwhile) has been delivered or has failed. Linger is skipped while a flush waits.
    pub async fn flush(&self) {
        let shared = self.shared();
        struct Flushing<'a>(&'a Shared);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.lock().flushers -= 1;
            }
        }
        shared.lock().flushers += 1;
        let _flushing = Flushing(shared);
        shared.wake.notify_one();
        self.wait_idle(None).await;
    }

    /// Waits until every accepted message has ended and its caller been told, or `deadline`
    /// passes; true if everything ended.
    async fn wait_idle(&self, deadline: Option<Instant>) -> bool {
        let shared = self.shared();
        let settled = || shared.unsettled.load(Ordering::Acquire) == 0;
        loop {
            let mut idle = pin!(shared.idle.notified());
            idle.as_mut().enable();
            if settled() {
                return true;
            }
            match deadline {
                None => idle.await,
                Some(d) => {
                    let timeout = tokio::time::sleep_until(tokio::time::Instant::from_std(d));
                    tokio::select! {
                        () = idle => {}
                        () = timeout => return settled(),
                    }
                }
            }
        }
    }

    /// Stops accepting messages, delivers what was accepted until `timeout` passes, then fails
    /// whatever is still queued or waiting to retry with [`FailureReason::Closed`] (each handed
    /// back through its future, receipt or the dead-letter hook), closes the transport once the
    /// last batch in flight has landed, and reports. Every clone of this producer is closed.
    pub async fn close(&self, timeout: Duration) -> CloseReport {
        let shared = self.shared();
        // A timeout too large to add to the clock means no deadline.
        let deadline = clock_now().checked_add(timeout);
        shared.lock().closing = true;
        shared.wake.notify_one();
        shared.health.kick.notify_one();
        let drained = self.wait_idle(deadline).await;
        let mut in_flight = 0;
        if !drained {
            let mut fin = pipeline::Finished::default();
            {
                let mut st = shared.lock();
                shared.abandon(&mut st, &mut fin);
                in_flight = st.buffered_messages;
            }
            shared.complete(fin);
            shared.wake.notify_one();
        }
        if in_flight == 0 {
            // Let the dispatcher close the transport, within what is left of the deadline.
            let task = self
                .handle
                .dispatcher
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(task) = task {
                let left =
                    deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(clock_now()));
                let _closed_in_time = tokio::time::timeout(left, task).await.is_ok();
            }
        }
        let totals = shared.lock().totals;
        CloseReport {
            drained,
            in_flight,
            unclaimed: shared.unclaimed.take(),
            totals,
        }
    }

    /// A snapshot of the pipeline: buffer, in-flight batches, circuit state, totals.
    pub fn stats(&self) -> ProducerStats {
        let shared = self.shared();
        let st = shared.lock();
        ProducerStats {
            buffered_messages: st.buffered_messages,
            buffered_bytes: st.buffered_bytes,
            in_flight_batches: st.in_flight,
            circuit: st.breaker.state(),
            totals: st.totals,
            unclaimed: shared.unclaimed.count(),
        }
    }

    /// The producer's health now, evaluated on the spot: [`HealthStatus`](crate::HealthStatus)
    /// and its issues (circuit open, broker connection down or blocked, buffer above its
    /// high-water mark, error rate, closed). [`Producer::health_watch`] gets the same verdict
    /// at its next evaluation (this call does not publish, so it is safe while a `borrow()` of
    /// that channel is held).
    pub fn health(&self) -> Health {
        self.shared().evaluate_health(clock_now(), false)
    }

    /// A watch channel of the producer's health, evaluated every [`HealthPolicy::interval`] and
    /// at once when the circuit breaker changes state or the producer closes. Receivers are
    /// woken when the status or the set of issues changes (not when a count inside an issue
    /// does); the value is always the latest evaluation. After the producer has closed, it holds
    /// its last health (unhealthy: closed).
    pub fn health_watch(&self) -> tokio::sync::watch::Receiver<Health> {
        self.shared().health.tx.subscribe()
    }

    /// The name given with [`ProducerBuilder::name`], if any.
    pub fn name(&self) -> Option<&str> {
        self.shared().config.name.as_deref()
    }

    /// The transport's name.
    pub fn transport_name(&self) -> &'static str {
        self.shared().transport.name()
    }
}
