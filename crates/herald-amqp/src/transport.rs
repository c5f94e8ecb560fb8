//! [`AmqpTransport`]: publishes batches with streaming publisher confirms over several channels,
//! reconnects after a loss, and pauses while the broker blocks the connection.
//!
//! The public face only: connections live in `connection.rs`, the send path in `publish.rs`.

use std::sync::Arc;

use herald_core::{
    async_trait, BatchOutcome, Destination, EarlyAcks, Message, Transport, TransportError,
    TransportHealth,
};

use crate::config::AmqpConfig;
use crate::connection::Inner;
use crate::error::ConfigError;
use crate::publish;

/// A herald [`Transport`] for RabbitMQ (AMQP 0-9-1), on lapin.
///
/// - **Ok means confirmed**: publisher confirms are always on; a message's outcome is `Ok` only
///   once the broker confirmed it (for a persistent message to a durable queue: written to
///   disk). A batch is published as a stream: up to [`AmqpConfig::window`] unconfirmed
///   messages per channel, confirms awaited as they come, never one publish-and-wait per message.
/// - **Channels**: [`AmqpConfig::channels`] channels; a message's key picks its channel, so
///   one key's messages stay in order; messages without a key go through one channel per
///   destination.
/// - **A channel's first publish to a destination goes alone**, and the rest of its batch
///   follows once it is confirmed. RabbitMQ 3.10 nacks a new channel's first publishes to a
///   quorum queue while the queue elects a leader and takes its later ones: streamed, a key's
///   later message could be stored ahead of its nacked predecessor. A nacked first publish goes
///   out again on a new channel after a pause (the reconnect backoff), within the first half of
///   the batch's time; other transient failures of it fail the rest unsent (code `NOT_SENT`,
///   retried).
/// - **Unroutable** (mandatory, no queue bound): permanent error, code `NO_ROUTE`. **Nack**:
///   transient, code `NACK`. A missing exchange (404) or refused access (403): permanent, for
///   every message of the batch, naming the exchange; a batch that shares the channel the broker
///   closed for another destination's 404/403 fails transiently (`CHANNEL_CLOSED`) instead.
/// - **Deadline**: a batch's publishes and confirms share one deadline,
///   [`AmqpConfig::confirm_timeout`] from the start of publishing.
/// - **Topology**: a declaration that fails is transient (`DECLARE_FAILED`): the connection is
///   closed and the next batch tries again.
/// - **Recovery**: a lost connection fails what was unconfirmed as transient (herald retries
///   it, so it may arrive twice); the next batch reconnects, with backoff after failed attempts,
///   and declares the configured topology again. Channels closed by the broker are reopened.
/// - **Flow control**: while the broker blocks the connection (`connection.blocked`, a memory or
///   disk alarm) batches wait (messages stay in herald's bounded buffer) for up to
///   [`AmqpConfig::blocked_timeout`], then fail transiently; [`AmqpTransport::is_blocked`] tells.
///
/// The destination mapping is described at [`queue`](crate::queue) and
/// [`exchange`](crate::exchange).
#[derive(Clone)]
pub struct AmqpTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("url", &self.inner.config.url)
            .field("connected", &self.is_connected())
            .field("blocked", &self.is_blocked())
            .finish()
    }
}

impl AmqpTransport {
    /// A transport with these settings. It connects on first use (or on [`Self::connect`]).
    pub fn new(config: AmqpConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        warn_weak_delivery(&config);
        Ok(Self {
            inner: Arc::new(Inner::new(config)),
        })
    }

    /// Connects now (if not connected yet), to surface a wrong URL, credentials or vhost at
    /// start-up. The error is classified: unreachable is transient, refused credentials or a
    /// missing vhost are permanent.
    pub async fn connect(&self) -> Result<(), TransportError> {
        self.inner.connect().await
    }

    /// Whether the broker is blocking this connection (`connection.blocked`: a memory or disk
    /// alarm). Publishing waits while it is.
    pub fn is_blocked(&self) -> bool {
        self.inner.is_blocked()
    }

    /// The address (`host:port`) of the connection up now, among those of the URL or
    /// [`AmqpConfig::addresses`]; `None` while down. Also the `herald_amqp_node_connected`
    /// gauge.
    pub fn connected_node(&self) -> Option<String> {
        self.inner.connected_node()
    }

