//! The transport against brokers that are not real, with the public API only: a port nothing
//! listens on, and a fake AMQP server that never confirms or blocks the connection. Hermetic:
//! part of `cargo test --workspace` (the real-broker tests are in `it.rs`).

mod common;

use std::time::Duration;

use common::closed_port;
use common::fake_broker::{fake_broker, fake_broker_counting, Fake};
use futures_util::future::join_all;
use herald_amqp::{AmqpConfig, AmqpTransport};
use herald_batch::SizeOrLinger;
use herald_core::{Destination, ErrorClass, Message, Producer, Transport};
use herald_retry::{Backoff, CircuitBreakerConfig, ExponentialRetry};

/// A transport on one channel to the fake broker at `port`, configured by `tune`, connected.
async fn connected(port: u16, tune: impl FnOnce(AmqpConfig) -> AmqpConfig) -> AmqpTransport {
    let config = AmqpConfig::from_url(&format!("amqp://127.0.0.1:{port}/%2F"))
        .expect("url")
        .channels(1);
    let t = AmqpTransport::new(tune(config)).expect("transport");
    t.connect()
        .await
        .expect("the fake broker takes the handshake");
    t
}

/// Sends `batch` to `q`, which must end within 5 s (`why` says why it would not) with every
/// message failed transiently (not confirmed).
async fn every_one_transient(t: &AmqpTransport, batch: &[Message], why: &str) {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        t.send_batch(&Destination::new("q"), batch),
    )
    .await
    .expect(why);
    for o in &out {
        let e = o.as_ref().expect_err("not confirmed");
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    }
}
/// `n` messages to the queue `q`: `m0`, `m1`, ...
fn numbered(n: usize) -> Vec<Message> {
    (0..n).map(|i| Message::new("q", format!("m{i}"))).collect()
}

#[tokio::test]
async fn an_unreachable_broker_fails_the_batch_transiently_and_backs_off() {
    let url = format!("amqp://app:hunter2-secret@127.0.0.1:{}/%2F", closed_port());
    let t = AmqpTransport::new(
        AmqpConfig::from_url(&url)
            .expect("url")
            .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(1)),
    )
    .expect("transport");
    assert!(!format!("{t:?}").contains("hunter2"), "{t:?}");
    let batch = vec![Message::new("q", "a"), Message::new("q", "b")];
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    assert_eq!(out.len(), 2);
    for o in &out {
        let e = o.as_ref().expect_err("no broker");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some("UNREACHABLE"))
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("app:***@127.0.0.1"), "{e}");
    }
    // The next attempt waits out the backoff instead of hammering the broker.
    let started = std::time::Instant::now();
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    assert!(out.iter().all(Result::is_err));
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    assert!(!t.is_connected() && !t.is_blocked());
}

#[tokio::test]
async fn an_invalid_destination_fails_permanently_without_connecting() {
    let url = format!("amqp://127.0.0.1:{}/%2F", closed_port());
    let t = AmqpTransport::new(AmqpConfig::from_url(&url).expect("url")).expect("transport");
    let out = t
        .send_batch(&Destination::new(""), &[Message::new("", "x")])
        .await;
    let e = out[0].as_ref().expect_err("invalid");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
    );
}

#[tokio::test]
async fn concurrent_calls_wait_out_the_backoff_side_by_side() {
    let url = format!("amqp://127.0.0.1:{}/%2F", closed_port());
    let t = AmqpTransport::new(
        AmqpConfig::from_url(&url)
            .expect("url")
            .reconnect_backoff(BACKOFF, BACKOFF),
    )
    .expect("transport");
    assert!(t.connect().await.is_err());
    // Four calls during the backoff: they wait together (about one backoff), not one
    // behind the other (four backoffs), and fail transiently. The bound sits halfway, so
    // a slow, shared machine has a whole backoff and a half of slack.
    const BACKOFF: Duration = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let results = join_all((0..4).map(|_| t.connect())).await;
    assert!(
        started.elapsed() < BACKOFF * 5 / 2,
        "four calls took {:?}: they waited one after the other",
        started.elapsed()
    );
    for r in results {
        assert_eq!(r.expect_err("down").class(), ErrorClass::Transient);
    }
}

