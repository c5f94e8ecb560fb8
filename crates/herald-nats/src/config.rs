//! Settings: a `nats://` / `tls://` URL plus typed options, checked when the transport is built.

use std::path::PathBuf;
use std::time::Duration;

use herald_core::Destination;

use herald_core::tls::ClientCert;

use crate::auth::KeyFile;
use crate::error::ConfigError;
use crate::topology::Declare;
use crate::url::Url;

/// The longest timeout or backoff accepted (longer ones could overflow `Instant + Duration`).
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The most unacknowledged messages one batch may have.
const MAX_WINDOW: usize = 1 << 20;

/// Everything a [`crate::NatsTransport`] needs: where the servers are, where to publish, and
/// how.
///
/// Made from a URL with [`NatsConfig::from_url`], then adjusted with the typed setters. The
/// password or token is never shown: `Debug` prints `nats://user:***@host:port/subject`.
///
/// ```
/// use std::time::Duration;
/// use herald_nats::NatsConfig;
/// let config = NatsConfig::from_url("nats://app:s3cret@nats-1:4222,nats-2:4222/orders.eu?stream=ORDERS")?
///     .ack_timeout(Duration::from_secs(10))
///     .window(2048);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert_eq!(config.subject(), Some("orders.eu"));
/// assert_eq!(config.stream(), Some("ORDERS"));
/// # Ok::<(), herald_nats::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct NatsConfig {
    pub(crate) url: Url,
    pub(crate) ack_timeout: Duration,
    pub(crate) window: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) key_header: Option<String>,
    pub(crate) connection_name: String,
    pub(crate) metrics_name: Option<String>,
    pub(crate) topology: Vec<Declare>,
    pub(crate) shuffle_addresses: bool,
}

