//! The `herald` binary end to end, hermetic: librdkafka's mock cluster runs in this test process
//! and the binary reaches it over TCP (its bootstrap address is a kafka:// URL).

mod common;

use std::time::Duration;

use common::{
    assert_paced, assert_same_messages, dead_letters, finish, herald, jsonl_input, produce_jsonl,
    read_back, spawn, spawn_with_stdin, Run, Scratch,
};
use herald::kafka::mock::MockKafka;

const LIMIT: Duration = Duration::from_secs(120);

fn mock_with(topic: &str) -> MockKafka {
    let mock = MockKafka::start(1).expect("mock cluster");
    mock.create_topic(topic, 3).expect("topic");
    mock
}

#[test]
fn demo_succeeds_and_prints_a_summary() {
    let dir = Scratch::new("demo");
    let run = herald(
        &[
            "demo",
            "--messages",
            "5000",
            "--outage-ms",
            "300",
            "--report",
            "json",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    for part in [
        "delivered",
        "failed",
        "retried",
        "per-key order",
        "throughput",
        "latency",
    ] {
        assert!(run.stdout.contains(part), "no `{part}` in {}", run.stdout);
    }
    let report = run.report();
    assert_eq!(report["sent"], 5000, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["order_violations"], 0, "{report}");
    // Order was checked: no violations among nothing compared would prove nothing.
    assert!(
        report["order_checked"].as_u64().is_some_and(|n| n > 1_000),
        "{report}"
    );
    assert!(report["p99_ms"].as_f64().is_some(), "{report}");
}

#[test]
fn produce_lines_to_kafka_delivers_every_line() {
    let mock = mock_with("lines");
    let dir = Scratch::new("lines");
    let sent: Vec<(Option<String>, String)> =
        (0..500).map(|i| (None, format!("line {i}"))).collect();
    let text: String = sent.iter().map(|(_, p)| format!("{p}\n")).collect();
    let input = dir.path("in.txt");
    std::fs::write(&input, text).expect("input");
    let url = format!("kafka://{}/lines", mock.bootstrap_servers());
    let run = herald(
        &[
            "produce",
            "--to",
            &url,
            "--input",
            input.to_str().expect("utf-8"),
            "--report",
            "json",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    assert_eq!(report["sent"], 500, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["malformed"], 0, "{report}");
    for field in ["retries", "elapsed_s", "msgs_per_sec"] {
        assert!(report[field].is_number(), "{field}: {report}");
    }
    assert!(
        !dir.path("herald-dead-letter.jsonl").exists(),
        "no failure, no dead-letter file"
    );
    let got = read_back(
        mock.bootstrap_servers(),
        "lines",
        500,
        Duration::from_secs(30),
    );
    assert!(got.iter().all(|r| r.key.is_none()));
    assert_same_messages(&sent, &got);
}

/// Issue 13: `--fallback`. The primary (a RabbitMQ node that does not exist) never answers;
/// every line lands in the fallback's Kafka topic, nothing lost.
#[test]
fn a_fallback_takes_everything_while_the_primary_is_down() {
    let mock = mock_with("dr");
    let dir = Scratch::new("fallback");
    let (text, sent) = jsonl_input(300, "dr");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let primary = format!("amqp://guest:guest@127.0.0.1:{dead}/%2f?queue=orders");
    let fallback = format!("kafka://{}/dr", mock.bootstrap_servers());
    let run = produce_jsonl(
        &primary,
        &["--fallback", &fallback],
        text.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.report()["sent"], 300, "{}", run.report());
    let got = read_back(mock.bootstrap_servers(), "dr", 300, Duration::from_secs(30));
    assert_same_messages(&sent, &got);
    // The same destination twice is refused, naming it.
    let again = produce_jsonl(&fallback, &["--fallback", &fallback], b"", &dir.0, LIMIT);
    assert_eq!(again.code, Some(2), "{again:?}");
    assert!(again.stderr.contains("same destination"), "{again:?}");
}

#[test]
fn produce_jsonl_from_stdin_keeps_keys_headers_and_order() {
    let mock = mock_with("jsonl");
    let dir = Scratch::new("jsonl");
    let (text, sent) = jsonl_input(2_000, "jsonl");
    let url = format!("kafka://{}/jsonl", mock.bootstrap_servers());
    let run = produce_jsonl(
        &url,
        &["--batch-max-messages", "100"],
        text.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.report()["sent"], 2_000);
    let got = read_back(
        mock.bootstrap_servers(),
        "jsonl",
        2_000,
        Duration::from_secs(30),
    );
    assert_same_messages(&sent, &got);
    for r in &got {
        let seq = r
            .headers
            .iter()
            .find(|(k, _)| k == "seq")
            .expect("seq header");
        let i: usize = String::from_utf8_lossy(&seq.1).parse().expect("number");
        assert_eq!(r.key.as_deref(), Some(format!("k{}", i % 8).as_bytes()));
        assert_eq!(r.payload, sent[i].1.as_bytes());
    }
}

#[test]
fn a_malformed_line_is_dead_lettered_and_the_rest_sent() {
    let mock = mock_with("malformed");
    let dir = Scratch::new("malformed");
    let (text, sent) = jsonl_input(10, "m");
    let mut lines: Vec<&str> = text.lines().collect();
    let bad = r#"{"payload": 42, "key": "k3"}"#;
    lines[3] = bad; // line 4
    let input = lines.join("\n") + "\n";
    let sent: Vec<_> = sent
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, s)| s)
        .collect();
    let url = format!("kafka://{}/malformed", mock.bootstrap_servers());
    let run = produce_jsonl(
        &url,
        &["--dead-letter", "dl.jsonl"],
        input.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let report = run.report();
    assert_eq!(report["sent"], 9, "{report}");
    assert_eq!(report["malformed"], 1, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["dead_letter_file"], "dl.jsonl", "{report}");
    let records = dead_letters(&dir.path("dl.jsonl"));
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["line"], 4, "{r}");
    assert_eq!(r["input"], bad, "{r}");
    assert_eq!(r["error_class"], "input", "{r}");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("line 4") && e.contains("`payload` must be a string")),
        "{r}"
    );
    let got = read_back(
        mock.bootstrap_servers(),
        "malformed",
        9,
        Duration::from_secs(30),
    );
    assert_same_messages(&sent, &got);
}

