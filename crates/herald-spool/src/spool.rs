//! `Spool`: appends (group commit on a writer thread), settlements, segment deletion, stats.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use herald_core::Message;

use crate::index::{segment_path, Segment};
use crate::record;
use crate::recover::{self, Recovery};
use crate::settle_log::{self, sync_dir, SettleLog};
use crate::{Cursor, SpoolConfig, SpoolError, SyncPolicy};

/// A record's place in the spool: its sequence number, strictly increasing across segments
/// and restarts. Returned by an append, given back to [`Spool::settle`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpoolId(u64);

impl SpoolId {
    /// The id with this sequence number.
    pub const fn from_u64(seq: u64) -> Self {
        Self(seq)
    }
    /// Its sequence number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SpoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "id {}", self.0)
    }
}

/// A record read back: its id, the message (with the [`herald_core::MessageId`] it had, if
/// any) and when it was appended.
#[derive(Debug, Clone)]
pub struct SpooledMessage {
    /// What to [`settle`](Spool::settle) once the message's fate is final.
    pub id: SpoolId,
    /// The message as appended.
    pub message: Message,
    /// When it was appended (the appending machine's wall clock, in milliseconds).
    pub appended_at: SystemTime,
}

/// How a spool is doing. [`Spool::stats`] and [`inspect`](crate::inspect) give the same
/// numbers (an inspection has no fsyncs of its own: zero).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolStats {
    /// Records appended and not settled.
    pub pending_messages: u64,
    /// Their encoded bytes (record headers included).
    pub pending_bytes: u64,
    /// Bytes in segment files: what `max_bytes` limits.
    pub disk_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// When the oldest pending record was appended (or a record up to 63 appends before it:
    /// times are indexed every 64 records).
    pub oldest_pending: Option<SystemTime>,
    /// Fsyncs of segments, the settle log and the directory since open.
    pub fsyncs: u64,
    /// Their total time.
    pub fsync_time: Duration,
    /// Damaged records found (at open, and by cursors since).
    pub corrupt_records: u64,
    /// Settlements written but not yet fsynced: at most this many settled records would come
    /// back after a power loss now (about `settle_sync_every` at most, except with
    /// [`SyncPolicy::Os`], which never fsyncs).
    pub unsynced_settlements: u64,
    /// The id the next append gets.
    pub next_id: SpoolId,
}

/// An on-disk spool of messages: append, read back, settle. See the [crate docs](crate).
///
/// All methods take `&self`: share it (in an `Arc`) between the threads that append and
/// settle. Dropping it writes what is buffered and syncs as its [`SyncPolicy`] says, like
/// [`close`](Spool::close) without the report.
pub struct Spool {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<Result<(), SpoolError>>>,
}

/// The state every handle (the spool, its writer thread, its cursors) shares.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) config: SpoolConfig,
    /// Appends, segments and the writer's work. Never held while taking `settle`.
    pub(crate) inner: Mutex<Inner>,
    /// Wakes the writer thread (paired with `inner`).
    wake_writer: Condvar,
    /// Wakes cursors waiting for records (paired with `inner`).
    pub(crate) readable: Condvar,
    /// The settle log. Taken before `inner` when both are needed.
    settle: Mutex<SettleLog>,
    /// Since when settlements have been waiting for an fsync (a leaf lock).
    settle_due: Mutex<Option<Instant>>,
    /// `settle_sync_every` settlements are waiting: the writer thread syncs the settle log
    /// at once. Set under `inner`, so that the writer cannot miss it.
    settle_urgent: AtomicBool,
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    /// Tests only: every fsync fails with EIO while set.
    #[cfg(test)]
    fail_fsyncs: AtomicBool,
    /// Tests only: every deletion of a segment file fails with EIO while set.
    #[cfg(test)]
    fail_removes: AtomicBool,
    /// Damaged records known, by `(segment, offset)`, so that each counts once.
    corrupt: Mutex<HashSet<(u64, u64)>>,
    /// Holds the directory lock while any handle lives.
    _lock: File,
}

/// Guarded by `Shared::inner`.
pub(crate) struct Inner {
    /// Live segment files by first sequence number; the last one is the active segment.
    pub(crate) segments: BTreeMap<u64, Segment>,
    pub(crate) next_seq: u64,
    /// Sum of the segments' `assigned_bytes`.
    pub(crate) disk_bytes: u64,
    pub(crate) pending: u64,
    pub(crate) pending_bytes: u64,
    /// Encoded records not yet handed to the writer.
    buffer: Vec<Chunk>,
    /// What the appenders of `buffer` wait on.
    round: Arc<Round>,
    /// Someone called `sync`: the next round fsyncs whatever the policy.
    sync_requested: bool,
    /// Sealed segments whose records are all settled may be deletable once written.
    reap_wanted: bool,
    /// Segment files were deleted and the directory's fsync that makes it durable failed: the
    /// settle log is not rewritten (it would forget those records' settlements, which a power
    /// loss could then bring back with their files) until a directory fsync succeeds.
    deletions_unsynced: bool,
    /// Set after a failed fsync: appends are refused.
    broken: Option<SpoolError>,
    /// When a write last failed for a full disk: until a settlement (which may make room) or
    /// [`DISK_FULL_RECHECK`] later, appends are refused at once as full, taking no sequence
    /// number, instead of each being written, failing and undone.
    disk_full: Option<Instant>,
    shutdown: bool,
}

/// How long after a write failed for a full disk appends are refused without trying (room
/// made by something else than a settlement is found then).
const DISK_FULL_RECHECK: Duration = Duration::from_secs(1);

/// Records for one segment, contiguous in sequence numbers and bytes.
struct Chunk {
    segment: u64,
    first_seq: u64,
    end_seq: u64,
    bytes: Vec<u8>,
}

/// One group commit: every append buffered between two writer rounds waits on the same one.
pub(crate) struct Round {
    state: Mutex<RoundState>,
    done: Condvar,
}

#[derive(Default)]
struct RoundState {
    result: Option<Result<(), SpoolError>>,
    wakers: Vec<Waker>,
}

