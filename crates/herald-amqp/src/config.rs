//! Settings: an `amqp://` / `amqps://` URL plus typed options, checked when the transport is built.

use std::fmt;
use std::time::Duration;

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};

use crate::error::ConfigError;

/// A password: never printed, not in `Debug`, not in `Display`, not in errors.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The broker address, parsed from a URL. The password is kept out of `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Url {
    pub(crate) tls: bool,
    pub(crate) username: String,
    pub(crate) password: Secret,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) vhost: String,
    pub(crate) heartbeat: Option<u16>,
    pub(crate) connection_timeout_ms: Option<u64>,
    pub(crate) channel_max: Option<u16>,
    pub(crate) frame_max: Option<u32>,
}

impl Url {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/vhost][?query]`, percent-decoding user,
    /// password and vhost. The error names the part that is wrong, never the password itself.
    pub(crate) fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |part: &'static str, reason: String| ConfigError::Url { part, reason };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad(
                "scheme",
                "expected `amqp://` or `amqps://` at the start".into(),
            )
        })?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "amqp" => false,
            "amqps" => true,
            other => return Err(bad("scheme", format!("`{other}` is not `amqp` or `amqps`"))),
        };
        // The userinfo ends at the LAST `@` of the URL: a password may hold an unencoded `/`, `?`
        // or `@` (base64 passwords often do), so the URL must not be split on `/` or `?` before
        // the userinfo is found. If what precedes that `@` has a user name with a `/` or `?` in
        // it, the `@` belongs to the vhost or query instead, and only an `@` before the first
        // `/` or `?` can end the userinfo.
        let (userinfo, after) = match rest.rfind('@') {
            Some(at)
                if !rest[..at]
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .contains(['/', '?']) =>
            {
                (Some(&rest[..at]), &rest[at + 1..])
            }
            _ => {
                let end = rest.find(['/', '?']).unwrap_or(rest.len());
                match rest[..end].rfind('@') {
                    Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
                    None => (None, rest),
                }
            }
        };
        let (after, query) = match after.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (after, None),
        };
        let (hostport, path) = match after.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (after, None),
        };
        let (username, password) = match userinfo {
            None => ("guest".to_owned(), "guest".to_owned()),
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                (
                    percent_decode(user).map_err(|r| bad("user", r))?,
                    // The reason names the bad escape only, which is not the password.
                    percent_decode(pass)
                        .map_err(|_| bad("password", "contains an invalid %-escape".into()))?,
                )
            }
        };
        let default_port = if tls { 5671 } else { 5672 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("host", "an IPv6 address misses its `]`".into()))?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None if after.is_empty() => default_port,
                None => {
                    return Err(bad(
                        "port",
                        "has unexpected text after the IPv6 address (expected `:port`)".into(),
                    ))
                }
            };
            (h.to_owned(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), parse_port(p)?),
                None => (hostport.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("host", "is empty".into()));
        }
        let vhost = match path {
            None => "/".to_owned(),
            Some(p) if p.contains('/') => {
                return Err(bad(
                    "vhost",
                    "holds a `/`: percent-encode it (the vhost `/` is `%2F`)".into(),
                ))
            }
            Some(p) => percent_decode(p).map_err(|r| bad("vhost", r))?,
        };
        let mut parsed = Self {
            tls,
            username,
            password: Secret(password),
            host,
            port,
            vhost,
            heartbeat: None,
            connection_timeout_ms: None,
            channel_max: None,
            frame_max: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = |what: &'static str| -> Result<u64, ConfigError> {
                v.parse::<u64>()
                    .map_err(|_| bad(what, "is not a number".into()))
            };
            match k {
                "heartbeat" => {
                    parsed.heartbeat = Some(
                        u16::try_from(num("query heartbeat")?)
                            .map_err(|_| bad("query heartbeat", "must be at most 65535".into()))?,
                    )
                }
                "connection_timeout" => {
                    parsed.connection_timeout_ms = Some(num("query connection_timeout")?)
                }
                "channel_max" => {
                    parsed.channel_max = Some(
                        u16::try_from(num("query channel_max")?).map_err(|_| {
                            bad("query channel_max", "must be at most 65535".into())
                        })?,
                    )
                }
                "frame_max" => {
                    parsed.frame_max =
                        Some(u32::try_from(num("query frame_max")?).map_err(|_| {
                            bad("query frame_max", "must fit in 32 bits".into())
                        })?)
                }
                _ => {
                    return Err(bad(
                        "query",
                        "has an unknown parameter (known: heartbeat, connection_timeout, channel_max, frame_max)".into(),
                    ))
                }
            }
        }
        Ok(parsed)
    }

    pub(crate) fn to_lapin(&self) -> AMQPUri {
        AMQPUri {
            scheme: if self.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: self.username.clone(),
                    password: self.password.0.clone(),
                },
                host: self.host.clone(),
                port: self.port,
            },
            vhost: self.vhost.clone(),
            query: AMQPQueryString {
                frame_max: self.frame_max,
                channel_max: self.channel_max,
                heartbeat: self.heartbeat,
                connection_timeout: self.connection_timeout_ms,
                ..AMQPQueryString::default()
            },
        }
    }
}

