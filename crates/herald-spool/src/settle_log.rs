//! The settle log, `settled.log`: which records are done, as runs of sequence numbers.
//!
//! ```text
//! header  "HSTL", version (1), 3 bytes zero
//! frame   count n: u32 LE | CRC-32 of the count's 4 bytes and the runs: u32 LE
//!         n runs, each: first sequence number u64 LE, length u32 LE
//! ```
//!
//! One frame per `settle_all` call, appended; a frame that does not verify ends the log (a
//! torn append: the settlements in it and after it come back as unsettled, which at-least-once
//! delivery allows). Runs of records no longer in any segment are dropped when the log is
//! rewritten, which happens at every open and whenever the log has doubled since the last
//! rewrite.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::record::u32_at;
use crate::SpoolError;

const MAGIC: [u8; 4] = *b"HSTL";
const VERSION: u8 = 1;
/// Bytes before the first frame.
pub(crate) const HEADER_LEN: u64 = 8;
/// A frame's count and CRC.
const FRAME_HEAD: usize = 8;
/// One run: first (u64) and length (u32).
const RUN_LEN: usize = 12;
/// The most runs a reader accepts in one frame; writers split larger sets.
const MAX_RUNS: u32 = 1 << 16;

/// The settle log's file name in the spool directory.
pub(crate) const FILE: &str = "settled.log";
const TMP: &str = "settled.log.tmp";

/// Sorted ids as runs `(first, length)`.
pub(crate) fn runs(sorted: impl IntoIterator<Item = u64>) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for id in sorted {
        match out.last_mut() {
            Some((first, len)) if *first + u64::from(*len) == id && *len < u32::MAX => *len += 1,
            Some((first, len)) if id < *first + u64::from(*len) => {} // a repeat
            _ => out.push((id, 1)),
        }
    }
    out
}

/// Frames for `runs`, at most [`MAX_RUNS`] runs each.
pub(crate) fn frames(runs: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * RUN_LEN + FRAME_HEAD);
    for part in runs.chunks(MAX_RUNS as usize) {
        let count = (part.len() as u32).to_le_bytes();
        let mut payload = Vec::with_capacity(part.len() * RUN_LEN);
        for (first, len) in part {
            payload.extend_from_slice(&first.to_le_bytes());
            payload.extend_from_slice(&len.to_le_bytes());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&count);
        crc.update(&payload);
        out.extend_from_slice(&count);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&payload);
    }
    out
}

/// What reading a settle log found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogRead {
    /// Bytes up to the end of the last frame that verified.
    pub(crate) valid_len: u64,
    /// Bytes after it (a torn or damaged frame and whatever follows).
    pub(crate) torn_bytes: u64,
}

/// Reads the settle log at `path` frame by frame, handing each run to `apply`. A missing
/// file reads as empty.
pub(crate) fn read(path: &Path, mut apply: impl FnMut(u64, u32)) -> Result<LogRead, SpoolError> {
    let err = |e| SpoolError::io("read settle log", path, e);
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LogRead::default()),
        Err(e) => return Err(err(e)),
    };
    let len = file.metadata().map_err(err)?.len();
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let torn = |valid_len: u64| LogRead {
        valid_len,
        torn_bytes: len - valid_len,
    };
    let mut head = [0u8; HEADER_LEN as usize];
    if len < HEADER_LEN {
        return Ok(torn(0));
    }
    r.read_exact(&mut head).map_err(err)?;
    if head[0..4] != MAGIC || head[5..8] != [0, 0, 0] || head[4] == 0 {
        return Ok(torn(0));
    }
    if head[4] != VERSION {
        return Err(SpoolError::UnsupportedVersion {
            path: path.to_owned(),
            offset: 0,
            version: head[4],
            supported: VERSION,
        });
    }
    let mut at = HEADER_LEN;
    let mut payload = Vec::new();
    loop {
        if at == len {
            return Ok(torn(at));
        }
        if len - at < FRAME_HEAD as u64 {
            return Ok(torn(at));
        }
        let mut fh = [0u8; FRAME_HEAD];
        r.read_exact(&mut fh).map_err(err)?;
        let count = u32_at(&fh, 0);
        let size = count as u64 * RUN_LEN as u64;
        if count == 0 || count > MAX_RUNS || size > len - at - FRAME_HEAD as u64 {
            return Ok(torn(at));
        }
        payload.resize(size as usize, 0);
        r.read_exact(&mut payload).map_err(err)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fh[0..4]);
        crc.update(&payload);
        if crc.finalize() != u32_at(&fh, 4) {
            return Ok(torn(at));
        }
        for run in payload.chunks_exact(RUN_LEN) {
            let mut first = [0u8; 8];
            first.copy_from_slice(&run[0..8]);
            apply(u64::from_le_bytes(first), u32_at(run, 8));
        }
        at += FRAME_HEAD as u64 + size;
    }
}

/// The settle log, open for appending.
pub(crate) struct SettleLog {
    pub(crate) path: PathBuf,
    file: File,
    /// Its length.
    pub(crate) len: u64,
    /// Its length after the last rewrite.
    pub(crate) rewritten_len: u64,
    /// Settlements written since the last fsync.
    pub(crate) unsynced: u64,
}

