//! The raw-rumqttc baselines herald is measured against (`herald bench --baseline`). They live
//! here because rumqttc's types never leave this crate.
//!
//! All publish over MQTT 5 (or 3.1.1, as the config says) with the config's QoS, and count a
//! message only once its acknowledgement (PUBACK, or PUBCOMP for QoS 2) came, like
//! [`crate::MqttTransport`]: [`raw_streaming`] at its best (one connection, every publish
//! handed to the event loop without waiting, up to `window` in flight, as many as the broker's
//! Receive Maximum allows on the wire), [`raw_naive`] the common pattern (each publish's
//! acknowledgement awaited before the next publish), and [`OneByOne`] for the open loop (each
//! message handed over as it is due, its acknowledgement awaited on its own). Over MQTT 5 every
//! message carries the user properties herald sends for the benchmark's messages (its key and
//! its id). Every connection sets `TCP_NODELAY`, as herald's do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5;

use crate::config::{Qos, Version};
use crate::connection::{on_v3, on_v5, Answer, LiveState, REQUEST_CHANNEL};
use crate::error::Failure;
use crate::metrics::MqttMetrics;
use crate::MqttConfig;

/// What one run did.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Messages the broker acknowledged.
    pub delivered: u64,
    /// Wall time from the first publish to the last acknowledgement.
    pub elapsed: Duration,
}

impl Run {
    /// Acknowledged messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Why a baseline run stopped: a connection error or a refused publish. The broker's address is
/// never in it with a password.
#[derive(Debug, thiserror::Error)]
#[error("MQTT baseline: {0}")]
pub struct BaselineError(String);

/// The client half of a raw connection: where publishes are handed over.
#[derive(Clone)]
enum Client {
    V5(v5::AsyncClient),
    V3(rumqttc::AsyncClient),
}

/// The event-loop half of a raw connection: what writes and reads the socket.
enum Events {
    V5(Box<v5::EventLoop>),
    V3(Box<rumqttc::EventLoop>),
}

/// One raw client of either version.
struct Raw {
    client: Client,
    events: Events,
}

impl Raw {
    /// Connects and waits for the CONNACK. `TCP_NODELAY` is set, as a user tuning rumqttc for
    /// throughput would (rumqttc leaves Nagle's algorithm on, which holds small publishes back
    /// until the previous segment is acknowledged); herald's connections set it too.
    async fn connect(config: &MqttConfig, window: usize) -> Result<Self, BaselineError> {
        if config.url.tls {
            return Err(BaselineError(
                "the baseline speaks plain mqtt:// only".into(),
            ));
        }
        let id = format!("herald-bl-{:08x}", fastrand::u32(..));
        let inflight = u16::try_from(window.max(1)).unwrap_or(u16::MAX);
        let credentials = config.url.credentials();
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        let mut raw = match config.version() {
            Version::V5 => {
                let mut o = v5::MqttOptions::new(
                    id,
                    config.url.endpoint.host.clone(),
                    config.url.endpoint.port,
                );
                o.set_keep_alive(Duration::from_secs(30))
                    .set_outgoing_inflight_upper_limit(inflight)
                    .set_request_channel_capacity(REQUEST_CHANNEL)
                    .set_network_options(network);
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                let (c, e) = v5::AsyncClient::new(o, REQUEST_CHANNEL);
                Raw {
                    client: Client::V5(c),
                    events: Events::V5(Box::new(e)),
                }
            }
            Version::V311 => {
                let mut o = rumqttc::MqttOptions::new(
                    id,
                    config.url.endpoint.host.clone(),
                    config.url.endpoint.port,
                );
                o.set_keep_alive(Duration::from_secs(30))
                    .set_inflight(inflight)
                    .set_request_channel_capacity(REQUEST_CHANNEL)
                    .set_max_packet_size(64 * 1024, config.max_packet_size as usize);
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                let (c, mut e) = rumqttc::AsyncClient::new(o, REQUEST_CHANNEL);
                e.set_network_options(network);
                Raw {
                    client: Client::V3(c),
                    events: Events::V3(Box::new(e)),
                }
            }
        };
        // Up before the clock starts: the CONNACK.
        loop {
            let connected = match &mut raw.events {
                Events::V5(e) => matches!(
                    e.poll().await.map_err(|e| fail("connecting", &e))?,
                    v5::Event::Incoming(v5::Incoming::ConnAck(_))
                ),
                Events::V3(e) => matches!(
                    e.poll().await.map_err(|e| fail("connecting", &e))?,
                    rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))
                ),
            };
            if connected {
                return Ok(raw);
            }
        }
    }
}

