//! `Fallback`: a primary transport and the ones that take over while it is down, inside a
//! producer, on the in-memory transport, in paused time.

use std::time::Duration;

use herald_core::{
    BatchOutcome, Destination, ErrorClass, FailureReason, Fallback, Message, Producer, Transport,
};
use herald_retry::{Backoff, CircuitBreakerConfig, CircuitState, ExponentialRetry};
use herald_testkit::{CallFault, MemoryTransport};

fn down_for(calls: usize) -> MemoryTransport {
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        calls,
    ));
    t
}

fn breaker() -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        failure_threshold: 2,
        open_for: Duration::from_secs(1),
        half_open_probes: 1,
        enabled: true,
    }
}

fn producer(fallback: Fallback) -> Producer {
    producer_with(fallback, Duration::from_secs(120))
}

/// [`producer`] with this delivery timeout.
fn producer_with(fallback: Fallback, delivery_timeout: Duration) -> Producer {
    Producer::builder(fallback)
        .delivery_timeout(delivery_timeout)
        .retry(ExponentialRetry::new(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        )))
        // The producer's own breaker stays out of the way: the fallback's decides.
        .circuit_breaker(CircuitBreakerConfig::disabled())
        .batching(herald_batch::SizeOrLinger::new(
            10,
            1 << 20,
            Duration::from_millis(1),
        ))
        .build()
        .expect("build")
}

fn msgs(range: std::ops::Range<usize>) -> Vec<Message> {
    range.map(|i| Message::new("t", format!("m-{i}"))).collect()
}

#[tokio::test(start_paused = true)]
async fn a_primary_down_from_the_start_sends_everything_to_the_fallback() {
    let primary = down_for(10_000);
    let secondary = MemoryTransport::new();
    let f = Fallback::new("primary", primary.clone())
        .and_then(|f| f.or("secondary", secondary.clone()))
        .expect("names")
        .circuit_breaker(breaker());
    let p = producer(f);
    let mut futures = Vec::new();
    for m in msgs(0..100) {
        futures.push(p.enqueue(m).await.expect("enqueue"));
    }
    for f in futures {
        let d = f.await.expect("delivered by the fallback");
        assert_eq!(d.ack.route, Some(1));
    }
    assert!(primary.received().is_empty());
    assert_eq!(secondary.received().len(), 100);
    // The producer's health names the route in use.
    assert_eq!(p.health().endpoint.as_deref(), Some("secondary"));
    // The primary was tried until its circuit opened: 2 failed batches, then probes only.
    assert!(primary.calls() >= 2, "{}", primary.calls());
}

#[tokio::test(start_paused = true)]
async fn traffic_returns_to_the_primary_once_a_probe_succeeds() {
    // Down for its first 2 calls, then back.
    let primary = down_for(2);
    let secondary = MemoryTransport::new();
    let f = Fallback::new("primary", primary.clone())
        .and_then(|f| f.or("secondary", secondary.clone()))
        .expect("names")
        .circuit_breaker(breaker());
    let p = producer(f);
    let first = p.send_all(msgs(0..50)).await.wait().await;
    assert_eq!(first.delivered, 50);
    assert_eq!(
        secondary.received().len(),
        50,
        "the primary's circuit was open"
    );
    // Past open_for, the next batch probes the primary, which is back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = p.send(Message::new("t", "probe")).await.expect("delivered");
    assert_eq!(d.ack.route, Some(0), "back on the primary");
    let rest = p.send_all(msgs(50..100)).await.wait().await;
    assert_eq!(rest.delivered, 50);
    assert_eq!(primary.received().len(), 51);
    assert_eq!(secondary.received().len(), 50);
}

