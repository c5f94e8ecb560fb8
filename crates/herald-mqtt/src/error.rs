//! Errors: the MQTT reason-code → class tables (CONNACK, PUBACK/PUBREC, PUBCOMP, DISCONNECT;
//! unit-tested code by code), rumqttc's connection errors classified for MQTT 5 and 3.1.1,
//! and the configuration error.

use herald_core::{ErrorClass, TransportError};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as V5Connect, PubAckReason, PubCompReason, PubRecReason,
};
use rumqttc::ConnectReturnCode as V3Connect;

/// A transport that cannot be built, with the setting to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The broker URL is malformed; `part` names which part (`scheme`, `user`, `password`,
    /// `host`, `port`, `topic`, `query …`). The password never appears in `reason`.
    #[error("invalid MQTT URL: the {part} {reason}; expected mqtt://[user:password@]host:port/TOPIC[?qos=1|2][&version=5|3] (mqtts:// for TLS)")]
    Url {
        /// The part of the URL that is wrong.
        part: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting that cannot work.
    #[error("invalid MQTT setting `{field}`: {reason}")]
    Invalid {
        /// The setting, as [`crate::MqttConfig`] names it.
        field: &'static str,
        /// What is wrong and what would work.
        reason: String,
    },
}

/// What a table says about one reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CodeInfo {
    /// The MQTT reason code (MQTT 3.1.1 CONNACK return codes are 1 to 5).
    pub(crate) code: u8,
    pub(crate) name: &'static str,
    pub(crate) class: ErrorClass,
    /// What the operator should do, in a few words.
    pub(crate) advice: &'static str,
}

fn info(code: u8, name: &'static str, class: ErrorClass, advice: &'static str) -> CodeInfo {
    CodeInfo {
        code,
        name,
        class,
        advice,
    }
}

/// The MQTT 5 reason codes of a PUBACK or PUBREC: `None` for success (0x00, and 0x10 "No
/// matching subscribers", which MQTT counts as success: the broker accepted the message and
/// had no subscriber to hand it to; counted in `herald_mqtt_no_subscribers_total`).
pub(crate) fn ack_code(code: u8) -> Option<CodeInfo> {
    use ErrorClass::{Permanent as P, Transient as T};
    Some(match code {
        0x00 | 0x10 => return None,
        0x80 => info(code, "UNSPECIFIED_ERROR", T, "the broker did not accept the message and gave no reason; retried"),
        0x83 => info(code, "IMPLEMENTATION_SPECIFIC_ERROR", P, "the broker refused the message by its own rule (a plugin, an ACL extension): see its log"),
        0x87 => info(code, "NOT_AUTHORIZED", P, "the user may not publish to this topic: grant it in the broker's ACL"),
        0x90 => info(code, "TOPIC_NAME_INVALID", P, "the broker does not accept this topic name"),
        0x91 => info(code, "PACKET_IDENTIFIER_IN_USE", T, "the broker still held the packet id; retried on a new publish"),
        0x95 => info(code, "PACKET_TOO_LARGE", P, "the message is larger than the broker takes, a limit it does not announce (Mosquitto: message_size_limit): set MqttConfig::max_packet_size to that limit, so that such messages are refused before they are sent"),
        0x97 => info(code, "QUOTA_EXCEEDED", T, "a broker quota is exceeded; retried until it makes room"),
        0x99 => info(code, "PAYLOAD_FORMAT_INVALID", P, "the broker refused the payload's format"),
        _ => info(code, "UNKNOWN_REASON", T, "an unknown reason code; treated as transient"),
    })
}

/// The MQTT 5 reason codes of a PUBCOMP (QoS 2's last step): `None` for success.
pub(crate) fn comp_code(code: u8) -> Option<CodeInfo> {
    match code {
        0x00 => None,
        0x92 => Some(info(
            code,
            "PACKET_IDENTIFIER_NOT_FOUND",
            ErrorClass::Transient,
            "the broker lost the QoS 2 exchange (a restart without persistence?); retried",
        )),
        _ => Some(info(
            code,
            "UNKNOWN_REASON",
            ErrorClass::Transient,
            "an unknown reason code; treated as transient",
        )),
    }
}

