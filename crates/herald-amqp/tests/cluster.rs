//! Tests on a RabbitMQ cluster of their own: three nodes of this machine's `rabbitmq-server`
//! started by the test (`common/cluster.rs`), never the machine's shared RabbitMQ. Run by
//! `cargo xtask it amqp`; marked `#[ignore]` so that `cargo test --workspace` stays hermetic.
//! Without `rabbitmq-server` they fail, saying so, unless `HERALD_IT_ALLOW_SKIP=1`, when they
//! print `SKIPPED: <test>: <why>` and pass.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::Instant;

use common::cluster::RabbitCluster;
use common::recording::Recording;
use herald_amqp::{AmqpConfig, AmqpTransport, Declare};
use herald_core::{Destination, Message, Producer};
use herald_retry::{Backoff, ExponentialRetry};

/// A connection to `url`, given 10 s.
async fn connect(url: &str) -> Result<Connection, String> {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| format!("no connection to {url} within 10 s"))?
    .map_err(|e| format!("connecting to {url}: {e}"))
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// What [`consume_all`] got, and when the first message came.
struct Consumed {
    payloads: HashSet<Vec<u8>>,
    /// Every arrival, duplicates included, in the order the queue delivered them.
    arrivals: Vec<Vec<u8>>,
    first_at: Option<Instant>,
}

