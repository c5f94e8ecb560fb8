//! `SpoolConfig` and `SyncPolicy`: every setting with its default, checked by `validate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::record::HEADER_LEN;
use crate::SpoolError;

const MIB: u64 = 1024 * 1024;

/// When appended records are forced to disk (fsync), and so what a crash can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncPolicy {
    /// An append returns only after an fsync that covers it; appends that arrive while an fsync
    /// runs share the next one (group commit). Nothing whose append returned is lost, even on
    /// power loss. The default.
    Group,
    /// An append returns after its write; the spool fsyncs every interval. A power loss can
    /// lose the appends of the last interval; a process crash loses nothing that returned.
    Interval(Duration),
    /// No fsync at all: the operating system writes when it likes. A process crash loses
    /// nothing that returned; a power loss or kernel crash can lose anything not yet written
    /// back.
    Os,
}

/// Where a spool lives and how it behaves. `SpoolConfig::new(dir)` has the defaults;
/// [`Spool::open`](crate::Spool::open) checks every setting.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub(crate) dir: PathBuf,
    pub(crate) segment_bytes: u64,
    pub(crate) max_bytes: u64,
    pub(crate) sync: SyncPolicy,
    pub(crate) settle_sync_every: u64,
    pub(crate) settle_sync_interval: Duration,
}

impl SpoolConfig {
    /// The defaults for a spool in `dir` (created if missing): 64 MiB segments, 1 GiB in all,
    /// [`SyncPolicy::Group`], settlements synced every 1024 or every second.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 * MIB,
            max_bytes: 1024 * MIB,
            sync: SyncPolicy::Group,
            settle_sync_every: 1024,
            settle_sync_interval: Duration::from_secs(1),
        }
    }
    /// Size at which a segment file is closed and a new one started (default 64 MiB; at least
    /// 64 bytes, at most 1 GiB, and at most half of `max_bytes`). A segment file is deleted
    /// once every record in it is settled, so smaller segments give disk space back sooner;
    /// one message must fit in one segment.
    #[must_use]
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }
    /// The most the segment files may hold in all (default 1 GiB; at least twice
    /// `segment_bytes`).
    /// An append beyond it fails with [`SpoolError::Full`]. Settled records count until their
    /// whole segment is settled and its file deleted. The settle log is not counted (it is
    /// small: about 12 bytes per run of settled ids).
    #[must_use]
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }
    /// When appends are forced to disk (default [`SyncPolicy::Group`]).
    #[must_use]
    pub fn sync(mut self, policy: SyncPolicy) -> Self {
        self.sync = policy;
        self
    }
    /// How many settlements may be written but not yet fsynced (default 1024, at least 1):
    /// the settle that reaches it has the writer thread sync the settle log at once (it does
    /// not wait for that itself). After a power loss, about `n` settled records come back as
    /// unsettled (a few more if settlements arrive during that fsync) and are delivered again.
    /// Ignored with [`SyncPolicy::Os`], which never fsyncs.
    #[must_use]
    pub fn settle_sync_every(mut self, n: u64) -> Self {
        self.settle_sync_every = n;
        self
    }
    /// Settlements are also fsynced at most this long after they were made (default 1 s;
    /// between 1 ms and 1 hour), so that a quiet spool does not keep them unsynced.
    #[must_use]
    pub fn settle_sync_interval(mut self, interval: Duration) -> Self {
        self.settle_sync_interval = interval;
        self
    }
    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks every setting; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), SpoolError> {
        let invalid = |setting, reason: String| Err(SpoolError::InvalidSetting { setting, reason });
        let min_segment = 2 * HEADER_LEN as u64;
        if self.dir.as_os_str().is_empty() {
            return invalid("dir", "is empty".into());
        }
        if self.segment_bytes < min_segment || self.segment_bytes > 1024 * MIB {
            return invalid(
                "segment_bytes",
                format!(
                    "{} is outside {min_segment} ..= {} (1 GiB)",
                    self.segment_bytes,
                    1024 * MIB
                ),
            );
        }
        // The segment being written is never deleted, settled or not: with room for only one,
        // a spool whose records are all settled would stay full.
        if self.max_bytes < self.segment_bytes.saturating_mul(2) {
            return invalid(
                "max_bytes",
                format!(
                    "{} is less than twice segment_bytes ({}): the segment being written is \
                     deleted only once the next one starts, so the limit must hold two (raise \
                     max_bytes, or lower segment_bytes)",
                    self.max_bytes, self.segment_bytes
                ),
            );
        }
        let hour = Duration::from_secs(3600);
        if let SyncPolicy::Interval(every) = self.sync {
            if every.is_zero() || every > hour {
                return invalid(
                    "sync",
                    format!("Interval({every:?}) is outside 1 ns ..= 1 hour"),
                );
            }
        }
        if self.settle_sync_every == 0 {
            return invalid("settle_sync_every", "is 0; at least 1".into());
        }
        if self.settle_sync_interval < Duration::from_millis(1) || self.settle_sync_interval > hour
        {
            return invalid(
                "settle_sync_interval",
                format!("{:?} is outside 1 ms ..= 1 hour", self.settle_sync_interval),
            );
        }
        Ok(())
    }

    /// Whether this policy ever fsyncs.
    pub(crate) fn fsyncs(&self) -> bool {
        self.sync != SyncPolicy::Os
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(c: &SpoolConfig) -> Option<&'static str> {
        match c.validate() {
            Err(SpoolError::InvalidSetting { setting, .. }) => Some(setting),
            Err(other) => panic!("unexpected error {other}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn defaults_are_valid_and_each_bad_setting_is_named() {
        let ok = SpoolConfig::new("/tmp/x");
        assert_eq!(setting(&ok), None);
        assert_eq!(ok.segment_bytes, 64 * MIB);
        assert_eq!(ok.max_bytes, 1024 * MIB);
        assert_eq!(ok.sync, SyncPolicy::Group);
        assert_eq!(setting(&SpoolConfig::new("")), Some("dir"));
        assert_eq!(
            setting(&ok.clone().segment_bytes(10)),
            Some("segment_bytes")
        );
        assert_eq!(
            setting(&ok.clone().segment_bytes(2048 * MIB).max_bytes(4096 * MIB)),
            Some("segment_bytes")
        );
        assert_eq!(setting(&ok.clone().max_bytes(MIB)), Some("max_bytes"));
        // Room for one segment only: once all its records are settled it would stay full.
        let one = ok.clone().segment_bytes(MIB);
        assert_eq!(setting(&one.clone().max_bytes(MIB)), Some("max_bytes"));
        assert_eq!(
            setting(&one.clone().max_bytes(2 * MIB - 1)),
            Some("max_bytes")
        );
        assert_eq!(setting(&one.max_bytes(2 * MIB)), None);
        assert_eq!(
            setting(&ok.clone().sync(SyncPolicy::Interval(Duration::ZERO))),
            Some("sync")
        );
        assert_eq!(
            setting(&ok.clone().settle_sync_every(0)),
            Some("settle_sync_every")
        );
        assert_eq!(
            setting(&ok.clone().settle_sync_interval(Duration::ZERO)),
            Some("settle_sync_interval")
        );
        let msg = ok
            .clone()
            .max_bytes(MIB)
            .validate()
            .expect_err("refused")
            .to_string();
        assert!(
            msg.contains("max_bytes") && msg.contains("1048576"),
            "{msg}"
        );
    }
}
