//! The raw-rdkafka baselines herald is measured against (`cargo xtask bench kafka`). They live
//! here because rdkafka's types never leave this crate.
//!
//! Both use the same librdkafka settings as [`crate::KafkaTransport`] (acks=all, idempotence,
//! LZ4, murmur2_random, `linger.ms` 1, `batch.num.messages` 10 000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer as _, ProducerContext,
    ThreadedProducer,
};
use rdkafka::ClientConfig;

/// What one run did.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Messages acknowledged.
    pub delivered: u64,
    /// Messages that failed.
    pub failed: u64,
    /// Wall time from the first send to the last acknowledgement.
    pub elapsed: Duration,
}

impl Run {
    /// Acknowledged messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// herald's settings, then `extra` (the caller's connection, security or compression
/// properties) on top, so that raw and herald run with the same client settings.
fn config(bootstrap: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "120000");
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

#[derive(Default)]
struct Counting {
    delivered: AtomicU64,
    failed: AtomicU64,
}

struct CountingContext(Arc<Counting>);

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// rdkafka at its best: a `ThreadedProducer` with a delivery callback that counts, sending
/// `n` keyed messages of `size` bytes without waiting, then flushing. Timed from a connected
/// producer: one message is sent and flushed first (connection, metadata, producer id).
/// `extra`: librdkafka properties on top of herald's (security settings, say; empty for none).
pub fn raw_threaded(
    bootstrap: &str,
    extra: &[(String, String)],
    topic: &str,
    n: u64,
    size: usize,
) -> Result<Run, KafkaError> {
    let counts = Arc::new(Counting::default());
    let producer: ThreadedProducer<CountingContext> = config(bootstrap, extra)
        .create_with_context(CountingContext(counts.clone()))
        .map_err(crate::config::redact_client_error)?;
    let payload = vec![b'x'; size];
    let keys: Vec<String> = (0..64).map(|k| format!("key-{k}")).collect();
    producer
        .send(BaseRecord::to(topic).payload(&payload[..]).key("warm-up"))
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;
    let warm = counts.delivered.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..n {
        let mut record = BaseRecord::to(topic)
            .payload(&payload[..])
            .key(keys[(i % 64) as usize].as_bytes());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(Run {
        delivered: counts.delivered.load(Ordering::Relaxed) - warm,
        failed: counts.failed.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

/// The naive pattern: a `FutureProducer`, awaiting each send before the next. Timed from a
/// connected producer, as `raw_threaded`. `extra` as there.
pub async fn naive_await_each(
    bootstrap: &str,
    extra: &[(String, String)],
    topic: &str,
    n: u64,
    size: usize,
) -> Result<Run, KafkaError> {
    let producer: FutureProducer = config(bootstrap, extra)
        .create()
        .map_err(crate::config::redact_client_error)?;
    let payload = vec![b'x'; size];
    let (mut delivered, mut failed) = (0, 0);
    let warm_up = FutureRecord::to(topic).payload(&payload[..]).key("warm-up");
    producer
        .send(warm_up, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    let start = Instant::now();
    for i in 0..n {
        let key = format!("key-{}", i % 64);
        let record = FutureRecord::to(topic).payload(&payload[..]).key(&key);
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => delivered += 1,
            Err(_) => failed += 1,
        }
    }
    Ok(Run {
        delivered,
        failed,
        elapsed: start.elapsed(),
    })
}

/// Raw rdkafka one message at a time, at the caller's pace: each message its own delivery
/// future (`FutureProducer::send_result`, which never waits), with herald's settings. The
/// baseline of `herald bench --rate`, where a fixed schedule, not the client, sets the pace.
pub struct OneByOne {
    producer: FutureProducer,
    topic: String,
    payload: Vec<u8>,
    keys: Vec<String>,
}

impl OneByOne {
    /// A connected producer: one message is sent and acknowledged first (connection, metadata,
    /// producer id), as for the other baselines. `extra` as for [`raw_threaded`].
    pub async fn connect(
        bootstrap: &str,
        extra: &[(String, String)],
        topic: &str,
        size: usize,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = config(bootstrap, extra)
            .create()
            .map_err(crate::config::redact_client_error)?;
        let payload = vec![b'x'; size];
        producer
            .send(
                FutureRecord::to(topic).payload(&payload[..]).key("warm-up"),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            payload,
            keys: (0..64).map(|k| format!("key-{k}")).collect(),
        })
    }

    /// Hands message `i` (key `key-{i % 64}`) to librdkafka; the future ends with its
    /// acknowledgement (`true`) or failure (`false`, a full queue included).
    pub fn send(&self, i: u64) -> impl std::future::Future<Output = bool> + Send + 'static {
        let record = FutureRecord::to(&self.topic)
            .payload(&self.payload[..])
            .key(self.keys[(i % 64) as usize].as_str());
        let delivery = self.producer.send_result(record).map_err(|(e, _)| e);
        async move {
            match delivery {
                Ok(d) => matches!(d.await, Ok(Ok(_))),
                Err(_) => false,
            }
        }
    }
}