/// Consumes `queue` through `url` (acking each message) until `expected` distinct payloads
/// arrived or `within` passed, connecting again after any failure: the node may still be
/// electing the queue's new leader.
async fn consume_all(url: &str, queue: &str, expected: usize, within: Duration) -> Consumed {
    let deadline = Instant::now() + within;
    let mut got = Consumed {
        payloads: HashSet::with_capacity(expected),
        arrivals: Vec::with_capacity(expected),
        first_at: None,
    };
    while got.payloads.len() < expected && Instant::now() < deadline {
        if let Err(e) = consume_some(url, queue, expected, deadline, &mut got).await {
            eprintln!("consuming {queue} from {url}: {e}; again");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    got
}

async fn consume_some(
    url: &str,
    queue: &str,
    expected: usize,
    deadline: Instant,
    got: &mut Consumed,
) -> Result<(), String> {
    let conn = connect(url).await?;
    let e = |e: lapin::Error| e.to_string();
    let ch = conn.create_channel().await.map_err(e)?;
    ch.basic_qos(500, BasicQosOptions::default())
        .await
        .map_err(e)?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "cluster-smoke".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(e)?;
    while got.payloads.len() < expected {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(delivery)) => {
                let delivery = delivery.map_err(e)?;
                got.first_at.get_or_insert_with(Instant::now);
                got.payloads.insert(delivery.data.clone());
                got.arrivals.push(delivery.data.clone());
                delivery.ack(BasicAckOptions::default()).await.map_err(e)?;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _closed = conn.close(200, "OK".into()).await;
    Ok(())
}

/// One cluster (formed once: about 25 s) for three scenarios in a row, each leaving every node
/// running for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server: cargo xtask it amqp"]
async fn a_three_node_cluster_loses_nothing_to_a_crash_or_a_rolling_restart() {
    const TEST: &str = "a_three_node_cluster_loses_nothing_to_a_crash_or_a_rolling_restart";
    let began = Instant::now();
    let Some(mut cluster) = RabbitCluster::start_or_skip(TEST, 3).await else {
        return;
    };
    eprintln!("cluster: 3 nodes formed in {:.1?}", began.elapsed());
    quorum_queue_survives_its_node(&mut cluster).await;
    // `HERALD_CLUSTER_FAILOVER_ROUNDS=10` runs the failover scenario ten times in a row (on the
    // one cluster), to chase a failure seen once.
    let rounds: usize = std::env::var("HERALD_CLUSTER_FAILOVER_ROUNDS").map_or(1, |r| {
        r.parse()
            .expect("HERALD_CLUSTER_FAILOVER_ROUNDS: a number of rounds")
    });
    for round in 1..=rounds {
        if rounds > 1 {
            eprintln!("cluster failover: round {round} of {rounds}");
        }
        herald_fails_over_when_its_node_is_killed(&mut cluster).await;
    }
    herald_rides_a_rolling_restart(&mut cluster).await;
    eprintln!("cluster: all scenarios in {:.1?}", began.elapsed());
}

/// The cluster itself, with raw lapin: a quorum queue serves every confirmed message from
/// another node after the node it was published through is killed; that node comes back.
async fn quorum_queue_survives_its_node(cluster: &mut RabbitCluster) {
    const N: usize = 1_000;
    let began = Instant::now();
    let urls = cluster.urls();
    let queue = format!("herald-cluster-smoke-{}", std::process::id());

    // Through node 0: a quorum queue (replicated on all three), N persistent messages, each
    // confirmed (a quorum queue confirms once a majority of its members has it).
    let conn = connect(&urls[0]).await.expect("connect to node 0");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(queue.as_str().into(), DURABLE, quorum())
        .await
        .expect("declare the quorum queue");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut confirms = Vec::with_capacity(N);
    for i in 0..N {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                format!("m-{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for (i, confirm) in confirms.into_iter().enumerate() {
        let confirmation = tokio::time::timeout(Duration::from_secs(60), confirm)
            .await
            .unwrap_or_else(|_| panic!("confirm of message {i} within 60 s"))
            .expect("confirm");
        assert!(confirmation.is_ack(), "message {i}: {confirmation:?}");
    }
    let _closed = conn.close(200, "OK".into()).await;

    // Node 0 crashes; node 1 serves every confirmed message.
    let killed = Instant::now();
    cluster.kill(0).await.expect("SIGKILL node 0");
    let got = consume_all(&urls[1], &queue, N, Duration::from_secs(90)).await;
    let all_at = killed.elapsed();
    let first_at = got.first_at.map(|t| t - killed);
    let expected: HashSet<Vec<u8>> = (0..N).map(|i| format!("m-{i}").into_bytes()).collect();
    assert_eq!(
        got.payloads.len(),
        N,
        "node 1 served {} of the {N} confirmed messages within 90 s of the kill",
        got.payloads.len()
    );
    assert_eq!(got.payloads, expected, "exactly the messages sent");
    eprintln!(
        "cluster: from SIGKILL of node 0 to node 1 serving: first message {first_at:.1?}, \
         all {N} {all_at:.1?}"
    );

    // Node 0 comes back, with its data, into the cluster, and answers.
    let restarting = Instant::now();
    cluster.start_node(0).await.expect("node 0 back");
    let back = restarting.elapsed();
    let conn = connect(&urls[0]).await.expect("node 0 answers again");
    let ch = conn.create_channel().await.expect("channel");
    // Node 0 knows the queue. (Its message count is not checked: right after the restart it
    // can still count messages acked while it was down, for longer than a test should wait.)
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..DURABLE
        },
        FieldTable::default(),
    )
    .await
    .expect("node 0 knows the queue");
    let _closed = conn.close(200, "OK".into()).await;
    eprintln!(
        "cluster: node 0 back in {back:.1?}; smoke test {:.1?}",
        began.elapsed()
    );
}

/// Keys of the herald scenarios: each message is `k{key}-{seq}`, `seq` counting up per key.
const KEYS: usize = 64;

fn keyed(destination: &Destination, i: usize) -> Message {
    let key = i % KEYS;
    Message::new(destination.clone(), format!("k{key}-{}", i / KEYS)).with_key(format!("k{key}"))
}

/// A herald producer over the whole cluster's address list (in node order), declaring `queue`
/// as a quorum queue on every node it connects to; the producer's defaults (strict ordering),
/// retries without an attempt limit, a 120 s delivery timeout.
fn producer_over(cluster: &RabbitCluster, queue: &str) -> (AmqpTransport, Recording, Producer) {
    let list: Vec<String> = (0..cluster.len())
        .map(|i| format!("127.0.0.1:{}", cluster.port(i)))
        .collect();
    let url = format!("amqp://guest:guest@{}/%2f", list.join(","));
    let transport = AmqpTransport::new(
        AmqpConfig::from_url(&url)
            .expect("url")
            .declare(Declare::Queue {
                name: queue.to_owned(),
                quorum: true,
            })
            .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(1)),
    )
    .expect("transport");
    let recording = Recording::new(transport.clone());
    let producer = Producer::builder(recording.clone())
        .retry(
            ExponentialRetry::new(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(500),
            ))
            .unlimited_attempts(),
        )
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    (transport, recording, producer)
}

