//! The storage choice, measured: herald's segment log (the spool) against redb, a well-kept
//! embedded key-value store, on what the spool is for:
//!
//! - group-commit appends per second, at 100 B and 1 KiB, from 1 and from 8 appenders at once,
//!   each append returning once it is durable (fsynced). The spool commits groups itself
//!   (`SyncPolicy::Group`); for redb, a writer thread does the same by hand: it takes every
//!   append waiting, writes them in one transaction (`Durability::Immediate`: one fsync) and
//!   answers them all;
//! - recovery: reopening a store that holds 200 000 records of 100 B and reading them all back
//!   in order, as messages, as a producer does after a crash.
//!
//! Each figure is the median of 3 runs. `cargo run --release -p herald-spool --example stores
//! -- [--dir DIR] [--json PATH]` (default: a folder in the system's temporary directory,
//! removed afterwards; `cargo xtask bench spool` runs it). Not a test: it asserts nothing.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use herald_core::{Message, MessageId};
use herald_spool::{Spool, SpoolConfig};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::json;

const RUNS: usize = 3;
const RECORDS: usize = 200_000;
const TABLE: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("messages");

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn message(i: usize, payload: usize) -> Message {
    Message::new("bench", vec![b'x'; payload])
        .with_key(format!("k{}", i % 16))
        .with_id(MessageId::from_u128(i as u128))
}

/// The bytes redb keeps per message: destination, key, id and payload, length-prefixed (the
/// spool frames and checksums its records; redb checksums its pages).
fn encode(m: &Message) -> Vec<u8> {
    let dest = m.destination().as_str().as_bytes();
    let key = m.key().map_or(&[][..], |k| &k[..]);
    let mut out = Vec::with_capacity(dest.len() + key.len() + m.payload().len() + 32);
    for part in [dest, key] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&m.id().map_or(0, MessageId::as_u128).to_le_bytes());
    out.extend_from_slice(m.payload());
    out
}

/// The message back from [`encode`]'s bytes (recovery hands messages to the producer, so both
/// candidates are timed up to a `Message`).
fn decode(b: &[u8]) -> Message {
    let mut at = 0;
    let mut part = || {
        let len = u32::from_le_bytes(b[at..at + 4].try_into().expect("length")) as usize;
        let p = &b[at + 4..at + 4 + len];
        at += 4 + len;
        p
    };
    let dest = String::from_utf8_lossy(part()).into_owned();
    let key = part().to_vec();
    let id = u128::from_le_bytes(b[at..at + 16].try_into().expect("id"));
    Message::new(dest, b[at + 16..].to_vec())
        .with_key(key)
        .with_id(MessageId::from_u128(id))
}

/// Something appends go to, durably.
trait Candidate: Send + Sync {
    /// Returns once `m` is durable.
    fn append(&self, m: &Message);
}

impl Candidate for Spool {
    fn append(&self, m: &Message) {
        Spool::append(self, m).expect("spool append");
    }
}

/// redb with group commit by hand: appenders queue, one writer commits what is queued.
struct Redb {
    queue: mpsc::Sender<(Vec<u8>, mpsc::Sender<()>)>,
}

impl Redb {
    fn open(path: &Path) -> (Self, std::thread::JoinHandle<()>) {
        let db = Database::create(path).expect("redb");
        let (tx, rx) = mpsc::channel::<(Vec<u8>, mpsc::Sender<()>)>();
        let writer = std::thread::spawn(move || {
            let mut next = 0u64;
            while let Ok(first) = rx.recv() {
                let mut group = vec![first];
                group.extend(rx.try_iter());
                let txn = db.begin_write().expect("begin");
                {
                    let mut table = txn.open_table(TABLE).expect("table");
                    for (bytes, _) in &group {
                        table.insert(next, bytes.as_slice()).expect("insert");
                        next += 1;
                    }
                }
                txn.commit().expect("commit");
                for (_, done) in group {
                    let _told = done.send(());
                }
            }
        });
        (Self { queue: tx }, writer)
    }
}

impl Candidate for Redb {
    fn append(&self, m: &Message) {
        let (done, durable) = mpsc::channel();
        self.queue.send((encode(m), done)).expect("queue");
        durable.recv().expect("committed");
    }
}

/// Appends per second from `threads` appenders, `per_thread` each.
fn appends(store: Arc<dyn Candidate>, payload: usize, threads: usize, per_thread: usize) -> f64 {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    store.append(&message(t * per_thread + i, payload));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("appender");
    }
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

