//! The dead-letter file: one JSON object per line for every message that was not acknowledged
//! and every input line that was not a message.
//!
//! Bytes are written as a JSON string when they are UTF-8 (`payload`, `key`, `input`), else
//! as standard base64 under the same name with `_base64` appended. A record of a failed
//! message is valid `--format jsonl` input: the file can be sent again as it is.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use herald::{Destination, Message, SendError};
use serde_json::{json, Map, Value};

use crate::base64;

/// `error_class` of a line that was not a message.
pub(crate) const INPUT_CLASS: &str = "input";

fn put_bytes(obj: &mut Map<String, Value>, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => obj.insert(field.to_owned(), Value::String(s.to_owned())),
        Err(_) => obj.insert(
            format!("{field}_base64"),
            Value::String(base64::encode(bytes)),
        ),
    };
}

/// The record of a message herald gave up on. `line` is its input line, when known. One the
/// broker holds a copy of all the same (`SendError::stored_copy`: held back for its key's
/// order, then its copy failed) says where, under `stored_copy`: sending the record again
/// stores it twice.
pub(crate) fn failed_record(line: Option<u64>, e: &SendError) -> Value {
    let mut record = message_record(
        line,
        e.message(),
        &e.to_string(),
        e.class().as_str(),
        e.reason().label(),
        json!(e.attempts()),
    );
    if let (Some(ack), Value::Object(obj)) = (e.stored_copy(), &mut record) {
        let mut copy = json!({"partition": ack.partition, "offset": ack.offset});
        if let (Some(route), Value::Object(copy)) = (ack.route, &mut copy) {
            copy.insert("route".into(), json!(route));
        }
        obj.insert("stored_copy".into(), copy);
    }
    record
}

/// The record of a message whose fate was not waited for (reason `interrupted`): it may still
/// reach the broker.
pub(crate) fn unacknowledged_record(line: u64, msg: &Message, error: &str) -> Value {
    message_record(
        Some(line),
        msg,
        &format!("line {line}: {error}"),
        "transient",
        "interrupted",
        Value::Null,
    )
}

fn message_record(
    line: Option<u64>,
    msg: &Message,
    error: &str,
    class: &str,
    reason: &str,
    attempts: Value,
) -> Value {
    let mut obj = Map::new();
    obj.insert("line".into(), json!(line));
    obj.insert("destination".into(), json!(msg.destination().as_str()));
    put_bytes(&mut obj, "payload", msg.payload());
    match msg.key() {
        Some(k) => put_bytes(&mut obj, "key", k),
        None => {
            obj.insert("key".into(), Value::Null);
        }
    }
    let mut headers = Map::new();
    let mut headers_b64 = Map::new();
    for h in msg.headers() {
        match std::str::from_utf8(&h.value) {
            Ok(v) => headers.insert(h.name.clone(), json!(v)),
            Err(_) => headers_b64.insert(h.name.clone(), json!(base64::encode(&h.value))),
        };
    }
    obj.insert("headers".into(), Value::Object(headers));
    if !headers_b64.is_empty() {
        obj.insert("headers_base64".into(), Value::Object(headers_b64));
    }
    obj.insert("error".into(), json!(error));
    obj.insert("error_class".into(), json!(class));
    obj.insert("reason".into(), json!(reason));
    obj.insert("attempts".into(), attempts);
    Value::Object(obj)
}

/// The record of an input line that is not a message: the line as read (`input`), and why.
pub(crate) fn malformed_record(line: u64, dest: &Destination, raw: &[u8], error: &str) -> Value {
    let mut obj = Map::new();
    obj.insert("line".into(), json!(line));
    obj.insert("destination".into(), json!(dest.as_str()));
    put_bytes(&mut obj, "input", raw);
    obj.insert("error".into(), json!(error));
    obj.insert("error_class".into(), json!(INPUT_CLASS));
    obj.insert("reason".into(), json!("malformed"));
    obj.insert("attempts".into(), json!(0));
    Value::Object(obj)
}

/// Opens `path` for appending records. A file whose last line was cut short (a write that
/// failed half-way, a full disk) gets its newline first, so that the next record starts a line
/// of its own and stays readable. A new file is its owner's alone (mode 0600, less the umask,
/// on Unix): its records hold the messages' payloads, keys and headers.
fn open_for_records(path: &Path) -> std::io::Result<File> {
    use std::io::{Read, Seek, SeekFrom};
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.create(true).append(true).read(true).open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            file.write_all(b"\n")?;
        }
    }
    Ok(file)
}

