//! `nats-baseline`: publishes to fresh file-backed JetStream streams with raw async-nats at its
//! best (PubAcks awaited as they come, a window outstanding), with the naive pattern (await
//! each PubAck), and with herald over the same settings, and writes the figures as JSON.
//!
//! Usage: `HERALD_NATS_URL=nats://… nats-baseline [--messages N] [--json FILE]`;
//! `HERALD_BENCH_DEPTH=N` runs herald's variants at a pipeline depth of `N` (an experiment).

use std::time::{Duration, Instant};

use herald_core::{Message, OrderingMode, Producer};
use herald_nats::baseline::{delete_stream, fresh_stream, raw_naive, raw_streaming};
use herald_nats::{NatsConfig, NatsTransport};
use herald_testkit::baseline::{write_report, Args, Figure};

/// PubAcks outstanding in the raw run: herald-nats's default window.
const WINDOW: usize = 4096;
const KEYS: usize = 64;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Raw async-nats at its best, into a fresh stream deleted afterwards.
async fn raw_best(config: &NatsConfig, payload: usize, n: usize) -> Res<f64> {
    let scratch = fresh_stream(config, "raw").await?;
    let run = raw_streaming(config, &scratch.subject, payload, n, WINDOW).await?;
    delete_stream(config, &scratch.stream).await?;
    Ok(run.msgs_per_sec())
}

/// The naive pattern, into a fresh stream deleted afterwards.
async fn naive(config: &NatsConfig, payload: usize, n: usize) -> Res<f64> {
    let scratch = fresh_stream(config, "naive").await?;
    let run = raw_naive(config, &scratch.subject, payload, n).await?;
    delete_stream(config, &scratch.stream).await?;
    Ok(run.msgs_per_sec())
}

async fn herald(
    url: &str,
    payload: usize,
    n: usize,
    batch: usize,
    ordering: OrderingMode,
) -> Res<f64> {
    let config = NatsConfig::from_url(url)?;
    let scratch = fresh_stream(&config, "herald").await?;
    let transport = NatsTransport::new(NatsConfig::from_url(url)?.window(WINDOW))?;
    transport.connect().await?;
    let mut builder = Producer::builder(transport)
        .batching(herald_batch::SizeOrLinger::new(
            batch,
            64 << 20,
            Duration::ZERO,
        ))
        .ordering(ordering);
    // An experiment on the pipeline depth (herald's default for NATS: 4).
    if let Some(depth) = std::env::var("HERALD_BENCH_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
    {
        builder = builder.pipeline_depth(depth);
    }
    let producer = builder.build()?;
    let dest = herald_nats::subject(&scratch.subject);
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
    delete_stream(&config, &scratch.stream).await?;
    Ok(rate)
}

async fn run(url: &str, n: usize) -> Res<Vec<Figure>> {
    let config = NatsConfig::from_url(url)?;
    let mut figures = Vec::new();
    let naive_n = (n / 20).clamp(1_000, 10_000);
    for payload in [100usize, 1024] {
        // Warm-up: the first run on a fresh server is slower.
        raw_best(&config, payload, n / 10).await?;
        let raw = raw_best(&config, payload, n).await?;
        eprintln!("{payload} B raw streaming: {raw:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_streaming",
            what: format!(
                "raw async-nats, PubAcks awaited as they come, {WINDOW} outstanding (raw best)"
            ),
            rate: raw,
        });
        let naive = naive(&config, payload, naive_n).await?;
        eprintln!("{payload} B raw naive: {naive:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_naive",
            what: format!("raw async-nats, await each PubAck ({naive_n} messages)"),
            rate: naive,
        });
        for (name, what, batch, ordering) in [
            (
                "herald_default",
                "herald send_all, default batching (up to 1 024, no linger), strict order, 64 keys",
                1024,
                OrderingMode::Strict,
            ),
            (
                "herald_batch_4096",
                "herald send_all, batches of 4 096, strict order, 64 keys",
                4096,
                OrderingMode::Strict,
            ),
            (
                "herald_relaxed",
                "herald send_all, default batching, relaxed order (8 batches in flight)",
                1024,
                OrderingMode::Relaxed,
            ),
        ] {
            let rate = herald(url, payload, n, batch, ordering).await?;
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
    let url = std::env::var("HERALD_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = rt.block_on(run(&url, n))?;
    let server = NatsConfig::from_url(&url)?.redacted_url();
    let doc = serde_json::json!({
        "broker": server,
        "messages": n,
        "window": WINDOW,
    });
    write_report(&args, doc, &figures)?;
    Ok(())
}
