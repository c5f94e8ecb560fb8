//! Reading `herald produce`'s input: one message per line, plain (`--format lines`) or a JSON
//! object (`--format jsonl`), from a source whose reading a signal can stop ([`Stoppable`]).

use std::io::{BufRead, Read};

use herald::{Bytes, Destination, Message};
use serde_json::Value;

use crate::base64;

/// How input lines become messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Each line is one payload, sent as its bytes, without a key.
    Lines,
    /// Each line is a JSON object: `payload` (string), optional `key` (string) and `headers`
    /// (object of strings).
    Jsonl,
}

/// One line of input, numbered from 1.
#[derive(Debug)]
pub(crate) enum Item {
    /// A message to send.
    Message { line: u64, msg: Message },
    /// A line that is not a message: its raw bytes and why.
    Malformed {
        line: u64,
        raw: Vec<u8>,
        error: String,
    },
}

/// Fields of a dead-letter record, which `--format jsonl` accepts and ignores so that a
/// dead-letter file can be sent again as it is.
const DEAD_LETTER_FIELDS: &[&str] = &[
    "line",
    "destination",
    "error",
    "error_class",
    "reason",
    "attempts",
    "stored_copy",
];

/// Parses one `--format jsonl` line into a message to `dest`. The error says what is wrong
/// (the caller adds the line number).
pub(crate) fn parse_jsonl(dest: &Destination, raw: &[u8]) -> Result<Message, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "is not UTF-8".to_owned())?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("is not valid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err(format!(
            "is a JSON {}, not an object with a `payload`",
            kind(&value)
        ));
    };
    let string = |field: &str, v: &Value| -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!("`{field}` must be a string, not {}", kind(other))),
        }
    };
    let b64 = |field: &str, v: &Value| -> Result<Vec<u8>, String> {
        base64::decode(&string(field, v)?).map_err(|e| format!("`{field}` {e}"))
    };
    let payload: Bytes = match (obj.get("payload"), obj.get("payload_base64")) {
        (Some(_), Some(_)) => return Err("has both `payload` and `payload_base64`".into()),
        (Some(p), None) => string("payload", p)?.into(),
        (None, Some(p)) => b64("payload_base64", p)?.into(),
        (None, None) => return Err("has no `payload` (a string)".into()),
    };
    let key: Option<Bytes> = match (obj.get("key"), obj.get("key_base64")) {
        (Some(_), Some(_)) => return Err("has both `key` and `key_base64`".into()),
        (Some(Value::Null), None) | (None, Some(Value::Null)) | (None, None) => None,
        (Some(k), None) => Some(string("key", k)?.into()),
        (None, Some(k)) => Some(b64("key_base64", k)?.into()),
    };
    let mut msg = Message::new(dest.clone(), payload);
    if let Some(key) = key {
        msg = msg.with_key(key);
    }
    match obj.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(headers)) => {
            for (name, value) in headers {
                let value = string(&format!("headers.{name}"), value)?;
                msg = msg.with_header(name.clone(), value);
            }
        }
        Some(other) => {
            return Err(format!(
                "`headers` must be an object of strings, not {}",
                kind(other)
            ))
        }
    }
    if let Some(unknown) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "payload" | "payload_base64" | "key" | "key_base64" | "headers"
        ) && !DEAD_LETTER_FIELDS.contains(&k.as_str())
    }) {
        return Err(format!(
            "has an unknown field `{unknown}` (known: payload, key, headers)"
        ));
    }
    Ok(msg)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Bytes of an over-long line kept in its dead-letter record, to recognise it by.
pub(crate) const KEPT_OF_LONG_LINE: usize = 1024;

/// The longest line read whole: longer ones cannot hold a message of `max_message_bytes`
/// (in `jsonl`, JSON escapes take at most six bytes per payload byte), so only their start is
/// kept. Memory stays bounded whatever the input holds, even a file without newlines.
pub(crate) fn line_limit(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(6).saturating_add(64 << 10)
}

