//! The Kafka transport against a real Kafka-protocol broker. Run by `cargo xtask it`, which
//! provides `HERALD_KAFKA_BOOTSTRAP` (and `HERALD_TANSU_BIN` for the tests that run Tansu
//! brokers of their own: a restart, a failover). `HERALD_TANSU_LOG_DIR=DIR` keeps those
//! brokers' logs in `DIR/tansu-PORT.log`; a test that fails prints the end of them anyway.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_all_stored_last_copies_in_order, assert_exactly_once_in_order, delivered_all,
    health_becomes, read_back, KafkaHarness,
};
use herald_core::{Destination, HealthIssue, Message, Producer};
use herald_kafka::{admin, KafkaConfig, KafkaTransport};
use herald_retry::{Backoff, ExponentialRetry};
use herald_testkit::checks::{cut_twice_mid_run, free_port, RunInParts};
use herald_testkit::conformance::{self, Injected};

fn bootstrap() -> String {
    std::env::var("HERALD_KAFKA_BOOTSTRAP")
        .expect("HERALD_KAFKA_BOOTSTRAP is not set: run these tests with `cargo xtask it kafka`")
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{name}-{}-{nanos}", std::process::id())
}

async fn topic(bootstrap: &str, name: &str, partitions: i32) -> String {
    let name = unique(name);
    admin::create_topic(bootstrap, &name, partitions, 1)
        .await
        .expect("create topic");
    name
}

fn keyed(topic: &str, range: std::ops::Range<usize>, keys: usize) -> Vec<Message> {
    let d = Destination::new(topic);
    range
        .map(|i| Message::new(d.clone(), format!("m-{i}")).with_key(format!("k{}", i % keys)))
        .collect()
}

async fn read(bootstrap: &str, topic: &str, expected: usize) -> Vec<Message> {
    let (b, t) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_back(&b, &t, expected, Duration::from_secs(120)))
        .await
        .expect("read back")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn conformance_suite_on_a_real_broker() {
    let b = bootstrap();
    let creator = b.clone();
    let harness = KafkaHarness {
        bootstrap: b,
        create_topic: Box::new(move |name| {
            let creator = creator.clone();
            let name = name.to_owned();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(admin::create_topic(&creator, &name, 3, 1))
                    .expect("create topic");
            });
        }),
        inject: Box::new(|_| Injected::Nothing),
        prefix: unique("conformance"),
    };
    conformance::run(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_hundred_thousand_keyed_messages_arrive_once_in_order() {
    let b = bootstrap();
    let t = topic(&b, "hundred-k", 3).await;
    let transport = KafkaTransport::new(KafkaConfig::new(b.clone())).expect("transport");
    let producer = Producer::builder(transport)
        .batching(herald_kafka::recommended_batching())
        .build()
        .expect("producer");
    let msgs = keyed(&t, 0..100_000, 50);
    let report = producer.send_all(msgs.clone()).await.wait().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, 100_000);
    producer.close(Duration::from_secs(30)).await;
    assert_exactly_once_in_order(&msgs, &read(&b, &t, msgs.len()).await);
}

/// Where a test's own Tansu writes its log, and whether to keep it: `DIR/tansu-PORT.log` with
/// `HERALD_TANSU_LOG_DIR=DIR` (kept), else `herald-tansu-PORT.log` in the temporary folder
/// (emptied here, so that a failed run's log on the same port is not read as this one's, and
/// removed when the broker goes away unless the test failed). A restart appends to it. A test
/// that fails prints the end of each of its brokers' logs (see [`OwnTansu`]'s `Drop`): Tansu's
/// own failures (a panic in its storage) are then named in the test's output.
fn fresh_log(port: u16) -> (std::path::PathBuf, bool) {
    if let Some(dir) = std::env::var_os("HERALD_TANSU_LOG_DIR") {
        return (
            std::path::Path::new(&dir).join(format!("tansu-{port}.log")),
            true,
        );
    }
    let path = std::env::temp_dir().join(format!("herald-tansu-{port}.log"));
    let _fresh = std::fs::remove_file(&path);
    (path, false)
}

/// Removes the SQLite database `db` with its write-ahead log and that log's index.
fn remove_database(db: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        let _removed = std::fs::remove_file(path);
    }
}

fn tansu_log(path: &std::path::Path) -> Stdio {
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(f) => Stdio::from(f),
        Err(e) => panic!("cannot open the Tansu log {}: {e}", path.display()),
    }
}

