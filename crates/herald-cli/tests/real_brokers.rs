//! The `herald` binary against real brokers: run deliberately by `cargo xtask it`, which sets
//! `HERALD_KAFKA_BOOTSTRAP` (host:port) and `HERALD_AMQP_URL` (amqp://user:pass@host:port/vhost):
//!
//! ```sh
//! HERALD_KAFKA_BOOTSTRAP=127.0.0.1:9092 HERALD_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!   cargo test -p herald-cli --test real_brokers -- --ignored --test-threads=1
//! ```
//!
//! Each test uses its own topic or queue (Kafka topics are created first: Tansu does not create
//! them on first use; AMQP queues are deleted afterwards).

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_paced, assert_same_messages, dead_letters, herald, jsonl_input, produce_jsonl,
    read_back, Read, Scratch,
};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

const LIMIT: Duration = Duration::from_secs(180);

fn kafka_bootstrap() -> String {
    std::env::var("HERALD_KAFKA_BOOTSTRAP").expect(
        "HERALD_KAFKA_BOOTSTRAP is not set: run these tests with `cargo xtask it` (or set it to a broker's host:port)",
    )
}

fn amqp_url() -> String {
    std::env::var("HERALD_AMQP_URL").expect(
        "HERALD_AMQP_URL is not set: run these tests with `cargo xtask it` (or set it to amqp://user:pass@host:port/vhost)",
    )
}

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("herald-cli-{tag}-{}-{nanos}", std::process::id())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn kafka_topic(tag: &str) -> (String, String) {
    let bootstrap = kafka_bootstrap();
    let topic = unique(tag);
    runtime()
        .block_on(herald::kafka::admin::create_topic(&bootstrap, &topic, 3, 1))
        .expect("create topic");
    (bootstrap, topic)
}

