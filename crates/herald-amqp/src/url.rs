//! The URL form of the settings, `amqp[s]://user:password@host:port/vhost?query`: parsed with
//! the password kept out of every printout, and the percent-encoding of its parts.

use std::fmt;

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};

use crate::error::ConfigError;

/// The query parameters an AMQP URL takes: `heartbeat` (s), `connection_timeout` (ms),
/// `channel_max`, `frame_max`. A program that adds parameters of its own to the URL keeps
/// these for [`AmqpConfig::from_url`](crate::AmqpConfig::from_url) (see [`split_query`]).
pub const QUERY_PARAMETERS: &[&str] = &[
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
];

/// The user information of a URL could end at more than one `@`.
#[derive(Debug)]
struct Ambiguous;

/// Where the user information of `rest` (a URL after its `scheme://`) ends: the index of the
/// `@` that closes it, if it has one.
///
/// A password may hold an unencoded `/`, `?` or `@` (base64 passwords often do), so the URL is
/// not split on `/` or `?` before the user information is found. Instead, an `@` can end the
/// user information when what precedes it starts with a user name (the text before the first
/// `:`) free of `/` and `?`, and what follows it, up to the next `/`, `?` or the end, could be
/// a host (it holds no `@`). Exactly one such `@`: it ends the user information. None: there
/// is none. More than one: the URL reads two ways, for example
/// `amqp://u:p@rabbit/%2f?queue=billing@eu` is the host `rabbit` or, with the password
/// `p@rabbit/%2f?queue=billing`, the host `eu`; it is refused rather than guessed, since a
/// wrong guess sends part of the URL as a password to another host.
fn userinfo_end(rest: &str) -> Result<Option<usize>, Ambiguous> {
    let mut end = None;
    for (at, _) in rest.match_indices('@') {
        let user = rest[..at].split(':').next().unwrap_or("");
        let after = &rest[at + 1..];
        let host = &after[..after.find(['/', '?']).unwrap_or(after.len())];
        if user.contains(['/', '?']) || host.contains('@') {
            continue;
        }
        if end.replace(at).is_some() {
            return Err(Ambiguous);
        }
    }
    Ok(end)
}

/// Splits an AMQP URL where its query starts: what comes before the `?`, and the query after
/// it. The `?` is found exactly as [`AmqpConfig::from_url`](crate::AmqpConfig::from_url) finds
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
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let Ok(end) = userinfo_end(&url[after_scheme..]) else {
        return (url, None);
    };
    let from = after_scheme + end.map_or(0, |at| at + 1);
    match url[from..].find('?') {
        Some(q) => (&url[..from + q], Some(&url[from + q + 1..])),
        None => (url, None),
    }
}

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
    /// The brokers to try, in the order given (at least one, no two alike).
    pub(crate) endpoints: Vec<Endpoint>,
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
        let (userinfo, after) = match userinfo_end(rest) {
            Ok(Some(at)) => (Some(&rest[..at]), &rest[at + 1..]),
            Ok(None) => (None, rest),
            Err(Ambiguous) => return Err(bad(
                "user information",
                "is ambiguous: more than one `@` could end it and start the host (an `@` in the vhost or a query value, or in the password before a `/` or `?`); write every `@` but the one before the host as `%40`".into(),
            )),
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
        let endpoints = parse_endpoints(hostport, default_port)?;
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
            endpoints,
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
                    password: self.password.0.clone(),
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
        )
    }
}

/// One broker of an address list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// `host:port`, with an IPv6 address in brackets.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `host[:port][,host[:port]...]` (an IPv6 address in brackets). An entry that is wrong
/// is named by its position and text (user information is split off before, so no password
/// can be in it); an address given twice is refused.
pub(crate) fn parse_endpoints(list: &str, default_port: u16) -> Result<Vec<Endpoint>, ConfigError> {
    let entries: Vec<&str> = list.split(',').collect();
    let many = entries.len() > 1;
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(entries.len());
    for (n, entry) in entries.iter().enumerate() {
        let named = |e: ConfigError| match e {
            ConfigError::Url { part, reason } if many => ConfigError::Url {
                part,
                reason: format!("{reason}, in address {} of the list (`{entry}`)", n + 1),
            },
            other => other,
        };
        let endpoint = parse_endpoint(entry.trim(), default_port).map_err(named)?;
        if endpoints.contains(&endpoint) {
            return Err(ConfigError::Url {
                part: "host",
                reason: format!("lists `{endpoint}` twice"),
            });
        }
        endpoints.push(endpoint);
    }
    Ok(endpoints)
}