#[tokio::test]
async fn missing_confirms_time_out_once_per_batch_not_once_per_message() {
    // The first publish of a channel is confirmed (it goes alone), the nine after it never.
    let port = fake_broker(Fake::ConfirmsFirst).await;
    // A second: the first publish's confirm comes in time on a loaded machine too. Once per
    // message would take nine (the nine never confirmed).
    let t = connected(port, |c| c.confirm_timeout(Duration::from_secs(1))).await;
    let batch = numbered(10);
    let started = std::time::Instant::now();
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(out[0].is_ok(), "{:?}", out[0]);
    for o in &out[1..] {
        let e = o.as_ref().expect_err("never confirmed");
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        // The transport reports what happened to each message; holding keys back is the
        // pipeline's (herald_core::KeyHold), not the transport's.
        assert_eq!(e.code(), Some("CONFIRM_TIMEOUT"), "{e}");
    }
}

/// Once the batch's time is up (here: the confirms of the first window never come), what is
/// not handed to lapin yet is not published: it fails with the batch and is retried, rather
/// than going out now and again with the retry.
#[tokio::test]
async fn a_batch_whose_time_is_up_publishes_no_more() {
    let (port, publishes) = fake_broker_counting(Fake::ConfirmsFirst).await;
    // A second: the first publish's confirm comes in time on a loaded machine too.
    let t = connected(port, |c| {
        c.window(4).confirm_timeout(Duration::from_secs(1))
    })
    .await;
    let batch = numbered(41);
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        t.send_batch(&Destination::new("q"), &batch),
    )
    .await
    .expect("the batch ends by its deadline");
    // The first publish goes alone and is confirmed; the 40 after it are streamed.
    assert!(out[0].is_ok(), "{:?}", out[0]);
    for o in &out[1..] {
        let e = o.as_ref().expect_err("not confirmed");
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    }
    // The first and the window (4) reached the broker; nothing else follows. lapin writes what
    // it was handed within milliseconds: were the other 36 handed over, they would arrive well
    // inside the half second watched.
    let count = || publishes.load(std::sync::atomic::Ordering::SeqCst);
    let watch = |until: Duration, done: fn(usize) -> bool| async move {
        let end = tokio::time::Instant::now() + until;
        while !done(count()) && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    watch(Duration::from_secs(5), |n| n >= 5).await;
    assert_eq!(
        count(),
        5,
        "the first and the window's publishes reached the broker"
    );
    watch(Duration::from_millis(500), |n| n > 5).await;
    assert_eq!(
        count(),
        5,
        "publishes went out after the batch's time was up"
    );
}

#[tokio::test]
async fn a_publish_stuck_behind_a_blocked_connection_is_bounded() {
    let port = fake_broker(Fake::Blocks).await;
    let t = connected(port, |c| {
        c.confirm_timeout(Duration::from_millis(500))
            .blocked_timeout(Duration::from_millis(500))
    })
    .await;
    let batch = numbered(5);
    every_one_transient(
        &t,
        &batch,
        "a blocked connection must not hold a batch forever",
    )
    .await;
}

/// Issue 13: an address list. The first address is dead: the transport goes on to the next one
/// within the same attempt and says which node it uses.
#[tokio::test]
async fn a_dead_first_address_is_skipped_for_the_next_one() {
    let good = fake_broker(Fake::Confirms).await;
    let dead = closed_port();
    let url = format!("amqp://app:hunter2-secret@127.0.0.1:{dead},127.0.0.1:{good}/%2F");
    let t = AmqpTransport::new(AmqpConfig::from_url(&url).expect("url")).expect("transport");
    let batch = numbered(5);
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    for o in &out {
        assert!(o.is_ok(), "{o:?}");
    }
    assert_eq!(t.connected_node(), Some(format!("127.0.0.1:{good}")));
    // What the producer's health shows as its endpoint.
    assert_eq!(t.endpoint(), Some(format!("127.0.0.1:{good}")));
}

