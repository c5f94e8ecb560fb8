//! `KafkaTransport`: herald's `Transport` on an rdkafka `ThreadedProducer`.
//!
//! A batch is handed to librdkafka message by message without waiting (`send` never blocks),
//! each with a delivery opaque naming its batch and position; librdkafka's delivery callback,
//! on its polling thread, fills that position; the batch's future resolves when every
//! position is filled. No future per message, no await per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use herald_core::{
    async_trait, Ack, BatchOutcome, Destination, ErrorClass, Message, Transport, TransportError,
    TransportHealth,
};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::statistics::Statistics;
use rdkafka::ClientConfig;
use tokio::sync::Notify;

use crate::config::KafkaConfig;
use crate::error::{needs_new_producer, transport_error, KafkaConfigError};
use crate::metrics::KafkaMetrics;

/// One batch's outcomes, filled by delivery callbacks.
struct BatchState {
    outcomes: Vec<OnceLock<Result<Ack, TransportError>>>,
    remaining: AtomicUsize,
    done: Notify,
    /// A delivery failed in a way that calls for a new producer (see `needs_new_producer`).
    producer_broken: AtomicBool,
}

impl BatchState {
    fn new(n: usize) -> Self {
        Self {
            outcomes: (0..n).map(|_| OnceLock::new()).collect(),
            remaining: AtomicUsize::new(n),
            done: Notify::new(),
            producer_broken: AtomicBool::new(false),
        }
    }

    fn set(&self, index: usize, outcome: Result<Ack, TransportError>) {
        // Out of range only for a report that outlived its batch and found its id reused (ids
        // wrap after 2^32 batches, 2^16 on 32-bit targets): dropped, never a panic in a
        // librdkafka callback.
        let Some(slot) = self.outcomes.get(index) else {
            return;
        };
        if slot.set(outcome).is_ok() && self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    async fn wait(&self) {
        loop {
            let done = self.done.notified();
            if self.remaining.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }
}

/// Bits of a delivery opaque that hold a message's position in its part of a batch; the rest
/// hold the part's id.
const INDEX_BITS: u32 = usize::BITS / 2;
/// Messages per part: a batch longer than this registers one id per part.
const PART: usize = 1 << INDEX_BITS;

/// Batches waiting for delivery reports, by id. A message's delivery opaque is a plain `usize`
/// (part id and position), so handing a message to librdkafka allocates nothing; the delivery
/// callback finds the batch here. A report for a batch no longer registered (its send was
/// cancelled at the attempt deadline) finds nothing and is dropped, as nobody waits for it.
#[derive(Default)]
struct InFlight {
    /// Part id -> (batch, position of the part's first message).
    parts: std::sync::Mutex<HashMap<usize, (Arc<BatchState>, usize)>>,
    next_id: AtomicUsize,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, (Arc<BatchState>, usize)>> {
        self.parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers `state` (one id per `PART` messages); unregistered when the guard drops.
    fn register(&self, state: &Arc<BatchState>, len: usize) -> Registered<'_> {
        let id_limit = 1usize << (usize::BITS - INDEX_BITS);
        let mut parts = self.lock();
        let ids = (0..len.div_ceil(PART).max(1))
            .map(|part| loop {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed) % id_limit;
                if let std::collections::hash_map::Entry::Vacant(v) = parts.entry(id) {
                    v.insert((state.clone(), part * PART));
                    break id;
                }
            })
            .collect();
        Registered {
            in_flight: self,
            ids,
        }
    }

    /// Runs `f` with the batch and position an opaque names, if the batch is still registered.
    fn with(&self, opaque: usize, f: impl FnOnce(&BatchState, usize)) {
        let (id, offset) = (opaque >> INDEX_BITS, opaque & (PART - 1));
        if let Some((batch, base)) = self.lock().get(&id) {
            f(batch, base + offset);
        }
    }
}

/// A batch's registration in `InFlight`, removed on drop (also when the send is cancelled).
struct Registered<'a> {
    in_flight: &'a InFlight,
    ids: Vec<usize>,
}

impl Registered<'_> {
    /// The delivery opaque of the message at `index` of the batch.
    fn opaque(&self, index: usize) -> usize {
        (self.ids[index / PART] << INDEX_BITS) | (index % PART)
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut parts = self.in_flight.lock();
        for id in &self.ids {
            parts.remove(id);
        }
    }
}