impl SettleLog {
    /// Writes a new settle log holding `runs` beside the old one, then renames it over the
    /// old (syncing file and directory first when `sync`): the old log stays whole until the
    /// new one is.
    pub(crate) fn rewrite(dir: &Path, runs: &[(u64, u32)], sync: bool) -> Result<Self, SpoolError> {
        let tmp = dir.join(TMP);
        let written = Self::write_new(dir, &tmp, runs, sync);
        if written.is_err() {
            // Leave no half-written copy taking room (the old log is untouched).
            let _absent_or_kept = std::fs::remove_file(&tmp);
        }
        written
    }

    /// The settle log of `dir` as it is, cut back to its first `valid_len` bytes (what was
    /// read of it verified; cutting needs no room): for a disk too full to write a new one.
    pub(crate) fn reuse(dir: &Path, valid_len: u64) -> Result<Self, SpoolError> {
        let path = dir.join(FILE);
        let err = |op, e| SpoolError::io(op, &path, e);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| err("open settle log", e))?;
        file.set_len(valid_len)
            .map_err(|e| err("cut settle log", e))?;
        Ok(Self {
            path: path.clone(),
            file,
            len: valid_len,
            rewritten_len: valid_len,
            unsynced: 0,
        })
    }

    fn write_new(
        dir: &Path,
        tmp: &Path,
        runs: &[(u64, u32)],
        sync: bool,
    ) -> Result<Self, SpoolError> {
        let path = dir.join(FILE);
        let err = |op, e| SpoolError::io(op, tmp, e);
        let file = crate::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(|e| err("create settle log", e))?;
        // A leftover of a crash by an older version keeps its mode when opened: set it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err("create settle log", e))?;
        }
        let mut w = BufWriter::new(file);
        let mut head = [0u8; HEADER_LEN as usize];
        head[0..4].copy_from_slice(&MAGIC);
        head[4] = VERSION;
        w.write_all(&head)
            .and_then(|()| w.write_all(&frames(runs)))
            .and_then(|()| w.flush())
            .map_err(|e| err("write settle log", e))?;
        let file = w
            .into_inner()
            .map_err(|e| err("write settle log", e.into_error()))?;
        if sync {
            file.sync_all().map_err(|e| err("fsync settle log", e))?;
        }
        drop(file);
        std::fs::rename(tmp, &path).map_err(|e| err("rename settle log", e))?;
        if sync {
            sync_dir(dir)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| SpoolError::io("open settle log", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| SpoolError::io("open settle log", &path, e))?
            .len();
        Ok(Self {
            path,
            file,
            len,
            rewritten_len: len,
            unsynced: 0,
        })
    }

    /// Appends one frame per [`MAX_RUNS`] runs. On failure the log is cut back to where it
    /// was (so that a later append does not follow a torn frame).
    pub(crate) fn append(
        &mut self,
        runs: &[(u64, u32)],
        settlements: u64,
    ) -> Result<(), SpoolError> {
        let bytes = frames(runs);
        if let Err(e) = self.file.write_all(&bytes) {
            let _undone = self.file.set_len(self.len);
            return Err(SpoolError::io("write settle log", &self.path, e));
        }
        self.len += bytes.len() as u64;
        self.unsynced += settlements;
        Ok(())
    }

    /// Forces what was written to disk.
    pub(crate) fn sync(&mut self) -> Result<(), SpoolError> {
        self.file
            .sync_data()
            .map_err(|e| SpoolError::io("fsync settle log", &self.path, e))?;
        self.unsynced = 0;
        Ok(())
    }
}

/// Fsyncs a directory, so that files created, renamed or removed in it stay so.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SpoolError::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_runs_and_runs_survive_a_torn_frame() {
        assert_eq!(runs([1, 2, 3, 3, 5, 7, 8]), vec![(1, 3), (5, 1), (7, 2)]);
        let dir = std::env::temp_dir().join(format!("herald-spool-settle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut log = SettleLog::rewrite(&dir, &[(10, 2)], false).expect("created");
        log.append(&[(20, 1), (30, 5)], 6).expect("appended");
        let whole = log.len;
        log.append(&[(40, 1)], 1).expect("appended");
        assert_eq!(log.unsynced, 7);
        drop(log);
        let read_all = |path: &Path| {
            let mut got = Vec::new();
            let r = read(path, |a, b| got.push((a, b))).expect("reads");
            (got, r)
        };
        let path = dir.join(FILE);
        let (got, r) = read_all(&path);
        assert_eq!(got, vec![(10, 2), (20, 1), (30, 5), (40, 1)]);
        assert_eq!(r.torn_bytes, 0);
        // Cut the last frame short: the frames before it still count.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(whole + 5).expect("cut");
        let (got, r) = read_all(&path);
        assert_eq!(got, vec![(10, 2), (20, 1), (30, 5)]);
        assert_eq!((r.valid_len, r.torn_bytes), (whole, 5));
        // A flipped byte in a frame ends the log there.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[HEADER_LEN as usize + FRAME_HEAD + 2] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let (got, r) = read_all(&path);
        assert!(got.is_empty());
        assert_eq!(r.valid_len, HEADER_LEN);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
