//! [`AmqpTransport`]: publishes batches with streaming publisher confirms over several channels,
//! reconnects after a loss, and pauses while the broker blocks the connection.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::future::join_all;
use futures_util::StreamExt;
use herald_core::{
    async_trait, Ack, BatchOutcome, Bytes, Destination, ErrorClass, Message, Transport,
    TransportError, TransportHealth,
};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{AmqpConfig, Declare, ExchangeKind};
use crate::error::{classify, classify_connect, max_size_from_text, reply_code, ConfigError};
use crate::metrics::AmqpMetrics;

/// Where a [`Destination`] goes, in AMQP terms.
///
/// - `"orders"`: the default exchange (`""`) with routing key `orders`, that is straight into
///   the queue `orders`.
/// - `"events/order.created"`: the exchange `events` with routing key `order.created`.
/// - `"events/"`: the exchange `events` with an empty routing key (fanout).
///
/// AMQP names cannot hold `/`, so the first `/` always separates exchange and routing key.
/// Build destinations with [`queue`] and [`exchange`] rather than by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
}

impl Route {
    pub(crate) fn parse(d: &Destination) -> Result<Self, TransportError> {
        let (exchange, routing_key) = d.as_str().split_once('/').unwrap_or(("", d.as_str()));
        if exchange.len() > 255 || routing_key.len() > 255 {
            return Err(TransportError::permanent(format!(
                "destination `{d}`: AMQP exchange names and routing keys are at most 255 bytes"
            ))
            .with_code("INVALID_DESTINATION"));
        }
        if exchange.is_empty() && routing_key.is_empty() {
            return Err(TransportError::permanent(
                "empty destination: name a queue, or `exchange/routing-key`",
            )
            .with_code("INVALID_DESTINATION"));
        }
        Ok(Self {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        })
    }

    fn describe(&self) -> String {
        if self.exchange.is_empty() {
            format!("queue \"{}\" (default exchange)", self.routing_key)
        } else {
            format!(
                "exchange \"{}\" routing key \"{}\"",
                self.exchange, self.routing_key
            )
        }
    }
}

/// A destination that is the queue `name`, reached through the default exchange.
pub fn queue(name: &str) -> Destination {
    Destination::new(name)
}

/// A destination that is `exchange`, with `routing_key` (may be empty for fanout exchanges).
pub fn exchange(exchange: &str, routing_key: &str) -> Destination {
    Destination::new(format!("{exchange}/{routing_key}"))
}

/// A stable id for a message: the `message-id` header when it has one, else a 128-bit FNV-1a
/// hash of destination, key, payload and headers (the same message retried gets the same id;
/// two identical messages share one, so give your own id when that matters).
pub(crate) fn message_id(msg: &Message, header: Option<&str>) -> String {
    if let Some(name) = header {
        if let Some(h) = msg.headers().iter().find(|h| h.name == name) {
            return String::from_utf8_lossy(&h.value).into_owned();
        }
    }
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        // Length first, so that field boundaries count.
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h ^= u128::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    feed(msg.destination().as_str().as_bytes());
    feed(msg.key().map_or(&b"\xff-none"[..], |k| k.as_ref()));
    feed(msg.payload());
    for hd in msg.headers() {
        feed(hd.name.as_bytes());
        feed(&hd.value);
    }
    format!("{h:032x}")
}

/// Flow control state, shared with the task that listens to connection events.
#[derive(Debug, Default)]
struct Flow {
    blocked: AtomicBool,
    /// Up; set false by the event task as soon as lapin reports a connection error.
    connected: AtomicBool,
    /// Why the last connection attempt failed; cleared when one opens. What
    /// [`Transport::health`] reports as down.
    down: std::sync::Mutex<Option<String>>,
    /// A background reconnection attempt is under way (see `AmqpTransport::probe`).
    probing: AtomicBool,
    /// `Transport::close` ran, and no batch has been sent since: no background reconnection.
    closed: AtomicBool,
    changed: Notify,
}

/// One live connection and its publishing channels (opened on first use, reopened after a
/// channel error).
struct Live {
    connection: Connection,
    channels: Vec<Mutex<Option<Channel>>>,
    events: JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.events.abort();
    }
}

#[derive(Default)]
struct Link {
    live: Option<Arc<Live>>,
    failures: u32,
    next_attempt: Option<Instant>,
}

struct Inner {
    config: AmqpConfig,
    link: Mutex<Link>,
    flow: Arc<Flow>,
    metrics: AmqpMetrics,
}