#[test]
fn an_unreachable_broker_dead_letters_every_message() {
    let dir = Scratch::new("unreachable");
    let (text, sent) = jsonl_input(20, "u");
    let started = std::time::Instant::now();
    let run = produce_jsonl(
        "kafka://127.0.0.1:9/t",
        &[
            "--delivery-timeout-ms",
            "1500",
            "--retry-backoff-ms",
            "50",
            "--retry-backoff-max-ms",
            "200",
        ],
        text.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let report = run.report();
    assert_eq!(report["sent"], 0, "{report}");
    assert_eq!(report["failed"], 20, "{report}");
    let records = dead_letters(&dir.path("herald-dead-letter.jsonl"));
    assert_eq!(records.len(), 20, "{records:?}");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["line"], i as u64 + 1, "{r}");
        assert_eq!(r["payload"], sent[i].1.as_str(), "{r}");
        assert_eq!(r["key"], sent[i].0.as_deref().unwrap_or_default(), "{r}");
        assert_eq!(r["headers"]["seq"], i.to_string(), "{r}");
        assert_eq!(r["error_class"], "transient", "{r}");
        assert!(r["attempts"].as_u64().is_some_and(|a| a >= 1), "{r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    }
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let dir = Scratch::new("usage");
    std::fs::write(dir.0.join("not-a-certificate.pem"), "hello\n").expect("write");
    for (args, expected) in [
        (
            vec!["produce", "--to", "http://h:1/t"],
            "`http` is not kafka, amqp, amqps, nats, tls, redis, rediss, mqtt or mqtts",
        ),
        (
            vec!["produce", "--to", "kafka://h:9092"],
            "topic is missing",
        ),
        (
            vec!["produce", "--to", "amqp://u:p@h/%2f"],
            "names no destination",
        ),
        (
            vec![
                "produce",
                "--to",
                "kafka://h:1/t",
                "--input",
                "no-such-file.txt",
            ],
            "cannot read input file `no-such-file.txt`",
        ),
        (
            vec!["produce", "--to", "kafka://h:1/t", "--max-in-flight", "0"],
            "max_in_flight",
        ),
        (
            vec![
                "produce",
                "--to",
                "kafka://h:1/t",
                "--kafka-property",
                "acks=1",
            ],
            "acks",
        ),
        (
            vec!["produce", "--to", "kafka://h:1/t", "--format", "xml"],
            "xml",
        ),
        (vec!["produce"], "--to"),
        // TLS files that do not exist or do not parse: named by their property.
        (
            vec![
                "produce",
                "--to",
                "kafka://h:1/t",
                "--kafka-property",
                "security.protocol=SSL",
                "--kafka-property",
                "ssl.ca.location=no-such-ca.pem",
            ],
            "ssl.ca.location",
        ),
        (
            vec![
                "produce",
                "--to",
                "kafka://h:1/t",
                "--kafka-property",
                "security.protocol=SSL",
                "--kafka-property",
                "ssl.ca.location=not-a-certificate.pem",
            ],
            "ssl.ca.location",
        ),
        (
            vec![
                "produce",
                "--to",
                "kafka://h:1/t",
                "--kafka-property",
                "security.protocol=SASL_SSL",
                "--kafka-property",
                "sasl.mechanisms=NOPE",
            ],
            "Unsupported SASL mechanism: NOPE",
        ),
    ] {
        let run = herald(&args, None, &dir.0, LIMIT);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
    }
    // The password is never printed, whatever is wrong.
    for url in [
        "amqp://app:hunter2secret@h:port/%2f?queue=q",
        "amqp://app:hunter2secret@h/%2f",
        "amqp://app:hunter2secret@h/%2f?queue=q&bogus=1",
    ] {
        let run = herald(&["produce", "--to", url], None, &dir.0, LIMIT);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(!run.stderr.contains("hunter2secret"), "{}", run.stderr);
        assert!(!run.stdout.contains("hunter2secret"), "{}", run.stdout);
    }
}

#[test]
fn bench_on_the_mock_cluster_reports_herald_raw_and_naive() {
    let dir = Scratch::new("bench");
    // The raw clients after herald, and (`--baseline-first`, which the benchmarks alternate)
    // before it.
    for first in [false, true] {
        let mut args = vec![
            "bench",
            "--messages",
            "5000",
            "--baseline",
            "--naive-messages",
            "50",
            "--report",
            "json",
        ];
        if first {
            args.push("--baseline-first");
        }
        bench_reports_herald_raw_and_naive(&dir, &args, first);
    }
    let run = herald(&["bench", "--baseline-first"], None, &dir.0, LIMIT);
    assert_eq!(
        run.code,
        Some(2),
        "--baseline-first needs --baseline: {run:?}"
    );
}

fn bench_reports_herald_raw_and_naive(dir: &Scratch, args: &[&str], first: bool) {
    let run = herald(args, None, &dir.0, LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    assert_eq!(report["baseline_first"], first, "{report}");
    for field in [
        "herald_msgs_per_sec",
        "p50_ms",
        "p99_ms",
        "raw_best_msgs_per_sec",
        "naive_msgs_per_sec",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|x| x > 0.0),
            "{field}: {report}"
        );
    }
    assert_eq!(report["sent"], 5000, "{report}");
    assert!(
        run.stdout.contains("50 messages (--naive-messages)"),
        "{}",
        run.stdout
    );
}