    /// Whether a connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// The settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    fn name(&self) -> &'static str {
        "amqp"
    }

    /// Down once a connection attempt failed, until one opens again: while down, the transport
    /// retries in the background on its reconnect backoff, so the verdict clears without
    /// traffic. (Connections open on demand: before the first attempt, and after a loss until
    /// the next send tries, nothing is known against the broker, and `herald_amqp_connected`
    /// shows the loss.) Blocked while the broker blocks publishing.
    fn endpoint(&self) -> Option<String> {
        self.inner.connected_node()
    }

    fn health(&self) -> TransportHealth {
        self.inner.health()
    }

    /// A call takes its destination's turn before anything else and publishes all its messages
    /// before the next call of the destination publishes any; one channel keeps order, and a
    /// key always goes through the same channel. The confirms are awaited after the turn.
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

    /// Each message is answered when its own publisher confirm comes, not when the batch's
    /// last one does.
    async fn send_batch_answering(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
        early: EarlyAcks,
    ) -> BatchOutcome {
        publish::send_batch(
            &self.inner,
            destination,
            batch,
            Some(deadline),
            Some(&early),
        )
        .await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

/// Warns once, at start, about settings that make "delivered" mean less than users think (the
/// setters' docs say the same).
fn warn_weak_delivery(config: &AmqpConfig) {
    if !config.mandatory {
        tracing::warn!(
            setting = "mandatory",
            value = false,
            "unroutable messages are dropped by the broker and reported delivered"
        );
    }
    if !config.persistent {
        tracing::warn!(
            setting = "persistent",
            value = false,
            "messages are confirmed before any disk write: a broker restart loses messages reported delivered"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    #[tokio::test]
    async fn two_named_transports_keep_separate_metric_series() {
        // Nothing listens there: every connection attempt fails, and is counted.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let transport = |name: Option<&str>| {
            let mut config = AmqpConfig::from_url(&format!("amqp://127.0.0.1:{port}/%2F"))
                .expect("url")
                .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(1));
            if let Some(name) = name {
                config = config.metrics_name(name);
            }
            metrics::with_local_recorder(&recorder, || AmqpTransport::new(config))
                .expect("transport")
        };
        let billing = transport(Some("billing"));
        let audit = transport(Some("audit"));
        let unnamed = transport(None);
        for _ in 0..2 {
            billing.connect().await.expect_err("nothing listens");
        }
        audit.connect().await.expect_err("nothing listens");
        unnamed.connect().await.expect_err("nothing listens");
        let snap = snapshotter.snapshot().into_vec();
        let failures = |producer: Option<&str>| -> Vec<u64> {
            snap.iter()
                .filter(|(k, ..)| {
                    let key = k.key();
                    key.name() == crate::metrics::CONNECT_FAILURES
                        && key
                            .labels()
                            .any(|l| l.key() == "transport" && l.value() == "amqp")
                        && key
                            .labels()
                            .find(|l| l.key() == "producer")
                            .map(|l| l.value())
                            == producer
                })
                .map(|(.., v)| match v {
                    DebugValue::Counter(c) => *c,
                    other => panic!("a counter: {other:?}"),
                })
                .collect()
        };
        assert_eq!(failures(Some("billing")), [2], "billing's own series");
        assert_eq!(failures(Some("audit")), [1], "audit's own series");
        assert_eq!(failures(None), [1], "no name, no `producer` label");
    }

    fn logged_while(f: impl FnOnce()) -> String {
        let logs = herald_testkit::LogCapture::start();
        f();
        logs.text()
    }

    #[test]
    fn settings_that_weaken_delivered_are_warned_about_once_at_start() {
        let url = "amqp://guest:secret-pw@127.0.0.1:5672/%2F";
        let quiet = logged_while(|| {
            AmqpTransport::new(AmqpConfig::from_url(url).expect("url")).expect("transport");
        });
        assert_eq!(quiet, "", "the defaults warn about nothing");
        let warned = logged_while(|| {
            AmqpTransport::new(
                AmqpConfig::from_url(url)
                    .expect("url")
                    .mandatory(false)
                    .persistent(false),
            )
            .expect("transport");
        });
        assert_eq!(warned.lines().count(), 2, "{warned}");
        assert!(
            warned.contains("setting=\"mandatory\"") && warned.contains("reported delivered"),
            "{warned}"
        );
        assert!(
            warned.contains("setting=\"persistent\"") && warned.contains("disk write"),
            "{warned}"
        );
        assert!(!warned.contains("secret-pw"), "{warned}");
    }
}
