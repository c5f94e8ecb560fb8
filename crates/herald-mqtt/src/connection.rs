//! Connections: one session of herald's own (`crate::wire`) per connection, opened on demand
//! with a clean session and replaced (never resumed) after a loss, with backoff between failed
//! attempts (a `herald_core::rotation::Rotation` over the URL's one broker); the table that
//! matches every acknowledgement to its message by packet id; and the health verdict they add
//! up to.
//!
//! Why a connection is never resumed: resending what was in flight on a resumed session, and
//! then going on with what was queued behind it, would put the messages that had already
//! failed for herald and are being retried after later messages of their key: per-key order
//! broken. So after a loss a connection is dropped with everything it held (those messages
//! fail as transient `CONNECTION_LOST`, and herald retries them in order), and the next batch
//! opens a new one with a new client id and a clean session (MQTT 5 Clean Start with no
//! session expiry; MQTT 3.1.1 Clean Session). The broker discards the old session: it
//! redelivers nothing of it, and what it had already accepted before the loss is published
//! again by herald's retry: a duplicate, never a loss or a reordering.
//!
//! How outcomes find their messages: each publish takes a packet id that awaits no answer
//! ([`LiveState::insert`]) as it is queued, and its answer slot waits under that id for the
//! PUBACK (QoS 1) or the PUBREC and PUBCOMP (QoS 2). A slot is a place in its batch's table of
//! answers (`crate::answers`), or, for the raw open-loop baseline (rumqttc's client, which
//! reports each id as it writes it), a channel of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, PoisonError};
use std::time::Duration;

use herald_core::rotation::{Dialer, Opened, Rotation, Wording};
use herald_core::{TransportError, TransportHealth};
use rumqttc::v5;
use tokio::sync::{oneshot, Mutex};
use tokio::time::Instant;

use crate::answers::Answers;
use crate::config::{MqttConfig, Qos, Version};
use crate::error::{
    ack_code, comp_code, puback_code, pubcomp_code, pubrec_code, CodeInfo, Failure,
};
use crate::metrics::MqttMetrics;
use crate::wire::{self, Socket, Wire};

/// Room in the request channel of the baseline's rumqttc clients (between the publishing tasks
/// and the event loop): what up to 16 batches in flight hand over, a window of 4 096 each, fits. When the
/// channel is full, each publish waits for the event loop to take one, and each side wakes the
/// other once a message (measured, 100 000 messages at pipeline depth 16 with room for 4 096:
/// 33 000 context switches against 3 000-10 000, and 41-42 k msgs/s against 53-60 k). The channel
/// allocates only what it holds; what it holds is bounded by the producer's buffer.
#[cfg_attr(not(feature = "baseline"), allow(dead_code))]
pub(crate) const REQUEST_CHANNEL: usize = 65_536;

/// The answer to one publish.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Acknowledged (PUBACK, or PUBCOMP for QoS 2).
    Acked,
    /// The broker answered with a failure reason code, in this packet.
    Refused(CodeInfo, &'static str),
    /// The connection ended before the answer came.
    Lost,
}

/// Where the answer to one publish goes.
pub(crate) enum Slot {
    /// The message at this index of a batch.
    Batch(Arc<Answers>, usize),
    /// A channel of its own (the raw open-loop baseline: each message is a future of its own).
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    One(oneshot::Sender<Answer>),
}

impl Slot {
    fn put(self, answer: Answer) {
        match self {
            Slot::Batch(answers, index) => answers.put(index, answer),
            Slot::One(tx) => {
                // The batch may have stopped waiting: nothing to tell then.
                let _gone = tx.send(answer);
            }
        }
    }
}

/// The answer slots of one connection's messages.
#[derive(Default)]
struct Book {
    /// Handed to the client, no packet id yet: in publish order.
    queued: VecDeque<Slot>,
    /// Written with this packet id, waiting for the broker's answer (looked up once per
    /// message: a fast hash, SipHash was 200 instructions a message).
    inflight: HashMap<u16, Slot, foldhash::fast::FixedState>,
    /// Given a packet id still in flight: written once that id is acknowledged.
    collided: Option<(u16, Slot)>,
    /// The connection is over: every slot was answered `Lost`, no new one is taken.
    closed: bool,
    /// The last packet id given out by [`LiveState::insert`].
    last_id: u16,
}

