//! The Kafka transport on librdkafka's in-process mock cluster: hermetic, in
//! `cargo test --workspace`.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{
    assert_all_stored_last_copies_in_order, assert_exactly_once_in_order, health_becomes,
    read_back, KafkaHarness,
};
use herald_core::{
    Destination, ErrorClass, FailureReason, HealthIssue, HealthStatus, Message, MessageId, Producer,
};
use herald_kafka::mock::{MockKafka, ProduceFault};
use herald_kafka::{KafkaConfig, KafkaTransport};
use herald_retry::{Backoff, ExponentialRetry};
use herald_testkit::conformance::{self, Injected};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

fn keyed(topic: &str, n: usize, keys: usize) -> Vec<Message> {
    let d = Destination::new(topic);
    (0..n)
        .map(|i| Message::new(d.clone(), format!("{topic}-{i}")).with_key(format!("k{}", i % keys)))
        .collect()
}

async fn read(cluster: &MockKafka, topic: &str, expected: usize) -> Vec<Message> {
    let bootstrap = cluster.bootstrap_servers().to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        read_back(&bootstrap, &topic, expected, Duration::from_secs(60))
    })
    .await
    .expect("read back")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_transport_passes_the_conformance_suite_on_the_mock_cluster() {
    let cluster = Arc::new(MockKafka::start(3).expect("mock cluster"));
    let (c1, c2) = (cluster.clone(), cluster.clone());
    let harness = KafkaHarness {
        bootstrap: cluster.bootstrap_servers().to_owned(),
        create_topic: Box::new(move |name| c1.create_topic(name, 3).expect("topic")),
        inject: Box::new(move |n| {
            c2.fail_produce_requests(&vec![ProduceFault::NotEnoughReplicas; n])
                .expect("inject");
            Injected::IntoBroker
        }),
        prefix: "conformance".into(),
    };
    conformance::run(&harness).await;
}

/// Broker errors that librdkafka retries itself (idempotence on): the mock fails the next five
/// produce requests, so librdkafka must have sent those messages again, and it did so inside
/// herald's first attempt: herald retried nothing (the division of work docs/guarantees.md
/// describes), and nothing was lost, duplicated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_transient_errors_lose_nothing_duplicate_nothing_and_keep_order() {
    let cluster = MockKafka::start(3).expect("mock cluster");
    cluster.create_topic("faults", 3).expect("topic");
    let transport =
        KafkaTransport::new(KafkaConfig::new(cluster.bootstrap_servers())).expect("transport");
    let producer = Producer::builder(transport).build().expect("producer");
    let msgs = keyed("faults", 5_000, 16);
    cluster
        .fail_produce_requests(&[
            ProduceFault::NotEnoughReplicas,
            ProduceFault::LeaderNotAvailable,
            ProduceFault::Transport,
            ProduceFault::NotEnoughReplicas,
            ProduceFault::RequestTimedOut,
        ])
        .expect("inject");
    let report = producer.send_all(msgs.clone()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, 5_000);
    assert_eq!(
        producer.stats().totals.retries,
        0,
        "librdkafka retried these itself, within herald's first attempt"
    );
    producer.close(Duration::from_secs(10)).await;
    assert_exactly_once_in_order(&msgs, &read(&cluster, "faults", msgs.len()).await);
}

