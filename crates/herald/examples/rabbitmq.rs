//! Ten JSON messages to a RabbitMQ queue, each with its key, and what became of each: confirmed
//! by the broker, or why not. Exits with status 1 if any failed.
//!
//! ```text
//! cargo run -p herald --example rabbitmq --features amqp [-- QUEUE]
//! ```
//!
//! The broker is `HERALD_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`); the queue
//! is the first argument (default `herald-example`), declared (durable, classic) when the
//! transport connects. The key travels in the `x-herald-key` header. herald's own log lines
//! (connected, connection trouble, delivery timeouts) go to stderr, the password masked.

use std::process::ExitCode;
use std::time::Duration;

use herald::amqp::{AmqpConfig, AmqpTransport, Declare};
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
    let url = std::env::var("HERALD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "herald-example".into());

    // The same name on the transport and the producer: their metrics and log lines join up.
    let config = AmqpConfig::from_url(&url)?
        .metrics_name("example")
        .declare(Declare::Queue {
            name: queue.clone(),
            quorum: false,
        });
    let transport = AmqpTransport::new(config)?;
    // Optional: a wrong address or wrong credentials show up here, not as ten failed messages.
    transport.connect().await?;
    let producer = Producer::builder(transport)
        .name("example")
        .delivery_timeout(Duration::from_secs(30))
        .build()?;

    let destination = herald::amqp::queue(&queue);
    // All ten go out before the first answer is awaited: they travel in one batch.
    let mut deliveries = Vec::with_capacity(10);
    for i in 0..10 {
        let payload = serde_json::json!({ "id": i, "data": format!("message-{i}") });
        let message = Message::new(destination.clone(), serde_json::to_vec(&payload)?)
            .with_key(format!("key-{i}"));
        deliveries.push((i, producer.enqueue(message).await?));
    }
    let mut failed = 0;
    for (i, delivery) in deliveries {
        match delivery.await {
            Ok(d) => println!(
                "message {i} (key-{i}): confirmed by the broker into queue {queue} after {} attempt(s), {:?}",
                d.attempts, d.latency
            ),
            Err(e) => {
                failed += 1;
                println!("message {i} (key-{i}): FAILED: {e}");
            }
        }
    }

    // Every message has its answer: closing is quick, and closes the connection cleanly.
    let report = producer.close(Duration::from_secs(10)).await;
    if !report.drained {
        eprintln!("the producer did not close cleanly: {report:?}");
    }
    Ok(failed)
}
