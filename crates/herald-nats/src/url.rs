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
use std::path::PathBuf;

use herald_core::tls::TlsFiles;
use herald_core::url::{self, percent_encode, Endpoint, Secret};

use crate::auth::KeyFile;
use crate::destination::{validate_stream_name, validate_subject};
use crate::error::ConfigError;

/// The query parameters a NATS URL takes: `stream` (the JetStream stream to create, if it does
/// not exist, to capture the URL's subject); `creds` (a `.creds` file) or `nkey` (a file with
/// a user's NKey seed) to authenticate with; `tlsca` (a CA file to trust), `tlscert` and
/// `tlskey` (a client certificate and its key, for mutual TLS). The file parameters take
/// paths, named as the `nats` command's options are.
pub const QUERY_PARAMETERS: &[&str] = &["stream", "creds", "nkey", "tlsca", "tlscert", "tlskey"];

/// The port of a server given without one.
pub const DEFAULT_PORT: u16 = 4222;

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
                auth.password = Some(password.expose().to_owned());
            }
            Self::Token(token) => auth.token = Some(token.expose().to_owned()),
        }
        auth
    }
}

/// The address async-nats connects to for `endpoint`: `nats://host:port` or `tls://host:port`,
/// without credentials (those go through the auth callback).
pub(crate) fn server_addr(endpoint: &Endpoint, tls: bool) -> String {
    format!("{}://{endpoint}", if tls { "tls" } else { "nats" })
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
    /// `?creds=PATH` or `?nkey=PATH`.
    pub(crate) key_file: Option<KeyFile>,
    /// `?tlsca=PATH`, `?tlscert=PATH&tlskey=PATH`.
    pub(crate) tls_files: TlsFiles,
}

