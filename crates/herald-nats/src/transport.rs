//! [`NatsTransport`]: publishes batches to JetStream, each message acknowledged by its PubAck,
//! and replaces a lost connection with a new one.
//!
//! The public face only: connections live in `connection.rs`, the send path in `publish.rs`.

use std::sync::Arc;

use herald_core::{
    async_trait, BatchOutcome, Destination, EarlyAcks, Message, Transport, TransportError,
    TransportHealth,
};

use crate::config::NatsConfig;
use crate::connection::Inner;
use crate::error::ConfigError;
use crate::publish;

/// A herald [`Transport`] for NATS JetStream, on async-nats.
///
/// - **Ok means stored**: a message's outcome is `Ok` only once JetStream answered its publish
///   with a PubAck (the stream stored it; `Ack::offset` is its stream sequence). A batch is
///   published without waiting per message: up to [`NatsConfig::window`] unacknowledged,
///   PubAcks awaited as they come.
/// - **Deduplication**: every message carries its herald id (UUID text) as `Nats-Msg-Id`, kept
///   across retries, so JetStream drops a retried copy it already holds within the stream's
///   duplicate window (2 minutes by default); the PubAck of such a copy says `duplicate`, and
///   it counts as delivered (`herald_nats_duplicates_total`).
/// - **Key and headers**: herald headers become NATS headers, the key goes in
///   [`NatsConfig::key_header`] (`x-herald-key`). NATS headers are text: a key or header that
///   is not UTF-8 or holds a line break fails permanently (`INVALID_HEADER`).
/// - **Errors**: no stream for the subject (`NO_STREAM`), a payload above the server's
///   `max_payload` or the stream's `max_msg_size` (`PAYLOAD_TOO_LARGE`), a denied publish
///   (`PERMISSION_DENIED`, failed as soon as the server reports it) and a failed conditional
///   publish are permanent; a full stream (`STORAGE_FULL`), a lost connection
///   (`CONNECTION_LOST`) and a missing PubAck (`TIMEOUT`) are transient.
/// - **Deadline**: a batch's publishes and PubAcks share one deadline,
///   [`NatsConfig::ack_timeout`] from its start.
/// - **Per-key order**: a batch goes out in order on one connection; after a transient failure
///   of a message, the later messages of its key in the call fail transient too (held, not
///   even sent when the failure is known in time). One sent before the failure was known, and
///   stored, is sent again behind the retry (the pipeline's per-key hold) under a
///   `Nats-Msg-Id` of its own (`ID-TOKEN`), so that JetStream stores that copy instead of
///   dropping it as a duplicate: the last copies of a key are in order, the first ones may
///   not be (as on every broker herald sends to).
/// - **Recovery**: a lost connection is never resumed: its client gives up and drops what it
///   had not sent (so what is lost is always the tail of what was sent, and retries keep
///   per-key order), and the next batch opens a new connection (the next server of the list
///   after a loss), with backoff after failed attempts, declaring the configured streams again.
///   No retries of its own beyond that: herald's pipeline retries the failed messages.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("url", &self.inner.config.url)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl NatsTransport {
    /// A transport with these settings. It connects on first use (or on [`Self::connect`]).
    pub fn new(config: NatsConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner::new(config)),
        })
    }

    /// Connects now (if not connected yet) and declares the configured streams, to surface a
    /// wrong URL, credentials or declaration at start-up. The error is classified: unreachable
    /// is transient, refused credentials are permanent.
    pub async fn connect(&self) -> Result<(), TransportError> {
        self.inner.connect().await
    }

    /// The server (`host:port`) of the connection up now, among those of the URL or
    /// [`NatsConfig::addresses`]; `None` while down. Also the `herald_nats_node_connected`
    /// gauge.
    pub fn connected_node(&self) -> Option<String> {
        self.inner.connected_node()
    }

    /// Whether a connection to a server is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// The settings.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    /// A call publishes in its subject's turn on the one connection, which the server reads in
    /// order; PubAcks are awaited after the turn. No depth is suggested: herald's default of 4
    /// did best, measured against 1, 8 and 16 (docs/benchmarks.md, NATS).
    fn keeps_order_across_calls(&self) -> bool {
        true
    }

    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome {
        publish::send_batch(&self.inner, destination, batch, None, None).await
    }

    /// Nothing is published past `deadline`.
    async fn send_batch_until(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
    ) -> BatchOutcome {
        publish::send_batch(&self.inner, destination, batch, Some(deadline), None).await
    }

    /// Each message is answered when its own PubAck comes, not when the batch's last one does.
    async fn send_batch_answering(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
        early: EarlyAcks,
    ) -> BatchOutcome {
        publish::send_batch(&self.inner, destination, batch, Some(deadline), Some(early)).await
    }

    /// Stored ahead of an earlier message of their key that failed: the copy sent again behind
    /// its retry goes out under a `Nats-Msg-Id` of its own, so that JetStream stores it.
    fn delivered_but_held(&self, _destination: &Destination, messages: &[&Message]) {
        self.inner.resends.held(messages);
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
    /// the next send tries, nothing is known against the server, and `herald_nats_connected`
    /// shows the loss.)
    fn health(&self) -> TransportHealth {
        self.inner.health()
    }

    /// The server of the connection up now, `host:port`.
    fn endpoint(&self) -> Option<String> {
        self.inner.connected_node()
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
        let config = NatsConfig::from_url(&format!("nats://u:pw-secret@127.0.0.1:{port}/orders"))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .metrics_name("billing");
        let t = metrics::with_local_recorder(&recorder, || NatsTransport::new(config))
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
            "one failed attempt per round, in the transport's own series"
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
        let out = t
            .send_batch(&crate::subject("orders"), &[Message::new("orders", "m")])
            .await;
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Transient)
        );
    }

    #[tokio::test]
    async fn a_bad_destination_fails_every_message_permanently_without_connecting() {
        let t = NatsTransport::new(
            NatsConfig::from_url(&format!("nats://127.0.0.1:{}", closed_port())).expect("url"),
        )
        .expect("transport");
        let batch = [Message::new("a.*", "1"), Message::new("a.*", "2")];
        let out = t.send_batch(&Destination::new("a.*"), &batch).await;
        for o in out {
            let e = o.expect_err("not a subject");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
            );
        }
        assert_eq!(t.health(), TransportHealth::Up, "no connection was tried");
    }

    #[tokio::test]
    async fn inside_a_producer_an_unreachable_server_hands_messages_back_by_the_delivery_timeout() {
        let t = NatsTransport::new(
            NatsConfig::from_url(&format!("nats://127.0.0.1:{}", closed_port()))
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