/// Appends records to the dead-letter file, creating it with the first one: no failure, no
/// file. If the file cannot be written, the records go to stderr instead (nothing is lost) and
/// the error is kept for the exit status. Each record is written as it comes, unbuffered: a
/// record is either in the file or on stderr, even if a write fails or the process is ended.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    error: Option<String>,
}

impl DeadLetter {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            file: None,
            written: 0,
            error: None,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Records written (to the file or, after an error, to stderr).
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Why the file could not be written, if it could not.
    pub(crate) fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub(crate) fn write(&mut self, record: &Value) {
        self.written += 1;
        if self.error.is_none() {
            if self.file.is_none() {
                match open_for_records(&self.path) {
                    Ok(f) => self.file = Some(f),
                    Err(e) => self.fail(format!("cannot open {}: {e}", self.path.display())),
                }
            }
            if let Some(file) = &mut self.file {
                if let Err(e) = file.write_all(format!("{record}\n").as_bytes()) {
                    self.fail(format!("cannot write {}: {e}", self.path.display()));
                } else {
                    return;
                }
            }
        }
        // Not eprintln!: a closed stderr must not panic the run (records still count, and the
        // exit status says the file could not be written).
        let _stderr_gone = writeln!(std::io::stderr(), "dead-letter: {record}");
    }

    fn fail(&mut self, error: String) {
        tracing::error!(
            path = %self.path.display(),
            error = %error,
            records = self.written,
            "the dead-letter file cannot be written: its records go to stderr"
        );
        let _stderr_gone = writeln!(
            std::io::stderr(),
            "error: {error}; dead-letter records go to stderr instead, each line prefixed with `dead-letter: `"
        );
        self.file = None;
        self.error = Some(error);
    }

    /// Closes the file. One line in the log for the run, not one per record.
    pub(crate) fn finish(&mut self) {
        if self.file.is_some() {
            tracing::info!(
                path = %self.path.display(),
                records = self.written,
                "dead-letter records written"
            );
        }
        self.file = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Null;

    #[herald::async_trait]
    impl herald::Transport for Null {
        fn name(&self) -> &'static str {
            "null"
        }
        async fn send_batch(
            &self,
            _: &Destination,
            batch: &[herald::Message],
        ) -> herald::BatchOutcome {
            batch.iter().map(|_| Ok(herald::Ack::default())).collect()
        }
    }

