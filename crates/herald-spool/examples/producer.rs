//! herald's producer with the spool against herald without it, in one run: `send_all` of
//! 100 B and 1 KiB messages, for each sync policy; each figure the median of 5 rounds (`--rounds`), the runs
//! interleaved (every policy sees the same machine and broker; each round starts with another
//! mode), and the ratio to no spool taken within each round.
//!
//! - To a counting in-memory transport (the default): what is measured is the spool's cost on
//!   the producer's path.
//! - To Kafka with `--kafka BOOTSTRAP` (`cargo xtask bench spool` starts one): what a user
//!   sees, the broker included.
//! - `--recover N`: N messages of 100 B left in a spool (as by a crash during an outage), then
//!   a producer opened on it sends them all; the process's resident memory is sampled
//!   meanwhile: what N waiting messages cost in memory.
//! - `--outage N`: N messages of 100 B given to `send_all` while the broker stalls (they wait
//!   in the spool), then delivered; resident memory sampled meanwhile.
//!
//! `cargo run --release -p herald-spool --example producer -- [--messages N] [--dir DIR]
//! [--kafka BOOTSTRAP] [--recover N] [--outage N] [--json PATH]` (default 300 000 messages; DIR: a folder
//! in the system's temporary directory, removed afterwards). Not a test: it asserts nothing.
//! Figures go to stdout as a table, and to PATH as JSON.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use herald_core::{Message, Producer, Transport};
use herald_kafka::{KafkaConfig, KafkaTransport};
use herald_spool::{ProducerBuilderExt as _, Spool, SpoolConfig, SyncPolicy};
use herald_testkit::MemoryTransport;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 300_000)]
    messages: usize,
    /// Where the spool lives (emptied before each run).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Send to this Kafka broker instead of the in-memory transport.
    #[arg(long)]
    kafka: Option<String>,
    /// Also measure memory while this many messages left in a spool are sent.
    #[arg(long)]
    recover: Option<usize>,
    /// Also measure memory while this many messages are accepted with the broker stalled
    /// (they wait in the spool) and then delivered; repeat for several sizes.
    #[arg(long)]
    outage: Vec<usize>,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Rounds (every mode once per round); the figures are their medians.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Clone, Copy)]
enum Mode {
    NoSpool,
    Spool(SyncPolicy),
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoSpool => "no spool",
            Mode::Spool(SyncPolicy::Group) => "spool, group commit",
            Mode::Spool(SyncPolicy::Interval(_)) => "spool, fsync every 500 ms",
            Mode::Spool(SyncPolicy::Os) => "spool, no fsync (OS)",
            Mode::Spool(_) => "spool",
        }
    }
}

fn transport(kafka: Option<&str>) -> Arc<dyn Transport> {
    match kafka {
        Some(bootstrap) => {
            Arc::new(KafkaTransport::new(KafkaConfig::new(bootstrap)).expect("kafka"))
        }
        None => Arc::new(MemoryTransport::counting()),
    }
}

