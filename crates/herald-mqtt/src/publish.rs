//! Publishing: a batch handed to the connection without waiting per message (up to a window of
//! unanswered messages), its acknowledgements awaited within one deadline for the whole batch
//! (which moves on while the connection acknowledges anything, see `Patience`),
//! and the outcome of every message, in order: PUBACK / PUBCOMP, the broker's refusal, a lost
//! connection, per-key order. Also what a message becomes on the wire: user properties
//! (MQTT 5), what MQTT 3.1.1 cannot carry, and the packet size checked before sending.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use herald_core::{Ack, BatchOutcome, Destination, EarlyAcks, Message, TransportError, Turn};
use tokio::time::{Instant, Sleep};

use crate::answers::Answers;
use crate::config::{MqttConfig, Qos, Version};
use crate::connection::{Answer, Inner, Live, Slot};
use crate::destination;
use crate::error::refused;
use crate::wire::{Publish, Queued};

/// What one batch's publishing shares.
struct Batch<'a> {
    inner: &'a Inner,
    live: &'a Live,
    topic: &'a str,
}

/// Sends one batch to `destination`: what
/// [`Transport::send_batch`](herald_core::Transport::send_batch) does.
pub(crate) async fn send_batch(
    inner: &Inner,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
    early: Option<EarlyAcks>,
) -> BatchOutcome {
    // The destination's turn first, before any other await: calls of one topic publish in the
    // order herald started them (see `Transport::keeps_order_across_calls`), and wait for their
    // acknowledgements side by side.
    inner
        .turns
        .run(destination, batch, async |turn| {
            send_in_turn(inner, turn, destination, batch, until, early).await
        })
        .await
}

