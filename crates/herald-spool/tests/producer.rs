//! The spool under a producer (`ProducerBuilder::store(SpoolStore)`): what is accepted survives
//! the producer's end, a crash included, and is sent first, in order, by the next one.

use std::time::Duration;

use herald_core::{ErrorClass, FailureReason, Message, Producer};
use herald_spool::{inspect, SpoolConfig, SpoolStore};
use herald_testkit::{CallFault, MemoryTransport};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "herald-spool-producer-{name}-{}",
        std::process::id()
    ));
    let _fresh = std::fs::remove_dir_all(&d);
    d
}

fn keyed(i: usize) -> Message {
    Message::new("t", format!("m-{i}")).with_key(format!("k{}", i % 4))
}

fn payloads(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect()
}

/// A transport that fails every call for a long while: a broker that is down.
fn down() -> MemoryTransport {
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        1_000_000,
    ));
    t
}

/// A producer accepts messages while its broker is down; its process ends abruptly (the runtime
/// goes away with the producer in it, no close). The next producer on the spool sends them all
/// first, in their order, then what it is given itself.
#[test]
fn what_a_crashed_producer_accepted_is_sent_first_by_the_next() {
    const N: usize = 2_000;
    let d = dir("crash");
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let p = rt.block_on(async {
            let (store, recovery) = SpoolStore::open(SpoolConfig::new(&d)).expect("spool");
            assert_eq!(recovery.pending_messages, 0);
            let p = Producer::builder(down())
                .store(store)
                .build()
                .expect("producer");
            let mut futures = Vec::new();
            for i in 0..N / 2 {
                // Accepted: durably in the spool.
                futures.push(p.enqueue(keyed(i)).await.expect("accepted"));
            }
            let receipt = p.send_all((N / 2..N).map(keyed)).await;
            std::mem::forget((futures, receipt));
            p
        });
        // The crash: the producer's tasks dropped where they stand, nothing closed; then what
        // is left of the producer goes (its spool with it, releasing the directory).
        rt.shutdown_timeout(Duration::from_secs(10));
        drop(p);
    }
    let pending = inspect(&d).expect("inspect").stats.pending_messages;
    assert_eq!(pending, N as u64, "every accepted message is in the spool");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (store, recovery) = SpoolStore::open(SpoolConfig::new(&d)).expect("spool again");
        assert_eq!(recovery.pending_messages, N as u64);
        let t = MemoryTransport::new();
        let p = Producer::builder(t.clone())
            .store(store)
            .build()
            .expect("producer");
        let fresh = p.send(keyed(N)).await.expect("a new message delivered");
        assert_eq!(fresh.attempts, 1);
        let report = p.close(Duration::from_secs(10)).await;
        assert!(report.drained && report.unclaimed.is_empty(), "{report:?}");
        let got = payloads(&t.received());
        let expected: Vec<String> = (0..=N).map(|i| format!("m-{i}")).collect();
        assert_eq!(
            got, expected,
            "the recovered messages first, in order, then the new one"
        );
    });
    let left = inspect(&d).expect("inspect").stats.pending_messages;
    assert_eq!(left, 0, "everything delivered is settled");
    std::fs::remove_dir_all(&d).expect("cleanup");
}

/// A close that runs out of time hands unsent messages back as `Closed` and keeps them in the
/// spool: the next producer sends them. Delivered ones are gone from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_unsent_messages_stay_in_the_spool() {
    let d = dir("closed");
    let (store, _) = SpoolStore::open(SpoolConfig::new(&d)).expect("spool");
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone())
        .store(store)
        .build()
        .expect("producer");
    for i in 0..10 {
        p.send(keyed(i)).await.expect("delivered");
    }
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        1_000_000,
    ));
    let later: Vec<_> = futures_unordered(&p, 10..20).await;
    let report = p.close(Duration::from_millis(300)).await;
    assert!(!report.drained);
    for f in later {
        let e = f.await.expect_err("closed unsent");
        assert!(matches!(e.reason(), FailureReason::Closed), "{e}");
        assert!(e.is_kept_in_store(), "kept for the next producer: {e}");
    }
    // A message refused after the close was never stored: not kept.
    let refused = p.try_send(keyed(99)).expect_err("closed");
    assert!(matches!(refused.reason(), FailureReason::Closed));
    assert!(!refused.is_kept_in_store());
    drop(p);
    let (store, recovery) = SpoolStore::open(SpoolConfig::new(&d)).expect("spool again");
    assert_eq!(
        recovery.pending_messages, 10,
        "the ten unsent, not the ten delivered"
    );
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone())
        .store(store)
        .build()
        .expect("producer");
    let report = p.close(Duration::from_secs(10)).await;
    assert!(report.drained, "{report:?}");
    let expected: Vec<String> = (10..20).map(|i| format!("m-{i}")).collect();
    assert_eq!(payloads(&t.received()), expected);
    drop(p);
    std::fs::remove_dir_all(&d).expect("cleanup");
}

