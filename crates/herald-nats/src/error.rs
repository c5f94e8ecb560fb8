//! Errors: the JetStream API error-code → class table (unit-tested code by code), async-nats's
//! publish and connect errors classified, the server's permission violations read, and the
//! configuration error.

use std::error::Error as _;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::{ConnectError, ConnectErrorKind};
use herald_core::{ErrorClass, TransportError};

/// A transport that cannot be built, with the setting to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The server URL is malformed; `part` names which part (`scheme`, `user information`,
    /// `user`, `password`, `token`, `host`, `port`, `subject`, `query …`). The password or
    /// token never appears in `reason`.
    #[error("invalid NATS URL: the {part} {reason}; expected nats://[user:password@]host:port[,host:port...]/SUBJECT[?stream=NAME] (tls:// for TLS)")]
    Url {
        /// The part of the URL that is wrong.
        part: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting that cannot work.
    #[error("invalid NATS setting `{field}`: {reason}")]
    Invalid {
        /// The setting, as [`crate::NatsConfig`] names it.
        field: &'static str,
        /// What is wrong and what would work.
        reason: String,
    },
}

/// What the table says about one JetStream API error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CodeInfo {
    pub(crate) name: &'static str,
    pub(crate) class: ErrorClass,
    /// What the operator should do, in a few words.
    pub(crate) advice: &'static str,
}

/// The JetStream API error codes (`err_code` of a publish's error reply) and their class.
/// `text` is the server's description, which tells a full stream (10077 "maximum bytes
/// exceeded") from a store that failed.
pub(crate) fn api_code(err_code: u64, text: &str) -> CodeInfo {
    use ErrorClass::{Permanent as P, Transient as T};
    let (name, class, advice) = match err_code {
        10077 if is_limit_text(text) => ("STORAGE_FULL", T, "the stream is at its limit (max_bytes / max_msgs with discard=new): retried until consumers or max_age make room; raise the limit if this persists"),
        // nats-server's own words are misspelt in some versions: "message to large".
        10077 if ["too large", "to large"].iter().any(|w| text.to_ascii_lowercase().contains(w)) => ("PAYLOAD_TOO_LARGE", P, "the message is larger than the stream accepts"),
        10077 => ("STORE_FAILED", T, "the server could not store the message; retried"),
        10047 => ("STORAGE_FULL", T, "the server's JetStream storage is exhausted: retried; free disk or raise max_file_store"),
        10023 => ("STORAGE_FULL", T, "the server has insufficient JetStream resources: retried; free disk or memory"),
        10002 => ("STORAGE_FULL", T, "the account's JetStream limits are reached: retried; raise them or make room"),
        10028 => ("STORAGE_FULL", T, "the server's JetStream memory is exhausted: retried"),
        10054 => ("PAYLOAD_TOO_LARGE", P, "the message is larger than the stream's max_msg_size"),
        10071 | 10164 => ("WRONG_LAST_SEQUENCE", P, "the message's Nats-Expected-Last-Sequence header does not match the stream: a conditional publish lost its race"),
        10097 => ("HEADERS_TOO_LARGE", P, "the message's headers are larger than JetStream accepts (64 KiB)"),
        10109 => ("STREAM_SEALED", P, "the stream is sealed: it takes no more messages"),
        10165 => ("INVALID_TTL", P, "the message's Nats-TTL header is not a valid per-message TTL"),
        10166 => ("TTL_DISABLED", P, "the message has a Nats-TTL header and the stream does not allow per-message TTLs (allow_msg_ttl)"),
        10167 => ("TOO_MANY_REQUESTS", T, "the stream has more publishes waiting than the server takes at once: retried; lower the pipeline depth or window if this persists"),
        10158 => ("DUPLICATE_IN_PROCESS", T, "a message with the same Nats-Msg-Id is being stored right now; retried"),
        10118 | 10194 => ("STREAM_OFFLINE", T, "the stream is offline on the server; retried"),
        10070 => ("WRONG_LAST_MSG_ID", P, "the message's Nats-Expected-Last-Msg-Id header does not match the stream: a conditional publish lost its race"),
        10060 => ("STREAM_NOT_MATCH", P, "the message's Nats-Expected-Stream header names another stream than the one capturing its subject"),
        10059 => ("NO_STREAM", P, "no stream captures this subject: create one (or give the URL ?stream=NAME)"),
        10039 => ("JETSTREAM_NOT_ENABLED", P, "JetStream is not enabled for this account"),
        10076 => ("JETSTREAM_NOT_ENABLED", P, "JetStream is not enabled on the server (start it with -js)"),
        10003 => ("BAD_REQUEST", P, "the server refused the message as malformed"),
        10008 => ("JETSTREAM_UNAVAILABLE", T, "JetStream is temporarily unavailable (a cluster without quorum); retried"),
        10009 => ("NOT_LEADER", T, "the stream's leader moved; retried"),
        10041 => ("RAFT_ERROR", T, "a replication error on the server; retried"),
        _ => ("API_ERROR", T, "an unknown JetStream error; treated as transient"),
    };
    CodeInfo {
        name,
        class,
        advice,
    }
}

