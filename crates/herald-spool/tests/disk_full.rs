//! A full disk (a 256 KiB tmpfs mounted for the test; root only): appends fail with a clear
//! error that says the disk is full, nothing accepted before is lost, a failed write leaves no
//! torn record behind, settling still works and makes room, and appends go on.
//!
//! It needs root, so it is ignored in a plain `cargo test`; `cargo xtask ci` runs it. Without
//! the right to mount, it fails unless HERALD_IT_ALLOW_SKIP=1 (the convention of herald's tests
//! that need something from the machine).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ids, read_all, records_in, segments, TempDir};
use herald_core::Message;
use herald_spool::{Spool, SpoolConfig, SpoolError, SpoolId};

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    mount: PathBuf,
    _tmp: TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Result<Self, String> {
        let tmp = TempDir::new("disk-full");
        let mount = tmp.path().join("mnt");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self { mount, _tmp: tmp })
    }
    fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _best_effort = Command::new("umount").arg(&self.mount).status();
    }
}

/// A 256 KiB tmpfs, or `None` (said) where none can be mounted and HERALD_IT_ALLOW_SKIP=1.
fn small_disk() -> Option<SmallDisk> {
    match SmallDisk::mount("256k") {
        Ok(d) => Some(d),
        Err(why) if std::env::var("HERALD_IT_ALLOW_SKIP").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: disk_full: cannot mount a tmpfs ({why})");
            None
        }
        Err(why) => panic!("cannot mount a small tmpfs ({why}); HERALD_IT_ALLOW_SKIP=1 skips"),
    }
}

/// A spool in `dir` with segments of 16 KiB (many on the small disk) and no size limit of
/// its own below the disk's.
fn small_segments(dir: &Path) -> SpoolConfig {
    SpoolConfig::new(dir)
        .segment_bytes(16 * 1024)
        .max_bytes(64 * 1024 * 1024)
}

/// A message of 100 bytes, numbered `i`.
fn m(i: usize) -> Message {
    Message::new("d", format!("{i:04}").repeat(25))
}

/// Appends pairs of messages to `spool` until one fails: the ids acknowledged, and the error.
fn fill(spool: &Spool) -> (Vec<SpoolId>, SpoolError) {
    let mut acked: Vec<SpoolId> = Vec::new();
    loop {
        match spool.append_all(&[m(acked.len()), m(acked.len() + 1)]) {
            Ok(ids) => acked.extend(ids),
            Err(e) => return (acked, e),
        }
        assert!(acked.len() < 5000, "a 256 KiB disk never filled");
    }
}

/// Takes the disk's last free bytes with a file `filler`, a byte at a time at the end, and
/// shows the disk full: not one more byte goes in.
fn fill_the_rest(disk: &SmallDisk) {
    let mut filler = std::fs::File::create(disk.path().join("filler")).expect("filler");
    while filler.write_all(&[0u8; 512]).is_ok() {}
    while filler.write_all(&[0u8]).is_ok() {}
    let e = filler
        .write_all(&[0u8])
        .and_then(|()| filler.sync_all())
        .expect_err("the disk is full");
    assert_eq!(e.raw_os_error(), Some(28), "ENOSPC: {e}");
}

#[test]
#[ignore = "mounts a tmpfs (root): cargo xtask ci runs it"]
fn a_full_disk_refuses_appends_loses_nothing_and_settling_makes_room() {
    let Some(disk) = small_disk() else {
        return;
    };
    let dir = disk.path().join("spool");
    let config = || small_segments(&dir);
    let (spool, _) = Spool::open(config()).expect("opens");
    let (acked, err) = fill(&spool);
    assert!(err.is_full(), "{err}");
    assert!(matches!(err, SpoolError::Io { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("No space left") && text.contains(".seg"),
        "{text}"
    );
    // Still refused, not broken: a failed write is undone. Refused at once, taking no
    // sequence number (before, each append was written, failed and undone, and took one:
    // millions of them made the next record's number look like damage).
    let next = spool.stats().next_id;
    assert!(spool.append(&m(0)).expect_err("still full").is_full());
    assert_eq!(spool.stats().next_id, next, "no number taken");
    assert_eq!(ids(&read_all(&spool)), acked, "nothing accepted is lost");

    // Take the last free bytes too, so that the settle log cannot grow either.
    fill_the_rest(&disk);

    // Settle the first five segments whole, and every other record of the next eight (a
    // frame of hundreds of runs, more than the settle log's last page holds): the whole
    // segments are settled by deleting them, and the rest is logged in the room made.
    let files = segments(&dir);
    assert!(files.len() >= 14, "{} segments", files.len());
    let ids_in = |f: &PathBuf| -> Vec<SpoolId> {
        records_in(f)
            .iter()
            .map(|r| SpoolId::from_u64(r.2))
            .collect()
    };
    let whole: Vec<SpoolId> = files[..5].iter().flat_map(ids_in).collect();
    let halves: Vec<SpoolId> = files[5..13]
        .iter()
        .flat_map(ids_in)
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, id)| id)
        .collect();
    let done: Vec<SpoolId> = whole.iter().chain(&halves).copied().collect();
    spool.settle_all(&done).expect("settles on a full disk");
    assert!(
        files[..5].iter().all(|f| !f.exists()),
        "whole segments deleted"
    );
    let after = spool.append_all(&[m(1), m(2)]).expect("room again");
    drop(spool);

    let (spool, recovery) = Spool::open(config()).expect("reopens");
    assert!(
        recovery.damage.is_empty(),
        "no torn record: {:?}",
        recovery.damage
    );
    let want: Vec<SpoolId> = acked
        .iter()
        .filter(|id| !done.contains(id))
        .chain(&after)
        .copied()
        .collect();
    assert_eq!(ids(&read_all(&spool)), want);
}

/// A spool reopened on a disk with no room left and nothing it may delete (every segment
/// still holds pending records): it opens, keeping its settle log as it is, so that sending
/// and settling can make room. Before, the open failed writing the new settle log, and
/// every restart failed the same way.
#[test]
#[ignore = "mounts a tmpfs (root): cargo xtask ci runs it"]
fn a_spool_reopens_on_a_full_disk() {
    let Some(disk) = small_disk() else {
        return;
    };
    let dir = disk.path().join("spool");
    let config = || small_segments(&dir);
    let (spool, _) = Spool::open(config()).expect("opens");
    let (acked, err) = fill(&spool);
    assert!(err.is_full(), "{err}");
    // One record of each segment settled: the settle log has something, no segment can go.
    let settled: Vec<SpoolId> = acked.iter().step_by(50).copied().collect();
    spool.settle_all(&settled).expect("settles");
    fill_the_rest(&disk);
    drop(spool);
    let (spool, recovery) = Spool::open(config()).expect("reopens on the full disk");
    let want: Vec<SpoolId> = acked
        .iter()
        .filter(|id| !settled.contains(id))
        .copied()
        .collect();
    assert_eq!(recovery.pending_messages, want.len() as u64);
    assert_eq!(ids(&read_all(&spool)), want);
    // Settling works on it, and frees the room to append again.
    spool.settle_all(&want).expect("settles");
    std::fs::remove_file(disk.path().join("filler")).expect("filler");
    spool.append(&m(0)).expect("room again");
}
