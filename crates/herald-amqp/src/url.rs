//! The URL form of the settings, `amqp[s]://user:password@host:port/vhost?query`: parsed with
//! the password kept out of every printout, and the percent-encoding of its parts.

use std::fmt;

use herald_core::tls::{TlsFiles, TlsParameterNames};
use herald_core::url::{self, Endpoint, Secret};
pub use herald_core::url::{percent_decode, percent_encode};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};

use crate::error::ConfigError;

/// The query parameters an AMQP URL takes: the connection's `heartbeat` (s),
/// `connection_timeout` (ms), `channel_max`, `frame_max` and `shuffle_addresses`
/// (`true`/`false`), and where to publish ([`Route`]): `queue`, `declare`, `queue_type`, or
/// `exchange` and `routing_key`; `key_header`, the header that carries each message's herald
/// key (empty: none; see [`AmqpConfig::key_header`](crate::AmqpConfig::key_header)); for
/// `amqps://`, RabbitMQ's `cacertfile` (a CA file to trust),
/// `certfile` and `keyfile` (a client certificate and its key, for mutual TLS). A program that
/// adds parameters of its own to the URL keeps these for
/// [`AmqpConfig::from_url`](crate::AmqpConfig::from_url) (see [`split_query`]).
pub const QUERY_PARAMETERS: &[&str] = &[
    "cacertfile",
    "certfile",
    "keyfile",
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "shuffle_addresses",
    "queue",
    "declare",
    "queue_type",
    "exchange",
    "routing_key",
    "key_header",
];

/// Where a URL says to publish, for programs that take the broker and the destination in one
/// URL (the `herald` command): `?queue=NAME[&declare=false][&queue_type=quorum]` or
/// `?exchange=EX[&routing_key=RK]`. See [`AmqpConfig::route`](crate::AmqpConfig::route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through the default exchange into this queue, declared durable when the transport
    /// connects unless `declare` is false (`quorum`: as a quorum queue).
    Queue {
        /// The queue.
        name: String,
        /// Declare it (`declare=true`, the default) or expect it to exist (`declare=false`).
        declare: bool,
        /// `queue_type=quorum` (else classic).
        quorum: bool,
    },
    /// To this exchange, which must exist, with this routing key (empty by default).
    Exchange {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
}

impl Route {
    /// The herald destination its messages go to.
    pub fn destination(&self) -> herald_core::Destination {
        match self {
            Self::Queue { name, .. } => crate::queue(name),
            Self::Exchange {
                exchange,
                routing_key,
            } => crate::exchange(exchange, routing_key),
        }
    }

    /// The route as a URL query (`queue=...` or `exchange=...&routing_key=...`).
    fn query(&self) -> String {
        match self {
            Self::Queue { name, .. } => format!("queue={}", percent_encode(name)),
            Self::Exchange {
                exchange,
                routing_key,
            } => format!(
                "exchange={}&routing_key={}",
                percent_encode(exchange),
                percent_encode(routing_key)
            ),
        }
    }
}

/// The route parameters of a query, before they are checked together.
#[derive(Default)]
struct RouteParams {
    queue: Option<String>,
    exchange: Option<String>,
    routing_key: Option<String>,
    declare: Option<bool>,
    quorum: Option<bool>,
}

