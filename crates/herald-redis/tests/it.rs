//! Integration tests against a real Redis (5.0 or later): `cargo xtask it redis`, or
//! `HERALD_REDIS_URL=redis://127.0.0.1:6379 cargo test -p herald-redis --test it --
//! --ignored --test-threads=1`. They fail, saying so, when `HERALD_REDIS_URL` is not set.
//!
//! The server may be shared (the machine's own Redis): every test writes to stream keys of its
//! own, `herald:it:<pid>_<n>_<nanos>:<what>`, and deletes them at the end; nothing is flushed
//! and no setting of that server is changed. Tests that restart a server, or need a password,
//! ACL users or a replica, start their own `redis-server` (see [`OwnServer`]) on a free port
//! with its own folder, and kill it at the end.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::{
    async_trait, Destination, ErrorClass, FailureReason, Message, MessageId, Producer,
    ProducerBuilder, Transport,
};
use herald_redis::{RedisConfig, RedisTransport};
use herald_testkit::checks::{
    assert_complete_in_key_order, cut_twice_mid_run, free_port, RunInParts,
};
use herald_testkit::conformance::{self, Harness, Injected};
use herald_testkit::proxy::FaultProxy;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

fn url() -> String {
    std::env::var("HERALD_REDIS_URL").expect(
        "HERALD_REDIS_URL is not set: run these tests with `cargo xtask it redis` (or set it to redis://host:port)",
    )
}

/// `host:port` of a redis URL (the default port filled in).
fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let auth = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    }
}

/// `url` with its `host:port` replaced by `addr`, and `/path?query` appended.
fn via(url: &str, addr: &str, path: &str) -> String {
    format!(
        "{}{path}",
        url.trim_end_matches('/').replacen(&authority(url), addr, 1)
    )
}

fn uniq() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000);
    format!(
        "{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn quick_retries(b: ProducerBuilder) -> ProducerBuilder {
    b.retry(
        herald_retry::ExponentialRetry::new(herald_retry::Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
        .unlimited_attempts(),
    )
}

/// A raw redis-rs connection for making, reading and deleting test keys.
struct Admin {
    conn: MultiplexedConnection,
    keys: Mutex<Vec<String>>,
}

impl Admin {
    async fn connect(url: &str) -> Self {
        let base = url.split('?').next().unwrap_or(url);
        let client = redis::Client::open(base).expect("admin client");
        // redis-rs's default response timeout (500 ms) is too short for a page of XRANGE on
        // a busy machine.
        let options =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        let conn = tokio::time::timeout(
            Duration::from_secs(30),
            client.get_multiplexed_async_connection_with_config(&options),
        )
        .await
        .expect("admin connection to the test server within 30 s")
        .expect("admin connection to the test server");
        Self {
            conn,
            keys: Mutex::new(Vec::new()),
        }
    }

    /// A new stream key (nothing there yet), deleted at cleanup.
    fn key(&self, hint: &str) -> String {
        let key = format!("herald:it:{}:{hint}", uniq());
        self.adopt(&key);
        key
    }

    fn adopt(&self, key: &str) {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(key.to_owned());
    }

    async fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.conn.clone())
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.args_iter().next()))
    }

    async fn len(&self, key: &str) -> u64 {
        self.cmd(redis::cmd("XLEN").arg(key)).await
    }

    /// Every entry of the stream `key`, as the herald message it stands for: the fields
    /// `payload`, `key`, `id` and `h:NAME`.
    async fn entries(&self, key: &str) -> Vec<Message> {
        let mut out = Vec::new();
        let mut from = "-".to_owned();
        loop {
            let page: Vec<(String, Vec<Vec<u8>>)> = self
                .cmd(
                    redis::cmd("XRANGE")
                        .arg(key)
                        .arg(&from)
                        .arg("+")
                        .arg("COUNT")
                        .arg(2_000),
                )
                .await;
            let Some((last, _)) = page.last() else {
                return out;
            };
            from = format!("({last}");
            for (_, fields) in page {
                out.push(to_message(key, &fields));
            }
        }
    }

    /// Reads `key` until it holds `expected` entries or `within` passed.
    async fn read(&self, key: &str, expected: usize, within: Duration) -> Vec<Message> {
        let deadline = Instant::now() + within;
        while (self.len(key).await as usize) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.entries(key).await
    }

    async fn cleanup(&self) {
        let keys = std::mem::take(
            &mut *self
                .keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for key in keys {
            let _deleted: i64 = self.cmd(redis::cmd("DEL").arg(&key)).await;
        }
    }
}

