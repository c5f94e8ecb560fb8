//! Topic administration for brokers that do not auto-create topics (Tansu, or Kafka with
//! `auto.create.topics.enable=false`, the safe setting).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// Why a topic could not be created.
#[derive(Debug, thiserror::Error)]
#[error("could not create topic `{topic}`: {reason}")]
pub struct AdminError {
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
    let fail = |reason: String| AdminError {
        topic: topic.to_owned(),
        reason,
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| fail(e.to_string()))?;
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
