//! Errors: the configuration mistakes ([`ConfigError`]), and the classification table: every
//! Redis error reply and client error mapped to a transient or permanent
//! [`TransportError`], with a code.
//!
//! Two sources: the server's error replies (`-WRONGTYPE ...`, `-OOM ...`: [`reply`], by their
//! first word, the Redis error code), and the client's own errors (I/O, authentication, a
//! broken reply: [`classify`], [`classify_connect`]).

use std::error::Error as _;

use herald_core::{ErrorClass, TransportError};
use redis::{ErrorKind, RedisError};

/// A setting that cannot work, found when the configuration is built or checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The server URL is malformed; `part` names which part (`scheme`, `user information`,
    /// `user`, `password`, `host`, `port`, `database`, `stream key`, `query …`). The password
    /// never appears in `reason`.
    #[error("invalid Redis URL: the {part} {reason}; expected redis://[user:password@]host:port[/DB]/STREAMKEY[?maxlen=N&wait=N&wait_timeout_ms=MS] (rediss:// for TLS)")]
    Url {
        /// The part of the URL that is wrong.
        part: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting that cannot work.
    #[error("invalid Redis setting `{field}`: {reason}")]
    Invalid {
        /// The setting, as [`crate::RedisConfig`] names it.
        field: &'static str,
        /// What is wrong and what would work.
        reason: String,
    },
}

/// What the table says about one Redis error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CodeInfo {
    pub(crate) name: &'static str,
    pub(crate) class: ErrorClass,
    /// What the operator should do, in a few words.
    pub(crate) advice: &'static str,
}

/// The error replies of Redis, by code (the first word of the reply) and, for the generic
/// `ERR`, its text. Unknown codes are transient: a module's or a newer server's refusal is
/// retried until the delivery timeout rather than dropped.
pub(crate) fn reply_code(code: &str, detail: &str) -> CodeInfo {
    use ErrorClass::{Permanent as P, Transient as T};
    let lower = detail.to_ascii_lowercase();
    // redis-rs rewraps a refused SELECT (a URL with a database) as ERR with the server's words,
    // which keep what the code would have said: classified as that code.
    if code == "ERR" && !lower.contains("max number of clients") {
        for (words, code) in [("redis is busy", "BUSY"), ("redis is loading", "LOADING")] {
            if lower.contains(words) {
                return reply_code(code, detail);
            }
        }
    }
    let (name, class, advice) = match code {
        "WRONGTYPE" => ("WRONG_TYPE", P, "the key holds another type than a stream: use another key or delete it"),
        "NOPERM" => ("PERMISSION_DENIED", P, "the ACL user may not XADD to this key: grant +xadd (and +wait with ?wait=) on it, and +ping, with which herald checks that a new connection's server is not loading its data"),
        "NOAUTH" => ("AUTH_REQUIRED", P, "the server needs a password: put it in the URL (redis://:PASSWORD@host or redis://USER:PASSWORD@host)"),
        "WRONGPASS" => ("AUTH_FAILED", P, "the server refused the user or password"),
        "OOM" => ("OUT_OF_MEMORY", T, "the server is at maxmemory and evicts nothing for writes (maxmemory-policy noeviction): retried until memory is freed; raise maxmemory, trim the stream (?maxlen=) or let consumers delete"),
        "LOADING" => ("LOADING", T, "the server is loading its dataset from disk after a restart: retried"),
        "BUSY" => ("BUSY", T, "the server is running a long script or function: retried"),
        "TRYAGAIN" => ("TRY_AGAIN", T, "the server asks to try again: retried"),
        "MASTERDOWN" => ("MASTER_DOWN", T, "the server is a replica that lost its primary: retried on a new connection; point the URL at the primary"),
        "READONLY" => ("READ_ONLY", T, "the server is a read-only replica (after a failover the old primary becomes one): retried on a new connection, which follows the primary's name to its new address; point the URL at the primary"),
        "NOREPLICAS" => ("NOT_ENOUGH_REPLICAS", T, "the primary refuses writes while fewer than min-replicas-to-write replicas are connected: retried"),
        "MISCONF" => ("STORE_FAILED", T, "the server cannot write its RDB snapshot and refuses writes (stop-writes-on-bgsave-error): retried; fix the server's disk"),
        "CLUSTERDOWN" => ("CLUSTER_DOWN", T, "the cluster is down: retried"),
        "MOVED" | "ASK" | "CROSSSLOT" => ("CLUSTER_NOT_SUPPORTED", P, "this server is a Redis Cluster node: herald-redis speaks to a single primary (or a proxy), not to a cluster"),
        "ERR" if lower.contains("max number of clients") => ("MAX_CLIENTS", T, "the server has maxclients connections: retried"),
        "ERR" if lower.contains("unknown command") => ("NOT_SUPPORTED", P, "the server does not know XADD (Redis 5.0 or later needed) or WAIT"),
        "ERR" if lower.contains("db index is out of range") || lower.contains("invalid db index") => ("BAD_DATABASE", P, "the server has no such database: check the number in the URL"),
        "ERR" if lower.contains("string exceeds maximum allowed size") || lower.contains("too large") || lower.contains("bulk length") => ("PAYLOAD_TOO_LARGE", P, "the server refuses values this large (proto-max-bulk-len)"),
        // A proxy in front of Redis (Envoy, twemproxy, a managed endpoint) answers ERR when it
        // cannot reach the server: that passes. After the rules above, whose texts may quote a
        // stream name (`unknown command ... with args beginning with: 'jobs:upstream'`).
        "ERR" if ["upstream", "connection refused", "connection reset", "timed out"].iter().any(|w| lower.contains(w)) => ("PROXY_ERROR", T, "a proxy between herald and Redis could not reach the server: retried"),
        "ERR" => ("SERVER_REFUSED", P, "the server refused the command"),
        _ => ("SERVER_ERROR", T, "an error reply herald does not know: retried"),
    };
    CodeInfo {
        name,
        class,
        advice,
    }
}