#[test]
#[ignore = "needs a Kafka broker: cargo xtask it"]
fn kafka_produce_jsonl_reads_back_the_same() {
    let (bootstrap, topic) = kafka_topic("jsonl");
    let dir = Scratch::new("real-kafka");
    let (text, sent) = jsonl_input(5_000, "real");
    let url = format!("kafka://{bootstrap}/{topic}");
    let run = produce_jsonl(&url, &[], text.as_bytes(), &dir.0, LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    assert_eq!(report["sent"], 5_000, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let got = read_back(&bootstrap, &topic, 5_000, Duration::from_secs(60));
    assert_same_messages(&sent, &got);
    for r in &got {
        assert!(r.headers.iter().any(|(k, _)| k == "seq"), "{r:?}");
    }
}

#[test]
#[ignore = "needs a Kafka broker: cargo xtask it"]
fn kafka_produce_lines_and_a_malformed_jsonl_line() {
    let (bootstrap, topic) = kafka_topic("malformed");
    let dir = Scratch::new("real-kafka-malformed");
    let url = format!("kafka://{bootstrap}/{topic}");
    // Lines first.
    let lines: Vec<(Option<String>, String)> =
        (0..100).map(|i| (None, format!("plain {i}"))).collect();
    let text: String = lines.iter().map(|(_, p)| format!("{p}\n")).collect();
    let run = herald(
        &["produce", "--to", &url, "--report", "json"],
        Some(text.as_bytes()),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.report()["sent"], 100);
    // Then JSONL with line 2 broken.
    let (text, sent) = jsonl_input(5, "m");
    let mut input: Vec<&str> = text.lines().collect();
    input[1] = "{not json";
    let input = input.join("\n");
    let run = produce_jsonl(
        &url,
        &["--dead-letter", "dl.jsonl"],
        input.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let report = run.report();
    assert_eq!(
        (report["sent"].as_u64(), report["malformed"].as_u64()),
        (Some(4), Some(1)),
        "{report}"
    );
    let records = dead_letters(&dir.path("dl.jsonl"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["line"], 2);
    assert_eq!(records[0]["input"], "{not json");
    let mut expected = lines;
    expected.extend(
        sent.into_iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, s)| s),
    );
    let got = read_back(&bootstrap, &topic, expected.len(), Duration::from_secs(60));
    assert_same_messages(&expected, &got);
}

#[test]
#[ignore = "run with the real-broker tests: cargo xtask it"]
fn kafka_unreachable_broker_dead_letters_everything() {
    let dir = Scratch::new("real-kafka-down");
    let (text, _) = jsonl_input(10, "down");
    let run = produce_jsonl(
        "kafka://127.0.0.1:9/t",
        &["--delivery-timeout-ms", "1500"],
        text.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.report()["failed"], 10);
    assert_eq!(
        dead_letters(&dir.path("herald-dead-letter.jsonl")).len(),
        10
    );
}

/// Reads up to `expected` messages from `queue` with basic.get (acknowledging them), waiting at
/// most `within` for them to arrive.
async fn amqp_read(conn: &Connection, queue: &str, expected: usize, within: Duration) -> Vec<Read> {
    let ch = conn.create_channel().await.expect("channel");
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while got.len() < expected && Instant::now() < deadline {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            Some(m) => {
                let d = &m.delivery;
                let mut key = None;
                let mut headers = Vec::new();
                if let Some(h) = d.properties.headers() {
                    for (k, v) in h.inner() {
                        let bytes = match v {
                            AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                            other => format!("{other:?}").into_bytes(),
                        };
                        if k.as_str() == "x-herald-key" {
                            key = Some(bytes);
                        } else {
                            headers.push((k.as_str().to_owned(), bytes));
                        }
                    }
                }
                got.push(Read {
                    key,
                    payload: d.data.clone(),
                    headers,
                });
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    ch.close(200, "OK".into()).await.expect("close");
    got
}

/// How many messages `queue` holds (a passive declare).
async fn queue_length(conn: &Connection, queue: &str) -> usize {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    ch.close(200, "OK".into()).await.expect("close");
    q.message_count() as usize
}

/// Whether `queue` exists (a passive declare answers, rather than closing the channel with 404).
async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let found = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    match found {
        Ok(_) => {
            ch.close(200, "OK".into()).await.expect("close");
            true
        }
        Err(e) => {
            assert!(e.to_string().contains("NOT_FOUND"), "{queue}: {e}");
            false
        }
    }
}

async fn delete_queue(conn: &Connection, queue: &str) {
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
    ch.close(200, "OK".into()).await.expect("close");
}

fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

/// A connection to RabbitMQ at `url`, for reading queues back and cleaning up.
fn rabbit(rt: &tokio::runtime::Runtime, url: &str) -> Connection {
    within(
        rt,
        "connecting to RabbitMQ",
        Connection::connect(url, ConnectionProperties::default()),
    )
    .expect("connect")
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Runs `f` on `rt`, failing the test after 90 s: a broker that accepts connections and never
/// answers must fail the test, not hang the run.
fn within<F: std::future::Future>(rt: &tokio::runtime::Runtime, what: &str, f: F) -> F::Output {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(90), f).await })
        .unwrap_or_else(|_| panic!("{what}: no answer from the broker within 90 s"))
}

#[test]
#[ignore = "needs RabbitMQ: cargo xtask it"]
fn amqp_produce_to_a_queue_reads_back_the_same() {
    let url = amqp_url();
    let rt = runtime();
    let conn = rabbit(&rt, &url);
    let queue = unique("q");
    let dir = Scratch::new("real-amqp");
    let (text, sent) = jsonl_input(3_000, "amqp");
    let to = with_query(&url, &format!("queue={queue}"));
    let run = produce_jsonl(&to, &[], text.as_bytes(), &dir.0, LIMIT);
    let got = within(
        &rt,
        "reading the queue back",
        amqp_read(&conn, &queue, 3_000, Duration::from_secs(30)),
    );
    within(&rt, "deleting the queue", delete_queue(&conn, &queue));
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    assert_eq!(report["sent"], 3_000, "{report}");
    assert!(
        !report["destination"]
            .as_str()
            .unwrap_or_default()
            .contains("guest:guest"),
        "the password is not printed: {report}"
    );
    assert_same_messages(&sent, &got);
}

/// Issue 15: `herald bench --baseline` on RabbitMQ runs the raw client twice, with bare payloads
/// and with herald's properties (`message_id`, key header), and reports herald against both.
/// Only herald's messages are in the URL's queue (its warm-up message too): each raw run wrote
/// to a queue of its own, gone once the command ends.
#[test]
#[ignore = "needs RabbitMQ: cargo xtask it"]
fn amqp_bench_baseline_compares_with_the_raw_client_carrying_herald_s_properties() {
    // herald first, then (`--baseline-first`) the raw clients first, on a queue that does not
    // exist yet: herald's transport declares it, the raw clients do not (their mandatory
    // publishes came back unroutable before the command declared it for them).
    for first in [false, true] {
        bench_with_the_raw_client_carrying_herald_s_properties(first);
    }
}

fn bench_with_the_raw_client_carrying_herald_s_properties(first: bool) {
    let url = amqp_url();
    let rt = runtime();
    let conn = rabbit(&rt, &url);
    let queue = unique("bench");
    let dir = Scratch::new("real-amqp-bench");
    let to = with_query(&url, &format!("queue={queue}"));
    let args = ["bench", "--to", &to, "--messages", "2000", "--size", "100"];
    let more = ["--baseline", "--naive-messages", "50", "--report", "json"];
    let mut all = [&args[..], &more[..]].concat();
    if first {
        all.push("--baseline-first");
    }
    let run = herald(&all, None, &dir.0, LIMIT);
    let stored = within(&rt, "counting the queue", queue_length(&conn, &queue));
    within(&rt, "deleting the queue", delete_queue(&conn, &queue));
    for tag in ["raw", "alike", "naive"] {
        let own = format!("{queue}.herald-bench-{tag}");
        let exists = within(
            &rt,
            "looking for the raw run's queue",
            queue_exists(&conn, &own),
        );
        if exists {
            within(
                &rt,
                "deleting the raw run's queue",
                delete_queue(&conn, &own),
            );
        }
        assert!(!exists, "the raw run's queue {own} is still there: {run:?}");
    }
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    let rate = |name: &str| {
        report[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: {report}"))
    };
    let (herald_rate, like) = (
        rate("herald_msgs_per_sec"),
        rate("raw_like_herald_msgs_per_sec"),
    );
    assert!(like > 0.0, "{report}");
    let ratio = rate("herald_vs_raw_like_herald");
    // The report rounds to three decimals.
    assert!((ratio - herald_rate / like).abs() <= 6e-4, "{report}");
    assert!(run.stdout.contains("raw alike"), "{}", run.stdout);
    assert_eq!(stored, 1 + 2_000, "messages in herald's queue: {report}");
}

/// `herald bench --baseline` to RabbitMQ prints no `ERROR` from lapin. The raw baselines used
/// to drop their channels open: lapin then closed them in the background, and when that met the
/// connection's close it logged "Connection error: invalid channel state: Closing" (or
/// "invalid connection state: Closed") in the middle of the output, about two lines a run.
/// Four short throughput runs and one at a fixed rate (its raw client is another baseline),
/// each on a queue of its own.
#[test]
#[ignore = "needs RabbitMQ: cargo xtask it"]
fn amqp_bench_baseline_prints_no_error_from_the_raw_clients() {
    let url = amqp_url();
    let rt = runtime();
    let conn = rabbit(&rt, &url);
    let dir = Scratch::new("real-amqp-bench-quiet");
    let throughput = ["--messages", "500", "--naive-messages", "20"];
    let rate = [
        "--messages",
        "500",
        "--rate",
        "1000",
        "--naive-messages",
        "20",
    ];
    let runs: [&[&str]; 5] = [&throughput, &throughput, &throughput, &throughput, &rate];
    for (round, more) in runs.into_iter().enumerate() {
        let queue = unique(&format!("quiet-{round}"));
        let to = with_query(&url, &format!("queue={queue}"));
        let args = ["bench", "--to", &to, "--size", "100", "--baseline"];
        let run = herald(&[&args[..], more].concat(), None, &dir.0, LIMIT);
        within(&rt, "deleting the queue", delete_queue(&conn, &queue));
        assert_eq!(run.code, Some(0), "{run:?}");
        assert!(
            !run.stderr.contains("ERROR"),
            "round {round} ({more:?}): {}",
            run.stderr
        );
    }
}

/// Issue 13: an address list whose first node is dead: every message goes through the next one,
/// and the report names the list without the password.
#[test]
#[ignore = "needs RabbitMQ: cargo xtask it"]
fn amqp_produce_through_an_address_list_whose_first_node_is_dead() {
    let url = amqp_url();
    let dead = closed_port();
    let (userinfo, hosts) = url.split_once('@').expect("the URL has user information");
    let listed = format!("{userinfo}@127.0.0.1:{dead},{hosts}");
    let rt = runtime();
    let conn = rabbit(&rt, &url);
    let queue = unique("list");
    let dir = Scratch::new("real-amqp-list");
    let (text, sent) = jsonl_input(500, "list");
    let to = with_query(&listed, &format!("queue={queue}"));
    let run = produce_jsonl(&to, &[], text.as_bytes(), &dir.0, LIMIT);
    let got = within(
        &rt,
        "reading the queue back",
        amqp_read(&conn, &queue, 500, Duration::from_secs(30)),
    );
    within(&rt, "deleting the queue", delete_queue(&conn, &queue));
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = run.report();
    assert_eq!(report["sent"], 500, "{report}");
    let destination = report["destination"].as_str().unwrap_or_default();
    assert!(
        destination.contains(&format!("127.0.0.1:{dead},")) && !destination.contains("guest:guest"),
        "{report}"
    );
    assert_same_messages(&sent, &got);
}

#[test]
#[ignore = "needs RabbitMQ: cargo xtask it"]
fn amqp_produce_to_an_exchange_with_a_malformed_line() {
    let url = amqp_url();
    let rt = runtime();
    let conn = rabbit(&rt, &url);
    let queue = unique("bound");
    rt.block_on(async {
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        ch.queue_bind(
            queue.as_str().into(),
            "amq.direct".into(),
            queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        ch.close(200, "OK".into()).await.expect("close");
    });
    let dir = Scratch::new("real-amqp-exchange");
    let (text, sent) = jsonl_input(50, "x");
    let mut lines: Vec<&str> = text.lines().collect();
    lines[9] = r#"{"payload": "x", "headers": {"n": 1}}"#;
    let input = lines.join("\n");
    let to = with_query(&url, &format!("exchange=amq.direct&routing_key={queue}"));
    let run = produce_jsonl(
        &to,
        &["--dead-letter", "dl.jsonl"],
        input.as_bytes(),
        &dir.0,
        LIMIT,
    );
    let got = within(
        &rt,
        "reading the queue back",
        amqp_read(&conn, &queue, 49, Duration::from_secs(30)),
    );
    within(&rt, "deleting the queue", delete_queue(&conn, &queue));
    assert_eq!(run.code, Some(1), "{run:?}");
    let report = run.report();
    assert_eq!(
        (report["sent"].as_u64(), report["malformed"].as_u64()),
        (Some(49), Some(1)),
        "{report}"
    );
    let records = dead_letters(&dir.path("dl.jsonl"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["line"], 10);
    let expected: Vec<_> = sent
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 9)
        .map(|(_, s)| s)
        .collect();
    assert_same_messages(&expected, &got);
}

#[test]
#[ignore = "run with the real-broker tests: cargo xtask it"]
fn amqp_unreachable_broker_dead_letters_everything() {
    let dir = Scratch::new("real-amqp-down");
    let (text, sent) = jsonl_input(10, "down");
    let run = produce_jsonl(
        "amqp://guest:s3cretpw@127.0.0.1:9/%2f?queue=nowhere",
        &["--delivery-timeout-ms", "2000"],
        text.as_bytes(),
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.report()["failed"], 10);
    assert!(
        !run.stdout.contains("s3cretpw") && !run.stderr.contains("s3cretpw"),
        "{run:?}"
    );
    let records = dead_letters(&dir.path("herald-dead-letter.jsonl"));
    assert_eq!(records.len(), 10);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["payload"], sent[i].1.as_str(), "{r}");
        assert!(!r.to_string().contains("s3cretpw"), "{r}");
    }
}

/// Waits (at most `within`) until the spool in `dir` holds `n` pending messages, read from
/// outside while the producing process holds it.
fn wait_spooled(dir: &std::path::Path, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let pending = herald::spool::inspect(dir).map_or(0, |i| i.stats.pending_messages);
        if pending >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the spool holds {pending} of {n} messages after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 12: `herald produce --spool` accepts messages while RabbitMQ is unreachable and is
/// killed with SIGKILL; the next run on the same spool, with no input of its own and the broker
/// reachable, delivers every one of them, in per-key order, each once.
#[test]
#[ignore = "needs RabbitMQ: cargo xtask it"]
fn amqp_spool_survives_kill_9_while_the_broker_is_unreachable() {
    spool_kept_while_the_broker_is_unreachable(Stop::Kill);
}

/// Issue 12: an interrupted `herald produce --spool` (SIGINT) with RabbitMQ unreachable leaves
/// what it accepted in the spool and dead-letters none of it (a dead-letter record too would
/// send it twice); the next run delivers all of it, once.
#[test]
#[ignore = "run with the real-broker tests: cargo xtask it"]
fn amqp_spool_keeps_what_an_interrupted_run_did_not_deliver() {
    spool_kept_while_the_broker_is_unreachable(Stop::Interrupt);
}

/// How the first run of [`spool_kept_while_the_broker_is_unreachable`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGKILL, as a crash.
    Kill,
    /// SIGINT, as Ctrl-C: the run ends on its own, after its grace period.
    Interrupt,
}

/// A first `herald produce --spool` accepts 5 000 keyed messages with RabbitMQ unreachable and
/// is stopped by `stop`; a second run, with the broker reachable and no input, delivers every
/// one of them, once, in per-key order, and leaves the spool empty. The first run's buffer is
/// 100 messages: with a spool, reading the input is bounded by the spool, not the buffer.
fn spool_kept_while_the_broker_is_unreachable(stop: Stop) {
    const N: usize = 5_000;
    let url = amqp_url();
    let rt = runtime();
    let conn = rabbit(&rt, &url);
    let queue = unique("spool");
    let dir = Scratch::new("real-amqp-spool");
    let spool = dir.path("spool");
    let spool_arg = spool.to_string_lossy().into_owned();
    let (text, sent) = jsonl_input(N, "spool");
    let input = dir.path("input.jsonl");
    std::fs::write(&input, &text).expect("input file");
    let input_arg = input.to_string_lossy().into_owned();
    let dead = closed_port();
    let (userinfo, _) = url.split_once('@').expect("the URL has user information");
    let unreachable = format!("{userinfo}@127.0.0.1:{dead}/%2f?queue={queue}");
    let mut child = common::spawn(
        &[
            "produce",
            "--to",
            &unreachable,
            "--spool",
            &spool_arg,
            "--buffer-messages",
            "100",
            "--input",
            &input_arg,
            "--format",
            "jsonl",
            "--report",
            "json",
        ],
        &dir.0,
    );
    wait_spooled(&spool, N as u64, Duration::from_secs(60));
    match stop {
        Stop::Kill => {
            child.kill().expect("SIGKILL");
            let killed = child.wait().expect("reaped");
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&killed),
                Some(9),
                "killed by SIGKILL, not ended on its own: {killed:?}"
            );
        }
        Stop::Interrupt => {
            let sent = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .expect("kill -INT");
            assert!(sent.success());
            let run = common::finish(child, LIMIT);
            assert_eq!(run.code, Some(130), "{run:?}");
            let report = run.report();
            assert_eq!(report["kept_in_spool"], N, "{report}");
            assert_eq!(report["failed"], 0, "{report}");
            assert_eq!(report["dead_lettered"], 0, "{report}");
            assert!(
                dead_letters(&dir.path("herald-dead-letter.jsonl")).is_empty(),
                "kept messages were dead-lettered too"
            );
        }
    }

    let empty = dir.path("empty.jsonl");
    std::fs::write(&empty, "").expect("empty input");
    let to = with_query(&url, &format!("queue={queue}"));
    let run = herald(
        &[
            "produce",
            "--to",
            &to,
            "--spool",
            &spool_arg,
            "--input",
            &empty.to_string_lossy(),
            "--format",
            "jsonl",
            "--report",
            "json",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    let got = within(
        &rt,
        "reading the queue back",
        amqp_read(&conn, &queue, N, Duration::from_secs(60)),
    );
    within(&rt, "deleting the queue", delete_queue(&conn, &queue));
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_same_messages(&sent, &got);
    let left = herald::spool::inspect(&spool).expect("inspect");
    assert_eq!(
        left.stats.pending_messages, 0,
        "the spool is empty: {left:?}"
    );
}

/// Issue 12: `herald produce --spool` killed with SIGKILL at several points while it delivers to
/// a live RabbitMQ; see [`spool_survives_kill_9_mid_delivery`].
#[test]
#[ignore = "needs RabbitMQ: cargo xtask it"]
fn amqp_spool_survives_kill_9_mid_delivery() {
    let url = amqp_url();
    let rt = runtime();
    let conn = rabbit(&rt, &url);
    let queue = unique("spool-live");
    let to = with_query(&url, &format!("queue={queue}"));
    spool_survives_kill_9_mid_delivery("amqp", &to, &|| {
        // Everything the queue holds (duplicates included), however long reading it takes: a
        // read cut off by time would miss the copies the later runs sent, at the queue's end.
        let held = within(&rt, "counting the queue", queue_length(&conn, &queue));
        let got = within(
            &rt,
            "reading the queue back",
            amqp_read(&conn, &queue, held, Duration::from_secs(60)),
        );
        within(&rt, "deleting the queue", delete_queue(&conn, &queue));
        assert_eq!(got.len(), held, "every message the queue held was read");
        got
    });
}

/// Issue 12: the same against Kafka, read back to the end of the topic.
#[test]
#[ignore = "needs a Kafka broker: cargo xtask it"]
fn kafka_spool_survives_kill_9_mid_delivery() {
    let (bootstrap, topic) = kafka_topic("spool-live");
    let to = format!("kafka://{bootstrap}/{topic}");
    spool_survives_kill_9_mid_delivery("kafka", &to, &|| {
        let read =
            herald::kafka::admin::read_topic_to_end(&bootstrap, &topic, Duration::from_secs(120))
                .expect("read the topic to its end");
        // With a spool, each record carries its message id, the same on every copy: what a
        // crash sent twice, a consumer can drop.
        let mut ids: std::collections::HashMap<Vec<u8>, Vec<u8>> = Default::default();
        for m in &read {
            let id = m
                .headers()
                .iter()
                .find(|h| h.name == herald::kafka::MESSAGE_ID_HEADER)
                .map(|h| h.value.to_vec())
                .unwrap_or_else(|| panic!("no message id on {:?}", m.payload()));
            let first = ids
                .entry(m.payload().to_vec())
                .or_insert_with(|| id.clone());
            assert_eq!(*first, id, "copies of one message carry one id");
        }
        read.into_iter()
            .map(|m| Read {
                key: m.key().map(|k| k.to_vec()),
                payload: m.payload().to_vec(),
                headers: Vec::new(),
            })
            .collect()
    });
}

/// `herald produce --spool --to TO` killed with SIGKILL at three points while it delivers
/// 20 000 keyed messages (once 2 000, 8 000 and 14 000 have left the spool, delivered, as far
/// as the runs get); after each kill the next run, with no input, sends what was left.
/// What `read_all` then finds is, per key, the input's order of first copies, with no message
/// missing before the last one that arrived (every accepted message comes before any that was
/// not read yet), and the spool is empty.
fn spool_survives_kill_9_mid_delivery(tag: &str, to: &str, read_all: &dyn Fn() -> Vec<Read>) {
    const N: usize = 20_000;
    let dir = Scratch::new(&format!("real-{tag}-spool-live"));
    let spool = dir.path("spool");
    let spool_arg = spool.to_string_lossy().into_owned();
    let (text, sent) = jsonl_input(N, "live");
    let input = dir.path("input.jsonl");
    std::fs::write(&input, &text).expect("input file");
    let empty = dir.path("empty.jsonl");
    std::fs::write(&empty, "").expect("empty input");
    let mut kills = 0;
    // Killed in the middle of delivering: once this many have left the spool (delivered).
    for (round, gone) in [(0, 2_000), (1, 8_000), (2, 14_000)] {
        let source = if round == 0 { &input } else { &empty };
        let mut child = common::spawn(
            &[
                "produce",
                "--to",
                to,
                "--spool",
                &spool_arg,
                "--input",
                &source.to_string_lossy(),
                "--format",
                "jsonl",
            ],
            &dir.0,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("status").is_none() {
            // Appended (ids are never reused) less pending: what has left the spool.
            let left = herald::spool::inspect(&spool)
                .map_or(0, |i| i.stats.next_id.as_u64() - i.stats.pending_messages);
            if left >= gone {
                child.kill().expect("SIGKILL");
                kills += 1;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {left} of {gone} left the spool after a minute"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let _reaped = child.wait();
    }
    let run = herald(
        &[
            "produce",
            "--to",
            to,
            "--spool",
            &spool_arg,
            "--input",
            &empty.to_string_lossy(),
            "--format",
            "jsonl",
            "--report",
            "json",
        ],
        None,
        &dir.0,
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let got = read_all();
    assert!(kills > 0, "no run was killed: the test proved nothing");
    let position: std::collections::HashMap<&[u8], usize> = sent
        .iter()
        .enumerate()
        .map(|(i, (_, p))| (p.as_bytes(), i))
        .collect();
    let mut first = std::collections::HashSet::new();
    let mut last_of_key: std::collections::HashMap<Option<Vec<u8>>, usize> =
        std::collections::HashMap::new();
    for r in &got {
        let i = *position.get(r.payload.as_slice()).unwrap_or_else(|| {
            panic!(
                "a message never sent: {:?}",
                String::from_utf8_lossy(&r.payload)
            )
        });
        if !first.insert(i) {
            continue;
        }
        if let Some(prev) = last_of_key.insert(r.key.clone(), i) {
            assert!(
                prev < i,
                "key {:?}: first copy of #{i} after #{prev}",
                r.key
            );
        }
    }
    // Every message the spool ever accepted (its record ids are never reused: the next id
    // counts them), which is a prefix of the input, arrived: none lost to a kill, however
    // late in the input.
    let left = herald::spool::inspect(&spool).expect("inspect");
    let accepted = usize::try_from(left.stats.next_id.as_u64()).expect("count");
    assert!(accepted > 0 && accepted <= N, "{accepted} accepted of {N}");
    let missing: Vec<usize> = (0..accepted).filter(|i| !first.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{} of the {accepted} accepted messages never arrived, e.g. #{:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        first.len(),
        accepted,
        "nothing arrived that was not accepted"
    );
    assert_eq!(
        left.stats.pending_messages, 0,
        "the spool is empty: {left:?}"
    );
    eprintln!(
        "{tag} spool kill -9: {kills} kills; {} of {N} messages accepted and delivered ({} arrivals, {} duplicates)",
        first.len(),
        got.len(),
        got.len() - first.len()
    );
}

fn nats_url() -> String {
    std::env::var("HERALD_NATS_URL").expect(
        "HERALD_NATS_URL is not set: run these tests with `cargo xtask it` (or set it to nats://host:port)",
    )
}

/// `herald bench --rate R --baseline` to `to`: herald and the raw client each deliver every
/// message on the schedule, with their percentiles in order.
fn open_loop_with_baseline(to: &str, tag: &str) {
    let dir = Scratch::new(tag);
    let args = ["bench", "--to", to, "--rate", "2000", "--messages", "1000"];
    let more = ["--baseline", "--report", "json"];
    let run = herald(&[&args[..], &more[..]].concat(), None, &dir.0, LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_paced(&run.report(), 1000);
}

/// Runs `body` with the URL of a fresh NATS stream's subject, and returns how many messages
/// the stream held after it (the stream is deleted).
fn in_a_nats_stream(tag: &str, body: impl FnOnce(&str)) -> u64 {
    let url = nats_url();
    let rt = runtime();
    let config =
        herald::nats::NatsConfig::from_url(&format!("{url}/herald.cli.probe")).expect("url");
    let scratch = within(
        &rt,
        "creating the stream",
        herald_nats::baseline::fresh_stream(&config, tag),
    )
    .expect("stream");
    body(&format!("{url}/{}", scratch.subject));
    let stored = within(
        &rt,
        "reading the stream's state",
        herald_nats::baseline::stream_messages(&config, &scratch.stream),
    );
    within(
        &rt,
        "deleting the stream",
        herald_nats::baseline::delete_stream(&config, &scratch.stream),
    )
    .expect("delete the stream");
    stored.expect("stream state")
}

/// Issue 16: `herald produce` to a NATS JetStream subject: every message acknowledged and in
/// the stream, each once.
#[test]
#[ignore = "needs NATS with JetStream: cargo xtask it"]
fn nats_produce_to_a_stream_stores_every_message_once() {
    let dir = Scratch::new("real-nats");
    let (text, _sent) = jsonl_input(3_000, "nats");
    let mut run = None;
    let stored = in_a_nats_stream("cli", |to| {
        run = Some(produce_jsonl(to, &[], text.as_bytes(), &dir.0, LIMIT));
    });
    let run = run.expect("ran");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.report()["sent"], 3_000, "{run:?}");
    assert_eq!(stored, 3_000, "each message stored once");
}

/// `herald bench --rate --baseline` on NATS: the raw client's messages are in the stream too
/// (herald's and the raw client's, each with its warm-up message).
#[test]
#[ignore = "needs NATS with JetStream: cargo xtask it"]
fn nats_open_loop_bench_runs_herald_and_the_raw_client() {
    let stored = in_a_nats_stream("rate", |to| open_loop_with_baseline(to, "real-nats-rate"));
    assert_eq!(stored, 2 * 1_001);
}

fn redis_url() -> String {
    std::env::var("HERALD_REDIS_URL").expect(
        "HERALD_REDIS_URL is not set: run these tests with `cargo xtask it` (or set it to redis://host:port)",
    )
}

/// Runs `body` with the URL of a fresh Redis stream key, and returns how many entries the
/// stream held after it (the key is deleted).
fn in_a_redis_stream(tag: &str, body: impl FnOnce(&str)) -> u64 {
    let url = redis_url();
    let rt = runtime();
    let config = herald::redis::RedisConfig::from_url(&url).expect("url");
    let key = within(
        &rt,
        "a fresh stream key",
        herald_redis::baseline::fresh_stream(&config, &unique(tag)),
    )
    .expect("stream key");
    body(&format!("{}/{key}", url.trim_end_matches('/')));
    let stored = within(
        &rt,
        "reading the stream's length",
        herald_redis::baseline::stream_len(&config, &key),
    );
    within(
        &rt,
        "deleting the stream",
        herald_redis::baseline::delete_stream(&config, &key),
    )
    .expect("delete the stream");
    stored.expect("XLEN")
}

/// Issue 16: `herald produce` to a Redis stream (approximately trimmed): every message
/// acknowledged and in the stream, each once.
#[test]
#[ignore = "needs Redis: cargo xtask it"]
fn redis_produce_to_a_stream_appends_every_message_once() {
    let dir = Scratch::new("real-redis");
    let (text, _sent) = jsonl_input(3_000, "redis");
    let mut run = None;
    let stored = in_a_redis_stream("cli", |to| {
        let to = format!("{to}?maxlen=1000000");
        run = Some(produce_jsonl(&to, &[], text.as_bytes(), &dir.0, LIMIT));
    });
    let run = run.expect("ran");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.report()["sent"], 3_000, "{run:?}");
    assert_eq!(stored, 3_000, "each message appended once");
}

/// `herald bench --rate --baseline` on Redis: the raw client's entries are in the stream too.
#[test]
#[ignore = "needs Redis: cargo xtask it"]
fn redis_open_loop_bench_runs_herald_and_the_raw_client() {
    let stored = in_a_redis_stream("rate", |to| open_loop_with_baseline(to, "real-redis-rate"));
    assert_eq!(stored, 2 * 1_001);
}

fn mqtt_url() -> String {
    std::env::var("HERALD_MQTT_URL").expect(
        "HERALD_MQTT_URL is not set: run these tests with `cargo xtask it` (or set it to mqtt://host:port)",
    )
}

/// Runs `body` with the URL of a fresh MQTT topic (`herald/cli/{unique}/{leaf}`) that a
/// subscriber listens on from before `body` starts, and returns how many messages it received
/// (waiting up to 60 s for `expected`, then a little more so that extra copies show).
fn on_an_mqtt_topic(leaf: &str, expected: u64, body: impl FnOnce(&str)) -> u64 {
    let url = mqtt_url();
    let rt = runtime();
    let topic = format!("herald/cli/{}/{leaf}", unique("mqtt"));
    let to = format!("{}/{topic}", url.trim_end_matches('/'));
    let config = herald::mqtt::MqttConfig::from_url(&to).expect("url");
    let listener = within(
        &rt,
        "subscribing",
        herald_mqtt::baseline::Listener::start(&config, &topic),
    )
    .expect("subscriber");
    body(&to);
    within(
        &rt,
        "reading back",
        listener.wait_for(expected, Duration::from_secs(60)),
    )
}

/// Issue 16: `herald produce` to an MQTT topic with slashes: every message acknowledged and
/// received, each once, by a subscriber that was there first.
#[test]
#[ignore = "needs an MQTT broker: cargo xtask it"]
fn mqtt_produce_to_a_topic_delivers_every_message_once() {
    let received = on_an_mqtt_topic("readings", 3_000, |to| {
        let dir = Scratch::new("real-mqtt");
        let (text, _sent) = jsonl_input(3_000, "mqtt");
        let run = produce_jsonl(to, &[], text.as_bytes(), &dir.0, LIMIT);
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.report()["sent"], 3_000, "{run:?}");
    });
    assert_eq!(received, 3_000, "each message received once");
}

/// Over MQTT 3.1.1 (`?version=3`), which has no keys, keyed input is sent without its keys
/// (they still order it): every message received once. (The library refuses a keyed message
/// there while its key property is set, and every line was dead-lettered.)
#[test]
#[ignore = "needs an MQTT broker: cargo xtask it"]
fn mqtt_3_produce_sends_keyed_input_without_its_keys() {
    const N: u64 = 500;
    let received = on_an_mqtt_topic("v3", N, |to| {
        let dir = Scratch::new("real-mqtt-v3");
        let text: String = (0..N)
            .map(|i| {
                format!(
                    "{}\n",
                    serde_json::json!({"payload": format!("v3 {i}"), "key": format!("k{}", i % 8)})
                )
            })
            .collect();
        let to = format!("{to}?version=3");
        let run = produce_jsonl(&to, &[], text.as_bytes(), &dir.0, LIMIT);
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.report()["sent"], N, "{run:?}");
    });
    assert_eq!(received, N, "each message received once");
}

/// `herald bench --rate --baseline` on MQTT: the raw client's messages arrive too, each once,
/// at a subscriber that was there first.
#[test]
#[ignore = "needs an MQTT broker: cargo xtask it"]
fn mqtt_open_loop_bench_runs_herald_and_the_raw_client() {
    let received = on_an_mqtt_topic("paced", 2 * 1_001, |to| {
        open_loop_with_baseline(to, "real-mqtt-rate");
    });
    assert_eq!(
        received,
        2 * 1_001,
        "herald's and the raw client's, each once"
    );
}
