//! Connections: one connection and its publishing channels, opened on demand and again after a
//! loss (with backoff between failed attempts), the broker's flow control, and the health
//! verdict they add up to.
//!
//! Logged (target `herald_amqp::connection`, fields `transport="amqp"`, `producer` when the
//! transport has a [`metrics_name`](crate::AmqpConfig::metrics_name), `node` as `host:port`,
//! `url` with the password masked): connected and reconnected (info), failover to another
//! node, the first failed round of connection attempts, a connection lost, confirms that
//! stopped, the broker blocking publishing (warn); later failed rounds, a closed connection
//! (debug).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::rotation::{Dialer, Opened, Rotation, Wording};
use herald_core::{TransportError, TransportHealth, Turns};
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::confirms::{Confirms, Identity, Publish, Ticket};
use crate::destination::Route;
use crate::error::{classify, classify_connect};
use crate::metrics::AmqpMetrics;
use crate::topology::declare;
use herald_core::url::Endpoint;

/// Flow control state, shared with the task that listens to connection events.
#[derive(Debug, Default)]
struct Flow {
    blocked: AtomicBool,
    /// When the broker last unblocked the connection: a confirm missing just after an alarm is
    /// the alarm's doing too.
    unblocked_at: std::sync::Mutex<Option<Instant>>,
    /// Up; set false by the event task as soon as lapin reports a connection error.
    connected: AtomicBool,
    /// Why the last connection attempt failed; cleared when one opens. What
    /// [`Transport::health`](herald_core::Transport::health) reports as down.
    down: std::sync::Mutex<Option<String>>,
    /// A background reconnection attempt is under way (see `Inner::probe`).
    probing: AtomicBool,
    /// `Transport::close` ran, and no batch has been sent since: no background reconnection.
    closed: AtomicBool,
    changed: Notify,
}

/// One live connection and its publishing channels (opened on first use, reopened after a
/// channel error).
pub(crate) struct Live {
    /// Told apart from every other connection this process opened (see `Turn::enter`).
    generation: u64,
    /// Publishing channels given up or found closed and replaced on this connection.
    replaced: std::sync::atomic::AtomicU64,
    connection: Connection,
    channels: Vec<Mutex<Option<Publisher>>>,
    events: JoinHandle<()>,
    /// Whether publishes are `mandatory`, so that the broker may return them.
    returns: bool,
    /// This is the transport's connection in use: the events of one given up or replaced
    /// (after a failover) change nothing of the transport's state.
    current: Arc<AtomicBool>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.current.store(false, Ordering::Release);
        self.events.abort();
    }
}

