//! The parts of a broker URL that every adapter reads the same way:
//! `scheme://[userinfo@]host[:port][,host[:port]...][/path][?query]`.
//!
//! Adapters parse their own URLs (each broker has its own path, query and defaults) from these
//! pieces, so that the hard rules are written once: where the user information ends when a
//! password holds an unencoded `/`, `?` or `@`, a list of servers in the authority (which no
//! RFC 3986 parser accepts: the `url` crate reads `h1:4222,h2` as a bad port), percent-escapes
//! that must be two hex digits, and passwords that never show.

use std::fmt;

/// A part of a URL that is wrong, and why. The reason never holds a password or token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("URL {part} {reason}")]
pub struct UrlError {
    /// The part: `scheme`, `user information`, `user`, `password`, `host`, `port`, `query`,
    /// or one the adapter names (`vhost`, `subject`, `query stream`).
    pub part: &'static str,
    /// What is wrong with it, and how to write it instead.
    pub reason: String,
}

impl UrlError {
    /// `part` is wrong for `reason`.
    pub fn new(part: &'static str, reason: impl Into<String>) -> Self {
        Self {
            part,
            reason: reason.into(),
        }
    }
}

/// A password or token: never printed, not in `Debug`, not in `Display`, not in errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Keeps `secret`.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the client that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A URL cut into its parts, nothing decoded yet. No `Debug`: the user information may hold a
/// password.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Parts<'a> {
    /// The scheme, as written (compare it case-insensitively).
    pub scheme: &'a str,
    /// What precedes the `@` before the hosts, if anything does.
    pub userinfo: Option<&'a str>,
    /// `host[:port][,host[:port]...]`.
    pub hosts: &'a str,
    /// Everything after the first `/` that follows the hosts, up to the `?` (it may hold more
    /// `/`: an MQTT topic does).
    pub path: Option<&'a str>,
    /// Everything after the `?`.
    pub query: Option<&'a str>,
}

/// Cuts `url` into its [`Parts`]. `expected` names the schemes for the error when there is
/// none (say "`amqp://` or `amqps://`").
///
/// A password may hold an unencoded `/`, `?` or `@` (base64 passwords often do), so the URL is
/// not split on `/` or `?` before the user information is found; a URL where more than one `@`
/// could end it is refused (see [`userinfo_end`]).
///
/// ```
/// let p = herald_core::url::split("amqp://app:s3/cr?t@h1:5672,h2/%2F?heartbeat=10", "`amqp://`")
///     .unwrap();
/// assert_eq!((p.scheme, p.userinfo), ("amqp", Some("app:s3/cr?t")));
/// assert_eq!((p.hosts, p.path, p.query), ("h1:5672,h2", Some("%2F"), Some("heartbeat=10")));
/// ```
pub fn split<'a>(url: &'a str, expected: &str) -> Result<Parts<'a>, UrlError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        UrlError::new(
            "scheme",
            format!("is missing: expected {expected} at the start"),
        )
    })?;
    let (userinfo, after) = match userinfo_end(rest) {
        Ok(Some(at)) => (Some(&rest[..at]), &rest[at + 1..]),
        Ok(None) => (None, rest),
        Err(Ambiguous) => return Err(UrlError::new(
            "user information",
            "is ambiguous: the URL reads two ways, with the hosts after one `@` or another, or with no user information at all (an `@` in the path or a query value, a user name or token holding `/`, a password that starts like a port); write every `@` but the one before the hosts as `%40`, and a `/` or `?` in a user name, token or password as `%2F` or `%3F`",
        )),
    };
    let (after, query) = match after.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (after, None),
    };
    let (hosts, path) = match after.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (after, None),
    };
    Ok(Parts {
        scheme,
        userinfo,
        hosts,
        path,
        query,
    })
}

/// The user information of a URL could end at more than one `@`.
#[derive(Debug)]
pub struct Ambiguous;