/// The herald message an entry stands for.
fn to_message(stream: &str, fields: &[Vec<u8>]) -> Message {
    let mut payload = Vec::new();
    let mut key = None;
    let mut id = None;
    let mut headers = Vec::new();
    for pair in fields.chunks(2) {
        let [name, value] = pair else {
            panic!("an odd number of fields in {stream}");
        };
        match name.as_slice() {
            b"payload" => payload = value.clone(),
            b"key" => key = Some(value.clone()),
            b"id" => {
                id = Some(
                    String::from_utf8_lossy(value)
                        .parse::<MessageId>()
                        .expect("a herald id"),
                )
            }
            other => {
                let name = String::from_utf8_lossy(other);
                let name = name.strip_prefix("h:").expect("headers are h:NAME");
                headers.push((name.to_owned(), value.clone()));
            }
        }
    }
    let mut m = Message::new(stream, payload);
    if let Some(k) = key {
        m = m.with_key(k);
    }
    if let Some(id) = id {
        m = m.with_id(id);
    }
    for (n, v) in headers {
        m = m.with_header(n, v);
    }
    m
}

/// The first copy of each message (by its herald id), in stream order: what a reader that
/// drops retried copies sees. Returns them and how many copies were dropped.
fn first_copies(got: Vec<Message>) -> (Vec<Message>, usize) {
    let mut seen = HashSet::new();
    let total = got.len();
    let firsts: Vec<Message> = got
        .into_iter()
        .filter(|m| seen.insert(m.id().expect("every entry has an id")))
        .collect();
    let dropped = total - firsts.len();
    (firsts, dropped)
}

/// The conformance harness: transports connect through a fault proxy, so that faults are real
/// connection cuts; each destination is a stream key of its own.
struct RedisHarness {
    admin: Admin,
    proxy: FaultProxy,
    proxied_url: String,
    /// A key holding a string: XADD to it is refused with WRONGTYPE.
    not_a_stream: String,
}

impl RedisHarness {
    async fn new() -> Self {
        let url = url();
        let proxy = FaultProxy::start(&authority(&url))
            .await
            .expect("fault proxy");
        let proxied_url = via(&url, &proxy.addr().to_string(), "");
        let admin = Admin::connect(&url).await;
        let not_a_stream = admin.key("string");
        let _: () = admin
            .cmd(redis::cmd("SET").arg(&not_a_stream).arg("not a stream"))
            .await;
        Self {
            admin,
            proxy,
            proxied_url,
            not_a_stream,
        }
    }
}

#[async_trait]
impl Harness for RedisHarness {
    type Transport = RedisTransport;

    async fn transport(&self) -> RedisTransport {
        RedisTransport::new(
            RedisConfig::from_url(&self.proxied_url)
                .expect("url")
                .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
        )
        .expect("transport")
    }

    async fn destination(&self, hint: &str) -> Destination {
        herald_redis::stream(&self.admin.key(hint))
    }

    fn poison(&self, destination: &Destination) -> Option<Message> {
        // A key of another type: a permanent WRONGTYPE.
        Some(Message::new(
            herald_redis::stream(&self.not_a_stream),
            format!("poison for {destination}"),
        ))
    }

    async fn read_back(&self, destination: &Destination, expected: usize) -> Option<Vec<Message>> {
        let got = self
            .admin
            .read(destination.as_str(), expected, Duration::from_secs(60))
            .await;
        // Redis has no idempotent producer: a retry after a cut may append a second copy.
        // Readers drop it by the `id` field; the suite checks what they see.
        Some(first_copies(got).0)
    }