impl Live {
    /// What a batch publishes through now, as a number that changes whenever the connection or
    /// one of its channels is replaced (see `Turn::enter`): messages published through a new
    /// channel may reach the queue ahead of those still unconfirmed on the old one.
    pub(crate) fn path(&self) -> u64 {
        let replaced = self.replaced.load(std::sync::atomic::Ordering::Acquire);
        (self.generation << 32) | (replaced & 0xffff_ffff)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// How long the oldest publish on this connection still waiting for the broker has waited
    /// (see [`Confirms::unanswered_for`]), over the channels not in use this moment (one in
    /// use is being looked after by its caller).
    pub(crate) fn unanswered_for(&self) -> Option<Duration> {
        self.channels
            .iter()
            .filter_map(|slot| {
                let slot = slot.try_lock().ok()?;
                slot.as_ref()?.confirms.unanswered_for()
            })
            .max()
    }

    /// The publishing channel `slot`, in confirm mode: the open one, or a new one.
    pub(crate) async fn channel(&self, slot: usize) -> Result<Publisher, TransportError> {
        let mut ch = self.channels[slot].lock().await;
        if let Some(c) = ch.as_ref() {
            if c.channel.status().connected() {
                return Ok(c.clone());
            }
            self.replaced
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        let opened = async {
            let c = self.connection.create_channel().await?;
            c.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(c)
        }
        .await
        .map_err(|e| classify(&e, "a new channel"))?;
        let opened = Publisher {
            confirms: Arc::new(Confirms::new(opened.clone(), self.returns)),
            channel: opened,
            proven: Arc::default(),
        };
        *ch = Some(opened.clone());
        Ok(opened)
    }

    /// Gives up channel `slot` if it still holds `channel`, so that the next publish on the
    /// slot opens a new one. lapin closes the channel when its last clone (a batch still
    /// publishing on it) is dropped.
    ///
    /// Used after a nack: RabbitMQ 3.10 keeps nacking every publish of a channel that first
    /// published to a quorum queue while a dead node was still its recorded leader, however
    /// long the queue has had a new leader; a new channel publishes fine. Returns whether it
    /// gave the channel up (it had not been replaced already).
    pub(crate) async fn retire(&self, slot: usize, channel: &Channel) -> bool {
        let mut ch = self.channels[slot].lock().await;
        if ch.as_ref().is_some_and(|c| c.channel.id() == channel.id()) {
            *ch = None;
            self.replaced
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            return true;
        }
        false
    }
}

/// A publishing channel, with the routes it has published to with a confirm.
#[derive(Clone)]
pub(crate) struct Publisher {
    pub(crate) channel: Channel,
    proven: Arc<std::sync::Mutex<HashSet<Route>>>,
    /// The channel's publishes until their verdicts, each with its own returned message. Its
    /// lock is held across the first poll of each `basic_publish` on the channel. That poll
    /// takes the publish's delivery tag and then queues its frames, under two different locks
    /// of lapin's: two tasks publishing on one channel at once (batches of other destinations
    /// sharing its slot, other producers on the transport) could take tags 5 and 6 and queue
    /// their frames 6 first. The broker numbers publishes in the order it reads them, so the
    /// two would get each other's confirm: a nacked or returned message reported delivered.
    confirms: Arc<Confirms>,
}

/// How many routes a channel remembers as proven; past it, it forgets them all (a route
/// forgotten costs one publish awaited alone, the next time it is used on the channel).
const PROVEN_ROUTES: usize = 4096;

impl Publisher {
    /// Hands `publish` (a `basic_publish` of this channel) to lapin: its first poll takes the
    /// delivery tag and queues the frames, with no other publish of the channel in that step
    /// meanwhile (see [`Publisher::confirms`]). The ticket waits for its write and its
    /// confirm.
    pub(crate) fn publish(&self, identity: Identity, publish: Publish) -> lapin::Result<Ticket> {
        self.confirms.start(identity, publish)
    }

    /// Whether a publish to `route` on this channel was confirmed (see `first_alone`).
    pub(crate) fn proven(&self, route: &Route) -> bool {
        self.proven
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(route)
    }

    /// A publish to `route` on this channel was confirmed.
    pub(crate) fn prove(&self, route: &Route) {
        let mut proven = self.proven.lock().unwrap_or_else(PoisonError::into_inner);
        if proven.len() >= PROVEN_ROUTES {
            proven.clear();
        }
        proven.insert(route.clone());
    }
}

/// lapin's TLS settings for a new connection (herald's and the baseline's): the CA PEM and the
/// CA file's certificates to trust (besides the system's roots), and the client certificate,
/// read now, so that files replaced since (a renewed certificate) are used. The files were
/// checked when the transport was built: one that cannot be read now is most likely being
/// replaced, so the attempt fails transiently (`TLS_FILE`), naming it, and is retried.
pub(crate) fn tls_config(config: &AmqpConfig) -> Result<OwnedTLSConfig, TransportError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            TransportError::transient(format!("cannot read {}: {e}", path.display()))
                .with_code("TLS_FILE")
        })
    };
    let mut cert_chain = config.tls_ca_pem.clone();
    if let Some(path) = config.url.tls_files.ca_file() {
        let pem = String::from_utf8_lossy(&read(path)?).into_owned();
        cert_chain = Some(match cert_chain {
            Some(given) => format!("{given}\n{pem}"),
            None => pem,
        });
    }
    let identity = match config.url.tls_files.client_cert() {
        None => None,
        Some(c) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read(&c.cert_file)?,
            key: read(&c.key_file)?,
        }),
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// lapin reported the connection with this `current` flag lost: the transport is down only if it
/// was the connection in use (not one given up or replaced since).
fn connection_lost(current: &AtomicBool, flow: &Flow, metrics: &AmqpMetrics) {
    if current.load(Ordering::Acquire) {
        flow.connected.store(false, Ordering::Release);
        metrics.connected.set(0.0);
    }
    flow.changed.notify_waiters();
}

