//! The librdkafka producer behind a [`crate::KafkaTransport`]: building it with herald's
//! context, the context's callbacks (delivery reports, statistics, client errors), replacing
//! the producer after a fatal error, and the health and diagnosis those callbacks feed.
//!
//! Logged (target `herald_kafka::connection`, fields `transport="kafka"`, `producer` when the
//! transport has a [`metrics_name`](crate::KafkaConfig::metrics_name)): all brokers down and
//! a producer rebuilt (warn), a broker answering again (info), each client error librdkafka
//! reports (debug: it repeats them per broker and per reconnection). librdkafka's error texts
//! name brokers by `host:port`; no property of the client configuration (SASL settings
//! included) is ever logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use herald_core::{Ack, TransportHealth};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::error::{needs_new_producer, transport_error, ConfigError};
use crate::metrics::KafkaMetrics;
use crate::publish::{InFlight, Room};
use crate::startup::Startup;

/// State the librdkafka callbacks share with the transport.
pub(crate) struct Shared {
    /// Room in librdkafka's queue, for senders that found it full.
    pub(crate) room: Room,
    /// Each topic's turn to hand messages to librdkafka: calls do it in the order herald
    /// started them.
    pub(crate) turns: herald_core::Turns,
    pub(crate) metrics: KafkaMetrics,
    /// The last client-level error librdkafka reported, to explain messages that time out (a
    /// timeout alone does not say which servers failed): connection errors, which name the
    /// broker, are kept apart from the rest ("all brokers down") so that they are not lost.
    last_client_error: std::sync::Mutex<ClientErrors>,
    /// Whether `last_client_error` is newer than the last successful delivery.
    client_errors: AtomicBool,
    /// librdkafka said all brokers are down, and no broker has answered since.
    all_down: AtomicBool,
    /// Batches waiting for their delivery reports.
    pub(crate) in_flight: InFlight,
    /// The `producer` field of the events logged: the transport's metrics name, if any.
    name: Option<String>,
}

/// The `transport` field of every event this crate logs.
const TRANSPORT: &str = "kafka";

impl Shared {
    /// A broker answered (a delivery, or a broker UP in the statistics): if all were down,
    /// they no longer are, and the log says so once.
    fn broker_answered(&self, how: &'static str) {
        if self.all_down.swap(false, Ordering::Relaxed) {
            tracing::info!(
                transport = TRANSPORT,
                producer = self.name.as_deref(),
                seen_in = how,
                "a Kafka broker answers again"
            );
        }
    }

    fn diagnosis(&self) -> Option<String> {
        if !self.client_errors.load(Ordering::Relaxed) {
            return None;
        }
        self.client_errors().describe()
    }

