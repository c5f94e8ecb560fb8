//! Settings of the Kafka transport, and the librdkafka configuration they become.

use std::fmt;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use crate::error::ConfigError;

/// Compression of produce requests (librdkafka's `compression.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// None.
    None,
    /// gzip (zlib, built in).
    Gzip,
    /// Snappy (built into librdkafka).
    Snappy,
    /// LZ4 (built into librdkafka): fast, a good default for most payloads.
    #[default]
    Lz4,
}

impl Compression {
    /// librdkafka's name for it (`compression.type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
        }
    }
}

/// How a keyed message picks its partition (librdkafka's `partitioner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partitioner {
    /// murmur2 of the key, as the Java client does, so a key lands on the same partition
    /// whichever client produced it; messages without a key go to a random partition.
    #[default]
    Murmur2Random,
    /// librdkafka's own default: CRC32 of the key (not the Java client's partitions).
    ConsistentRandom,
    /// FNV-1a of the key, as Sarama (Go) does.
    Fnv1aRandom,
}

impl Partitioner {
    fn as_str(self) -> &'static str {
        match self {
            Self::Murmur2Random => "murmur2_random",
            Self::ConsistentRandom => "consistent_random",
            Self::Fnv1aRandom => "fnv1a_random",
        }
    }
}

/// Properties herald sets itself, with the setting to use instead. Given through
/// [`KafkaConfig::property`], they are refused at build.
const MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "KafkaConfig::new"),
    ("metadata.broker.list", "KafkaConfig::new"),
    ("client.id", "KafkaConfig::client_id"),
    ("acks", "herald always uses acks=all: a message is delivered only when every in-sync replica has it"),
    ("request.required.acks", "herald always uses acks=all"),
    ("enable.idempotence", "KafkaConfig::idempotence"),
    ("compression.type", "KafkaConfig::compression"),
    ("compression.codec", "KafkaConfig::compression"),
    ("linger.ms", "KafkaConfig::linger"),
    ("queue.buffering.max.ms", "KafkaConfig::linger"),
    ("batch.num.messages", "KafkaConfig::batch_num_messages"),
    ("message.timeout.ms", "KafkaConfig::message_timeout"),
    ("delivery.timeout.ms", "KafkaConfig::message_timeout"),
    ("partitioner", "KafkaConfig::partitioner"),
    ("statistics.interval.ms", "KafkaConfig::statistics_interval"),
    ("delivery.report.only.error", "herald needs a delivery report for every message"),
    ("dr_msg_cb", "herald installs its own delivery callback"),
    ("queue.buffering.max.messages", "KafkaConfig::queue_max_messages"),
    ("transactional.id", "herald does not run Kafka transactions: without `init_transactions` librdkafka refuses every message; idempotence (on by default) already keeps librdkafka's retries from duplicating or reordering"),
];

/// The librdkafka properties herald sets itself: [`KafkaConfig::property`] refuses each of
/// them at build, naming the setting to use instead. For front ends (the `herald` command)
/// that refuse them earlier with advice of their own.
pub fn managed_properties() -> impl Iterator<Item = &'static str> {
    MANAGED.iter().map(|(key, _)| *key)
}

/// librdkafka's names for how many times it retries a failed produce request itself.
const RETRIES: [&str; 2] = ["message.send.max.retries", "retries"];

