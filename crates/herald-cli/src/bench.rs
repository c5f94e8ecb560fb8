//! `herald bench`: herald's throughput and latency on a broker, and with `--baseline` the raw
//! client at its best and the naive pattern in the same run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use herald::kafka::mock::MockKafka;
use herald::{Bytes, Destination, Message};
use serde_json::{json, Map, Value};

use crate::engine::{Collector, Engine, Tally};
use crate::open_loop;
use crate::report::{self, Exit, ReportFormat};
use crate::settings::Tuning;
use crate::target::{KafkaTarget, Target};

/// `herald bench`. No `Debug`: `to` holds a URL with its password.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Destination (as for `produce`); without it, librdkafka's in-process mock cluster. Real
    /// messages are written there: use a scratch topic or queue.
    #[arg(long, value_name = "URL")]
    pub(crate) to: Option<String>,
    /// Messages herald (and the raw client) send.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub(crate) messages: u64,
    /// Payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    pub(crate) size: usize,
    /// Also run the raw client at its best and the naive pattern (await each send).
    #[arg(long)]
    pub(crate) baseline: bool,
    /// With --baseline, run the raw clients before herald rather than after. On Kafka every
    /// run writes to the same topic; on RabbitMQ, with the URL naming a queue, each raw run
    /// writes to a new queue of its own, declared as herald's and deleted after it (a queue
    /// nobody consumes from is slower to write to the more it holds). `cargo xtask bench
    /// command` alternates this between rounds.
    #[arg(long, requires = "baseline")]
    pub(crate) baseline_first: bool,
    /// Messages of the naive run, which manages hundreds per second on a real broker.
    #[arg(long, value_name = "N", default_value_t = 2_000)]
    pub(crate) naive_messages: u64,
    /// Open loop: send at this many messages a second on a fixed schedule, whatever the
    /// acknowledgements do, and report latency (p50, p99, p99.9) from each message's due time
    /// to its acknowledgement instead of throughput. With --baseline, the raw client on the same
    /// schedule.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub(crate) rate: Option<f64>,
    /// text, or json: the summary, then one JSON object on the last line of stdout.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub(crate) report: ReportFormat,
    #[command(flatten)]
    pub(crate) tuning: Tuning,
}

const KEYS: u64 = 64;
/// The benchmark's keys, `key-0` to `key-63`: message `i` has key `i % KEYS`.
fn keys() -> Vec<Bytes> {
    (0..KEYS).map(|k| Bytes::from(format!("key-{k}"))).collect()
}

/// Messages handed to the engine at a time in the throughput run.
const RUN: usize = 1024;
/// AMQP raw baseline: channels and unconfirmed messages per channel (herald-amqp's defaults).
const AMQP_CHANNELS: usize = 8;
const AMQP_WINDOW: usize = 512;

struct Measured {
    tally: Tally,
    elapsed: Duration,
}

/// Sends one message through `session` and waits for its acknowledgement: the connection,
/// metadata (and on Kafka the producer id) are in place before the clock starts, as for the raw
/// clients, which do the same.
async fn warm_up(session: &crate::settings::Session, payload: &Bytes) -> anyhow::Result<()> {
    session
        .producer
        .send(Message::new(session.destination.clone(), payload.clone()).with_key("warm-up"))
        .await
        .context("the first message (warm-up) failed")?;
    Ok(())
}

async fn herald_run(args: &BenchArgs, target: &Target) -> anyhow::Result<Measured> {
    let session = args.tuning.build(target)?;
    warm_up(&session, &Bytes::from(vec![b'x'; args.size])).await?;
    let engine = Engine::start(
        session.producer.clone(),
        Collector::new(session.destination.clone()),
    );
    let payload = Bytes::from(vec![b'x'; args.size]);
    let keys = keys();
    let dest: Destination = session.destination.clone();
    let started = Instant::now();
    // In runs, as `herald produce` hands over what it read: one `enqueue_tagged` each.
    let mut run = Vec::with_capacity(RUN);
    for i in 0..args.messages {
        let msg =
            Message::new(dest.clone(), payload.clone()).with_key(keys[(i % KEYS) as usize].clone());
        run.push((i + 1, msg));
        if run.len() == RUN {
            engine
                .send_many(std::mem::replace(&mut run, Vec::with_capacity(RUN)))
                .await?;
        }
    }
    engine.send_many(run).await?;
    let (collector, _) = engine.finish(Duration::from_secs(30)).await?;
    Ok(Measured {
        tally: collector.tally,
        elapsed: started.elapsed(),
    })
}

