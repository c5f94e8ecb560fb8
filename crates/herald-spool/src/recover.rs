//! Reading a spool directory back: at open (cutting torn tails, deleting settled segments,
//! rewriting the settle log), and for `inspect` and `check` (read-only unless repairing).

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use crate::index::{parse_segment_name, segment_path, Segment};
use crate::record::time_of;
use crate::scan::{Item, Scanner};
use crate::settle_log::{self, sync_dir, SettleLog};
use crate::{SpoolError, SpoolId, SpoolStats};

/// At most this many damaged records are listed (all are counted).
const MAX_LISTED: usize = 1000;

/// A damaged record that was skipped: the records around it were read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CorruptRecord {
    /// The segment file.
    pub segment: PathBuf,
    /// Where the damaged bytes start.
    pub offset: u64,
    /// How many bytes were skipped to the next valid record.
    pub bytes: u64,
    /// What was wrong ("checksum mismatch", ...).
    pub reason: &'static str,
    pub(crate) segment_first: u64,
}

/// A segment's damaged end, with no valid record after it: an interrupted write. At open and
/// by `check(dir, true)` the file is cut there.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TornTail {
    /// The segment file.
    pub segment: PathBuf,
    /// Where the bad bytes start (the file's new length once cut).
    pub offset: u64,
    /// How many bytes follow (were cut).
    pub bytes: u64,
    /// What was wrong with the first of them.
    pub reason: &'static str,
}

/// The damage a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    /// Damaged records skipped, in file order (the first 1000).
    pub corrupt: Vec<CorruptRecord>,
    /// How many damaged records were skipped in all.
    pub corrupt_records: u64,
    /// Torn segment tails.
    pub torn: Vec<TornTail>,
    /// Bytes at the end of the settle log that did not verify (a torn settle write: the
    /// settlements in them come back as pending).
    pub settle_log_torn_bytes: u64,
}

impl Damage {
    /// Bytes of torn segment tails.
    pub fn torn_bytes(&self) -> u64 {
        self.torn.iter().map(|t| t.bytes).sum()
    }
    /// No damage at all.
    pub fn is_empty(&self) -> bool {
        self.corrupt_records == 0 && self.torn.is_empty() && self.settle_log_torn_bytes == 0
    }
    fn add_corrupt(&mut self, c: CorruptRecord) {
        self.corrupt_records += 1;
        if self.corrupt.len() < MAX_LISTED {
            self.corrupt.push(c);
        }
    }
}

/// What [`Spool::open`](crate::Spool::open) found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Records recovered and not settled: a [`Cursor`](crate::Cursor) reads them.
    pub pending_messages: u64,
    /// Their encoded bytes.
    pub pending_bytes: u64,
    /// Segment files kept (the new active one included).
    pub segments: usize,
    /// Damage found (torn tails were cut, damaged records are skipped).
    pub damage: Damage,
    first_new_id: SpoolId,
}

impl Recovery {
    /// The id of the first append after this open: recovered records have lower ids (read
    /// only them with `spool.cursor().until(recovery.first_new_id())`).
    pub fn first_new_id(&self) -> SpoolId {
        self.first_new_id
    }
}

/// What [`inspect`] or [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Inspection {
    /// The numbers [`Spool::stats`](crate::Spool::stats) would give (fsyncs and unsynced
    /// settlements are zero: only the process that has the spool open knows them).
    pub stats: SpoolStats,
    /// Damage found. On a spool in use, a torn tail on its newest segment is usually a write
    /// in progress.
    pub damage: Damage,
    /// The pid in the lock file: the process that has the spool open, or that last had it.
    pub lock_pid: Option<u32>,
    /// Whether `check` repaired the spool (cut torn tails, deleted settled segments,
    /// rewrote the settle log).
    pub repaired: bool,
}

/// Segments, damage and the next sequence number, as read from a directory.
pub(crate) struct Scan {
    pub(crate) segments: BTreeMap<u64, Segment>,
    pub(crate) damage: Damage,
    /// Where every damaged record is, `(segment, offset)`: all of them, where `damage`
    /// lists the first 1 000.
    pub(crate) corrupt_at: HashSet<(u64, u64)>,
    pub(crate) next_seq: u64,
    pub(crate) fsyncs: u64,
    /// How much of the settle log verified (0: none, or no log).
    pub(crate) settle_log_len: u64,
}