impl NatsConfig {
    /// Settings for the servers of `url`:
    /// `nats://[user:password@]host[:port][,host[:port]...][/SUBJECT][?stream=NAME]`, `tls://`
    /// for TLS, a token as `nats://TOKEN@host`; the port defaults to 4222. User, password, token,
    /// subject and stream name are percent-decoded.
    ///
    /// The subject, when given, is where the URL's messages go ([`NatsConfig::destination`]):
    /// the `herald` command sends there. `?stream=NAME` declares a stream `NAME` capturing that
    /// subject, created with file storage if it does not exist, on every new connection (see
    /// [`Declare::Stream`]).
    ///
    /// `?creds=PATH` or `?nkey=PATH` authenticate with a `.creds` file or an NKey seed (see
    /// [`NatsConfig::credentials_file`]); `?tlsca=PATH` and `?tlscert=PATH&tlskey=PATH` are
    /// [`NatsConfig::tls_ca_file`] and [`NatsConfig::tls_client_cert`].
    ///
    /// A malformed URL is an error naming the part (`scheme`, `user information`, `user`,
    /// `password`, `token`, `host`, `port`, `subject`, `query …`); the password or token itself
    /// never appears in it.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(url)?;
        let mut topology = Vec::new();
        if let (Some(stream), Some(subject)) = (&url.stream, &url.subject) {
            topology.push(Declare::stream(stream.clone(), [subject.clone()]));
        }
        Ok(Self {
            ack_timeout: Duration::from_secs(30),
            window: 4096,
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            key_header: Some("x-herald-key".into()),
            connection_name: "herald".into(),
            metrics_name: None,
            topology,
            shuffle_addresses: false,
            url,
        })
    }

    /// Replaces the servers to connect to with `addresses` (`host[:port]` each, an IPv6 address
    /// in brackets, the port 4222 by default), keeping the URL's credentials, subject and
    /// stream. The same as listing them in the URL: `nats://h1:4222,h2:4222,h3:4222/subject`.
    ///
    /// The transport connects to the first server that answers, trying them in order (or
    /// shuffled, see [`NatsConfig::shuffle_addresses`]), each attempt bounded by the connect
    /// timeout; when the connection is lost it goes on to the next server. An empty list, a bad
    /// entry (named by its position) or a server given twice is an error.
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
                reason: "list is empty".into(),
            });
        }
        self.url.endpoints =
            herald_core::url::parse_endpoints(&list.join(","), crate::url::DEFAULT_PORT, "server")?;
        Ok(self)
    }

    /// Tries the servers in a random order (chosen once, when the transport is made) instead of
    /// the order given, so that many producers with the same list spread over the servers.
    /// Default: false (the first server is preferred).
    #[must_use]
    pub fn shuffle_addresses(mut self, on: bool) -> Self {
        self.shuffle_addresses = on;
        self
    }

    /// How long one batch may take, from its first publish to its last PubAck: one deadline
    /// for the whole batch, not one per message. Messages without a PubAck by then fail as
    /// transient `TIMEOUT` (retried; JetStream drops the copy it may already hold by its
    /// `Nats-Msg-Id`), and the connection is given up for a new one. At most 24 hours.
    /// Default: 30 s.
    #[must_use]
    pub fn ack_timeout(mut self, t: Duration) -> Self {
        self.ack_timeout = t;
        self
    }

    /// Most messages of one batch published and not yet acknowledged: the batch is published
    /// without waiting per message, and past this many the oldest PubAck is awaited before the
    /// next publish. Between 1 and 1 048 576. Default: 4096.
    #[must_use]
    pub fn window(mut self, n: usize) -> Self {
        self.window = n;
        self
    }

    /// Limit for one connection attempt (TCP, TLS, the NATS handshake, the stream
    /// declarations). At most 24 hours. Default: 10 s.
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

    /// The NATS header that carries a message's herald key (NATS messages have no key of
    /// their own), or `None` not to send it. Default: `x-herald-key`, as herald-amqp.
    #[must_use]
    pub fn key_header(mut self, name: Option<String>) -> Self {
        self.key_header = name;
        self
    }

    /// The client name the server shows for the connection (`nats server report
    /// connections`, `/connz`). Default: `herald`.
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Names the transport in its metrics: every `herald_nats_*` metric carries the label
    /// `producer` with this name (besides `transport="nats"`), so that several transports in
    /// one process keep separate series. Give it the name of the producer that uses the
    /// transport ([`ProducerBuilder::name`](herald_core::ProducerBuilder::name)). Up to 64
    /// ASCII letters, digits, `_`, `-` or `.` (checked by
    /// [`NatsTransport::new`](crate::NatsTransport::new)). Default: no name and no `producer`
    /// label.
    #[must_use]
    pub fn metrics_name(mut self, name: impl Into<String>) -> Self {
        self.metrics_name = Some(name.into());
        self
    }

    /// Topology to declare on every new connection (the URL's `?stream=` adds one).
    #[must_use]
    pub fn declare(mut self, item: Declare) -> Self {
        self.topology.push(item);
        self
    }

    /// Trusts the CA certificates in this PEM file for TLS (`tls://`, or a server that asks
    /// for TLS), besides the system's roots. The URL's `?tlsca=PATH` sets the same.
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.url.tls_files.set_ca_file(path.into());
        self
    }

    /// Presents this client certificate (PEM: `cert_file` the chain, leaf first; `key_file` its
    /// private key) when the server asks for one (mutual TLS: `verify: true` in the server's
    /// `tls` block). The URL's `?tlscert=PATH&tlskey=PATH` set the same. Both files are read
    /// when the transport is built, and a problem with either is an error naming the file.
    #[must_use]
    pub fn tls_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.url.tls_files.set_client_cert(ClientCert {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        });
        self
    }

    /// Authenticates with this `.creds` file (a user JWT and its NKey seed: decentralised JWT
    /// authentication, as `nsc` and Synadia Cloud make them), instead of a user, password or
    /// token. The URL's `?creds=PATH` sets the same. The file is read when the transport is
    /// built (an error names it, never its contents) and again for every new connection, so
    /// that a rotated file is used without a restart.
    #[must_use]
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.url.key_file = Some(KeyFile::Creds(path.into()));
        self
    }

    /// Authenticates with the NKey seed in this file (`SU…`, alone or in an `nsc`-style
    /// block): a server whose `authorization` lists the user's public key (`nkey: U…`). The
    /// URL's `?nkey=PATH` sets the same; read as [`NatsConfig::credentials_file`] is.
    #[must_use]
    pub fn nkey_seed_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.url.key_file = Some(KeyFile::Nkey(path.into()));
        self
    }

    /// The URL's subject: where [`NatsConfig::destination`] sends.
    pub fn subject(&self) -> Option<&str> {
        self.url.subject.as_deref()
    }

    /// The destination of the URL's subject, if it has one.
    pub fn destination(&self) -> Option<Destination> {
        self.url.subject.as_deref().map(crate::subject)
    }

    /// The URL's `?stream=`: the stream declared for its subject.
    pub fn stream(&self) -> Option<&str> {
        self.url.stream.as_deref()
    }

    /// The URL with the password or token masked, safe to log:
    /// `nats://user:***@host:port[,host:port...][/subject][?stream=NAME]`, with the files the
    /// config names (`creds`, `nkey`, `tlsca`, `tlscert`, `tlskey`: paths, never contents),
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
        if self.window == 0 || self.window > MAX_WINDOW {
            return invalid("window", "must be between 1 and 1048576");
        }
        if self.ack_timeout.is_zero() {
            return invalid("ack_timeout", "must be more than zero");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be more than zero");
        }
        // `Instant + Duration` panics on overflow: keep every timer to something sane.
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
        if let Some(name) = &self.metrics_name {
            if let Err(reason) = herald_core::metrics::check_producer_label(name) {
                return invalid("metrics_name", &reason);
            }
        }
        if let Some(name) = &self.key_header {
            if name.is_empty() || name.parse::<async_nats::HeaderName>().is_err() {
                return invalid(
                    "key_header",
                    "is not a NATS header name (printable ASCII, no `:` or whitespace)",
                );
            }
        }
        if self.connection_name.contains(['\r', '\n']) {
            return invalid("connection_name", "must be one line");
        }
        for item in &self.topology {
            if let Err(reason) = item.check() {
                return invalid("declare", &reason);
            }
        }
        if let Some(file) = &self.url.key_file {
            if self.url.credentials != crate::url::Credentials::None {
                return invalid(
                    file.setting(),
                    "cannot go with a user, password or token in the URL: choose one way to authenticate",
                );
            }
            if let Err(reason) = file.load() {
                return invalid(file.setting(), &reason);
            }
        }
        // A `nats://` server may ask for TLS: its files are not refused there.
        if let Err((field, reason)) =
            self.url
                .tls_files
                .check(self.url.tls, None, "NatsConfig::tls_ca_file", None)
        {
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
        let c = NatsConfig::from_url("nats://h/orders?stream=ORDERS").expect("valid");
        assert!(c.clone().validate().is_ok());
        assert!(c.clone().metrics_name("billing-eu.1").validate().is_ok());
        for (bad, field) in [
            (c.clone().window(0), "window"),
            (c.clone().window(MAX_WINDOW + 1), "window"),
            (c.clone().ack_timeout(Duration::ZERO), "ack_timeout"),
            (c.clone().ack_timeout(Duration::MAX), "ack_timeout"),
            (c.clone().connect_timeout(Duration::ZERO), "connect_timeout"),
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
            (c.clone().key_header(Some("a key".into())), "key_header"),
            (c.clone().key_header(Some("a:b".into())), "key_header"),
            (c.clone().key_header(Some(String::new())), "key_header"),
            (c.clone().connection_name("a\nb"), "connection_name"),
            (c.clone().declare(Declare::stream("a.b", ["x"])), "declare"),
        ] {
            match bad.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_url_s_stream_is_declared_for_its_subject() {
        let c = NatsConfig::from_url("nats://h/orders.eu?stream=ORDERS").expect("valid");
        assert_eq!(c.topology, vec![Declare::stream("ORDERS", ["orders.eu"])]);
        assert_eq!(c.destination(), Some(crate::subject("orders.eu")));
        let plain = NatsConfig::from_url("nats://h").expect("valid");
        assert!(plain.topology.is_empty() && plain.destination().is_none());
    }

    #[test]
    fn files_named_by_setters_show_in_the_printout() {
        let c = NatsConfig::from_url("tls://h/s?tlscert=/a.pem&tlskey=/a.key")
            .expect("url")
            .tls_client_cert("/b.pem", "/b.key")
            .tls_ca_file("/ca.pem")
            .credentials_file("/u.creds");
        assert_eq!(
            c.redacted_url(),
            "tls://h:4222/s?creds=/u.creds&tlsca=/ca.pem&tlscert=/b.pem&tlskey=/b.key"
        );
        let c = c.nkey_seed_file("/u.nk");
        assert!(
            c.redacted_url().contains("?nkey=/u.nk&"),
            "{}",
            c.redacted_url()
        );
    }

    #[test]
    fn addresses_replace_the_url_s_servers() {
        let c = NatsConfig::from_url("nats://app:pw@h/orders")
            .expect("valid")
            .addresses(["n1", "n2:4333", "[::1]"])
            .expect("valid list");
        assert_eq!(
            c.redacted_url(),
            "nats://app:***@n1:4222,n2:4333,[::1]:4222/orders"
        );
        assert!(c.clone().addresses(Vec::<String>::new()).is_err());
        assert!(c.addresses(["a", "a:4222"]).is_err());
    }
}