    async fn inject_transient_failures(&self, _calls: usize) -> Injected {
        // Every open connection is cut, and reconnecting fails for a second (long enough for the
        // run that follows to meet it on a loaded machine).
        self.proxy.cut_for(Duration::from_secs(1));
        Injected::IntoTransport
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn conformance_suite() {
    let h = RedisHarness::new().await;
    conformance::run(&h).await;
    h.admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn ten_thousand_keyed_messages_read_back_in_per_key_order_with_their_fields() {
    const N: usize = 10_000;
    let admin = Admin::connect(&url()).await;
    let key = admin.key("10k");
    let dest = herald_redis::stream(&key);
    let transport = RedisTransport::new(RedisConfig::from_url(&url()).expect("url")).expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let sent: Vec<Message> = (0..N)
        .map(|i| {
            Message::new(
                dest.clone(),
                format!("payload-{i:05}-{}", "x".repeat(i % 50)),
            )
            .with_key(format!("key-{}", i % 16))
            .with_header("seq", i.to_string())
            .with_header("payload", "a header named payload")
        })
        .collect();
    let report = p.send_all(sent.clone()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, N as u64);
    p.close(Duration::from_secs(30)).await;
    let got = admin.read(&key, N, Duration::from_secs(60)).await;
    assert_eq!(got.len(), N, "exactly N entries, no duplicates, none lost");
    let mut by_key: HashMap<Vec<u8>, Vec<&Message>> = HashMap::new();
    for m in &got {
        by_key
            .entry(m.key().expect("key field").to_vec())
            .or_default()
            .push(m);
    }
    let mut sent_by_key: HashMap<Vec<u8>, Vec<&Message>> = HashMap::new();
    for m in &sent {
        sent_by_key
            .entry(m.key().expect("key").to_vec())
            .or_default()
            .push(m);
    }
    assert_eq!(by_key.len(), 16);
    for (k, want) in &sent_by_key {
        let have = by_key.get(k).expect("every key arrived");
        assert_eq!(have.len(), want.len());
        for (h, w) in have.iter().zip(want) {
            assert_eq!(h.payload(), w.payload(), "payload, in order");
            assert_eq!(
                h.headers(),
                w.headers(),
                "headers as sent, apart from payload"
            );
            assert!(h.id().is_some(), "the herald id as the `id` field");
        }
    }
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn acks_carry_the_entry_id_and_keys_without_a_key_have_no_key_field() {
    let admin = Admin::connect(&url()).await;
    let key = admin.key("ack");
    let transport = RedisTransport::new(RedisConfig::from_url(&url()).expect("url")).expect("t");
    let batch = [
        Message::new(key.as_str(), vec![0u8, 159, 146, 150]),
        Message::new(key.as_str(), "second").with_key(vec![0xffu8]),
    ];
    let out = transport
        .send_batch(&herald_redis::stream(&key), &batch)
        .await;
    let offsets: Vec<i64> = out
        .iter()
        .map(|o| o.as_ref().expect("appended").offset.expect("an offset"))
        .collect();
    assert!(offsets[0] < offsets[1], "{offsets:?}");
    let ids: Vec<(String, Vec<Vec<u8>>)> = admin
        .cmd(redis::cmd("XRANGE").arg(&key).arg("-").arg("+"))
        .await;
    assert_eq!(ids.len(), 2);
    assert_eq!(herald_redis::entry_id(offsets[0]), ids[0].0);
    assert_eq!(herald_redis::entry_id(offsets[1]), ids[1].0);
    assert_eq!(
        ids[0].1,
        [b"payload".to_vec(), vec![0u8, 159, 146, 150]],
        "binary-safe payload, no key field without a key, no id without one"
    );
    assert_eq!(ids[1].1[2..], [b"key".to_vec(), vec![0xffu8]]);
    assert!(transport.is_connected());
    assert_eq!(transport.endpoint(), Some(authority(&url())));
    transport.close().await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn connection_cut_mid_run_loses_nothing_and_keeps_per_key_order() {
    const N: usize = 30_000;
    let url = url();
    let admin = Admin::connect(&url).await;
    let key = admin.key("cut");
    let proxy = FaultProxy::start(&authority(&url)).await.expect("proxy");
    let transport = RedisTransport::new(
        RedisConfig::from_url(&via(&url, &proxy.addr().to_string(), ""))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
    )
    .expect("t");
    let probe = transport.clone();
    let p = quick_retries(Producer::builder(transport))
        // Small batches, so that a cut lands in the middle of the run, not after it.
        .batching(herald_batch::SizeOrLinger::new(
            200,
            1 << 20,
            Duration::from_millis(5),
        ))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    let dest = herald_redis::stream(&key);
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("f-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    // In three parts, a cut between each (see `cut_twice_mid_run`).
    let outstanding = cut_twice_mid_run(&p, &sent, &proxy, || true, Duration::from_secs(180)).await;
    assert!(probe.is_connected(), "connected again");
    let retries = p.stats().totals.retries;
    assert!(retries >= 1, "the cuts cost retries");
    p.close(Duration::from_secs(30)).await;
    let got = admin.read(&key, N, Duration::from_secs(60)).await;
    let stored = got.len();
    let (firsts, copies) = first_copies(got);
    assert_complete_in_key_order("connection cut", &sent, &firsts);
    eprintln!("connection cut ({outstanding:?} outstanding at the cuts): {N} delivered, {stored} entries ({copies} second copies), {retries} retries");
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn an_unreachable_server_hands_every_message_back_by_the_delivery_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!("redis://127.0.0.1:{port}/orders"))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100)),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("producer");
    let started = Instant::now();
    let report = p
        .send_all((0..200).map(|i| {
            Message::new(herald_redis::stream("orders"), format!("u-{i}"))
                .with_key(format!("k{}", i % 4))
        }))
        .await
        .wait()
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "handed back by the delivery timeout, not long after: {:?}",
        started.elapsed()
    );
    assert_eq!(report.delivered, 0);
    assert_eq!(report.failed.len(), 200, "every message handed back");
    for e in &report.failed {
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        assert!(
            matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
            "by the delivery timeout: {e}"
        );
    }
    let last = report.failed[0]
        .reason()
        .transport_error()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(last.contains(&port.to_string()), "says where: {last}");
    p.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn oversized_entries_are_permanent_at_once_and_the_others_go_through() {
    let admin = Admin::connect(&url()).await;
    let key = admin.key("big");
    let transport = RedisTransport::new(RedisConfig::from_url(&url()).expect("url")).expect("t");
    let p = quick_retries(Producer::builder(transport))
        // The producer would take it: the transport's 1 MiB limit refuses it.
        .max_message_bytes(8 << 20)
        .delivery_timeout(Duration::from_secs(60))
        .build()
        .expect("producer");
    let dest = herald_redis::stream(&key);
    let mut msgs: Vec<Message> = (0..20)
        .map(|i| Message::new(dest.clone(), format!("ok-{i}")).with_key(format!("k{}", i % 2)))
        .collect();
    msgs.insert(
        10,
        Message::new(dest.clone(), vec![b'x'; 2 << 20]).with_key("k0"),
    );
    let report = p.send_all(msgs).await.wait().await;
    assert_eq!(
        report.delivered,
        20,
        "the others go through: {:?}",
        report.failed.first()
    );
    assert_eq!(report.failed.len(), 1);
    let e = &report.failed[0];
    assert_eq!((e.class(), e.attempts()), (ErrorClass::Permanent, 1), "{e}");
    assert_eq!(
        e.message().payload().len(),
        2 << 20,
        "the message comes back"
    );
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("PAYLOAD_TOO_LARGE"), "{te}");
    p.close(Duration::from_secs(10)).await;
    assert_eq!(admin.len(&key).await, 20, "the big one was never sent");
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn a_key_of_another_type_is_permanent_wrongtype_and_counted() {
    let admin = Admin::connect(&url()).await;
    let key = admin.key("wrongtype");
    let _: () = admin.cmd(redis::cmd("SET").arg(&key).arg("x")).await;
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let transport = metrics::with_local_recorder(&recorder, || {
        RedisTransport::new(RedisConfig::from_url(&url()).expect("url"))
    })
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(30))
        .build()
        .expect("producer");
    let e = p
        .send(Message::new(herald_redis::stream(&key), "m"))
        .await
        .expect_err("WRONGTYPE");
    assert_eq!((e.class(), e.attempts()), (ErrorClass::Permanent, 1), "{e}");
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("WRONG_TYPE"), "{te}");
    assert!(te.message().contains(&key), "names the stream: {te}");
    p.close(Duration::from_secs(10)).await;
    let errors: u64 = snapshotter
        .snapshot()
        .into_vec()
        .iter()
        .filter(|(k, ..)| k.key().name() == herald_redis::metrics::SERVER_ERRORS)
        .map(|(.., v)| match v {
            metrics_util::debugging::DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum();
    assert_eq!(errors, 1);
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn maxlen_trims_the_stream_approximately_and_a_database_is_selected() {
    let url = url();
    let admin = Admin::connect(&url).await;
    let key = admin.key("trim");
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!("{}/{key}?maxlen=100", url.trim_end_matches('/')))
            .expect("url"),
    )
    .expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let report = p
        .send_all((0..5_000).map(|i| Message::new(herald_redis::stream(&key), format!("t-{i}"))))
        .await
        .wait()
        .await;
    assert_eq!(report.delivered, 5_000, "{:?}", report.failed.first());
    p.close(Duration::from_secs(10)).await;
    let len = admin.len(&key).await;
    assert!(
        (100..1_000).contains(&len),
        "MAXLEN ~ 100 keeps at least 100 and about that many: {len}"
    );
    let last = admin.entries(&key).await.pop().expect("entries");
    assert_eq!(last.payload().as_ref(), b"t-4999", "the newest are kept");
    admin.cleanup().await;

    // Database 3: the stream is there, and not in database 0.
    let other = format!("herald:it:{}:db3", uniq());
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!("{}/3/{other}", url.trim_end_matches('/'))).expect("url"),
    )
    .expect("t");
    let out = transport
        .send_batch(
            &herald_redis::stream(&other),
            &[Message::new(other.as_str(), "x")],
        )
        .await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    transport.close().await;
    let db3 = Admin::connect(&format!("{}/3", url.trim_end_matches('/'))).await;
    db3.adopt(&other);
    assert_eq!(db3.len(&other).await, 1);
    assert_eq!(admin.len(&other).await, 0, "not in database 0");
    db3.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn down_clears_without_traffic_once_the_server_is_back() {
    let url = url();
    let proxy = FaultProxy::start(&authority(&url)).await.expect("proxy");
    let transport = RedisTransport::new(
        RedisConfig::from_url(&via(&url, &proxy.addr().to_string(), ""))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
    )
    .expect("t");
    // The server unreachable for 3 s: the first attempt fails and health says so.
    proxy.cut_for(Duration::from_secs(3));
    transport
        .connect()
        .await
        .expect_err("refused while the proxy refuses");
    herald_testkit::checks::down_then_up_without_traffic(&transport, &proxy.addr().to_string())
        .await;
    assert!(transport.is_connected());
    transport.close().await;
    assert!(!transport.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn wait_for_a_replica_that_is_not_there_fails_transient_and_counts() {
    let url = url();
    let admin = Admin::connect(&url).await;
    let key = admin.key("wait-none");
    let info: String = admin.cmd(redis::cmd("INFO").arg("replication")).await;
    assert!(
        info.contains("connected_slaves:0"),
        "this test needs a server without replicas: {info}"
    );
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!(
            "{}/{key}?wait=1&wait_timeout_ms=100",
            url.trim_end_matches('/')
        ))
        .expect("url"),
    )
    .expect("t");
    let out = transport
        .send_batch(
            &herald_redis::stream(&key),
            &[
                Message::new(key.as_str(), "a"),
                Message::new(key.as_str(), "b"),
            ],
        )
        .await;
    for o in &out {
        let e = o.as_ref().expect_err("no replica acknowledged");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some("REPLICAS_NOT_REACHED")),
            "{e}"
        );
    }
    assert_eq!(admin.len(&key).await, 2, "the primary holds them");
    transport.close().await;
    admin.cleanup().await;
}

