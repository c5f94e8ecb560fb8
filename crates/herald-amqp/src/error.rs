//! Errors: the AMQP reply-code → class table (unit-tested), lapin errors classified (on a
//! shared channel too), and the configuration error.

use herald_core::{ErrorClass, TransportError};
use lapin::protocol::AMQPErrorKind;
use lapin::ErrorKind;

use crate::destination::Route;

/// A transport that cannot be built, with the setting to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The broker URL is malformed; `part` names which part (`scheme`, `user information`,
    /// `user`, `password`, `host`, `port`, `vhost`, `query …`). The password never appears in
    /// `reason`.
    #[error("invalid AMQP URL: the {part} {reason}; expected amqp[s]://user:password@host:port/vhost (vhost percent-encoded, `/` is %2F)")]
    Url {
        /// The part of the URL that is wrong.
        part: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting that cannot work.
    #[error("invalid AMQP setting `{field}`: {reason}")]
    Invalid {
        /// The setting, as [`crate::AmqpConfig`] names it.
        field: &'static str,
        /// What is wrong and what would work.
        reason: String,
    },
}

/// What the table says about one AMQP reply code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CodeInfo {
    pub(crate) name: &'static str,
    pub(crate) class: ErrorClass,
    /// What the operator should do, in a few words.
    pub(crate) advice: &'static str,
    /// The error concerns the destination (every message to it fails alike), not one message.
    pub(crate) whole_destination: bool,
}

/// The AMQP 0-9-1 reply codes (channel.close / connection.close / basic.return) and their class.
pub(crate) fn reply_code(code: u16) -> CodeInfo {
    use ErrorClass::{Permanent as P, Transient as T};
    let (name, class, advice, whole_destination) = match code {
        311 => ("CONTENT_TOO_LARGE", P, "the message is larger than the broker accepts", false),
        312 => ("NO_ROUTE", P, "no queue is bound for this routing key: declare and bind one, or fix the destination", false),
        313 => ("NO_CONSUMERS", P, "no consumer is ready (immediate publishing)", false),
        320 => ("CONNECTION_FORCED", T, "the broker closed the connection (shutdown or an operator); herald reconnects", false),
        402 => ("INVALID_PATH", P, "the virtual host does not exist: create it or fix the URL's vhost", true),
        403 => ("ACCESS_REFUSED", P, "the user lacks permission (or the credentials are wrong): grant it with rabbitmqctl set_permissions", true),
        404 => ("NOT_FOUND", P, "declare the exchange (or fix the destination's name)", true),
        405 => ("RESOURCE_LOCKED", T, "an exclusive queue is held by another connection", false),
        406 => ("PRECONDITION_FAILED", P, "the broker refused the message or declaration (size limit, mismatched arguments)", false),
        501 => ("FRAME_ERROR", T, "a malformed frame; herald reconnects", false),
        502 => ("SYNTAX_ERROR", T, "the broker could not parse a frame; herald reconnects", false),
        503 => ("COMMAND_INVALID", T, "the broker refused a command in this state; herald reopens the channel", false),
        504 => ("CHANNEL_ERROR", T, "a channel error; herald reopens the channel", false),
        505 => ("UNEXPECTED_FRAME", T, "an unexpected frame; herald reconnects", false),
        506 => ("RESOURCE_ERROR", T, "the broker is short of a resource; retry later", false),
        530 => ("NOT_ALLOWED", P, "the broker does not allow this (often: the user may not use this vhost): fix permissions or the URL", true),
        540 => ("NOT_IMPLEMENTED", P, "the broker does not implement this", true),
        541 => ("INTERNAL_ERROR", T, "an internal broker error; retry later", false),
        _ => ("UNKNOWN_REPLY_CODE", T, "an unknown reply code; treated as transient", false),
    };
    CodeInfo {
        name,
        class,
        advice,
        whole_destination,
    }
}

