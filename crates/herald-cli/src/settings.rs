//! Transport and retry settings as flags, and the one place where a producer is built from a
//! destination and those flags.

use std::time::Duration;

use anyhow::{bail, Context as _};
use herald::amqp::AmqpTransport;
use herald::batch::SizeOrLinger;
use herald::kafka::{KafkaConfig, KafkaTransport};
use herald::retry::{Backoff, ExponentialRetry};
use herald::spool::{ProducerBuilderExt as _, SpoolConfig};
use herald::{Destination, Fallback, OrderingMode, Producer, ProducerBuilder};

use crate::target::{KafkaTarget, Target};

/// `--ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Ordering {
    /// Per-key order kept, retries included (one batch in flight per destination).
    Strict,
    /// Batches go out concurrently and retries rejoin the back: faster under faults, no order.
    Relaxed,
}

/// Producer settings shared by `produce` and `bench`. Defaults are herald's, except batching,
/// which follows the transport (Kafka: `herald_kafka::recommended_batching()`).
/// No `Debug`: `kafka_properties` holds values such as `sasl.password` raw.
#[derive(Clone, clap::Args)]
pub(crate) struct Tuning {
    /// Most messages per batch [default: Kafka 20000, AMQP 1024].
    #[arg(long, value_name = "N", help_heading = "Producer")]
    pub(crate) batch_max_messages: Option<usize>,
    /// Most bytes per batch [default: Kafka 16 MiB, AMQP 1 MiB].
    #[arg(long, value_name = "BYTES", help_heading = "Producer")]
    pub(crate) batch_max_bytes: Option<usize>,
    /// How long a batch may wait to fill. 0: it goes as soon as its destination may send, and
    /// what arrives while batches are in flight gathers into the next one.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 0,
        help_heading = "Producer"
    )]
    pub(crate) linger_ms: u64,
    /// The whole life of a message, retries included; after it, the message fails (for Kafka
    /// also librdkafka's message.timeout.ms).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 120_000,
        help_heading = "Producer"
    )]
    pub(crate) delivery_timeout_ms: u64,
    /// Most attempts per message [default: unlimited within the delivery timeout].
    #[arg(long, value_name = "N", help_heading = "Producer")]
    pub(crate) max_attempts: Option<u32>,
    /// First retry backoff (doubling, with full jitter).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 100,
        help_heading = "Producer"
    )]
    pub(crate) retry_backoff_ms: u64,
    /// Largest retry backoff.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 10_000,
        help_heading = "Producer"
    )]
    pub(crate) retry_backoff_max_ms: u64,
    /// Per-key order (strict) or throughput under faults (relaxed).
    #[arg(long, value_enum, default_value_t = Ordering::Strict, help_heading = "Producer")]
    pub(crate) ordering: Ordering,
    /// Most messages buffered (accepted and not yet acknowledged); reading input waits beyond.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100_000,
        help_heading = "Producer"
    )]
    pub(crate) buffer_messages: usize,
    /// Most bytes buffered.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20, help_heading = "Producer")]
    pub(crate) buffer_bytes: usize,
    /// Largest message (payload, key and headers); a larger one fails at once.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20, help_heading = "Producer")]
    pub(crate) max_message_bytes: usize,
    /// Most batches in flight at once [default: 8, or the pipeline depth if deeper].
    #[arg(long, value_name = "N", help_heading = "Producer")]
    pub(crate) max_in_flight: Option<usize>,
    /// Under strict ordering, most batches of one destination in flight at once, where the
    /// broker's client keeps order across them (Kafka with idempotence, RabbitMQ, NATS, Redis,
    /// MQTT; with --fallback, one at a time). 1: each batch waits for the one before [default:
    /// Kafka and MQTT 16, others 4].
    #[arg(long, value_name = "N", help_heading = "Producer")]
    pub(crate) pipeline_depth: Option<usize>,
    /// A librdkafka property (repeatable), e.g. security.protocol=SASL_PLAINTEXT. Properties
    /// herald sets itself are refused, naming the flag to use; secret values are never printed.
    #[arg(
        long = "kafka-property",
        value_name = "KEY=VALUE",
        help_heading = "Kafka"
    )]
    pub(crate) kafka_properties: Vec<String>,
}

