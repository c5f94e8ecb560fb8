//! Integration tests against a real RabbitMQ: `cargo xtask it amqp` (which sets
//! `HERALD_AMQP_URL`). Each test uses its own uniquely named queues and deletes them; queues are
//! also declared with `x-expires`, so a failed test leaves nothing behind for long.
//!
//! Tests that restart a broker or raise a memory alarm start their own RabbitMQ node (see
//! [`OwnNode`], in `common/node.rs`): the shared broker is never stopped or reconfigured. They
//! need `rabbitmq-server` (and the TLS test `openssl`) on this machine: without it they fail,
//! saying what is missing, unless `HERALD_IT_ALLOW_SKIP=1`, when they print
//! `SKIPPED: <test>: <why>` on stdout (shown with `-- --show-output`) and pass.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use herald_amqp::{AmqpConfig, AmqpTransport};
use herald_core::{async_trait, Destination, ErrorClass, Message, Producer, ProducerBuilder};
use herald_testkit::conformance::{self, Harness, Injected};
use herald_testkit::proxy::FaultProxy;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio::time::Instant;

use common::node::{cannot_run, free_port, on_this_machine, OwnNode};
use common::wait_for;

fn url() -> String {
    std::env::var("HERALD_AMQP_URL")
        .expect("HERALD_AMQP_URL is not set: run these tests with `cargo xtask it amqp`")
}

