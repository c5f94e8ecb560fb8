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
    first_at: Option<Instant>,
}

/// Consumes `queue` through `url` (acking each message) until `expected` distinct payloads
/// arrived or `within` passed, connecting again after any failure: the node may still be
/// electing the queue's new leader.
async fn consume_all(url: &str, queue: &str, expected: usize, within: Duration) -> Consumed {
    let deadline = Instant::now() + within;
    let mut got = Consumed {
        payloads: HashSet::with_capacity(expected),
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
                delivery.ack(BasicAckOptions::default()).await.map_err(e)?;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _closed = conn.close(200, "OK".into()).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server: cargo xtask it amqp"]
async fn a_quorum_queue_serves_every_confirmed_message_after_its_node_is_killed() {
    const TEST: &str = "a_quorum_queue_serves_every_confirmed_message_after_its_node_is_killed";
    const N: usize = 1_000;
    let began = Instant::now();
    let Some(mut cluster) = RabbitCluster::start_or_skip(TEST, 3).await else {
        return;
    };
    let formed = began.elapsed();
    eprintln!("cluster: 3 nodes formed in {formed:.1?}");
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
        "cluster: node 0 back in {back:.1?}; test body {:.1?}",
        began.elapsed()
    );
}
