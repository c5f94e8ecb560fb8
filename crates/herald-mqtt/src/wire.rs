//! herald's own MQTT session on the socket, for MQTT 5 and 3.1.1: the CONNECT handshake, the
//! PUBLISHes a batch hands over, written with as few writes as the socket allows, and the
//! answers read back, matched to their messages by packet id.
//!
//! Why not rumqttc's event loop (herald used it until 2026-12): it writes and flushes every
//! publish on its own (a system call a message), takes a PINGREQ of herald's only after
//! sleeping a whole millisecond of Tokio's timer while publishes wait behind it, cannot read a
//! PUBACK whose reason it does not know (Mosquitto's 0x95 Packet too large ended the
//! connection), and kept the packet id of a QoS 2 publish refused in its PUBREC. Measured on a
//! Mosquitto here (one connection, QoS 1, 100 B, alternating with raw rumqttc): herald on
//! rumqttc's event loop 0.74-0.87 × raw, on this session 0.96-1.05 ×; at a steady 5 000 msgs/s
//! a p50 of 0.16-0.19 ms against 1.4-1.6 ms before (docs/benchmarks.md, MQTT). rumqttc's codec
//! (`mqttbytes`) stays: the CONNECT and CONNACK, whose properties are many, are its; the
//! packets of the hot path (PUBLISH, PUBREL, PINGREQ and the acknowledgements) are a few bytes
//! each and written and read here, where no allocation is needed.
//!
//! Writes: publishers append their packets to the connection's outbox ([`Wire::publish`]) and
//! wake the writer ([`Wire::flush`]) when they are done or must wait; the writer takes
//! everything the outbox holds and writes it at once. Reads: every whole packet a read brought
//! is handled before the next read, and before a failed read ends the connection (a broker that
//! answers and hangs up is believed for what it answered).
//!
//! PINGREQs: the keep-alive one when nothing was written for `keep_alive`, and one after
//! answers while publishes wait and nothing else is to be written (brokers that leave Nagle's
//! algorithm on, as Mosquitto does by default, hold their next small packet until the client's
//! delayed TCP acknowledgement, up to 40 ms; a PINGREQ carries that acknowledgement at once).
//! A few PINGREQs out at most; one unanswered for a whole `keep_alive` ends the connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use rumqttc::v5::mqttbytes as v5bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::connection::{settle, Answer, LiveState, Slot};
use crate::error::{ack_code, comp_code, v3_connect_code, v5_connect_code, Failure};
use crate::metrics::MqttMetrics;

/// A connection's byte stream: TCP, or TLS over TCP.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// The largest packet herald reads from a broker: a producer is sent acknowledgements (a few
/// bytes, with a reason string at most) and, once connected, nothing else it asked for.
const MAX_INCOMING: usize = 64 * 1024;

/// How long the answers already received are still read after a write failed.
const DRAIN: Duration = Duration::from_millis(500);

// The packet types herald reads or writes (the fixed header's high four bits).
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBCOMP: u8 = 7;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// The MQTT 5 property identifier of a user property.
const USER_PROPERTY: u8 = 0x26;

/// How many bytes `n` takes as an MQTT variable byte integer.
fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

/// The size of a PUBLISH packet (QoS 1 or 2) in bytes, header included: what
/// [`put_publish`] writes.
pub(crate) fn publish_size(
    v5: bool,
    topic: usize,
    properties: &[(String, String)],
    payload: usize,
) -> usize {
    let remaining = publish_remaining(v5, topic, properties_len(properties), payload);
    1 + varint_len(remaining) + remaining
}

/// The bytes of a PUBLISH's user properties (without their length prefix).
fn properties_len(properties: &[(String, String)]) -> usize {
    properties
        .iter()
        .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
        .sum()
}

/// A PUBLISH's remaining length, with `props` bytes of properties (MQTT 5 only).
fn publish_remaining(v5: bool, topic: usize, props: usize, payload: usize) -> usize {
    let mut n = 2 + topic + 2 + payload;
    if v5 {
        n += varint_len(props) + props;
    }
    n
}