    #[tokio::test]
    async fn failed_record_format() {
        let producer = herald::Producer::builder(Null)
            .max_message_bytes(8)
            .build()
            .expect("producer");
        let msg = herald::Message::new("orders", "payload too long")
            .with_key("k1")
            .with_header("trace", "abc");
        let e = producer.try_send(msg).expect_err("too large");
        let r = failed_record(Some(3), &e);
        assert_eq!(r["line"], json!(3));
        assert_eq!(r["destination"], json!("orders"));
        assert_eq!(r["payload"], json!("payload too long"));
        assert_eq!(r["key"], json!("k1"));
        assert_eq!(r["headers"], json!({"trace": "abc"}));
        assert_eq!(r["error_class"], json!("permanent"));
        assert_eq!(r["reason"], json!("too_large"));
        assert_eq!(r["attempts"], json!(0));
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|s| s.contains("larger than")),
            "{r}"
        );
        let bin = herald::Message::new("orders", vec![0xffu8; 20]);
        let e = producer.try_send(bin).expect_err("too large");
        let r = failed_record(None, &e);
        assert_eq!(r["line"], Value::Null);
        assert_eq!(r["key"], Value::Null);
        assert_eq!(r["payload_base64"], json!(base64::encode(&[0xff; 20])));
        assert!(r.get("payload").is_none());
        // What was written can be read back as input, to send again.
        let again =
            crate::input::parse_jsonl(&Destination::new("orders"), r.to_string().as_bytes())
                .expect("replayable");
        assert_eq!(again.payload().as_ref(), &[0xff; 20][..]);
        producer.close(std::time::Duration::from_secs(1)).await;
    }

    /// Fails the first message of its first call (transiently) and takes the rest; fails
    /// every later call for good.
    struct StoreOnceThenRefuse(std::sync::atomic::AtomicUsize);

    #[herald::async_trait]
    impl herald::Transport for StoreOnceThenRefuse {
        fn name(&self) -> &'static str {
            "store-once"
        }
        async fn send_batch(
            &self,
            _: &Destination,
            batch: &[herald::Message],
        ) -> herald::BatchOutcome {
            let call = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (0..batch.len())
                .map(|i| match (call, i) {
                    (0, 0) => Err(herald::TransportError::transient("lost")),
                    (0, _) => Ok(herald::Ack {
                        partition: Some(2),
                        offset: Some(41),
                        route: Some(1),
                    }),
                    _ => Err(herald::TransportError::permanent("refused")),
                })
                .collect()
        }
    }

    #[tokio::test]
    async fn a_failed_record_says_where_a_stored_copy_is() {
        let producer = herald::Producer::builder(StoreOnceThenRefuse(Default::default()))
            .batching(herald::batch::SizeOrLinger::new(
                2,
                1 << 20,
                std::time::Duration::from_millis(50),
            ))
            .build()
            .expect("producer");
        let report = producer
            .send_all([
                herald::Message::new("t", "a").with_key("k"),
                herald::Message::new("t", "b").with_key("k"),
            ])
            .await
            .wait()
            .await;
        let records: Vec<Value> = report
            .failed
            .iter()
            .map(|e| failed_record(None, e))
            .collect();
        assert_eq!(records.len(), 2, "{records:?}");
        assert!(records[0].get("stored_copy").is_none(), "{}", records[0]);
        assert_eq!(
            records[1]["stored_copy"],
            json!({"partition": 2, "offset": 41, "route": 1}),
            "{}",
            records[1]
        );
        let again =
            crate::input::parse_jsonl(&Destination::new("t"), records[1].to_string().as_bytes())
                .expect("replayable");
        assert_eq!(again.payload().as_ref(), b"b");
        producer.close(std::time::Duration::from_secs(1)).await;
    }

    #[test]
    fn malformed_record_format() {
        let r = malformed_record(
            7,
            &Destination::new("t"),
            b"{bad",
            "line 7: is not valid JSON",
        );
        assert_eq!(
            r,
            json!({"line": 7, "destination": "t", "input": "{bad", "error": "line 7: is not valid JSON",
                   "error_class": "input", "reason": "malformed", "attempts": 0})
        );
        let r = malformed_record(1, &Destination::new("t"), b"\xff", "line 1: is not UTF-8");
        assert_eq!(r["input_base64"], json!("/w=="));
        assert!(r.get("input").is_none());
    }

    #[test]
    fn writes_only_when_something_failed_and_appends() {
        let dir = std::env::temp_dir().join(format!("herald-cli-dl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("dl.jsonl");
        let _absent = std::fs::remove_file(&path);
        let mut dl = DeadLetter::new(&path);
        dl.finish();
        assert!(!path.exists(), "no failure, no file");
        dl.write(&json!({"a": 1}));
        dl.finish();
        let mut dl = DeadLetter::new(&path);
        dl.write(&json!({"b": 2}));
        dl.finish();
        assert_eq!(dl.written(), 1);
        assert!(dl.error().is_none());
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"a\":1}\n{\"b\":2}\n");
        // Records hold payloads: the file it made is its owner's alone (0644 before).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_record_never_continues_a_line_cut_short() {
        let dir = std::env::temp_dir().join(format!("herald-cli-dl-cut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("dl.jsonl");
        // A record whose write failed half-way, in an earlier run.
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").expect("write");
        let mut dl = DeadLetter::new(&path);
        dl.write(&json!({"c": 3}));
        dl.finish();
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"a\":1}\n{\"b\":\n{\"c\":3}\n");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn an_unacknowledged_record_is_valid_input_with_its_reason() {
        let msg = Message::new("orders", "p").with_key("k");
        let r = unacknowledged_record(9, &msg, "not acknowledged");
        assert_eq!(r["line"], json!(9));
        assert_eq!(r["payload"], json!("p"));
        assert_eq!(r["key"], json!("k"));
        assert_eq!(r["reason"], json!("interrupted"));
        assert_eq!(r["error"], json!("line 9: not acknowledged"));
        let back = crate::input::parse_jsonl(&Destination::new("orders"), r.to_string().as_bytes())
            .expect("a record can be sent again");
        assert_eq!(back.payload().as_ref(), b"p");
    }

    #[test]
    fn an_unwritable_file_is_reported() {
        let mut dl = DeadLetter::new("/nonexistent-dir-herald/dl.jsonl");
        dl.write(&json!({"a": 1}));
        assert_eq!(dl.written(), 1);
        assert!(dl.error().is_some_and(|e| e.contains("cannot open")));
    }
}