/// State the librdkafka callbacks share with the transport.
struct Shared {
    /// Senders waiting for room in librdkafka's queue.
    waiting: AtomicUsize,
    space: Notify,
    metrics: KafkaMetrics,
    /// The last client-level error librdkafka reported, to explain messages that time out (a
    /// timeout alone does not say which servers failed): connection errors, which name the
    /// broker, are kept apart from the rest ("all brokers down") so that they are not lost.
    last_client_error: std::sync::Mutex<ClientErrors>,
    /// Whether `last_client_error` is newer than the last successful delivery.
    client_errors: AtomicBool,
    /// librdkafka said all brokers are down, and no broker has answered since.
    all_down: AtomicBool,
    /// Batches waiting for their delivery reports.
    in_flight: InFlight,
}

impl Shared {
    fn diagnosis(&self) -> Option<String> {
        if !self.client_errors.load(Ordering::Relaxed) {
            return None;
        }
        self.last_client_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .describe()
    }
}

#[derive(Default)]
struct ClientErrors {
    connection: Option<String>,
    other: Option<String>,
}

impl ClientErrors {
    fn describe(&self) -> Option<String> {
        match (&self.connection, &self.other) {
            (Some(c), _) => Some(format!("last connection error: {c}")),
            (None, Some(o)) => Some(format!("last client error: {o}")),
            (None, None) => None,
        }
    }
}

/// The producer context: delivery reports and statistics.
struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        self.shared.metrics.record(&statistics);
        if statistics
            .brokers
            .values()
            .any(|b| b.source != "internal" && b.state == "UP")
        {
            self.shared.all_down.store(false, Ordering::Relaxed);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka's reasons name brokers by host:port and never carry credentials.
        let text = if reason.is_empty() {
            error.to_string()
        } else {
            format!("{error}: {reason}")
        };
        let mut errors = self
            .shared
            .last_client_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        use RDKafkaErrorCode as C;
        if error.rdkafka_error_code() == Some(C::AllBrokersDown) {
            self.shared.all_down.store(true, Ordering::Relaxed);
        }
        match error.rdkafka_error_code() {
            Some(C::BrokerTransportFailure | C::Resolve | C::Authentication | C::SSL) => {
                errors.connection = Some(text);
            }
            _ => errors.other = Some(text),
        }
        self.shared.client_errors.store(true, Ordering::Relaxed);
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let mut broken = false;
        let outcome = match result {
            Ok(m) => Ok(Ack {
                partition: Some(m.partition()),
                offset: Some(m.offset()),
            }),
            Err((e, _)) => {
                let code = e.rdkafka_error_code();
                broken = code.is_some_and(needs_new_producer);
                let mut error = transport_error(e);
                if code == Some(RDKafkaErrorCode::MessageTimedOut) {
                    if let Some(diagnosis) = self.shared.diagnosis() {
                        error = error.with_context(diagnosis);
                    }
                }
                Err(error)
            }
        };
        if outcome.is_ok() && self.shared.client_errors.load(Ordering::Relaxed) {
            // A broker answered: earlier connection errors no longer explain anything.
            self.shared.client_errors.store(false, Ordering::Relaxed);
            self.shared.all_down.store(false, Ordering::Relaxed);
        }
        self.shared.in_flight.with(opaque, |batch, index| {
            if broken {
                batch.producer_broken.store(true, Ordering::Release);
            }
            batch.set(index, outcome);
        });
        if self.shared.waiting.load(Ordering::Acquire) > 0 {
            self.shared.space.notify_waiters();
        }
    }
}

type Client = ThreadedProducer<Context>;

struct Inner {
    config: KafkaConfig,
    client_config: ClientConfig,
    shared: Arc<Shared>,
    /// The current producer; replaced after a fatal error.
    producer: RwLock<Arc<Client>>,
    /// Bumped at each replacement, so that concurrent batches replace it once.
    generation: AtomicU64,
}

/// Sends herald batches to Kafka through librdkafka.
///
/// What librdkafka does itself: with idempotence on (the default), it retries a failed produce
/// request within `message.timeout.ms`, keeping order and without duplicates inside a partition.
/// What herald does: everything librdkafka reports as failed comes back to herald's pipeline,
/// which retries transient failures (a broker restart, say) with its own backoff, budget and
/// delivery timeout, and hands permanent ones back. See docs/guarantees.md.
///
/// A fatal error, or a broker that no longer knows the producer (after a restart that lost its
/// producer state, every produce of the old producer id fails with "unknown broker error"),
/// rebuilds the producer; the messages that failed are transient, so herald retries them on the
/// new producer, which gets a new producer id.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.inner.config)
            .field("generation", &self.inner.generation.load(Ordering::Relaxed))
            .finish()
    }
}

