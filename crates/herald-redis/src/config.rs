//! Settings: a `redis://` / `rediss://` URL plus typed options, checked when the transport is
//! built.

use std::path::PathBuf;
use std::time::Duration;

use herald_core::Destination;

use crate::error::ConfigError;
use crate::url::{Url, DEFAULT_WAIT_TIMEOUT};

/// The longest timeout or backoff accepted (longer ones could overflow `Instant + Duration`).
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest message size that can be allowed: Redis's default `proto-max-bulk-len`, the most
/// one bulk string (the payload) may hold.
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 512 << 20;

/// The default largest message, 1 MiB: see [`RedisConfig::max_message_bytes`].
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Everything a [`crate::RedisTransport`] needs: where the server is, which stream to append
/// to, and how.
///
/// Made from a URL with [`RedisConfig::from_url`], then adjusted with the typed setters. The
/// password is never shown: `Debug` prints `redis://user:***@host:port/stream`.
///
/// ```
/// use std::time::Duration;
/// use herald_redis::RedisConfig;
/// let config = RedisConfig::from_url("redis://app:s3cret@cache-1:6379/2/orders?maxlen=100000")?
///     .ack_timeout(Duration::from_secs(10));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert_eq!(config.stream(), Some("orders"));
/// assert_eq!(config.maxlen_value(), Some(100_000));
/// # Ok::<(), herald_redis::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub(crate) url: Url,
    pub(crate) ack_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) max_message_bytes: usize,
    pub(crate) maxlen: Option<u64>,
    pub(crate) wait: Option<(u32, Duration)>,
    pub(crate) metrics_name: Option<String>,
}