/// Reads one line through its `\n` (or to the end of input) into `buf`, keeping at most
/// `limit + 2` bytes of it (room for `\r\n`). `taken` counts the bytes the line took from the
/// input (0 at the end of input), also when a read fails part-way.
fn read_line<R: BufRead>(
    input: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
    taken: &mut u64,
) -> std::io::Result<()> {
    let keep = limit.saturating_add(2);
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(());
        }
        // memchr's vectorised search: a byte-by-byte `position` was half of the reader's work
        // per 100-byte line.
        let (part, ends) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = keep.saturating_sub(buf.len()).min(part.len());
        buf.extend_from_slice(&part[..room]);
        let n = part.len();
        input.consume(n);
        *taken += n as u64;
        if ends {
            return Ok(());
        }
    }
}

/// Reads `input` line by line and hands the items over in chunks: a chunk goes as soon as it is
/// full (512 lines or 1 MiB) or no more input is buffered (so that a slow producer of lines is
/// not kept waiting, and no line read waits for the next one). Returns the number of lines
/// read, or the read error.
///
/// When the source stops ([`Stoppable`]), the lines already taken from it are still handed
/// over, and so is the start of the line it was in (malformed: the rest of it was not read).
///
/// `lines`: every line is a payload (an empty line is an empty payload); `jsonl`: blank lines
/// are skipped. A trailing `\n` or `\r\n` is not part of the line. A line longer than `limit`
/// bytes is malformed, and only its first [`KEPT_OF_LONG_LINE`] bytes are kept.
pub(crate) fn read<R: std::io::Read>(
    mut input: std::io::BufReader<R>,
    format: Format,
    dest: &Destination,
    limit: usize,
    mut emit: impl FnMut(Vec<Item>) -> bool,
) -> std::io::Result<u64> {
    const CHUNK: usize = 512;
    const CHUNK_BYTES: usize = 1 << 20;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut chunk_bytes = 0usize;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut taken = 0;
        let stopped = match read_line(&mut input, &mut buf, limit, &mut taken) {
            Ok(()) => false,
            Err(e) if is_stop(&e) => true,
            Err(e) => return Err(e),
        };
        if taken == 0 {
            break;
        }
        line_no += 1;
        if stopped {
            // Taken from the input, so recorded: nothing read is lost.
            let kept = if buf.len() > limit {
                buf.truncate(KEPT_OF_LONG_LINE);
                format!(" (only its first {KEPT_OF_LONG_LINE} bytes are kept here)")
            } else {
                String::new()
            };
            chunk.push(Item::Malformed {
                line: line_no,
                raw: buf.clone(),
                error: format!(
                    "line {line_no}: herald was interrupted after reading its first {taken} bytes: the rest of the line was not read, and it was not sent{kept}"
                ),
            });
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        let item = if buf.len() > limit {
            buf.truncate(KEPT_OF_LONG_LINE);
            Some(Item::Malformed {
                line: line_no,
                raw: buf.clone(),
                error: format!(
                    "line {line_no}: is {taken} bytes long, more than a line holding a message of --max-message-bytes can be ({limit}): not sent, and only its first {KEPT_OF_LONG_LINE} bytes are kept here"
                ),
            })
        } else {
            match format {
                Format::Lines => Some(Item::Message {
                    line: line_no,
                    msg: Message::new(dest.clone(), Bytes::copy_from_slice(&buf)),
                }),
                Format::Jsonl if buf.iter().all(u8::is_ascii_whitespace) => None,
                Format::Jsonl => Some(match parse_jsonl(dest, &buf) {
                    Ok(msg) => Item::Message { line: line_no, msg },
                    Err(e) => Item::Malformed {
                        line: line_no,
                        raw: buf.clone(),
                        error: format!("line {line_no}: {e}"),
                    },
                }),
            }
        };
        if let Some(item) = item {
            chunk_bytes += buf.len();
            chunk.push(item);
        }
        // A chunk goes out when full, or when no whole line is buffered (the next read may
        // wait): never wait for more input while holding messages (stdin may be a slow pipe, or
        // a terminal), nor lose them to a read error. Skipped blank lines count too: a blank
        // line must not hold back the messages before it.
        let full = chunk.len() >= CHUNK || chunk_bytes >= CHUNK_BYTES;
        if !chunk.is_empty() && (full || memchr::memchr(b'\n', input.buffer()).is_none()) {
            if !emit(std::mem::take(&mut chunk)) {
                return Ok(line_no);
            }
            chunk_bytes = 0;
            chunk.reserve(CHUNK);
        }
    }
    if !chunk.is_empty() {
        emit(chunk);
    }
    Ok(line_no)
}

