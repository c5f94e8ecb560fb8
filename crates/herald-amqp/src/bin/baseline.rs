//! `amqp-baseline`: what `cargo xtask bench amqp` runs. Publishes persistent messages to fresh
//! durable queues with raw lapin at its best (streaming confirms over several channels), with the
//! naive pattern (await each confirm), and with herald over the same settings, and writes the
//! figures as JSON.
//!
//! Usage: `HERALD_AMQP_URL=amqp://… amqp-baseline [--messages N] [--json FILE]`

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use herald_amqp::{AmqpConfig, AmqpTransport};
use herald_core::{Message, OrderingMode, Producer};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

const CHANNELS: usize = 8;
const WINDOW: usize = 512;
const KEYS: usize = 64;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Figure {
    payload: usize,
    name: &'static str,
    what: String,
    rate: f64,
}

async fn fresh_queue(conn: &Connection, tag: &str) -> Res<String> {
    let name = format!("herald-bench-{tag}-{}", std::process::id());
    let ch = conn.create_channel().await?;
    ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await?;
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.close(200, "OK".into()).await?;
    Ok(name)
}

async fn delete_queue(conn: &Connection, name: &str) -> Res<()> {
    let ch = conn.create_channel().await?;
    ch.queue_delete(name.into(), QueueDeleteOptions::default())
        .await?;
    ch.close(200, "OK".into()).await?;
    Ok(())
}

fn props() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn acked(c: &Confirmation) -> Res<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("not confirmed: {other:?}").into()),
    }
}

/// One channel's share, streaming: at most `window` unconfirmed, confirms awaited as they come.
async fn stream_on(ch: Channel, queue: String, payload: Vec<u8>, n: usize) -> Res<()> {
    let opts = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut pending = VecDeque::with_capacity(WINDOW);
    for _ in 0..n {
        if pending.len() >= WINDOW {
            if let Some(c) = pending.pop_front() {
                let c: lapin::PublisherConfirm = c;
                acked(&c.await?)?;
            }
        }
        pending.push_back(
            ch.basic_publish("".into(), queue.as_str().into(), opts, &payload, props())
                .await?,
        );
    }
    for c in pending {
        acked(&c.await?)?;
    }
    Ok(())
}

async fn raw_streaming(url: &str, payload: usize, n: usize) -> Res<f64> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let queue = fresh_queue(&conn, "raw").await?;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let start = Instant::now();
    let shares = channels.into_iter().enumerate().map(|(i, ch)| {
        let share = n / CHANNELS + usize::from(i < n % CHANNELS);
        tokio::spawn(stream_on(ch, queue.clone(), vec![b'x'; payload], share))
    });
    for r in join_all(shares).await {
        r??;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    delete_queue(&conn, &queue).await?;
    conn.close(200, "OK".into()).await?;
    Ok(rate)
}

async fn raw_naive(url: &str, payload: usize, n: usize) -> Res<f64> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let queue = fresh_queue(&conn, "naive").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; payload];
    let opts = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let start = Instant::now();
    for _ in 0..n {
        let c = ch
            .basic_publish("".into(), queue.as_str().into(), opts, &body, props())
            .await?
            .await?;
        acked(&c)?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    delete_queue(&conn, &queue).await?;
    conn.close(200, "OK".into()).await?;
    Ok(rate)
}

async fn herald(
    url: &str,
    payload: usize,
    n: usize,
    batch: usize,
    ordering: OrderingMode,
) -> Res<f64> {
    let admin = Connection::connect(url, ConnectionProperties::default()).await?;
    let queue = fresh_queue(&admin, "herald").await?;
    let transport =
        AmqpTransport::new(AmqpConfig::from_url(url)?.channels(CHANNELS).window(WINDOW))?;
    transport.connect().await?;
    let producer = Producer::builder(transport)
        .batching(herald_batch::SizeOrLinger::new(
            batch,
            64 << 20,
            Duration::from_millis(5),
        ))
        .ordering(ordering)
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
    delete_queue(&admin, &queue).await?;
    admin.close(200, "OK".into()).await?;
    Ok(rate)
}

async fn run(url: &str, n: usize) -> Res<Vec<Figure>> {
    let mut figures = Vec::new();
    let naive_n = (n / 20).clamp(1_000, 10_000);
    for payload in [100usize, 1024] {
        // Warm-up: the first run on a fresh node is slower.
        raw_streaming(url, payload, n / 10).await?;
        let raw = raw_streaming(url, payload, n).await?;
        eprintln!("{payload} B raw streaming: {raw:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_streaming",
            what: format!(
                "raw lapin, streaming confirms, {CHANNELS} channels × {WINDOW} (raw best)"
            ),
            rate: raw,
        });
        let naive = raw_naive(url, payload, naive_n).await?;
        eprintln!("{payload} B raw naive: {naive:.0} msg/s");
        figures.push(Figure {
            payload,
            name: "raw_naive",
            what: format!("raw lapin, await each confirm ({naive_n} messages)"),
            rate: naive,
        });
        for (name, what, batch, ordering) in [
            (
                "herald_default",
                "herald send_all, default batching (1 024 / 5 ms), strict order, 64 keys",
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: usize = arg("--messages").map_or(Ok(100_000), |s| s.parse())?;
    let url = std::env::var("HERALD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = rt.block_on(run(&url, n))?;
    let broker = AmqpConfig::from_url(&url)?.redacted_url();
    let mut json = Vec::new();
    for f in &figures {
        let raw = figures
            .iter()
            .find(|g| g.payload == f.payload && g.name == "raw_streaming")
            .map_or(f64::NAN, |g| g.rate);
        let naive = figures
            .iter()
            .find(|g| g.payload == f.payload && g.name == "raw_naive")
            .map_or(f64::NAN, |g| g.rate);
        json.push(serde_json::json!({
            "payload_bytes": f.payload,
            "name": f.name,
            "what": f.what,
            "msgs_per_sec": f.rate,
            "vs_raw": f.rate / raw,
            "vs_naive": f.rate / naive,
        }));
    }
    let doc = serde_json::json!({
        "broker": broker,
        "messages": n,
        "channels": CHANNELS,
        "window": WINDOW,
        "figures": json,
    });
    match arg("--json") {
        Some(path) => std::fs::write(path, serde_json::to_string_pretty(&doc)?)?,
        None => println!("{}", serde_json::to_string_pretty(&doc)?),
    }
    Ok(())
}
