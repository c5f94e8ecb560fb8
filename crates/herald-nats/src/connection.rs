//! Connections: one async-nats client per connection, opened on demand and replaced (never
//! resumed) after a loss, with backoff between failed attempts; the stream declarations made on
//! each; the server's permission violations; and the health verdict they add up to.
//!
//! Why a client never resumes its connection: async-nats, left to reconnect by itself, writes
//! on the new connection what was still queued in the client when the old one died, while what
//! had already gone into the old socket is lost with it. A key's later message would then be
//! stored, and its earlier one retried after it: per-key order broken, and JetStream's
//! duplicate window cannot mend it (it keeps the first copy). So each client gets exactly one
//! connection: after a loss its handshake refuses to resume (the auth callback answers no), the
//! client gives up and drops what it had queued (those messages fail as `CONNECTION_LOST` and
//! herald retries them in order), and the transport opens a new client, as herald-amqp opens a
//! new connection. Losses are thus suffixes of what was sent, and retries keep per-key order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::{AuthError, Client, ConnectOptions, Event, ServerError};
use herald_core::rotation::{Dialer, Opened, Rotation, Wording};
use herald_core::{TransportError, TransportHealth};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::config::NatsConfig;
use crate::error::{classify_connect, permission_violation, Denial};
use crate::metrics::NatsMetrics;
use crate::topology::declare;

/// The most permission violations a connection remembers (each names a subject).
const MAX_DENIALS: usize = 64;

/// The transport's view of its connection, shared with the event callbacks.
#[derive(Debug, Default)]
struct Flow {
    /// Up; set false by the event callback as soon as the current client reports a loss.
    connected: AtomicBool,
    /// Why the last connection attempt failed; cleared when one opens. What
    /// [`Transport::health`](herald_core::Transport::health) reports as down.
    down: StdMutex<Option<String>>,
    /// A background reconnection attempt is under way (see `Inner::probe`).
    probing: AtomicBool,
    /// `Transport::close` ran, and no batch has been sent since: no background reconnection.
    closed: AtomicBool,
    /// A connection was up at some point: "not connected" then means lost, not "not yet".
    ever_up: AtomicBool,
}

/// What one client's event callback and its handshake share with the transport.
#[derive(Debug, Default)]
struct LiveState {
    /// The first handshake is done: any later one (a reconnect) is refused.
    established: AtomicBool,
    /// The server or the network closed the connection.
    lost: AtomicBool,
    /// This is the transport's current connection: the events of a replaced one change nothing
    /// of the transport's state.
    current: AtomicBool,
    /// Permission violations the server reported on this connection, each with the count of
    /// `errors_heard` its report made (the latest report of each): a publish denial concerns
    /// only publishes out before it (see [`Live::denial`]).
    denials: StdMutex<Vec<(Denial, u64)>>,
    /// Wakes batches waiting for PubAcks when a violation or a loss comes.
    changed: Notify,
    /// Errors the server reported (`-ERR`, a denied publish among them): the server answers,
    /// though not with a message (see `Live::silent_for`).
    errors_heard: std::sync::atomic::AtomicU64,
}

/// One live connection: its client and JetStream context.
pub(crate) struct Live {
    /// This connection's path number (see `herald_core::Turn::enter`).
    pub(crate) path: u64,
    pub(crate) client: Client,
    pub(crate) js: jetstream::Context,
    state: Arc<LiveState>,
    /// Which server of the list.
    index: usize,
    /// A publish found no stream for a subject a declaration captures: declare again before
    /// the next batch.
    pub(crate) redeclare: AtomicBool,
    /// What the client counts: messages received from the server (PubAcks among them).
    stats: Arc<async_nats::Statistics>,
    /// See [`Live::silent_for`].
    silence: herald_core::rotation::SilenceWatch,
}

impl Live {
    pub(crate) fn is_connected(&self) -> bool {
        !self.state.lost.load(Ordering::Acquire)
            && self.client.connection_state() == State::Connected
    }