impl Url {
    /// Parses `nats|tls://[user:password@|token@]host[:port][,host[:port]...][/subject][?stream=NAME]`.
    /// The error names the part that is wrong, never the password or token.
    pub(crate) fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |part: &'static str, reason: String| ConfigError::Url { part, reason };
        let parts = url::split(url, "`nats://` or `tls://`")?;
        let tls = match parts.scheme.to_ascii_lowercase().as_str() {
            "nats" => false,
            "tls" => true,
            other => return Err(bad("scheme", format!("`{other}` is not `nats` or `tls`"))),
        };
        let (userinfo, hostlist, path, query) =
            (parts.userinfo, parts.hosts, parts.path, parts.query);
        let credentials = match userinfo {
            None => Credentials::None,
            // A user information without `:` is a token, as in every NATS client.
            Some(token) if !token.contains(':') => {
                let token = url::percent_decode(token)
                    .map_err(|_| bad("token", "contains an invalid %-escape".into()))?;
                if token.is_empty() {
                    return Err(bad("token", "is empty".into()));
                }
                Credentials::Token(Secret::new(token))
            }
            Some(u) => {
                let (user, password) = url::credentials(u)?;
                if user.is_empty() {
                    return Err(bad(
                        "user",
                        "is empty (a token goes alone: nats://TOKEN@host)".into(),
                    ));
                }
                Credentials::UserPassword {
                    user,
                    password: password.unwrap_or_else(|| Secret::new("")),
                }
            }
        };
        let endpoints = url::parse_endpoints(hostlist, DEFAULT_PORT, "server")?;
        let subject = match path {
            None | Some("") => None,
            Some(p) => {
                let s = url::percent_decode(p).map_err(|r| bad("subject", r))?;
                validate_subject(&s).map_err(|r| bad("subject", r))?;
                Some(s)
            }
        };
        let mut stream = None;
        let mut key_file = None;
        let mut tls_files = TlsFiles::default();
        for (k, value) in url::query_pairs(query)? {
            if tls_files.take(&k, &value)? {
                continue;
            }
            match k.as_str() {
                "stream" => {
                    if stream.is_some() {
                        return Err(bad("query stream", "is given twice".into()));
                    }
                    validate_stream_name(&value).map_err(|r| bad("query stream", r))?;
                    stream = Some(value);
                }
                "creds" | "nkey" => {
                    let part = if k == "creds" {
                        "query creds"
                    } else {
                        "query nkey"
                    };
                    if key_file.is_some() {
                        return Err(bad(
                            part,
                            "goes with no other `creds` or `nkey`: one identity per connection"
                                .into(),
                        ));
                    }
                    if value.is_empty() {
                        return Err(bad(part, "is empty: give the file's path".into()));
                    }
                    let path = PathBuf::from(value);
                    key_file = Some(if k == "creds" {
                        KeyFile::Creds(path)
                    } else {
                        KeyFile::Nkey(path)
                    });
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
        if key_file.is_some() && credentials != Credentials::None {
            return Err(bad(
                "query",
                "has `creds` or `nkey` and the URL a user, password or token: choose one way to authenticate".into(),
            ));
        }
        tls_files.check_client_cert()?;
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
            key_file,
            tls_files,
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
        let mut query = Vec::new();
        if let Some(stream) = &self.stream {
            query.push(format!("stream={}", percent_encode(stream)));
        }
        match &self.key_file {
            Some(KeyFile::Creds(p)) => query.push(format!("creds={}", path_text(p))),
            Some(KeyFile::Nkey(p)) => query.push(format!("nkey={}", path_text(p))),
            None => {}
        }
        query.extend(self.tls_files.query());
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

/// A file's path in the URL's printout.
fn path_text(path: &std::path::Path) -> String {
    url::percent_encode_keeping_slashes(&path.to_string_lossy())
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
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
                password: Secret::new("p:ss")
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
        assert_eq!(server_addr(&u.endpoints[2], false), "nats://[::1]:4223");
        let auth = u.credentials.to_auth();
        assert_eq!(
            (auth.username.as_deref(), auth.password.as_deref()),
            (Some("app@x"), Some("p:ss"))
        );
    }

    #[test]
    fn key_files_and_tls_files_are_query_parameters() {
        let text = "tls://h/orders?stream=O&creds=/etc/nats/app.creds&tlsca=/ca%20dir/ca.pem&tlscert=c.pem&tlskey=/k/c.key";
        let u = Url::parse(text).expect("valid");
        assert_eq!(
            u.key_file,
            Some(KeyFile::Creds("/etc/nats/app.creds".into()))
        );
        assert_eq!(
            u.tls_files.ca_file(),
            Some(std::path::Path::new("/ca dir/ca.pem"))
        );
        assert_eq!(
            u.tls_files.client_cert(),
            Some(herald_core::tls::ClientCert {
                cert_file: "c.pem".into(),
                key_file: "/k/c.key".into()
            })
        );
        // Printed back as given (paths keep their `/`), and read back the same.
        let printed = u.to_string();
        assert_eq!(printed, text.replace("//h/", "//h:4222/"));
        assert_eq!(Url::parse(&printed).expect("again"), u);
        let u = Url::parse("nats://h/s?nkey=/etc/nats/u.nk").expect("valid");
        assert_eq!(u.key_file, Some(KeyFile::Nkey("/etc/nats/u.nk".into())));
        for bad in [
            "nats://h/s?creds=a&creds=b",
            "nats://h/s?creds=a&nkey=b",
            "nats://h/s?creds=",
            "nats://u:p@h/s?creds=a",
            "nats://token@h/s?nkey=a",
            "nats://h/s?tlscert=c.pem",
            "nats://h/s?tlskey=c.key",
            "nats://h/s?tlsca=a&tlsca=b",
        ] {
            assert!(part(bad).starts_with("query"), "{bad}: {}", part(bad));
        }
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
            Credentials::Token(Secret::new("s3cr3t-token"))
        );
        assert_eq!(server_addr(&u.endpoints[0], true), "tls://h:4443");
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
                password: Secret::new("a+b/c==?d")
            }
        );
        assert_eq!(
            (u.subject.as_deref(), u.stream.as_deref()),
            (Some("orders"), Some("S"))
        );
        // An `@` in the subject is written `%40`: unescaped, it could end a token holding `/`
        // (`h/orders` for the host `eu`), and is refused.
        let u = Url::parse("nats://h/orders%40eu").expect("valid");
        assert_eq!(u.subject.as_deref(), Some("orders@eu"));
        Url::parse("nats://h/orders@eu").expect_err("a token `h/orders`, or a subject?");
        // A base64 token holding `/`: refused, not read as a host and subject, and not shown.
        let e = Url::parse("nats://s3cr/et@h1:4222/orders").expect_err("ambiguous");
        assert!(!e.to_string().contains("s3cr"), "{e}");
        let u = Url::parse("nats://s3cr%2Fet@h1:4222/orders").expect("escaped");
        assert_eq!(
            u.credentials,
            Credentials::Token(Secret::new("s3cr/et")),
            "the token, decoded"
        );
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
    }
}
