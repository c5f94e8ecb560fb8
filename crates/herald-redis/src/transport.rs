//! [`RedisTransport`]: appends batches to Redis streams, each message acknowledged by the entry
//! id Redis replied with, and replaces a lost connection with a new one.
//!
//! The public face only: connections live in `connection.rs`, the send path in `publish.rs`.

use std::sync::Arc;

use herald_core::{
    async_trait, BatchOutcome, Destination, Message, Transport, TransportError, TransportHealth,
};

use crate::config::RedisConfig;
use crate::connection::Inner;
use crate::error::ConfigError;
use crate::publish;

/// A herald [`Transport`] for Redis Streams, on the redis crate.
///
/// - **Ok means appended**: a message's outcome is `Ok` once Redis replied to its `XADD` with
///   the new entry's id (`Ack::offset` is that id packed by [`crate::entry_offset`]). Redis
///   replies from memory: what that means for durability, with and without AOF, and with
///   [`RedisConfig::wait`], is in docs/guarantees.md. A batch is one pipeline: every `XADD`
///   written at once, the replies read in one round trip.
/// - **The entry**: fields `payload`, `key` (when set), `id` (the herald id, the same on every
///   retry) and one `h:NAME` field per header; see [`crate::HEADER_PREFIX`].
/// - **Trimming**: with [`RedisConfig::maxlen`] (`?maxlen=N`), each `XADD` trims the stream
///   approximately (`MAXLEN ~ N`).
/// - **Errors**: a key of another type (`WRONG_TYPE`), an ACL refusal (`PERMISSION_DENIED`),
///   refused credentials (`AUTH_FAILED`, `AUTH_REQUIRED`) and an entry above
///   [`RedisConfig::max_message_bytes`] (`PAYLOAD_TOO_LARGE`, not sent) are permanent; a full
///   server (`OUT_OF_MEMORY`), `LOADING`, `BUSY`, `TRY_AGAIN`, a read-only replica, a lost
///   connection (`CONNECTION_LOST`) and a missing reply (`TIMEOUT`) are transient.
/// - **Deadline**: a batch's pipeline has [`RedisConfig::ack_timeout`] (plus `WAIT`'s timeout)
///   from its start.
/// - **Per-key order**: a batch goes out in order on one connection, which Redis executes in
///   order. A pipeline goes out whole, so after a transient refusal of a message (`OOM`,
///   `BUSY`) the later messages of its key in it may be appended: the transport reports them
///   delivered, and the producer's pipeline (strict ordering) sends them again behind the
///   retry ([`herald_core::KeyHold`]), so that the last copies are in order. Keys that failed
///   in the calls before on another connection are not sent at all ([`herald_core::Turns`]).
/// - **Recovery**: a broken connection is never resumed: the whole batch fails as transient
///   and the next batch opens a new connection, with backoff after failed attempts. No retries
///   of its own beyond that (redis-rs retries nothing on a multiplexed connection): herald's
///   pipeline retries the failed messages. Redis has no idempotent producer, so a message
///   appended just before a loss is appended again by the retry (at-least-once; readers can
///   drop the copy by its `id` field).
#[derive(Clone)]
pub struct RedisTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("url", &self.inner.config.url)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl RedisTransport {
    /// A transport with these settings. It connects on first use (or on [`Self::connect`]).
    /// A CA file that cannot be read is an error here.
    pub fn new(config: RedisConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner::new(config)?),
        })
    }

    /// Connects now (if not connected yet), to surface a wrong URL, password or database at
    /// start-up. The error is classified: unreachable is transient, refused credentials are
    /// permanent.
    pub async fn connect(&self) -> Result<(), TransportError> {
        self.inner.connect().await
    }

    /// Whether a connection to the server is up right now (as far as the last batch found).
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// The settings.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// A call hands its pipeline to the one multiplexed connection in its stream's turn;
    /// the connection writes pipelines in the order it is handed them and Redis answers in
    /// order. Replies are awaited after the turn.
    fn keeps_order_across_calls(&self) -> bool {
        true
    }

    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome {
        publish::send_batch(&self.inner, destination, batch, None).await
    }

    /// Nothing is handed to the server past `deadline`; a pipeline handed over is answered
    /// whole, so there is no purge (herald cuts the call off at the deadline).
    async fn send_batch_until(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
    ) -> BatchOutcome {
        publish::send_batch(&self.inner, destination, batch, Some(deadline)).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    /// Why the last connection attempt failed, or that the connection was lost.
    fn diagnosis(&self) -> Option<String> {
        self.inner.diagnosis()
    }

    /// Down once a connection attempt failed, until one opens again: while down, the transport
    /// retries in the background on its reconnect backoff, so the verdict clears without
    /// traffic. (Connections open on demand: before the first attempt, and after a loss until
    /// the next send tries, nothing is known against the server, and `herald_redis_connected`
    /// shows the loss.)
    fn health(&self) -> TransportHealth {
        self.inner.health()
    }

    /// The server, `host:port`, while a connection is up.
    fn endpoint(&self) -> Option<String> {
        self.inner.endpoint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use herald_core::{ErrorClass, Producer};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// A port on this machine nothing listens on.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    #[tokio::test]
    async fn an_unreachable_server_is_transient_down_and_counted() {
        let port = closed_port();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let config = RedisConfig::from_url(&format!("redis://u:pw-secret@127.0.0.1:{port}/orders"))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .metrics_name("billing");
        let t = metrics::with_local_recorder(&recorder, || RedisTransport::new(config))
            .expect("transport");
        assert_eq!(t.health(), TransportHealth::Up, "nothing known yet");
        for _ in 0..2 {
            let e = t.connect().await.expect_err("nothing listens");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Transient, Some("UNREACHABLE")),
                "{e}"
            );
            assert!(!e.to_string().contains("pw-secret"), "{e}");
        }
        let snap = snapshotter.snapshot().into_vec();
        let failures: Vec<u64> = snap
            .iter()
            .filter(|(k, ..)| {
                k.key().name() == crate::metrics::CONNECT_FAILURES
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "producer" && l.value() == "billing")
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(c) => *c,
                other => panic!("a counter: {other:?}"),
            })
            .collect();
        assert_eq!(
            failures,
            [2],
            "one per attempt, in the transport's own series"
        );
        match t.health() {
            TransportHealth::Down(why) => {
                assert!(
                    why.contains(&port.to_string()) && !why.contains("pw-secret"),
                    "{why}"
                )
            }
            other => panic!("down: {other:?}"),
        }
        assert!(t.diagnosis().is_some_and(|d| d.contains("cannot connect")));
        assert_eq!(t.endpoint(), None);
        let out = t
            .send_batch(&crate::stream("orders"), &[Message::new("orders", "m")])
            .await;
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Transient)
        );
    }

    #[tokio::test]
    async fn a_bad_destination_or_an_oversized_entry_fails_permanently_without_connecting() {
        let t = RedisTransport::new(
            RedisConfig::from_url(&format!("redis://127.0.0.1:{}", closed_port()))
                .expect("url")
                .max_message_bytes(100),
        )
        .expect("transport");
        let batch = [Message::new("", "1"), Message::new("", "2")];
        let out = t.send_batch(&Destination::new(""), &batch).await;
        for o in out {
            let e = o.expect_err("not a stream key");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
            );
        }
        let out = t
            .send_batch(
                &crate::stream("s"),
                &[Message::new("s", vec![b'x'; 200]).with_key("k")],
            )
            .await;
        let e = out[0].as_ref().expect_err("too large");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("PAYLOAD_TOO_LARGE"))
        );
        assert_eq!(t.health(), TransportHealth::Up, "no connection was tried");
    }

    #[tokio::test]
    async fn inside_a_producer_an_unreachable_server_hands_messages_back_by_the_delivery_timeout() {
        let t = RedisTransport::new(
            RedisConfig::from_url(&format!("redis://127.0.0.1:{}", closed_port()))
                .expect("url")
                .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
        .expect("transport");
        let p = Producer::builder(t)
            .delivery_timeout(Duration::from_millis(500))
            .build()
            .expect("producer");
        let report = p
            .send_all((0..20).map(|i| Message::new("orders", format!("m{i}")).with_key("k")))
            .await
            .wait()
            .await;
        assert_eq!(report.delivered, 0);
        assert_eq!(report.failed.len(), 20);
        for e in &report.failed {
            assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        }
        p.close(Duration::from_secs(5)).await;
    }
}