    /// The time and the count of what the server sent so far, taken before a publish; given
    /// to [`Live::expecting`] once the publish is out.
    pub(crate) fn snapshot(&self) -> (tokio::time::Instant, u64) {
        herald_core::rotation::SilenceWatch::snapshot(self.received())
    }

    /// A batch's first publish (taken at `snapshot`) is out: unless publishes already wait,
    /// it starts [`Live::silent_for`]'s watch. (Taken before the publish, so that a PubAck
    /// quicker than this call still counts as an answer.)
    pub(crate) fn expecting(&self, snapshot: (tokio::time::Instant, u64)) {
        self.silence.expecting(snapshot);
    }

    /// How long the server has sent nothing (no PubAck, no error, nothing at all) while
    /// publishes wait for an answer, if they do. Batches cut off at their delivery deadline never see their
    /// own PubAcks time out, so a connection gone silent (a half-open TCP connection, a hung
    /// server) is given up by this instead, at the start of the next batch, once silent for
    /// `ack_timeout`. Anything received ends the watch (PubAcks of batches cut off count too).
    pub(crate) fn silent_for(&self) -> Option<Duration> {
        self.silence.silent_for(self.received())
    }

    /// Messages received (PubAcks among them, counted as they arrive, also for batches cut
    /// off) and errors the server reported.
    fn received(&self) -> u64 {
        self.stats.in_messages.load(Ordering::Relaxed)
            + self.state.errors_heard.load(Ordering::Relaxed)
    }

    /// Errors the server reported on this connection so far: taken before a batch's first
    /// publish, it is what [`Live::denial`] is given.
    pub(crate) fn errors_heard(&self) -> u64 {
        self.state.errors_heard.load(Ordering::Acquire)
    }

    /// A permission violation the server reported on this connection that concerns publishing
    /// to `subject`, for publishes out after the server had reported `since` errors
    /// ([`Live::errors_heard`]): a denial of the publish reported after that (the server
    /// reports every denied publish, and permissions may change while a connection lives: a
    /// configuration reload grants or revokes them), or of the reply inbox at any time
    /// (subscribed once per connection, so no PubAck can come on it).
    pub(crate) fn denial(&self, subject: &str, since: u64) -> Option<Denial> {
        self.state.denial(subject, since)
    }

    /// Completes when a permission violation or a loss is reported on this connection (create
    /// it, then check, then await, so that nothing is missed in between).
    pub(crate) fn changed(&self) -> Notified<'_> {
        self.state.changed.notified()
    }
}

impl LiveState {
    /// See [`Live::denial`].
    fn denial(&self, subject: &str, since: u64) -> Option<Denial> {
        let denials = self.denials.lock().unwrap_or_else(PoisonError::into_inner);
        denials
            .iter()
            .find(|(d, at)| match d {
                Denial::Publish(s) => s == subject && *at > since,
                Denial::Subscribe(s) => s.starts_with("_INBOX"),
            })
            .map(|(d, _)| d.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // The client closes once its last handle is gone; its events no longer count.
        self.state.current.store(false, Ordering::Release);
    }
}

/// What every clone of a [`NatsTransport`](crate::NatsTransport) shares: the settings, the
/// connection, the health state and the metrics.
pub(crate) struct Inner {
    pub(crate) config: NatsConfig,
    flow: Arc<Flow>,
    pub(crate) metrics: NatsMetrics,
    /// Each destination's turn to publish: calls publish in the order herald started them.
    pub(crate) turns: herald_core::Turns,
    /// Messages to store again under an id of their own (see [`Resends`]).
    pub(crate) resends: crate::publish::Resends,
    /// The connection and the servers to try, in the order rounds go through them (the URL's
    /// order, or shuffled once at start).
    rotation: Rotation<Arc<Live>>,
    /// The server of the connection up now, as `host:port`.
    node: StdMutex<Option<String>>,
    /// The TLS settings handed to every client (see [`Inner::tls`]), built once.
    tls: std::sync::OnceLock<Result<Arc<async_nats::rustls::ClientConfig>, String>>,
}

impl Inner {
    /// The shared state for checked settings; nothing connects yet.
    pub(crate) fn new(config: NatsConfig) -> Self {
        let metrics = NatsMetrics::new(config.metrics_name.as_deref());
        let mut endpoints = config.url.endpoints.clone();
        if config.shuffle_addresses {
            fastrand::shuffle(&mut endpoints);
        }
        // No jitter: `NatsConfig::reconnect_backoff` promises `min`, doubling, up to `max`.
        let rotation = Rotation::new(
            endpoints,
            (config.reconnect_min, config.reconnect_max),
            config.connect_timeout,
            Wording {
                peer: "NATS",
                entry: "server",
                no_entry_code: "NO_SERVER",
            },
        );
        Self {
            config,
            flow: Arc::new(Flow::default()),
            metrics,
            turns: herald_core::Turns::default(),
            resends: crate::publish::Resends::default(),
            rotation,
            node: StdMutex::new(None),
            tls: std::sync::OnceLock::new(),
        }
    }