/// The transport's view of its connection, shared with the connection tasks.
#[derive(Debug, Default)]
struct Flow {
    connected: AtomicBool,
    /// Why the last connection attempt failed; cleared when one opens.
    down: StdMutex<Option<String>>,
    probing: AtomicBool,
    closed: AtomicBool,
    ever_up: AtomicBool,
}

/// What one connection's task shares with the transport (and, in the baseline, the raw
/// open-loop client: the same matching of answers to publishes by packet id).
#[derive(Default)]
pub(crate) struct LiveState {
    /// The connection is over (lost, abandoned or closed).
    lost: AtomicBool,
    /// This is the transport's current connection.
    current: AtomicBool,
    /// `Transport::close` is ending it: its end is no loss.
    closing: AtomicBool,
    /// Why it ended, when the broker or the network ended it.
    failure: StdMutex<Option<TransportError>>,
    book: StdMutex<Book>,
    /// Acknowledgements the broker sent so far (every PUBACK and PUBCOMP, and a PUBREC that
    /// refuses): while it grows, the connection is answering, however slowly (see
    /// `publish::Patience`).
    answers: std::sync::atomic::AtomicU64,
}

impl LiveState {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the answer slot of the next publish to be handed to the client (slots and
    /// publishes must enter in the same order); `false` once the connection is over.
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    pub(crate) fn slot(&self, slot: Slot) -> bool {
        let mut book = self.book();
        if book.closed {
            return false;
        }
        book.queued.push_back(slot);
        true
    }

    /// [`LiveState::slot`] with a channel of its own for the answer.
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    pub(crate) fn one(&self) -> Option<oneshot::Receiver<Answer>> {
        let (tx, rx) = oneshot::channel();
        self.slot(Slot::One(tx)).then_some(rx)
    }

    /// The client wrote a publish with `pkid`.
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    fn written(&self, pkid: u16) {
        let mut book = self.book();
        if let Some((p, _)) = &book.collided {
            if *p == pkid {
                if let Some((p, slot)) = book.collided.take() {
                    book.inflight.insert(p, slot);
                }
                return;
            }
        }
        if let Some(slot) = book.queued.pop_front() {
            if let Some(earlier) = book.inflight.insert(pkid, slot) {
                // The client gave out a packet id still awaiting its answer (rumqttc can reuse
                // a QoS 2 id between its PUBREC and PUBCOMP, and a broker that answers out of
                // order gets there): the answer to come could be either's. Both end lost, and
                // are retried.
                drop(book);
                earlier.put(Answer::Lost);
                self.end(Some(
                    TransportError::transient(format!(
                        "the MQTT client reused packet id {pkid} while a publish with it still awaited its answer; the connection is given up and both are retried (a duplicate is possible)"
                    ))
                    .with_code("PROTOCOL_ERROR"),
                ));
            }
        }
    }

    /// The client holds a publish back until `pkid` is acknowledged.
    #[cfg_attr(not(feature = "baseline"), allow(dead_code))]
    fn collided(&self, pkid: u16) {
        let mut book = self.book();
        if let Some(slot) = book.queued.pop_front() {
            book.collided = Some((pkid, slot));
        }
    }

    /// Gives the next publish a packet id that awaits no answer, its answer to go to `slot`;
    /// `None` once the connection is over. (Some id is free: fewer publishes are out than
    /// there are ids, see `wire::Wire::room`.)
    pub(crate) fn insert(&self, slot: Slot) -> Option<u16> {
        let mut book = self.book();
        if book.closed {
            return None;
        }
        let mut id = book.last_id;
        loop {
            id = id.checked_add(1).unwrap_or(1);
            if !book.inflight.contains_key(&id) {
                break;
            }
        }
        book.last_id = id;
        book.inflight.insert(id, slot);
        Some(id)
    }

    /// The broker answered the publish with `pkid`: whether one awaited that answer.
    pub(crate) fn answer(&self, pkid: u16, answer: Answer) -> bool {
        self.answers.fetch_add(1, Ordering::Relaxed);
        let slot = self.book().inflight.remove(&pkid);
        match slot {
            Some(slot) => {
                slot.put(answer);
                true
            }
            None => false,
        }
    }

    /// Why the connection ended, if the broker or the network ended it.
    pub(crate) fn failure(&self) -> Option<TransportError> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every publish handed over is written and some still wait for their answer: the client
    /// has nothing to send while the broker still has answers to give.
    pub(crate) fn waiting(&self) -> bool {
        let book = self.book();
        book.queued.is_empty() && book.collided.is_none() && !book.inflight.is_empty()
    }

    /// Ends the connection: every slot is answered `Lost`, no new one is taken.
    pub(crate) fn end(&self, failure: Option<TransportError>) {
        if let Some(f) = failure {
            let mut slot = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                *slot = Some(f);
            }
        }
        self.lost.store(true, Ordering::Release);
        let mut book = self.book();
        book.closed = true;
        let mut slots: Vec<Slot> = book.queued.drain(..).collect();
        slots.extend(book.inflight.drain().map(|(_, s)| s));
        slots.extend(book.collided.take().map(|(_, s)| s));
        drop(book);
        for s in slots {
            s.put(Answer::Lost);
        }
    }
}