/// Appends one PUBLISH (QoS 1 or 2, not retained, not a duplicate) to `buf`. The caller has
/// checked that every length fits MQTT's limits (`crate::publish`: the topic, each property
/// and the packet's size).
pub(crate) fn put_publish(
    buf: &mut BytesMut,
    v5: bool,
    qos: u8,
    pkid: u16,
    topic: &[u8],
    properties: &[(String, String)],
    payload: &[u8],
) {
    let props = properties_len(properties);
    let remaining = publish_remaining(v5, topic.len(), props, payload.len());
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8((PUBLISH << 4) | (qos << 1));
    put_varint(buf, remaining);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    buf.put_u16(pkid);
    if v5 {
        put_varint(buf, props);
        for (k, v) in properties {
            buf.put_u8(USER_PROPERTY);
            buf.put_u16(k.len() as u16);
            buf.put_slice(k.as_bytes());
            buf.put_u16(v.len() as u16);
            buf.put_slice(v.as_bytes());
        }
    }
    buf.put_slice(payload);
}

/// Appends a PUBREL for `pkid` (reason Success, which both versions write as the id alone).
fn put_pubrel(buf: &mut BytesMut, pkid: u16) {
    buf.put_slice(&[0x62, 2]);
    buf.put_u16(pkid);
}

fn put_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0]);
}

/// A DISCONNECT with reason Normal disconnection (MQTT 5 leaves the reason out then).
fn put_disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[0xE0, 0]);
}

/// A packet the broker sent, as far as herald cares.
#[derive(Debug, PartialEq, Eq)]
enum Incoming {
    /// PUBACK, PUBREC or PUBCOMP (`kind`) for `pkid`, with its reason code (0 in MQTT 3.1.1,
    /// and where MQTT 5 leaves it out).
    Ack {
        kind: u8,
        pkid: u16,
        reason: u8,
    },
    PingResp,
    /// MQTT 5 DISCONNECT: its reason code and reason string.
    Disconnect(u8, Option<String>),
    /// Anything else (a PUBLISH herald did not subscribe to, an AUTH): skipped.
    Other,
}

/// The fixed header at the start of `buf`: (its length, the remaining length), or `None`
/// while incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, Failure> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(Failure::Protocol(
        "the broker sent a packet with a malformed length".into(),
    ))
}

/// Takes the next whole packet off `buf`: `None` until one is there.
fn next_packet(buf: &mut BytesMut, v5: bool) -> Result<Option<Incoming>, Failure> {
    let Some((header, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    if remaining > MAX_INCOMING {
        return Err(Failure::Protocol(format!(
            "the broker sent a packet of {remaining} bytes, more than a producer is ever sent ({MAX_INCOMING})"
        )));
    }
    if buf.len() < header + remaining {
        return Ok(None);
    }
    let kind = buf[0] >> 4;
    let body = &buf[header..header + remaining];
    let packet = match kind {
        PUBACK | PUBREC | PUBCOMP => {
            if remaining < 2 {
                return Err(Failure::Protocol(format!(
                    "the broker sent a {} without a packet id",
                    ack_name(kind)
                )));
            }
            Incoming::Ack {
                kind,
                pkid: u16::from_be_bytes([body[0], body[1]]),
                // MQTT 5 leaves the reason out when it is 0 and there are no properties.
                reason: if v5 && remaining > 2 { body[2] } else { 0 },
            }
        }
        PINGRESP => Incoming::PingResp,
        DISCONNECT if v5 => {
            let reason = body.first().copied().unwrap_or(0);
            let mut whole = BytesMut::from(&buf[..header + remaining]);
            let text = match v5bytes::v5::Packet::read(&mut whole, None) {
                Ok(v5bytes::v5::Packet::Disconnect(d)) => {
                    d.properties.and_then(|p| p.reason_string)
                }
                _ => None,
            };
            Incoming::Disconnect(reason, text)
        }
        _ => Incoming::Other,
    };
    buf.advance(header + remaining);
    Ok(Some(packet))
}

fn ack_name(kind: u8) -> &'static str {
    match kind {
        PUBACK => "PUBACK",
        PUBREC => "PUBREC",
        _ => "PUBCOMP",
    }
}

/// What the CONNACK said, and what the broker sent after it.
pub(crate) struct Handshake {
    /// What was read past the CONNACK.
    pub(crate) read: BytesMut,
    /// The broker's Server Keep Alive (MQTT 5), if it set one.
    pub(crate) keep_alive: Option<Duration>,
    /// The broker's Maximum Packet Size (MQTT 5).
    pub(crate) max_packet: Option<u32>,
    /// The broker's Maximum QoS (MQTT 5).
    pub(crate) max_qos: Option<u8>,
    /// The broker's Receive Maximum (MQTT 5): publishes it takes unacknowledged.
    pub(crate) receive_max: Option<u16>,
}

/// What CONNECT says.
pub(crate) struct Connect<'a> {
    pub(crate) v5: bool,
    pub(crate) client_id: &'a str,
    pub(crate) keep_alive: Duration,
    pub(crate) credentials: Option<(String, String)>,
}