/// The server's words for a stream at one of its limits (discard=new).
fn is_limit_text(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "maximum bytes",
        "maximum messages",
        "resource limits",
        "max bytes",
    ]
    .iter()
    .any(|w| t.contains(w))
}

/// Classifies an error from publishing to `subject` or from awaiting its PubAck. `declared`:
/// this transport declared a stream capturing `subject` (a missing responder is then a stream
/// recovering or electing a leader, transient; otherwise no stream captures the subject,
/// permanent).
pub(crate) fn classify_publish(e: &PublishError, subject: &str, declared: bool) -> TransportError {
    let (class, code, text) = match e.kind() {
        PublishErrorKind::StreamNotFound if declared => (
            ErrorClass::Transient,
            "NO_STREAM",
            format!("no stream answered for subject \"{subject}\" (no responders), although this transport declared one: it is recovering, electing a leader or was deleted; declared again and retried"),
        ),
        PublishErrorKind::StreamNotFound => (
            ErrorClass::Permanent,
            "NO_STREAM",
            format!("no JetStream stream captures subject \"{subject}\" (no responders): create one for it, or give the URL ?stream=NAME to create it"),
        ),
        PublishErrorKind::WrongLastSequence => {
            let info = api_code(10071, "");
            (info.class, info.name, format!("publishing to \"{subject}\": {}", info.advice))
        }
        PublishErrorKind::WrongLastMessageId => {
            let info = api_code(10070, "");
            (info.class, info.name, format!("publishing to \"{subject}\": {}", info.advice))
        }
        PublishErrorKind::TimedOut => (
            ErrorClass::Transient,
            "TIMEOUT",
            format!("no PubAck from JetStream for a message to \"{subject}\" in time; it is retried (a duplicate is dropped by its Nats-Msg-Id)"),
        ),
        PublishErrorKind::BrokenPipe => (
            ErrorClass::Transient,
            "CONNECTION_LOST",
            format!("the connection was lost before the PubAck for a message to \"{subject}\" came; herald reconnects and retries (a duplicate is dropped by its Nats-Msg-Id)"),
        ),
        PublishErrorKind::MaxAckPending => (
            ErrorClass::Transient,
            "MAX_ACK_PENDING",
            format!("too many PubAcks pending while publishing to \"{subject}\"; retried"),
        ),
        PublishErrorKind::MaxPayloadExceeded => (
            ErrorClass::Permanent,
            "PAYLOAD_TOO_LARGE",
            format!("the message to \"{subject}\" is larger than the server's max_payload: {e}"),
        ),
        PublishErrorKind::Other => match e
            .source()
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        {
            Some(api) => {
                let text = api.to_string();
                let info = api_code(api.error_code().0, &text);
                (
                    info.class,
                    info.name,
                    format!("JetStream refused a message to \"{subject}\": {text}; {}", info.advice),
                )
            }
            None if e
                .source()
                .is_some_and(|s| s.is::<async_nats::subject::SubjectError>()) =>
            {
                (
                    ErrorClass::Permanent,
                    "INVALID_DESTINATION",
                    format!("the client refuses \"{subject}\" as a subject: {e}"),
                )
            }
            None => (
                ErrorClass::Transient,
                "CLIENT_ERROR",
                format!("publishing to \"{subject}\" failed in the client: {e}; retried"),
            ),
        },
    };
    TransportError::new(class, text).with_code(code)
}