/// One live connection.
pub(crate) struct Live {
    /// This connection's path number (see `herald_core::Turn::enter`).
    pub(crate) path: u64,
    wire: Arc<Wire>,
    state: Arc<LiveState>,
    /// Held by a batch while it hands its messages over: one batch's publishes go out
    /// together, in order.
    pub(crate) send: Mutex<()>,
    /// The largest PUBLISH packet this connection may send: the smaller of the broker's
    /// Maximum Packet Size (MQTT 5 CONNACK) and the configured one.
    pub(crate) max_packet: u32,
    /// The broker's Maximum QoS (MQTT 5 CONNACK), if it announced one.
    pub(crate) max_qos: Option<u8>,
    pub(crate) qos: Qos,
    pub(crate) version: Version,
    /// `host:port`, for messages.
    pub(crate) server: String,
    task: tokio::task::JoinHandle<()>,
    /// See [`Live::silent_for`].
    silence: herald_core::rotation::SilenceWatch,
}

impl Live {
    pub(crate) fn is_connected(&self) -> bool {
        !self.state.lost.load(Ordering::Acquire)
    }

    /// Acknowledgements the broker sent on this connection so far (see `LiveState::answers`).
    pub(crate) fn answers(&self) -> u64 {
        self.state.answers.load(Ordering::Relaxed)
    }

    /// The time and the acknowledgements so far, taken before a batch's first publish; given
    /// to [`Live::expecting`] once the publish is handed to the client.
    pub(crate) fn snapshot(&self) -> (tokio::time::Instant, u64) {
        herald_core::rotation::SilenceWatch::snapshot(self.answers())
    }

    /// A batch's first publish (taken at `snapshot`) is handed over: unless publishes already
    /// wait, it starts [`Live::silent_for`]'s watch.
    pub(crate) fn expecting(&self, snapshot: (tokio::time::Instant, u64)) {
        self.silence.expecting(snapshot);
    }

    /// How long the broker has acknowledged nothing while publishes waited, if they did.
    /// Batches cut off at their delivery deadline never see their own acknowledgements time
    /// out, so a connection gone silent (a half-open TCP connection, a hung broker) is given
    /// up by this instead, at the start of the next batch, once silent for `ack_timeout`,
    /// long before the keep-alive finds it (up to twice `keep_alive`).
    pub(crate) fn silent_for(&self) -> Option<std::time::Duration> {
        self.silence.silent_for(self.answers())
    }

    /// Why the connection ended, if the broker or the network ended it.
    pub(crate) fn failure(&self) -> Option<TransportError> {
        self.state.failure()
    }

    /// Ends the connection now: its task stops and drops the socket (closing it), and every
    /// message still waiting gets `Lost`.
    fn shut(&self, failure: Option<TransportError>) {
        self.task.abort();
        // A batch waiting for room on it stops waiting (its task no longer closes it).
        self.wire.close();
        self.state.end(failure);
    }

    /// Queues one publish (the caller holds [`Live::send`]), once the broker has room for it
    /// and if `until` has not passed by then; its answer goes to `slot`. Written at the next
    /// [`Live::flush`], or when it must wait for room.
    pub(crate) async fn publish(
        &self,
        slot: Slot,
        message: wire::Publish<'_>,
        until: Option<std::time::Instant>,
    ) -> wire::Queued {
        self.wire.publish(&self.state, slot, message, until).await
    }