/// What one poll of the event loop said.
enum Step {
    /// A final acknowledgement (PUBACK / PUBCOMP), with success or not.
    Acked(bool),
    Other,
}

impl Events {
    async fn step(&mut self, qos2: bool) -> Result<Step, BaselineError> {
        use rumqttc::v5::mqttbytes::v5::{PubAckReason, PubCompReason};
        Ok(match self {
            Events::V5(e) => match e.poll().await.map_err(|e| fail("publishing", &e))? {
                v5::Event::Incoming(v5::Incoming::PubAck(a)) if !qos2 => Step::Acked(matches!(
                    a.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                )),
                v5::Event::Incoming(v5::Incoming::PubComp(c)) if qos2 => {
                    Step::Acked(c.reason == PubCompReason::Success)
                }
                _ => Step::Other,
            },
            Events::V3(e) => match e.poll().await.map_err(|e| fail("publishing", &e))? {
                rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_)) if !qos2 => {
                    Step::Acked(true)
                }
                rumqttc::Event::Incoming(rumqttc::Incoming::PubComp(_)) if qos2 => {
                    Step::Acked(true)
                }
                _ => Step::Other,
            },
        })
    }
}

impl Client {
    /// Hands the `i`-th message of `body` to `topic` to the client's channel: with MQTT 5,
    /// with the user properties herald sends (its key and its id), so that the comparison
    /// measures herald, not a lighter message.
    async fn publish(
        &self,
        topic: &str,
        body: herald_core::Bytes,
        i: usize,
        qos2: bool,
    ) -> Result<(), BaselineError> {
        match self {
            Client::V5(c) => {
                let qos = if qos2 {
                    v5::mqttbytes::QoS::ExactlyOnce
                } else {
                    v5::mqttbytes::QoS::AtLeastOnce
                };
                c.publish_with_properties(topic, qos, false, body, properties(i))
                    .await
                    .map_err(|e| fail("handing a publish to the client", &e))
            }
            Client::V3(c) => {
                let qos = if qos2 {
                    rumqttc::QoS::ExactlyOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.publish(topic, qos, false, body)
                    .await
                    .map_err(|e| fail("handing a publish to the client", &e))
            }
        }
    }

    /// A task publishing messages `first..first + n` one after another.
    fn publisher(
        &self,
        topic: String,
        body: herald_core::Bytes,
        (first, n): (usize, usize),
        qos2: bool,
    ) -> tokio::task::JoinHandle<Result<(), BaselineError>> {
        let c = self.clone();
        tokio::spawn(async move {
            for i in first..first + n {
                c.publish(&topic, body.clone(), i, qos2).await?;
            }
            Ok(())
        })
    }
}

/// Keys of the benchmark's messages, as `herald bench` sends them.
const KEYS: usize = 64;

/// The user properties herald sends with the `i`-th message of a benchmark (MQTT 5): its key
/// in `x-herald-key` and 36 characters of UUID text in `x-herald-id`.
fn properties(i: usize) -> v5::mqttbytes::v5::PublishProperties {
    v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![
            ("x-herald-key".to_owned(), format!("key-{}", i % KEYS)),
            (
                "x-herald-id".to_owned(),
                format!("{:08x}-0000-7000-8000-{i:012x}", std::process::id()),
            ),
        ],
        ..Default::default()
    }
}

fn fail(what: &str, e: &dyn std::fmt::Display) -> BaselineError {
    BaselineError(format!("{what}: {e}"))
}