/// How long [`Inner::close`] waits for the broker to answer its `connection.close`.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What every clone of an [`AmqpTransport`](crate::AmqpTransport) shares: the settings, the
/// connection, the flow control state and the metrics.
pub(crate) struct Inner {
    pub(crate) config: AmqpConfig,
    /// The connection and the brokers to try, in the order rounds go through them (the URL's
    /// order, or shuffled once at start, see `AmqpConfig::shuffle_addresses`).
    rotation: Rotation<Arc<Live>>,
    flow: Arc<Flow>,
    pub(crate) metrics: AmqpMetrics,
    /// The address of the connection up now, as `host:port`.
    node: std::sync::Mutex<Option<String>>,
    /// Each destination's turn to publish: calls publish in the order herald started them.
    pub(crate) turns: Turns,
}

/// The `transport` field of every event this crate logs.
const TRANSPORT: &str = "amqp";

impl Inner {
    /// The shared state for checked settings; nothing connects yet.
    pub(crate) fn new(config: AmqpConfig) -> Self {
        let metrics = AmqpMetrics::new(config.metrics_name.as_deref());
        let mut endpoints = config.url.endpoints.clone();
        if config.shuffle_addresses {
            fastrand::shuffle(&mut endpoints);
        }
        // No jitter: `AmqpConfig::reconnect_backoff` promises `min`, doubling, up to `max`.
        let rotation = Rotation::new(
            endpoints,
            (config.reconnect_min, config.reconnect_max),
            config.connect_timeout,
            Wording {
                peer: "the broker",
                entry: "address",
                no_entry_code: "NO_ADDRESS",
            },
        );
        Self {
            config,
            rotation,
            flow: Arc::new(Flow::default()),
            metrics,
            turns: Turns::default(),
            node: std::sync::Mutex::new(None),
        }
    }

    /// A batch is on its way: reconnecting in the background is allowed again after a close.
    pub(crate) fn in_use(&self) {
        self.flow.closed.store(false, Ordering::Release);
    }

    pub(crate) fn is_blocked(&self) -> bool {
        self.flow.blocked.load(Ordering::Acquire)
    }