impl RedisConfig {
    /// Settings for the server of `url`:
    /// `redis://[user:password@]host[:port][/DB][/STREAMKEY][?maxlen=N&wait=N&wait_timeout_ms=MS]`,
    /// `rediss://` for TLS, a password alone as `redis://:PASSWORD@host`; the port defaults to
    /// 6379 and the database to 0. User, password and stream key are percent-decoded. A first
    /// path segment of digits followed by more is the database (`/2/orders`); a stream key
    /// alone may be all digits (`/42`).
    ///
    /// The stream key, when given, is where the URL's messages go
    /// ([`RedisConfig::destination`]): the `herald` command sends there. `?maxlen=N` trims
    /// every stream written to, approximately, to about its `N` newest entries (see
    /// [`RedisConfig::maxlen`]); `?wait=N` waits for `N` replicas (see [`RedisConfig::wait`]).
    ///
    /// A malformed URL is an error naming the part (`scheme`, `user information`, `user`,
    /// `password`, `host`, `port`, `database`, `stream key`, `query …`); the password itself
    /// never appears in it.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(url)?;
        let maxlen = url.maxlen;
        let wait = url
            .wait
            .map(|n| (n, url.wait_timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT)));
        Ok(Self {
            ack_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            maxlen,
            wait,
            metrics_name: None,
            url,
        })
    }

    /// How long one batch may take, from writing its pipeline to its last reply (and `WAIT`'s,
    /// which has its own timeout on top). Messages without a reply by then fail as transient
    /// `TIMEOUT` (retried: Redis may have appended them, so a retry can add a second copy),
    /// and the connection is given up for a new one. At most 24 hours. Default: 30 s.
    #[must_use]
    pub fn ack_timeout(mut self, t: Duration) -> Self {
        self.ack_timeout = t;
        self
    }

    /// Limit for one connection attempt (TCP, TLS, `AUTH`, `SELECT`). At most 24 hours.
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

    /// The largest stream entry the transport sends, in bytes: the payload, the key, the
    /// herald id and every header, names and values. A larger message fails at once as
    /// permanent `PAYLOAD_TOO_LARGE`, without being sent.
    ///
    /// Redis itself takes values up to `proto-max-bulk-len` (512 MB), but every entry lives in
    /// the server's memory, goes through its single thread, its AOF and every replica's link:
    /// an entry of hundreds of megabytes stalls every other client of the server. 1 MiB is the
    /// default, as NATS's `max_payload` and Kafka's `message.max.bytes`; raise it up to 512 MiB
    /// ([`MAX_MESSAGE_BYTES_LIMIT`]) where the server is sized for it.
    #[must_use]
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Trims every stream written to, approximately, to about its `n` newest entries, with each
    /// `XADD` (`MAXLEN ~ n`: Redis trims whole macro nodes only, so the stream keeps at least
    /// `n` and usually a little more). Trimmed entries are gone for consumers that had not read
    /// them: size `n` to what the slowest consumer may lag. `None`: no trimming (the default,
    /// unless the URL's `?maxlen=` says otherwise).
    #[must_use]
    pub fn maxlen(mut self, n: Option<u64>) -> Self {
        self.maxlen = n;
        self
    }

    /// After each batch, waits for `replicas` replicas to acknowledge it (`WAIT replicas
    /// timeout_ms`, in the same pipeline), for at most `timeout`. If fewer did, the batch's
    /// messages fail as transient `REPLICAS_NOT_REACHED` and are retried (the primary holds
    /// them already: a retry appends a second copy). `WAIT` makes a lost write less likely,
    /// not impossible: see the guarantees. `None` (the default unless the URL says
    /// `?wait=N`): acknowledged by the primary alone.
    #[must_use]
    pub fn wait(mut self, replicas: Option<(u32, Duration)>) -> Self {
        self.wait = replicas;
        self
    }

    /// Names the transport in its metrics: every `herald_redis_*` metric carries the label
    /// `producer` with this name (besides `transport="redis"`), so that several transports in
    /// one process keep separate series. Give it the name of the producer that uses the
    /// transport ([`ProducerBuilder::name`](herald_core::ProducerBuilder::name)). Up to 64
    /// ASCII letters, digits, `_`, `-` or `.` (checked by
    /// [`RedisTransport::new`](crate::RedisTransport::new)). Default: no name and no
    /// `producer` label.
    #[must_use]
    pub fn metrics_name(mut self, name: impl Into<String>) -> Self {
        self.metrics_name = Some(name.into());
        self
    }

    /// Trusts the CA certificates in this PEM file for TLS (`rediss://`) instead of the
    /// system's roots. The URL's `?tlsca=PATH` sets the same.
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.url.tls_files.set_ca_file(path.into());
        self
    }

    /// Presents this client certificate (PEM: `cert_file` the chain, leaf first; `key_file` its
    /// private key) to a `rediss://` server that asks for one (mutual TLS: Redis's
    /// `tls-auth-clients yes`, its default). The URL's `?tlscert=PATH&tlskey=PATH` set the
    /// same. Both files are read when the transport is built, and a problem with either is an
    /// error naming the file.
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

    /// The URL's stream key: where [`RedisConfig::destination`] sends.
    pub fn stream(&self) -> Option<&str> {
        self.url.stream.as_deref()
    }

    /// The destination of the URL's stream key, if it has one.
    pub fn destination(&self) -> Option<Destination> {
        self.url.stream.as_deref().map(crate::stream)
    }

    /// The approximate trimming in force: see [`RedisConfig::maxlen`].
    pub fn maxlen_value(&self) -> Option<u64> {
        self.maxlen
    }

    /// The database number (0 unless the URL names one).
    pub fn database(&self) -> u32 {
        self.url.db.unwrap_or(0)
    }

    /// The URL with the password masked, safe to log:
    /// `redis://user:***@host:port[/db][/stream][?maxlen=N...]`, with the TLS files the config
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
        if self.ack_timeout.is_zero() {
            return invalid("ack_timeout", "must be more than zero");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be more than zero");
        }
        let wait_timeout = self.wait.map_or(Duration::ZERO, |(_, t)| t);
        // `Instant + Duration` panics on overflow: keep every timer to something sane.
        for (field, d) in [
            ("ack_timeout", self.ack_timeout),
            ("connect_timeout", self.connect_timeout),
            ("reconnect_backoff", self.reconnect_max),
            ("wait", wait_timeout),
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
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return invalid(
                "max_message_bytes",
                "must be between 1 and 536870912 (512 MiB, Redis's proto-max-bulk-len)",
            );
        }
        if self.maxlen == Some(0) {
            return invalid("maxlen", "must be more than zero (None: no trimming)");
        }
        // Redis reads the count as a signed 64-bit integer and refuses every XADD above it.
        if self.maxlen.is_some_and(|n| n > i64::MAX as u64) {
            return invalid(
                "maxlen",
                "must be at most 9223372036854775807 (Redis's largest)",
            );
        }
        if let Some((replicas, timeout)) = self.wait {
            if replicas == 0 {
                return invalid("wait", "needs at least one replica (None: no WAIT)");
            }
            if timeout.is_zero() {
                // WAIT n 0 blocks forever.
                return invalid(
                    "wait",
                    "needs a timeout above zero (WAIT with 0 blocks forever)",
                );
            }
        }
        if let Some(name) = &self.metrics_name {
            if let Err(reason) = herald_core::metrics::check_producer_label(name) {
                return invalid("metrics_name", &reason);
            }
        }
        // Read and checked here, for an error that names the file (redis-rs's does not).
        if let Err((field, reason)) = self.url.tls_files.check(
            self.url.tls,
            Some("is for rediss:// URLs only (`?tlsca=`, `?tlscert=` and `?tlskey=` too)"),
            "RedisConfig::tls_ca_file",
            None,
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
        let c = RedisConfig::from_url("redis://h/orders").expect("valid");
        assert!(c.clone().validate().is_ok());
        assert!(c.clone().metrics_name("billing-eu.1").validate().is_ok());
        let s = Duration::from_secs;
        for (bad, field) in [
            (c.clone().ack_timeout(Duration::ZERO), "ack_timeout"),
            (c.clone().ack_timeout(Duration::MAX), "ack_timeout"),
            (c.clone().connect_timeout(Duration::ZERO), "connect_timeout"),
            (c.clone().connect_timeout(Duration::MAX), "connect_timeout"),
            (
                c.clone().reconnect_backoff(s(1), Duration::MAX),
                "reconnect_backoff",
            ),
            (c.clone().reconnect_backoff(s(2), s(1)), "reconnect_backoff"),
            (c.clone().max_message_bytes(0), "max_message_bytes"),
            (
                c.clone().max_message_bytes(MAX_MESSAGE_BYTES_LIMIT + 1),
                "max_message_bytes",
            ),
            (c.clone().maxlen(Some(0)), "maxlen"),
            (c.clone().maxlen(Some(u64::MAX)), "maxlen"),
            (c.clone().wait(Some((0, s(1)))), "wait"),
            (c.clone().wait(Some((1, Duration::ZERO))), "wait"),
            (c.clone().wait(Some((1, Duration::MAX))), "wait"),
            (c.clone().metrics_name(""), "metrics_name"),
            (c.clone().metrics_name("a b"), "metrics_name"),
            (c.clone().tls_ca_file("/ca.pem"), "tls_ca_file"),
        ] {
            match bad.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_url_s_query_sets_trimming_and_wait() {
        let c = RedisConfig::from_url("redis://h/2/orders?maxlen=1000&wait=2").expect("valid");
        assert_eq!(c.maxlen_value(), Some(1000));
        assert_eq!(c.wait, Some((2, DEFAULT_WAIT_TIMEOUT)));
        assert_eq!(c.database(), 2);
        assert_eq!(c.destination(), Some(crate::stream("orders")));
        let c = RedisConfig::from_url("redis://h/s?wait=1&wait_timeout_ms=50").expect("valid");
        assert_eq!(c.wait, Some((1, Duration::from_millis(50))));
        let plain = RedisConfig::from_url("redis://h").expect("valid");
        assert!(plain.destination().is_none() && plain.maxlen_value().is_none());
        assert_eq!(plain.database(), 0);
    }
}