/// Settings of a [`crate::KafkaTransport`].
///
/// Safe defaults, set explicitly: `acks=all`, idempotence on, LZ4 compression, the
/// `murmur2_random` partitioner, `message.timeout.ms` of 120 s (herald's default delivery
/// timeout; keep the two equal, see [`KafkaConfig::message_timeout`]).
///
/// How herald's batching and librdkafka's divide the work: herald's batch (its `BatchPolicy`) is
/// the unit of completion and ordering: it is handed to librdkafka at once and its outcomes are
/// awaited together. librdkafka then cuts it into produce requests per partition of at most
/// `batch.num.messages` ([`KafkaConfig::batch_num_messages`]) and waits at most `linger.ms`
/// ([`KafkaConfig::linger`], default 1 ms: herald already lingered) for a request to fill.
/// Use [`crate::recommended_batching`] for herald's side.
///
/// Security options (SASL, SSL) are librdkafka properties passed through
/// [`KafkaConfig::property`]. `Debug` output and errors show the value of a property only when
/// it is on a list of properties known to be harmless (tuning, `security.protocol`,
/// `sasl.mechanisms`, certificate locations, ...); every other value, whatever its name,
/// shows as `***` (`sasl.username` too, as librdkafka does). SSL and the SASL mechanisms
/// need this crate's `ssl` (or `ssl-system`) feature; without it librdkafka refuses
/// `security.protocol=SSL` or `SASL_SSL` when the transport is made.
///
/// ```no_run
/// # fn main() -> Result<(), herald_kafka::ConfigError> {
/// use herald_kafka::KafkaConfig;
/// // A managed cluster: TLS with the provider's CA, SASL SCRAM-SHA-512.
/// let config = KafkaConfig::new("broker-1.example.com:9093")
///     .property("security.protocol", "SASL_SSL")
///     .property("ssl.ca.location", "/etc/herald/ca.pem")
///     .property("sasl.mechanisms", "SCRAM-SHA-512")
///     .property("sasl.username", "herald")
///     .property("sasl.password", std::env::var("KAFKA_PASSWORD").unwrap_or_default());
/// let transport = herald_kafka::KafkaTransport::new(config)?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    bootstrap_servers: String,
    client_id: String,
    idempotence: bool,
    compression: Compression,
    partitioner: Partitioner,
    linger: Duration,
    batch_num_messages: usize,
    message_timeout: Duration,
    settle_time: Option<Duration>,
    statistics_interval: Option<Duration>,
    queue_max_messages: usize,
    message_id_header: Option<String>,
    metrics_name: Option<String>,
    properties: Vec<(String, String)>,
}

/// The header name herald suggests for message ids (see [`KafkaConfig::message_id_header`]).
pub const MESSAGE_ID_HEADER: &str = "herald-message-id";

/// Checks a bootstrap list (`host:port[,host:port...]`): not empty, and every server a host
/// (no `/` or space) with a port from 1 to 65535. Spaces around a server are allowed. The error
/// names the server that is wrong. [`KafkaConfig`] and the `herald` command's `kafka://` URLs
/// both check with it.
///
/// ```
/// use herald_kafka::validate_bootstrap_servers;
/// assert!(validate_bootstrap_servers("a:9092, b:9093").is_ok());
/// assert!(validate_bootstrap_servers("a:0").unwrap_err().contains("`a:0`"));
/// assert!(validate_bootstrap_servers(" ").is_err());
/// ```
pub fn validate_bootstrap_servers(servers: &str) -> Result<(), String> {
    if servers.trim().is_empty() {
        return Err("is empty: give host:port[,host:port...]".to_owned());
    }
    for server in servers.split(',') {
        let server = server.trim();
        if server.contains('@') {
            // Not echoed: what stands before the `@` is likely a user name and password.
            return Err("a server holds `@`: user names and passwords do not belong in the servers; give them as the `sasl.username` and `sasl.password` properties".to_owned());
        }
        let ok = server.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains(['/', ' '])
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(format!(
                "`{server}` is not host:port (a port number from 1 to 65535 is required)"
            ));
        }
    }
    Ok(())
}