/// Raw rumqttc at its best: `n` messages of `payload` bytes to `topic` on one connection, all
/// handed to the client by a task of their own while another polls the event loop and counts
/// the acknowledgements, with up to `window` unacknowledged.
pub async fn raw_streaming(
    config: &MqttConfig,
    topic: &str,
    payload: usize,
    n: usize,
    window: usize,
) -> Result<Run, BaselineError> {
    let qos2 = config.qos() == Qos::ExactlyOnce;
    let Raw { client, mut events } = Raw::connect(config, window).await?;
    let body = herald_core::Bytes::from(vec![b'x'; payload]);
    let start = Instant::now();
    let publisher = client.publisher(topic.to_owned(), body, (0, n), qos2);
    // The event loop polled by a task of its own, as an application would run it.
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            if let Step::Acked(ok) = events.step(qos2).await? {
                if !ok {
                    return Err(BaselineError("the broker refused a publish".into()));
                }
                acked += 1;
            }
        }
        Ok(events)
    });
    let events = acks
        .await
        .map_err(|e| fail("the event loop's task", &e))??;
    let elapsed = start.elapsed();
    drop(events);
    publisher
        .await
        .map_err(|e| fail("the publishing task", &e))??;
    Ok(Run {
        delivered: n as u64,
        elapsed,
    })
}

/// The naive pattern: each publish's acknowledgement awaited before the next publish.
pub async fn raw_naive(
    config: &MqttConfig,
    topic: &str,
    payload: usize,
    n: usize,
) -> Result<Run, BaselineError> {
    let qos2 = config.qos() == Qos::ExactlyOnce;
    let mut raw = Raw::connect(config, 1).await?;
    let body = herald_core::Bytes::from(vec![b'x'; payload]);
    let start = Instant::now();
    for i in 0..n {
        raw.client.publish(topic, body.clone(), i, qos2).await?;
        loop {
            if let Step::Acked(ok) = raw.events.step(qos2).await? {
                if !ok {
                    return Err(BaselineError("the broker refused a publish".into()));
                }
                break;
            }
        }
    }
    Ok(Run {
        delivered: n as u64,
        elapsed: start.elapsed(),
    })
}

/// Raw rumqttc one message at a time, for the open loop (`herald bench --rate --baseline`):
/// each publish handed to the client as it comes, its acknowledgement matched to it by packet
/// id as the event loop reports them (the n-th id the loop writes is the n-th publish handed
/// over), on one connection with up to the config's window unacknowledged.
pub struct OneByOne {
    client: Client,
    answers: Arc<LiveState>,
    topic: String,
    body: herald_core::Bytes,
    qos2: bool,
    task: tokio::task::JoinHandle<()>,
}

impl OneByOne {
    /// A connected client: one message is published and acknowledged first, as for the other
    /// baselines.
    pub async fn connect(
        config: &MqttConfig,
        topic: &str,
        payload: usize,
    ) -> Result<Self, BaselineError> {
        let Raw { client, events } = Raw::connect(config, config.window).await?;
        let answers = Arc::new(LiveState::default());
        let task = tokio::spawn(drive(events, answers.clone(), config.url.server()));
        let mut one = Self {
            client,
            answers,
            topic: topic.to_owned(),
            body: herald_core::Bytes::from(vec![b'x'; payload]),
            qos2: config.qos() == Qos::ExactlyOnce,
            task,
        };
        if !one.publish(u64::MAX >> 16).await.await {
            let why = one
                .answers
                .failure()
                .map_or_else(|| "no acknowledgement".to_owned(), |e| e.to_string());
            return Err(BaselineError(format!(
                "the first message was not acknowledged: {why}"
            )));
        }
        Ok(one)
    }

