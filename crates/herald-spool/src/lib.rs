//! herald-spool: an on-disk spool for accepted messages, so that a crash does not lose them.
//!
//! A [`Spool`] keeps messages in a directory of segment files: [`append`](Spool::append)
//! (or [`append_all`](Spool::append_all), or [`submit`](Spool::submit) and await) stores a
//! message and returns its [`SpoolId`] once it is durable as the [`SyncPolicy`] says; a
//! [`Cursor`] reads pending records back in append order; [`settle`](Spool::settle) marks a
//! record done, in any order. [`Spool::open`] recovers what a crash left and reports it in a
//! [`Recovery`]; [`inspect`] and [`check`] read (and repair) a spool from outside.
//!
//! ```
//! use herald_core::{Message, MessageId};
//! use herald_spool::{Spool, SpoolConfig};
//! # let dir = std::env::temp_dir().join(format!("herald-spool-doc-{}", std::process::id()));
//! # let _fresh = std::fs::remove_dir_all(&dir);
//! let (spool, recovery) = Spool::open(SpoolConfig::new(&dir))?;
//! assert_eq!(recovery.pending_messages, 0);
//! let id = spool.append(&Message::new("orders", "created #42").with_id(MessageId::from_u128(1)))?;
//! let mut cursor = spool.cursor();
//! let batch = cursor.read_batch(100, 1 << 20)?;
//! assert_eq!(batch[0].id, id);
//! assert_eq!(batch[0].message.payload().as_ref(), b"created #42");
//! spool.settle(id)?;
//! assert_eq!(spool.stats().pending_messages, 0);
//! # drop(spool);
//! # std::fs::remove_dir_all(&dir).expect("cleanup");
//! # Ok::<(), herald_spool::SpoolError>(())
//! ```
//!
//! # How the producer uses it
//!
//! [`SpoolStore`] is the spool as a producer's `herald_core::Store`:
//! `ProducerBuilder::store(SpoolStore::open(config)?.0)`. The wiring:
//!
//! 1. At start, `Spool::open`. The recovered records are read with
//!    `spool.cursor().until(recovery.first_new_id())` and fed to the pipeline in batches
//!    sized by its free buffer room, before (or alongside) new sends.
//! 2. At acceptance, `spool.submit(&messages)` and await the ticket: the message is accepted
//!    only once it is durable. [`SpoolError::Full`] (and a full disk, see
//!    [`SpoolError::is_full`]) is backpressure: wait for settlements, or refuse.
//! 3. The pipeline carries each message's `SpoolId`. Beyond a buffer's worth waiting in
//!    memory, the producer drops the bodies of durable messages and reads them back (by id,
//!    in order) with one cursor that only moves forward ([`Cursor::skip_to`]), instead of
//!    keeping them in memory.
//! 4. When a message's fate is final (delivered, or failed and handed back to the
//!    application), `settle_all` its id: settled records are never read again, and segment
//!    files go once all their records are settled.
//!
//! # Directory layout
//!
//! - `lock`: locked exclusively while a `Spool` has the directory (released by the kernel
//!   when the process ends, however it ends); holds the holder's pid.
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: segment files, named by their first sequence number (20
//!   digits). Records are appended to the newest; a new one starts when a record would take
//!   it past `segment_bytes`, and at every open.
//! - `settled.log`: the settle log, runs of settled sequence numbers (format in
//!   `settle_log.rs`); rewritten at open and whenever it doubles.
//!
//! # Record format
//!
//! Each record is a 32-byte header then the message:
//!
//! ```text
//! magic "HSPL" | version u8 = 1 | flags u8 | reserved u16 = 0 | body length u32 |
//! CRC-32 u32 | sequence number u64 | append time (Unix ms) u64 |
//! body: [message id, 16 bytes] destination, [key], headers, payload (u32-length-prefixed)
//! ```
//!
//! Integers are little-endian; the CRC covers the whole record but itself. The framing is
//! written by hand rather than with a serialization crate: it is the on-disk format, so it
//! must not change with a dependency's version; it is small (one function each way); and
//! after a crash it must be readable record by record, with every record verified on its own
//! and a reader able to find the next record after damage (by the length, else by scanning
//! for the magic and a valid checksum). A record of a newer version is refused with
//! [`SpoolError::UnsupportedVersion`], never cut away as damage.
//!
//! # Durability
//!
//! - [`SyncPolicy::Group`] (default): an append returns after an fsync that covers it.
//!   Appends go to one writer thread; every append buffered while it writes and fsyncs the
//!   previous round becomes the next round: one write and one fsync for all of them (group
//!   commit). `append_all` is one write.
//! - [`SyncPolicy::Interval`]: returns after the write; fsync every interval.
//! - [`SyncPolicy::Os`]: never fsyncs.
//!
//! Settlements are appended to the settle log as they are made (so a process crash loses
//! none) and fsynced when `settle_sync_every` of them are waiting (by the writer thread, at
//! once: the thread that settles, a producer's runtime thread, does not wait for that fsync)
//! or `settle_sync_interval` after the first of them. (It does wait, now and then, for the
//! fsyncs of the directory when a settlement empties a segment and its file is deleted, and
//! of the settle log's rewrite once the log has doubled: both hold the settle lock, behind
//! which the writer thread's next round waits too.) after a power loss about
//! `settle_sync_every` settled records come back as pending (a few more if settlements
//! arrive while that fsync runs; [`SpoolStats::unsynced_settlements`] says how many would
//! now). Coming back means being delivered again: at-least-once, never lost.
//!
//! When the disk is full, an append fails with an I/O error ([`SpoolError::is_full`]) and
//! its partial write is cut off again, so the spool goes on once there is room; a settle
//! that cannot be logged for lack of room deletes the segments it empties instead (the
//! deletion is the settlement) and logs the rest in the room that made. A failed fsync of a
//! segment (or of the directory for a new one) breaks the spool ([`SpoolError::Broken`]):
//! after one, what reached the disk is unknown (the kernel may have dropped the unwritten
//! pages and marked them clean, so a later fsync that succeeds proves nothing), so it refuses
//! appends until reopened, and the reopen's recovery reads what is there. The records of the
//! append whose fsync failed are cut off again, as after a failed write: their appenders are
//! told they failed, and the next open does not read them back. (The cut itself is not
//! fsynced: after a power loss they may come back; if the cut fails, the error says that they
//! may.) Records whose appends had returned stay. A failed fsync of the settle log breaks
//! nothing: it is tried again later (settlements not yet synced come back after a power loss:
//! duplicates, never a loss), and fails a [`Spool::sync`] and the appends of its round.
//!
//! A record lost with a torn tail (its append never returned, or with `Interval` and `Os`,
//! was not yet synced) may see its id given again after the reopen: ids only ever increase
//! among records that exist.
//!
//! # Recovery
//!
//! `open` verifies every record, reading one segment at a time and one record at a time. A
//! damaged stretch followed by a valid record is skipped and reported (segment, offset,
//! bytes): it ends at the first valid record after the damage, found by its magic and
//! checksum, not where a damaged length says. One with no valid record after it, in the
//! newest segment, is a torn write and is cut off; in an older segment (fsynced whole before
//! the next began, unless the policy was [`SyncPolicy::Os`]) it is damage like any other. A
//! segment that cannot be read (an I/O error) fails the open rather than being cut. A sequence number is not given again to a new record while a record
//! or a settlement that holds it survives, even when every segment was deleted or a torn tail
//! lost records whose settlement survived. (One of records that no longer exist, cut off or
//! deleted with every settlement of theirs, may be; so may `check --repair`'s.)
//!
//! # Memory
//!
//! Per record in a live segment, 4 bytes (its length, 0 once settled); a cursor holds one
//! batch; appends wait in memory only until the writer thread takes them. The settle log's
//! rewrite (once it has doubled, and at open) holds every run of settled ids, 16 bytes each,
//! and the frames it writes: when settled and pending records alternate (one destination of
//! several down), about one run for every two records: around 100 MB for a full 1 GiB spool
//! of 100-byte messages.

mod config;
mod cursor;
mod error;
mod index;
mod lock;
pub mod metrics;
mod record;
mod recover;
mod scan;
mod settle_log;
mod spool;
mod store;

/// Options that create a file readable and writable by its owner only (mode 0600, less the
/// umask, on Unix): a spool holds messages' payloads, keys and headers, which are often not
/// for every user of the machine to read.
pub(crate) fn private_file() -> std::fs::OpenOptions {
    #[allow(unused_mut)] // not on Unix
    let mut options = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Creates `dir` and the folders above it that are missing, the new ones open to their owner
/// only (mode 0700, less the umask, on Unix). Folders that exist keep their mode. Returns the
/// folders it created, outermost first: their entries are durable only once their parents
/// are fsynced.
pub(crate) fn create_private_dir(
    dir: &std::path::Path,
) -> std::io::Result<Vec<std::path::PathBuf>> {
    let created: Vec<std::path::PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(std::path::Path::to_path_buf)
        .collect();
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    Ok(created.into_iter().rev().collect())
}

pub use config::{SpoolConfig, SyncPolicy};
pub use cursor::Cursor;
pub use error::SpoolError;
pub use recover::{check, inspect, CorruptRecord, Damage, Inspection, Recovery, TornTail};
pub use spool::{AppendTicket, Spool, SpoolId, SpoolStats, SpooledMessage};
pub use store::{ProducerBuilderExt, SpoolStore};

#[cfg(test)]
mod tests {
    /// The folders created for a spool are named outermost first, for their parents' fsyncs;
    /// those that existed are not.
    #[test]
    fn the_folders_created_are_named_outermost_first() {
        let base = std::env::temp_dir().join(format!("herald-spool-mkdir-{}", std::process::id()));
        let _stale = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("base");
        let dir = base.join("a").join("b");
        let created = super::create_private_dir(&dir).expect("created");
        assert_eq!(created, vec![base.join("a"), dir.clone()]);
        assert!(super::create_private_dir(&dir).expect("exists").is_empty());
        std::fs::remove_dir_all(&base).expect("cleaned up");
    }
}