/// A server's error reply to the XADD of a message to `stream`.
pub(crate) fn reply(code: &str, detail: &str, stream: &str) -> TransportError {
    let info = reply_code(code, detail);
    TransportError::new(
        info.class,
        format!(
            "Redis refused a message to the stream \"{}\": {code} {detail}; {}",
            stream.escape_debug(),
            info.advice
        ),
    )
    .with_code(info.name)
}

/// Whether a client error means the connection is gone (or cannot be trusted any more): the
/// transport then opens a new one.
pub(crate) fn breaks_connection(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Io | ErrorKind::Parse) || e.is_connection_dropped()
}

/// Whether an I/O error is rustls refusing the handshake (an untrusted or misnamed
/// certificate): a setup mistake, not a network one.
fn tls_refused(e: &RedisError) -> bool {
    // redis-rs keeps the I/O error as an `Arc<dyn Error>`, which is what `source` gives.
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let io = e.source().and_then(|s| {
        s.downcast_ref::<std::io::Error>().or_else(|| {
            s.downcast_ref::<Shared>()
                .and_then(|shared| shared.downcast_ref::<std::io::Error>())
        })
    });
    io.is_some_and(herald_core::tls::io_refused_for_good)
}

/// Classifies a client error of a batch sent to `server` (`redis://host:port`, no secret in
/// it): a server reply by the table, a lost connection transient, a client-side refusal
/// permanent.
pub(crate) fn classify(e: &RedisError, server: &str) -> TransportError {
    if let Some(code) = e.code() {
        let info = reply_code(code, e.detail().unwrap_or(""));
        return TransportError::new(
            info.class,
            format!("{server} answered: {e}; {}", info.advice),
        )
        .with_code(info.name);
    }
    let (class, code, what) = match e.kind() {
        ErrorKind::AuthenticationFailed => (
            ErrorClass::Permanent,
            "AUTH_FAILED",
            "the server refused the credentials: check the user and password",
        ),
        ErrorKind::InvalidClientConfig => (
            ErrorClass::Permanent,
            "BAD_CONFIG",
            "the client refuses the settings",
        ),
        ErrorKind::RESP3NotSupported => (
            ErrorClass::Permanent,
            "NOT_SUPPORTED",
            "the server is too old for the protocol asked for",
        ),
        ErrorKind::Io if tls_refused(e) => (
            ErrorClass::Permanent,
            "TLS_ERROR",
            "the TLS handshake failed: is the server's certificate signed by a CA this client trusts (RedisConfig::tls_ca_file) and made out to the host name used, and does the server want a client certificate (RedisConfig::tls_client_cert) it accepts?",
        ),
        ErrorKind::Io if e.is_connection_refusal() => (
            ErrorClass::Transient,
            "UNREACHABLE",
            "is it running and reachable? (retried until the delivery timeout)",
        ),
        ErrorKind::Io if e.is_timeout() => (
            ErrorClass::Transient,
            "TIMEOUT",
            "the server did not answer in time; retried",
        ),
        ErrorKind::Io => (
            ErrorClass::Transient,
            "CONNECTION_LOST",
            "the connection was lost; herald reconnects and retries (a message Redis had appended before the loss is appended again: at-least-once)",
        ),
        ErrorKind::Parse => (
            ErrorClass::Transient,
            "PROTOCOL_ERROR",
            "the reply could not be read; the connection is replaced and the batch retried",
        ),
        _ => (
            ErrorClass::Transient,
            "CLIENT_ERROR",
            "the client failed; retried",
        ),
    };
    TransportError::new(class, format!("{server}: {e}; {what}")).with_code(code)
}

