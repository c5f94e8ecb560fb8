//! Publishing: a batch sent as one pipeline of `XADD`s (one round trip for the whole batch,
//! plus `WAIT` when asked for), and the outcome of every message, in order: the entry id Redis
//! replied with, Redis's refusal, a lost connection, per-key order.
//!
//! # The stream entry
//!
//! Each message becomes one entry with these fields, in this order:
//!
//! | field | value |
//! | --- | --- |
//! | `payload` | the payload, as it is (binary-safe) |
//! | `key` | the message key, when it has one |
//! | `id` | the herald message id (UUID text), when it has one: the same on every retry, so a reader can drop the second copy a retry appended |
//! | `h:NAME` | one field per header, its name prefixed with `h:` (a header `trace-id` is the field `h:trace-id`; repeated headers repeat the field) |
//!
//! The `h:` prefix keeps header names apart from `payload`, `key` and `id`, whatever the
//! headers are called: a header named `payload` is the field `h:payload`.

use std::future::Future as _;
use std::pin::pin;
use std::task::Poll;

use herald_core::{Ack, BatchOutcome, Destination, Message, TransportError, Turn};
use redis::{Cmd, Pipeline, Value};

use crate::config::RedisConfig;
use crate::connection::{GiveUp, Inner, Live};
use crate::destination;
use crate::error::{breaks_connection, classify, reply};

/// The entry field holding the payload.
pub const FIELD_PAYLOAD: &str = "payload";
/// The entry field holding the message key (absent without one).
pub const FIELD_KEY: &str = "key";
/// The entry field holding the herald message id, as UUID text (absent without one).
pub const FIELD_ID: &str = "id";
/// What every header's field name starts with: `h:` then the header name.
pub const HEADER_PREFIX: &str = "h:";

/// The length of a herald id as text (a hyphenated UUID).
const ID_TEXT_LEN: usize = 36;

/// The size of `msg`'s entry, every field name and value counted: what
/// [`RedisConfig::max_message_bytes`] bounds.
pub(crate) fn entry_size(msg: &Message) -> usize {
    let mut size = FIELD_PAYLOAD.len() + msg.payload().len();
    if let Some(key) = msg.key() {
        size += FIELD_KEY.len() + key.len();
    }
    if msg.id().is_some() {
        size += FIELD_ID.len() + ID_TEXT_LEN;
    }
    for h in msg.headers() {
        size += HEADER_PREFIX.len() + h.name.len() + h.value.len();
    }
    size
}

/// `XADD stream [MAXLEN ~ n] * payload P [key K] [id ID] [h:NAME V]...` for `msg`.
pub(crate) fn xadd(stream: &str, maxlen: Option<u64>, msg: &Message) -> Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if let Some(n) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*").arg(FIELD_PAYLOAD).arg(msg.payload().as_ref());
    if let Some(key) = msg.key() {
        cmd.arg(FIELD_KEY).arg(key.as_ref());
    }
    if let Some(id) = msg.id() {
        cmd.arg(FIELD_ID).arg(&*id.text());
    }
    for h in msg.headers() {
        let mut name = Vec::with_capacity(HEADER_PREFIX.len() + h.name.len());
        name.extend_from_slice(HEADER_PREFIX.as_bytes());
        name.extend_from_slice(h.name.as_bytes());
        cmd.arg(name).arg(h.value.as_ref());
    }
    cmd
}

/// The `Ack::offset` of an entry id `MS-SEQ`: `MS * 1_000_000 + SEQ`, which orders as the ids
/// do; `None` for an id that does not fit (a sequence of a million or more within one
/// millisecond, or a time past the year 2262). [`entry_id`] turns it back.
///
/// ```
/// assert_eq!(herald_redis::entry_offset("1700000000123-7"), Some(1_700_000_000_123_000_007));
/// assert_eq!(herald_redis::entry_id(1_700_000_000_123_000_007), "1700000000123-7");
/// ```
pub fn entry_offset(id: &str) -> Option<i64> {
    let (ms, seq) = id.split_once('-')?;
    let ms: i64 = ms.parse().ok()?;
    let seq: i64 = seq.parse().ok()?;
    if !(0..1_000_000).contains(&seq) || ms < 0 {
        return None;
    }
    ms.checked_mul(1_000_000)?.checked_add(seq)
}

