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
    /// What must be mended before the next append, which writes nothing until it is: a
    /// frame written after a torn one, or into a file no longer at `path`, would be lost (a
    /// reader stops at the torn frame; the next open reads only the file at `path`).
    mend: Option<Mend>,
    /// A rewrite's rename is not known to be durable yet (its directory's fsync failed): the
    /// next [`SettleLog::sync`] syncs the directory first.
    dir_unsynced: bool,
}

/// See [`SettleLog::mend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mend {
    /// An append failed partway and could not be cut back: the file ends past `len`.
    Cut,
    /// A rewrite renamed the new log over the old and could not open it for appending yet:
    /// `file` is the new log's handle as it was written (at `path`, not for appending).
    Reopen,
}

/// Tests only: the next operations of this thread's settle logs fail as set.
#[cfg(test)]
pub(crate) mod faults {
    use std::cell::Cell;

    thread_local! {
        /// The next reopen after a rename fails.
        pub(crate) static REOPEN: Cell<bool> = const { Cell::new(false) };
        /// The next append writes half its bytes and fails.
        pub(crate) static TEAR: Cell<bool> = const { Cell::new(false) };
        /// The next fsync of the directory fails.
        pub(crate) static DIR_SYNC: Cell<bool> = const { Cell::new(false) };
        /// Cutting back fails while set.
        pub(crate) static CUT: Cell<bool> = const { Cell::new(false) };
    }

    pub(crate) fn take(flag: &'static std::thread::LocalKey<Cell<bool>>) -> bool {
        flag.with(|f| f.replace(false))
    }

    pub(crate) fn get(flag: &'static std::thread::LocalKey<Cell<bool>>) -> bool {
        flag.with(Cell::get)
    }

    pub(crate) fn eio() -> std::io::Error {
        std::io::Error::from_raw_os_error(5)
    }
}

impl SettleLog {
    /// Writes a new settle log holding `runs` beside the old one, then renames it over the
    /// old (syncing file and directory first when `sync`): the old log stays whole until the
    /// new one is.
    pub(crate) fn rewrite(dir: &Path, runs: &[(u64, u32)], sync: bool) -> Result<Self, SpoolError> {
        let (file, len) = Self::place_new(dir, runs, sync)?;
        let mut log = Self {
            file,
            len,
            rewritten_len: len,
            unsynced: 0,
            mend: Some(Mend::Reopen),
            dir_unsynced: sync,
            path: dir.join(FILE),
        };
        log.sync_dir()?;
        log.reopen()?;
        Ok(log)
    }

    /// [`SettleLog::rewrite`] in place of this log (its compaction). Once the new log is
    /// renamed into place, this one writes only to it: if it cannot be opened now, appends
    /// wait until it can (see [`SettleLog::mend`]).
    pub(crate) fn replace(
        &mut self,
        dir: &Path,
        runs: &[(u64, u32)],
        sync: bool,
    ) -> Result<(), SpoolError> {
        let (file, len) = Self::place_new(dir, runs, sync)?;
        // Renamed into place: the new log holds what this one did (fsynced when `sync`), and
        // this log's file is no longer the one at `path`.
        self.file = file;
        (self.len, self.rewritten_len) = (len, len);
        self.mend = Some(Mend::Reopen);
        self.dir_unsynced = sync;
        // Settlements not yet synced stay counted until the rename is durable.
        self.sync_dir()?;
        self.unsynced = 0;
        self.reopen()
    }