    /// Writes what was queued.
    pub(crate) fn flush(&self) {
        self.wire.flush();
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
        self.wire.close();
        self.state.current.store(false, Ordering::Release);
        self.state.end(None);
    }
}

/// What every clone of an [`MqttTransport`](crate::MqttTransport) shares.
pub(crate) struct Inner {
    pub(crate) config: MqttConfig,
    /// The connection, over a list of one broker: the URL's.
    rotation: Rotation<Arc<Live>>,
    flow: Arc<Flow>,
    pub(crate) metrics: MqttMetrics,
    /// Each destination's turn to publish: calls publish in the order herald started them.
    pub(crate) turns: herald_core::Turns,
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

/// A new client id: the prefix, `-`, and random letters and digits, 23 characters in all (the
/// length and the characters every broker accepts). Two connections with the same id take the
/// session from each other, so the random part is as long as the prefix leaves room for: 6
/// characters (35 bits) after a prefix of 16, 16 characters (95 bits) after `herald`.
fn client_id(prefix: &str) -> String {
    let n = 22usize.saturating_sub(prefix.len()).clamp(6, 16);
    let mut id = String::with_capacity(prefix.len() + 1 + n);
    id.push_str(prefix);
    id.push('-');
    id.extend(std::iter::repeat_with(fastrand::alphanumeric).take(n));
    id
}

impl Inner {
    pub(crate) fn new(config: MqttConfig) -> Self {
        let metrics = MqttMetrics::new(config.metrics_name.as_deref());
        // No jitter: the reconnect backoff is `min`, doubling, up to `max`.
        let rotation = Rotation::new(
            vec![config.url.endpoint.clone()],
            (config.reconnect_min, config.reconnect_max),
            config.connect_timeout,
            Wording {
                peer: "the MQTT broker",
                entry: "broker",
                no_entry_code: "NO_BROKER",
            },
        );
        Self {
            config,
            rotation,
            flow: Arc::new(Flow::default()),
            metrics,
            turns: herald_core::Turns::default(),
            tls: OnceLock::new(),
        }
    }

    pub(crate) fn in_use(&self) {
        self.flow.closed.store(false, Ordering::Release);
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.flow.connected.load(Ordering::Acquire)
    }

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