/// Classifies a failed connection attempt to `server` (`redis://host:port`, no secret in it):
/// refused credentials, TLS and database mistakes are permanent, the rest transient.
pub(crate) fn classify_connect(e: &RedisError, server: &str) -> TransportError {
    let classified = classify(e, server);
    let code = match classified.code() {
        // Before the first command, a broken or dropped connection is an unreachable server.
        Some("CONNECTION_LOST" | "PROTOCOL_ERROR") => "UNREACHABLE",
        Some("TIMEOUT") => "CONNECT_TIMEOUT",
        Some(other) => other,
        None => "UNREACHABLE",
    }
    .to_owned();
    TransportError::new(
        classified.class(),
        format!("cannot connect to {}", classified.message()),
    )
    .with_code(code)
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

    fn class_code(e: &TransportError) -> (ErrorClass, Option<&str>) {
        (e.class(), e.code())
    }

    /// A client error made from an error reply, as the server sends it.
    fn server_reply(line: &str) -> RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(redis::Value::ServerError(e)) => RedisError::from(e),
            Err(e) => e,
            other => panic!("an error reply: {other:?}"),
        }
    }

    #[test]
    fn the_reply_code_table() {
        use ErrorClass::{Permanent, Transient};
        let expect = [
            ("WRONGTYPE", "Operation against a key holding the wrong kind of value", "WRONG_TYPE", Permanent),
            ("NOPERM", "this user has no permissions to run the 'xadd' command", "PERMISSION_DENIED", Permanent),
            ("NOAUTH", "Authentication required.", "AUTH_REQUIRED", Permanent),
            ("WRONGPASS", "invalid username-password pair or user is disabled.", "AUTH_FAILED", Permanent),
            ("OOM", "command not allowed when used memory > 'maxmemory'.", "OUT_OF_MEMORY", Transient),
            ("LOADING", "Redis is loading the dataset in memory", "LOADING", Transient),
            ("BUSY", "Redis is busy running a script.", "BUSY", Transient),
            ("TRYAGAIN", "Multiple keys request during rehashing of slot", "TRY_AGAIN", Transient),
            ("MASTERDOWN", "Link with MASTER is down", "MASTER_DOWN", Transient),
            ("READONLY", "You can't write against a read only replica.", "READ_ONLY", Transient),
            ("NOREPLICAS", "Not enough good replicas to write.", "NOT_ENOUGH_REPLICAS", Transient),
            ("MISCONF", "Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.", "STORE_FAILED", Transient),
            ("CLUSTERDOWN", "The cluster is down", "CLUSTER_DOWN", Transient),
            ("MOVED", "3999 127.0.0.1:6381", "CLUSTER_NOT_SUPPORTED", Permanent),
            ("ASK", "3999 127.0.0.1:6381", "CLUSTER_NOT_SUPPORTED", Permanent),
            ("ERR", "max number of clients reached", "MAX_CLIENTS", Transient),
            (
                "ERR",
                "Redis server refused to switch database: Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
                "BUSY",
                Transient,
            ),
            (
                "ERR",
                "Redis server refused to switch database: Redis is loading the dataset in memory",
                "LOADING",
                Transient,
            ),
            ("ERR", "upstream failure", "PROXY_ERROR", Transient),
            ("ERR", "no upstream host", "PROXY_ERROR", Transient),
            ("ERR", "Connection refused", "PROXY_ERROR", Transient),
            (
                "ERR",
                "unknown command 'XADD', with args beginning with: 'jobs:upstream' ",
                "NOT_SUPPORTED",
                Permanent,
            ),
            ("ERR", "unknown command 'XADD', with args beginning with: ", "NOT_SUPPORTED", Permanent),
            ("ERR", "DB index is out of range", "BAD_DATABASE", Permanent),
            ("ERR", "string exceeds maximum allowed size (proto-max-bulk-len)", "PAYLOAD_TOO_LARGE", Permanent),
            ("ERR", "syntax error", "SERVER_REFUSED", Permanent),
            ("SOMETHINGNEW", "from a module", "SERVER_ERROR", Transient),
        ];
        for (code, detail, name, class) in expect {
            let info = reply_code(code, detail);
            assert_eq!((info.name, info.class), (name, class), "{code} {detail}");
            assert!(!info.advice.is_empty());
            let e = reply(code, detail, "orders");
            assert_eq!(class_code(&e), (class, Some(name)));
            assert!(
                e.message().contains("\"orders\"") && e.message().contains(detail),
                "{e}"
            );
        }
    }

    #[test]
    fn server_replies_are_read_through_the_client_error() {
        use ErrorClass::{Permanent, Transient};
        for (line, want) in [
            (
                "WRONGTYPE Operation against a key holding the wrong kind of value",
                (Permanent, "WRONG_TYPE"),
            ),
            (
                "OOM command not allowed when used memory > 'maxmemory'.",
                (Transient, "OUT_OF_MEMORY"),
            ),
            (
                "LOADING Redis is loading the dataset in memory",
                (Transient, "LOADING"),
            ),
            ("BUSY Redis is busy running a script.", (Transient, "BUSY")),
            ("TRYAGAIN later", (Transient, "TRY_AGAIN")),
            (
                "NOPERM User app has no permissions to run the 'xadd' command",
                (Permanent, "PERMISSION_DENIED"),
            ),
            (
                "READONLY You can't write against a read only replica.",
                (Transient, "READ_ONLY"),
            ),
            ("ERR DB index is out of range", (Permanent, "BAD_DATABASE")),
        ] {
            let e = classify(&server_reply(line), "redis://h:6379");
            assert_eq!(class_code(&e), (want.0, Some(want.1)), "{line}: {e}");
            assert!(e.message().contains("redis://h:6379"), "{e}");
        }
    }

    #[test]
    fn client_errors() {
        use std::io::{Error, ErrorKind as Io};
        use ErrorClass::{Permanent, Transient};
        let io = |k: Io| RedisError::from(Error::new(k, "io"));
        for (e, want) in [
            (io(Io::ConnectionRefused), (Transient, "UNREACHABLE")),
            (io(Io::ConnectionReset), (Transient, "CONNECTION_LOST")),
            (io(Io::BrokenPipe), (Transient, "CONNECTION_LOST")),
            (io(Io::UnexpectedEof), (Transient, "CONNECTION_LOST")),
            (io(Io::TimedOut), (Transient, "TIMEOUT")),
            (
                RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "Password authentication failed",
                )),
                (Permanent, "AUTH_FAILED"),
            ),
            (
                RedisError::from((ErrorKind::InvalidClientConfig, "bad")),
                (Permanent, "BAD_CONFIG"),
            ),
            (
                RedisError::from((ErrorKind::Parse, "bad reply")),
                (Transient, "PROTOCOL_ERROR"),
            ),
            (
                RedisError::from((ErrorKind::UnexpectedReturnType, "not a string")),
                (Transient, "CLIENT_ERROR"),
            ),
        ] {
            let c = classify(&e, "redis://h:6379");
            assert_eq!(class_code(&c), (want.0, Some(want.1)), "{e:?}");
        }
        assert!(breaks_connection(&io(Io::ConnectionReset)));
        assert!(!breaks_connection(&server_reply("WRONGTYPE x")));
        // rustls refusing the server's certificate comes as an I/O error: a setup mistake.
        let refused = RedisError::from(Error::new(
            Io::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let e = classify_connect(&refused, "rediss://h:6379");
        assert_eq!(class_code(&e), (Permanent, Some("TLS_ERROR")), "{e}");
    }

    #[test]
    fn connect_errors() {
        use std::io::{Error, ErrorKind as Io};
        use ErrorClass::{Permanent, Transient};
        for (e, want) in [
            (
                RedisError::from(Error::new(Io::ConnectionRefused, "refused")),
                (Transient, "UNREACHABLE"),
            ),
            (
                RedisError::from(Error::new(Io::ConnectionReset, "reset")),
                (Transient, "UNREACHABLE"),
            ),
            (
                RedisError::from(Error::new(Io::TimedOut, "slow")),
                (Transient, "CONNECT_TIMEOUT"),
            ),
            (
                RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "Password authentication failed",
                )),
                (Permanent, "AUTH_FAILED"),
            ),
            (
                server_reply("WRONGPASS invalid username-password pair"),
                (Permanent, "AUTH_FAILED"),
            ),
            (
                server_reply("ERR DB index is out of range"),
                (Permanent, "BAD_DATABASE"),
            ),
            (
                server_reply("ERR max number of clients reached"),
                (Transient, "MAX_CLIENTS"),
            ),
        ] {
            let c = classify_connect(&e, "redis://h:6379");
            assert_eq!(class_code(&c), (want.0, Some(want.1)), "{e:?}");
            assert!(
                c.message().starts_with("cannot connect to redis://h:6379"),
                "{c}"
            );
        }
    }
}
