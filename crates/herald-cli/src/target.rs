//! Destination URLs: `kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?...]` and
//! `amqp[s]://USER:PASS@HOST:PORT/VHOST?queue=NAME` or `...?exchange=EX&routing_key=RK`.
//!
//! A password never appears in an error or in `Debug`/`Display` output: AMQP, NATS, Redis and
//! MQTT URLs are parsed by their adapters (`AmqpConfig::from_url` and the like), which redact
//! it, and errors here never echo the URL.

use std::fmt;

use herald::amqp::{AmqpConfig, ConfigError, Route};
use herald::kafka::{validate_bootstrap_servers, validate_topic_name, Compression, TopicNameError};

/// Where `herald produce` and `herald bench` send, parsed from `--to`.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A Kafka topic.
    Kafka(KafkaTarget),
    /// A NATS JetStream subject (`nats://` or `tls://`), parsed by herald-nats.
    Nats(Box<herald::nats::NatsConfig>),
    /// A Redis stream key (`redis://` or `rediss://`), parsed by herald-redis.
    Redis(Box<herald::redis::RedisConfig>),
    /// An MQTT topic (`mqtt://` or `mqtts://`), parsed by herald-mqtt.
    Mqtt(Box<herald::mqtt::MqttConfig>),
    /// An AMQP queue or exchange (`?queue=` or `?exchange=`), parsed by herald-amqp: the
    /// settings hold the route and the queue's declaration.
    Amqp(Box<AmqpConfig>),
}

/// `kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?client_id=ID&compression=none|gzip|snappy|lz4]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KafkaTarget {
    pub(crate) bootstrap: String,
    pub(crate) topic: String,
    pub(crate) client_id: Option<String>,
    pub(crate) compression: Option<Compression>,
}

/// A destination URL that cannot work: which part, and why. Never holds the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UrlError {
    pub(crate) part: &'static str,
    pub(crate) reason: String,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid --to URL: the {} {}", self.part, self.reason)
    }
}

impl std::error::Error for UrlError {}

fn bad(part: &'static str, reason: impl Into<String>) -> UrlError {
    UrlError {
        part,
        reason: reason.into(),
    }
}

const FORMS: &str =
    "expected kafka://HOST:PORT/TOPIC, amqp://USER:PASS@HOST:PORT/VHOST?queue=NAME \
     or amqp://...?exchange=EX&routing_key=RK (amqps:// for TLS), or \
     nats://HOST:PORT/SUBJECT[?stream=NAME] (tls:// for TLS), or \
     redis://HOST:PORT[/DB]/STREAMKEY[?maxlen=N][&wait=N][&wait_timeout_ms=MS] (rediss:// for TLS), or \
     mqtt://HOST:PORT/TOPIC[?qos=1|2][&version=5|3] (mqtts:// for TLS); files for TLS: \
     ?tlsca=PATH, ?tlscert=PATH&tlskey=PATH (NATS, Redis, MQTT), ?cacertfile=PATH, \
     ?certfile=PATH&keyfile=PATH (AMQP); NATS credentials: ?creds=PATH or ?nkey=PATH";

impl Target {
    /// Parses a destination URL.
    pub(crate) fn parse(url: &str) -> Result<Self, UrlError> {
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(bad("scheme", format!("is missing; {FORMS}")));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "kafka" => parse_kafka(&url[scheme.len() + 3..]).map(Self::Kafka),
            "amqp" | "amqps" => parse_amqp(url).map(|a| Self::Amqp(Box::new(a))),
            "nats" | "tls" => parse_nats(url).map(|n| Self::Nats(Box::new(n))),
            "redis" | "rediss" => parse_redis(url).map(|r| Self::Redis(Box::new(r))),
            "mqtt" | "mqtts" => parse_mqtt(url).map(|m| Self::Mqtt(Box::new(m))),
            // The scheme is before `://`, so it cannot hold the password.
            other => Err(bad(
                "scheme",
                format!("`{other}` is not kafka, amqp, amqps, nats, tls, redis, rediss, mqtt or mqtts; {FORMS}"),
            )),
        }
    }

    /// The destination, safe to print (no password).
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Kafka(k) => format!("kafka://{}/{}", k.bootstrap, k.topic),
            Self::Nats(n) => n.redacted_url(),
            Self::Redis(r) => r.redacted_url(),
            Self::Mqtt(m) => m.redacted_url(),
            Self::Amqp(a) => a.redacted_url(),
        }
    }
}