/// Raw best and naive rates, and what each was.
struct Baselines {
    raw: f64,
    raw_what: String,
    /// The raw client at its best sending what herald's messages carry, where the broker's
    /// cost of those properties would make bare payloads an unfair comparison (AMQP: the
    /// `message_id` and the key header): its rate and what it was.
    like: Option<(f64, String)>,
    naive: f64,
    naive_what: String,
}

async fn kafka_baselines(
    args: &BenchArgs,
    target: Option<&crate::target::KafkaTarget>,
    bootstrap: &str,
    raw_topic: &str,
    naive_topic: &str,
) -> anyhow::Result<Baselines> {
    use herald_kafka::baseline as kb;
    let extra = args.tuning.kafka_client_properties(target)?;
    let (b, e, t, n, size) = (
        bootstrap.to_owned(),
        extra.clone(),
        raw_topic.to_owned(),
        args.messages,
        args.size,
    );
    let raw = tokio::task::spawn_blocking(move || kb::raw_threaded(&b, &e, &t, n, size))
        .await
        .context("the raw baseline task failed")?
        .context("raw rdkafka baseline")?;
    anyhow::ensure!(
        raw.failed == 0,
        "the raw baseline lost {} messages",
        raw.failed
    );
    let naive = kb::naive_await_each(
        bootstrap,
        &extra,
        naive_topic,
        args.naive_messages,
        args.size,
    )
    .await
    .context("naive rdkafka baseline")?;
    anyhow::ensure!(
        naive.failed == 0,
        "the naive baseline lost {} messages",
        naive.failed
    );
    Ok(Baselines {
        raw: raw.msgs_per_sec(),
        raw_what: format!(
            "rdkafka ThreadedProducer, no per-message wait, {} messages",
            report::count(n)
        ),
        like: None,
        naive: naive.msgs_per_sec(),
        naive_what: format!(
            "rdkafka FutureProducer awaiting each send, {} messages (--naive-messages)",
            report::count(args.naive_messages)
        ),
    })
}

/// PubAcks in flight for the raw NATS baseline: the transport's default window.
const NATS_WINDOW: usize = 4096;

/// The raw async-nats baselines on `config`'s subject: streaming publishes with up to
/// `NATS_WINDOW` PubAcks outstanding, and the naive await-each pattern.
async fn nats_baselines(
    args: &BenchArgs,
    config: &herald::nats::NatsConfig,
) -> anyhow::Result<Baselines> {
    use herald_nats::baseline as nb;
    let subject = config.subject().unwrap_or_default().to_owned();
    let n = usize::try_from(args.messages).unwrap_or(usize::MAX);
    let raw = nb::raw_streaming(config, &subject, args.size, n, NATS_WINDOW)
        .await
        .context("raw async-nats baseline")?;
    let naive_n = usize::try_from(args.naive_messages).unwrap_or(usize::MAX);
    let naive = nb::raw_naive(config, &subject, args.size, naive_n)
        .await
        .context("naive async-nats baseline")?;
    Ok(Baselines {
        raw: raw.msgs_per_sec(),
        raw_what: format!(
            "async-nats, {NATS_WINDOW} PubAcks in flight, {} messages",
            report::count(args.messages)
        ),
        like: None,
        naive: naive.msgs_per_sec(),
        naive_what: format!(
            "async-nats awaiting each PubAck, {} messages (--naive-messages)",
            report::count(args.naive_messages)
        ),
    })
}

/// `XADD`s per pipeline, and pipelines in flight, for the raw Redis baseline: herald's default
/// batch, several at once on one multiplexed connection.
const REDIS_PIPELINE: usize = 1024;
const REDIS_IN_FLIGHT: usize = 8;