impl Round {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(RoundState::default()),
            done: Condvar::new(),
        })
    }
    fn complete(&self, result: Result<(), SpoolError>) {
        let wakers = {
            let mut s = lock(&self.state);
            s.result.get_or_insert(result);
            std::mem::take(&mut s.wakers)
        };
        self.done.notify_all();
        for w in wakers {
            w.wake();
        }
    }
    fn wait(&self) -> Result<(), SpoolError> {
        let mut s = lock(&self.state);
        loop {
            if let Some(r) = &s.result {
                return r.clone();
            }
            s = self.done.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
    fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<(), SpoolError>> {
        let mut s = lock(&self.state);
        if let Some(r) = &s.result {
            return Poll::Ready(r.clone());
        }
        if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            s.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// An append in progress: its ids are known; [`wait`](AppendTicket::wait) (or `.await`) for
/// it to be as durable as the [`SyncPolicy`] promises. Dropping it does not cancel the append.
#[must_use = "an append is durable only once its ticket says so"]
pub struct AppendTicket {
    ids: Vec<SpoolId>,
    round: Arc<Round>,
}

impl AppendTicket {
    /// The ids the messages got, in order.
    pub fn ids(&self) -> &[SpoolId] {
        &self.ids
    }
    /// Blocks until the append is written (and, with [`SyncPolicy::Group`], fsynced).
    pub fn wait(self) -> Result<Vec<SpoolId>, SpoolError> {
        self.round.wait().map(|()| self.ids)
    }
}

impl fmt::Debug for AppendTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppendTicket")
            .field("ids", &self.ids.len())
            .finish()
    }
}

/// Completes when [`AppendTicket::wait`] would return, without blocking a thread.
impl Future for AppendTicket {
    type Output = Result<Vec<SpoolId>, SpoolError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.round
            .poll(cx)
            .map(|r| r.map(|()| std::mem::take(&mut this.ids)))
    }
}