/// [`send_batch`] in the topic's turn.
async fn send_in_turn(
    inner: &Inner,
    turn: &mut Turn,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
    early: Option<EarlyAcks>,
) -> BatchOutcome {
    inner.in_use();
    let fail_all = |e: TransportError| batch.iter().map(|_| Err(e.clone())).collect();
    let topic = match destination::parse(destination) {
        Ok(t) => t,
        Err(e) => return fail_all(e),
    };
    let live = match answering_live(inner).await {
        Ok(l) => l,
        Err(e) => return fail_all(e),
    };
    let b = Batch {
        inner,
        live: &live,
        topic: &topic,
    };
    if let Some(e) = b.qos_refused() {
        return fail_all(e);
    }
    // One deadline for the whole batch, one timer for it armed once: the connection's send
    // lock, the publishes and the acknowledgements all wait under it (a timeout per message
    // would put an entry in tokio's timer wheel and take it out again for every message).
    // It moves on while the connection answers (see `Patience`).
    let timer = std::pin::pin!(tokio::time::sleep_until(
        Instant::now() + inner.config.ack_timeout
    ));
    let mut patience = Patience {
        heard: live.answers(),
        timer,
        live: &live,
        period: inner.config.ack_timeout,
    };
    let window = inner.config.window;
    // Every message's outcome: set here for what is not handed over, from `answers`
    // for what is.
    let mut outcomes: Vec<Option<Result<Ack, TransportError>>> = vec![None; batch.len()];
    let answers = Arc::new(Answers::new(batch.len(), early));
    let mut handed = 0usize;
    let mut failed = Vec::new();
    // Not sent: keys that failed in the calls before, if this call is on a new connection.
    let mut hold = turn.enter(live.path).await;
    // Once the connection is gone (or the batch's time is up), nothing more is published.
    let mut broken: Option<TransportError> = None;
    // A batch's publishes are queued together, in order: one batch at a time.
    let Some(send_lock) = patience.within(live.send.lock()).await else {
        return fail_all(b.timeout("waiting for the connection"));
    };
    for (i, msg) in batch.iter().enumerate() {
        if let Some(e) = &broken {
            outcomes[i] = Some(Err(e.clone()));
            continue;
        }
        if handed >= window {
            // The window is full: write what is queued, wait for room, and hold the keys
            // that failed meanwhile.
            live.flush();
            let room = patience
                .within(answers.answered(room_at(handed, window)))
                .await
                .is_some();
            answers.take_failed(&mut failed);
            for (j, answer) in failed.drain(..) {
                let outcome = b.outcome(answer);
                if let Err(e) = &outcome {
                    hold.failed(&batch[j], e);
                }
                outcomes[j] = Some(outcome);
            }
            if !room {
                let e = b.timeout("waiting for the acknowledgements of the messages before it");
                outcomes[i] = Some(Err(e.clone()));
                broken = Some(e);
                continue;
            }
        }
        // Nothing is handed over past herald's deadline for the attempt (see
        // `Transport::send_batch_until`; the wait for room above may have taken it, and so may
        // the wait for the broker's room in `Live::publish`, which looks again).
        // Acknowledgements are still awaited under `patience`.
        if herald_core::deadline_passed(until) {
            let e = b.not_sent_in_time();
            outcomes[i] = Some(Err(e.clone()));
            broken = Some(e);
            continue;
        }
        // Not even sent behind a transient failure of its key (the pipeline retries it after).
        if let Some(held) = hold.check(msg) {
            outcomes[i] = Some(Err(held));
            continue;
        }
        let properties = match properties(&inner.config, live.version, msg) {
            Ok(p) => p,
            Err(e) => {
                outcomes[i] = Some(Err(e));
                continue;
            }
        };
        let size = packet_size(live.version, &topic, &properties, msg.payload().len());
        if size > live.max_packet as usize {
            outcomes[i] = Some(Err(b.too_large(size)));
            continue;
        }
        if !live.is_connected() {
            let e = b.lost();
            outcomes[i] = Some(Err(e.clone()));
            broken = Some(e);
            continue;
        }
        let slot = Slot::Batch(Arc::clone(&answers), i);
        // The silence watch starts with the batch's first publish handed over.
        let snapshot = (handed == 0).then(|| live.snapshot());
        let message = Publish {
            topic: topic.as_bytes(),
            properties: &properties,
            payload: msg.payload(),
        };
        let sent = patience.within(live.publish(slot, message, until)).await;
        match sent {
            Some(Queued::Yes) => {
                if let Some(snapshot) = snapshot {
                    live.expecting(snapshot);
                }
                handed += 1;
            }
            Some(Queued::Over) => {
                let e = b.lost();
                outcomes[i] = Some(Err(e.clone()));
                broken = Some(e);
            }
            Some(Queued::TooLate) => {
                let e = b.not_sent_in_time();
                outcomes[i] = Some(Err(e.clone()));
                broken = Some(e);
            }
            None => {
                // The batch's time ran out waiting for the broker to have room.
                let e = b.timeout("waiting for the broker to take more publishes");
                outcomes[i] = Some(Err(e.clone()));
                broken = Some(e);
            }
        }
    }
    // One write (or as few as the socket takes) for the batch's publishes.
    live.flush();
    drop(send_lock);
    // What failed before the turn passes holds its key for the next call at once.
    turn.hand_over(batch, &outcomes);
    // Every answer, or the batch's deadline: the connection's task wakes this task once.
    // Either way, what came is read from the table below.
    let _all_came = patience.within(answers.answered(handed)).await;
    let outcomes: BatchOutcome = outcomes
        .into_iter()
        .zip(answers.close())
        .map(|(outcome, answer)| match (outcome, answer) {
            (Some(outcome), _) => outcome,
            (None, Some(answer)) => b.outcome(answer),
            (None, None) => Err(b.timeout("waiting for its acknowledgement")),
        })
        .collect();
    if live.is_connected()
        && outcomes
            .iter()
            .any(|o| matches!(o, Err(e) if e.code() == Some("TIMEOUT")))
    {
        // The connection looks up but acknowledgements stopped coming (a half-open TCP
        // connection, a hung broker): give it up, so that the retry goes out on a new one.
        inner.abandon(&live).await;
    }
    // A later message of a key delivered after its earlier one failed transiently is held by
    // the pipeline (`KeyHold::apply`, under strict ordering): sent again behind the retry.
    outcomes
}

/// The live connection: a new one if the one in use has acknowledged nothing for
/// `ack_timeout` though it looks up (see `Live::silent_for`).
async fn answering_live(inner: &Inner) -> Result<Arc<Live>, TransportError> {
    let live = inner.live().await?;
    if live
        .silent_for()
        .is_some_and(|silent| silent >= inner.config.ack_timeout)
    {
        inner.abandon(&live).await;
        return inner.live().await;
    }
    Ok(live)
}