// ---- a redis-server of the test's own -----------------------------------------------------

fn redis_server_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into(), "/usr/local/bin".into()])
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .expect("these tests start their own redis-server: none on this machine (apt-get install redis-server)")
}

/// A redis-server of a test's own: its own port and folder, the AOF on (`appendonly yes`,
/// `appendfsync everysec`, no RDB snapshots), killed (and its folder removed) on drop.
struct OwnServer {
    dir: PathBuf,
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl OwnServer {
    async fn start(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-redis-it-{}", uniq()));
        std::fs::create_dir_all(&dir).expect("server folder");
        let mut server = Self {
            dir,
            port: free_port(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
        };
        server.run().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs the server process and waits until it answers PING.
    async fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.log")).expect("log file");
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.answers().await {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                panic!("redis-server exited ({status}): {log}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the server answers PING with PONG (or asks for a password: it is up).
    async fn answers(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut buf = [0u8; 64];
        s.write_all(b"PING\r\n").await.is_ok()
            && matches!(
                tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
                Ok(Ok(n)) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH")
            )
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already gone is fine.
            let _killed = child.kill();
            let _status = child.wait();
        }
    }

    /// The server process's id.
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
        let _removed = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server running a long script answers BUSY, which passes, also to the SELECT of a new
/// connection to a database other than 0 (redis-rs reports that refusal as ERR with the
/// server's words): the batch is retried, not failed for good. Before, it failed permanently
/// (SERVER_REFUSED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn a_busy_server_refusing_select_is_transient() {
    let server = OwnServer::start(&["--busy-reply-threshold", "100"]).await;
    let client = redis::Client::open(server.url()).expect("client");
    let mut side = client
        .get_multiplexed_async_connection()
        .await
        .expect("side connection");
    // Busy until killed.
    let script = tokio::spawn(async move {
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<redis::Value>(&mut side)
            .await
    });
    let mut probe = client
        .get_multiplexed_async_connection()
        .await
        .expect("probe connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ping: redis::RedisResult<redis::Value> =
            redis::cmd("PING").query_async(&mut probe).await;
        if ping.as_ref().err().and_then(|e| e.code()) == Some("BUSY") {
            break;
        }
        assert!(Instant::now() < deadline, "never busy: {ping:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let key = format!("herald:it:{}:busy", uniq());
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!("{}/1/{key}", server.url())).expect("url"),
    )
    .expect("t");
    let dest = herald_redis::stream(&key);
    let out = transport
        .send_batch(&dest, &[Message::new(dest.clone(), "m")])
        .await;
    let mut killer = client
        .get_multiplexed_async_connection()
        .await
        .expect("killer connection");
    let _killed: redis::RedisResult<redis::Value> = redis::cmd("SCRIPT")
        .arg("KILL")
        .query_async(&mut killer)
        .await;
    let _script = script.await;
    let e = out[0].as_ref().expect_err("busy");
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    assert_eq!(e.code(), Some("BUSY"), "{e}");
    transport.close().await;
}

/// `WAIT`s queue on the one connection: with no replica, each holds the replies behind it
/// for its whole timeout, so the eighth pipeline out waits eight of them. Each pipeline's
/// budget counts the `WAIT`s ahead of it: every batch ends `REPLICAS_NOT_REACHED`, none with
/// a `TIMEOUT` that would give the sound connection up. Before, with a 1 s ack timeout and
/// 0.5 s `WAIT`s, the later ones timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn waits_queued_on_the_connection_do_not_time_later_batches_out() {
    let server = OwnServer::start(&[]).await;
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!("{}/s?wait=1&wait_timeout_ms=500", server.url()))
            .expect("url")
            .ack_timeout(Duration::from_secs(1)),
    )
    .expect("t");
    transport.connect().await.expect("connects");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..8 {
        let t = transport.clone();
        calls.spawn(async move {
            let dest = herald_redis::stream(&format!("herald:it:{}:waits:{i}", uniq()));
            let out = t
                .send_batch(&dest, &[Message::new(dest.clone(), "m")])
                .await;
            out.into_iter().next().expect("one outcome")
        });
    }
    while let Some(outcome) = calls.join_next().await {
        let e = outcome.expect("call").expect_err("no replica");
        assert_eq!(e.code(), Some("REPLICAS_NOT_REACHED"), "{e}");
    }
    transport.close().await;
}

/// A `WAIT` the server refuses (renamed away here; an ACL without `+wait`, a proxy without it)
/// comes after the `XADD`s were answered with ids: the message is handed back saying it is
/// stored and only its replication unconfirmed. Before, the error said "Redis refused a
/// message" while the entry sat in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn a_refused_wait_says_the_message_is_stored() {
    let server = OwnServer::start(&["--rename-command", "WAIT", ""]).await;
    let admin = Admin::connect(&server.url()).await;
    let key = admin.key("wait-refused");
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!("{}/{key}?wait=1", server.url())).expect("url"),
    )
    .expect("t");
    let dest = herald_redis::stream(&key);
    let out = transport
        .send_batch(&dest, &[Message::new(dest.clone(), "m")])
        .await;
    let e = out[0].as_ref().expect_err("WAIT is refused");
    assert_eq!(
        (e.code(), e.class()),
        (Some("WAIT_FAILED"), ErrorClass::Permanent),
        "{e}"
    );
    assert!(e.message().starts_with("stored in the stream"), "{e}");
    assert_eq!(admin.len(&key).await, 1, "stored all the same");
    transport.close().await;
    admin.cleanup().await;
}

