//! Integration tests against a real MQTT broker (Mosquitto 2): `cargo xtask it mqtt`, or
//! `HERALD_MQTT_URL=mqtt://127.0.0.1:1883 cargo test -p herald-mqtt --test it -- --ignored
//! --test-threads=1`. Each test publishes to topics of its own (`herald/it/<test>/<unique>`)
//! and reads them back with a second client subscribed before anything is published.
//!
//! The server-restart test starts a `mosquitto` of its own (see [`OwnBroker`]) on a free port
//! with its own persistence folder, and stops it at the end: the shared broker is never
//! stopped or reconfigured. Without `mosquitto` on this machine that test fails, saying so,
//! unless `HERALD_IT_ALLOW_SKIP=1`, when it prints `SKIPPED: <test>: <why>` and passes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::{
    async_trait, Destination, ErrorClass, FailureReason, Message, MessageId, Producer,
    ProducerBuilder, Transport,
};
use herald_mqtt::{MqttConfig, MqttTransport, Qos};
use herald_testkit::checks::{
    assert_complete_in_key_order, cut_twice_mid_run, free_port, RunInParts,
};
use herald_testkit::conformance::{self, Harness, Injected};
use herald_testkit::proxy::FaultProxy;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::time::Instant;

/// The broker under test: `HERALD_MQTT_URL`, which `cargo xtask it mqtt` sets.
fn url() -> String {
    match std::env::var("HERALD_MQTT_URL") {
        Ok(u) if !u.is_empty() => u.trim_end_matches('/').to_owned(),
        _ => panic!(
            "HERALD_MQTT_URL is not set: these tests need an MQTT broker (run `cargo xtask it mqtt`, or set HERALD_MQTT_URL=mqtt://127.0.0.1:1883)"
        ),
    }
}

/// `host:port` of an mqtt URL (the default port filled in).
fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let auth = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:1883")
    }
}