/// What a read of a [`Stoppable`] source returns once reading is stopped.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reading the input was stopped")
    }
}

impl std::error::Error for Stopped {}

fn is_stop(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Stopped>())
}

/// Waits until `stop` holds true; for ever if it can no longer change.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The input, read so that reading can stop (at a signal) without taking anything it does not
/// hand over: once `stop` holds true no read begins (a read fails with [`Stopped`]), and a
/// pipe's wait for input ends then, having taken nothing. What was read before stays in the
/// reader's buffer, to be handed over ([`read`]).
///
/// A read of a terminal or a socket cannot be ended while it waits ([`Stoppable::may_block`]);
/// a regular file's read never waits for long.
pub(crate) struct Stoppable {
    source: Source,
    stop: tokio::sync::watch::Receiver<bool>,
}

enum Source {
    /// A pipe or FIFO, read through the runtime's reactor so that a wait for input can end.
    #[cfg(unix)]
    Pipe {
        /// Always `Some` until dropped (it is put back in blocking mode then).
        pipe: Option<tokio::net::unix::pipe::Receiver>,
        runtime: tokio::runtime::Handle,
    },
    /// Read directly.
    Direct {
        read: Box<dyn Read + Send>,
        may_block: bool,
    },
}

impl Stoppable {
    /// Standard input. Within the runtime.
    pub(crate) fn stdin(stop: tokio::sync::watch::Receiver<bool>) -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use std::os::fd::AsFd as _;
            // Its own descriptor (of the same open input), to read through the reactor if it
            // is a pipe.
            match std::io::stdin().as_fd().try_clone_to_owned() {
                Ok(fd) => Self::file(std::fs::File::from(fd), stop),
                // No stdin (`<&-`): it reads as empty, as the standard library reads it.
                Err(_) => Ok(Self::direct(std::io::stdin(), false, stop)),
            }
        }
        #[cfg(not(unix))]
        Ok(Self::direct(std::io::stdin(), true, stop))
    }

    /// An opened input file (a FIFO is a pipe). Within the runtime.
    pub(crate) fn file(
        file: std::fs::File,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let kind = file.metadata()?.file_type();
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt as _;
            if kind.is_fifo() {
                // To read directly should the pipe not register with the reactor.
                let direct = file.try_clone()?;
                return Ok(match tokio::net::unix::pipe::Receiver::from_file(file) {
                    Ok(pipe) => Self {
                        source: Source::Pipe {
                            pipe: Some(pipe),
                            runtime: tokio::runtime::Handle::current(),
                        },
                        stop,
                    },
                    Err(_) => Self::direct(direct, true, stop),
                });
            }
            if kind.is_block_device() {
                return Ok(Self::direct(file, false, stop));
            }
        }
        // A regular file's read never waits for long; a terminal's or socket's may.
        Ok(Self::direct(file, !kind.is_file(), stop))
    }

    fn direct(
        read: impl Read + Send + 'static,
        may_block: bool,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            source: Source::Direct {
                read: Box::new(read),
                may_block,
            },
            stop,
        }
    }

    /// Whether a read may wait for ever, a stop notwithstanding (a terminal, a socket, a
    /// device): the reading thread may then never end.
    pub(crate) fn may_block(&self) -> bool {
        match &self.source {
            #[cfg(unix)]
            Source::Pipe { .. } => false,
            Source::Direct { may_block, .. } => *may_block,
        }
    }
}