/// With idempotence off, librdkafka's own retries reorder a partition: a request it retries
/// lands behind the ones it built meanwhile (even with one request in flight), every delivery
/// report `Ok`. herald turns them off then and retries itself, behind its per-key hold: each
/// key's last copies are in order. Before: `the last copy of #10 is stored before the last
/// copy of #9`. (librdkafka still retries a leader change itself, whatever its settings: the
/// gap docs/guarantees.md names.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_idempotence_retries_keep_each_key_s_order() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("plain", 1).expect("topic");
    // Small requests, a round trip long enough for several to be built at once.
    cluster
        .round_trip_time(1, Duration::from_millis(50))
        .expect("rtt");
    let transport = KafkaTransport::new(
        KafkaConfig::new(cluster.bootstrap_servers())
            .idempotence(false)
            .batch_num_messages(10),
    )
    .expect("transport");
    let producer = Producer::builder(transport)
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        )))
        .build()
        .expect("producer");
    let msgs = keyed("plain", 1_000, 1);
    cluster
        .fail_produce_requests(&[ProduceFault::NotEnoughReplicas])
        .expect("inject");
    let report = producer.send_all(msgs.clone()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert!(
        producer.stats().totals.retries > 0,
        "herald retried, not librdkafka"
    );
    producer.close(Duration::from_secs(10)).await;
    let got = read_all(&cluster, "plain").await;
    assert_all_stored_last_copies_in_order(&msgs, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_a_while_then_up_loses_nothing() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("outage", 2).expect("topic");
    // librdkafka gives up on a message after 2 s; herald keeps it for 60 s and retries it.
    let transport = KafkaTransport::new(
        KafkaConfig::new(cluster.bootstrap_servers()).message_timeout(Duration::from_secs(2)),
    )
    .expect("transport");
    let producer = Producer::builder(transport)
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        )))
        .delivery_timeout(Duration::from_secs(60))
        .build()
        .expect("producer");
    let first = keyed("outage", 1_000, 8);
    assert_eq!(
        producer
            .send_all(first.clone())
            .await
            .wait()
            .await
            .delivered,
        1_000
    );
    cluster.broker_down(1).expect("down");
    let second: Vec<Message> = (1_000..3_000)
        .map(|i| Message::new("outage", format!("outage-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    let receipt = producer.send_all(second.clone()).await;
    // Down until librdkafka has timed messages out (2 s) and herald is retrying them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while producer.stats().totals.retries == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "herald never retried during the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    health_becomes(&producer, Duration::from_secs(10), "transport down", |h| {
        h.status == HealthStatus::Unhealthy
            && h.issues
                .iter()
                .any(|i| matches!(i, HealthIssue::TransportDown(_)))
    })
    .await;
    assert!(
        receipt.pending() > 0,
        "nothing can be delivered while the only broker is down"
    );
    cluster.broker_up(1).expect("up");
    let report = receipt.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, 2_000);
    health_becomes(&producer, Duration::from_secs(10), "healthy again", |h| {
        h.status == HealthStatus::Healthy
    })
    .await;
    producer.close(Duration::from_secs(10)).await;
    let all: Vec<Message> = first.into_iter().chain(second).collect();
    // Nothing lost, nothing else stored, and per key what a consumer ends with is in sending
    // order (duplicates, if any, before their last copy).
    assert_all_stored_last_copies_in_order(&all, &read_all(&cluster, "outage").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_comes_back_at_once_without_retries() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("big", 1).expect("topic");
    let transport =
        KafkaTransport::new(KafkaConfig::new(cluster.bootstrap_servers())).expect("transport");
    let producer = Producer::builder(transport)
        .max_message_bytes(4 << 20)
        .buffer(1000, 64 << 20)
        .build()
        .expect("producer");
    let big = Message::new("big", vec![0u8; 2_000_000]);
    let started = std::time::Instant::now();
    let e = producer
        .send(big)
        .await
        .expect_err("too large for librdkafka");
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(matches!(e.reason(), FailureReason::Rejected(_)), "{e}");
    assert_eq!(e.attempts(), 1);
    assert_eq!(e.message().payload().len(), 2_000_000, "handed back whole");
    assert_eq!(
        e.reason().transport_error().and_then(|t| t.code()),
        Some("MessageSizeTooLarge")
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at once, not after a timeout"
    );
    producer.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_named() {
    let e = KafkaTransport::new(KafkaConfig::new("127.0.0.1:1").property("no.such.property", "1"))
        .expect_err("unknown property");
    assert!(e.to_string().contains("no.such.property"), "{e}");
    // A property librdkafka refuses is named, its value is not (a misspelt password property
    // holds a password): neither in the error's text nor in its `Debug`.
    let e = KafkaTransport::new(
        KafkaConfig::new("127.0.0.1:1").property("sasl.pasword", "typo-s3cret"),
    )
    .expect_err("unknown property");
    assert!(e.to_string().contains("sasl.pasword"), "{e}");
    assert!(!format!("{e} {e:?}").contains("typo-s3cret"), "{e:?}");
    let cluster = MockKafka::start(1).expect("mock cluster");
    let transport =
        KafkaTransport::new(KafkaConfig::new(cluster.bootstrap_servers())).expect("transport");
    let producer = Producer::builder(transport).build().expect("producer");
    let e = producer
        .send(Message::new("no spaces allowed", "x"))
        .await
        .expect_err("invalid topic");
    assert!(
        e.to_string()
            .contains("invalid Kafka topic name `no spaces allowed`"),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Permanent);
}

/// A principal without the `IdempotentWrite` ACL: the cluster refuses the idempotent producer
/// its id, and librdkafka raises a fatal error. A new producer would be refused the same way,
/// so the messages come back at once, permanent, with the cluster's code; before, each retry
/// built a new producer and the messages ended in the delivery timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_producer_id_hands_the_messages_back_at_once() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("acl", 1).expect("topic");
    cluster.refuse_producer_ids(50).expect("refuse");
    let transport =
        KafkaTransport::new(KafkaConfig::new(cluster.bootstrap_servers())).expect("transport");
    let producer = Producer::builder(transport)
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        )))
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .expect("producer");
    let e = producer
        .send(Message::new("acl", "x"))
        .await
        .expect_err("refused");
    // Permanent: handed back by its first attempt (a transient error would have been retried
    // until the delivery timeout).
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(e.to_string().contains("ClusterAuthorizationFailed"), "{e}");
    producer.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_servers_end_in_a_transient_error_after_the_delivery_timeout() {
    let transport = KafkaTransport::new(
        KafkaConfig::new("127.0.0.1:9").message_timeout(Duration::from_secs(2)),
    )
    .expect("transport");
    let producer = Producer::builder(transport)
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        )))
        .delivery_timeout(Duration::from_secs(3))
        .build()
        .expect("producer");
    let e = producer
        .send(Message::new("t", "x"))
        .await
        .expect_err("nobody listens");
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    assert_eq!(e.message().payload().as_ref(), b"x");
    assert!(
        e.to_string().contains("127.0.0.1:9"),
        "the error names the server it could not reach: {e}"
    );
    health_becomes(
        &producer,
        Duration::from_secs(5),
        "down, naming the server",
        |h| {
            h.issues.iter().any(
                |i| matches!(i, HealthIssue::TransportDown(why) if why.contains("127.0.0.1:9")),
            )
        },
    )
    .await;
}