async fn futures_unordered(
    p: &Producer,
    range: std::ops::Range<usize>,
) -> Vec<herald_core::DeliveryFuture> {
    let mut out = Vec::new();
    for i in range {
        out.push(p.enqueue(keyed(i)).await.expect("accepted"));
    }
    out
}

/// A full spool: `try_send` hands the message back saying so; nothing else is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_try_send_with_a_reason() {
    let d = dir("full");
    let config = SpoolConfig::new(&d).segment_bytes(4096).max_bytes(8192);
    let (store, _) = SpoolStore::open(config).expect("spool");
    let p = Producer::builder(down())
        .store(store)
        .build()
        .expect("producer");
    let mut accepted = 0;
    let refused = loop {
        match p.try_send(Message::new("t", vec![b'x'; 200])) {
            Ok(f) => {
                std::mem::forget(f);
                accepted += 1;
                assert!(accepted < 1_000, "the spool never filled");
            }
            Err(e) => break e,
        }
    };
    assert!(accepted > 0);
    assert!(
        matches!(refused.reason(), FailureReason::Store(s) if s.is_full()),
        "{refused}"
    );
    assert!(refused.to_string().contains("store is full"), "{refused}");
    assert_eq!(
        refused.message().payload().len(),
        200,
        "the message handed back"
    );
    drop(p);
    std::fs::remove_dir_all(&d).expect("cleanup");
}

/// Stored messages wait in memory for the pipeline too: at most a buffer's worth. Beyond the
/// buffer and that, `try_send` says the buffer is full (and `send` would wait): memory stays
/// bounded whatever the spool's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_messages_waiting_for_the_pipeline_are_bounded() {
    use herald_spool::ProducerBuilderExt as _;
    let d = dir("bounded");
    let p = Producer::builder(down())
        .buffer(100, 1 << 20)
        .spool(SpoolConfig::new(&d))
        .expect("spool")
        .build()
        .expect("producer");
    let mut accepted = 0;
    let refused = loop {
        match p.try_send(keyed(accepted)) {
            Ok(f) => {
                std::mem::forget(f);
                accepted += 1;
                assert!(accepted <= 1_000, "no bound on what waits in memory");
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(refused.reason(), FailureReason::BufferFull),
        "{refused}"
    );
    assert!(
        (100..=200).contains(&accepted),
        "the buffer (100) and at most as many stored behind it: {accepted}"
    );
    drop(p);
    std::fs::remove_dir_all(&d).expect("cleanup");
}

/// A failed message leaves the spool when its `SendError` is dropped, not before: a caller that
/// writes it elsewhere first (the command's dead-letter file) loses nothing to a crash between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_stays_stored_until_its_error_is_dropped() {
    use herald_spool::ProducerBuilderExt as _;
    let d = dir("failed");
    let t = MemoryTransport::new();
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t)
        .spool(SpoolConfig::new(&d))
        .expect("spool")
        .build()
        .expect("producer");
    p.send(Message::new("t", "good")).await.expect("delivered");
    let e = p
        .send(Message::new("t", "bad one"))
        .await
        .expect_err("rejected");
    assert!(matches!(e.reason(), FailureReason::Rejected(_)), "{e}");
    let pending = || inspect(&d).expect("inspect").stats.pending_messages;
    assert_eq!(pending(), 1, "held while the error is held");
    let copy = e.clone();
    drop(e);
    assert_eq!(pending(), 1, "held while a clone is held");
    assert_eq!(copy.into_message().payload().as_ref(), b"bad one");
    assert_eq!(pending(), 0, "settled once handed over");
    drop(p);
    std::fs::remove_dir_all(&d).expect("cleanup");
}

/// A spool above the health policy's high-water share of its size limit makes the producer
/// degraded, saying so; the issue clears once it drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_spool_degrades_health() {
    use herald_core::HealthStatus;
    use herald_spool::ProducerBuilderExt as _;
    let d = dir("high-water");
    // The first call takes 2 s: nothing is delivered meanwhile (strict order keeps one batch
    // in flight), so the spool fills; then everything goes through.
    let t = MemoryTransport::new();
    t.script([CallFault::Delay(Duration::from_secs(2))]);
    let p = Producer::builder(t)
        .spool(SpoolConfig::new(&d).segment_bytes(4096).max_bytes(16384))
        .expect("spool")
        .build()
        .expect("producer");
    let issue = |h: &herald_core::Health| h.issues.iter().any(|i| i.code() == "store_high_water");
    let mut futures = Vec::new();
    while !issue(&p.health()) {
        match p.try_send(Message::new("t", vec![b'x'; 300])) {
            Ok(f) => futures.push(f),
            Err(e) => panic!("full before the high-water mark was reported: {e}"),
        }
    }
    assert_eq!(p.health().status, HealthStatus::Degraded, "{}", p.health());
    // The broker comes back: the spool drains, the issue goes.
    for f in futures {
        f.await.expect("delivered");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while issue(&p.health()) {
        assert!(std::time::Instant::now() < deadline, "{}", p.health());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(p);
    std::fs::remove_dir_all(&d).expect("cleanup");
}
