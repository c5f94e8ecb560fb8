//! Topic administration for brokers that do not auto-create topics (Tansu, or Kafka with
//! `auto.create.topics.enable=false`, the safe setting), and reading a topic back whole, for
//! tests and tools that check what was produced.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald_core::{Destination, Message};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Why a topic could not be created or read.
#[derive(Debug, thiserror::Error)]
#[error("could not {action} topic `{topic}`: {reason}")]
pub struct AdminError {
    action: &'static str,
    topic: String,
    reason: String,
}

/// Creates `topic` with `partitions` partitions and replication factor `replication`. A topic
/// that already exists is fine.
pub async fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), AdminError> {
    create_topic_with(bootstrap, &[], topic, partitions, replication).await
}

/// [`create_topic`] with extra librdkafka properties (security settings, say). Properties an
/// admin client does not take (producer settings) are left out.
pub async fn create_topic_with(
    bootstrap: &str,
    extra: &[(String, String)],
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), AdminError> {
    let fail = |reason: String| AdminError {
        action: "create",
        topic: topic.to_owned(),
        reason,
    };
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in extra {
        if is_connection_property(k) {
            config.set(k, v);
        }
    }
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|e| fail(crate::config::redact_client_error(e).to_string()))?;
    let results = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(replication),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(fail(code.to_string())),
        }
    }
    Ok(())
}

/// The topic's `min.insync.replicas`, as the cluster says (`DescribeConfigs`); `None` if the
/// answer does not carry it. `config` is the producer's client configuration (how to reach
/// and authenticate to the brokers).
pub(crate) async fn min_insync_replicas(
    config: &ClientConfig,
    topic: &str,
) -> Result<Option<i64>, AdminError> {
    let fail = |reason: String| AdminError {
        action: "describe",
        topic: topic.to_owned(),
        reason,
    };
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|e| fail(crate::config::redact_client_error(e).to_string()))?;
    let results = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
    for r in results {
        let resource = r.map_err(|code| fail(code.to_string()))?;
        if let Some(entry) = resource.get("min.insync.replicas") {
            return Ok(entry.value.as_deref().and_then(|v| v.trim().parse().ok()));
        }
    }
    Ok(None)
}

/// Whether `min.insync.replicas` makes `acks=all` weaker than users think: with 1 (Kafka's
/// default), a leader whose followers fell behind acknowledges alone, and the message is lost
/// with that broker. 2 or more (with a replication factor of 3) is the durable setting.
pub(crate) fn weak_min_insync_replicas(n: i64) -> bool {
    n < 2
}

/// Whether a client of any kind takes property `k`: how to reach and authenticate to the
/// brokers, not how to produce.
fn is_connection_property(k: &str) -> bool {
    [
        "security.",
        "sasl.",
        "ssl.",
        "ssl_",
        "client.",
        "socket.",
        "broker.",
        "metadata.",
    ]
    .iter()
    .any(|p| k.starts_with(p))
}

/// Reads `topic` from the beginning until `expected` messages are there or `limit` has passed,
/// and returns them partition by partition, each partition in offset order, with their keys
/// and headers. Blocking: call it from a thread that may block (`spawn_blocking` in async code).
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    limit: Duration,
) -> Result<Vec<Message>, AdminError> {
    read(bootstrap, topic, Until::Count(expected), limit)
}

/// Reads everything `topic` holds now: each partition from the beginning up to its high
/// watermark (the offset the next message stored will get), taken when the read starts. For
/// checks that something is *not* there: it ends when the end is reached, not after waiting
/// for messages that may never come; "reached" includes a quiet time after the last record
/// came, a second where the records read fill the watermarks' span and five where only the
/// last offset says so (offsets with gaps: transaction markers, compaction), since a broker
/// may serve records out of offset order. Fails if the end is not reached within `limit`.
/// Blocking, like [`read_topic`].
pub fn read_topic_to_end(
    bootstrap: &str,
    topic: &str,
    limit: Duration,
) -> Result<Vec<Message>, AdminError> {
    read(bootstrap, topic, Until::End, limit)
}

enum Until {
    Count(usize),
    End,
}