/// Classifies a failed connection attempt to `server` (`nats://host:port`, no secret in it):
/// refused credentials, TLS and address mistakes are permanent, the rest transient.
pub(crate) fn classify_connect(e: &ConnectError, server: &str) -> TransportError {
    let (class, code, what) = match e.kind() {
        ConnectErrorKind::AuthorizationViolation => (
            ErrorClass::Permanent,
            "AUTHORIZATION_VIOLATION",
            "the server refused the credentials (authorization violation): check the user and password or token",
        ),
        ConnectErrorKind::Authentication => (
            ErrorClass::Permanent,
            "AUTHENTICATION_FAILED",
            "authentication failed before the server answered: check the credentials",
        ),
        ConnectErrorKind::Tls => (
            ErrorClass::Permanent,
            "TLS_ERROR",
            "the TLS setup failed: check the CA file and the server's certificate and name",
        ),
        ConnectErrorKind::ServerParse => (
            ErrorClass::Permanent,
            "BAD_ADDRESS",
            "the server address cannot be used",
        ),
        ConnectErrorKind::Dns => (
            ErrorClass::Transient,
            "DNS_FAILED",
            "the host name did not resolve; retried",
        ),
        ConnectErrorKind::TimedOut => (
            ErrorClass::Transient,
            "CONNECT_TIMEOUT",
            "the connection attempt timed out; is the server reachable? (retried until the delivery timeout)",
        ),
        ConnectErrorKind::Io if tls_refused(e) => (
            ErrorClass::Permanent,
            "TLS_ERROR",
            "the TLS handshake failed: is the server's certificate signed by a CA this client trusts (NatsConfig::tls_ca_file) and made out to the host name used, and does the server want a client certificate (NatsConfig::tls_client_cert) it accepts?",
        ),
        ConnectErrorKind::Io | ConnectErrorKind::MaxReconnects => (
            ErrorClass::Transient,
            "UNREACHABLE",
            "is it running and reachable? (retried until the delivery timeout)",
        ),
    };
    TransportError::new(class, format!("cannot connect to {server}: {e}; {what}")).with_code(code)
}

/// Whether an I/O error of a connection attempt is rustls refusing the handshake (an untrusted
/// or misnamed certificate): a setup mistake, not a network one.
fn tls_refused(e: &ConnectError) -> bool {
    e.source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(herald_core::tls::io_refused_for_good)
}

/// A permission violation the server reported (`-ERR 'Permissions Violation for Publish to
/// "x"'`): the server drops the publish and says so on the connection, so its PubAck never
/// comes; the transport fails the messages it concerns at once, permanently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denial {
    /// Publishing to this subject is not allowed.
    Publish(String),
    /// Subscribing to this subject is not allowed: the client's reply inbox, when it is
    /// `_INBOX…`, so no PubAck can come back at all.
    Subscribe(String),
}

/// Reads a server error text as a permission violation, if it is one.
pub(crate) fn permission_violation(text: &str) -> Option<Denial> {
    let lower = text.to_ascii_lowercase();
    let rest_at = lower.find("permissions violation for ")? + "permissions violation for ".len();
    let rest = &text[rest_at..];
    let subject = |s: &str| {
        let s = s.trim().trim_matches(['\'', '"']);
        s.split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches(['\'', '"'])
            .to_owned()
    };
    let lower_rest = rest.to_ascii_lowercase();
    if let Some(r) = lower_rest.strip_prefix("publish to ") {
        Some(Denial::Publish(subject(&rest[rest.len() - r.len()..])))
    } else if lower_rest.starts_with("publish with reply of ") {
        // `Publish with Reply of "_INBOX.x" to "orders"`: the publish is dropped all the same.
        let to = lower_rest.rfind(" to ")? + " to ".len();
        Some(Denial::Publish(subject(&rest[to..])))
    } else {
        lower_rest
            .strip_prefix("subscription to ")
            .map(|r| Denial::Subscribe(subject(&rest[rest.len() - r.len()..])))
    }
}

/// The error of the messages a denial concerns.
pub(crate) fn denied(denial: &Denial, subject: &str) -> TransportError {
    let text = match denial {
        Denial::Publish(_) => format!(
            "the server denied publishing to \"{subject}\" (permissions violation): grant the user publish permission on it"
        ),
        Denial::Subscribe(inbox) => format!(
            "the server denied subscribing to the reply inbox \"{inbox}\" (permissions violation), so no PubAck for \"{subject}\" can come back, and the message may have been stored all the same: grant the user subscribe permission on _INBOX.>"
        ),
    };
    TransportError::permanent(text).with_code("PERMISSION_DENIED")
}