/// A batch's deadline that moves on while the connection answers: `ack_timeout` is how long
/// the connection may go without answering anything while the batch waits, not how long the
/// batch may take. A slow broker (a small Receive Maximum, a long round trip) may take far
/// longer than that over a batch, or keep it waiting behind other batches, and is not a hung
/// one: giving its connection up would fail everything in flight on it, to be sent again
/// (duplicates). A hung broker or a half-open connection is found within two periods.
struct Patience<'a, 'l> {
    timer: Pin<&'a mut Sleep>,
    live: &'l Live,
    /// The connection's count of acknowledgements when the current period began.
    heard: u64,
    period: std::time::Duration,
}

impl Patience<'_, '_> {
    /// `fut`'s output, or `None` once a whole period went by without an acknowledgement on the
    /// connection (`fut` is then dropped). One counter read per period, nothing per message.
    async fn within<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                () = self.timer.as_mut() => {
                    let heard = self.live.answers();
                    if heard == self.heard || !self.live.is_connected() {
                        return None;
                    }
                    self.heard = heard;
                    self.timer.as_mut().reset(Instant::now() + self.period);
                }
            }
        }
    }
}

impl Batch<'_> {
    /// The outcome of a message with this answer (an acknowledgement was told early by
    /// [`Answers::put`] already).
    fn outcome(&self, answer: Answer) -> Result<Ack, TransportError> {
        match answer {
            Answer::Acked => Ok(Ack::default()),
            Answer::Refused(info, packet) => Err(refused(&info, self.topic, packet)),
            Answer::Lost => Err(self.lost()),
        }
    }

    fn lost(&self) -> TransportError {
        self.live.failure().unwrap_or_else(|| {
            TransportError::transient(format!(
                "the connection to {} ended before the acknowledgement of a message to \"{}\" came; herald reconnects with a new session and retries (a duplicate is possible)",
                self.live.server, self.topic
            ))
            .with_code("CONNECTION_LOST")
        })
    }

    fn timeout(&self, what: &str) -> TransportError {
        TransportError::transient(format!(
            "{what} to \"{}\" did not complete: the broker acknowledged nothing for the ack timeout of {:?}; retried on a new connection (a duplicate is possible)",
            self.topic, self.inner.config.ack_timeout
        ))
        .with_code("TIMEOUT")
    }

    /// A message not handed over because herald's deadline for the attempt had
    /// passed: never sent, so never stored.
    fn not_sent_in_time(&self) -> TransportError {
        TransportError::transient(format!(
            "not sent: the attempt's deadline passed before this message to \"{}\" was published; retried",
            self.topic
        ))
        .with_code("NOT_SENT")
    }

    /// The broker announced a Maximum QoS below this transport's: it would cut the connection
    /// at the first publish (DISCONNECT 0x9B), so nothing is sent.
    fn qos_refused(&self) -> Option<TransportError> {
        let max = self.live.max_qos?;
        let level = match self.live.qos {
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        };
        (level > max).then(|| {
            TransportError::permanent(format!(
                "the broker at {} takes publishes up to QoS {max} (the Maximum QoS of its CONNACK), and this transport publishes at QoS {level}: set ?qos= to at most {max}, or raise the broker's limit (Mosquitto: max_qos); not sent",
                self.live.server
            ))
            .with_code("QOS_NOT_SUPPORTED")
        })
    }

    fn too_large(&self, size: usize) -> TransportError {
        TransportError::permanent(format!(
            "a message to \"{}\" makes a PUBLISH packet of {size} bytes, above the maximum of {} bytes (the smaller of the broker's Maximum Packet Size and MqttConfig::max_packet_size); not sent",
            self.topic, self.live.max_packet
        ))
        .with_code("PACKET_TOO_LARGE")
    }
}

/// A key, id or header MQTT cannot carry: the message can never be sent as it is.
fn invalid(code: &'static str, text: String) -> TransportError {
    TransportError::permanent(text).with_code(code)
}