impl KafkaTransport {
    /// Checks the settings and creates the librdkafka producer. No connection is made yet: an
    /// unreachable cluster shows when messages are sent (transient errors until the delivery
    /// timeout).
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaConfigError> {
        let client_config = config.client_config()?;
        let shared = Arc::new(Shared {
            waiting: AtomicUsize::new(0),
            space: Notify::new(),
            metrics: KafkaMetrics::new(),
            last_client_error: std::sync::Mutex::new(ClientErrors::default()),
            client_errors: AtomicBool::new(false),
            all_down: AtomicBool::new(false),
            in_flight: InFlight::default(),
        });
        let producer = Arc::new(create(&client_config, &shared)?);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client_config,
                shared,
                producer: RwLock::new(producer),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The settings it was built with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// How many times the producer was rebuilt after a fatal error.
    pub fn rebuilds(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn producer(&self) -> (Arc<Client>, u64) {
        let p = self
            .inner
            .producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        (p, self.inner.generation.load(Ordering::Acquire))
    }

    /// Replaces a producer that hit a fatal error, once per generation.
    fn rebuild(&self, seen_generation: u64) {
        let mut slot = self
            .inner
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.inner.generation.load(Ordering::Acquire) != seen_generation {
            return;
        }
        if let Ok(fresh) = create(&self.inner.client_config, &self.inner.shared) {
            *slot = Arc::new(fresh);
            self.inner.generation.fetch_add(1, Ordering::AcqRel);
            self.inner.shared.metrics.rebuilds.increment(1);
        }
    }

    async fn wait_for_room(&self) {
        let shared = &self.inner.shared;
        shared.waiting.fetch_add(1, Ordering::AcqRel);
        let room = shared.space.notified();
        // Delivery reports free room and wake us; the timeout covers a report that came
        // between the failed send and this wait.
        let _woken = tokio::time::timeout(Duration::from_millis(5), room).await;
        shared.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

fn create(config: &ClientConfig, shared: &Arc<Shared>) -> Result<Client, KafkaConfigError> {
    config
        .create_with_context(Context {
            shared: shared.clone(),
        })
        .map_err(KafkaConfigError::Client)
}

/// Kafka's rules for topic names, checked before librdkafka sees one.
pub(crate) fn check_topic(name: &str) -> Result<(), TransportError> {
    let bad = |why: &str| {
        Err(
            TransportError::permanent(format!("invalid Kafka topic name `{name}`: {why}"))
                .with_code("INVALID_TOPIC_NAME"),
        )
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not allowed");
    }
    if name.len() > 249 {
        return bad("longer than 249 characters");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "`{c}` is not allowed (only ASCII letters, digits, `.`, `_`, `-`)"
        ));
    }
    Ok(())
}

fn headers(m: &Message) -> Option<OwnedHeaders> {
    if m.headers().is_empty() {
        return None;
    }
    let mut h = OwnedHeaders::new_with_capacity(m.headers().len());
    for header in m.headers() {
        h = h.insert(Header {
            key: &header.name,
            value: Some(header.value.as_ref()),
        });
    }
    Some(h)
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome {
        let topic = destination.as_str();
        if let Err(e) = check_topic(topic) {
            return vec![Err(e); batch.len()];
        }
        let state = Arc::new(BatchState::new(batch.len()));
        let registered = self.inner.shared.in_flight.register(&state, batch.len());
        let (producer, generation) = self.producer();
        // Keys whose message failed at once with a transient error: later messages with the
        // same key in this call are not handed over, so none goes ahead of that retry (the
        // transport contract). Empty, and never consulted, unless something failed.
        let mut held_keys: Vec<&[u8]> = Vec::new();
        for (index, m) in batch.iter().enumerate() {
            if let (false, Some(key)) = (held_keys.is_empty(), m.key()) {
                if held_keys.contains(&key.as_ref()) {
                    state.set(
                        index,
                        Err(TransportError::transient(
                            "an earlier message with the same key failed in this batch",
                        )
                        .with_code("KEY_HELD")),
                    );
                    continue;
                }
            }
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(topic, registered.opaque(index))
                    .payload(m.payload().as_ref());
            if let Some(key) = m.key() {
                record = record.key(key.as_ref());
            }
            if let Some(h) = headers(m) {
                record = record.headers(h);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    // librdkafka's queue is full: backpressure, wait for room (the pipeline's
                    // attempt timeout bounds the wait), never drop.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.inner.shared.metrics.queue_full.increment(1);
                        self.wait_for_room().await;
                    }
                    Err((e, _record)) => {
                        let error = transport_error(&e);
                        if let (ErrorClass::Transient, Some(key)) = (error.class(), m.key()) {
                            held_keys.push(key.as_ref());
                        }
                        state.set(index, Err(error));
                        break;
                    }
                }
            }
        }
        state.wait().await;
        drop(registered);
        if state.producer_broken.load(Ordering::Acquire)
            || producer.client().fatal_error().is_some()
        {
            // The failed messages are transient: herald retries them on the new producer.
            self.rebuild(generation);
        }
        // Unregistered, so no callback can reach the outcomes any more: move them out.
        let missing = || {
            Err(TransportError::transient(
                "no delivery report for this message",
            ))
        };
        match Arc::try_unwrap(state) {
            Ok(state) => state
                .outcomes
                .into_iter()
                .map(|o| o.into_inner().unwrap_or_else(missing))
                .collect(),
            Err(shared) => shared
                .outcomes
                .iter()
                .map(|o| o.get().cloned().unwrap_or_else(missing))
                .collect(),
        }
    }