impl KafkaConfig {
    /// Settings for the cluster at `bootstrap_servers` (`host:port[,host:port...]`).
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            client_id: "herald".into(),
            idempotence: true,
            compression: Compression::default(),
            partitioner: Partitioner::default(),
            linger: Duration::from_millis(1),
            batch_num_messages: 10_000,
            message_timeout: Duration::from_secs(120),
            settle_time: None,
            statistics_interval: Some(Duration::from_secs(5)),
            queue_max_messages: 1_000_000,
            message_id_header: None,
            metrics_name: None,
            properties: Vec::new(),
        }
    }

    /// The client id brokers see (`client.id`). Default `herald`.
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// Whether production is idempotent: librdkafka then keeps each partition's order across
    /// its requests in flight and its own retries.
    pub(crate) fn is_idempotent(&self) -> bool {
        self.idempotence
    }

    /// Idempotent production (`enable.idempotence`). Default on: librdkafka's own retries then
    /// never duplicate or reorder a message within a partition. Off, librdkafka does not retry
    /// (`message.send.max.retries` 0, and another value is refused): its retries would reorder
    /// a partition unseen. herald retries the failed messages behind its per-key hold, so that
    /// each key's last copies are in order; messages may then be stored twice.
    #[must_use]
    pub fn idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }

    /// Compression of produce requests. Default LZ4.
    #[must_use]
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    /// Partitioner for keyed messages. Default [`Partitioner::Murmur2Random`].
    #[must_use]
    pub fn partitioner(mut self, p: Partitioner) -> Self {
        self.partitioner = p;
        self
    }

    /// librdkafka's own linger (`linger.ms`), on top of herald's. Default 1 ms.
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Most messages in one produce request per partition (`batch.num.messages`). Default 10 000.
    #[must_use]
    pub fn batch_num_messages(mut self, n: usize) -> Self {
        self.batch_num_messages = n;
        self
    }

    /// How long librdkafka keeps trying one message (`message.timeout.ms`), its own retries
    /// included. Keep it equal to the producer's delivery timeout (default 120 s for both): a
    /// shorter one makes librdkafka give up early and herald retry, a longer one lets herald's
    /// attempt timeout cut librdkafka's retries short.
    #[must_use]
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.message_timeout = timeout;
        self
    }

    /// How long past an attempt's deadline herald waits for the broker's answer about messages
    /// already in a produce request (see `Transport::settle_time` in herald-core). At the
    /// deadline herald purges what librdkafka has not sent yet (it fails: not stored, unless
    /// librdkafka had sent it once and queued it again for its own retry); what a
    /// broker already has is reported as the broker answers, so that a message the broker stored
    /// is not reported failed. A message can thus end this long after its delivery timeout.
    ///
    /// Default: librdkafka's `request.timeout.ms` (30 s unless set with
    /// [`KafkaConfig::property`]) plus one second, the time within which librdkafka gets an answer
    /// to a produce request or gives up on it. Shorter is allowed: a message still unanswered when
    /// it ends is reported failed as cut off (`herald_attempt_timeout`) and may have been stored.
    #[must_use]
    pub fn settle_time(mut self, settle: Duration) -> Self {
        self.settle_time = Some(settle);
        self
    }

    /// The settle time in force: the one set, or the default (see [`KafkaConfig::settle_time`]).
    pub fn configured_settle_time(&self) -> Duration {
        self.settle_time.unwrap_or_else(|| {
            let request_timeout = self
                .properties
                .iter()
                .rev()
                .find(|(k, _)| k == "request.timeout.ms")
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .map_or(Duration::from_secs(30), Duration::from_millis);
            request_timeout + Duration::from_secs(1)
        })
    }

    /// How often librdkafka reports statistics, which feed herald's metrics (round-trip time,
    /// queue depth, librdkafka's retries). Default 5 s; `None` turns them off.
    #[must_use]
    pub fn statistics_interval(mut self, every: Option<Duration>) -> Self {
        self.statistics_interval = every;
        self
    }

    /// Most messages librdkafka queues (`queue.buffering.max.messages`). Default 1 000 000;
    /// beyond it sending waits for room (never loses the message).
    #[must_use]
    pub fn queue_max_messages(mut self, n: usize) -> Self {
        self.queue_max_messages = n;
        self
    }

    /// The Kafka header that carries each message's id ([`herald_core::MessageId`], as its
    /// 36-character UUID text, the same text as the AMQP adapter's `message_id`), so that
    /// consumers can drop the duplicates at-least-once delivery allows: the id is given when
    /// the producer accepts the message and stays the same across herald's retries and when a
    /// failed message is sent again with [`Message::with_id`](herald_core::Message::with_id).
    /// A message that already has a header of that name keeps its own and gets no second one.
    /// `Some(herald_kafka::MESSAGE_ID_HEADER.into())` names it `herald-message-id`.
    ///
    /// Default `None`, no id header: at 100-byte messages it costs a third of the throughput
    /// (0.67x on librdkafka's mock cluster; 56 more bytes per record), a price every message
    /// pays and only consumers that deduplicate get anything for. Turn it on for those.
    #[must_use]
    pub fn message_id_header(mut self, name: Option<String>) -> Self {
        self.message_id_header = name;
        self
    }

    /// Names the transport in its metrics: every `herald_kafka_*` metric carries the label
    /// `producer` with this name (besides `transport="kafka"`), so that several transports in
    /// one process keep separate series. Give it the name of the producer that uses the
    /// transport ([`ProducerBuilder::name`](herald_core::ProducerBuilder::name)): the same
    /// label key and value then join herald's and the adapter's series. Up to 64 ASCII letters,
    /// digits, `_`, `-` or `.` (checked by [`KafkaTransport::new`](crate::KafkaTransport::new)).
    /// Default: no name and no `producer` label.
    #[must_use]
    pub fn metrics_name(mut self, name: impl Into<String>) -> Self {
        self.metrics_name = Some(name.into());
        self
    }

    /// Any other librdkafka property, passed through (security: `security.protocol`,
    /// `sasl.mechanisms`, `sasl.username`, `sasl.password`, `ssl.ca.location`, ...). Properties
    /// herald sets itself are refused at build, naming the setting to use instead.
    #[must_use]
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// The bootstrap servers, as given.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The configured message timeout.
    pub fn configured_message_timeout(&self) -> Duration {
        self.message_timeout
    }

    /// The header that carries message ids, if any.
    pub(crate) fn id_header(&self) -> Option<&str> {
        self.message_id_header.as_deref()
    }

    /// The `producer` label of the transport's metrics, if any.
    pub(crate) fn metrics_label(&self) -> Option<&str> {
        self.metrics_name.as_deref()
    }

    fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Checks the settings and builds the librdkafka configuration.
    pub(crate) fn client_config(&self) -> Result<ClientConfig, ConfigError> {
        validate_bootstrap_servers(&self.bootstrap_servers)
            .map_err(|why| Self::invalid("bootstrap_servers", why))?;
        if self.batch_num_messages == 0 {
            return Err(Self::invalid("batch_num_messages", "must be at least 1"));
        }
        if self.message_timeout < Duration::from_millis(1) {
            // librdkafka counts it in milliseconds, and 0 means no timeout at all.
            return Err(Self::invalid(
                "message_timeout",
                "must be at least 1 ms (librdkafka counts milliseconds; 0 would mean never)",
            ));
        }
        if self.queue_max_messages == 0 {
            return Err(Self::invalid("queue_max_messages", "must be at least 1"));
        }
        if let Some(name) = &self.message_id_header {
            if name.is_empty() {
                return Err(Self::invalid(
                    "message_id_header",
                    "is empty: give a header name, or None for no id header",
                ));
            }
        }
        if let Some(name) = &self.metrics_name {
            if let Err(reason) = herald_core::metrics::check_producer_label(name) {
                return Err(Self::invalid("metrics_name", reason));
            }
        }
        for (key, value) in &self.properties {
            if let Some((_, instead)) = MANAGED.iter().find(|(k, _)| k == key) {
                return Err(ConfigError::Conflict {
                    key: key.clone(),
                    reason: format!("herald sets it; use {instead}"),
                });
            }
            if !self.idempotence && RETRIES.contains(&key.as_str()) && value.trim() != "0" {
                return Err(ConfigError::Conflict {
                    key: key.clone(),
                    reason: "without idempotence, librdkafka's own retries reorder a partition (a retried request lands behind the ones built after it, every delivery report still `Ok`); herald retries instead, behind its per-key hold. Turn idempotence on for librdkafka's retries".to_owned(),
                });
            }
        }
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            .set("acks", "all")
            .set("enable.idempotence", self.idempotence.to_string())
            .set("compression.type", self.compression.as_str())
            .set("partitioner", self.partitioner.as_str())
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("batch.num.messages", self.batch_num_messages.to_string())
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().to_string(),
            )
            .set(
                "queue.buffering.max.messages",
                self.queue_max_messages.to_string(),
            )
            .set(
                "statistics.interval.ms",
                self.statistics_interval
                    .map_or(0, |d| d.as_millis())
                    .to_string(),
            );
        if !self.idempotence {
            // A request librdkafka retries itself lands behind the ones it built meanwhile (even
            // with one in flight), and herald would never know: herald retries instead, and its
            // per-key hold keeps each key's order.
            c.set(RETRIES[0], "0");
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        Ok(c)
    }
}

