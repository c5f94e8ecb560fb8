//! Reading a segment file record by record: every record verified, damage skipped by
//! resynchronising on the next valid record, and a bad tail told apart from a bad middle.
//! Used by recovery, `inspect`, `check` and cursors; it holds one record in memory at a time.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::record::{self, Header, HEADER_LEN, MAGIC, VERSION};
use crate::SpoolError;

/// What the scanner found next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// A verified record; its body is in [`Scanner::body`].
    Record { offset: u64, header: Header },
    /// Damaged bytes followed by a valid record: skipped.
    Corrupt {
        offset: u64,
        bytes: u64,
        reason: &'static str,
    },
    /// Damaged bytes with no valid record after them, up to the end: a torn write.
    Torn {
        offset: u64,
        bytes: u64,
        reason: &'static str,
    },
}

/// Sequential, verifying reader of one segment file.
pub(crate) struct Scanner {
    file: BufReader<File>,
    path: PathBuf,
    /// Where the underlying reader is.
    pos: u64,
    /// Where the next record starts.
    at: u64,
    /// Nothing at or past this offset is read.
    end: u64,
    /// A valid record's sequence number is at least this (one past the previous record's)...
    min_seq: u64,
    /// ...and below this (the next segment's first).
    max_seq: u64,
    body: Vec<u8>,
}

/// The most sequence numbers a record found by a search after damage may lie past the previous
/// record's: beyond it, such a candidate is taken for more damage. A record where the previous
/// one ends is not held to it: appends whose write failed (a full disk) take numbers and write
/// nothing, as many as they come.
const MAX_SEQ_GAP: u64 = 1 << 24;

/// How far a resynchronisation reads at a time.
const SCAN_CHUNK: usize = 64 * 1024;

impl Scanner {
    /// A scanner of `path` from offset `at`, reading nothing at or past `end` (the file's
    /// length when `None`), accepting sequence numbers in `min_seq..max_seq`.
    pub(crate) fn open(
        path: &Path,
        at: u64,
        end: Option<u64>,
        min_seq: u64,
        max_seq: u64,
    ) -> Result<Self, io::Error> {
        let mut file = File::open(path)?;
        let end = match end {
            Some(end) => end,
            None => file.metadata()?.len(),
        };
        file.seek(SeekFrom::Start(at))?;
        Ok(Self {
            file: BufReader::with_capacity(256 * 1024, file),
            path: path.to_owned(),
            pos: at,
            at,
            end,
            min_seq,
            max_seq,
            body: Vec::new(),
        })
    }

    /// Lets the scanner read up to `end` (a file that grew), forgetting what it had buffered
    /// past the old end (which may have been read while it was being written).
    pub(crate) fn extend_to(&mut self, end: u64, max_seq: u64) -> io::Result<()> {
        self.end = end;
        self.max_seq = max_seq;
        self.file.seek(SeekFrom::Start(self.pos))?;
        Ok(())
    }

    /// Where reading stops.
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Where the next record starts.
    pub(crate) fn offset(&self) -> u64 {
        self.at
    }

