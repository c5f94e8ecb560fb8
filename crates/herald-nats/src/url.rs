//! The URL form of the settings,
//! `nats://[user:password@]host:port[,host:port...]/SUBJECT?stream=NAME` (`tls://` for TLS):
//! parsed with the password (or token) kept out of every printout.
//!
//! Parsed by hand, not with the `url` crate: a list of servers in the authority
//! (`h1:4222,h2:4222`) is no RFC 3986 authority, and the `url` crate refuses it (the port of
//! `h1:4222,h2` is not a number). The rules are herald-amqp's: percent-escapes in the user,
//! password, token, subject and stream name; a password may hold an unencoded `/`, `?` or `@`
//! unless that makes the URL read two ways, which is refused rather than guessed.

use std::fmt;

use crate::destination::{validate_stream_name, validate_subject};
use crate::error::ConfigError;

/// The query parameters a NATS URL takes: `stream` (the JetStream stream to create, if it does
/// not exist, to capture the URL's subject).
pub const QUERY_PARAMETERS: &[&str] = &["stream"];

/// The port of a server given without one.
pub const DEFAULT_PORT: u16 = 4222;

/// The user information of a URL could end at more than one `@`.
#[derive(Debug)]
struct Ambiguous;

/// Where the user information of `rest` (a URL after its `scheme://`) ends: the index of the
/// `@` that closes it, if it has one. An `@` can end it when what precedes it starts with a
/// user name free of `/` and `?` and what follows it, up to the next `/`, `?` or the end, holds
/// no `@` (could be a host list). More than one such `@` is ambiguous (herald-amqp's rule: a
/// wrong guess would send part of the URL as a password to another host).
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

/// A password or token: never printed, not in `Debug`, not in `Display`, not in errors.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// How the client authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// No user information in the URL.
    None,
    /// `user:password@`.
    UserPassword { user: String, password: Secret },
    /// `token@` (a user information without `:` is a token, as in every NATS client).
    Token(Secret),
}

impl Credentials {
    /// What the client sends in its CONNECT.
    pub(crate) fn to_auth(&self) -> async_nats::Auth {
        let mut auth = async_nats::Auth::new();
        match self {
            Self::None => {}
            Self::UserPassword { user, password } => {
                auth.username = Some(user.clone());
                auth.password = Some(password.0.clone());
            }
            Self::Token(token) => auth.token = Some(token.0.clone()),
        }
        auth
    }
}

/// One server of the list.
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

impl Endpoint {
    /// The address async-nats connects to: `nats://host:port` or `tls://host:port`, without
    /// credentials (those go through the auth callback).
    pub(crate) fn server_addr(&self, tls: bool) -> String {
        format!("{}://{self}", if tls { "tls" } else { "nats" })
    }
}

/// The servers and where to publish, parsed from a URL. The secret is kept out of `Debug` and
/// `Display`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Url {
    pub(crate) tls: bool,
    pub(crate) credentials: Credentials,
    /// The servers to try, in the order given (at least one, no two alike).
    pub(crate) endpoints: Vec<Endpoint>,
    /// The URL's path: the subject its messages go to.
    pub(crate) subject: Option<String>,
    /// `?stream=NAME`: the stream to create for the subject.
    pub(crate) stream: Option<String>,
}