/// The entry id (`MS-SEQ`) an [`entry_offset`] stands for.
pub fn entry_id(offset: i64) -> String {
    format!("{}-{}", offset / 1_000_000, offset % 1_000_000)
}

/// A message whose entry is larger than the transport sends.
fn too_large(size: usize, config: &RedisConfig) -> TransportError {
    TransportError::permanent(format!(
        "the message's stream entry is {size} bytes, more than the {} bytes allowed (RedisConfig::max_message_bytes); not sent",
        config.max_message_bytes
    ))
    .with_code("PAYLOAD_TOO_LARGE")
}

/// Sends one batch to `destination`: what
/// [`Transport::send_batch`](herald_core::Transport::send_batch) does.
pub(crate) async fn send_batch(
    inner: &Inner,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
) -> BatchOutcome {
    // The stream's turn first, before any other await: calls of one stream hand their
    // pipelines over in the order herald started them (see
    // `Transport::keeps_order_across_calls`), and wait for their replies side by side.
    inner
        .turns
        .run(destination, batch, async |turn| {
            send_in_turn(inner, turn, destination, batch, until).await
        })
        .await
}

/// [`send_batch`] in the stream's turn.
async fn send_in_turn(
    inner: &Inner,
    turn: &mut Turn,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
) -> BatchOutcome {
    inner.in_use();
    let fail_all = |e: TransportError| batch.iter().map(|_| Err(e.clone())).collect();
    let stream = match destination::parse(destination) {
        Ok(s) => s,
        Err(e) => return fail_all(e),
    };
    let config = &inner.config;
    let mut outcomes: Vec<Option<Result<Ack, TransportError>>> = vec![None; batch.len()];
    // Too large: refused before anything connects.
    for (i, msg) in batch.iter().enumerate() {
        let size = entry_size(msg);
        if size > config.max_message_bytes {
            outcomes[i] = Some(Err(too_large(size, config)));
        }
    }
    if outcomes.iter().any(Option::is_none) {
        let live = match answering_live(inner).await {
            Ok(l) => l,
            Err(e) => {
                for o in outcomes.iter_mut().filter(|o| o.is_none()) {
                    *o = Some(Err(e.clone()));
                }
                return finished(outcomes);
            }
        };
        // Not sent: keys that failed in the calls before, if this call is on a new connection.
        let hold = turn.enter(live.path).await;
        // Nothing is handed over past herald's deadline for the attempt (see
        // `Transport::send_batch_until`): the connection and the calls before may have taken it.
        if herald_core::deadline_passed(until) {
            let e = TransportError::transient(format!(
                "not sent: the attempt's deadline passed before the pipeline to stream \"{stream}\" was handed over; retried"
            ))
            .with_code("NOT_SENT");
            for o in outcomes.iter_mut().filter(|o| o.is_none()) {
                *o = Some(Err(e.clone()));
            }
        }
        let mut sent = Vec::with_capacity(batch.len());
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (i, msg) in batch.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            // Not even sent behind a transient failure of its key (the pipeline retries it
            // after).
            if let Some(held) = hold.check(msg) {
                outcomes[i] = Some(Err(held));
                continue;
            }
            pipe.add_command(xadd(stream, config.maxlen, msg));
            sent.push(i);
        }
        if !sent.is_empty() {
            if let Some((replicas, timeout)) = config.wait {
                let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                pipe.add_command(redis::cmd("WAIT").arg(replicas).arg(ms).clone());
            }
            match round_trip(inner, &live, turn, &pipe, sent.len()).await {
                Ok(replies) => {
                    settle(inner, stream, &sent, replies, &mut outcomes);
                    if sent.iter().any(|&i| is_replica_refusal(&outcomes[i])) {
                        // The server is a replica now: after a failover the old primary
                        // becomes one, and the name of the primary (a managed service's
                        // endpoint, a DNS name) points elsewhere. A new connection follows it.
                        inner.give_up_now(&live, GiveUp::Replica);
                    } else if sent.iter().any(|&i| {
                        matches!(&outcomes[i], Some(Err(e)) if e.code() == Some("PROTOCOL_ERROR"))
                    }) {
                        // A reply that is no entry id: the connection's replies may be out of
                        // step with its commands; the next batch goes out on a new one.
                        inner.give_up_now(&live, GiveUp::OutOfStep);
                    }
                }
                Err(e) => {
                    for &i in &sent {
                        outcomes[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
    }
    // When nothing was sent (`round_trip` hands over itself otherwise): what failed holds its
    // key for the next call at once.
    turn.hand_over(batch, &outcomes);
    finished(outcomes)
}

/// Every message's outcome (none is left without one).
fn finished(outcomes: Vec<Option<Result<Ack, TransportError>>>) -> BatchOutcome {
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Err(TransportError::transient(
                    "internal: message not sent; retried",
                ))
            })
        })
        .collect()
}

