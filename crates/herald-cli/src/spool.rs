//! `herald spool status DIR` and `herald spool check DIR [--repair]`: what a spool holds and
//! whether it is sound, read from outside without sending anything. `status` and `check`
//! without `--repair` take no lock: they work while a `herald produce --spool DIR` runs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use herald::spool::{self as spool_lib, Inspection};
use serde_json::json;

use crate::report::{self, Exit, ReportFormat};

/// `herald spool`.
#[derive(Debug, clap::Args)]
pub(crate) struct SpoolArgs {
    #[command(subcommand)]
    command: SpoolCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SpoolCommand {
    /// Pending messages and bytes, the oldest message's age and the segment count of the spool
    /// in DIR. Read-only; works while another process has the spool open.
    Status {
        /// The spool directory (as given to `herald produce --spool`).
        dir: PathBuf,
        /// text, or json: one JSON object on the last line of stdout (keys pending_messages,
        /// pending_bytes, oldest_age_s, segments, ...).
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        report: ReportFormat,
    },
    /// Verifies every record of the spool in DIR and reports damage (segment, offset, bytes,
    /// why); exits 1 if there is any. Sends nothing.
    Check {
        /// The spool directory.
        dir: PathBuf,
        /// Also repair: cut torn tails, delete settled segments, rewrite the settle log.
        /// Takes the spool's lock: refused while another process has it open. Damaged records
        /// in the middle of a segment stay, skipped by every read.
        #[arg(long)]
        repair: bool,
        /// text, or json (one JSON object on the last line of stdout).
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        report: ReportFormat,
    },
}

/// Runs `herald spool ...`. An `Err` is a usage error (exit 2): no such spool, a spool in use
/// for `--repair`.
pub(crate) fn run(args: SpoolArgs) -> anyhow::Result<Exit> {
    match args.command {
        SpoolCommand::Status { dir, report } => {
            let found = spool_lib::inspect(&dir)
                .with_context(|| format!("herald spool status {}", dir.display()))?;
            print(&found, report, false);
            Ok(Exit::Ok)
        }
        SpoolCommand::Check {
            dir,
            repair,
            report,
        } => {
            let found = spool_lib::check(&dir, repair)
                .with_context(|| format!("herald spool check {}", dir.display()))?;
            print(&found, report, true);
            Ok(if found.damage.is_empty() {
                Exit::Ok
            } else {
                Exit::Failed
            })
        }
    }
}

/// The oldest pending message's age in seconds, if any is pending.
fn oldest_age(found: &Inspection) -> Option<f64> {
    found.stats.oldest_pending.map(|t| {
        SystemTime::now()
            .duration_since(t)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    })
}

fn print(found: &Inspection, format: ReportFormat, check: bool) {
    let s = &found.stats;
    let d = &found.damage;
    let age = oldest_age(found);
    out!(
        "{} messages pending ({} bytes) in {} segment(s), {} bytes on disk",
        report::count(s.pending_messages),
        report::count(s.pending_bytes),
        s.segments,
        report::count(s.disk_bytes)
    );
    if let Some(age) = age {
        out!("oldest pending message: {age:.1} s old");
    }
    match found.lock_pid {
        Some(pid) => {
            out!("lock file names pid {pid} (the process that has it open, or last had it)")
        }
        None => out!("no process named in the lock file"),
    }
    if check || !d.is_empty() {
        if d.is_empty() {
            out!("no damage: every record verified");
        }
        for c in &d.corrupt {
            out!(
                "damaged record: {} at offset {}, {} bytes skipped ({})",
                c.segment.display(),
                c.offset,
                c.bytes,
                c.reason
            );
        }
        if d.corrupt_records > d.corrupt.len() as u64 {
            out!(
                "... {} damaged records in all",
                report::count(d.corrupt_records)
            );
        }
        for t in &d.torn {
            out!(
                "torn tail: {} at offset {}, {} bytes{} ({})",
                t.segment.display(),
                t.offset,
                t.bytes,
                if found.repaired { " cut" } else { "" },
                t.reason
            );
        }
        if d.settle_log_torn_bytes > 0 {
            out!(
                "settle log: {} bytes at its end did not verify (their settlements count as pending)",
                d.settle_log_torn_bytes
            );
        }
        if found.repaired {
            out!("repaired");
        }
    }
    if format == ReportFormat::Json {
        out!(
            "{}",
            json!({
                "pending_messages": s.pending_messages,
                "pending_bytes": s.pending_bytes,
                "oldest_age_s": age,
                "segments": s.segments,
                "disk_bytes": s.disk_bytes,
                "corrupt_records": d.corrupt_records,
                "torn_bytes": d.torn_bytes(),
                "settle_log_torn_bytes": d.settle_log_torn_bytes,
                "lock_pid": found.lock_pid,
                "repaired": found.repaired,
            })
        );
    }
}