/// A herald [`Transport`] for RabbitMQ (AMQP 0-9-1), on lapin.
///
/// - **Ok means confirmed**: publisher confirms are always on; a message's outcome is `Ok` only
///   once the broker confirmed it (for a persistent message to a durable queue: written to
///   disk). A batch is published as a stream: up to [`AmqpConfig::window`] unconfirmed
///   messages per channel, confirms awaited as they come, never one publish-and-wait per message.
/// - **Channels**: [`AmqpConfig::channels`] channels; a message's key picks its channel, so
///   one key's messages stay in order; messages without a key go through one channel per
///   destination.
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
/// The destination mapping is described at [`queue`] and [`exchange`].
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
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                link: Mutex::new(Link::default()),
                flow: Arc::new(Flow::default()),
                metrics: AmqpMetrics::new(),
            }),
        })
    }

    /// Connects now (if not connected yet), to surface a wrong URL, credentials or vhost at
    /// start-up. The error is classified: unreachable is transient, refused credentials or a
    /// missing vhost are permanent.
    pub async fn connect(&self) -> Result<(), TransportError> {
        self.live().await.map(|_| ())
    }

    /// Whether the broker is blocking this connection (`connection.blocked`: a memory or disk
    /// alarm). Publishing waits while it is.
    pub fn is_blocked(&self) -> bool {
        self.inner.flow.blocked.load(Ordering::Acquire)
    }

    /// Whether a connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.flow.connected.load(Ordering::Acquire)
    }

    /// The settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    fn set_down(&self, why: Option<String>) {
        *self
            .inner
            .flow
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    /// While down, tries to reconnect in the background (one attempt at a time, on the usual
    /// reconnect backoff): connections open on demand, so without it a producer that gets no
    /// traffic because it reports itself down (a load balancer drained it) would never find
    /// the broker back. Needs a Tokio runtime; without one, the next send reconnects.
    fn probe(&self) {
        let flow = &self.inner.flow;
        if flow.closed.load(Ordering::Acquire) || flow.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            flow.probing.store(false, Ordering::Release);
            return;
        };
        let transport = self.clone();
        runtime.spawn(async move {
            // Success clears `down`; a failure records why and pushes the next attempt back.
            let _outcome = transport.connect().await;
            transport.inner.flow.probing.store(false, Ordering::Release);
        });
    }

    fn set_connected(&self, up: bool) {
        self.inner.flow.connected.store(up, Ordering::Release);
        self.inner.metrics.connected.set(if up { 1.0 } else { 0.0 });
    }

    async fn live(&self) -> Result<Arc<Live>, TransportError> {
        let mut waited = false;
        let mut link = loop {
            let mut link = self.inner.link.lock().await;
            if let Some(live) = &link.live {
                if live.connection.status().connected() {
                    return Ok(live.clone());
                }
                self.set_connected(false);
                link.live = None;
            }
            match link.next_attempt {
                // Wait out the backoff without holding the lock (other calls wait alongside,
                // not behind), then look again: another call may have connected meanwhile.
                Some(at) if at > Instant::now() => {
                    if waited {
                        return Err(TransportError::transient(
                            "reconnecting to the broker: the last attempt failed and the next one is not due yet; retried",
                        )
                        .with_code("RECONNECTING"));
                    }
                    drop(link);
                    tokio::time::sleep_until(at).await;
                    waited = true;
                }
                _ => break link,
            }
        };
        let config = &self.inner.config;
        let attempt = tokio::time::timeout(config.connect_timeout, self.open()).await;
        let result = match attempt {
            Ok(r) => r,
            Err(_) => Err(TransportError::transient(format!(
                "connecting to {} took longer than {:?}; is the broker reachable?",
                config.url, config.connect_timeout
            ))
            .with_code("CONNECT_TIMEOUT")),
        };
        match result {
            Ok(live) => {
                link.failures = 0;
                link.next_attempt = None;
                link.live = Some(live.clone());
                self.inner.metrics.opened.increment(1);
                self.set_connected(true);
                self.set_down(None);
                Ok(live)
            }
            Err(e) => {
                self.inner.metrics.connect_failures.increment(1);
                self.set_down(Some(format!("cannot connect: {e}")));
                link.failures = link.failures.saturating_add(1);
                let exp = link.failures.min(16) - 1;
                let delay = config
                    .reconnect_min
                    .saturating_mul(1 << exp)
                    .min(config.reconnect_max);
                link.next_attempt = Some(Instant::now() + delay);
                Err(e)
            }
        }
    }

    async fn open(&self) -> Result<Arc<Live>, TransportError> {
        let config = &self.inner.config;
        let url = config.url.to_string();
        let props = ConnectionProperties::default()
            .with_connection_name(config.connection_name.clone().into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: config.tls_ca_pem.clone(),
        };
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| TransportError::permanent(format!("no async runtime for lapin: {e}")))?;
        let connection =
            Connection::connect_uri_with_config(config.url.to_lapin(), props, tls, runtime)
                .await
                .map_err(|e| classify_connect(&e, &url))?;
        // Listen before anything else can happen: blocked/unblocked arrive as events.
        let mut events = connection.events_listener();
        let flow = self.inner.flow.clone();
        let metrics = self.inner.metrics.clone();
        metrics.blocked.set(0.0);
        flow.blocked.store(false, Ordering::Release);
        flow.changed.notify_waiters();
        let events = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(_reason) => {
                        metrics.blocked.set(1.0);
                        metrics.blocked_events.increment(1);
                        flow.blocked.store(true, Ordering::Release);
                        flow.changed.notify_waiters();
                    }
                    Event::ConnectionUnblocked => {
                        metrics.blocked.set(0.0);
                        flow.blocked.store(false, Ordering::Release);
                        flow.changed.notify_waiters();
                    }
                    // A soft error is one channel closing (reopened on next use); anything
                    // else ends the connection.
                    // Not reported as down here: the next send reconnects, and only a failed
                    // attempt says the broker is unreachable (this task may also belong to a
                    // connection already replaced).
                    Event::Error(e) if !e.is_amqp_soft_error() => {
                        flow.connected.store(false, Ordering::Release);
                        metrics.connected.set(0.0);
                        flow.changed.notify_waiters();
                    }
                    _ => {}
                }
            }
        });
        let live = Live {
            channels: (0..config.channels).map(|_| Mutex::new(None)).collect(),
            connection,
            events,
        };
        // `live` owns the event task from here: dropped (on an error below, or when the connect
        // timeout drops this future), it aborts the task, and lapin closes the connection once
        // its last handle is gone.
        if !config.topology.is_empty() {
            if let Err(e) = declare(&live.connection, &config.topology).await {
                // Best effort: the declaration error is what the caller needs to see.
                if let Err(closing) = live
                    .connection
                    .close(200, "herald: declaring the topology failed".into())
                    .await
                {
                    let _ignored = closing;
                }
                return Err(e);
            }
        }
        Ok(Arc::new(live))
    }

    async fn channel(&self, live: &Live, slot: usize) -> Result<Channel, TransportError> {
        let mut ch = live.channels[slot].lock().await;
        if let Some(c) = ch.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        let opened = async {
            let c = live.connection.create_channel().await?;
            c.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(c)
        }
        .await
        .map_err(|e| classify(&e, "a new channel"))?;
        *ch = Some(opened.clone());
        Ok(opened)
    }

    /// Waits while the broker blocks the connection, up to the blocked timeout.
    async fn wait_unblocked(&self) -> Result<(), TransportError> {
        let flow = &self.inner.flow;
        let deadline = Instant::now() + self.inner.config.blocked_timeout;
        loop {
            let changed = flow.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !flow.blocked.load(Ordering::Acquire) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(TransportError::transient(format!(
                    "the broker has blocked publishing (connection.blocked: a memory or disk alarm) for more than {:?}; messages wait in herald's buffer and are retried",
                    self.inner.config.blocked_timeout
                ))
                .with_code("CONNECTION_BLOCKED"));
            }
        }
    }

    fn properties(&self, msg: &Message) -> BasicProperties {
        let config = &self.inner.config;
        let mut headers = FieldTable::default();
        for h in msg.headers() {
            headers.insert(
                ShortString::from(h.name.as_str()),
                AMQPValue::LongString(LongString::from(h.value.to_vec())),
            );
        }
        if let (Some(name), Some(key)) = (&config.key_header, msg.key()) {
            headers.insert(
                ShortString::from(name.as_str()),
                AMQPValue::LongString(LongString::from(key.to_vec())),
            );
        }
        let mut props = BasicProperties::default()
            .with_message_id(message_id(msg, config.message_id_header.as_deref()).into());
        if config.persistent {
            props = props.with_delivery_mode(2);
        }
        if !headers.inner().is_empty() {
            props = props.with_headers(headers);
        }
        props
    }

    /// Publishes the messages `idxs` of `batch` on channel `slot`, streaming: at most `window`
    /// unconfirmed at a time, everything (channel open, publishes, confirms) bounded by the
    /// batch's `deadline`. Returns the outcome of each, by index.
    async fn publish_group(
        &self,
        live: &Live,
        slot: usize,
        route: &Route,
        batch: &[Message],
        idxs: Vec<usize>,
        deadline: Instant,
    ) -> Vec<(usize, Result<Ack, TransportError>)> {
        let target = route.describe();
        let channel = match tokio::time::timeout_at(deadline, self.channel(live, slot)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return idxs.into_iter().map(|i| (i, Err(e.clone()))).collect(),
            Err(_) => {
                let e = self.stalled(&target, "opening a channel");
                return idxs.into_iter().map(|i| (i, Err(e.clone()))).collect();
            }
        };
        let config = &self.inner.config;
        let options = BasicPublishOptions {
            mandatory: config.mandatory,
            immediate: false,
        };
        let exchange = ShortString::from(route.exchange.as_str());
        let routing_key = ShortString::from(route.routing_key.as_str());
        let mut out = Vec::with_capacity(idxs.len());
        let mut pending = VecDeque::with_capacity(config.window.min(idxs.len()));
        let mut broken: Option<TransportError> = None;
        for i in idxs {
            if let Some(e) = &broken {
                out.push((i, Err(e.clone())));
                continue;
            }
            while pending.len() >= config.window {
                if let Some((j, confirm)) = pending.pop_front() {
                    out.push((j, self.settle(confirm, route, &target, deadline).await));
                }
            }
            let msg = &batch[i];
            let publish = channel.basic_publish(
                exchange.clone(),
                routing_key.clone(),
                options,
                msg.payload(),
                self.properties(msg),
            );
            // lapin stops writing while the broker blocks the connection: bounded too.
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(confirm)) => pending.push_back((i, confirm)),
                Ok(Err(e)) => {
                    let e = classify_on_channel(&e, route, &target);
                    out.push((i, Err(e.clone())));
                    broken = Some(e);
                }
                Err(_) => {
                    let e = self.stalled(&target, "publishing");
                    out.push((i, Err(e.clone())));
                    broken = Some(e);
                }
            }
        }
        for (j, confirm) in pending {
            out.push((j, self.settle(confirm, route, &target, deadline).await));
        }
        out
    }

    /// The batch deadline passed while a publish (or a channel open) could not go out.
    fn stalled(&self, target: &str, what: &str) -> TransportError {
        let timeout = self.inner.config.confirm_timeout;
        if self.is_blocked() {
            TransportError::transient(format!(
                "the broker blocked the connection (connection.blocked: a memory or disk alarm) while {what} to {target}, for longer than the batch's {timeout:?}; retried"
            ))
            .with_code("CONNECTION_BLOCKED")
        } else {
            TransportError::transient(format!(
                "{what} to {target} did not complete within the batch's {timeout:?}; retried"
            ))
            .with_code("TIMEOUT")
        }
    }

    async fn settle(
        &self,
        confirm: lapin::PublisherConfirm,
        route: &Route,
        target: &str,
        deadline: Instant,
    ) -> Result<Ack, TransportError> {
        let timeout = self.inner.config.confirm_timeout;
        match tokio::time::timeout_at(deadline, confirm).await {
            Err(_) => Err(TransportError::transient(format!(
                "no publisher confirm from the broker within {timeout:?} of the batch's start for a message to {target}; it is retried (possibly a duplicate)"
            ))
            .with_code("CONFIRM_TIMEOUT")),
            Ok(Err(e)) => Err(classify_on_channel(&e, route, target)),
            Ok(Ok(confirmation)) => self.confirmation(confirmation, target),
        }
    }

    /// The outcome of one publisher confirm.
    fn confirmation(
        &self,
        confirmation: Confirmation,
        target: &str,
    ) -> Result<Ack, TransportError> {
        match confirmation {
            Confirmation::Ack(None) => Ok(Ack::default()),
            Confirmation::Ack(Some(returned)) => {
                self.inner.metrics.returned.increment(1);
                let info = reply_code(returned.reply_code);
                Err(TransportError::new(
                    info.class,
                    format!(
                        "unroutable: the broker returned the message sent to {target}: {} {}; {}",
                        returned.reply_code, returned.reply_text, info.advice
                    ),
                )
                .with_code(info.name))
            }
            Confirmation::Nack(returned) => {
                self.inner.metrics.nacked.increment(1);
                let why = returned.map_or(String::new(), |r| {
                    format!(" (returned: {} {})", r.reply_code, r.reply_text)
                });
                Err(TransportError::transient(format!(
                    "the broker nacked a message to {target} (basic.nack: it could not take it now){why}; it is retried"
                ))
                .with_code("NACK"))
            }
            Confirmation::NotRequested => Err(TransportError::transient(format!(
                "no publisher confirm for a message to {target}: confirms were not enabled on its channel; it is retried"
            ))
            .with_code("NOT_CONFIRMED")),
        }
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

/// Declares the topology on a short-lived channel.
async fn declare(connection: &Connection, topology: &[Declare]) -> Result<(), TransportError> {
    // Transient: a declaration can fail for a while (a node down, a queue being deleted,
    // permissions being granted); every batch fails until it succeeds, so keep retrying.
    let fail = |what: String| {
        move |e: lapin::Error| {
            let c = classify(&e, &what);
            TransportError::transient(format!(
                "declaring the configured topology failed: {} (code {}); herald retries, fix the declaration or the broker if this persists",
                c.message(),
                c.code().unwrap_or("-")
            ))
            .with_code("DECLARE_FAILED")
            .with_source(e)
        }
    };
    let ch = connection
        .create_channel()
        .await
        .map_err(fail("topology declaration".into()))?;
    for item in topology {
        match item {
            Declare::Exchange { name, kind } => {
                let kind = match kind {
                    ExchangeKind::Direct => lapin::ExchangeKind::Direct,
                    ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
                    ExchangeKind::Topic => lapin::ExchangeKind::Topic,
                    ExchangeKind::Headers => lapin::ExchangeKind::Headers,
                };
                ch.exchange_declare(
                    name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(fail(format!("declaring exchange \"{name}\"")))?;
            }
            Declare::Queue { name, quorum } => {
                let mut args = FieldTable::default();
                if *quorum {
                    args.insert(
                        "x-queue-type".into(),
                        AMQPValue::LongString("quorum".into()),
                    );
                }
                ch.queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(fail(format!("declaring queue \"{name}\"")))?;
            }
            Declare::Binding {
                queue,
                exchange,
                routing_key,
            } => {
                ch.queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(fail(format!(
                    "binding queue \"{queue}\" to exchange \"{exchange}\""
                )))?;
            }
        }
    }
    ch.close(200, "OK".into())
        .await
        .map_err(fail("closing the declaration channel".into()))?;
    Ok(())
}

fn slot_for(key: Option<&Bytes>, destination: &Destination, channels: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match key {
        Some(k) => k.hash(&mut h),
        None => destination.hash(&mut h),
    }
    (h.finish() % channels as u64) as usize
}

/// Enforces the per-key order rule of the `Transport` contract on a finished batch, and makes a
/// whole-destination error (missing exchange, refused access) the outcome of every failed
/// message, and attributes an oversized-message refusal to the oversized messages only.
pub(crate) fn finish(
    batch: &[Message],
    mut outcomes: Vec<Result<Ack, TransportError>>,
) -> BatchOutcome {
    // A destination-wide permanent error explains every other failure of the batch.
    let whole = outcomes.iter().find_map(|o| match o {
        Err(e)
            if e.class() == ErrorClass::Permanent
                && e.code()
                    .is_some_and(|c| c == "NOT_FOUND" || c == "ACCESS_REFUSED") =>
        {
            Some(e.clone())
        }
        _ => None,
    });
    if let Some(whole) = whole {
        for o in &mut outcomes {
            if o.is_err() {
                *o = Err(whole.clone());
            }
        }
    }
    // A channel closed for an oversized message fails every message that was in flight on it:
    // only those above the limit are permanent; the others are retried.
    for (m, o) in batch.iter().zip(outcomes.iter_mut()) {
        let Err(e) = o else { continue };
        if e.code() == Some("PRECONDITION_FAILED") {
            if let Some(max) = max_size_from_text(e.message()) {
                if m.payload().len() <= max {
                    *o = Err(TransportError::transient(format!(
                        "the channel was closed by another message's error ({}); retried",
                        e.message()
                    ))
                    .with_code("CHANNEL_CLOSED"));
                }
            }
        }
    }
    // Per key: after a transient failure, later messages of that key must not get ahead of its
    // retry, so they fail too (transient), even if the broker confirmed them.
    if outcomes
        .iter()
        .any(|o| matches!(o, Err(e) if e.class() == ErrorClass::Transient))
    {
        let mut held: HashMap<Option<&Bytes>, TransportError> = HashMap::new();
        for (m, o) in batch.iter().zip(outcomes.iter_mut()) {
            if let Some(first) = held.get(&m.key()) {
                if o.is_ok() {
                    *o = Err(TransportError::transient(format!(
                        "held back: an earlier message with the same key failed ({}); sent again after it to keep per-key order",
                        first.message()
                    ))
                    .with_code("ORDER_HOLD"));
                }
            } else if let Err(e) = o {
                if e.class() == ErrorClass::Transient {
                    held.insert(m.key(), e.clone());
                }
            }
        }
    }
    outcomes
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
    fn health(&self) -> TransportHealth {
        let down = self
            .inner
            .flow
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match down {
            Some(why) => {
                self.probe();
                TransportHealth::Down(why)
            }
            None if self.is_blocked() => TransportHealth::Blocked(
                "connection.blocked: a memory or disk alarm on the broker; publishing waits".into(),
            ),
            None => TransportHealth::Up,
        }
    }

    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome {
        self.inner.flow.closed.store(false, Ordering::Release);
        let fail_all = |e: TransportError| batch.iter().map(|_| Err(e.clone())).collect();
        let route = match Route::parse(destination) {
            Ok(r) => r,
            Err(e) => return fail_all(e),
        };
        let live = match self.live().await {
            Ok(l) => l,
            Err(e) => return fail_all(e),
        };
        if let Err(e) = self.wait_unblocked().await {
            return fail_all(e);
        }
        // One deadline for the whole batch: publishes and confirms share it.
        let deadline = Instant::now() + self.inner.config.confirm_timeout;
        let channels = self.inner.config.channels;
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); channels];
        for (i, m) in batch.iter().enumerate() {
            groups[slot_for(m.key(), destination, channels)].push(i);
        }
        let sends = groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(slot, idxs)| self.publish_group(&live, slot, &route, batch, idxs, deadline));
        let mut outcomes: Vec<Option<Result<Ack, TransportError>>> = vec![None; batch.len()];
        for group in join_all(sends).await {
            for (i, o) in group {
                outcomes[i] = Some(o);
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(TransportError::transient(
                        "internal: message not published; retried",
                    ))
                })
            })
            .collect();
        if !live.connection.status().connected() {
            self.set_connected(false);
        }
        finish(batch, outcomes)
    }

    async fn close(&self) {
        self.inner.flow.closed.store(true, Ordering::Release);
        let live = self.inner.link.lock().await.live.take();
        if let Some(live) = live {
            if live.connection.status().connected() {
                // Closing is best effort: every message already has its outcome.
                if let Err(e) = live
                    .connection
                    .close(200, "herald producer closed".into())
                    .await
                {
                    let _ignored = e;
                }
            }
        }
        self.set_connected(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// No broker needed: a port on this machine that nothing listens on.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    #[tokio::test]
    async fn an_unreachable_broker_fails_the_batch_transiently_and_backs_off() {
        let url = format!("amqp://app:hunter2-secret@127.0.0.1:{}/%2F", closed_port());
        let t = AmqpTransport::new(
            AmqpConfig::from_url(&url)
                .expect("url")
                .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(1)),
        )
        .expect("transport");
        assert!(!format!("{t:?}").contains("hunter2"), "{t:?}");
        let batch = vec![Message::new("q", "a"), Message::new("q", "b")];
        let out = t.send_batch(&Destination::new("q"), &batch).await;
        assert_eq!(out.len(), 2);
        for o in &out {
            let e = o.as_ref().expect_err("no broker");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Transient, Some("UNREACHABLE"))
            );
            assert!(!e.to_string().contains("hunter2"), "{e}");
            assert!(e.to_string().contains("app:***@127.0.0.1"), "{e}");
        }
        // The next attempt waits out the backoff instead of hammering the broker.
        let started = std::time::Instant::now();
        let out = t.send_batch(&Destination::new("q"), &batch).await;
        assert!(out.iter().all(Result::is_err));
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        assert!(!t.is_connected() && !t.is_blocked());
    }

    #[tokio::test]
    async fn an_invalid_destination_fails_permanently_without_connecting() {
        let url = format!("amqp://127.0.0.1:{}/%2F", closed_port());
        let t = AmqpTransport::new(AmqpConfig::from_url(&url).expect("url")).expect("transport");
        let out = t
            .send_batch(&Destination::new(""), &[Message::new("", "x")])
            .await;
        let e = out[0].as_ref().expect_err("invalid");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
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
        let batch = keyed(&["a", "b"]);
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

    #[tokio::test]
    async fn confirmations_not_requested_or_nacked_are_transient() {
        let url = format!("amqp://127.0.0.1:{}/%2F", closed_port());
        let t = AmqpTransport::new(AmqpConfig::from_url(&url).expect("url")).expect("transport");
        let e = t
            .confirmation(Confirmation::NotRequested, "queue \"q\"")
            .expect_err("not confirmed is not delivered");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some("NOT_CONFIRMED"))
        );
        let returned = lapin::message::BasicReturnMessage {
            delivery: lapin::message::Delivery::mock(1, "".into(), "q".into(), false, vec![]),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        };
        let e = t
            .confirmation(Confirmation::Nack(Some(returned)), "queue \"q\"")
            .expect_err("nacked");
        assert_eq!((e.class(), e.code()), (ErrorClass::Transient, Some("NACK")));
        let e = t
            .confirmation(Confirmation::Nack(None), "queue \"q\"")
            .expect_err("nacked");
        assert_eq!((e.class(), e.code()), (ErrorClass::Transient, Some("NACK")));
        assert!(t.confirmation(Confirmation::Ack(None), "q").is_ok());
    }

    #[tokio::test]
    async fn concurrent_calls_wait_out_the_backoff_side_by_side() {
        let url = format!("amqp://127.0.0.1:{}/%2F", closed_port());
        let t = AmqpTransport::new(
            AmqpConfig::from_url(&url)
                .expect("url")
                .reconnect_backoff(Duration::from_millis(300), Duration::from_millis(300)),
        )
        .expect("transport");
        assert!(t.connect().await.is_err());
        // Four calls during the backoff: they wait together (about one backoff), not one
        // behind the other, and fail transiently.
        let started = std::time::Instant::now();
        let results = join_all((0..4).map(|_| t.connect())).await;
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        for r in results {
            assert_eq!(r.expect_err("down").class(), ErrorClass::Transient);
        }
    }

    /// What the fake broker does once a channel is in confirm mode.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fake {
        /// Takes publishes, never confirms them.
        Silent,
        /// Blocks the connection (`connection.blocked`) right after `confirm.select-ok`.
        Blocks,
    }

    fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&class.to_be_bytes());
        payload.extend_from_slice(&method.to_be_bytes());
        payload.extend_from_slice(args);
        payload
    }

    fn frame(channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![1u8];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    fn long_str(s: &[u8]) -> Vec<u8> {
        let mut v = u32::try_from(s.len())
            .expect("small")
            .to_be_bytes()
            .to_vec();
        v.extend_from_slice(s);
        v
    }

    /// A minimal AMQP 0-9-1 server on 127.0.0.1 (handshake, channels, confirm mode) that never
    /// confirms a publish. Returns its port.
    async fn fake_broker(mode: Fake) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut header = [0u8; 8];
                    if sock.read_exact(&mut header).await.is_err() {
                        return;
                    }
                    // connection.start: 0-9, server properties (capabilities), PLAIN, en_US.
                    let mut caps = Vec::new();
                    for name in [&b"publisher_confirms"[..], b"connection.blocked"] {
                        caps.push(u8::try_from(name.len()).expect("short"));
                        caps.extend_from_slice(name);
                        caps.extend_from_slice(b"t\x01");
                    }
                    let mut props = vec![12u8];
                    props.extend_from_slice(b"capabilities");
                    props.push(b'F');
                    props.extend_from_slice(&long_str(&caps));
                    let mut args = vec![0u8, 9];
                    args.extend_from_slice(&long_str(&props));
                    args.extend_from_slice(&long_str(b"PLAIN"));
                    args.extend_from_slice(&long_str(b"en_US"));
                    let mut out = frame(0, &method(10, 10, &args));
                    loop {
                        if !out.is_empty() {
                            if sock.write_all(&out).await.is_err() {
                                return;
                            }
                            out.clear();
                        }
                        let mut head = [0u8; 7];
                        if sock.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let channel = u16::from_be_bytes([head[1], head[2]]);
                        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
                        let mut body = vec![0u8; size as usize + 1];
                        if sock.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if head[0] != 1 || body.len() < 5 {
                            continue; // content header, body, heartbeat
                        }
                        let ids = (
                            u16::from_be_bytes([body[0], body[1]]),
                            u16::from_be_bytes([body[2], body[3]]),
                        );
                        match ids {
                            // start-ok → tune: channel-max, frame-max, heartbeat 0.
                            (10, 11) => {
                                let mut a = 2047u16.to_be_bytes().to_vec();
                                a.extend_from_slice(&131_072u32.to_be_bytes());
                                a.extend_from_slice(&0u16.to_be_bytes());
                                out = frame(0, &method(10, 30, &a));
                            }
                            (10, 40) => out = frame(0, &method(10, 41, &[0])),
                            (10, 50) => out = frame(0, &method(10, 51, &[])),
                            (20, 10) => out = frame(channel, &method(20, 11, &[0, 0, 0, 0])),
                            (20, 40) => out = frame(channel, &method(20, 41, &[])),
                            (85, 10) => {
                                out = frame(channel, &method(85, 11, &[]));
                                if mode == Fake::Blocks {
                                    let mut reason = vec![13u8];
                                    reason.extend_from_slice(b"low on memory");
                                    out.extend(frame(0, &method(10, 60, &reason)));
                                }
                            }
                            _ => {} // tune-ok, basic.publish: no answer
                        }
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn missing_confirms_time_out_once_per_batch_not_once_per_message() {
        let port = fake_broker(Fake::Silent).await;
        let t = AmqpTransport::new(
            AmqpConfig::from_url(&format!("amqp://127.0.0.1:{port}/%2F"))
                .expect("url")
                .channels(1)
                .confirm_timeout(Duration::from_millis(400)),
        )
        .expect("transport");
        t.connect()
            .await
            .expect("the fake broker takes the handshake");
        let batch: Vec<Message> = (0..10)
            .map(|i| Message::new("q", format!("m{i}")))
            .collect();
        let started = std::time::Instant::now();
        let out = t.send_batch(&Destination::new("q"), &batch).await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        for o in &out {
            let e = o.as_ref().expect_err("never confirmed");
            assert_eq!(e.class(), ErrorClass::Transient, "{e}");
            assert!(
                matches!(e.code(), Some("CONFIRM_TIMEOUT" | "ORDER_HOLD")),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn a_publish_stuck_behind_a_blocked_connection_is_bounded() {
        let port = fake_broker(Fake::Blocks).await;
        let t = AmqpTransport::new(
            AmqpConfig::from_url(&format!("amqp://127.0.0.1:{port}/%2F"))
                .expect("url")
                .channels(1)
                .confirm_timeout(Duration::from_millis(500))
                .blocked_timeout(Duration::from_millis(500)),
        )
        .expect("transport");
        t.connect()
            .await
            .expect("the fake broker takes the handshake");
        let batch: Vec<Message> = (0..5).map(|i| Message::new("q", format!("m{i}"))).collect();
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            t.send_batch(&Destination::new("q"), &batch),
        )
        .await
        .expect("a blocked connection must not hold a batch forever");
        for o in &out {
            let e = o.as_ref().expect_err("not confirmed");
            assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        }
    }

    #[test]
    fn destinations_map_to_exchange_and_routing_key() {
        let r = Route::parse(&queue("orders")).expect("valid");
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("", "orders")
        );
        let r = Route::parse(&exchange("events", "order.created")).expect("valid");
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("events", "order.created")
        );
        let r = Route::parse(&exchange("fan", "")).expect("valid");
        assert_eq!((r.exchange.as_str(), r.routing_key.as_str()), ("fan", ""));
        let e = Route::parse(&Destination::new("")).expect_err("empty");
        assert_eq!(e.class(), ErrorClass::Permanent);
        let long = "x".repeat(256);
        assert!(Route::parse(&Destination::new(long)).is_err());
    }

    #[test]
    fn message_ids_are_stable_and_overridable() {
        let m = Message::new("q", "payload").with_key("k");
        let id = message_id(&m, Some("message-id"));
        assert_eq!(id.len(), 32);
        assert_eq!(
            id,
            message_id(&m.clone(), Some("message-id")),
            "a retry gets the same id"
        );
        assert_ne!(
            id,
            message_id(&Message::new("q", "payload"), None),
            "the key counts"
        );
        assert_ne!(
            id,
            message_id(&Message::new("q", "payloae").with_key("k"), None)
        );
        let given = m.with_header("message-id", "order-42");
        assert_eq!(message_id(&given, Some("message-id")), "order-42");
    }

    #[test]
    fn same_key_same_channel() {
        let d = Destination::new("q");
        let k = Bytes::from_static(b"customer-7");
        assert_eq!(slot_for(Some(&k), &d, 8), slot_for(Some(&k), &d, 8));
        assert_eq!(slot_for(None, &d, 8), slot_for(None, &d, 8));
        let used: std::collections::HashSet<usize> = (0..64)
            .map(|i| slot_for(Some(&Bytes::from(format!("k{i}"))), &d, 8))
            .collect();
        assert!(used.len() > 4, "keys spread over channels: {used:?}");
    }

    fn keyed(keys: &[&'static str]) -> Vec<Message> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| Message::new("q", format!("m{i}")).with_key(*k))
            .collect()
    }

    #[test]
    fn a_transient_failure_holds_back_later_messages_of_its_key() {
        let batch = keyed(&["a", "b", "a", "b", "a"]);
        let outcomes = vec![
            Ok(Ack::default()),
            Ok(Ack::default()),
            Err(TransportError::transient("nack").with_code("NACK")),
            Ok(Ack::default()),
            Ok(Ack::default()),
        ];
        let out = finish(&batch, outcomes);
        assert!(out[0].is_ok() && out[1].is_ok() && out[3].is_ok());
        assert_eq!(out[2].as_ref().err().and_then(|e| e.code()), Some("NACK"));
        let held = out[4].as_ref().expect_err("held back");
        assert_eq!(
            (held.class(), held.code()),
            (ErrorClass::Transient, Some("ORDER_HOLD"))
        );
    }

    #[test]
    fn a_permanent_failure_does_not_hold_back_others() {
        let batch = keyed(&["a", "a", "a"]);
        let outcomes = vec![
            Ok(Ack::default()),
            Err(TransportError::permanent("unroutable").with_code("NO_ROUTE")),
            Ok(Ack::default()),
        ];
        let out = finish(&batch, outcomes);
        assert!(out[0].is_ok() && out[2].is_ok());
        assert_eq!(
            out[1].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Permanent)
        );
    }

    #[test]
    fn a_missing_exchange_fails_the_whole_batch_permanently() {
        let batch = keyed(&["a", "b", "c"]);
        let outcomes = vec![
            Err(TransportError::permanent("no exchange \"x\"").with_code("NOT_FOUND")),
            Err(TransportError::transient("closed").with_code("CHANNEL_CLOSED")),
            Err(TransportError::transient("closed").with_code("CHANNEL_CLOSED")),
        ];
        for o in finish(&batch, outcomes) {
            let e = o.expect_err("failed");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Permanent, Some("NOT_FOUND"))
            );
        }
    }

    #[test]
    fn an_oversized_message_fails_alone() {
        let batch = vec![
            Message::new("q", vec![0u8; 10]).with_key("a"),
            Message::new("q", vec![0u8; 2000]).with_key("b"),
        ];
        let text = "broker closed the channel: 406 PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000";
        let err = TransportError::permanent(text).with_code("PRECONDITION_FAILED");
        let out = finish(&batch, vec![Err(err.clone()), Err(err)]);
        assert_eq!(
            out[0].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Transient)
        );
        assert_eq!(
            out[1].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Permanent)
        );
    }
}