/// Sends CONNECT (a clean session: MQTT 5 Clean Start with no session expiry, 3.1.1 Clean
/// Session) and reads the CONNACK.
pub(crate) async fn handshake(
    socket: &mut (impl Socket + ?Sized),
    connect: Connect<'_>,
) -> Result<Handshake, Failure> {
    let keep_alive = u16::try_from(connect.keep_alive.as_secs()).unwrap_or(u16::MAX);
    let mut out = BytesMut::new();
    let written = if connect.v5 {
        let login = connect
            .credentials
            .map(|(u, p)| v5bytes::v5::Login::new(u, p));
        v5bytes::v5::Packet::Connect(
            v5bytes::v5::Connect {
                keep_alive,
                client_id: connect.client_id.to_owned(),
                clean_start: true,
                // The most herald reads: the broker leaves reason strings and user properties
                // out of a packet that would be larger.
                properties: Some(v5bytes::v5::ConnectProperties {
                    max_packet_size: Some(MAX_INCOMING as u32),
                    ..v5bytes::v5::ConnectProperties::new()
                }),
            },
            None,
            login,
        )
        .write(&mut out, None)
        .map(|_| ())
        .map_err(|e| e.to_string())
    } else {
        let mut c = rumqttc::mqttbytes::v4::Connect::new(connect.client_id);
        c.keep_alive = keep_alive;
        c.clean_session = true;
        c.login = connect
            .credentials
            .map(|(u, p)| rumqttc::mqttbytes::v4::Login::new(u, p));
        c.write(&mut out).map(|_| ()).map_err(|e| e.to_string())
    };
    written.map_err(|e| Failure::Protocol(format!("writing CONNECT: {e}")))?;
    socket.write_all(&out).await.map_err(|e| io(&e))?;
    socket.flush().await.map_err(|e| io(&e))?;
    let mut read = BytesMut::with_capacity(4096);
    loop {
        if connect.v5 {
            match v5bytes::v5::Packet::read(&mut read, Some(MAX_INCOMING as u32)) {
                Ok(v5bytes::v5::Packet::ConnAck(ack)) => {
                    let code = v5_connect_code(ack.code);
                    if code != 0 {
                        return Err(Failure::Refused(code));
                    }
                    let p = ack.properties.as_ref();
                    return Ok(Handshake {
                        read,
                        keep_alive: p
                            .and_then(|p| p.server_keep_alive)
                            .map(|s| Duration::from_secs(s.into())),
                        max_packet: p.and_then(|p| p.max_packet_size),
                        max_qos: p.and_then(|p| p.max_qos),
                        receive_max: p.and_then(|p| p.receive_max),
                    });
                }
                Ok(other) => return Err(unexpected(&format!("{other:?}"))),
                Err(v5bytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(Failure::Protocol(format!("reading CONNACK: {e}"))),
            }
        } else {
            match rumqttc::mqttbytes::v4::Packet::read(&mut read, MAX_INCOMING) {
                Ok(rumqttc::mqttbytes::v4::Packet::ConnAck(ack)) => {
                    let code = v3_connect_code(ack.code);
                    if code != 0 {
                        return Err(Failure::Refused(code));
                    }
                    return Ok(Handshake {
                        read,
                        keep_alive: None,
                        max_packet: None,
                        max_qos: None,
                        receive_max: None,
                    });
                }
                Ok(other) => return Err(unexpected(&format!("{other:?}"))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(Failure::Protocol(format!("reading CONNACK: {e}"))),
            }
        }
        match socket.read_buf(&mut read).await {
            Ok(0) => {
                return Err(Failure::Io(
                    "closed by the broker before its CONNACK".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::from_read(&e)),
        }
    }
}

fn unexpected(what: &str) -> Failure {
    let what: String = what.chars().take(80).collect();
    Failure::Protocol(format!("the broker answered CONNECT with {what}"))
}

fn io(e: &std::io::Error) -> Failure {
    Failure::Io(e.to_string())
}

/// What publishers hand to the writer.
#[derive(Debug, Default)]
struct Outbox {
    /// Packets to write, in order.
    buf: BytesMut,
    /// When the write of each PINGREQ not yet answered started, oldest first.
    pings: VecDeque<Instant>,
    /// PINGREQs queued and not yet written.
    unwritten_pings: usize,
    /// A publish was queued since the last PINGREQ.
    published: bool,
    /// A DISCONNECT is queued: the writer ends after writing it.
    closing: bool,
}

/// One message to publish.
pub(crate) struct Publish<'a> {
    pub(crate) topic: &'a [u8],
    pub(crate) properties: &'a [(String, String)],
    pub(crate) payload: &'a [u8],
}

/// What became of a publish handed to [`Wire::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Queued, its answer to come to its slot.
    Yes,
    /// Not queued: the connection is over.
    Over,
    /// Not queued: the attempt's deadline passed while it waited for room.
    TooLate,
}

/// One connection's session: its outbox, and the room the broker leaves for publishes.
pub(crate) struct Wire {
    out: StdMutex<Outbox>,
    /// Wakes the writer.
    wake: Notify,
    /// Publishes the broker takes unacknowledged (its Receive Maximum, herald's window): a
    /// permit per publish out, given back with its answer; closed when the connection ends.
    room: Semaphore,
    v5: bool,
    /// 1 or 2.
    qos: u8,
}

impl Wire {
    pub(crate) fn new(v5: bool, qos: u8, room: usize) -> Self {
        Self {
            out: StdMutex::new(Outbox::default()),
            wake: Notify::new(),
            room: Semaphore::new(room.max(1)),
            v5,
            qos,
        }
    }

    fn out(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the writer for what the outbox holds.
    pub(crate) fn flush(&self) {
        self.wake.notify_one();
    }

    /// Queues one PUBLISH, its answer to go to `slot`, once the broker has room for it
    /// (flushing what is queued while it waits) and if `until` has not passed by then. Not
    /// written until [`Wire::flush`] (or a wait for room). Cancel-safe: nothing is queued
    /// until the room is there, and then nothing waits.
    pub(crate) async fn publish(
        &self,
        state: &LiveState,
        slot: Slot,
        message: Publish<'_>,
        until: Option<std::time::Instant>,
    ) -> Queued {
        let permit = match self.room.try_acquire() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Queued::Over,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.flush();
                match self.room.acquire().await {
                    Ok(p) => p,
                    Err(_) => return Queued::Over,
                }
            }
        };
        // The wait for room may have taken the attempt's deadline.
        if herald_core::deadline_passed(until) {
            return Queued::TooLate;
        }
        let mut out = self.out();
        // Nothing after a DISCONNECT.
        if out.closing {
            return Queued::Over;
        }
        let Some(pkid) = state.insert(slot) else {
            return Queued::Over;
        };
        // Given back with the answer (`Wire::answered`).
        permit.forget();
        put_publish(
            &mut out.buf,
            self.v5,
            self.qos,
            pkid,
            message.topic,
            message.properties,
            message.payload,
        );
        out.published = true;
        Queued::Yes
    }

    /// Queues a DISCONNECT: the writer writes it with what is queued before, and ends.
    pub(crate) fn disconnect(&self) {
        let mut out = self.out();
        put_disconnect(&mut out.buf);
        out.closing = true;
        drop(out);
        self.flush();
    }

    /// The connection is over: publishers waiting for room give up.
    pub(crate) fn close(&self) {
        self.room.close();
    }

    /// `n` publishes have their final answers: their room is free again.
    fn answered(&self, n: usize) {
        if n > 0 {
            self.room.add_permits(n);
        }
    }
}

/// Runs a connection until it ends: the reader and the writer side by side. `None`: closed by
/// herald (a DISCONNECT written).
pub(crate) async fn run(
    socket: Box<dyn Socket>,
    read: BytesMut,
    wire: Arc<Wire>,
    state: Arc<LiveState>,
    metrics: MqttMetrics,
    keep_alive: Duration,
) -> Option<Failure> {
    let (reader, writer) = tokio::io::split(socket);
    let reading = read_loop(reader, read, &wire, &state, &metrics);
    tokio::pin!(reading);
    let ended = tokio::select! {
        failure = &mut reading => Some(failure),
        ended = write_loop(writer, &wire, keep_alive) => {
            if let Some(Failure::Io(_)) = &ended {
                // A write failed (a broker that answered and hung up, say): what it answered
                // before is still read, for a moment, rather than retried as lost.
                let _drained = tokio::time::timeout(DRAIN, &mut reading).await;
            }
            ended
        }
    };
    wire.close();
    ended
}

async fn read_loop(
    mut reader: impl AsyncRead + Unpin,
    mut buf: BytesMut,
    wire: &Wire,
    state: &LiveState,
    metrics: &MqttMetrics,
) -> Failure {
    loop {
        // Every whole packet the reads brought, before the next read (and before a failed
        // read ends the connection).
        let (mut answered, mut freed, mut pongs) = (false, 0, 0);
        loop {
            match next_packet(&mut buf, wire.v5) {
                Ok(None) => break,
                Ok(Some(Incoming::Ack { kind, pkid, reason })) => {
                    let (final_answer, frees) = on_ack(wire, state, metrics, kind, pkid, reason);
                    answered |= final_answer;
                    freed += usize::from(frees);
                }
                Ok(Some(Incoming::PingResp)) => pongs += 1,
                Ok(Some(Incoming::Disconnect(reason, text))) => {
                    return Failure::Disconnected(reason, text)
                }
                Ok(Some(Incoming::Other)) => {}
                Err(failure) => return failure,
            }
        }
        // The room the answers freed, at once: a waiting batch then writes that many
        // publishes together.
        wire.answered(freed);
        if answered || pongs > 0 {
            nudge(wire, state, answered, pongs);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => return Failure::Io("closed by the broker".into()),
            Ok(_) => {}
            Err(e) => return Failure::from_read(&e),
        }
    }
}

/// One acknowledgement: whether it answered a publish for good (PUBACK, PUBCOMP, a refusing
/// PUBREC), and whether that freed room (the publish awaited it). A PUBREC that accepts is
/// answered with PUBREL.
fn on_ack(
    wire: &Wire,
    state: &LiveState,
    metrics: &MqttMetrics,
    kind: u8,
    pkid: u16,
    reason: u8,
) -> (bool, bool) {
    let answer = match kind {
        PUBREC => match ack_code(reason) {
            Some(info) => {
                metrics.refused.increment(1);
                Answer::Refused(info, "PUBREC")
            }
            None => {
                if reason == 0x10 {
                    metrics.no_subscribers.increment(1);
                }
                put_pubrel(&mut wire.out().buf, pkid);
                wire.flush();
                return (false, false);
            }
        },
        PUBACK => settle(reason, ack_code(reason), "PUBACK", metrics),
        _ => settle(reason, comp_code(reason), "PUBCOMP", metrics),
    };
    (true, state.answer(pkid, answer))
}

/// PINGREQs of herald's own out at once, at most. One: with up to four (so that a PINGRESP the
/// broker holds back too would not stop the next PINGREQ), a run against Mosquitto went at
/// 4-6 k msgs/s instead of 50-60 k.
const MAX_PINGS_OUT: usize = 1;

/// A PINGREQ after answers, or after a PINGRESP that came once a publish was queued since the
/// last PINGREQ (the broker sent it before that publish's answer, which it now holds behind
/// it), while publishes wait for their answers and nothing else is queued: see the module's
/// documentation. Also while a batch waits for room to publish more: without those PINGREQs,
/// Mosquitto's default configuration held its answers back (41-44 k against 58-61 k msgs/s).
fn nudge(wire: &Wire, state: &LiveState, answered: bool, pongs: usize) {
    let mut out = wire.out();
    for _ in 0..pongs {
        out.pings.pop_front();
    }
    let due = answered || (pongs > 0 && out.published);
    let quiet = out.buf.is_empty() && !out.closing;
    let out_now = out.pings.len() + out.unwritten_pings;
    if due && quiet && out_now < MAX_PINGS_OUT && state.waiting() {
        put_pingreq(&mut out.buf);
        out.unwritten_pings += 1;
        out.published = false;
        drop(out);
        wire.flush();
    }
}

/// Writes what the outbox holds, whenever woken, and the keep-alive PINGREQ when nothing was
/// written for `keep_alive`. Ends with the failure of a write, or a PINGREQ unanswered for
/// `keep_alive` after its write started (looked at while a write is blocked too); `None` once
/// a DISCONNECT is written.
async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    wire: &Wire,
    keep_alive: Duration,
) -> Option<Failure> {
    let mut last_write = Instant::now();
    // Far enough to stand for "no deadline" in a timer.
    let never = || Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        let now = Instant::now();
        let (bytes, closing, ping_due) = {
            let mut out = wire.out();
            let ping_due = out.pings.front().map(|&since| since + keep_alive);
            if !keep_alive.is_zero() {
                if ping_due.is_some_and(|due| now >= due) {
                    return Some(Failure::PingTimeout);
                }
                let quiet = out.buf.is_empty() && out.pings.is_empty() && out.unwritten_pings == 0;
                if quiet && now >= last_write + keep_alive {
                    put_pingreq(&mut out.buf);
                    out.unwritten_pings += 1;
                }
            }
            // The PINGREQs in this write count from now, when their write starts: before any
            // PINGRESP can come for them (counted later, a PINGRESP read first would leave one
            // counted as unanswered for good).
            for _ in 0..std::mem::take(&mut out.unwritten_pings) {
                out.pings.push_back(now);
            }
            let ping_due = ping_due.or_else(|| out.pings.front().map(|&since| since + keep_alive));
            (out.buf.split(), out.closing, ping_due)
        };
        let ping_due = ping_due
            .filter(|_| !keep_alive.is_zero())
            .unwrap_or_else(never);
        if bytes.is_empty() {
            let idle_due = if keep_alive.is_zero() {
                never()
            } else {
                last_write + keep_alive
            };
            tokio::select! {
                () = wire.wake.notified() => {}
                () = tokio::time::sleep_until(idle_due.min(ping_due)) => {}
            }
            continue;
        }
        let written = async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        };
        tokio::select! {
            result = written => {
                if let Err(e) = result {
                    return Some(io(&e));
                }
            }
            // A write that blocks (a hung broker, a full window) does not hide an unanswered
            // PINGREQ.
            () = tokio::time::sleep_until(ping_due) => return Some(Failure::PingTimeout),
        }
        last_write = Instant::now();
        if closing {
            let _closed = writer.shutdown().await;
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn props() -> Vec<(String, String)> {
        vec![
            ("herald-key".into(), "k-7".into()),
            (
                "herald-id".into(),
                "0192d7a4-5b6c-7def-8012-000000000001".into(),
            ),
        ]
    }

    /// What herald writes, read back by rumqttc's codec: the same packet, field for field.
    #[test]
    fn publishes_read_back_by_rumqttc_s_codec() {
        for payload_len in [0usize, 5, 200, 20_000] {
            let payload = vec![b'x'; payload_len];
            let mut buf = BytesMut::new();
            put_publish(&mut buf, true, 1, 7, b"plant/line-3", &props(), &payload);
            assert_eq!(buf.len(), publish_size(true, 12, &props(), payload_len));
            match v5bytes::v5::Packet::read(&mut buf, None).expect("v5") {
                v5bytes::v5::Packet::Publish(p) => {
                    assert_eq!(p.qos, v5bytes::QoS::AtLeastOnce);
                    assert_eq!(p.pkid, 7);
                    assert_eq!(&p.topic[..], b"plant/line-3");
                    assert_eq!(p.payload, Bytes::from(payload.clone()));
                    assert_eq!(p.properties.expect("properties").user_properties, props());
                }
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
            let mut buf = BytesMut::new();
            put_publish(&mut buf, false, 2, 65_535, b"t", &[], &payload);
            assert_eq!(buf.len(), publish_size(false, 1, &[], payload_len));
            match rumqttc::mqttbytes::v4::Packet::read(&mut buf, 1 << 20).expect("v4") {
                rumqttc::mqttbytes::v4::Packet::Publish(p) => {
                    assert_eq!(p.qos, rumqttc::QoS::ExactlyOnce);
                    assert_eq!(p.pkid, 65_535);
                    assert_eq!(p.topic, "t");
                    assert_eq!(p.payload, Bytes::from(payload));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn variable_byte_integers_at_their_boundaries() {
        for n in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut buf = BytesMut::new();
            buf.put_u8(0x40);
            put_varint(&mut buf, n);
            assert_eq!(buf.len() - 1, varint_len(n), "{n}");
            assert_eq!(fixed_header(&buf).expect("valid"), Some((buf.len(), n)));
        }
    }

    /// Acknowledgements are read by hand, whatever their reason: rumqttc's codec could not
    /// read a PUBACK with 0x95 (Packet too large, Mosquitto's answer to a publish above its
    /// `message_size_limit`), and the connection ended.
    #[test]
    fn acknowledgements_with_any_reason_and_split_across_reads() {
        let mut buf = BytesMut::new();
        // PUBACK 9, reason 0x95 and an empty property length; PUBREC 10 with no reason (0);
        // a v5 PUBCOMP 11, reason 0x92; a PINGRESP.
        let wire = [
            0x40, 4, 0, 9, 0x95, 0, 0x50, 2, 0, 10, 0x70, 3, 0, 11, 0x92, 0xD0, 0,
        ];
        let mut got = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(p) = next_packet(&mut buf, true).expect("valid") {
                got.push(p);
            }
        }
        assert_eq!(
            got,
            vec![
                Incoming::Ack {
                    kind: PUBACK,
                    pkid: 9,
                    reason: 0x95
                },
                Incoming::Ack {
                    kind: PUBREC,
                    pkid: 10,
                    reason: 0
                },
                Incoming::Ack {
                    kind: PUBCOMP,
                    pkid: 11,
                    reason: 0x92
                },
                Incoming::PingResp,
            ]
        );
        assert!(buf.is_empty());
        // MQTT 3.1.1 has no reason byte: a longer packet's extra byte is not one.
        let mut buf = BytesMut::from(&[0x40u8, 2, 1, 2][..]);
        assert_eq!(
            next_packet(&mut buf, false).expect("valid"),
            Some(Incoming::Ack {
                kind: PUBACK,
                pkid: 258,
                reason: 0
            })
        );
    }

    #[test]
    fn a_disconnect_s_reason_and_reason_string() {
        let mut buf = BytesMut::new();
        let mut d = v5bytes::v5::Disconnect::new(v5bytes::v5::DisconnectReasonCode::ServerBusy);
        d.properties = Some(v5bytes::v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some("too many".into()),
            user_properties: Vec::new(),
            server_reference: None,
        });
        d.write(&mut buf).expect("written");
        assert_eq!(
            next_packet(&mut buf, true).expect("valid"),
            Some(Incoming::Disconnect(0x89, Some("too many".into())))
        );
    }

    /// A QoS 2 publish refused in its PUBREC has its final answer then: its packet id and its
    /// room are free at once, and no PUBREL follows. (rumqttc's event loop kept the id: after
    /// many refusals on one connection its acknowledgements stopped.) An accepted PUBREC is
    /// answered with a PUBREL, and the room comes back with the PUBCOMP.
    #[tokio::test]
    async fn a_refusing_pubrec_frees_the_room_and_an_accepting_one_gets_its_pubrel() {
        use tokio::io::AsyncWriteExt;
        let wire = Wire::new(true, 2, 1);
        let state = LiveState::default();
        let metrics = MqttMetrics::new(None);
        let (mut broker, client) = tokio::io::duplex(1024);
        let reading = read_loop(client, BytesMut::new(), &wire, &state, &metrics);
        let test = async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let x = Publish {
                topic: b"t",
                properties: &[],
                payload: b"x",
            };
            assert_eq!(
                wire.publish(&state, Slot::One(tx), x, None).await,
                Queued::Yes
            );
            assert_eq!(wire.room.available_permits(), 0);
            // PUBREC for id 1, reason 0x87 Not authorized.
            broker
                .write_all(&[0x50, 3, 0, 1, 0x87])
                .await
                .expect("written");
            let answer = rx.await.expect("answered");
            assert!(matches!(answer, Answer::Refused(_, "PUBREC")), "{answer:?}");
            assert_eq!(wire.room.available_permits(), 1, "the room is back");
            assert!(
                wire.out().buf.len() > 4,
                "the publish is queued, no PUBREL after it"
            );
            // The next publish takes id 2 (1 is free too; ids go round); PUBREC accepts it.
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            let y = Publish {
                topic: b"t",
                properties: &[],
                payload: b"y",
            };
            assert_eq!(
                wire.publish(&state, Slot::One(tx), y, None).await,
                Queued::Yes
            );
            let queued = wire.out().buf.len();
            broker.write_all(&[0x50, 2, 0, 2]).await.expect("written");
            tokio::time::timeout(Duration::from_secs(5), async {
                while wire.out().buf.len() == queued {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("a PUBREL queued");
            assert_eq!(&wire.out().buf[queued..], &[0x62, 2, 0, 2]);
            assert!(rx.try_recv().is_err(), "not answered before its PUBCOMP");
            assert_eq!(wire.room.available_permits(), 0);
            broker.write_all(&[0x70, 2, 0, 2]).await.expect("written");
            assert!(matches!(rx.await.expect("answered"), Answer::Acked));
            assert_eq!(wire.room.available_permits(), 1);
        };
        tokio::select! {
            () = test => {}
            failure = reading => panic!("the read loop ended: {failure:?}"),
        }
    }

    /// A publish that waited for the broker's room until past the attempt's deadline is not
    /// queued (`Transport::send_batch_until`), and leaves the room to the next.
    #[tokio::test]
    async fn a_publish_that_gets_room_past_its_deadline_is_not_queued() {
        let wire = Wire::new(true, 1, 1);
        let state = LiveState::default();
        let message = || Publish {
            topic: b"t",
            properties: &[],
            payload: b"x",
        };
        let (tx, _first) = tokio::sync::oneshot::channel();
        let queued = wire.publish(&state, Slot::One(tx), message(), None).await;
        assert_eq!(queued, Queued::Yes);
        let bytes = wire.out().buf.len();
        let until = std::time::Instant::now() + Duration::from_millis(20);
        let (tx, _second) = tokio::sync::oneshot::channel();
        let waiting = wire.publish(&state, Slot::One(tx), message(), Some(until));
        // The room comes back after the deadline (the first publish's answer).
        let freeing = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            wire.answered(1);
        };
        let (second, ()) = tokio::join!(waiting, freeing);
        assert_eq!(second, Queued::TooLate);
        assert_eq!(
            wire.out().buf.len(),
            bytes,
            "nothing queued past the deadline"
        );
        assert_eq!(wire.room.available_permits(), 1, "the room is left");
    }

    #[test]
    fn a_packet_larger_than_a_producer_is_sent_is_a_protocol_error() {
        let mut buf = BytesMut::new();
        buf.put_u8(0x30);
        put_varint(&mut buf, MAX_INCOMING + 1);
        assert!(matches!(
            next_packet(&mut buf, true),
            Err(Failure::Protocol(_))
        ));
    }
}