/// A server that hangs with its connection open (stopped: no reply, no error, the socket up;
/// redis-rs sends no pings) is given up once silent for the ack timeout, though every attempt
/// is cut off sooner by a shorter delivery timeout; the messages go through on a new
/// connection once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn a_hung_server_is_given_up_within_a_short_delivery_timeout() {
    let server = OwnServer::start(&[]).await;
    let url = server.url();
    let key = format!("herald:it:{}:hung", uniq());
    let target = url.trim_start_matches("redis://").to_owned();
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = RedisTransport::new(
        RedisConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .ack_timeout(Duration::from_secs(3))
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let dest = herald_redis::stream(&key);
    herald_testkit::scenario::a_hung_server_is_given_up(transport, &dest, &proxy, server.pid())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn server_restart_mid_run_loses_nothing_and_keeps_per_key_order() {
    const N: usize = 40_000;
    let mut server = OwnServer::start(&[]).await;
    let url = server.url();
    let key = format!("herald:it:{}:restart", uniq());
    let transport = RedisTransport::new(
        RedisConfig::from_url(&url)
            .expect("url")
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .batching(herald_batch::SizeOrLinger::new(
            200,
            1 << 20,
            Duration::from_millis(5),
        ))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    let dest = herald_redis::stream(&key);
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("r-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    // Half the run, stopped once it is being delivered; the other half sent while the server
    // is down: the run goes on across the restart however fast the first half went.
    let mut run = RunInParts::new(&p, &sent, 2);
    run.send_next().await;
    run.wait_flowing(Duration::from_secs(60)).await;
    server.kill();
    let at_restart = p.stats().totals.delivered;
    let outstanding = run.outstanding();
    assert!(outstanding > 0, "the stop found messages outstanding");
    run.send_next().await;
    server.run().await;
    run.finish(Duration::from_secs(180)).await;
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(30)).await;
    let admin = Admin::connect(&url).await;
    let got = admin.read(&key, N, Duration::from_secs(60)).await;
    let stored = got.len();
    let (firsts, copies) = first_copies(got);
    // Acknowledged before the kill, written to the AOF (the kernel has it, fsync or not), read
    // back after the restart: nothing lost.
    assert_complete_in_key_order("restart", &sent, &firsts);
    eprintln!(
        "restart: {at_restart} delivered before ({outstanding} of the first half outstanding), {stored} entries ({copies} second copies), {retries} retries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn credentials_and_permissions_are_classified() {
    let server = OwnServer::start(&["--requirepass", "s3cret-pw"]).await;
    let port = server.port;
    let check = |url: String, want: &'static str| async move {
        let t = RedisTransport::new(RedisConfig::from_url(&url).expect("url")).expect("t");
        let out = t
            .send_batch(&herald_redis::stream("s"), &[Message::new("s", "m")])
            .await;
        let e = out[0].as_ref().expect_err(want);
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some(want)),
            "{url}: {e}"
        );
        assert!(
            !e.to_string().contains("s3cret") && !e.to_string().contains("wrong-pw"),
            "{e}"
        );
        t.close().await;
    };
    check(format!("redis://:wrong-pw@127.0.0.1:{port}"), "AUTH_FAILED").await;
    check(format!("redis://127.0.0.1:{port}"), "AUTH_REQUIRED").await;
    // An ACL user that may read but not XADD.
    let admin = Admin::connect(&format!("redis://:s3cret-pw@127.0.0.1:{port}")).await;
    let _: () = admin
        .cmd(
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg("reader")
                .arg("on")
                .arg(">reader-pw")
                .arg("~*")
                // Nothing else: not even CLIENT (the handshake's CLIENT SETINFO may fail).
                .arg("+@read"),
        )
        .await;
    check(
        format!("redis://reader:reader-pw@127.0.0.1:{port}"),
        "PERMISSION_DENIED",
    )
    .await;
    // The right password works, and a missing database is permanent.
    let t = RedisTransport::new(
        RedisConfig::from_url(&format!("redis://:s3cret-pw@127.0.0.1:{port}/s")).expect("url"),
    )
    .expect("t");
    t.connect().await.expect("the right password");
    let bad_db = RedisTransport::new(
        RedisConfig::from_url(&format!("redis://:s3cret-pw@127.0.0.1:{port}/999/s")).expect("url"),
    )
    .expect("t");
    let e = bad_db.connect().await.expect_err("no database 999");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("BAD_DATABASE")),
        "{e}"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn wait_for_a_replica_that_is_there_succeeds() {
    let primary = OwnServer::start(&[]).await;
    let replica = OwnServer::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]).await;
    let admin = Admin::connect(&primary.url()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = admin.cmd(redis::cmd("INFO").arg("replication")).await;
        if info.contains("connected_slaves:1") && info.contains("state=online") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not sync: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = "herald:it:wait";
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!(
            "{}/{key}?wait=1&wait_timeout_ms=5000",
            primary.url()
        ))
        .expect("url"),
    )
    .expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let report = p
        .send_all((0..1_000).map(|i| Message::new(herald_redis::stream(key), format!("w-{i}"))))
        .await
        .wait()
        .await;
    assert_eq!(report.delivered, 1_000, "{:?}", report.failed.first());
    p.close(Duration::from_secs(10)).await;
    let on_replica = Admin::connect(&replica.url()).await;
    assert_eq!(
        on_replica.len(key).await,
        1_000,
        "the replica has every acknowledged one"
    );
    drop((replica, primary));
}