/// A transport over two fake nodes, one that never confirms first and one that confirms, with a
/// confirm timeout of a second (the good node's confirms come in time on a loaded machine too);
/// and the good node's port.
async fn silent_then_good() -> (AmqpTransport, u16) {
    let silent = fake_broker(Fake::Silent).await;
    let good = fake_broker(Fake::Confirms).await;
    let t = AmqpTransport::new(
        AmqpConfig::from_url("amqp://127.0.0.1/%2F")
            .expect("url")
            .addresses([format!("127.0.0.1:{silent}"), format!("127.0.0.1:{good}")])
            .expect("addresses")
            .confirm_timeout(Duration::from_secs(1)),
    )
    .expect("transport");
    (t, good)
}

/// Issue 13: a node that takes publishes but never confirms them (a hung node, a half-open
/// connection) is given up after the confirm timeout, and the retry goes to the next address.
#[tokio::test]
async fn confirms_that_stop_coming_move_the_transport_to_the_next_address() {
    let (t, good) = silent_then_good().await;
    let batch = numbered(5);
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    // The first publish of the channel went alone, and timed out; the others were not sent.
    assert!(
        out[0]
            .as_ref()
            .is_err_and(|e| e.code() == Some("CONFIRM_TIMEOUT"))
            && out[1..]
                .iter()
                .all(|o| o.as_ref().is_err_and(|e| e.code() == Some("NOT_SENT"))),
        "{out:?}"
    );
    assert_eq!(t.connected_node(), None, "the silent node was given up");
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    for o in &out {
        assert!(o.is_ok(), "{o:?}");
    }
    assert_eq!(t.connected_node(), Some(format!("127.0.0.1:{good}")));
}

/// The same when every call on the silent node is cut off before its confirm timeout (their
/// delivery deadlines come first, as the pipeline cuts a call off): the next call finds the
/// publish left unanswered for the confirm timeout and moves on. The node stayed in use, every
/// call timing out on it.
#[tokio::test]
async fn confirms_that_stop_coming_move_the_transport_on_when_calls_are_cut_off() {
    let (t, good) = silent_then_good().await;
    let batch = numbered(3);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "still on {:?} after 10 s of calls cut off at 100 ms",
            t.connected_node()
        );
        let cut = tokio::time::timeout(
            Duration::from_millis(100),
            t.send_batch(&Destination::new("q"), &batch),
        )
        .await;
        if let Ok(out) = cut {
            if out.iter().all(Result::is_ok) {
                break;
            }
        }
    }
    assert_eq!(t.connected_node(), Some(format!("127.0.0.1:{good}")));
}

/// Every address dead: one error that names each, transient, without the password.
#[tokio::test]
async fn a_list_with_no_live_address_fails_naming_each() {
    let (a, b) = (closed_port(), closed_port());
    let url = format!("amqp://app:hunter2-secret@127.0.0.1:{a},127.0.0.1:{b}/%2F");
    let t = AmqpTransport::new(AmqpConfig::from_url(&url).expect("url")).expect("transport");
    let e = t.connect().await.expect_err("nothing listens");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Transient, Some("NO_ADDRESS"))
    );
    let text = e.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{a}")) && text.contains(&format!("127.0.0.1:{b}")),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