    fn client_errors(&self) -> std::sync::MutexGuard<'_, ClientErrors> {
        self.last_client_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
pub(crate) struct Context {
    shared: Arc<Shared>,
    /// This producer's start-up nudge and first delivery report (see `crate::startup`).
    pub(crate) startup: Startup,
    /// This producer's retry counts at its last statistics, by broker.
    retries_seen: std::sync::Mutex<HashMap<String, u64>>,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        self.shared.metrics.record(&statistics);
        self.shared.metrics.record_retries(
            &statistics,
            &mut self
                .retries_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if statistics
            .brokers
            .values()
            .any(|b| b.source != "internal" && b.state == "UP")
        {
            self.shared.broker_answered("statistics");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka's reasons name brokers by host:port and never carry credentials.
        let text = if reason.is_empty() {
            error.to_string()
        } else {
            format!("{error}: {reason}")
        };
        let mut errors = self.shared.client_errors();
        use RDKafkaErrorCode as C;
        let code = error.rdkafka_error_code();
        tracing::debug!(
            transport = TRANSPORT,
            producer = self.shared.name.as_deref(),
            code = ?code,
            error = %text,
            "client error reported by librdkafka"
        );
        if code == Some(C::AllBrokersDown) && !self.shared.all_down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                transport = TRANSPORT,
                producer = self.shared.name.as_deref(),
                error = %text,
                last_connection_error = errors.connection.as_deref(),
                "all Kafka brokers are down: messages wait and are retried until a broker answers or their delivery timeout passes"
            );
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
        self.startup.reported();
        let mut broken = false;
        let outcome = match result {
            Ok(m) => Ok(Ack {
                partition: Some(m.partition()),
                offset: Some(m.offset()),
                route: None,
            }),
            Err((e, _)) => {
                let code = e.rdkafka_error_code();
                broken = code.is_some_and(needs_new_producer);
                let mut error = transport_error(e);
                // Timed out, or purged at the attempt's deadline without having left: why
                // nothing could be sent is what the connection errors say.
                if matches!(
                    code,
                    Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::PurgeQueue)
                ) {
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
            self.shared.broker_answered("delivery");
        }
        self.shared.in_flight.with(opaque, |batch, index| {
            if broken {
                batch.producer_broken.store(true, Ordering::Release);
            }
            batch.report(index, outcome);
        });
        self.shared.room.freed();
    }
}

/// The rdkafka producer herald uses, destroyed off the async threads: dropping a
/// `ThreadedProducer` joins its polling thread, purges, flushes for up to 500 ms and waits
/// for librdkafka's threads to end, which held up a runtime worker (on a one-thread runtime,
/// every task) wherever its last handle went: a producer replaced after a fatal error, whose
/// last batch then dropped it, or a transport dropped in async code.
pub(crate) struct Client(Option<ThreadedProducer<Context>>);

impl Client {
    fn new(producer: ThreadedProducer<Context>) -> Self {
        Self(Some(producer))
    }
}

impl std::ops::Deref for Client {
    type Target = ThreadedProducer<Context>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("taken only when dropped")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let Some(producer) = self.0.take() else {
            return;
        };
        destroy_off_async(producer);
    }
}

/// Drops `value` on the runtime's blocking threads when called in a runtime (a runtime
/// shutting down drops the task, and with it the value, where it stands), else here.
fn destroy_off_async<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            // Not awaited: nothing waits for the destruction.
            let _destroying = runtime.spawn_blocking(move || drop(value));
        }
        Err(_) => drop(value),
    }
}

