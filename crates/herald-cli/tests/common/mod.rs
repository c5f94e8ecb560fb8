//! Helpers shared by the hermetic CLI tests and the real-broker ones: run the built `herald`
//! binary, scratch folders, read a Kafka topic back.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

/// A scratch folder, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "herald-cli-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _removed = std::fs::remove_dir_all(&self.0);
    }
}

/// What a run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The last line of stdout, parsed as the `--report json` object.
    pub fn report(&self) -> Value {
        let last = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {last:?}\n{self:?}"))
    }
}

/// Starts `herald args...` in `cwd`, its stdin, stdout and stderr piped.
pub fn spawn(args: &[&str], cwd: &Path) -> Child {
    spawn_with_stdin(args, cwd, Stdio::piped())
}

/// [`spawn`] with this stdin (a file, a socket).
pub fn spawn_with_stdin(args: &[&str], cwd: &Path, stdin: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .current_dir(cwd)
        // herald's default log filter, whatever the caller's environment says (a test of what
        // it logs must not pass because `RUST_LOG` hid it).
        .env_remove("RUST_LOG")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herald")
}

/// Waits for `child` at most `limit`; kills it and fails the test after that.
pub fn finish(child: Child, limit: Duration) -> Run {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _sent = tx.send(child.wait_with_output());
    });
    let out: Output = match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for herald"),
        Err(_) => {
            let _killed = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("herald (pid {pid}) did not finish within {limit:?}");
        }
    };
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `herald args...` in `cwd` with `stdin` as its input (none: at once at its end), and
/// waits for it (at most `limit`).
pub fn herald(args: &[&str], stdin: Option<&[u8]>, cwd: &Path, limit: Duration) -> Run {
    let mut child = spawn(args, cwd);
    let pipe = child.stdin.take().expect("stdin");
    let input = stdin.unwrap_or_default().to_vec();
    // Written from a thread, so that a full pipe cannot deadlock with a full stdout; the pipe
    // closes when the thread ends.
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let _written = pipe.write_all(&input);
    });
    finish(child, limit)
}

/// The dead-letter records in `path` (none if the file does not exist).
pub fn dead_letters(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).expect("dead-letter line is JSON"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// One message read back from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Everything in `topic`, partition by partition in offset order, once `expected` messages are
/// there or `limit` has passed.
pub fn read_back(bootstrap: &str, topic: &str, expected: usize, limit: Duration) -> Vec<Read> {
    herald::kafka::admin::read_topic(bootstrap, topic, expected, limit)
        .expect("read the topic back")
        .into_iter()
        .map(|m| Read {
            key: m.key().map(|k| k.to_vec()),
            payload: m.payload().to_vec(),
            headers: m
                .headers()
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
        })
        .collect()
}

/// Asserts that `got` holds exactly the payloads `sent` (as a multiset), and that messages
/// with the same key are in sending order.
pub fn assert_same_messages(sent: &[(Option<String>, String)], got: &[Read]) {
    let mut a: Vec<Vec<u8>> = sent.iter().map(|(_, p)| p.as_bytes().to_vec()).collect();
    let mut b: Vec<Vec<u8>> = got.iter().map(|r| r.payload.clone()).collect();
    a.sort();
    b.sort();
    assert_eq!(
        a.len(),
        b.len(),
        "sent {} messages, read back {}",
        a.len(),
        b.len()
    );
    assert!(a == b, "the payloads read back differ from those sent");
    // Grouped by the key each message was sent with: a key lost on the way must not switch the
    // order check off.
    let sent_key: HashMap<&[u8], Option<&str>> = sent
        .iter()
        .map(|(k, p)| (p.as_bytes(), k.as_deref()))
        .collect();
    let mut by_key: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
    for r in got {
        let key = sent_key[r.payload.as_slice()];
        assert_eq!(
            r.key.as_deref(),
            key.map(str::as_bytes),
            "message {:?} read back with another key",
            String::from_utf8_lossy(&r.payload)
        );
        if let Some(k) = key {
            by_key
                .entry(k.as_bytes().to_vec())
                .or_default()
                .push(r.payload.clone());
        }
    }
    for (key, payloads) in by_key {
        let expected: Vec<Vec<u8>> = sent
            .iter()
            .filter(|(k, _)| k.as_deref().map(str::as_bytes) == Some(key.as_slice()))
            .map(|(_, p)| p.as_bytes().to_vec())
            .collect();
        assert_eq!(
            payloads,
            expected,
            "order of key {:?}",
            String::from_utf8_lossy(&key)
        );
    }
}

/// `n` JSONL lines with keys `k0..k7`, a header, and their (key, payload) pairs.
pub fn jsonl_input(n: usize, tag: &str) -> (String, Vec<(Option<String>, String)>) {
    let mut text = String::new();
    let mut sent = Vec::new();
    for i in 0..n {
        let key = format!("k{}", i % 8);
        let payload = format!("{tag} message {i} \"quoted\" é");
        let line =
            serde_json::json!({"payload": payload, "key": key, "headers": {"seq": i.to_string()}});
        text.push_str(&line.to_string());
        text.push('\n');
        sent.push((Some(key), payload));
    }
    (text, sent)
}

/// `herald produce --to URL --format jsonl --report json EXTRA...` with `input` on stdin, in
/// `cwd`, waited for at most `limit`.
pub fn produce_jsonl(url: &str, extra: &[&str], input: &[u8], cwd: &Path, limit: Duration) -> Run {
    let mut args = vec![
        "produce", "--to", url, "--format", "jsonl", "--report", "json",
    ];
    args.extend_from_slice(extra);
    herald(&args, Some(input), cwd, limit)
}

/// Checks an open-loop `herald bench --rate ... --baseline --report json` report: for herald
/// and the raw client (`raw_`), `sent` messages delivered, none failed, and the percentiles in
/// order.
pub fn assert_paced(report: &Value, sent: u64) {
    assert_eq!(report["mode"], "open_loop", "{report}");
    for prefix in ["", "raw_"] {
        assert_eq!(report[format!("{prefix}sent")], sent, "{report}");
        assert_eq!(report[format!("{prefix}failed")], 0, "{report}");
        let q = |name: &str| {
            report[format!("{prefix}{name}")]
                .as_f64()
                .unwrap_or_else(|| panic!("no {prefix}{name}: {report}"))
        };
        assert!(q("p50_ms") > 0.0, "{report}");
        assert!(q("p50_ms") <= q("p99_ms"), "{report}");
        assert!(q("p99_ms") <= q("p999_ms"), "{report}");
        assert!(q("p999_ms") <= q("max_ms"), "{report}");
    }
}