/// A nack of a message streamed on a channel gives the channel up, so that the retry goes out on
/// a new channel instead of one the broker may go on nacking.
#[tokio::test]
async fn a_nack_gives_the_channel_up_and_the_retry_goes_out_on_a_new_one() {
    let port = fake_broker(Fake::NacksFirstChannel).await;
    let t = connected(port, |c| c).await;
    let batch = numbered(5);
    let first = t.send_batch(&Destination::new("q"), &batch).await;
    assert!(
        first[0].is_ok(),
        "the first publish is confirmed: {:?}",
        first[0]
    );
    for o in &first[1..] {
        let e = o
            .as_ref()
            .expect_err("the first channel nacks the later ones");
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        assert_eq!(e.code(), Some("NACK"), "{e}");
    }
    let retry = t.send_batch(&Destination::new("q"), &batch[1..]).await;
    for o in &retry {
        assert!(
            o.is_ok(),
            "the retry went out on the nacking channel again: {o:?}"
        );
    }
}

/// Issue 13 and 15: RabbitMQ 3.10 nacks a channel's first publishes to a quorum queue while the
/// queue has no leader it can reach (a new one is being elected after a node died), and keeps
/// nacking on a channel that recorded the dead leader. A channel's first publish goes alone; a
/// nack of it is published again, on a new channel, within the same call, and the others follow.
#[tokio::test]
async fn a_nacked_first_publish_goes_out_again_on_a_new_channel_in_the_same_call() {
    let broker = common::fake_broker::start(Fake::NacksFirst(2)).await;
    let t = connected(broker.port, |c| {
        c.reconnect_backoff(Duration::from_millis(5), Duration::from_millis(20))
    })
    .await;
    let batch = numbered(5);
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    for o in &out {
        assert!(o.is_ok(), "{o:?}");
    }
    // Twice nacked alone, then confirmed alone, then the other four streamed: nothing but the
    // first message was published before the channel was proven.
    assert_eq!(
        broker.publishes.load(std::sync::atomic::Ordering::SeqCst),
        7
    );
    assert_eq!(
        *broker.stored.lock().expect("stored"),
        ["m0", "m1", "m2", "m3", "m4"].map(|m| m.as_bytes().to_vec())
    );
}

/// A broker that nacks every publish: the first goes out again on new channels for half the
/// batch's time, then fails as nacked, and the others, never published, as `NOT_SENT`.
#[tokio::test]
async fn a_first_publish_nacked_until_the_deadline_fails_the_batch_unsent() {
    let broker = common::fake_broker::start(Fake::NacksFirst(usize::MAX)).await;
    let t = connected(broker.port, |c| {
        c.confirm_timeout(Duration::from_secs(1))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(50))
    })
    .await;
    let batch = numbered(5);
    let started = std::time::Instant::now();
    let out = t.send_batch(&Destination::new("q"), &batch).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    for (i, o) in out.iter().enumerate() {
        let e = o.as_ref().expect_err("never confirmed");
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        // Publishing it again takes at most half the batch's time: it ends nacked, with time
        // left, not timed out.
        let code = if i == 0 { "NACK" } else { "NOT_SENT" };
        assert_eq!(e.code(), Some(code), "{e}");
    }
    assert!(
        t.is_connected(),
        "a nacking broker is not one that stopped confirming: the connection stays"
    );
    // Only the first message was published, once or again after each pause (how many times
    // depends on the machine's speed; the test before counts them on a broker that relents).
    let publishes = broker.publishes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=16).contains(&publishes),
        "the first message alone, again after each pause: {publishes} publishes"
    );
}