/// Messages per second through `send_all` to the end of its receipt.
fn run(
    rt: &tokio::runtime::Runtime,
    mode: Mode,
    dir: &Path,
    kafka: Option<&str>,
    topic: &str,
    n: usize,
    size: usize,
) -> f64 {
    let _fresh = std::fs::remove_dir_all(dir);
    rt.block_on(async {
        let mut builder = Producer::builder_shared(transport(kafka));
        if kafka.is_some() {
            builder = builder.batching(herald_kafka::recommended_batching());
        }
        if let Mode::Spool(sync) = mode {
            builder = builder
                .spool(SpoolConfig::new(dir).sync(sync).max_bytes(8 << 30))
                .expect("spool");
        }
        let p = builder.build().expect("producer");
        let payload = vec![b'x'; size];
        let start = Instant::now();
        let receipt = p
            .send_all(
                (0..n)
                    .map(|i| Message::new(topic, payload.clone()).with_key(format!("k{}", i % 64))),
            )
            .await;
        let report = receipt.wait().await;
        let took = start.elapsed();
        assert_eq!(report.delivered, n as u64, "{:?}", report.failed.first());
        p.close(Duration::from_secs(30)).await;
        n as f64 / took.as_secs_f64()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The process's resident memory now, in bytes (Linux), 0 elsewhere.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Leaves `n` messages of 100 B in a spool at `dir`, then sends them with a producer opened on
/// it, sampling resident memory every 5 ms: (RSS before, peak RSS during, msg/s).
fn recover(rt: &tokio::runtime::Runtime, dir: &Path, n: usize) -> (u64, u64, f64) {
    let _fresh = std::fs::remove_dir_all(dir);
    {
        let (spool, _) = Spool::open(SpoolConfig::new(dir).max_bytes(8 << 30)).expect("spool");
        let payload = vec![b'x'; 100];
        for start in (0..n).step_by(10_000) {
            let chunk: Vec<Message> = (start..n.min(start + 10_000))
                .map(|i| {
                    Message::new("recovered", payload.clone()).with_key(format!("k{}", i % 64))
                })
                .collect();
            spool.append_all(&chunk).expect("append");
        }
        spool.close().expect("close");
    }
    let transport = MemoryTransport::counting();
    let mut took = Duration::ZERO;
    let (before, peak) = sampling_rss(|| {
        let start = Instant::now();
        rt.block_on(async {
            let p = Producer::builder(transport.clone())
                .spool(SpoolConfig::new(dir).max_bytes(8 << 30))
                .expect("spool")
                .build()
                .expect("producer");
            p.flush().await;
            p.close(Duration::from_secs(60)).await;
        });
        took = start.elapsed();
    });
    assert_eq!(
        transport.delivered(),
        n as u64,
        "every recovered message sent"
    );
    (before, peak, n as f64 / took.as_secs_f64())
}

/// Samples the process's resident memory every 5 ms while `work` runs: (RSS before, peak).
fn sampling_rss(work: impl FnOnce()) -> (u64, u64) {
    let before = rss();
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    work();
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    (before, peak.load(Ordering::Relaxed))
}

/// `n` messages of 100 B given to `send_all` (buffer: the default 100 000) while the broker
/// stalls: accepted into the spool, they wait there; then it comes back and they are
/// delivered. (RSS before, peak RSS until all were accepted, peak RSS until all were
/// delivered, msg/s accepted.)
fn outage(rt: &tokio::runtime::Runtime, dir: &Path, n: usize) -> (u64, u64, u64, f64) {
    let _fresh = std::fs::remove_dir_all(dir);
    let transport = MemoryTransport::counting();
    transport.hold();
    let p = rt.block_on(async {
        Producer::builder(transport.clone())
            .spool(SpoolConfig::new(dir).max_bytes(8 << 30))
            .expect("spool")
            .build()
            .expect("producer")
    });
    let payload = vec![b'x'; 100];
    let mut receipt = None;
    let mut took = Duration::ZERO;
    let (before, accepting) = sampling_rss(|| {
        let start = Instant::now();
        receipt =
            Some(rt.block_on(p.send_all((0..n).map(|i| {
                Message::new("outage", payload.clone()).with_key(format!("k{}", i % 64))
            }))));
        took = start.elapsed();
    });
    assert_eq!(transport.delivered(), 0, "the broker stalled");
    let (_, delivering) = sampling_rss(|| {
        transport.release();
        let report = rt.block_on(receipt.take().expect("sent").wait());
        assert_eq!(report.delivered, n as u64, "{:?}", report.failed.first());
        rt.block_on(p.close(Duration::from_secs(60)));
    });
    (before, accepting, delivering, n as f64 / took.as_secs_f64())
}

fn main() {
    let args = Args::parse();
    let n = args.messages;
    let base: PathBuf = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("herald-spool-bench-{}", std::process::id()))
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let kafka = args.kafka.as_deref();
    let modes = [
        Mode::NoSpool,
        Mode::Spool(SyncPolicy::Group),
        Mode::Spool(SyncPolicy::Interval(Duration::from_millis(500))),
        Mode::Spool(SyncPolicy::Os),
    ];
    let to = kafka.map_or_else(
        || "a counting in-memory transport".to_owned(),
        |b| format!("Kafka at {b}"),
    );
    println!(
        "{n} messages per run to {to}, send_all, median of {} rounds (min-max), ratio to no spool within each round",
        args.rounds
    );
    println!("| payload | mode | msg/s | spread | ratio (min-max) |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    // `--rounds 0`: only the memory runs.
    for size in [100, 1024].into_iter().filter(|_| args.rounds > 0) {
        let mut rates = vec![Vec::new(); modes.len()];
        let mut ratios = vec![Vec::new(); modes.len()];
        for round in 0..args.rounds {
            // Each round starts with another mode, so that a broker slowing down as its log
            // grows (Tansu's memory storage) weighs on every mode alike.
            let mut per = vec![0.0; modes.len()];
            for k in (0..modes.len()).map(|i| (i + round) % modes.len()) {
                // A topic of its own per run: Tansu slows down as a topic's log grows.
                let topic = format!("spool-bench-{size}-{round}-{k}-{}", std::process::id());
                if let Some(bootstrap) = kafka {
                    rt.block_on(herald_kafka::admin::create_topic(bootstrap, &topic, 3, 1))
                        .expect("create topic");
                }
                per[k] = run(&rt, modes[k], &base, kafka, &topic, n, size);
            }
            for (k, r) in per.iter().enumerate() {
                rates[k].push(*r);
                ratios[k].push(r / per[0]);
            }
        }
        for (k, mode) in modes.iter().enumerate() {
            let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            let (rate, ratio) = (median(rates[k].clone()), median(ratios[k].clone()));
            println!(
                "| {size} B | {} | {rate:.0} | {:.0}-{:.0} | {ratio:.2}x ({:.2}-{:.2}) |",
                mode.name(),
                min(&rates[k]),
                max(&rates[k]),
                min(&ratios[k]),
                max(&ratios[k]),
            );
            rows.push(json!({
                "size": size,
                "mode": mode.name(),
                "msgs_per_sec": rate,
                "min": min(&rates[k]),
                "max": max(&rates[k]),
                "ratio": ratio,
                "ratio_min": min(&ratios[k]),
                "ratio_max": max(&ratios[k]),
            }));
        }
    }
    let recovery = args.recover.map(|m| {
        let (before, peak, rate) = recover(&rt, &base, m);
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        println!(
            "\n{m} messages of 100 B left in a spool, sent by a producer opened on it: {rate:.0} msg/s; resident memory {:.0} MiB before, {:.0} MiB at most while sending (+{:.0} MiB)",
            mib(before),
            mib(peak),
            mib(peak.saturating_sub(before))
        );
        json!({
            "messages": m,
            "msgs_per_sec": rate,
            "rss_before_bytes": before,
            "rss_peak_bytes": peak,
        })
    });
    let outage: Vec<_> = args.outage.iter().map(|&m| {
        let (before, accepting, delivering, rate) = outage(&rt, &base, m);
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        println!(
            "\n{m} messages of 100 B accepted ({rate:.0} msg/s) while the broker stalled, then delivered: resident memory {:.0} MiB before, {:.0} MiB at most while they were accepted (+{:.0} MiB), {:.0} MiB at most while they were delivered (+{:.0} MiB)",
            mib(before),
            mib(accepting),
            mib(accepting.saturating_sub(before)),
            mib(delivering),
            mib(delivering.saturating_sub(before)),
        );
        json!({
            "messages": m,
            "accepted_per_sec": rate,
            "rss_before_bytes": before,
            "rss_peak_accepting_bytes": accepting,
            "rss_peak_delivering_bytes": delivering,
        })
    }).collect();
    if let Some(path) = &args.json {
        let out = json!({
            "messages": n,
            "rounds": args.rounds,
            "to": to,
            "rows": rows,
            "recovery": recovery,
            "outage": outage,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out).expect("json"))
            .expect("write json");
    }
    let _removed = std::fs::remove_dir_all(&base);
}