/// A failover while connected: the old primary becomes a replica (it answers `READONLY`) and
/// the primary's name points to the new one (the proxy stands for the name). The connection is
/// given up at the first refusal, and the next attempt reaches the new primary, well within
/// the delivery timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn after_a_failover_the_old_primary_s_connection_is_given_up() {
    let old = OwnServer::start(&[]).await;
    let new = OwnServer::start(&[]).await;
    let key = format!("herald:it:{}:failover", uniq());
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", old.port))
        .await
        .expect("proxy");
    let transport = RedisTransport::new(
        RedisConfig::from_url(&format!("redis://{}", proxy.addr()))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .expect("producer");
    let dest = herald_redis::stream(&key);
    p.send(Message::new(dest.clone(), "before"))
        .await
        .expect("delivered to the old primary");
    // The failover: the old primary follows the new one, and the name moves.
    let on_old = Admin::connect(&old.url()).await;
    let _ok: String = on_old
        .cmd(redis::cmd("REPLICAOF").arg("127.0.0.1").arg(new.port))
        .await;
    proxy.retarget(&format!("127.0.0.1:{}", new.port));
    let delivery = p
        .send(Message::new(dest.clone(), "after"))
        .await
        .expect("delivered to the new primary");
    assert!(delivery.ack.offset.is_some());
    let on_new = Admin::connect(&new.url()).await;
    let got = on_new.entries(&key).await;
    assert_eq!(got.len(), 1, "the new primary has the message sent after");
    assert_eq!(got[0].payload().as_ref(), b"after");
    assert_eq!(proxy.accepted(), 2, "one connection to each primary");
    p.close(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn tls_with_a_custom_ca_works_and_an_unknown_ca_is_refused() {
    let certs = std::env::temp_dir().join(format!("herald-redis-it-certs-{}", uniq()));
    std::fs::create_dir_all(&certs).expect("cert folder");
    herald_testkit::tls::make_test_certs(&certs);
    let f = |n: &str| certs.join(n).to_string_lossy().into_owned();
    let tls_port = free_port().to_string();
    let server = OwnServer::start(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &f("server.pem"),
        "--tls-key-file",
        &f("server.key"),
        "--tls-ca-cert-file",
        &f("ca.pem"),
        "--tls-auth-clients",
        "no",
    ])
    .await;
    let url = format!("rediss://localhost:{tls_port}/herald:it:tls");
    // Without the test's CA: refused, permanently (proof that the certificate is checked).
    let untrusted = RedisTransport::new(RedisConfig::from_url(&url).expect("url")).expect("t");
    let e = untrusted.connect().await.expect_err("an unknown CA");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("TLS_ERROR")),
        "{e}"
    );
    // With it: connects and appends.
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .tls_ca_file(certs.join("ca.pem"));
    let dest = config.destination().expect("stream key");
    let t = RedisTransport::new(config).expect("t");
    let out = t
        .send_batch(&dest, &[Message::new(dest.clone(), "over tls")])
        .await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    t.close().await;
    let admin = Admin::connect(&server.url()).await;
    assert_eq!(admin.len("herald:it:tls").await, 1, "appended over TLS");
    drop(server);
    let _removed = std::fs::remove_dir_all(&certs);
}