/// The raw redis-rs baselines on `config`'s stream: pipelined `XADD`s (`REDIS_PIPELINE` a round
/// trip, `REDIS_IN_FLIGHT` pipelines outstanding), and the naive await-each pattern.
async fn redis_baselines(
    args: &BenchArgs,
    config: &herald::redis::RedisConfig,
) -> anyhow::Result<Baselines> {
    use herald_redis::baseline as rb;
    let key = config.stream().unwrap_or_default().to_owned();
    let n = usize::try_from(args.messages).unwrap_or(usize::MAX);
    let raw = rb::raw_pipelined(config, &key, args.size, n, REDIS_PIPELINE, REDIS_IN_FLIGHT)
        .await
        .context("raw redis-rs baseline")?;
    let naive_n = usize::try_from(args.naive_messages).unwrap_or(usize::MAX);
    let naive = rb::raw_naive(config, &key, args.size, naive_n)
        .await
        .context("naive redis-rs baseline")?;
    Ok(Baselines {
        raw: raw.msgs_per_sec(),
        raw_what: format!(
            "redis-rs, pipelines of {REDIS_PIPELINE} XADDs, {REDIS_IN_FLIGHT} in flight, {} messages",
            report::count(args.messages)
        ),
        like: None,
        naive: naive.msgs_per_sec(),
        naive_what: format!(
            "redis-rs awaiting each XADD, {} messages (--naive-messages)",
            report::count(args.naive_messages)
        ),
    })
}

/// Publishes in flight for the raw MQTT baseline: the transport's default window (the broker's
/// Receive Maximum bounds what is on the wire, for both).
const MQTT_WINDOW: usize = 4096;

/// The raw rumqttc baselines on `config`'s topic: every publish handed to the event loop with
/// up to `MQTT_WINDOW` unacknowledged, and the naive await-each pattern.
async fn mqtt_baselines(
    args: &BenchArgs,
    config: &herald::mqtt::MqttConfig,
) -> anyhow::Result<Baselines> {
    use herald_mqtt::baseline as mb;
    let topic = config.topic().unwrap_or_default().to_owned();
    let n = usize::try_from(args.messages).unwrap_or(usize::MAX);
    let raw = mb::raw_streaming(config, &topic, args.size, n, MQTT_WINDOW)
        .await
        .context("raw rumqttc baseline")?;
    let naive_n = usize::try_from(args.naive_messages).unwrap_or(usize::MAX);
    let naive = mb::raw_naive(config, &topic, args.size, naive_n)
        .await
        .context("naive rumqttc baseline")?;
    Ok(Baselines {
        raw: raw.msgs_per_sec(),
        raw_what: format!(
            "rumqttc, {MQTT_WINDOW} publishes in flight, {} messages",
            report::count(args.messages)
        ),
        like: None,
        naive: naive.msgs_per_sec(),
        naive_what: format!(
            "rumqttc awaiting each acknowledgement, {} messages (--naive-messages)",
            report::count(args.naive_messages)
        ),
    })
}

/// Where the raw AMQP baselines publish: the URL's exchange and routing key, or its queue
/// through the default exchange.
fn amqp_route(config: &herald_amqp::AmqpConfig) -> anyhow::Result<(String, String)> {
    Ok(match config.route() {
        Some(herald_amqp::Route::Exchange {
            exchange,
            routing_key,
        }) => (exchange.clone(), routing_key.clone()),
        Some(herald_amqp::Route::Queue { name, .. }) => (String::new(), name.clone()),
        None => anyhow::bail!("the AMQP URL names no queue or exchange"),
    })
}

/// Where one raw AMQP run publishes. With the URL naming a queue, a queue of the run's own
/// (`{queue}.herald-bench-{tag}`), declared as herald declares the URL's queue (durable,
/// classic or quorum) and deleted after the run: a RabbitMQ queue with nobody consuming is
/// slower to write to the more it holds, so a run writing behind another's messages would pay
/// for them. With an exchange, the exchange and routing key (whatever is bound there gets
/// every run's messages).
struct RawRoute {
    exchange: String,
    routing_key: String,
    /// The queue to delete after the run.
    scratch: Option<String>,
}

