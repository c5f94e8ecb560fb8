//! The URL form of the settings,
//! `redis://[user:password@]host:port[/DB]/STREAMKEY[?maxlen=N&wait=N&wait_timeout_ms=MS]`
//! (`rediss://` for TLS): parsed with the password kept out of every printout.
//!
//! Parsed with `herald_core::url`'s rules: percent-escapes in the user, password and stream
//! key; a password may hold an unencoded `/`, `?` or `@` unless that makes the URL read two
//! ways, which is refused rather than guessed. One server per URL (no list).
//!
//! The path: a first segment of digits followed by more is the database number
//! (`redis://h:6379/2/orders` is the stream `orders` in database 2); everything else is the
//! stream key (`redis://h:6379/orders`, database 0). A stream key that starts with a segment of
//! digits and a `/` is written with its `/` as `%2F`.

use std::fmt;
use std::time::Duration;

use herald_core::tls::TlsFiles;
use herald_core::url::{self, Endpoint, Secret};

use crate::destination::validate_stream_key;
use crate::error::ConfigError;

/// The query parameters a Redis URL takes: `maxlen` (approximate trimming of the stream,
/// `MAXLEN ~ N`), `wait` (replicas that must have each batch, `WAIT N`) and `wait_timeout_ms`
/// (how long `WAIT` may block); for `rediss://`, `tlsca` (a CA file to trust), `tlscert` and
/// `tlskey` (a client certificate and its key, for mutual TLS).
pub const QUERY_PARAMETERS: &[&str] = &[
    "maxlen",
    "wait",
    "wait_timeout_ms",
    "tlsca",
    "tlscert",
    "tlskey",
];

/// The port of a server given without one.
pub const DEFAULT_PORT: u16 = 6379;

/// How long `WAIT` blocks by default, when `?wait=` is given without `?wait_timeout_ms=`.
pub(crate) const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(1);

/// The server, where to write, and how, parsed from a URL. The password is kept out of
/// `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Url {
    pub(crate) tls: bool,
    /// The ACL user (`AUTH user password`); `None` with a password alone (`AUTH password`).
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Secret>,
    /// The server: `host` and `port` (6379 unless given).
    pub(crate) endpoint: Endpoint,
    /// The database number, when the URL gives one (0 otherwise).
    pub(crate) db: Option<u32>,
    /// The stream key the URL's messages go to.
    pub(crate) stream: Option<String>,
    /// `?maxlen=N`.
    pub(crate) maxlen: Option<u64>,
    /// `?wait=N`.
    pub(crate) wait: Option<u32>,
    /// `?tlsca=PATH`, `?tlscert=PATH&tlskey=PATH`.
    pub(crate) tls_files: TlsFiles,
    /// `?wait_timeout_ms=MS`.
    pub(crate) wait_timeout: Option<Duration>,
}