/// The CONNACK reason codes refusing a connection: MQTT 5 (0x80 and up) and MQTT 3.1.1 (1 to
/// 5). Wrong credentials and a refused client are permanent; a broker that is busy,
/// unavailable or sends the client elsewhere is transient.
pub(crate) fn connack_code(code: u8, v3: bool) -> CodeInfo {
    use ErrorClass::{Permanent as P, Transient as T};
    if v3 {
        return match code {
            1 => info(
                code,
                "UNSUPPORTED_PROTOCOL_VERSION",
                P,
                "the broker does not speak MQTT 3.1.1",
            ),
            2 => info(
                code,
                "CLIENT_ID_REJECTED",
                P,
                "the broker refuses the client id: see MqttConfig::client_id_prefix",
            ),
            3 => info(
                code,
                "SERVER_UNAVAILABLE",
                T,
                "the broker is unavailable; retried",
            ),
            4 => info(
                code,
                "BAD_CREDENTIALS",
                P,
                "the broker refused the user name or password",
            ),
            5 => info(code, "NOT_AUTHORIZED", P, "the user may not connect"),
            _ => info(
                code,
                "UNKNOWN_REASON",
                T,
                "an unknown return code; treated as transient",
            ),
        };
    }
    match code {
        0x80 => info(
            code,
            "UNSPECIFIED_ERROR",
            T,
            "the broker refused the connection without a reason; retried",
        ),
        0x81 => info(
            code,
            "MALFORMED_PACKET",
            P,
            "the broker could not read the CONNECT packet",
        ),
        0x82 => info(
            code,
            "PROTOCOL_ERROR",
            P,
            "the broker saw a protocol error in CONNECT",
        ),
        0x83 => info(
            code,
            "IMPLEMENTATION_SPECIFIC_ERROR",
            P,
            "the broker refused the connection by its own rule: see its log",
        ),
        0x84 => info(
            code,
            "UNSUPPORTED_PROTOCOL_VERSION",
            P,
            "the broker does not speak MQTT 5: add ?version=3 to the URL for MQTT 3.1.1",
        ),
        0x85 => info(
            code,
            "CLIENT_ID_REJECTED",
            P,
            "the broker refuses the client id: see MqttConfig::client_id_prefix",
        ),
        0x86 => info(
            code,
            "BAD_CREDENTIALS",
            P,
            "the broker refused the user name or password",
        ),
        0x87 => info(code, "NOT_AUTHORIZED", P, "the user may not connect"),
        0x88 => info(
            code,
            "SERVER_UNAVAILABLE",
            T,
            "the broker is unavailable; retried",
        ),
        0x89 => info(code, "SERVER_BUSY", T, "the broker is busy; retried"),
        0x8A => info(code, "BANNED", P, "the broker banned this client"),
        0x8C => info(
            code,
            "BAD_AUTHENTICATION_METHOD",
            P,
            "the broker refuses the authentication method",
        ),
        0x90 => info(
            code,
            "TOPIC_NAME_INVALID",
            P,
            "the broker refused a topic of CONNECT",
        ),
        0x95 => info(
            code,
            "PACKET_TOO_LARGE",
            P,
            "the broker refused the CONNECT packet as too large",
        ),
        0x97 => info(
            code,
            "QUOTA_EXCEEDED",
            T,
            "a broker quota is exceeded; retried",
        ),
        0x99 => info(
            code,
            "PAYLOAD_FORMAT_INVALID",
            P,
            "the broker refused CONNECT's payload format",
        ),
        0x9A => info(
            code,
            "RETAIN_NOT_SUPPORTED",
            P,
            "the broker does not support retained messages",
        ),
        0x9B => info(
            code,
            "QOS_NOT_SUPPORTED",
            P,
            "the broker does not support the QoS asked for: try ?qos=1",
        ),
        0x9C => info(
            code,
            "USE_ANOTHER_SERVER",
            T,
            "the broker sends clients to another server; retried (point the URL there)",
        ),
        0x9D => info(
            code,
            "SERVER_MOVED",
            T,
            "the broker has moved; retried (point the URL to its new address)",
        ),
        0x9F => info(
            code,
            "CONNECTION_RATE_EXCEEDED",
            T,
            "the broker limits the connection rate; retried after the backoff",
        ),
        _ => info(
            code,
            "UNKNOWN_REASON",
            T,
            "an unknown reason code; treated as transient",
        ),
    }
}