/// A value as MQTT text: UTF-8 without NUL (MQTT's UTF-8 strings may not hold U+0000), nor
/// what a broker may refuse by dropping the client (see `destination::refused_char`).
fn text(bytes: &[u8], what: &str) -> Result<String, TransportError> {
    let t = std::str::from_utf8(bytes).map_err(|_| {
        invalid(
            "INVALID_HEADER",
            format!("the message cannot be sent over MQTT: its {what} is not UTF-8 (MQTT 5 user properties are text)"),
        )
    })?;
    if let Some(refused) = crate::destination::refused_char(t) {
        return Err(invalid(
            "INVALID_HEADER",
            format!("the message cannot be sent over MQTT: its {what} holds {refused}"),
        ));
    }
    if t.len() > MAX_STRING {
        // The packet's two length bytes would hold a wrapped number (`wire::put_publish`; so
        // did rumqttc's codec): a malformed packet, and the bytes past it read as more
        // properties.
        return Err(invalid(
            "INVALID_HEADER",
            format!(
                "the message cannot be sent over MQTT: its {what} is {} bytes; an MQTT string holds at most {MAX_STRING}",
                t.len()
            ),
        ));
    }
    Ok(t.to_owned())
}

/// The longest MQTT UTF-8 string, in bytes (a 16-bit length).
pub(crate) const MAX_STRING: usize = 65_535;

/// The MQTT 5 user properties of `msg`: its headers, in order, then its key in the key
/// property and its herald id in the id property (when those are configured). With MQTT
/// 3.1.1, which has no properties, a message with headers (or a key, while a key property is
/// configured) is refused: sending it without them would lose what the caller gave.
fn properties(
    config: &MqttConfig,
    version: Version,
    msg: &Message,
) -> Result<Vec<(String, String)>, TransportError> {
    if version == Version::V311 {
        let what = if !msg.headers().is_empty() {
            Some("headers")
        } else if msg.key().is_some() && config.key_property.is_some() {
            Some("a key")
        } else {
            None
        };
        return match what {
            None => Ok(Vec::new()),
            Some(what) => Err(invalid(
                "UNSUPPORTED_BY_MQTT3",
                format!("the message has {what}, which MQTT 3.1.1 cannot carry (a message is a topic and a payload): use MQTT 5 (drop ?version=3), or send it without them (for keys: MqttConfig::key_property(None) keeps the key for herald's ordering only)"),
            )),
        };
    }
    let reserved = |name: &str| {
        config.key_property.as_deref() == Some(name) || config.id_property.as_deref() == Some(name)
    };
    let mut props = Vec::with_capacity(msg.headers().len() + 2);
    for h in msg.headers() {
        if h.name.is_empty() {
            return Err(invalid(
                "INVALID_HEADER",
                "the message cannot be sent over MQTT: a header name is empty".into(),
            ));
        }
        if reserved(&h.name) {
            return Err(invalid(
                "INVALID_HEADER",
                format!("the message cannot be sent over MQTT: its header `{}` has the name of the user property that carries herald's key or id (MqttConfig::key_property, id_property)", h.name),
            ));
        }
        props.push((
            text(h.name.as_bytes(), "header name")?,
            text(&h.value, "header value")?,
        ));
    }
    if let (Some(name), Some(key)) = (&config.key_property, msg.key()) {
        props.push((name.clone(), text(key, "key")?));
    }
    if let (Some(name), Some(id)) = (&config.id_property, msg.id()) {
        props.push((name.clone(), String::from(&*id.text())));
    }
    Ok(props)
}

/// The size of the PUBLISH packet (QoS 1 or 2) for this topic, properties and payload: what
/// `wire::put_publish` writes.
fn packet_size(
    version: Version,
    topic: &str,
    properties: &[(String, String)],
    payload: usize,
) -> usize {
    crate::wire::publish_size(version == Version::V5, topic.len(), properties, payload)
}