impl Url {
    /// Parses the URL form (see the module's docs). The error names the part that is wrong,
    /// never the password.
    pub(crate) fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |part: &'static str, reason: String| ConfigError::Url { part, reason };
        let parts = url::split(url, "`redis://` or `rediss://`")?;
        let tls = match parts.scheme.to_ascii_lowercase().as_str() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(bad(
                    "scheme",
                    format!("`{other}` is not `redis` or `rediss`"),
                ))
            }
        };
        let (user, password) = match parts.userinfo {
            None => (None, None),
            Some(u) if !u.contains(':') => {
                return Err(bad(
                    "user information",
                    "has no `:`: write redis://:PASSWORD@host or redis://USER:PASSWORD@host".into(),
                ))
            }
            Some(u) => {
                let (user, password) = url::credentials(u)?;
                let password = password
                    .filter(|p| !p.expose().is_empty())
                    .ok_or_else(|| bad("password", "is empty".into()))?;
                ((!user.is_empty()).then_some(user), Some(password))
            }
        };
        // One server per URL: a list (or a host with blanks, which a list entry may have
        // around it) is refused before the host is parsed.
        if parts
            .hosts
            .contains(|c: char| c == ',' || c.is_whitespace())
        {
            return Err(bad(
                "host",
                "holds a character a host name cannot hold (one server per URL)".into(),
            ));
        }
        // Without a `,`, exactly one entry.
        let endpoint = url::parse_endpoints(parts.hosts, DEFAULT_PORT, "server")?.remove(0);
        let (db, stream) = match parts.path {
            None | Some("") => (None, None),
            Some(p) => {
                let (db, key) = match p.split_once('/') {
                    Some((first, rest))
                        if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        let db = first.parse::<u32>().map_err(|_| {
                            bad("database", "is not a database number (0 and up)".into())
                        })?;
                        (Some(db), rest)
                    }
                    _ => (None, p),
                };
                if key.is_empty() {
                    (db, None)
                } else {
                    let s = url::percent_decode(key).map_err(|r| bad("stream key", r))?;
                    validate_stream_key(&s).map_err(|r| bad("stream key", r))?;
                    (db, Some(s))
                }
            }
        };
        let mut url = Self {
            tls,
            user,
            password,
            endpoint,
            db,
            stream,
            maxlen: None,
            wait: None,
            wait_timeout: None,
            tls_files: TlsFiles::default(),
        };
        for (k, v) in url::query_pairs(parts.query)? {
            if url.tls_files.take(&k, &v)? {
                continue;
            }
            let number = |part: &'static str| -> Result<u64, ConfigError> {
                match v.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(bad(part, "is not a whole number above 0".into())),
                }
            };
            let twice = |part: &'static str| bad(part, "is given twice".into());
            match k.as_str() {
                "maxlen" => {
                    if url.maxlen.replace(number("query maxlen")?).is_some() {
                        return Err(twice("query maxlen"));
                    }
                }
                "wait" => {
                    let n = u32::try_from(number("query wait")?)
                        .map_err(|_| bad("query wait", "is too large".into()))?;
                    if url.wait.replace(n).is_some() {
                        return Err(twice("query wait"));
                    }
                }
                "wait_timeout_ms" => {
                    let ms = Duration::from_millis(number("query wait_timeout_ms")?);
                    if url.wait_timeout.replace(ms).is_some() {
                        return Err(twice("query wait_timeout_ms"));
                    }
                }
                _ => {
                    return Err(bad(
                        "query",
                        format!(
                            "has an unknown parameter (known: {})",
                            QUERY_PARAMETERS.join(", ")
                        ),
                    ))
                }
            }
        }
        url.tls_files.check_client_cert()?;
        if url.wait_timeout.is_some() && url.wait.is_none() {
            return Err(bad(
                "query wait_timeout_ms",
                "needs `wait=N` (the replicas to wait for)".into(),
            ));
        }
        Ok(url)
    }

    /// `redis://host:port` or `rediss://host:port`: the server, without credentials, for
    /// messages.
    pub(crate) fn server(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "rediss" } else { "redis" },
            self.endpoint
        )
    }
}

