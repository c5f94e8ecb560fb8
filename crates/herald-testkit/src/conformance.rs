//! The adapter conformance suite: what every transport must do inside a herald producer.
//!
//! An adapter's tests implement [`Harness`] (how to get a transport, a fresh destination, a
//! message the broker rejects, and how to read back what arrived) and call [`run`]. Each check
//! panics with its name and what went wrong.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use herald_core::{
    async_trait, Destination, EarlyAcks, ErrorClass, FailureReason, Message, MessageId, Producer,
    ProducerBuilder, Transport,
};

/// What the suite needs from an adapter's test environment.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The transport under test.
    type Transport: Transport;

    /// A new transport, connected to the test broker.
    async fn transport(&self) -> Self::Transport;

    /// A destination that exists and holds nothing yet; `hint` is unique per check and may be
    /// used in its name.
    async fn destination(&self, hint: &str) -> Destination;

    /// A message the broker rejects permanently (too large, unroutable), or `None` if the
    /// broker has no such case; the check is then skipped.
    fn poison(&self, destination: &Destination) -> Option<Message>;

    /// The messages that arrived at `destination`, in the order the broker stores them per key,
    /// once at least `expected` are there (or a deadline of the harness's choosing passes).
    /// `None` if the harness cannot read back; the suite then checks outcomes only.
    async fn read_back(&self, destination: &Destination, expected: usize) -> Option<Vec<Message>>;

    /// Makes the next `calls` sends fail transiently, if the harness can inject faults, and says
    /// where: the suite then checks that nothing is lost, and, for faults the transport reports
    /// to herald, that herald retried.
    async fn inject_transient_failures(&self, calls: usize) -> Injected;

    /// Whether the transport answers each acknowledged message early
    /// ([`Transport::send_batch_answering`]): the suite then checks that it does, for every
    /// message it delivers. Default: `false` (only checked: what it answers early agrees with
    /// the batch's outcomes).
    fn answers_early(&self) -> bool {
        false
    }

    /// Extra settings the adapter needs on the producer (timeouts, say). Default: none.
    fn configure(&self, builder: ProducerBuilder) -> ProducerBuilder {
        builder
    }
}

/// Where a harness injected transient faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// The harness cannot inject faults: the check is skipped.
    Nothing,
    /// Into the transport's answers: herald sees them and must retry.
    IntoTransport,
    /// Into the broker: the client library may retry them itself (librdkafka does), so herald
    /// may see nothing; only "nothing lost, order kept" is checked.
    IntoBroker,
}

/// Runs every check, in order. Panics on the first failure, naming the check.
pub async fn run<H: Harness>(h: &H) {
    check("delivers_every_message", delivers_every_message(h)).await;
    check("keeps_per_key_order", keeps_per_key_order(h)).await;
    check("large_batches", large_batches(h)).await;
    check(
        "early_answers_agree_with_outcomes",
        early_answers_agree_with_outcomes(h),
    )
    .await;
    check(
        "permanent_error_hands_message_back",
        permanent_error_hands_message_back(h),
    )
    .await;
    check(
        "oversized_message_fails_alone",
        oversized_message_fails_alone(h),
    )
    .await;
    check(
        "nothing_is_sent_past_the_deadline",
        nothing_is_sent_past_the_deadline(h),
    )
    .await;
    check("flush_waits_for_everything", flush_waits_for_everything(h)).await;
    check("close_drains_then_refuses", close_drains_then_refuses(h)).await;
    check("rides_out_transient_faults", rides_out_transient_faults(h)).await;
}

async fn check(name: &str, f: impl Future<Output = ()>) {
    eprintln!("conformance: {name}");
    f.await;
}

async fn producer<H: Harness>(
    h: &H,
    extra: impl FnOnce(ProducerBuilder) -> ProducerBuilder,
) -> Producer {
    let builder = Producer::builder(h.transport().await)
        .retry(
            herald_retry::ExponentialRetry::new(herald_retry::Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(200),
            ))
            .unlimited_attempts(),
        )
        .delivery_timeout(Duration::from_secs(60));
    extra(h.configure(builder))
        .build()
        .expect("conformance: the producer must build")
}