/// Everything the topic holds, up to each partition's end (not a wait for a count).
async fn read_all(cluster: &MockKafka, topic: &str) -> Vec<Message> {
    let bootstrap = cluster.bootstrap_servers().to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        herald_kafka::admin::read_topic_to_end(&bootstrap, &topic, Duration::from_secs(60))
            .expect("read the topic to its end")
    })
    .await
    .expect("read back")
}

/// `config` sending message ids in the `herald-message-id` header.
fn with_ids(config: KafkaConfig) -> KafkaConfig {
    config.message_id_header(Some(herald_kafka::MESSAGE_ID_HEADER.into()))
}

/// The id a stored message carries in its id header.
fn stored_id(m: &Message) -> Option<MessageId> {
    m.headers()
        .iter()
        .find(|h| h.name == herald_kafka::MESSAGE_ID_HEADER)
        .and_then(|h| std::str::from_utf8(&h.value).ok()?.parse().ok())
}

/// Issue 11, finding 7: an attempt herald cuts off at its delivery deadline must not be
/// delivered by librdkafka later. The broker is down while herald's 2 s delivery timeout
/// passes (librdkafka alone would keep the messages for 60 s); every message is reported
/// failed; the broker comes back and librdkafka is flushed; the topic then holds every message
/// reported delivered and none reported failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reported_failed_is_not_delivered_later() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("abandoned", 2).expect("topic");
    let transport = KafkaTransport::new(
        KafkaConfig::new(cluster.bootstrap_servers())
            .message_timeout(Duration::from_secs(60))
            .property("reconnect.backoff.max.ms", "200"),
    )
    .expect("transport");
    let producer = Producer::builder(transport)
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        )))
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("producer");
    let before = keyed("abandoned", 100, 4);
    let report = producer.send_all(before.clone()).await.wait().await;
    assert_eq!(report.delivered, 100, "{:?}", report.failed.first());

    cluster.broker_down(1).expect("down");
    let during: Vec<Message> = (100..400)
        .map(|i| {
            Message::new("abandoned", format!("abandoned-{i}")).with_key(format!("k{}", i % 4))
        })
        .collect();
    let report = producer.send_all(during).await.wait().await;
    assert_eq!(report.delivered, 0, "the only broker is down");
    assert_eq!(report.failed.len(), 300);
    for e in &report.failed {
        assert!(
            matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
            "{e}"
        );
        assert!(e.attempts() >= 1, "handed to librdkafka: {e}");
    }
    let mut failed: HashSet<Vec<u8>> = report
        .failed
        .iter()
        .map(|e| e.message().payload().to_vec())
        .collect();

    cluster.broker_up(1).expect("up");
    // Messages after the outage until one is delivered (librdkafka reconnects first; those
    // that fail meanwhile are reported failures too), then close: `Transport::close` flushes
    // librdkafka, so whatever it still held has been sent by the time the topic is read.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut delivered: Vec<Message> = before.clone();
    for n in 0.. {
        let m = Message::new("abandoned", format!("after-{n}")).with_key("k0");
        match producer.send(m.clone()).await {
            Ok(_) => {
                delivered.push(m);
                break;
            }
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never delivered again: {e}"
                );
                failed.insert(m.payload().to_vec());
            }
        }
    }
    producer.close(Duration::from_secs(20)).await;

    let got = read_all(&cluster, "abandoned").await;
    let came_back: Vec<String> = got
        .iter()
        .filter(|m| failed.contains(m.payload().as_ref()))
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    assert!(
        came_back.is_empty(),
        "{} messages reported failed were stored after all, first {:?}",
        came_back.len(),
        came_back.first()
    );
    assert_exactly_once_in_order(&delivered, &got);
}