/// Where the user information of `rest` (a URL after its `scheme://`) ends: the index of the
/// `@` that closes it, if it has one.
///
/// An `@` can end the user information when what precedes it starts with a user name (the text
/// before the first `:`) free of `/` and `?`, and what follows it, up to the next `/`, `?` or
/// the end, could be a host list (it holds no `@`). Exactly one such `@`: it ends the user
/// information. None: there is none. More than one: the URL reads two ways, for example
/// `amqp://u:p@rabbit/%2f?queue=billing@eu` is the host `rabbit` or, with the password
/// `p@rabbit/%2f?queue=billing`, the host `eu`; it is refused rather than guessed, since a
/// wrong guess sends part of the URL as a password to another host.
///
/// An `@` can also be read as part of the path or query of a URL without user information,
/// and is refused when that reading is as good:
/// - its user name holds a `/` or a `?` and the `@` comes before the query, or a `:` does (a
///   password may hold the `?`), or no path does: `nats://abc/def@h1:4222` is a token
///   `abc/def` (base64 tokens hold `/`) for the host `h1`, or the host `abc` and the subject
///   `def@h1:4222`;
/// - it is in the query, and the parameter holding it has no `=` before a `:`:
///   `amqp://corp/app?x:secret@rabbit/%2f` is the user `corp/app?x` with the password `secret`
///   for the host `rabbit`, or the host `corp` with a parameter `x:secret@rabbit/%2f`;
/// - what precedes the first `/` or `?` is a host list as well as a user and password:
///   `amqp://rabbit:5672/%2f?queue=billing@eu` is the host `rabbit` with a queue
///   `billing@eu`, or the user `rabbit` with the password `5672/%2f?queue=billing` for the
///   host `eu`.
///
/// Read the wrong way, a token or password goes to another host (or its DNS lookup) and shows
/// in every printout of the URL. A path's or query's `@` is written `%40`, a `/` or `?` in a
/// user name, token or password `%2F` or `%3F`. An `@` in the query of a URL with a path and
/// without user information or a port (`amqp://rabbit/%2f?queue=billing@eu`) reads one way,
/// and stays in the query.
pub fn userinfo_end(rest: &str) -> Result<Option<usize>, Ambiguous> {
    let mut end = None;
    let query = rest.find('?').unwrap_or(rest.len());
    // What a URL without user information would take for its hosts.
    let lead = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    for (at, _) in rest.match_indices('@') {
        let before = &rest[..at];
        let user = before.split(':').next().unwrap_or("");
        let after = &rest[at + 1..];
        let host = &after[..after.find(['/', '?']).unwrap_or(after.len())];
        if host.contains('@') {
            continue;
        }
        if user.contains(['/', '?']) {
            // The `@` is in the query of a URL without user information only if a path comes
            // before the query, no `:` does (a password may hold the `?`), and the query's
            // parameter that holds it has its `=` before any `:` (`x:secret@host` after a `?`
            // is a user and password as much as a parameter).
            let colon_first = before.find(':').is_some_and(|c| c < query);
            let path_first = rest[..query].contains('/');
            let item = &before[before.rfind(['?', '&']).map_or(0, |i| i + 1)..];
            let named = item
                .find('=')
                .is_some_and(|eq| item.find(':').is_none_or(|c| eq < c));
            if at < query || colon_first || !path_first || !named {
                return Err(Ambiguous);
            }
            continue;
        }
        if lead.len() < at && is_host_list(lead) {
            return Err(Ambiguous);
        }
        if end.replace(at).is_some() {
            return Err(Ambiguous);
        }
    }
    Ok(end)
}

/// Whether `text` reads as `host[:port][,host[:port]...]` with numeric ports (`[v6]:port`
/// too): how a URL without user information would take it.
fn is_host_list(text: &str) -> bool {
    text.split(',').all(|entry| {
        let (host, port) = match entry.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((_, rest)) => ("v6", rest.strip_prefix(':')),
                None => return false,
            },
            None => match entry.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (entry, None),
            },
        };
        !host.is_empty()
            && port.is_none_or(|p| {
                !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
            })
    })
}

/// Splits a URL where its query starts: what comes before the `?`, and the query after it,
/// the `?` found exactly as [`split`] finds it, after the user information. A URL whose user
/// information is ambiguous is returned whole, with no query (its parser refuses it).
///
/// ```
/// use herald_core::url::split_query;
/// assert_eq!(
///     split_query("amqp://app:pa?ss@rabbit/%2F?heartbeat=10&queue=orders"),
///     ("amqp://app:pa?ss@rabbit/%2F", Some("heartbeat=10&queue=orders"))
/// );
/// assert_eq!(split_query("amqp://rabbit/%2F"), ("amqp://rabbit/%2F", None));
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

/// How an error names a query parameter nobody knows: quoted when it looks like a parameter's
/// name (letters, digits, `_`, `-`, `.`; at most 40), else not at all, since such a "name" is
/// more likely part of something else read as a query (a password, when the URL's user name
/// held a `?`).
pub fn unknown_parameter(name: &str) -> String {
    let plain = name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if plain {
        format!("parameter `{name}` is unknown")
    } else {
        "a parameter is unknown (its name is not shown: it holds characters no parameter name \
         has)"
            .to_owned()
    }
}

/// The query's `key=value` pairs in order, percent-decoded (a key without `=` has the value
/// `""`). The error names the key whose value is malformed.
pub fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, UrlError> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = percent_decode(k).map_err(|r| UrlError::new("query", r))?;
            let v = percent_decode(v)
                .map_err(|r| UrlError::new("query", format!("value of `{k}` {r}")))?;
            Ok((k, v))
        })
        .collect()
}