fn read(
    bootstrap: &str,
    topic: &str,
    until: Until,
    limit: Duration,
) -> Result<Vec<Message>, AdminError> {
    let fail = |reason: String| AdminError {
        action: "read",
        topic: topic.to_owned(),
        reason,
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("herald-read-{topic}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| fail(e.to_string()))?;
    let deadline = Instant::now() + limit;
    let partitions = loop {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            if let Some(t) = md.topics().first() {
                if !t.partitions().is_empty() {
                    break t.partitions().len() as i32;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(fail(format!("no metadata within {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| fail(e.to_string()))?;
    }
    consumer.assign(&tpl).map_err(|e| fail(e.to_string()))?;
    // For `Until::End`: each partition's (low, high) watermarks, what it must be read up to.
    let mut ends: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    if let Until::End = until {
        for p in 0..partitions {
            let left = deadline.saturating_duration_since(Instant::now());
            let watermarks = consumer
                .fetch_watermarks(topic, p, left.max(Duration::from_millis(1)))
                .map_err(|e| fail(format!("watermarks of partition {p}: {e}")))?;
            ends.insert(p, watermarks);
        }
    }
    let dest = Destination::new(topic);
    // Each partition's records by offset: a record served twice counts once.
    let mut by_partition: BTreeMap<i32, BTreeMap<i64, Message>> = BTreeMap::new();
    let mut count = 0;
    // Since when polls have brought nothing.
    let mut quiet_since: Option<Instant> = None;
    // The end: every partition read up to its high watermark, and then a time in which nothing
    // more came: 1 s once a partition holds as many records as its watermarks span, 5 s where
    // only its last offset says so (offsets with gaps). Tansu 0.6 serves a partition's records
    // out of offset order after pipelined produce requests: reading 20 000 records, the last
    // offset alone ended the read at 19 060, so quiet is asked for as well, and longer where
    // the count cannot confirm the end (a fetch can stall for a second on a loaded machine).
    let done = |count: usize,
                quiet_since: Option<Instant>,
                by_partition: &BTreeMap<i32, BTreeMap<i64, Message>>| {
        match until {
            Until::Count(expected) => count >= expected,
            Until::End => {
                let quiet = quiet_since.map_or(Duration::ZERO, |t| t.elapsed());
                quiet >= Duration::from_secs(1)
                    && ends.iter().all(|(p, &(low, high))| {
                        let read = by_partition.get(p);
                        let n = read.map_or(0, BTreeMap::len);
                        let last = read.and_then(|r| r.keys().next_back().copied());
                        high <= low
                            || i64::try_from(n).is_ok_and(|n| n >= high - low)
                            || (quiet >= Duration::from_secs(5)
                                && last.is_some_and(|last| last + 1 >= high))
                    })
            }
        }
    };
    while !done(count, quiet_since, &by_partition) {
        if Instant::now() >= deadline {
            return match until {
                Until::Count(_) => Ok(in_order(by_partition)),
                Until::End => Err(fail(format!(
                    "did not reach the end of every partition within {limit:?}"
                ))),
            };
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let mut msg = Message::new(dest.clone(), m.payload().unwrap_or_default().to_vec());
                if let Some(k) = m.key() {
                    msg = msg.with_key(k.to_vec());
                }
                if let Some(h) = m.headers() {
                    for i in 0..h.count() {
                        let header = h.get(i);
                        msg =
                            msg.with_header(header.key, header.value.unwrap_or_default().to_vec());
                    }
                }
                let fresh = by_partition
                    .entry(m.partition())
                    .or_default()
                    .insert(m.offset(), msg)
                    .is_none();
                count += usize::from(fresh);
                quiet_since = None;
            }
            // A connection to one broker failing (a broker taken down by a test) is not the
            // end of the read: the others still serve, and the limit bounds the wait.
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown,
            ))) => {}
            Some(Err(e)) => return Err(fail(e.to_string())),
            None => {
                quiet_since.get_or_insert_with(Instant::now);
            }
        }
    }
    Ok(in_order(by_partition))
}

fn in_order(by_partition: BTreeMap<i32, BTreeMap<i64, Message>>) -> Vec<Message> {
    by_partition
        .into_values()
        .flat_map(BTreeMap::into_values)
        .collect()
}

#[cfg(test)]
mod tests {
    /// librdkafka refuses a property and its error quotes the value (a Java-only
    /// `sasl.jaas.config` holding a password, say): the admin client's error does not.
    #[tokio::test]
    async fn a_refused_property_s_value_is_not_in_the_error() {
        let extra = [(
            "sasl.jaas.config".to_owned(),
            "org.apache.kafka.common.security.plain.PlainLoginModule required password=\"hunter2\";"
                .to_owned(),
        )];
        let e = super::create_topic_with("127.0.0.1:9", &extra, "t", 1, 1)
            .await
            .expect_err("refused by librdkafka");
        assert!(
            e.to_string().contains("sasl.jaas.config"),
            "refused for the property: {e}"
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
    }
}