    fn set_connected(&self, up: bool) {
        self.flow.connected.store(up, Ordering::Release);
        if up {
            self.flow.ever_up.store(true, Ordering::Release);
        }
        self.metrics.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// While down, tries to reconnect in the background (one attempt at a time, on the
    /// reconnect backoff), so that the verdict clears without traffic.
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
            // Success clears `down` (the connection stays for the next batch); a failure
            // records why and pushes the next attempt back.
            let _outcome = inner.connect().await;
            inner.flow.probing.store(false, Ordering::Release);
        });
    }

    /// The live connection, opened (or replaced) if there is none, after waiting out the
    /// backoff of a failed attempt (`herald_core::rotation`).
    pub(crate) async fn live(&self) -> Result<Arc<Live>, TransportError> {
        self.rotation.live(self).await
    }

    /// Gives up on `live` if it is still the connection in use (its acknowledgements stopped
    /// coming), so that the next send opens a new one.
    pub(crate) async fn abandon(&self, live: &Arc<Live>) {
        // Lost already: counted as lost then.
        let counted = !live.is_connected();
        if self
            .rotation
            .abandon(|l| Arc::ptr_eq(l, live), self)
            .await
            .is_some()
            && !counted
        {
            self.metrics.abandoned.increment(1);
        }
        live.shut(None);
    }

    /// The rustls configuration for `mqtts://`: the system's roots and the configured CA
    /// file, on ring. Built once.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, TransportError> {
        self.tls
            .get_or_init(|| {
                let files = &self.config.url.tls_files;
                herald_core::tls::client_config(
                    files.ca_file(),
                    files.client_cert().as_ref(),
                    "MqttConfig::tls_ca_file",
                )
            })
            .clone()
            .map_err(|e| TransportError::permanent(e).with_code("TLS_ERROR"))
    }

    /// Opens one connection: TCP (and TLS), CONNECT, its CONNACK, and the task that runs the
    /// session (`crate::wire`).
    async fn dial(&self) -> Result<Arc<Live>, TransportError> {
        let c = &self.config;
        let server = c.url.server();
        let v3 = c.version() == Version::V311;
        let fail = |f: Failure| f.connect_error(&server, v3);
        let tls = if c.url.tls {
            Some(self.tls_config()?)
        } else {
            None
        };
        let host = &c.url.endpoint.host;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), c.url.endpoint.port))
            .await
            .map_err(|e| fail(Failure::Io(e.to_string())))?;
        // No Nagle: a PUBLISH is a few bytes, and holding it back until the previous segment
        // is acknowledged stalls the pipeline.
        tcp.set_nodelay(true)
            .map_err(|e| fail(Failure::Io(e.to_string())))?;
        let mut socket: Box<dyn Socket> = match tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    fail(Failure::Tls(format!(
                        "`{host}` is not a host name for TLS: {e}"
                    )))
                })?;
                let connector = rumqttc::tokio_rustls::TlsConnector::from(tls);
                Box::new(
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| fail(Failure::from_handshake(&e)))?,
                )
            }
        };
        let id = client_id(&c.client_id_prefix);
        let handshake = wire::handshake(
            &mut *socket,
            wire::Connect {
                v5: !v3,
                client_id: &id,
                keep_alive: c.keep_alive,
                credentials: c
                    .url
                    .credentials()
                    .map(|(u, p)| (u.to_owned(), p.to_owned())),
            },
        )
        .await
        .map_err(fail)?;
        // The publishes out at once: the window, within the broker's Receive Maximum (MQTT 5)
        // or, for QoS 2 over 3.1.1, which has none, the broker's limit as set (see
        // `MqttConfig::v3_qos2_inflight`); never more than there are packet ids.
        let mut room = c.window.min(usize::from(u16::MAX));
        if let Some(max) = handshake.receive_max {
            room = room.min(usize::from(max));
        }
        if v3 && c.qos() == Qos::ExactlyOnce {
            room = room.min(usize::from(c.v3_qos2_inflight));
        }
        let qos = match c.qos() {
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        };
        let wire = Arc::new(Wire::new(!v3, qos, room));
        // The broker may set the keep-alive (Server Keep Alive, MQTT 5).
        let keep_alive = handshake.keep_alive.unwrap_or(c.keep_alive);
        let state = Arc::new(LiveState::default());
        let task = tokio::spawn(run(
            socket,
            handshake.read,
            wire.clone(),
            state.clone(),
            self.flow.clone(),
            self.metrics.clone(),
            server.clone(),
            keep_alive,
        ));
        Ok(Arc::new(Live {
            path: herald_core::Turns::fresh_path(),
            wire,
            state,
            send: Mutex::new(()),
            max_packet: handshake
                .max_packet
                .unwrap_or(u32::MAX)
                .min(c.max_packet_size),
            max_qos: handshake.max_qos,
            qos: c.url.qos,
            version: c.version(),
            server,
            task,
            silence: herald_core::rotation::SilenceWatch::default(),
        }))
    }

    pub(crate) fn health(self: &Arc<Self>) -> TransportHealth {
        match self.down() {
            Some(why) => {
                self.probe();
                TransportHealth::Down(why)
            }
            None => TransportHealth::Up,
        }
    }

    pub(crate) fn diagnosis(&self) -> Option<String> {
        self.down().or_else(|| {
            (self.flow.ever_up.load(Ordering::Acquire) && !self.is_connected()).then(|| {
                "the connection to the MQTT broker was lost; the next send opens a new one"
                    .to_owned()
            })
        })
    }

    /// The broker of the connection up now, `host:port`.
    pub(crate) fn endpoint(&self) -> Option<String> {
        self.is_connected().then(|| self.config.url.server())
    }

    /// Disconnects, if connected, and stops background reconnection until the next batch.
    pub(crate) async fn close(&self) {
        self.flow.closed.store(true, Ordering::Release);
        if let Some((live, _)) = self.rotation.take().await {
            live.state.current.store(false, Ordering::Release);
            live.state.closing.store(true, Ordering::Release);
            if live.is_connected() {
                // Best effort: every message already has its outcome. The DISCONNECT is
                // written by the connection's task, which is given a moment for it.
                live.wire.disconnect();
                let deadline = Instant::now() + Duration::from_millis(500);
                while !live.task.is_finished() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            live.shut(None);
        }
        self.set_connected(false);
    }
}