/// The cluster's AMQP ports, in node order.
fn ports(cluster: &RabbitCluster) -> Vec<u16> {
    (0..cluster.len()).map(|i| cluster.port(i)).collect()
}

/// The index of the node (of those on `ports`) `transport` is connected to, if any.
fn node_in_use(ports: &[u16], transport: &AmqpTransport) -> Option<usize> {
    let node = transport.connected_node()?;
    ports
        .iter()
        .position(|port| node == format!("127.0.0.1:{port}"))
}

/// Checks what was read back: every one of `sent` messages at least once, nothing else, and
/// the first copy of each in per-key order (else fails, with the history of the two messages
/// out of order from `recording`). Returns the number of duplicates.
fn check_read_back(got: &Consumed, sent: usize, recording: &Recording) -> usize {
    let expected: HashSet<Vec<u8>> = (0..sent)
        .map(|i| format!("k{}-{}", i % KEYS, i / KEYS).into_bytes())
        .collect();
    let missing = expected.difference(&got.payloads).count();
    assert_eq!(
        missing, 0,
        "{missing} of the {sent} delivered messages were not read back"
    );
    assert_eq!(
        got.payloads, expected,
        "exactly the messages sent, nothing else"
    );
    let mut seen = HashSet::with_capacity(sent);
    let mut last = vec![None::<usize>; KEYS];
    for payload in &got.arrivals {
        if !seen.insert(payload.as_slice()) {
            continue;
        }
        let text = std::str::from_utf8(payload).expect("utf-8");
        let (key, seq) = text[1..].split_once('-').expect("k{key}-{seq}");
        let (key, seq): (usize, usize) = (key.parse().expect("key"), seq.parse().expect("seq"));
        if let Some(l) = last[key].filter(|&l| l > seq) {
            let position = |p: &str| got.arrivals.iter().position(|a| a == p.as_bytes());
            let (earlier, later) = (format!("k{key}-{seq}"), format!("k{key}-{l}"));
            panic!(
                "key k{key}: first copy of {seq} came after that of {l} (arrivals {:?} and \
                 {:?} of {}); what herald did with each:\n{}\n{}",
                position(&earlier),
                position(&later),
                got.arrivals.len(),
                recording.history(&earlier, &format!("k{key}-")),
                recording.history(&later, &format!("k{key}-")),
            );
        }
        last[key] = Some(seq);
    }
    got.arrivals.len() - sent
}

/// When the transport switched from node `left` to another, in milliseconds from the start of
/// [`time_switch`].
#[derive(Debug)]
struct Switch {
    /// It was no longer connected to `left`.
    left_ms: u128,
    /// It was connected to another node.
    connected_ms: u128,
    /// A message was delivered through that node.
    delivered_ms: u128,
}

/// Waits (at most `within`) until the transport leaves node `left`, is connected to another,
/// and delivers a message through it: when each happened. Run beside the stop or kill of
/// `left`.
async fn time_switch(
    ports: &[u16],
    transport: &AmqpTransport,
    producer: &Producer,
    left: usize,
    within: Duration,
) -> Switch {
    let start = Instant::now();
    let deadline = start + within;
    let poll = Duration::from_millis(2);
    let mut left_ms = None;
    loop {
        match node_in_use(ports, transport) {
            Some(n) if n == left => {}
            None => {
                left_ms.get_or_insert(start.elapsed().as_millis());
            }
            Some(_) => break,
        }
        assert!(
            Instant::now() < deadline,
            "no connection to another node within {within:?}"
        );
        tokio::time::sleep(poll).await;
    }
    let connected_ms = start.elapsed().as_millis();
    let before = producer.stats().totals.delivered;
    while producer.stats().totals.delivered == before {
        assert!(
            Instant::now() < deadline,
            "no delivery through the next node within {within:?}"
        );
        tokio::time::sleep(poll).await;
    }
    Switch {
        left_ms: left_ms.unwrap_or(connected_ms),
        connected_ms,
        delivered_ms: start.elapsed().as_millis(),
    }
}