#[tokio::test(start_paused = true)]
async fn with_every_route_down_messages_end_by_their_delivery_timeout() {
    let (a, b) = (down_for(10_000), down_for(10_000));
    let f = Fallback::new("a", a.clone())
        .and_then(|f| f.or("b", b.clone()))
        .expect("names")
        .circuit_breaker(breaker());
    let p = producer_with(f, Duration::from_secs(5));
    let report = p.send_all(msgs(0..20)).await.wait().await;
    assert_eq!(report.delivered, 0);
    assert_eq!(report.failed.len(), 20);
    for e in &report.failed {
        assert!(
            matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
            "{e}"
        );
    }
    assert!(a.received().is_empty() && b.received().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_route_with_its_own_destination_gets_every_batch_there() {
    let primary = down_for(10_000);
    let secondary = MemoryTransport::new();
    let f = Fallback::new("kafka", primary)
        .and_then(|f| f.or("amqp", secondary.clone()))
        .expect("names")
        .with_destination("orders-dr")
        .circuit_breaker(breaker());
    let report = producer(f).send_all(msgs(0..30)).await.wait().await;
    assert_eq!(report.delivered, 30);
    let got = secondary.received();
    assert_eq!(got.len(), 30);
    assert!(got.iter().all(|m| m.destination().as_str() == "orders-dr"));
}

#[test]
fn route_names_are_checked() {
    let dup = Fallback::new("x", MemoryTransport::new())
        .and_then(|f| f.or("x", MemoryTransport::new()))
        .expect_err("a name used twice");
    assert!(dup.to_string().contains("used twice"), "{dup}");
    let bad = Fallback::new("has space", MemoryTransport::new()).expect_err("bad label");
    assert!(bad.to_string().contains("fallback.route"), "{bad}");
    let f = Fallback::new("a", MemoryTransport::new())
        .and_then(|f| f.or("b", MemoryTransport::new()))
        .expect("names");
    assert_eq!(f.routes(), ["a", "b"]);
    assert_eq!(f.route_state(0), Some(CircuitState::Closed));
}

/// A probe of a half-open route that the pipeline cuts off at its deadline (the primary
/// hangs) counts as a failed probe. Before, the breaker was told nothing: the route stayed
/// half-open with its one probe "in flight" for good, and traffic never went back to it.
#[tokio::test(start_paused = true)]
async fn a_probe_cut_off_at_its_deadline_does_not_shut_its_route_for_good() {
    let primary = MemoryTransport::new();
    primary.script([
        CallFault::FailAll(ErrorClass::Transient),
        CallFault::FailAll(ErrorClass::Transient),
        CallFault::Delay(Duration::from_secs(3600)),
    ]);
    let secondary = MemoryTransport::new();
    let f = Fallback::new("primary", primary.clone())
        .and_then(|f| f.or("secondary", secondary.clone()))
        .expect("names")
        .circuit_breaker(breaker());
    let p = producer_with(f, Duration::from_secs(5));
    let d = p.send(Message::new("t", "a")).await.expect("delivered");
    assert_eq!(d.ack.route, Some(1), "the primary's circuit opened");
    // Past open_for: this batch probes the primary, which hangs until the batch's deadline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let e = p
        .send(Message::new("t", "b"))
        .await
        .expect_err("the probe hung");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    assert_eq!(
        p.health().endpoint.as_deref(),
        Some("primary"),
        "the batch cut off went to the primary"
    );
    // Past open_for again: the next batch probes the primary, which answers now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = p.send(Message::new("t", "c")).await.expect("delivered");
    assert_eq!(d.ack.route, Some(0), "back on the primary");
}

fn one_failure_opens() -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        failure_threshold: 1,
        open_for: Duration::from_secs(1),
        half_open_probes: 1,
        enabled: true,
    }
}

/// A batch sent before its route's circuit opened, failing while the route probes, reopened
/// the circuit before; the probe's success that followed was then ignored, and the route
/// stayed shut for another `open_for`. Its outcome changes nothing now.
#[tokio::test(start_paused = true)]
async fn a_batch_sent_before_the_circuit_opened_does_not_decide_the_probe() {
    let primary = MemoryTransport::new();
    primary.script([
        // A: sent while closed, fails late (during the probe).
        CallFault::Slow(
            Duration::from_millis(1800),
            Box::new(CallFault::FailAll(ErrorClass::Transient)),
        ),
        // B: fails at once and opens the circuit.
        CallFault::FailAll(ErrorClass::Transient),
        // C: the probe, answered after A's failure.
        CallFault::Delay(Duration::from_millis(1000)),
    ]);
    let f = std::sync::Arc::new(
        Fallback::new("primary", primary.clone())
            .and_then(|f| f.or("secondary", MemoryTransport::new()))
            .expect("names")
            .circuit_breaker(one_failure_opens()),
    );
    let dest = Destination::new("t");
    let a = tokio::spawn({
        let (f, dest) = (f.clone(), dest.clone());
        async move { f.send_batch(&dest, &msgs(0..1)).await }
    });
    while primary.calls() < 1 {
        tokio::task::yield_now().await;
    }
    let b = f.send_batch(&dest, &msgs(1..2)).await;
    assert!(b[0].is_err());
    assert_eq!(f.route_state(0), Some(CircuitState::Open));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // t = 1.5 s: the probe goes to the primary; A fails at 1.8 s; the probe succeeds at 2.5 s.
    let c = f.send_batch(&dest, &msgs(2..3)).await;
    assert_eq!(c[0].as_ref().expect("probe delivered").route, Some(0));
    assert!(a.await.expect("A")[0].is_err());
    assert_eq!(
        f.route_state(0),
        Some(CircuitState::Closed),
        "the probe succeeded"
    );
}

/// A route answering fewer outcomes than messages: the pipeline fails the missing ones
/// (transient) and retries them, but the fallback judged the route healthy, so its circuit
/// never opened and traffic never moved to the next route.
#[tokio::test(start_paused = true)]
async fn a_route_that_answers_nothing_opens_its_circuit() {
    struct Mute;
    #[async_trait::async_trait]
    impl Transport for Mute {
        fn name(&self) -> &'static str {
            "mute"
        }
        async fn send_batch(&self, _: &Destination, _: &[Message]) -> BatchOutcome {
            Vec::new()
        }
    }
    let secondary = MemoryTransport::new();
    let f = Fallback::new("primary", Mute)
        .and_then(|f| f.or("secondary", secondary.clone()))
        .expect("names")
        .circuit_breaker(one_failure_opens());
    let dest = Destination::new("t");
    assert!(f.send_batch(&dest, &msgs(0..2)).await.is_empty());
    assert_eq!(f.route_state(0), Some(CircuitState::Open));
    let next = f.send_batch(&dest, &msgs(2..3)).await;
    assert_eq!(next[0].as_ref().expect("the next route").route, Some(1));
}
