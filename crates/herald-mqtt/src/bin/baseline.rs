//! `mqtt-baseline`: publishes to fresh topics with raw rumqttc at its best (every publish handed
//! to the event loop, as many in flight as the broker allows), with the naive pattern (await
//! each PUBACK), and with herald over the same settings, and writes the figures as JSON.
//!
//! Usage: `HERALD_MQTT_URL=mqtt://… mqtt-baseline [--messages N] [--json FILE]`.
//! For profilers and CPU accounting, `--only raw|herald|herald_relaxed` runs that one variant
//! once (raw at its best, herald's default, or herald with relaxed ordering), 100 B, no
//! warm-up, and prints only its rate.

use std::time::{Duration, Instant};

use herald_core::{Message, OrderingMode, Producer};
use herald_mqtt::baseline::{raw_naive, raw_streaming};
use herald_mqtt::{MqttConfig, MqttTransport};
use herald_testkit::baseline::{write_report, Args, Figure};

/// Publishes in flight in the raw run: herald-mqtt's default window.
const WINDOW: usize = 4096;
const KEYS: usize = 64;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A topic of its own for each run: `herald/bench/{tag}/{pid}`.
fn topic(tag: &str) -> String {
    format!("herald/bench/{tag}/{}", std::process::id())
}

async fn herald(config: &MqttConfig, payload: usize, n: usize, ordering: OrderingMode) -> Res<f64> {
    let transport = MqttTransport::new(config.clone().window(WINDOW))?;
    transport.connect().await?;
    let producer = Producer::builder(transport).ordering(ordering).build()?;
    let dest = herald_mqtt::topic(&topic("herald"));
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
    Ok(rate)
}

async fn run(url: &str, n: usize) -> Res<Vec<Figure>> {
    let config = MqttConfig::from_url(url)?;
    let mut figures = Vec::new();
    let naive_n = (n / 20).clamp(1_000, 10_000);
    for payload in [100usize, 1024] {
        // Warm-up.
        raw_streaming(&config, &topic("warm"), payload, n / 10, WINDOW).await?;
        let raw = raw_streaming(&config, &topic("raw"), payload, n, WINDOW)
            .await?
            .msgs_per_sec();
        eprintln!("{payload} B raw streaming: {raw:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_streaming",
            what: format!(
                "raw rumqttc, QoS 1, every publish handed over, up to {WINDOW} unacknowledged (raw best)"
            ),
            rate: raw,
        });
        let naive = raw_naive(&config, &topic("naive"), payload, naive_n)
            .await?
            .msgs_per_sec();
        eprintln!("{payload} B raw naive: {naive:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_naive",
            what: format!("raw rumqttc, await each PUBACK ({naive_n} messages)"),
            rate: naive,
        });
        for (name, what, ordering) in [
            (
                "herald_default",
                "herald send_all, default batching (up to 1 024, no linger), strict order, 64 keys, key and id as user properties",
                OrderingMode::Strict,
            ),
            (
                "herald_relaxed",
                "herald send_all, default batching, relaxed order (16 batches in flight)",
                OrderingMode::Relaxed,
            ),
        ] {
            let rate = herald(&config, payload, n, ordering).await?;
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
    let url = std::env::var("HERALD_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(only) = args.value("--only") {
        let config = MqttConfig::from_url(&url)?;
        let rate = rt.block_on(async {
            match only {
                "raw" => Ok(raw_streaming(&config, &topic("raw"), 100, n, WINDOW)
                    .await?
                    .msgs_per_sec()),
                "herald" => herald(&config, 100, n, OrderingMode::Strict).await,
                "herald_relaxed" => herald(&config, 100, n, OrderingMode::Relaxed).await,
                other => {
                    Err(format!("--only takes raw, herald or herald_relaxed, not {other}").into())
                }
            }
        })?;
        println!("{only}: {rate:.0} msgs/s");
        return Ok(());
    }
    let figures = rt.block_on(run(&url, n))?;
    let server = MqttConfig::from_url(&url)?.redacted_url();
    let doc = serde_json::json!({
        "broker": server,
        "messages": n,
        "window": WINDOW,
    });
    write_report(&args, doc, &figures)?;
    Ok(())
}
