//! `herald demo`: nothing to install. librdkafka's in-process mock cluster, a stream of keyed
//! messages through the whole herald stack, transient faults injected on the way, and a summary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use herald::kafka::mock::{MockKafka, ProduceFault};
use herald::kafka::KafkaTransport;
use herald::retry::{Backoff, ExponentialRetry};
use herald::{Bytes, Destination, Message, Producer};
use serde_json::json;

use crate::engine::{Collector, Engine, OrderCheck};
use crate::report::{self, Exit, ReportFormat};

/// `herald demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Messages to send.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub(crate) messages: u64,
    /// Distinct keys (per-key order is checked on each).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) keys: u64,
    /// Payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    pub(crate) size: usize,
    /// How long one of the three brokers is down, a third of the way in (0: no outage).
    #[arg(long, value_name = "MS", default_value_t = 1_500)]
    pub(crate) outage_ms: u64,
    /// text, or json: the summary, then one JSON object on the last line of stdout.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub(crate) report: ReportFormat,
}

const TOPIC: &str = "herald-demo";
const PARTITIONS: i32 = 6;
const DOWN_BROKER: i32 = 2;
/// librdkafka gives up on a message after this; herald then retries it (its own delivery
/// timeout is 30 s).
const LIBRDKAFKA_TIMEOUT: Duration = Duration::from_secs(1);
const FAULTS: [ProduceFault; 6] = [
    ProduceFault::NotEnoughReplicas,
    ProduceFault::LeaderNotAvailable,
    ProduceFault::Transport,
    ProduceFault::RequestTimedOut,
    ProduceFault::NotLeaderForPartition,
    ProduceFault::NotEnoughReplicas,
];

/// Runs the demo.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<Exit> {
    crate::settings::check_size(args.size, 1 << 20, "the demo's 1 MiB message limit")?;
    let n = args.messages;
    let keys = args.keys.max(1);
    let cluster = Arc::new(MockKafka::start(3).context("starting the mock cluster")?);
    cluster
        .create_topic(TOPIC, PARTITIONS)
        .context("creating the demo topic")?;
    let transport = KafkaTransport::new(
        herald::kafka::KafkaConfig::new(cluster.bootstrap_servers())
            .client_id("herald-demo")
            .message_timeout(LIBRDKAFKA_TIMEOUT),
    )
    .context("creating the Kafka transport")?;
    let producer = Producer::builder(transport)
        .batching(herald::kafka::recommended_batching())
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        )))
        .delivery_timeout(Duration::from_secs(30))
        .build()
        .context("building the producer")?;

    out!(
        "herald demo: {} keyed messages ({} keys, {} B each) to librdkafka's in-process mock Kafka cluster\n\
         (3 brokers, topic `{TOPIC}` with {PARTITIONS} partitions), through batching, retries and strict per-key order.",
        report::count(n),
        keys,
        args.size
    );
    out!(
        "faults: the first {} produce requests fail (NOT_ENOUGH_REPLICAS, LEADER_NOT_AVAILABLE, connection loss, ...);",
        FAULTS.len()
    );
    if args.outage_ms > 0 {
        out!(
            "        broker {DOWN_BROKER} goes down for {} a third of the way in; librdkafka gives up on a message after {}, herald retries it.",
            report::duration(Duration::from_millis(args.outage_ms)),
            report::duration(LIBRDKAFKA_TIMEOUT)
        );
    }
    cluster
        .fail_produce_requests(&FAULTS)
        .context("injecting faults")?;

    let destination = Destination::new(TOPIC);
    let mut collector = Collector::new(destination.clone());
    collector.order = Some(OrderCheck::new(keys));
    let engine = Engine::start(producer.clone(), collector);
    let key_names: Vec<Bytes> = (0..keys).map(|k| Bytes::from(format!("key-{k}"))).collect();
    let started = Instant::now();
    // The outage starts once a third of the messages are acknowledged (or the stream ended).
    let outage = (args.outage_ms > 0).then(|| {
        let cluster = cluster.clone();
        let producer = producer.clone();
        let down_for = Duration::from_millis(args.outage_ms);
        tokio::spawn(async move {
            loop {
                let s = producer.stats();
                if s.totals.delivered >= n / 3
                    || (s.totals.accepted > 0 && s.buffered_messages == 0)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            cluster.broker_down(DOWN_BROKER)?;
            tokio::time::sleep(down_for).await;
            cluster.broker_up(DOWN_BROKER)
        })
    });
    for i in 0..n {
        // The sequence number, padded (or cut) to the payload size.
        let mut payload = format!("{i:010}").into_bytes();
        payload.resize(args.size, b'x');
        let msg = Message::new(destination.clone(), payload)
            .with_key(key_names[(i % keys) as usize].clone());
        engine.send(i + 1, msg).await?;
    }
    let (collector, producer) = engine.finish(Duration::from_secs(10)).await?;
    let elapsed = started.elapsed();
    if let Some(outage) = outage {
        outage
            .await
            .context("the outage task failed")?
            .context("taking a broker down and up")?;
    }
    let t = &collector.tally;
    let totals = producer.stats().totals;
    let (checked, violations) = collector.order.as_ref().map_or((0, 0), OrderCheck::verdict);

    out!();
    out!("  delivered      {:>10}", report::count(t.delivered));
    out!("  failed         {:>10}", report::count(t.failed));
    for e in &t.examples {
        out!("    e.g. {e}");
    }
    out!(
        "  retried        {:>10}  messages needed more than one attempt ({} retries, {} batches)",
        report::count(t.retried),
        report::count(totals.retries),
        report::count(totals.batches)
    );
    out!(
        "  per-key order  {:>10}  ({} consecutive same-key acknowledgements compared by partition offset)",
        if violations == 0 { "kept" } else { "BROKEN" },
        report::count(checked)
    );
    out!(
        "  throughput     {:>10}  msg/s over {} (faults and outage included)",
        report::count(report::rate(t.delivered, elapsed) as u64),
        report::duration(elapsed)
    );
    if let (Some(p50), Some(p99), Some(max)) = (
        t.latency.quantile(0.5),
        t.latency.quantile(0.99),
        t.latency.max(),
    ) {
        out!(
            "  latency        p50 {}  p99 {}  max {}  (acceptance to acknowledgement, while streaming)",
            report::duration(p50),
            report::duration(p99),
            report::duration(max)
        );
    }
    let ok = t.delivered == n && t.failed == 0 && violations == 0;
    out!(
        "\n{}",
        if ok {
            "every message acknowledged by the broker, and per-key order kept."
        } else {
            "NOT every message was delivered in order: see above."
        }
    );
    if args.report == ReportFormat::Json {
        out!(
            "{}",
            json!({
                "command": "demo",
                "messages": n,
                "sent": t.delivered,
                "failed": t.failed,
                "retries": totals.retries,
                "retried_messages": t.retried,
                "order_violations": violations,
                "order_checked": checked,
                "elapsed_s": report::num(elapsed.as_secs_f64()),
                "msgs_per_sec": report::num(report::rate(t.delivered, elapsed)),
                "p50_ms": report::ms(t.latency.quantile(0.5)),
                "p99_ms": report::ms(t.latency.quantile(0.99)),
                "max_ms": report::ms(t.latency.max()),
            })
        );
    }
    Ok(if ok { Exit::Ok } else { Exit::Failed })
}
