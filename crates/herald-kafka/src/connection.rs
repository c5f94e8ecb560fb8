//! The librdkafka producer behind a [`crate::KafkaTransport`]: building it with herald's
//! context, the context's callbacks (delivery reports, statistics, client errors), replacing
//! the producer after a fatal error, and the health and diagnosis those callbacks feed.

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

/// State the librdkafka callbacks share with the transport.
pub(crate) struct Shared {
    /// Room in librdkafka's queue, for senders that found it full.
    pub(crate) room: Room,
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
}

impl Shared {
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
        let mut errors = self.shared.client_errors();
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
            self.shared.all_down.store(false, Ordering::Relaxed);
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

/// The rdkafka producer herald uses.
pub(crate) type Client = ThreadedProducer<Context>;

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
            match crate::admin::min_insync_replicas(&config, &topic).await {
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
        });
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
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
        if let Ok(fresh) = create(&self.client_config, &self.shared) {
            *slot = Arc::new(fresh);
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.shared.metrics.rebuilds.increment(1);
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
        })
        .map_err(|e| ConfigError::Client(crate::config::redact_client_error(e)))
}
