//! `SpoolError`: everything that can go wrong, each naming what it concerns (a path, a segment,
//! an offset, a limit).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::SpoolId;

/// Why a spool operation failed.
///
/// Cheap to clone (I/O errors are shared), so one failed group commit can be reported to every
/// appender it covered.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// A [`SpoolConfig`](crate::SpoolConfig) setting is out of range.
    #[error("invalid spool setting `{setting}`: {reason}")]
    InvalidSetting {
        /// The setting, as its builder method is named.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Another `Spool` (in this process or another) has the directory open.
    #[error("spool {} is in use by {}", dir.display(), Holder(*pid))]
    Locked {
        /// The spool directory.
        dir: PathBuf,
        /// The holder's process id, as it wrote it in the lock file (`None` if unreadable).
        pid: Option<u32>,
    },
    /// The append would take the spool's segment files past `max_bytes`. Nothing was appended;
    /// settling records frees room once whole segments are settled.
    #[error(
        "spool {} is full: {used} bytes in segments + {needed} to append would exceed \
         max_bytes = {limit}; settle records to free room",
        dir.display()
    )]
    Full {
        /// The spool directory.
        dir: PathBuf,
        /// The `max_bytes` setting.
        limit: u64,
        /// Bytes the segment files hold (or will, once buffered writes land).
        used: u64,
        /// Encoded bytes of the refused append.
        needed: u64,
    },
    /// One message encodes to more than a segment can hold.
    #[error(
        "a message of {size} encoded bytes does not fit in a spool segment \
         (segment_bytes = {limit})"
    )]
    TooLarge {
        /// The message's encoded size (record header included).
        size: u64,
        /// The `segment_bytes` setting.
        limit: u64,
    },
    /// The directory holds no spool (no lock file, no settle log, no segment): a wrong path given to
    /// [`inspect`](crate::inspect) or [`check`](crate::check), which never make one.
    #[error(
        "{} holds no spool (no `lock` file, settle log or segment file): is it the folder \
         given as the spool's directory?",
        dir.display()
    )]
    NotASpool {
        /// The directory.
        dir: PathBuf,
    },
    /// `settle` was given an id this spool never handed out.
    #[error("settle: {id} was never appended to spool {} (the next id is {next})", dir.display())]
    UnknownId {
        /// The spool directory.
        dir: PathBuf,
        /// The id given.
        id: SpoolId,
        /// The id the next append will get.
        next: SpoolId,
    },
    /// A record or file written by a newer herald: this version cannot read it and will not
    /// cut it away as damage.
    #[error(
        "{} at offset {offset}: record format version {version} is newer than this herald \
         reads (version {supported})",
        path.display()
    )]
    UnsupportedVersion {
        /// The segment or settle log.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// The version it carries.
        version: u8,
        /// The version this build writes and reads.
        supported: u8,
    },
    /// An operating-system call failed: `op` says which, on which path.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What the spool was doing ("write segment", "fsync settle log", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error the system returned.
        #[source]
        source: Arc<io::Error>,
    },
    /// An earlier fsync failed (or a failed append could not be cut off again), so the spool
    /// can no longer tell what reached the disk and refuses appends. Records whose append
    /// returned `Ok` before are in the segment files (as durable as the sync policy made them:
    /// with `Interval` and `Os`, the failed fsync may have been theirs); reopen the spool to
    /// recover them.
    #[error("spool {} stopped accepting appends after: {cause}; reopen it", dir.display())]
    Broken {
        /// The spool directory.
        dir: PathBuf,
        /// The failure that stopped it.
        #[source]
        cause: Box<SpoolError>,
    },
}

impl SpoolError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_owned(),
            source: Arc::new(source),
        }
    }

    /// Whether waiting and retrying may help: the spool is full, or the disk is, or the
    /// user's disk quota.
    pub fn is_full(&self) -> bool {
        match self {
            Self::Full { .. } => true,
            Self::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }
}

/// The lock holder, for messages.
struct Holder(Option<u32>);

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "process {pid}"),
            None => f.write_str("another process (its pid is not recorded yet)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk quota, like a full disk, frees up as messages settle: backpressure, not a
    /// broken store (it was `store_failed`, and producers were refused instead of waiting).
    #[test]
    fn a_full_disk_or_quota_is_full_and_other_errors_are_not() {
        let io = |kind: io::ErrorKind| SpoolError::io("append", Path::new("/s"), kind.into());
        assert!(io(io::ErrorKind::StorageFull).is_full());
        assert!(io(io::ErrorKind::QuotaExceeded).is_full());
        assert!(!io(io::ErrorKind::PermissionDenied).is_full());
    }
}