impl RawRoute {
    async fn new(config: &herald_amqp::AmqpConfig, tag: &str) -> anyhow::Result<Self> {
        let Some(herald_amqp::Route::Queue { name, quorum, .. }) = config.route() else {
            let (exchange, routing_key) = amqp_route(config)?;
            return Ok(Self {
                exchange,
                routing_key,
                scratch: None,
            });
        };
        let scratch = format!("{name}.herald-bench-{tag}");
        anyhow::ensure!(
            herald_amqp::name_fits(&scratch),
            "the raw runs' queue {scratch} is longer than AMQP's {} bytes: name a shorter queue",
            herald_amqp::MAX_NAME_BYTES
        );
        // Deleted first: a queue of that name left by an earlier run may hold messages.
        herald_amqp::baseline::delete_queue(config, &scratch)
            .await
            .with_context(|| format!("deleting the raw run's queue {scratch} before the run"))?;
        declare_as_herald(&Target::Amqp(Box::new(config.clone().declare(
            herald_amqp::Declare::Queue {
                name: scratch.clone(),
                quorum: *quorum,
            },
        ))))
        .await?;
        Ok(Self {
            exchange: String::new(),
            routing_key: scratch.clone(),
            scratch: Some(scratch),
        })
    }

    /// Deletes the run's own queue, if it has one.
    async fn remove(self, config: &herald_amqp::AmqpConfig) -> anyhow::Result<()> {
        if let Some(q) = self.scratch {
            herald_amqp::baseline::delete_queue(config, &q)
                .await
                .with_context(|| format!("deleting the raw run's queue {q}"))?;
        }
        Ok(())
    }
}

async fn amqp_baselines(
    args: &BenchArgs,
    config: &herald_amqp::AmqpConfig,
) -> anyhow::Result<Baselines> {
    use herald_amqp::baseline as ab;
    let n = usize::try_from(args.messages).unwrap_or(usize::MAX);
    let to = RawRoute::new(config, "raw").await?;
    let raw = ab::raw_streaming(
        config,
        &to.exchange,
        &to.routing_key,
        args.size,
        n,
        AMQP_CHANNELS,
        AMQP_WINDOW,
    )
    .await;
    // The run's own failure first: a lost connection fails the deletion too.
    let removed = to.remove(config).await;
    let raw = raw.context("raw lapin baseline")?;
    removed?;
    let to = RawRoute::new(config, "alike").await?;
    let like = ab::raw_streaming_carrying(
        config,
        (&to.exchange, &to.routing_key),
        args.size,
        n,
        (AMQP_CHANNELS, AMQP_WINDOW),
        ab::Carry::LikeHerald,
    )
    .await;
    let removed = to.remove(config).await;
    let like = like.context("raw lapin baseline with herald's properties")?;
    removed?;
    let naive_n = usize::try_from(args.naive_messages).unwrap_or(usize::MAX);
    let to = RawRoute::new(config, "naive").await?;
    let naive = ab::raw_naive(config, &to.exchange, &to.routing_key, args.size, naive_n).await;
    let removed = to.remove(config).await;
    let naive = naive.context("naive lapin baseline")?;
    removed?;
    Ok(Baselines {
        raw: raw.msgs_per_sec(),
        raw_what: format!(
            "lapin, streaming confirms over {AMQP_CHANNELS} channels × {AMQP_WINDOW}, {} messages{}",
            report::count(args.messages),
            own_queue(config)
        ),
        like: Some((
            like.msgs_per_sec(),
            format!(
                "lapin as above, each message with herald's `message_id`{}, {} messages",
                if config.key_header_name().is_some() {
                    " and key header"
                } else {
                    " (no key header: ?key_header=)"
                },
                report::count(args.messages)
            ),
        )),
        naive: naive.msgs_per_sec(),
        naive_what: format!(
            "lapin awaiting each confirm, {} messages (--naive-messages)",
            report::count(args.naive_messages)
        ),
    })
}

/// How the raw AMQP runs' line says where they wrote.
fn own_queue(config: &herald_amqp::AmqpConfig) -> &'static str {
    match config.route() {
        Some(herald_amqp::Route::Queue { .. }) => {
            ", each raw run to a new queue of its own, declared as herald's"
        }
        _ => "",
    }
}