/// Reads every segment and the settle log of `dir`. With `cut`, torn tails are cut off (and
/// the cut synced when `fsyncs`).
pub(crate) fn scan_dir(dir: &Path, cut: bool, fsyncs: bool) -> Result<Scan, SpoolError> {
    let mut firsts = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| SpoolError::io("read spool directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| SpoolError::io("read spool directory", dir, e))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    let mut scan = Scan {
        segments: BTreeMap::new(),
        damage: Damage::default(),
        corrupt_at: HashSet::new(),
        next_seq: 0,
        fsyncs: 0,
        settle_log_len: 0,
    };
    for (i, &first) in firsts.iter().enumerate() {
        let max_seq = firsts.get(i + 1).copied().unwrap_or(u64::MAX);
        let path = segment_path(dir, first);
        let mut scanner = match Scanner::open(&path, 0, None, first, max_seq) {
            Ok(s) => s,
            // Deleted by the spool's owner since the listing (inspect on a live spool).
            Err(e) if e.kind() == io::ErrorKind::NotFound && !cut => continue,
            Err(e) => return Err(SpoolError::io("read segment", &path, e)),
        };
        let mut seg = Segment::new(first);
        seg.sealed = true;
        let mut len = scanner.end();
        while let Some(item) = scanner.next_item()? {
            // Only the newest segment can have a torn tail: each older one was fsynced whole
            // when the next began (unless the spool ran with `SyncPolicy::Os`, and then the
            // records lost are lost either way). Damage at the end of an older one is damage to
            // records that had been durable, and counts as such (and stays on disk, skipped,
            // as other damaged records do), whoever reads it: `open`, `inspect` or `check`.
            let item = match item {
                Item::Torn {
                    offset,
                    bytes,
                    reason,
                } if i + 1 < firsts.len() => Item::Corrupt {
                    offset,
                    bytes,
                    reason,
                },
                item => item,
            };
            match item {
                Item::Record { header, .. } => {
                    seg.add(header.seq, header.record_len(), header.time_ms);
                }
                Item::Corrupt {
                    offset,
                    bytes,
                    reason,
                } => {
                    scan.corrupt_at.insert((first, offset));
                    scan.damage.add_corrupt(CorruptRecord {
                        segment: path.clone(),
                        offset,
                        bytes,
                        reason,
                        segment_first: first,
                    });
                }
                Item::Torn {
                    offset,
                    bytes,
                    reason,
                } => {
                    scan.damage.torn.push(TornTail {
                        segment: path.clone(),
                        offset,
                        bytes,
                        reason,
                    });
                    if cut {
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .and_then(|f| f.set_len(offset).map(|()| f))
                            .map_err(|e| SpoolError::io("cut the torn tail of", &path, e))?;
                        if fsyncs {
                            f.sync_all()
                                .map_err(|e| SpoolError::io("fsync segment", &path, e))?;
                            scan.fsyncs += 1;
                        }
                        len = offset;
                    }
                }
            }
        }
        seg.assigned_bytes = len;
        seg.written_bytes = len;
        scan.next_seq = scan.next_seq.max(seg.end);
        scan.segments.insert(first, seg);
    }
    let mut max_settled = 0;
    let segments = &mut scan.segments;
    let read = settle_log::read(&dir.join(settle_log::FILE), |from, n| {
        let to = from.saturating_add(u64::from(n));
        max_settled = max_settled.max(to);
        for seg in segments.range_mut(..to).map(|(_, s)| s).rev() {
            if seg.end <= from {
                break;
            }
            seg.settle_range(from, to);
        }
    })?;
    scan.damage.settle_log_torn_bytes = read.torn_bytes;
    scan.settle_log_len = read.valid_len;
    // Never give out a sequence number again: not one a segment's name or records used, nor
    // one settled (its record may be lost with a torn tail, its settlement not).
    scan.next_seq = scan
        .next_seq
        .max(max_settled)
        .max(firsts.last().copied().unwrap_or(0));
    Ok(scan)
}

