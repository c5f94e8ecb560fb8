//! Helpers shared by the mock-cluster tests and the real-broker tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::time::Duration;

use herald_core::{BulkReceipt, Destination, Message, Producer};
use herald_kafka::{KafkaConfig, KafkaTransport};
use herald_testkit::conformance::{Harness, Injected};

/// Everything in `topic`, partition by partition (each in offset order), once at least
/// `expected` messages are there or `limit` has passed.
pub fn read_back(bootstrap: &str, topic: &str, expected: usize, limit: Duration) -> Vec<Message> {
    herald_kafka::admin::read_topic(bootstrap, topic, expected, limit).expect("read the topic back")
}

/// The conformance harness for a Kafka cluster: a mock one or a real one.
pub struct KafkaHarness {
    pub bootstrap: String,
    pub create_topic: Box<dyn Fn(&str) + Send + Sync>,
    pub inject: Box<dyn Fn(usize) -> Injected + Send + Sync>,
    pub prefix: String,
}

#[herald_core::async_trait]
impl Harness for KafkaHarness {
    type Transport = KafkaTransport;

    async fn transport(&self) -> KafkaTransport {
        KafkaTransport::new(
            KafkaConfig::new(self.bootstrap.clone()).message_timeout(Duration::from_secs(60)),
        )
        .expect("transport")
    }

    async fn destination(&self, hint: &str) -> Destination {
        let name = format!("{}-{hint}", self.prefix);
        (self.create_topic)(&name);
        Destination::new(name)
    }

    fn answers_early(&self) -> bool {
        true
    }

    fn poison(&self, destination: &Destination) -> Option<Message> {
        // Over librdkafka's message.max.bytes (1 000 000), under herald's default 1 MiB.
        Some(Message::new(destination.clone(), vec![b'p'; 1_000_100]))
    }

    async fn read_back(&self, destination: &Destination, expected: usize) -> Option<Vec<Message>> {
        let bootstrap = self.bootstrap.clone();
        let topic = destination.to_string();
        Some(
            tokio::task::spawn_blocking(move || {
                read_back(&bootstrap, &topic, expected, Duration::from_secs(60))
            })
            .await
            .expect("read back"),
        )
    }

    async fn inject_transient_failures(&self, calls: usize) -> Injected {
        (self.inject)(calls)
    }
}

/// Checks every sent payload arrived exactly once, and per key in sending order.
pub fn assert_exactly_once_in_order(sent: &[Message], got: &[Message]) {
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for m in got {
        *seen.entry(m.payload().as_ref()).or_default() += 1;
    }
    for m in sent {
        let n = seen.get(m.payload().as_ref()).copied().unwrap_or(0);
        assert_eq!(
            n,
            1,
            "payload {:?} arrived {n} times",
            String::from_utf8_lossy(m.payload())
        );
    }
    assert_eq!(got.len(), sent.len(), "nothing else arrived");
    let position: HashMap<&[u8], usize> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.payload().as_ref(), i))
        .collect();
    let mut last: HashMap<Vec<u8>, usize> = HashMap::new();
    for m in got {
        let key = m.key().map(|k| k.to_vec()).unwrap_or_default();
        let pos = position[m.payload().as_ref()];
        if let Some(prev) = last.insert(key.clone(), pos) {
            assert!(
                prev < pos,
                "key {:?}: #{pos} arrived after #{prev}",
                String::from_utf8_lossy(&key)
            );
        }
    }
}

/// Checks the at-least-once guarantee on what a topic holds: every sent payload is there,
/// nothing else is, and per key the *last* copy of each message comes after the last copies of
/// the messages sent before it with that key. A duplicate may sit before an earlier message (a
/// later message the broker took while an earlier one failed is sent again behind its retry:
/// herald's per-key hold), but what a consumer ends with is in sending order. Returns how many
/// duplicates there were.
pub fn assert_all_stored_last_copies_in_order(sent: &[Message], got: &[Message]) -> usize {
    let position: HashMap<&[u8], usize> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.payload().as_ref(), i))
        .collect();
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (at, m) in got.iter().enumerate() {
        let Some(&i) = position.get(m.payload().as_ref()) else {
            panic!(
                "{:?} was stored but never sent",
                String::from_utf8_lossy(m.payload())
            );
        };
        last.insert(i, at);
    }
    let mut previous: HashMap<Vec<u8>, (usize, usize)> = HashMap::new();
    for (i, m) in sent.iter().enumerate() {
        let Some(&at) = last.get(&i) else {
            panic!("lost {:?}", String::from_utf8_lossy(m.payload()));
        };
        let key = m.key().map(|k| k.to_vec()).unwrap_or_default();
        if let Some((before, before_at)) = previous.insert(key.clone(), (i, at)) {
            assert!(
                before_at < at,
                "key {:?}: the last copy of #{i} is stored before the last copy of #{before}",
                String::from_utf8_lossy(&key)
            );
        }
    }
    got.len() - sent.len()
}

/// Waits until the producer's health satisfies `cond`; panics after `limit` with what it is.
pub async fn health_becomes(
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

/// Waits for every message of `receipt` to end and asserts that none failed (naming how many
/// did and the first); returns how many were delivered.
pub async fn delivered_all(receipt: BulkReceipt) -> u64 {
    let report = receipt.wait().await;
    assert!(
        report.failed.is_empty(),
        "{} failed, first: {:?}",
        report.failed.len(),
        report.failed.first()
    );
    report.delivered
}