/// A transport's early answers ([`Transport::send_batch_answering`]) name messages of the batch,
/// each once, with the acknowledgement its outcome gives; a transport that answers early does so
/// for every message it delivers.
async fn early_answers_agree_with_outcomes<H: Harness>(h: &H) {
    let check = "early_answers_agree_with_outcomes";
    let transport = h.transport().await;
    let dest = h.destination("early").await;
    let batch = keyed(&dest, 50, 5, "early");
    let early = EarlyAcks::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let outcomes = transport
        .send_batch_answering(&dest, &batch, deadline, early.clone())
        .await;
    assert_eq!(
        outcomes.len(),
        batch.len(),
        "{check}: one outcome per message"
    );
    let answered = early.pending();
    let mut seen = vec![false; batch.len()];
    for (index, ack) in &answered {
        assert!(
            *index < batch.len(),
            "{check}: index {index} is not in the batch"
        );
        assert!(!seen[*index], "{check}: message {index} answered twice");
        seen[*index] = true;
        assert_eq!(
            outcomes[*index].as_ref().ok(),
            Some(ack),
            "{check}: message {index} was answered early with another outcome"
        );
    }
    if h.answers_early() {
        for (index, outcome) in outcomes.iter().enumerate() {
            assert!(
                outcome.is_err() || seen[index],
                "{check}: message {index} was delivered but not answered early"
            );
        }
        assert!(
            !answered.is_empty(),
            "{check}: nothing delivered: {:?}",
            outcomes.first()
        );
    }
    transport.close().await;
}

fn keyed(dest: &Destination, n: usize, keys: usize, tag: &str) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new(dest.clone(), format!("{tag}-{i}"))
                .with_key(format!("key-{}", i % keys))
                .with_header("seq", i.to_string())
        })
        .collect()
}

/// Every payload arrived (at least once: delivery is at-least-once), and keyed messages arrived
/// in sending order per key. Unkeyed messages promise no order: a broker may spread them (Kafka
/// over partitions).
fn assert_arrived(check: &str, sent: &[Message], got: &[Message]) {
    let mut count: HashMap<&Bytes, usize> = HashMap::new();
    for m in got {
        *count.entry(m.payload()).or_default() += 1;
    }
    for m in sent {
        let c = count.get(m.payload()).copied().unwrap_or(0);
        assert!(
            c >= 1,
            "{check}: payload {:?} never arrived",
            String::from_utf8_lossy(m.payload())
        );
    }
    let position: HashMap<&Bytes, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.payload(), i))
        .collect();
    let mut last: HashMap<&Bytes, usize> = HashMap::new();
    for m in got {
        let Some(&pos) = position.get(m.payload()) else {
            continue;
        };
        // The key it was sent with: a key lost on the way must not switch the check off.
        let Some(key) = sent[pos].key() else {
            continue;
        };
        if let Some(read) = m.key() {
            assert_eq!(
                read, key,
                "{check}: message #{pos} read back with another key"
            );
        }
        if let Some(prev) = last.insert(key, pos) {
            assert!(
                prev <= pos,
                "{check}: per-key order broken: message #{pos} arrived after #{prev} for key {:?}",
                String::from_utf8_lossy(key)
            );
        }
    }
}

/// Past the attempt's deadline a transport hands its broker nothing
/// ([`Transport::send_batch_until`]; herald may poll a call once more then): a call whose
/// deadline has passed, by either way herald calls it, fails every message transiently as
/// `NOT_SENT` and stores none; with time left, the same transport delivers.
async fn nothing_is_sent_past_the_deadline<H: Harness>(h: &H) {
    let check = "nothing_is_sent_past_the_deadline";
    let transport = h.transport().await;
    let dest = h.destination("late").await;
    // Ids, as a producer gives them (a broker that drops duplicates by id must not drop these).
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        << 32;
    let with_ids = |batch: Vec<Message>, from: u128| -> Vec<Message> {
        (from..)
            .zip(batch)
            .map(|(n, m)| m.with_id(MessageId::from_u128(base | n)))
            .collect()
    };
    let late = with_ids(keyed(&dest, 5, 2, "late"), 0);
    // Deadlines are on Tokio's clock.
    let now = || tokio::time::Instant::now().into_std();
    let past = now();
    let calls = [
        (
            "send_batch_until",
            transport.send_batch_until(&dest, &late, past).await,
        ),
        (
            "send_batch_answering",
            transport
                .send_batch_answering(&dest, &late, past, EarlyAcks::default())
                .await,
        ),
    ];
    for (call, outcomes) in calls {
        assert_eq!(
            outcomes.len(),
            late.len(),
            "{check}: {call}: one outcome per message"
        );
        for (i, outcome) in outcomes.iter().enumerate() {
            let Err(e) = outcome else {
                panic!("{check}: {call}: message {i} was sent past its deadline");
            };
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Transient, Some("NOT_SENT")),
                "{check}: {call}: message {i}: {e}"
            );
        }
    }
    let on_time = with_ids(keyed(&dest, 5, 2, "on-time"), 100);
    let outcomes = transport
        .send_batch_until(&dest, &on_time, now() + Duration::from_secs(30))
        .await;
    for (i, outcome) in outcomes.iter().enumerate() {
        assert!(
            outcome.is_ok(),
            "{check}: message {i} with time left: {outcome:?}"
        );
    }
    if let Some(got) = h.read_back(&dest, on_time.len()).await {
        // Had any late message been stored, it would be there, ahead of these.
        let stored_late: Vec<&Bytes> = got
            .iter()
            .map(Message::payload)
            .filter(|p| p.starts_with(b"late-"))
            .collect();
        assert!(
            stored_late.is_empty(),
            "{check}: stored past the deadline: {stored_late:?}"
        );
        assert_arrived(check, &on_time, &got);
    }
    transport.close().await;
}