    /// Makes a rewrite's rename durable, if it is not known to be.
    fn sync_dir(&mut self) -> Result<(), SpoolError> {
        if !self.dir_unsynced {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        #[cfg(test)]
        if faults::take(&faults::DIR_SYNC) {
            return Err(SpoolError::io("fsync directory", dir, faults::eio()));
        }
        sync_dir(dir)?;
        self.dir_unsynced = false;
        Ok(())
    }

    /// Writes the new log beside the old and renames it into place (the caller then syncs
    /// the directory); on an error before the rename is done, removes it, the old log
    /// untouched. Returns the new log's handle, not open for appending, and its length.
    fn place_new(dir: &Path, runs: &[(u64, u32)], sync: bool) -> Result<(File, u64), SpoolError> {
        let tmp = dir.join(TMP);
        let placed = Self::write_new(&tmp, runs, sync).and_then(|written| {
            std::fs::rename(&tmp, dir.join(FILE))
                .map_err(|e| SpoolError::io("rename settle log", &tmp, e))?;
            Ok(written)
        });
        if placed.is_err() {
            // Leave no copy taking room (the old log is untouched).
            let _absent_or_kept = std::fs::remove_file(&tmp);
        }
        placed
    }

    /// Opens the file at `path` for appending, as this log's file.
    fn reopen(&mut self) -> Result<(), SpoolError> {
        let err = |e| SpoolError::io("open settle log", &self.path, e);
        #[cfg(test)]
        if faults::take(&faults::REOPEN) {
            return Err(err(faults::eio()));
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        self.file = file;
        self.len = len;
        self.rewritten_len = len;
        self.mend = None;
        Ok(())
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
            mend: None,
            dir_unsynced: false,
        })
    }

    fn write_new(tmp: &Path, runs: &[(u64, u32)], sync: bool) -> Result<(File, u64), SpoolError> {
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
        let body = frames(runs);
        let mut head = [0u8; HEADER_LEN as usize];
        head[0..4].copy_from_slice(&MAGIC);
        head[4] = VERSION;
        w.write_all(&head)
            .and_then(|()| w.write_all(&body))
            .and_then(|()| w.flush())
            .map_err(|e| err("write settle log", e))?;
        let file = w
            .into_inner()
            .map_err(|e| err("write settle log", e.into_error()))?;
        if sync {
            file.sync_all().map_err(|e| err("fsync settle log", e))?;
        }
        Ok((file, HEADER_LEN + body.len() as u64))
    }

    /// Appends one frame per [`MAX_RUNS`] runs. On failure the log is cut back to where it
    /// was (so that a later append does not follow a torn frame); if that fails too, the next
    /// append cuts it back first, and writes nothing until it can.
    pub(crate) fn append(
        &mut self,
        runs: &[(u64, u32)],
        settlements: u64,
    ) -> Result<(), SpoolError> {
        match self.mend {
            None => {}
            Some(Mend::Cut) => {
                self.cut_back()
                    .map_err(|e| SpoolError::io("cut settle log", &self.path, e))?;
                self.mend = None;
            }
            Some(Mend::Reopen) => self.reopen()?,
        }
        let bytes = frames(runs);
        #[cfg(test)]
        let written = if faults::take(&faults::TEAR) {
            self.file
                .write_all(&bytes[..bytes.len() / 2])
                .and(Err(faults::eio()))
        } else {
            self.file.write_all(&bytes)
        };
        #[cfg(not(test))]
        let written = self.file.write_all(&bytes);
        if let Err(e) = written {
            if self.cut_back().is_err() {
                self.mend = Some(Mend::Cut);
            }
            return Err(SpoolError::io("write settle log", &self.path, e));
        }
        self.len += bytes.len() as u64;
        self.unsynced += settlements;
        Ok(())
    }

    /// Cuts the file back to `len`, the end of its last whole frame.
    fn cut_back(&self) -> io::Result<()> {
        #[cfg(test)]
        if faults::get(&faults::CUT) {
            return Err(faults::eio());
        }
        self.file.set_len(self.len)
    }