/// Hands the pipeline to the live connection, then lets the next call of the stream take its
/// turn, and reads every reply within the batch's deadline: the ack timeout, plus `WAIT`'s
/// own timeout.
///
/// The hand-over is the query's first poll. redis-rs's multiplexed connection queues a
/// pipeline for its writer on a channel in that poll, so the pipeline's place in the
/// connection's write order is fixed by then, and Redis answers in that order. When the
/// channel is full, a sender only waits for room, first come first served, but enters the
/// channel when its task next runs, in whatever order the runtime wakes the waiting tasks:
/// that is why the channel holds `PIPELINE_QUEUE` pipelines (4 096), more than the calls in
/// flight on a connection at herald's settings. (The real-server order tests with batches in
/// flight check this against the redis-rs in use.)
async fn round_trip(
    inner: &Inner,
    live: &std::sync::Arc<Live>,
    turn: &mut Turn,
    pipe: &Pipeline,
    xadds: usize,
) -> Result<Vec<Value>, TransportError> {
    // Each `WAIT` ahead on the connection holds this pipeline's replies back by up to its
    // timeout (replicas lagging or gone): the budget counts them.
    let waiting = inner.config.wait.map(|_| Waiting::enter(live));
    let ahead = waiting.as_ref().map_or(0, |w| w.ahead);
    let budget = reply_budget(&inner.config) + wait_timeout(&inner.config) * ahead;
    let mut conn = live.conn.clone();
    live.expecting();
    let mut query = pin!(tokio::time::timeout(
        budget,
        pipe.query_async::<Vec<Value>>(&mut conn)
    ));
    let mut first = None;
    std::future::poll_fn(|cx| {
        first = Some(query.as_mut().poll(cx));
        Poll::Ready(())
    })
    .await;
    turn.handed_over();
    let answer = match first {
        Some(Poll::Ready(answer)) => answer,
        _ => query.await,
    };
    // A reply, or an error the server sent (not the connection's): it answers.
    if matches!(&answer, Ok(Ok(_))) || matches!(&answer, Ok(Err(e)) if !breaks_connection(e)) {
        live.answered();
    }
    match answer {
        Ok(Ok(replies)) => {
            let expected = xadds + usize::from(inner.config.wait.is_some());
            if replies.len() == expected {
                Ok(replies)
            } else {
                inner.lost(live).await;
                Err(TransportError::transient(format!(
                    "{} sent {} replies to a pipeline of {expected} commands; the connection is replaced and the batch retried",
                    inner.server,
                    replies.len()
                ))
                .with_code("PROTOCOL_ERROR"))
            }
        }
        Ok(Err(e)) => {
            if breaks_connection(&e) {
                inner.lost(live).await;
            }
            Err(classify(&e, &inner.server))
        }
        Err(_) => {
            // The connection looks up but the replies stopped coming (a half-open TCP
            // connection, a hung server): give it up, so that the retry goes out on a new one.
            inner.abandon(live).await;
            Err(TransportError::transient(format!(
                "{} did not answer a batch of {xadds} XADDs within {budget:?} (the ack timeout, plus, with ?wait=, WAIT's timeout for its own WAIT and each one ahead of it); retried on a new connection (Redis may have appended some: a retry can add a second copy)",
                inner.server
            ))
            .with_code("TIMEOUT"))
        }
    }
}