async fn delivers_every_message<H: Harness>(h: &H) {
    let dest = h.destination("every").await;
    let p = producer(h, |b| b).await;
    let msgs = keyed(&dest, 2_000, 10, "every");
    let report = p.send_all(msgs.clone()).await.wait().await;
    assert!(
        report.failed.is_empty(),
        "delivers_every_message: {:?}",
        report.failed.first()
    );
    assert_eq!(
        report.delivered, 2_000,
        "delivers_every_message: delivered count"
    );
    if let Some(got) = h.read_back(&dest, msgs.len()).await {
        assert_arrived("delivers_every_message", &msgs, &got);
    }
    let close = p.close(Duration::from_secs(30)).await;
    assert!(close.drained, "delivers_every_message: close did not drain");
    assert_eq!(close.totals.delivered, 2_000);
}

async fn keeps_per_key_order<H: Harness>(h: &H) {
    let dest = h.destination("order").await;
    let p = producer(h, |b| b.max_in_flight(4)).await;
    let msgs = keyed(&dest, 600, 3, "order");
    let mut futures = Vec::new();
    for m in msgs.clone() {
        futures.push(p.enqueue(m).await.expect("keeps_per_key_order: enqueue"));
    }
    let mut last_offset: HashMap<Option<Bytes>, (usize, Option<i64>)> = HashMap::new();
    for (i, f) in futures.into_iter().enumerate() {
        let d = f.await.expect("keeps_per_key_order: delivery");
        let key = msgs[i].key().cloned();
        if let (Some((_, Some(prev))), Some(off)) = (last_offset.get(&key), d.ack.offset) {
            if d.ack.partition.is_some() {
                assert!(
                    *prev < off,
                    "keeps_per_key_order: offsets go backwards for one key"
                );
            }
        }
        last_offset.insert(key, (i, d.ack.offset));
    }
    if let Some(got) = h.read_back(&dest, msgs.len()).await {
        assert_arrived("keeps_per_key_order", &msgs, &got);
    }
    p.close(Duration::from_secs(30)).await;
}

async fn large_batches<H: Harness>(h: &H) {
    let dest = h.destination("large").await;
    let p = producer(h, |b| {
        b.batching(herald_batch::SizeOrLinger::new(
            10_000,
            8 << 20,
            Duration::from_millis(20),
        ))
    })
    .await;
    let msgs: Vec<Message> = (0..20_000)
        .map(|i| Message::new(dest.clone(), format!("large-{i}")))
        .collect();
    let report = p.send_all(msgs.clone()).await.wait().await;
    assert!(
        report.failed.is_empty(),
        "large_batches: {:?}",
        report.failed.first()
    );
    assert_eq!(report.delivered, 20_000, "large_batches");
    if let Some(got) = h.read_back(&dest, msgs.len()).await {
        assert_arrived("large_batches", &msgs, &got);
    }
    p.close(Duration::from_secs(30)).await;
}

