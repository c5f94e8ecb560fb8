//! herald's producer with the spool against herald without it, in one run: `send_all` of
//! 100 B and 1 KiB messages to a counting in-memory transport (no broker: what is measured is
//! the spool's cost on the producer's path), for each sync policy; each figure the median of
//! 3 runs, the runs interleaved so that every policy sees the same machine.
//!
//! `cargo run --release -p herald-spool --example producer [MESSAGES [DIR]]` (default 300 000
//! messages; DIR: a folder in the system's temporary directory, removed afterwards). Not a
//! test: it asserts nothing. Figures go to stdout as a table.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herald_core::{Message, Producer};
use herald_spool::{ProducerBuilderExt as _, SpoolConfig, SyncPolicy};
use herald_testkit::MemoryTransport;

const RUNS: usize = 3;

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

/// Messages per second through `send_all` to the end of its receipt.
fn run(rt: &tokio::runtime::Runtime, mode: Mode, dir: &Path, n: usize, size: usize) -> f64 {
    let _fresh = std::fs::remove_dir_all(dir);
    rt.block_on(async {
        let mut builder = Producer::builder(MemoryTransport::counting());
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
                (0..n).map(|i| {
                    Message::new("bench", payload.clone()).with_key(format!("k{}", i % 64))
                }),
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

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map_or(300_000, |s| s.parse().expect("MESSAGES is a number"));
    let base: PathBuf = args.next().map_or_else(
        || std::env::temp_dir().join(format!("herald-spool-bench-{}", std::process::id())),
        PathBuf::from,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let modes = [
        Mode::NoSpool,
        Mode::Spool(SyncPolicy::Group),
        Mode::Spool(SyncPolicy::Interval(Duration::from_millis(500))),
        Mode::Spool(SyncPolicy::Os),
    ];
    println!("{n} messages per run, send_all, median of {RUNS} runs (min-max), ratio to no spool in the same run");
    println!("| payload | mode | msg/s | spread | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    for size in [100, 1024] {
        let mut rates = vec![Vec::new(); modes.len()];
        let mut ratios = vec![Vec::new(); modes.len()];
        for _ in 0..RUNS {
            let per: Vec<f64> = modes.iter().map(|&m| run(&rt, m, &base, n, size)).collect();
            for (k, r) in per.iter().enumerate() {
                rates[k].push(*r);
                ratios[k].push(r / per[0]);
            }
        }
        for (k, mode) in modes.iter().enumerate() {
            let lo = rates[k].iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rates[k].iter().copied().fold(0.0, f64::max);
            println!(
                "| {size} B | {} | {:.0} | {lo:.0}-{hi:.0} | {:.2}x |",
                mode.name(),
                median(rates[k].clone()),
                median(ratios[k].clone())
            );
        }
    }
    let _removed = std::fs::remove_dir_all(&base);
}