    /// Publishes the `i`-th message; the future ends with its acknowledgement (`true`) or
    /// failure (`false`). `&mut self`: answer slots and publishes enter in the same order.
    pub async fn publish(
        &mut self,
        i: u64,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let answer = self.answers.one();
        let handed = match answer {
            Some(_) => {
                // Dropped half-way (the client's channel full), or refused by a client whose
                // event loop is gone: a slot with no publish behind it would match later ids
                // to the wrong messages, so the connection is over.
                let mut unfinished = EndUnlessHanded(Some(&self.answers));
                let i = usize::try_from(i).unwrap_or(usize::MAX);
                let handed = self
                    .client
                    .publish(&self.topic, self.body.clone(), i, self.qos2)
                    .await
                    .is_ok();
                if handed {
                    unfinished.0 = None;
                }
                handed
            }
            None => false,
        };
        async move {
            match answer {
                Some(rx) if handed => matches!(rx.await, Ok(Answer::Acked)),
                _ => false,
            }
        }
    }
}

/// Ends the connection's answers when dropped: see [`OneByOne::publish`].
struct EndUnlessHanded<'a>(Option<&'a LiveState>);

impl Drop for EndUnlessHanded<'_> {
    fn drop(&mut self) {
        if let Some(answers) = self.0 {
            answers.end(None);
        }
    }
}

impl Drop for OneByOne {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls the event loop, matching each acknowledgement to its publish, until the connection
/// ends; then every publish still waiting fails (acknowledgements read with the connection's
/// end are matched first). Its metrics carry `producer="raw-baseline"`, apart from herald's.
async fn drive(mut events: Events, answers: Arc<LiveState>, server: String) {
    let metrics = MqttMetrics::new(Some("raw-baseline"));
    let failure = loop {
        match &mut events {
            Events::V5(e) => match e.poll().await {
                Ok(event) => on_v5(&answers, &metrics, &event),
                Err(err) => {
                    for event in e.state.events.drain(..) {
                        on_v5(&answers, &metrics, &event);
                    }
                    break Failure::from_v5(&err).lost_error(&server);
                }
            },
            Events::V3(e) => match e.poll().await {
                Ok(event) => on_v3(&answers, &event),
                Err(err) => {
                    for event in e.state.events.drain(..) {
                        on_v3(&answers, &event);
                    }
                    break Failure::from_v3(&err).lost_error(&server);
                }
            },
        }
    };
    answers.end(Some(failure));
}

/// A subscriber counting what arrives on one topic: for benchmarks and tests that check what a
/// run delivered (MQTT keeps no log to count afterwards, so it subscribes before the run).
pub struct Listener {
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Connects (MQTT 5, clean session), subscribes to `topic` at QoS 1 and returns once the
    /// broker granted the subscription (its SUBACK came).
    pub async fn start(config: &MqttConfig, topic: &str) -> Result<Self, BaselineError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let id = format!("herald-ls-{:08x}", fastrand::u32(..));
        let mut o = v5::MqttOptions::new(
            id,
            config.url.endpoint.host.clone(),
            config.url.endpoint.port,
        );
        o.set_keep_alive(Duration::from_secs(30))
            .set_receive_maximum(Some(u16::MAX))
            .set_max_packet_size(Some(crate::config::MQTT_MAX_PACKET));
        if let Some((u, p)) = config.url.credentials() {
            o.set_credentials(u, p);
        }
        let (client, mut events) = v5::AsyncClient::new(o, 16);
        client
            .subscribe(topic, v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .map_err(|e| fail("subscribing", &e))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let event = tokio::time::timeout_at(deadline, events.poll())
                .await
                .map_err(|_| BaselineError("no SUBACK within 30 s".into()))?
                .map_err(|e| fail("subscribing", &e))?;
            if let v5::Event::Incoming(v5::Incoming::SubAck(_)) = event {
                break;
            }
        }
        let received = std::sync::Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let topic = topic.as_bytes().to_vec();
        let task = tokio::spawn(async move {
            // The client handle lives as long as the task: dropping it would end the loop.
            let _client = client;
            loop {
                match events.poll().await {
                    Ok(v5::Event::Incoming(v5::Incoming::Publish(p)))
                        if p.topic[..] == topic[..] =>
                    {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Ok(Self { received, task })
    }

    /// How many messages arrived so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` messages arrived or `within` passed, then a little more so that extra
    /// copies show; returns how many arrived.
    pub async fn wait_for(&self, n: u64, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        while self.received() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.received()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