fn uniq(hint: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000);
    format!(
        "herald-it-{hint}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A raw lapin connection for declaring, reading and deleting test queues.
struct Admin {
    conn: Connection,
    queues: Mutex<Vec<String>>,
}

impl Admin {
    async fn connect(url: &str) -> Self {
        let conn = tokio::time::timeout(
            Duration::from_secs(30),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        .expect("admin connection to the test broker within 30 s")
        .expect("admin connection to the test broker");
        Self {
            conn,
            queues: Mutex::new(Vec::new()),
        }
    }

    /// A new durable queue that expires 10 minutes after its last use.
    async fn queue(&self, hint: &str) -> String {
        self.queue_with(hint, FieldTable::default()).await
    }

    /// [`Admin::queue`] with these arguments too.
    async fn queue_with(&self, hint: &str, mut args: FieldTable) -> String {
        let name = uniq(hint);
        let ch = self.conn.create_channel().await.expect("channel");
        args.insert("x-expires".into(), AMQPValue::LongUInt(600_000));
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare test queue");
        ch.close(200, "OK".into()).await.expect("close channel");
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name.clone());
        name
    }

    /// Reads the queue until `expected` messages arrived or `within` passed, then a little more
    /// (so that duplicates show), converting each back into a herald message.
    async fn read(&self, queue: &str, expected: usize, within: Duration) -> Vec<Message> {
        self.read_raw(queue, expected, within)
            .await
            .iter()
            .map(|d| to_message(queue, d))
            .collect()
    }

    /// As [`Admin::read`], the deliveries as they came.
    async fn read_raw(
        &self,
        queue: &str,
        expected: usize,
        within: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let ch = self.conn.create_channel().await.expect("channel");
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                uniq("reader").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut got = Vec::with_capacity(expected);
        let deadline = Instant::now() + within;
        loop {
            let until = if got.len() >= expected {
                // Enough: a short grace period only, to catch duplicates in flight.
                Instant::now() + Duration::from_millis(200)
            } else {
                deadline
            };
            match tokio::time::timeout_at(until, consumer.next()).await {
                Ok(Some(Ok(d))) => got.push(d),
                Ok(Some(Err(e))) => panic!("reading {queue}: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        ch.close(200, "OK".into()).await.expect("close channel");
        got
    }

    async fn cleanup(&self) {
        let queues = std::mem::take(
            &mut *self
                .queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let ch = self.conn.create_channel().await.expect("channel");
        for q in queues {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .expect("delete test queue");
        }
        ch.close(200, "OK".into()).await.expect("close channel");
    }
}

/// The herald message a delivery stands for: key from `x-herald-key`, the other headers as sent,
/// and the id from `message_id` when that is a herald id (UUID text).
fn to_message(queue: &str, d: &lapin::message::Delivery) -> Message {
    let mut m = Message::new(queue, d.data.clone());
    if let Some(id) = sent_id(d).and_then(|id| id.parse().ok()) {
        m = m.with_id(id);
    }
    if let Some(headers) = d.properties.headers() {
        for (k, v) in headers.inner() {
            let bytes = match v {
                AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                other => format!("{other:?}").into_bytes(),
            };
            if k.as_str() == "x-herald-key" {
                m = m.with_key(bytes);
            } else {
                m = m.with_header(k.as_str(), bytes);
            }
        }
    }
    m
}

/// The `message_id` property of a delivery.
fn sent_id(d: &lapin::message::Delivery) -> Option<String> {
    d.properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
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

/// The conformance harness: transports connect through a fault proxy, so that faults are real
/// connection cuts.
struct AmqpHarness {
    admin: Admin,
    proxy: FaultProxy,
    proxied_url: String,
}

impl AmqpHarness {
    async fn new() -> Self {
        let url = url();
        AmqpConfig::from_url(&url).expect("HERALD_AMQP_URL parses");
        let target = authority(&url);
        let proxy = FaultProxy::start(&target).await.expect("fault proxy");
        let proxied_url = url.replacen(&target, &proxy.addr().to_string(), 1);
        Self {
            admin: Admin::connect(&url).await,
            proxy,
            proxied_url,
        }
    }
}

/// A fault proxy in front of the broker at `url`, and a transport through it that reconnects
/// quickly (50 ms to 500 ms).
async fn through_proxy(url: &str) -> (FaultProxy, AmqpTransport) {
    let target = authority(url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let proxied = url.replacen(&target, &proxy.addr().to_string(), 1);
    let transport = AmqpTransport::new(
        AmqpConfig::from_url(&proxied)
            .expect("url")
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
    )
    .expect("t");
    (proxy, transport)
}

/// `host:port` of an amqp URL (with the default port filled in).
fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let auth = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    }
}

#[async_trait]
impl Harness for AmqpHarness {
    type Transport = AmqpTransport;

    async fn transport(&self) -> AmqpTransport {
        let config = AmqpConfig::from_url(&self.proxied_url)
            .expect("url")
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500));
        AmqpTransport::new(config).expect("transport")
    }

    async fn destination(&self, hint: &str) -> Destination {
        herald_amqp::queue(&self.admin.queue(hint).await)
    }

    fn answers_early(&self) -> bool {
        true
    }

    fn poison(&self, _destination: &Destination) -> Option<Message> {
        // Unroutable: amq.direct always exists and nothing is bound to this key.
        Some(Message::new(
            herald_amqp::exchange("amq.direct", &uniq("nobody-bound")),
            "poison: unroutable",
        ))
    }

    async fn read_back(&self, destination: &Destination, expected: usize) -> Option<Vec<Message>> {
        Some(
            self.admin
                .read(destination.as_str(), expected, Duration::from_secs(60))
                .await,
        )
    }

    async fn inject_transient_failures(&self, _calls: usize) -> Injected {
        // Every open connection is cut, and reconnecting fails for a second (long enough for the
        // run that follows to meet it on a loaded machine).
        self.proxy.cut_for(Duration::from_secs(1));
        Injected::IntoTransport
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn conformance_suite() {
    let h = AmqpHarness::new().await;
    conformance::run(&h).await;
    h.admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn hundred_thousand_messages_read_back_exactly_in_order() {
    read_back_exactly_in_order(1).await;
}

/// The same with four batches of the queue in flight: calls publish in turn, so the queue
/// holds every message once, per key as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn pipelined_hundred_thousand_messages_read_back_exactly_in_order() {
    read_back_exactly_in_order(4).await;
}

async fn read_back_exactly_in_order(depth: usize) {
    const N: usize = 100_000;
    let admin = Admin::connect(&url()).await;
    let q = admin.queue("100k").await;
    let dest = herald_amqp::queue(&q);
    let transport = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url")).expect("t");
    let p = Producer::builder(transport)
        .pipeline_depth(depth)
        .build()
        .expect("producer");
    let sent: Vec<Message> = (0..N)
        .map(|i| {
            Message::new(
                dest.clone(),
                format!("payload-{i:06}-{}", "x".repeat(i % 50)),
            )
            .with_key(format!("key-{}", i % 16))
            .with_header("seq", i.to_string())
        })
        .collect();
    let started = std::time::Instant::now();
    let report = p.send_all(sent.clone()).await.wait().await;
    let took = started.elapsed();
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, N as u64);
    eprintln!(
        "100k, pipeline depth {depth}: delivered in {took:?} ({:.0} msg/s)",
        N as f64 / took.as_secs_f64()
    );
    let got = admin.read(&q, N, Duration::from_secs(120)).await;
    assert_eq!(got.len(), N, "exactly N messages, no duplicates, none lost");
    // Per key, exactly as sent and in order.
    let mut by_key: HashMap<Vec<u8>, Vec<&Message>> = HashMap::new();
    for m in &got {
        by_key
            .entry(m.key().expect("key header").to_vec())
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
    for (k, want) in &sent_by_key {
        let have = by_key.get(k).expect("every key arrived");
        assert_eq!(have.len(), want.len());
        for (h, w) in have.iter().zip(want) {
            assert_eq!(h.payload(), w.payload(), "payload, in order");
            assert_eq!(h.headers(), w.headers(), "headers as sent");
        }
    }
    p.close(Duration::from_secs(30)).await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn unroutable_message_is_handed_back() {
    let transport = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url")).expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let dest = herald_amqp::exchange("amq.direct", &uniq("unbound"));
    let e = p
        .send(Message::new(dest, "nobody wants me"))
        .await
        .expect_err("unroutable must fail");
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert_eq!(e.attempts(), 1, "not retried");
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("NO_ROUTE"), "{te}");
    assert_eq!(e.message().payload().as_ref(), b"nobody wants me");
    p.close(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn identical_messages_arrive_with_their_own_message_ids() {
    let admin = Admin::connect(&url()).await;
    let q = admin.queue("ids").await;
    let dest = herald_amqp::queue(&q);
    let transport = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url")).expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    // What `herald produce --format lines` sends for three identical lines: no key, no header.
    let report = p
        .send_all((0..3).map(|_| Message::new(dest.clone(), "same line")))
        .await
        .wait()
        .await;
    assert_eq!(report.delivered, 3, "{:?}", report.failed.first());
    // An id of the caller's own, in the `message-id` header, is sent as it is.
    p.send(Message::new(dest.clone(), "mine").with_header("message-id", "order-42"))
        .await
        .expect("sent");
    p.close(Duration::from_secs(10)).await;
    let got = admin.read_raw(&q, 4, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 4);
    let ids: Vec<String> = got
        .iter()
        .filter(|d| d.data == b"same line")
        .map(|d| sent_id(d).expect("every message has a message_id"))
        .collect();
    assert_eq!(ids.len(), 3);
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "identical content, distinct ids: {ids:?}"
    );
    for id in &ids {
        id.parse::<herald_core::MessageId>()
            .unwrap_or_else(|_| panic!("a herald id, as UUID text: {id}"));
    }
    let mine = got.iter().find(|d| d.data == b"mine").expect("arrived");
    assert_eq!(sent_id(mine).as_deref(), Some("order-42"));
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn missing_exchange_is_permanent_and_the_transport_recovers() {
    let admin = Admin::connect(&url()).await;
    let q = admin.queue("after-missing").await;
    let transport = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url")).expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let missing = uniq("no-such-exchange");
    let msgs: Vec<Message> = (0..50)
        .map(|i| {
            Message::new(herald_amqp::exchange(&missing, "k"), format!("m{i}"))
                .with_key(format!("k{i}"))
        })
        .collect();
    let report = p.send_all(msgs).await.wait().await;
    assert_eq!(report.delivered, 0);
    assert_eq!(report.failed.len(), 50);
    for e in &report.failed {
        assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
        let te = e.reason().transport_error().expect("transport error");
        assert_eq!(te.code(), Some("NOT_FOUND"), "{te}");
        assert!(te.message().contains(&missing), "names the exchange: {te}");
    }
    // The channels closed by the broker are reopened.
    p.send(Message::new(herald_amqp::queue(&q), "still works"))
        .await
        .expect("a good destination still works");
    p.close(Duration::from_secs(10)).await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_bad_destination_does_not_fail_another_batch_on_the_same_channel() {
    use herald_core::Transport;
    let admin = Admin::connect(&url()).await;
    let q = admin.queue("shared-channel").await;
    // One channel: both batches share it, and the broker closes it for the missing exchange.
    let t = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url").channels(1)).expect("t");
    t.connect().await.expect("connect");
    let missing = uniq("no-such-exchange");
    let bad_dest = herald_amqp::exchange(&missing, "k");
    let good_dest = herald_amqp::queue(&q);
    for round in 0..5 {
        let good: Vec<Message> = (0..300)
            .map(|i| Message::new(good_dest.clone(), format!("r{round}-m{i}")))
            .collect();
        let bad = vec![Message::new(bad_dest.clone(), "x")];
        let (g, b) = tokio::join!(
            t.send_batch(&good_dest, &good),
            t.send_batch(&bad_dest, &bad)
        );
        let be = b[0].as_ref().expect_err("missing exchange");
        if be.class() == ErrorClass::Permanent {
            assert_eq!(be.code(), Some("NOT_FOUND"), "{be}");
        }
        for o in &g {
            if let Err(e) = o {
                assert_eq!(
                    e.class(),
                    ErrorClass::Transient,
                    "another batch's missing exchange must not fail this one for good: {e}"
                );
            }
        }
    }
    t.close().await;
    admin.cleanup().await;
}

/// Two batches publishing on one channel at once (other destinations share its slot) each
/// get their own messages' confirms: one queue takes a single message and refuses the rest
/// (`x-max-length` 1, `reject-publish`: nacked), the other takes everything. lapin takes a
/// publish's delivery tag and queues its frames under two locks; without herald's lock
/// around that step, two tasks could queue their frames in the other order than their tags,
/// and the broker's confirms went to the wrong messages: a nacked message reported
/// delivered, or a stored one nacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn batches_sharing_a_channel_keep_their_own_confirms() {
    use herald_core::Transport;
    let admin = Admin::connect(&url()).await;
    let good = herald_amqp::queue(&admin.queue("takes").await);
    let t = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url").channels(1)).expect("t");
    t.connect().await.expect("connect");
    let body = herald_core::Bytes::from(vec![b'x'; 16 * 1024]);
    let (mut refused_but_ok, mut taken_but_failed) = (0, 0);
    for round in 0..20 {
        let mut one_only = FieldTable::default();
        one_only.insert("x-max-length".into(), AMQPValue::LongUInt(1));
        one_only.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let full = herald_amqp::queue(&admin.queue_with("takes-one", one_only).await);
        let batch = |dest: &Destination| -> Vec<Message> {
            (0..50)
                .map(|i| {
                    Message::new(dest.clone(), body.clone())
                        .with_header("n", format!("{round}-{i}"))
                })
                .collect()
        };
        let (f, g) = (batch(&full), batch(&good));
        let (ft, gt) = (t.clone(), t.clone());
        let (fd, gd) = (full.clone(), good.clone());
        let (fo, go) = tokio::join!(
            tokio::spawn(async move { ft.send_batch(&fd, &f).await }),
            tokio::spawn(async move { gt.send_batch(&gd, &g).await })
        );
        // The queue that takes one: exactly one delivered.
        let delivered = fo.expect("task").iter().filter(|o| o.is_ok()).count();
        refused_but_ok += delivered.saturating_sub(1);
        taken_but_failed += go.expect("task").iter().filter(|o| o.is_err()).count();
    }
    assert_eq!(
        (refused_but_ok, taken_but_failed),
        (0, 0),
        "delivered beyond the one the full queue took, failed to the queue that takes all"
    );
    t.close().await;
    admin.cleanup().await;
}

/// Routable and unroutable messages publishing on one channel at once each get their own
/// fate: RabbitMQ sends a `basic.return` before the ack of its publish and often confirms
/// several publishes with one `multiple` ack; lapin hands the returned message to whichever
/// confirm of that ack it completes first (a hash map's order), not to its own. herald
/// matches each return to its message (route, message id, payload). Before, 3-5 unroutable
/// messages of 2 000 were reported delivered (lost), and as many stored ones `NO_ROUTE`.
/// Half the rounds carry herald message ids, half none (a transport driven alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn returns_on_a_shared_channel_go_to_their_own_messages() {
    use herald_core::{MessageId, Transport};
    let admin = Admin::connect(&url()).await;
    let good = herald_amqp::queue(&admin.queue("routable").await);
    let nowhere = herald_amqp::queue(&uniq("no-such-queue"));
    let t = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url").channels(1)).expect("t");
    t.connect().await.expect("connect");
    let (mut lost, mut wrongly_returned, mut other) = (0, 0, Vec::new());
    for round in 0..20u64 {
        let batch = |dest: &Destination, salt: u64| -> Vec<Message> {
            (0..100u64)
                .map(|i| {
                    let m = Message::new(dest.clone(), format!("{round}-{salt}-{i}"));
                    if round % 2 == 0 {
                        m.with_id(MessageId::from_u128(
                            u128::from(round) << 64 | u128::from(salt * 1000 + i),
                        ))
                    } else {
                        m
                    }
                })
                .collect()
        };
        let (g, n) = (batch(&good, 1), batch(&nowhere, 2));
        let (gt, nt) = (t.clone(), t.clone());
        let (gd, nd) = (good.clone(), nowhere.clone());
        let (go, no) = tokio::join!(
            tokio::spawn(async move { gt.send_batch(&gd, &g).await }),
            tokio::spawn(async move { nt.send_batch(&nd, &n).await })
        );
        for o in no.expect("task") {
            match o {
                Ok(_) => lost += 1,
                Err(e) if e.code() == Some("NO_ROUTE") => {}
                Err(e) => other.push(e.to_string()),
            }
        }
        for o in go.expect("task") {
            match o {
                Ok(_) => {}
                Err(e) if e.code() == Some("NO_ROUTE") => wrongly_returned += 1,
                Err(e) => other.push(e.to_string()),
            }
        }
    }
    assert_eq!(
        (lost, wrongly_returned),
        (0, 0),
        "unroutable messages reported delivered, routable ones reported returned"
    );
    assert!(other.is_empty(), "other failures: {other:?}");
    // Without message ids, alike in route and payload, told apart by a header a headers
    // exchange routes by: the returned ones are still told apart.
    let exchange = uniq("by-header");
    let q = admin.queue("by-header").await;
    let ch = admin.conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Headers,
        lapin::options::ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the headers exchange");
    let mut binding = FieldTable::default();
    binding.insert("x-match".into(), AMQPValue::LongString("all".into()));
    binding.insert("route".into(), AMQPValue::LongString("yes".into()));
    ch.queue_bind(
        q.as_str().into(),
        exchange.as_str().into(),
        "".into(),
        lapin::options::QueueBindOptions::default(),
        binding,
    )
    .await
    .expect("bind");
    let dest = herald_amqp::exchange(&exchange, "");
    let batch: Vec<Message> = (0..400)
        .map(|i| {
            Message::new(dest.clone(), "alike")
                .with_header("route", if i % 2 == 0 { "yes" } else { "no" })
        })
        .collect();
    let (mut lost, mut wrongly_returned) = (0, 0);
    for round in 0..5 {
        let outcomes = t.send_batch(&dest, &batch).await;
        for (i, o) in outcomes.iter().enumerate() {
            match (i % 2 == 0, o) {
                (true, Err(e)) if e.code() == Some("NO_ROUTE") => wrongly_returned += 1,
                (false, Ok(_)) => lost += 1,
                (_, Err(e)) if e.code() != Some("NO_ROUTE") => {
                    panic!("round {round}: {e}")
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        (lost, wrongly_returned),
        (0, 0),
        "by header: unroutable reported delivered, routable reported returned"
    );
    ch.exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .expect("delete the exchange");
    t.close().await;
    admin.cleanup().await;
}

/// A header name or a message id longer than AMQP's short strings (255 bytes) fails that
/// message permanently at once; the others of its batch go. Before, lapin panicked on it, in
/// the middle of publishing the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_header_longer_than_a_short_string_fails_only_its_message() {
    use herald_core::Transport;
    let admin = Admin::connect(&url()).await;
    let dest = herald_amqp::queue(&admin.queue("short-strings").await);
    let t = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url")).expect("t");
    let batch = [
        Message::new(dest.clone(), "before"),
        Message::new(dest.clone(), "long id").with_header("message-id", "i".repeat(300)),
        Message::new(dest.clone(), "long name").with_header("n".repeat(300), "v"),
        Message::new(dest.clone(), "after"),
    ];
    let out = t.send_batch(&dest, &batch).await;
    assert!(out[0].is_ok() && out[3].is_ok(), "{out:?}");
    for o in &out[1..3] {
        let e = o.as_ref().expect_err("too long");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("INVALID_HEADER")),
            "{e}"
        );
    }
    t.close().await;
    admin.cleanup().await;
}

/// A vhost at its connection limit refuses a connection with 530 NOT_ALLOWED, as a missing
/// or forbidden vhost does, but that one passes: transient. Before, permanent, so every
/// message of the batch failed for good. Runs `rabbitmqctl` on a vhost of its own (deleted at
/// the end); the broker's own vhosts are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_vhost_at_its_connection_limit_is_transient() {
    use herald_core::Transport;
    let vhost = uniq("limit");
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("run rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    };
    ctl(&["add_vhost", &vhost]);
    struct Gone<'a>(&'a str);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            let _best_effort = std::process::Command::new("rabbitmqctl")
                .args(["delete_vhost", self.0])
                .output();
        }
    }
    let _gone = Gone(&vhost);
    ctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    ctl(&[
        "set_vhost_limits",
        "-p",
        &vhost,
        r#"{"max-connections": 1}"#,
    ]);
    let base = url();
    let at = base.rfind('/').expect("a vhost in the URL");
    let vhost_url = format!("{}/{vhost}", &base[..at]);
    let first = AmqpTransport::new(AmqpConfig::from_url(&vhost_url).expect("url")).expect("t");
    first.connect().await.expect("the one connection allowed");
    let second = AmqpTransport::new(AmqpConfig::from_url(&vhost_url).expect("url")).expect("t");
    let e = second.connect().await.expect_err("over the limit");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Transient, Some("NOT_ALLOWED")),
        "{e}"
    );
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_failed_declaration_is_transient() {
    let admin = Admin::connect(&url()).await;
    // A classic queue exists; declaring it as a quorum queue is refused (406).
    let q = admin.queue("declared-classic").await;
    let t = AmqpTransport::new(AmqpConfig::from_url(&url()).expect("url").declare(
        herald_amqp::Declare::Queue {
            name: q.clone(),
            quorum: true,
        },
    ))
    .expect("t");
    for _ in 0..2 {
        let e = t.connect().await.expect_err("mismatched declaration");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some("DECLARE_FAILED")),
            "{e}"
        );
        assert!(!t.is_connected() && !t.is_blocked());
    }
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn bad_connections_are_classified() {
    let good = url();
    let target = authority(&good);
    // Wrong credentials: permanent.
    let wrong =
        AmqpConfig::from_url(&format!("amqp://guest:wrong-password@{target}/%2F")).expect("url");
    let e = AmqpTransport::new(wrong)
        .expect("t")
        .connect()
        .await
        .expect_err("wrong password");
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(!e.to_string().contains("wrong-password"), "{e}");
    // Missing vhost: permanent.
    let vhost =
        AmqpConfig::from_url(&format!("amqp://guest:guest@{target}/no-such-vhost")).expect("url");
    let e = AmqpTransport::new(vhost)
        .expect("t")
        .connect()
        .await
        .expect_err("missing vhost");
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    // Unreachable: transient.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let down =
        AmqpConfig::from_url(&format!("amqp://guest:guest@127.0.0.1:{port}/%2F")).expect("url");
    let e = AmqpTransport::new(down)
        .expect("t")
        .connect()
        .await
        .expect_err("unreachable");
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    assert_eq!(e.code(), Some("UNREACHABLE"), "{e}");
}

/// Checks the ids of what arrived: a duplicate is a retry of a message the broker had stored,
/// and carries the first attempt's id; distinct messages carry distinct ids. Returns how many
/// duplicates were checked.
fn assert_retries_keep_their_ids(got: &[Message]) -> usize {
    let mut ids: HashMap<&[u8], herald_core::MessageId> = HashMap::new();
    let mut owners: HashMap<herald_core::MessageId, &[u8]> = HashMap::new();
    let mut retried_checked = 0;
    for m in got {
        let payload = m.payload().as_ref();
        let id = m.id().expect("a herald id as message_id");
        match ids.insert(payload, id) {
            Some(first) => {
                assert_eq!(
                    first,
                    id,
                    "{} arrived again under another id",
                    String::from_utf8_lossy(payload)
                );
                retried_checked += 1;
            }
            None => {
                if let Some(other) = owners.insert(id, payload) {
                    panic!(
                        "{} and {} share the id {id}",
                        String::from_utf8_lossy(payload),
                        String::from_utf8_lossy(other)
                    );
                }
            }
        }
    }
    retried_checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn connection_cut_mid_run_loses_nothing() {
    connection_cut_mid_run(1).await;
}

/// The same with four batches of the queue in flight: the batches published on the new
/// connection do not get ahead of those in doubt on the cut one (first copies in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn pipelined_connection_cut_mid_run_loses_nothing() {
    connection_cut_mid_run(4).await;
}

async fn connection_cut_mid_run(depth: usize) {
    const N: usize = 30_000;
    let url = url();
    let admin = Admin::connect(&url).await;
    let (proxy, transport) = through_proxy(&url).await;
    let probe = transport.clone();
    let q = admin.queue("fault").await;
    let dest = herald_amqp::queue(&q);
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(120))
        .pipeline_depth(depth)
        .build()
        .expect("producer");
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("f-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    // In three parts, a cut between each (a close, then a reset): each cut comes while a part
    // is being delivered, however fast the parts before it went (see `cut_twice_mid_run`).
    let outstanding = herald_testkit::checks::cut_twice_mid_run(
        &p,
        &sent,
        &proxy,
        || !probe.is_connected(),
        Duration::from_secs(180),
    )
    .await;
    assert!(probe.is_connected(), "health shows the connection back");
    let got = admin.read(&q, N, Duration::from_secs(60)).await;
    // Nothing lost, and the first copies of each key in sending order: the batches published
    // on a new connection do not get ahead of those in doubt on the cut one.
    herald_testkit::checks::assert_complete_in_key_order("connection cut", &sent, &got);
    let retried_checked = assert_retries_keep_their_ids(&got);
    eprintln!(
        "connection cut, pipeline depth {depth} ({outstanding:?} outstanding at the cuts): {N} delivered, {} arrivals ({} duplicates, {retried_checked} checked to keep their id), retries {}",
        got.len(),
        got.len() - N,
        p.stats().totals.retries
    );
    p.close(Duration::from_secs(30)).await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn broker_restart_mid_run_loses_nothing_and_keeps_per_key_order() {
    let Some(node) =
        OwnNode::start("broker_restart_mid_run_loses_nothing_and_keeps_per_key_order").await
    else {
        return;
    };
    let url = node.url();
    let admin_url = url.clone();
    let transport = AmqpTransport::new(
        AmqpConfig::from_url(&url)
            .expect("url")
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let admin = Admin::connect(&admin_url).await;
    let q = admin.queue("restart").await;
    let dest = herald_amqp::queue(&q);
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    const N: usize = 30_000;
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("r-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    // Half the run, stopped once it is being delivered; the other half sent while the node is
    // down: the run goes on across the restart however fast the first half went (sent at once,
    // a whole run could be delivered before the stop).
    let mut run = herald_testkit::checks::RunInParts::new(&p, &sent, 2);
    run.send_next().await;
    run.wait_flowing(Duration::from_secs(60)).await;
    drop(admin);
    node.stop().await;
    let at_restart = p.stats().totals.delivered;
    // What the first half still had out when the node was gone (`rabbitmqctl stop` takes a
    // while; the half may have gone through meanwhile): reported, not required.
    let in_doubt = run.outstanding();
    run.send_next().await;
    assert!(
        run.outstanding() > 0,
        "the second half waits for the node to come back"
    );
    node.boot().await;
    run.finish(Duration::from_secs(180)).await;
    let admin = Admin::connect(&admin_url).await;
    let got = admin.read(&q, N, Duration::from_secs(60)).await;
    // Nothing lost, and the first copies of each key in sending order: the turn keeps the
    // batches published on the new connection behind those in doubt on the old one (at the
    // default pipeline depth of 4).
    herald_testkit::checks::assert_complete_in_key_order("broker restart", &sent, &got);
    eprintln!(
        "restart: {at_restart} delivered before ({in_doubt} of the first half outstanding), {} arrivals for {N}, retries {}",
        got.len(),
        p.stats().totals.retries
    );
    p.close(Duration::from_secs(30)).await;
    admin
        .queues
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(q);
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn memory_alarm_blocks_then_resumes_with_nothing_lost() {
    let Some(node) = OwnNode::start("memory_alarm_blocks_then_resumes_with_nothing_lost").await
    else {
        return;
    };
    let url = node.url();
    let admin = Admin::connect(&url).await;
    let q = admin.queue("alarm").await;
    let dest = herald_amqp::queue(&q);
    // Through a proxy, to count herald's connections.
    let target = authority(&url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = AmqpTransport::new(
        AmqpConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .confirm_timeout(Duration::from_secs(2))
            .blocked_timeout(Duration::from_secs(2)),
    )
    .expect("t");
    let probe = transport.clone();
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    p.send(Message::new(dest.clone(), "before"))
        .await
        .expect("before the alarm");
    assert!(
        node.ctl(&["set_vm_memory_high_watermark", "0"]),
        "raise the alarm"
    );
    let receipt = p
        .send_all((0..2_000).map(|i| Message::new(dest.clone(), format!("a-{i}"))))
        .await;
    wait_for(Duration::from_secs(30), "connection.blocked", || {
        probe.is_blocked()
    })
    .await;
    // Held for five confirm timeouts (the scenario, not a wait for something to happen): a
    // confirm missing while blocked is flow control, not a hung connection, so herald keeps
    // its one connection (a new one would be blocked too).
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(receipt.pending() > 0, "nothing is confirmed while blocked");
    let delivered_while_blocked = p.stats().totals.delivered;
    assert!(
        node.ctl(&["set_vm_memory_high_watermark", "0.4"]),
        "clear the alarm"
    );
    let report = tokio::time::timeout(Duration::from_secs(120), receipt.wait())
        .await
        .expect("resumes");
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, 2_000);
    assert!(!probe.is_blocked(), "unblocked");
    assert_eq!(
        proxy.accepted(),
        1,
        "one connection through the alarm, none given up"
    );
    let got = admin.read(&q, 2_001, Duration::from_secs(60)).await;
    let distinct: std::collections::HashSet<&[u8]> =
        got.iter().map(|m| m.payload().as_ref()).collect();
    assert_eq!(distinct.len(), 2_001, "nothing lost");
    eprintln!("alarm: {delivered_while_blocked} delivered while blocked (the one before)");
    p.close(Duration::from_secs(30)).await;
    // A transport closed while the broker blocks its connection: the broker reads nothing, the
    // close included, so the close is bounded (5 s). Before, it waited for the alarm to clear.
    let blocked = AmqpTransport::new(
        AmqpConfig::from_url(&url)
            .expect("url")
            .confirm_timeout(Duration::from_secs(2)),
    )
    .expect("t");
    assert!(
        node.ctl(&["set_vm_memory_high_watermark", "0"]),
        "raise the alarm again"
    );
    use herald_core::Transport;
    let sending = {
        let (t, dest) = (blocked.clone(), dest.clone());
        tokio::spawn(async move {
            t.send_batch(&dest, &[Message::new(dest.clone(), "x")])
                .await
        })
    };
    wait_for(Duration::from_secs(30), "connection.blocked", || {
        blocked.is_blocked()
    })
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(30), blocked.close()).await;
    assert!(
        node.ctl(&["set_vm_memory_high_watermark", "0.4"]),
        "clear the alarm"
    );
    assert!(
        closed.is_ok(),
        "close returned while the broker blocked the connection"
    );
    let _outcome = sending.await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn oversized_message_fails_alone_and_mutual_tls_works_with_a_custom_ca() {
    const TEST: &str = "oversized_message_fails_alone_and_mutual_tls_works_with_a_custom_ca";
    if !on_this_machine("openssl", "/usr/bin/openssl") {
        cannot_run(
            TEST,
            "no openssl on this machine to make the TLS certificates",
        );
        return;
    }
    let tls_port = free_port();
    let Some(node) = OwnNode::start_with(TEST, |dir| {
        herald_testkit::tls::make_test_certs(dir);
        herald_testkit::tls::make_client_cert(dir, "herald-client");
        let f = |n: &str| dir.join(n).to_string_lossy().into_owned();
        // Mutual TLS: the node wants a client certificate signed by the test's CA.
        format!(
            "max_message_size = 4096\n\
             listeners.ssl.default = 127.0.0.1:{tls_port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            f("ca.pem"),
            f("server.pem"),
            f("server.key")
        )
    })
    .await
    else {
        return;
    };
    let admin = Admin::connect(&node.url()).await;
    let q = admin.queue("limits").await;
    let dest = herald_amqp::queue(&q);

    // Over plain AMQP: one oversized message among others fails alone, permanently.
    let transport = AmqpTransport::new(AmqpConfig::from_url(&node.url()).expect("url")).expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(60))
        .build()
        .expect("producer");
    let mut msgs: Vec<Message> = (0..40)
        .map(|i| Message::new(dest.clone(), format!("ok-{i}")).with_key(format!("k{}", i % 2)))
        .collect();
    msgs.insert(
        20,
        Message::new(dest.clone(), vec![b'x'; 10_000]).with_key("k0"),
    );
    let report = p.send_all(msgs).await.wait().await;
    assert_eq!(
        report.delivered,
        40,
        "the others go through: {:?}",
        report.failed.first()
    );
    assert_eq!(report.failed.len(), 1);
    let e = &report.failed[0];
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert_eq!(
        e.message().payload().len(),
        10_000,
        "the oversized message comes back"
    );
    let te = e.reason().transport_error().expect("transport error");
    assert_eq!(te.code(), Some("PRECONDITION_FAILED"), "{te}");
    p.close(Duration::from_secs(10)).await;

    // Over TLS, once the node's TLS listener accepts connections (the node answering AMQP
    // does not prove that it is up yet): refused without the test's CA, for its certificate
    // (proof that the certificate is checked) …
    wait_for(
        Duration::from_secs(60),
        "the node's TLS listener to accept connections",
        || std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok(),
    )
    .await;
    let tls_url = format!("amqps://guest:guest@localhost:{tls_port}/%2F");
    let untrusted = AmqpTransport::new(AmqpConfig::from_url(&tls_url).expect("url")).expect("t");
    let refused = untrusted
        .connect()
        .await
        .expect_err("a server certificate from an unknown CA must be refused");
    assert_eq!(
        (refused.class(), refused.code()),
        (ErrorClass::Permanent, Some("TLS_ERROR")),
        "refused for its certificate, for good: {refused}"
    );
    assert!(
        refused.message().contains("UnknownIssuer"),
        "the certificate's issuer is unknown: {refused}"
    );
    herald_core::Transport::close(&untrusted).await;
    // … refused with the CA but without a client certificate, for good too …
    let ca = std::fs::read_to_string(node.dir.join("ca.pem")).expect("ca");
    let anonymous = AmqpTransport::new(
        AmqpConfig::from_url(&tls_url)
            .expect("url")
            .tls_ca_pem(ca.clone()),
    )
    .expect("t");
    let refused = anonymous
        .connect()
        .await
        .expect_err("the node requires a client certificate");
    // The node sends its alert and closes the socket with the client's last bytes unread, so
    // the client reads the alert (permanent) or, one time in a few, a reset (transient: it
    // cannot be told from a network's); docs/guarantees.md says so.
    let alert = (refused.class(), refused.code()) == (ErrorClass::Permanent, Some("TLS_ERROR"))
        && refused.message().contains("Certificate");
    let reset = (refused.class(), refused.code()) == (ErrorClass::Transient, Some("UNREACHABLE"))
        && refused.message().contains("reset");
    assert!(
        alert || reset,
        "refused for want of a certificate: {refused}"
    );
    herald_core::Transport::close(&anonymous).await;
    // … and accepted with both, given as RabbitMQ's URIs give them. The first connection is
    // checked on its own, so that a failure says why (with the node's log) rather than ending
    // in a delivery timeout.
    let f = |n: &str| node.dir.join(n).to_string_lossy().into_owned();
    let mutual = format!(
        "{tls_url}?cacertfile={}&certfile={}&keyfile={}",
        f("ca.pem"),
        f("client.pem"),
        f("client.key")
    );
    let tls = AmqpTransport::new(AmqpConfig::from_url(&mutual).expect("url")).expect("t");
    if let Err(e) = tls.connect().await {
        panic!("TLS with the test's CA failed: {e}{}", node.log_tail());
    }
    let p = Producer::builder(tls).build().expect("producer");
    p.send(Message::new(dest.clone(), "over tls"))
        .await
        .expect("TLS with a custom CA");
    p.close(Duration::from_secs(10)).await;
    let got = admin.read(&q, 41, Duration::from_secs(30)).await;
    assert!(got.iter().any(|m| m.payload().as_ref() == b"over tls"));
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn down_clears_without_traffic_once_the_broker_is_back() {
    use herald_core::{Transport as _, TransportHealth};
    let url = url();
    let (proxy, transport) = through_proxy(&url).await;
    // The broker unreachable for 3 s: the first attempt fails and health says so.
    proxy.cut_for(Duration::from_secs(3));
    transport
        .connect()
        .await
        .expect_err("refused while the proxy refuses");
    assert!(
        matches!(transport.health(), TransportHealth::Down(_)),
        "{:?}",
        transport.health()
    );
    // Nothing is sent from here on: health alone (as the producer's health task reads it,
    // about once a second) must find the broker back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if transport.health() == TransportHealth::Up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {:?} long after the broker came back",
            transport.health()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(transport.is_connected());
    transport.close().await;
}

/// A handshake cut off at the connect timeout (a slow link, a broker slow to answer) is not
/// left to finish on its own: lapin goes on with it in the background, and once the broker
/// answers, the connection would stay open with nobody using it (one more at every attempt).
/// herald closes each such connection once it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: cargo xtask it amqp"]
async fn handshakes_cut_off_at_the_connect_timeout_leave_no_connection_behind() {
    const ATTEMPTS: u64 = 3;
    let url = url();
    let target = authority(&url);
    // About 400 ms a round trip: the handshake's four take longer than the connect timeout.
    let proxy = FaultProxy::start_with_latency(&target, Duration::from_millis(200))
        .await
        .expect("proxy");
    let t = AmqpTransport::new(
        AmqpConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .connect_timeout(Duration::from_millis(500))
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(1)),
    )
    .expect("t");
    for _ in 0..ATTEMPTS {
        let e = t
            .connect()
            .await
            .expect_err("slower than the connect timeout");
        assert_eq!(e.code(), Some("CONNECT_TIMEOUT"), "{e}");
    }
    assert_eq!(proxy.accepted(), ATTEMPTS);
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        proxy.open(),
        0,
        "connections of timed-out handshakes still open 20 s later"
    );
    herald_core::Transport::close(&t).await;
}