/// Mutual TLS: a server with `tls-auth-clients yes` takes herald's client certificate
/// (`?tlscert=` and `?tlskey=` in the URL, as the command gives them, with `?tlsca=`) and
/// refuses a client without one, permanently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: cargo xtask it redis"]
async fn a_client_certificate_is_presented_where_the_server_asks_for_one() {
    let certs = std::env::temp_dir().join(format!("herald-redis-it-mtls-{}", uniq()));
    std::fs::create_dir_all(&certs).expect("cert folder");
    herald_testkit::tls::make_test_certs(&certs);
    herald_testkit::tls::make_client_cert(&certs, "herald-client");
    let f = |n: &str| certs.join(n).to_string_lossy().into_owned();
    let tls_port = free_port().to_string();
    let server = OwnServer::start(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &f("server.pem"),
        "--tls-key-file",
        &f("server.key"),
        "--tls-ca-cert-file",
        &f("ca.pem"),
        "--tls-auth-clients",
        "yes",
    ])
    .await;
    let url = format!(
        "rediss://localhost:{tls_port}/herald:it:mtls?tlsca={}",
        f("ca.pem")
    );
    let send = |config: RedisConfig| async move {
        let dest = config.destination().expect("stream key");
        let t = RedisTransport::new(config).expect("t");
        let out = t
            .send_batch(&dest, &[Message::new(dest.clone(), "mutual tls")])
            .await;
        t.close().await;
        out.into_iter().next().expect("one outcome")
    };
    // Without a client certificate: refused, permanently.
    let e = send(RedisConfig::from_url(&url).expect("url"))
        .await
        .expect_err("no client certificate");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("TLS_ERROR")),
        "{e}"
    );
    let with_cert = format!(
        "{url}&tlscert={}&tlskey={}",
        f("client.pem"),
        f("client.key")
    );
    let out = send(RedisConfig::from_url(&with_cert).expect("url")).await;
    assert!(out.is_ok(), "{out:?}");
    let admin = Admin::connect(&server.url()).await;
    assert_eq!(
        admin.len("herald:it:mtls").await,
        1,
        "appended over mutual TLS"
    );
    drop(server);
    let _removed = std::fs::remove_dir_all(&certs);
}