/// Classifies a lapin error from publishing (or from a confirm) to `target`
/// (`exchange "x" routing key "k"`), with a message saying what to do.
pub(crate) fn classify(e: &lapin::Error, target: &str) -> TransportError {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let code = amqp.get_id();
            let info = reply_code(code);
            let text = amqp.get_message().as_str();
            let scope = match amqp.kind() {
                AMQPErrorKind::Soft(_) => "channel",
                AMQPErrorKind::Hard(_) => "connection",
            };
            TransportError::new(
                info.class,
                format!(
                    "broker closed the {scope} publishing to {target}: {code} {text}; {}",
                    info.advice
                ),
            )
            .with_code(info.name)
            .with_source(e.clone())
        }
        ErrorKind::IOError(_) | ErrorKind::MissingHeartbeatError => TransportError::transient(
            format!("connection to the broker lost while publishing to {target}: {e}; herald reconnects and retries"),
        )
        .with_code("CONNECTION_LOST")
        .with_source(e.clone()),
        ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannel(_) => TransportError::transient(format!(
            "channel or connection closed while publishing to {target}: {e}; herald reopens it and retries"
        ))
        .with_code("CHANNEL_CLOSED")
        .with_source(e.clone()),
        ErrorKind::ChannelsLimitReached => TransportError::transient(format!(
            "the broker's channel limit is reached: {e}; lower `channels` or raise channel_max"
        ))
        .with_code("CHANNELS_LIMIT")
        .with_source(e.clone()),
        _ => TransportError::transient(format!("AMQP client error publishing to {target}: {e}"))
            .with_code("CLIENT_ERROR")
            .with_source(e.clone()),
    }
}

/// Classifies a failed connection attempt to `url` (already redacted): unreachable is transient,
/// refused credentials and a missing vhost are permanent.
pub(crate) fn classify_connect(e: &lapin::Error, url: &str) -> TransportError {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let code = amqp.get_id();
            let message = amqp.get_message().as_str().to_ascii_lowercase();
            // RabbitMQ also answers 530 for what passes: a vhost restarting ("vhost / is
            // down") and a vhost's or user's connection limit reached.
            if code == 530 && (message.contains("' is down") || message.contains("connection limit")) {
                return TransportError::transient(format!(
                    "cannot connect to {url}: {code} {}; the virtual host is restarting or at its connection limit: retried",
                    amqp.get_message()
                ))
                .with_code("NOT_ALLOWED")
                .with_source(e.clone());
            }
            let info = reply_code(code);
            let what = match code {
                403 => "the broker refused the credentials (ACCESS_REFUSED): check the user and password".to_owned(),
                530 | 402 => "the virtual host does not exist or the user may not use it: check the URL's vhost (percent-encoded) and the user's permissions".to_owned(),
                _ => info.advice.to_owned(),
            };
            TransportError::new(
                info.class,
                format!(
                    "cannot connect to {url}: {code} {}; {what}",
                    amqp.get_message()
                ),
            )
            .with_code(info.name)
            .with_source(e.clone())
        }
        ErrorKind::IOError(io) if herald_core::tls::io_refused_for_good(io) => {
            TransportError::permanent(format!(
            "the TLS handshake with {url} failed: {io}; is the broker's certificate signed by a CA this client trusts (AmqpConfig::tls_ca_pem, or the system's roots) and made out to the host name used?"
        ))
        .with_code("TLS_ERROR")
        .with_source(e.clone())
        }
        ErrorKind::IOError(io) => TransportError::transient(format!(
            "cannot reach the broker at {url}: {io}; is it running and reachable? (retried until the delivery timeout)"
        ))
        .with_code("UNREACHABLE")
        .with_source(e.clone()),
        ErrorKind::InvalidConnectionState(_) => TransportError::transient(format!(
            "connection to {url} closed during the handshake: {e} (wrong credentials close it this way on some brokers; check them if this persists)"
        ))
        .with_code("HANDSHAKE_FAILED")
        .with_source(e.clone()),
        _ => TransportError::transient(format!("cannot connect to {url}: {e}"))
            .with_code("CONNECT_FAILED")
            .with_source(e.clone()),
    }
}