#[test]
fn bench_with_a_rate_reports_latency_percentiles_for_herald_and_raw_on_one_schedule() {
    let dir = Scratch::new("bench-rate");
    // 2 000 messages at 4 000/s: half a second on a schedule, for each of herald and raw.
    let run = herald(
        &[
            "bench",
            "--rate",
            "4000",
            "--messages",
            "2000",
            "--baseline",
            "--report",
            "json",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_paced(&run.report(), 2000);
    assert!(run.stdout.contains("herald - raw: p50"), "{}", run.stdout);
    // The raw client's schedule first (`--baseline-first`): the same report.
    let run = herald(
        &[
            "bench",
            "--rate",
            "4000",
            "--messages",
            "2000",
            "--baseline",
            "--baseline-first",
            "--report",
            "json",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    assert_paced(&report, 2000);
    assert_eq!(report["baseline_first"], true, "{report}");
}

#[test]
fn bench_refuses_a_rate_it_cannot_keep() {
    let dir = Scratch::new("bench-rate-usage");
    for (args, expected) in [
        (
            &["bench", "--rate", "0"][..],
            "--rate must be a positive number",
        ),
        (
            &["bench", "--rate=-5"][..],
            "--rate must be a positive number",
        ),
        // A schedule beyond the clock's range panicked.
        (&["bench", "--rate", "1e-15"][..], "would run for"),
    ] {
        let run = herald(args, None, &dir.0, LIMIT);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
    }
}

/// One HTTP GET over a plain socket: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to --metrics-addr");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

#[test]
fn produce_serves_metrics_and_health_while_it_runs() {
    use std::io::{BufRead as _, Write as _};
    let (_mock, _dir, mut child, mut stdin) =
        produce_from_open_stdin("observed", &["--metrics-addr", "127.0.0.1:0"]);
    // stderr names the address; read it on a thread so that a silent binary cannot hang us.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _sent = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("herald never said where it serves metrics");
        if let Some(rest) = line.strip_prefix("serving http://") {
            break rest.split('/').next().expect("host:port").to_owned();
        }
    };
    // Input arrives while stdin stays open: the command is still running when scraped.
    for i in 0..100 {
        writeln!(stdin, "observed {i}").expect("write stdin");
    }
    stdin.flush().expect("flush");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, 200);
        if body
            .lines()
            .any(|l| l == "herald_messages_delivered_total{transport=\"kafka\"} 100")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "100 deliveries never showed in /metrics:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http_get(&addr, "/health");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["producers"][0]["name"], "produce", "{health}");
    assert_eq!(health["producers"][0]["transport"], "kafka", "{health}");
    drop(stdin);
    let run = finish(child, LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
}

/// `herald produce` to a fresh topic `topic` of a mock cluster, reporting JSON, with `extra`
/// flags, reading a stdin the test keeps open and writes to.
fn produce_from_open_stdin(
    topic: &str,
    extra: &[&str],
) -> (
    MockKafka,
    Scratch,
    std::process::Child,
    std::process::ChildStdin,
) {
    let mock = mock_with(topic);
    let dir = Scratch::new(topic);
    let url = format!("kafka://{}/{topic}", mock.bootstrap_servers());
    let mut args = vec![
        "produce",
        "--to",
        &url,
        "--report",
        "json",
        "--linger-ms",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut child = spawn(&args, &dir.0);
    let stdin = child.stdin.take().expect("stdin");
    (mock, dir, child, stdin)
}

fn last_line_json(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn complete_lines_are_sent_while_a_partial_line_waits() {
    use std::io::Write as _;
    let (mock, _dir, child, mut stdin) = produce_from_open_stdin("partial", &[]);
    // Two whole lines and the start of a third, in one write: the pipe stays open.
    stdin.write_all(b"one\ntwo\nthr").expect("write stdin");
    stdin.flush().expect("flush");
    let got = read_back(
        mock.bootstrap_servers(),
        "partial",
        2,
        Duration::from_secs(15),
    );
    let early = got.len();
    stdin.write_all(b"ee\n").expect("write stdin");
    drop(stdin);
    let Run {
        code,
        stdout,
        stderr,
    } = finish(child, LIMIT);
    assert_eq!(
        early, 2,
        "the two whole lines were held back while the third was incomplete"
    );
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(last_line_json(&stdout)["sent"], 3, "{stdout}");
}

#[test]
fn ctrl_c_with_stdin_still_open_ends_with_130() {
    use std::io::Write as _;
    let (mock, _dir, child, mut stdin) = produce_from_open_stdin("interrupt", &[]);
    for i in 0..10 {
        writeln!(stdin, "before ctrl-c {i}").expect("write stdin");
    }
    stdin.flush().expect("flush");
    let got = read_back(
        mock.bootstrap_servers(),
        "interrupt",
        10,
        Duration::from_secs(30),
    );
    assert_eq!(got.len(), 10);
    // Ctrl-C while the writer keeps stdin open (a terminal, or a program that outlives it).
    signal(&child, "INT");
    let Run {
        code,
        stdout,
        stderr,
    } = finish(child, Duration::from_secs(30));
    drop(stdin);
    assert_eq!(code, Some(130), "{stdout}\n{stderr}");
    let report = last_line_json(&stdout);
    assert_eq!(report["sent"], 10, "{report}");
    assert_eq!(report["interrupted"], true, "{report}");
    assert_eq!(report["exit_code"], 130, "{report}");
}

#[test]
fn an_unwritable_dead_letter_file_sends_every_record_to_stderr() {
    let dir = Scratch::new("dl-full");
    // Malformed lines only: nothing reaches the (unreachable) broker.
    let input: String = (0..5).map(|i| format!("not json {i}\n")).collect();
    let run = produce_jsonl(
        "kafka://127.0.0.1:9/t",
        &[
            // Opens fine; every write fails (no space left on the device).
            "--dead-letter",
            "/dev/full",
        ],
        input.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    let records: Vec<&str> = run
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("dead-letter: "))
        .collect();
    assert_eq!(records.len(), 5, "{}", run.stderr);
    for (i, r) in records.iter().enumerate() {
        let r: serde_json::Value = serde_json::from_str(r).expect("JSON record");
        assert_eq!(r["line"], i as u64 + 1, "{r}");
    }
    let report = run.report();
    assert_eq!(report["malformed"], 5, "{report}");
    assert_eq!(report["dead_lettered"], 5, "{report}");
    assert_eq!(report["exit_code"], 3, "{report}");
}

#[test]
fn secrets_in_bad_kafka_settings_are_never_printed() {
    let dir = Scratch::new("kafka-secret");
    for args in [
        // `:` instead of `=`.
        vec![
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--kafka-property",
            "sasl.password:hunter2secret",
        ],
        // User information in a kafka:// URL, with a password holding a `/`.
        vec![
            "produce",
            "--to",
            "kafka://app:hunter2/secret@127.0.0.1:9/t",
        ],
    ] {
        let run = herald(&args, None, &dir.0, LIMIT);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
        assert!(!run.stdout.contains("hunter2"), "{}", run.stdout);
    }
}

#[test]
fn huge_numbers_in_flags_do_not_panic() {
    let dir = Scratch::new("huge");
    // Nothing to send: a buffer of any size works.
    let run = herald(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--buffer-messages",
            "18446744073709551615",
            "--report",
            "json",
        ],
        Some(b""),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.report()["sent"], 0);
    let run = herald(
        &["demo", "--keys", "100000000000000", "--messages", "10"],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("--keys"), "{}", run.stderr);
    for command in ["demo", "bench"] {
        let run = herald(
            &[
                command,
                "--size",
                "18446744073709551615",
                "--messages",
                "10",
            ],
            None,
            &dir.0,
            LIMIT,
        );
        assert_eq!(run.code, Some(2), "{command}: {run:?}");
        assert!(run.stderr.contains("--size"), "{command}: {}", run.stderr);
        assert!(
            !run.stderr.contains("panicked"),
            "{command}: {}",
            run.stderr
        );
    }
}

#[test]
fn a_reader_that_closes_stdout_early_does_not_make_herald_panic() {
    let dir = Scratch::new("closed-stdout");
    let mut child = spawn(&["demo", "--messages", "2000", "--outage-ms", "0"], &dir.0);
    // As `herald demo | head -0`: nobody reads the summary.
    drop(child.stdout.take());
    let run = finish(child, LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn produce_with_a_closed_stdout_does_not_panic() {
    let mock = mock_with("closed-stdout-produce");
    let dir = Scratch::new("closed-stdout-produce");
    let url = format!("kafka://{}/closed-stdout-produce", mock.bootstrap_servers());
    let mut child = spawn(&["produce", "--to", &url, "--report", "json"], &dir.0);
    // As `herald produce ... | head -0`: nobody reads the summary.
    drop(child.stdout.take());
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"one\ntwo\n").expect("write stdin");
    drop(stdin);
    let run = finish(child, LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(
        read_back(mock.bootstrap_servers(), "closed-stdout-produce", 2, LIMIT).len(),
        2
    );
}

#[test]
fn a_dead_letter_file_that_is_the_input_is_refused() {
    let dir = Scratch::new("replay-same-file");
    let records = dir.path("dl.jsonl");
    std::fs::write(&records, "{\"payload\":\"p\",\"line\":1}\n").expect("write");
    let run = herald(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--format",
            "jsonl",
            "--input",
            "dl.jsonl",
            "--dead-letter",
            "./dl.jsonl",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("is the input file"), "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(&records).expect("read"),
        "{\"payload\":\"p\",\"line\":1}\n",
        "the input is left as it was"
    );
}

/// The same, with the dead-letter file redirected to stdin (`< herald-dead-letter.jsonl`, the
/// default name, in the same folder): refused too. Before, records of what failed were
/// appended to the file being read, with no end.
#[cfg(unix)]
#[test]
fn a_dead_letter_file_on_stdin_is_refused() {
    let dir = Scratch::new("replay-stdin");
    let records = dir.path("herald-dead-letter.jsonl");
    let record = "{\"payload\":\"0123456789abcdef\",\"line\":1}\n";
    std::fs::write(&records, record).expect("write");
    let child = spawn_with_stdin(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--format",
            "jsonl",
            "--max-message-bytes",
            "8",
        ],
        &dir.0,
        std::fs::File::open(&records).expect("open").into(),
    );
    let run = finish(child, LIMIT);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("is the file on stdin"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&records).expect("read"),
        record,
        "the input is left as it was"
    );
}

#[test]
fn sigterm_with_messages_in_flight_records_every_one_and_ends_soon() {
    use std::io::Write as _;
    let dir = Scratch::new("sigterm");
    // An unreachable broker: every message stays in flight until its delivery timeout (120 s).
    let mut child = spawn(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--report",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &dir.0,
    );
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _sent = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("herald never said where it serves metrics");
        if let Some(rest) = line.strip_prefix("serving http://") {
            break rest.split('/').next().expect("host:port").to_owned();
        }
    };
    let mut stdin = child.stdin.take().expect("stdin");
    for i in 0..20 {
        writeln!(stdin, "in flight {i}").expect("write stdin");
    }
    stdin.flush().expect("flush");
    // Every line accepted by the producer (stdin stays open, as from a terminal).
    metrics_until(&addr, "20 messages accepted", |body| {
        body.lines()
            .any(|l| l == "herald_messages_accepted_total{transport=\"kafka\"} 20")
    });
    let signalled = std::time::Instant::now();
    signal(&child, "TERM");
    let run = finish(child, Duration::from_secs(60));
    drop(stdin);
    let took = signalled.elapsed();
    assert_eq!(run.code, Some(130), "{run:?}");
    // 5 s of grace and a moment to close: not the 120 s delivery timeout.
    assert!(took < Duration::from_secs(30), "took {took:?} to stop");
    let report = last_line_json(&run.stdout);
    assert_eq!(report["sent"], 0, "{report}");
    assert_eq!(report["failed"], 20, "{report}");
    let records = dead_letters(&dir.path("herald-dead-letter.jsonl"));
    let lines: Vec<u64> = records
        .iter()
        .map(|r| r["line"].as_u64().expect("line"))
        .collect();
    assert_eq!(lines, (1..=20).collect::<Vec<u64>>(), "{records:?}");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["payload"], format!("in flight {i}"), "{r}");
        assert!(
            r["reason"] == "interrupted" || r["reason"] == "closed",
            "{r}"
        );
    }
    let interrupted = records
        .iter()
        .filter(|r| r["reason"] == "interrupted")
        .count();
    assert!(interrupted > 0, "none was in flight: {records:?}");
    assert_eq!(report["in_flight_at_exit"], interrupted, "{report}");
}

/// `--spool-max-bytes` sets the spool's size limit (the command had no way to, while the
/// runbook says to raise it), and only with `--spool`.
#[cfg(unix)]
#[test]
fn the_spool_s_size_limit_is_set_with_spool_max_bytes() {
    let dir = Scratch::new("spool-max");
    let spool_arg = dir.path("spool").to_string_lossy().into_owned();
    let run = herald(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--spool-max-bytes",
            "1048576",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("--spool"), "{}", run.stderr);
    let (stdin, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let mut child = spawn_with_stdin(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--spool",
            &spool_arg,
            "--spool-max-bytes",
            "1048576",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &dir.0,
        std::os::fd::OwnedFd::from(theirs).into(),
    );
    let addr = served_at(&mut child);
    metrics_until(&addr, "the spool's limit of 1 MiB", |body| {
        body.lines().any(|l| l == "herald_spool_max_bytes 1048576")
    });
    signal(&child, "INT");
    let run = finish(child, Duration::from_secs(60));
    drop(stdin);
    assert_eq!(run.code, Some(130), "{run:?}");
}

/// Messages recovered from the spool that fail (here: the broker unreachable, a 1 s delivery
/// timeout) are nobody's to hear of but the close's report. A signal that closes the producer
/// must record them in the dead-letter file: before, its close's report was dropped, and with
/// it the messages left the spool with no record (0 of 20 in the dead-letter file).
#[cfg(unix)]
#[test]
fn a_signal_records_the_spool_s_recovered_messages_that_failed() {
    use herald::spool::{Spool, SpoolConfig};
    use herald::Message;
    let dir = Scratch::new("signal-recovered");
    let spool_dir = dir.path("spool");
    {
        let (spool, _) = Spool::open(SpoolConfig::new(&spool_dir)).expect("spool");
        spool
            .append_all(
                &(0..20)
                    .map(|i| Message::new("t", format!("recovered {i}")))
                    .collect::<Vec<_>>(),
            )
            .expect("append");
    }
    let spool_arg = spool_dir.to_string_lossy().into_owned();
    // stdin is a socket the test keeps open, as under `ssh host herald ...`: the run goes on
    // until the signal, and after it herald gives the blocked reader half a second before it
    // closes the producer itself, so that the signal's own close comes first.
    let (stdin, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let mut child = spawn_with_stdin(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--spool",
            &spool_arg,
            "--delivery-timeout-ms",
            "1000",
            "--report",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &dir.0,
        std::os::fd::OwnedFd::from(theirs).into(),
    );
    let addr = served_at(&mut child);
    metrics_until(&addr, "the 20 recovered messages failed", |body| {
        let failed: f64 = body
            .lines()
            .filter(|l| l.starts_with("herald_messages_failed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        failed >= 20.0
    });
    signal(&child, "INT");
    let run = finish(child, Duration::from_secs(60));
    drop(stdin);
    assert_eq!(run.code, Some(130), "{run:?}");
    let records = dead_letters(&dir.path("herald-dead-letter.jsonl"));
    let mut payloads: Vec<String> = records
        .iter()
        .map(|r| r["payload"].as_str().unwrap_or_default().to_owned())
        .collect();
    payloads.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("recovered {i}")).collect();
    expected.sort();
    assert_eq!(payloads, expected, "{run:?}");
}

/// A second signal quits at once, without recording what is in flight, but the records herald
/// has already made are written first: lines refused after the first signal wait in memory
/// behind the lines still in flight (the file is in input order). Before, the second signal
/// ended the process with them unwritten: an empty dead-letter file.
#[cfg(unix)]
#[test]
fn a_second_signal_still_writes_the_records_already_made() {
    use std::io::Write as _;
    let dir = Scratch::new("second-signal");
    let mut child = spawn(
        &[
            "produce",
            "--to",
            "kafka://127.0.0.1:9/t",
            "--buffer-messages",
            "10",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &dir.0,
    );
    let addr = served_at(&mut child);
    let mut stdin = child.stdin.take().expect("stdin");
    for i in 0..50 {
        writeln!(stdin, "line {i}").expect("write stdin");
    }
    stdin.flush().expect("flush");
    // Ten in the buffer (the broker unreachable), the rest waiting for room.
    metrics_until(&addr, "10 messages accepted", |body| {
        body.lines()
            .any(|l| l == "herald_messages_accepted_total{transport=\"kafka\"} 10")
    });
    signal(&child, "TERM");
    // The first signal's close refuses the lines waiting for room (counted as failed; their
    // records go to the collector ahead of anything the second signal sends it), while the
    // ten in flight keep its grace (5 s) going.
    metrics_until(&addr, "lines refused after the first signal", |body| {
        body.lines()
            .any(|l| l.starts_with("herald_messages_failed_total") && !l.ends_with(" 0"))
    });
    signal(&child, "TERM");
    let run = finish(child, Duration::from_secs(60));
    drop(stdin);
    assert_eq!(run.code, Some(130), "{run:?}");
    let records = dead_letters(&dir.path("herald-dead-letter.jsonl"));
    assert!(!records.is_empty(), "no record written: {run:?}");
    for r in &records {
        assert!(r["line"].as_u64().is_some_and(|l| l > 10), "{r}");
    }
}

/// Where a running `herald ... --metrics-addr 127.0.0.1:0` serves (it says so on stderr, read
/// on a thread so that a silent binary cannot hang the test).
fn served_at(child: &mut std::process::Child) -> String {
    use std::io::BufRead as _;
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _sent = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("herald never said where it serves metrics");
        if let Some(rest) = line.strip_prefix("serving http://") {
            return rest.split('/').next().expect("host:port").to_owned();
        }
    }
}

/// Waits (at most 60 s) until the /metrics of the herald serving at `addr` satisfies `done`;
/// `what` names the condition in the failure.
fn metrics_until(addr: &str, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(addr, "/metrics");
        if done(&body) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never {what}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `child` the signal `name` (`TERM`, `INT`).
fn signal(child: &std::process::Child, name: &str) {
    let killed = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -{name}");
}

/// After a signal, every line herald took from its input is accounted for: sent, or in the
/// dead-letter file; what it did not take is still in the pipe.
#[cfg(unix)]
#[test]
fn after_a_signal_every_line_taken_from_a_pipe_is_sent_or_recorded() {
    use std::io::{Read as _, Write as _};
    let mock = mock_with("signal-pipe");
    let dir = Scratch::new("signal-pipe");
    // A FIFO rather than an anonymous pipe: what herald leaves in it can be read afterwards.
    let fifo = dir.path("input.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // Opening one end of a FIFO waits for the other.
    let opening = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::File::open(fifo))
    };
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open the FIFO to write");
    let stdin = opening
        .join()
        .expect("opening thread")
        .expect("open the FIFO to read");
    let url = format!("kafka://{}/signal-pipe", mock.bootstrap_servers());
    let mut child = spawn_with_stdin(
        &[
            "produce",
            "--to",
            &url,
            "--report",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &dir.0,
        stdin.into(),
    );
    // `line N` lines, N from 1, faster than herald takes them, until herald is gone (a broken
    // pipe): when the signal comes, herald has read more than it has handed on.
    let writing = std::thread::spawn(move || {
        let mut writer = writer;
        let mut written = Vec::new();
        let mut batch = Vec::new();
        let mut at = 0;
        let mut next = 1u64;
        loop {
            if at == batch.len() {
                batch.clear();
                at = 0;
                for _ in 0..1000 {
                    writeln!(batch, "line {next}").expect("format");
                    next += 1;
                }
            }
            match writer.write(&batch[at..]) {
                Ok(0) => break,
                Ok(n) => {
                    written.extend_from_slice(&batch[at..at + n]);
                    at += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        (writer, written)
    });
    let addr = served_at(&mut child);
    metrics_until(&addr, "2000 messages accepted", |body| {
        body.lines()
            .find_map(|l| l.strip_prefix("herald_messages_accepted_total{transport=\"kafka\"} "))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|accepted| accepted >= 2000)
    });
    signal(&child, "TERM");
    let run = finish(child, Duration::from_secs(60));
    assert_eq!(run.code, Some(130), "{run:?}");
    let (writer, written) = writing.join().expect("writer thread");
    // What herald left in the FIFO (kept while the writer holds it open).
    let mut left = Vec::new();
    let mut rest = std::fs::File::open(&fifo).expect("open the FIFO to read what is left");
    drop(writer);
    rest.read_to_end(&mut left).expect("read what is left");
    let taken = written.len() - left.len();
    assert_eq!(
        &written[taken..],
        &left[..],
        "the FIFO lost or changed bytes"
    );
    let taken = &written[..taken];
    let whole = taken.iter().filter(|&&b| b == b'\n').count() as u64;
    let partial = &taken[taken.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)..];
    let read = whole + u64::from(!partial.is_empty());
    let report = last_line_json(&run.stdout);
    let records = dead_letters(&dir.path("herald-dead-letter.jsonl"));
    let sent = report["sent"].as_u64().expect("sent");
    assert_eq!(
        sent + records.len() as u64,
        read,
        "herald took {whole} whole lines and {} bytes of the next from the pipe, but sent {sent} and recorded {}: {report}",
        partial.len(),
        records.len()
    );
    // Each line exactly once: delivered, or recorded with its line number.
    let line_of = |payload: &str| -> u64 {
        payload
            .strip_prefix("line ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a line of the input: {payload:?}"))
    };
    let delivered = read_back(
        mock.bootstrap_servers(),
        "signal-pipe",
        sent as usize,
        Duration::from_secs(30),
    );
    assert_eq!(delivered.len() as u64, sent);
    let mut lines: Vec<u64> = delivered
        .iter()
        .map(|r| line_of(&String::from_utf8_lossy(&r.payload)))
        .collect();
    for r in &records {
        let line = r["line"].as_u64().expect("line");
        if line <= whole {
            assert_eq!(r["payload"], format!("line {line}"), "{r}");
            assert!(
                r["reason"] == "closed" || r["reason"] == "interrupted",
                "{r}"
            );
        } else {
            // The line herald was reading when the signal came: what it took of it.
            assert_eq!(r["input"], String::from_utf8_lossy(partial).as_ref(), "{r}");
            assert_eq!(r["reason"], "malformed", "{r}");
            assert!(
                r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("interrupted")),
                "{r}"
            );
        }
        lines.push(line);
    }
    lines.sort_unstable();
    assert!(
        lines.iter().copied().eq(1..=read),
        "lines sent or recorded are not each line read once"
    );
    assert_eq!(report["read"], read, "{report}");
    assert_eq!(report["dead_lettered"], records.len(), "{report}");
    assert_eq!(
        report["failed"].as_u64().unwrap_or(0) + report["malformed"].as_u64().unwrap_or(0),
        records.len() as u64,
        "{report}"
    );
}

/// Issue 12: `herald spool status` reads a spool another process (here, this test) has open,
/// without its lock; `herald spool check` finds a damaged record and names where it is;
/// `--repair` cuts a torn tail; a missing spool is a usage error naming it.
#[test]
fn spool_status_and_check_report_what_a_spool_holds() {
    use herald::spool::{Spool, SpoolConfig};
    use herald::Message;
    let dir = Scratch::new("spool-cmd");
    let spool_dir = dir.path("spool");
    let arg = spool_dir.to_string_lossy().into_owned();
    let (spool, _) = Spool::open(SpoolConfig::new(&spool_dir)).expect("spool");
    let ids = spool
        .append_all(
            &(0..10)
                .map(|i| Message::new("t", format!("message {i}")))
                .collect::<Vec<_>>(),
        )
        .expect("append");
    spool.settle_all(&ids[..3]).expect("settle");

    let run = herald(
        &["spool", "status", &arg, "--report", "json"],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    assert_eq!(report["pending_messages"], 7, "{report}");
    assert_eq!(report["segments"], 1, "{report}");
    assert!(
        report["pending_bytes"].as_u64().unwrap_or(0) > 7 * 9,
        "{report}"
    );
    assert!(report["oldest_age_s"].as_f64().is_some(), "{report}");
    assert_eq!(report["lock_pid"], std::process::id(), "{report}");
    drop(spool);

    // One byte of the fifth record's payload flipped: that record is damaged, the rest is not.
    let segment = std::fs::read_dir(&spool_dir)
        .expect("spool dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("segment");
    let at = bytes
        .windows(9)
        .position(|w| w == b"message 4")
        .expect("the fifth record");
    bytes[at] ^= 0xFF;
    // And half a record at the end: a torn write.
    let tail = bytes[..40].to_vec();
    bytes.extend_from_slice(&tail);
    std::fs::write(&segment, &bytes).expect("damage");

    let run = herald(&["spool", "check", &arg], None, &dir.0, LIMIT);
    assert_eq!(run.code, Some(1), "damage found: {run:?}");
    assert!(
        run.stdout.contains("damaged record")
            && run.stdout.contains(&segment.to_string_lossy().into_owned()),
        "names the segment: {run:?}"
    );
    assert!(run.stdout.contains("torn tail"), "{run:?}");
    let run = herald(
        &["spool", "check", &arg, "--repair", "--report", "json"],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let report = run.report();
    assert_eq!(report["repaired"], true, "{report}");
    assert_eq!(report["corrupt_records"], 1, "{report}");
    assert_eq!(
        report["pending_messages"], 6,
        "the damaged one is not pending: {report}"
    );
    let run = herald(
        &["spool", "check", &arg, "--report", "json"],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(
        run.report()["torn_bytes"],
        0,
        "the torn tail was cut: {run:?}"
    );

    let missing = dir.path("no-such-spool");
    let run = herald(
        &["spool", "status", &missing.to_string_lossy()],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("no-such-spool"), "{run:?}");
    // The spool's parent (a wrong path) is no empty spool: a usage error too.
    let parent = dir.0.to_string_lossy().into_owned();
    for command in ["status", "check"] {
        let run = herald(&["spool", command, &parent], None, &dir.0, LIMIT);
        assert_eq!(run.code, Some(2), "{command}: {run:?}");
        assert!(run.stderr.contains("holds no spool"), "{command}: {run:?}");
    }
}

/// Issue 14: the command's own logs (`-v`, `-q`, `--log-format`, `RUST_LOG`), on stderr.
mod logs {
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};

    use super::{finish, mock_with, Run, Scratch, LIMIT};

    /// `herald args...` in `cwd` with `stdin` as its input and `RUST_LOG` as given (removed when
    /// `None`, whatever the environment of the tests holds).
    fn herald_env(args: &[&str], stdin: &[u8], rust_log: Option<&str>, cwd: &Path) -> Run {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match rust_log {
            Some(v) => command.env("RUST_LOG", v),
            None => command.env_remove("RUST_LOG"),
        };
        let mut child = command.spawn().expect("start herald");
        let mut pipe = child.stdin.take().expect("stdin");
        let input = stdin.to_vec();
        std::thread::spawn(move || {
            let _written = pipe.write_all(&input);
        });
        finish(child, LIMIT)
    }

    /// A spool in `dir` holding 7 messages to `t`, one of them damaged (a flipped byte) and
    /// half a record after the last (a torn write): opening it for `herald produce --spool`
    /// logs herald-spool's warning "the spool was damaged".
    fn damaged_spool(dir: &Path) -> String {
        use herald::spool::{Spool, SpoolConfig};
        let (spool, _) = Spool::open(SpoolConfig::new(dir)).expect("spool");
        let ids = spool
            .append_all(
                &(0..10)
                    .map(|i| herald::Message::new("t", format!("message {i}")))
                    .collect::<Vec<_>>(),
            )
            .expect("append");
        spool.settle_all(&ids[..3]).expect("settle");
        drop(spool);
        let segment = std::fs::read_dir(dir)
            .expect("spool dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .expect("a segment");
        let mut bytes = std::fs::read(&segment).expect("segment");
        let at = bytes
            .windows(9)
            .position(|w| w == b"message 4")
            .expect("the fifth record");
        bytes[at] ^= 0xFF;
        let tail = bytes[..40].to_vec();
        bytes.extend_from_slice(&tail);
        std::fs::write(&segment, &bytes).expect("damage");
        dir.to_string_lossy().into_owned()
    }

    /// The stderr lines that hold `needle`.
    fn lines_with<'a>(run: &'a Run, needle: &str) -> Vec<&'a str> {
        run.stderr.lines().filter(|l| l.contains(needle)).collect()
    }

    #[test]
    fn json_logs_are_one_object_per_line_and_quiet_keeps_only_errors() {
        let mock = mock_with("t");
        let dir = Scratch::new("log-format");
        let url = format!("kafka://{}/t", mock.bootstrap_servers());
        let produce = |flags: &[&str], rust_log: Option<&str>, tag: &str| {
            let spool = damaged_spool(&dir.path(tag));
            let mut args = flags.to_vec();
            args.extend(["produce", "--to", &url, "--spool", &spool]);
            let run = herald_env(&args, b"", rust_log, &dir.0);
            assert_eq!(run.code, Some(0), "{flags:?}: {run:?}");
            run
        };
        const WARNING: &str = "the spool was damaged";

        // Text by default: the warning is there, on one line, with its level.
        let run = produce(&[], None, "text");
        let warned = lines_with(&run, WARNING);
        assert_eq!(warned.len(), 1, "{run:?}");
        assert!(warned[0].contains("WARN"), "{run:?}");

        // JSON: every log line is an object with its level, target and fields.
        let run = produce(&["--log-format", "json"], None, "json");
        let warned = lines_with(&run, WARNING);
        assert_eq!(warned.len(), 1, "{run:?}");
        let event: serde_json::Value = serde_json::from_str(warned[0])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", warned[0]));
        assert_eq!(event["level"], "WARN", "{event}");
        assert!(
            event["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("herald_spool")),
            "{event}"
        );
        assert!(
            event["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(WARNING)),
            "{event}"
        );
        assert_eq!(event["fields"]["corrupt_records"], 1, "{event}");
        for line in run.stderr.lines().filter(|l| l.starts_with('{')) {
            let event: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(
                event["level"].is_string() && event["target"].is_string(),
                "{line}"
            );
        }

        // -q (before or after the subcommand): errors only, the warning is gone.
        let run = produce(&["-q"], None, "quiet");
        assert!(lines_with(&run, WARNING).is_empty(), "{run:?}");
        let spool = damaged_spool(&dir.path("quiet-after"));
        let run = herald_env(
            &["produce", "--to", &url, "--spool", &spool, "--quiet"],
            b"",
            None,
            &dir.0,
        );
        assert_eq!(run.code, Some(0), "{run:?}");
        assert!(lines_with(&run, WARNING).is_empty(), "{run:?}");

        // RUST_LOG takes precedence over -q.
        let run = produce(&["-q"], Some("warn"), "rust-log");
        assert_eq!(lines_with(&run, WARNING).len(), 1, "{run:?}");
    }

    #[test]
    fn bad_log_settings_exit_2_and_name_the_problem() {
        let dir = Scratch::new("log-usage");
        // `demo` would run, and succeed, if the bad setting were let through.
        let demo = ["demo", "--messages", "10"];
        let run = herald_env(&demo, b"", Some("herald=notalevel"), &dir.0);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(
            run.stderr.contains("RUST_LOG") && run.stderr.contains("herald=notalevel"),
            "{run:?}"
        );
        assert!(run.stdout.is_empty(), "nothing ran: {run:?}");
        for args in [
            vec!["--log-format", "xml", "demo"],
            vec!["demo", "--log-format", "xml"],
        ] {
            let run = herald_env(&args, b"", None, &dir.0);
            assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
            assert!(
                run.stderr.contains("--log-format") && run.stderr.contains("xml"),
                "{args:?}: {run:?}"
            );
        }
        let run = herald_env(&["-q", "-v", "demo"], b"", None, &dir.0);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("--quiet"), "{run:?}");
    }

    /// Every form a password may take in a log line: as given, percent-encoded, and as the
    /// bytes of a SASL PLAIN response (`\0user\0password`) printed as a list of numbers (the
    /// way lapin's trace events print a frame).
    fn secret_forms(password: &str) -> Vec<String> {
        let bytes: Vec<String> = password.bytes().map(|b| b.to_string()).collect();
        vec![
            password.to_owned(),
            password.replace('2', "%32"),
            bytes.join(", "),
            bytes.join(","),
        ]
    }

    /// An AMQP server that gets as far as the login: it answers the protocol header with
    /// `connection.start` (PLAIN), records what the client sends back (`connection.start-ok`,
    /// which carries the password) and hangs up. The client retries until its delivery
    /// timeout.
    fn login_catcher() -> (u16, Arc<Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            let mut start = vec![0, 10, 0, 10, 0, 9];
            start.extend_from_slice(&0u32.to_be_bytes()); // no server properties
            for s in ["PLAIN", "en_US"] {
                start.extend_from_slice(&(s.len() as u32).to_be_bytes());
                start.extend_from_slice(s.as_bytes());
            }
            let mut frame = vec![1, 0, 0];
            frame.extend_from_slice(&(start.len() as u32).to_be_bytes());
            frame.extend_from_slice(&start);
            frame.push(0xCE);
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _timeout = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut header = [0u8; 8];
                if stream.read_exact(&mut header).is_err() || stream.write_all(&frame).is_err() {
                    continue;
                }
                let mut buf = [0u8; 4096];
                if let Ok(n) = stream.read(&mut buf) {
                    record
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend_from_slice(&buf[..n]);
                }
            }
        });
        (port, seen)
    }

    #[test]
    fn no_password_in_any_log_line_at_the_most_verbose() {
        const PASSWORD: &str = "hunter2secret";
        let (port, seen) = login_catcher();
        let dir = Scratch::new("log-secret");
        let url = format!("amqp://app:{PASSWORD}@127.0.0.1:{port}/%2f?queue=orders");
        for format in ["text", "json"] {
            let run = herald_env(
                &[
                    "-vvv",
                    "--log-format",
                    format,
                    "produce",
                    "--to",
                    &url,
                    "--delivery-timeout-ms",
                    "1500",
                    "--retry-backoff-ms",
                    "50",
                    "--retry-backoff-max-ms",
                    "200",
                ],
                b"one\ntwo\n",
                None,
                &dir.0,
            );
            assert_eq!(run.code, Some(1), "{format}: {run:?}");
            // Something was logged (so the check below looks at log lines), and the client got
            // as far as sending the password.
            assert!(
                run.stderr
                    .lines()
                    .any(|l| l.contains("DEBUG") || l.contains("TRACE")),
                "{format}: nothing logged at -vvv: {run:?}"
            );
            let sent = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            assert!(
                sent.windows(PASSWORD.len())
                    .any(|w| w == PASSWORD.as_bytes()),
                "the login with the password never reached the server: {}",
                String::from_utf8_lossy(&sent)
            );
            for secret in secret_forms(PASSWORD) {
                for (i, line) in run.stderr.lines().enumerate() {
                    assert!(
                        !line.contains(&secret),
                        "{format}: stderr line {i} holds the password as `{secret}`: {line}"
                    );
                }
                assert!(!run.stdout.contains(&secret), "{format}: {}", run.stdout);
            }
        }
    }
}