/// librdkafka properties whose values are known to be harmless to show: tuning, protocol and
/// mechanism names, and locations of certificates (a path, not the file's content). Nothing
/// librdkafka itself marks sensitive is here (it redacts `sasl.username` and
/// `ssl.key.location` in its own dumps, so herald does too). Any other property's value is
/// shown as `***` in `Debug` output and errors: a property not on this list (a password,
/// `sasl.oauthbearer.config`, a PEM, a token endpoint URL that may hold credentials, a
/// property librdkafka adds next year, or a misspelt name) is never shown.
const HARMLESS: &[&str] = &[
    "allow.auto.create.topics",
    "api.version.fallback.ms",
    "api.version.request",
    "api.version.request.timeout.ms",
    "batch.size",
    "broker.address.family",
    "broker.address.ttl",
    "broker.version.fallback",
    "client.dns.lookup",
    "client.rack",
    "compression.level",
    "connections.max.idle.ms",
    "debug",
    "enable.gapless.guarantee",
    "enable.metrics.push",
    "enable.random.seed",
    "enable.sasl.oauthbearer.unsecure.jwt",
    "enable.ssl.certificate.verification",
    "https.ca.location",
    "log.connection.close",
    "log.queue",
    "log.thread.name",
    "log_level",
    "max.in.flight",
    "max.in.flight.requests.per.connection",
    "message.copy.max.bytes",
    "message.max.bytes",
    "message.send.max.retries",
    "metadata.max.age.ms",
    "metadata.recovery.rebootstrap.trigger.ms",
    "metadata.recovery.strategy",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queuing.strategy",
    "receive.message.max.bytes",
    "reconnect.backoff.jitter.ms",
    "reconnect.backoff.max.ms",
    "reconnect.backoff.ms",
    "request.timeout.ms",
    "retries",
    "retry.backoff.max.ms",
    "retry.backoff.ms",
    "sasl.kerberos.keytab",
    "sasl.kerberos.min.time.before.relogin",
    "sasl.kerberos.principal",
    "sasl.kerberos.service.name",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.scope",
    "security.protocol",
    "socket.blocking.max.ms",
    "socket.connection.setup.timeout.ms",
    "socket.keepalive.enable",
    "socket.max.fails",
    "socket.nagle.disable",
    "socket.receive.buffer.bytes",
    "socket.send.buffer.bytes",
    "socket.timeout.ms",
    "ssl.ca.certificate.stores",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.cipher.suites",
    "ssl.crl.location",
    "ssl.curves.list",
    "ssl.endpoint.identification.algorithm",
    "ssl.keystore.location",
    "ssl.sigalgs.list",
    "sticky.partitioning.linger.ms",
    "topic.metadata.propagation.max.ms",
    "topic.metadata.refresh.fast.interval.ms",
    "topic.metadata.refresh.interval.ms",
    "topic.metadata.refresh.sparse",
    "transaction.timeout.ms",
];