/// `amqp://user:***@host:port/vhost`: safe to log.
impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "{scheme}://{}:***@{host}:{}/{}",
            self.username,
            self.port,
            percent_encode(&self.vhost)
        )
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

fn parse_port(p: &str) -> Result<u16, ConfigError> {
    match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConfigError::Url {
            part: "port",
            reason: "is not a port number (1-65535)".into(),
        }),
    }
}

/// Decodes `%XX` escapes in one part of an AMQP URL (user, password, vhost, a query value).
/// The error says what is wrong ("holds an invalid %-escape", "is not UTF-8 once decoded"),
/// never the input, which may be a password.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "holds an invalid %-escape".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 once decoded".to_owned())
}

/// Escapes everything but ASCII letters, digits and `-_.~`, for one part of an AMQP URL (`/`
/// becomes `%2F`).
pub fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The longest timeout or backoff accepted (longer ones could overflow `Instant + Duration`).
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// How a [`Declare::Exchange`] routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// Routes by exact routing key.
    Direct,
    /// Routes to every bound queue.
    Fanout,
    /// Routes by routing-key pattern.
    Topic,
    /// Routes by header values.
    Headers,
}

/// One piece of topology the transport declares when it connects, and again after every
/// reconnect (declarations are idempotent). Declaring needs the `configure` permission.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Declare {
    /// A durable exchange.
    Exchange {
        /// Its name.
        name: String,
        /// How it routes.
        kind: ExchangeKind,
    },
    /// A durable queue; `quorum` makes it a replicated quorum queue (`x-queue-type: quorum`).
    Queue {
        /// Its name.
        name: String,
        /// Quorum (true) or classic (false).
        quorum: bool,
    },
    /// Binds `queue` to `exchange` with `routing_key`.
    Binding {
        /// The queue.
        queue: String,
        /// The exchange.
        exchange: String,
        /// The binding key.
        routing_key: String,
    },
}

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
    pub(crate) topology: Vec<Declare>,
}