/// The live connection: a new one if the one in use has answered nothing for as long as a
/// pipeline may take, though it looks up, and does not answer a PING now either (see
/// `Live::silent_for`).
async fn answering_live(inner: &Inner) -> Result<std::sync::Arc<Live>, TransportError> {
    let live = inner.live().await?;
    let silent = live
        .silent_for()
        .is_some_and(|silent| silent >= reply_budget(&inner.config));
    if silent && !answers_ping(&live, &inner.config).await {
        inner.abandon(&live).await;
        return inner.live().await;
    }
    Ok(live)
}

/// One pipeline ending in `WAIT` on a connection, counted in `Live::waits` while it waits.
struct Waiting<'a> {
    live: &'a Live,
    /// The others counted when it went out: ahead of it.
    ahead: u32,
}

impl<'a> Waiting<'a> {
    fn enter(live: &'a Live) -> Self {
        let ahead = live.waits.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self {
            live,
            ahead: u32::try_from(ahead).unwrap_or(u32::MAX),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.live
            .waits
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How long a connection whose silence watch ran out gets to answer a PING: the watch cannot
/// see the answers of calls cut off at their deadline (redis-rs drops them), so a healthy
/// connection after such calls and an idle spell is asked before it is given up.
const PING_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `live` answers a PING within [`PING_PROBE`], or `WAIT`'s timeout times the `WAIT`s
/// in flight if longer (the PING waits behind whatever is in flight): then its watch starts
/// over.
async fn answers_ping(live: &Live, config: &RedisConfig) -> bool {
    let mut conn = live.conn.clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<Value>(&mut conn);
    let queued =
        u32::try_from(live.waits.load(std::sync::atomic::Ordering::Acquire)).unwrap_or(u32::MAX);
    let within = PING_PROBE.max(wait_timeout(config) * queued.max(1));
    // A refusal (an ACL without PING, say) is an answer too.
    let answered = match tokio::time::timeout(within, ping).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => !breaks_connection(&e),
        Err(_) => false,
    };
    if answered {
        live.answered();
    }
    answered
}

/// How long a pipeline's replies may take: the ack timeout, plus `WAIT`'s own timeout (which
/// holds the connection's later replies back as long).
fn reply_budget(config: &RedisConfig) -> std::time::Duration {
    config.ack_timeout + wait_timeout(config)
}

/// `WAIT`'s timeout with `?wait=`; zero without.
fn wait_timeout(config: &RedisConfig) -> std::time::Duration {
    config.wait.map_or(std::time::Duration::ZERO, |(_, t)| t)
}

/// The outcome of each sent message from its reply, and `WAIT`'s verdict on them all.
fn settle(
    inner: &Inner,
    stream: &str,
    sent: &[usize],
    replies: Vec<Value>,
    outcomes: &mut [Option<Result<Ack, TransportError>>],
) {
    let mut replies = replies.into_iter();
    for &i in sent {
        let outcome = match replies.next() {
            Some(Value::BulkString(id)) if is_entry_id(&id) => {
                Ok(ack(&String::from_utf8_lossy(&id)))
            }
            Some(Value::SimpleString(id)) if is_entry_id(id.as_bytes()) => Ok(ack(&id)),
            Some(Value::ServerError(e)) => {
                inner.metrics.server_errors.increment(1);
                Err(reply(e.code(), e.details().unwrap_or(""), stream))
            }
            other => Err(TransportError::transient(format!(
                "{} answered an XADD with {other:?}, not an entry id; retried",
                inner.server
            ))
            .with_code("PROTOCOL_ERROR")),
        };
        outcomes[i] = Some(outcome);
    }
    let Some((wanted, timeout)) = inner.config.wait else {
        return;
    };
    let refusal = match replies.next() {
        Some(Value::Int(n)) if n >= i64::from(wanted) => return,
        Some(Value::Int(n)) => {
            inner.metrics.wait_short.increment(1);
            TransportError::transient(format!(
                "WAIT {wanted}: only {n} replica(s) acknowledged the batch within {timeout:?}; the primary holds the messages, retried (a second copy may follow)"
            ))
            .with_code("REPLICAS_NOT_REACHED")
        }
        // The entries are stored (each XADD got its id): only their replication is unknown.
        // The error says so, whatever its class (a WAIT the ACL or a proxy refuses is
        // permanent: retrying would store copy after copy).
        Some(Value::ServerError(e)) => {
            inner.metrics.server_errors.increment(1);
            let (code, detail) = (e.code(), e.details().unwrap_or(""));
            let info = crate::error::reply_code(code, detail);
            TransportError::new(
                info.class,
                format!(
                    "stored in the stream \"{}\" (XADD answered an entry id), but WAIT {wanted} failed, so its replication is not confirmed: {code} {detail}; {}",
                    stream.escape_debug(),
                    info.advice
                ),
            )
            .with_code("WAIT_FAILED")
        }
        other => TransportError::transient(format!(
            "stored (XADD answered an entry id), but {} answered WAIT with {other:?}, so its replication is not confirmed; retried (a second copy may follow)",
            inner.server
        ))
        .with_code("PROTOCOL_ERROR"),
    };
    for &i in sent {
        if matches!(outcomes[i], Some(Ok(_))) {
            outcomes[i] = Some(Err(refusal.clone()));
        }
    }
}

/// Whether an outcome is a refusal only a replica gives (`READONLY`, `MASTERDOWN`).
fn is_replica_refusal(outcome: &Option<Result<Ack, TransportError>>) -> bool {
    matches!(outcome, Some(Err(e)) if matches!(e.code(), Some("READ_ONLY" | "MASTER_DOWN")))
}

/// Whether `id` reads as a stream entry id (`MS-SEQ`): anything else in answer to an `XADD`
/// (an `OK` from a proxy, a reply out of step) is not taken for a stored entry.
fn is_entry_id(id: &[u8]) -> bool {
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    id.iter()
        .position(|&b| b == b'-')
        .is_some_and(|dash| digits(&id[..dash]) && digits(&id[dash + 1..]))
}

/// The ack of an entry id.
fn ack(id: &str) -> Ack {
    Ack {
        offset: entry_offset(id),
        ..Ack::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::MessageId;

    /// The arguments of a command, as text.
    fn args(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<other>".into(),
            })
            .collect()
    }

    #[test]
    fn only_an_entry_id_is_taken_for_a_stored_entry() {
        assert!(is_entry_id(b"1700000000000-0"));
        assert!(is_entry_id(b"0-1"));
        for not in [
            &b"OK"[..],
            b"PONG",
            b"",
            b"-",
            b"12-",
            b"-3",
            b"1-2-3",
            b"a-1",
        ] {
            assert!(!is_entry_id(not), "{:?}", String::from_utf8_lossy(not));
        }
    }

    #[test]
    fn the_entry_holds_payload_key_id_and_prefixed_headers() {
        let id = MessageId::from_u128(0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70);
        let m = Message::new("orders", "p")
            .with_id(id)
            .with_key("customer-7")
            .with_header("payload", "not the payload")
            .with_header("trace-id", "abc")
            .with_header("trace-id", "def");
        assert_eq!(
            args(&xadd("orders", Some(1000), &m)),
            [
                "XADD",
                "orders",
                "MAXLEN",
                "~",
                "1000",
                "*",
                "payload",
                "p",
                "key",
                "customer-7",
                "id",
                "0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70",
                "h:payload",
                "not the payload",
                "h:trace-id",
                "abc",
                "h:trace-id",
                "def",
            ]
        );
        assert_eq!(
            args(&xadd("s", None, &Message::new("s", vec![0u8, 255]))),
            ["XADD", "s", "*", "payload", "\0\u{fffd}"]
        );
        assert_eq!(
            entry_size(&m),
            "payload".len()
                + 1
                + "key".len()
                + 10
                + "id".len()
                + 36
                + ("h:payload".len() + 15)
                + 2 * ("h:trace-id".len() + 3)
        );
    }

    #[test]
    fn entry_ids_map_to_ordered_offsets() {
        assert_eq!(entry_offset("0-1"), Some(1));
        assert_eq!(
            entry_offset("1700000000123-0"),
            Some(1_700_000_000_123_000_000)
        );
        assert!(entry_offset("1-999999") < entry_offset("2-0"));
        for bad in [
            "",
            "12",
            "a-1",
            "1-b",
            "1-1000000",
            "-1-0",
            "99999999999999999-0",
        ] {
            assert_eq!(entry_offset(bad), None, "{bad}");
        }
        for id in ["0-1", "1700000000123-42"] {
            assert_eq!(entry_id(entry_offset(id).expect("fits")), id);
        }
    }
}