    /// The TLS settings for a client: rustls on ring, the system's roots and the configured CA
    /// file. Handed to async-nats, which would otherwise build its own from rustls's
    /// process-wide crypto provider, for `tls://` and for a `nats://` server that asks for TLS,
    /// and so would need one chosen for the application. `None` when they cannot be built
    /// for a `nats://` URL (no system roots, say): async-nats then builds its own, should the
    /// server ask for TLS, as before. For `tls://` that is an error (permanent `TLS_ERROR`).
    fn tls(&self) -> Result<Option<async_nats::rustls::ClientConfig>, TransportError> {
        let built = self.tls.get_or_init(|| {
            let files = &self.config.url.tls_files;
            herald_core::tls::client_config(
                files.ca_file(),
                files.client_cert().as_ref(),
                "NatsConfig::tls_ca_file",
            )
        });
        match built {
            Ok(config) => Ok(Some((**config).clone())),
            Err(e) if self.config.url.tls || self.config.url.tls_files.any() => {
                Err(TransportError::permanent(e.clone()).with_code("TLS_ERROR"))
            }
            Err(_) => {
                herald_core::tls::ensure_crypto_provider();
                Ok(None)
            }
        }
    }

    /// A batch is on its way: reconnecting in the background is allowed again after a close.
    pub(crate) fn in_use(&self) {
        self.flow.closed.store(false, Ordering::Release);
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.flow.connected.load(Ordering::Acquire)
    }

    /// Connects unless connected; see [`NatsTransport::connect`](crate::NatsTransport::connect).
    pub(crate) async fn connect(&self) -> Result<(), TransportError> {
        self.live().await.map(|_| ())
    }

    fn set_down(&self, why: Option<String>) {
        *self
            .flow
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = why;
    }