/// Declares what herald's transport declares when it connects (an AMQP queue, a NATS stream
/// with `?stream=`), so that the raw clients, which declare nothing, find it when they run
/// before herald (`--baseline-first`).
async fn declare_as_herald(target: &Target) -> anyhow::Result<()> {
    use herald::Transport as _;
    match target {
        Target::Amqp(a) => {
            let t = herald::amqp::AmqpTransport::new((**a).clone())
                .context("the AMQP settings are invalid")?;
            t.connect().await.context("declaring the queue")?;
            t.close().await;
        }
        Target::Nats(n) => {
            let t = herald::nats::NatsTransport::new((**n).clone())
                .context("the NATS settings are invalid")?;
            t.connect().await.context("declaring the stream")?;
            t.close().await;
        }
        Target::Kafka(_) | Target::Redis(_) | Target::Mqtt(_) => {}
    }
    Ok(())
}

/// The raw clients' runs of `--baseline` on `target`.
async fn baselines(args: &BenchArgs, target: &Target) -> anyhow::Result<Baselines> {
    if args.baseline_first {
        declare_as_herald(target).await?;
    }
    Ok(match target {
        Target::Kafka(k) if args.to.is_none() => {
            kafka_baselines(
                args,
                Some(k),
                &k.bootstrap,
                "herald-bench-raw",
                "herald-bench-naive",
            )
            .await?
        }
        Target::Kafka(k) => {
            kafka_baselines(args, Some(k), &k.bootstrap, &k.topic, &k.topic).await?
        }
        Target::Amqp(a) => amqp_baselines(args, a).await?,
        Target::Nats(n) => nats_baselines(args, n).await?,
        Target::Redis(r) => redis_baselines(args, r).await?,
        Target::Mqtt(m) => mqtt_baselines(args, m).await?,
    })
}