/// The last `lines` lines of `path`, after the first three lines before them that tell of a
/// panic (and how many there were).
fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let cut = all.len().saturating_sub(lines);
    let panics: Vec<&str> = all[..cut]
        .iter()
        .copied()
        .filter(|l| l.contains("panicked"))
        .collect();
    let mut out: Vec<String> = panics.iter().take(3).map(|l| (*l).to_owned()).collect();
    if !panics.is_empty() {
        out.push(format!("({} panics before the last lines)", panics.len()));
    }
    out.extend(all[cut..].iter().map(|l| (*l).to_owned()));
    out.join("\n")
}

/// Everything `topic` on `bootstrap` holds, read on a blocking thread (within 2 minutes).
async fn read_to_end(bootstrap: &str, topic: &str) -> Vec<Message> {
    let (b, t) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        admin::read_topic_to_end(&b, &t, Duration::from_secs(120)).expect("read to the end")
    })
    .await
    .expect("read back")
}

/// A Tansu broker of the test's own, on SQLite storage so that its log survives a restart.
struct OwnTansu {
    bin: String,
    port: u16,
    db: std::path::PathBuf,
    child: Option<Child>,
    /// The port advertised to clients, when not its own (a TLS proxy in front of it).
    advertised: Option<u16>,
    /// More arguments for `tansu broker` (`--authentication`).
    args: Vec<&'static str>,
    /// Its log (stderr), and whether to keep it when the test passes.
    log: std::path::PathBuf,
    keep_log: bool,
}

impl OwnTansu {
    fn start(bin: String) -> Self {
        Self::start_on(bin, free_port(), None, Vec::new())
    }

    /// A broker on `port` that advertises `advertised` (else its own port), started with
    /// `args` more.
    fn start_on(bin: String, port: u16, advertised: Option<u16>, args: Vec<&'static str>) -> Self {
        let db = std::env::temp_dir().join(format!("herald-tansu-{port}.db"));
        // A database of an earlier run on this port (one killed before its drop) goes, its
        // write-ahead log with it: a fresh database must not meet an old log.
        remove_database(&db);
        let (log, keep_log) = fresh_log(port);
        let mut t = Self {
            bin,
            port,
            db,
            child: None,
            advertised,
            args,
            log,
            keep_log,
        };
        t.up();
        t
    }

    /// A second broker of the same cluster: its own port, the same SQLite file (Tansu's
    /// brokers keep no state of their own; each is the leader of every partition).
    fn sharing(other: &Self) -> Self {
        let port = free_port();
        let (log, keep_log) = fresh_log(port);
        let mut t = Self {
            bin: other.bin.clone(),
            port,
            db: other.db.clone(),
            child: None,
            advertised: None,
            args: other.args.clone(),
            log,
            keep_log,
        };
        t.up();
        t
    }

    /// Whether a client holds a connection to this broker now (an established TCP connection
    /// to its port, read from /proc/net/tcp: no other process talks to a test's own broker).
    fn in_use(&self) -> bool {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let port = format!("{:04X}", self.port);
        table.lines().skip(1).any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[3] == "01" && cols[2].ends_with(&format!(":{port}"))
        })
    }

    /// Kills the broker (SIGKILL) for good, as a crashed node.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _killed = c.kill();
            let _reaped = c.wait();
        }
    }

    fn db_name(&self) -> String {
        self.db
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let url = format!("tcp://{}", self.addr());
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(&self.args)
            .env("LISTENER_URL", &url)
            .env("ADVERTISED_LISTENER_URL", &advertised)
            // Tansu reads the SQLite path relative to its working directory.
            .env("STORAGE_ENGINE", format!("sqlite://{}", self.db_name()))
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(tansu_log(&self.log))
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not start on {}",
                self.addr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker as an operator would (SIGTERM), and waits for it to exit.
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let stopped = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if !stopped {
                let _killed = c.kill();
            }
            let _reaped = c.wait();
        }
    }
}

impl Drop for OwnTansu {
    fn drop(&mut self) {
        self.down();
        if std::thread::panicking() {
            eprintln!(
                "--- Tansu on port {} ({}):\n{}",
                self.port,
                self.log.display(),
                log_tail(&self.log, 30)
            );
        } else if !self.keep_log {
            let _removed = std::fs::remove_file(&self.log);
        }
        remove_database(&self.db);
    }
}