/// Finding 7's other half: a produce request already with the broker when the attempt's
/// deadline comes. The mock broker stores a request at once and answers after its round-trip
/// time (3 s here, over the 1 s delivery timeout): every message is stored. Cut off at the
/// deadline, herald reported each failed (true on none of them); with the transport's settle
/// time it waits for librdkafka's report, so no message reported failed is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_flight_at_the_deadline_is_not_reported_failed_if_stored() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("in-flight", 1).expect("topic");
    let transport =
        KafkaTransport::new(KafkaConfig::new(cluster.bootstrap_servers())).expect("transport");
    let producer = Producer::builder(transport)
        .delivery_timeout(Duration::from_secs(1))
        .build()
        .expect("producer");
    // Connected, with a producer id: on a busy machine that can take longer than the 1 s
    // delivery timeout, so a warm-up that times out is sent again, until a deadline.
    let connected_by = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = producer.send(Message::new("in-flight", "warm-up")).await {
        assert!(
            std::time::Instant::now() < connected_by,
            "never connected: {e}"
        );
    }
    cluster
        .round_trip_time(1, Duration::from_secs(3))
        .expect("slow broker");
    let sent_at = std::time::Instant::now();
    let report = producer
        .send_all(keyed("in-flight", 50, 1))
        .await
        .wait()
        .await;
    // The broker was slow indeed: the messages were still in flight at their deadline (a
    // round trip that did not take effect would deliver them at once, and prove nothing).
    assert!(
        sent_at.elapsed() >= Duration::from_secs(1),
        "answered in {:?}, before the delivery timeout",
        sent_at.elapsed()
    );
    cluster
        .round_trip_time(1, Duration::ZERO)
        .expect("fast again");
    producer.close(Duration::from_secs(20)).await;
    let failed: HashSet<&[u8]> = report
        .failed
        .iter()
        .map(|e| e.message().payload().as_ref())
        .collect();
    let got = read_all(&cluster, "in-flight").await;
    assert!(
        report.delivered > 0,
        "the broker's late answers count: {} delivered, {} failed",
        report.delivered,
        report.failed.len()
    );
    let stored_but_failed = got
        .iter()
        .filter(|m| failed.contains(m.payload().as_ref()))
        .count();
    assert_eq!(
        stored_but_failed,
        0,
        "{} reported failed, {} of them stored",
        failed.len(),
        stored_but_failed
    );
}