/// Locks, ignoring poisoning (no code panics while holding these locks; if some did, the
/// data is still consistent at every await-free step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Spool {
    /// Opens (creating if needed) the spool in `config`'s directory: takes its lock, checks
    /// every record, cuts torn tails, skips and reports damaged records, replays the settle
    /// log, deletes segments whose records are all settled, and starts a new segment.
    ///
    /// The [`Recovery`] tells what was found; read the recovered records with
    /// [`Spool::cursor`] (up to [`Recovery::first_new_id`]). Fails with
    /// [`SpoolError::Locked`] if another `Spool` has the directory.
    pub fn open(config: SpoolConfig) -> Result<(Self, Recovery), SpoolError> {
        config.validate()?;
        let dir = config.dir.clone();
        let created = crate::create_private_dir(&dir)
            .map_err(|e| SpoolError::io("create spool directory", &dir, e))?;
        // A new directory's entry reaches the disk with its parent's fsync: without it, a
        // power loss after the first appends (synced into the directory's files) could lose
        // the directory and them with it.
        if config.fsyncs() {
            for new in &created {
                let parent = match new.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => std::path::Path::new("."),
                };
                match crate::settle_log::sync_dir(parent) {
                    Ok(()) => {}
                    // A folder one may pass through but not read cannot be opened to fsync: the
                    // new directory's entry is then as durable as the filesystem makes it.
                    Err(SpoolError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::PermissionDenied => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let lock_file = crate::lock::acquire(&dir)?;
        let mut opened = recover::open_dir(&dir, config.fsyncs())?;
        // Every damaged record the open found (its report lists the first 1 000).
        let known_corrupt = std::mem::take(&mut opened.corrupt_at);
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            config,
            inner: Mutex::new(Inner {
                disk_bytes: opened.segments.values().map(|s| s.assigned_bytes).sum(),
                pending: opened.segments.values().map(|s| s.pending).sum(),
                pending_bytes: opened.segments.values().map(|s| s.pending_bytes).sum(),
                segments: opened.segments,
                next_seq: opened.next_seq,
                buffer: Vec::new(),
                round: Round::new(),
                sync_requested: false,
                reap_wanted: false,
                deletions_unsynced: false,
                broken: None,
                disk_full: None,
                shutdown: false,
            }),
            wake_writer: Condvar::new(),
            readable: Condvar::new(),
            settle: Mutex::new(opened.settle_log),
            settle_due: Mutex::new(None),
            settle_urgent: AtomicBool::new(false),
            fsyncs: AtomicU64::new(opened.fsyncs),
            fsync_nanos: AtomicU64::new(0),
            #[cfg(test)]
            fail_fsyncs: AtomicBool::new(false),
            #[cfg(test)]
            fail_removes: AtomicBool::new(false),
            corrupt: Mutex::new(known_corrupt),
            _lock: lock_file,
        });
        let for_writer = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("herald-spool-writer".into())
            .spawn(move || Writer::new(for_writer).run())
            .map_err(|e| SpoolError::io("start the writer thread for", &dir, e))?;
        Ok((
            Self {
                shared,
                writer: Some(writer),
            },
            opened.recovery,
        ))
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends one message and returns once it is durable as the [`SyncPolicy`] says.
    /// Blocks the calling thread: async code uses [`submit`](Spool::submit) and awaits.
    pub fn append(&self, message: &Message) -> Result<SpoolId, SpoolError> {
        let ticket = self.submit(std::slice::from_ref(message))?;
        let id = ticket.ids.first().copied().unwrap_or_default();
        ticket.wait().map(|_| id)
    }

    /// Appends messages as one write (and one fsync), all or none; returns their ids in order
    /// once durable as the [`SyncPolicy`] says.
    pub fn append_all(&self, messages: &[Message]) -> Result<Vec<SpoolId>, SpoolError> {
        self.submit(messages)?.wait()
    }

    /// Starts appending `messages` (one write, in order) and returns at once with a ticket that
    /// completes when they are durable. Fails at once, appending none, if the spool is full, a
    /// message is too large, or the spool is broken.
    ///
    /// Messages are stored as they are, [`MessageId`](herald_core::MessageId) included; one
    /// without an id reads back without one. The spool does not bound how many submitted
    /// appends wait for the disk: the caller's own buffer limit does (each waits in memory
    /// until written).
    pub fn submit(&self, messages: &[Message]) -> Result<AppendTicket, SpoolError> {
        let limit = self.shared.config.segment_bytes;
        let mut encoded = Vec::with_capacity(messages.len());
        let mut total = 0;
        for m in messages {
            let e = record::encode(m).map_err(|size| SpoolError::TooLarge { size, limit })?;
            if e.len() > limit {
                return Err(SpoolError::TooLarge {
                    size: e.len(),
                    limit,
                });
            }
            total += e.len();
            encoded.push(e);
        }
        let mut inner = lock(&self.shared.inner);
        if let Some(broken) = &inner.broken {
            return Err(broken.clone());
        }
        if inner
            .disk_full
            .is_some_and(|at| at.elapsed() < DISK_FULL_RECHECK)
        {
            return Err(SpoolError::io(
                "append (a write failed for a full disk a moment ago; nothing settled since) to",
                &self.shared.dir,
                std::io::Error::from(std::io::ErrorKind::StorageFull),
            ));
        }
        if messages.is_empty() {
            let round = Round::new();
            round.complete(Ok(()));
            return Ok(AppendTicket {
                ids: Vec::new(),
                round,
            });
        }
        let max = self.shared.config.max_bytes;
        if inner.disk_bytes + total > max {
            return Err(SpoolError::Full {
                dir: self.shared.dir.clone(),
                limit: max,
                used: inner.disk_bytes,
                needed: total,
            });
        }
        let now = record::now_ms();
        let mut ids = Vec::with_capacity(encoded.len());
        for mut e in encoded {
            let len = e.len();
            let inner = &mut *inner;
            let roll = inner.segments.values().next_back().is_none_or(|active| {
                active.assigned_bytes > 0 && active.assigned_bytes + len > limit
            });
            if roll {
                if let Some(active) = inner.segments.values_mut().next_back() {
                    active.sealed = true;
                    if active.pending == 0 {
                        inner.reap_wanted = true;
                    }
                }
                inner
                    .segments
                    .insert(inner.next_seq, Segment::new(inner.next_seq));
            }
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let Some((&first, active)) = inner.segments.iter_mut().next_back() else {
                continue; // there is always one: inserted above if missing
            };
            active.add(seq, len, now);
            active.assigned_bytes += len;
            inner.disk_bytes += len;
            inner.pending += 1;
            inner.pending_bytes += len;
            let bytes = e.seal(seq, now);
            match inner.buffer.last_mut() {
                Some(chunk) if chunk.segment == first => {
                    chunk.bytes.extend_from_slice(bytes);
                    chunk.end_seq = seq + 1;
                }
                _ => inner.buffer.push(Chunk {
                    segment: first,
                    first_seq: seq,
                    end_seq: seq + 1,
                    bytes: bytes.to_vec(),
                }),
            }
            ids.push(SpoolId(seq));
        }
        let round = Arc::clone(&inner.round);
        drop(inner);
        self.shared.wake_writer.notify_one();
        Ok(AppendTicket { ids, round })
    }

    /// Writes whatever is buffered and fsyncs it and the settle log, whatever the policy
    /// (for [`SyncPolicy::Interval`] or [`SyncPolicy::Os`] spools at a checkpoint).
    pub fn sync(&self) -> Result<(), SpoolError> {
        let round = {
            let mut inner = lock(&self.shared.inner);
            if let Some(broken) = &inner.broken {
                return Err(broken.clone());
            }
            inner.sync_requested = true;
            Arc::clone(&inner.round)
        };
        self.shared.wake_writer.notify_one();
        round.wait()
    }

    /// Marks a record done: it will not be read again, nor come back after a restart (but
    /// see [`SpoolConfig::settle_sync_every`] for power loss). Settling twice is harmless.
    pub fn settle(&self, id: SpoolId) -> Result<(), SpoolError> {
        self.settle_all(&[id])
    }

    /// Marks records done, in any order, with one write to the settle log. A segment file
    /// is deleted once all its records are settled (unless it is the one being appended to).
    ///
    /// Fails, settling none, if an id was never handed out or the settle log cannot be
    /// written (on a full disk, the segments this call empties are settled all the same, by
    /// deleting them). An error from the housekeeping after a recorded settlement (deleting
    /// a segment, rewriting the settle log) leaves the settlement recorded; settling again is
    /// harmless.
    pub fn settle_all(&self, ids: &[SpoolId]) -> Result<(), SpoolError> {
        self.shared.settle_all(ids)
    }

    /// A reader of every pending record from the oldest, in append order, that keeps up with
    /// new appends once they are durable. See [`Cursor`].
    pub fn cursor(&self) -> Cursor {
        Cursor::new(Arc::clone(&self.shared))
    }

    /// How the spool is doing now.
    pub fn stats(&self) -> SpoolStats {
        self.shared.stats()
    }

    /// Writes what is buffered, syncs as the policy says (the settle log too), and releases
    /// the directory (once every [`Cursor`] is dropped as well). Reports what failed.
    pub fn close(mut self) -> Result<(), SpoolError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), SpoolError> {
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        lock(&self.shared.inner).shutdown = true;
        self.shared.wake_writer.notify_one();
        match writer.join() {
            Ok(r) => r,
            Err(_) => Err(SpoolError::io(
                "stop the writer thread of",
                &self.shared.dir,
                std::io::Error::other("it panicked"),
            )),
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ignored = self.stop();
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.dir)
            .field("sync", &self.shared.config.sync)
            .finish()
    }
}

impl Shared {
    fn timed_sync(&self, file: &File, op: &'static str, path: &Path) -> Result<(), SpoolError> {
        let start = Instant::now();
        let r = file.sync_data();
        self.note_fsync(start);
        #[cfg(test)]
        let r = r.and_then(|()| self.injected_fsync_failure());
        r.map_err(|e| SpoolError::io(op, path, e))
    }