/// The current producer, what its callbacks share, and what it takes to build a new one.
pub(crate) struct Connection {
    client_config: ClientConfig,
    /// The header that carries message ids, if any ([`KafkaConfig::message_id_header`]).
    pub(crate) id_header: Option<String>,
    shared: Arc<Shared>,
    /// The current producer; replaced after a fatal error.
    producer: RwLock<Arc<Client>>,
    /// Bumped at each replacement, so that concurrent batches replace it once.
    generation: AtomicU64,
    /// Topics whose durability settings have been asked about (once each).
    checked_topics: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Connection {
    /// Checks the settings and creates the producer; no connection is made yet.
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self, ConfigError> {
        let client_config = config.client_config()?;
        let shared = Arc::new(Shared {
            room: Room::default(),
            metrics: KafkaMetrics::new(config.metrics_label()),
            last_client_error: std::sync::Mutex::new(ClientErrors::default()),
            client_errors: AtomicBool::new(false),
            all_down: AtomicBool::new(false),
            in_flight: InFlight::default(),
            name: config.metrics_label().map(str::to_owned),
            turns: herald_core::Turns::default(),
        });
        let producer = Arc::new(create(&client_config, &shared)?);
        Ok(Self {
            client_config,
            id_header: config.id_header().map(str::to_owned),
            shared,
            producer: RwLock::new(producer),
            generation: AtomicU64::new(0),
            checked_topics: std::sync::Mutex::default(),
        })
    }

    /// The first time `topic` is sent to, asks the cluster in the background what its
    /// `min.insync.replicas` is, and warns if that makes "delivered" mean less than users think
    /// (see [`crate::admin::weak_min_insync_replicas`]). A broker that does not tell is let be.
    pub(crate) fn check_durability_once(&self, topic: &str) {
        let first = self
            .checked_topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_owned());
        if !first {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let config = self.client_config.clone();
        let topic = topic.to_owned();
        runtime.spawn(async move {
            say_durability(
                &topic,
                crate::admin::min_insync_replicas(&config, &topic).await,
            );
        });
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The current producer and its generation (as [`Connection::producer`]), its start-up
    /// nudge begun the first time it is used (see `crate::startup`).
    pub(crate) fn producer_for(&self, topic: &str) -> (Arc<Client>, u64) {
        let (producer, generation) = self.producer();
        crate::startup::nudge_once(&producer, topic);
        (producer, generation)
    }

    /// How many times the producer was rebuilt after a fatal error.
    pub(crate) fn rebuilds(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current producer and its generation, to hand to [`Connection::rebuild`].
    pub(crate) fn producer(&self) -> (Arc<Client>, u64) {
        let p = self
            .producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        (p, self.generation.load(Ordering::Acquire))
    }

    /// Replaces a producer that hit a fatal error, once per generation.
    pub(crate) fn rebuild(&self, seen_generation: u64) {
        let mut slot = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.generation.load(Ordering::Acquire) != seen_generation {
            return;
        }
        // Why: librdkafka's fatal error, if it raised one; else a delivery report said the
        // broker no longer knows this producer.
        let reason = slot.client().fatal_error().map_or_else(
            || "a delivery report said the broker no longer knows this producer".to_owned(),
            |(code, text)| format!("fatal error {code:?}: {text}"),
        );
        match create(&self.client_config, &self.shared) {
            Ok(fresh) => {
                *slot = Arc::new(fresh);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                self.shared.metrics.rebuilds.increment(1);
                tracing::warn!(
                    transport = TRANSPORT,
                    producer = self.shared.name.as_deref(),
                    generation,
                    reason = %reason,
                    "Kafka producer rebuilt: the old one could not send any more; its failed messages are retried on the new one"
                );
            }
            Err(e) => tracing::error!(
                transport = TRANSPORT,
                producer = self.shared.name.as_deref(),
                reason = %reason,
                error = %e,
                "the Kafka producer could not send any more and a new one could not be created; the next failing batch tries again"
            ),
        }
    }

    /// The last client error, while no delivery has succeeded since.
    pub(crate) fn diagnosis(&self) -> Option<String> {
        self.shared.diagnosis()
    }

    /// Down from librdkafka's "all brokers down" until a broker answers again (a delivery, or
    /// a broker in state UP in the statistics), with the last connection error as the reason.
    pub(crate) fn health(&self) -> TransportHealth {
        if !self.shared.all_down.load(Ordering::Relaxed) {
            return TransportHealth::Up;
        }
        let why = self.shared.client_errors().describe();
        TransportHealth::Down(format!(
            "all brokers down ({})",
            why.unwrap_or_else(|| "no error reported".into())
        ))
    }

    pub(crate) async fn close(&self) {
        // Everything handed to librdkafka has been reported on by now (the pipeline awaits
        // every batch), so this flush is quick; it runs off the async threads all the same.
        let (producer, _) = self.producer();
        let _flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
    }
}

fn create(config: &ClientConfig, shared: &Arc<Shared>) -> Result<Client, ConfigError> {
    config
        .create_with_context(Context {
            shared: shared.clone(),
            startup: Startup::new(config.get("enable.idempotence") == Some("true")),
            retries_seen: std::sync::Mutex::default(),
        })
        .map(Client::new)
        .map_err(|e| ConfigError::Client(crate::config::redact_client_error(e)))
}

/// Says what the cluster told of `topic`'s `min.insync.replicas`: a warning when a message
/// reported delivered may be on one broker only, a debug line when it could not be learnt.
fn say_durability(topic: &str, answer: Result<Option<i64>, crate::admin::AdminError>) {
    match answer {
        Ok(Some(n)) if crate::admin::weak_min_insync_replicas(n) => tracing::warn!(
            topic = %topic,
            min_insync_replicas = n,
            "acks=all waits for {n} in-sync replica: a message reported delivered may be on one broker only, and lost with it"
        ),
        Ok(Some(_)) => {}
        Ok(None) => tracing::debug!(
            topic = %topic,
            "min_insync_replicas not checked: the cluster's DescribeConfigs answer does not carry it"
        ),
        Err(e) => tracing::debug!(
            topic = %topic,
            error = %e,
            "min_insync_replicas not checked: the cluster did not answer DescribeConfigs"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes the thread it is dropped on.
    struct Noted(Arc<std::sync::Mutex<Option<std::thread::ThreadId>>>);

    impl Drop for Noted {
        fn drop(&mut self) {
            *self.0.lock().expect("not poisoned") = Some(std::thread::current().id());
        }
    }

    /// A producer's destruction (its polling thread joined, a flush of up to 500 ms,
    /// librdkafka's threads ended) ran on the thread that dropped its last handle: in async
    /// code, a runtime worker, here the one thread of the test's runtime. `Client`'s drop
    /// hands it to this, which sends it to the blocking threads; outside a runtime it happens
    /// in place.
    #[tokio::test]
    async fn a_producer_is_destroyed_off_the_async_threads() {
        let here = std::thread::current().id();
        let noted = Arc::new(std::sync::Mutex::new(None));
        destroy_off_async(Noted(noted.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let on = loop {
            if let Some(id) = *noted.lock().expect("not poisoned") {
                break id;
            }
            assert!(std::time::Instant::now() < deadline, "never dropped");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert_ne!(on, here, "dropped on the async thread");
        let outside = Arc::new(std::sync::Mutex::new(None));
        std::thread::spawn({
            let outside = outside.clone();
            move || destroy_off_async(Noted(outside))
        })
        .join()
        .expect("thread");
        assert!(
            outside.lock().expect("not poisoned").is_some(),
            "dropped in place"
        );
    }

    fn context(name: Option<&str>) -> Context {
        Context {
            shared: Arc::new(Shared {
                room: Room::default(),
                metrics: KafkaMetrics::new(name),
                last_client_error: std::sync::Mutex::new(ClientErrors::default()),
                client_errors: AtomicBool::new(false),
                all_down: AtomicBool::new(false),
                in_flight: InFlight::default(),
                name: name.map(str::to_owned),
                turns: herald_core::Turns::default(),
            }),
            startup: Startup::new(true),
            retries_seen: std::sync::Mutex::default(),
        }
    }

    #[test]
    fn one_in_sync_replica_is_warned_about_and_two_are_not() {
        let logs = herald_testkit::LogCapture::start_at(tracing::Level::DEBUG);
        say_durability("orders", Ok(Some(2)));
        assert_eq!(
            logs.text(),
            "",
            "two in-sync replicas are durable: nothing to say"
        );
        say_durability("orders", Ok(None));
        let debug = logs.text();
        assert!(
            debug.contains("DEBUG") && !debug.contains("WARN"),
            "an unknown setting is detail, not a warning: {debug}"
        );

        let logs = herald_testkit::LogCapture::start_at(tracing::Level::WARN);
        say_durability("orders", Ok(Some(1)));
        let text = logs.text();
        assert_eq!(text.matches("WARN").count(), 1, "{text}");
        assert!(
            text.contains("topic=orders") && text.contains("min_insync_replicas=1"),
            "the warning names the topic and the setting: {text}"
        );
    }

    #[test]
    fn all_brokers_down_warns_once_and_a_broker_back_is_info() {
        let logs = herald_testkit::LogCapture::start_at(tracing::Level::INFO);
        let ctx = context(Some("orders-eu"));
        let refused = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        ctx.error(
            refused.clone(),
            "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused",
        );
        assert_eq!(logs.text(), "", "one broker's error is detail (debug)");
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        for _ in 0..3 {
            ctx.error(down.clone(), "1/1 brokers are down");
            ctx.error(
                refused.clone(),
                "127.0.0.1:9092/bootstrap: Connection refused",
            );
        }
        let text = logs.text();
        let warned: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
        assert_eq!(warned.len(), 1, "once per outage, not per report: {text}");
        for field in [
            "transport=\"kafka\"",
            "producer=\"orders-eu\"",
            "all Kafka brokers are down",
            "Connection refused",
        ] {
            assert!(warned[0].contains(field), "no {field} in: {}", warned[0]);
        }
        assert!(ctx.shared.all_down.load(Ordering::Relaxed));

        ctx.shared.broker_answered("delivery");
        ctx.shared.broker_answered("statistics");
        let text = logs.text();
        let back: Vec<&str> = text.lines().filter(|l| l.contains(" INFO ")).collect();
        assert_eq!(back.len(), 1, "{text}");
        assert!(back[0].contains("answers again"), "{}", back[0]);

        // A second outage is a second warning.
        ctx.error(down, "1/1 brokers are down");
        assert_eq!(
            logs.text().lines().filter(|l| l.contains(" WARN ")).count(),
            2
        );
    }
}
