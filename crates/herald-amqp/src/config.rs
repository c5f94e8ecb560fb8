//! Settings: an `amqp://` / `amqps://` URL plus typed options, checked when the transport is built.

use std::time::Duration;

use crate::error::ConfigError;
use crate::topology::Declare;
use crate::url::Route;
use crate::url::Url;

/// The longest timeout or backoff accepted (longer ones could overflow `Instant + Duration`).
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The header that carries each message's herald key unless the config names another
/// ([`AmqpConfig::key_header`]).
pub const DEFAULT_KEY_HEADER: &str = "x-herald-key";

/// Everything an [`crate::AmqpTransport`] needs: where the broker is and how to publish.
///
/// Made from a URL with [`AmqpConfig::from_url`], then adjusted with the typed setters. The
/// password is never shown: `Debug` prints `amqp://user:***@host:port/vhost`.
///
/// ```
/// use std::time::Duration;
/// use herald_amqp::AmqpConfig;
/// let config = AmqpConfig::from_url("amqp://app:s3cret@rabbit.internal:5672/%2Fprod")?
///     .channels(8)
///     .window(512)
///     .confirm_timeout(Duration::from_secs(30));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), herald_amqp::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    pub(crate) url: Url,
    pub(crate) channels: usize,
    pub(crate) window: usize,
    pub(crate) persistent: bool,
    pub(crate) mandatory: bool,
    pub(crate) confirm_timeout: Duration,
    pub(crate) blocked_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) tls_ca_pem: Option<String>,
    pub(crate) key_header: Option<String>,
    pub(crate) message_id_header: Option<String>,
    pub(crate) connection_name: String,
    pub(crate) metrics_name: Option<String>,
    pub(crate) topology: Vec<Declare>,
    pub(crate) shuffle_addresses: bool,
}

