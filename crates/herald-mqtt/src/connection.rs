//! Connections: one rumqttc client and event loop per connection, opened on demand with a clean
//! session and replaced (never resumed) after a loss, with backoff between failed attempts (a
//! `herald_core::rotation::Rotation` over the URL's one broker); the task that drives the event loop and matches every acknowledgement to its message by packet
//! id; and the health verdict they add up to.
//!
//! Why a connection is never resumed: rumqttc, polled again after a loss, reconnects and
//! resends what was in flight (with a persistent session) or drops it (with a clean one), and
//! then goes on with what was queued behind it; in both cases the messages that had already
//! failed for herald and are being retried would arrive after later messages of their key:
//! per-key order broken. So each event loop gets exactly one connection: after a loss it is
//! dropped with everything it held (those messages fail as transient `CONNECTION_LOST`, and
//! herald retries them in order), and the next batch opens a new client with a new client id
//! and a clean session (MQTT 5 Clean Start with no session expiry; MQTT 3.1.1 Clean Session).
//! The broker discards the old session: it redelivers nothing of it, and what it had already
//! accepted before the loss is published again by herald's retry: a duplicate, never a loss or
//! a reordering.
//!
//! How outcomes find their messages: rumqttc takes publishes through a channel, in order, and
//! its event loop reports each one's packet id as it writes it (`Outgoing::Publish(pkid)`, or
//! `Outgoing::AwaitAck(pkid)` when it must wait for that id to be acknowledged first). Each
//! message's answer slot is queued before its publish enters the channel (under the
//! connection's send lock), so the n-th id reported is the n-th slot queued; the slot then waits
//! under its packet id for the PUBACK (QoS 1) or the PUBREC and PUBCOMP (QoS 2). A slot is a
//! place in its batch's table of answers (`crate::answers`), or, for the raw open-loop
//! baseline, a channel of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, PoisonError};
use std::time::Duration;

use herald_core::rotation::{Dialer, Opened, Rotation, Wording};
use herald_core::{Bytes, TransportError, TransportHealth};
use rumqttc::v5;
use tokio::sync::{oneshot, Mutex};
use tokio::time::Instant;

use crate::answers::Answers;
use crate::config::{MqttConfig, Qos, Version};
use crate::error::{
    ack_code, comp_code, puback_code, pubcomp_code, pubrec_code, CodeInfo, Failure,
};
use crate::metrics::MqttMetrics;