/// The rotation's view of the transport: how a connection opens, and what is counted and
/// recorded as it comes and goes. One broker: a round is one attempt.
impl Dialer<Arc<Live>> for Inner {
    fn is_up(&self, live: &Arc<Live>) -> bool {
        live.is_connected()
    }

    async fn open(&self, _index: usize) -> Result<Arc<Live>, TransportError> {
        self.dial().await
    }

    fn describe(&self, _index: usize) -> String {
        self.config.url.server()
    }

    fn attempt_failed(&self, _index: usize) {
        self.metrics.connect_failures.increment(1);
    }

    fn opened(&self, _index: usize, live: &Arc<Live>, _how: Opened, _failed_rounds: u32) {
        live.state.current.store(true, Ordering::Release);
        self.metrics.opened.increment(1);
        self.set_connected(true);
        self.set_down(None);
    }

    fn round_failed(&self, error: &TransportError, _failed_rounds: u32, _retry_in: Duration) {
        self.set_down(Some(format!("cannot connect: {error}")));
    }

    fn lost(&self, _index: usize, live: &Arc<Live>, _next: usize) {
        live.state.current.store(false, Ordering::Release);
        self.set_connected(false);
    }
}

/// Records the loss of a connection (its task's end) in the transport's state.
fn lost(state: &LiveState, flow: &Flow, metrics: &MqttMetrics, failure: TransportError) {
    if state.closing.load(Ordering::Acquire) {
        state.end(None);
        return;
    }
    tracing::warn!(error = %failure, "the connection to the MQTT broker ended");
    metrics.lost.increment(1);
    if state.current.load(Ordering::Acquire) {
        flow.connected.store(false, Ordering::Release);
        metrics.connected.set(0.0);
    }
    state.end(Some(failure));
}

/// Runs one connection's session until it ends, and records its end.
#[allow(clippy::too_many_arguments)]
async fn run(
    socket: Box<dyn Socket>,
    read: bytes::BytesMut,
    wire: Arc<Wire>,
    state: Arc<LiveState>,
    flow: Arc<Flow>,
    metrics: MqttMetrics,
    server: String,
    keep_alive: Duration,
) {
    let ended = wire::run(
        socket,
        read,
        wire,
        state.clone(),
        metrics.clone(),
        keep_alive,
    )
    .await;
    let failure = ended.map_or_else(
        || TransportError::transient("the connection was closed").with_code("CONNECTION_LOST"),
        |f| f.lost_error(&server),
    );
    lost(&state, &flow, &metrics, failure);
}

/// One event of an MQTT 5 event loop (the baseline's raw open-loop client).
#[cfg_attr(not(feature = "baseline"), allow(dead_code))]
pub(crate) fn on_v5(state: &LiveState, metrics: &MqttMetrics, event: &v5::Event) {
    use v5::{Event, Incoming};
    match event {
        Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => state.written(*pkid),
        Event::Outgoing(rumqttc::Outgoing::AwaitAck(pkid)) => state.collided(*pkid),
        Event::Incoming(Incoming::PubAck(ack)) => {
            let code = puback_code(ack.reason);
            state.answer(ack.pkid, settle(code, ack_code(code), "PUBACK", metrics));
        }
        Event::Incoming(Incoming::PubRec(rec)) => {
            let code = pubrec_code(rec.reason);
            match ack_code(code) {
                Some(info) => {
                    metrics.refused.increment(1);
                    state.answer(rec.pkid, Answer::Refused(info, "PUBREC"));
                }
                None if code == 0x10 => metrics.no_subscribers.increment(1),
                None => {}
            }
        }
        Event::Incoming(Incoming::PubComp(comp)) => {
            let code = pubcomp_code(comp.reason);
            state.answer(comp.pkid, settle(code, comp_code(code), "PUBCOMP", metrics));
        }
        _ => {}
    }
}

/// One event of an MQTT 3.1.1 event loop (the baseline's raw open-loop client).
#[cfg_attr(not(feature = "baseline"), allow(dead_code))]
pub(crate) fn on_v3(state: &LiveState, event: &rumqttc::Event) {
    use rumqttc::{Event, Incoming, Outgoing};
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => state.written(*pkid),
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => state.collided(*pkid),
        // MQTT 3.1.1 acknowledgements carry no reason: they are all successes.
        Event::Incoming(Incoming::PubAck(ack)) => {
            state.answer(ack.pkid, Answer::Acked);
        }
        Event::Incoming(Incoming::PubComp(comp)) => {
            state.answer(comp.pkid, Answer::Acked);
        }
        _ => {}
    }
}