/// Runs the benchmark.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<Exit> {
    crate::settings::check_size(
        args.size,
        args.tuning.max_message_bytes,
        "--max-message-bytes",
    )?;
    let mut _mock = None;
    let (target, broker) = match &args.to {
        Some(url) => {
            let target = Target::parse(url)?;
            let broker = target.describe();
            (target, broker)
        }
        None => {
            let mock = MockKafka::start(1).context("starting the mock cluster")?;
            let bootstrap = mock.bootstrap_servers().to_owned();
            for topic in ["herald-bench", "herald-bench-raw", "herald-bench-naive"] {
                mock.create_topic(topic, 3)
                    .context("creating a topic on the mock cluster")?;
            }
            _mock = Some(mock);
            let target = Target::Kafka(KafkaTarget {
                bootstrap,
                topic: "herald-bench".into(),
                client_id: None,
                compression: None,
            });
            (
                target,
                "librdkafka's in-process mock cluster (1 broker, 3 partitions)".to_owned(),
            )
        }
    };
    if let (Target::Kafka(k), Some(_)) = (&target, &args.to) {
        // Brokers that do not create topics on first use (Tansu, or auto-create off).
        let extra = args.tuning.kafka_client_properties(Some(k))?;
        herald::kafka::admin::create_topic_with(&k.bootstrap, &extra, &k.topic, 3, 1)
            .await
            .context(
                "creating the topic (3 partitions, replication factor 1) if it does not exist",
            )?;
    }
    if let Some(rate) = args.rate {
        return open_loop_bench(&args, &target, rate, &broker).await;
    }
    out!(
        "herald bench: {} messages of {} B, {KEYS} keys, to {broker}",
        report::count(args.messages),
        args.size
    );
    out!("  timed from a connected client: herald sends one message and waits for its acknowledgement before the clock starts; the raw clients connect first (on Kafka they send one message too)");
    let first = if args.baseline_first {
        Some(baselines(&args, &target).await?)
    } else {
        None
    };
    let herald = herald_run(&args, &target).await?;
    let rate = report::rate(herald.tally.delivered, herald.elapsed);
    let t = &herald.tally;
    out!(
        "  herald     {:>12} msg/s  p50 {}  p99 {}  (acceptance to acknowledgement; {} delivered, {} failed, {})",
        report::count(rate as u64),
        t.latency.quantile(0.5).map_or("-".into(), report::duration),
        t.latency.quantile(0.99).map_or("-".into(), report::duration),
        report::count(t.delivered),
        report::count(t.failed),
        report::duration(herald.elapsed),
    );
    for e in &t.examples {
        out!("    e.g. {e}");
    }
    let baselines = if args.baseline {
        let b = match first {
            Some(b) => b,
            None => baselines(&args, &target).await?,
        };
        out!(
            "  raw best   {:>12} msg/s  ({})  herald / raw = {:.2}x",
            report::count(b.raw as u64),
            b.raw_what,
            rate / b.raw
        );
        if let Some((like, what)) = &b.like {
            out!(
                "  raw alike  {:>12} msg/s  ({what})  herald / raw alike = {:.2}x",
                report::count(*like as u64),
                rate / like
            );
        }
        out!(
            "  naive      {:>12} msg/s  ({})  herald / naive = {:.0}x",
            report::count(b.naive as u64),
            b.naive_what,
            rate / b.naive
        );
        Some(b)
    } else {
        None
    };
    let ok = t.delivered == args.messages;
    if args.report == ReportFormat::Json {
        let mut obj = Map::new();
        obj.insert("command".into(), json!("bench"));
        obj.insert("broker".into(), json!(broker));
        obj.insert("messages".into(), json!(args.messages));
        obj.insert("size".into(), json!(args.size));
        obj.insert("sent".into(), json!(t.delivered));
        obj.insert("failed".into(), json!(t.failed));
        obj.insert(
            "elapsed_s".into(),
            report::num(herald.elapsed.as_secs_f64()),
        );
        obj.insert("herald_msgs_per_sec".into(), report::num(rate));
        obj.insert("baseline_first".into(), json!(args.baseline_first));
        obj.insert("p50_ms".into(), report::ms(t.latency.quantile(0.5)));
        obj.insert("p99_ms".into(), report::ms(t.latency.quantile(0.99)));
        obj.insert("max_ms".into(), report::ms(t.latency.max()));
        if let Some(b) = &baselines {
            obj.insert("raw_best_msgs_per_sec".into(), report::num(b.raw));
            obj.insert("naive_msgs_per_sec".into(), report::num(b.naive));
            obj.insert("naive_messages".into(), json!(args.naive_messages));
            obj.insert("herald_vs_raw".into(), report::num(rate / b.raw));
            obj.insert("herald_vs_naive".into(), report::num(rate / b.naive));
            if let Some((like, _)) = &b.like {
                obj.insert("raw_like_herald_msgs_per_sec".into(), report::num(*like));
                obj.insert("herald_vs_raw_like_herald".into(), report::num(rate / like));
            }
        }
        out!("{}", Value::Object(obj));
    }
    Ok(if ok { Exit::Ok } else { Exit::Failed })
}

/// herald's per-message path (`Producer::enqueue`), for the open loop.
struct HeraldSender {
    producer: herald::Producer,
    dest: Destination,
    payload: Bytes,
    keys: Vec<Bytes>,
}

impl open_loop::Sender for HeraldSender {
    async fn send(&mut self, i: u64) -> BoxFuture<'static, bool> {
        let msg = Message::new(self.dest.clone(), self.payload.clone())
            .with_key(self.keys[(i % KEYS) as usize].clone());
        match self.producer.enqueue(msg).await {
            Ok(delivery) => Box::pin(async move { delivery.await.is_ok() }),
            Err(_) => Box::pin(async { false }),
        }
    }
}

struct KafkaOneByOne(herald_kafka::baseline::OneByOne);

impl open_loop::Sender for KafkaOneByOne {
    async fn send(&mut self, i: u64) -> BoxFuture<'static, bool> {
        Box::pin(self.0.send(i))
    }
}

struct AmqpOneByOne(herald_amqp::baseline::OneByOne);

struct NatsOneByOne(herald_nats::baseline::OneByOne);

impl open_loop::Sender for NatsOneByOne {
    async fn send(&mut self, i: u64) -> BoxFuture<'static, bool> {
        Box::pin(self.0.publish(i).await)
    }
}

struct RedisOneByOne(herald_redis::baseline::OneByOne);