/// `--spool DIR` and its settings.
#[derive(Clone, Copy)]
pub(crate) struct Spooling<'a> {
    pub(crate) dir: &'a std::path::Path,
    /// `--spool-max-bytes`.
    pub(crate) max_bytes: Option<u64>,
}

/// Room a benchmark or demo message needs besides its payload (its key), under the limit.
const KEY_ROOM: usize = 64;

/// Checks `--size` against the largest message (`limit`, named by `what`) before any memory is
/// allocated for payloads: a usage error, not a panic or a run where every message fails.
pub(crate) fn check_size(size: usize, limit: usize, what: &str) -> anyhow::Result<()> {
    if size.saturating_add(KEY_ROOM) > limit {
        anyhow::bail!(
            "--size {size} is too large: a message (payload and its key) must fit under {what} ({limit} bytes), so at most {} bytes of payload",
            limit.saturating_sub(KEY_ROOM)
        );
    }
    Ok(())
}

/// A producer and where it sends.
pub(crate) struct Session {
    pub(crate) producer: Producer,
    pub(crate) destination: Destination,
}

impl Tuning {
    fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery_timeout_ms)
    }

    /// herald's settings, on any transport's builder.
    fn apply(&self, builder: ProducerBuilder, default_batch: (usize, usize)) -> ProducerBuilder {
        let mut retry = ExponentialRetry::new(Backoff::new(
            Duration::from_millis(self.retry_backoff_ms),
            Duration::from_millis(self.retry_backoff_max_ms),
        ));
        if let Some(n) = self.max_attempts {
            retry = retry.max_attempts(n);
        }
        let mut builder = builder
            .batching(SizeOrLinger::new(
                self.batch_max_messages.unwrap_or(default_batch.0),
                self.batch_max_bytes.unwrap_or(default_batch.1),
                Duration::from_millis(self.linger_ms),
            ))
            .retry(retry)
            .ordering(match self.ordering {
                Ordering::Strict => OrderingMode::Strict,
                Ordering::Relaxed => OrderingMode::Relaxed,
            })
            .buffer(self.buffer_messages, self.buffer_bytes)
            .max_message_bytes(self.max_message_bytes);
        // Unset: the producer's defaults, which follow the transport's suggested depth.
        if let Some(n) = self.max_in_flight {
            builder = builder.max_in_flight(n);
        }
        if let Some(n) = self.pipeline_depth {
            builder = builder.pipeline_depth(n);
        }
        builder.delivery_timeout(self.delivery_timeout())
    }

    /// The librdkafka properties a raw client needs to match herald's on this target: the
    /// URL's `client_id` and `compression`, and every `--kafka-property`, for the raw baselines
    /// and topic creation of `bench`.
    pub(crate) fn kafka_client_properties(
        &self,
        target: Option<&crate::target::KafkaTarget>,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut props = Vec::new();
        if let Some(t) = target {
            if let Some(id) = &t.client_id {
                props.push(("client.id".to_owned(), id.clone()));
            }
            if let Some(c) = t.compression {
                props.push(("compression.type".to_owned(), c.as_str().to_owned()));
            }
        }
        for (k, v) in self.kafka_property_pairs()? {
            props.push((k.to_owned(), v.to_owned()));
        }
        Ok(props)
    }

    /// `--kafka-property` values as (key, value). One that is not KEY=VALUE is an error naming
    /// only its name part (up to the first character a property name does not hold, such as a
    /// `:` or ` ` typed instead of `=`): a value may be a secret.
    /// A property herald sets itself is refused, naming what sets it on the command line.
    fn kafka_property_pairs(&self) -> anyhow::Result<Vec<(&str, &str)>> {
        self.kafka_properties
            .iter()
            .map(|prop| match prop.split_once('=') {
                Some((k, v)) => {
                    let k = k.trim();
                    if let Some((_, instead)) = SET_BY_THE_COMMAND.iter().find(|(p, _)| *p == k) {
                        bail!("--kafka-property {k}: herald sets it itself; {instead}");
                    }
                    Ok((k, v))
                }
                None => bail!(
                    "--kafka-property `{}` is not KEY=VALUE",
                    prop.chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                        .take(40)
                        .collect::<String>()
                ),
            })
            .collect()
    }

    /// The librdkafka settings for `bootstrap`; with `ids`, each record carries its message
    /// id in the `herald-message-id` header.
    pub(crate) fn kafka_config(
        &self,
        bootstrap: &str,
        target: Option<&crate::target::KafkaTarget>,
        ids: bool,
    ) -> anyhow::Result<KafkaConfig> {
        let mut config = KafkaConfig::new(bootstrap).message_timeout(self.delivery_timeout());
        if ids {
            config = config.message_id_header(Some(herald::kafka::MESSAGE_ID_HEADER.into()));
        }
        if let Some(t) = target {
            if let Some(id) = &t.client_id {
                config = config.client_id(id.clone());
            }
            if let Some(c) = t.compression {
                config = config.compression(c);
            }
        }
        for (k, v) in self.kafka_property_pairs()? {
            config = config.property(k, v);
        }
        Ok(config)
    }

    /// Builds the producer for `target`. This is the one place a producer is made from flags:
    /// telemetry (a metrics recorder) is installed before it is called.
    pub(crate) fn build(&self, target: &Target) -> anyhow::Result<Session> {
        self.build_with_fallbacks(target, &[], None)
    }

    /// Builds the producer for `target`, with `fallbacks` (`--fallback`, in order) taking over
    /// while the routes before them are down: one `Fallback` transport over all of them, each
    /// route sending to its own URL's destination. Batching follows the primary's broker.
    /// With `spool`, every accepted message is kept in that directory until it ends, and what
    /// an earlier run left there is sent first.
    pub(crate) fn build_with_fallbacks(
        &self,
        target: &Target,
        fallbacks: &[Target],
        spool: Option<Spooling<'_>>,
    ) -> anyhow::Result<Session> {
        if !self.kafka_properties.is_empty()
            && std::iter::once(target).chain(fallbacks).all(|t| {
                matches!(
                    t,
                    Target::Amqp(_) | Target::Nats(_) | Target::Redis(_) | Target::Mqtt(_)
                )
            })
        {
            bail!("--kafka-property only applies to kafka:// destinations");
        }
        let batching = match target {
            Target::Kafka(_) => {
                let b = herald::kafka::recommended_batching();
                (b.max_messages(), b.max_bytes())
            }
            Target::Amqp(_) | Target::Nats(_) | Target::Redis(_) | Target::Mqtt(_) => {
                let d = SizeOrLinger::default();
                (d.max_messages(), d.max_bytes())
            }
        };
        let destination = target.destination();
        let builder = if fallbacks.is_empty() {
            match target {
                Target::Kafka(k) => Producer::builder(self.kafka_transport(k, spool.is_some())?),
                Target::Amqp(a) => Producer::builder(amqp_transport(a)?),
                Target::Nats(n) => Producer::builder(nats_transport(n)?),
                Target::Redis(r) => Producer::builder(redis_transport(r)?),
                Target::Mqtt(m) => Producer::builder(mqtt_transport(m)?),
            }
        } else {
            let mut seen = vec![target.describe()];
            let ids = spool.is_some();
            let mut routes = self.route(None, "primary", target, ids)?;
            for (n, fallback) in fallbacks.iter().enumerate() {
                let described = fallback.describe();
                if seen.contains(&described) {
                    bail!("--fallback {described} is the same destination as one before it");
                }
                seen.push(described);
                let name = format!("fallback-{}", n + 1);
                routes = self.route(Some(routes), &name, fallback, ids)?;
            }
            Producer::builder(routes)
        };
        let mut builder = self.apply(builder, batching);
        if let Some(Spooling { dir, max_bytes }) = spool {
            let mut config = SpoolConfig::new(dir);
            if let Some(max) = max_bytes {
                // Segments of at most a quarter of the limit (64 MiB by default), so that a
                // small limit still holds the two the spool needs and frees room in steps.
                config = config
                    .max_bytes(max)
                    .segment_bytes((max / 4).min(64 * 1024 * 1024));
            }
            builder = builder
                .spool(config)
                .with_context(|| format!("--spool {}", dir.display()))?;
        }
        let producer = builder
            .build()
            .context("the producer settings are invalid")?;
        Ok(Session {
            producer,
            destination,
        })
    }

    /// With `ids` (a spool: what a crash sends twice, a consumer drops by its id), each record
    /// carries its message id.
    fn kafka_transport(&self, k: &KafkaTarget, ids: bool) -> anyhow::Result<KafkaTransport> {
        let config = self.kafka_config(&k.bootstrap, Some(k), ids)?;
        KafkaTransport::new(config).context("the Kafka settings are invalid")
    }

    /// `to` as the next route of a fallback (the first when `so_far` is `None`), sending to
    /// its own destination (a Kafka route with message ids in the records with `ids`).
    fn route(
        &self,
        so_far: Option<Fallback>,
        name: &str,
        to: &Target,
        ids: bool,
    ) -> anyhow::Result<Fallback> {
        let added = match (so_far, to) {
            (None, Target::Kafka(k)) => Fallback::new(name, self.kafka_transport(k, ids)?),
            (None, Target::Amqp(a)) => Fallback::new(name, amqp_transport(a)?),
            (Some(f), Target::Kafka(k)) => f.or(name, self.kafka_transport(k, ids)?),
            (Some(f), Target::Amqp(a)) => f.or(name, amqp_transport(a)?),
            (None, Target::Nats(n)) => Fallback::new(name, nats_transport(n)?),
            (Some(f), Target::Nats(n)) => f.or(name, nats_transport(n)?),
            (None, Target::Redis(r)) => Fallback::new(name, redis_transport(r)?),
            (Some(f), Target::Redis(r)) => f.or(name, redis_transport(r)?),
            (None, Target::Mqtt(m)) => Fallback::new(name, mqtt_transport(m)?),
            (Some(f), Target::Mqtt(m)) => f.or(name, mqtt_transport(m)?),
        }?;
        Ok(added.with_destination(to.destination()))
    }
}