/// The broker restarted in the middle of a run (its log on SQLite survives the restart):
/// what was sent before the stop, whatever was in flight across it and what was sent while the
/// broker was down are all delivered, nothing lost, per key the last copies in order.
///
/// The outage ends before librdkafka's message timeout, so librdkafka sends again what it
/// holds once the broker is back. An outage longer than that timeout is herald's retry path
/// (`a_broker_down_for_a_while_then_up_loses_nothing`, on the mock cluster), and cannot run
/// against Tansu 0.6 on SQLite: librdkafka's idempotent producer bumps its epoch after a message
/// times out, and Tansu's SQLite storage then panics on every produce request of the bumped
/// epoch (`more or less than one row`, tansu-storage's lite.rs; seen in its log with
/// `HERALD_TANSU_LOG_DIR`), so nothing is delivered again. This test once went down for longer
/// than that timeout: it failed in about one full run of the suite in four, once because the
/// run had ended before the stop (no retry to see); with half the run sent during the outage,
/// the panic came in four runs of four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_broker_restart_in_the_middle_of_a_run_loses_nothing() {
    let Ok(bin) = std::env::var("HERALD_TANSU_BIN") else {
        panic!("HERALD_TANSU_BIN is not set: this test restarts a Tansu broker of its own (cargo xtask it sets it)");
    };
    let mut broker = OwnTansu::start(bin);
    let b = broker.addr();
    let t = topic(&b, "restart", 3).await;
    let transport =
        KafkaTransport::new(KafkaConfig::new(b.clone()).message_timeout(Duration::from_secs(60)))
            .expect("transport");
    let producer = Producer::builder(transport)
        .batching(herald_kafka::recommended_batching())
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
        )))
        .delivery_timeout(Duration::from_secs(180))
        .build()
        .expect("producer");
    let msgs = keyed(&t, 0..60_000, 20);
    // The first part goes out before the stop, the second while the broker is down: however
    // fast the first part goes, the outage finds messages waiting.
    let (first, second) = msgs.split_at(30_000);
    let first_receipt = producer.send_all(first.to_vec()).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while producer.stats().totals.delivered < 15_000 {
        assert!(Instant::now() < deadline, "no progress before the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = producer.stats().totals.delivered;
    broker.down();
    let stopped = Instant::now();
    let second_receipt = producer.send_all(second.to_vec()).await;
    // Back up once herald has seen the broker gone.
    health_becomes(&producer, Duration::from_secs(30), "transport down", |h| {
        h.issues
            .iter()
            .any(|i| matches!(i, HealthIssue::TransportDown(_)))
    })
    .await;
    assert_eq!(
        second_receipt.pending(),
        second.len(),
        "nothing sent during the outage can end while the only broker is down"
    );
    broker.up();
    // What the test is about needs the outage over well inside librdkafka's message timeout
    // (60 s; see above): a machine too slow for that fails here, not in the delivery timeout.
    assert!(
        stopped.elapsed() < Duration::from_secs(40),
        "the outage lasted {:?}: too close to librdkafka's 60 s message timeout",
        stopped.elapsed()
    );
    let delivered = delivered_all(first_receipt).await + delivered_all(second_receipt).await;
    assert_eq!(delivered, 60_000);
    let stats = producer.stats();
    producer.close(Duration::from_secs(30)).await;
    let got = read_to_end(&b, &t).await;
    // Everything the topic holds (duplicates included), nothing lost, and per key the last
    // copy of each message in sending order.
    let duplicates = assert_all_stored_last_copies_in_order(&msgs, &got);
    eprintln!(
        "restart: {before} delivered before it, {} retries by herald, {} stored for 60 000 sent ({duplicates} duplicates)",
        stats.totals.retries,
        got.len(),
    );
}

/// Connections cut in the middle of a run, at herald-kafka's default pipeline depth of 16:
/// Tansu behind the testkit's fault proxy, advertising it, so that every connection librdkafka
/// makes goes through it; the proxy cuts them all twice and refuses new ones for half a second.
/// librdkafka reconnects and sends again what was in flight: nothing lost, per key the last
/// copies in order (the guarantee on Kafka, where librdkafka may store a later message of a
/// partition before an earlier one it failed).
///
/// The run is sent in three parts, each cut made once the part before it is being delivered
/// (`RunInParts`): both cuts come with messages outstanding and the run going on after them,
/// however fast librdkafka flushes its backlog once connected again (all of a run can be in its
/// queue at depth 16: waiting for a share of a run sent at once let the second cut come after
/// its end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs HERALD_TANSU_BIN: cargo xtask it kafka"]
async fn connections_cut_in_the_middle_of_a_run_lose_nothing() {
    let bin = tansu_bin("a Tansu broker of its own behind a fault proxy");
    let port = free_port();
    let proxy = herald_testkit::proxy::FaultProxy::start(&format!("127.0.0.1:{port}"))
        .await
        .expect("proxy");
    let _broker = OwnTansu::start_on(bin, port, Some(proxy.addr().port()), Vec::new());
    let b = proxy.addr().to_string();
    let t = topic(&b, "cut", 3).await;
    // Produce requests of at most 500 messages a partition: a part is answered request by
    // request, not in one answer for all of it (Tansu is one broker: librdkafka puts every
    // partition's batch in one request), so a cut after the first answers finds the rest of the
    // part outstanding, much of it in requests on the wire.
    let transport = KafkaTransport::new(KafkaConfig::new(b.clone()).batch_num_messages(500))
        .expect("transport");
    let producer = Producer::builder(transport)
        .batching(herald_kafka::recommended_batching())
        .delivery_timeout(Duration::from_secs(120))
        .build()
        .expect("producer");
    const N: usize = 60_000;
    let msgs = keyed(&t, 0..N, 20);
    // Connected, with its producer id, before the rest: the first part then goes out as it is
    // sent, where a new producer holds it all until it has an id and then has it acknowledged
    // at once (a cut after the first delivery found nothing outstanding).
    producer
        .send(msgs[0].clone())
        .await
        .expect("the first message delivered");
    // In three parts, a cut between each (see `cut_twice_mid_run`).
    let outstanding = cut_twice_mid_run(
        &producer,
        &msgs[1..],
        &proxy,
        || true,
        Duration::from_secs(180),
    )
    .await;
    let stats = producer.stats();
    producer.close(Duration::from_secs(30)).await;
    let got = read_to_end(&b, &t).await;
    let duplicates = assert_all_stored_last_copies_in_order(&msgs, &got);
    eprintln!(
        "cuts with {outstanding:?} outstanding: {} retries by herald, {} stored for {N} sent \
         ({duplicates} duplicates)",
        stats.totals.retries,
        got.len(),
    );
}

/// Two Tansu brokers over one store (a shared SQLite file): the broker the producer uses is
/// killed for good in the middle of a run. librdkafka finds the other through the bootstrap
/// list (Tansu has no replication: every broker answers for every partition over the shared
/// storage), herald retries what the dead one never answered: nothing lost, per key the last
/// copies in order. Prints the failover time (kill to the next delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_broker_of_two_killed_for_good_in_the_middle_of_a_run_loses_nothing() {
    let Ok(bin) = std::env::var("HERALD_TANSU_BIN") else {
        panic!("HERALD_TANSU_BIN is not set: this test runs two Tansu brokers of its own (cargo xtask it sets it)");
    };
    let first = OwnTansu::start(bin);
    let second = OwnTansu::sharing(&first);
    let mut brokers = [first, second];
    let list = format!("{},{}", brokers[0].addr(), brokers[1].addr());
    let t = topic(&brokers[0].addr(), "failover", 3).await;
    // librdkafka's own message timeout far above a failover (under a second here), so that
    // failing over is librdkafka's and herald's work, not a race with that timeout. A message
    // that times out in librdkafka's queue makes its idempotent producer bump its epoch on its
    // own (legal in Kafka's protocol), and Tansu 0.6's SQLite storage panics on a produce
    // request with an epoch it did not hand out ("more or less than one row", in
    // `idempotent_message_check`): the surviving broker then resets every connection and
    // nothing can be delivered. With 2 s and herald's Kafka pipeline depth of 16, enough
    // messages waited in librdkafka's queue through the failover for that to happen in about
    // one run of three; with 10 s, once in eight full runs of this suite on a busy machine.
    //
    // Both Tansu brokers call themselves node 111 (Tansu 0.6 gives every broker that id),
    // each at its own address, so after the kill librdkafka must learn that node 111 now
    // lives at the survivor's address. Its refresh on "broker down" finds no usable broker
    // (node 111 was the only one it knew) and sends nothing. Produce requests in flight at
    // the kill start a fast leader query that retries until the survivor answers; if none
    // was in flight, the topic's cached metadata stays valid (15 minutes by default), the
    // unforced refresh on connecting to the survivor skips it, and the next forced one is
    // the periodic refresh, 5 minutes away. That is a possible cause of a failure seen once
    // in CI and not reproduced in 52 runs here (12 idle, 40 with both cores busy): 24 442 of
    // the 60 000 messages handed back at the 180 s delivery timeout after 3 message timeouts
    // each, librdkafka's last connection error still the dead broker's. A real cluster names
    // a new leader (another node id) and librdkafka follows; here a forced refresh every
    // second (which also makes cached metadata expire after 3 s) stands in for that.
    let transport = KafkaTransport::new(
        KafkaConfig::new(list)
            .message_timeout(Duration::from_secs(60))
            .property("topic.metadata.refresh.interval.ms", "1000"),
    )
    .expect("transport");
    let producer = Producer::builder(transport)
        .batching(herald_kafka::recommended_batching())
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
        )))
        .delivery_timeout(Duration::from_secs(180))
        .build()
        .expect("producer");
    let msgs = keyed(&t, 0..60_000, 20);
    // Half the run, and the kill once half of that is delivered; the other half after the
    // kill: the run goes on across the failover however fast the first half went (sent at
    // once, a whole run could be delivered between two looks at a counter on a loaded
    // machine, and the kill come after its end).
    let mut run = RunInParts::new(&producer, &msgs, 2);
    run.send_next().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while producer.stats().totals.delivered < 15_000 {
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The broker in use dies; if the client holds connections to both, the first one.
    let dead = usize::from(!brokers[0].in_use() && brokers[1].in_use());
    let survivor = brokers[1 - dead].addr();
    let before = producer.stats().totals.delivered;
    let killed = Instant::now();
    brokers[dead].kill();
    // What the first half still had out at the kill: reported, not required.
    let in_doubt = run.outstanding();
    run.send_next().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while producer.stats().totals.delivered <= before + 100 {
        assert!(
            Instant::now() < deadline,
            "nothing delivered through the surviving broker"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let failover = killed.elapsed();
    run.finish(Duration::from_secs(180)).await;
    let stats = producer.stats();
    producer.close(Duration::from_secs(30)).await;
    let got = read_to_end(&survivor, &t).await;
    let duplicates = assert_all_stored_last_copies_in_order(&msgs, &got);
    eprintln!(
        "failover: broker {} of 2 killed after {before} delivered ({in_doubt} of the first half outstanding); next deliveries {failover:?} later; {} retries by herald, {} stored for 60 000 sent ({duplicates} duplicates)",
        dead + 1,
        stats.totals.retries,
        got.len(),
    );
}

/// Issue 11, finding 10: at the first send to a topic herald asks the cluster for its
/// `min.insync.replicas`, once per topic, and says what it learnt: a warning below 2 (Kafka's
/// default is 1), or, when the cluster does not tell (Tansu answers `DescribeConfigs` without
/// it), a debug line. Either way exactly one line, naming the topic.
#[tokio::test]
#[ignore = "needs a broker: cargo xtask it"]
async fn the_durability_check_runs_once_per_topic_and_says_what_it_learnt() {
    let bootstrap = bootstrap();
    let topic = format!("durability-{}", std::process::id());
    admin::create_topic(&bootstrap, &topic, 1, 1)
        .await
        .expect("topic");
    let logs = herald_testkit::LogCapture::start_at(tracing::Level::DEBUG);
    let producer = Producer::builder(
        KafkaTransport::new(KafkaConfig::new(bootstrap.clone())).expect("transport"),
    )
    .build()
    .expect("producer");
    for i in 0..3 {
        producer
            .send(Message::new(topic.as_str(), format!("m-{i}")))
            .await
            .expect("delivered");
    }
    let said = |text: &str| {
        text.lines()
            .filter(|l| l.contains("min_insync_replicas") && l.contains(&topic))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while said(&logs.text()) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing said about min.insync.replicas within 30 s; logged: {:?}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producer.close(Duration::from_secs(10)).await;
    let text = logs.text();
    assert_eq!(said(&text), 1, "once per topic: {text}");
    eprintln!("durability check: {text}");
}

/// A new idempotent librdkafka producer waits for a producer id before its first message, and
/// asks for one on a 500 ms timer unless a metadata answer comes through a broker it learnt
/// (`herald_kafka::startup`): the raw client, made with the same settings in the same run,
/// shows that wait; herald's first message must not. Timed on both sides the same way, from
/// making the producer to the first acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker: cargo xtask it"]
async fn a_new_producer_s_first_message_does_not_wait_for_librdkafka_s_producer_id_timer() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let bootstrap = bootstrap();
    let topic = topic(&bootstrap, "first-message", 1).await;

    let started = Instant::now();
    let raw: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("raw producer");
    raw.send(
        FutureRecord::<(), _>::to(&topic).payload("raw"),
        Duration::from_secs(30),
    )
    .await
    .expect("raw message delivered");
    let raw_first = started.elapsed();

    let started = Instant::now();
    let producer =
        Producer::builder(KafkaTransport::new(KafkaConfig::new(bootstrap)).expect("transport"))
            .build()
            .expect("producer");
    producer
        .send(Message::new(topic.as_str(), "herald"))
        .await
        .expect("herald's message delivered");
    let herald_first = started.elapsed();
    producer.close(Duration::from_secs(10)).await;

    eprintln!("first acknowledgement: raw client {raw_first:?}, herald {herald_first:?}");
    assert!(
        raw_first >= Duration::from_millis(450),
        "the raw client no longer waits for librdkafka's timer ({raw_first:?}): the nudge may not be needed any more"
    );
    // herald saves the timer's wait: a margin of half of it, not a ratio, so that a loaded
    // machine slowing both connections does not fail it.
    assert!(
        herald_first + Duration::from_millis(250) < raw_first,
        "herald's first message waited as the raw client's did: herald {herald_first:?}, raw {raw_first:?}"
    );
}

fn tansu_bin(what: &str) -> String {
    std::env::var("HERALD_TANSU_BIN").unwrap_or_else(|_| {
        panic!("HERALD_TANSU_BIN is not set: this test runs {what} (cargo xtask it sets it)")
    })
}

/// A folder of the test's own under the system's temporary folder, emptied first.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique(name));
    let _gone = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Sends `n` keyed messages through a producer over `config`, giving up after `timeout`.
async fn send_through(
    config: KafkaConfig,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> herald_core::BulkReport {
    let transport = KafkaTransport::new(config).expect("transport");
    let producer = Producer::builder(transport)
        .batching(herald_kafka::recommended_batching())
        .delivery_timeout(timeout)
        .build()
        .expect("producer");
    let report = producer.send_all(keyed(topic, 0..n, 10)).await.wait().await;
    producer.close(Duration::from_secs(10)).await;
    report
}

/// TLS for real: Tansu behind the testkit's TLS proxy (Tansu 0.6 takes `--cert` but does not
/// serve TLS), advertising the proxy, so that every connection librdkafka makes (bootstrap and
/// the broker's advertised address) is TLS with certificate and host name verification on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs HERALD_TANSU_BIN: cargo xtask it kafka"]
async fn tls_with_the_tests_ca_delivers_and_an_unknown_ca_is_refused() {
    let bin = tansu_bin("a Tansu broker of its own behind a TLS proxy");
    let certs = scratch("herald-kafka-tls");
    herald_testkit::tls::make_test_certs(&certs);
    let stranger = certs.join("stranger");
    std::fs::create_dir_all(&stranger).expect("folder");
    herald_testkit::tls::make_test_certs(&stranger);
    let port = free_port();
    let proxy = herald_testkit::tls::TlsProxy::start(&format!("127.0.0.1:{port}"), &certs)
        .await
        .expect("TLS proxy");
    let _broker = OwnTansu::start_on(bin, port, Some(proxy.addr().port()), Vec::new());
    // librdkafka's message timeout: long where the messages must be delivered (one that times
    // out makes librdkafka bump its epoch, which Tansu's SQLite storage cannot take: see
    // `a_broker_restart_in_the_middle_of_a_run_loses_nothing`), short where they cannot be.
    let tls = |ca: &std::path::Path, timeout: Duration| {
        KafkaConfig::new(proxy.addr().to_string())
            .property("security.protocol", "SSL")
            .property("ssl.ca.location", ca.to_string_lossy())
            .message_timeout(timeout)
    };
    let ca = certs.join("ca.pem");
    let t = unique("tls");
    let extra = [
        ("security.protocol".to_owned(), "SSL".to_owned()),
        (
            "ssl.ca.location".to_owned(),
            ca.to_string_lossy().into_owned(),
        ),
    ];
    admin::create_topic_with(&proxy.addr().to_string(), &extra, &t, 3, 1)
        .await
        .expect("create the topic over TLS");

    let report = send_through(
        tls(&ca, Duration::from_secs(60)),
        &t,
        500,
        Duration::from_secs(60),
    )
    .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    assert_eq!(report.delivered, 500);
    assert!(proxy.handshakes() > 0, "nothing went through TLS");

    // A CA that did not sign the broker's certificate: nothing is sent, every message comes
    // back by its delivery timeout, and the error says why.
    let before = proxy.handshakes();
    let report = send_through(
        tls(&stranger.join("ca.pem"), Duration::from_secs(2)),
        &t,
        20,
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(report.delivered, 0);
    assert_eq!(report.failed.len(), 20);
    let shown = report.failed[0].to_string();
    assert!(
        shown.contains("certificate verify failed"),
        "the error does not say the certificate was refused: {shown}"
    );
    assert_eq!(
        proxy.handshakes(),
        before,
        "a handshake passed without the CA"
    );
}

/// SASL for real: Tansu with `--authentication` checks SCRAM passwords against the users made
/// with `tansu user create` (before authentication is on: the tool does not authenticate).
/// Tansu 0.6 offers no PLAIN in its handshake: for PLAIN this shows that herald asks for it
/// and fails with the broker's refusal, clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs HERALD_TANSU_BIN: cargo xtask it kafka"]
async fn sasl_scram_delivers_with_the_password_and_is_refused_without_it() {
    let bin = tansu_bin("a Tansu broker of its own with authentication");
    let mut broker = OwnTansu::start(bin.clone());
    let b = broker.addr();
    let t = topic(&b, "sasl", 3).await;
    for mechanism in ["scram256", "scram512"] {
        let made = Command::new(&bin)
            .args(["user", "create", "--broker", &format!("tcp://{b}")])
            .args([
                "--mechanism",
                mechanism,
                &format!("herald-{mechanism}"),
                "s3cret-pw",
            ])
            .output()
            .expect("tansu user create");
        assert!(
            made.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    broker.down();
    broker.args.push("--authentication");
    broker.up();
    // librdkafka's message timeout: long where the messages must be delivered (see the TLS
    // test), short where they cannot be.
    let sasl = |mechanism: &str, user: &str, password: &str, timeout: Duration| {
        KafkaConfig::new(b.clone())
            .property("security.protocol", "SASL_PLAINTEXT")
            .property("sasl.mechanisms", mechanism)
            .property("sasl.username", user)
            .property("sasl.password", password)
            .message_timeout(timeout)
    };
    for (mechanism, user) in [
        ("SCRAM-SHA-256", "herald-scram256"),
        ("SCRAM-SHA-512", "herald-scram512"),
    ] {
        let report = send_through(
            sasl(mechanism, user, "s3cret-pw", Duration::from_secs(60)),
            &t,
            300,
            Duration::from_secs(60),
        )
        .await;
        assert!(
            report.failed.is_empty(),
            "{mechanism}: {:?}",
            report.failed.first()
        );
        assert_eq!(report.delivered, 300, "{mechanism}");
    }
    // A wrong password, and a mechanism the broker does not offer: refused, every message
    // handed back by its delivery timeout with the reason, and the password in no error.
    for (mechanism, user, says) in [
        (
            "SCRAM-SHA-256",
            "herald-scram256",
            "SASL authentication error",
        ),
        (
            "PLAIN",
            "herald-scram256",
            "SASL PLAIN mechanism handshake failed",
        ),
    ] {
        let report = send_through(
            sasl(mechanism, user, "wrong-pw-hunter2", Duration::from_secs(2)),
            &t,
            20,
            Duration::from_secs(6),
        )
        .await;
        assert_eq!(report.delivered, 0, "{mechanism}");
        assert_eq!(report.failed.len(), 20, "{mechanism}");
        let shown = format!("{} / {:?}", report.failed[0], report.failed[0]);
        assert!(
            shown.contains(says),
            "{mechanism}: not said ({says}): {shown}"
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }
    // No credentials at all: the broker answers nothing but authentication.
    let report = send_through(
        KafkaConfig::new(b.clone()).message_timeout(Duration::from_secs(2)),
        &t,
        5,
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(report.delivered, 0, "delivered without authenticating");
}
