//! Integration tests against a real JetStream-enabled nats-server: `cargo xtask it nats`, or
//! `HERALD_NATS_URL=nats://127.0.0.1:4222 cargo test -p herald-nats --test it -- --ignored
//! --test-threads=1`. Each test uses its own uniquely named streams and deletes them.
//!
//! Tests that restart a server or need one with users and permissions start their own
//! `nats-server` (see [`OwnServer`]) on a free port with its own store folder, and kill it at
//! the end: the shared server is never stopped or reconfigured. Without `nats-server` on this
//! machine they fail, saying so, unless `HERALD_IT_ALLOW_SKIP=1`, when they print
//! `SKIPPED: <test>: <why>` and pass.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use herald_core::{
    async_trait, Destination, ErrorClass, FailureReason, Message, MessageId, Producer,
    ProducerBuilder, Transport, TransportError,
};
use herald_nats::{NatsConfig, NatsTransport};
use herald_testkit::checks::{
    assert_complete_in_key_order, cut_twice_mid_run, free_port, RunInParts,
};
use herald_testkit::conformance::{self, Harness, Injected};
use herald_testkit::proxy::FaultProxy;
use tokio::time::Instant;

fn url() -> String {
    std::env::var("HERALD_NATS_URL")
        .expect("HERALD_NATS_URL is not set: run these tests with `cargo xtask it nats`")
}

/// `host:port` of a nats URL (the default port filled in).
fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let auth = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    let first = hostport.split(',').next().unwrap_or(hostport);
    if first.contains(':') {
        first.to_owned()
    } else {
        format!("{first}:4222")
    }
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

/// A raw async-nats connection for creating, reading and deleting test streams.
struct Admin {
    js: jetstream::Context,
    streams: Mutex<Vec<String>>,
}

impl Admin {
    async fn connect(url: &str) -> Self {
        // With the URL's credentials, as a raw async-nats client.
        let (servers, options) = raw_options(url);
        let client = tokio::time::timeout(Duration::from_secs(30), options.connect(servers))
            .await
            .expect("admin connection to the test server within 30 s")
            .expect("admin connection to the test server");
        Self {
            js: jetstream::new(client),
            streams: Mutex::new(Vec::new()),
        }
    }

    /// A new stream capturing one new subject: (stream, subject).
    async fn stream(&self, hint: &str) -> (String, String) {
        self.stream_with(hint, |c| c).await
    }