impl RouteParams {
    /// The route they name, if any; an error names the parameter that does not fit.
    fn route(self) -> Result<Option<Route>, ConfigError> {
        let bad = |part: &'static str, reason: &str| ConfigError::Url {
            part,
            reason: reason.to_owned(),
        };
        let fits = |part: &'static str, name: &str| {
            if crate::name_fits(name) {
                Ok(())
            } else {
                Err(ConfigError::Url {
                    part,
                    reason: format!("is longer than {} bytes", crate::MAX_NAME_BYTES),
                })
            }
        };
        match (self.queue, self.exchange) {
            (Some(_), Some(_)) => Err(bad(
                "query",
                "names both a queue and an exchange: give ?queue=NAME or ?exchange=EX&routing_key=RK",
            )),
            (None, None) => {
                if self.routing_key.is_some() || self.declare.is_some() || self.quorum.is_some() {
                    return Err(bad(
                        "query",
                        "names no destination for its routing_key, declare or queue_type: add ?queue=NAME or ?exchange=EX",
                    ));
                }
                Ok(None)
            }
            (Some(name), None) => {
                if name.is_empty() {
                    return Err(bad("query queue", "is empty"));
                }
                if self.routing_key.is_some() {
                    return Err(bad(
                        "query routing_key",
                        "only goes with exchange= (a queue is reached by its name)",
                    ));
                }
                fits("query queue", &name)?;
                Ok(Some(Route::Queue {
                    name,
                    declare: self.declare.unwrap_or(true),
                    quorum: self.quorum.unwrap_or(false),
                }))
            }
            (None, Some(exchange)) => {
                if exchange.is_empty() {
                    return Err(bad(
                        "query exchange",
                        "is empty: to publish through the default exchange, use ?queue=NAME",
                    ));
                }
                if self.declare.is_some() || self.quorum.is_some() {
                    return Err(bad(
                        "query",
                        "declare and queue_type only go with queue= (herald does not declare exchanges)",
                    ));
                }
                let routing_key = self.routing_key.unwrap_or_default();
                fits("query exchange", &exchange)?;
                fits("query routing_key", &routing_key)?;
                Ok(Some(Route::Exchange {
                    exchange,
                    routing_key,
                }))
            }
        }
    }
}

/// Splits an AMQP URL where its query starts: what comes before the `?`, and the query after
/// it, the `?` found exactly as [`AmqpConfig::from_url`](crate::AmqpConfig::from_url) finds
/// it, after the user information (a password may hold an unencoded `?`, `/` or `@`).
///
/// A URL whose user information is ambiguous (an unencoded `@` in the vhost or a query value,
/// next to user information) is returned whole, with no query: `from_url` refuses it, saying
/// to write that `@` as `%40`.
///
/// For programs that put parameters of their own in the URL's query: split, take theirs out,
/// and give the base with the [`QUERY_PARAMETERS`] left to `from_url`.
///
/// ```
/// assert_eq!(
///     herald_amqp::split_query("amqp://app:pa?ss@rabbit/%2F?heartbeat=10&queue=orders"),
///     ("amqp://app:pa?ss@rabbit/%2F", Some("heartbeat=10&queue=orders"))
/// );
/// assert_eq!(herald_amqp::split_query("amqp://rabbit/%2F"), ("amqp://rabbit/%2F", None));
/// ```
pub fn split_query(url: &str) -> (&str, Option<&str>) {
    herald_core::url::split_query(url)
}

/// The broker address, parsed from a URL. The password is kept out of `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Url {
    pub(crate) tls: bool,
    pub(crate) username: String,
    pub(crate) password: Secret,
    /// The brokers to try, in the order given (at least one, no two alike).
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) vhost: String,
    pub(crate) heartbeat: Option<u16>,
    pub(crate) connection_timeout_ms: Option<u64>,
    pub(crate) channel_max: Option<u16>,
    pub(crate) frame_max: Option<u32>,
    /// `shuffle_addresses=true`.
    pub(crate) shuffle_addresses: bool,
    /// Where the query says to publish, if it says.
    pub(crate) route: Option<Route>,
    /// `?cacertfile=PATH`, `?certfile=PATH&keyfile=PATH`.
    pub(crate) tls_files: TlsFiles,
    /// `?key_header=NAME` (`Some(Some(NAME))`) or `?key_header=` (`Some(None)`: none); `None`
    /// when the query does not say.
    pub(crate) key_header: Option<Option<String>>,
}