/// A spool directory made ready for appends (see [`Spool::open`](crate::Spool::open)).
pub(crate) struct Opened {
    pub(crate) segments: BTreeMap<u64, Segment>,
    pub(crate) next_seq: u64,
    pub(crate) settle_log: SettleLog,
    /// See [`Scan::corrupt_at`].
    pub(crate) corrupt_at: HashSet<(u64, u64)>,
    pub(crate) recovery: Recovery,
    pub(crate) fsyncs: u64,
}

/// Recovers the locked directory `dir`: cuts torn tails, starts the active segment, deletes
/// settled segments, rewrites the settle log.
pub(crate) fn open_dir(dir: &Path, fsyncs: bool) -> Result<Opened, SpoolError> {
    let mut scan = scan_dir(dir, true, fsyncs)?;
    let next = scan.next_seq;
    let reuse = scan
        .segments
        .values()
        .next_back()
        .is_some_and(|s| s.first == next && s.end == next && s.assigned_bytes == 0);
    if reuse {
        if let Some(s) = scan.segments.values_mut().next_back() {
            s.sealed = false;
        }
    } else {
        let path = segment_path(dir, next);
        crate::private_file()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| SpoolError::io("create segment", &path, e))?;
        scan.segments.insert(next, Segment::new(next));
    }
    let doomed: Vec<u64> = scan
        .segments
        .values()
        .filter(|s| s.sealed && s.pending == 0)
        .map(|s| s.first)
        .collect();
    // The new segment's name must be durable before the files (and settlements) that held
    // the highest sequence numbers go.
    if fsyncs {
        sync_dir(dir)?;
        scan.fsyncs += 1;
    }
    delete_segments(dir, &mut scan.segments, &doomed, fsyncs, &mut scan.fsyncs)?;
    let settle_log = match rewrite_settle_log(dir, &scan.segments, fsyncs, &mut scan.fsyncs) {
        Ok(log) => log,
        // No room for a new settle log, and nothing could be deleted to make some: the old
        // one, as read, serves (sending and settling is what frees room; an open that failed
        // would leave the spool stuck full for good).
        Err(e) if e.is_full() && scan.settle_log_len > 0 => {
            tracing::warn!(
                error = %e,
                "the disk is full: the spool keeps its settle log as it is instead of writing a new one"
            );
            SettleLog::reuse(dir, scan.settle_log_len)?
        }
        Err(e) => return Err(e),
    };
    let stats = stats_of(&scan.segments, next);
    Ok(Opened {
        recovery: Recovery {
            pending_messages: stats.pending_messages,
            pending_bytes: stats.pending_bytes,
            segments: stats.segments,
            damage: scan.damage,
            first_new_id: SpoolId::from_u64(next),
        },
        segments: scan.segments,
        next_seq: next,
        settle_log,
        corrupt_at: scan.corrupt_at,
        fsyncs: scan.fsyncs,
    })
}

fn delete_segments(
    dir: &Path,
    segments: &mut BTreeMap<u64, Segment>,
    doomed: &[u64],
    fsyncs: bool,
    count: &mut u64,
) -> Result<(), SpoolError> {
    for first in doomed {
        let path = segment_path(dir, *first);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io("delete settled segment", &path, e)),
        }
        segments.remove(first);
    }
    if fsyncs && !doomed.is_empty() {
        sync_dir(dir)?;
        *count += 1;
    }
    Ok(())
}

fn rewrite_settle_log(
    dir: &Path,
    segments: &BTreeMap<u64, Segment>,
    fsyncs: bool,
    count: &mut u64,
) -> Result<SettleLog, SpoolError> {
    let mut runs = Vec::new();
    for s in segments.values() {
        s.settled_runs(&mut runs);
    }
    let log = SettleLog::rewrite(dir, &runs, fsyncs)?;
    if fsyncs {
        *count += 2; // the file and the directory
    }
    Ok(log)
}