/// `redis://user:***@host:port[/db][/stream][?maxlen=N&wait=N&wait_timeout_ms=MS]`: safe to
/// log.
impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(f, "{scheme}://")?;
        match (&self.user, &self.password) {
            (Some(user), _) => write!(f, "{}:***@", percent_encode(user))?,
            (None, Some(_)) => f.write_str(":***@")?,
            (None, None) => {}
        }
        write!(f, "{}", self.endpoint)?;
        if let Some(db) = self.db {
            write!(f, "/{db}")?;
        }
        if let Some(stream) = &self.stream {
            write!(f, "/{}", percent_encode(stream))?;
        }
        let mut query = Vec::new();
        if let Some(n) = self.maxlen {
            query.push(format!("maxlen={n}"));
        }
        if let Some(n) = self.wait {
            query.push(format!("wait={n}"));
        }
        if let Some(t) = self.wait_timeout {
            query.push(format!("wait_timeout_ms={}", t.as_millis()));
        }
        query.extend(self.tls_files.query());
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `herald_core::url::percent_encode`, but with `:` (common in Redis key names) left as is. Its
/// escapes are upper-case and a `%` becomes `%25`, so every `%3A` it writes is an escaped `:`.
fn percent_encode(v: &str) -> String {
    url::percent_encode(v).replace("%3A", ":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RedisConfig;

    fn part(url: &str) -> &'static str {
        match Url::parse(url) {
            Err(ConfigError::Url { part, .. }) => part,
            other => panic!("{url}: expected a URL error, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_full_form() {
        let u = Url::parse(
            "redis://app%40x:p%3Ass@cache-1:6380/3/orders:eu?maxlen=10000&wait=1&wait_timeout_ms=250",
        )
        .expect("valid");
        assert!(!u.tls);
        assert_eq!(u.user.as_deref(), Some("app@x"));
        assert_eq!(u.password, Some(Secret::new("p:ss")));
        assert_eq!(
            (u.endpoint.host.as_str(), u.endpoint.port),
            ("cache-1", 6380)
        );
        assert_eq!(u.db, Some(3));
        assert_eq!(u.stream.as_deref(), Some("orders:eu"));
        assert_eq!(u.maxlen, Some(10_000));
        assert_eq!(u.wait, Some(1));
        assert_eq!(u.wait_timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            u.to_string(),
            "redis://app%40x:***@cache-1:6380/3/orders:eu?maxlen=10000&wait=1&wait_timeout_ms=250"
        );
        assert_eq!(u.server(), "redis://cache-1:6380");
    }

    #[test]
    fn defaults_database_and_stream_key() {
        let u = Url::parse("redis://localhost").expect("valid");
        assert_eq!(
            (u.endpoint.port, u.db, u.stream.as_deref()),
            (6379, None, None)
        );
        assert_eq!((u.user.as_ref(), u.password.as_ref()), (None, None));
        let u = Url::parse("redis://h/orders").expect("valid");
        assert_eq!((u.db, u.stream.as_deref()), (None, Some("orders")));
        // A lone number is a stream key: a database comes before one.
        let u = Url::parse("redis://h/42").expect("valid");
        assert_eq!((u.db, u.stream.as_deref()), (None, Some("42")));
        let u = Url::parse("redis://h/2/").expect("valid");
        assert_eq!((u.db, u.stream.as_deref()), (Some(2), None));
        let u = Url::parse("redis://h/2024%2Forders").expect("valid");
        assert_eq!((u.db, u.stream.as_deref()), (None, Some("2024/orders")));
        assert_eq!(u.to_string(), "redis://h:6379/2024%2Forders");
        let u = Url::parse("redis://h/app/orders").expect("valid");
        assert_eq!(u.stream.as_deref(), Some("app/orders"));
        let u = Url::parse("REDISS://:s3cret@[::1]:6380/0/s").expect("valid");
        assert!(u.tls);
        assert_eq!((u.user.as_ref(), u.endpoint.host.as_str()), (None, "::1"));
        assert_eq!(u.to_string(), "rediss://:***@[::1]:6380/0/s");
    }

    #[test]
    fn tls_files_are_query_parameters() {
        let text = "rediss://h:6379/s?maxlen=5&tlsca=/etc/ca.pem&tlscert=/c.pem&tlskey=/c.key";
        let u = Url::parse(text).expect("valid");
        assert_eq!(u.to_string(), text);
        let c = crate::RedisConfig::from_url(text).expect("valid");
        assert_eq!(
            c.url.tls_files.ca_file(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            c.url.tls_files.client_cert().map(|c| c.key_file),
            Some("/c.key".into())
        );
        assert_eq!(part("rediss://h/s?tlscert=/c.pem"), "query tlscert");
        let plain =
            crate::RedisConfig::from_url("redis://h/s?tlscert=/c.pem&tlskey=/c.key").expect("url");
        assert!(
            matches!(
                plain.validate(),
                Err(ConfigError::Invalid {
                    field: "tls_client_cert",
                    ..
                })
            ),
            "{:?}",
            plain.validate()
        );
    }

    #[test]
    fn malformed_urls_name_the_part() {
        assert_eq!(part("http://h"), "scheme");
        assert_eq!(part("h:6379"), "scheme");
        assert_eq!(part("redis://h:notaport"), "port");
        assert_eq!(part("redis://h:70000"), "port");
        assert_eq!(part("redis://h:0"), "port");
        assert_eq!(part("redis://:pw@:6379"), "host");
        assert_eq!(part("redis://h1,h2/s"), "host");
        assert_eq!(part("redis://[::1/x"), "host");
        assert_eq!(part("redis://h/99999999999/s"), "database");
        assert_eq!(part("redis://h/%zz"), "stream key");
        assert_eq!(part("redis://h/a%0Ab"), "stream key");
        assert_eq!(part("redis://u%zz:p@h"), "user");
        assert_eq!(part("redis://u:p%zz@h"), "password");
        assert_eq!(part("redis://u:@h"), "password");
        assert_eq!(part("redis://secret@h"), "user information");
        assert_eq!(part("redis://h/s?nope=1"), "query");
        assert_eq!(part("redis://h/s?maxlen=0"), "query maxlen");
        assert_eq!(part("redis://h/s?maxlen=x"), "query maxlen");
        assert_eq!(part("redis://h/s?maxlen=1&maxlen=2"), "query maxlen");
        assert_eq!(part("redis://h/s?wait=99999999999"), "query wait");
        assert_eq!(part("redis://h/s?wait=1&wait=1"), "query wait");
        assert_eq!(
            part("redis://h/s?wait_timeout_ms=5"),
            "query wait_timeout_ms"
        );
    }

    #[test]
    fn the_password_never_shows() {
        let secret = "hunter2-very-secret";
        let config =
            RedisConfig::from_url(&format!("redis://app:{secret}@h:6379/orders")).expect("valid");
        for text in [
            format!("{config:?}"),
            format!("{:?}", config.url),
            config.redacted_url(),
        ] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(config.redacted_url(), "redis://app:***@h:6379/orders");
        let alone = RedisConfig::from_url(&format!("redis://:{secret}@h")).expect("valid");
        assert!(!format!("{alone:?}").contains(secret));
        assert_eq!(alone.redacted_url(), "redis://:***@h:6379");
        for url in [
            "redis://app:hunter2%zz@h",
            "redis://app:hunter2@h:x",
            "redis://app:hunter2@h/a%0Ab",
            "redis://app:hunter2@h/a?maxlen=x",
            "redis://app:hunter2@h/a?nope=1",
            "redis://hunter2@h",
            "redis://app:hunter2/x@h:port",
            "redis://app:hunter2@h1,h2",
        ] {
            let e = Url::parse(url).expect_err(url);
            assert!(!format!("{e} {e:?}").contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn a_password_with_slash_or_question_mark_parses() {
        let u = Url::parse("redis://app:a+b/c==?d@h:6379/orders?maxlen=5").expect("valid");
        assert_eq!(u.password, Some(Secret::new("a+b/c==?d")));
        assert_eq!((u.stream.as_deref(), u.maxlen), (Some("orders"), Some(5)));
        // An `@` in the stream key is written `%40`: unescaped, it could end a user name
        // holding `/`, and is refused.
        let u = Url::parse("redis://h/orders%40eu").expect("valid");
        assert_eq!(u.stream.as_deref(), Some("orders@eu"));
        Url::parse("redis://h/orders@eu").expect_err("a user `h/orders`, or a key?");
        // Both: ambiguous, refused, saying how to write it.
        let e = Url::parse("redis://app:hunter2@h/orders@eu").expect_err("ambiguous");
        assert!(
            matches!(
                e,
                ConfigError::Url {
                    part: "user information",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("%40") && !e.to_string().contains("hunter2"));
    }
}