    #[cfg(test)]
    fn injected_fsync_failure(&self) -> std::io::Result<()> {
        if self.fail_fsyncs.load(Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }

    fn note_fsync(&self, start: Instant) {
        let took = start.elapsed();
        crate::metrics::fsync_took(took.as_secs_f64());
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.fsync_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn sync_dir(&self) -> Result<(), SpoolError> {
        let start = Instant::now();
        let r = sync_dir(&self.dir);
        self.note_fsync(start);
        #[cfg(test)]
        let r = r.and_then(|()| {
            self.injected_fsync_failure()
                .map_err(|e| SpoolError::io("fsync directory", &self.dir, e))
        });
        r
    }

    /// Counts a damaged record once, however many readers meet it.
    pub(crate) fn note_corrupt(&self, segment: u64, offset: u64) {
        lock(&self.corrupt).insert((segment, offset));
    }

    fn settle_all(&self, ids: &[SpoolId]) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut log = lock(&self.settle);
        let mut seqs: Vec<u64> = ids.iter().map(|id| id.0).collect();
        seqs.sort_unstable();
        seqs.dedup();
        {
            let inner = lock(&self.inner);
            if let Some(&max) = seqs.last() {
                if max >= inner.next_seq {
                    return Err(SpoolError::UnknownId {
                        dir: self.dir.clone(),
                        id: SpoolId(max),
                        next: SpoolId(inner.next_seq),
                    });
                }
            }
            seqs.retain(|&seq| {
                inner
                    .segments
                    .range(..=seq)
                    .next_back()
                    .is_some_and(|(_, s)| s.is_pending(seq))
            });
        }
        if seqs.is_empty() {
            return Ok(());
        }
        // Settling may make room (a segment deleted): appends try the disk again.
        lock(&self.inner).disk_full = None;
        if let Err(e) = log.append(&settle_log::runs(seqs.iter().copied()), seqs.len() as u64) {
            if !e.is_full() {
                return Err(e);
            }
            // The disk is full, and settling is how room is made: a segment whose records
            // are all settled by this call is deleted instead of logged (the deletion is the
            // settlement), then the rest is logged in the room that made.
            seqs = self.settle_by_deletion(&seqs)?;
            if seqs.is_empty() {
                return Ok(());
            }
            log.append(&settle_log::runs(seqs.iter().copied()), seqs.len() as u64)?;
        }
        let fsyncs = self.config.fsyncs();
        if fsyncs {
            lock(&self.settle_due).get_or_insert_with(Instant::now);
        }
        {
            let mut inner = lock(&self.inner);
            let inner = &mut *inner;
            let last = inner.segments.keys().next_back().copied();
            for &seq in &seqs {
                let Some((&first, seg)) = inner.segments.range_mut(..=seq).next_back() else {
                    continue;
                };
                if let Some(len) = seg.settle(seq) {
                    inner.pending -= 1;
                    inner.pending_bytes -= len;
                    if seg.pending == 0 && Some(first) != last {
                        inner.reap_wanted = true;
                    }
                }
            }
        }
        if fsyncs && log.unsynced >= self.config.settle_sync_every {
            // The writer thread syncs the settle log now: the thread that settles (a
            // producer's runtime thread) never waits for an fsync.
            let _inner = lock(&self.inner);
            self.settle_urgent.store(true, Ordering::Release);
        }
        // The writer may need to schedule the settle log's fsync.
        self.wake_writer.notify_one();
        self.reap(&mut log)
    }

    /// Settles, by deleting their files, the sealed segments whose every pending record is in
    /// `seqs`; returns the ids left (in segments that keep other pending records).
    fn settle_by_deletion(&self, seqs: &[u64]) -> Result<Vec<u64>, SpoolError> {
        let mut rest = Vec::new();
        let mut doomed = Vec::new();
        {
            let mut inner = lock(&self.inner);
            let inner = &mut *inner;
            let last = inner.segments.keys().next_back().copied();
            let mut i = 0;
            while i < seqs.len() {
                let Some((&first, seg)) = inner.segments.range(..=seqs[i]).next_back() else {
                    i += 1;
                    continue;
                };
                let end = seqs[i..].partition_point(|&s| s < seg.end) + i;
                let mine = &seqs[i..end];
                let whole = Some(first) != last
                    && seg.sealed
                    && seg.written_bytes == seg.assigned_bytes
                    && mine.iter().filter(|&&s| seg.is_pending(s)).count() as u64 == seg.pending;
                if whole {
                    if let Some(seg) = inner.segments.remove(&first) {
                        inner.pending -= seg.pending;
                        inner.pending_bytes -= seg.pending_bytes;
                        inner.disk_bytes -= seg.assigned_bytes;
                        doomed.push((first, seg));
                    }
                } else {
                    rest.extend_from_slice(mine);
                }
                i = end.max(i + 1);
            }
        }
        self.delete_segments(doomed)?;
        Ok(rest)
    }

    /// Deletes the files of `doomed`, segments taken out of `Inner::segments` (their counts
    /// with them), and makes the deletions durable. A file that cannot be deleted is put back
    /// with those after it, and a later reap tries again: taken out of memory with its file
    /// still there, its records' settlements would be dropped by the settle log's next
    /// rewrite, and the records come back at the next open.
    fn delete_segments(&self, doomed: Vec<(u64, Segment)>) -> Result<(), SpoolError> {
        let deleted = !doomed.is_empty();
        let mut doomed = doomed.into_iter();
        while let Some((first, seg)) = doomed.next() {
            let path = segment_path(&self.dir, first);
            #[cfg(test)]
            let removed = if self.fail_removes.load(Ordering::Relaxed) {
                Err(std::io::Error::from_raw_os_error(5)) // EIO
            } else {
                std::fs::remove_file(&path)
            };
            #[cfg(not(test))]
            let removed = std::fs::remove_file(&path);
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let mut inner = lock(&self.inner);
                    for (first, seg) in std::iter::once((first, seg)).chain(doomed) {
                        inner.pending += seg.pending;
                        inner.pending_bytes += seg.pending_bytes;
                        inner.disk_bytes += seg.assigned_bytes;
                        inner.segments.insert(first, seg);
                    }
                    inner.reap_wanted = true;
                    return Err(SpoolError::io("delete settled segment", &path, e));
                }
            }
        }
        if deleted && self.config.fsyncs() {
            self.sync_deletions()?;
        }
        Ok(())
    }

    /// Makes the segment deletions so far durable (see `Inner::deletions_unsynced`).
    fn sync_deletions(&self) -> Result<(), SpoolError> {
        lock(&self.inner).deletions_unsynced = true;
        self.sync_dir()?;
        lock(&self.inner).deletions_unsynced = false;
        Ok(())
    }

    fn sync_settle_log(&self, log: &mut SettleLog) -> Result<(), SpoolError> {
        let start = Instant::now();
        let r = log.sync();
        self.note_fsync(start);
        r?;
        *lock(&self.settle_due) = None;
        Ok(())
    }

    /// Deletes sealed segments whose records are all settled and written, then rewrites the
    /// settle log if it has doubled since its last rewrite.
    fn reap(&self, log: &mut SettleLog) -> Result<(), SpoolError> {
        let (doomed, unsynced) = {
            let mut inner = lock(&self.inner);
            let unsynced = inner.deletions_unsynced;
            let doomed = if inner.reap_wanted {
                inner.reap_wanted = false;
                let last = inner.segments.keys().next_back().copied();
                let firsts: Vec<u64> = inner
                    .segments
                    .values()
                    .filter(|s| {
                        Some(s.first) != last
                            && s.sealed
                            && s.pending == 0
                            && s.written_bytes == s.assigned_bytes
                    })
                    .map(|s| s.first)
                    .collect();
                let mut doomed = Vec::with_capacity(firsts.len());
                for first in firsts {
                    if let Some(s) = inner.segments.remove(&first) {
                        inner.disk_bytes -= s.assigned_bytes;
                        doomed.push((first, s));
                    }
                }
                // Some may wait for their writes: the writer asks again after each round.
                inner.reap_wanted = inner
                    .segments
                    .values()
                    .any(|s| Some(s.first) != last && s.sealed && s.pending == 0);
                doomed
            } else {
                Vec::new()
            };
            (doomed, unsynced)
        };
        // Deletions durable before the settle log forgets these records.
        if doomed.is_empty() && unsynced {
            self.sync_deletions()?;
        }
        self.delete_segments(doomed)?;
        if log.len > (2 * log.rewritten_len).max(COMPACT_MIN) {
            self.rewrite_settle_log(log)?;
        }
        Ok(())
    }

    fn rewrite_settle_log(&self, log: &mut SettleLog) -> Result<(), SpoolError> {
        let runs = {
            let inner = lock(&self.inner);
            let mut runs = Vec::new();
            for s in inner.segments.values() {
                s.settled_runs(&mut runs);
            }
            runs
        };
        let start = Instant::now();
        log.replace(&self.dir, &runs, self.config.fsyncs())?;
        if self.config.fsyncs() {
            self.note_fsync(start);
        }
        *lock(&self.settle_due) = None;
        Ok(())
    }

    fn stats(&self) -> SpoolStats {
        let unsynced = lock(&self.settle).unsynced;
        let inner = lock(&self.inner);
        let mut stats = recover::stats_of(&inner.segments, inner.next_seq);
        stats.fsyncs = self.fsyncs.load(Ordering::Relaxed);
        stats.fsync_time = Duration::from_nanos(self.fsync_nanos.load(Ordering::Relaxed));
        stats.corrupt_records = lock(&self.corrupt).len() as u64;
        stats.unsynced_settlements = unsynced;
        stats.disk_bytes = inner.disk_bytes;
        stats
    }
}

