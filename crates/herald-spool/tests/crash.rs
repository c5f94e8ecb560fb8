//! A real crash: a child process (this test binary, run again with an environment variable)
//! opens a spool and appends from four threads, printing each id as its append returns; the
//! parent kills it with SIGKILL. The next open succeeds (the kernel released the lock) and
//! finds every record whose id was printed, with its contents.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{message, read_all, same, TempDir};
use herald_spool::{Spool, SpoolConfig};

const CHILD_DIR: &str = "HERALD_SPOOL_CRASH_CHILD_DIR";

/// The child: appends until killed (or for 60 s, if the parent is gone), printing
/// `id <spool id> <message number>` for each append that returned.
fn child(dir: PathBuf) {
    let (spool, _) =
        Spool::open(SpoolConfig::new(dir).segment_bytes(16 * 1024)).expect("child opens");
    let spool = Arc::new(spool);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut i = 0u64;
                while start.elapsed() < Duration::from_secs(60) {
                    let n = t * 1_000_000 + i;
                    let id = spool.append(&message(n)).expect("child appends");
                    let line = format!("id {} {n}\n", id.as_u64());
                    let mut out = std::io::stdout().lock();
                    out.write_all(line.as_bytes()).expect("stdout");
                    out.flush().expect("flush");
                    i += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("child thread");
    }
}

#[test]
fn every_append_that_returned_before_a_sigkill_is_there_after_it() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        child(PathBuf::from(dir));
        return;
    }
    let tmp = TempDir::new("crash");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "every_append_that_returned_before_a_sigkill_is_there_after_it",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, tmp.spool())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            if words.next() != Some("id") {
                continue;
            }
            let (Some(id), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let parsed = (id.parse::<u64>(), n.parse::<u64>());
            if let (Ok(id), Ok(n)) = parsed {
                if tx.send((id, n)).is_err() {
                    break;
                }
            }
        }
    });
    // Kill it in full flight, after 300 appends returned.
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < 300 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(pair) => acked.push(pair),
            Err(e) => {
                let _already_dead = child.kill();
                panic!("the child printed {} ids, then: {e}", acked.len());
            }
        }
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reaped");
    assert!(!status.success(), "killed: {status:?}");
    reader.join().expect("reader");
    acked.extend(rx.try_iter());

    let (spool, recovery) = Spool::open(SpoolConfig::new(tmp.spool()).segment_bytes(16 * 1024))
        .expect("the next open succeeds: the lock died with the child");
    assert_eq!(recovery.damage.corrupt_records, 0, "{:?}", recovery.damage);
    let back = read_all(&spool);
    let found: std::collections::HashMap<u64, &herald_core::Message> =
        back.iter().map(|r| (r.id.as_u64(), &r.message)).collect();
    for (id, n) in &acked {
        let m = found.get(id).unwrap_or_else(|| {
            panic!(
                "id {id} was acknowledged but is missing ({} acked, {} found)",
                acked.len(),
                back.len()
            )
        });
        assert!(same(m, &message(*n)), "id {id} holds another message");
    }
    assert!(
        back.windows(2).all(|w| w[0].id < w[1].id),
        "in append order"
    );
    eprintln!(
        "{} acknowledged, {} found, damage {:?}",
        acked.len(),
        back.len(),
        recovery.damage
    );
}