/// librdkafka properties herald sets itself (the Kafka adapter refuses them too, naming its
/// own settings), with what sets them on the command line: one entry for each of
/// `herald::kafka::managed_properties()`, which a test holds it to.
const SET_BY_THE_COMMAND: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "give the brokers in the URL (kafka://HOST:PORT,HOST:PORT/TOPIC)",
    ),
    (
        "metadata.broker.list",
        "give the brokers in the URL (kafka://HOST:PORT,HOST:PORT/TOPIC)",
    ),
    ("client.id", "use the URL's ?client_id=ID"),
    (
        "compression.type",
        "use the URL's ?compression=none|gzip|snappy|lz4",
    ),
    (
        "compression.codec",
        "use the URL's ?compression=none|gzip|snappy|lz4",
    ),
    ("message.timeout.ms", "use --delivery-timeout-ms"),
    ("delivery.timeout.ms", "use --delivery-timeout-ms"),
    (
        "acks",
        "it is always all: a message is delivered only when every in-sync replica has it",
    ),
    ("request.required.acks", "it is always all"),
    (
        "enable.idempotence",
        "it is on: librdkafka's retries neither duplicate nor reorder",
    ),
    (
        "linger.ms",
        "librdkafka lingers 1 ms; --linger-ms is herald's own",
    ),
    (
        "queue.buffering.max.ms",
        "librdkafka lingers 1 ms; --linger-ms is herald's own",
    ),
    (
        "batch.num.messages",
        "--batch-max-messages sizes herald's batches",
    ),
    (
        "queue.buffering.max.messages",
        "--buffer-messages bounds what waits",
    ),
    (
        "partitioner",
        "messages with a key go to its partition (murmur2_random, as Java's)",
    ),
    (
        "statistics.interval.ms",
        "it feeds herald's Kafka metrics every 5 s",
    ),
    (
        "delivery.report.only.error",
        "herald needs a delivery report for every message",
    ),
    ("dr_msg_cb", "herald installs its own delivery callback"),
    ("transactional.id", "herald does not run Kafka transactions"),
];