impl Url {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/vhost][?query]`, percent-decoding user,
    /// password and vhost. The error names the part that is wrong, never the password itself.
    pub(crate) fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |part: &'static str, reason: String| ConfigError::Url { part, reason };
        let parts = url::split(url, "`amqp://` or `amqps://`")?;
        let tls = match parts.scheme.to_ascii_lowercase().as_str() {
            "amqp" => false,
            "amqps" => true,
            other => return Err(bad("scheme", format!("`{other}` is not `amqp` or `amqps`"))),
        };
        let (username, password) = match parts.userinfo {
            None => ("guest".to_owned(), Secret::new("guest")),
            Some(u) => {
                let (user, password) = url::credentials(u)?;
                (user, password.unwrap_or_else(|| Secret::new("")))
            }
        };
        let (hostport, path, query) = (parts.hosts, parts.path, parts.query);
        let default_port = if tls { 5671 } else { 5672 };
        let endpoints = url::parse_endpoints(hostport, default_port, "address")?;
        let vhost = match path {
            None => "/".to_owned(),
            Some(p) if p.contains('/') => {
                return Err(bad(
                    "vhost",
                    "holds a `/`: percent-encode it (the vhost `/` is `%2F`)".into(),
                ))
            }
            Some(p) => url::percent_decode(p).map_err(|r| bad("vhost", r))?,
        };
        let mut parsed = Self {
            tls,
            username,
            password,
            endpoints,
            vhost,
            heartbeat: None,
            connection_timeout_ms: None,
            channel_max: None,
            frame_max: None,
            shuffle_addresses: false,
            route: None,
            tls_files: TlsFiles::named(TlsParameterNames::RABBITMQ),
            key_header: None,
        };
        let mut route = RouteParams::default();
        let flag = |part: &'static str, v: &str| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(bad(part, "must be true or false".into())),
        };
        for (k, v) in url::query_pairs(query)? {
            if parsed.tls_files.take(&k, &v)? {
                continue;
            }
            let num = |what: &'static str| -> Result<u64, ConfigError> {
                v.parse::<u64>()
                    .map_err(|_| bad(what, "is not a number".into()))
            };
            match k.as_str() {
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
                    parsed.channel_max =
                        Some(u16::try_from(num("query channel_max")?).map_err(|_| {
                            bad("query channel_max", "must be at most 65535".into())
                        })?)
                }
                "frame_max" => {
                    parsed.frame_max = Some(
                        u32::try_from(num("query frame_max")?)
                            .map_err(|_| bad("query frame_max", "must fit in 32 bits".into()))?,
                    )
                }
                "shuffle_addresses" => {
                    parsed.shuffle_addresses = flag("query shuffle_addresses", &v)?;
                }
                "declare" => route.declare = Some(flag("query declare", &v)?),
                "queue_type" => {
                    route.quorum = Some(match v.as_str() {
                        "classic" => false,
                        "quorum" => true,
                        _ => {
                            return Err(bad("query queue_type", "must be classic or quorum".into()))
                        }
                    })
                }
                "queue" => route.queue = Some(v),
                "exchange" => route.exchange = Some(v),
                "routing_key" => route.routing_key = Some(v),
                "key_header" => {
                    // A field table's key is a short string: at most 255 bytes.
                    if !crate::name_fits(&v) {
                        return Err(bad(
                            "query key_header",
                            format!(
                                "is {} bytes; a header name holds at most {}",
                                v.len(),
                                crate::MAX_NAME_BYTES
                            ),
                        ));
                    }
                    parsed.key_header = Some((!v.is_empty()).then_some(v));
                }
                other => {
                    return Err(bad(
                        "query",
                        format!(
                            "{} (known: {})",
                            herald_core::url::unknown_parameter(other),
                            QUERY_PARAMETERS.join(", ")
                        ),
                    ))
                }
            }
        }
        parsed.route = route.route()?;
        parsed.tls_files.check_client_cert()?;
        Ok(parsed)
    }

    /// The first broker of the list (the only one, most often).
    #[cfg(test)]
    pub(crate) fn host(&self) -> &str {
        &self.endpoints[0].host
    }

    /// The first broker's port.
    #[cfg(test)]
    pub(crate) fn port(&self) -> u16 {
        self.endpoints[0].port
    }

    /// The URI lapin connects to for the broker `endpoint` of the list.
    pub(crate) fn to_lapin(&self, endpoint: &Endpoint) -> AMQPUri {
        AMQPUri {
            scheme: if self.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: self.username.clone(),
                    password: self.password.expose().to_owned(),
                },
                host: endpoint.host.clone(),
                port: endpoint.port,
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

/// `amqp://user:***@host:port[,host:port...]/vhost`: safe to log.
impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let hosts: Vec<String> = self.endpoints.iter().map(Endpoint::to_string).collect();
        write!(
            f,
            "{scheme}://{}:***@{}/{}",
            self.username,
            hosts.join(","),
            percent_encode(&self.vhost)
        )?;
        let mut query: Vec<String> = self.route.iter().map(Route::query).collect();
        query.extend(self.tls_files.query());
        if query.is_empty() {
            Ok(())
        } else {
            write!(f, "?{}", query.join("&"))
        }
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AmqpConfig;

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
        assert_eq!(u.password.expose(), "p:ss");
        assert_eq!(u.host(), "rabbit.example");
        assert_eq!(u.port(), 5999);
        assert_eq!(u.vhost, "/prod");
        assert_eq!(u.heartbeat, Some(10));
        assert_eq!(u.connection_timeout_ms, Some(2500));
        let l = u.to_lapin(&u.endpoints[0]);
        assert_eq!(l.scheme, AMQPScheme::AMQPS);
        assert_eq!(l.authority.userinfo.password, "p:ss");
        assert_eq!(l.vhost, "/prod");
    }

    #[test]
    fn tls_files_are_rabbitmq_s_query_parameters() {
        let text =
            "amqps://u:p@h:5671/%2F?queue=q&cacertfile=/etc/ca.pem&certfile=/c.pem&keyfile=/c.key";
        let u = Url::parse(text).expect("valid");
        assert_eq!(u.to_string(), text.replace("u:p@", "u:***@"));
        let c = crate::AmqpConfig::from_url(text).expect("valid");
        assert_eq!(
            c.url.tls_files.ca_file(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            c.url.tls_files.client_cert().map(|c| c.cert_file),
            Some("/c.pem".into())
        );
        assert_eq!(part("amqps://h/%2F?certfile=/c.pem"), "query certfile");
        assert_eq!(
            part("amqps://h/%2F?keyfile=/c.key&keyfile=/d.key"),
            "query keyfile"
        );
        let plain = crate::AmqpConfig::from_url("amqp://h/%2F?cacertfile=/ca.pem").expect("url");
        assert!(
            matches!(
                plain.validate(),
                Err(ConfigError::Invalid {
                    field: "tls_ca_file",
                    ..
                })
            ),
            "{:?}",
            plain.validate()
        );
    }

    #[test]
    fn defaults() {
        let u = Url::parse("amqp://localhost").expect("valid");
        assert_eq!(
            (u.port(), u.vhost.as_str(), u.username.as_str()),
            (5672, "/", "guest")
        );
        assert_eq!(Url::parse("amqps://h").expect("valid").port(), 5671);
        assert_eq!(Url::parse("amqp://h/%2f").expect("valid").vhost, "/");
        assert_eq!(Url::parse("amqp://h/").expect("valid").vhost, "");
        let v6 = Url::parse("amqp://u:p@[::1]:5673/v").expect("valid");
        assert_eq!((v6.host(), v6.port()), ("::1", 5673));
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
        // Nor a user name holding `/` and `?` that could be read as a path and a query (it
        // was: the host `CORP` with an unknown parameter, quoted, password and all), nor a
        // query parameter that is no name.
        for url in [
            "amqp://CORP/app?x:hunter2@rabbit/%2F?queue=q",
            "amqp://rabbit/%2F?x:hunter2",
        ] {
            let e = AmqpConfig::from_url(url).expect_err("refused");
            assert!(!format!("{e} {e:?}").contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn a_password_with_slash_or_question_mark_parses_and_never_shows() {
        let u = Url::parse("amqp://app:hunter2/x@h/").expect("valid");
        assert_eq!(
            (u.username.as_str(), u.password.expose(), u.host()),
            ("app", "hunter2/x", "h")
        );
        assert_eq!((u.port(), u.vhost.as_str()), (5672, ""));
        // A password that starts like a port, then a `/`: also the host `app`, port 5672,
        // vhost `x@rabbit`; refused, and written with `%2F` it reads one way.
        let e = Url::parse("amqp://app:5672/x@rabbit").expect_err("ambiguous");
        assert!(!e.to_string().contains("5672/x"), "{e}");
        let u = Url::parse("amqp://app:5672%2Fx@rabbit").expect("valid");
        assert_eq!(
            (u.password.expose(), u.host(), u.vhost.as_str()),
            ("5672/x", "rabbit", "/")
        );
        let u = Url::parse("amqps://app:a+b/c==?d@rabbit:5999/%2Fprod?heartbeat=5").expect("valid");
        assert_eq!(
            (u.password.expose(), u.host(), u.port()),
            ("a+b/c==?d", "rabbit", 5999)
        );
        assert_eq!((u.vhost.as_str(), u.heartbeat), ("/prod", Some(5)));
        // An `@` in the vhost is written `%40`: unescaped, it could end a user name holding
        // `/`, and is refused.
        let u = Url::parse("amqp://h/x%40y").expect("valid");
        assert_eq!((u.host(), u.vhost.as_str()), ("h", "x@y"));
        Url::parse("amqp://h/x@y").expect_err("a user `h/x`, or a vhost?");
        for (url, secret) in [
            ("amqp://app:hunter2/x@h/", "hunter2"),
            ("amqp://app:5672%2Fx@rabbit", "5672/x"),
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
    fn the_query_split_matches_the_parser() {
        assert_eq!(split_query("amqp://h/v?a=1"), ("amqp://h/v", Some("a=1")));
        assert_eq!(split_query("amqp://h/v"), ("amqp://h/v", None));
        assert_eq!(
            split_query("amqp://u:p?x@h/v?a=1"),
            ("amqp://u:p?x@h/v", Some("a=1"))
        );
        assert_eq!(
            split_query("amqp://h/x%40y?a=1"),
            ("amqp://h/x%40y", Some("a=1"))
        );
        // What the parser reads as the query is what `split_query` returns as one.
        for url in [
            "amqp://u:p?x@h/v?heartbeat=7",
            "amqp://app:a+b/c==?d@rabbit:5999/%2Fprod?heartbeat=7",
            "amqp://h/x%40y?heartbeat=7",
        ] {
            assert_eq!(split_query(url).1, Some("heartbeat=7"), "{url}");
            assert_eq!(Url::parse(url).expect(url).heartbeat, Some(7), "{url}");
        }
    }

    #[test]
    fn an_unencoded_at_after_the_host_is_refused_not_read_as_part_of_the_password() {
        // Each could be read two ways: the user information ending at the first `@` (host
        // `rabbit`) or at the last one (a password running into the vhost or query, sent in
        // clear to the host `eu`). Refused, naming the problem, never echoing the password.
        for url in [
            "amqp://app:hunter2@rabbit/%2f?queue=billing@eu",
            "amqp://app:hunter2@rabbit:5672/%2F?heartbeat=10&routing_key=a@eu",
            "amqp://app:hunter2@rabbit/billing@eu",
            "amqp://app:hunter2@rabbit?queue=billing@eu",
            "amqps://app:hunter2@[::1]:5671/v?queue=a@eu",
            "amqp://app:hun@ter2@rabbit/%2f?queue=billing@eu",
            "amqp://app:hunter2@@rabbit/billing@eu",
        ] {
            let e = Url::parse(url).expect_err(url);
            assert!(
                matches!(
                    e,
                    ConfigError::Url {
                        part: "user information",
                        ..
                    }
                ),
                "{url}: {e:?}"
            );
            let text = format!("{e} {e:?}");
            assert!(text.contains("%40"), "{url}: says how to write it: {text}");
            for secret in ["hunter2", "ter2", "billing"] {
                assert!(!text.contains(secret), "{url}: {text}");
            }
            // The herald CLI's path: split, then parse the base. Same refusal.
            let (base, query) = split_query(url);
            assert_eq!((base, query), (url, None), "{url}: not split");
            assert!(AmqpConfig::from_url(base).is_err(), "{url}");
        }
        // Written as `%40`, each is what it meant.
        let u = Url::parse("amqp://app:hunter2@rabbit/billing%40eu").expect("valid");
        assert_eq!((u.host(), u.vhost.as_str()), ("rabbit", "billing@eu"));
        assert_eq!(u.password.expose(), "hunter2");
        let (base, query) = split_query("amqp://app:hun%40ter2@rabbit/%2f?queue=billing%40eu");
        assert_eq!(query, Some("queue=billing%40eu"));
        let u = Url::parse(base).expect("valid");
        assert_eq!((u.host(), u.password.expose()), ("rabbit", "hun@ter2"));
        // Unambiguous `@`s are still read as before: in the password only (the earlier `@`s
        // are followed by no host), or in the query of a URL without user information.
        let u = Url::parse("amqp://app:p@ss@rabbit/v").expect("valid");
        assert_eq!((u.password.expose(), u.host()), ("p@ss", "rabbit"));
        let u = Url::parse("amqp://app:se?cr/et@x@h:5672/%2F?heartbeat=3").expect("valid");
        assert_eq!((u.password.expose(), u.host()), ("se?cr/et@x", "h"));
        assert_eq!(u.heartbeat, Some(3));
        let (base, query) = split_query("amqp://h/x?queue=y@z");
        assert_eq!(query, Some("queue=y@z"));
        let u = Url::parse(base).expect("valid");
        assert_eq!((u.host(), u.vhost.as_str()), ("h", "x"));
    }

    #[test]
    fn every_query_parameter_is_known_to_the_parser() {
        for name in QUERY_PARAMETERS {
            let value = match *name {
                "shuffle_addresses" | "declare" => "true",
                "queue_type" => "quorum",
                _ => "1",
            };
            // The route's own rules want a queue beside declare / queue_type, an exchange
            // beside routing_key.
            let with = match *name {
                "declare" | "queue_type" => "&queue=q",
                "routing_key" => "&exchange=e",
                // A certificate goes with its key.
                "certfile" => "&keyfile=k",
                "keyfile" => "&certfile=c",
                _ => "",
            };
            let url = format!("amqp://h/?{name}={value}{with}");
            assert!(Url::parse(&url).is_ok(), "{url}: {:?}", Url::parse(&url));
        }
        let e = Url::parse("amqp://h/?nope=1").expect_err("unknown");
        assert!(e.to_string().contains(&QUERY_PARAMETERS.join(", ")), "{e}");
    }

    #[test]
    fn the_route_is_read_from_the_query_and_checked_as_a_whole() {
        let u =
            Url::parse("amqp://h/%2f?queue=a%20b&queue_type=quorum&declare=false").expect("valid");
        assert_eq!(
            u.route,
            Some(Route::Queue {
                name: "a b".into(),
                declare: false,
                quorum: true
            })
        );
        assert_eq!(u.to_string(), "amqp://guest:***@h:5672/%2F?queue=a%20b");
        let u = Url::parse("amqp://h/%2f?exchange=ev&routing_key=order.created").expect("valid");
        assert_eq!(
            u.route.as_ref().map(Route::destination),
            Some(crate::exchange("ev", "order.created"))
        );
        assert_eq!(
            Url::parse("amqp://h/?exchange=fan").expect("valid").route,
            Some(Route::Exchange {
                exchange: "fan".into(),
                routing_key: String::new()
            })
        );
        assert_eq!(Url::parse("amqp://h/%2f").expect("valid").route, None);
        for (url, named) in [
            ("amqp://h/%2f?queue=a&exchange=b", "query"),
            ("amqp://h/%2f?queue=", "query queue"),
            ("amqp://h/%2f?exchange=", "query exchange"),
            ("amqp://h/%2f?queue=a&routing_key=b", "query routing_key"),
            ("amqp://h/%2f?queue=a&declare=maybe", "query declare"),
            ("amqp://h/%2f?queue=a&queue_type=stream", "query queue_type"),
            ("amqp://h/%2f?exchange=e&queue_type=quorum", "query"),
            ("amqp://h/%2f?routing_key=k", "query"),
            (
                "amqp://h/%2f?queue=a&shuffle_addresses=yes",
                "query shuffle_addresses",
            ),
            ("amqp://h/%2f?queue=a&nope=1", "query"),
        ] {
            assert_eq!(part(url), named, "{url}");
        }
        let long = "q".repeat(256);
        assert_eq!(part(&format!("amqp://h/?queue={long}")), "query queue");
        let e = Url::parse("amqp://h/?queue=a&nope=1").expect_err("unknown");
        assert!(e.to_string().contains("`nope`"), "{e}");
        assert!(
            Url::parse("amqp://h/?shuffle_addresses=true")
                .expect("valid")
                .shuffle_addresses
        );
    }

    #[test]
    fn address_lists_are_read_in_order_and_shown_without_the_password() {
        let u = Url::parse("amqp://app:s3cret@h1:5673, h2 ,[::1]:5674/%2Fprod?heartbeat=5")
            .expect("valid list");
        let listed: Vec<(&str, u16)> = u
            .endpoints
            .iter()
            .map(|e| (e.host.as_str(), e.port))
            .collect();
        assert_eq!(listed, [("h1", 5673), ("h2", 5672), ("::1", 5674)]);
        assert_eq!(
            u.to_string(),
            "amqp://app:***@h1:5673,h2:5672,[::1]:5674/%2Fprod"
        );
        assert_eq!(u.to_lapin(&u.endpoints[1]).authority.host, "h2");
        assert_eq!(u.heartbeat, Some(5));
    }

    #[test]
    fn a_bad_entry_of_a_list_is_named_and_duplicates_are_refused() {
        let reason = |url: &str| match Url::parse(url) {
            Err(ConfigError::Url { part, reason }) => format!("{part}: {reason}"),
            other => panic!("{url}: expected an error, got {other:?}"),
        };
        let r = reason("amqp://u:pw-secret@h1:5672,h2:notaport/");
        assert!(
            r.starts_with("port:") && r.contains("address 2 of the list (`h2:notaport`)"),
            "{r}"
        );
        assert!(!r.contains("pw-secret"), "{r}");
        let r = reason("amqp://u:pw-secret@h1,,h3/");
        assert!(r.starts_with("host:") && r.contains("address 2"), "{r}");
        let r = reason("amqp://u:pw-secret@h1:5672,h1/");
        assert!(r.contains("lists `h1:5672` twice"), "{r}");
        assert!(!r.contains("pw-secret"), "{r}");
        // One address: the error reads as before, with no list position.
        assert_eq!(
            reason("amqp://h:0/"),
            "port: is not a port number (1-65535)"
        );
    }

    #[test]
    fn escapes_are_two_hex_digits_or_refused() {
        assert_eq!(percent_decode("a%2Fb%2f%40").as_deref(), Ok("a/b/@"));
        // `u8::from_str_radix` took a sign: "%+1" used to decode as byte 1.
        for bad in ["%+1", "%-1", "%1", "%", "%zz", "a%2"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
        assert_eq!(
            percent_decode("%FF"),
            Err("is not UTF-8 once decoded".to_owned())
        );
        assert_eq!(percent_encode("a/b c~é"), "a%2Fb%20c~%C3%A9");
    }
}