impl Target {
    /// The herald destination its messages go to.
    pub(crate) fn destination(&self) -> herald::Destination {
        match self {
            Self::Kafka(k) => herald::Destination::new(k.topic.as_str()),
            Self::Amqp(a) => a
                .route()
                .map_or_else(|| herald::Destination::new(""), Route::destination),
            Self::Nats(n) => n
                .destination()
                .unwrap_or_else(|| herald::Destination::new("")),
            Self::Redis(r) => r
                .destination()
                .unwrap_or_else(|| herald::Destination::new("")),
            Self::Mqtt(m) => m
                .destination()
                .unwrap_or_else(|| herald::Destination::new("")),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `nats://` and `tls://` URLs: herald-nats's own parser, which names the bad part and never
/// echoes a password or token.
fn parse_nats(url: &str) -> Result<herald::nats::NatsConfig, UrlError> {
    let config = herald::nats::NatsConfig::from_url(url).map_err(|e| match e {
        herald::nats::ConfigError::Url { part, reason } => bad(part, reason),
        other => bad("url", other.to_string()),
    })?;
    if config.subject().is_none() {
        return Err(bad(
            "subject",
            "is missing: nats://HOST:PORT/SUBJECT[?stream=NAME]",
        ));
    }
    Ok(config)
}

/// `redis://` and `rediss://` URLs: herald-redis's own parser, which names the bad part and
/// never echoes a password.
fn parse_redis(url: &str) -> Result<herald::redis::RedisConfig, UrlError> {
    let config = herald::redis::RedisConfig::from_url(url).map_err(|e| match e {
        herald::redis::ConfigError::Url { part, reason } => bad(part, reason),
        other => bad("url", other.to_string()),
    })?;
    if config.stream().is_none() {
        return Err(bad(
            "stream key",
            "is missing: redis://HOST:PORT[/DB]/STREAMKEY[?maxlen=N][&wait=N][&wait_timeout_ms=MS]",
        ));
    }
    Ok(config)
}

/// `mqtt://` and `mqtts://` URLs: herald-mqtt's own parser (everything after the first `/` of
/// the path is the topic), which names the bad part and never echoes a password.
fn parse_mqtt(url: &str) -> Result<herald::mqtt::MqttConfig, UrlError> {
    let config = herald::mqtt::MqttConfig::from_url(url).map_err(|e| match e {
        herald::mqtt::ConfigError::Url { part, reason } => bad(part, reason),
        other => bad("url", other.to_string()),
    })?;
    if config.topic().is_none() {
        return Err(bad(
            "topic",
            "is missing: mqtt://HOST:PORT/TOPIC[?qos=1|2][&version=5|3]",
        ));
    }
    Ok(config)
}

fn parse_kafka(rest: &str) -> Result<KafkaTarget, UrlError> {
    let (before, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (hosts, topic) = before.split_once('/').ok_or_else(|| {
        bad(
            "topic",
            "is missing: kafka://HOST:PORT[,HOST:PORT...]/TOPIC",
        )
    })?;
    // User information anywhere (a password may hold `/` or `?`, so `hosts` may be only its
    // start): refused before any part is echoed in an error. An `@` in a query value is
    // written `%40`.
    if rest.contains('@') {
        return Err(bad(
            "host",
            "holds user information, which kafka:// URLs do not take: give SASL settings with \
             --kafka-property (sasl.username=..., sasl.password=...)",
        ));
    }
    if hosts.trim().is_empty() {
        return Err(bad("host", "is missing: kafka://HOST:PORT/TOPIC"));
    }
    // herald-kafka's rule for bootstrap lists, the one `KafkaConfig` checks with.
    validate_bootstrap_servers(hosts).map_err(|why| bad("host", why))?;
    // herald-kafka's rule, the one every Kafka destination is checked with; the wording here
    // speaks of the URL.
    validate_topic_name(topic).map_err(|why| {
        bad(
            "topic",
            match why {
                TopicNameError::Empty => {
                    "is missing: kafka://HOST:PORT[,HOST:PORT...]/TOPIC".to_owned()
                }
                TopicNameError::Dots | TopicNameError::TooLong => {
                    "is not a valid Kafka topic name (at most 249 characters, not `.` or `..`)"
                        .to_owned()
                }
                TopicNameError::Char(c) => format!(
                    "`{topic}` holds `{c}`: Kafka topic names use only letters, digits, `.`, `_` and `-`"
                ),
                other => format!("`{topic}` is not a valid Kafka topic name: {other}"),
            },
        )
    })?;
    let mut target = KafkaTarget {
        bootstrap: hosts.to_owned(),
        topic: topic.to_owned(),
        client_id: None,
        compression: None,
    };
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "client_id" if !v.is_empty() => target.client_id = Some(v),
            "compression" => {
                target.compression = Some(match v.as_str() {
                    "none" => Compression::None,
                    "gzip" => Compression::Gzip,
                    "snappy" => Compression::Snappy,
                    "lz4" => Compression::Lz4,
                    _ => {
                        return Err(bad(
                            "query compression",
                            format!("`{v}` is not none, gzip, snappy or lz4"),
                        ))
                    }
                })
            }
            "client_id" => return Err(bad("query client_id", "is empty")),
            other => {
                return Err(bad(
                    "query",
                    format!("{} (kafka:// takes client_id and compression; other librdkafka properties go in --kafka-property)", herald::url::unknown_parameter(other)),
                ))
            }
        }
    }
    Ok(target)
}

/// The query's `key=value` pairs, percent-decoded (herald's one rule for every broker URL).
fn pairs(query: Option<&str>) -> Result<Vec<(String, String)>, UrlError> {
    herald::url::query_pairs(query).map_err(|e| bad(e.part, e.reason))
}

/// `amqp://` and `amqps://` URLs: herald-amqp's own parser (broker, vhost, connection
/// parameters and route), which names the bad part and never echoes a password.
fn parse_amqp(url: &str) -> Result<AmqpConfig, UrlError> {
    let config = AmqpConfig::from_url(url).map_err(|e| match e {
        ConfigError::Url { part, reason } => bad(part, reason),
        other => bad("url", other.to_string()),
    })?;
    if config.route().is_none() {
        return Err(bad(
            "query",
            "names no destination: add ?queue=NAME (the default exchange into that queue) or ?exchange=EX&routing_key=RK",
        ));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(url: &str) -> KafkaTarget {
        match Target::parse(url) {
            Ok(Target::Kafka(k)) => k,
            other => panic!("{url}: {other:?}"),
        }
    }

    fn amqp(url: &str) -> AmqpConfig {
        match Target::parse(url) {
            Ok(Target::Amqp(a)) => *a,
            other => panic!("{url}: {other:?}"),
        }
    }

    fn part(url: &str) -> &'static str {
        match Target::parse(url) {
            Err(e) => e.part,
            Ok(t) => panic!("{url}: expected an error, got {t:?}"),
        }
    }

    #[test]
    fn kafka_urls() {
        let k = kafka("kafka://127.0.0.1:9092/orders");
        assert_eq!(
            (k.bootstrap.as_str(), k.topic.as_str()),
            ("127.0.0.1:9092", "orders")
        );
        assert_eq!((k.client_id, k.compression), (None, None));
        let k = kafka("KAFKA://a:1,b:2,c:3/my.topic_1-x?client_id=cli&compression=gzip");
        assert_eq!(k.bootstrap, "a:1,b:2,c:3");
        assert_eq!(k.topic, "my.topic_1-x");
        assert_eq!(k.client_id.as_deref(), Some("cli"));
        assert_eq!(k.compression, Some(Compression::Gzip));
        assert_eq!(
            Target::parse("kafka://a:1/t").map(|t| t.describe()),
            Ok("kafka://a:1/t".to_owned())
        );
    }

    #[test]
    fn a_kafka_url_with_a_password_never_echoes_it() {
        for url in [
            "kafka://app:hun/ter?2@broker:9092/t",
            "kafka://app:s3cret@broker:9092/t",
            "kafka://app:se/cr?et@broker:9092/t?client_id=x",
        ] {
            let e = Target::parse(url).expect_err(url).to_string();
            assert!(e.contains("user information"), "{url}: {e}");
            for part in ["hun", "ter", "s3cret", "se/cr", "cr?et"] {
                assert!(!e.contains(part), "{url}: {e}");
            }
        }
    }

    #[test]
    fn kafka_errors_are_named() {
        assert_eq!(part("kafka://h:9092"), "topic");
        assert_eq!(part("kafka://h:9092/"), "topic");
        assert_eq!(part("kafka:///t"), "host");
        assert_eq!(part("kafka://h/t"), "host");
        assert_eq!(part("kafka://h:0/t"), "host");
        assert_eq!(part("kafka://h:1,g/t"), "host");
        assert_eq!(part("kafka://u:p@h:1/t"), "host");
        assert_eq!(part("kafka://u:p/w@h:1/t"), "host");
        let e = Target::parse("kafka://u:s3cr/et@h:1/t").expect_err("user information");
        assert!(!e.to_string().contains("s3cr"), "{e}");
        assert_eq!(part("kafka://h:1/a b"), "topic");
        assert_eq!(part("kafka://h:1/a/b"), "topic");
        assert_eq!(part("kafka://h:1/.."), "topic");
        assert_eq!(part("kafka://h:1/t?acks=1"), "query");
        assert_eq!(
            part("kafka://h:1/t?compression=brotli"),
            "query compression"
        );
        let e = Target::parse("kafka://h:9092").expect_err("no topic");
        assert!(e.to_string().contains("topic is missing"), "{e}");
    }

    #[test]
    fn scheme_errors_are_named() {
        assert_eq!(part("http://h:1/t"), "scheme");
        assert_eq!(part("h:1/t"), "scheme");
        let e = Target::parse("zmq://h:1/t").expect_err("scheme");
        assert!(
            e.to_string().contains(
                "`zmq` is not kafka, amqp, amqps, nats, tls, redis, rediss, mqtt or mqtts"
            ),
            "{e}"
        );
        // An MQTT URL: everything after the first `/` is the topic, which is required.
        match Target::parse("mqtt://app:hunter2@h:1883/plant/line-3/temperature?qos=2") {
            Ok(Target::Mqtt(m)) => {
                assert_eq!(m.topic(), Some("plant/line-3/temperature"));
                assert_eq!(
                    Target::Mqtt(m.clone()).destination().as_str(),
                    "plant/line-3/temperature"
                );
                assert!(!Target::Mqtt(m).describe().contains("hunter2"));
            }
            other => panic!("an MQTT target: {other:?}"),
        }
        assert_eq!(part("mqtt://h:1883"), "topic");
        assert_eq!(part("mqtts://h/plant/+/x"), "topic");
        assert_eq!(part("mqtt://h/t?qos=0"), "query qos");
        // A NATS URL is one now, and its subject is required.
        assert!(matches!(
            Target::parse("nats://h:4222/orders.eu"),
            Ok(Target::Nats(_))
        ));
        assert_eq!(part("nats://h:4222"), "subject");
        assert!(!Target::parse("nats://app:hunter2@h:4222/s")
            .expect("nats")
            .describe()
            .contains("hunter2"));
        // A Redis URL: a database before the stream key, which is required.
        match Target::parse("redis://app:hunter2@h:6379/2/orders:eu?maxlen=1000") {
            Ok(Target::Redis(r)) => {
                assert_eq!((r.stream(), r.database()), (Some("orders:eu"), 2));
                assert_eq!(Target::Redis(r.clone()).destination().as_str(), "orders:eu");
                assert_eq!(
                    Target::Redis(r).describe(),
                    "redis://app:***@h:6379/2/orders:eu?maxlen=1000"
                );
            }
            other => panic!("a Redis target: {other:?}"),
        }
        assert_eq!(part("redis://h:6379"), "stream key");
        assert_eq!(part("rediss://h/2/"), "stream key");
        assert_eq!(part("redis://h/s?maxlen=0"), "query maxlen");
    }

    #[test]
    fn amqp_queue_urls() {
        let t = Target::parse("amqp://guest:guest@127.0.0.1:5672/%2f?queue=orders").expect("ok");
        assert_eq!(t.destination().as_str(), "orders");
        assert_eq!(
            t.describe(),
            "amqp://guest:***@127.0.0.1:5672/%2F?queue=orders"
        );
        let a = amqp("amqp://guest:guest@127.0.0.1:5672/%2f?queue=orders");
        assert_eq!(
            a.route(),
            Some(&Route::Queue {
                name: "orders".into(),
                declare: true,
                quorum: false
            })
        );
        // The queue is declared when the transport connects.
        assert!(format!("{a:?}").contains("Queue"));
        let a = amqp("amqps://u:p@h:5671/prod%2fv?queue=a%20b&queue_type=quorum&heartbeat=10");
        assert_eq!(
            a.route(),
            Some(&Route::Queue {
                name: "a b".into(),
                declare: true,
                quorum: true
            })
        );
        assert_eq!(
            a.redacted_url(),
            "amqps://u:***@h:5671/prod%2Fv?queue=a%20b"
        );
        let a = amqp("amqp://h/?queue=q&declare=false");
        assert!(matches!(
            a.route(),
            Some(Route::Queue { declare: false, .. })
        ));
        assert!(!format!("{a:?}").contains("Queue {"));
    }

    #[test]
    fn amqp_exchange_urls() {
        let t = Target::parse("amqp://u:p@h:5672/%2F?exchange=events&routing_key=order.created")
            .expect("ok");
        assert_eq!(t.destination().as_str(), "events/order.created");
        let t = Target::parse("amqp://u:p@h/%2F?exchange=fan").expect("ok");
        assert_eq!(t.destination().as_str(), "fan/");
        assert_eq!(
            Target::parse("amqp://u:p@h/%2F?exchange=e&routing_key=r k")
                .expect("ok")
                .describe(),
            "amqp://u:***@h:5672/%2F?exchange=e&routing_key=r%20k"
        );
    }

    #[test]
    fn amqp_errors_are_named() {
        // The command's own rule: a destination is required.
        assert_eq!(part("amqp://u:p@h/%2f"), "query");
        // herald-amqp's parser names the rest (its tests cover each).
        assert_eq!(part("amqp://u:p@h/%2f?queue=a&exchange=b"), "query");
        assert_eq!(part("amqp://u:p@h/%2f?queue="), "query queue");
        assert_eq!(
            part("amqp://u:p@h/%2f?queue=a&routing_key=b"),
            "query routing_key"
        );
        assert_eq!(part("amqp://u:p@h:notaport/%2f?queue=a"), "port");
        assert_eq!(part("amqp://u:p@h/a/b?queue=a"), "vhost");
        let e = Target::parse("amqp://u:p@h:x/?queue=a").expect_err("port");
        assert!(e.to_string().contains("port"), "{e}");
    }

    #[test]
    fn the_password_never_shows() {
        let secret = "hunter2-s3cret";
        for url in [
            format!("amqp://app:{secret}@h:5672/%2F?queue=q"),
            format!("amqps://app:{secret}@h/%2F?exchange=e&routing_key=k"),
        ] {
            let t = Target::parse(&url).expect("valid");
            for text in [format!("{t:?}"), t.to_string(), t.describe()] {
                assert!(!text.contains(secret), "{text}");
            }
        }
        // A password holding `?`, `/` and `@`: the query is found after the user information.
        let t = amqp("amqp://app:se?cr/et@x@h:5672/%2F?queue=q");
        assert_eq!(t.redacted_url(), "amqp://app:***@h:5672/%2F?queue=q");
        // Errors next to the password never echo it.
        for url in [
            format!("amqp://app:{secret}@h:port/%2F?queue=q"),
            format!("amqp://app:{secret}@h/%2F"),
            format!("amqp://app:{secret}@h/%2F?queue=a&exchange=b"),
            format!("amqp://app:{secret}@h/a/b?queue=q"),
            format!("amqp://app:{secret}%zz@h/?queue=q"),
            format!("amqp://app:{secret}@h/?queue=q&nope=1"),
            format!("amqp://app:{secret}@h/?queue=q&heartbeat=x"),
        ] {
            let e = Target::parse(&url).expect_err(&url);
            assert!(!e.to_string().contains(secret), "{url}: {e}");
            assert!(!format!("{e:?}").contains(secret), "{url}: {e:?}");
        }
    }

    #[test]
    fn address_lists_and_their_order_option_reach_the_amqp_settings() {
        let a = amqp("amqp://u:p@h1:5672,h2:5673/%2f?queue=q&shuffle_addresses=true");
        let shown = a.redacted_url();
        assert!(shown.contains("h1:5672,h2:5673"), "{shown}");
        assert!(format!("{a:?}").contains("shuffle_addresses: true"));
        let e = Target::parse("amqp://u:p@h1,h1/%2f?queue=q").expect_err("a node twice");
        assert!(e.to_string().contains("twice"), "{e}");
        let e =
            Target::parse("amqp://h/%2f?queue=q&shuffle_addresses=maybe").expect_err("bad value");
        assert!(e.to_string().contains("shuffle_addresses"), "{e}");
    }
}