    /// Whether the broker has blocked the connection at some time after `since` (it is
    /// blocked now, or unblocked it since).
    pub(crate) fn blocked_after(&self, since: Instant) -> bool {
        self.is_blocked()
            || self
                .flow
                .unblocked_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|at| at > since)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.flow.connected.load(Ordering::Acquire)
    }

    /// The `producer` field of the events logged: the transport's metrics name, if any.
    fn producer(&self) -> Option<&str> {
        self.config.metrics_name.as_deref()
    }

    /// Connects unless connected; see [`AmqpTransport::connect`](crate::AmqpTransport::connect).
    pub(crate) async fn connect(&self) -> Result<(), TransportError> {
        self.live().await.map(|_| ())
    }

    fn set_down(&self, why: Option<String>) {
        *self
            .flow
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    /// While down, tries to reconnect in the background (one attempt at a time, on the usual
    /// reconnect backoff): connections open on demand, so without it a producer that gets no
    /// traffic because it reports itself down (a load balancer drained it) would never find
    /// the broker back. Needs a Tokio runtime; without one, the next send reconnects.
    fn probe(self: &Arc<Self>) {
        let flow = &self.flow;
        if flow.closed.load(Ordering::Acquire) || flow.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            flow.probing.store(false, Ordering::Release);
            return;
        };
        let inner = Arc::clone(self);
        runtime.spawn(async move {
            // Success clears `down`; a failure records why and pushes the next attempt back.
            let _outcome = inner.connect().await;
            inner.flow.probing.store(false, Ordering::Release);
        });
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.flow.connected.store(up, Ordering::Release);
        self.metrics.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// The live connection, opened (or reopened) if there is none, after waiting out the
    /// backoff of a failed round (`herald_core::rotation`).
    pub(crate) async fn live(&self) -> Result<Arc<Live>, TransportError> {
        self.rotation.live(self).await
    }

    /// Gives up on `live` if it is still the connection in use (its confirms stopped coming:
    /// a half-open TCP connection, a node that hangs), so that the next send tries the next
    /// address. The connection is closed in the background.
    pub(crate) async fn abandon(&self, live: &Arc<Live>) {
        let Some((_, index)) = self.rotation.abandon(|l| Arc::ptr_eq(l, live), self).await else {
            return;
        };
        let node = self.rotation.endpoints()[index].to_string();
        self.metrics.abandoned.increment(1);
        tracing::warn!(
            transport = TRANSPORT,
            producer = self.producer(),
            node = %node,
            confirm_timeout_ms = u64::try_from(self.config.confirm_timeout.as_millis()).unwrap_or(u64::MAX),
            "the broker stopped confirming: connection given up, the retry goes to the next address"
        );
        let live = Arc::clone(live);
        tokio::spawn(async move {
            // Best effort: the broker may never answer the close.
            let closing = live
                .connection
                .close(320, "herald: no confirms within the confirm timeout".into());
            let _ignored = tokio::time::timeout(Duration::from_secs(1), closing).await;
        });
    }

    /// `amqp://user:***@host:port/vhost` for one address.
    fn redacted(&self, endpoint: &Endpoint) -> String {
        let mut one = self.config.url.clone();
        one.endpoints = vec![endpoint.clone()];
        one.to_string()
    }

    /// Records the address in use (none: down), in [`Inner::connected_node`] and in the
    /// `herald_amqp_node_connected` gauge, one series per address of the list.
    fn set_node(&self, index: Option<usize>) {
        for (i, endpoint) in self.rotation.endpoints().iter().enumerate() {
            let up = if Some(i) == index { 1.0 } else { 0.0 };
            self.metrics.node(&endpoint.to_string()).set(up);
        }
        *self
            .node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            index.map(|i| self.rotation.endpoints()[i].to_string());
    }

    /// The address of the connection up now, `host:port`.
    pub(crate) fn connected_node(&self) -> Option<String> {
        self.node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn dial(&self, index: usize) -> Result<Arc<Live>, TransportError> {
        let config = &self.config;
        let endpoint = &self.rotation.endpoints()[index];
        let url = self.redacted(endpoint);
        let props = ConnectionProperties::default()
            .with_connection_name(config.connection_name.clone().into());
        let tls = tls_config(config)?;
        // lapin's TLS (rustls-connector, for `amqps://` only) uses rustls's process-wide
        // crypto provider.
        if config.url.tls {
            herald_core::tls::ensure_crypto_provider();
        }
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| TransportError::permanent(format!("no async runtime for lapin: {e}")))?;
        let connection =
            Connection::connect_uri_with_config(config.url.to_lapin(endpoint), props, tls, runtime)
                .await
                .map_err(|e| classify_connect(&e, &url))?;
        // Listen before anything else can happen: blocked/unblocked arrive as events.
        let mut events = connection.events_listener();
        let flow = self.flow.clone();
        let metrics = self.metrics.clone();
        let node = endpoint.to_string();
        let producer = self.config.metrics_name.clone();
        let current = Arc::new(AtomicBool::new(false));
        let is_current = current.clone();
        metrics.blocked.set(0.0);
        flow.blocked.store(false, Ordering::Release);
        flow.changed.notify_waiters();
        let events = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        tracing::warn!(
                            transport = TRANSPORT,
                            producer = producer.as_deref(),
                            node = %node,
                            reason = %reason,
                            "the broker blocked publishing (connection.blocked: a memory or disk alarm); messages wait in herald's buffer"
                        );
                        metrics.blocked.set(1.0);
                        metrics.blocked_events.increment(1);
                        flow.blocked.store(true, Ordering::Release);
                        flow.changed.notify_waiters();
                    }
                    Event::ConnectionUnblocked => {
                        tracing::info!(
                            transport = TRANSPORT,
                            producer = producer.as_deref(),
                            node = %node,
                            "the broker unblocked publishing"
                        );
                        metrics.blocked.set(0.0);
                        *flow
                            .unblocked_at
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                        flow.blocked.store(false, Ordering::Release);
                        flow.changed.notify_waiters();
                    }
                    // A soft error is one channel closing (reopened on next use); anything
                    // else ends the connection.
                    // Not reported as down here: the next send reconnects, and only a failed
                    // attempt says the broker is unreachable (this task may also belong to a
                    // connection already replaced).
                    Event::Error(e) if !e.is_amqp_soft_error() => {
                        tracing::warn!(
                            transport = TRANSPORT,
                            producer = producer.as_deref(),
                            node = %node,
                            error = %e,
                            "connection to the broker lost; the next send reconnects"
                        );
                        connection_lost(&is_current, &flow, &metrics);
                    }
                    Event::Error(e) => tracing::debug!(
                        transport = TRANSPORT,
                        producer = producer.as_deref(),
                        node = %node,
                        error = %e,
                        "a channel closed on an error; the next publish on it opens a new one"
                    ),
                    _ => {}
                }
            }
        });
        let live = Live {
            generation: Turns::fresh_path(),
            replaced: std::sync::atomic::AtomicU64::new(0),
            channels: (0..config.channels).map(|_| Mutex::new(None)).collect(),
            connection,
            events,
            returns: config.mandatory,
            current,
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

    /// Waits while the broker blocks the connection, up to the blocked timeout.
    pub(crate) async fn wait_unblocked(&self) -> Result<(), TransportError> {
        let flow = &self.flow;
        let deadline = Instant::now() + self.config.blocked_timeout;
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
                    self.config.blocked_timeout
                ))
                .with_code("CONNECTION_BLOCKED"));
            }
        }
    }

    /// What [`Transport::health`](herald_core::Transport::health) reports (documented there);
    /// while down, it starts a background reconnection attempt.
    pub(crate) fn health(self: &Arc<Self>) -> TransportHealth {
        let down = self
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

    /// Closes the connection, if one is up, and stops background reconnection until the next
    /// batch.
    pub(crate) async fn close(&self) {
        self.flow.closed.store(true, Ordering::Release);
        if let Some((live, index)) = self.rotation.take().await {
            live.current.store(false, Ordering::Release);
            let node = &self.rotation.endpoints()[index];
            tracing::debug!(
                transport = TRANSPORT,
                producer = self.producer(),
                node = %node,
                "closing the connection"
            );
            if live.is_connected() {
                // Closing is best effort: every message already has its outcome. Bounded: a
                // broker that blocks the connection (a memory or disk alarm) reads nothing, the
                // close included, until the alarm clears.
                let closing = live.connection.close(200, "herald producer closed".into());
                if tokio::time::timeout(CLOSE_WAIT, closing).await.is_err() {
                    tracing::debug!(
                        transport = TRANSPORT,
                        producer = self.producer(),
                        node = %node,
                        "the broker did not answer the close within {CLOSE_WAIT:?}; connection dropped"
                    );
                }
            }
        }
        self.set_connected(false);
    }
}