impl open_loop::Sender for RedisOneByOne {
    async fn send(&mut self, i: u64) -> BoxFuture<'static, bool> {
        Box::pin(self.0.send(i))
    }
}

struct MqttOneByOne(herald_mqtt::baseline::OneByOne);

impl open_loop::Sender for MqttOneByOne {
    async fn send(&mut self, i: u64) -> BoxFuture<'static, bool> {
        Box::pin(self.0.publish(i).await)
    }
}

impl open_loop::Sender for AmqpOneByOne {
    async fn send(&mut self, _: u64) -> BoxFuture<'static, bool> {
        Box::pin(self.0.publish().await)
    }
}

/// One open-loop result as a line: its percentiles, then `detail`.
fn paced_line(name: &str, p: &open_loop::Paced, detail: &str) {
    let q = |q: f64| p.quantile(q).map_or("-".into(), report::duration);
    out!(
        "  {name:<9}  p50 {}  p99 {}  p99.9 {}  max {}  ({detail})",
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
}

/// Signed difference in milliseconds, `+0.42 ms`.
fn ms_diff(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.2} ms", (a.as_secs_f64() - b.as_secs_f64()) * 1e3),
        _ => "-".into(),
    }
}

/// The raw client's open-loop run of `--baseline` on `target` at `rate`, and what it is.
async fn paced_baseline(
    args: &BenchArgs,
    target: &Target,
    rate: f64,
) -> anyhow::Result<(open_loop::Paced, String)> {
    if args.baseline_first {
        declare_as_herald(target).await?;
    }
    Ok(match target {
        Target::Kafka(k) => {
            let extra = args.tuning.kafka_client_properties(Some(k))?;
            let topic = if args.to.is_none() {
                "herald-bench-raw"
            } else {
                &k.topic
            };
            let one =
                herald_kafka::baseline::OneByOne::connect(&k.bootstrap, &extra, topic, args.size)
                    .await
                    .context("raw rdkafka baseline")?;
            let (raw, _) = open_loop::run(KafkaOneByOne(one), rate, args.messages).await?;
            (
                raw,
                "rdkafka FutureProducer, a delivery future per message".to_owned(),
            )
        }
        Target::Amqp(a) => {
            let to = RawRoute::new(a, "paced").await?;
            let run = async {
                let one = herald_amqp::baseline::OneByOne::connect(
                    a,
                    &to.exchange,
                    &to.routing_key,
                    args.size,
                    AMQP_CHANNELS,
                )
                .await
                .context("raw lapin baseline")?;
                let (raw, one) = open_loop::run(AmqpOneByOne(one), rate, args.messages).await?;
                one.0.close().await.context("raw lapin baseline")?;
                anyhow::Ok(raw)
            }
            .await;
            let removed = to.remove(a).await;
            let raw = run?;
            removed?;
            (
                raw,
                format!(
                    "lapin, confirms awaited as they come, publishes over {AMQP_CHANNELS} channels{}",
                    own_queue(a)
                ),
            )
        }
        Target::Nats(c) => {
            let subject = c.subject().unwrap_or_default();
            let one = herald_nats::baseline::OneByOne::connect(c, subject, args.size)
                .await
                .context("raw async-nats baseline")?;
            let (raw, _) = open_loop::run(NatsOneByOne(one), rate, args.messages).await?;
            (
                raw,
                "async-nats, each PubAck awaited as it comes".to_owned(),
            )
        }
        Target::Redis(c) => {
            let key = c.stream().unwrap_or_default();
            let one = herald_redis::baseline::OneByOne::connect(c, key, args.size)
                .await
                .context("raw redis-rs baseline")?;
            let (raw, _) = open_loop::run(RedisOneByOne(one), rate, args.messages).await?;
            (
                raw,
                "redis-rs, one XADD per message on a multiplexed connection".to_owned(),
            )
        }
        Target::Mqtt(c) => {
            let topic = c.topic().unwrap_or_default();
            let one = herald_mqtt::baseline::OneByOne::connect(c, topic, args.size)
                .await
                .context("raw rumqttc baseline")?;
            let (raw, _) = open_loop::run(MqttOneByOne(one), rate, args.messages).await?;
            (
                raw,
                "rumqttc, each acknowledgement matched to its publish by packet id as it comes"
                    .to_owned(),
            )
        }
    })
}