    async fn stream_with(
        &self,
        hint: &str,
        tune: impl FnOnce(stream::Config) -> stream::Config,
    ) -> (String, String) {
        let id = uniq();
        let name = format!("HERALD_IT_{}_{id}", hint.to_ascii_uppercase());
        let subject = format!("herald.it.{hint}.{id}");
        let config = tune(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..stream::Config::default()
        });
        self.js
            .create_stream(config)
            .await
            .expect("create test stream");
        self.adopt(&name);
        (name, subject)
    }

    /// Deletes `stream` at cleanup.
    fn adopt(&self, stream: &str) {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(stream.to_owned());
    }

    /// How many messages `stream` holds.
    async fn count(&self, stream: &str) -> u64 {
        let mut s = self.js.get_stream(stream).await.expect("get stream");
        s.info().await.expect("stream info").state.messages
    }

    /// Reads `stream` from its start until `expected` messages arrived or `within` passed,
    /// then a little more (so that extra copies show), each as the herald message it stands
    /// for.
    async fn read(&self, stream: &str, expected: usize, within: Duration) -> Vec<Message> {
        let s = self.js.get_stream(stream).await.expect("get stream");
        let consumer = s
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                ..consumer::pull::Config::default()
            })
            .await
            .expect("create a reader");
        let mut messages = consumer.messages().await.expect("read the stream");
        let mut got = Vec::with_capacity(expected);
        let deadline = Instant::now() + within;
        loop {
            let until = if got.len() >= expected {
                Instant::now() + Duration::from_millis(300)
            } else {
                deadline
            };
            match tokio::time::timeout_at(until, messages.next()).await {
                Ok(Some(Ok(m))) => got.push(to_message(stream, &m)),
                Ok(Some(Err(e))) => panic!("reading {stream}: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        got
    }

    async fn cleanup(&self) {
        let streams = std::mem::take(
            &mut *self
                .streams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for s in streams {
            // Already gone (a test deleted it) is fine.
            let _deleted = self.js.delete_stream(&s).await;
        }
    }
}

/// The servers and connect options of a test URL, for raw async-nats clients.
fn raw_options(url: &str) -> (String, async_nats::ConnectOptions) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let auth = rest.split(['/', '?']).next().unwrap_or(rest);
    let options = async_nats::ConnectOptions::new();
    match auth.rsplit_once('@') {
        Some((userinfo, _)) => match userinfo.split_once(':') {
            Some((u, p)) => (
                format!("nats://{}", authority(url)),
                options.user_and_password(u.into(), p.into()),
            ),
            None => (
                format!("nats://{}", authority(url)),
                options.token(userinfo.into()),
            ),
        },
        None => (format!("nats://{}", authority(url)), options),
    }
}

/// The herald message a stored message stands for: key from `x-herald-key`, id from
/// `Nats-Msg-Id`, the other headers as sent.
fn to_message(stream: &str, m: &jetstream::Message) -> Message {
    let mut out = Message::new(stream, m.payload.clone());
    if let Some(headers) = &m.headers {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (name, values) in headers.iter() {
            for v in values {
                pairs.push((name.to_string(), v.to_string()));
            }
        }
        // HeaderMap iterates in no particular order: sort for a stable comparison.
        pairs.sort();
        for (name, value) in pairs {
            match name.as_str() {
                "x-herald-key" => out = out.with_key(value),
                "Nats-Msg-Id" => {
                    if let Ok(id) = value.parse::<MessageId>() {
                        out = out.with_id(id);
                    }
                }
                _ => out = out.with_header(name, value),
            }
        }
    }
    out
}

/// The conformance harness: transports connect through a fault proxy, so that faults are real
/// connection cuts; each destination is a subject of its own stream.
struct NatsHarness {
    admin: Admin,
    proxy: FaultProxy,
    proxied_url: String,
    /// Subject → stream.
    streams: Mutex<HashMap<String, String>>,
}

impl NatsHarness {
    async fn new() -> Self {
        let url = url();
        let target = authority(&url);
        let proxy = FaultProxy::start(&target).await.expect("fault proxy");
        let proxied_url = url.replacen(&target, &proxy.addr().to_string(), 1);
        Self {
            admin: Admin::connect(&url).await,
            proxy,
            proxied_url,
            streams: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl Harness for NatsHarness {
    type Transport = NatsTransport;

    async fn transport(&self) -> NatsTransport {
        NatsTransport::new(
            NatsConfig::from_url(&self.proxied_url)
                .expect("url")
                .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
        )
        .expect("transport")
    }

    async fn destination(&self, hint: &str) -> Destination {
        let (stream, subject) = self.admin.stream(hint).await;
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(subject.clone(), stream);
        herald_nats::subject(&subject)
    }

    fn answers_early(&self) -> bool {
        true
    }

    fn poison(&self, destination: &Destination) -> Option<Message> {
        // No stream captures it: JetStream has no responder, a permanent NO_STREAM.
        Some(Message::new(
            herald_nats::subject(&format!("herald.it.nostream.{}", uniq())),
            format!("poison for {destination}"),
        ))
    }

    async fn read_back(&self, destination: &Destination, expected: usize) -> Option<Vec<Message>> {
        let stream = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(destination.as_str())
            .cloned()?;
        Some(
            self.admin
                .read(&stream, expected, Duration::from_secs(60))
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
#[ignore = "needs NATS: cargo xtask it"]
async fn conformance_suite() {
    let h = NatsHarness::new().await;
    conformance::run(&h).await;
    h.admin.cleanup().await;
}

/// async-nats builds its TLS settings (for `tls://`, and for a `nats://` server that asks for
/// TLS) from rustls's process-wide crypto provider, so herald installed ring's as the
/// application's default at every connection, TLS or not: an application choosing aws-lc-rs
/// afterwards was refused. The transport hands the client settings of its own now, and
/// chooses nothing (but on a machine whose roots cannot be read, where it falls back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn a_connection_chooses_no_crypto_provider_for_the_application() {
    let admin = Admin::connect(&url()).await;
    let (_stream, subject) = admin.stream("provider").await;
    let dest = herald_nats::subject(&subject);
    let transport = NatsTransport::new(NatsConfig::from_url(&url()).expect("url")).expect("t");
    let outcome = transport
        .send_batch(&dest, &[Message::new(dest.clone(), "p")])
        .await;
    assert!(outcome[0].is_ok(), "{outcome:?}");
    let roots = herald_core::tls::client_config(None, None, "-").is_ok();
    assert_eq!(
        async_nats::rustls::crypto::CryptoProvider::get_default().is_some(),
        !roots,
        "a process default chosen (system roots readable: {roots})"
    );
    transport.close().await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn ten_thousand_keyed_messages_read_back_in_per_key_order() {
    const N: usize = 10_000;
    let admin = Admin::connect(&url()).await;
    let (stream, subject) = admin.stream("10k").await;
    let dest = herald_nats::subject(&subject);
    let transport = NatsTransport::new(NatsConfig::from_url(&url()).expect("url")).expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let sent: Vec<Message> = (0..N)
        .map(|i| {
            Message::new(
                dest.clone(),
                format!("payload-{i:05}-{}", "x".repeat(i % 50)),
            )
            .with_key(format!("key-{}", i % 16))
            .with_header("seq", i.to_string())
        })
        .collect();
    let report = p.send_all(sent.clone()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, N as u64);
    p.close(Duration::from_secs(30)).await;
    let got = admin.read(&stream, N, Duration::from_secs(120)).await;
    assert_eq!(got.len(), N, "exactly N messages, no duplicates, none lost");
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
    assert_eq!(by_key.len(), 16);
    for (k, want) in &sent_by_key {
        let have = by_key.get(k).expect("every key arrived");
        assert_eq!(have.len(), want.len());
        for (h, w) in have.iter().zip(want) {
            assert_eq!(h.payload(), w.payload(), "payload, in order");
            assert_eq!(h.headers(), w.headers(), "headers as sent");
            assert!(h.id().is_some(), "a herald id as Nats-Msg-Id");
        }
    }
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn connection_cut_mid_run_loses_nothing_and_keeps_per_key_order() {
    const N: usize = 30_000;
    let url = url();
    let admin = Admin::connect(&url).await;
    let (stream, subject) = admin.stream("cut").await;
    let target = authority(&url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = NatsTransport::new(
        NatsConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
    )
    .expect("t");
    let probe = transport.clone();
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    let dest = herald_nats::subject(&subject);
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("f-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    // In three parts, a cut between each (see `cut_twice_mid_run`).
    let outstanding = cut_twice_mid_run(
        &p,
        &sent,
        &proxy,
        || !probe.is_connected(),
        Duration::from_secs(180),
    )
    .await;
    assert!(probe.is_connected(), "connected again");
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(30)).await;
    let got = admin.read(&stream, N, Duration::from_secs(60)).await;
    assert_complete_in_key_order("connection cut", &sent, &got);
    // What a retry sent again, JetStream dropped by its Nats-Msg-Id: one copy of each.
    assert_eq!(
        got.len(),
        N,
        "no duplicates in the stream ({retries} retries)"
    );
    eprintln!(
        "connection cut ({outstanding:?} outstanding at the cuts): {N} delivered, {} stored, {retries} retries",
        got.len()
    );
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn an_unreachable_server_hands_every_message_back_by_the_delivery_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let transport = NatsTransport::new(
        NatsConfig::from_url(&format!("nats://127.0.0.1:{port}/orders"))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100)),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("producer");
    let report = p
        .send_all((0..200).map(|i| {
            Message::new(herald_nats::subject("orders"), format!("u-{i}"))
                .with_key(format!("k{}", i % 4))
        }))
        .await
        .wait()
        .await;
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
#[ignore = "needs NATS: cargo xtask it"]
async fn oversized_payloads_are_permanent_at_once() {
    let admin = Admin::connect(&url()).await;
    // A stream that takes at most 4 KiB per message.
    let (_, small) = admin
        .stream_with("small", |c| stream::Config {
            max_message_size: 4096,
            ..c
        })
        .await;
    let transport = NatsTransport::new(NatsConfig::from_url(&url()).expect("url")).expect("t");
    let p = quick_retries(Producer::builder(transport))
        .max_message_bytes(8 << 20)
        .delivery_timeout(Duration::from_secs(60))
        .build()
        .expect("producer");
    // Above the stream's max_msg_size, among messages that fit: refused by JetStream.
    let dest = herald_nats::subject(&small);
    let mut msgs: Vec<Message> = (0..20)
        .map(|i| Message::new(dest.clone(), format!("ok-{i}")).with_key(format!("k{}", i % 2)))
        .collect();
    msgs.insert(
        10,
        Message::new(dest.clone(), vec![b'x'; 10_000]).with_key("k0"),
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
        10_000,
        "the message comes back"
    );
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("PAYLOAD_TOO_LARGE"), "{te}");
    // Above the server's max_payload (1 MiB by default): refused by the client, not sent.
    let (_, any) = admin.stream("big").await;
    let e = p
        .send(Message::new(
            herald_nats::subject(&any),
            vec![b'x'; 2 << 20],
        ))
        .await
        .expect_err("larger than max_payload");
    assert_eq!((e.class(), e.attempts()), (ErrorClass::Permanent, 1), "{e}");
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("PAYLOAD_TOO_LARGE"), "{te}");
    p.close(Duration::from_secs(10)).await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn duplicates_within_the_window_are_dropped_by_nats_msg_id() {
    let admin = Admin::connect(&url()).await;
    let (stream, subject) = admin.stream("dup").await;
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let transport = metrics::with_local_recorder(&recorder, || {
        NatsTransport::new(NatsConfig::from_url(&url()).expect("url"))
    })
    .expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let dest = herald_nats::subject(&subject);
    // The same message, id included, twice: what a retry after a lost PubAck sends.
    let once = Message::new(dest.clone(), "exactly once")
        .with_key("k")
        .with_id(MessageId::from_u128(
            0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70 ^ u128::from(std::process::id()),
        ));
    let first = p.send(once.clone()).await.expect("first copy");
    let second = p
        .send(once.clone())
        .await
        .expect("second copy: acknowledged too");
    assert_eq!(
        first.ack.offset, second.ack.offset,
        "the duplicate's PubAck names the first copy's sequence"
    );
    // Identical content with ids of their own are two messages.
    p.send(Message::new(dest.clone(), "exactly once").with_key("k"))
        .await
        .expect("a distinct message");
    p.close(Duration::from_secs(10)).await;
    assert_eq!(
        admin.count(&stream).await,
        2,
        "one copy of the duplicated message"
    );
    let got = admin.read(&stream, 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id(), once.id(), "sent under the message's own id");
    assert_ne!(got[1].id(), once.id());
    let duplicates: u64 = snapshotter
        .snapshot()
        .into_vec()
        .iter()
        .filter(|(k, ..)| k.key().name() == herald_nats::metrics::DUPLICATES)
        .map(|(.., v)| match v {
            metrics_util::debugging::DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum();
    assert_eq!(duplicates, 1, "counted in herald_nats_duplicates_total");
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn refusals_are_classified_no_stream_a_full_stream_a_lost_conditional_publish() {
    let admin = Admin::connect(&url()).await;
    let t = NatsTransport::new(NatsConfig::from_url(&url()).expect("url")).expect("t");
    // No stream captures the subject: permanent, for every message of the batch.
    let nowhere = herald_nats::subject(&format!("herald.it.nostream.{}", uniq()));
    let out = t
        .send_batch(
            &nowhere,
            &[
                Message::new(nowhere.clone(), "a"),
                Message::new(nowhere.clone(), "b"),
            ],
        )
        .await;
    for o in &out {
        let e = o.as_ref().expect_err("no stream");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("NO_STREAM")),
            "{e}"
        );
    }
    // A stream at its byte limit with discard=new: transient STORAGE_FULL, the rest held.
    let (_, full) = admin
        .stream_with("full", |c| stream::Config {
            max_bytes: 2048,
            discard: stream::DiscardPolicy::New,
            ..c
        })
        .await;
    let dest = herald_nats::subject(&full);
    let batch: Vec<Message> = (0..20)
        .map(|i| {
            Message::new(dest.clone(), vec![b'x'; 400])
                .with_key(format!("k{}", i % 2))
                .with_id(MessageId::from_u128(u128::from(i as u32) + 1))
        })
        .collect();
    let out = t.send_batch(&dest, &batch).await;
    assert_eq!(out.len(), 20);
    let first_failure = out
        .iter()
        .position(Result::is_err)
        .expect("the stream fills up");
    assert!(first_failure > 0, "some fit");
    let e = out[first_failure].as_ref().expect_err("full");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Transient, Some("STORAGE_FULL")),
        "{e}"
    );
    assert!(
        e.message().contains("maximum bytes"),
        "the server's words: {e}"
    );
    for o in &out[first_failure..] {
        let e = o.as_ref().expect_err("nothing after fits");
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    }
    // A conditional publish that loses its race (the caller's own
    // Nats-Expected-Last-Sequence header, not the stream's last): permanent, as the server
    // names it; a second one on the right sequence is stored.
    let (_, cond) = admin.stream("conditional").await;
    let dest = herald_nats::subject(&cond);
    let out = t
        .send_batch(
            &dest,
            &[
                Message::new(dest.clone(), "wrong").with_header("Nats-Expected-Last-Sequence", "7"),
                Message::new(dest.clone(), "right").with_header("Nats-Expected-Last-Sequence", "0"),
            ],
        )
        .await;
    let e = out[0].as_ref().expect_err("the stream is empty, not at 7");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("WRONG_LAST_SEQUENCE")),
        "{e}"
    );
    out[1].as_ref().expect("the stream's last sequence is 0");
    t.close().await;
    admin.cleanup().await;
}

/// A message stored ahead of the retry of an earlier message of its key (the earlier one
/// refused for a moment: the stream full, the later one small enough to fit) is stored again
/// behind it, under a `Nats-Msg-Id` of its own: JetStream would drop a copy under the same id,
/// keeping only the one out of order. Before, the stream held `small, big` (the copy sent
/// again counted as a duplicate); now `small, big, small`: the last copies are in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn a_message_stored_ahead_of_its_key_s_retry_is_stored_again_behind_it() {
    let admin = Admin::connect(&url()).await;
    let (stream, subject) = admin
        .stream_with("ahead", |c| stream::Config {
            max_bytes: 2048,
            discard: stream::DiscardPolicy::New,
            ..c
        })
        .await;
    // Fills most of the stream, until deleted below.
    let filler = admin
        .js
        .publish(subject.clone(), vec![b'f'; 1200].into())
        .await
        .expect("publish the filler")
        .await
        .expect("filler stored")
        .sequence;
    let transport = NatsTransport::new(NatsConfig::from_url(&url()).expect("url")).expect("t");
    let p = quick_retries(Producer::builder(transport))
        .build()
        .expect("producer");
    let dest = herald_nats::subject(&subject);
    let big = Message::new(dest.clone(), vec![b'b'; 1000]).with_key("k");
    let small = Message::new(dest.clone(), "small").with_key("k");
    let receipt = p.send_all([big, small]).await;
    // The big one was refused (the stream is full) and the small one stored, then held.
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.stats().totals.retries < 2 {
        assert!(Instant::now() < deadline, "no retry: {:?}", p.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    admin
        .js
        .get_stream(&stream)
        .await
        .expect("get stream")
        .delete_message(filler)
        .await
        .expect("delete the filler");
    let report = receipt.wait().await;
    assert!(report.all_delivered(), "{:?}", report.failed.first());
    p.close(Duration::from_secs(10)).await;
    let got: Vec<String> = admin
        .read(&stream, 3, Duration::from_secs(10))
        .await
        .iter()
        .map(|m| {
            String::from_utf8_lossy(m.payload())
                .chars()
                .take(5)
                .collect()
        })
        .collect();
    assert_eq!(
        got,
        ["small", "bbbbb", "small"],
        "the small one's last copy behind the big one"
    );
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn the_url_s_stream_is_created_on_connect_and_used() {
    let admin = Admin::connect(&url()).await;
    let id = uniq();
    let stream = format!("HERALD_IT_URL_{id}");
    let subject = format!("herald.it.url.{id}");
    admin.adopt(&stream);
    let config = NatsConfig::from_url(&format!(
        "{}/{subject}?stream={stream}",
        url().trim_end_matches('/')
    ))
    .expect("url");
    let dest = config.destination().expect("a subject");
    let t = NatsTransport::new(config).expect("t");
    t.connect().await.expect("connects and declares");
    let mut info = admin.js.get_stream(&stream).await.expect("created");
    let info = info.info().await.expect("info");
    assert_eq!(info.config.subjects, vec![subject.clone()]);
    assert_eq!(info.config.storage, stream::StorageType::File);
    // (No producer here: closing it would close the connection, and a new connection
    // declares the stream again anyway.)
    let out = t
        .send_batch(&dest, &[Message::new(dest.clone(), "via the URL")])
        .await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    assert_eq!(admin.count(&stream).await, 1);
    // Deleted under the transport's connection: the next batch finds no responder (transient,
    // since the transport declares a stream for the subject), the one after declares it again.
    admin.js.delete_stream(&stream).await.expect("delete");
    let out = t
        .send_batch(
            &herald_nats::subject(&subject),
            &[Message::new(subject.as_str(), "again")],
        )
        .await;
    let e = out[0].as_ref().expect_err("no stream for now");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Transient, Some("NO_STREAM")),
        "{e}"
    );
    let out = t
        .send_batch(
            &herald_nats::subject(&subject),
            &[Message::new(subject.as_str(), "again")],
        )
        .await;
    assert!(out[0].is_ok(), "declared again: {:?}", out[0]);
    t.close().await;
    // A declaration whose subjects another stream captures: a configuration to fix,
    // permanent at once (before: transient DECLARE_FAILED, retried until the delivery
    // timeout, for every subject of the transport).
    let clash = NatsTransport::new(
        NatsConfig::from_url(&format!(
            "{}/{subject}?stream={stream}_OTHER",
            url().trim_end_matches('/')
        ))
        .expect("url"),
    )
    .expect("t");
    let e = clash.connect().await.expect_err("the subject is taken");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("STREAM_SUBJECT_OVERLAP")),
        "{e}"
    );
    clash.close().await;
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn down_clears_without_traffic_once_the_server_is_back() {
    let url = url();
    let target = authority(&url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = NatsTransport::new(
        NatsConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
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

// ---- a nats-server of the test's own -----------------------------------------------------

/// Says why a test cannot run here: fails, unless `HERALD_IT_ALLOW_SKIP=1`.
fn cannot_run(test: &str, why: &str) {
    if std::env::var("HERALD_IT_ALLOW_SKIP").as_deref() == Ok("1") {
        println!("SKIPPED: {test}: {why}");
    } else {
        panic!("{test}: {why} (set HERALD_IT_ALLOW_SKIP=1 to skip instead)");
    }
}

fn nats_server_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/bin".into()])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A JetStream-enabled nats-server of a test's own: its own port and store folder, killed
/// (and its folder removed) on drop.
struct OwnServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl OwnServer {
    /// Starts one, with `config` (a nats-server config file's text, `{port}` and `{dir}`
    /// filled in) or the plain `-js` command line; `None` (after [`cannot_run`]) without
    /// nats-server on this machine.
    async fn start(test: &str, config: Option<&str>) -> Option<Self> {
        let Some(binary) = nats_server_binary() else {
            cannot_run(
                test,
                "no nats-server on this machine (apt-get install nats-server)",
            );
            return None;
        };
        let dir = std::env::temp_dir().join(format!("herald-nats-it-{}", uniq()));
        std::fs::create_dir_all(&dir).expect("server folder");
        let port = free_port();
        if let Some(config) = config {
            let text = config
                .replace("{port}", &port.to_string())
                .replace("{dir}", &dir.join("store").to_string_lossy());
            std::fs::write(dir.join("server.conf"), text).expect("config file");
        }
        let mut server = Self {
            binary,
            dir,
            port,
            child: None,
        };
        server.run().await;
        Some(server)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Runs the server process and waits until it takes connections.
    async fn run(&mut self) {
        let mut cmd = Command::new(&self.binary);
        let conf = self.dir.join("server.conf");
        if conf.is_file() {
            cmd.arg("-c").arg(&conf);
        } else {
            cmd.args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("store"));
        }
        let log = std::fs::File::create(self.dir.join("server.log")).expect("log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                panic!("nats-server exited ({status}): {log}");
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

/// A server that hangs with its connection open (stopped: no PubAck, no error, the socket up)
/// is given up once silent for `ack_timeout`, though every attempt is cut off sooner by a
/// shorter delivery timeout; the messages go through on a new connection once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn a_hung_server_is_given_up_within_a_short_delivery_timeout() {
    const TEST: &str = "a_hung_server_is_given_up_within_a_short_delivery_timeout";
    let Some(server) = OwnServer::start(TEST, None).await else {
        return;
    };
    let url = server.url();
    let admin = Admin::connect(&url).await;
    let (stream, subject) = admin.stream("hung").await;
    drop(admin);
    let target = url.trim_start_matches("nats://").to_owned();
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = NatsTransport::new(
        NatsConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .ack_timeout(Duration::from_secs(3))
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let dest = herald_nats::subject(&subject);
    herald_testkit::scenario::a_hung_server_is_given_up(transport, &dest, &proxy, server.pid())
        .await;
    let admin = Admin::connect(&url).await;
    admin.adopt(&stream);
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn server_restart_mid_run_loses_nothing_and_keeps_per_key_order() {
    const TEST: &str = "server_restart_mid_run_loses_nothing_and_keeps_per_key_order";
    const N: usize = 20_000;
    let Some(mut server) = OwnServer::start(TEST, None).await else {
        return;
    };
    let url = server.url();
    let admin = Admin::connect(&url).await;
    let (stream, subject) = admin.stream("restart").await;
    drop(admin);
    let transport = NatsTransport::new(
        NatsConfig::from_url(&url)
            .expect("url")
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    let dest = herald_nats::subject(&subject);
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("r-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    // Half the run, stopped once it is being delivered; the other half sent while the server
    // is down: the run goes on across the restart however fast the first half went.
    let mut run = RunInParts::new(&p, &sent, 2);
    run.send_next().await;
    run.wait_flowing(Duration::from_secs(60)).await;
    server.kill();
    let at_kill = p.stats().totals.delivered;
    let outstanding = run.outstanding();
    assert!(outstanding > 0, "the stop found messages outstanding");
    run.send_next().await;
    server.run().await;
    run.finish(Duration::from_secs(180)).await;
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(30)).await;
    let admin = Admin::connect(&url).await;
    let got = admin.read(&stream, N, Duration::from_secs(60)).await;
    assert_complete_in_key_order("restart", &sent, &got);
    assert_eq!(
        got.len(),
        N,
        "no duplicates in the stream ({retries} retries)"
    );
    eprintln!(
        "restart: {at_kill} delivered at the kill ({outstanding} of the first half outstanding), {} stored, {retries} retries",
        got.len()
    );
    admin.adopt(&stream);
    admin.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn credentials_and_permissions_are_classified() {
    const TEST: &str = "credentials_and_permissions_are_classified";
    let config = "listen: 127.0.0.1:{port}\n\
                  jetstream { store_dir: \"{dir}\" }\n\
                  authorization {\n\
                    users = [\n\
                      { user: herald, password: \"pw-secret\", permissions: { publish: { deny: [\"forbidden.>\"] } } }\n\
                    ]\n\
                  }\n";
    let Some(server) = OwnServer::start(TEST, Some(config)).await else {
        return;
    };
    let good = format!("nats://herald:pw-secret@127.0.0.1:{}", server.port);
    // Wrong password: permanent, the password never shown.
    let wrong = NatsTransport::new(
        NatsConfig::from_url(&format!("nats://herald:wrong-pw@127.0.0.1:{}", server.port))
            .expect("url"),
    )
    .expect("t");
    let e = wrong.connect().await.expect_err("wrong password");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("AUTHORIZATION_VIOLATION")),
        "{e}"
    );
    assert!(!e.to_string().contains("wrong-pw"), "{e}");
    // A denied subject (a stream captures it, so it is the permission that fails):
    // permanent, as soon as the server says so, long before the ack timeout.
    let admin = Admin::connect(&good).await;
    let (_, allowed) = admin.stream("allowed").await;
    admin
        .js
        .create_stream(stream::Config {
            name: format!("FORBIDDEN_{}", uniq()),
            subjects: vec!["forbidden.>".into()],
            ..stream::Config::default()
        })
        .await
        .expect("a stream for the denied subjects");
    let t = NatsTransport::new(
        NatsConfig::from_url(&good)
            .expect("url")
            .ack_timeout(Duration::from_secs(60)),
    )
    .expect("t");
    let denied = herald_nats::subject("forbidden.orders");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        t.send_batch(
            &denied,
            &[
                Message::new(denied.clone(), "no"),
                Message::new(denied.clone(), "no"),
            ],
        ),
    )
    .await
    .expect("answered before the 60 s ack timeout");
    for o in &out {
        let e = o.as_ref().expect_err("denied");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("PERMISSION_DENIED")),
            "{e}"
        );
    }
    // The connection goes on for the subjects it may publish to.
    let ok = herald_nats::subject(&allowed);
    let out = t.send_batch(&ok, &[Message::new(ok.clone(), "yes")]).await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    // Permissions change while the connection lives (a configuration reload applies to the
    // clients connected): the same connection publishes once granted, and is refused once
    // revoked again. (A denial is not remembered for the connection's life.)
    let denying = std::fs::read_to_string(server.dir.join("server.conf")).expect("config");
    let reload = |text: &str| {
        std::fs::write(server.dir.join("server.conf"), text).expect("config file");
        herald_testkit::scenario::signal(server.pid(), "HUP");
    };
    reload(&denying.replace(
        "permissions: { publish: { deny: [\"forbidden.>\"] } }",
        "permissions: { publish: { allow: [\">\"] } }",
    ));
    // Sends one message to the denied subject every 100 ms until `done` says its outcome is
    // the one awaited, for at most 20 s (reloads apply within moments).
    let until = async |text: &str, done: fn(&Result<herald_core::Ack, TransportError>) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = t
                .send_batch(&denied, &[Message::new(denied.clone(), text.to_owned())])
                .await;
            let outcome = out.into_iter().next().expect("one answer");
            if done(&outcome) || Instant::now() >= deadline {
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let granted = until("now allowed", Result::is_ok).await;
    assert!(
        granted.is_ok(),
        "still denied 20 s after the reload granted the subject: {granted:?}"
    );
    reload(&denying);
    let e = until("denied again", Result::is_err)
        .await
        .expect_err("denied within 20 s of the reload that revoked the subject");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("PERMISSION_DENIED")),
        "{e}"
    );
    t.close().await;
    drop(server);
}

/// A user who may publish but not subscribe to the reply inbox: JetStream stores what it
/// publishes, but no PubAck can reach it. Each message fails permanently, saying it may have
/// been stored (it was); once a reload grants the inbox, the next batch goes through (a new
/// connection subscribes it again). Before, the connection was kept, its inbox never
/// subscribed again, and every message was denied until the connection happened to drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn a_denied_reply_inbox_says_stored_maybe_and_a_grant_takes_effect() {
    const TEST: &str = "a_denied_reply_inbox_says_stored_maybe_and_a_grant_takes_effect";
    let config = "listen: 127.0.0.1:{port}\n\
                  jetstream { store_dir: \"{dir}\" }\n\
                  authorization {\n\
                    users = [\n\
                      { user: herald, password: \"pw\", permissions: { subscribe: { deny: [\"_INBOX.>\"] } } }\n\
                      { user: admin, password: \"pw\" }\n\
                    ]\n\
                  }\n";
    let Some(server) = OwnServer::start(TEST, Some(config)).await else {
        return;
    };
    let admin = Admin::connect(&format!("nats://admin:pw@127.0.0.1:{}", server.port)).await;
    let (stream, subject) = admin.stream("inbox").await;
    let t = NatsTransport::new(
        NatsConfig::from_url(&format!("nats://herald:pw@127.0.0.1:{}", server.port))
            .expect("url")
            .ack_timeout(Duration::from_secs(60)),
    )
    .expect("t");
    let dest = herald_nats::subject(&subject);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        t.send_batch(
            &dest,
            &[
                Message::new(dest.clone(), "a"),
                Message::new(dest.clone(), "b"),
            ],
        ),
    )
    .await
    .expect("answered before the 60 s ack timeout");
    for o in &out {
        let e = o.as_ref().expect_err("no PubAck can come");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("PERMISSION_DENIED")),
            "{e}"
        );
        assert!(e.message().contains("may have been stored"), "{e}");
    }
    assert_eq!(admin.count(&stream).await, 2, "stored all the same");
    let denying = std::fs::read_to_string(server.dir.join("server.conf")).expect("config");
    std::fs::write(
        server.dir.join("server.conf"),
        denying.replace(", permissions: { subscribe: { deny: [\"_INBOX.>\"] } }", ""),
    )
    .expect("config file");
    herald_testkit::scenario::signal(server.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = t
            .send_batch(&dest, &[Message::new(dest.clone(), "granted")])
            .await;
        if out[0].is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still denied 20 s after the reload granted the inbox: {:?}",
            out[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.close().await;
    admin.cleanup().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: cargo xtask it"]
async fn tls_with_a_custom_ca_works_and_an_unknown_ca_is_refused() {
    const TEST: &str = "tls_with_a_custom_ca_works_and_an_unknown_ca_is_refused";
    if !Path::new("/usr/bin/openssl").is_file() {
        cannot_run(TEST, "no openssl on this machine to make the certificates");
        return;
    }
    let certs = std::env::temp_dir().join(format!("herald-nats-it-certs-{}", uniq()));
    std::fs::create_dir_all(&certs).expect("cert folder");
    herald_testkit::tls::make_test_certs(&certs);
    let f = |n: &str| certs.join(n).to_string_lossy().into_owned();
    let config = format!(
        "listen: 127.0.0.1:{{port}}\n\
         jetstream {{ store_dir: \"{{dir}}\" }}\n\
         tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
        f("server.pem"),
        f("server.key")
    );
    let Some(server) = OwnServer::start(TEST, Some(&config)).await else {
        let _removed = std::fs::remove_dir_all(&certs);
        return;
    };
    let url = format!(
        "tls://localhost:{}/herald.it.tls?stream=HERALD_IT_TLS",
        server.port
    );
    // Without the test's CA: refused, permanently (proof that the certificate is checked).
    let untrusted = NatsTransport::new(NatsConfig::from_url(&url).expect("url")).expect("t");
    let e = untrusted.connect().await.expect_err("an unknown CA");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("TLS_ERROR")),
        "{e}"
    );
    // With it: connects, declares the URL's stream, publishes.
    let config = NatsConfig::from_url(&url)
        .expect("url")
        .tls_ca_file(certs.join("ca.pem"));
    let dest = config.destination().expect("subject");
    let t = NatsTransport::new(config).expect("t");
    let out = t
        .send_batch(&dest, &[Message::new(dest.clone(), "over tls")])
        .await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    t.close().await;
    drop(server);
    let _removed = std::fs::remove_dir_all(&certs);
}

/// Sends one message through a transport made from `config` to `subject` (the stream made by
/// the URL's or config's `?stream=`).
async fn one_message_through(config: NatsConfig) -> Result<(), TransportError> {
    let dest = config.destination().expect("a subject");
    let t = NatsTransport::new(config).expect("transport");
    let out = t
        .send_batch(&dest, &[Message::new(dest.clone(), "authenticated")])
        .await;
    t.close().await;
    out.into_iter().next().expect("one outcome").map(drop)
}

/// Writes `text` to `name` in `dir` and returns the path.
fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a key file");
    path
}

/// An NKey user: the seed file authenticates, another user's seed is refused permanently (and
/// the seed never shows in the error), and the URL's `?nkey=` does what the setter does.
#[tokio::test]
#[ignore = "needs nats-server on this machine: cargo xtask it nats"]
async fn an_nkey_seed_authenticates_and_a_stranger_s_is_refused() {
    const TEST: &str = "an_nkey_seed_authenticates_and_a_stranger_s_is_refused";
    let user = nkeys::KeyPair::new_user();
    let config = format!(
        "listen: 127.0.0.1:{{port}}\n\
         jetstream {{ store_dir: \"{{dir}}\" }}\n\
         authorization {{ users = [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    );
    let Some(server) = OwnServer::start(TEST, Some(&config)).await else {
        return;
    };
    let seed = user.seed().expect("seed");
    let good = write_file(&server.dir, "user.nk", &format!("{seed}\n"));
    let url = format!(
        "nats://127.0.0.1:{}/herald.it.nkey?stream=HERALD_IT_NKEY",
        server.port
    );
    let config = NatsConfig::from_url(&url)
        .expect("url")
        .nkey_seed_file(&good);
    one_message_through(config).await.expect("the user's seed");
    let query = format!("{url}&nkey={}", good.display());
    one_message_through(NatsConfig::from_url(&query).expect("url"))
        .await
        .expect("the seed through the URL");

    let stranger_seed = nkeys::KeyPair::new_user().seed().expect("seed");
    let stranger = write_file(&server.dir, "stranger.nk", &stranger_seed);
    let config = NatsConfig::from_url(&url)
        .expect("url")
        .nkey_seed_file(&stranger);
    let e = one_message_through(config).await.expect_err("a stranger");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("AUTHORIZATION_VIOLATION")),
        "{e}"
    );
    assert!(!e.to_string().contains(&stranger_seed), "{e}");
    // Without any credentials: refused too (proof that the server asks for them).
    let e = one_message_through(NatsConfig::from_url(&url).expect("url"))
        .await
        .expect_err("no key");
    assert_eq!(e.code(), Some("AUTHORIZATION_VIOLATION"), "{e}");
}

/// A JWT signed by `issuer`, as nsc makes them (`ed25519-nkey`).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::engine::{general_purpose::URL_SAFE_NO_PAD, Engine as _};
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": uniq(),
        "iat": SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A `.creds` file, as nsc writes them.
fn creds(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// Decentralised JWT authentication (an operator, an account with JetStream, a user): the
/// user's `.creds` file authenticates and publishes; a user the account did not sign is
/// refused permanently; a rotated file is read by the next connection.
#[tokio::test]
#[ignore = "needs nats-server on this machine: cargo xtask it nats"]
async fn a_creds_file_authenticates_against_an_operator_s_server() {
    const TEST: &str = "a_creds_file_authenticates_against_an_operator_s_server";
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "herald-it",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "HERALD",
        serde_json::json!({
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            },
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2
        }),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let user_claims = serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2
    });
    let user = nkeys::KeyPair::new_user();
    let user_jwt = jwt(&account, &user.public_key(), "app", user_claims.clone());
    let folder = std::env::temp_dir().join(format!("herald-nats-it-jwt-{}", uniq()));
    std::fs::create_dir_all(&folder).expect("folder");
    let operator_file = write_file(&folder, "operator.jwt", &operator_jwt);
    let config = format!(
        "listen: 127.0.0.1:{{port}}\n\
         jetstream {{ store_dir: \"{{dir}}\" }}\n\
         operator: \"{}\"\n\
         system_account: {}\n\
         resolver: MEMORY\n\
         resolver_preload: {{ {}: \"{account_jwt}\", {}: \"{system_jwt}\" }}\n",
        operator_file.display(),
        system.public_key(),
        account.public_key(),
        system.public_key()
    );
    let Some(server) = OwnServer::start(TEST, Some(&config)).await else {
        let _removed = std::fs::remove_dir_all(&folder);
        return;
    };
    let creds_file = write_file(
        &folder,
        "app.creds",
        &creds(&user_jwt, &user.seed().expect("seed")),
    );
    let url = format!(
        "nats://127.0.0.1:{}/herald.it.jwt?stream=HERALD_IT_JWT",
        server.port
    );
    let config = NatsConfig::from_url(&url)
        .expect("url")
        .credentials_file(&creds_file);
    one_message_through(config.clone())
        .await
        .expect("the user's creds");

    // A user signed by an account the server does not know: refused, permanently.
    let stranger = nkeys::KeyPair::new_user();
    let stranger_jwt = jwt(
        &nkeys::KeyPair::new_account(),
        &stranger.public_key(),
        "stranger",
        user_claims.clone(),
    );
    let stranger_seed = stranger.seed().expect("seed");
    let stranger_file = write_file(
        &folder,
        "stranger.creds",
        &creds(&stranger_jwt, &stranger_seed),
    );
    let e = one_message_through(
        NatsConfig::from_url(&url)
            .expect("url")
            .credentials_file(&stranger_file),
    )
    .await
    .expect_err("a stranger");
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(!e.to_string().contains(&stranger_seed), "{e}");

    // The file is read again by every new connection: a transport built on the stranger's
    // file works once the file is rotated to a user of the account, without a restart.
    let t = NatsTransport::new(
        NatsConfig::from_url(&url)
            .expect("url")
            .credentials_file(&stranger_file),
    )
    .expect("transport");
    let dest = config.destination().expect("subject");
    let out = t
        .send_batch(&dest, &[Message::new(dest.clone(), "before")])
        .await;
    assert!(out[0].is_err(), "the stranger is refused: {:?}", out[0]);
    let rotated = nkeys::KeyPair::new_user();
    let rotated_jwt = jwt(&account, &rotated.public_key(), "app", user_claims);
    std::fs::write(
        &stranger_file,
        creds(&rotated_jwt, &rotated.seed().expect("seed")),
    )
    .expect("rotate");
    let out = t
        .send_batch(&dest, &[Message::new(dest.clone(), "rotated")])
        .await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    t.close().await;
    drop(server);
    let _removed = std::fs::remove_dir_all(&folder);
}

