//! The spool directory's lock: `DIR/lock`, locked exclusively (flock on Unix) for as long as a
//! `Spool` has the directory open, with the holder's pid written in it for error messages.
//! The kernel releases the lock when the holder exits, however it exits, so a killed process
//! never blocks the next open.

use std::fs::{File, TryLockError};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::SpoolError;

/// The lock file's name in the spool directory.
pub(crate) const FILE: &str = "lock";

/// Takes the lock of the spool in `dir`; the returned file holds it until dropped.
pub(crate) fn acquire(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(FILE);
    let err = |op, e| SpoolError::io(op, &path, e);
    let mut file = crate::private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| err("open lock file", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(SpoolError::Locked {
                dir: dir.to_owned(),
                pid: holder(dir),
            })
        }
        Err(TryLockError::Error(e)) => return Err(err("lock", e)),
    }
    // The pid is for error messages only: the lock is held. Written over the last holder's
    // (no new block needed where it was as long) and then cut to length, so that a full disk,
    // when a spool most needs opening to drain, does not stop the open.
    let pid = format!("{}\n", std::process::id());
    let written = write_pid(&mut file, &pid).and_then(|()| file.set_len(pid.len() as u64));
    if let Err(e) = written {
        // What is left is not the pid: say nothing rather than a wrong one.
        let _cleared = file.set_len(0);
        tracing::warn!(
            lock = %path.display(),
            error = %e,
            "could not write this process's id in the spool's lock file (it is locked all the same)"
        );
    }
    Ok(file)
}

fn write_pid(file: &mut File, pid: &str) -> std::io::Result<()> {
    #[cfg(test)]
    if FAIL_PID_WRITE.with(std::cell::Cell::get) {
        return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
    }
    file.seek(SeekFrom::Start(0))?;
    file.write_all(pid.as_bytes())
}

#[cfg(test)]
thread_local! {
    /// Tests only: writing the pid fails (ENOSPC) while set.
    static FAIL_PID_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The pid the last holder wrote in the lock file (whether or not it still holds it).
pub(crate) fn holder(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a full disk the pid could not be written, and the open failed: a spool full to its
    /// disk could not be opened to drain it.
    #[test]
    fn the_lock_is_taken_even_when_the_pid_cannot_be_written() {
        let dir = std::env::temp_dir().join(format!("herald-spool-lock-{}", std::process::id()));
        let _absent = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join(FILE), "4194304\n").expect("an earlier holder's pid");
        FAIL_PID_WRITE.with(|f| f.set(true));
        let held = acquire(&dir);
        FAIL_PID_WRITE.with(|f| f.set(false));
        let held = held.expect("locked without the pid");
        assert_eq!(holder(&dir), None, "no stale pid left");
        match acquire(&dir) {
            Err(SpoolError::Locked { .. }) => {}
            other => panic!("a second open must find it locked: {other:?}"),
        }
        drop(held);
        // Written over a longer pid, cut to length.
        std::fs::write(dir.join(FILE), "4194304999\n").expect("a long pid");
        let _held = acquire(&dir).expect("locked");
        assert_eq!(holder(&dir), Some(std::process::id()));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