/// The answer of a final acknowledgement with reason `code` (`info`: its failure, if it is
/// one), counted.
pub(crate) fn settle(
    code: u8,
    info: Option<CodeInfo>,
    packet: &'static str,
    m: &MqttMetrics,
) -> Answer {
    match info {
        Some(info) => {
            m.refused.increment(1);
            Answer::Refused(info, packet)
        }
        None => {
            if code == 0x10 {
                m.no_subscribers.increment(1);
            }
            Answer::Acked
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before, the second publish under a packet id replaced the first's slot: the answer
    /// meant for the first went to the second (reported delivered before the broker had it),
    /// and the first waited for an answer that could not come.
    #[tokio::test]
    async fn a_packet_id_reused_while_awaited_ends_both_lost() {
        let st = LiveState::default();
        let (a, b) = (st.one().expect("open"), st.one().expect("open"));
        st.written(1);
        st.written(1);
        st.answer(1, Answer::Acked);
        assert!(matches!(a.await, Ok(Answer::Lost)));
        assert!(matches!(b.await, Ok(Answer::Lost)));
        assert_eq!(
            st.failure().and_then(|e| e.code().map(str::to_owned)),
            Some("PROTOCOL_ERROR".to_owned())
        );
    }

    #[test]
    fn client_ids_are_23_characters_and_new_each_time() {
        for prefix in ["herald", "a", "sixteen-chars-xx"] {
            let id = client_id(prefix);
            assert!(id.starts_with(&format!("{prefix}-")), "{id}");
            assert!(id.len() <= 23, "{id}");
            let random = &id[prefix.len() + 1..];
            assert!(random.len() >= 6, "{id}");
            assert!(random.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        }
        assert_ne!(client_id("herald"), client_id("herald"));
    }

    fn answered(rx: &mut oneshot::Receiver<Answer>) -> Option<String> {
        rx.try_recv().ok().map(|a| format!("{a:?}"))
    }

    #[test]
    fn the_end_of_a_connection_answers_a_batch_s_slots_lost() {
        let state = LiveState::default();
        let answers = Arc::new(Answers::new(3, None));
        for i in 0..3 {
            assert!(state.slot(Slot::Batch(Arc::clone(&answers), i)));
        }
        state.written(1);
        state.answer(1, Answer::Acked);
        state.written(2);
        state.end(None);
        assert!(!state.slot(Slot::Batch(Arc::clone(&answers), 0)), "closed");
        use std::future::Future;
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(std::pin::pin!(answers.answered(3))
            .as_mut()
            .poll(&mut cx)
            .is_ready());
        let left: Vec<String> = answers.close().iter().map(|a| format!("{a:?}")).collect();
        assert_eq!(left, ["Some(Acked)", "Some(Lost)", "Some(Lost)"]);
    }

    #[test]
    fn answers_find_their_messages_by_packet_id_in_write_order() {
        let state = LiveState::default();
        let mut rx: Vec<_> = (0..4)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                state.book().queued.push_back(Slot::One(tx));
                rx
            })
            .collect();
        state.written(7);
        state.written(8);
        // The third waits for id 7 to be acknowledged, then goes out under it.
        state.collided(7);
        state.answer(8, Answer::Acked);
        assert_eq!(answered(&mut rx[1]).as_deref(), Some("Acked"));
        assert_eq!(answered(&mut rx[0]), None);
        state.answer(7, Answer::Acked);
        state.written(7);
        assert_eq!(answered(&mut rx[0]).as_deref(), Some("Acked"));
        assert_eq!(
            answered(&mut rx[2]),
            None,
            "the collided one is in flight now"
        );
        state.written(9);
        state.answer(
            7,
            Answer::Refused(ack_code(0x87).expect("failure"), "PUBACK"),
        );
        assert!(answered(&mut rx[2]).is_some_and(|a| a.contains("NOT_AUTHORIZED")));
        // The end of the connection answers everything still waiting.
        state.end(None);
        assert_eq!(answered(&mut rx[3]).as_deref(), Some("Lost"));
        assert!(state.book().closed);
    }
}
