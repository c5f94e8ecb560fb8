//! A hand-written AMQP 0-9-1 server that misbehaves on purpose, for what a real broker will not
//! do on demand: never confirm, or block the connection as soon as publishing starts (or,
//! to stand beside those in an address list, confirm everything).

/// What the fake broker does once a channel is in confirm mode.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fake {
    /// Takes publishes, never confirms them.
    Silent,
    /// Blocks the connection (`connection.blocked`) right after `confirm.select-ok`.
    Blocks,
    /// Confirms every publish (`basic.ack`), as a healthy broker does.
    Confirms,
    /// Confirms the first publish of each channel, then takes publishes without confirming
    /// them: a node that hangs once a channel is in use.
    ConfirmsFirst,
    /// On the first channel a connection opens, confirms the first publish and nacks
    /// (`basic.nack`) every later one; confirms everything on the other channels: a queue that
    /// starts refusing a channel's publishes once it is streaming.
    NacksFirstChannel,
    /// Nacks the first `n` publishes it reads (over all connections and channels), confirms
    /// every later one, and stores the confirmed ones' payloads in the order it read them: what
    /// RabbitMQ 3.10 does with a channel's first publishes to a quorum queue while the queue
    /// elects a new leader (each is nacked until the election is over, then they are taken).
    NacksFirst(usize),
    /// Confirms every publish up to this many bytes of payload. A larger one is never answered:
    /// the channel is closed for it (`channel.close`, 406 PRECONDITION_FAILED, with RabbitMQ's
    /// text naming the size and the limit), once the next publish on that channel is read, so
    /// that a publish sent after it on the same channel is in flight when the close comes.
    ClosesOversize(usize),
}

/// Per channel, for each publish whose content is still to come: whether it is confirmed and
/// the frame that says so, or `None` if the broker never answers it.
type Answers = std::collections::VecDeque<Option<(bool, Vec<u8>)>>;