/// `value` if property `key` is known to be harmless, else `***`.
pub(crate) fn shown<'a>(key: &str, value: &'a str) -> &'a str {
    if HARMLESS.contains(&key) {
        value
    } else {
        "***"
    }
}

/// librdkafka's refusal of a property, with its value redacted like `Debug` does: rdkafka's
/// error holds the value as given (and librdkafka's reason may quote it).
pub(crate) fn redact_client_error(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(code, reason, key, value) => {
            let kept = shown(&key, &value);
            let reason = if kept == value || value.is_empty() {
                reason
            } else {
                reason.replace(value.as_str(), kept)
            };
            let kept = kept.to_owned();
            KafkaError::ClientConfig(code, reason, key, kept)
        }
        other => other,
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), shown(k, v)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("client_id", &self.client_id)
            .field("idempotence", &self.idempotence)
            .field("compression", &self.compression)
            .field("partitioner", &self.partitioner)
            .field("linger", &self.linger)
            .field("batch_num_messages", &self.batch_num_messages)
            .field("message_timeout", &self.message_timeout)
            .field("settle_time", &self.configured_settle_time())
            .field("statistics_interval", &self.statistics_interval)
            .field("queue_max_messages", &self.queue_max_messages)
            .field("message_id_header", &self.message_id_header)
            .field("metrics_name", &self.metrics_name)
            .field("properties", &props)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settle_time_follows_the_request_timeout_unless_set() {
        let c = KafkaConfig::new("k:9092");
        assert_eq!(c.configured_settle_time(), Duration::from_secs(31));
        let c = c.property("request.timeout.ms", "5000");
        assert_eq!(c.configured_settle_time(), Duration::from_secs(6));
        let c = c.settle_time(Duration::from_secs(2));
        assert_eq!(c.configured_settle_time(), Duration::from_secs(2));
    }

    #[test]
    fn defaults_are_safe_and_explicit() {
        let c = KafkaConfig::new("127.0.0.1:9092")
            .client_config()
            .expect("valid");
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("message.timeout.ms"), Some("120000"));
    }

    #[test]
    fn managed_properties_are_refused_naming_the_setting() {
        let e = KafkaConfig::new("h:1")
            .property("acks", "1")
            .client_config()
            .expect_err("conflict");
        assert!(
            matches!(&e, ConfigError::Conflict { key, .. } if key == "acks"),
            "{e}"
        );
        assert!(e.to_string().contains("acks=all"), "{e}");
        let e = KafkaConfig::new("h:1")
            .property("linger.ms", "50")
            .client_config()
            .expect_err("conflict");
        assert!(e.to_string().contains("KafkaConfig::linger"), "{e}");
    }

    #[test]
    fn bad_bootstrap_servers_are_named() {
        let e = KafkaConfig::new("localhost")
            .client_config()
            .expect_err("no port");
        assert!(
            e.to_string().contains("`localhost` is not host:port"),
            "{e}"
        );
        assert!(KafkaConfig::new(" ").client_config().is_err());
        assert!(KafkaConfig::new("a:1, b:2").client_config().is_ok());
    }

    /// Credentials put in the servers (`user:password@host:port`) are refused, and not echoed.
    #[test]
    fn credentials_in_the_servers_are_refused_unseen() {
        for servers in ["app:pw@h:9092", "a:1,u:p/w@h:1"] {
            let e = KafkaConfig::new(servers)
                .client_config()
                .expect_err("credentials");
            let text = format!("{e} {e:?}");
            assert!(text.contains('@'), "{text}");
            assert!(!text.contains("pw") && !text.contains("p/w"), "{text}");
        }
    }

    /// Without idempotence, librdkafka does not retry (herald does, behind its per-key hold);
    /// a retry count is refused. With idempotence, librdkafka's retries stay.
    #[test]
    fn without_idempotence_librdkafka_does_not_retry() {
        let plain = KafkaConfig::new("h:1").idempotence(false);
        let c = plain.clone().client_config().expect("valid");
        assert_eq!(c.get("message.send.max.retries"), Some("0"));
        for key in ["message.send.max.retries", "retries"] {
            let e = plain
                .clone()
                .property(key, "5")
                .client_config()
                .expect_err("reorders");
            assert!(e.to_string().contains("reorder"), "{e}");
            assert!(plain.clone().property(key, "0").client_config().is_ok());
        }
        let c = KafkaConfig::new("h:1")
            .property("retries", "5")
            .client_config()
            .expect("idempotent");
        assert_eq!(c.get("message.send.max.retries"), None);
    }

    /// A transactional id makes librdkafka refuse every message (no `init_transactions`):
    /// refused at build rather than retried until the delivery timeout.
    #[test]
    fn a_transactional_id_is_refused() {
        let e = KafkaConfig::new("h:1")
            .property("transactional.id", "t")
            .client_config()
            .expect_err("transactions");
        assert!(e.to_string().contains("transactions"), "{e}");
    }

    /// librdkafka counts the message timeout in milliseconds and takes 0 as no timeout.
    #[test]
    fn a_message_timeout_under_a_millisecond_is_refused() {
        let e = KafkaConfig::new("h:1")
            .message_timeout(Duration::from_micros(500))
            .client_config()
            .expect_err("under 1 ms");
        assert!(e.to_string().contains("1 ms"), "{e}");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = KafkaConfig::new("h:1")
            .property("sasl.password", "hunter2")
            .property("ssl.key.password", "s3cret")
            .property("security.protocol", "SASL_PLAINTEXT");
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("s3cret"), "{s}");
        assert!(s.contains("SASL_PLAINTEXT"), "{s}");
    }

    /// Values are shown only for properties known to be harmless: secrets whose names say
    /// nothing of a password or a key, and names herald has never heard of, show as `***`.
    #[test]
    fn only_values_of_properties_known_to_be_harmless_are_shown() {
        let secrets = [
            (
                "sasl.oauthbearer.config",
                "principal=admin scope=all sig=T0p-S3cret",
            ),
            ("sasl.oauthbearer.client.secret", "cl13nt-s3cr3t"),
            (
                "sasl.oauthbearer.token.endpoint.url",
                "https://u:Pa55@idp.example/token",
            ),
            ("sasl.oauthbearer.extensions", "apikey=ext-S3cret"),
            ("ssl.certificate.pem", "-----BEGIN CERTIFICATE-----MIIC"),
            ("ssl_key", "-----BEGIN PRIVATE KEY-----MIIE"),
            ("sasl.kerberos.kinit.cmd", "kinit -S pw0rd-in-cmd"),
            ("some.future.auth.blob", "fUtUr3-s3cret"),
            ("sasl.pasword", "typo-s3cret"),
        ];
        let mut c = KafkaConfig::new("h:1")
            .property("security.protocol", "SASL_SSL")
            .property("sasl.mechanisms", "OAUTHBEARER")
            .property("ssl.ca.location", "/etc/herald/ca.pem")
            .property("socket.timeout.ms", "30000");
        for (k, v) in secrets {
            c = c.property(k, v);
        }
        let s = format!("{c:?}");
        for (k, v) in secrets {
            assert!(!s.contains(v), "{k}'s value shown: {s}");
            assert!(s.contains(k), "{k} is named: {s}");
        }
        for shown in ["SASL_SSL", "OAUTHBEARER", "/etc/herald/ca.pem", "30000"] {
            assert!(s.contains(shown), "{shown} hidden: {s}");
        }
        assert!(s.contains("***"), "{s}");
    }

    #[test]
    fn librdkafka_s_refusals_keep_values_out_unless_harmless() {
        use rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID;
        let refusal = |key: &str, value: &str| {
            KafkaError::ClientConfig(
                RD_KAFKA_CONF_INVALID,
                format!("Invalid value \"{value}\" for configuration property \"{key}\""),
                key.into(),
                value.into(),
            )
        };
        let e = redact_client_error(refusal("sasl.oauthbearer.config", "sig=T0p-S3cret"));
        let text = format!("{e} {e:?}");
        assert!(!text.contains("T0p-S3cret"), "{text}");
        assert!(text.contains("sasl.oauthbearer.config"), "{text}");
        let e = redact_client_error(refusal("socket.timeout.ms", "soon"));
        assert!(e.to_string().contains("soon"), "{e}");
    }

    #[test]
    fn metrics_names_and_id_headers_are_checked() {
        let e = KafkaConfig::new("h:1")
            .metrics_name("orders eu")
            .client_config()
            .expect_err("a space");
        assert!(e.to_string().contains("metrics_name"), "{e}");
        assert!(KafkaConfig::new("h:1")
            .metrics_name("x".repeat(65))
            .client_config()
            .is_err());
        assert!(KafkaConfig::new("h:1")
            .metrics_name("orders-eu.v2_a")
            .client_config()
            .is_ok());
        assert!(KafkaConfig::new("h:1")
            .message_id_header(Some(String::new()))
            .client_config()
            .is_err());
        let c = KafkaConfig::new("h:1");
        assert_eq!(c.id_header(), None, "off by default");
        let c = c.message_id_header(Some(MESSAGE_ID_HEADER.into()));
        assert_eq!(c.id_header(), Some("herald-message-id"));
    }
}