impl Url {
    /// Parses `nats|tls://[user:password@|token@]host[:port][,host[:port]...][/subject][?stream=NAME]`.
    /// The error names the part that is wrong, never the password or token.
    pub(crate) fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |part: &'static str, reason: String| ConfigError::Url { part, reason };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad(
                "scheme",
                "is missing: expected `nats://` or `tls://` at the start".into(),
            )
        })?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "nats" => false,
            "tls" => true,
            other => return Err(bad("scheme", format!("`{other}` is not `nats` or `tls`"))),
        };
        let (userinfo, after) = match userinfo_end(rest) {
            Ok(Some(at)) => (Some(&rest[..at]), &rest[at + 1..]),
            Ok(None) => (None, rest),
            Err(Ambiguous) => return Err(bad(
                "user information",
                "is ambiguous: more than one `@` could end it and start the host list (an `@` in the subject or a query value, or in the password before a `/` or `?`); write every `@` but the one before the hosts as `%40`".into(),
            )),
        };
        let (after, query) = match after.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (after, None),
        };
        let (hostlist, path) = match after.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (after, None),
        };
        let credentials = match userinfo {
            None => Credentials::None,
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => {
                    let user = percent_decode(user).map_err(|r| bad("user", r))?;
                    if user.is_empty() {
                        return Err(bad(
                            "user",
                            "is empty (a token goes alone: nats://TOKEN@host)".into(),
                        ));
                    }
                    // The reason names the bad escape only, which is not the password.
                    let password = percent_decode(pass)
                        .map_err(|_| bad("password", "contains an invalid %-escape".into()))?;
                    Credentials::UserPassword {
                        user,
                        password: Secret(password),
                    }
                }
                None => {
                    let token = percent_decode(u)
                        .map_err(|_| bad("token", "contains an invalid %-escape".into()))?;
                    if token.is_empty() {
                        return Err(bad("token", "is empty".into()));
                    }
                    Credentials::Token(Secret(token))
                }
            },
        };
        let endpoints = parse_endpoints(hostlist)?;
        let subject = match path {
            None | Some("") => None,
            Some(p) => {
                let s = percent_decode(p).map_err(|r| bad("subject", r))?;
                validate_subject(&s).map_err(|r| bad("subject", r))?;
                Some(s)
            }
        };
        let mut stream = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "stream" => {
                    if stream.is_some() {
                        return Err(bad("query stream", "is given twice".into()));
                    }
                    let name = percent_decode(v).map_err(|r| bad("query stream", r))?;
                    validate_stream_name(&name).map_err(|r| bad("query stream", r))?;
                    stream = Some(name);
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
        if stream.is_some() && subject.is_none() {
            return Err(bad(
                "query stream",
                "needs a subject in the path (nats://host:4222/SUBJECT?stream=NAME): the stream is created to capture it".into(),
            ));
        }
        Ok(Self {
            tls,
            credentials,
            endpoints,
            subject,
            stream,
        })
    }
}

