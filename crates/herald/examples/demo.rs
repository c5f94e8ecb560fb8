//! herald's main job with nothing to install: a stream of keyed messages through the whole
//! pipeline (batching, retries with backoff and budget, per-key order, backpressure) into the
//! in-memory transport, which injects transient faults and rejects poison messages. Prints what
//! happened to every message.
//!
//! Run: `cargo run --release -p herald --example demo`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use herald::batch::SizeOrLinger;
use herald::retry::{Backoff, ExponentialRetry};
use herald::testkit::{CallFault, MemoryTransport};
use herald::{Destination, ErrorClass, Message, Producer};

const MESSAGES: usize = 200_000;
const KEYS: usize = 64;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let transport = MemoryTransport::new();
    transport.set_latency(Duration::from_millis(1));
    transport.reject_payload_prefix("poison");
    // Every 10th call fails whole (a lost connection); every 13th loses some messages.
    transport.script((0..400).map(|call| match call {
        c if c % 10 == 3 => CallFault::FailAll(ErrorClass::Transient),
        c if c % 13 == 5 => CallFault::FailSome(vec![0, 7, 100]),
        _ => CallFault::Pass,
    }));

    let producer = Producer::builder(transport.clone())
        .batching(SizeOrLinger::new(2_000, 1 << 20, Duration::from_millis(5)))
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(20),
            Duration::from_secs(1),
        )))
        .buffer(50_000, 64 << 20)
        .delivery_timeout(Duration::from_secs(30))
        .build()?;

    let destinations = [
        Destination::new("orders"),
        Destination::new("payments"),
        Destination::new("audit"),
    ];
    let payload = vec![b'x'; 100];
    let messages = (0..MESSAGES).map(|i| {
        let body = if i % 50_000 == 49_999 {
            b"poison".to_vec()
        } else {
            payload.clone()
        };
        Message::new(destinations[i % 3].clone(), body)
            .with_key(format!("key-{}", i % KEYS))
            .with_header("seq", i.to_string())
    });

    println!("herald demo: {MESSAGES} messages, {KEYS} keys, 3 destinations, in-memory transport with injected faults");
    let start = Instant::now();
    let report = producer.send_all(messages).await.wait().await;
    let elapsed = start.elapsed();
    // Then a few single sends, one at a time, to show per-message latency.
    let mut latencies = Vec::new();
    for i in 0..200 {
        let d = producer
            .send(
                Message::new(destinations[0].clone(), payload.clone())
                    .with_key(format!("single-{i}")),
            )
            .await?;
        latencies.push(d.latency);
    }
    let stats = producer.stats();
    let close = producer.close(Duration::from_secs(10)).await;

    let mut by_reason: HashMap<String, usize> = HashMap::new();
    for e in &report.failed {
        *by_reason
            .entry(format!("{} ({})", e.reason().label(), e.class()))
            .or_default() += 1;
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];

    // What arrived, per destination and key, must be in sending order.
    let mut last: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    let mut order_kept = true;
    for m in transport.received() {
        let Some(seq) = m.headers().iter().find(|h| h.name == "seq") else {
            continue;
        };
        let seq: usize = String::from_utf8_lossy(&seq.value).parse()?;
        let key = (
            m.destination().to_string(),
            m.key().map(|k| k.to_vec()).unwrap_or_default(),
        );
        if let Some(prev) = last.insert(key, seq) {
            order_kept &= prev < seq;
        }
    }

    println!();
    println!(
        "  delivered      {:>9}",
        report.delivered + latencies.len() as u64
    );
    println!("  failed         {:>9}", report.failed.len());
    for (reason, n) in &by_reason {
        println!("    {reason:<24} {n:>5}  (handed back with the message)");
    }
    println!("  retries        {:>9}", stats.totals.retries);
    println!("  batches        {:>9}", stats.totals.batches);
    println!(
        "  transport calls{:>9}  (every 10th failed whole, every 13th in part)",
        transport.calls()
    );
    println!(
        "  per-key order  {:>9}",
        if order_kept { "kept" } else { "BROKEN" }
    );
    println!("  stream took    {:>9.2?}", elapsed);
    println!(
        "  throughput     {:>9.0} msg/s  (the stream, faults and backoffs included)",
        MESSAGES as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency p50    {:>9.2?}  p99 {:.2?}  (single sends, 1 ms transport latency)",
        pct(0.5),
        pct(0.99)
    );
    println!(
        "  close          drained={} unclaimed={}",
        close.drained,
        close.unclaimed.len()
    );

    let accounted = report.delivered as usize + report.failed.len() == MESSAGES;
    if !(accounted && order_kept && close.drained) {
        return Err("a message was unaccounted for or out of order".into());
    }
    Ok(())
}