fn amqp_transport(a: &herald::amqp::AmqpConfig) -> anyhow::Result<AmqpTransport> {
    AmqpTransport::new(a.clone()).context("the AMQP settings are invalid")
}

fn nats_transport(n: &herald::nats::NatsConfig) -> anyhow::Result<herald::nats::NatsTransport> {
    herald::nats::NatsTransport::new(n.clone()).context("the NATS settings are invalid")
}

fn redis_transport(
    r: &herald::redis::RedisConfig,
) -> anyhow::Result<herald::redis::RedisTransport> {
    herald::redis::RedisTransport::new(r.clone()).context("the Redis settings are invalid")
}

/// Over MQTT 3.1.1 (`?version=3`), which cannot carry a key, keys order the messages and are
/// not sent (the library refuses a keyed message there while a key property is set); headers,
/// which would be lost, are still refused.
fn mqtt_transport(m: &herald::mqtt::MqttConfig) -> anyhow::Result<herald::mqtt::MqttTransport> {
    let mut config = m.clone();
    if config.version() == herald::mqtt::Version::V311 {
        config = config.key_property(None);
    }
    herald::mqtt::MqttTransport::new(config).context("the MQTT settings are invalid")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        tuning: super::Tuning,
    }

    /// Every property the command names a way around is one the Kafka adapter refuses too:
    /// the table stays true to the adapter.
    #[test]
    fn the_properties_the_command_refuses_are_the_adapter_s_own() {
        for (key, _) in super::SET_BY_THE_COMMAND {
            let config = herald::kafka::KafkaConfig::new("127.0.0.1:9").property(*key, "1");
            // Refused as one herald sets, not by librdkafka for its value.
            assert!(
                matches!(
                    herald::kafka::KafkaTransport::new(config),
                    Err(herald::kafka::ConfigError::Conflict { key: k, .. }) if k == *key
                ),
                "the adapter does not manage {key}: the command need not refuse it"
            );
        }
    }

    /// And the other way: every property the adapter sets itself has the command's advice,
    /// so none falls through to the adapter's message, which names a library call.
    #[test]
    fn every_property_the_adapter_refuses_has_the_command_s_advice() {
        for key in herald::kafka::managed_properties() {
            assert!(
                super::SET_BY_THE_COMMAND.iter().any(|(k, _)| *k == key),
                "--kafka-property {key} would be refused with the library's advice"
            );
        }
    }

    #[test]
    fn raw_clients_get_the_urls_and_the_flags_kafka_settings() {
        let args = Args::parse_from([
            "t",
            "--kafka-property",
            "security.protocol=SASL_SSL",
            "--kafka-property",
            "sasl.password=a=b",
        ]);
        let target =
            match crate::target::Target::parse("kafka://h:1/t?client_id=me&compression=gzip") {
                Ok(crate::target::Target::Kafka(k)) => k,
                other => panic!("{other:?}"),
            };
        let props = args
            .tuning
            .kafka_client_properties(Some(&target))
            .expect("valid");
        let props: Vec<(&str, &str)> = props
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            props,
            [
                ("client.id", "me"),
                ("compression.type", "gzip"),
                ("security.protocol", "SASL_SSL"),
                ("sasl.password", "a=b"),
            ]
        );
        assert!(super::check_size(100, 1 << 20, "x").is_ok());
        // A property herald sets is refused naming the command's own way, not a library call.
        let args = Args::parse_from(["t", "--kafka-property", "message.timeout.ms=5000"]);
        let e = args
            .tuning
            .kafka_client_properties(Some(&target))
            .expect_err("herald's own");
        assert!(e.to_string().contains("--delivery-timeout-ms"), "{e}");
        assert!(!e.to_string().contains("KafkaConfig"), "{e}");
        let e = super::check_size(usize::MAX, 1 << 20, "--max-message-bytes").expect_err("huge");
        assert!(e.to_string().contains("--size"), "{e}");
    }
}