/// The rotation's view of the transport: how a connection opens, and what is logged, counted
/// and recorded as connections come and go.
impl Dialer<Arc<Live>> for Inner {
    fn is_up(&self, live: &Arc<Live>) -> bool {
        live.is_connected()
    }

    async fn open(&self, index: usize) -> Result<Arc<Live>, TransportError> {
        self.dial(index).await
    }

    fn describe(&self, index: usize) -> String {
        self.redacted(&self.rotation.endpoints()[index])
    }

    fn attempt_failed(&self, _index: usize) {
        self.metrics.connect_failures.increment(1);
    }

    fn opened(&self, index: usize, live: &Arc<Live>, how: Opened, failed_rounds: u32) {
        let endpoints = self.rotation.endpoints();
        let node = &endpoints[index];
        let url = self.redacted(node);
        match how {
            Opened::FailedOver { from } => {
                self.metrics.failovers.increment(1);
                tracing::warn!(
                    transport = TRANSPORT,
                    producer = self.producer(),
                    node = %node,
                    from = %endpoints[from],
                    url = %url,
                    failed_rounds,
                    "failed over to another broker node"
                );
            }
            Opened::Reconnected => tracing::info!(
                transport = TRANSPORT,
                producer = self.producer(),
                node = %node,
                url = %url,
                failed_rounds,
                "reconnected to the broker"
            ),
            Opened::First => tracing::info!(
                transport = TRANSPORT,
                producer = self.producer(),
                node = %node,
                url = %url,
                failed_rounds,
                "connected to the broker"
            ),
        }
        live.current.store(true, Ordering::Release);
        self.metrics.opened.increment(1);
        self.set_node(Some(index));
        self.set_connected(true);
        self.set_down(None);
    }