/// Room in a client's request channel (rumqttc's, between the publishing tasks and the event
/// loop): what up to 16 batches in flight hand over, a window of 4 096 each, fits. When the
/// channel is full, each publish waits for the event loop to take one, and each side wakes the
/// other once a message (measured, 100 000 messages at pipeline depth 16 with room for 4 096:
/// 33 000 context switches against 3 000-10 000, and 41-42 k msgs/s against 53-60 k). The channel
/// allocates only what it holds; what it holds is bounded by the producer's buffer.
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
    #[cfg_attr(not(any(test, feature = "baseline")), allow(dead_code))]
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
    pub(crate) fn slot(&self, slot: Slot) -> bool {
        let mut book = self.book();
        if book.closed {
            return false;
        }
        book.queued.push_back(slot);
        true
    }

    /// [`LiveState::slot`] with a channel of its own for the answer.
    #[cfg_attr(not(any(test, feature = "baseline")), allow(dead_code))]
    pub(crate) fn one(&self) -> Option<oneshot::Receiver<Answer>> {
        let (tx, rx) = oneshot::channel();
        self.slot(Slot::One(tx)).then_some(rx)
    }

    /// The client wrote a publish with `pkid`.
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
    fn collided(&self, pkid: u16) {
        let mut book = self.book();
        if let Some(slot) = book.queued.pop_front() {
            book.collided = Some((pkid, slot));
        }
    }

    fn answer(&self, pkid: u16, answer: Answer) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        let slot = self.book().inflight.remove(&pkid);
        if let Some(slot) = slot {
            slot.put(answer);
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
    fn waiting(&self) -> bool {
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

/// The client of one connection.
enum Client {
    V5(v5::AsyncClient),
    V3(rumqttc::AsyncClient),
}

/// One live connection.
pub(crate) struct Live {
    /// This connection's path number (see `herald_core::Turn::enter`).
    pub(crate) path: u64,
    client: Client,
    state: Arc<LiveState>,
    /// Held by a batch while it hands its messages to the client: slots and publishes enter
    /// in the same order.
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
    /// The transport's state and metrics, told when herald gives this connection up itself
    /// (see [`Live::give_up`]).
    flow: Arc<Flow>,
    metrics: MqttMetrics,
}

/// Ends a connection whose publish was dropped half-way (the batch's future was dropped
/// while the client's channel was full): its slot may have no publish behind it, so the
/// packet ids reported later could be matched to the wrong messages.
struct Unfinished<'a>(Option<&'a Live>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(live) = self.0 {
            live.give_up();
        }
    }
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

    /// Ends the connection now: its task stops and drops the client's event loop (closing
    /// the socket), and every message still waiting gets `Lost`.
    fn shut(&self, failure: Option<TransportError>) {
        self.task.abort();
        self.state.end(failure);
    }

    /// Ends the connection because herald cannot use it any more (a publish cut off half-way),
    /// not because the broker or the network ended it. As its task is stopped, which would
    /// have told the transport of a loss, this tells it: when it was the transport's
    /// connection, the transport is down (`is_connected`, `herald_mqtt_connected`) until the
    /// next send opens a new one, and the connection counts as abandoned. It stayed "up"
    /// before, and counted nowhere.
    fn give_up(&self) {
        let was_over = self.state.lost.load(Ordering::Acquire);
        self.shut(None);
        if !was_over && self.state.current.swap(false, Ordering::AcqRel) {
            self.flow.connected.store(false, Ordering::Release);
            self.metrics.connected.set(0.0);
            self.metrics.abandoned.increment(1);
        }
    }

    /// Hands one publish to the client (the caller holds [`Live::send`]); its answer goes to
    /// `slot`. `false`: the connection is over.
    pub(crate) async fn publish(
        &self,
        slot: Slot,
        topic: &str,
        payload: Bytes,
        properties: Vec<(String, String)>,
    ) -> bool {
        if !self.state.slot(slot) {
            return false;
        }
        let mut unfinished = Unfinished(Some(self));
        let sent = match &self.client {
            Client::V5(c) => {
                let qos = match self.qos {
                    Qos::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
                    Qos::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
                };
                if properties.is_empty() {
                    c.publish(topic, qos, false, payload).await
                } else {
                    let props = v5::mqttbytes::v5::PublishProperties {
                        user_properties: properties,
                        ..Default::default()
                    };
                    c.publish_with_properties(topic, qos, false, payload, props)
                        .await
                }
                .is_ok()
            }
            Client::V3(c) => {
                let qos = match self.qos {
                    Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
                    Qos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
                };
                c.publish(topic, qos, false, payload).await.is_ok()
            }
        };
        if sent {
            unfinished.0 = None;
        }
        // Not sent: the event loop is gone (its task ended), the connection is over (and the
        // slot was answered `Lost` by `Unfinished`).
        sent
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
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

/// rumqttc's connection timeout, in whole seconds: rounded up, at least 1 (the rotation bounds
/// the attempt by the exact `connect_timeout`; rounded down, 1.9 s would be cut at 1 s).
fn whole_seconds_up(d: std::time::Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
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
        // Given up already (a publish cut off half-way: `Live::give_up`), it was counted then.
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

    /// Opens one connection: CONNECT, its CONNACK, and the task that drives the event loop.
    async fn dial(&self) -> Result<Arc<Live>, TransportError> {
        let c = &self.config;
        let server = c.url.server();
        let v3 = c.version() == Version::V311;
        let id = client_id(&c.client_id_prefix);
        let mut inflight = u16::try_from(c.window).unwrap_or(u16::MAX);
        if v3 && c.qos() == Qos::ExactlyOnce {
            // No Receive Maximum in 3.1.1: the broker's limit, as set (see
            // `MqttConfig::v3_qos2_inflight`).
            inflight = inflight.min(c.v3_qos2_inflight);
        }
        let connect_secs = whole_seconds_up(c.connect_timeout);
        let tls = if c.url.tls {
            Some(self.tls_config()?)
        } else {
            None
        };
        let state = Arc::new(LiveState::default());
        // No Nagle: a PUBLISH is a few bytes, and holding it back until the previous segment
        // is acknowledged stalls the pipeline (rumqttc leaves Nagle on by default).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(connect_secs);
        network.set_tcp_nodelay(true);
        let mut max_qos = None;
        let (client, max_packet, task) = if v3 {
            let mut o =
                rumqttc::MqttOptions::new(id, c.url.endpoint.host.clone(), c.url.endpoint.port);
            o.set_keep_alive(c.keep_alive)
                .set_clean_session(true)
                .set_inflight(inflight)
                .set_request_channel_capacity(REQUEST_CHANNEL)
                .set_max_packet_size(64 * 1024, c.max_packet_size as usize);
            if let Some((user, pass)) = c.url.credentials() {
                o.set_credentials(user, pass);
            }
            if let Some(tls) = tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls),
                ));
            }
            let (client, mut events) = rumqttc::AsyncClient::new(o, REQUEST_CHANNEL);
            events.set_network_options(network);
            // rumqttc starts its keep-alive timer as the CONNACK comes: after this.
            let opened = Instant::now();
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => break,
                    Ok(_) => {}
                    Err(e) => return Err(Failure::from_v3(&e).connect_error(&server, true)),
                }
            }
            let nudge = Nudge::new(events.mqtt_options.keep_alive(), opened);
            let task = tokio::spawn(drive_v3(
                events,
                nudge,
                state.clone(),
                self.flow.clone(),
                self.metrics.clone(),
                server.clone(),
            ));
            (Client::V3(client), c.max_packet_size, task)
        } else {
            let mut o = v5::MqttOptions::new(id, c.url.endpoint.host.clone(), c.url.endpoint.port);
            o.set_keep_alive(c.keep_alive)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(inflight)
                .set_request_channel_capacity(REQUEST_CHANNEL)
                .set_network_options(network);
            if let Some((user, pass)) = c.url.credentials() {
                o.set_credentials(user, pass);
            }
            if let Some(tls) = tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls),
                ));
            }
            let (client, mut events) = v5::AsyncClient::new(o, REQUEST_CHANNEL);
            // rumqttc starts its keep-alive timer as the CONNACK comes: after this.
            let opened = Instant::now();
            let connack = loop {
                match events.poll().await {
                    Ok(v5::Event::Incoming(v5::Incoming::ConnAck(ack))) => break ack,
                    Ok(_) => {}
                    Err(e) => return Err(Failure::from_v5(&e).connect_error(&server, false)),
                }
            };
            // The broker may set the keep-alive (Server Keep Alive): rumqttc then runs its timer
            // on the broker's, which it has put in its options.
            let nudge = Nudge::new(events.options.keep_alive(), opened);
            let broker_max = connack
                .properties
                .as_ref()
                .and_then(|p| p.max_packet_size)
                .unwrap_or(u32::MAX);
            max_qos = connack.properties.as_ref().and_then(|p| p.max_qos);
            let task = tokio::spawn(drive_v5(
                events,
                nudge,
                state.clone(),
                self.flow.clone(),
                self.metrics.clone(),
                server.clone(),
            ));
            (Client::V5(client), broker_max.min(c.max_packet_size), task)
        };
        Ok(Arc::new(Live {
            path: herald_core::Turns::fresh_path(),
            client,
            state,
            send: Mutex::new(()),
            max_packet,
            max_qos,
            qos: c.url.qos,
            version: c.version(),
            server,
            task,
            silence: herald_core::rotation::SilenceWatch::default(),
            flow: self.flow.clone(),
            metrics: self.metrics.clone(),
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
                // written by the event loop's task, which is given a moment for it.
                let _sent = match &live.client {
                    Client::V5(c) => c.try_disconnect().is_ok(),
                    Client::V3(c) => c.try_disconnect().is_ok(),
                };
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

/// Whether the connection's state gave it up while handling an event (a packet id reused while
/// awaited): then the task records the loss and ends, dropping the event loop and its socket.
fn given_up(state: &LiveState, flow: &Flow, metrics: &MqttMetrics) -> bool {
    if !state.lost.load(Ordering::Acquire) {
        return false;
    }
    let failure = state.failure().unwrap_or_else(|| {
        TransportError::transient("the connection was given up").with_code("CONNECTION_LOST")
    });
    lost(state, flow, metrics, failure);
    true
}

/// What an event of the event loop was, for [`Nudge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A publish written to the socket.
    Written,
    /// A broker's answer to a publish (PUBACK, PUBREC, PUBCOMP).
    Answer,
    /// A PINGREQ written to the socket: herald's, or rumqttc's keep-alive.
    PingSent,
    /// A PINGRESP.
    PingResp,
    Other,
}

/// The least time herald leaves between its own PINGREQ and rumqttc's next keep-alive one,
/// besides twice the longest its PINGREQs took to be answered.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_millis(50);

/// When a PINGREQ follows an event: brokers that keep Nagle's algorithm on (Mosquitto's
/// default) hold a small packet back while an earlier one of theirs is not acknowledged, and
/// the client's kernel delays that acknowledgement (up to 40 ms) when the client has no data
/// to send. A PINGREQ is data: it carries the acknowledgement at once.
///
/// So while answers are due and the client has nothing else to send (`quiet`: no PINGRESP
/// awaited, no packet id collision, nothing pending), a PINGREQ follows each answer (the
/// broker holds the next ones behind it), and a PINGRESP that comes after a publish was written
/// since the last PINGREQ: the broker sent that PINGRESP when the publish acknowledged its
/// last answer, and now holds the publish's answer behind it. (Measured with `strace` at 100
/// one-message batches a second before this: each PUBACK came with the client's next write,
/// 4-10 ms late.) A PINGRESP with nothing written since the PINGREQ follows nothing, so that a
/// slow broker is not pinged once per round trip while it works.
///
/// rumqttc sends its own PINGREQ every `keep_alive` whatever the traffic, and ends the
/// connection (`AwaitPingResp`) if its flag for an unanswered PINGREQ is still set then. It
/// sets that flag for herald's PINGREQs too, and clears it at any PINGRESP. So the driver sets
/// the flag itself after every event ([`Nudge::keep_alive_unanswered`]): set while one of
/// rumqttc's keep-alive PINGREQs is unanswered, counting PINGRESPs against PINGREQs in the
/// order they went out. herald's PINGREQs are not keep-alive probes (a hung broker is found
/// by the keep-alive, and by the silence watch while publishes wait), and a PINGRESP slower
/// than the time left to the keep-alive must not end a connection that answers. (Before, a
/// broker whose round trip was over a quarter of the keep-alive lost its connection at a
/// keep-alive under steady traffic: 5 s keep-alive, 3 s round trip, 2 connections and 16
/// retries in 12 s.) Nor may the PINGRESP of herald's PINGREQ count as the answer to a
/// keep-alive PINGREQ sent after it. One PINGREQ of herald's at a time, and none while a
/// keep-alive PINGREQ is unanswered ([`Nudge::awaiting`]).
///
/// herald also stays clear of rumqttc's keep-alive, so that its PINGRESP does not come after
/// the keep-alive PINGREQ. Its schedule is known: it starts when the connection opens and restarts
/// at each of its PINGREQs (the PINGREQs herald did not queue; seen once written, a little after
/// rumqttc restarted its timer, which the margin covers). herald pings only while the
/// next one is further away than twice the longest its own PINGREQs took to be answered on
/// this connection, plus [`KEEP_ALIVE_MARGIN`]; once that time comes, not again until the
/// keep-alive PINGREQ has gone out. (Without this, a steady trickle of sends lost its
/// connection at a keep-alive about every other time.)
#[derive(Debug)]
struct Nudge {
    /// A publish was written since the last PINGREQ.
    written: bool,
    keep_alive: Duration,
    /// When rumqttc's next keep-alive PINGREQ is due, at the earliest.
    next_keep_alive: Instant,
    /// herald's PINGREQs queued and not yet written.
    queued: u32,
    /// When herald's PINGREQ awaiting its PINGRESP was queued.
    since: Option<Instant>,
    /// The PINGREQs written and not yet answered, oldest first: `true` for herald's, `false`
    /// for rumqttc's keep-alive ones. (One written while herald's is queued is taken for
    /// herald's, and herald's then for the keep-alive's: the count, which is what matters,
    /// stays right, and the keep-alive's flag stays set until both are answered.)
    unanswered: VecDeque<bool>,
    /// The longest herald's PINGREQs took from queued to answered.
    longest: Duration,
}

impl Nudge {
    /// For a connection whose event loop started its keep-alive timer at `opened` or after, and
    /// before now. Until its own PINGREQs are answered, the guard takes the time the connection
    /// took to open as their round trip: more than one round trip, the safe side.
    fn new(keep_alive: Duration, opened: Instant) -> Self {
        Self {
            written: false,
            keep_alive,
            next_keep_alive: opened + keep_alive,
            queued: 0,
            since: None,
            unanswered: VecDeque::new(),
            longest: opened.elapsed(),
        }
    }

    /// Whether a PINGREQ follows an event of kind `seen`. `now` (a clock read) is asked only
    /// for the events that need the time, and `waiting` last, only when a ping is otherwise
    /// due (it takes the book's lock): neither once per written publish.
    fn ping(
        &mut self,
        seen: Seen,
        now: impl Fn() -> Instant,
        quiet: bool,
        waiting: impl FnOnce() -> bool,
    ) -> bool {
        let due = match seen {
            Seen::Written => {
                self.written = true;
                false
            }
            Seen::Answer => true,
            Seen::PingSent => {
                if self.queued > 0 {
                    self.queued -= 1;
                } else {
                    self.next_keep_alive = now() + self.keep_alive;
                }
                false
            }
            Seen::PingResp => {
                if let Some(since) = self.since.take() {
                    self.longest = self.longest.max(now().saturating_duration_since(since));
                }
                self.written
            }
            Seen::Other => false,
        };
        if !(due && quiet) {
            return false;
        }
        let now = now();
        let ping = !self.near_keep_alive(now) && waiting();
        if ping {
            self.written = false;
            self.queued += 1;
            self.since = Some(now);
        }
        ping
    }

    /// Counts a PINGREQ written or a PINGRESP received; before [`Nudge::ping`] sees it.
    fn track(&mut self, seen: Seen) {
        match seen {
            Seen::PingSent => self.unanswered.push_back(self.queued > 0),
            Seen::PingResp => {
                self.unanswered.pop_front();
            }
            _ => {}
        }
    }

    /// Whether one of rumqttc's keep-alive PINGREQs is unanswered: rumqttc's flag for that.
    fn keep_alive_unanswered(&self) -> bool {
        self.unanswered.contains(&false)
    }

    /// Whether one of herald's PINGREQs is queued or unanswered.
    fn awaiting(&self) -> bool {
        self.queued > 0 || self.unanswered.contains(&true)
    }

    /// rumqttc's keep-alive PINGREQ may come before a PINGREQ queued now is answered.
    fn near_keep_alive(&self, now: Instant) -> bool {
        let guard = (self.longest * 2 + KEEP_ALIVE_MARGIN).min(self.keep_alive / 4);
        now + guard >= self.next_keep_alive
    }
}

/// Drives an MQTT 5 event loop until its connection ends, following events with a PINGREQ as
/// [`Nudge`] says.
///
/// rumqttc reads every packet the socket holds at once and hands them out one poll at a time:
/// when the read that brought acknowledgements also found the connection closed (a broker that
/// answers and hangs up, as Mosquitto 2.0 does after refusing a publish), the poll fails with
/// those acknowledgements still queued in its state. They are read out before the connection
/// counts as lost, so that no acknowledged message is reported lost.
async fn drive_v5(
    mut events: v5::EventLoop,
    mut nudge: Nudge,
    state: Arc<LiveState>,
    flow: Arc<Flow>,
    metrics: MqttMetrics,
    server: String,
) {
    loop {
        // Looked at where it lies: an event is a few hundred bytes, and each move of one was a
        // call to `memcpy` (three an event when it was taken out and passed on by value).
        let polled = events.poll().await;
        match &polled {
            Ok(event) => {
                let seen = match event {
                    v5::Event::Outgoing(rumqttc::Outgoing::Publish(_)) => Seen::Written,
                    v5::Event::Incoming(
                        v5::Incoming::PubAck(_)
                        | v5::Incoming::PubRec(_)
                        | v5::Incoming::PubComp(_),
                    ) => Seen::Answer,
                    v5::Event::Outgoing(rumqttc::Outgoing::PingReq) => Seen::PingSent,
                    v5::Event::Incoming(v5::Incoming::PingResp(_)) => Seen::PingResp,
                    _ => Seen::Other,
                };
                on_v5(&state, &metrics, event);
                if given_up(&state, &flow, &metrics) {
                    return;
                }
                nudge.track(seen);
                events.state.await_pingresp = nudge.keep_alive_unanswered();
                let quiet = !events.state.await_pingresp
                    && !nudge.awaiting()
                    && events.state.collision.is_none()
                    && events.pending.is_empty();
                if nudge.ping(seen, Instant::now, quiet, || state.waiting()) {
                    events.pending.push_back(v5::Request::PingReq);
                }
            }
            Err(e) => {
                for event in events.state.events.drain(..) {
                    on_v5(&state, &metrics, &event);
                }
                let failure = Failure::from_v5(e).lost_error(&server);
                lost(&state, &flow, &metrics, failure);
                return;
            }
        }
    }
}

/// One event of an MQTT 5 event loop.
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

/// Drives an MQTT 3.1.1 event loop until its connection ends (acknowledgements still queued
/// when it fails are read out first, and PINGREQs follow events, as for MQTT 5).
async fn drive_v3(
    mut events: rumqttc::EventLoop,
    mut nudge: Nudge,
    state: Arc<LiveState>,
    flow: Arc<Flow>,
    metrics: MqttMetrics,
    server: String,
) {
    loop {
        // Looked at where it lies, as in `drive_v5`.
        let polled = events.poll().await;
        match &polled {
            Ok(event) => {
                let seen = match event {
                    rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_)) => Seen::Written,
                    rumqttc::Event::Incoming(
                        rumqttc::Incoming::PubAck(_)
                        | rumqttc::Incoming::PubRec(_)
                        | rumqttc::Incoming::PubComp(_),
                    ) => Seen::Answer,
                    rumqttc::Event::Outgoing(rumqttc::Outgoing::PingReq) => Seen::PingSent,
                    rumqttc::Event::Incoming(rumqttc::Incoming::PingResp) => Seen::PingResp,
                    _ => Seen::Other,
                };
                on_v3(&state, event);
                if given_up(&state, &flow, &metrics) {
                    return;
                }
                nudge.track(seen);
                events.state.await_pingresp = nudge.keep_alive_unanswered();
                let quiet = !events.state.await_pingresp
                    && !nudge.awaiting()
                    && events.state.collision.is_none()
                    && events.pending.is_empty();
                if nudge.ping(seen, Instant::now, quiet, || state.waiting()) {
                    events
                        .pending
                        .push_back(rumqttc::Request::PingReq(rumqttc::PingReq));
                }
            }
            Err(e) => {
                for event in events.state.events.drain(..) {
                    on_v3(&state, &event);
                }
                let failure = Failure::from_v3(e).lost_error(&server);
                lost(&state, &flow, &metrics, failure);
                return;
            }
        }
    }
}

