//! `Cursor`: pending records read back from the segment files in append order, a batch at a
//! time, skipping settled and damaged ones; it follows new appends once they are durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::Bytes;

use crate::index::segment_path;
use crate::record::{self, time_of};
use crate::scan::{Item, Scanner};
use crate::spool::{lock, Inner, Shared};
use crate::{SpoolError, SpoolId, SpooledMessage};

/// Reads pending records in append order, from the segment files, holding only the batch it
/// returns in memory.
///
/// A cursor starts at the oldest pending record and reads records appended later too, once
/// their append is durable (written, and with [`SyncPolicy::Group`](crate::SyncPolicy::Group)
/// fsynced). Settled records are skipped (a record settled after it was read is not read
/// again by this cursor anyway: it only moves forward). Damaged records are skipped and
/// counted in [`SpoolStats::corrupt_records`](crate::SpoolStats::corrupt_records).
///
/// After a restart, read the recovered records with `spool.cursor().until(recovery.first_new_id())`;
/// a producer that reads everything it sends from the spool (so that its memory holds only
/// what it is sending, however much is spooled) keeps one cursor without a bound, calls
/// [`read_batch`](Cursor::read_batch) with the room it has, and [`wait`](Cursor::wait)s (or
/// is told by its own appends) when it has read everything.
///
/// As an `Iterator` it yields the records readable now and ends when it has caught up; call
/// `next` again later for records appended since.
pub struct Cursor {
    shared: Arc<Shared>,
    /// The segment being read (its first sequence number).
    segment: u64,
    /// Where the next record starts in it.
    offset: u64,
    /// The next record's sequence number is at least this.
    min_seq: u64,
    scanner: Option<Scanner>,
    /// Records before this id are not read ([`Cursor::skip_to`]).
    from: u64,
    /// Records from this id on are not read.
    until: u64,
    finished: bool,
}