    fn down(&self) -> Option<String> {
        self.flow
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// While down, tries to reconnect in the background (one attempt at a time, on the usual
    /// reconnect backoff): connections open on demand, so without it a producer that gets no
    /// traffic because it reports itself down would never find the server back. Needs a Tokio
    /// runtime; without one, the next send reconnects.
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

    fn set_connected(&self, up: bool) {
        self.flow.connected.store(up, Ordering::Release);
        if up {
            self.flow.ever_up.store(true, Ordering::Release);
        }
        self.metrics.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// The live connection, opened (or replaced) if there is none, after waiting out the
    /// backoff of a failed round (`herald_core::rotation`).
    pub(crate) async fn live(&self) -> Result<Arc<Live>, TransportError> {
        self.rotation.live(self).await
    }

    /// Gives up on `live` if it is still the connection in use (its PubAcks stopped coming:
    /// a half-open TCP connection, a hung server), so that the next send opens a new one. The
    /// client closes once the batches still holding it are done.
    pub(crate) async fn abandon(&self, live: &Arc<Live>) {
        if self
            .rotation
            .abandon(|l| Arc::ptr_eq(l, live), self)
            .await
            .is_some()
        {
            self.metrics.abandoned.increment(1);
        }
    }

    /// Records the server in use (none: down), in [`Inner::connected_node`] and in the
    /// `herald_nats_node_connected` gauge, one series per server of the list.
    fn set_node(&self, index: Option<usize>) {
        for (i, endpoint) in self.rotation.endpoints().iter().enumerate() {
            let up = if Some(i) == index { 1.0 } else { 0.0 };
            self.metrics.node(&endpoint.to_string()).set(up);
        }
        *self.node.lock().unwrap_or_else(PoisonError::into_inner) =
            index.map(|i| self.rotation.endpoints()[i].to_string());
    }

    /// The server of the connection up now, `host:port`.
    pub(crate) fn connected_node(&self) -> Option<String> {
        self.node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Opens a client with one connection to the server `index` and declares the topology on
    /// it.
    async fn dial(&self, index: usize) -> Result<Arc<Live>, TransportError> {
        let config = &self.config;
        let endpoint = &self.rotation.endpoints()[index];
        let server = crate::url::server_addr(endpoint, config.url.tls);
        let tls = self.tls()?;
        let state = Arc::new(LiveState::default());
        let credentials = config.url.credentials.clone();
        let signer = crate::auth::signer_for(config)?;
        let handshake = state.clone();
        let mut options = ConnectOptions::with_auth_callback(move |nonce| {
            let auth = if handshake.established.load(Ordering::Acquire) {
                Err(AuthError::new(
                    "herald: a lost connection is replaced by a new client, never resumed",
                ))
            } else {
                crate::auth::answer(&credentials, signer.as_deref(), &nonce)
            };
            std::future::ready(auth)
        })
        .name(&config.connection_name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.connect_timeout))
        // One server, one attempt after a loss (refused by the auth callback), then the client
        // gives up: see the module's docs.
        .ignore_discovered_servers()
        .max_reconnects(1)
        .reconnect_delay_callback(|_| Duration::ZERO)
        .require_tls(config.url.tls)
        .event_callback({
            let state = state.clone();
            let flow = self.flow.clone();
            let metrics = self.metrics.clone();
            move |event| {
                on_event(&state, &flow, &metrics, event);
                std::future::ready(())
            }
        });
        if let Some(tls) = tls {
            options = options.tls_client_config(tls);
        }
        let client = options
            .connect(server.as_str())
            .await
            .map_err(|e| classify_connect(&e, &server))?;
        state.established.store(true, Ordering::Release);
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            // The batch's window bounds what is pending; the context's own limit would make
            // concurrent batches wait on each other.
            .max_ack_inflight(1 << 30)
            .build(client.clone());
        let client_stats = client.statistics();
        let live = Live {
            path: herald_core::Turns::fresh_path(),
            client,
            js,
            state,
            index,
            redeclare: AtomicBool::new(false),
            stats: client_stats,
            silence: herald_core::rotation::SilenceWatch::default(),
        };
        // Dropped on an error below (or when the connect timeout drops this future), `live`
        // takes the client with it: the connection closes.
        if !config.topology.is_empty() {
            declare(&live.js, &config.topology, config.connect_timeout).await?;
        }
        Ok(Arc::new(live))
    }

    /// Declares the topology again on `live` if a publish asked for it (see
    /// [`Live::redeclare`]).
    pub(crate) async fn redeclare(&self, live: &Live) -> Result<(), TransportError> {
        if live.redeclare.swap(false, Ordering::AcqRel) {
            if let Err(e) =
                declare(&live.js, &self.config.topology, self.config.connect_timeout).await
            {
                live.redeclare.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The server `live` is connected to, `nats://host:port`, for messages.
    pub(crate) fn server_of(&self, live: &Live) -> String {
        crate::url::server_addr(&self.rotation.endpoints()[live.index], self.config.url.tls)
    }

    /// What [`Transport::health`](herald_core::Transport::health) reports (documented there);
    /// while down, it starts a background reconnection attempt.
    pub(crate) fn health(self: &Arc<Self>) -> TransportHealth {
        match self.down() {
            Some(why) => {
                self.probe();
                TransportHealth::Down(why)
            }
            None => TransportHealth::Up,
        }
    }

    /// What [`Transport::diagnosis`](herald_core::Transport::diagnosis) reports: why the last
    /// connection attempt failed, or that the connection was lost.
    pub(crate) fn diagnosis(&self) -> Option<String> {
        self.down().or_else(|| {
            (self.flow.ever_up.load(Ordering::Acquire) && !self.is_connected()).then(|| {
                "the connection to NATS was lost; the next send opens a new one".to_owned()
            })
        })
    }

    /// Closes the connection, if one is up, and stops background reconnection until the next
    /// batch.
    pub(crate) async fn close(&self) {
        self.flow.closed.store(true, Ordering::Release);
        if let Some((live, _)) = self.rotation.take().await {
            live.state.current.store(false, Ordering::Release);
            if live.is_connected() {
                // Best effort: every message already has its outcome.
                let _flushed =
                    tokio::time::timeout(Duration::from_secs(1), live.client.flush()).await;
            }
        }
        self.set_node(None);
        self.set_connected(false);
    }
}

/// One event of a client: losses and permission violations.
fn on_event(state: &LiveState, flow: &Flow, metrics: &NatsMetrics, event: Event) {
    match event {
        Event::Disconnected | Event::Closed => {
            // Only the transport's current connection counts: one herald closed, gave up or
            // replaced ends with `Closed` too, and is no loss.
            if !state.lost.swap(true, Ordering::AcqRel) && state.current.load(Ordering::Acquire) {
                metrics.lost.increment(1);
                // Not reported as down here: the next send reconnects, and only a failed
                // attempt says the server is unreachable.
                flow.connected.store(false, Ordering::Release);
                metrics.connected.set(0.0);
            }
            state.changed.notify_waiters();
        }
        Event::ServerError(e) => {
            metrics.server_errors.increment(1);
            tracing::warn!(error = %e, "the NATS server reported an error on the connection");
            let denial = match &e {
                ServerError::Other(text) => permission_violation(text),
                _ => None,
            };
            let Some(denial) = denial else {
                state.errors_heard.fetch_add(1, Ordering::AcqRel);
                return;
            };
            {
                let mut denials = state.denials.lock().unwrap_or_else(PoisonError::into_inner);
                // Counted under the lock, so that a batch that reads the count after this
                // denial also finds it recorded (and not as news).
                let at = state.errors_heard.fetch_add(1, Ordering::AcqRel) + 1;
                denials.retain(|(d, _)| *d != denial);
                if denials.len() >= MAX_DENIALS {
                    denials.remove(0);
                }
                denials.push((denial, at));
            }
            state.changed.notify_waiters();
        }
        Event::LameDuckMode => {
            tracing::info!("the NATS server is shutting down (lame duck mode); herald reconnects elsewhere once it closes the connection");
        }
        _ => {}
    }
}

/// The rotation's view of the transport: how a connection opens, and what is counted and
/// recorded as connections come and go.
impl Dialer<Arc<Live>> for Inner {
    fn is_up(&self, live: &Arc<Live>) -> bool {
        live.is_connected()
    }

    async fn open(&self, index: usize) -> Result<Arc<Live>, TransportError> {
        self.dial(index).await
    }

    fn describe(&self, index: usize) -> String {
        crate::url::server_addr(&self.rotation.endpoints()[index], self.config.url.tls)
    }

    fn attempt_failed(&self, _index: usize) {
        self.metrics.connect_failures.increment(1);
    }

    fn opened(&self, index: usize, live: &Arc<Live>, how: Opened, _failed_rounds: u32) {
        if matches!(how, Opened::FailedOver { .. }) {
            self.metrics.failovers.increment(1);
        }
        live.state.current.store(true, Ordering::Release);
        self.metrics.opened.increment(1);
        self.set_node(Some(index));
        self.set_connected(true);
        self.set_down(None);
    }

    fn round_failed(&self, error: &TransportError, _failed_rounds: u32, _retry_in: Duration) {
        self.set_down(Some(format!("cannot connect: {error}")));
    }

    fn lost(&self, _index: usize, live: &Arc<Live>, _next: usize) {
        live.state.current.store(false, Ordering::Release);
        self.set_node(None);
        self.set_connected(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before, a connection herald closed itself (the transport's close, one given up or
    /// replaced) counted in `herald_nats_connections_lost_total` as it ended.
    #[test]
    fn only_the_current_connection_s_end_counts_as_lost() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let metrics = metrics::with_local_recorder(&recorder, || NatsMetrics::new(None));
        let flow = Flow::default();
        let closed_by_herald = LiveState::default();
        on_event(&closed_by_herald, &flow, &metrics, Event::Closed);
        let current = LiveState::default();
        current.current.store(true, Ordering::Release);
        on_event(&current, &flow, &metrics, Event::Disconnected);
        on_event(&current, &flow, &metrics, Event::Closed);
        let lost: Vec<DebugValue> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == crate::metrics::CONNECTIONS_LOST)
            .map(|(.., v)| v)
            .collect();
        assert_eq!(lost, vec![DebugValue::Counter(1)]);
    }

    #[test]
    fn events_mark_losses_and_denials() {
        let state = LiveState::default();
        state.current.store(true, Ordering::Release);
        let flow = Flow::default();
        flow.connected.store(true, Ordering::Release);
        let metrics = NatsMetrics::new(None);
        let error = |text: &str| Event::ServerError(ServerError::Other(text.into()));
        let denied = "Permissions Violation for Publish to \"secret.x\"";
        on_event(&state, &flow, &metrics, error("Maximum Payload Violation"));
        on_event(&state, &flow, &metrics, error(denied));
        assert_eq!(
            *state.denials.lock().expect("lock"),
            vec![(Denial::Publish("secret.x".into()), 2)]
        );
        // A publish denial concerns the publishes out before it, not those after.
        let secret = Some(Denial::Publish("secret.x".into()));
        assert_eq!(state.denial("secret.x", 1), secret);
        assert_eq!(state.denial("secret.x", 2), None, "granted since, maybe");
        assert_eq!(state.denial("secret.y", 0), None);
        on_event(&state, &flow, &metrics, error(denied));
        assert_eq!(state.denial("secret.x", 2), secret, "denied again");
        assert_eq!(state.denials.lock().expect("lock").len(), 1, "kept once");
        // A denied reply inbox concerns every publish from then on.
        on_event(
            &state,
            &flow,
            &metrics,
            error("Permissions Violation for Subscription to \"_INBOX.abc.*\""),
        );
        assert_eq!(
            state.denial("other", 99),
            Some(Denial::Subscribe("_INBOX.abc.*".into()))
        );
        assert!(
            flow.connected.load(Ordering::Acquire),
            "a denial is no loss"
        );
        on_event(&state, &flow, &metrics, Event::Disconnected);
        assert!(state.lost.load(Ordering::Acquire));
        assert!(!flow.connected.load(Ordering::Acquire));
        // A replaced connection's loss does not touch the transport's state.
        let old = LiveState::default();
        flow.connected.store(true, Ordering::Release);
        on_event(&old, &flow, &metrics, Event::Closed);
        assert!(flow.connected.load(Ordering::Acquire));
    }
}
