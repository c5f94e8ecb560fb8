//! Metrics of a spool under a producer ([`SpoolStore`](crate::SpoolStore)), through the
//! `metrics` facade like the rest of herald. No labels: one spool per producer, and a
//! directory path is not a label. Gauges and totals are refreshed at every health evaluation
//! of the producer (`Store::usage`); fsync latency is recorded as it happens.

use std::time::SystemTime;

use metrics::{counter, gauge, Counter, Gauge};

use crate::SpoolStats;

/// Messages in the spool not yet settled. Gauge.
pub const PENDING_MESSAGES: &str = "herald_spool_pending_messages";
/// Their bytes (record headers included). Gauge.
pub const PENDING_BYTES: &str = "herald_spool_pending_bytes";
/// Bytes in segment files: what `max_bytes` bounds. Gauge.
pub const DISK_BYTES: &str = "herald_spool_disk_bytes";
/// The spool's size limit (`SpoolConfig::max_bytes`). Gauge.
pub const MAX_BYTES: &str = "herald_spool_max_bytes";
/// Age of the oldest pending message in seconds (0 when none is pending). Gauge.
pub const OLDEST_AGE: &str = "herald_spool_oldest_age_seconds";
/// Segment files. Gauge.
pub const SEGMENTS: &str = "herald_spool_segments";
/// Fsyncs of segments, the settle log and the directory. Counter.
pub const FSYNCS: &str = "herald_spool_fsyncs_total";
/// How long each fsync took. Histogram.
pub const FSYNC_SECONDS: &str = "herald_spool_fsync_seconds";
/// Damaged records found (at open and by reads since): skipped, the rest delivered. Counter.
pub const CORRUPT_RECORDS: &str = "herald_spool_corrupt_records_total";

/// Every metric name above.
pub const ALL: &[&str] = &[
    PENDING_MESSAGES,
    PENDING_BYTES,
    DISK_BYTES,
    MAX_BYTES,
    OLDEST_AGE,
    SEGMENTS,
    FSYNCS,
    FSYNC_SECONDS,
    CORRUPT_RECORDS,
];

/// The handles, registered once per [`SpoolStore`](crate::SpoolStore).
pub(crate) struct SpoolMetrics {
    pending_messages: Gauge,
    pending_bytes: Gauge,
    disk_bytes: Gauge,
    oldest_age: Gauge,
    segments: Gauge,
    fsyncs: Counter,
    corrupt: Counter,
}

impl SpoolMetrics {
    pub(crate) fn new(max_bytes: u64) -> Self {
        gauge!(MAX_BYTES).set(max_bytes as f64);
        Self {
            pending_messages: gauge!(PENDING_MESSAGES),
            pending_bytes: gauge!(PENDING_BYTES),
            disk_bytes: gauge!(DISK_BYTES),
            oldest_age: gauge!(OLDEST_AGE),
            segments: gauge!(SEGMENTS),
            fsyncs: counter!(FSYNCS),
            corrupt: counter!(CORRUPT_RECORDS),
        }
    }

    /// Sets every gauge and total from `stats`.
    pub(crate) fn observe(&self, stats: &SpoolStats) {
        self.pending_messages.set(stats.pending_messages as f64);
        self.pending_bytes.set(stats.pending_bytes as f64);
        self.disk_bytes.set(stats.disk_bytes as f64);
        self.segments.set(stats.segments as f64);
        let age = stats.oldest_pending.map_or(0.0, |t| {
            SystemTime::now()
                .duration_since(t)
                .map_or(0.0, |d| d.as_secs_f64())
        });
        self.oldest_age.set(age);
        self.fsyncs.absolute(stats.fsyncs);
        self.corrupt.absolute(stats.corrupt_records);
    }
}

/// Records one fsync's duration.
pub(crate) fn fsync_took(seconds: f64) {
    metrics::histogram!(FSYNC_SECONDS).record(seconds);
}