fn spool_appends(dir: &Path, payload: usize, threads: usize, per_thread: usize) -> f64 {
    let _fresh = std::fs::remove_dir_all(dir);
    let (spool, _) = Spool::open(SpoolConfig::new(dir)).expect("spool");
    appends(Arc::new(spool), payload, threads, per_thread)
}

fn redb_appends(dir: &Path, payload: usize, threads: usize, per_thread: usize) -> f64 {
    let _fresh = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let (db, writer) = Redb::open(&dir.join("redb"));
    let rate = appends(Arc::new(db), payload, threads, per_thread);
    writer.join().expect("writer");
    rate
}

/// Seconds to reopen the spool holding `RECORDS` records and read them all, in order.
fn spool_recovery(dir: &Path) -> f64 {
    let _fresh = std::fs::remove_dir_all(dir);
    {
        let (spool, _) = Spool::open(SpoolConfig::new(dir).max_bytes(8 << 30)).expect("spool");
        for start in (0..RECORDS).step_by(10_000) {
            let chunk: Vec<Message> = (start..start + 10_000).map(|i| message(i, 100)).collect();
            spool.append_all(&chunk).expect("append");
        }
        spool.close().expect("close");
    }
    let start = Instant::now();
    let (spool, recovery) = Spool::open(SpoolConfig::new(dir).max_bytes(8 << 30)).expect("spool");
    let mut cursor = spool.cursor().until(recovery.first_new_id());
    let mut read = 0;
    loop {
        let batch = cursor.read_batch(4096, 16 << 20).expect("read");
        if batch.is_empty() {
            break;
        }
        read += batch.len();
    }
    assert_eq!(read, RECORDS);
    start.elapsed().as_secs_f64()
}

/// Seconds to reopen the redb database holding `RECORDS` records and read them all, in order.
fn redb_recovery(dir: &Path) -> f64 {
    let _fresh = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let path = dir.join("redb");
    {
        let db = Database::create(&path).expect("redb");
        for start in (0..RECORDS).step_by(10_000) {
            let txn = db.begin_write().expect("begin");
            {
                let mut table = txn.open_table(TABLE).expect("table");
                for i in start..start + 10_000 {
                    table
                        .insert(i as u64, encode(&message(i, 100)).as_slice())
                        .expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
    }
    let start = Instant::now();
    let db = Database::create(&path).expect("reopen");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(TABLE).expect("table");
    let mut read = 0;
    for entry in table.iter().expect("iter") {
        let (_, v) = entry.expect("entry");
        read += usize::from(decode(v.value()).payload().len() == 100);
    }
    assert_eq!(read, RECORDS);
    start.elapsed().as_secs_f64()
}

#[derive(Parser)]
struct Args {
    /// Where the stores live (removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let dir: PathBuf = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("herald-stores-bench-{}", std::process::id()))
    });
    let mut rows = Vec::new();
    println!("group-commit appends per second (each append returns once fsynced), median of {RUNS} runs, the candidates alternating");
    println!("| payload | appenders | spool (segment log) | redb | spool / redb |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for payload in [100, 1024] {
        for (threads, per_thread) in [(1, 1000), (8, 1000)] {
            let (mut s, mut r) = (Vec::new(), Vec::new());
            for i in 0..RUNS {
                s.push(spool_appends(
                    &dir.join(format!("s{i}")),
                    payload,
                    threads,
                    per_thread,
                ));
                r.push(redb_appends(
                    &dir.join(format!("r{i}")),
                    payload,
                    threads,
                    per_thread,
                ));
            }
            let (s, r) = (median(s), median(r));
            println!(
                "| {payload} B | {threads} | {s:.0} | {r:.0} | {:.2}x |",
                s / r
            );
            rows.push(json!({"size": payload, "appenders": threads, "spool": s, "redb": r}));
        }
    }
    let (mut s, mut r) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        s.push(spool_recovery(&dir.join(format!("rs{i}"))));
        r.push(redb_recovery(&dir.join(format!("rr{i}"))));
    }
    let (s, r) = (median(s), median(r));
    println!(
        "\nrecovery: reopen {RECORDS} records of 100 B and read them all in order: spool {s:.3} s, redb {r:.3} s"
    );
    if let Some(path) = &args.json {
        let out = json!({
            "appends": rows,
            "recovery": {"records": RECORDS, "spool_s": s, "redb_s": r},
        });
        std::fs::write(path, serde_json::to_string_pretty(&out).expect("json"))
            .expect("write json");
    }
    let _done = std::fs::remove_dir_all(&dir);
}