impl Read for Stoppable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Self { source, stop } = self;
        if *stop.borrow() {
            return Err(std::io::Error::other(Stopped));
        }
        match source {
            #[cfg(unix)]
            Source::Pipe {
                pipe: Some(pipe),
                runtime,
            } => runtime.block_on(async {
                loop {
                    tokio::select! {
                        // A stop wins over input that is ready: nothing is taken after it.
                        biased;
                        () = stopped(stop) => return Err(std::io::Error::other(Stopped)),
                        ready = pipe.readable() => ready?,
                    }
                    match pipe.try_read(buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        done => return done,
                    }
                }
            }),
            #[cfg(unix)]
            Source::Pipe { pipe: None, .. } => Ok(0),
            Source::Direct { read, .. } => read.read(buf),
        }
    }
}

impl Drop for Stoppable {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Source::Pipe { pipe, .. } = &mut self.source {
            // Non-blocking mode belongs to the open pipe, which others may read after herald
            // (`{ herald produce ...; cat; } < fifo`): put it back as it was.
            if let Some(pipe) = pipe.take() {
                let _blocking_again = pipe.into_blocking_fd();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(s: &str) -> Result<Message, String> {
        parse_jsonl(&Destination::new("t"), s.as_bytes())
    }

    #[test]
    fn a_good_line() {
        let m = parse(r#"{"payload":"héllo","key":"k1","headers":{"trace":"abc","n":"1"}}"#)
            .expect("valid");
        assert_eq!(m.payload().as_ref(), "héllo".as_bytes());
        assert_eq!(m.key().map(|k| k.as_ref()), Some(&b"k1"[..]));
        let mut headers: Vec<(&str, &[u8])> = m
            .headers()
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_ref()))
            .collect();
        headers.sort();
        assert_eq!(headers, vec![("n", &b"1"[..]), ("trace", &b"abc"[..])]);
        let m = parse(r#"{"payload":"","key":null,"headers":null}"#).expect("valid");
        assert!(m.payload().is_empty() && m.key().is_none() && m.headers().is_empty());
        let m = parse(r#"{"payload_base64":"AP8=","key_base64":"aw=="}"#).expect("valid");
        assert_eq!(m.payload().as_ref(), &[0u8, 255][..]);
        assert_eq!(m.key().map(|k| k.as_ref()), Some(&b"k"[..]));
    }

    #[test]
    fn a_dead_letter_record_is_valid_input() {
        let m = parse(
            r#"{"line":3,"destination":"t","payload":"p","key":"k","headers":{},"error":"x","error_class":"transient","reason":"delivery_timeout","attempts":2}"#,
        )
        .expect("valid");
        assert_eq!(m.payload().as_ref(), b"p");
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        for (line, expected) in [
            (r#"{"payload": "x""#, "is not valid JSON"),
            ("not json", "is not valid JSON"),
            (r#"["payload"]"#, "is a JSON an array"),
            (r#"{"key":"k"}"#, "has no `payload`"),
            (
                r#"{"payload":5}"#,
                "`payload` must be a string, not a number",
            ),
            (r#"{"payload":"x","key":7}"#, "`key` must be a string"),
            (
                r#"{"payload":"x","headers":{"a":1}}"#,
                "`headers.a` must be a string, not a number",
            ),
            (
                r#"{"payload":"x","headers":["a"]}"#,
                "`headers` must be an object",
            ),
            (r#"{"payload":"x","header":{}}"#, "unknown field `header`"),
            (r#"{"payload":"x","payload_base64":"eA=="}"#, "both"),
            (r#"{"payload_base64":"!!"}"#, "`payload_base64`"),
        ] {
            let e = parse(line).expect_err(line);
            assert!(e.contains(expected), "{line}: {e}");
        }
        let e = parse_jsonl(&Destination::new("t"), b"{\"payload\":\"\xff\"}").expect_err("utf8");
        assert!(e.contains("not UTF-8"), "{e}");
    }

    fn read_all(input: &[u8], format: Format) -> Vec<Item> {
        read_all_within(input, format, line_limit(1 << 20))
    }

    fn read_all_within(input: &[u8], format: Format, limit: usize) -> Vec<Item> {
        let mut items = Vec::new();
        let n = read(
            std::io::BufReader::new(input),
            format,
            &Destination::new("t"),
            limit,
            |chunk| {
                items.extend(chunk);
                true
            },
        )
        .expect("read");
        assert!(n >= items.len() as u64);
        items
    }

    #[test]
    fn lines_keep_bytes_and_number_lines() {
        let items = read_all(b"a\r\n\nb\xff\nlast", Format::Lines);
        let got: Vec<(u64, Vec<u8>)> = items
            .iter()
            .map(|i| match i {
                Item::Message { line, msg } => (*line, msg.payload().to_vec()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, b"a".to_vec()),
                (2, b"".to_vec()),
                (3, b"b\xff".to_vec()),
                (4, b"last".to_vec())
            ]
        );
    }

    /// Hands out `parts` one read at a time, then fails; records how many items had been
    /// emitted when each read began.
    struct Script {
        parts: std::collections::VecDeque<&'static [u8]>,
        emitted: std::rc::Rc<std::cell::Cell<usize>>,
        seen: Vec<usize>,
    }

    impl std::io::Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.seen.push(self.emitted.get());
            match self.parts.pop_front() {
                Some(p) => {
                    buf[..p.len()].copy_from_slice(p);
                    Ok(p.len())
                }
                None => Err(std::io::Error::other("the disk went away")),
            }
        }
    }

    #[test]
    fn whole_lines_go_out_before_a_read_that_may_wait_or_fail() {
        let emitted = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut script = Script {
            parts: [&b"a\nb\nc"[..], b"d\ne"].into(),
            emitted: emitted.clone(),
            seen: Vec::new(),
        };
        let mut items = Vec::new();
        let result = read(
            std::io::BufReader::new(&mut script),
            Format::Lines,
            &Destination::new("t"),
            usize::MAX,
            |chunk| {
                emitted.set(emitted.get() + chunk.len());
                items.extend(chunk);
                true
            },
        );
        assert!(result.is_err());
        // `a` and `b` were out before the read that completed `cd`; `cd` before the failing one.
        assert_eq!(script.seen, vec![0, 2, 3]);
        let lines: Vec<u64> = items
            .iter()
            .map(|i| match i {
                Item::Message { line, .. } => *line,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, vec![1, 2, 3]);
    }

    #[test]
    fn jsonl_skips_blank_lines_and_numbers_malformed_ones() {
        let input = b"{\"payload\":\"a\"}\n\n  \n{\"payload\":\nbad\n{\"payload\":\"b\"}\n";
        let items = read_all(input, Format::Jsonl);
        assert_eq!(items.len(), 4);
        assert!(matches!(&items[0], Item::Message { line: 1, .. }));
        match &items[1] {
            Item::Malformed { line, raw, error } => {
                assert_eq!((*line, raw.as_slice()), (4, &b"{\"payload\":"[..]));
                assert!(error.starts_with("line 4: is not valid JSON"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&items[2], Item::Malformed { line: 5, .. }));
        assert!(matches!(&items[3], Item::Message { line: 6, .. }));
    }

    #[test]
    fn a_blank_line_does_not_hold_back_the_messages_before_it() {
        let emitted = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut script = Script {
            parts: [&b"{\"payload\":\"a\"}\n\n"[..]].into(),
            emitted: emitted.clone(),
            seen: Vec::new(),
        };
        let result = read(
            std::io::BufReader::new(&mut script),
            Format::Jsonl,
            &Destination::new("t"),
            usize::MAX,
            |chunk| {
                emitted.set(emitted.get() + chunk.len());
                true
            },
        );
        assert!(result.is_err());
        // `a` went out before the read that may wait (stdin kept open) or fail.
        assert_eq!(script.seen, vec![0, 1]);
    }

    #[test]
    fn an_over_long_line_is_malformed_and_only_its_start_is_kept() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 5000));
        input.extend(b"\r\nnext\n");
        // Exactly at the limit is still a line.
        input.extend(std::iter::repeat_n(b'y', 2000));
        input.push(b'\n');
        let items = read_all_within(&input, Format::Lines, 2000);
        assert_eq!(items.len(), 4);
        assert!(matches!(&items[0], Item::Message { line: 1, .. }));
        match &items[1] {
            Item::Malformed { line, raw, error } => {
                assert_eq!(*line, 2);
                assert_eq!(raw.len(), KEPT_OF_LONG_LINE);
                assert!(raw.iter().all(|&b| b == b'x'));
                assert!(error.contains("is 5002 bytes long"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&items[2], Item::Message { line: 3, msg } if msg.payload().as_ref() == b"next")
        );
        assert!(matches!(&items[3], Item::Message { line: 4, msg } if msg.payload().len() == 2000));
    }

    /// Hands out `parts` one read at a time, counting the reads.
    struct Parts {
        parts: std::collections::VecDeque<&'static [u8]>,
        reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl std::io::Read for Parts {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p = self.parts.pop_front().unwrap_or_default();
            buf[..p.len()].copy_from_slice(p);
            Ok(p.len())
        }
    }

    #[test]
    fn a_stop_hands_over_what_was_read_and_the_start_of_the_line() {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let parts = Parts {
            parts: [&b"a\nb\npar"[..], b"tial\nc\n"].into(),
            reads: reads.clone(),
        };
        let mut items = Vec::new();
        let result = read(
            std::io::BufReader::new(Stoppable::direct(parts, false, stop_rx)),
            Format::Lines,
            &Destination::new("t"),
            usize::MAX,
            |chunk| {
                items.extend(chunk);
                // The signal comes once `a` and `b` are handed over.
                stop.send_replace(true);
                true
            },
        );
        assert_eq!(result.expect("stopped, not failed"), 3);
        // `tial\nc\n` was never taken from the input.
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        let got: Vec<(u64, Vec<u8>, Option<String>)> = items
            .into_iter()
            .map(|i| match i {
                Item::Message { line, msg } => (line, msg.payload().to_vec(), None),
                Item::Malformed { line, raw, error } => (line, raw, Some(error)),
            })
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].0, got[0].1.as_slice()), (1, &b"a"[..]));
        assert_eq!((got[1].0, got[1].1.as_slice()), (2, &b"b"[..]));
        assert_eq!((got[2].0, got[2].1.as_slice()), (3, &b"par"[..]));
        let error = got[2].2.as_deref().unwrap_or_default();
        assert!(
            error.starts_with("line 3: herald was interrupted after reading its first 3 bytes"),
            "{error}"
        );
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_stop_ends_a_wait_for_a_pipe_and_takes_nothing_after_it() {
        use std::io::{Read as _, Write as _};
        let (tx, rx) = tokio::net::unix::pipe::pipe().expect("pipe");
        let mut tx = std::fs::File::from(tx.into_blocking_fd().expect("fd"));
        let rx = std::fs::File::from(rx.into_blocking_fd().expect("fd"));
        // The same pipe, to see afterwards what was left in it.
        let mut left = rx.try_clone().expect("dup");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let source = Stoppable::file(rx, stop_rx).expect("pipe");
        assert!(!source.may_block());
        let (items_tx, items) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let n = read(
                std::io::BufReader::new(source),
                Format::Lines,
                &Destination::new("t"),
                usize::MAX,
                |chunk| items_tx.send(chunk).is_ok(),
            );
            let _sent = done_tx.send(n);
        });
        tx.write_all(b"one\ntw").expect("write");
        let first = items
            .recv_timeout(Duration::from_secs(10))
            .expect("the whole line is handed over");
        assert!(
            matches!(&first[..], [Item::Message { line: 1, .. }]),
            "{first:?}"
        );
        // The reader now waits for the rest of `two`, which never comes before the signal.
        stop.send_replace(true);
        let n = done
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader ended at the stop");
        assert_eq!(n.expect("stopped, not failed"), 2);
        let rest: Vec<Item> = items.try_iter().flatten().collect();
        assert!(
            matches!(&rest[..], [Item::Malformed { line: 2, raw, .. }] if raw == b"tw"),
            "{rest:?}"
        );
        // Written after the stop, it stays in the pipe for whoever reads it next.
        tx.write_all(b"o\nthree\n").expect("write");
        drop(tx);
        let mut after = Vec::new();
        left.read_to_end(&mut after).expect("read what is left");
        assert_eq!(after, b"o\nthree\n");
    }
}