/// Issue 11, finding 8: a message whose delivery report fails while later messages of its key
/// go through (librdkafka fails a `NETWORK_EXCEPTION` request at once and, idempotence on,
/// bumps its epoch and sends the later requests of the partition) must not be overtaken: the
/// later ones are held (`herald_key_held`) and go again behind its retry. Stored: their first
/// copies, then it, then them again; what a consumer ends with is in sending order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_report_holds_the_later_messages_of_its_key_behind_its_retry() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("report-fails", 1).expect("topic");
    // One message per produce request, so that one request can fail alone.
    let transport = KafkaTransport::new(with_ids(
        KafkaConfig::new(cluster.bootstrap_servers()).batch_num_messages(1),
    ))
    .expect("transport");
    // The four in one batch, closed at the fourth message whenever that comes (a short linger
    // could split them on a loaded machine).
    let producer = Producer::builder(transport)
        .batching(herald_batch::SizeOrLinger::new(
            4,
            1 << 20,
            Duration::from_secs(5),
        ))
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        )))
        .build()
        .expect("producer");
    let warm_up = producer
        .enqueue(Message::new("report-fails", "warm-up").with_key("w"))
        .await
        .expect("accepted");
    // Alone in its batch: a flush skips the linger.
    producer.flush().await;
    warm_up.await.expect("connected");
    cluster
        .fail_produce_requests(&[ProduceFault::NetworkException])
        .expect("inject");
    let msgs: Vec<Message> = (0..4)
        .map(|i| Message::new("report-fails", format!("k-{i}")).with_key("k"))
        .collect();
    let mut fates = Vec::new();
    for m in &msgs {
        fates.push(producer.enqueue(m.clone()).await.expect("accepted"));
    }
    let mut attempts = Vec::new();
    for fate in fates {
        attempts.push(fate.await.expect("delivered").attempts);
    }
    assert_eq!(
        attempts,
        [2, 2, 2, 2],
        "k-0 failed and was retried; k-1..3 were held behind it"
    );
    producer.close(Duration::from_secs(10)).await;
    let stored: Vec<Message> = read_all(&cluster, "report-fails")
        .await
        .into_iter()
        .filter(|m| m.key().is_some_and(|k| k.as_ref() == b"k"))
        .collect();
    // Each copy of a message carries the same id: a consumer can drop the duplicates.
    let mut ids: std::collections::HashMap<String, MessageId> = Default::default();
    for m in &stored {
        let id = stored_id(m).expect("an id header");
        let payload = String::from_utf8_lossy(m.payload()).into_owned();
        assert_eq!(*ids.entry(payload.clone()).or_insert(id), id, "{payload}");
    }
    let got: Vec<String> = stored
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    // k-0 once (its failed request stored nothing), and after it k-1..3 in order.
    let first = got.iter().position(|p| p == "k-0").expect("k-0 stored");
    assert_eq!(got.iter().filter(|p| *p == "k-0").count(), 1, "{got:?}");
    assert_eq!(got[first..], ["k-0", "k-1", "k-2", "k-3"], "{got:?}");
}

/// A metrics recorder of the test's own (not the process's).
struct Recorded {
    recorder: DebuggingRecorder,
    snapshotter: Snapshotter,
}

/// One series: its name, its labels, its value.
type Series = (String, Vec<(String, String)>, f64);

/// What a [`Recorded`] held at one moment (taking it resets counters and gauges).
struct Snap(Vec<Series>);

impl Recorded {
    fn new() -> Self {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        Self {
            recorder,
            snapshotter,
        }
    }

    /// `make`, with every metric handle it registers recording here.
    fn with<T>(&self, make: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, make)
    }

    fn snapshot(&self) -> Snap {
        Snap(
            self.snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(k, _, _, v)| {
                    let key = k.key();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    let value = match v {
                        DebugValue::Counter(c) => c as f64,
                        DebugValue::Gauge(g) => g.into_inner(),
                        DebugValue::Histogram(h) => h.len() as f64,
                    };
                    (key.name().to_owned(), labels, value)
                })
                .collect(),
        )
    }
}

impl Snap {
    /// The values of `name`'s series labelled `transport="kafka"` and `producer` = `producer`
    /// (`None`: without a `producer` label).
    fn values(&self, name: &str, producer: Option<&str>) -> Vec<f64> {
        self.0
            .iter()
            .filter(|(n, labels, _)| {
                let label = |key: &str| {
                    labels
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.as_str())
                };
                n == name && label("transport") == Some("kafka") && label("producer") == producer
            })
            .map(|(.., v)| *v)
            .collect()
    }
}

