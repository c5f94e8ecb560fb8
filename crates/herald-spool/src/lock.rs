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
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(|e| err("write lock file", e))?;
    Ok(file)
}

/// The pid the last holder wrote in the lock file (whether or not it still holds it).
pub(crate) fn holder(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}