/// Rewrite the settle log only once it is at least this long.
const COMPACT_MIN: u64 = 64 * 1024;

/// What the writer thread does next.
enum Job {
    Write {
        chunks: Vec<Chunk>,
        round: Arc<Round>,
        sync: bool,
    },
    Tick,
    Stop,
}

/// The writer thread: takes every buffered append as one round, writes it, fsyncs it (group
/// commit), completes the round; also the interval fsyncs.
struct Writer {
    shared: Arc<Shared>,
    /// The segment file being written: `(first seq, file, its length)`.
    file: Option<(u64, File, u64)>,
    /// Since when the current file has writes not yet fsynced.
    unsynced_since: Option<Instant>,
    /// The round being written, failed by `drop` if the thread unwinds in the middle of it.
    in_flight: Option<Arc<Round>>,
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            file: None,
            unsynced_since: None,
            in_flight: None,
        }
    }

    fn run(mut self) -> Result<(), SpoolError> {
        loop {
            match self.next_job() {
                Job::Write {
                    chunks,
                    round,
                    sync,
                } => {
                    self.in_flight = Some(Arc::clone(&round));
                    self.write_round(chunks, &round, sync);
                    self.in_flight = None;
                    // Under a steady stream of appends there is always a round to write:
                    // the settle log's fsync (urgent or due) and the interval's are not
                    // left waiting for a pause.
                    self.tick();
                }
                Job::Tick => self.tick(),
                Job::Stop => return self.finish(),
            }
        }
    }

    fn next_job(&self) -> Job {
        let shared = &*self.shared;
        let mut inner = lock(&shared.inner);
        loop {
            if !inner.buffer.is_empty() || inner.sync_requested {
                let chunks = std::mem::take(&mut inner.buffer);
                let round = std::mem::replace(&mut inner.round, Round::new());
                let sync = std::mem::take(&mut inner.sync_requested);
                return Job::Write {
                    chunks,
                    round,
                    sync,
                };
            }
            if inner.shutdown {
                return Job::Stop;
            }
            if shared.settle_urgent.load(Ordering::Acquire) {
                return Job::Tick;
            }
            let mut deadline = None::<Instant>;
            if let (SyncPolicy::Interval(every), Some(since)) =
                (shared.config.sync, self.unsynced_since)
            {
                deadline = Some(since + every);
            }
            if let Some(since) = *lock(&shared.settle_due) {
                let due = since + shared.config.settle_sync_interval;
                deadline = Some(deadline.map_or(due, |d| d.min(due)));
            }
            let now = Instant::now();
            inner = match deadline {
                Some(d) if d <= now => return Job::Tick,
                Some(d) => {
                    shared
                        .wake_writer
                        .wait_timeout(inner, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => shared
                    .wake_writer
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// Interval fsyncs of the segment being written and of the settle log.
    fn tick(&mut self) {
        let shared = Arc::clone(&self.shared);
        if let (SyncPolicy::Interval(every), Some(since)) =
            (shared.config.sync, self.unsynced_since)
        {
            if since.elapsed() >= every {
                // A failure breaks the spool (see `sync_file`).
                let _broken = self.sync_file();
            }
        }
        let urgent = shared.settle_urgent.swap(false, Ordering::AcqRel);
        let due = *lock(&shared.settle_due);
        if urgent || due.is_some_and(|since| since.elapsed() >= shared.config.settle_sync_interval)
        {
            let mut log = lock(&shared.settle);
            if log.unsynced == 0 {
                *lock(&shared.settle_due) = None;
            } else if shared.sync_settle_log(&mut log).is_err() {
                // Settlements stay unsynced; the next settle or tick tries again, later.
                *lock(&shared.settle_due) = Some(Instant::now());
            }
        }
    }

    /// Fsyncs the segment being written. A failure breaks the spool, whoever asked: after a
    /// failed fsync the kernel may have dropped the unwritten pages and marked them clean,
    /// so a later fsync that succeeds proves nothing about them.
    fn sync_file(&mut self) -> Result<(), SpoolError> {
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        if let Some((first, file, _)) = &self.file {
            let path = segment_path(&self.shared.dir, *first);
            if let Err(e) = self.shared.timed_sync(file, "fsync segment", &path) {
                self.break_spool(e.clone());
                // Nothing more to sync: the interval's tick must not fsync again and again.
                self.unsynced_since = None;
                return Err(e);
            }
        }
        self.unsynced_since = None;
        Ok(())
    }

    fn break_spool(&self, cause: SpoolError) {
        let mut inner = lock(&self.shared.inner);
        if inner.broken.is_none() {
            inner.broken = Some(SpoolError::Broken {
                dir: self.shared.dir.clone(),
                cause: Box::new(cause),
            });
        }
    }

    /// Makes `first`'s file the one being written, creating it if needed.
    fn switch_to(&mut self, first: u64) -> Result<(), SpoolError> {
        if self.file.as_ref().is_some_and(|(f, _, _)| *f == first) {
            return Ok(());
        }
        // Only the file being written may hold unsynced writes.
        if self.shared.config.fsyncs() {
            self.sync_file()?;
        }
        let path = segment_path(&self.shared.dir, first);
        let existed = path.exists();
        let file = crate::private_file()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| SpoolError::io("open segment", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| SpoolError::io("open segment", &path, e))?
            .len();
        if !existed && self.shared.config.fsyncs() {
            // Without its directory entry on disk, the new segment's records could vanish
            // however well each is fsynced: the spool breaks, as for a failed fsync.
            if let Err(e) = self.shared.sync_dir() {
                self.break_spool(e.clone());
                return Err(e);
            }
        }
        self.file = Some((first, file, len));
        Ok(())
    }

    fn write_round(&mut self, chunks: Vec<Chunk>, round: &Round, sync: bool) {
        let shared = Arc::clone(&self.shared);
        let broken = lock(&shared.inner).broken.clone();
        // Where each file written to began, to undo a failed round.
        let mut touched: Vec<(u64, u64)> = Vec::new();
        let mut outcome: Result<(), SpoolError> = match broken {
            Some(b) => Err(b),
            None => Ok(()),
        };
        let mut written = 0;
        if outcome.is_ok() {
            for chunk in &chunks {
                if let Err(e) = self.switch_to(chunk.segment) {
                    outcome = Err(e);
                    break;
                }
                let Some((first, file, len)) = self.file.as_mut() else {
                    break;
                };
                if touched.last().is_none_or(|(f, _)| f != first) {
                    touched.push((*first, *len));
                }
                if let Err(e) = file.write_all(&chunk.bytes) {
                    let path = segment_path(&shared.dir, *first);
                    outcome = Err(SpoolError::io("write segment", &path, e));
                    break;
                }
                *len += chunk.bytes.len() as u64;
                self.unsynced_since.get_or_insert_with(Instant::now);
                written += 1;
            }
        }
        if outcome.is_ok() && (shared.config.sync == SyncPolicy::Group || sync) {
            // A failure breaks the spool (see `sync_file`).
            outcome = self.sync_file();
        }
        // A `Spool::sync` round syncs the settle log too; if that fails, the round fails, and
        // is undone as below (its appenders are told it failed).
        if sync && outcome.is_ok() {
            let mut log = lock(&shared.settle);
            if log.unsynced > 0 {
                if let Err(e) = shared.sync_settle_log(&mut log) {
                    outcome = Err(e);
                }
            }
        }
        // A failed round is undone: after a failed write, so that a later append does not
        // follow a torn record; after a failed fsync (which broke the spool), so that the
        // records whose appenders are told they failed do not come back at the next open and
        // get sent after all. Only this round's bytes go: rounds before it were fsynced (or,
        // under `Interval` and `Os`, had returned), and are kept.
        let mut kept = outcome.is_ok();
        if !kept {
            if let Err(e) = self.undo(&touched) {
                // The bytes may be there: this process skips them (not pending), but the
                // next open may read them, and the appenders hear so from the error.
                self.break_spool(e.clone());
                kept = true;
                outcome = Err(e);
            }
        }
        {
            let mut inner = lock(&shared.inner);
            let inner = &mut *inner;
            for (i, chunk) in chunks.iter().enumerate() {
                let Some(seg) = inner.segments.get_mut(&chunk.segment) else {
                    continue;
                };
                let landed = i < written && kept;
                let len = chunk.bytes.len() as u64;
                if landed {
                    seg.written_bytes += len;
                } else {
                    seg.assigned_bytes -= len;
                    inner.disk_bytes -= len;
                }
                if outcome.is_err() {
                    let (n, bytes) = seg.settle_range(chunk.first_seq, chunk.end_seq);
                    inner.pending -= n;
                    inner.pending_bytes -= bytes;
                    inner.reap_wanted = true;
                }
            }
            if let Some(b) = &inner.broken {
                if outcome.is_ok() {
                    outcome = Err(b.clone());
                }
            }
            inner.disk_full = match &outcome {
                Err(e) if e.is_full() => Some(Instant::now()),
                _ => None,
            };
        }
        // Before the appenders hear back: a segment sealed by this round whose records are
        // all settled is gone by then.
        if lock(&shared.inner).reap_wanted {
            let mut log = lock(&shared.settle);
            // A failure here is reported by the next settle, which tries again.
            let _retried_later = shared.reap(&mut log);
        }
        shared.readable.notify_all();
        round.complete(outcome);
    }

    /// Cuts every file this round wrote back to its length before the round.
    fn undo(&mut self, touched: &[(u64, u64)]) -> Result<(), SpoolError> {
        for &(first, len) in touched {
            let path = segment_path(&self.shared.dir, first);
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(len))
                .map_err(|e| {
                    SpoolError::io(
                        "cut off a failed append (its records may come back at the next open) in segment",
                        &path,
                        e,
                    )
                })?;
            if let Some((f, _, l)) = self.file.as_mut() {
                if *f == first {
                    *l = len;
                }
            }
        }
        Ok(())
    }

    /// At close: the last interval fsync, and the settle log's.
    fn finish(&mut self) -> Result<(), SpoolError> {
        let shared = Arc::clone(&self.shared);
        if !shared.config.fsyncs() {
            return Ok(());
        }
        let data = self.sync_file();
        let mut log = lock(&shared.settle);
        let settled = if log.unsynced > 0 {
            shared.sync_settle_log(&mut log)
        } else {
            Ok(())
        };
        data.and(settled)
    }
}

/// When the writer thread ends, normally or by a panic, no appender is left waiting: the
/// spool refuses appends from then on, and a round it was writing or had not taken yet fails.
impl Drop for Writer {
    fn drop(&mut self) {
        let stopped = SpoolError::Broken {
            dir: self.shared.dir.clone(),
            cause: Box::new(SpoolError::io(
                "write to",
                &self.shared.dir,
                std::io::Error::other("the spool's writer thread stopped"),
            )),
        };
        let waiting = {
            let mut inner = lock(&self.shared.inner);
            inner.shutdown = true;
            let broken = inner.broken.get_or_insert(stopped).clone();
            let had_work = !inner.buffer.is_empty() || inner.sync_requested;
            inner.buffer.clear();
            let round = std::mem::replace(&mut inner.round, Round::new());
            (round, had_work, broken)
        };
        let (round, had_work, broken) = waiting;
        round.complete(if had_work {
            Err(broken.clone())
        } else {
            Ok(())
        });
        if let Some(round) = self.in_flight.take() {
            round.complete(Err(broken));
        }
        self.shared.readable.notify_all();
    }
}

/// Failed fsyncs, which no filesystem here can be made to produce on demand: `fail_fsyncs`
/// makes every fsync of one spool fail with EIO after it ran.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::SyncPolicy;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("herald-spool-unit-{name}-{}", std::process::id()));
            let _absent = std::fs::remove_dir_all(&path);
            Self(path)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _best_effort = std::fs::remove_dir_all(&self.0);
        }
    }

    fn payloads(spool: &Spool) -> Vec<String> {
        let mut cursor = spool.cursor();
        let mut out = Vec::new();
        loop {
            let batch = cursor.read_batch(64, 1 << 20).expect("reads");
            if batch.is_empty() {
                return out;
            }
            out.extend(
                batch
                    .iter()
                    .map(|r| String::from_utf8_lossy(r.message.payload()).into_owned()),
            );
        }
    }

    fn fail_fsyncs(spool: &Spool, fail: bool) {
        spool.shared.fail_fsyncs.store(fail, Ordering::Relaxed);
    }

    /// The segment files in `dir`.
    fn segment_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .expect("the spool's folder")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            })
            .count()
    }

    /// Appends to `spool` (in `dir`) until it has three segment files; their ids.
    fn fill_three_segments(spool: &Spool, dir: &std::path::Path) -> Vec<SpoolId> {
        let mut ids = Vec::new();
        while segment_files(dir) < 3 {
            ids.push(
                spool
                    .append(&Message::new("d", "x".repeat(100)))
                    .expect("appended"),
            );
        }
        ids
    }

    /// A settled segment whose file could not be deleted stays known, and a later reap
    /// deletes it. It was taken out of memory before its deletion: its file stayed on disk for
    /// good, and the settle log's next rewrite would drop its records' settlements, bringing
    /// them back at the next open.
    #[test]
    fn a_segment_whose_file_could_not_be_deleted_is_deleted_later() {
        let dir = TempDir::new("failed-remove");
        let config = SpoolConfig::new(&dir.0).segment_bytes(4096);
        let (spool, _) = Spool::open(config.clone()).expect("opens");
        let ids = fill_three_segments(&spool, &dir.0);
        spool.shared.fail_removes.store(true, Ordering::Relaxed);
        let e = spool.settle_all(&ids).expect_err("the deletion failed");
        assert!(e.to_string().contains("delete settled segment"), "{e}");
        assert_eq!(segment_files(&dir.0), 3);
        spool.shared.fail_removes.store(false, Ordering::Relaxed);
        // The writer reaps after its next round.
        spool.append(&Message::new("d", "next")).expect("appended");
        let deadline = Instant::now() + Duration::from_secs(10);
        while segment_files(&dir.0) > 1 {
            assert!(
                Instant::now() < deadline,
                "{} segment files left",
                segment_files(&dir.0)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            spool.stats().disk_bytes,
            std::fs::metadata(segment_path(
                &dir.0,
                *lock(&spool.shared.inner)
                    .segments
                    .keys()
                    .next()
                    .expect("one")
            ))
            .expect("the segment")
            .len(),
            "what the spool counts is what is on disk"
        );
        drop(spool);
        let (_spool, recovery) = Spool::open(config).expect("reopens");
        assert_eq!(recovery.pending_messages, 1, "only the last one is pending");
    }

    /// A failed directory fsync after deletions holds back the settle log's rewrite until one
    /// succeeds: rewritten while the deletions may not be durable, the log would forget the
    /// settlements of records whose files a power loss could bring back.
    #[test]
    fn the_settle_log_is_not_rewritten_while_deletions_are_not_durable() {
        let dir = TempDir::new("unsynced-deletion");
        let config = SpoolConfig::new(&dir.0).segment_bytes(4096);
        let (spool, _) = Spool::open(config).expect("opens");
        let ids = fill_three_segments(&spool, &dir.0);
        fail_fsyncs(&spool, true);
        let _failed = spool.settle_all(&ids);
        assert!(lock(&spool.shared.inner).deletions_unsynced);
        let rewritten = lock(&spool.shared.settle).rewritten_len;
        // A settle log past its rewrite size: the next reap would rewrite it.
        lock(&spool.shared.settle).len = u64::MAX / 4;
        let _failed = spool.shared.reap(&mut lock(&spool.shared.settle));
        assert_eq!(
            lock(&spool.shared.settle).rewritten_len,
            rewritten,
            "rewritten"
        );
        fail_fsyncs(&spool, false);
        spool
            .shared
            .reap(&mut lock(&spool.shared.settle))
            .expect("reaped");
        assert!(!lock(&spool.shared.inner).deletions_unsynced);
    }

    /// With fsyncs working again, `spool` still refuses appends (a later fsync that succeeds
    /// proves nothing after a failed one); reopened, it recovers what is on disk.
    fn stays_broken_until_reopened(spool: Spool, config: SpoolConfig) -> (Spool, Recovery) {
        fail_fsyncs(&spool, false);
        let later = spool
            .append(&Message::new("d", "after"))
            .expect_err("broken");
        assert!(matches!(later, SpoolError::Broken { .. }), "{later}");
        drop(spool);
        Spool::open(config).expect("reopens")
    }

    /// Appends that fail (a full disk) take sequence numbers and write nothing, and stay in one
    /// segment (their bytes given back): after enough of them the next record's number lies
    /// far past the previous one's. Before, past 2^24 such a record was taken for damage: the
    /// cursor skipped it, and at the next open it was cut off as a torn tail, although it had
    /// been acknowledged.
    #[test]
    fn a_record_after_many_failed_appends_is_kept() {
        let dir = TempDir::new("seq-gap");
        let config = SpoolConfig::new(&dir.0);
        let (spool, _) = Spool::open(config.clone()).expect("opens");
        spool
            .append(&Message::new("d", "before"))
            .expect("appended");
        lock(&spool.shared.inner).next_seq += (1 << 24) + 1;
        spool.append(&Message::new("d", "after")).expect("appended");
        assert_eq!(payloads(&spool), ["before", "after"]);
        drop(spool);
        let (spool, recovery) = Spool::open(config).expect("reopens");
        assert_eq!(payloads(&spool), ["before", "after"]);
        assert_eq!(recovery.damage.corrupt.len(), 0);
        assert!(
            recovery.damage.torn.is_empty(),
            "{:?}",
            recovery.damage.torn
        );
        assert_eq!(recovery.pending_messages, 2);
    }

    #[test]
    fn a_failed_fsync_breaks_the_spool_and_its_records_do_not_come_back() {
        let dir = TempDir::new("failed-fsync");
        let config = SpoolConfig::new(&dir.0);
        let (spool, _) = Spool::open(config.clone()).expect("opens");
        spool
            .append(&Message::new("d", "before"))
            .expect("appended");
        fail_fsyncs(&spool, true);
        let e = spool
            .append_all(&[
                Message::new("d", "told-failed-1"),
                Message::new("d", "told-failed-2"),
            ])
            .expect_err("the fsync failed");
        assert!(e.to_string().contains("fsync segment"), "{e}");
        let (spool, recovery) = stays_broken_until_reopened(spool, config);
        // The appenders told of the failure would send those two again themselves: the
        // spool must not send them too.
        assert_eq!(payloads(&spool), ["before"]);
        assert_eq!(recovery.pending_messages, 1);
        assert_eq!(recovery.damage.corrupt.len(), 0);
    }

    #[test]
    fn a_failed_interval_fsync_breaks_the_spool_and_is_not_tried_again_and_again() {
        let dir = TempDir::new("failed-interval");
        let config = SpoolConfig::new(&dir.0).sync(SyncPolicy::Interval(Duration::from_millis(10)));
        let (spool, _) = Spool::open(config.clone()).expect("opens");
        fail_fsyncs(&spool, true);
        // Returns after the write; the interval's fsync then fails and breaks the spool.
        spool
            .append(&Message::new("d", "unsynced"))
            .expect("written");
        let deadline = Instant::now() + Duration::from_secs(10);
        while spool.append(&Message::new("d", "later")).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the interval's fsync never failed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let fsyncs = spool.stats().fsyncs;
        std::thread::sleep(Duration::from_millis(200));
        // Before, the writer fsynced again at once, as often as it could.
        assert!(
            spool.stats().fsyncs <= fsyncs + 1,
            "{} fsyncs in 200 ms after the spool broke",
            spool.stats().fsyncs - fsyncs
        );
        let (spool, _) = stays_broken_until_reopened(spool, config);
        // The appends that returned were written: kept.
        assert_eq!(payloads(&spool)[0], "unsynced");
    }

    #[test]
    fn a_failed_fsync_as_a_segment_fills_breaks_the_spool() {
        let dir = TempDir::new("failed-roll");
        // No fsync but the one that seals a full segment.
        let config = SpoolConfig::new(&dir.0)
            .sync(SyncPolicy::Interval(Duration::from_secs(3600)))
            .segment_bytes(4096)
            .max_bytes(1 << 20);
        let (spool, _) = Spool::open(config.clone()).expect("opens");
        let body = "x".repeat(1000);
        spool
            .append(&Message::new("d", body.clone()))
            .expect("appended");
        fail_fsyncs(&spool, true);
        let mut appended = 1;
        let e = loop {
            match spool.append(&Message::new("d", body.clone())) {
                Ok(_) => appended += 1,
                Err(e) => break e,
            }
            assert!(
                appended < 10,
                "a segment of 4 KiB holds fewer than 10 of these"
            );
        };
        assert!(e.to_string().contains("fsync segment"), "{e}");
        let (spool, _) = stays_broken_until_reopened(spool, config);
        // Those whose appends returned are kept; the failed one is not.
        assert_eq!(payloads(&spool).len(), appended);
    }
}
