//! Group-commit appends per second on this machine's disk, at 100 B and 1 KiB, from one
//! appender and from 8 at once, and the disk's fsync latency; each figure the median of 3 runs.
//!
//! `cargo run --release -p herald-spool --example appends [DIR]` (default: a folder in the
//! system's temporary directory, removed afterwards). Not a test: it asserts nothing.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::{Message, MessageId};
use herald_spool::{Spool, SpoolConfig};

const RUNS: usize = 3;

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

struct Run {
    per_sec: f64,
    fsyncs_per_append: f64,
    append_latency: Duration,
}

/// `threads` appenders, `per_thread` appends each, in a fresh spool under `dir`.
fn run(dir: &Path, payload: usize, threads: usize, per_thread: usize) -> Run {
    let _fresh = std::fs::remove_dir_all(dir);
    let (spool, _) = Spool::open(SpoolConfig::new(dir)).expect("open the spool");
    let spool = Arc::new(spool);
    let before = spool.stats().fsyncs;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(per_thread);
                for i in 0..per_thread {
                    let m = Message::new("bench", vec![b'x'; payload])
                        .with_key(format!("k{}", i % 16))
                        .with_id(MessageId::from_u128((t * per_thread + i) as u128));
                    let t0 = Instant::now();
                    spool.append(&m).expect("append");
                    latencies.push(t0.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.join().expect("appender"));
    }
    let elapsed = start.elapsed();
    let total = threads * per_thread;
    let fsyncs = spool.stats().fsyncs - before;
    drop(spool);
    let _done = std::fs::remove_dir_all(dir);
    Run {
        per_sec: total as f64 / elapsed.as_secs_f64(),
        fsyncs_per_append: fsyncs as f64 / total as f64,
        append_latency: median(latencies),
    }
}

/// The disk's own fsync: append 100 bytes and fdatasync, `n` times; median and 99th
/// percentile.
fn fsync_latency(dir: &Path, n: usize) -> (Duration, Duration) {
    std::fs::create_dir_all(dir).expect("dir");
    let path = dir.join("fsync-probe");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("probe file");
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        f.write_all(&[0u8; 100]).expect("write");
        let t0 = Instant::now();
        f.sync_data().expect("fsync");
        times.push(t0.elapsed());
    }
    drop(f);
    let _done = std::fs::remove_file(&path);
    times.sort();
    (times[n / 2], times[n * 99 / 100])
}

fn main() {
    let dir: PathBuf = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("herald-spool-bench-{}", std::process::id())),
        PathBuf::from,
    );
    let (p50, p99) = fsync_latency(&dir, 500);
    println!("disk fsync (100 B append + fdatasync): median {p50:?}, p99 {p99:?}");
    println!("group commit (SyncPolicy::Group), median of {RUNS} runs:");
    println!("payload  appenders  appends/s  fsyncs/append  median append latency");
    for payload in [100, 1024] {
        for (threads, per_thread) in [(1, 2000), (8, 1000)] {
            let runs: Vec<Run> = (0..RUNS)
                .map(|i| run(&dir.join(format!("run-{i}")), payload, threads, per_thread))
                .collect();
            let per_sec = median(runs.iter().map(|r| r.per_sec).collect());
            let ratio = median(runs.iter().map(|r| r.fsyncs_per_append).collect());
            let latency = median(runs.iter().map(|r| r.append_latency).collect());
            println!("{payload:>7}  {threads:>9}  {per_sec:>9.0}  {ratio:>13.3}  {latency:>21?}");
        }
    }
    let _done = std::fs::remove_dir_all(&dir);
}
