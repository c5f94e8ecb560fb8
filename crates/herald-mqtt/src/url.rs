//! The URL form of the settings, `mqtt://[user:password@]host:port/TOPIC?qos=1&version=5`
//! (`mqtts://` for TLS): parsed with the password kept out of every printout.
//!
//! Parsed with `herald_core::url`'s rules: percent-escapes in the user, the password and the
//! topic, decoded once (`%2F` in the path is a `/` of the topic, as `/plant%2Fline-3` and
//! `/plant/line-3` are the same topic); a password may hold an unencoded `/`, `?` or `@` unless
//! that makes the URL read two ways, which is refused rather than guessed. Everything after the
//! first `/` of the path is the topic, slashes included: `mqtt://h:1883/plant/line-3/temperature`
//! publishes to `plant/line-3/temperature`. One broker per URL (no list).

use std::fmt;

use herald_core::tls::TlsFiles;
use herald_core::url::{self, Endpoint, Secret};

use crate::config::{Qos, Version};
use crate::destination::validate_topic;
use crate::error::ConfigError;

/// The query parameters an MQTT URL takes: `qos` (`1`, the default, or `2`), `version` (`5`,
/// the default, or `3` for MQTT 3.1.1), and for `mqtts://` `tlsca` (a CA file to trust),
/// `tlscert` and `tlskey` (a client certificate and its key, for mutual TLS).
pub const QUERY_PARAMETERS: &[&str] = &["qos", "version", "tlsca", "tlscert", "tlskey"];

/// The port of `mqtt://` without one.
pub const DEFAULT_PORT: u16 = 1883;

/// The port of `mqtts://` without one.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// A parsed URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Url {
    pub(crate) tls: bool,
    /// User and password (MQTT allows a user without a password).
    pub(crate) user: Option<(String, Option<Secret>)>,
    /// The broker: `host` and `port` (1883, or 8883 for `mqtts://`, unless given).
    pub(crate) endpoint: Endpoint,
    pub(crate) topic: Option<String>,
    pub(crate) qos: Qos,
    pub(crate) version: Version,
    /// `?tlsca=PATH`, `?tlscert=PATH&tlskey=PATH`.
    pub(crate) tls_files: TlsFiles,
}