    fn round_failed(&self, error: &TransportError, failed_rounds: u32, retry_in: Duration) {
        self.set_down(Some(format!("cannot connect: {error}")));
        let retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
        // The first failed round says so; the ones after it, at the backoff's pace, are
        // detail (health reports the connection down meanwhile).
        if failed_rounds == 1 {
            tracing::warn!(
                transport = TRANSPORT,
                producer = self.producer(),
                url = %self.config.redacted_url(),
                error = %error,
                failed_rounds,
                retry_in_ms,
                "cannot connect to the broker (each address tried once); reconnecting with backoff"
            );
        } else {
            tracing::debug!(
                transport = TRANSPORT,
                producer = self.producer(),
                url = %self.config.redacted_url(),
                error = %error,
                failed_rounds,
                retry_in_ms,
                "still cannot connect to the broker; reconnecting with backoff"
            );
        }
    }

    fn lost(&self, index: usize, live: &Arc<Live>, next: usize) {
        live.current.store(false, Ordering::Release);
        let endpoints = self.rotation.endpoints();
        tracing::debug!(
            transport = TRANSPORT,
            producer = self.producer(),
            node = %endpoints[index],
            next = %endpoints[next],
            "connection gone: the next attempt starts at the next address"
        );
        self.set_node(None);
        self.set_connected(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_retry::{Backoff, Jitter};

    /// Before, the loss of a connection given up or replaced (an abandoned one failing late,
    /// after a failover) marked the transport down while its new connection was up.
    #[test]
    fn only_the_connection_in_use_marks_the_transport_down() {
        let flow = Flow::default();
        let metrics = AmqpMetrics::new(None);
        flow.connected.store(true, Ordering::Release);
        connection_lost(&AtomicBool::new(false), &flow, &metrics);
        assert!(
            flow.connected.load(Ordering::Acquire),
            "a replaced one's loss"
        );
        connection_lost(&AtomicBool::new(true), &flow, &metrics);
        assert!(!flow.connected.load(Ordering::Acquire), "the one in use");
    }

    /// A port on 127.0.0.1 that nothing listens on.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn a_failed_round_warns_once_with_the_url_masked_and_later_rounds_are_detail() {
        let logs = herald_testkit::LogCapture::start_at(tracing::Level::DEBUG);
        let url = format!("amqp://app:hunter2secret@127.0.0.1:{}/%2F", closed_port());
        let config = AmqpConfig::from_url(&url)
            .expect("url")
            .metrics_name("orders-eu")
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(1));
        let inner = Inner::new(config);
        // Each call waits out the backoff of the round before it, then makes a round of its own.
        for _ in 0..3 {
            inner.connect().await.expect_err("nothing listens");
        }
        let text = logs.text();
        assert!(!text.contains("hunter2secret"), "{text}");
        let warned: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains("cannot connect"))
            .collect();
        assert_eq!(warned.len(), 1, "{text}");
        for field in [
            "transport=\"amqp\"",
            "producer=\"orders-eu\"",
            "url=amqp://app:***@127.0.0.1:",
            "failed_rounds=1",
            "retry_in_ms=1",
        ] {
            assert!(warned[0].contains(field), "no {field} in: {}", warned[0]);
        }
        let later = text
            .lines()
            .filter(|l| l.contains(" DEBUG ") && l.contains("still cannot connect"))
            .count();
        assert_eq!(later, 2, "{text}");
    }

    /// The schedule as it was written before it went through `herald_retry::Backoff`.
    fn hand_rolled(min: Duration, max: Duration, failures: u32) -> Duration {
        let exp = failures.min(16) - 1;
        min.saturating_mul(1 << exp).min(max)
    }

    #[test]
    fn the_reconnect_backoff_doubles_from_min_to_max_without_jitter() {
        let ms = Duration::from_millis;
        let day = Duration::from_secs(24 * 60 * 60);
        for (min, max) in [
            (ms(100), Duration::from_secs(5)),
            (ms(200), Duration::from_secs(1)),
            (ms(300), ms(300)),
            (Duration::from_nanos(1), day),
            (ms(1), day),
            (Duration::from_nanos(123_456_789), day),
            (day, day),
        ] {
            let backoff = Backoff::new(min, max).with_jitter(Jitter::None);
            for failures in (1..=40).chain([u32::MAX]) {
                assert_eq!(
                    herald_core::rotation::round_delay(&backoff, failures),
                    hand_rolled(min, max, failures),
                    "{min:?}..{max:?} after {failures} failures"
                );
            }
        }
        let default = Backoff::new(ms(100), Duration::from_secs(5)).with_jitter(Jitter::None);
        let delays: Vec<_> = (1..=8)
            .map(|n| herald_core::rotation::round_delay(&default, n))
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(ms));
    }
}
