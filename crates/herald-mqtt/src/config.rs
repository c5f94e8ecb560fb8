//! Settings: an `mqtt://` / `mqtts://` URL plus typed options, checked when the transport is
//! built.

use std::path::PathBuf;
use std::time::Duration;

use herald_core::Destination;

use crate::error::ConfigError;
use crate::url::Url;

/// The longest timeout or backoff accepted (longer ones could overflow `Instant + Duration`).
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The most unacknowledged messages one batch may have.
const MAX_WINDOW: usize = 1 << 16;

/// The largest packet MQTT can frame (a four-byte variable length): 256 MiB - 1.
pub(crate) const MQTT_MAX_PACKET: u32 = 268_435_455;

/// The acknowledged quality of service a message is published with. QoS 0 (at most once) is
/// not offered: the broker never answers it, and herald reports a message delivered only on
/// the broker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Qos {
    /// QoS 1, at least once: delivered once the broker's PUBACK came. The default.
    AtLeastOnce,
    /// QoS 2, exactly once between herald and the broker: delivered once the broker's
    /// PUBCOMP came (PUBLISH, PUBREC, PUBREL, PUBCOMP). It guards against a duplicate on one
    /// connection only: herald's retry after a lost connection is a new publish.
    ExactlyOnce,
}

/// The MQTT protocol version spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Version {
    /// MQTT 5 (the default): the herald key, message id and headers travel as user
    /// properties; PUBACK reason codes and the broker's Maximum Packet Size are read.
    V5,
    /// MQTT 3.1.1 (`?version=3`), for brokers without MQTT 5: a message carries its topic and
    /// payload only, so a message with a key or headers is refused (permanent
    /// `UNSUPPORTED_BY_MQTT3`) rather than sent without them.
    V311,
}

/// Everything a [`crate::MqttTransport`] needs: where the broker is, where to publish, and
/// how.
///
/// Made from a URL with [`MqttConfig::from_url`], then adjusted with the typed setters. The
/// password is never shown: `Debug` prints `mqtt://user:***@host:port/topic`.
///
/// ```
/// use std::time::Duration;
/// use herald_mqtt::{MqttConfig, Qos};
/// let config = MqttConfig::from_url("mqtt://app:s3cret@broker:1883/plant/line-3/temperature?qos=2")?
///     .ack_timeout(Duration::from_secs(10))
///     .window(512);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert_eq!(config.topic(), Some("plant/line-3/temperature"));
/// assert_eq!(config.qos(), Qos::ExactlyOnce);
/// # Ok::<(), herald_mqtt::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub(crate) url: Url,
    pub(crate) ack_timeout: Duration,
    pub(crate) window: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) key_property: Option<String>,
    pub(crate) id_property: Option<String>,
    pub(crate) client_id_prefix: String,
    pub(crate) metrics_name: Option<String>,
    pub(crate) max_packet_size: u32,
    pub(crate) v3_qos2_inflight: u16,
}

/// Mosquitto's default `max_inflight_messages`: how many QoS 2 publishes of a client it keeps
/// awaiting their PUBREL.
const V3_QOS2_INFLIGHT: u16 = 20;