impl From<herald_core::url::UrlError> for ConfigError {
    fn from(e: herald_core::url::UrlError) -> Self {
        Self::Url {
            part: e.part,
            reason: e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: usize, err_code: u64, description: &str) -> PublishError {
        let api: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": code, "err_code": err_code, "description": description
        }))
        .expect("an API error as the server sends it");
        PublishError::with_source(PublishErrorKind::Other, api)
    }

    fn class_code(e: &TransportError) -> (ErrorClass, Option<&str>) {
        (e.class(), e.code())
    }

    #[test]
    fn the_api_code_table() {
        use ErrorClass::{Permanent, Transient};
        let expect = [
            (10077, "maximum bytes exceeded", "STORAGE_FULL", Transient),
            (
                10077,
                "maximum messages exceeded",
                "STORAGE_FULL",
                Transient,
            ),
            (10077, "message too large", "PAYLOAD_TOO_LARGE", Permanent),
            (10077, "message to large", "PAYLOAD_TOO_LARGE", Permanent),
            (10164, "", "WRONG_LAST_SEQUENCE", Permanent),
            (10097, "", "HEADERS_TOO_LARGE", Permanent),
            (10109, "", "STREAM_SEALED", Permanent),
            (10165, "", "INVALID_TTL", Permanent),
            (10166, "", "TTL_DISABLED", Permanent),
            (10167, "too many requests", "TOO_MANY_REQUESTS", Transient),
            (10158, "", "DUPLICATE_IN_PROCESS", Transient),
            (10118, "", "STREAM_OFFLINE", Transient),
            (10077, "i/o error", "STORE_FAILED", Transient),
            (10047, "", "STORAGE_FULL", Transient),
            (10023, "", "STORAGE_FULL", Transient),
            (10002, "", "STORAGE_FULL", Transient),
            (10028, "", "STORAGE_FULL", Transient),
            (10054, "", "PAYLOAD_TOO_LARGE", Permanent),
            (10071, "", "WRONG_LAST_SEQUENCE", Permanent),
            (10070, "", "WRONG_LAST_MSG_ID", Permanent),
            (10060, "", "STREAM_NOT_MATCH", Permanent),
            (10059, "", "NO_STREAM", Permanent),
            (10039, "", "JETSTREAM_NOT_ENABLED", Permanent),
            (10076, "", "JETSTREAM_NOT_ENABLED", Permanent),
            (10003, "", "BAD_REQUEST", Permanent),
            (10008, "", "JETSTREAM_UNAVAILABLE", Transient),
            (10009, "", "NOT_LEADER", Transient),
            (10041, "", "RAFT_ERROR", Transient),
            (99999, "", "API_ERROR", Transient),
        ];
        for (code, text, name, class) in expect {
            let info = api_code(code, text);
            assert_eq!((info.name, info.class), (name, class), "{code} {text:?}");
            assert!(!info.advice.is_empty());
        }
    }

    #[test]
    fn publish_errors_by_kind() {
        use ErrorClass::{Permanent, Transient};
        let s = "orders.eu";
        for (kind, declared, want) in [
            (
                PublishErrorKind::StreamNotFound,
                false,
                (Permanent, "NO_STREAM"),
            ),
            (
                PublishErrorKind::StreamNotFound,
                true,
                (Transient, "NO_STREAM"),
            ),
            (
                PublishErrorKind::WrongLastSequence,
                false,
                (Permanent, "WRONG_LAST_SEQUENCE"),
            ),
            (
                PublishErrorKind::WrongLastMessageId,
                false,
                (Permanent, "WRONG_LAST_MSG_ID"),
            ),
            (PublishErrorKind::TimedOut, false, (Transient, "TIMEOUT")),
            (
                PublishErrorKind::BrokenPipe,
                false,
                (Transient, "CONNECTION_LOST"),
            ),
            (
                PublishErrorKind::MaxAckPending,
                false,
                (Transient, "MAX_ACK_PENDING"),
            ),
            (
                PublishErrorKind::MaxPayloadExceeded,
                false,
                (Permanent, "PAYLOAD_TOO_LARGE"),
            ),
            (PublishErrorKind::Other, false, (Transient, "CLIENT_ERROR")),
        ] {
            let e = classify_publish(&PublishError::new(kind), s, declared);
            assert_eq!(class_code(&e), (want.0, Some(want.1)), "{kind:?}");
            assert!(
                e.message().contains("\"orders.eu\""),
                "names the subject: {e}"
            );
        }
        let e = classify_publish(
            &PublishError::new(PublishErrorKind::StreamNotFound),
            s,
            false,
        );
        assert!(e.message().contains("?stream="), "says how to fix it: {e}");
        let bad_subject = PublishError::with_source(
            PublishErrorKind::Other,
            async_nats::subject::SubjectError::InvalidFormat,
        );
        let e = classify_publish(&bad_subject, s, false);
        assert_eq!(class_code(&e), (Permanent, Some("INVALID_DESTINATION")));
    }

    #[test]
    fn api_errors_from_the_server_are_read_through_the_publish_error() {
        use ErrorClass::{Permanent, Transient};
        for (code, err_code, text, want) in [
            (
                503,
                10077,
                "maximum bytes exceeded",
                (Transient, "STORAGE_FULL"),
            ),
            (
                400,
                10054,
                "message size exceeds maximum allowed",
                (Permanent, "PAYLOAD_TOO_LARGE"),
            ),
            (
                503,
                10047,
                "insufficient storage resources available",
                (Transient, "STORAGE_FULL"),
            ),
            (
                400,
                10060,
                "expected stream does not match",
                (Permanent, "STREAM_NOT_MATCH"),
            ),
            (500, 10999, "something new", (Transient, "API_ERROR")),
        ] {
            let e = classify_publish(&api_error(code, err_code, text), "s", false);
            assert_eq!(class_code(&e), (want.0, Some(want.1)), "{err_code} {text}");
            assert!(e.message().contains(text), "the server's words: {e}");
        }
    }

    #[test]
    fn connect_errors() {
        use ErrorClass::{Permanent, Transient};
        for (kind, want) in [
            (
                ConnectErrorKind::AuthorizationViolation,
                (Permanent, "AUTHORIZATION_VIOLATION"),
            ),
            (
                ConnectErrorKind::Authentication,
                (Permanent, "AUTHENTICATION_FAILED"),
            ),
            (ConnectErrorKind::Tls, (Permanent, "TLS_ERROR")),
            (ConnectErrorKind::ServerParse, (Permanent, "BAD_ADDRESS")),
            (ConnectErrorKind::Dns, (Transient, "DNS_FAILED")),
            (ConnectErrorKind::TimedOut, (Transient, "CONNECT_TIMEOUT")),
            (ConnectErrorKind::Io, (Transient, "UNREACHABLE")),
            (ConnectErrorKind::MaxReconnects, (Transient, "UNREACHABLE")),
        ] {
            let e = classify_connect(&ConnectError::new(kind), "nats://h:4222");
            assert_eq!(class_code(&e), (want.0, Some(want.1)), "{kind:?}");
            assert!(e.message().contains("nats://h:4222"), "{e}");
        }
        // rustls refusing the server's certificate comes as an I/O error: a setup mistake.
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            async_nats::rustls::Error::InvalidCertificate(
                async_nats::rustls::CertificateError::UnknownIssuer,
            ),
        );
        let e = classify_connect(
            &ConnectError::with_source(ConnectErrorKind::Io, refused),
            "tls://h:4222",
        );
        assert_eq!(class_code(&e), (Permanent, Some("TLS_ERROR")), "{e}");
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let e = classify_connect(
            &ConnectError::with_source(ConnectErrorKind::Io, reset),
            "nats://h:4222",
        );
        assert_eq!(class_code(&e), (Transient, Some("UNREACHABLE")), "{e}");
    }

    #[test]
    fn permission_violations_are_read() {
        assert_eq!(
            permission_violation("Permissions Violation for Publish to \"orders.eu\""),
            Some(Denial::Publish("orders.eu".into()))
        );
        assert_eq!(
            permission_violation("'Permissions Violation for Publish to \"orders.eu\"'"),
            Some(Denial::Publish("orders.eu".into()))
        );
        assert_eq!(
            permission_violation("permissions violation for subscription to \"_INBOX.abc.*\""),
            Some(Denial::Subscribe("_INBOX.abc.*".into()))
        );
        assert_eq!(
            permission_violation(
                "Permissions Violation for Publish with Reply of \"_INBOX.x\" to \"y\""
            ),
            Some(Denial::Publish("y".into())),
            "a reply subject refused drops the publish too"
        );
        assert_eq!(
            permission_violation("Permissions Violation for Something Else"),
            None
        );
        assert_eq!(permission_violation("Stale Connection"), None);
        let e = denied(&Denial::Publish("orders.eu".into()), "orders.eu");
        assert_eq!(
            class_code(&e),
            (ErrorClass::Permanent, Some("PERMISSION_DENIED"))
        );
        let e = denied(&Denial::Subscribe("_INBOX.a.*".into()), "orders.eu");
        assert!(e.message().contains("_INBOX.>"), "{e}");
    }
}