/// How many of the `handed` publishes must be answered before one more may be handed over with
/// a window of `window` (`handed >= window >= 1`): then `window - 1` are unanswered, and the
/// next makes `window`. One more would wait on a window that is not full (and hang where fewer
/// answers are still to come); one fewer would put `window + 1` of the batch in flight.
fn room_at(handed: usize, window: usize) -> usize {
    handed + 1 - window
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An MQTT string holds at most 65 535 bytes; rumqttc wrote a longer one's length wrapped
    /// (a malformed packet, the rest read as more properties). Before, this was sent.
    #[test]
    fn a_header_or_key_longer_than_an_mqtt_string_is_refused() {
        let config = MqttConfig::from_url("mqtt://h/t").expect("url");
        let long = "a".repeat(MAX_STRING + 1);
        for m in [
            Message::new("t", "p").with_header("h", long.clone()),
            Message::new("t", "p").with_key(long.clone()),
        ] {
            let e = properties(&config, Version::V5, &m).expect_err("too long");
            assert_eq!(e.code(), Some("INVALID_HEADER"), "{e}");
        }
        let at_most = Message::new("t", "p").with_header("h", "a".repeat(MAX_STRING));
        assert!(properties(&config, Version::V5, &at_most).is_ok());
    }
    use herald_core::{ErrorClass, MessageId};

    #[test]
    fn a_full_window_waits_until_exactly_the_window_is_in_flight_with_the_next() {
        for window in 1..=6 {
            for handed in window..window + 20 {
                let unanswered = handed - room_at(handed, window);
                assert_eq!(unanswered + 1, window, "handed {handed}, window {window}");
            }
        }
    }

    fn config() -> MqttConfig {
        MqttConfig::from_url("mqtt://h/plant/x").expect("url")
    }

    #[test]
    fn key_id_and_headers_travel_as_user_properties() {
        let c = config();
        let id = MessageId::from_u128(0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70);
        let m = Message::new("plant/x", "p")
            .with_id(id)
            .with_key("sensor-7")
            .with_header("trace-id", "abc")
            .with_header("trace-id", "def");
        assert_eq!(
            properties(&c, Version::V5, &m).expect("sendable"),
            [
                ("trace-id".to_owned(), "abc".to_owned()),
                ("trace-id".to_owned(), "def".to_owned()),
                ("x-herald-key".to_owned(), "sensor-7".to_owned()),
                (
                    "x-herald-id".to_owned(),
                    "0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70".to_owned()
                ),
            ]
        );
        let bare = c.clone().key_property(None).id_property(None);
        assert_eq!(properties(&bare, Version::V5, &m).expect("ok").len(), 2);
        assert!(properties(&c, Version::V5, &Message::new("t", "p"))
            .expect("ok")
            .is_empty());
    }

    #[test]
    fn what_mqtt_5_cannot_carry_is_permanent() {
        let c = config();
        for m in [
            Message::new("t", "p").with_key(vec![0xff, 0xfe]),
            Message::new("t", "p").with_key("a\0b"),
            Message::new("t", "p").with_header("", "v"),
            Message::new("t", "p").with_header("n", vec![0xc3]),
            Message::new("t", "p").with_header("x-herald-key", "v"),
            Message::new("t", "p").with_header("x-herald-id", "v"),
        ] {
            let e = properties(&c, Version::V5, &m).expect_err("not sendable");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Permanent, Some("INVALID_HEADER")),
                "{e}"
            );
        }
    }

    #[test]
    fn mqtt_3_refuses_headers_and_keys_it_cannot_carry() {
        let c = config();
        for m in [
            Message::new("t", "p").with_header("a", "b"),
            Message::new("t", "p").with_key("k"),
        ] {
            let e = properties(&c, Version::V311, &m).expect_err("refused");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Permanent, Some("UNSUPPORTED_BY_MQTT3")),
                "{e}"
            );
            assert!(e.message().contains("MQTT 3.1.1"), "{e}");
        }
        // Plain payloads go; a key kept for ordering only goes when no property carries it.
        let plain = Message::new("t", "p").with_id(MessageId::from_u128(1));
        assert!(properties(&c, Version::V311, &plain)
            .expect("ok")
            .is_empty());
        let keyed = Message::new("t", "p").with_key("k");
        assert!(properties(&c.key_property(None), Version::V311, &keyed)
            .expect("ok")
            .is_empty());
    }

    #[test]
    fn packet_sizes_are_rumqttc_s() {
        use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
        for (topic, props, payload) in [
            ("t", vec![], 0usize),
            (
                "plant/line-3/temperature",
                vec![("k".to_owned(), "v".to_owned())],
                100,
            ),
            ("x", vec![("a".repeat(300), "b".repeat(70))], 20_000),
            ("y", vec![], 3_000_000),
        ] {
            let mut p = Publish::new(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                vec![b'x'; payload],
                Some(PublishProperties {
                    user_properties: props.clone(),
                    ..Default::default()
                }),
            );
            p.pkid = 1;
            assert_eq!(
                packet_size(Version::V5, topic, &props, payload),
                p.size(),
                "{topic}"
            );
            let mut p3 =
                rumqttc::Publish::new(topic, rumqttc::QoS::AtLeastOnce, vec![b'x'; payload]);
            p3.pkid = 1;
            assert_eq!(
                packet_size(Version::V311, topic, &[], payload),
                p3.size(),
                "{topic}"
            );
        }
    }
}
