//! `amqp-baseline`: what `cargo xtask bench amqp` runs. Publishes persistent messages to fresh
//! durable queues with raw lapin at its best (streaming confirms over several channels), with the
//! naive pattern (await each confirm), and with herald over the same settings, and writes the
//! figures as JSON.
//!
//! Usage: `HERALD_AMQP_URL=amqp://… amqp-baseline [--messages N] [--rtt-ms MS] [--json FILE]`;
//! `amqp-baseline --delete-queue NAME` deletes a queue a benchmark left (`cargo xtask bench
//! command` and `latency` run the `herald` command into queues of their own) and does nothing
//! else.
//! `--rtt-ms` only says, in the report, what round trip lies between this process and the
//! broker: `cargo xtask bench amqp` puts the testkit's delaying proxy (`delay_proxy`, a process
//! of its own) in front of the broker and passes its address in `HERALD_AMQP_URL`.

use std::time::{Duration, Instant};

use herald_amqp::baseline::{
    delete_queue, fresh_queue, raw_naive, raw_streaming, raw_streaming_carrying, Carry,
};
use herald_amqp::{AmqpConfig, AmqpTransport};
use herald_core::{Message, OrderingMode, Producer};
use herald_testkit::baseline::{write_report, Args, Figure};

const CHANNELS: usize = 8;
const WINDOW: usize = 512;
const KEYS: usize = 64;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Raw lapin at its best, into a fresh queue deleted afterwards.
async fn raw_best(config: &AmqpConfig, payload: usize, n: usize) -> Res<f64> {
    let queue = fresh_queue(config, "raw").await?;
    let run = raw_streaming(config, "", &queue, payload, n, CHANNELS, WINDOW).await?;
    delete_queue(config, &queue).await?;
    Ok(run.msgs_per_sec())
}

/// Raw lapin at its best with `carry` on each message (herald's properties, or some of them),
/// into a fresh queue deleted afterwards.
async fn raw_carrying(config: &AmqpConfig, payload: usize, n: usize, carry: Carry) -> Res<f64> {
    let queue = fresh_queue(config, "raw-props").await?;
    let run =
        raw_streaming_carrying(config, ("", &queue), payload, n, (CHANNELS, WINDOW), carry).await?;
    delete_queue(config, &queue).await?;
    Ok(run.msgs_per_sec())
}

/// The naive pattern, into a fresh queue deleted afterwards.
async fn naive(config: &AmqpConfig, payload: usize, n: usize) -> Res<f64> {
    let queue = fresh_queue(config, "naive").await?;
    let run = raw_naive(config, "", &queue, payload, n).await?;
    delete_queue(config, &queue).await?;
    Ok(run.msgs_per_sec())
}

/// How a herald run is set up: its batches, ordering, pipeline depth, and whether its messages
/// carry their key in the key header (herald's default) or not (`AmqpConfig::key_header(None)`).
struct Setup {
    batch: usize,
    ordering: OrderingMode,
    depth: usize,
    key_header: bool,
}

async fn herald(url: &str, payload: usize, n: usize, setup: &Setup) -> Res<f64> {
    let Setup {
        batch,
        ordering,
        depth,
        key_header,
    } = *setup;
    let config = AmqpConfig::from_url(url)?;
    let queue = fresh_queue(&config, "herald").await?;
    let mut transport_config = AmqpConfig::from_url(url)?.channels(CHANNELS).window(WINDOW);
    if !key_header {
        transport_config = transport_config.key_header(None);
    }
    let transport = AmqpTransport::new(transport_config)?;
    transport.connect().await?;
    let producer = Producer::builder(transport)
        .batching(herald_batch::SizeOrLinger::new(
            batch,
            64 << 20,
            Duration::ZERO,
        ))
        .ordering(ordering)
        .pipeline_depth(depth)
        .build()?;
    let dest = herald_amqp::queue(&queue);
    let body = herald_core::Bytes::from(vec![b'x'; payload]);
    let msgs: Vec<Message> = (0..n)
        .map(|i| Message::new(dest.clone(), body.clone()).with_key(format!("key-{}", i % KEYS)))
        .collect();
    let start = Instant::now();
    let report = producer.send_all(msgs).await.wait().await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    if !report.failed.is_empty() || report.delivered != n as u64 {
        return Err(format!(
            "herald delivered {} of {n}: {:?}",
            report.delivered,
            report.failed.first()
        )
        .into());
    }
    producer.close(Duration::from_secs(30)).await;
    delete_queue(&config, &queue).await?;
    Ok(rate)
}