/// Mutual TLS: a server that verifies client certificates takes herald's (`?tlscert=` and
/// `?tlskey=` in the URL, as the command gives them) and refuses a client without one.
#[tokio::test]
#[ignore = "needs nats-server on this machine: cargo xtask it nats"]
async fn a_client_certificate_is_presented_where_the_server_asks_for_one() {
    const TEST: &str = "a_client_certificate_is_presented_where_the_server_asks_for_one";
    if !Path::new("/usr/bin/openssl").is_file() {
        cannot_run(TEST, "no openssl on this machine to make the certificates");
        return;
    }
    let certs = std::env::temp_dir().join(format!("herald-nats-it-mtls-{}", uniq()));
    std::fs::create_dir_all(&certs).expect("cert folder");
    herald_testkit::tls::make_test_certs(&certs);
    herald_testkit::tls::make_client_cert(&certs, "herald-client");
    let f = |n: &str| certs.join(n).to_string_lossy().into_owned();
    let config = format!(
        "listen: 127.0.0.1:{{port}}\n\
         jetstream {{ store_dir: \"{{dir}}\" }}\n\
         tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\n",
        f("server.pem"),
        f("server.key"),
        f("ca.pem")
    );
    let Some(server) = OwnServer::start(TEST, Some(&config)).await else {
        let _removed = std::fs::remove_dir_all(&certs);
        return;
    };
    let url = format!(
        "tls://localhost:{}/herald.it.mtls?stream=HERALD_IT_MTLS&tlsca={}",
        server.port,
        f("ca.pem")
    );
    // Without a client certificate: refused, permanently.
    let e = one_message_through(NatsConfig::from_url(&url).expect("url"))
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
    one_message_through(NatsConfig::from_url(&with_cert).expect("url"))
        .await
        .expect("the client certificate");
    // A key that is no key: an error when the transport is built, naming the file.
    let e = NatsTransport::new(
        NatsConfig::from_url(&url)
            .expect("url")
            .tls_client_cert(certs.join("client.pem"), certs.join("ca.pem")),
    )
    .expect_err("a certificate for a key");
    assert!(
        e.to_string().contains("client key file") && e.to_string().contains("ca.pem"),
        "{e}"
    );
    drop(server);
    let _removed = std::fs::remove_dir_all(&certs);
}