fn uniq() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000);
    format!(
        "{}-{}-{nanos}",
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

/// A URL of `base` (the broker) for `topic`, with `query`.
fn topic_url(base: &str, topic: &str, query: &str) -> String {
    let base = base.split(['?']).next().unwrap_or(base);
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let authority_end = rest
        .find('/')
        .map_or(base.len(), |i| base.len() - rest.len() + i);
    format!("{}/{topic}{query}", &base[..authority_end])
}

/// The herald message a received PUBLISH stands for: key from `x-herald-key`, id from
/// `x-herald-id`, the other user properties as headers.
fn to_message(p: &Publish) -> Message {
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    let mut out = Message::new(topic, p.payload.clone());
    if let Some(props) = &p.properties {
        for (name, value) in &props.user_properties {
            match name.as_str() {
                "x-herald-key" => out = out.with_key(value.clone()),
                "x-herald-id" => {
                    if let Ok(id) = value.parse::<MessageId>() {
                        out = out.with_id(id);
                    }
                }
                _ => out = out.with_header(name.clone(), value.clone()),
            }
        }
    }
    out
}

/// A subscriber reading test topics back: an MQTT 5 client subscribed (QoS 1) before anything
/// is published, collecting what arrives per topic. With `session`, it keeps a persistent
/// session (fixed client id, Clean Start off, a session expiry), so that the broker keeps what
/// arrives while it reconnects; it reconnects by itself after a loss.
struct Reader {
    client: AsyncClient,
    got: Arc<Mutex<HashMap<String, Vec<Message>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    async fn connect(url: &str, session: Option<&str>) -> Self {
        let (host, port) = authority(url)
            .rsplit_once(':')
            .map(|(h, p)| (h.to_owned(), p.parse().expect("port")))
            .expect("host:port");
        let id = session.map_or_else(|| format!("it-r-{}", &uniq()), str::to_owned);
        let mut o = MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_receive_maximum(Some(65_535))
            .set_max_packet_size(Some(64 << 20))
            .set_request_channel_capacity(64);
        if session.is_some() {
            o.set_clean_start(false)
                .set_session_expiry_interval(Some(3600));
        }
        let (client, mut events) = AsyncClient::new(o, 64);
        // Up before anything else: the first CONNACK.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, events.poll())
                .await
                .expect("the reader connects within 30 s")
            {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("the reader cannot connect to {url}: {e}"),
            }
        }
        let got: Arc<Mutex<HashMap<String, Vec<Message>>>> = Arc::default();
        let task = tokio::spawn(Self::run(events, got.clone()));
        Self { client, got, task }
    }

    async fn run(mut events: EventLoop, got: Arc<Mutex<HashMap<String, Vec<Message>>>>) {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let m = to_message(&p);
                    got.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(m.destination().as_str().to_owned())
                        .or_default()
                        .push(m);
                }
                Ok(_) => {}
                // Polling again reconnects (the restart test's broker comes back).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Subscribes to `topic` (QoS 1) and waits for the SUBACK to have come: a probe message
    /// published to the topic comes back.
    async fn subscribe(&self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let probe = format!("{topic}/probe");
        self.client
            .subscribe(&probe, QoS::AtLeastOnce)
            .await
            .expect("subscribe probe");
        // MQTT orders the SUBACKs with the publishes on one connection: once a probe sent
        // after both subscriptions comes back, the first subscription is in place too.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.client
                .publish(&probe, QoS::AtLeastOnce, false, "probe")
                .await
                .expect("probe");
            let start = Instant::now();
            while Instant::now() < start + Duration::from_millis(500) {
                if self.count(&probe) > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                Instant::now() < deadline,
                "the subscription to {topic} took over 10 s"
            );
        }
    }

    fn count(&self, topic: &str) -> usize {
        self.got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .map_or(0, Vec::len)
    }

    /// What arrived on `topic` once `expected` messages are there (or `within` passed), and
    /// then a little more (so that extra copies show).
    async fn read(&self, topic: &str, expected: usize, within: Duration) -> Vec<Message> {
        let deadline = Instant::now() + within;
        while self.count(topic) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The conformance harness: transports connect through a fault proxy, so that faults are real
/// connection cuts; each destination is a topic of its own, read back by one subscriber.
struct MqttHarness {
    reader: Reader,
    proxy: FaultProxy,
    proxied_url: String,
}

impl MqttHarness {
    async fn new() -> Self {
        let url = url();
        let target = authority(&url);
        let proxy = FaultProxy::start(&target).await.expect("fault proxy");
        let proxied_url = url.replacen(&target, &proxy.addr().to_string(), 1);
        Self {
            reader: Reader::connect(&url, None).await,
            proxy,
            proxied_url,
        }
    }
}

#[async_trait]
impl Harness for MqttHarness {
    type Transport = MqttTransport;

    async fn transport(&self) -> MqttTransport {
        MqttTransport::new(
            MqttConfig::from_url(&self.proxied_url)
                .expect("url")
                .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
        )
        .expect("transport")
    }

    async fn destination(&self, hint: &str) -> Destination {
        let topic = format!("herald/it/conformance/{hint}/{}", uniq());
        self.reader.subscribe(&topic).await;
        herald_mqtt::topic(&topic)
    }

    fn answers_early(&self) -> bool {
        true
    }

    fn poison(&self, destination: &Destination) -> Option<Message> {
        // A key MQTT 5 user properties cannot carry (not UTF-8): refused for good.
        Some(
            Message::new(destination.clone(), format!("poison for {destination}"))
                .with_key(vec![0xff, 0xfe]),
        )
    }

    async fn read_back(&self, destination: &Destination, expected: usize) -> Option<Vec<Message>> {
        Some(
            self.reader
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
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn conformance_suite() {
    let h = MqttHarness::new().await;
    conformance::run(&h).await;
}

/// Sends `sent` through a producer on `config` and reads `topic` back.
async fn round_trip(
    config: MqttConfig,
    reader: &Reader,
    topic: &str,
    sent: &[Message],
) -> Vec<Message> {
    let p = Producer::builder(MqttTransport::new(config).expect("transport"))
        .build()
        .expect("producer");
    let report = p.send_all(sent.to_vec()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, sent.len() as u64);
    p.close(Duration::from_secs(30)).await;
    reader
        .read(topic, sent.len(), Duration::from_secs(60))
        .await
}

fn assert_exactly_in_order(got: &[Message], sent: &[Message]) {
    assert_eq!(
        got.len(),
        sent.len(),
        "exactly N messages, none lost, no duplicates"
    );
    for (g, s) in got.iter().zip(sent) {
        assert_eq!(g.payload(), s.payload(), "payload, in order");
        assert_eq!(g.key(), s.key(), "key as the x-herald-key property");
        assert_eq!(g.headers(), s.headers(), "headers as user properties");
        assert!(g.id().is_some(), "a herald id as the x-herald-id property");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn ten_thousand_keyed_messages_read_back_in_order_with_key_id_and_headers() {
    const N: usize = 10_000;
    let url = url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/10k/{}", uniq());
    reader.subscribe(&topic).await;
    let dest = herald_mqtt::topic(&topic);
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
    let got = round_trip(
        MqttConfig::from_url(&url).expect("url"),
        &reader,
        &topic,
        &sent,
    )
    .await;
    // One publisher, one topic, one connection: MQTT keeps the publish order.
    assert_exactly_in_order(&got, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn qos_2_acknowledges_by_pubcomp_and_a_full_window_waits_for_room() {
    const N: usize = 2_000;
    let url = url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/qos2/{}", uniq());
    reader.subscribe(&topic).await;
    let dest = herald_mqtt::topic(&topic);
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("q2-{i}")).with_key(format!("k{}", i % 4)))
        .collect();
    // A window of 3: batches (up to 1 024 messages) wait for room again and again.
    let config = MqttConfig::from_url(&topic_url(&url, &topic, "?qos=2"))
        .expect("url")
        .window(3);
    assert_eq!(config.qos(), Qos::ExactlyOnce);
    let got = round_trip(config, &reader, &topic, &sent).await;
    assert_exactly_in_order(&got, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn mqtt_3_1_1_sends_payloads_and_refuses_what_it_cannot_carry() {
    let url = url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/v3/{}", uniq());
    reader.subscribe(&topic).await;
    let dest = herald_mqtt::topic(&topic);
    let config = MqttConfig::from_url(&topic_url(&url, &topic, "?version=3")).expect("url");
    let p = Producer::builder(MqttTransport::new(config).expect("transport"))
        .build()
        .expect("producer");
    let plain: Vec<Message> = (0..500)
        .map(|i| Message::new(dest.clone(), format!("v3-{i}")))
        .collect();
    let report = p.send_all(plain.clone()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    for refused in [
        Message::new(dest.clone(), "with a key").with_key("k"),
        Message::new(dest.clone(), "with a header").with_header("h", "v"),
    ] {
        let e = p.send(refused).await.expect_err("refused");
        assert_eq!((e.class(), e.attempts()), (ErrorClass::Permanent, 1), "{e}");
        let te = e.reason().transport_error().expect("a transport error");
        assert_eq!(te.code(), Some("UNSUPPORTED_BY_MQTT3"), "{te}");
    }
    p.close(Duration::from_secs(30)).await;
    let got = reader
        .read(&topic, plain.len(), Duration::from_secs(60))
        .await;
    let payloads: Vec<_> = got.iter().map(|m| m.payload().clone()).collect();
    let want: Vec<_> = plain.iter().map(|m| m.payload().clone()).collect();
    assert_eq!(payloads, want, "every payload, in order, and nothing else");
}

/// MQTT 3.1.1 has no Receive Maximum: a broker keeps a bounded number of QoS 2 publishes
/// awaiting their PUBREL (Mosquitto: 20) and, over 3.1.1, answers the ones past it with a
/// PUBREC that cannot say no, then a PUBCOMP, and drops them. herald keeps at most
/// `MqttConfig::v3_qos2_inflight` of them out. Before: 500 reported delivered, 20-odd stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn mqtt_3_1_1_qos_2_stays_within_what_the_broker_keeps() {
    let url = url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/v3q2/{}", uniq());
    reader.subscribe(&topic).await;
    let dest = herald_mqtt::topic(&topic);
    let sent: Vec<Message> = (0..500)
        .map(|i| Message::new(dest.clone(), format!("v3q2-{i}")))
        .collect();
    let config = MqttConfig::from_url(&topic_url(&url, &topic, "?version=3&qos=2")).expect("url");
    let p = Producer::builder(MqttTransport::new(config).expect("transport"))
        .build()
        .expect("producer");
    let report = p.send_all(sent.clone()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    p.close(Duration::from_secs(30)).await;
    let got = reader
        .read(&topic, sent.len(), Duration::from_secs(30))
        .await;
    assert_eq!(
        got.len(),
        sent.len(),
        "every message reported delivered is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn connection_cut_mid_run_loses_nothing_and_keeps_per_key_order() {
    const N: usize = 20_000;
    let url = url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/cut/{}", uniq());
    reader.subscribe(&topic).await;
    let target = authority(&url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
    )
    .expect("t");
    let probe = transport.clone();
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    let dest = herald_mqtt::topic(&topic);
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
    let retries = p.stats().totals.retries;
    assert!(
        retries > 0,
        "the cuts failed messages in flight, which were retried"
    );
    p.close(Duration::from_secs(30)).await;
    let got = reader.read(&topic, N, Duration::from_secs(60)).await;
    assert_complete_in_key_order("connection cut", &sent, &got);
    eprintln!(
        "connection cut ({outstanding:?} outstanding at the cuts): {N} delivered, {} received ({} duplicates), {retries} retries",
        got.len(),
        got.len() - N
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn an_unreachable_broker_hands_every_message_back_by_the_delivery_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let transport = MqttTransport::new(
        MqttConfig::from_url(&format!("mqtt://127.0.0.1:{port}/plant/x"))
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
            Message::new(herald_mqtt::topic("plant/x"), format!("u-{i}"))
                .with_key(format!("k{}", i % 4))
        }))
        .await
        .wait()
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "by the delivery timeout"
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
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn oversized_messages_are_permanent_at_once_and_the_others_go() {
    let url = url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/oversize/{}", uniq());
    reader.subscribe(&topic).await;
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url)
            .expect("url")
            .max_packet_size(4096),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .max_message_bytes(8 << 20)
        .delivery_timeout(Duration::from_secs(60))
        .build()
        .expect("producer");
    let dest = herald_mqtt::topic(&topic);
    let mut msgs: Vec<Message> = (0..20)
        .map(|i| Message::new(dest.clone(), format!("ok-{i}")).with_key(format!("k{}", i % 2)))
        .collect();
    msgs.insert(
        10,
        Message::new(dest.clone(), vec![b'x'; 10_000]).with_key("k0"),
    );
    let started = Instant::now();
    let report = p.send_all(msgs).await.wait().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "at once, not by a timeout"
    );
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
    assert_eq!(te.code(), Some("PACKET_TOO_LARGE"), "{te}");
    p.close(Duration::from_secs(10)).await;
    let got = reader.read(&topic, 20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20, "the oversized one was never sent");
}

/// Text MQTT lets a broker refuse (control characters, non-characters: Mosquitto does, and
/// drops the client) fails at once, permanently, naming what is wrong, and is never sent: the
/// connection stays, and the other messages go through on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn text_a_broker_may_refuse_is_permanent_at_once_and_the_connection_stays() {
    let url = url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/text/{}", uniq());
    reader.subscribe(&topic).await;
    let target = authority(&url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1)).expect("url"),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .expect("producer");
    let dest = herald_mqtt::topic(&topic);
    let mut msgs: Vec<Message> = (0..10)
        .map(|i| Message::new(dest.clone(), format!("ok-{i}")).with_key(format!("k{}", i % 2)))
        .collect();
    let refused = [
        (
            Message::new(dest.clone(), "line break").with_header("note", "a\nb"),
            "INVALID_HEADER",
        ),
        (
            Message::new(dest.clone(), "tab").with_key("k\t0"),
            "INVALID_HEADER",
        ),
        (
            Message::new(dest.clone(), "non-character").with_header("note", "\u{FFFF}"),
            "INVALID_HEADER",
        ),
        (
            Message::new(herald_mqtt::topic(&format!("{topic}/a\u{7f}b")), "delete"),
            "INVALID_DESTINATION",
        ),
    ];
    for (i, (m, _)) in refused.iter().enumerate() {
        msgs.insert(2 + 2 * i, m.clone());
    }
    let started = Instant::now();
    let report = p.send_all(msgs).await.wait().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "at once, not by a timeout: {:?}",
        report.failed.first()
    );
    assert_eq!(report.delivered, 10, "{:?}", report.failed.first());
    assert_eq!(report.failed.len(), refused.len());
    for e in &report.failed {
        let (_, code) = refused
            .iter()
            .find(|(m, _)| m.payload() == e.message().payload())
            .expect("one of the refused");
        let te = e.reason().transport_error().expect("a transport error");
        assert_eq!(
            (e.class(), te.code()),
            (ErrorClass::Permanent, Some(*code)),
            "{e}"
        );
    }
    assert_eq!(proxy.accepted(), 1, "the connection stayed");
    p.close(Duration::from_secs(10)).await;
    let got = reader.read(&topic, 10, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 10);
}

// ---- a mosquitto of the test's own ---------------------------------------------------------

/// Says why a test cannot run here: fails, unless `HERALD_IT_ALLOW_SKIP=1`.
fn cannot_run(test: &str, why: &str) {
    if std::env::var("HERALD_IT_ALLOW_SKIP").as_deref() == Ok("1") {
        println!("SKIPPED: {test}: {why}");
    } else {
        panic!("{test}: {why} (set HERALD_IT_ALLOW_SKIP=1 to skip instead)");
    }
}

fn mosquitto_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// Health goes down when the broker cannot be reached, and clears by itself, without traffic,
/// once it can again: the transport retries in the background on its reconnect backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it"]
async fn down_clears_without_traffic_once_the_broker_is_back() {
    let url = url();
    let target = authority(&url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = MqttTransport::new(
        MqttConfig::from_url(&format!(
            "{}/herald/health",
            url.replacen(&target, &proxy.addr().to_string(), 1)
        ))
        .expect("url")
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
    )
    .expect("t");
    // The broker unreachable for 3 s: the first attempt fails and health says so.
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

/// A mosquitto of a test's own: its own port and persistence folder (`extra` lines added to
/// its configuration), stopped (and its folder removed) on drop.
struct OwnBroker {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl OwnBroker {
    async fn start(test: &str, extra: &str) -> Option<Self> {
        let Some(binary) = mosquitto_binary() else {
            cannot_run(
                test,
                "no mosquitto on this machine (apt-get install mosquitto)",
            );
            return None;
        };
        let dir = std::env::temp_dir().join(format!("herald-mqtt-it-{}", uniq()));
        std::fs::create_dir_all(&dir).expect("broker folder");
        // Started as root, mosquitto drops to its own user, which must write its
        // persistence file here.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .expect("broker folder permissions");
        }
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nlog_type all\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nlog_dest stderr\n{extra}\n",
            dir.display()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("config file");
        let mut broker = Self {
            binary,
            dir,
            port,
            child: None,
        };
        broker.run().await;
        Some(broker)
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Runs the broker and waits until it takes connections.
    async fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("broker.log")).expect("log file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
                panic!("mosquitto exited ({status}): {log}");
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The broker process's id.
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Stops the broker with SIGTERM (it saves its persistence file, sessions included) and
    /// waits for it to exit; SIGKILL after 10 s.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _sent = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _killed = child.kill();
            let _status = child.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
        let _removed = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn broker_restart_mid_run_loses_nothing_and_keeps_per_key_order() {
    const TEST: &str = "broker_restart_mid_run_loses_nothing_and_keeps_per_key_order";
    const N: usize = 20_000;
    let Some(mut broker) = OwnBroker::start(TEST, "").await else {
        return;
    };
    let url = broker.url();
    // A persistent session: what arrives while the reader reconnects is kept for it.
    let reader = Reader::connect(&url, Some(&format!("it-restart-{}", std::process::id()))).await;
    let topic = format!("herald/it/restart/{}", uniq());
    reader.subscribe(&topic).await;
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url)
            .expect("url")
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    let dest = herald_mqtt::topic(&topic);
    let sent: Vec<Message> = (0..N)
        .map(|i| Message::new(dest.clone(), format!("r-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    // Half the run, stopped once it is being delivered; the other half sent while the server
    // is down: the run goes on across the restart however fast the first half went.
    let mut run = RunInParts::new(&p, &sent, 2);
    run.send_next().await;
    run.wait_flowing(Duration::from_secs(60)).await;
    broker.stop();
    let at_restart = p.stats().totals.delivered;
    let outstanding = run.outstanding();
    assert!(outstanding > 0, "the stop found messages outstanding");
    run.send_next().await;
    broker.run().await;
    run.finish(Duration::from_secs(180)).await;
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(30)).await;
    let got = reader.read(&topic, N, Duration::from_secs(60)).await;
    assert_complete_in_key_order("restart", &sent, &got);
    eprintln!(
        "restart: {at_restart} delivered before ({outstanding} of the first half outstanding), {} received ({} duplicates), {retries} retries",
        got.len(),
        got.len() - N
    );
}

/// The keep-alive PINGREQ and the PINGREQs that follow answers at low rates must never end a
/// connection that answers (with rumqttc's event loop, which sent its keep-alive PINGREQ every
/// `keep_alive` and took an earlier unanswered one for a dead broker, they had to be kept
/// apart): a steady trickle of sends across three keep-alive periods, over a wire with latency
/// (so that each PINGRESP is awaited for a while), keeps its one connection and retries nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn the_keep_alive_ping_never_collides_with_herald_s_own() {
    trickle_across_keep_alives(&url(), Duration::from_secs(5), Duration::from_secs(16)).await;
}

/// As above, with the keep-alive the broker sets (MQTT 5's Server Keep Alive: Mosquitto's
/// `max_keepalive` below the client's 30 s), which herald's timer then follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn the_broker_s_keep_alive_is_the_one_kept_clear_of() {
    const TEST: &str = "the_broker_s_keep_alive_is_the_one_kept_clear_of";
    // Mosquitto takes 10 s at the least.
    let Some(broker) = OwnBroker::start(TEST, "max_keepalive 10").await else {
        return;
    };
    let (asked, run) = (Duration::from_secs(30), Duration::from_secs(22));
    trickle_across_keep_alives(&broker.url(), asked, run).await;
}

/// A round trip longer than a quarter of the keep-alive: under steady traffic a PINGREQ is
/// always out, and with rumqttc's event loop one of herald's was still unanswered at the
/// keep-alive, which rumqttc took for a dead broker (`AwaitPingResp`), though every PINGRESP
/// came within the round trip. herald's session ends a connection only for a PINGREQ
/// unanswered for a whole keep-alive. Keep-alive 5 s, 3 s round trip, four senders of four
/// messages at a time for 12 s, started 750 ms apart (answers come all the time, and herald
/// pings after them, whatever the keep-alive's phase; 16 in flight, within Mosquitto's
/// receive maximum of 20, so that nothing waits unsent, which would stop herald's pings):
/// before, 2 connections and 16 retries; now one connection, no retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn a_round_trip_past_the_keep_alive_guard_keeps_the_connection() {
    let url = url();
    let target = authority(&url);
    let proxy = FaultProxy::start_with_latency(&target, Duration::from_millis(1500))
        .await
        .expect("proxy");
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .keep_alive(Duration::from_secs(5)),
    )
    .expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let dest = herald_mqtt::topic(&format!("herald/it/slowping/{}", uniq()));
    // Connected first: messages waiting for the connection would go out, and be answered,
    // all together.
    p.send(Message::new(dest.clone(), "first"))
        .await
        .expect("delivered");
    let until = Instant::now() + Duration::from_secs(12);
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..4u32 {
        let (p, dest) = (p.clone(), dest.clone());
        senders.spawn(async move {
            // Spread over the round trip, so that answers come every 750 ms, not in bursts.
            tokio::time::sleep(Duration::from_millis(750) * s).await;
            let mut n = 0u64;
            while Instant::now() < until {
                // Four at a time, each awaited: after the first answer, the client has nothing
                // to send while three answers are still due, which is when herald pings.
                let m = |i: u64| Message::new(dest.clone(), format!("s{s}-{}", n + i));
                let (a, b, c, d) =
                    tokio::join!(p.send(m(0)), p.send(m(1)), p.send(m(2)), p.send(m(3)));
                for r in [a, b, c, d] {
                    r.expect("delivered");
                }
                n += 4;
            }
            n
        });
    }
    let mut sent = 0;
    while let Some(n) = senders.join_next().await {
        sent += n.expect("sender");
    }
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(10)).await;
    assert_eq!(
        (proxy.accepted(), retries),
        (1, 0),
        "one connection all along, nothing retried ({sent} sent)"
    );
}

/// A steady trickle of sends for `run` to the broker at `url`, through a proxy adding 2 ms each
/// way, with `keep_alive` asked for: one connection all along, nothing retried.
async fn trickle_across_keep_alives(url: &str, keep_alive: Duration, run: Duration) {
    let target = authority(url);
    let proxy = FaultProxy::start_with_latency(&target, Duration::from_millis(2))
        .await
        .expect("proxy");
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .keep_alive(keep_alive),
    )
    .expect("t");
    let p = Producer::builder(transport).build().expect("producer");
    let dest = herald_mqtt::topic(&format!("herald/it/keepalive/{}", uniq()));
    let until = Instant::now() + run;
    let mut sent = 0u64;
    while Instant::now() < until {
        // A few at a time, each awaited: answers come while others are still due.
        let m = |i: u64| Message::new(dest.clone(), format!("m-{}", sent + i));
        let (a, b, c, d) = tokio::join!(p.send(m(0)), p.send(m(1)), p.send(m(2)), p.send(m(3)));
        for r in [a, b, c, d] {
            r.expect("delivered");
        }
        sent += 4;
    }
    // A collision after the last of them would show only at the next send (connections open
    // on demand).
    p.send(Message::new(dest.clone(), "last"))
        .await
        .expect("delivered");
    // Every send above was answered delivered; the counts say how.
    let stats = p.stats().totals;
    assert_eq!(
        (proxy.accepted(), stats.retries),
        (1, 0),
        "one connection all along, nothing retried ({sent} sent in {run:?})"
    );
    p.close(Duration::from_secs(10)).await;
}

/// A broker that hangs with its connection open (stopped: no answer, no error, the socket up)
/// is given up once silent for `ack_timeout`, though every attempt is cut off sooner by a
/// shorter delivery timeout, and long before the keep-alive would find it; the messages go
/// through on a new connection once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn a_hung_broker_is_given_up_within_a_short_delivery_timeout() {
    const TEST: &str = "a_hung_broker_is_given_up_within_a_short_delivery_timeout";
    let Some(broker) = OwnBroker::start(TEST, "").await else {
        return;
    };
    let url = broker.url();
    let target = authority(&url);
    let proxy = FaultProxy::start(&target).await.expect("proxy");
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .ack_timeout(Duration::from_secs(3))
            .keep_alive(Duration::from_secs(60))
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .expect("t");
    let dest = herald_mqtt::topic(&format!("herald/it/hung/{}", uniq()));
    herald_testkit::scenario::a_hung_server_is_given_up(transport, &dest, &proxy, broker.pid())
        .await;
}

/// A slow broker that keeps answering (two messages in flight at a time, 100 ms round trip:
/// about 20 messages a second) is kept, however long a batch takes: `ack_timeout` is how long
/// the connection may go without any answer, not how long a batch may take. Nothing is
/// abandoned, so nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn a_slow_broker_that_keeps_answering_is_kept() {
    const TEST: &str = "a_slow_broker_that_keeps_answering_is_kept";
    const N: usize = 120;
    let Some(broker) = OwnBroker::start(TEST, "max_inflight_messages 2").await else {
        return;
    };
    let url = broker.url();
    let reader = Reader::connect(&url, None).await;
    let topic = format!("herald/it/slow/{}", uniq());
    reader.subscribe(&topic).await;
    let target = authority(&url);
    let proxy = FaultProxy::start_with_latency(&target, Duration::from_millis(50))
        .await
        .expect("proxy");
    let transport = MqttTransport::new(
        MqttConfig::from_url(&url.replacen(&target, &proxy.addr().to_string(), 1))
            .expect("url")
            .ack_timeout(Duration::from_secs(2)),
    )
    .expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(60))
        .build()
        .expect("producer");
    let dest = herald_mqtt::topic(&topic);
    let started = Instant::now();
    let report = p
        .send_all((0..N).map(|i| Message::new(dest.clone(), format!("s-{i}"))))
        .await
        .wait()
        .await;
    let took = started.elapsed();
    assert_eq!(report.delivered, N as u64, "{:?}", report.failed.first());
    assert!(
        took > Duration::from_secs(3),
        "the run must outlast the ack timeout to show anything: {took:?}"
    );
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(10)).await;
    assert_eq!(
        (proxy.accepted(), retries),
        (1, 0),
        "one connection, nothing retried, in {took:?}"
    );
    let got = reader.read(&topic, N, Duration::from_secs(30)).await;
    assert_eq!(got.len(), N, "each message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn the_broker_s_maximum_packet_size_and_qos_are_read_from_connack() {
    const TEST: &str = "the_broker_s_maximum_packet_size_and_qos_are_read_from_connack";
    let Some(broker) = OwnBroker::start(TEST, "max_packet_size 2048\nmax_qos 1").await else {
        return;
    };
    let transport =
        MqttTransport::new(MqttConfig::from_url(&broker.url()).expect("url")).expect("t");
    let p = Producer::builder(transport)
        .max_message_bytes(8 << 20)
        .build()
        .expect("producer");
    let dest = herald_mqtt::topic("herald/it/maxpacket");
    p.send(Message::new(dest.clone(), vec![b'x'; 1000]))
        .await
        .expect("below the broker's maximum");
    let e = p
        .send(Message::new(dest.clone(), vec![b'x'; 4000]))
        .await
        .expect_err("above the broker's maximum");
    assert_eq!((e.class(), e.attempts()), (ErrorClass::Permanent, 1), "{e}");
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("PACKET_TOO_LARGE"), "{te}");
    assert!(
        te.message().contains("2048"),
        "names the broker's maximum: {te}"
    );
    p.send(Message::new(dest.clone(), "after"))
        .await
        .expect("the connection is still fine");
    p.close(Duration::from_secs(10)).await;
    // The broker's Maximum QoS (1 here): a QoS 2 transport's messages fail at once, permanent,
    // not sent. Before, the broker cut the connection at each publish (DISCONNECT 0x9B) and
    // they were retried, transient, until the delivery timeout.
    let url = format!("{}?qos=2", broker.url());
    let transport = MqttTransport::new(MqttConfig::from_url(&url).expect("url")).expect("t");
    let p = Producer::builder(transport)
        .delivery_timeout(Duration::from_secs(10))
        .build()
        .expect("producer");
    let e = p
        .send(Message::new(dest, "qos 2"))
        .await
        .expect_err("above the broker's maximum QoS");
    assert_eq!((e.class(), e.attempts()), (ErrorClass::Permanent, 1), "{e}");
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("QOS_NOT_SUPPORTED"), "{te}");
    p.close(Duration::from_secs(10)).await;
}

