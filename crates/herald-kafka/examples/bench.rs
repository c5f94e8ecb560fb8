//! herald on Kafka against raw rdkafka at its best and the naive pattern, same broker, one run.
//! Run by `cargo xtask bench kafka`; directly:
//! `cargo run --release -p herald-kafka --features baseline --example bench -- [--bootstrap H:P]
//! [--messages N] [--naive N] [--rounds R] [--json FILE] [--rtt-ms MS]`.
//! Without `--bootstrap`, on librdkafka's mock cluster. `--rtt-ms` only says, in the report,
//! what round trip lies between this process and `--bootstrap`: `cargo xtask bench kafka`
//! runs the testkit's delaying proxy as a process of its own (`delay_proxy`) in front of a
//! Tansu that advertises the proxy's address, so that every connection takes the round trip,
//! and passes the proxy as `--bootstrap`. (A proxy in this process would copy every byte on
//! herald's runtime, beside herald's tasks, and on none of the raw client's threads.)
//!
//! Every variant is timed from a connected producer (one message acknowledged first), herald
//! at its defaults (buffer, recommended batching, strict order), and raw and herald alternate
//! for `--rounds` rounds (default 5; which goes first alternates too), each rate reported as
//! its median and herald / raw taken within each round, then as the median with its range: on
//! a two-core machine shared with the broker, single runs of the same variant vary by up to 2x.
//! `HERALD_BENCH_RAW_PROPS=k=v,...` gives the raw baseline other librdkafka settings (to check
//! it is at its best); experiments on herald: `HERALD_BENCH_ORDERING`, `HERALD_BENCH_BATCH`,
//! `HERALD_BENCH_ID_HEADER=on` (every message's id in the `herald-message-id` header, off by
//! default: run with and without it to measure what it costs).

use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::{Destination, Message, Producer};
use herald_kafka::baseline::{self, Run};
use herald_kafka::mock::MockKafka;
use herald_kafka::{KafkaConfig, KafkaTransport};

/// The run with the median rate.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.msgs_per_sec().total_cmp(&b.msgs_per_sec()));
    runs[runs.len() / 2]
}