/// `nats://user:***@host:port[,host:port...]/subject?stream=NAME`: safe to log.
impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "tls" } else { "nats" };
        write!(f, "{scheme}://")?;
        match &self.credentials {
            Credentials::None => {}
            Credentials::UserPassword { user, .. } => write!(f, "{}:***@", percent_encode(user))?,
            Credentials::Token(_) => f.write_str("***@")?,
        }
        let hosts: Vec<String> = self.endpoints.iter().map(Endpoint::to_string).collect();
        f.write_str(&hosts.join(","))?;
        if let Some(subject) = &self.subject {
            write!(f, "/{}", percent_encode(subject))?;
        }
        if let Some(stream) = &self.stream {
            write!(f, "?stream={}", percent_encode(stream))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Parses `host[:port][,host[:port]...]` (an IPv6 address in brackets, the port 4222 by
/// default). An entry that is wrong is named by its position and text (the user information is
/// split off before, so no secret can be in it); a server given twice is refused.
pub(crate) fn parse_endpoints(list: &str) -> Result<Vec<Endpoint>, ConfigError> {
    let entries: Vec<&str> = list.split(',').collect();
    let many = entries.len() > 1;
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(entries.len());
    for (n, entry) in entries.iter().enumerate() {
        let named = |e: ConfigError| match e {
            ConfigError::Url { part, reason } if many => ConfigError::Url {
                part,
                reason: format!("{reason}, in server {} of the list (`{entry}`)", n + 1),
            },
            other => other,
        };
        let endpoint = parse_endpoint(entry.trim()).map_err(named)?;
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

fn parse_endpoint(hostport: &str) -> Result<Endpoint, ConfigError> {
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
            None if after.is_empty() => DEFAULT_PORT,
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
            None => (hostport.to_owned(), DEFAULT_PORT),
        }
    };
    if host.is_empty() {
        return Err(bad("host", "is empty"));
    }
    if host.contains(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@' | '[')) {
        return Err(bad("host", "holds a character a host name cannot hold"));
    }
    Ok(Endpoint { host, port })
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

/// Decodes `%XX` escapes in one part of the URL. The error says what is wrong, never the input
/// (which may be a password). A `%` not followed by two hex digits is refused.
fn percent_decode(s: &str) -> Result<String, String> {
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

fn percent_encode(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, ESCAPED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NatsConfig;

    fn part(url: &str) -> &'static str {
        match Url::parse(url) {
            Err(ConfigError::Url { part, .. }) => part,
            other => panic!("{url}: expected a URL error, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_full_form() {
        let u = Url::parse("nats://app%40x:p%3Ass@h1:5222,h2,[::1]:4223/orders.eu?stream=ORDERS")
            .expect("valid");
        assert!(!u.tls);
        assert_eq!(
            u.credentials,
            Credentials::UserPassword {
                user: "app@x".into(),
                password: Secret("p:ss".into())
            }
        );
        let listed: Vec<(&str, u16)> = u
            .endpoints
            .iter()
            .map(|e| (e.host.as_str(), e.port))
            .collect();
        assert_eq!(listed, [("h1", 5222), ("h2", 4222), ("::1", 4223)]);
        assert_eq!(u.subject.as_deref(), Some("orders.eu"));
        assert_eq!(u.stream.as_deref(), Some("ORDERS"));
        assert_eq!(u.endpoints[2].server_addr(false), "nats://[::1]:4223");
        let auth = u.credentials.to_auth();
        assert_eq!(
            (auth.username.as_deref(), auth.password.as_deref()),
            (Some("app@x"), Some("p:ss"))
        );
    }

    #[test]
    fn defaults_tokens_and_tls() {
        let u = Url::parse("nats://localhost").expect("valid");
        assert_eq!(u.endpoints[0].port, 4222);
        assert_eq!((u.subject.as_deref(), u.stream.as_deref()), (None, None));
        assert_eq!(u.credentials, Credentials::None);
        assert_eq!(Url::parse("nats://h/").expect("valid").subject, None);
        let u = Url::parse("TLS://s3cr3t-token@h:4443/a.b").expect("valid");
        assert!(u.tls);
        assert_eq!(
            u.credentials,
            Credentials::Token(Secret("s3cr3t-token".into()))
        );
        assert_eq!(u.endpoints[0].server_addr(true), "tls://h:4443");
        assert_eq!(
            u.credentials.to_auth().token.as_deref(),
            Some("s3cr3t-token")
        );
        assert_eq!(u.to_string(), "tls://***@h:4443/a.b");
    }

    #[test]
    fn malformed_urls_name_the_part() {
        assert_eq!(part("http://h"), "scheme");
        assert_eq!(part("h:4222"), "scheme");
        assert_eq!(part("nats://h:notaport"), "port");
        assert_eq!(part("nats://h:70000"), "port");
        assert_eq!(part("nats://h:0"), "port");
        assert_eq!(part("nats://u:p@:4222"), "host");
        assert_eq!(part("nats://[::1/x"), "host");
        assert_eq!(part("nats://h/orders.*"), "subject");
        assert_eq!(part("nats://h/orders..eu"), "subject");
        assert_eq!(part("nats://h/%zz"), "subject");
        assert_eq!(part("nats://u%zz:p@h"), "user");
        assert_eq!(part("nats://:p@h"), "user");
        assert_eq!(part("nats://u:p%zz@h"), "password");
        assert_eq!(part("nats://t%zz@h"), "token");
        assert_eq!(part("nats://h/s?nope=1"), "query");
        assert_eq!(part("nats://h/s?stream=a.b"), "query stream");
        assert_eq!(part("nats://h/s?stream="), "query stream");
        assert_eq!(part("nats://h/s?stream=A&stream=B"), "query stream");
        assert_eq!(part("nats://h?stream=A"), "query stream");
        assert_eq!(part("nats://h/?stream=A"), "query stream");
    }

    #[test]
    fn the_password_or_token_never_shows() {
        let secret = "hunter2-very-secret";
        let config =
            NatsConfig::from_url(&format!("nats://app:{secret}@h:4222/orders?stream=ORDERS"))
                .expect("valid");
        for text in [
            format!("{config:?}"),
            format!("{:?}", config.url),
            config.redacted_url(),
        ] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(
            config.redacted_url(),
            "nats://app:***@h:4222/orders?stream=ORDERS"
        );
        let token = NatsConfig::from_url(&format!("nats://{secret}@h")).expect("valid");
        assert!(!format!("{token:?}").contains(secret));
        assert_eq!(token.redacted_url(), "nats://***@h:4222");
        // Malformed parts next to a secret never echo it.
        for url in [
            "nats://app:hunter2%zz@h",
            "nats://app:hunter2@h:x",
            "nats://app:hunter2@h/a..b",
            "nats://app:hunter2@h/a?stream=x.y",
            "nats://app:hunter2@h/a?nope=1",
            "nats://hunter2%zz@h",
            "nats://app:hunter2/x@h:port",
            "nats://app:hunter2@h1,h1",
        ] {
            let e = Url::parse(url).expect_err(url);
            assert!(!format!("{e} {e:?}").contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn a_password_with_slash_or_question_mark_parses() {
        let u = Url::parse("nats://app:a+b/c==?d@h:4222/orders?stream=S").expect("valid");
        assert_eq!(
            u.credentials,
            Credentials::UserPassword {
                user: "app".into(),
                password: Secret("a+b/c==?d".into())
            }
        );
        assert_eq!(
            (u.subject.as_deref(), u.stream.as_deref()),
            (Some("orders"), Some("S"))
        );
        // An `@` in the subject, without user information, stays in the subject.
        let u = Url::parse("nats://h/orders@eu").expect("valid");
        assert_eq!(u.subject.as_deref(), Some("orders@eu"));
        // Both: ambiguous, refused, saying how to write it.
        let e = Url::parse("nats://app:hunter2@h/orders@eu").expect_err("ambiguous");
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
        let u = Url::parse("nats://app:hunter2@h/orders%40eu").expect("valid");
        assert_eq!(u.subject.as_deref(), Some("orders@eu"));
    }

    #[test]
    fn a_bad_entry_of_a_list_is_named_and_duplicates_are_refused() {
        let reason = |url: &str| match Url::parse(url) {
            Err(ConfigError::Url { part, reason }) => format!("{part}: {reason}"),
            other => panic!("{url}: expected an error, got {other:?}"),
        };
        let r = reason("nats://u:pw-secret@h1:4222,h2:notaport/s");
        assert!(
            r.starts_with("port:") && r.contains("server 2 of the list (`h2:notaport`)"),
            "{r}"
        );
        assert!(!r.contains("pw-secret"), "{r}");
        let r = reason("nats://h1,,h3");
        assert!(r.starts_with("host:") && r.contains("server 2"), "{r}");
        let r = reason("nats://h1:4222,h1");
        assert!(r.contains("lists `h1:4222` twice"), "{r}");
        assert_eq!(reason("nats://h:0"), "port: is not a port number (1-65535)");
    }

    #[test]
    fn the_display_form_parses_back_to_the_same_url() {
        for url in [
            "nats://h:4222",
            "nats://app:***@h1:4222,[::1]:4223/orders.eu?stream=ORDERS",
            "tls://***@h:4443/a%40b",
        ] {
            let u = Url::parse(url).expect(url);
            assert_eq!(u.to_string(), url);
        }
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
        assert_eq!(percent_decode("%41%2f").as_deref(), Ok("A/"));
        for bad in ["%+1", "%1", "%", "%zz"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
    }
}