/// A fake broker running.
pub(crate) struct FakeBroker {
    pub(crate) port: u16,
    /// `basic.publish` methods read, over all its connections and channels.
    pub(crate) publishes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The payloads of the publishes it confirmed, in the order it read them.
    pub(crate) stored: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
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

/// A minimal AMQP 0-9-1 server on 127.0.0.1 (handshake, channels, confirm mode) that behaves
/// as `mode` says. Returns its port.
pub(crate) async fn fake_broker(mode: Fake) -> u16 {
    fake_broker_counting(mode).await.0
}

/// [`fake_broker`], with the count of `basic.publish` methods it has read, over all its
/// connections and channels.
pub(crate) async fn fake_broker_counting(
    mode: Fake,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let broker = start(mode).await;
    (broker.port, broker.publishes)
}

/// A fake broker that behaves as `mode` says.
pub(crate) async fn start(mode: Fake) -> FakeBroker {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let publishes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&publishes);
    let stored: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let storing = Arc::clone(&stored);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            let storing = Arc::clone(&storing);
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
                // Publishes seen per channel: the delivery tag of the next confirm.
                let mut published: std::collections::HashMap<u16, u64> =
                    std::collections::HashMap::new();
                let mut first_channel: Option<u16> = None;
                // Per channel, the answer (`basic.ack` or `basic.nack` frame; none for a publish
                // the broker never answers) to each publish whose content is still to come: it
                // goes out once the content is read, as a broker confirms what it has stored.
                let mut awaiting_body: std::collections::HashMap<u16, Answers> =
                    std::collections::HashMap::new();
                // Per channel, the size of an oversized payload whose close is held back.
                let mut closing: std::collections::HashMap<u16, usize> =
                    std::collections::HashMap::new();
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
                    // The content of a publish: a header frame, then (unless the payload is
                    // empty) one body frame (the payloads here fit in one).
                    let empty = head[0] == 2
                        && body.len() >= 12
                        && u64::from_be_bytes(body[4..12].try_into().expect("8 bytes")) == 0;
                    if head[0] == 3 || empty {
                        let answer = awaiting_body
                            .get_mut(&channel)
                            .and_then(std::collections::VecDeque::pop_front)
                            .flatten();
                        if let Fake::ClosesOversize(limit) = mode {
                            let size = if empty { 0 } else { body.len() - 1 };
                            if size > limit {
                                closing.insert(channel, size);
                                continue;
                            }
                        }
                        if let Some((confirmed, answer)) = answer {
                            if confirmed {
                                let payload = if empty {
                                    Vec::new()
                                } else {
                                    body[..body.len() - 1].to_vec()
                                };
                                storing.lock().expect("stored").push(payload);
                            }
                            out = answer;
                        }
                        continue;
                    }
                    if head[0] != 1 || body.len() < 5 {
                        continue; // heartbeat
                    }
                    let ids = (
                        u16::from_be_bytes([body[0], body[1]]),
                        u16::from_be_bytes([body[2], body[3]]),
                    );
                    let read_before = if ids == (60, 40) {
                        counted.fetch_add(1, Ordering::SeqCst)
                    } else {
                        0
                    };
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
                        (20, 10) => {
                            first_channel.get_or_insert(channel);
                            // A channel id used again starts afresh.
                            published.remove(&channel);
                            awaiting_body.remove(&channel);
                            closing.remove(&channel);
                            out = frame(channel, &method(20, 11, &[0, 0, 0, 0]));
                        }
                        (20, 40) => out = frame(channel, &method(20, 41, &[])),
                        (85, 10) => {
                            out = frame(channel, &method(85, 11, &[]));
                            if mode == Fake::Blocks {
                                let mut reason = vec![13u8];
                                reason.extend_from_slice(b"low on memory");
                                out.extend(frame(0, &method(10, 60, &reason)));
                            }
                        }
                        (60, 40)
                            if matches!(
                                mode,
                                Fake::Confirms
                                    | Fake::ConfirmsFirst
                                    | Fake::NacksFirstChannel
                                    | Fake::NacksFirst(_)
                                    | Fake::ClosesOversize(_)
                            ) =>
                        {
                            if let Some(size) = closing.remove(&channel) {
                                // channel.close: 406, RabbitMQ's text, for basic.publish.
                                let mut a = 406u16.to_be_bytes().to_vec();
                                let text = format!(
                                    "PRECONDITION_FAILED - message size {size} is larger than configured max size {}",
                                    match mode {
                                        Fake::ClosesOversize(limit) => limit,
                                        _ => unreachable!("only this mode closes"),
                                    }
                                );
                                a.push(u8::try_from(text.len()).expect("short"));
                                a.extend_from_slice(text.as_bytes());
                                a.extend_from_slice(&60u16.to_be_bytes());
                                a.extend_from_slice(&40u16.to_be_bytes());
                                out = frame(channel, &method(20, 40, &a));
                                // This publish is never answered: its channel is closing.
                                awaiting_body.entry(channel).or_default().push_back(None);
                                continue;
                            }
                            let tag = published.entry(channel).or_default();
                            *tag += 1;
                            let answers = awaiting_body.entry(channel).or_default();
                            if mode == Fake::ConfirmsFirst && *tag > 1 {
                                answers.push_back(None);
                                continue;
                            }
                            let mut a = tag.to_be_bytes().to_vec();
                            a.push(0); // not multiple (and, for a nack, not requeue)
                            let nack = match mode {
                                Fake::NacksFirstChannel => {
                                    first_channel == Some(channel) && *tag > 1
                                }
                                Fake::NacksFirst(n) => read_before < n,
                                _ => false,
                            };
                            let answer =
                                frame(channel, &method(60, if nack { 120 } else { 80 }, &a));
                            answers.push_back(Some((!nack, answer)));
                        }
                        _ => {} // tune-ok, basic.publish: no answer
                    }
                }
            });
        }
    });
    FakeBroker {
        port,
        publishes,
        stored,
    }
}