impl AmqpConfig {
    /// Settings for the broker at `url` (`amqp://` or `amqps://`, vhost percent-encoded:
    /// `amqp://user:pass@host:5672/%2F` is the vhost `/`; no path means `/` too). Query
    /// parameters: `heartbeat` (s), `connection_timeout` (ms), `channel_max`, `frame_max`,
    /// `shuffle_addresses` (see [`AmqpConfig::shuffle_addresses`]), and optionally where to
    /// publish ([`AmqpConfig::route`]): `queue=NAME` (declared durable at connect unless
    /// `declare=false`; `queue_type=quorum` for a quorum queue) or
    /// `exchange=EX&routing_key=RK` (the exchange must exist); `key_header=NAME`, or
    /// `key_header=` for none (see [`AmqpConfig::key_header`]).
    ///
    /// ```
    /// use herald_amqp::{AmqpConfig, Route};
    /// let config = AmqpConfig::from_url("amqp://app:s3cret@rabbit/%2F?queue=orders&queue_type=quorum")?;
    /// assert_eq!(
    ///     config.route(),
    ///     Some(&Route::Queue { name: "orders".into(), declare: true, quorum: true })
    /// );
    /// assert_eq!(config.route().map(Route::destination), Some(herald_amqp::queue("orders")));
    /// assert_eq!(config.redacted_url(), "amqp://app:***@rabbit:5672/%2F?queue=orders");
    /// # Ok::<(), herald_amqp::ConfigError>(())
    /// ```
    ///
    /// A password may hold an unencoded `/`, `?` or `@`; an `@` in the vhost or a query value
    /// must be written `%40`. A URL with more than one `@` that could end the user information
    /// and start the host (`amqp://u:p@rabbit/%2f?x=billing@eu`: host `rabbit`, or host `eu`
    /// with the password `p@rabbit/%2f?x=billing`?) is refused as ambiguous (part
    /// `user information`), never guessed.
    ///
    /// A malformed URL is an error naming the part (`scheme`, `user`, `password`, `host`, `port`,
    /// `vhost`, `query …`); the password itself never appears in it.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(url)?;
        let key_header = url
            .key_header
            .clone()
            .unwrap_or_else(|| Some(DEFAULT_KEY_HEADER.into()));
        let mut topology = Vec::new();
        if let Some(Route::Queue {
            name,
            declare: true,
            quorum,
        }) = &url.route
        {
            topology.push(Declare::Queue {
                name: name.clone(),
                quorum: *quorum,
            });
        }
        Ok(Self {
            shuffle_addresses: url.shuffle_addresses,
            url,
            channels: 8,
            window: 512,
            persistent: true,
            mandatory: true,
            confirm_timeout: Duration::from_secs(30),
            blocked_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            tls_ca_pem: None,
            key_header,
            message_id_header: Some("message-id".into()),
            connection_name: "herald".into(),
            metrics_name: None,
            topology,
        })
    }

    /// Replaces the brokers to connect to with `addresses` (`host[:port]` each, an IPv6 address
    /// in brackets; the port defaults to 5672, 5671 for `amqps`), keeping the URL's
    /// credentials, vhost and options. The same as listing them in the URL:
    /// `amqp://user:pass@host1:5672,host2:5672,host3:5672/vhost`.
    ///
    /// The transport connects to the first address that answers, trying them in order (or
    /// shuffled, see [`AmqpConfig::shuffle_addresses`]), each attempt bounded by the connect
    /// timeout; when the connection is lost (or its confirms stop coming within the confirm
    /// timeout) it goes on to the next address, and declares its topology again there. A
    /// RabbitMQ cluster takes connections on every node; use quorum queues
    /// (`Declare::Queue { quorum: true, .. }`), which live on several nodes, for messages to
    /// survive a node.
    ///
    /// An empty list, a bad entry (named by its position) or an address given twice is an
    /// error.
    ///
    /// ```
    /// use herald_amqp::AmqpConfig;
    /// let config = AmqpConfig::from_url("amqp://app:s3cret@rabbit-1/%2F")?
    ///     .addresses(["rabbit-1:5672", "rabbit-2:5672", "rabbit-3:5672"])?;
    /// assert!(config.redacted_url().contains("rabbit-1:5672,rabbit-2:5672,rabbit-3:5672"));
    /// assert!(AmqpConfig::from_url("amqp://h")?.addresses(["a", "a:5672"]).is_err());
    /// # Ok::<(), herald_amqp::ConfigError>(())
    /// ```
    pub fn addresses<S: AsRef<str>>(
        mut self,
        addresses: impl IntoIterator<Item = S>,
    ) -> Result<Self, ConfigError> {
        let list: Vec<String> = addresses
            .into_iter()
            .map(|a| a.as_ref().to_owned())
            .collect();
        if list.is_empty() {
            return Err(ConfigError::Url {
                part: "host",
                reason: "the address list is empty".into(),
            });
        }
        let default_port = if self.url.tls { 5671 } else { 5672 };
        self.url.endpoints =
            herald_core::url::parse_endpoints(&list.join(","), default_port, "address")?;
        Ok(self)
    }

    /// Tries the addresses in a random order (chosen once, when the transport is made) instead
    /// of the order given, so that many producers with the same list spread over the nodes.
    /// Default: false (the first address is preferred).
    #[must_use]
    pub fn shuffle_addresses(mut self, on: bool) -> Self {
        self.shuffle_addresses = on;
        self
    }

    /// Channels per connection, each with its own confirm window. A message's key picks its
    /// channel (same key, same channel: per-key order); messages without a key share one
    /// channel per destination. Default: 8.
    #[must_use]
    pub fn channels(mut self, n: usize) -> Self {
        self.channels = n;
        self
    }

    /// Most unconfirmed messages per channel within one batch (streaming confirms: publishing
    /// goes on while earlier confirms are awaited). Default: 512.
    #[must_use]
    pub fn window(mut self, n: usize) -> Self {
        self.window = n;
        self
    }

    /// `delivery_mode = 2`: a durable queue writes the message to disk before the broker
    /// confirms it. Default: true.
    ///
    /// **`false` weakens what delivered means**: the message is then transient, the broker
    /// confirms it once it is in memory (before any disk write, even on a durable queue), and a
    /// broker restart or crash loses it although herald reported it delivered. Only for
    /// messages that may be lost.
    #[must_use]
    pub fn persistent(mut self, on: bool) -> Self {
        self.persistent = on;
        self
    }

    /// `mandatory`: a message no queue takes comes back as a permanent `NO_ROUTE` error instead
    /// of vanishing. Default: true.
    ///
    /// **`false` weakens what delivered means**: the broker then drops a message that no queue
    /// takes (a missing binding, a wrong routing key, a queue not declared yet) and confirms
    /// it, so herald reports it delivered although nobody will ever read it. Only for
    /// destinations where an unrouted message is meant to be dropped.
    #[must_use]
    pub fn mandatory(mut self, on: bool) -> Self {
        self.mandatory = on;
        self
    }

    /// How long one batch may take, from its first publish to its last publisher confirm: one
    /// deadline for the whole batch, not one per message. Messages not confirmed by then are
    /// transient failures, code `CONFIRM_TIMEOUT` (retried: possible duplicates); publishes that
    /// could not even be written by then (a connection blocked mid-batch) fail as
    /// `CONNECTION_BLOCKED`. At most 24 hours. Default: 30 s.
    #[must_use]
    pub fn confirm_timeout(mut self, t: Duration) -> Self {
        self.confirm_timeout = t;
        self
    }

    /// How long a batch waits while the broker has blocked the connection (`connection.blocked`,
    /// a memory or disk alarm) before it fails transiently and goes back to herald's retry
    /// queue. At most 24 hours. Default: 30 s.
    #[must_use]
    pub fn blocked_timeout(mut self, t: Duration) -> Self {
        self.blocked_timeout = t;
        self
    }

    /// Limit for one connection attempt (TCP, TLS, AMQP handshake, topology declaration). At
    /// most 24 hours. Default: 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Backoff between reconnection attempts after a failed one: from `min`, doubling, up to
    /// `max` (at most 24 hours). Default: 100 ms to 5 s. The same pauses space the attempts of a
    /// channel's first publish that the broker nacks (a quorum queue electing a leader), within
    /// the first half of the batch's [`confirm_timeout`](Self::confirm_timeout).
    #[must_use]
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Trusts this CA (PEM) for `amqps://`, besides the system's roots.
    #[must_use]
    pub fn tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Trusts the CA certificates in this PEM file for `amqps://`, besides the system's roots
    /// (and [`AmqpConfig::tls_ca_pem`]'s). The URL's `?cacertfile=PATH` sets the same. Read
    /// for every new connection.
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.url.tls_files.set_ca_file(path.into());
        self
    }

    /// Presents this client certificate (PEM: `cert_file` the chain, leaf first; `key_file` its
    /// private key) to an `amqps://` broker that asks for one (mutual TLS: RabbitMQ's
    /// `ssl_options.verify = verify_peer`, with `fail_if_no_peer_cert = true` to require one).
    /// The URL's `?certfile=PATH&keyfile=PATH` set the same, as in RabbitMQ's own URIs. Both
    /// files are checked when the transport is built (an error names the file) and read for
    /// every new connection.
    #[must_use]
    pub fn tls_client_cert(
        mut self,
        cert_file: impl Into<std::path::PathBuf>,
        key_file: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.url
            .tls_files
            .set_client_cert(herald_core::tls::ClientCert {
                cert_file: cert_file.into(),
                key_file: key_file.into(),
            });
        self
    }

    /// The AMQP header that carries a message's herald key (AMQP has no key of its own), or
    /// `None` not to send it (the key then serves herald's per-key ordering only). Default:
    /// `x-herald-key`; in the URL, `?key_header=NAME`, or `?key_header=` for none.
    ///
    /// The header is not free: RabbitMQ parses and stores a headers table with each message.
    /// Measured against a node on the same two-core machine (`cargo xtask bench amqp`,
    /// persistent messages, docs/benchmarks.md): raw lapin's messages went 14-16 % slower with
    /// herald's `message_id` and key header than bare, about 4 % slower with the `message_id`
    /// alone; herald with `key_header(None)` ran 14-34 % faster than with the header.
    #[must_use]
    pub fn key_header(mut self, name: Option<String>) -> Self {
        self.key_header = name;
        self
    }

    /// The header that carries messages' keys, if any (see [`AmqpConfig::key_header`]).
    pub fn key_header_name(&self) -> Option<&str> {
        self.key_header.as_deref()
    }

    /// A message header whose value becomes the AMQP `message_id` property (for consumers to
    /// deduplicate); a message without it gets an id derived from its content. `None`: always
    /// derive. Default: `message-id`.
    #[must_use]
    pub fn message_id_header(mut self, name: Option<String>) -> Self {
        self.message_id_header = name;
        self
    }

    /// The `connection_name` client property shown in the management UI. Default: `herald`.
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Names the transport in its metrics: every `herald_amqp_*` metric carries the label
    /// `producer` with this name (besides `transport="amqp"`), so that several transports in
    /// one process keep separate series. Give it the name of the producer that uses the
    /// transport ([`ProducerBuilder::name`](herald_core::ProducerBuilder::name)): the same
    /// label key and value then join herald's and the adapter's series. Up to 64 ASCII letters,
    /// digits, `_`, `-` or `.` (checked by [`AmqpTransport::new`](crate::AmqpTransport::new)).
    /// Default: no name and no `producer` label.
    #[must_use]
    pub fn metrics_name(mut self, name: impl Into<String>) -> Self {
        self.metrics_name = Some(name.into());
        self
    }

    /// Topology to declare at connect and after every reconnect.
    #[must_use]
    pub fn declare(mut self, item: Declare) -> Self {
        self.topology.push(item);
        self
    }

    /// Where the URL said to publish (`?queue=...` or `?exchange=...`), if it said.
    pub fn route(&self) -> Option<&Route> {
        self.url.route.as_ref()
    }

    /// The broker address (and the URL's route, if any) with the password masked, safe to log,
    /// with the TLS files the config names (`cacertfile`, `certfile`, `keyfile`: paths),
    /// whether the URL or a setter named them.
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
        if self.channels == 0 || self.channels > 1024 {
            return invalid("channels", "must be between 1 and 1024");
        }
        if self.window == 0 {
            return invalid("window", "must be at least 1");
        }
        if self.confirm_timeout.is_zero() {
            return invalid("confirm_timeout", "must be more than zero");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be more than zero");
        }
        // `Instant + Duration` panics on overflow: keep every timer to something sane.
        for (field, d) in [
            ("confirm_timeout", self.confirm_timeout),
            ("blocked_timeout", self.blocked_timeout),
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
        if let Some(name) = &self.metrics_name {
            if let Err(reason) = herald_core::metrics::check_producer_label(name) {
                return invalid("metrics_name", &reason);
            }
        }
        // A field table's key is a short string; an empty name is no header (`None` says so).
        if let Some(name) = &self.key_header {
            if name.is_empty() || !crate::name_fits(name) {
                return invalid(
                    "key_header",
                    &format!(
                        "must be 1 to {} bytes (None sends no key header)",
                        crate::MAX_NAME_BYTES
                    ),
                );
            }
        }
        if self.url.tls
            && self
                .tls_ca_pem
                .as_deref()
                .is_some_and(|p| !p.contains("-----BEGIN"))
        {
            return invalid("tls_ca_pem", "is not PEM (no `-----BEGIN` line)");
        }
        // Read and checked here, for an error that names the file.
        if let Err((field, reason)) = self.url.tls_files.check(
            self.url.tls,
            Some("is for amqps:// URLs only (`?cacertfile=`, `?certfile=` and `?keyfile=` too)"),
            "AmqpConfig::tls_ca_file (or tls_ca_pem)",
            self.tls_ca_pem.as_deref(),
        ) {
            return invalid(field, &reason);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let c = AmqpConfig::from_url("amqp://h").expect("valid");
        assert!(c.clone().validate().is_ok());
        assert!(c.clone().metrics_name("billing-eu.1").validate().is_ok());
        assert!(c.clone().key_header(None).validate().is_ok());
        for (bad, field) in [
            (c.clone().channels(0), "channels"),
            (c.clone().window(0), "window"),
            (c.clone().confirm_timeout(Duration::ZERO), "confirm_timeout"),
            (c.clone().confirm_timeout(Duration::MAX), "confirm_timeout"),
            (c.clone().blocked_timeout(Duration::MAX), "blocked_timeout"),
            (c.clone().connect_timeout(Duration::MAX), "connect_timeout"),
            (
                c.clone()
                    .reconnect_backoff(Duration::from_secs(1), Duration::MAX),
                "reconnect_backoff",
            ),
            (
                c.clone()
                    .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1)),
                "reconnect_backoff",
            ),
            (c.clone().metrics_name(""), "metrics_name"),
            (c.clone().metrics_name("a b"), "metrics_name"),
            (c.clone().metrics_name("x".repeat(65)), "metrics_name"),
            (c.clone().key_header(Some(String::new())), "key_header"),
            (c.clone().key_header(Some("k".repeat(256))), "key_header"),
        ] {
            match bad.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