    /// The body of the record last returned, taken (the next record reads into a new buffer).
    pub(crate) fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }

    /// The next record or damaged stretch, or `None` at the end.
    pub(crate) fn next_item(&mut self) -> Result<Option<Item>, SpoolError> {
        if self.at >= self.end {
            return Ok(None);
        }
        let at = self.at;
        match self.try_record(at, true)? {
            Ok(header) => {
                self.at = at + header.record_len();
                self.min_seq = header.seq + 1;
                Ok(Some(Item::Record { offset: at, header }))
            }
            Err(reason) => self.resync(at, reason).map(Some),
        }
    }

    /// Finds where valid records start again after a bad one at `bad`: the first magic after
    /// it that starts a valid record. (Not where the bad record's length says the next one
    /// starts, even when a valid record is there: that length may be the damaged part, and
    /// skip good records before it.)
    fn resync(&mut self, bad: u64, reason: &'static str) -> Result<Item, SpoolError> {
        let mut chunk = vec![0u8; SCAN_CHUNK];
        let mut from = bad + 1;
        while from + HEADER_LEN as u64 <= self.end {
            let n = (self.end - from).min(SCAN_CHUNK as u64) as usize;
            self.read_at(from, &mut chunk[..n])
                .map_err(|e| self.err(e))?;
            let candidates: Vec<u64> = chunk[..n]
                .windows(MAGIC.len())
                .enumerate()
                .filter(|(_, w)| *w == MAGIC)
                .map(|(i, _)| from + i as u64)
                .collect();
            for candidate in candidates {
                if self.try_record(candidate, false)?.is_ok() {
                    return Ok(self.corrupt(bad, candidate, reason));
                }
            }
            if n < MAGIC.len() {
                break;
            }
            // Overlap by a magic's length minus one, so none is split between two reads.
            from += (n - (MAGIC.len() - 1)) as u64;
        }
        let bytes = self.end - bad;
        self.at = self.end;
        Ok(Item::Torn {
            offset: bad,
            bytes,
            reason,
        })
    }

    fn corrupt(&mut self, bad: u64, next: u64, reason: &'static str) -> Item {
        self.at = next;
        Item::Corrupt {
            offset: bad,
            bytes: next - bad,
            reason,
        }
    }

    /// The header at `at`: `Ok(Err(why))` if it is not a valid one; `Err` if the file could
    /// not be read (an I/O error is no proof of damage: taken for a torn tail, it would cut
    /// off good records).
    fn read_header(&mut self, at: u64) -> Result<Result<Header, &'static str>, SpoolError> {
        if at + HEADER_LEN as u64 > self.end {
            return Ok(Err("incomplete record header"));
        }
        let mut head = [0u8; HEADER_LEN];
        self.read_at(at, &mut head).map_err(|e| self.err(e))?;
        let header = match record::parse_header(&head) {
            Ok(h) => h,
            Err(why) => return Ok(Err(why)),
        };
        if at + header.record_len() > self.end {
            return Ok(Err("record runs past the end of the segment"));
        }
        Ok(Ok(header))
    }

    /// Reads and verifies the record at `at`: `Ok(Err(why))` if it is not a valid one.
    /// `adjacent`: `at` is where the previous record ends (not a place found by a search), so
    /// its sequence number may lie any distance past the previous one's.
    fn try_record(
        &mut self,
        at: u64,
        adjacent: bool,
    ) -> Result<Result<Header, &'static str>, SpoolError> {
        let header = match self.read_header(at)? {
            Ok(h) => h,
            Err(why) => return Ok(Err(why)),
        };
        // A place found by a search is checked first against what is cheap to know, before
        // its body (up to its length's worth) is read: payloads holding many a magic would
        // otherwise make the search read the rest of the segment at each.
        if !adjacent && (header.seq < self.min_seq || header.seq >= self.max_seq) {
            return Ok(Err("sequence number out of order"));
        }
        let mut head = [0u8; HEADER_LEN];
        self.read_at(at, &mut head).map_err(|e| self.err(e))?;
        self.body.clear();
        self.body.resize(header.body_len as usize, 0);
        let mut body = std::mem::take(&mut self.body);
        let read = self.read_at(at + HEADER_LEN as u64, &mut body);
        self.body = body;
        read.map_err(|e| self.err(e))?;
        if record::crc_of(&head, &self.body) != header.crc {
            return Ok(Err("checksum mismatch"));
        }
        if header.version != VERSION {
            return Err(SpoolError::UnsupportedVersion {
                path: self.path.clone(),
                offset: at,
                version: header.version,
                supported: VERSION,
            });
        }
        if header.seq < self.min_seq || header.seq >= self.max_seq {
            return Ok(Err("sequence number out of order"));
        }
        if !adjacent && header.seq - self.min_seq > MAX_SEQ_GAP {
            return Ok(Err("sequence number jumps too far"));
        }
        if let Err(why) = record::validate_body(header.flags, &self.body) {
            return Ok(Err(why));
        }
        Ok(Ok(header))
    }

    fn read_at(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        if at != self.pos {
            let delta = i64::try_from(i128::from(at) - i128::from(self.pos))
                .map_err(|_| io::Error::other("offset out of range"))?;
            self.pos = at;
            self.file.seek_relative(delta)?;
        }
        let r = self.file.read_exact(buf);
        if r.is_err() {
            // Where the reader stopped is unknown: seek to an absolute offset next time.
            self.file.seek(SeekFrom::Start(at))?;
            self.pos = at;
        } else {
            self.pos = at + buf.len() as u64;
        }
        r
    }

    fn err(&self, e: io::Error) -> SpoolError {
        SpoolError::io("read segment", &self.path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::Message;

    fn rec(seq: u64, payload: &str) -> Vec<u8> {
        let mut e = record::encode(&Message::new("d", payload.to_owned())).expect("encodes");
        e.seal(seq, 1).to_vec()
    }

    /// A file holding `bytes`, in a folder of its own that goes with the returned guard.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(bytes: &[u8], name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("herald-spool-scan-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            std::fs::write(dir.join("segment"), bytes).expect("write");
            Self(dir)
        }
        fn path(&self) -> std::path::PathBuf {
            self.0.join("segment")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _best_effort = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scan(bytes: &[u8], name: &str) -> Vec<Item> {
        let file = TempFile::new(bytes, name);
        let mut s = Scanner::open(&file.path(), 0, None, 0, u64::MAX).expect("opens");
        let mut items = Vec::new();
        while let Some(item) = s.next_item().expect("scans") {
            items.push(item);
        }
        items
    }

    fn offsets(items: &[Item]) -> Vec<(char, u64, u64)> {
        items
            .iter()
            .map(|i| match i {
                Item::Record { offset, header } => ('r', *offset, header.seq),
                Item::Corrupt { offset, bytes, .. } => ('c', *offset, *bytes),
                Item::Torn { offset, bytes, .. } => ('t', *offset, *bytes),
            })
            .collect()
    }

    #[test]
    fn a_flipped_body_byte_is_skipped_by_length_and_a_bad_length_by_magic() {
        let (a, b, c) = (rec(1, "first"), rec(2, "second"), rec(3, "third"));
        let (la, lb) = (a.len() as u64, b.len() as u64);
        let mut file = [a.clone(), b.clone(), c.clone()].concat();
        file[a.len() + HEADER_LEN + 3] ^= 0x40;
        assert_eq!(
            offsets(&scan(&file, "body")),
            vec![('r', 0, 1), ('c', la, lb), ('r', la + lb, 3)]
        );
        let mut file = [a, b, c].concat();
        file[la as usize + 9] ^= 0x10; // the length field
        assert_eq!(
            offsets(&scan(&file, "len")),
            vec![('r', 0, 1), ('c', la, lb), ('r', la + lb, 3)]
        );
    }

    /// A damaged length that points exactly at a later valid record does not skip the good
    /// records before it: the scan resumes at the first valid one. It used to trust the
    /// length, and records 2 and 3 below vanished into one "corrupt" stretch.
    #[test]
    fn a_length_pointing_past_good_records_does_not_skip_them() {
        // Records of 256 bytes: a length 512 bytes longer lands on the fourth.
        let pad = 256 - rec(0, "").len();
        let payload = "x".repeat(pad);
        let recs: Vec<Vec<u8>> = (1..=5).map(|seq| rec(seq, &payload)).collect();
        assert!(recs.iter().all(|r| r.len() == 256));
        let mut file = recs.concat();
        file[256 + 9] ^= 0x02; // the second record's length, +512
        assert_eq!(
            offsets(&scan(&file, "long-len")),
            vec![
                ('r', 0, 1),
                ('c', 256, 256),
                ('r', 512, 3),
                ('r', 768, 4),
                ('r', 1024, 5)
            ]
        );
    }

    #[test]
    fn damage_at_the_end_is_a_torn_tail() {
        let (a, b) = (rec(1, "first"), rec(2, "second"));
        let la = a.len() as u64;
        let whole = [a.clone(), b.clone()].concat();
        for cut in [1, HEADER_LEN - 1, HEADER_LEN + 2, b.len() - 1] {
            let items = scan(&whole[..a.len() + cut], "cut");
            assert_eq!(
                offsets(&items),
                vec![('r', 0, 1), ('t', la, cut as u64)],
                "cut at {cut}"
            );
        }
        let mut flipped = whole.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            offsets(&scan(&flipped, "flip")),
            vec![('r', 0, 1), ('t', la, b.len() as u64)]
        );
    }

    #[test]
    fn out_of_order_sequence_numbers_are_damage_and_a_newer_version_an_error() {
        let file = [rec(5, "a"), rec(5, "again"), rec(6, "b")].concat();
        let items = scan(&file, "seq");
        assert!(matches!(
            items[1],
            Item::Corrupt {
                reason: "sequence number out of order",
                ..
            }
        ));
        assert_eq!(items.len(), 3);

        let mut v2 = rec(1, "from the future");
        v2[4] = 2;
        let head: [u8; HEADER_LEN] = v2[..HEADER_LEN].try_into().expect("32");
        let crc = record::crc_of(&head, &v2[HEADER_LEN..]);
        v2[12..16].copy_from_slice(&crc.to_le_bytes());
        let file = TempFile::new(&v2, "v2");
        let mut s = Scanner::open(&file.path(), 0, None, 0, u64::MAX).expect("opens");
        let err = s.next_item().expect_err("refused");
        assert!(
            matches!(
                err,
                SpoolError::UnsupportedVersion {
                    version: 2,
                    offset: 0,
                    ..
                }
            ),
            "{err}"
        );
    }
}