impl MqttConfig {
    /// Settings for the broker of `url`:
    /// `mqtt://[user[:password]@]host[:port][/TOPIC][?qos=1|2][&version=5|3]`, `mqtts://` for
    /// TLS; the port defaults to 1883 (8883 for `mqtts://`). User, password and topic are
    /// percent-decoded; everything after the first `/` of the path is the topic, slashes
    /// included (`mqtt://127.0.0.1:1883/plant/line-3/temperature`).
    ///
    /// The topic, when given, is where the URL's messages go ([`MqttConfig::destination`]):
    /// the `herald` command sends there. `?qos=0` is refused: the broker never acknowledges
    /// it.
    ///
    /// A malformed URL is an error naming the part (`scheme`, `user`, `password`, `host`,
    /// `port`, `topic`, `query …`); the password itself never appears in it.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(url)?;
        Ok(Self {
            url,
            ack_timeout: Duration::from_secs(30),
            window: 4096,
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            keep_alive: Duration::from_secs(30),
            key_property: Some("x-herald-key".into()),
            id_property: Some("x-herald-id".into()),
            client_id_prefix: "herald".into(),
            metrics_name: None,
            max_packet_size: MQTT_MAX_PACKET,
            v3_qos2_inflight: V3_QOS2_INFLIGHT,
        })
    }

    /// The quality of service of every publish (the URL's `?qos=`). Default: QoS 1.
    #[must_use]
    pub fn with_qos(mut self, qos: Qos) -> Self {
        self.url.qos = qos;
        self
    }

    /// The protocol version (the URL's `?version=`). Default: MQTT 5.
    #[must_use]
    pub fn with_version(mut self, version: Version) -> Self {
        self.url.version = version;
        self
    }

    /// How long the connection may go without acknowledging anything while publishes wait
    /// for it: then it is taken for hung (a half-open TCP connection, a hung broker). A batch
    /// waits as long as the broker goes on answering, however slowly (a small Receive Maximum,
    /// a long round trip); once a whole `ack_timeout` passes with no acknowledgement on the
    /// connection, its unanswered messages fail as transient `TIMEOUT` (retried: the broker may
    /// have the first copy, so the retry can be a duplicate), and the connection is given up
    /// for a new one. A batch that finds the connection silent this long (its calls cut off
    /// sooner by a shorter delivery timeout) gives it up too. At most 24 hours. Default: 30 s.
    #[must_use]
    pub fn ack_timeout(mut self, t: Duration) -> Self {
        self.ack_timeout = t;
        self
    }

    /// Most messages of one batch handed to the client and not yet answered: at this many, the
    /// next publish waits until one of them is answered. (How many are on the wire at once
    /// is also bounded by the broker's Receive Maximum, which herald keeps to.) Between 1 and
    /// 65 536. Default: 4096.
    #[must_use]
    pub fn window(mut self, n: usize) -> Self {
        self.window = n;
        self
    }

    /// Limit for one connection attempt (TCP, TLS, CONNECT and its CONNACK). At most 24 hours.
    /// Default: 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Backoff between connection attempts after a failed one: from `min`, doubling, up to
    /// `max` (at most 24 hours). Default: 100 ms to 5 s.
    #[must_use]
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// The MQTT keep-alive: a PINGREQ goes out when nothing was written for this long, and a
    /// connection where a PINGREQ (that one, or one herald sends after answers) is unanswered
    /// for this long after it was written is lost. Between 5 s and 18 hours (MQTT's limit is
    /// 65 535 s). The broker may impose its own (MQTT 5 Server Keep Alive). Default: 30 s.
    #[must_use]
    pub fn keep_alive(mut self, t: Duration) -> Self {
        self.keep_alive = t;
        self
    }

    /// The MQTT 5 user property that carries a message's herald key (MQTT messages have no
    /// key of their own), or `None` not to send it. Default: `x-herald-key`, as the other
    /// adapters' key header. A herald header of the same name is refused.
    #[must_use]
    pub fn key_property(mut self, name: Option<String>) -> Self {
        self.key_property = name;
        self
    }

    /// The MQTT 5 user property that carries a message's herald id (UUID text, the same on
    /// every retry, for consumers that drop duplicates), or `None` not to send it. Default:
    /// `x-herald-id`. A herald header of the same name is refused.
    #[must_use]
    pub fn id_property(mut self, name: Option<String>) -> Self {
        self.id_property = name;
        self
    }

    /// The start of the client id of every connection (`{prefix}-{random}`; each connection
    /// gets a new one, with a clean session). Up to 16 ASCII letters, digits, `-` or `_`, so
    /// that the id stays within the 23 characters every broker accepts. Default: `herald`.
    #[must_use]
    pub fn client_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.client_id_prefix = prefix.into();
        self
    }

    /// Names the transport in its metrics: every `herald_mqtt_*` metric carries the label
    /// `producer` with this name (besides `transport="mqtt"`), so that several transports in
    /// one process keep separate series. Give it the name of the producer that uses the
    /// transport ([`ProducerBuilder::name`](herald_core::ProducerBuilder::name)). Up to 64
    /// ASCII letters, digits, `_`, `-` or `.`. Default: no name and no `producer` label.
    #[must_use]
    pub fn metrics_name(mut self, name: impl Into<String>) -> Self {
        self.metrics_name = Some(name.into());
        self
    }

    /// The largest PUBLISH packet sent, in bytes (fixed header, topic, properties and payload
    /// included). The broker's own Maximum Packet Size (MQTT 5 CONNACK) applies too: the
    /// smaller wins. A message above it fails at once, permanently (`PACKET_TOO_LARGE`),
    /// without being sent. With MQTT 3.1.1 the broker announces no maximum: set the broker's
    /// here (Mosquitto: `max_packet_size`, `message_size_limit`). Between 64 and 268 435 455.
    /// Default: 268 435 455, MQTT's own limit.
    #[must_use]
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// With MQTT 3.1.1 and QoS 2: most publishes out awaiting their PUBCOMP on one connection.
    /// MQTT 3.1.1 has no Receive Maximum, and a broker keeps a bounded number of a client's
    /// QoS 2 publishes awaiting their PUBREL: Mosquitto answers the ones past its
    /// `max_inflight_messages` (20 by default) with a PUBREC that cannot say no over 3.1.1,
    /// then a PUBCOMP, and drops them, which would be reported delivered. Set the broker's
    /// limit here if it is not 20. (MQTT 5 brokers announce theirs, and herald keeps to it.)
    /// At least 1. Default: 20.
    #[must_use]
    pub fn v3_qos2_inflight(mut self, n: u16) -> Self {
        self.v3_qos2_inflight = n;
        self
    }

    /// Trusts the CA certificates in this PEM file for `mqtts://`, besides the system's
    /// roots. The URL's `?tlsca=PATH` sets the same.
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.url.tls_files.set_ca_file(path.into());
        self
    }

    /// Presents this client certificate (PEM: `cert_file` the chain, leaf first; `key_file` its
    /// private key) to an `mqtts://` broker that asks for one (mutual TLS: mosquitto's
    /// `require_certificate true`). The URL's `?tlscert=PATH&tlskey=PATH` set the same. Both
    /// files are read when the transport is built, and a problem with either is an error
    /// naming the file.
    #[must_use]
    pub fn tls_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.url
            .tls_files
            .set_client_cert(herald_core::tls::ClientCert {
                cert_file: cert_file.into(),
                key_file: key_file.into(),
            });
        self
    }

    /// The URL's topic: where [`MqttConfig::destination`] sends.
    pub fn topic(&self) -> Option<&str> {
        self.url.topic.as_deref()
    }

    /// The destination of the URL's topic, if it has one.
    pub fn destination(&self) -> Option<Destination> {
        self.url.topic.as_deref().map(crate::topic)
    }

    /// The quality of service of every publish.
    pub fn qos(&self) -> Qos {
        self.url.qos
    }

    /// The protocol version spoken.
    pub fn version(&self) -> Version {
        self.url.version
    }

    /// The URL with the password masked, safe to log:
    /// `mqtt://user:***@host:port[/topic][?qos=2][&version=3]`, with the TLS files the config
    /// names (`tlsca`, `tlscert`, `tlskey`: paths), whether the URL or a setter named them.
    pub fn redacted_url(&self) -> String {
        self.url.to_string()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.window == 0 || self.window > MAX_WINDOW {
            return invalid("window", "must be between 1 and 65536");
        }
        if let Err((field, reason)) = self.url.tls_files.check(
            self.url.tls,
            Some(
                "needs TLS: an mqtts:// URL (`?tlsca=`, `?tlscert=` and `?tlskey=` too; mqtt:// \
                 is plain text)",
            ),
            "MqttConfig::tls_ca_file",
            None,
        ) {
            return invalid(field, &reason);
        }
        if self.ack_timeout.is_zero() {
            return invalid("ack_timeout", "must be more than zero");
        }
        if self.v3_qos2_inflight == 0 {
            return invalid("v3_qos2_inflight", "must be at least 1");
        }
        if self.connect_timeout < Duration::from_millis(1) {
            return invalid("connect_timeout", "must be more than zero");
        }
        for (field, d) in [
            ("ack_timeout", self.ack_timeout),
            ("connect_timeout", self.connect_timeout),
            ("reconnect_backoff", self.reconnect_max),
        ] {
            if d > MAX_DURATION {
                return invalid(field, "must be at most 24 hours");
            }
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return invalid(
                "reconnect_backoff",
                "min must be more than zero and at most max",
            );
        }
        if self.keep_alive < Duration::from_secs(5)
            || self.keep_alive > Duration::from_secs(18 * 60 * 60)
        {
            return invalid("keep_alive", "must be between 5 s and 18 hours");
        }
        if !(64..=MQTT_MAX_PACKET).contains(&self.max_packet_size) {
            return invalid("max_packet_size", "must be between 64 and 268435455");
        }
        if let Some(name) = &self.metrics_name {
            if let Err(reason) = herald_core::metrics::check_producer_label(name) {
                return invalid("metrics_name", &reason);
            }
        }
        for (field, name) in [
            ("key_property", &self.key_property),
            ("id_property", &self.id_property),
        ] {
            if name.as_deref().is_some_and(|n| {
                n.is_empty()
                    || n.len() > crate::publish::MAX_STRING
                    || crate::destination::refused_char(n).is_some()
            }) {
                return invalid(
                    field,
                    "must be a non-empty name of at most 65 535 bytes, without control characters (NUL included) or Unicode non-characters",
                );
            }
        }
        if self.key_property.is_some() && self.key_property == self.id_property {
            return invalid("id_property", "must differ from key_property");
        }
        let p = &self.client_id_prefix;
        if p.is_empty()
            || p.len() > 16
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return invalid(
                "client_id_prefix",
                "must be 1 to 16 ASCII letters, digits, `-` or `_`",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let c = MqttConfig::from_url("mqtt://h/plant/x").expect("valid");
        assert!(c.clone().validate().is_ok());
        assert!(c.clone().metrics_name("billing-eu.1").validate().is_ok());
        for (bad, field) in [
            (c.clone().window(0), "window"),
            (c.clone().window(MAX_WINDOW + 1), "window"),
            (c.clone().v3_qos2_inflight(0), "v3_qos2_inflight"),
            (
                c.clone().key_property(Some("k\u{1}".into())),
                "key_property",
            ),
            (
                c.clone().id_property(Some("i".repeat(70_000))),
                "id_property",
            ),
            (c.clone().ack_timeout(Duration::ZERO), "ack_timeout"),
            (c.clone().ack_timeout(Duration::MAX), "ack_timeout"),
            (c.clone().connect_timeout(Duration::ZERO), "connect_timeout"),
            (c.clone().connect_timeout(Duration::MAX), "connect_timeout"),
            (
                c.clone()
                    .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1)),
                "reconnect_backoff",
            ),
            (
                c.clone()
                    .reconnect_backoff(Duration::from_secs(1), Duration::MAX),
                "reconnect_backoff",
            ),
            (c.clone().keep_alive(Duration::ZERO), "keep_alive"),
            (c.clone().keep_alive(Duration::from_secs(4)), "keep_alive"),
            (
                c.clone().keep_alive(Duration::from_secs(100_000)),
                "keep_alive",
            ),
            (c.clone().max_packet_size(10), "max_packet_size"),
            (
                c.clone().max_packet_size(MQTT_MAX_PACKET + 1),
                "max_packet_size",
            ),
            (c.clone().metrics_name("a b"), "metrics_name"),
            (c.clone().key_property(Some(String::new())), "key_property"),
            (
                c.clone().id_property(Some("x-herald-key".into())),
                "id_property",
            ),
            (c.clone().client_id_prefix(""), "client_id_prefix"),
            (c.clone().client_id_prefix("a b"), "client_id_prefix"),
            (
                c.clone().client_id_prefix("x".repeat(17)),
                "client_id_prefix",
            ),
        ] {
            match bad.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn qos_and_version_from_the_url_or_the_setters() {
        let c = MqttConfig::from_url("mqtt://h/t?qos=2&version=3").expect("valid");
        assert_eq!((c.qos(), c.version()), (Qos::ExactlyOnce, Version::V311));
        let c = c.with_qos(Qos::AtLeastOnce).with_version(Version::V5);
        assert_eq!((c.qos(), c.version()), (Qos::AtLeastOnce, Version::V5));
        assert_eq!(c.destination(), Some(crate::topic("t")));
        assert!(MqttConfig::from_url("mqtt://h")
            .expect("valid")
            .destination()
            .is_none());
    }
}