impl Cursor {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let first = {
            let inner = lock(&shared.inner);
            inner
                .segments
                .keys()
                .next()
                .copied()
                .unwrap_or(inner.next_seq)
        };
        Self {
            shared,
            segment: first,
            offset: 0,
            min_seq: first,
            scanner: None,
            from: 0,
            until: u64::MAX,
            finished: false,
        }
    }

    /// This cursor, reading no record with an id at or past `end`.
    #[must_use]
    pub fn until(mut self, end: SpoolId) -> Self {
        self.until = end.as_u64();
        self
    }

    /// Reads no record before `id` from now on: moves straight to the segment that holds it
    /// (segments before it are not read at all) and skips the records before it there.
    /// Never moves back.
    pub fn skip_to(&mut self, id: SpoolId) {
        let id = id.as_u64();
        if id <= self.from {
            return;
        }
        self.from = id;
        let holder = lock(&self.shared.inner)
            .segments
            .range(..=id)
            .next_back()
            .map(|(&k, _)| k);
        if let Some(segment) = holder.filter(|&k| k > self.segment) {
            self.move_to(segment);
        }
    }

    /// Every record before this id has been read or skipped.
    pub fn position(&self) -> SpoolId {
        // After a `skip_to`, the records before its id count as skipped before the cursor
        // has read its way to them.
        SpoolId::from_u64(self.min_seq.max(self.from))
    }

    /// Whether it has reached its [`until`](Cursor::until) bound: it will read nothing more.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Up to `max_messages` pending records, stopping once they reach `max_bytes` encoded
    /// bytes (a record larger than that comes alone). Empty when nothing more is readable now.
    pub fn read_batch(
        &mut self,
        max_messages: usize,
        max_bytes: u64,
    ) -> Result<Vec<SpooledMessage>, SpoolError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let full = |out: &Vec<SpooledMessage>, bytes: u64| {
            out.len() >= max_messages || (bytes >= max_bytes && !out.is_empty())
        };
        while !self.finished && !full(&out, bytes) {
            let view = {
                let inner = lock(&self.shared.inner);
                let next = inner
                    .segments
                    .range(self.segment + 1..)
                    .next()
                    .map(|(&k, _)| k);
                inner
                    .segments
                    .get(&self.segment)
                    .map(|seg| {
                        let done = seg.sealed && seg.written_bytes == seg.assigned_bytes;
                        (
                            seg.written_bytes,
                            done,
                            next,
                            next.unwrap_or(inner.next_seq),
                        )
                    })
                    .ok_or(next)
            };
            let (written, done, next, max_seq) = match view {
                Ok(view) => view,
                // Deleted: every record in it was settled.
                Err(Some(next)) => {
                    self.move_to(next);
                    continue;
                }
                Err(None) => break,
            };
            if self.segment >= self.until {
                self.finished = true;
                break;
            }
            if self.offset >= written {
                match next {
                    Some(n) if done => {
                        self.move_to(n);
                        continue;
                    }
                    _ => break,
                }
            }
            if !self.ensure_scanner(written, max_seq)? {
                continue;
            }
            self.read_from_scanner(&mut out, &mut bytes, &full)?;
        }
        Ok(out)
    }

    fn move_to(&mut self, segment: u64) {
        self.segment = segment;
        self.offset = 0;
        self.min_seq = self.min_seq.max(segment);
        self.scanner = None;
    }

    /// Opens (or extends) the scanner on the current segment; `false` if the segment went
    /// away meanwhile.
    fn ensure_scanner(&mut self, written: u64, max_seq: u64) -> Result<bool, SpoolError> {
        let path = segment_path(&self.shared.dir, self.segment);
        match &mut self.scanner {
            Some(s) => {
                if s.end() != written {
                    s.extend_to(written, max_seq)
                        .map_err(|e| SpoolError::io("read segment", &path, e))?;
                }
                Ok(true)
            }
            None => match Scanner::open(&path, self.offset, Some(written), self.min_seq, max_seq) {
                Ok(s) => {
                    self.scanner = Some(s);
                    Ok(true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if lock(&self.shared.inner)
                        .segments
                        .contains_key(&self.segment)
                    {
                        Err(SpoolError::io("read segment", &path, e))
                    } else {
                        Ok(false)
                    }
                }
                Err(e) => Err(SpoolError::io("read segment", &path, e)),
            },
        }
    }

    fn read_from_scanner(
        &mut self,
        out: &mut Vec<SpooledMessage>,
        bytes: &mut u64,
        full: &dyn Fn(&Vec<SpooledMessage>, u64) -> bool,
    ) -> Result<(), SpoolError> {
        let Some(scanner) = self.scanner.as_mut() else {
            return Ok(());
        };
        while !full(out, *bytes) {
            let Some(item) = scanner.next_item()? else {
                break;
            };
            self.offset = scanner.offset();
            match item {
                Item::Record { header, offset } => {
                    self.min_seq = header.seq + 1;
                    if header.seq >= self.until {
                        self.finished = true;
                        break;
                    }
                    if header.seq < self.from {
                        continue;
                    }
                    let pending = lock(&self.shared.inner)
                        .segments
                        .get(&self.segment)
                        .is_some_and(|s| s.is_pending(header.seq));
                    if !pending {
                        continue;
                    }
                    match record::decode(header.flags, Bytes::from(scanner.take_body())) {
                        Ok(message) => {
                            *bytes += header.record_len();
                            out.push(SpooledMessage {
                                id: SpoolId::from_u64(header.seq),
                                message,
                                appended_at: time_of(header.time_ms),
                            });
                        }
                        // The scanner validated the body: unreachable, but never a panic.
                        Err(_) => self.shared.note_corrupt(self.segment, offset),
                    }
                }
                Item::Corrupt { offset, .. } | Item::Torn { offset, .. } => {
                    self.shared.note_corrupt(self.segment, offset);
                }
            }
        }
        Ok(())
    }

    /// Waits until [`read_batch`](Cursor::read_batch) may return records, at most `timeout`;
    /// whether it may. `false` at once if the cursor is finished.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.shared.inner);
        loop {
            if self.finished {
                return false;
            }
            if self.has_unread(&inner) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self
                .shared
                .readable
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn has_unread(&self, inner: &Inner) -> bool {
        let later = inner.segments.range(self.segment + 1..).next().is_some();
        match inner.segments.get(&self.segment) {
            Some(s) => {
                self.offset < s.written_bytes
                    || (later && s.sealed && s.written_bytes == s.assigned_bytes)
            }
            None => later,
        }
    }
}

impl Iterator for Cursor {
    type Item = Result<SpooledMessage, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.read_batch(1, u64::MAX) {
            Ok(mut batch) => batch.pop().map(Ok),
            Err(e) => Some(Err(e)),
        }
    }
}

impl std::fmt::Debug for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursor")
            .field("position", &self.min_seq)
            .field("until", &self.until)
            .finish()
    }
}