/// Classifies an error from a publish or a confirm on a channel that other batches share. A
/// channel closed for a missing exchange (404) or refused access (403) fails every pending
/// confirm on it, whichever batch caused it: that is permanent for this call only when the
/// broker's reason names this call's own exchange; otherwise another batch closed the channel,
/// and this call's messages are retried (transient `CHANNEL_CLOSED`).
pub(crate) fn classify_on_channel(e: &lapin::Error, route: &Route, target: &str) -> TransportError {
    let err = classify(e, target);
    if err.class() != ErrorClass::Permanent
        || !matches!(err.code(), Some("NOT_FOUND" | "ACCESS_REFUSED"))
    {
        return err;
    }
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return err;
    };
    let reason = amqp.get_message().as_str();
    let name = if route.exchange.is_empty() {
        "amq.default"
    } else {
        route.exchange.as_str()
    };
    if reason.contains(&format!("exchange '{name}'")) {
        return err;
    }
    TransportError::transient(format!(
        "the channel was closed by another batch's error ({} {reason}) while publishing to {target}; retried",
        amqp.get_id()
    ))
    .with_code("CHANNEL_CLOSED")
    .with_source(e.clone())
}

/// RabbitMQ's text for an oversized message: `... message size 2000 is larger than configured
/// max size 1000`. Returns the maximum, so that only the messages above it are failed.
pub(crate) fn max_size_from_text(text: &str) -> Option<usize> {
    let rest = text.split("larger than configured max size ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
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
    use crate::destination::{exchange, queue};
    use crate::publish::finish;
    use herald_core::{Ack, Message};

    #[test]
    fn the_code_table() {
        use ErrorClass::{Permanent, Transient};
        let expect = [
            (311, "CONTENT_TOO_LARGE", Permanent),
            (312, "NO_ROUTE", Permanent),
            (313, "NO_CONSUMERS", Permanent),
            (320, "CONNECTION_FORCED", Transient),
            (402, "INVALID_PATH", Permanent),
            (403, "ACCESS_REFUSED", Permanent),
            (404, "NOT_FOUND", Permanent),
            (405, "RESOURCE_LOCKED", Transient),
            (406, "PRECONDITION_FAILED", Permanent),
            (501, "FRAME_ERROR", Transient),
            (502, "SYNTAX_ERROR", Transient),
            (503, "COMMAND_INVALID", Transient),
            (504, "CHANNEL_ERROR", Transient),
            (505, "UNEXPECTED_FRAME", Transient),
            (506, "RESOURCE_ERROR", Transient),
            (530, "NOT_ALLOWED", Permanent),
            (540, "NOT_IMPLEMENTED", Permanent),
            (541, "INTERNAL_ERROR", Transient),
            (999, "UNKNOWN_REPLY_CODE", Transient),
        ];
        for (code, name, class) in expect {
            let info = reply_code(code);
            assert_eq!((info.name, info.class), (name, class), "reply code {code}");
            assert!(!info.advice.is_empty());
        }
        assert!(reply_code(404).whole_destination);
        assert!(reply_code(403).whole_destination);
        assert!(
            !reply_code(406).whole_destination,
            "one oversized message fails alone"
        );
        assert!(!reply_code(312).whole_destination);
    }

    #[test]
    fn lapin_errors_are_classified() {
        let io: lapin::Error =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        let e = classify(&io, "exchange \"x\"");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some("CONNECTION_LOST"))
        );
        let e = classify_connect(&io, "amqp://u:***@h:5672/%2F");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some("UNREACHABLE"))
        );
        assert!(e.message().contains("amqp://u:***@h:5672/%2F"), "{e}");

        // rustls refusing the server's certificate comes as an I/O error: a setup mistake.
        let tls: lapin::Error = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )
        .into();
        let e = classify_connect(&tls, "amqps://u:***@h:5671/%2F");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("TLS_ERROR"))
        );
        assert!(e.message().contains("tls_ca_pem"), "{e}");

        let missing = lapin::Error::from(lapin::ErrorKind::ProtocolError(
            lapin::protocol::AMQPError::new(
                AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no exchange 'nope' in vhost '/'".into(),
            ),
        ));
        let e = classify(&missing, "exchange \"nope\" routing key \"k\"");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("NOT_FOUND"))
        );
        assert!(
            e.message().contains("\"nope\"") && e.message().contains("declare the exchange"),
            "{e}"
        );

        let refused = lapin::Error::from(lapin::ErrorKind::ProtocolError(
            lapin::protocol::AMQPError::new(
                AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - Login was refused".into(),
            ),
        ));
        let e = classify_connect(&refused, "amqp://u:***@h:5672/%2F");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("ACCESS_REFUSED"))
        );
        assert!(e.message().contains("credentials"), "{e}");
    }

    #[test]
    fn oversized_text() {
        assert_eq!(
            max_size_from_text(
                "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000"
            ),
            Some(1000)
        );
        assert_eq!(
            max_size_from_text("PRECONDITION_FAILED - inequivalent arg"),
            None
        );
    }

    fn closed_by(kind: lapin::protocol::AMQPSoftError, text: &str) -> lapin::Error {
        lapin::Error::from(lapin::ErrorKind::ProtocolError(
            lapin::protocol::AMQPError::new(
                lapin::protocol::AMQPErrorKind::Soft(kind),
                text.into(),
            ),
        ))
    }

    #[test]
    fn a_channel_closed_by_another_batch_is_transient() {
        use lapin::protocol::AMQPSoftError::{ACCESSREFUSED, NOTFOUND};
        let mine = Route::parse(&exchange("orders", "k")).expect("valid");
        let queue_route = Route::parse(&queue("q")).expect("valid");
        let missing = closed_by(NOTFOUND, "NOT_FOUND - no exchange 'nope' in vhost '/'");
        let refused = closed_by(
            ACCESSREFUSED,
            "ACCESS_REFUSED - write access to exchange 'secret' in vhost '/' refused for user 'u'",
        );
        for (e, route) in [
            (&missing, &mine),
            (&missing, &queue_route),
            (&refused, &mine),
            (&refused, &queue_route),
        ] {
            let c = classify_on_channel(e, route, &route.describe());
            assert_eq!(
                (c.class(), c.code()),
                (ErrorClass::Transient, Some("CHANNEL_CLOSED")),
                "{c}"
            );
        }
        // This call's own exchange: permanent, for the whole batch.
        let own = closed_by(NOTFOUND, "NOT_FOUND - no exchange 'orders' in vhost '/'");
        let c = classify_on_channel(&own, &mine, &mine.describe());
        assert_eq!(
            (c.class(), c.code()),
            (ErrorClass::Permanent, Some("NOT_FOUND"))
        );
        let own = closed_by(
            ACCESSREFUSED,
            "ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'u'",
        );
        let c = classify_on_channel(&own, &queue_route, &queue_route.describe());
        assert_eq!(
            (c.class(), c.code()),
            (ErrorClass::Permanent, Some("ACCESS_REFUSED"))
        );
        // And that batch's outcome does not spread to a batch of another destination.
        let batch = vec![
            Message::new("q", "m0").with_key("a"),
            Message::new("q", "m1").with_key("b"),
        ];
        let out = finish(
            &batch,
            vec![
                Err(classify_on_channel(&missing, &mine, "x")),
                Ok(Ack::default()),
            ],
        );
        assert_eq!(
            out[0].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Transient)
        );
        assert!(out[1].is_ok());
    }
}
