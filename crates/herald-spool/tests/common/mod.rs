//! What the spool's integration tests share: a temporary directory, messages, and a reader
//! of segment files that finds record boundaries the way the format says.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use herald_core::{Message, MessageId};
use herald_spool::{Spool, SpoolId, SpooledMessage};

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "herald-spool-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _absent = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// The spool's own directory inside it.
    pub fn spool(&self) -> PathBuf {
        self.0.join("spool")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _best_effort = std::fs::remove_dir_all(&self.0);
    }
}

/// Message number `i`: every field set, sizes varying with `i`.
pub fn message(i: u64) -> Message {
    let mut m = Message::new(
        format!("dest-{}", i % 3),
        format!("payload-{i}-{}", "x".repeat((i % 7) as usize)),
    );
    if i.is_multiple_of(2) {
        m = m.with_key(format!("key-{}", i % 5));
    }
    if i % 3 != 1 {
        m = m.with_header("n", i.to_string());
    }
    if i % 4 != 3 {
        m = m.with_id(MessageId::from_u128(u128::from(i) << 64 | 0xabc));
    }
    m
}

/// Whether two messages are the same, id included.
pub fn same(a: &Message, b: &Message) -> bool {
    a == b && a.id() == b.id() && a.key().is_some() == b.key().is_some()
}

/// Every record a fresh cursor reads now.
pub fn read_all(spool: &Spool) -> Vec<SpooledMessage> {
    let mut cursor = spool.cursor();
    let mut out = Vec::new();
    loop {
        let batch = cursor.read_batch(7, 1 << 20).expect("cursor reads");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

pub fn ids(records: &[SpooledMessage]) -> Vec<SpoolId> {
    records.iter().map(|r| r.id).collect()
}

/// The segment files of a spool directory, oldest first.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    out.sort();
    out
}

/// `(offset, length, sequence number)` of each record of an undamaged segment file.
pub fn records_in(path: &Path) -> Vec<(u64, u64, u64)> {
    let bytes = std::fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 32 <= bytes.len() {
        assert_eq!(
            &bytes[at..at + 4],
            b"HSPL",
            "record magic at {at} in {}",
            path.display()
        );
        let body = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
        let seq = u64::from_le_bytes(bytes[at + 16..at + 24].try_into().expect("8"));
        out.push((at as u64, 32 + body as u64, seq));
        at += 32 + body;
    }
    out
}