/// One event of an MQTT 3.1.1 event loop.
pub(crate) fn on_v3(state: &LiveState, event: &rumqttc::Event) {
    use rumqttc::{Event, Incoming, Outgoing};
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => state.written(*pkid),
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => state.collided(*pkid),
        // MQTT 3.1.1 acknowledgements carry no reason: they are all successes.
        Event::Incoming(Incoming::PubAck(ack)) => state.answer(ack.pkid, Answer::Acked),
        Event::Incoming(Incoming::PubComp(comp)) => state.answer(comp.pkid, Answer::Acked),
        _ => {}
    }
}

/// The answer of a final acknowledgement with reason `code` (`info`: its failure, if it is
/// one), counted.
fn settle(code: u8, info: Option<CodeInfo>, packet: &'static str, m: &MqttMetrics) -> Answer {
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

    /// A connection herald ends itself (a publish cut off half-way) has its task stopped,
    /// which would have told the transport of a loss: the transport said "connected" (health
    /// and the gauge) until the next send, and the connection was counted nowhere.
    #[tokio::test]
    async fn a_connection_given_up_by_herald_is_down_and_counted() {
        use metrics_util::debugging::DebuggingRecorder;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let metrics = metrics::with_local_recorder(&recorder, || MqttMetrics::new(None));
        let flow = Arc::new(Flow::default());
        flow.connected.store(true, Ordering::Release);
        metrics.connected.set(1.0);
        let options = v5::MqttOptions::new("herald-test", "127.0.0.1", 1);
        let (client, _events) = v5::AsyncClient::new(options, 1);
        let state = Arc::new(LiveState::default());
        state.current.store(true, Ordering::Release);
        let live = Live {
            path: herald_core::Turns::fresh_path(),
            client: Client::V5(client),
            state: state.clone(),
            send: Mutex::new(()),
            max_packet: 1 << 20,
            max_qos: None,
            qos: Qos::AtLeastOnce,
            version: Version::V5,
            server: "127.0.0.1:1".into(),
            task: tokio::spawn(std::future::pending()),
            silence: herald_core::rotation::SilenceWatch::default(),
            flow: flow.clone(),
            metrics,
        };
        live.give_up();
        live.give_up(); // once is counted
        assert!(!live.is_connected());
        assert!(
            !flow.connected.load(Ordering::Acquire),
            "the transport is down"
        );
        let snap = snapshotter.snapshot().into_vec();
        let value = |name: &str| {
            snap.iter()
                .find(|(k, ..)| k.key().name() == name)
                .map(|(.., v)| match v {
                    metrics_util::debugging::DebugValue::Counter(c) => *c as f64,
                    metrics_util::debugging::DebugValue::Gauge(g) => g.into_inner(),
                    _ => f64::NAN,
                })
        };
        assert_eq!(value(crate::metrics::CONNECTED), Some(0.0));
        assert_eq!(value(crate::metrics::ABANDONED), Some(1.0));
    }

    #[test]
    fn the_connect_timeout_is_rounded_up_to_whole_seconds() {
        use std::time::Duration;
        assert_eq!(whole_seconds_up(Duration::from_millis(1900)), 2);
        assert_eq!(whole_seconds_up(Duration::from_secs(10)), 10);
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::ZERO), 1);
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

    #[test]
    fn a_pingreq_follows_answers_and_a_pingresp_that_holds_a_new_publish_back() {
        let (waiting, quiet) = (true, true);
        let t = Instant::now();
        let mut n = Nudge::new(Duration::from_secs(30), t);
        let mut ping = |seen, quiet, waiting: &dyn Fn() -> bool| n.ping(seen, || t, quiet, waiting);
        // An answer while others are due: ping (the broker holds the next ones).
        assert!(ping(Seen::Answer, quiet, &|| waiting));
        assert!(!ping(Seen::PingSent, quiet, &|| waiting));
        // Its PINGRESP with nothing written since: no ping (no ping per round trip).
        assert!(!ping(Seen::PingResp, quiet, &|| waiting));
        // A publish written, then a PINGRESP: the publish's answer is held behind it: ping.
        assert!(!ping(Seen::Written, quiet, &|| waiting));
        assert!(ping(Seen::PingResp, quiet, &|| waiting));
        // ... once: the next PINGRESP follows nothing new.
        assert!(!ping(Seen::PingResp, quiet, &|| waiting));
        // Nothing due, or the client has something to send, or a PINGRESP is awaited: no ping,
        // and a write stays remembered until one goes out.
        assert!(!ping(Seen::Answer, quiet, &|| false));
        assert!(!ping(Seen::Answer, false, &|| waiting));
        assert!(!ping(Seen::Written, quiet, &|| waiting));
        assert!(!ping(Seen::PingResp, quiet, &|| false));
        assert!(!ping(Seen::PingResp, false, &|| waiting));
        assert!(ping(Seen::PingResp, quiet, &|| waiting));
        assert!(!ping(Seen::Other, quiet, &|| waiting));
        // The book's lock (`waiting`) is taken only when a ping is otherwise due.
        let untouched = || -> bool { unreachable!("waiting asked though no ping was due") };
        assert!(!ping(Seen::Written, quiet, &untouched));
        assert!(!ping(Seen::Other, quiet, &untouched));
        assert!(!ping(Seen::Answer, false, &untouched));
        // Nor the clock, for a written publish or an answer when no ping can follow.
        let no_clock = || -> Instant { unreachable!("the clock read for nothing") };
        assert!(!n.ping(Seen::Written, no_clock, quiet, || waiting));
        assert!(!n.ping(Seen::Other, no_clock, quiet, || waiting));
        assert!(!n.ping(Seen::Answer, no_clock, false, || waiting));
    }

    #[test]
    fn no_pingreq_of_herald_s_own_near_the_keep_alive() {
        let ms = Duration::from_millis;
        let opened = Instant::now();
        let mut n = Nudge::new(Duration::from_secs(5), opened);
        let yes = || true;
        // Well before the keep-alive: a ping, answered 20 ms after it was queued.
        assert!(n.ping(Seen::Answer, || opened + ms(1000), true, yes));
        assert!(!n.ping(Seen::PingSent, || opened + ms(1001), true, yes));
        assert!(!n.ping(Seen::PingResp, || opened + ms(1020), true, yes));
        assert_eq!(n.longest, ms(20));
        // The keep-alive is due at 5 s; the guard is 2 × 20 ms + 50 ms = 90 ms.
        assert!(n.ping(Seen::Answer, || opened + ms(4909), true, yes));
        assert!(!n.ping(Seen::PingSent, || opened + ms(4909), true, yes));
        assert!(!n.ping(Seen::PingResp, || opened + ms(4910), true, yes));
        assert!(
            !n.ping(Seen::Answer, || opened + ms(4913), true, yes),
            "within the guard"
        );
        // Past its time and not yet seen: still none ...
        assert!(!n.ping(Seen::Answer, || opened + ms(5100), true, yes));
        // ... until rumqttc's own PINGREQ goes out (one herald did not queue); its PINGRESP
        // is awaited (not quiet), then pings go on, the next keep-alive 5 s after it.
        assert!(!n.ping(Seen::PingSent, || opened + ms(5200), false, yes));
        assert!(!n.ping(Seen::PingResp, || opened + ms(5201), true, yes));
        assert!(n.ping(Seen::Answer, || opened + ms(5202), true, yes));
        assert!(!n.ping(Seen::PingSent, || opened + ms(5202), true, yes));
        assert!(!n.ping(Seen::PingResp, || opened + ms(5203), true, yes));
        assert!(n.ping(Seen::Answer, || opened + ms(10_109), true, yes));
        assert!(!n.ping(Seen::PingSent, || opened + ms(10_109), true, yes));
        assert!(!n.ping(Seen::PingResp, || opened + ms(10_110), true, yes));
        assert!(!n.ping(Seen::Answer, || opened + ms(10_113), true, yes));
        // rumqttc's flag is set only while a keep-alive PINGREQ is unanswered, PINGRESPs
        // counted against PINGREQs in order.
        let seen = |n: &mut Nudge, seen, at, quiet| {
            n.track(seen);
            n.ping(seen, || opened + ms(at), quiet, yes)
        };
        assert!(
            !seen(&mut n, Seen::PingSent, 10_200, false),
            "rumqttc's keep-alive"
        );
        assert!(n.keep_alive_unanswered() && !n.awaiting());
        assert!(!seen(&mut n, Seen::PingResp, 10_201, true));
        assert!(!n.keep_alive_unanswered());
        // herald's PINGREQ, then a keep-alive one before its PINGRESP: that PINGRESP does not
        // answer the keep-alive's.
        assert!(seen(&mut n, Seen::Answer, 11_000, true));
        assert!(n.awaiting() && !n.keep_alive_unanswered(), "queued");
        assert!(!seen(&mut n, Seen::PingSent, 11_001, true));
        assert!(
            n.awaiting() && !n.keep_alive_unanswered(),
            "written: not a keep-alive probe"
        );
        assert!(!seen(&mut n, Seen::PingSent, 15_200, false));
        assert!(n.keep_alive_unanswered());
        assert!(!seen(&mut n, Seen::PingResp, 15_300, false));
        assert!(
            !n.awaiting() && n.keep_alive_unanswered(),
            "herald's PINGRESP came first"
        );
        assert!(!seen(&mut n, Seen::PingResp, 15_301, true));
        assert!(!n.keep_alive_unanswered());
        // The keep-alive written while herald's PINGREQ is queued: counted all the same.
        assert!(seen(&mut n, Seen::Answer, 16_000, true));
        assert!(!seen(&mut n, Seen::PingSent, 16_001, true));
        assert!(!seen(&mut n, Seen::PingSent, 16_002, false));
        assert!(n.keep_alive_unanswered() && n.awaiting());
        assert!(!seen(&mut n, Seen::PingResp, 16_003, false));
        assert!(n.keep_alive_unanswered(), "one of two answered");
        assert!(!seen(&mut n, Seen::PingResp, 16_004, true));
        assert!(!n.keep_alive_unanswered() && !n.awaiting());
        // A slow broker widens the guard, up to a quarter of the keep-alive.
        n.longest = Duration::from_secs(10);
        assert!(n.near_keep_alive(opened + ms(19_752)));
        assert!(!n.near_keep_alive(opened + ms(19_751)));
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
