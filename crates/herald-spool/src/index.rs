//! What the spool keeps in memory about each segment file: which of its records are still
//! pending and how big each is (4 bytes per record), a sparse index of append times, and how
//! much of the file is written.

use std::path::{Path, PathBuf};

/// Every this many records, a segment notes the append time (for the oldest pending age).
const TIME_STRIDE: u64 = 64;

/// The file name of the segment whose first sequence number is `first`.
pub(crate) fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// The first sequence number in a segment file's name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One segment file, as the spool knows it.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// Its first sequence number (and its name).
    pub(crate) first: u64,
    /// One past the last sequence number given in it.
    pub(crate) end: u64,
    /// Encoded length of each record by `seq - first`; 0 once settled (or never written).
    lens: Vec<u32>,
    /// Records not settled.
    pub(crate) pending: u64,
    /// Their encoded bytes.
    pub(crate) pending_bytes: u64,
    /// Bytes the file holds once every append given to it is written.
    pub(crate) assigned_bytes: u64,
    /// Bytes written to the file (and, with group commit, synced): what readers may read.
    pub(crate) written_bytes: u64,
    /// No more records go into it.
    pub(crate) sealed: bool,
    /// `(seq, unix ms)` every [`TIME_STRIDE`] records.
    times: Vec<(u64, u64)>,
}

impl Segment {
    pub(crate) fn new(first: u64) -> Self {
        Self {
            first,
            end: first,
            lens: Vec::new(),
            pending: 0,
            pending_bytes: 0,
            assigned_bytes: 0,
            written_bytes: 0,
            sealed: false,
            times: Vec::new(),
        }
    }

    /// Notes record `seq` (at least `end`), pending, of `len` bytes, appended at `time_ms`.
    pub(crate) fn add(&mut self, seq: u64, len: u64, time_ms: u64) {
        let at = (seq - self.first) as usize;
        if self.lens.len() <= at {
            self.lens.resize(at + 1, 0);
        }
        // A record is at most a segment (1 GiB): its length fits.
        self.lens[at] = len as u32;
        self.pending += 1;
        self.pending_bytes += len;
        self.end = seq + 1;
        if self
            .times
            .last()
            .is_none_or(|&(s, _)| seq >= s + TIME_STRIDE)
        {
            self.times.push((seq, time_ms));
        }
    }

    /// Whether `seq` is a pending record of this segment.
    pub(crate) fn is_pending(&self, seq: u64) -> bool {
        seq.checked_sub(self.first)
            .and_then(|at| self.lens.get(at as usize))
            .is_some_and(|&len| len > 0)
    }

    /// Settles `seq`; its length if it was pending.
    pub(crate) fn settle(&mut self, seq: u64) -> Option<u64> {
        let at = seq.checked_sub(self.first)? as usize;
        let slot = self.lens.get_mut(at)?;
        if *slot == 0 {
            return None;
        }
        let len = u64::from(std::mem::take(slot));
        self.pending -= 1;
        self.pending_bytes -= len;
        Some(len)
    }

    /// Settles every pending record in `from..to`; how many and their bytes.
    pub(crate) fn settle_range(&mut self, from: u64, to: u64) -> (u64, u64) {
        let lo = from.max(self.first);
        let hi = to.min(self.end);
        let (mut n, mut bytes) = (0, 0);
        for seq in lo..hi {
            if let Some(len) = self.settle(seq) {
                n += 1;
                bytes += len;
            }
        }
        (n, bytes)
    }

    /// The first pending sequence number.
    pub(crate) fn first_pending(&self) -> Option<u64> {
        if self.pending == 0 {
            return None;
        }
        self.lens
            .iter()
            .position(|&len| len > 0)
            .map(|at| self.first + at as u64)
    }

    /// The append time noted at or before `seq` (at most [`TIME_STRIDE`] - 1 records
    /// earlier), in Unix milliseconds.
    pub(crate) fn time_at_or_before(&self, seq: u64) -> Option<u64> {
        let i = self.times.partition_point(|&(s, _)| s <= seq);
        i.checked_sub(1).map(|i| self.times[i].1)
    }

    /// Appends the runs of settled (or absent) sequence numbers in `first..end` to `out`.
    pub(crate) fn settled_runs(&self, out: &mut Vec<(u64, u32)>) {
        let mut run: Option<(u64, u32)> = None;
        for (at, &len) in self.lens.iter().enumerate() {
            let seq = self.first + at as u64;
            if len == 0 {
                match &mut run {
                    Some((_, n)) if *n < u32::MAX => *n += 1,
                    _ => {
                        out.extend(run.take());
                        run = Some((seq, 1));
                    }
                }
            } else {
                out.extend(run.take());
            }
        }
        out.extend(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        let p = segment_path(Path::new("/s"), 42);
        assert_eq!(p, Path::new("/s/00000000000000000042.seg"));
        assert_eq!(parse_segment_name("00000000000000000042.seg"), Some(42));
        assert_eq!(
            parse_segment_name(&format!("{:020}.seg", u64::MAX)),
            Some(u64::MAX)
        );
        for bad in [
            "42.seg",
            "0000000000000000004x.seg",
            "00000000000000000042.log",
            "lock",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn pending_counts_runs_and_times() {
        let mut s = Segment::new(100);
        for seq in 100..300 {
            s.add(seq, 10, seq * 1000);
        }
        s.add(305, 7, 305_000); // a gap: 300..305 never written
        assert_eq!((s.pending, s.pending_bytes, s.end), (201, 2007, 306));
        assert_eq!(s.settle(150), Some(10));
        assert_eq!(s.settle(150), None, "settling twice");
        assert_eq!(s.settle(99), None, "before the segment");
        assert_eq!(s.settle(400), None, "after it");
        assert_eq!(s.settle_range(100, 120), (20, 200));
        assert_eq!(s.first_pending(), Some(120));
        assert!(s.is_pending(120) && !s.is_pending(150) && !s.is_pending(302));
        assert_eq!(s.time_at_or_before(120), Some(100_000));
        assert_eq!(s.time_at_or_before(170), Some(164_000));
        assert_eq!(s.time_at_or_before(99), None);
        let mut runs = Vec::new();
        s.settled_runs(&mut runs);
        assert_eq!(runs, vec![(100, 20), (150, 1), (300, 5)]);
    }
}