/// `user[:password]` split and percent-decoded. The password's error names the bad escape
/// only, never the password.
pub fn credentials(userinfo: &str) -> Result<(String, Option<Secret>), UrlError> {
    let (user, pass) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (userinfo, None),
    };
    let user = percent_decode(user).map_err(|r| UrlError::new("user", r))?;
    let password = pass
        .map(|p| {
            percent_decode(p)
                .map(Secret)
                .map_err(|_| UrlError::new("password", "contains an invalid %-escape"))
        })
        .transpose()?;
    Ok((user, password))
}

/// One server of a URL's list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// The port.
    pub port: u16,
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

/// Parses `host[:port][,host[:port]...]` (an IPv6 address in brackets, `default_port` where
/// none is given). An entry that is wrong is named by its position and text (the user
/// information is split off before, so no secret can be in it), calling an entry `noun`
/// ("address", "server"); an entry given twice is refused.
pub fn parse_endpoints(
    list: &str,
    default_port: u16,
    noun: &str,
) -> Result<Vec<Endpoint>, UrlError> {
    let entries: Vec<&str> = list.split(',').collect();
    let many = entries.len() > 1;
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(entries.len());
    for (n, entry) in entries.iter().enumerate() {
        let endpoint = parse_endpoint(entry.trim(), default_port).map_err(|e| {
            if many {
                UrlError::new(
                    e.part,
                    format!("{}, in {noun} {} of the list (`{entry}`)", e.reason, n + 1),
                )
            } else {
                e
            }
        })?;
        if endpoints.contains(&endpoint) {
            return Err(UrlError::new("host", format!("lists `{endpoint}` twice")));
        }
        endpoints.push(endpoint);
    }
    Ok(endpoints)
}

fn parse_endpoint(hostport: &str, default_port: u16) -> Result<Endpoint, UrlError> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| UrlError::new("host", "an IPv6 address misses its `]`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => {
                return Err(UrlError::new(
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
        return Err(UrlError::new("host", "is empty"));
    }
    if host.contains(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@' | '[')) {
        return Err(UrlError::new(
            "host",
            "holds a character a host name cannot hold",
        ));
    }
    Ok(Endpoint { host, port })
}

/// A port number, 1-65535.
pub fn parse_port(p: &str) -> Result<u16, UrlError> {
    match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(UrlError::new("port", "is not a port number (1-65535)")),
    }
}

/// Decodes `%XX` escapes in one part of a URL (user, password, path, a query value). The error
/// says what is wrong ("holds an invalid %-escape", "is not UTF-8 once decoded"), never the
/// input, which may be a password. A `%` not followed by two hex digits is refused (the
/// `percent-encoding` crate would pass it through as text).
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

/// Escapes everything but ASCII letters, digits and `-_.~`, for one part of a URL (`/` becomes
/// `%2F`).
pub fn percent_encode(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, ESCAPED).to_string()
}