async fn permanent_error_hands_message_back<H: Harness>(h: &H) {
    let dest = h.destination("poison").await;
    let Some(poison) = h.poison(&dest) else {
        eprintln!(
            "SKIPPED: conformance permanent_error_hands_message_back: the harness has no poison message"
        );
        return;
    };
    let p = producer(h, |b| b).await;
    let mut msgs = keyed(&dest, 10, 10, "around-poison");
    msgs.insert(5, poison.clone());
    let report = p.send_all(msgs).await.wait().await;
    assert_eq!(
        report.delivered, 10,
        "permanent_error_hands_message_back: the others go through"
    );
    assert_eq!(
        report.failed.len(),
        1,
        "permanent_error_hands_message_back: one failure"
    );
    let e = &report.failed[0];
    assert_eq!(
        e.class(),
        ErrorClass::Permanent,
        "permanent_error_hands_message_back: {e}"
    );
    assert_eq!(
        e.attempts(),
        1,
        "permanent_error_hands_message_back: no retry of a permanent error"
    );
    assert_eq!(
        e.message().payload(),
        poison.payload(),
        "the message itself comes back"
    );
    p.close(Duration::from_secs(30)).await;
}

async fn oversized_message_fails_alone<H: Harness>(h: &H) {
    let dest = h.destination("oversized").await;
    let p = producer(h, |b| b.max_message_bytes(1_000)).await;
    let big = Message::new(dest.clone(), vec![b'x'; 1_001]);
    let e = p
        .send(big)
        .await
        .expect_err("oversized_message_fails_alone: must fail");
    assert!(
        matches!(
            e.reason(),
            FailureReason::TooLarge {
                size: 1_001,
                max: 1_000
            }
        ),
        "oversized_message_fails_alone: {e}"
    );
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_eq!(e.message().payload().len(), 1_001);
    p.send(Message::new(dest.clone(), "small"))
        .await
        .expect("oversized_message_fails_alone: a normal message still goes");
    p.close(Duration::from_secs(30)).await;
}

async fn flush_waits_for_everything<H: Harness>(h: &H) {
    let dest = h.destination("flush").await;
    // A long linger: only the flush can make these go soon.
    let p = producer(h, |b| {
        b.batching(herald_batch::SizeOrLinger::new(
            100_000,
            64 << 20,
            Duration::from_secs(30),
        ))
    })
    .await;
    let receipt = p.send_all(keyed(&dest, 300, 4, "flush")).await;
    tokio::time::timeout(Duration::from_secs(20), p.flush())
        .await
        .expect("flush_waits_for_everything: flush must not wait for the 30 s linger");
    assert_eq!(
        receipt.pending(),
        0,
        "flush_waits_for_everything: all ended after flush"
    );
    let report = receipt.wait().await;
    assert_eq!(report.delivered, 300);
    assert_eq!(p.stats().buffered_messages, 0);
    p.close(Duration::from_secs(30)).await;
}

async fn close_drains_then_refuses<H: Harness>(h: &H) {
    let dest = h.destination("close").await;
    let p = producer(h, |b| {
        b.batching(herald_batch::SizeOrLinger::new(
            100_000,
            64 << 20,
            Duration::from_secs(30),
        ))
    })
    .await;
    let receipt = p.send_all(keyed(&dest, 500, 5, "close")).await;
    let report = p.close(Duration::from_secs(30)).await;
    assert!(
        report.drained,
        "close_drains_then_refuses: close must deliver what was accepted"
    );
    assert_eq!(report.totals.delivered, 500);
    assert_eq!(receipt.wait().await.delivered, 500);
    let late = Message::new(dest.clone(), "after-close");
    let e = p
        .send(late)
        .await
        .expect_err("close_drains_then_refuses: send after close must fail");
    assert!(matches!(e.reason(), FailureReason::Closed), "{e}");
    assert_eq!(e.message().payload().as_ref(), b"after-close");
}

async fn rides_out_transient_faults<H: Harness>(h: &H) {
    let dest = h.destination("faults").await;
    let p = producer(h, |b| b).await;
    let injected = h.inject_transient_failures(3).await;
    if injected == Injected::Nothing {
        eprintln!(
            "SKIPPED: conformance rides_out_transient_faults: the harness cannot inject faults"
        );
        p.close(Duration::from_secs(5)).await;
        return;
    }
    let msgs = keyed(&dest, 200, 4, "faults");
    let report = p.send_all(msgs.clone()).await.wait().await;
    assert!(
        report.failed.is_empty(),
        "rides_out_transient_faults: {:?}",
        report.failed.first()
    );
    assert_eq!(report.delivered, 200);
    let stats = p.stats();
    if injected == Injected::IntoTransport {
        assert!(
            stats.totals.retries >= 1,
            "rides_out_transient_faults: expected retries, got none"
        );
    }
    if let Some(got) = h.read_back(&dest, msgs.len()).await {
        assert_arrived("rides_out_transient_faults", &msgs, &got);
    }
    p.close(Duration::from_secs(30)).await;
}
