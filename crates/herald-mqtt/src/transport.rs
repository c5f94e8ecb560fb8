//! [`MqttTransport`]: publishes batches to an MQTT broker, each message acknowledged by its
//! PUBACK (QoS 1) or PUBCOMP (QoS 2), and replaces a lost connection with a new one.
//!
//! The public face only: connections live in `connection.rs`, the send path in `publish.rs`.

use std::sync::Arc;

use herald_core::{
    async_trait, BatchOutcome, Destination, EarlyAcks, Message, Transport, TransportError,
    TransportHealth,
};

use crate::config::MqttConfig;
use crate::connection::Inner;
use crate::error::ConfigError;
use crate::publish;

/// A herald [`Transport`] for MQTT brokers.
///
/// - **Ok means accepted**: a message's outcome is `Ok` only once the broker acknowledged it:
///   a PUBACK (QoS 1, the default) or a PUBCOMP (QoS 2, `?qos=2`) with a success reason. With
///   MQTT 5, reason 0x10 "No matching subscribers" is a success too (the broker took the
///   message and had nobody to give it to; counted in `herald_mqtt_no_subscribers_total`).
///   QoS 0 is not offered. A batch is handed to the client without waiting per message: up to
///   [`MqttConfig::window`] unanswered (and the broker's Receive Maximum on the wire),
///   acknowledgements matched to messages by packet id.
/// - **Key, id and headers** (MQTT 5): user properties: the headers as they are, the key in
///   `x-herald-key`, the herald id in `x-herald-id` (UUID text, the same on every retry, so
///   that consumers can drop duplicates). Text only: a key or header that is not UTF-8 fails
///   permanently (`INVALID_HEADER`). With MQTT 3.1.1 (`?version=3`) a message with headers or
///   a key is refused (`UNSUPPORTED_BY_MQTT3`).
/// - **Errors**: PUBACK/PUBREC/PUBCOMP reason codes and CONNACK codes are classified (`error.rs`):
///   not authorized, invalid topic, bad credentials are permanent; quota exceeded, server
///   unavailable, a lost connection (`CONNECTION_LOST`, `DISCONNECTED`) and a missing
///   acknowledgement (`TIMEOUT`) are transient. A message whose PUBLISH packet exceeds the
///   broker's Maximum Packet Size (MQTT 5 CONNACK) or [`MqttConfig::max_packet_size`] fails at
///   once, unsent (`PACKET_TOO_LARGE`, permanent).
/// - **Deadline**: a batch's publishes and acknowledgements share one deadline, which moves on
///   while the connection acknowledges anything: [`MqttConfig::ack_timeout`] is how long it may
///   stay silent, not how long a batch may take.
/// - **Per-key order**: a batch goes out in order on one connection; after a transient failure
///   of a message, the later messages of its key in the call fail transient too.
/// - **Recovery**: a lost connection is never resumed: its session is dropped with what it
///   held (failed transient, retried by herald in order), and the next batch opens a new
///   connection with a new client id and a clean session, with backoff after failed attempts.
///   The broker redelivers nothing of the old session; what it had accepted without the
///   acknowledgement reaching herald is published again: a duplicate is possible, a loss or a
///   reordering is not. No retries of its own beyond that.
#[derive(Clone)]
pub struct MqttTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MqttTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTransport")
            .field("url", &self.inner.config.url)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl MqttTransport {
    /// A transport with these settings. It connects on first use (or on [`Self::connect`]).
    pub fn new(config: MqttConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner::new(config)),
        })
    }

    /// Connects now (if not connected yet), to surface a wrong URL or credentials at start-up.
    /// The error is classified: unreachable is transient, refused credentials are permanent.
    pub async fn connect(&self) -> Result<(), TransportError> {
        self.inner.connect().await
    }

    /// Whether a connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// The settings.
    pub fn config(&self) -> &MqttConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Transport for MqttTransport {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    /// A call publishes in its topic's turn on the one connection, and the broker keeps a
    /// connection's QoS 1 and 2 publishes of a topic in order; acknowledgements are awaited
    /// after the turn.
    fn keeps_order_across_calls(&self) -> bool {
        true
    }

    /// Not over MQTT 3.1.1 (`?version=3`), whose messages are a topic and a payload: herald
    /// then adds no trace context of its own, which every message would be refused for.
    fn carries_headers(&self) -> bool {
        self.inner.config.version() != crate::Version::V311
    }

    /// 16: with herald's default of 4, messages at a steady 5 000 msgs/s to Mosquitto waited for
    /// a slot behind batches whose PUBACKs were due (p99 35-44 ms; at 20 000/s p50 3-12 ms); at
    /// 16, 5 000/s p99 2.1-13 ms and 20 000/s p50 1.5-2.2 ms, and no better at 64. The broker's
    /// Receive Maximum still bounds what is on the wire. Bulk throughput is the same at 16 as at
    /// 4 (measured with rumqttc's client, before herald's own session).
    fn suggested_pipeline_depth(&self) -> Option<usize> {
        Some(16)
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

    /// Each message is answered when its own PUBACK (QoS 1) or PUBCOMP (QoS 2) comes, not when
    /// the batch's last one does.
    async fn send_batch_answering(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
        early: EarlyAcks,
    ) -> BatchOutcome {
        publish::send_batch(&self.inner, destination, batch, Some(deadline), Some(early)).await
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
    /// traffic. (Connections open on demand: after a loss, until the next send tries, nothing
    /// is known against the broker, and `herald_mqtt_connected` shows the loss.)
    fn health(&self) -> TransportHealth {
        self.inner.health()
    }

    /// The broker of the connection up now, `host:port`.
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

    /// MQTT 3.1.1 messages carry no headers: the pipeline adds none of its own (a trace
    /// context would have every message refused as `UNSUPPORTED_BY_MQTT3`).
    #[tokio::test]
    async fn only_mqtt_5_carries_headers() {
        for (query, carries) in [("", true), ("?version=5", true), ("?version=3", false)] {
            let config =
                MqttConfig::from_url(&format!("mqtt://127.0.0.1:1/t{query}")).expect("url");
            let t = MqttTransport::new(config).expect("transport");
            assert_eq!(t.carries_headers(), carries, "{query}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_transient_down_and_counted() {
        let port = closed_port();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let config = MqttConfig::from_url(&format!("mqtt://u:pw-secret@127.0.0.1:{port}/plant/x"))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .metrics_name("billing");
        let t = metrics::with_local_recorder(&recorder, || MqttTransport::new(config))
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
            assert!(e.to_string().contains(&port.to_string()), "{e}");
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
        assert_eq!(failures, [2]);
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
        assert!(!format!("{t:?}").contains("pw-secret"));
        let out = t
            .send_batch(&crate::topic("plant/x"), &[Message::new("plant/x", "m")])
            .await;
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Transient)
        );
    }

    #[tokio::test]
    async fn a_bad_destination_fails_every_message_permanently_without_connecting() {
        let t = MqttTransport::new(
            MqttConfig::from_url(&format!("mqtt://127.0.0.1:{}", closed_port())).expect("url"),
        )
        .expect("transport");
        for bad in ["a/+", "a/#", ""] {
            let batch = [Message::new(bad, "1"), Message::new(bad, "2")];
            let out = t.send_batch(&Destination::new(bad), &batch).await;
            assert_eq!(out.len(), 2);
            for o in out {
                let e = o.expect_err("not a topic");
                assert_eq!(
                    (e.class(), e.code()),
                    (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
                );
            }
        }
        assert_eq!(t.health(), TransportHealth::Up, "no connection was tried");
    }

    #[tokio::test]
    async fn inside_a_producer_an_unreachable_broker_hands_messages_back_by_the_delivery_timeout() {
        let t = MqttTransport::new(
            MqttConfig::from_url(&format!("mqtt://127.0.0.1:{}", closed_port()))
                .expect("url")
                .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
        .expect("transport");
        let p = Producer::builder(t)
            .delivery_timeout(Duration::from_millis(500))
            .build()
            .expect("producer");
        let report = p
            .send_all((0..20).map(|i| Message::new("plant/x", format!("m{i}")).with_key("k")))
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