/// The numbers of [`SpoolStats`] that the segments tell.
pub(crate) fn stats_of(segments: &BTreeMap<u64, Segment>, next_seq: u64) -> SpoolStats {
    let oldest = segments
        .values()
        .find_map(|s| s.first_pending().and_then(|seq| s.time_at_or_before(seq)));
    SpoolStats {
        pending_messages: segments.values().map(|s| s.pending).sum(),
        pending_bytes: segments.values().map(|s| s.pending_bytes).sum(),
        disk_bytes: segments.values().map(|s| s.assigned_bytes).sum(),
        segments: segments.len(),
        oldest_pending: oldest.map(time_of),
        next_id: SpoolId::from_u64(next_seq),
        ..SpoolStats::default()
    }
}

/// Fails with [`SpoolError::NotASpool`] unless `dir` holds a lock file, the settle log or a
/// segment: every spool opened once has its lock file (never removed), so a folder with none
/// of them is a wrong path, and its "empty spool" would be a false report.
fn ensure_spool(dir: &Path) -> Result<(), SpoolError> {
    if [crate::lock::FILE, crate::settle_log::FILE]
        .iter()
        .any(|name| dir.join(name).exists())
    {
        return Ok(());
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| SpoolError::io("read spool directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| SpoolError::io("read spool directory", dir, e))?;
        if entry
            .file_name()
            .to_str()
            .and_then(parse_segment_name)
            .is_some()
        {
            return Ok(());
        }
    }
    Err(SpoolError::NotASpool {
        dir: dir.to_owned(),
    })
}

/// Reads the spool in `dir` without changing anything and without its lock: works while
/// another process has it open (for `herald spool status`). Every record is verified.
pub fn inspect(dir: impl AsRef<Path>) -> Result<Inspection, SpoolError> {
    let dir = dir.as_ref();
    let meta =
        std::fs::metadata(dir).map_err(|e| SpoolError::io("open spool directory", dir, e))?;
    if !meta.is_dir() {
        return Err(SpoolError::io(
            "open spool directory",
            dir,
            io::Error::other("not a directory"),
        ));
    }
    ensure_spool(dir)?;
    let scan = scan_dir(dir, false, false)?;
    let mut stats = stats_of(&scan.segments, scan.next_seq);
    stats.corrupt_records = scan.damage.corrupt_records;
    Ok(Inspection {
        stats,
        damage: scan.damage,
        lock_pid: crate::lock::holder(dir),
        repaired: false,
    })
}

/// Verifies the spool in `dir` (for `herald spool check`). Without `repair`, like
/// [`inspect`]. With `repair`, takes the spool's lock (failing with
/// [`SpoolError::Locked`] while it is open elsewhere), cuts torn tails, deletes segments
/// whose records are all settled, and rewrites the settle log; damaged records in the middle
/// of a segment stay (they are skipped by every read, and go with their segment).
/// [`Inspection::damage`] is what was found before repairing; `stats` is after.
pub fn check(dir: impl AsRef<Path>, repair: bool) -> Result<Inspection, SpoolError> {
    let dir = dir.as_ref();
    if !repair {
        return inspect(dir);
    }
    std::fs::metadata(dir).map_err(|e| SpoolError::io("open spool directory", dir, e))?;
    // Before the lock, whose file would make any folder look like a spool.
    ensure_spool(dir)?;
    let _lock = crate::lock::acquire(dir)?;
    let mut scan = scan_dir(dir, true, true)?;
    let last = scan.segments.keys().next_back().copied();
    // The newest segment stays even if settled: its name keeps the next sequence number.
    let doomed: Vec<u64> = scan
        .segments
        .values()
        .filter(|s| Some(s.first) != last && s.pending == 0)
        .map(|s| s.first)
        .collect();
    let mut fsyncs = scan.fsyncs;
    delete_segments(dir, &mut scan.segments, &doomed, true, &mut fsyncs)?;
    rewrite_settle_log(dir, &scan.segments, true, &mut fsyncs)?;
    let mut stats = stats_of(&scan.segments, scan.next_seq);
    stats.corrupt_records = scan.damage.corrupt_records;
    Ok(Inspection {
        stats,
        damage: scan.damage,
        lock_pid: crate::lock::holder(dir),
        repaired: true,
    })
}