/// Extra librdkafka properties for the raw baseline only, from `HERALD_BENCH_RAW_PROPS`
/// (`k=v,k=v`): to check that the raw client is at its best (`linger.ms=5`, say).
fn raw_props() -> Vec<(String, String)> {
    std::env::var("HERALD_BENCH_RAW_PROPS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

async fn herald(bootstrap: &str, topic: &str, n: u64, size: usize) -> Run {
    let mut config = KafkaConfig::new(bootstrap);
    if std::env::var("HERALD_BENCH_ID_HEADER").is_ok_and(|v| v == "on") {
        config = config.message_id_header(Some(herald_kafka::MESSAGE_ID_HEADER.into()));
    }
    let transport = KafkaTransport::new(config).expect("transport");
    // Experiments: HERALD_BENCH_ORDERING=relaxed, HERALD_BENCH_BATCH=<messages per batch>.
    let relaxed = std::env::var("HERALD_BENCH_ORDERING").is_ok_and(|o| o == "relaxed");
    let batching = match std::env::var("HERALD_BENCH_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
    {
        Some(m) => herald_batch::SizeOrLinger::new(m, 256 << 20, Duration::from_millis(5)),
        None => herald_kafka::recommended_batching(),
    };
    let producer = Producer::builder(transport)
        .ordering(if relaxed {
            herald_core::OrderingMode::Relaxed
        } else {
            herald_core::OrderingMode::Strict
        })
        .batching(batching)
        .build()
        .expect("producer");
    let dest = Destination::new(topic);
    let payload = Bytes::from(vec![b'x'; size]);
    let keys: Vec<Bytes> = (0..64).map(|k| Bytes::from(format!("key-{k}"))).collect();
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            Message::new(dest.clone(), payload.clone()).with_key(keys[(i % 64) as usize].clone())
        })
        .collect();
    // Timed from a connected producer, as the baselines: one message acknowledged first.
    let cold = Instant::now();
    producer
        .send(Message::new(dest.clone(), payload.clone()).with_key("warm-up"))
        .await
        .expect("warm-up message");
    eprintln!(
        "herald: the first message took {:?} (connection, metadata, producer id)",
        cold.elapsed()
    );
    let start = Instant::now();
    let report = producer.send_all(msgs).await.wait().await;
    let elapsed = start.elapsed();
    producer.close(Duration::from_secs(30)).await;
    Run {
        delivered: report.delivered,
        failed: report.failed.len() as u64,
        elapsed,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    // For profilers and CPU accounting: `--only raw|herald` runs one variant once at 100 B
    // (on the mock cluster, or on `--bootstrap`), and prints only its rate.
    if let Some(only) = arg(&args, "--only") {
        let n: u64 = arg(&args, "--messages").map_or(100_000, |s| s.parse().expect("N"));
        let (mock, b, topic) = match arg(&args, "--bootstrap") {
            Some(b) => {
                let topic = format!("only-{only}-{}", std::process::id());
                herald_kafka::admin::create_topic(&b, &topic, 3, 1)
                    .await
                    .expect("topic");
                (None, b, topic)
            }
            None => {
                let mock = MockKafka::start(1).expect("mock");
                mock.create_topic("only", 3).expect("topic");
                let b = mock.bootstrap_servers().to_owned();
                (Some(mock), b, "only".to_owned())
            }
        };
        let run = match only.as_str() {
            "raw" => tokio::task::spawn_blocking(move || {
                baseline::raw_threaded(&b, &raw_props(), &topic, n, 100)
            })
            .await
            .expect("join")
            .expect("raw"),
            "herald" => herald(&b, &topic, n, 100).await,
            other => panic!("--only takes raw or herald, not {other}"),
        };
        assert_eq!(run.delivered, n);
        println!("{only}: {:.0} msgs/s", run.msgs_per_sec());
        drop(mock);
        return;
    }
    let n: u64 = arg(&args, "--messages").map_or(1_000_000, |s| s.parse().expect("--messages N"));
    let naive_n: u64 = arg(&args, "--naive").map_or(300, |s| s.parse().expect("--naive N"));
    let rounds: usize = arg(&args, "--rounds").map_or(5, |s| s.parse().expect("--rounds R"));
    let mock = if arg(&args, "--bootstrap").is_none() {
        Some(MockKafka::start(1).expect("mock"))
    } else {
        None
    };
    let bootstrap = arg(&args, "--bootstrap").unwrap_or_else(|| {
        mock.as_ref()
            .map(|m| m.bootstrap_servers().to_owned())
            .unwrap_or_default()
    });
    // The round trip of the path to `--bootstrap`, for the report (see the top).
    let rtt_ms: u64 = arg(&args, "--rtt-ms").map_or(0, |s| s.parse().expect("--rtt-ms MS"));
    let broker = if mock.is_some() {
        "librdkafka mock cluster (1 broker)"
    } else {
        "the broker at --bootstrap"
    };
    let mut rows = Vec::new();
    for size in [100usize, 1024] {
        let count = if size >= 1024 { n * 3 / 10 } else { n };
        let mut topics = Vec::new();
        for kind in ["raw", "herald", "naive"] {
            let topic = format!("bench-{kind}-{size}-{}", std::process::id());
            match &mock {
                Some(m) => m.create_topic(&topic, 3).expect("topic"),
                None => herald_kafka::admin::create_topic(&bootstrap, &topic, 3, 1)
                    .await
                    .expect("topic"),
            }
            topics.push(topic);
        }
        let (mut raws, mut heralds, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds.max(1) {
            let raw_run = || {
                let (b, t) = (bootstrap.clone(), topics[0].clone());
                async move {
                    tokio::task::spawn_blocking(move || {
                        baseline::raw_threaded(&b, &raw_props(), &t, count, size)
                    })
                    .await
                    .expect("join")
                    .expect("raw run")
                }
            };
            // Who goes first alternates from round to round.
            let (raw, her) = if round % 2 == 0 {
                let raw = raw_run().await;
                (raw, herald(&bootstrap, &topics[1], count, size).await)
            } else {
                let her = herald(&bootstrap, &topics[1], count, size).await;
                (raw_run().await, her)
            };
            ratios.push(her.msgs_per_sec() / raw.msgs_per_sec());
            eprintln!(
                "{size} B round {round}: raw {:.0}/s, herald {:.0}/s",
                raw.msgs_per_sec(),
                her.msgs_per_sec()
            );
            assert_eq!((raw.failed, her.failed), (0, 0), "a run lost messages");
            raws.push(raw);
            heralds.push(her);
        }
        let (raw, her) = (median(raws), median(heralds));
        // herald / raw taken within each round, then the median and the range.
        ratios.sort_by(f64::total_cmp);
        let (vs_raw, lo, hi) = (
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1],
        );
        let naive = baseline::naive_await_each(&bootstrap, &[], &topics[2], naive_n, size)
            .await
            .expect("naive run");
        for (name, run) in [("raw", &raw), ("herald", &her), ("naive", &naive)] {
            assert_eq!(run.failed, 0, "{name} lost messages");
        }
        println!(
            "{size:>5} B  raw {:>9.0}/s  herald {:>9.0}/s ({vs_raw:.2}x raw, {lo:.2}-{hi:.2} in the rounds)  naive {:>7.0}/s (herald {:.0}x naive)",
            raw.msgs_per_sec(), her.msgs_per_sec(),
            naive.msgs_per_sec(), her.msgs_per_sec() / naive.msgs_per_sec()
        );
        rows.push(format!(
            "{{\"size\":{size},\"messages\":{count},\"naive_messages\":{naive_n},\"raw_best_msgs_per_sec\":{:.0},\"herald_msgs_per_sec\":{:.0},\"naive_msgs_per_sec\":{:.1},\"vs_raw\":{vs_raw:.4},\"vs_raw_range\":[{lo:.4},{hi:.4}]}}",
            raw.msgs_per_sec(), her.msgs_per_sec(), naive.msgs_per_sec()
        ));
    }
    if let Some(path) = arg(&args, "--json") {
        std::fs::write(
            &path,
            format!(
                "{{\"broker\":\"{broker}\",\"rtt_ms\":{rtt_ms},\"rows\":[{}]}}\n",
                rows.join(",")
            ),
        )
        .expect("write json");
    }
}