fn parse_endpoint(hostport: &str, default_port: u16) -> Result<Endpoint, ConfigError> {
    let bad = |part: &'static str, reason: &str| ConfigError::Url {
        part,
        reason: reason.to_owned(),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("host", "an IPv6 address misses its `]`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => {
                return Err(bad(
                    "port",
                    "has unexpected text after the IPv6 address (expected `:port`)",
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
        return Err(bad("host", "is empty"));
    }
    Ok(Endpoint { host, port })
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
/// never the input, which may be a password. A `%` not followed by two hex digits is refused
/// (the `percent-encoding` crate would pass it through as text).
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let malformed = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err("holds an invalid %-escape".to_owned());
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| "is not UTF-8 once decoded".to_owned())
}

/// Everything but ASCII letters, digits and `-_.~` (RFC 3986's unreserved characters).
const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Escapes everything but ASCII letters, digits and `-_.~`, for one part of an AMQP URL (`/`
/// becomes `%2F`).
pub fn percent_encode(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, ESCAPED).to_string()
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
        assert_eq!(u.password.0, "p:ss");
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
    }

    #[test]
    fn a_password_with_slash_or_question_mark_parses_and_never_shows() {
        let u = Url::parse("amqp://app:hunter2/x@h/").expect("valid");
        assert_eq!(
            (u.username.as_str(), u.password.0.as_str(), u.host()),
            ("app", "hunter2/x", "h")
        );
        assert_eq!((u.port(), u.vhost.as_str()), (5672, ""));
        let u = Url::parse("amqp://app:5672/x@rabbit").expect("valid");
        assert_eq!(
            (u.password.0.as_str(), u.host(), u.vhost.as_str()),
            ("5672/x", "rabbit", "/")
        );
        let u = Url::parse("amqps://app:a+b/c==?d@rabbit:5999/%2Fprod?heartbeat=5").expect("valid");
        assert_eq!(
            (u.password.0.as_str(), u.host(), u.port()),
            ("a+b/c==?d", "rabbit", 5999)
        );
        assert_eq!((u.vhost.as_str(), u.heartbeat), ("/prod", Some(5)));
        // An `@` in the vhost, without userinfo, stays in the vhost.
        let u = Url::parse("amqp://h/x@y").expect("valid");
        assert_eq!((u.host(), u.vhost.as_str()), ("h", "x@y"));
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
    fn the_query_split_matches_the_parser() {
        assert_eq!(split_query("amqp://h/v?a=1"), ("amqp://h/v", Some("a=1")));
        assert_eq!(split_query("amqp://h/v"), ("amqp://h/v", None));
        assert_eq!(
            split_query("amqp://u:p?x@h/v?a=1"),
            ("amqp://u:p?x@h/v", Some("a=1"))
        );
        assert_eq!(
            split_query("amqp://h/x@y?a=1"),
            ("amqp://h/x@y", Some("a=1"))
        );
        // What the parser reads as the query is what `split_query` returns as one.
        for url in [
            "amqp://u:p?x@h/v?heartbeat=7",
            "amqp://app:a+b/c==?d@rabbit:5999/%2Fprod?heartbeat=7",
            "amqp://h/x@y?heartbeat=7",
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
        assert_eq!(u.password.0, "hunter2");
        let (base, query) = split_query("amqp://app:hun%40ter2@rabbit/%2f?queue=billing%40eu");
        assert_eq!(query, Some("queue=billing%40eu"));
        let u = Url::parse(base).expect("valid");
        assert_eq!((u.host(), u.password.0.as_str()), ("rabbit", "hun@ter2"));
        // Unambiguous `@`s are still read as before: in the password only (the earlier `@`s
        // are followed by no host), or in the vhost of a URL without user information.
        let u = Url::parse("amqp://app:p@ss@rabbit/v").expect("valid");
        assert_eq!((u.password.0.as_str(), u.host()), ("p@ss", "rabbit"));
        let u = Url::parse("amqp://app:se?cr/et@x@h:5672/%2F?heartbeat=3").expect("valid");
        assert_eq!((u.password.0.as_str(), u.host()), ("se?cr/et@x", "h"));
        assert_eq!(u.heartbeat, Some(3));
        let u = Url::parse("amqp://h/x@y@z").expect("valid");
        assert_eq!((u.host(), u.vhost.as_str()), ("h", "x@y@z"));
    }

    #[test]
    fn every_query_parameter_is_known_to_the_parser() {
        for name in QUERY_PARAMETERS {
            assert!(Url::parse(&format!("amqp://h/?{name}=1")).is_ok(), "{name}");
        }
        let e = Url::parse("amqp://h/?nope=1").expect_err("unknown");
        assert!(e.to_string().contains(&QUERY_PARAMETERS.join(", ")), "{e}");
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