/// Issue 13 (a): the node herald publishes through is killed (SIGKILL) after 20 000 of 100 000
/// keyed persistent messages to a quorum queue, and stays down while the run ends and the
/// queue is read back from a surviving node: nothing lost, first copies in per-key order.
async fn herald_fails_over_when_its_node_is_killed(cluster: &mut RabbitCluster) {
    const N: usize = 100_000;
    let began = Instant::now();
    // A queue of each round's own.
    static ROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let queue = format!(
        "herald-cluster-failover-{}-{}",
        std::process::id(),
        ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (transport, recording, p) = producer_over(cluster, &queue);
    let destination = herald_amqp::queue(&queue);
    let receipt = p.send_all((0..N).map(|i| keyed(&destination, i))).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while p.stats().totals.delivered < 20_000 {
        assert!(Instant::now() < deadline, "20 000 deliveries within 120 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ports = ports(cluster);
    let victim = node_in_use(&ports, &transport).expect("connected to a node of the cluster");
    let killed_at = p.stats().totals.delivered;
    let (switch, killed) = tokio::join!(
        time_switch(&ports, &transport, &p, victim, Duration::from_secs(60)),
        cluster.kill(victim)
    );
    killed.expect("SIGKILL the node in use");
    let report = tokio::time::timeout(Duration::from_secs(240), receipt.wait())
        .await
        .expect("the run ends within 240 s");
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, N as u64);
    let took = began.elapsed();
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(30)).await;
    let survivor = (victim + 1) % cluster.len();
    let got = consume_all(&cluster.url(survivor), &queue, N, Duration::from_secs(120)).await;
    let duplicates = check_read_back(&got, N, &recording);
    eprintln!(
        "cluster failover: node {victim} killed after {killed_at} deliveries; connected to \
         the next node {} ms and first delivery through it {} ms after the kill; {N} in \
         {took:.1?} ({:.0} msg/s), {duplicates} duplicates, {retries} retries; outcomes: {}",
        switch.connected_ms,
        switch.delivered_ms,
        N as f64 / took.as_secs_f64(),
        recording.codes()
    );
    cluster
        .start_node(victim)
        .await
        .expect("the killed node back");
}

/// Issue 13 (b): every node stopped and started again, one after the other, while herald
/// produces about 2 000 messages a second: nothing lost, first copies in per-key order.
async fn herald_rides_a_rolling_restart(cluster: &mut RabbitCluster) {
    let queue = format!("herald-cluster-rolling-{}", std::process::id());
    let (transport, recording, p) = producer_over(cluster, &queue);
    let p = std::sync::Arc::new(p);
    let destination = herald_amqp::queue(&queue);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 20 messages every 10 ms; each outcome awaited at the end.
    let feeder = tokio::spawn({
        let (p, stop) = (p.clone(), stop.clone());
        async move {
            let mut futures = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..20 {
                    futures.push(p.enqueue(keyed(&destination, i)).await.expect("accepted"));
                    i += 1;
                }
            }
            (i, futures)
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.stats().totals.delivered < 2_000 {
        assert!(Instant::now() < deadline, "2 000 deliveries within 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let began = Instant::now();
    let mut switches = Vec::new();
    let ports = ports(cluster);
    // The node in use first, then the others in list order.
    let first = node_in_use(&ports, &transport).expect("connected");
    for node in (0..ports.len()).map(|k| (first + k) % ports.len()) {
        if node_in_use(&ports, &transport) == Some(node) {
            let (switch, stopped) = tokio::join!(
                time_switch(&ports, &transport, &p, node, Duration::from_secs(60)),
                cluster.stop(node)
            );
            stopped.expect("stop the node");
            switches.push(switch.delivered_ms - switch.left_ms);
        } else {
            cluster.stop(node).await.expect("stop the node");
        }
        cluster.start_node(node).await.expect("the node back");
    }
    let rolled = began.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, futures) = feeder.await.expect("the feeder");
    let mut failed = Vec::new();
    for f in futures {
        if let Err(e) = tokio::time::timeout(Duration::from_secs(180), f)
            .await
            .expect("every outcome within 180 s")
        {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    let retries = p.stats().totals.retries;
    p.close(Duration::from_secs(30)).await;
    let got = consume_all(&cluster.url(0), &queue, sent, Duration::from_secs(120)).await;
    let duplicates = check_read_back(&got, sent, &recording);
    eprintln!(
        "cluster rolling restart: {rolled:.1?} for three nodes; {sent} messages, {duplicates} \
         duplicates, {retries} retries; first delivery through the next node after leaving \
         one: {switches:?} ms; outcomes: {}",
        recording.codes()
    );
}