/// `herald bench --rate`: herald (and with `--baseline` the raw client) sending `args.messages`
/// on a fixed schedule of `rate` messages a second, latency from due time to acknowledgement.
async fn open_loop_bench(
    args: &BenchArgs,
    target: &Target,
    rate: f64,
    broker: &str,
) -> anyhow::Result<Exit> {
    open_loop::check_rate(rate, args.messages)?;
    out!(
        "herald bench: open loop, {} messages of {} B at {} msg/s ({}), {KEYS} keys, to {broker}",
        report::count(args.messages),
        args.size,
        report::count(rate as u64),
        report::duration(Duration::from_secs_f64(args.messages as f64 / rate)),
    );
    out!("  latency from each message's due time on the schedule to its acknowledgement; every client connected first (one message acknowledged)");
    let first = if args.baseline_first {
        Some(paced_baseline(args, target, rate).await?)
    } else {
        None
    };
    let session = args.tuning.build(target)?;
    let payload = Bytes::from(vec![b'x'; args.size]);
    warm_up(&session, &payload).await?;
    let sender = HeraldSender {
        producer: session.producer.clone(),
        dest: session.destination.clone(),
        payload,
        keys: keys(),
    };
    let (herald, _) = open_loop::run(sender, rate, args.messages).await?;
    session.producer.close(Duration::from_secs(30)).await;
    let achieved = |p: &open_loop::Paced| {
        format!(
            "{} delivered, {} failed, {} msg/s, at most {} behind the schedule",
            report::count(p.delivered()),
            report::count(p.failed),
            report::count(report::rate(p.delivered() + p.failed, p.elapsed) as u64),
            report::duration(p.behind)
        )
    };
    paced_line("herald", &herald, &achieved(&herald));
    let raw = if args.baseline {
        let (raw, what) = match first {
            Some(first) => first,
            None => paced_baseline(args, target, rate).await?,
        };
        anyhow::ensure!(
            raw.failed == 0,
            "the raw baseline lost {} messages",
            raw.failed
        );
        paced_line("raw", &raw, &format!("{what}; {}", achieved(&raw)));
        let q = |p: &open_loop::Paced, q: f64| p.quantile(q);
        out!(
            "  herald - raw: p50 {}, p99 {}, p99.9 {}",
            ms_diff(q(&herald, 0.5), q(&raw, 0.5)),
            ms_diff(q(&herald, 0.99), q(&raw, 0.99)),
            ms_diff(q(&herald, 0.999), q(&raw, 0.999)),
        );
        Some(raw)
    } else {
        None
    };
    if args.report == ReportFormat::Json {
        let mut obj = Map::new();
        obj.insert("command".into(), json!("bench"));
        obj.insert("mode".into(), json!("open_loop"));
        obj.insert("broker".into(), json!(broker));
        obj.insert("rate".into(), report::num(rate));
        obj.insert("baseline_first".into(), json!(args.baseline_first));
        obj.insert("messages".into(), json!(args.messages));
        obj.insert("size".into(), json!(args.size));
        let mut put = |prefix: &str, p: &open_loop::Paced| {
            obj.insert(format!("{prefix}sent"), json!(p.delivered()));
            obj.insert(format!("{prefix}failed"), json!(p.failed));
            obj.insert(format!("{prefix}p50_ms"), report::ms(p.quantile(0.5)));
            obj.insert(format!("{prefix}p99_ms"), report::ms(p.quantile(0.99)));
            obj.insert(format!("{prefix}p999_ms"), report::ms(p.quantile(0.999)));
            obj.insert(format!("{prefix}max_ms"), report::ms(p.quantile(1.0)));
            obj.insert(format!("{prefix}behind_ms"), report::ms(Some(p.behind)));
        };
        put("", &herald);
        if let Some(raw) = &raw {
            put("raw_", raw);
        }
        out!("{}", Value::Object(obj));
    }
    Ok(if herald.delivered() == args.messages {
        Exit::Ok
    } else {
        Exit::Failed
    })
}