/// A limit the broker does not announce (Mosquitto's `message_size_limit`): Mosquitto answers
/// the publish above it with PUBACK reason 0x95, and herald reports that message permanent, at
/// once; the others go through. (Mosquitto 2.0.11 then ends the connection, "Bad socket
/// read/write", sometimes before its answer is read: the messages in flight are retried on a
/// new one, the oversized one too, and its second answer is read.) Before (rumqttc's event
/// loop, which could not read that reason), the connection was lost at each attempt and the
/// message retried, transient, until its delivery timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn a_message_above_a_limit_the_broker_does_not_announce_is_permanent() {
    const TEST: &str = "a_message_above_a_limit_the_broker_does_not_announce_is_permanent";
    let Some(broker) = OwnBroker::start(TEST, "message_size_limit 1000").await else {
        return;
    };
    let transport =
        MqttTransport::new(MqttConfig::from_url(&broker.url()).expect("url")).expect("t");
    let p = quick_retries(Producer::builder(transport))
        .delivery_timeout(Duration::from_secs(30))
        .build()
        .expect("producer");
    let dest = herald_mqtt::topic("herald/it/size-limit");
    let msgs = vec![
        Message::new(dest.clone(), "before").with_key("a"),
        Message::new(dest.clone(), vec![b'x'; 2000]).with_key("b"),
        Message::new(dest.clone(), "after").with_key("c"),
    ];
    let started = Instant::now();
    let report = p.send_all(msgs).await.wait().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "at once, not by the delivery timeout"
    );
    assert_eq!(report.delivered, 2, "{:?}", report.failed.first());
    assert_eq!(report.failed.len(), 1);
    let e = &report.failed[0];
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(e.attempts() <= 2, "{e}");
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("PACKET_TOO_LARGE"), "{te}");
    assert!(
        te.message().contains("max_packet_size"),
        "says what to set: {te}"
    );
    p.close(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an MQTT broker: cargo xtask it mqtt"]
async fn credentials_and_permissions_are_classified() {
    const TEST: &str = "credentials_and_permissions_are_classified";
    let Some(passwd) = mosquitto_binary()
        .and_then(|b| b.parent().map(|d| d.join("../bin/mosquitto_passwd")))
        .filter(|p| p.is_file())
        .or_else(|| {
            let p = PathBuf::from("/usr/bin/mosquitto_passwd");
            p.is_file().then_some(p)
        })
    else {
        cannot_run(TEST, "no mosquitto_passwd on this machine");
        return;
    };
    // The password and ACL files, in a folder of the test's own.
    let dir = std::env::temp_dir().join(format!("herald-mqtt-it-auth-{}", uniq()));
    std::fs::create_dir_all(&dir).expect("folder");
    let pw = dir.join("passwd");
    let status = Command::new(&passwd)
        .arg("-c")
        .arg("-b")
        .arg(&pw)
        .args(["app", "s3cret-pw"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success(), "mosquitto_passwd failed");
    let acl = dir.join("acl");
    std::fs::write(&acl, "user app\ntopic write herald/it/allowed/#\n").expect("acl file");
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [&dir, &pw, &acl] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o777)).expect("mode");
        }
    }
    let extra = format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}",
        pw.display(),
        acl.display()
    );
    let Some(broker) = OwnBroker::start(TEST, &extra).await else {
        return;
    };
    let port = broker.port;
    let refused = |url: String| async move {
        let t = MqttTransport::new(MqttConfig::from_url(&url).expect("url")).expect("t");
        t.connect().await.expect_err("refused")
    };
    // Mosquitto answers a wrong password with "not authorized" (MQTT 5 0x87, 3.1.1 code 5),
    // other brokers with "bad user name or password" (0x86, 4): permanent either way.
    for url in [
        format!("mqtt://app:wrong@127.0.0.1:{port}"),
        format!("mqtt://127.0.0.1:{port}"),
        format!("mqtt://app:wrong@127.0.0.1:{port}/t?version=3"),
    ] {
        let e = refused(url).await;
        assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
        assert!(
            matches!(e.code(), Some("BAD_CREDENTIALS" | "NOT_AUTHORIZED")),
            "{e}"
        );
        assert!(
            !e.to_string().contains("wrong"),
            "no password in errors: {e}"
        );
    }
    // Good credentials: an allowed topic goes, a denied one is refused by its PUBACK.
    let t = MqttTransport::new(
        MqttConfig::from_url(&format!("mqtt://app:s3cret-pw@127.0.0.1:{port}")).expect("url"),
    )
    .expect("t");
    // Mosquitto 2.0 closes the connection after refusing a publish (PUBACK 0x87, then a
    // hang-up): the refusal must still be read, and the next message go on a new connection.
    let p = Producer::builder(t).build().expect("producer");
    p.send(Message::new(
        herald_mqtt::topic("herald/it/allowed/x"),
        "ok",
    ))
    .await
    .expect("allowed");
    let e = p
        .send(Message::new(herald_mqtt::topic("herald/it/denied/x"), "no"))
        .await
        .expect_err("denied");
    assert_eq!((e.class(), e.attempts()), (ErrorClass::Permanent, 1), "{e}");
    let te = e.reason().transport_error().expect("a transport error");
    assert_eq!(te.code(), Some("NOT_AUTHORIZED"), "{te}");
    assert!(te.message().contains("0x87"), "{te}");
    p.send(Message::new(
        herald_mqtt::topic("herald/it/allowed/y"),
        "after",
    ))
    .await
    .expect("the next message goes, on a new connection");
    p.close(Duration::from_secs(10)).await;
    drop(broker);
    let _removed = std::fs::remove_dir_all(&dir);
}

