//! # herald
//!
//! Produce messages to brokers reliably and fast. herald batches messages, sends them
//! asynchronously, retries transient failures with exponential backoff, jitter and a retry
//! budget, holds per-key order, applies backpressure through a bounded buffer, and reports each
//! message's fate: acknowledged by the broker, or handed back to you with a classified error.
//!
//! ```
//! use std::time::Duration;
//! use herald::{Destination, Message, Producer};
//! use herald::batch::SizeOrLinger;
//! use herald::retry::{Backoff, ExponentialRetry};
//! use herald::testkit::MemoryTransport;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let producer = Producer::builder(MemoryTransport::new())
//!     .batching(SizeOrLinger::new(1024, 1 << 20, Duration::from_millis(5)))
//!     .retry(ExponentialRetry::new(Backoff::new(Duration::from_millis(100), Duration::from_secs(10))))
//!     .delivery_timeout(Duration::from_secs(120))
//!     .build()?;
//!
//! let orders = Destination::new("orders");
//! match producer.send(Message::new(orders, "order #1").with_key("customer-7")).await {
//!     Ok(delivery) => println!("acknowledged after {} attempt(s)", delivery.attempts),
//!     Err(e) => {
//!         eprintln!("{e}");
//!         let _handed_back: Message = e.into_message();
//!     }
//! }
//! producer.close(Duration::from_secs(10)).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Crate feature flags
//!
//! | feature | what it adds |
//! |---|---|
//! | `testkit` | the `testkit` module: the in-memory transport with scripted faults and the adapter conformance suite |
//! | `kafka` | the `kafka` module: the Kafka transport (herald-kafka, on rdkafka; builds librdkafka) |
//! | `kafka-tls` | Kafka with TLS and SASL (PLAIN, SCRAM): OpenSSL built from source into librdkafka (a C compiler, make and perl; no OpenSSL headers); `kafka-tls-system` links the system's OpenSSL instead |
//! | `amqp` | the `amqp` module: the RabbitMQ / AMQP 0-9-1 transport (herald-amqp, on lapin) |
//! | `nats` | the `nats` module: the NATS JetStream transport (herald-nats, on async-nats) |
//! | `redis` | the `redis` module: the Redis Streams transport (herald-redis, on redis-rs) |
//! | `mqtt` | the `mqtt` module: the MQTT transport, MQTT 5 and 3.1.1 (herald-mqtt, on rumqttc) |
//! | `telemetry` | the `telemetry` module: the Prometheus recorder, `/metrics` and `/health` over HTTP (herald-telemetry) |
//! | `spool` | the `spool` module: the on-disk spool, so that accepted messages survive a crash (`builder.spool(SpoolConfig::new(dir))?`, herald-spool) |
//! | `otel` | trace context: a `send {destination}` producer span per message (OpenTelemetry's messaging conventions) through the application's `tracing-opentelemetry` layer, and its W3C `traceparent` in the message's headers (docs/operations/README.md, Traces) |
//! | `full` | all of the above (`kafka-tls`, not `kafka-tls-system`) |
//!
//! Metric names live in [`metrics`]; they are emitted through the `metrics` facade and cost a
//! no-op call when no recorder is installed.

pub use herald_core::*;

/// Batching policies ([`herald_batch`]): the [`BatchPolicy`](batch::BatchPolicy) trait and its
/// default, [`SizeOrLinger`](batch::SizeOrLinger). The accumulator behind them is the
/// pipeline's own and stays inside.
pub mod batch {
    pub use herald_batch::{BatchPolicy, BatchStats, InvalidSetting, SizeOrLinger};
}

/// Backoff, retry policies, retry budget and circuit breaker ([`herald_retry`]).
pub mod retry {
    pub use herald_retry::*;
}

/// The Kafka transport ([`herald_kafka`]): `herald::kafka::{KafkaConfig, KafkaTransport}`.
#[cfg(feature = "kafka")]
pub mod kafka {
    pub use herald_kafka::*;
}

/// The RabbitMQ transport ([`herald_amqp`]): `herald::amqp::{AmqpConfig, AmqpTransport}`.
#[cfg(feature = "amqp")]
pub mod amqp {
    pub use herald_amqp::*;
}

/// The NATS JetStream transport ([`herald_nats`]): `herald::nats::{NatsConfig, NatsTransport}`.
#[cfg(feature = "nats")]
pub mod nats {
    pub use herald_nats::*;
}

/// The Redis Streams transport ([`herald_redis`]): `herald::redis::{RedisConfig, RedisTransport}`.
#[cfg(feature = "redis")]
pub mod redis {
    pub use herald_redis::*;
}

/// The MQTT transport ([`herald_mqtt`]): `herald::mqtt::{MqttConfig, MqttTransport}`.
#[cfg(feature = "mqtt")]
pub mod mqtt {
    pub use herald_mqtt::*;
}

/// The on-disk spool ([`herald_spool`]): with `use herald::spool::ProducerBuilderExt`,
/// `Producer::builder(t).spool(SpoolConfig::new(dir))?.build()?` keeps every accepted message
/// on disk until its fate is final.
#[cfg(feature = "spool")]
pub mod spool {
    pub use herald_spool::*;
}

/// The in-memory transport and the adapter conformance suite ([`herald_testkit`]).
#[cfg(feature = "testkit")]
pub mod testkit {
    pub use herald_testkit::*;
}

/// Prometheus metrics and health over HTTP ([`herald_telemetry`]):
/// `herald::telemetry::prometheus("127.0.0.1:9464")`.
#[cfg(feature = "telemetry")]
pub mod telemetry {
    pub use herald_telemetry::*;
}
