//! Ten JSON messages to a Kafka topic, each with its key, and what became of each: the
//! partition and offset it was stored at, or why it was not. Exits with status 1 if any failed.
//!
//! ```text
//! cargo run -p herald --example kafka --features kafka [-- TOPIC]
//! ```
//!
//! The broker is `HERALD_KAFKA_BOOTSTRAP` (default `127.0.0.1:9092`); the topic is the first
//! argument (default `herald-example`), created first (3 partitions) if it does not exist:
//! brokers set up safely (and Tansu) do not create topics on first use. herald's own log lines
//! (connection trouble, delivery timeouts) go to stderr.

use std::process::ExitCode;
use std::time::Duration;

use herald::kafka::{KafkaConfig, KafkaTransport};
use herald::{Message, Producer};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("{failed} of 10 messages failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends the ten messages; returns how many failed.
async fn run() -> Result<usize, Box<dyn std::error::Error>> {
    let bootstrap =
        std::env::var("HERALD_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "herald-example".into());
    // A topic that already exists is fine. One that cannot be created (no permission to, say)
    // may exist all the same: the messages say.
    if let Err(e) = herald::kafka::admin::create_topic(&bootstrap, &topic, 3, 1).await {
        eprintln!("{e}; sending anyway");
    }

    // One timeout for both: librdkafka's attempts and herald's retries stop together.
    let timeout = Duration::from_secs(30);
    // The same name on the transport and the producer: their metrics and log lines join up.
    let config = KafkaConfig::new(&bootstrap)
        .message_timeout(timeout)
        .metrics_name("example");
    let transport = KafkaTransport::new(config)?;
    let producer = Producer::builder(transport)
        .name("example")
        .batching(herald::kafka::recommended_batching())
        .delivery_timeout(timeout)
        .build()?;

    // All ten go out before the first answer is awaited: they travel in one batch.
    let mut deliveries = Vec::with_capacity(10);
    for i in 0..10 {
        let payload = serde_json::json!({ "id": i, "data": format!("message-{i}") });
        let message = Message::new(topic.as_str(), serde_json::to_vec(&payload)?)
            .with_key(format!("key-{i}"));
        deliveries.push((i, producer.enqueue(message).await?));
    }
    let mut failed = 0;
    for (i, delivery) in deliveries {
        match delivery.await {
            Ok(d) => println!(
                "message {i} (key-{i}): {topic} partition {} offset {} after {} attempt(s)",
                d.ack.partition.unwrap_or(-1),
                d.ack.offset.unwrap_or(-1),
                d.attempts
            ),
            Err(e) => {
                failed += 1;
                println!("message {i} (key-{i}): FAILED: {e}");
            }
        }
    }

    // Every message has its answer: closing is quick, and releases librdkafka cleanly.
    let report = producer.close(Duration::from_secs(10)).await;
    if !report.drained {
        eprintln!("the producer did not close cleanly: {report:?}");
    }
    Ok(failed)
}
