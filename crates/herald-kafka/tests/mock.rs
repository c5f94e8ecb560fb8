//! The Kafka transport on librdkafka's in-process mock cluster: hermetic, in
//! `cargo test --workspace`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_exactly_once_in_order, read_back, KafkaHarness};
use herald_core::{
    Destination, ErrorClass, FailureReason, HealthIssue, HealthStatus, Message, Producer,
};
use herald_kafka::mock::{MockKafka, ProduceFault};
use herald_kafka::{KafkaConfig, KafkaTransport};
use herald_retry::{Backoff, ExponentialRetry};
use herald_testkit::conformance::{self, Injected};

/// Waits until the producer's health satisfies `cond`; panics after `limit` with what it is.
async fn health_becomes(
    producer: &Producer,
    limit: Duration,
    what: &str,
    cond: impl Fn(&herald_core::Health) -> bool,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let h = producer.health();
        if cond(&h) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never became {what}: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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
    producer.close(Duration::from_secs(10)).await;
    assert_exactly_once_in_order(&msgs, &read(&cluster, "faults", msgs.len()).await);
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
    // Down long enough that librdkafka times messages out and herald has to retry them.
    tokio::time::sleep(Duration::from_secs(4)).await;
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
    let stats = producer.stats();
    assert!(
        stats.totals.retries > 0,
        "herald retried what librdkafka gave up on"
    );
    producer.close(Duration::from_secs(10)).await;
    let all: Vec<Message> = first.into_iter().chain(second).collect();
    let got = read(&cluster, "outage", all.len()).await;
    // Nothing lost; a message librdkafka timed out may have been stored before the broker went
    // down (at-least-once), so duplicates are allowed here, but not reordering of first copies.
    let payloads: std::collections::HashSet<&[u8]> =
        got.iter().map(|m| m.payload().as_ref()).collect();
    for m in &all {
        assert!(
            payloads.contains(m.payload().as_ref()),
            "lost {:?}",
            String::from_utf8_lossy(m.payload())
        );
    }
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
