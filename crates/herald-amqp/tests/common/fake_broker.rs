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
    /// Nacks every publish (`basic.nack`) on the first channel a connection opens, confirms on
    /// the others: what RabbitMQ 3.10 does to a channel that first published to a quorum queue
    /// whose recorded leader was a dead node.
    NacksFirstChannel,
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let publishes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&publishes);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
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
                    if ids == (60, 40) {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
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
                        (60, 40) if matches!(mode, Fake::Confirms | Fake::NacksFirstChannel) => {
                            let tag = published.entry(channel).or_default();
                            *tag += 1;
                            let mut a = tag.to_be_bytes().to_vec();
                            if mode == Fake::NacksFirstChannel && first_channel == Some(channel) {
                                a.push(0); // not multiple, not requeue
                                out = frame(channel, &method(60, 120, &a));
                            } else {
                                a.push(0); // not multiple
                                out = frame(channel, &method(60, 80, &a));
                            }
                        }
                        _ => {} // tune-ok, basic.publish: no answer
                    }
                }
            });
        }
    });
    (port, publishes)
}