/// The MQTT 5 code of rumqttc's CONNACK reason.
pub(crate) fn v5_connect_code(c: V5Connect) -> u8 {
    match c {
        V5Connect::Success => 0x00,
        V5Connect::RefusedProtocolVersion | V5Connect::UnsupportedProtocolVersion => 0x84,
        V5Connect::BadClientId | V5Connect::ClientIdentifierNotValid => 0x85,
        V5Connect::ServiceUnavailable | V5Connect::ServerUnavailable => 0x88,
        V5Connect::UnspecifiedError => 0x80,
        V5Connect::MalformedPacket => 0x81,
        V5Connect::ProtocolError => 0x82,
        V5Connect::ImplementationSpecificError => 0x83,
        V5Connect::BadUserNamePassword => 0x86,
        V5Connect::NotAuthorized => 0x87,
        V5Connect::ServerBusy => 0x89,
        V5Connect::Banned => 0x8A,
        V5Connect::BadAuthenticationMethod => 0x8C,
        V5Connect::TopicNameInvalid => 0x90,
        V5Connect::PacketTooLarge => 0x95,
        V5Connect::QuotaExceeded => 0x97,
        V5Connect::PayloadFormatInvalid => 0x99,
        V5Connect::RetainNotSupported => 0x9A,
        V5Connect::QoSNotSupported => 0x9B,
        V5Connect::UseAnotherServer => 0x9C,
        V5Connect::ServerMoved => 0x9D,
        V5Connect::ConnectionRateExceeded => 0x9F,
    }
}

/// The MQTT 3.1.1 return code of rumqttc's CONNACK code.
pub(crate) fn v3_connect_code(c: V3Connect) -> u8 {
    match c {
        V3Connect::Success => 0,
        V3Connect::RefusedProtocolVersion => 1,
        V3Connect::BadClientId => 2,
        V3Connect::ServiceUnavailable => 3,
        V3Connect::BadUserNamePassword => 4,
        V3Connect::NotAuthorized => 5,
    }
}