impl AmqpConfig {
    /// Settings for the broker at `url` (`amqp://` or `amqps://`, vhost percent-encoded:
    /// `amqp://user:pass@host:5672/%2F` is the vhost `/`; no path means `/` too). Query
    /// parameters: `heartbeat` (s), `connection_timeout` (ms), `channel_max`, `frame_max`.
    ///
    /// The user information ends at the URL's last `@`, so a password may hold an unencoded `/`,
    /// `?` or `@` (an `@` in the vhost must then be encoded as `%40`).
    ///
    /// A malformed URL is an error naming the part (`scheme`, `user`, `password`, `host`, `port`,
    /// `vhost`, `query …`); the password itself never appears in it.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            url: Url::parse(url)?,
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
            key_header: Some("x-herald-key".into()),
            message_id_header: Some("message-id".into()),
            connection_name: "herald".into(),
            topology: Vec::new(),
        })
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

    /// `delivery_mode = 2` (written to disk by durable queues). Default: true.
    #[must_use]
    pub fn persistent(mut self, on: bool) -> Self {
        self.persistent = on;
        self
    }

    /// `mandatory`: a message no queue takes comes back as a permanent `NO_ROUTE` error instead
    /// of vanishing. Default: true.
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
    /// `max` (at most 24 hours). Default: 100 ms to 5 s.
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

    /// The AMQP header that carries a message's herald key (AMQP has no key of its own), or
    /// `None` not to send it. Default: `x-herald-key`.
    #[must_use]
    pub fn key_header(mut self, name: Option<String>) -> Self {
        self.key_header = name;
        self
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

    /// Topology to declare at connect and after every reconnect.
    #[must_use]
    pub fn declare(mut self, item: Declare) -> Self {
        self.topology.push(item);
        self
    }

    /// The broker address with the password masked, safe to log.
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
        if self.url.tls
            && self
                .tls_ca_pem
                .as_deref()
                .is_some_and(|p| !p.contains("-----BEGIN"))
        {
            return invalid("tls_ca_pem", "is not PEM (no `-----BEGIN` line)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(url: &str) -> &'static str {
        match Url::parse(url) {
            Err(ConfigError::Url { part, .. }) => part,
            other => panic!("{url}: expected a URL error, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_full_url() {
        let u = Url::parse("amqps://app%40x:p%3Ass@rabbit.example:5999/%2Fprod?heartbeat=10&connection_timeout=2500")
            .expect("valid");
        assert!(u.tls);
        assert_eq!(u.username, "app@x");
        assert_eq!(u.password.0, "p:ss");
        assert_eq!(u.host, "rabbit.example");
        assert_eq!(u.port, 5999);
        assert_eq!(u.vhost, "/prod");
        assert_eq!(u.heartbeat, Some(10));
        assert_eq!(u.connection_timeout_ms, Some(2500));
        let l = u.to_lapin();
        assert_eq!(l.scheme, AMQPScheme::AMQPS);
        assert_eq!(l.authority.userinfo.password, "p:ss");
        assert_eq!(l.vhost, "/prod");
    }

    #[test]
    fn defaults() {
        let u = Url::parse("amqp://localhost").expect("valid");
        assert_eq!(
            (u.port, u.vhost.as_str(), u.username.as_str()),
            (5672, "/", "guest")
        );
        assert_eq!(Url::parse("amqps://h").expect("valid").port, 5671);
        assert_eq!(Url::parse("amqp://h/%2f").expect("valid").vhost, "/");
        assert_eq!(Url::parse("amqp://h/").expect("valid").vhost, "");
        let v6 = Url::parse("amqp://u:p@[::1]:5673/v").expect("valid");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 5673));
    }

    #[test]
    fn malformed_urls_name_the_part() {
        assert_eq!(part("http://h"), "scheme");
        assert_eq!(part("rabbit:5672"), "scheme");
        assert_eq!(part("amqp://u:p@h:notaport/"), "port");
        assert_eq!(part("amqp://u:p@h:70000/"), "port");
        assert_eq!(part("amqp://u:p@h:0/"), "port");
        assert_eq!(part("amqp://u:p@:5672/"), "host");
        assert_eq!(part("amqp://u:p@h/a/b"), "vhost");
        assert_eq!(part("amqp://u:p@h/%zz"), "vhost");
        assert_eq!(part("amqp://u%zz:p@h/"), "user");
        assert_eq!(part("amqp://u:p%zz@h/"), "password");
        assert_eq!(part("amqp://h/?nope=1"), "query");
        assert_eq!(part("amqp://h/?heartbeat=x"), "query heartbeat");
    }

    #[test]
    fn the_password_never_shows() {
        let secret = "hunter2-very-secret";
        let config =
            AmqpConfig::from_url(&format!("amqp://app:{secret}@h:5672/%2F")).expect("valid");
        for text in [
            format!("{config:?}"),
            format!("{:?}", config.url),
            config.redacted_url(),
        ] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(config.redacted_url(), "amqp://app:***@h:5672/%2F");
        // A malformed password escape does not echo the password either.
        let e = Url::parse("amqp://app:hunter2%zz@h/").expect_err("invalid");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        // Nor does a malformed port next to it.
        let e = Url::parse("amqp://app:hunter2@h:x/").expect_err("invalid");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_password_with_slash_or_question_mark_parses_and_never_shows() {
        let u = Url::parse("amqp://app:hunter2/x@h/").expect("valid");
        assert_eq!(
            (u.username.as_str(), u.password.0.as_str(), u.host.as_str()),
            ("app", "hunter2/x", "h")
        );
        assert_eq!((u.port, u.vhost.as_str()), (5672, ""));
        let u = Url::parse("amqp://app:5672/x@rabbit").expect("valid");
        assert_eq!(
            (u.password.0.as_str(), u.host.as_str(), u.vhost.as_str()),
            ("5672/x", "rabbit", "/")
        );
        let u = Url::parse("amqps://app:a+b/c==?d@rabbit:5999/%2Fprod?heartbeat=5").expect("valid");
        assert_eq!(
            (u.password.0.as_str(), u.host.as_str(), u.port),
            ("a+b/c==?d", "rabbit", 5999)
        );
        assert_eq!((u.vhost.as_str(), u.heartbeat), ("/prod", Some(5)));
        // An `@` in the vhost, without userinfo, stays in the vhost.
        let u = Url::parse("amqp://h/x@y").expect("valid");
        assert_eq!((u.host.as_str(), u.vhost.as_str()), ("h", "x@y"));
        for (url, secret) in [
            ("amqp://app:hunter2/x@h/", "hunter2"),
            ("amqp://app:5672/x@rabbit", "5672/x"),
            ("amqp://app:se?cret@h/", "se?cret"),
        ] {
            let c = AmqpConfig::from_url(url).expect("valid");
            for text in [format!("{c:?}"), c.redacted_url(), format!("{}", c.url)] {
                assert!(!text.contains(secret), "{text}");
            }
        }
        // Malformed next to such a password: the error names the part, never the password.
        for url in [
            "amqp://app:hunter2/x@h:port/",
            "amqp://app:hunter2?x@h:99999/",
            "amqp://app:hunter2/x@h/a/b",
            "amqp://app:hunter2?x@h/?nope=1",
            "amqp://app:hunter2?x@h/?heartbeat=zz",
            "amqp://app:hunter2/x@[::1]x/",
            "amqp://app:hunter2/x@/",
        ] {
            let e = Url::parse(url).expect_err(url);
            assert!(!e.to_string().contains("hunter2"), "{url}: {e}");
            assert!(!format!("{e:?}").contains("hunter2"), "{url}: {e:?}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let c = AmqpConfig::from_url("amqp://h").expect("valid");
        assert!(c.clone().validate().is_ok());
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
        ] {
            match bad.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