/// A produce error that leaves librdkafka's idempotent producer unusable (for the first request
/// in flight, `OUT_OF_ORDER_SEQUENCE_NUMBER` is fatal) rebuilds the producer once: the transport
/// counts it (`rebuilds()` and `herald_kafka_producer_rebuilds_total`), and herald retries the
/// failed messages on the new producer, losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_idempotence_error_rebuilds_the_producer_once_and_loses_nothing() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("fatal", 1).expect("topic");
    let recorded = Recorded::new();
    let transport = recorded.with(|| {
        KafkaTransport::new(
            KafkaConfig::new(cluster.bootstrap_servers()).metrics_name("fatal-test"),
        )
        .expect("transport")
    });
    let producer = Producer::builder(transport.clone())
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        )))
        .build()
        .expect("producer");
    producer
        .send(Message::new("fatal", "warm-up"))
        .await
        .expect("connected");
    assert_eq!(transport.rebuilds(), 0);
    cluster
        .fail_produce_requests(&[ProduceFault::OutOfOrderSequenceNumber])
        .expect("inject");
    let msgs = keyed("fatal", 200, 4);
    let mut fates = Vec::new();
    for m in &msgs {
        fates.push(producer.enqueue(m.clone()).await.expect("accepted"));
    }
    let mut retried = 0;
    for fate in fates {
        let d = fate.await.expect("delivered on the new producer");
        retried += usize::from(d.attempts > 1);
    }
    eprintln!("retried {retried}");
    assert!(retried > 0, "herald retried what the old producer failed");
    assert_eq!(transport.rebuilds(), 1, "rebuilt once");
    assert_eq!(
        recorded
            .snapshot()
            .values(herald_kafka::metrics::REBUILDS, Some("fatal-test")),
        [1.0]
    );
    producer.close(Duration::from_secs(10)).await;
    let got = read_all(&cluster, "fatal").await;
    let payloads: HashSet<&[u8]> = got.iter().map(|m| m.payload().as_ref()).collect();
    for m in &msgs {
        assert!(payloads.contains(m.payload().as_ref()), "lost {m:?}");
    }
}

/// Issue 11, finding 14: two transports in one process, named like their producers, keep
/// separate `herald_kafka_*` series (same `producer` label as herald's own metrics) instead of
/// overwriting one another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_named_transports_keep_separate_metric_series() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("named", 1).expect("topic");
    let recorded = Recorded::new();
    let config = |name: &str| {
        KafkaConfig::new(cluster.bootstrap_servers())
            .metrics_name(name)
            .statistics_interval(Some(Duration::from_millis(100)))
    };
    // billing's librdkafka queue holds one message: sending more meets a full queue.
    let (billing, audit) = recorded.with(|| {
        (
            KafkaTransport::new(config("billing").queue_max_messages(1)).expect("billing"),
            KafkaTransport::new(config("audit")).expect("audit"),
        )
    });
    for (transport, name) in [(billing, "billing"), (audit, "audit")] {
        let producer = Producer::builder(transport)
            .name(name)
            .build()
            .expect("producer");
        let report = producer.send_all(keyed("named", 50, 5)).await.wait().await;
        assert_eq!(report.delivered, 50, "{name}: {:?}", report.failed.first());
        producer.close(Duration::from_secs(10)).await;
    }
    let snap = recorded.snapshot();
    for name in herald_kafka::metrics::ALL {
        for producer in ["billing", "audit"] {
            assert_eq!(
                snap.values(name, Some(producer)).len(),
                1,
                "one {name} series for {producer}"
            );
        }
        assert!(
            snap.values(name, None).is_empty(),
            "no unnamed {name} series"
        );
    }
    let full = |p| snap.values(herald_kafka::metrics::QUEUE_FULL, Some(p))[0];
    assert!(full("billing") > 0.0, "billing met its full queue");
    assert_eq!(full("audit"), 0.0, "audit's count is its own");
}