    fn diagnosis(&self) -> Option<String> {
        self.inner.shared.diagnosis()
    }

    /// Down from librdkafka's "all brokers down" until a broker answers again (a delivery, or
    /// a broker in state UP in the statistics), with the last connection error as the reason.
    fn health(&self) -> TransportHealth {
        let shared = &self.inner.shared;
        if !shared.all_down.load(Ordering::Relaxed) {
            return TransportHealth::Up;
        }
        let why = shared
            .last_client_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .describe();
        TransportHealth::Down(format!(
            "all brokers down ({})",
            why.unwrap_or_else(|| "no error reported".into())
        ))
    }

    async fn close(&self) {
        // Everything handed to librdkafka has been reported on by now (the pipeline awaits
        // every batch), so this flush is quick; it runs off the async threads all the same.
        let (producer, _) = self.producer();
        let _flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_opaques_find_their_batch_and_position_until_unregistered() {
        let in_flight = InFlight::default();
        let a = Arc::new(BatchState::new(3));
        let b = Arc::new(BatchState::new(2));
        let ra = in_flight.register(&a, 3);
        // An id still in use is skipped, even after the counter wraps onto it.
        in_flight.next_id.store(ra.ids[0], Ordering::Relaxed);
        let rb = in_flight.register(&b, 2);
        assert_ne!(ra.ids, rb.ids);
        let ok = || Ok(Ack::default());
        for (registered, index) in [(&ra, 2), (&rb, 1), (&ra, 0)] {
            in_flight.with(registered.opaque(index), |batch, i| {
                assert_eq!(i, index);
                batch.set(i, ok());
            });
        }
        assert!(a.outcomes[0].get().is_some() && a.outcomes[2].get().is_some());
        assert!(a.outcomes[1].get().is_none());
        assert!(b.outcomes[1].get().is_some() && b.outcomes[0].get().is_none());
        // Once unregistered, a late report reaches nothing.
        let late = ra.opaque(1);
        drop(ra);
        in_flight.with(late, |_, _| {
            panic!("a report reached an unregistered batch")
        });
        assert!(a.outcomes[1].get().is_none());
        assert_eq!(in_flight.lock().len(), 1);
        drop(rb);
        assert!(in_flight.lock().is_empty());
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check_topic("orders.v1_EU-west").is_ok());
        let e = check_topic("bad topic").expect_err("space");
        assert!(
            e.to_string()
                .contains("invalid Kafka topic name `bad topic`"),
            "{e}"
        );
        assert_eq!(e.class(), herald_core::ErrorClass::Permanent);
        assert!(check_topic("").is_err());
        assert!(check_topic("..").is_err());
        assert!(check_topic(&"x".repeat(250)).is_err());
    }
}