/// The MQTT 5 code of a PUBACK reason.
#[cfg_attr(not(feature = "baseline"), allow(dead_code))]
pub(crate) fn puback_code(r: PubAckReason) -> u8 {
    match r {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// The MQTT 5 code of a PUBREC reason (the same codes as PUBACK).
#[cfg_attr(not(feature = "baseline"), allow(dead_code))]
pub(crate) fn pubrec_code(r: PubRecReason) -> u8 {
    match r {
        PubRecReason::Success => 0x00,
        PubRecReason::NoMatchingSubscribers => 0x10,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    }
}

/// The MQTT 5 code of a PUBCOMP reason.
#[cfg_attr(not(feature = "baseline"), allow(dead_code))]
pub(crate) fn pubcomp_code(r: PubCompReason) -> u8 {
    match r {
        PubCompReason::Success => 0x00,
        PubCompReason::PacketIdentifierNotFound => 0x92,
    }
}

/// The error of a message the broker answered with a failure reason code.
pub(crate) fn refused(info: &CodeInfo, topic: &str, packet: &str) -> TransportError {
    TransportError::new(
        info.class,
        format!(
            "the broker refused a message to \"{topic}\" ({packet} reason 0x{:02X} {}): {}",
            info.code, info.name, info.advice
        ),
    )
    .with_code(info.name)
}

/// A connection attempt the broker refused in its CONNACK.
pub(crate) fn connect_refused(code: u8, v3: bool, server: &str) -> TransportError {
    let i = connack_code(code, v3);
    TransportError::new(
        i.class,
        format!(
            "the broker at {server} refused the connection (CONNACK {} 0x{:02X} {}): {}",
            if v3 { "return code" } else { "reason" },
            i.code,
            i.name,
            i.advice
        ),
    )
    .with_code(i.name)
}

/// What went wrong with a connection, in terms both rumqttc clients' errors map onto.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The broker refused CONNECT with this code.
    Refused(u8),
    /// The TCP connection could not be made or broke.
    Io(String),
    /// The connect step timed out (the baseline's rumqttc clients).
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    Timeout,
    /// TLS could not be set up.
    Tls(String),
    /// The broker closed the connection with this MQTT 5 DISCONNECT reason code.
    Disconnected(u8, Option<String>),
    /// The broker did not answer the keep-alive ping.
    PingTimeout,
    /// The broker answered with something unexpected, or the client's state broke.
    Protocol(String),
}

impl Failure {
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    pub(crate) fn from_v5(e: &rumqttc::v5::ConnectionError) -> Self {
        use rumqttc::v5::{ConnectionError as C, StateError as S};
        match e {
            C::ConnectionRefused(code) => Failure::Refused(v5_connect_code(*code)),
            C::Io(e) => Failure::Io(e.to_string()),
            C::Timeout(_) => Failure::Timeout,
            C::Tls(e) => Failure::from_tls(e),
            C::MqttState(S::ServerDisconnect {
                reason_code,
                reason_string,
            }) => Failure::Disconnected(*reason_code as u8, reason_string.clone()),
            C::MqttState(S::AwaitPingResp) => Failure::PingTimeout,
            C::MqttState(S::Io(e)) => Failure::Io(e.to_string()),
            C::MqttState(S::ConnectionAborted) => Failure::Io("closed by the broker".into()),
            C::MqttState(S::ConnFail { reason }) => Failure::Refused(v5_connect_code(*reason)),
            C::MqttState(S::Deserialization(rumqttc::v5::mqttbytes::Error::Io(e))) => {
                Failure::from_read(e)
            }
            C::MqttState(S::Deserialization(
                rumqttc::v5::mqttbytes::Error::InvalidConnectReturnCode(0x95),
            )) => Failure::Protocol(
                "the broker answered with reason 0x95 Packet too large, which the MQTT client \
                 cannot read (a message above a limit the broker does not announce, such as \
                 Mosquitto's message_size_limit): set MqttConfig::max_packet_size to that limit, \
                 so that such a message is refused before it is sent"
                    .into(),
            ),
            other => Failure::Protocol(other.to_string()),
        }
    }

    /// A TLS failure: a setup mistake (an untrusted or misnamed certificate, no protocol in
    /// common) is `Tls`, for good; the connection breaking during the handshake, or a node
    /// that is stopping, is `Io`, retried.
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    fn from_tls(e: &rumqttc::TlsError) -> Self {
        use rumqttc::TlsError as T;
        let for_good = match e {
            T::Io(io) => herald_core::tls::io_refused_for_good(io),
            T::TLS(r) => herald_core::tls::refused_for_good(r),
            _ => true,
        };
        if for_good {
            Failure::Tls(e.to_string())
        } else {
            Failure::Io(format!("during the TLS handshake: {e}"))
        }
    }

    /// A TLS handshake that failed: a setup mistake is `Tls`, for good; the connection
    /// breaking during it is `Io`, retried (as [`Failure::from_tls`]).
    pub(crate) fn from_handshake(e: &std::io::Error) -> Self {
        if herald_core::tls::io_refused_for_good(e) {
            Failure::Tls(e.to_string())
        } else {
            Failure::Io(format!("during the TLS handshake: {e}"))
        }
    }

    /// A read that failed: with TLS 1.3 the broker refuses a client certificate (none given,
    /// or one it does not trust) only after the client's side of the handshake is done, so
    /// the alert arrives on the first read (the CONNACK's) as an I/O error: a setup mistake,
    /// for good, like a refusal during the handshake. Anything else is a broken connection.
    pub(crate) fn from_read(e: &std::io::Error) -> Self {
        if herald_core::tls::io_refused_for_good(e) {
            Failure::Tls(e.to_string())
        } else {
            Failure::Io(e.to_string())
        }
    }

    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    pub(crate) fn from_v3(e: &rumqttc::ConnectionError) -> Self {
        use rumqttc::{ConnectionError as C, StateError as S};
        match e {
            C::ConnectionRefused(code) => Failure::Refused(v3_connect_code(*code)),
            C::Io(e) => Failure::Io(e.to_string()),
            C::NetworkTimeout | C::FlushTimeout => Failure::Timeout,
            C::Tls(e) => Failure::from_tls(e),
            C::MqttState(S::AwaitPingResp) => Failure::PingTimeout,
            C::MqttState(S::Io(e)) => Failure::Io(e.to_string()),
            C::MqttState(S::Deserialization(rumqttc::mqttbytes::Error::Io(e))) => {
                Failure::from_read(e)
            }
            C::MqttState(S::ConnectionAborted) => Failure::Io("closed by the broker".into()),
            other => Failure::Protocol(other.to_string()),
        }
    }

    /// The error of a connection attempt to `server` that failed this way.
    pub(crate) fn connect_error(&self, server: &str, v3: bool) -> TransportError {
        match self {
            Failure::Refused(code) => connect_refused(*code, v3, server),
            Failure::Io(e) => TransportError::transient(format!(
                "cannot connect to {server}: {e}; is the broker running and reachable? (retried until the delivery timeout)"
            ))
            .with_code("UNREACHABLE"),
            Failure::Timeout => TransportError::transient(format!(
                "connecting to {server} timed out; is the broker reachable? (retried until the delivery timeout)"
            ))
            .with_code("CONNECT_TIMEOUT"),
            Failure::Tls(e) => TransportError::permanent(format!(
                "the TLS handshake with {server} failed: {e}; is the broker's certificate signed by a CA this client trusts (MqttConfig::tls_ca_file) and made out to the host name used, and does the broker want a client certificate (MqttConfig::tls_client_cert) it accepts?"
            ))
            .with_code("TLS_ERROR"),
            Failure::Disconnected(..) | Failure::PingTimeout | Failure::Protocol(_) => {
                let lost = self.lost_error(server);
                TransportError::transient(format!("while connecting: {}", lost.message()))
                    .with_code(lost.code().unwrap_or("CONNECTION_LOST").to_owned())
            }
        }
    }

    /// The error of the messages in flight on a connection to `server` lost this way: always
    /// transient (herald retries them on a new connection), with what happened.
    pub(crate) fn lost_error(&self, server: &str) -> TransportError {
        let (code, what) = match self {
            Failure::Disconnected(reason, text) => (
                "DISCONNECTED",
                format!(
                    "the broker closed the connection (DISCONNECT reason 0x{reason:02X} {}{})",
                    disconnect_name(*reason),
                    text.as_deref()
                        .map(|t| format!(": {t}"))
                        .unwrap_or_default()
                ),
            ),
            Failure::PingTimeout => (
                "KEEPALIVE_TIMEOUT",
                "the broker did not answer the keep-alive ping".to_owned(),
            ),
            Failure::Protocol(e) => ("PROTOCOL_ERROR", format!("protocol error: {e}")),
            Failure::Io(e) => ("CONNECTION_LOST", format!("the connection broke: {e}")),
            Failure::Timeout => ("CONNECTION_LOST", "the connection timed out".to_owned()),
            Failure::Tls(e) => ("CONNECTION_LOST", format!("TLS failed: {e}")),
            Failure::Refused(code) => ("CONNECTION_LOST", format!("refused (0x{code:02X})")),
        };
        TransportError::transient(format!(
            "the connection to {server} was lost: {what}; herald reconnects with a new session and retries what was not acknowledged (the broker may already have some of it: a duplicate is possible)"
        ))
        .with_code(code)
    }
}

/// The name of an MQTT 5 DISCONNECT reason code.
pub(crate) fn disconnect_name(code: u8) -> &'static str {
    match code {
        0x00 => "NORMAL_DISCONNECTION",
        0x80 => "UNSPECIFIED_ERROR",
        0x81 => "MALFORMED_PACKET",
        0x82 => "PROTOCOL_ERROR",
        0x83 => "IMPLEMENTATION_SPECIFIC_ERROR",
        0x87 => "NOT_AUTHORIZED",
        0x89 => "SERVER_BUSY",
        0x8B => "SERVER_SHUTTING_DOWN",
        0x8D => "KEEP_ALIVE_TIMEOUT",
        0x8E => "SESSION_TAKEN_OVER",
        0x90 => "TOPIC_NAME_INVALID",
        0x93 => "RECEIVE_MAXIMUM_EXCEEDED",
        0x94 => "TOPIC_ALIAS_INVALID",
        0x95 => "PACKET_TOO_LARGE",
        0x96 => "MESSAGE_RATE_TOO_HIGH",
        0x97 => "QUOTA_EXCEEDED",
        0x98 => "ADMINISTRATIVE_ACTION",
        0x99 => "PAYLOAD_FORMAT_INVALID",
        _ => "OTHER",
    }
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
    use ErrorClass::{Permanent, Transient};

    #[test]
    fn the_puback_and_pubrec_table() {
        assert_eq!(ack_code(0x00), None);
        assert_eq!(ack_code(0x10), None, "no matching subscribers is success");
        for (code, name, class) in [
            (0x80, "UNSPECIFIED_ERROR", Transient),
            (0x83, "IMPLEMENTATION_SPECIFIC_ERROR", Permanent),
            (0x87, "NOT_AUTHORIZED", Permanent),
            (0x90, "TOPIC_NAME_INVALID", Permanent),
            (0x91, "PACKET_IDENTIFIER_IN_USE", Transient),
            (0x97, "QUOTA_EXCEEDED", Transient),
            (0x99, "PAYLOAD_FORMAT_INVALID", Permanent),
            (0xAA, "UNKNOWN_REASON", Transient),
        ] {
            let i = ack_code(code).expect("a failure");
            assert_eq!((i.name, i.class), (name, class), "0x{code:02X}");
            assert!(!i.advice.is_empty());
        }
        // Every rumqttc reason maps to its code, and the code to the table.
        for (r, code) in [
            (PubAckReason::Success, 0x00),
            (PubAckReason::NoMatchingSubscribers, 0x10),
            (PubAckReason::UnspecifiedError, 0x80),
            (PubAckReason::ImplementationSpecificError, 0x83),
            (PubAckReason::NotAuthorized, 0x87),
            (PubAckReason::TopicNameInvalid, 0x90),
            (PubAckReason::PacketIdentifierInUse, 0x91),
            (PubAckReason::QuotaExceeded, 0x97),
            (PubAckReason::PayloadFormatInvalid, 0x99),
        ] {
            assert_eq!(puback_code(r), code);
        }
        assert_eq!(pubrec_code(PubRecReason::NotAuthorized), 0x87);
        assert_eq!(pubrec_code(PubRecReason::NoMatchingSubscribers), 0x10);
        let e = refused(&ack_code(0x87).expect("failure"), "plant/x", "PUBACK");
        assert_eq!((e.class(), e.code()), (Permanent, Some("NOT_AUTHORIZED")));
        assert!(
            e.message().contains("0x87") && e.message().contains("\"plant/x\""),
            "{e}"
        );
    }

    #[test]
    fn the_pubcomp_table() {
        assert_eq!(comp_code(pubcomp_code(PubCompReason::Success)), None);
        let i = comp_code(pubcomp_code(PubCompReason::PacketIdentifierNotFound)).expect("failure");
        assert_eq!((i.code, i.class), (0x92, Transient));
    }

    #[test]
    fn the_connack_tables() {
        for (code, name, class) in [
            (0x80, "UNSPECIFIED_ERROR", Transient),
            (0x81, "MALFORMED_PACKET", Permanent),
            (0x82, "PROTOCOL_ERROR", Permanent),
            (0x83, "IMPLEMENTATION_SPECIFIC_ERROR", Permanent),
            (0x84, "UNSUPPORTED_PROTOCOL_VERSION", Permanent),
            (0x85, "CLIENT_ID_REJECTED", Permanent),
            (0x86, "BAD_CREDENTIALS", Permanent),
            (0x87, "NOT_AUTHORIZED", Permanent),
            (0x88, "SERVER_UNAVAILABLE", Transient),
            (0x89, "SERVER_BUSY", Transient),
            (0x8A, "BANNED", Permanent),
            (0x8C, "BAD_AUTHENTICATION_METHOD", Permanent),
            (0x90, "TOPIC_NAME_INVALID", Permanent),
            (0x95, "PACKET_TOO_LARGE", Permanent),
            (0x97, "QUOTA_EXCEEDED", Transient),
            (0x99, "PAYLOAD_FORMAT_INVALID", Permanent),
            (0x9A, "RETAIN_NOT_SUPPORTED", Permanent),
            (0x9B, "QOS_NOT_SUPPORTED", Permanent),
            (0x9C, "USE_ANOTHER_SERVER", Transient),
            (0x9D, "SERVER_MOVED", Transient),
            (0x9F, "CONNECTION_RATE_EXCEEDED", Transient),
            (0xF0, "UNKNOWN_REASON", Transient),
        ] {
            let i = connack_code(code, false);
            assert_eq!((i.name, i.class), (name, class), "0x{code:02X}");
        }
        for (code, name, class) in [
            (1, "UNSUPPORTED_PROTOCOL_VERSION", Permanent),
            (2, "CLIENT_ID_REJECTED", Permanent),
            (3, "SERVER_UNAVAILABLE", Transient),
            (4, "BAD_CREDENTIALS", Permanent),
            (5, "NOT_AUTHORIZED", Permanent),
            (9, "UNKNOWN_REASON", Transient),
        ] {
            let i = connack_code(code, true);
            assert_eq!((i.name, i.class), (name, class), "{code}");
        }
        assert_eq!(v5_connect_code(V5Connect::BadUserNamePassword), 0x86);
        assert_eq!(v5_connect_code(V5Connect::ServerUnavailable), 0x88);
        assert_eq!(v3_connect_code(V3Connect::BadUserNamePassword), 4);
        assert_eq!(v3_connect_code(V3Connect::ServiceUnavailable), 3);
        let e = connect_refused(0x84, false, "h:1883");
        assert!(
            e.message().contains("?version=3"),
            "says how to fix it: {e}"
        );
    }

    #[test]
    fn only_a_tls_setup_mistake_is_for_good() {
        use rumqttc::v5::ConnectionError as C;
        use rumqttc::TlsError as T;
        let io = |e: std::io::Error| Failure::from_v5(&C::Tls(T::Io(e)));
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(matches!(io(refused), Failure::Tls(_)));
        let stopping = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CloseNotify),
        );
        assert!(matches!(io(stopping), Failure::Io(_)));
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(matches!(io(eof), Failure::Io(_)));
        let v3 = Failure::from_v3(&rumqttc::ConnectionError::Tls(T::NoValidCertInChain));
        assert!(matches!(v3, Failure::Tls(_)));
        // TLS 1.3: a broker that wants a client certificate says so on the first read.
        let required = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
            )
        };
        let v5 = Failure::from_v5(&C::MqttState(rumqttc::v5::StateError::Deserialization(
            rumqttc::v5::mqttbytes::Error::Io(required()),
        )));
        assert!(matches!(v5, Failure::Tls(_)), "{v5:?}");
        let v3 = Failure::from_v3(&rumqttc::ConnectionError::MqttState(
            rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::Io(required())),
        ));
        assert!(matches!(v3, Failure::Tls(_)), "{v3:?}");
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let v5 = Failure::from_v5(&C::MqttState(rumqttc::v5::StateError::Deserialization(
            rumqttc::v5::mqttbytes::Error::Io(reset),
        )));
        assert!(matches!(v5, Failure::Io(_)), "{v5:?}");
    }

    #[test]
    fn connection_failures() {
        let s = "h:1883";
        for (f, class, code) in [
            (Failure::Refused(0x86), Permanent, "BAD_CREDENTIALS"),
            (Failure::Refused(0x88), Transient, "SERVER_UNAVAILABLE"),
            (Failure::Io("refused".into()), Transient, "UNREACHABLE"),
            (Failure::Timeout, Transient, "CONNECT_TIMEOUT"),
            (Failure::Tls("bad cert".into()), Permanent, "TLS_ERROR"),
            (Failure::PingTimeout, Transient, "KEEPALIVE_TIMEOUT"),
            (Failure::Disconnected(0x8B, None), Transient, "DISCONNECTED"),
            (Failure::Protocol("x".into()), Transient, "PROTOCOL_ERROR"),
        ] {
            let e = f.connect_error(s, false);
            assert_eq!((e.class(), e.code()), (class, Some(code)), "{f:?}");
            assert!(e.message().contains(s), "{e}");
        }
        let e = Failure::Disconnected(0x8B, Some("bye".into())).lost_error(s);
        assert_eq!((e.class(), e.code()), (Transient, Some("DISCONNECTED")));
        assert!(
            e.message().contains("SERVER_SHUTTING_DOWN") && e.message().contains("bye"),
            "{e}"
        );
        assert!(e.message().contains("duplicate is possible"), "{e}");
        assert_eq!(
            Failure::Io("reset".into()).lost_error(s).code(),
            Some("CONNECTION_LOST")
        );
        // A reason code rumqttc cannot read (Mosquitto's answer above its message_size_limit)
        // says what to set.
        let unreadable =
            rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::Deserialization(
                rumqttc::v5::mqttbytes::Error::InvalidConnectReturnCode(0x95),
            ));
        let e = Failure::from_v5(&unreadable).lost_error(s);
        assert_eq!(e.code(), Some("PROTOCOL_ERROR"));
        assert!(e.message().contains("max_packet_size"), "{e}");
    }
}