/// Issue 11, finding 9: with `message_id_header` set, every message goes out with its id in
/// that header (UUID text), the one herald gave it at acceptance or the one it was given (a
/// copy sent again by a retry carries the same id: see the key-hold test), so consumers can
/// drop duplicates. By default there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_carries_its_id_in_a_header() {
    let cluster = MockKafka::start(1).expect("mock cluster");
    cluster.create_topic("ids", 1).expect("topic");
    cluster.create_topic("no-ids", 1).expect("topic");
    let transport = KafkaTransport::new(with_ids(KafkaConfig::new(cluster.bootstrap_servers())))
        .expect("transport");
    let producer = Producer::builder(transport).build().expect("producer");
    let given: MessageId = "0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70"
        .parse()
        .expect("an id");
    let msgs = vec![
        Message::new("ids", "a"),
        Message::new("ids", "b").with_header("trace", "t-1"),
        Message::new("ids", "resent").with_id(given),
    ];
    let report = producer.send_all(msgs).await.wait().await;
    assert_eq!(report.delivered, 3, "{:?}", report.failed.first());
    producer.close(Duration::from_secs(10)).await;
    let got = read_all(&cluster, "ids").await;
    let ids: Vec<MessageId> = got
        .iter()
        .map(|m| stored_id(m).unwrap_or_else(|| panic!("no id on {m:?}")))
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[2], given, "a message given an id keeps it");
    assert!(
        ids[0] != ids[1] && ids[0] != given && ids[1] != given,
        "{ids:?}"
    );
    assert_eq!(got[1].headers()[0].name, "trace", "its own headers first");

    let transport =
        KafkaTransport::new(KafkaConfig::new(cluster.bootstrap_servers())).expect("transport");
    let producer = Producer::builder(transport).build().expect("producer");
    producer
        .send(Message::new("no-ids", "plain"))
        .await
        .expect("delivered");
    producer.close(Duration::from_secs(10)).await;
    let got = read_all(&cluster, "no-ids").await;
    assert_eq!(got.len(), 1);
    assert!(got[0].headers().is_empty(), "{:?}", got[0].headers());
}

/// Issue 13, item 4: the leader of a partition dies for good in the middle of a run, and the
/// controller moves leadership to another replica (the mock does the second half on command).
/// librdkafka finds the new leader by itself; herald must lose nothing and keep per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leader_lost_for_good_loses_nothing_and_keeps_order() {
    let cluster = MockKafka::start(3).expect("mock cluster");
    cluster
        .create_replicated_topic("leader-loss", 2, 3)
        .expect("topic");
    cluster
        .set_leader("leader-loss", 0, Some(1))
        .expect("leader");
    cluster
        .set_leader("leader-loss", 1, Some(2))
        .expect("leader");
    let producer = Producer::builder(
        KafkaTransport::new(KafkaConfig::new(cluster.bootstrap_servers())).expect("transport"),
    )
    .build()
    .expect("producer");
    let sent = keyed("leader-loss", 20_000, 16);
    // The doomed leader answers slowly: its partition is still in flight when partition 1's
    // messages are in (the mock is fast enough to finish the whole run before a poll sees
    // 5 000 delivered otherwise, and the kill then comes after the end). A second: with 300 ms,
    // a test thread held that long on a loaded machine would see the run end first.
    cluster
        .round_trip_time(1, Duration::from_secs(1))
        .expect("slow leader");
    let receipt = producer.send_all(sent.clone()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while producer.stats().totals.delivered < 5_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress before the kill"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let killed = std::time::Instant::now();
    let delivered_at_kill = producer.stats().totals.delivered;
    // The run is not over yet: the kill happens in its middle.
    assert!(
        delivered_at_kill < 20_000,
        "the run ended before the kill: the test proves nothing"
    );
    cluster.broker_down(1).expect("down");
    cluster
        .set_leader("leader-loss", 0, Some(3))
        .expect("new leader");
    let report = receipt.wait().await;
    let ended = killed.elapsed();
    assert_eq!(report.delivered, 20_000, "{:?}", report.failed.first());
    let retries = producer.stats().totals.retries;
    producer.close(Duration::from_secs(20)).await;
    // At least once, not exactly once: a batch the lost leader wrote but never answered for can
    // be written again by the new one (seen in CI runs on a loaded machine; none in 20 runs on a
    // quiet one). So the whole topic is read, to its end: a read that stopped at 20 000 records
    // left as many messages unread as there were duplicates, and called them lost (a CI run of
    // 62e0cad failed so: herald reported all 20 000 delivered, and the one "lost" was near the
    // end of the run, where a read that stops early falls short).
    let got = read_all(&cluster, "leader-loss").await;
    let duplicates = assert_all_stored_last_copies_in_order(&sent, &got);
    println!(
        "leader of partition 0 lost after {delivered_at_kill} deliveries; the run ended \
         {ended:?} later; {duplicates} duplicates, {retries} retries by herald"
    );
}