impl Url {
    pub(crate) fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |part: &'static str, reason: String| ConfigError::Url { part, reason };
        let parts = url::split(url, "`mqtt://` or `mqtts://`")?;
        let tls = match parts.scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => return Err(bad("scheme", "is not mqtt:// or mqtts://".into())),
        };
        let user = match parts.userinfo {
            None => None,
            Some(u) => {
                let (name, pass) = url::credentials(u)?;
                if name.is_empty() {
                    return Err(bad("user", "is empty".into()));
                }
                Some((name, pass))
            }
        };
        // A list (`h1,h2`), which herald_core would accept, or a space (which it would trim
        // around an entry) is refused before the host is parsed.
        if parts
            .hosts
            .contains(|c: char| c == ',' || c.is_whitespace())
        {
            return Err(bad(
                "host",
                "holds a character a host name cannot hold (one broker per URL)".into(),
            ));
        }
        let default_port = if tls { DEFAULT_TLS_PORT } else { DEFAULT_PORT };
        // Without a `,`, exactly one entry.
        let endpoint = url::parse_endpoints(parts.hosts, default_port, "broker")?.remove(0);
        let topic = match parts.path {
            None | Some("") => None,
            Some(p) => {
                let t = url::percent_decode(p).map_err(|r| bad("topic", r))?;
                validate_topic(&t).map_err(|r| bad("topic", r))?;
                Some(t)
            }
        };
        let mut qos = None;
        let mut version = None;
        let mut tls_files = TlsFiles::default();
        for (k, v) in url::query_pairs(parts.query)? {
            if tls_files.take(&k, &v)? {
                continue;
            }
            match k.as_str() {
                "qos" => {
                    if qos.is_some() {
                        return Err(bad("query qos", "is given twice".into()));
                    }
                    qos = Some(match v.as_str() {
                        "1" => Qos::AtLeastOnce,
                        "2" => Qos::ExactlyOnce,
                        "0" => return Err(bad("query qos", "is 0, which the broker never acknowledges: herald only reports a message delivered on the broker's acknowledgement (use 1, the default, or 2)".into())),
                        _ => return Err(bad("query qos", "is not 1 or 2".into())),
                    });
                }
                "version" => {
                    if version.is_some() {
                        return Err(bad("query version", "is given twice".into()));
                    }
                    version = Some(match v.as_str() {
                        "5" | "5.0" => Version::V5,
                        "3" | "3.1.1" | "4" => Version::V311,
                        _ => {
                            return Err(bad(
                                "query version",
                                "is not 5 (MQTT 5) or 3 (MQTT 3.1.1)".into(),
                            ))
                        }
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
        tls_files.check_client_cert()?;
        Ok(Self {
            tls,
            user,
            endpoint,
            topic,
            qos: qos.unwrap_or(Qos::AtLeastOnce),
            version: version.unwrap_or(Version::V5),
            tls_files,
        })
    }

    /// `host:port` (an IPv6 address in brackets): no secret in it.
    pub(crate) fn server(&self) -> String {
        self.endpoint.to_string()
    }

    /// The user and password as the client sends them (`""` for a user without a password).
    pub(crate) fn credentials(&self) -> Option<(String, String)> {
        self.user.as_ref().map(|(user, pass)| {
            (
                user.clone(),
                pass.as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            )
        })
    }
}

/// `mqtt://user:***@host:port/topic?qos=2&version=3`: safe to log. A user name without a
/// password shows as `***@`: brokers that authenticate devices by an access token take it as
/// the user name (ThingsBoard, say).
impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://")?;
        match &self.user {
            None => {}
            Some((_, None)) => f.write_str("***@")?,
            Some((user, Some(_))) => write!(f, "{}:***@", url::percent_encode(user))?,
        }
        write!(f, "{}", self.endpoint)?;
        if let Some(topic) = &self.topic {
            write!(f, "/{}", percent_encode_topic(topic))?;
        }
        let mut query = Vec::new();
        if self.qos == Qos::ExactlyOnce {
            query.push("qos=2".to_owned());
        }
        if self.version == Version::V311 {
            query.push("version=3".to_owned());
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

/// The topic with its level separators readable (see
/// [`url::percent_encode_keeping_slashes`]).
fn percent_encode_topic(v: &str) -> String {
    url::percent_encode_keeping_slashes(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MqttConfig;

    fn part(url: &str) -> &'static str {
        match Url::parse(url) {
            Err(ConfigError::Url { part, .. }) => part,
            other => panic!("{url}: expected a URL error, got {other:?}"),
        }
    }

    #[test]
    fn everything_after_the_first_slash_is_the_topic() {
        let u = Url::parse("mqtt://127.0.0.1:1883/plant/line-3/temperature").expect("valid");
        assert_eq!(u.topic.as_deref(), Some("plant/line-3/temperature"));
        assert_eq!(
            (u.endpoint.host.as_str(), u.endpoint.port),
            ("127.0.0.1", 1883)
        );
        assert_eq!((u.qos, u.version), (Qos::AtLeastOnce, Version::V5));
        // Percent-escapes decoded once; an escaped slash is a slash of the topic.
        let u = Url::parse("mqtt://h/plant%2Fline%203/t%C3%A9").expect("valid");
        assert_eq!(u.topic.as_deref(), Some("plant/line 3/té"));
        // Leading, trailing and doubled slashes are part of the topic (empty levels).
        assert_eq!(
            Url::parse("mqtt://h//a//b/")
                .expect("valid")
                .topic
                .as_deref(),
            Some("/a//b/")
        );
        assert_eq!(Url::parse("mqtt://h/").expect("valid").topic, None);
        assert_eq!(Url::parse("mqtt://h").expect("valid").topic, None);
    }

    #[test]
    fn tls_files_are_query_parameters() {
        let text =
            "mqtts://h:8883/a/b?qos=2&tlsca=/etc/ca%20s/ca.pem&tlscert=c.pem&tlskey=/k/c.key";
        let u = Url::parse(text).expect("valid");
        assert_eq!(
            u.tls_files.ca_file(),
            Some(std::path::Path::new("/etc/ca s/ca.pem"))
        );
        let cert = u.tls_files.client_cert().expect("given");
        assert_eq!(
            (cert.cert_file.to_str(), cert.key_file.to_str()),
            (Some("c.pem"), Some("/k/c.key"))
        );
        assert_eq!(u.to_string(), text);
        assert_eq!(Url::parse(&u.to_string()).expect("again"), u);
        for (bad, named) in [
            ("mqtts://h/t?tlscert=c.pem", "query tlscert"),
            ("mqtts://h/t?tlskey=c.key", "query tlskey"),
            ("mqtts://h/t?tlsca=a&tlsca=b", "query tlsca"),
            ("mqtts://h/t?tlsca=", "query tlsca"),
        ] {
            assert_eq!(part(bad), named, "{bad}");
        }
        // TLS files need TLS.
        for (url, field) in [
            ("mqtt://h/t?tlscert=c.pem&tlskey=c.key", "tls_client_cert"),
            ("mqtt://h/t?tlsca=/ca.pem", "tls_ca_file"),
        ] {
            let plain = MqttConfig::from_url(url).expect("url");
            assert!(
                matches!(plain.validate(), Err(ConfigError::Invalid { field: f, .. }) if f == field),
                "{url}: {:?}",
                plain.validate()
            );
        }
        // A setter's files show in the printout.
        let c = MqttConfig::from_url("mqtts://h/t?tlsca=/a.pem")
            .expect("url")
            .tls_ca_file("/b.pem")
            .tls_client_cert("/c.pem", "/c.key");
        assert_eq!(
            c.redacted_url(),
            "mqtts://h:8883/t?tlsca=/b.pem&tlscert=/c.pem&tlskey=/c.key"
        );
    }

    #[test]
    fn parses_the_full_form() {
        let u = Url::parse("MQTTS://app%40x:p%3Ass@[::1]/a/b?qos=2&version=3").expect("valid");
        assert!(u.tls);
        assert_eq!(u.user, Some(("app@x".into(), Some(Secret::new("p:ss")))));
        assert_eq!((u.endpoint.host.as_str(), u.endpoint.port), ("::1", 8883));
        assert_eq!(u.server(), "[::1]:8883");
        assert_eq!((u.qos, u.version), (Qos::ExactlyOnce, Version::V311));
        let u = Url::parse("mqtt://reader@h:1884/t?version=5&qos=1").expect("valid");
        assert_eq!(u.user, Some(("reader".into(), None)));
        assert_eq!(
            u.to_string(),
            "mqtt://***@h:1884/t",
            "a user name alone may be a device's token"
        );
    }

    #[test]
    fn malformed_urls_name_the_part() {
        assert_eq!(part("http://h"), "scheme");
        assert_eq!(part("h:1883"), "scheme");
        assert_eq!(part("mqtt://h:notaport"), "port");
        assert_eq!(part("mqtt://h:70000"), "port");
        assert_eq!(part("mqtt://h:0"), "port");
        assert_eq!(part("mqtt://u:p@:1883"), "host");
        assert_eq!(part("mqtt://[::1/x"), "host");
        assert_eq!(part("mqtt://h1,h2/x"), "host");
        assert_eq!(part("mqtt://h/plant/+/temperature"), "topic");
        assert_eq!(part("mqtt://h/plant/#"), "topic");
        assert_eq!(part("mqtt://h/plant%23"), "topic");
        assert_eq!(part("mqtt://h/a%00b"), "topic");
        assert_eq!(part("mqtt://h/%zz"), "topic");
        assert_eq!(part("mqtt://u%zz:p@h"), "user");
        assert_eq!(part("mqtt://:p@h"), "user");
        assert_eq!(part("mqtt://u:p%zz@h"), "password");
        assert_eq!(part("mqtt://h/t?nope=1"), "query");
        assert_eq!(part("mqtt://h/t?qos=0"), "query qos");
        assert_eq!(part("mqtt://h/t?qos=3"), "query qos");
        assert_eq!(part("mqtt://h/t?qos=1&qos=2"), "query qos");
        assert_eq!(part("mqtt://h/t?version=4.5"), "query version");
        assert_eq!(part("mqtt://h/t?version=5&version=3"), "query version");
    }

    #[test]
    fn qos_0_is_refused_saying_why() {
        let e = Url::parse("mqtt://h/t?qos=0").expect_err("qos 0");
        assert!(e.to_string().contains("never acknowledges"), "{e}");
    }

    #[test]
    fn the_password_never_shows() {
        let secret = "hunter2-very-secret";
        let config = MqttConfig::from_url(&format!("mqtt://app:{secret}@h:1883/plant/x?qos=2"))
            .expect("valid");
        for text in [
            format!("{config:?}"),
            format!("{:?}", config.url),
            config.redacted_url(),
        ] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(config.redacted_url(), "mqtt://app:***@h:1883/plant/x?qos=2");
        for url in [
            "mqtt://app:hunter2%zz@h",
            "mqtt://app:hunter2@h:x",
            "mqtt://app:hunter2@h/a/+",
            "mqtt://app:hunter2@h/a?nope=1",
            "mqtt://app:hunter2@h/a?qos=7",
        ] {
            let e = Url::parse(url).expect_err(url);
            assert!(!format!("{e} {e:?}").contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn a_password_with_slash_or_question_mark_parses() {
        let u = Url::parse("mqtt://app:a+b/c==?d@h:1883/plant/x?qos=2").expect("valid");
        assert_eq!(u.user, Some(("app".into(), Some(Secret::new("a+b/c==?d")))));
        assert_eq!(
            (u.topic.as_deref(), u.qos),
            (Some("plant/x"), Qos::ExactlyOnce)
        );
        // An `@` in the topic is written `%40`: unescaped, it could end a user name holding
        // `/`, and is refused.
        let u = Url::parse("mqtt://h/plant%40line").expect("valid");
        assert_eq!(u.topic.as_deref(), Some("plant@line"));
        Url::parse("mqtt://h/plant@line").expect_err("a user `h/plant`, or a topic?");
        // Both: ambiguous, refused, saying how to write it.
        let e = Url::parse("mqtt://app:hunter2@h/plant@line").expect_err("ambiguous");
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
        let u = Url::parse("mqtt://app:hunter2@h/plant%40line").expect("valid");
        assert_eq!(u.topic.as_deref(), Some("plant@line"));
    }

    #[test]
    fn the_display_form_parses_back_to_the_same_url() {
        for url in [
            "mqtt://h:1883",
            "mqtt://app:***@h:1883/plant/line-3/temperature?qos=2",
            "mqtts://[::1]:8883/a%20b/c?version=3",
            "mqtt://***@h:1883/x?qos=2&version=3",
        ] {
            let u = Url::parse(url).expect(url);
            assert_eq!(u.to_string(), url);
        }
    }
}