/// [`percent_encode`] with every `/` kept (allowed in a query and in a path), for values made
/// of `/`-separated parts that stay readable in logs: file paths in a query, MQTT topics. Its
/// escapes are upper-case and a `%` becomes `%25`, so every `%2F` it writes was a `/`.
pub fn percent_encode_keeping_slashes(v: &str) -> String {
    percent_encode(v).replace("%2F", "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_at_that_makes_the_url_read_two_ways_is_refused() {
        for url in [
            "amqp://u:p@rabbit/%2f?queue=billing@eu",
            "nats://u:p@h:4222/orders@eu",
            "mqtt://u:p@h/plant@line",
            // A token holding `/`, or a path holding `@`: which is it?
            "nats://abc/def@h1:4222",
            "nats://abc/def@h1:4222/orders",
            "mqtt://h/plant@line",
            "amqp://us/er:pw@h/",
            // A `?` in a password after a user name holding `/`.
            "amqp://CORP/app:pa?ss@rabbit/",
            // A user name holding `?`, or a query with no path before it.
            "amqp://app?x:hunter2@rabbit/%2F?queue=q",
            "amqp://rabbit?queue=a@b",
            // A user name holding `/` and `?` after a path: a parameter with no `=` before a
            // `:` reads as a user and password as well.
            "amqp://CORP/app?x:hunter2@rabbit/%2F?queue=q",
            "amqp://CORP/app?x:hun=ter2@rabbit",
            "amqp://rabbit/%2f?queue=a&x:hunter2@eu",
            "nats://tok/en?x@h",
            // A host and port, or a user and a password holding `/`?
            "amqp://rabbit:5672/%2f?queue=billing@eu",
            "amqp://app:5672/x@rabbit",
            "amqp://h1:5672,h2:5672/v?queue=a@eu",
            "amqp://[::1]:5672/v?queue=a@eu",
        ] {
            let e = split(url, "x").err().expect(url);
            assert_eq!(e.part, "user information", "{url}");
            assert!(e.reason.contains("%40"), "{}", e.reason);
        }
        let p = split("nats://abc%2Fdef@h1:4222/orders", "x").expect("escaped");
        assert_eq!((p.userinfo, p.hosts), (Some("abc%2Fdef"), "h1:4222"));
        let p = split("mqtt://h/plant%40line", "x").expect("escaped");
        assert_eq!((p.hosts, p.path), ("h", Some("plant%40line")));
        let p = split("amqp://rabbit/%2f?queue=billing@eu", "x").expect("in the query");
        assert_eq!((p.userinfo, p.query), (None, Some("queue=billing@eu")));
        let p = split("amqp://rabbit/%2f?a=1&queue=b:c@eu", "x").expect("in the query");
        assert_eq!((p.userinfo, p.query), (None, Some("a=1&queue=b:c@eu")));
        let p = split("amqp://app:hunter2/x@h/", "x").expect("not a port");
        assert_eq!((p.userinfo, p.hosts), (Some("app:hunter2/x"), "h"));
        let p = split("amqp://app:5672%2Fx@rabbit", "x").expect("escaped");
        assert_eq!((p.userinfo, p.hosts), (Some("app:5672%2Fx"), "rabbit"));
        let p = split("amqp://u:p@ss@rabbit", "x").expect("one @ can end it");
        assert_eq!(
            (p.userinfo, p.hosts),
            (Some("u:p@ss"), "rabbit"),
            "an `@` inside the password, none after the host: one reading"
        );
    }

    #[test]
    fn an_unknown_parameter_is_named_only_when_it_looks_like_a_name() {
        assert_eq!(unknown_parameter("qeueu"), "parameter `qeueu` is unknown");
        for odd in ["x:hunter2@rabbit//", "a b", &"x".repeat(41)] {
            let said = unknown_parameter(odd);
            assert!(!said.contains(odd) && said.contains("not shown"), "{said}");
        }
    }

    #[test]
    fn a_path_keeps_its_slashes_and_the_query_is_split_off() {
        let p = split("mqtt://h:1883/plant/line-3/temp?qos=1", "x").expect("parses");
        assert_eq!(
            (p.hosts, p.path, p.query),
            ("h:1883", Some("plant/line-3/temp"), Some("qos=1"))
        );
        let p = split("redis://h", "x").expect("parses");
        assert_eq!((p.hosts, p.path, p.query), ("h", None, None));
        let e = split("h:1883/topic", "`mqtt://`").err().expect("no scheme");
        assert_eq!(
            e.to_string(),
            "URL scheme is missing: expected `mqtt://` at the start"
        );
    }

    #[test]
    fn lists_name_a_bad_entry_and_refuse_duplicates() {
        let list = parse_endpoints("a:1, [::1]:2,b", 9, "server").expect("parses");
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["a:1", "[::1]:2", "b:9"]);
        let e = parse_endpoints("a:1,b:x", 9, "address").expect_err("refused");
        assert_eq!(e.part, "port");
        assert!(
            e.reason.ends_with("in address 2 of the list (`b:x`)"),
            "{}",
            e.reason
        );
        let e = parse_endpoints("a,a:9", 9, "server").expect_err("refused");
        assert_eq!(e.reason, "lists `a:9` twice");
        for bad in ["", "[::1", "[::1]x", "h:0", "h:70000", "a b"] {
            assert!(parse_endpoints(bad, 9, "server").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credentials_decode_and_the_password_never_shows() {
        let (user, password) = credentials("app%40eu:s%2Fcret").expect("parses");
        assert_eq!(user, "app@eu");
        let password = password.expect("a password");
        assert_eq!(password.expose(), "s/cret");
        assert_eq!(format!("{password:?}"), "\"***\"");
        assert_eq!(credentials("token").expect("parses").1, None);
        let e = credentials("app:se%zzcret").expect_err("refused");
        assert_eq!(e.part, "password");
        assert!(!e.to_string().contains("se%zz"), "{e}");
    }

    #[test]
    fn escapes_are_two_hex_digits_and_round_trip() {
        assert_eq!(percent_decode("a%2Fb").as_deref(), Ok("a/b"));
        assert!(percent_decode("100%").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err(), "not UTF-8");
        let raw = "a/b?c@d é";
        assert_eq!(percent_decode(&percent_encode(raw)).as_deref(), Ok(raw));
        let pairs = query_pairs(Some("a=1&&b&c=x%20y")).expect("parses");
        assert_eq!(
            pairs,
            [
                ("a".into(), "1".into()),
                ("b".into(), String::new()),
                ("c".into(), "x y".into())
            ]
        );
        let e = query_pairs(Some("k=%g1")).expect_err("refused");
        assert!(e.reason.starts_with("value of `k`"), "{}", e.reason);
    }
}