    /// Forces what was written to disk.
    pub(crate) fn sync(&mut self) -> Result<(), SpoolError> {
        self.sync_dir()?;
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
        let dir = test_dir("runs");
        let mut log = SettleLog::rewrite(&dir, &[(10, 2)], false).expect("created");
        log.append(&[(20, 1), (30, 5)], 6).expect("appended");
        let whole = log.len;
        log.append(&[(40, 1)], 1).expect("appended");
        assert_eq!(log.unsynced, 7);
        drop(log);
        let path = dir.join(FILE);
        let (got, r) = runs_at(&path);
        assert_eq!(got, vec![(10, 2), (20, 1), (30, 5), (40, 1)]);
        assert_eq!(r.torn_bytes, 0);
        // Cut the last frame short: the frames before it still count.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(whole + 5).expect("cut");
        let (got, r) = runs_at(&path);
        assert_eq!(got, vec![(10, 2), (20, 1), (30, 5)]);
        assert_eq!((r.valid_len, r.torn_bytes), (whole, 5));
        // A flipped byte in a frame ends the log there.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[HEADER_LEN as usize + FRAME_HEAD + 2] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let (got, r) = runs_at(&path);
        assert!(got.is_empty());
        assert_eq!(r.valid_len, HEADER_LEN);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// A folder of its own for one test, empty.
    fn test_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("herald-spool-settle-{name}-{}", std::process::id()));
        let _absent = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn runs_at(path: &Path) -> (Vec<(u64, u32)>, LogRead) {
        let mut got = Vec::new();
        let r = read(path, |a, b| got.push((a, b))).expect("reads");
        (got, r)
    }

    /// A compaction that renamed the new log into place and could not open it left the log
    /// appending to the old file, gone from the folder: every settlement after it was lost.
    #[test]
    fn after_a_rewrite_that_could_not_open_its_new_log_appends_go_to_the_new_log() {
        let dir = test_dir("reopen");
        let mut log = SettleLog::rewrite(&dir, &[(10, 2)], false).expect("created");
        log.append(&[(20, 1)], 1).expect("appended");
        faults::REOPEN.with(|f| f.set(true));
        let e = log
            .replace(&dir, &[(10, 2), (20, 1)], false)
            .expect_err("cannot open the new log");
        assert!(e.to_string().contains("open settle log"), "{e}");
        // Its length is the new log's (else every later settle would compact it again).
        let on_disk = std::fs::metadata(dir.join(FILE)).expect("new log").len();
        assert_eq!((log.len, log.rewritten_len), (on_disk, on_disk));
        log.append(&[(30, 1)], 1)
            .expect("appended, the new log opened first");
        log.append(&[(40, 1)], 1).expect("appended");
        let (got, r) = runs_at(&dir.join(FILE));
        assert_eq!(got, vec![(10, 2), (20, 1), (30, 1), (40, 1)]);
        assert_eq!(r.torn_bytes, 0);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// An append that failed partway and could not be cut back left a torn frame, and the
    /// next appends went after it, where a reader never looks.
    #[test]
    fn after_a_torn_append_that_could_not_be_cut_back_nothing_follows_the_tear() {
        let dir = test_dir("tear");
        let mut log = SettleLog::rewrite(&dir, &[], false).expect("created");
        log.append(&[(1, 1)], 1).expect("appended");
        faults::TEAR.with(|f| f.set(true));
        faults::CUT.with(|f| f.set(true));
        log.append(&[(2, 1)], 1).expect_err("torn");
        let e = log
            .append(&[(3, 1)], 1)
            .expect_err("not written while the tear stays");
        assert!(e.to_string().contains("cut settle log"), "{e}");
        faults::CUT.with(|f| f.set(false));
        log.append(&[(4, 1)], 1).expect("cut back, then appended");
        let (got, r) = runs_at(&dir.join(FILE));
        assert_eq!(got, vec![(1, 1), (4, 1)]);
        assert_eq!(r.torn_bytes, 0);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// A compaction whose directory fsync failed counted its settlements as synced: nothing
    /// made the rename durable, and a power loss could bring the old log back without them.
    #[test]
    fn a_rewrite_not_yet_durable_keeps_its_settlements_unsynced_until_it_is() {
        let dir = test_dir("dirsync");
        let mut log = SettleLog::rewrite(&dir, &[], true).expect("created");
        log.append(&[(1, 2)], 2).expect("appended");
        faults::DIR_SYNC.with(|f| f.set(true));
        log.replace(&dir, &[(1, 2)], true)
            .expect_err("the directory's fsync fails");
        assert_eq!(log.unsynced, 2, "not durable yet");
        assert!(!dir.join(TMP).exists());
        log.sync().expect("the directory, then the log");
        assert_eq!(log.unsynced, 0);
        log.append(&[(3, 1)], 1).expect("appended to the new log");
        let (got, _) = runs_at(&dir.join(FILE));
        assert_eq!(got, vec![(1, 2), (3, 1)]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