async fn run(url: &str, n: usize) -> Res<Vec<Figure>> {
    let config = AmqpConfig::from_url(url)?;
    let mut figures = Vec::new();
    let naive_n = (n / 20).clamp(1_000, 10_000);
    for payload in [100usize, 1024] {
        // Warm-up: the first run on a fresh node is slower.
        raw_best(&config, payload, n / 10).await?;
        let raw = raw_best(&config, payload, n).await?;
        eprintln!("{payload} B raw streaming: {raw:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_streaming",
            what: format!(
                "raw lapin, streaming confirms, {CHANNELS} channels × {WINDOW} (raw best)"
            ),
            rate: raw,
        });
        let like = raw_carrying(&config, payload, n, Carry::LikeHerald).await?;
        eprintln!("{payload} B raw streaming, herald's properties: {like:.0} msg/s");
        figures.push(Figure {
            payload,
            name: herald_testkit::baseline::LIKE_HERALD,
            what: format!(
                "raw lapin, streaming confirms, {CHANNELS} channels × {WINDOW}, each message with herald's `message_id` and key header"
            ),
            rate: like,
        });
        // What each of the two properties costs the broker: the id alone (herald's messages
        // with `key_header(None)`).
        let id_only = raw_carrying(&config, payload, n, Carry::IdOnly).await?;
        eprintln!("{payload} B raw streaming, herald's message_id only: {id_only:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_id_only",
            what: format!(
                "raw lapin, streaming confirms, {CHANNELS} channels × {WINDOW}, each message with herald's `message_id` only"
            ),
            rate: id_only,
        });
        let naive = naive(&config, payload, naive_n).await?;
        eprintln!("{payload} B raw naive: {naive:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_naive",
            what: format!("raw lapin, await each confirm ({naive_n} messages)"),
            rate: naive,
        });
        let setup = |batch, ordering, depth| Setup {
            batch,
            ordering,
            depth,
            key_header: true,
        };
        for (name, what, setup) in [
            (
                "herald_default",
                "herald send_all, default batching (up to 1 024, no linger), strict order (pipeline depth 4), 64 keys",
                setup(1024, OrderingMode::Strict, 4),
            ),
            (
                "herald_depth_1",
                "herald send_all, default batching, strict order, one batch in flight (stop and wait)",
                setup(1024, OrderingMode::Strict, 1),
            ),
            (
                "herald_depth_8",
                "herald send_all, default batching, strict order, 8 batches in flight",
                setup(1024, OrderingMode::Strict, 8),
            ),
            (
                "herald_batch_4096",
                "herald send_all, batches of 4 096, strict order (depth 4), 64 keys",
                setup(4096, OrderingMode::Strict, 4),
            ),
            (
                "herald_relaxed",
                "herald send_all, default batching, relaxed order (8 batches in flight)",
                setup(1024, OrderingMode::Relaxed, 4),
            ),
            (
                "herald_no_key_header",
                "herald send_all, default batching, strict order (depth 4), 64 keys kept for ordering only (`key_header(None)`: a `message_id` only)",
                Setup {
                    key_header: false,
                    ..setup(1024, OrderingMode::Strict, 4)
                },
            ),
        ] {
            let rate = herald(url, payload, n, &setup).await?;
            eprintln!("{payload} B {name}: {rate:.0} msg/s");
            figures.push(Figure {
                payload,
                name,
                what: what.into(),
                rate,
            });
        }
    }
    Ok(figures)
}

fn main() -> Res<()> {
    let args = Args::from_env();
    let n: usize = args.number("--messages", 100_000)?;
    let url = std::env::var("HERALD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(queue) = args.value("--delete-queue") {
        let config = AmqpConfig::from_url(&url)?;
        rt.block_on(delete_queue(&config, queue))?;
        return Ok(());
    }
    // The round trip of the path to the broker, for the report only: `cargo xtask bench amqp`
    // runs the testkit's delaying proxy as a process of its own and passes its address in
    // `HERALD_AMQP_URL` (in this process it would copy every byte on herald's runtime).
    let rtt_ms: u64 = args.number("--rtt-ms", 0)?;
    // The variants say what herald's messages carry: the URL must leave that to them.
    if AmqpConfig::from_url(&url)?.key_header_name() != Some(herald_amqp::DEFAULT_KEY_HEADER) {
        return Err("HERALD_AMQP_URL sets key_header: amqp-baseline sets it per variant".into());
    }
    let figures = rt.block_on(run(&url, n))?;
    let broker = AmqpConfig::from_url(&url)?.redacted_url();
    let doc = serde_json::json!({
        "broker": broker,
        "messages": n,
        "channels": CHANNELS,
        "window": WINDOW,
        "rtt_ms": rtt_ms,
    });
    write_report(&args, doc, &figures)?;
    Ok(())
}