/// `mqtts://` against a mosquitto of the test's own with a TLS listener and a certificate from a
/// CA of the test's own: refused (permanently, `TLS_ERROR`) without that CA, delivered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: cargo xtask it mqtt"]
async fn mqtts_with_a_custom_ca_works_and_an_unknown_ca_is_refused() {
    const TEST: &str = "mqtts_with_a_custom_ca_works_and_an_unknown_ca_is_refused";
    let certs = std::env::temp_dir().join(format!("herald-mqtt-it-certs-{}", uniq()));
    std::fs::create_dir_all(&certs).expect("cert folder");
    herald_testkit::tls::make_test_certs(&certs);
    {
        // mosquitto drops to its own user, which must read the certificate and its key.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).expect("mode");
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::set_permissions(certs.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("mode");
        }
    }
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}",
        certs.join("ca.pem").display(),
        certs.join("server.pem").display(),
        certs.join("server.key").display(),
    );
    let Some(_broker) = OwnBroker::start(TEST, &extra).await else {
        return;
    };
    let url = format!("mqtts://localhost:{tls_port}/herald/it/tls");
    // Without the test's CA: refused, permanently (proof that the certificate is checked).
    let untrusted = MqttTransport::new(MqttConfig::from_url(&url).expect("url")).expect("t");
    let e = untrusted.connect().await.expect_err("an unknown CA");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("TLS_ERROR")),
        "{e}"
    );
    // With it: connects, and the broker acknowledges a message.
    let config = MqttConfig::from_url(&url)
        .expect("url")
        .tls_ca_file(certs.join("ca.pem"));
    let dest = Destination::new("herald/it/tls");
    let t = MqttTransport::new(config).expect("t");
    let out = t
        .send_batch(&dest, &[Message::new(dest.clone(), "over tls")])
        .await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    t.close().await;
    let _removed = std::fs::remove_dir_all(&certs);
}