/// Issue 15: RabbitMQ 3.10 nacks a channel's first publishes to a quorum queue while the queue
/// elects a new leader (after the node it was on died), and takes the channel's later ones once
/// the election is over. Streamed, a key's message was nacked and its successor, a few
/// publishes later, stored: its retry then landed behind it (seen in the three-node cluster's
/// failover test). Here the broker nacks its first 5 publishes (fewer than a channel gets of
/// the first batch); a producer under strict ordering, with batches pipelined, must still store
/// the first copy of each key's messages in order, and deliver every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_then_acks_on_new_channels_keep_each_key_s_first_copies_in_order() {
    const N: usize = 600;
    const KEYS: usize = 7;
    const NACKS: usize = 5;
    let broker = common::fake_broker::start(Fake::NacksFirst(NACKS)).await;
    let transport = AmqpTransport::new(
        AmqpConfig::from_url(&format!("amqp://127.0.0.1:{}/%2F", broker.port))
            .expect("url")
            .channels(2),
    )
    .expect("transport");
    let producer = Producer::builder(transport)
        .batching(SizeOrLinger::new(25, 1 << 20, Duration::from_millis(20)))
        .pipeline_depth(4)
        .retry(
            ExponentialRetry::new(Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
            ))
            .unlimited_attempts(),
        )
        // Not what is tested: each failed round would count against it.
        .circuit_breaker(CircuitBreakerConfig {
            enabled: false,
            ..CircuitBreakerConfig::default()
        })
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .expect("producer");
    let destination = Destination::new("q");
    let report = producer
        .send_all((0..N).map(|i| {
            Message::new(destination.clone(), format!("k{}-{}", i % KEYS, i / KEYS))
                .with_key(format!("k{}", i % KEYS))
        }))
        .await
        .wait()
        .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, N as u64);
    producer.close(Duration::from_secs(5)).await;
    let stored = broker.stored.lock().expect("stored").clone();
    let mut seen = std::collections::HashSet::new();
    let mut last = [None::<usize>; KEYS];
    for payload in &stored {
        if !seen.insert(payload.clone()) {
            continue;
        }
        let text = std::str::from_utf8(payload).expect("utf-8");
        let (key, seq) = text[1..].split_once('-').expect("k{key}-{seq}");
        let (key, seq): (usize, usize) = (key.parse().expect("key"), seq.parse().expect("seq"));
        assert!(
            last[key].is_none_or(|l| l < seq),
            "key k{key}: the first copy of {seq} was stored after that of {:?}",
            last[key]
        );
        last[key] = Some(seq);
    }
    assert_eq!(seen.len(), N, "every message stored");
}

/// A channel that a RabbitMQ closes for one destination's oversized message fails whatever else
/// was in flight on it, here another destination's first publish on that channel (sent alone,
/// to prove the channel for its route): that one was not too large, so it fails as
/// `CHANNEL_CLOSED`, transient and retried, not as the permanent "too large" the broker's 406
/// names, which belongs to the other message alone; and the rest of its group stays unsent,
/// rather than going alone on a new channel ahead of that message's retry.
#[tokio::test]
async fn a_first_publish_on_a_channel_closed_for_another_destination_s_oversized_message_is_retried(
) {
    let broker = common::fake_broker::start(Fake::ClosesOversize(100)).await;
    // One channel: both destinations share it.
    let t = std::sync::Arc::new(connected(broker.port, |c| c).await);
    let big = vec![Message::new("a", vec![b'x'; 200])];
    let oversized = {
        let t = std::sync::Arc::clone(&t);
        tokio::spawn(async move { t.send_batch(&Destination::new("a"), &big).await })
    };
    // The broker has read the oversized publish (and holds its close back until the next one).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.publishes.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the oversized message was never published"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Two messages of one key: the second must not go out ahead of the first's retry.
    let small = vec![
        Message::new("b", "b0").with_key("k"),
        Message::new("b", "b1").with_key("k"),
    ];
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        t.send_batch(&Destination::new("b"), &small),
    )
    .await
    .expect("the other destination's call ends");
    let own = tokio::time::timeout(Duration::from_secs(5), oversized)
        .await
        .expect("the oversized message's call ends")
        .expect("its task");
    let e = own[0].as_ref().expect_err("too large");
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert_eq!(e.code(), Some("PRECONDITION_FAILED"), "{e}");
    let e = other[0]
        .as_ref()
        .expect_err("in flight on the closed channel");
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    assert_eq!(e.code(), Some("CHANNEL_CLOSED"), "{e}");
    let e = other[1].as_ref().expect_err("not sent ahead of b0's retry");
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    // Nothing of `b` was stored, and `b1` was never published.
    assert!(broker.stored.lock().expect("stored").is_empty());
    assert_eq!(
        broker.publishes.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}