/// Mutual TLS: a mosquitto listener with `require_certificate true` takes herald's client
/// certificate (`?tlscert=` and `?tlskey=` in the URL, as the command gives them) and refuses a
/// client without one, permanently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: cargo xtask it mqtt"]
async fn mqtts_presents_a_client_certificate_where_the_broker_requires_one() {
    const TEST: &str = "mqtts_presents_a_client_certificate_where_the_broker_requires_one";
    let certs = std::env::temp_dir().join(format!("herald-mqtt-it-mtls-{}", uniq()));
    std::fs::create_dir_all(&certs).expect("cert folder");
    herald_testkit::tls::make_test_certs(&certs);
    herald_testkit::tls::make_client_cert(&certs, "herald-client");
    {
        // mosquitto drops to its own user, which must read the certificate and its key.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).expect("mode");
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::set_permissions(certs.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("mode");
        }
    }
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true",
        certs.join("ca.pem").display(),
        certs.join("server.pem").display(),
        certs.join("server.key").display(),
    );
    let Some(_broker) = OwnBroker::start(TEST, &extra).await else {
        let _removed = std::fs::remove_dir_all(&certs);
        return;
    };
    let url = format!(
        "mqtts://localhost:{tls_port}/herald/it/mtls?tlsca={}",
        certs.join("ca.pem").display()
    );
    let dest = Destination::new("herald/it/mtls");
    let send = |config: MqttConfig| {
        let dest = dest.clone();
        async move {
            let t = MqttTransport::new(config).expect("t");
            let out = t
                .send_batch(&dest, &[Message::new(dest.clone(), "mutual tls")])
                .await;
            t.close().await;
            out.into_iter().next().expect("one outcome")
        }
    };
    // Without a client certificate: refused, permanently.
    let e = send(MqttConfig::from_url(&url).expect("url"))
        .await
        .expect_err("no client certificate");
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, Some("TLS_ERROR")),
        "{e}"
    );
    // With one: the broker acknowledges the message.
    let with_cert = format!(
        "{url}&tlscert={}&tlskey={}",
        certs.join("client.pem").display(),
        certs.join("client.key").display()
    );
    let out = send(MqttConfig::from_url(&with_cert).expect("url")).await;
    assert!(out.is_ok(), "{out:?}");
    let _removed = std::fs::remove_dir_all(&certs);
}
