//! The producer's behaviour, scenario by scenario, on the in-memory transport. Time is Tokio's
//! paused clock: backoffs, lingers and timeouts pass in virtual time, exactly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_batch::SizeOrLinger;
use herald_core::{
    BuildError, Destination, ErrorClass, FailureReason, Message, OrderingMode, Producer, SendError,
};
use herald_retry::{
    Backoff, CircuitBreakerConfig, CircuitState, ExponentialRetry, RetryBudgetConfig,
};
use herald_testkit::{CallFault, MemoryTransport};
use tokio::time::Instant;

fn msg(i: usize) -> Message {
    Message::new("t", format!("m-{i}"))
}

fn fast_retry() -> ExponentialRetry {
    ExponentialRetry::new(Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(100),
    ))
}

/// Waits, in virtual time, until `cond` holds; panics after `limit`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn invalid_field(r: Result<Producer, BuildError>) -> &'static str {
    match r {
        Err(BuildError::Invalid { field, .. }) => field,
        other => panic!("expected an invalid setting, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn build_rejects_settings_that_cannot_work_naming_the_field() {
    let t = MemoryTransport::new;
    assert_eq!(
        invalid_field(Producer::builder(t()).buffer(0, 1024).build()),
        "buffer.max_messages"
    );
    for bad in ["", "has space", "order/7", &"x".repeat(65)] {
        assert_eq!(
            invalid_field(Producer::builder(t()).name(bad).build()),
            "name"
        );
    }
    let named = Producer::builder(t()).name("orders-1.eu_west").build();
    assert_eq!(named.expect("a fine name").name(), Some("orders-1.eu_west"));
    assert_eq!(
        invalid_field(Producer::builder(t()).buffer(10, 0).build()),
        "buffer.max_bytes"
    );
    assert_eq!(
        invalid_field(
            Producer::builder(t())
                .buffer(10, 100)
                .max_message_bytes(101)
                .build()
        ),
        "max_message_bytes"
    );
    assert_eq!(
        invalid_field(Producer::builder(t()).max_in_flight(0).build()),
        "max_in_flight"
    );
    assert_eq!(
        invalid_field(
            Producer::builder(t())
                .delivery_timeout(Duration::ZERO)
                .build()
        ),
        "delivery_timeout"
    );
    assert_eq!(
        invalid_field(
            Producer::builder(t())
                .batching(SizeOrLinger::new(10, 1000, Duration::from_secs(5)))
                .delivery_timeout(Duration::from_secs(5))
                .build()
        ),
        "batch.linger"
    );
    assert_eq!(
        invalid_field(
            Producer::builder(t())
                .batching(SizeOrLinger::new(0, 1000, Duration::ZERO))
                .build()
        ),
        "batch.max_messages"
    );
    assert_eq!(
        invalid_field(
            Producer::builder(t())
                .retry(fast_retry().max_attempts(0))
                .build()
        ),
        "retry.max_attempts"
    );
    assert_eq!(
        invalid_field(
            Producer::builder(t())
                .retry_budget(RetryBudgetConfig {
                    ratio: -1.0,
                    min_per_sec: 1
                })
                .build()
        ),
        "retry.budget.ratio"
    );
    let e = Producer::builder(t())
        .buffer(0, 1)
        .build()
        .expect_err("invalid");
    assert!(e.to_string().contains("buffer.max_messages"), "{e}");
}

#[test]
fn build_outside_a_runtime_says_so() {
    let e = Producer::builder(MemoryTransport::new())
        .build()
        .expect_err("no runtime");
    assert_eq!(e, BuildError::NoRuntime);
    assert!(e.to_string().contains("Tokio runtime"));
}

#[tokio::test(start_paused = true)]
async fn try_send_hands_the_message_back_when_the_buffer_is_full() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(1));
    let p = Producer::builder(t.clone())
        .buffer(2, 1 << 20)
        .build()
        .expect("build");
    let a = p.try_send(msg(0)).expect("room for 1");
    let b = p.try_send(msg(1)).expect("room for 2");
    let e = p.try_send(msg(2)).expect_err("full");
    assert!(matches!(e.reason(), FailureReason::BufferFull), "{e}");
    assert_eq!(e.class(), ErrorClass::Transient);
    assert_eq!(e.message().payload().as_ref(), b"m-2");
    a.await.expect("delivered");
    b.await.expect("delivered");
    p.try_send(msg(3))
        .expect("room again once delivered")
        .await
        .expect("delivered");
    assert_eq!(p.stats().totals.failed, 1, "the refusal is counted");
}

#[tokio::test(start_paused = true)]
async fn send_waits_for_space_and_keeps_order() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_millis(50));
    let p = Producer::builder(t.clone())
        .buffer(3, 1 << 20)
        .batching(SizeOrLinger::new(3, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let sender = {
        let p = p.clone();
        tokio::spawn(async move {
            let mut futures = Vec::new();
            for i in 0..10 {
                futures.push(p.enqueue(msg(i).with_key("k")).await.expect("enqueue"));
            }
            futures
        })
    };
    // The buffer holds 3: the sender must be waiting while the first batch is in flight.
    eventually(
        Duration::from_secs(1),
        "the first batch to be in flight",
        || p.stats().in_flight_batches == 1,
    )
    .await;
    assert_eq!(p.stats().buffered_messages, 3);
    assert!(!sender.is_finished(), "enqueue must wait for space");
    for f in sender.await.expect("sender") {
        f.await.expect("delivered");
    }
    let order: Vec<_> = t.received().iter().map(|m| m.payload().clone()).collect();
    let expected: Vec<_> = (0..10).map(|i| msg(i).payload().clone()).collect();
    assert_eq!(order, expected);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_after_a_transient_one_is_not_retried_again() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("poison");
    t.script([CallFault::FailAll(ErrorClass::Transient)]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .build()
        .expect("build");
    let e = p
        .send(Message::new("t", "poison"))
        .await
        .expect_err("rejected");
    assert!(matches!(e.reason(), FailureReason::Rejected(_)), "{e}");
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_eq!(e.attempts(), 2);
    assert_eq!(t.attempts(), 2, "no attempt after the permanent error");
    assert_eq!(
        e.reason().transport_error().and_then(|t| t.code()),
        Some("POISON")
    );
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_max_attempts_with_the_last_error() {
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        10,
    ));
    let p = Producer::builder(t.clone())
        .retry(fast_retry().max_attempts(3))
        .build()
        .expect("build");
    let e = p.send(msg(0)).await.expect_err("exhausted");
    assert!(
        matches!(e.reason(), FailureReason::RetriesExhausted(_)),
        "{e}"
    );
    assert_eq!(e.attempts(), 3);
    assert_eq!(t.attempts(), 3);
    assert_eq!(p.stats().totals.retries, 2);
}

#[tokio::test(start_paused = true)]
async fn delivery_timeout_bounds_the_whole_life_of_a_message() {
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        10_000,
    ));
    let p = Producer::builder(t.clone())
        .retry(fast_retry().unlimited_attempts())
        .circuit_breaker(CircuitBreakerConfig::disabled())
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("build");
    let start = Instant::now();
    let e = p.send(msg(0)).await.expect_err("times out");
    let took = start.elapsed();
    match e.reason() {
        FailureReason::DeliveryTimeout {
            timeout,
            last: Some(last),
        } => {
            assert_eq!(*timeout, Duration::from_secs(2));
            assert_eq!(last.code(), Some("SCRIPTED"));
        }
        other => panic!("expected a delivery timeout with the last error, got {other}"),
    }
    assert!(took <= Duration::from_secs(2), "gave up after {took:?}");
    assert!(
        e.attempts() > 5,
        "kept retrying until the deadline: {}",
        e.attempts()
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_transport_cannot_hold_a_message_past_its_deadline() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(3600));
    let p = Producer::builder(t.clone())
        .delivery_timeout(Duration::from_secs(5))
        .build()
        .expect("build");
    let start = Instant::now();
    let e = p.send(msg(0)).await.expect_err("times out");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    assert!(
        start.elapsed() <= Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_during_an_outage_and_messages_wait_then_go() {
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        3,
    ));
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(10),
            half_open_probes: 1,
            enabled: true,
        })
        .build()
        .expect("build");
    let f = p.enqueue(msg(0)).await.expect("enqueue");
    eventually(Duration::from_secs(5), "the circuit to open", || {
        p.stats().circuit == CircuitState::Open
    })
    .await;
    let opened = Instant::now();
    assert_eq!(t.calls(), 3);
    let d = f
        .await
        .expect("delivered once the circuit lets a probe through");
    assert!(
        opened.elapsed() >= Duration::from_secs(9),
        "no call while open: {:?}",
        opened.elapsed()
    );
    assert_eq!(d.attempts, 4);
    assert_eq!(p.stats().circuit, CircuitState::Closed);
}

/// The producer's breaker is shared by every destination, so batches of one are out when
/// another's failures open it. One of them failing while the breaker probes reopened it
/// before, and the probe's success that followed was ignored: the circuit stayed open for
/// another `open_for`. Its outcome changes nothing now.
#[tokio::test(start_paused = true)]
async fn a_batch_sent_before_the_circuit_opened_does_not_decide_the_probe() {
    let t = MemoryTransport::new();
    t.script([
        // "x": out while closed, fails at 1.8 s, during the probe.
        CallFault::Slow(
            Duration::from_millis(1800),
            Box::new(CallFault::FailAll(ErrorClass::Transient)),
        ),
        // "y": fails at once and opens the circuit for 1 s.
        CallFault::FailAll(ErrorClass::Transient),
        // "y" again, the probe at 1 s: delivered at 2 s.
        CallFault::Delay(Duration::from_secs(1)),
    ]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 1,
            open_for: Duration::from_secs(1),
            half_open_probes: 1,
            enabled: true,
        })
        .build()
        .expect("build");
    let x = p.enqueue(Message::new("x", "x-0")).await.expect("enqueue");
    eventually(Duration::from_secs(5), "x to go out", || t.calls() == 1).await;
    let y = p.enqueue(Message::new("y", "y-0")).await.expect("enqueue");
    eventually(Duration::from_secs(5), "the circuit to open", || {
        p.stats().circuit == CircuitState::Open
    })
    .await;
    let d = y.await.expect("delivered by the probe");
    assert_eq!(d.attempts, 2);
    assert_eq!(
        p.stats().circuit,
        CircuitState::Closed,
        "the probe succeeded"
    );
    x.await.expect("x delivered on its retry");
}

/// The circuit opens while another destination's batch is still out (slow), and the only
/// messages left wait behind that batch (strict order). Once `open_for` has passed there is
/// nothing the dispatcher can do until the slow batch lands: it must sleep, not spin on a wake-up
/// time that is already past. In paused time a spinning dispatcher keeps the runtime busy, so
/// virtual time never reaches the slow batch's answer and the producer hangs: the test runs the
/// case on its own thread and fails if it has not ended within a real-time deadline.
#[test]
fn an_open_circuit_past_its_time_with_nothing_to_send_does_not_spin() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let report = rt.block_on(async {
            let t = MemoryTransport::new();
            // First call: the batch for "slow" answers after a second. Second call: the batch
            // for "down" fails, which opens the circuit (threshold 1) for 10 ms.
            t.script([
                CallFault::Delay(Duration::from_secs(1)),
                CallFault::FailAll(ErrorClass::Transient),
            ]);
            let p = Producer::builder(t.clone())
                .retry(fast_retry().max_attempts(1))
                .circuit_breaker(CircuitBreakerConfig {
                    failure_threshold: 1,
                    open_for: Duration::from_millis(10),
                    half_open_probes: 1,
                    enabled: true,
                })
                .max_in_flight(2)
                .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
                .build()
                .expect("build");
            let first = p
                .enqueue(Message::new("slow", "s-0"))
                .await
                .expect("enqueue");
            eventually(Duration::from_secs(5), "the slow batch to go out", || {
                t.calls() == 1
            })
            .await;
            let down = p
                .enqueue(Message::new("down", "d-0"))
                .await
                .expect("enqueue");
            let second = p
                .enqueue(Message::new("slow", "s-1"))
                .await
                .expect("enqueue");
            let down = down.await;
            (first.await.is_ok(), down.is_err(), second.await.is_ok())
        });
        done_tx.send(report).ok();
    });
    let report = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the producer ends its work instead of spinning on a past wake-up time");
    assert_eq!(
        report,
        (true, true, true),
        "(slow #0 delivered, down failed, slow #1 delivered)"
    );
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_limits_the_retry_rate_without_dropping() {
    // Ten batches of one message each fail once: ten retry requests, one token each.
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        10,
    ));
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .retry_budget(RetryBudgetConfig {
            ratio: 0.0,
            min_per_sec: 2,
        })
        .ordering(OrderingMode::Relaxed)
        .max_in_flight(10)
        .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let start = Instant::now();
    let report = p.send_all((0..10).map(msg)).await.wait().await;
    assert_eq!(
        report.delivered,
        10,
        "deferred, not dropped: {:?}",
        report.failed.first()
    );
    // The floor bucket starts full (2 tokens) and refills 2 per second: 10 retries need >= 4 s.
    assert!(
        start.elapsed() >= Duration::from_secs(4),
        "budget not enforced: {:?}",
        start.elapsed()
    );
    assert_eq!(p.stats().totals.retries, 10);
    assert_eq!(t.calls(), 20, "each message sent twice, no more");
}

#[tokio::test(start_paused = true)]
async fn oversized_messages_fail_alone_in_bulk() {
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone())
        .max_message_bytes(10)
        .build()
        .expect("build");
    let msgs = vec![msg(0), Message::new("t", vec![0u8; 11]), msg(2)];
    let report = p.send_all(msgs).await.wait().await;
    assert_eq!(report.delivered, 2);
    assert_eq!(report.failed.len(), 1);
    assert!(matches!(
        report.failed[0].reason(),
        FailureReason::TooLarge { size: 11, max: 10 }
    ));
}

#[tokio::test(start_paused = true)]
async fn failures_nobody_listens_for_go_to_the_unclaimed_hook() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("poison");
    let seen: Arc<Mutex<Vec<SendError>>> = Arc::default();
    let sink = seen.clone();
    let p = Producer::builder(t.clone())
        .on_unclaimed(move |e| sink.lock().expect("lock").push(e))
        .build()
        .expect("build");
    drop(p.try_send(Message::new("t", "poison-1")).expect("accepted"));
    drop(
        p.send_all(vec![Message::new("t", "poison-2"), msg(3)])
            .await,
    );
    p.flush().await;
    let mut payloads: Vec<_> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.message().payload().clone())
        .collect();
    payloads.sort();
    assert_eq!(payloads, vec!["poison-1", "poison-2"]);
    assert_eq!(p.stats().unclaimed, 2);
    assert_eq!(t.delivered(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_a_hook_close_returns_unclaimed_failures() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("poison");
    let p = Producer::builder(t.clone()).build().expect("build");
    drop(p.try_send(Message::new("t", "poison")).expect("accepted"));
    let report = p.close(Duration::from_secs(5)).await;
    assert!(report.drained);
    assert_eq!(report.unclaimed.len(), 1);
    assert_eq!(report.unclaimed[0].message().payload().as_ref(), b"poison");
    assert_eq!(t.closes(), 1, "close closes the transport");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_producer_still_delivers_what_was_accepted() {
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(1000, 1 << 20, Duration::from_secs(30)))
        .build()
        .expect("build");
    let receipt = p.send_all((0..100).map(msg)).await;
    // Virtual time is exact: a drop that waited out the 30 s linger would show here (under the
    // paused clock the wait itself costs nothing, so only the clock can tell).
    let dropped = Instant::now();
    drop(p);
    let report = receipt.wait().await;
    assert_eq!(report.delivered, 100);
    assert!(
        dropped.elapsed() < Duration::from_secs(1),
        "a dropped producer sends at once, without waiting out its linger: {:?}",
        dropped.elapsed()
    );
    eventually(Duration::from_secs(1), "the transport to be closed", || {
        t.closes() == 1
    })
    .await;
    assert_eq!(t.received().len(), 100);
}

#[tokio::test(start_paused = true)]
async fn close_past_its_deadline_hands_back_what_is_left() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(60));
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(5, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let receipt = p.send_all((0..20).map(msg)).await;
    let report = p.close(Duration::from_secs(1)).await;
    assert!(!report.drained);
    assert_eq!(
        report.in_flight, 5,
        "one batch of 5 in flight (strict: one per destination)"
    );
    let ended = receipt.wait().await;
    assert_eq!(ended.delivered, 5, "the batch in flight still lands");
    assert_eq!(ended.failed.len(), 15);
    assert!(ended
        .failed
        .iter()
        .all(|e| matches!(e.reason(), FailureReason::Closed)));
    let e = p.send(msg(99)).await.expect_err("closed");
    assert!(matches!(e.reason(), FailureReason::Closed));
}

#[tokio::test(start_paused = true)]
async fn relaxed_ordering_sends_batches_of_one_destination_concurrently() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_millis(100));
    let p = Producer::builder(t.clone())
        .ordering(OrderingMode::Relaxed)
        .max_in_flight(4)
        .batching(SizeOrLinger::new(10, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let receipt = p.send_all((0..40).map(msg)).await;
    eventually(Duration::from_secs(1), "four batches in flight", || {
        p.stats().in_flight_batches == 4
    })
    .await;
    assert_eq!(receipt.wait().await.delivered, 40);
}

#[tokio::test(start_paused = true)]
async fn destinations_are_batched_separately() {
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone()).build().expect("build");
    let a = Destination::new("a");
    let b = Destination::new("b");
    let msgs = (0..50).map(|i| {
        Message::new(
            if i % 2 == 0 { a.clone() } else { b.clone() },
            format!("{i}"),
        )
    });
    assert_eq!(p.send_all(msgs).await.wait().await.delivered, 50);
    assert!(t.calls() >= 2);
    // Every call carried one destination only: the log per destination is in sending order.
    for (d, parity) in [(&a, 0), (&b, 1)] {
        let got: Vec<usize> = t
            .received()
            .iter()
            .filter(|m| m.destination() == d)
            .map(|m| String::from_utf8_lossy(m.payload()).parse().expect("n"))
            .collect();
        let want: Vec<usize> = (0..50).filter(|i| i % 2 == parity).collect();
        assert_eq!(got, want);
    }
}

/// Panics on its first call, then behaves.
struct PanicsOnce {
    inner: MemoryTransport,
    calls: std::sync::atomic::AtomicUsize,
}

#[herald_core::async_trait]
impl herald_core::Transport for PanicsOnce {
    fn name(&self) -> &'static str {
        "panics-once"
    }
    async fn send_batch(&self, d: &Destination, batch: &[Message]) -> herald_core::BatchOutcome {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("a bug in a transport");
        }
        self.inner.send_batch(d, batch).await
    }
}

/// Holds every message's answer when the attempt's time runs out: it waits for the deadline,
/// then reads the answers one by one from Tokio channels, as a client library hands them over
/// (each read spends a unit of the task's cooperative budget).
#[derive(Debug, Default)]
struct AnswersAtTheDeadline {
    /// Polls of the call while it reads its answers: more than one, the budget ran out.
    reading_polls: Arc<std::sync::atomic::AtomicUsize>,
}

#[herald_core::async_trait]
impl herald_core::Transport for AnswersAtTheDeadline {
    fn name(&self) -> &'static str {
        "answers-at-the-deadline"
    }
    async fn send_batch(&self, _d: &Destination, _batch: &[Message]) -> herald_core::BatchOutcome {
        unreachable!("herald calls send_batch_until")
    }
    async fn send_batch_until(
        &self,
        _d: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
    ) -> herald_core::BatchOutcome {
        let answers: Vec<_> = batch
            .iter()
            .map(|_| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tx.send(herald_core::Ack::default())
                    .expect("receiver alive");
                rx
            })
            .collect();
        tokio::time::sleep_until(deadline.into()).await;
        let mut reading = std::pin::pin!(async move {
            let mut outcomes = Vec::with_capacity(answers.len());
            for rx in answers {
                outcomes.push(Ok(rx.await.expect("answered")));
            }
            outcomes
        });
        std::future::poll_fn(|cx| {
            self.reading_polls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::future::Future::poll(reading.as_mut(), cx)
        })
        .await
    }
}

/// A call whose answers are in hand as its time runs out ends with them: they are true. (The
/// call spends Tokio's budget reading them and returns Pending with most in hand; the attempt's
/// timer, polled past the budget, fired at the same instant. Before, all 1 000 were cut off as
/// `herald_attempt_timeout` and handed back as `DeliveryTimeout`, though acknowledged.)
#[tokio::test(start_paused = true)]
async fn answers_in_hand_as_the_attempt_s_time_runs_out_are_its_outcome() {
    let transport = AnswersAtTheDeadline::default();
    let reading_polls = transport.reading_polls.clone();
    let p = Producer::builder(transport)
        .batching(SizeOrLinger::new(1_000, 1 << 20, Duration::from_secs(1)))
        .delivery_timeout(Duration::from_secs(5))
        .build()
        .expect("build");
    let report = p.send_all((0..1_000).map(msg)).await.wait().await;
    assert_eq!(report.delivered, 1_000, "{:?}", report.failed.first());
    assert_eq!(p.stats().totals.batches, 1, "one call, one deadline");
    // What makes this test a test: the call ran out of budget reading, at its deadline.
    assert!(
        reading_polls.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "the budget ran out while the call read its answers"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_transport_frees_its_slot_and_the_messages_are_retried() {
    let inner = MemoryTransport::new();
    let p = Producer::builder(PanicsOnce {
        inner: inner.clone(),
        calls: 0.into(),
    })
    .retry(fast_retry())
    .build()
    .expect("build");
    let report = p
        .send_all((0..10).map(|i| msg(i).with_key("k")))
        .await
        .wait()
        .await;
    assert_eq!(report.delivered, 10, "{:?}", report.failed.first());
    assert_eq!(p.stats().in_flight_batches, 0);
    let order: Vec<_> = inner
        .received()
        .iter()
        .map(|m| m.payload().clone())
        .collect();
    assert_eq!(
        order,
        (0..10)
            .map(|i| msg(i).payload().clone())
            .collect::<Vec<_>>()
    );
    let close = p.close(Duration::from_secs(5)).await;
    assert!(close.drained, "the slot was freed, so close can drain");
}

#[tokio::test(start_paused = true)]
async fn parked_retries_without_budget_still_end_at_their_deadline() {
    let t = MemoryTransport::new();
    t.script([CallFault::FailAll(ErrorClass::Transient)]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .retry_budget(RetryBudgetConfig {
            ratio: 0.0,
            min_per_sec: 0,
        })
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("build");
    let start = Instant::now();
    let e = p
        .send(msg(0))
        .await
        .expect_err("no budget, no retry: times out");
    assert!(
        matches!(
            e.reason(),
            FailureReason::DeliveryTimeout { last: Some(_), .. }
        ),
        "{e}"
    );
    assert!(
        start.elapsed() <= Duration::from_secs(2),
        "ended late: {:?}",
        start.elapsed()
    );
    assert_eq!(t.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_send_all_still_reports_failures_of_what_it_had_accepted() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("poison");
    t.set_latency(Duration::from_secs(1));
    let seen: Arc<Mutex<Vec<SendError>>> = Arc::default();
    let sink = seen.clone();
    let p = Producer::builder(t.clone())
        .buffer(2, 1 << 20)
        .on_unclaimed(move |e| sink.lock().expect("lock").push(e))
        .build()
        .expect("build");
    let msgs = vec![
        Message::new("t", "poison-a"),
        Message::new("t", "poison-b"),
        msg(2),
        msg(3),
    ];
    let cancelled = tokio::time::timeout(Duration::from_millis(100), p.send_all(msgs)).await;
    assert!(
        cancelled.is_err(),
        "send_all must still be waiting for space"
    );
    p.flush().await;
    let got: Vec<_> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|e| (e.message().payload().clone(), e.reason().label()))
        .collect();
    // The two it had taken but not handed over come back at once, as cancelled; the two it
    // had accepted fail later, as rejected.
    assert_eq!(
        got,
        vec![
            ("m-2".into(), "cancelled"),
            ("m-3".into(), "cancelled"),
            ("poison-a".into(), "rejected"),
            ("poison-b".into(), "rejected")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn huge_timeouts_are_refused_or_mean_no_deadline() {
    assert_eq!(
        invalid_field(
            Producer::builder(MemoryTransport::new())
                .delivery_timeout(Duration::MAX)
                .build()
        ),
        "delivery_timeout"
    );
    let p = Producer::builder(MemoryTransport::new())
        .build()
        .expect("build");
    p.send(msg(0)).await.expect("delivered");
    let close = p.close(Duration::MAX).await;
    assert!(close.drained);
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_is_cut_at_the_earliest_deadline_of_its_batch() {
    let t = MemoryTransport::new();
    t.script([
        CallFault::FailAll(ErrorClass::Transient),
        CallFault::Delay(Duration::from_secs(3600)),
    ]);
    let backoff = Backoff::new(Duration::from_millis(1600), Duration::from_millis(1600))
        .with_jitter(herald_retry::Jitter::None);
    let p = Producer::builder(t.clone())
        .retry(ExponentialRetry::new(backoff))
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("build");
    let start = Instant::now();
    let a = p.enqueue(msg(0).with_key("k")).await.expect("enqueue a");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // b waits behind a's retry (strict order), then goes out in one batch with it at 1.6 s.
    let b = p.enqueue(msg(1).with_key("k")).await.expect("enqueue b");
    let e = a.await.expect_err("a times out");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    assert!(
        start.elapsed() <= Duration::from_millis(2010),
        "a outlived its deadline: {:?}",
        start.elapsed()
    );
    let e = b.await.expect_err("b cannot make it either");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    assert!(
        start.elapsed() <= Duration::from_millis(3510),
        "b outlived its deadline: {:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_close_runs_out_of_time_nothing_is_retried() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(60));
    t.script([CallFault::FailAll(ErrorClass::Transient)]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .build()
        .expect("build");
    let f = p.enqueue(msg(0)).await.expect("enqueue");
    let report = p.close(Duration::from_secs(1)).await;
    assert!(!report.drained);
    assert_eq!(report.in_flight, 1);
    let e = f
        .await
        .expect_err("the in-flight batch fails after the deadline");
    assert!(matches!(e.reason(), FailureReason::Closed), "{e}");
    assert_eq!(t.calls(), 1, "no retry after an abandoned close");
}

#[tokio::test(start_paused = true)]
async fn a_retry_parked_after_an_expiry_sweep_still_ends_at_its_deadline() {
    // z (destination a) is parked without budget and expires at 2.5 s; the sweep then sees
    // nothing else queued or parked, because x (destination b) is in flight until 2.7 s. x then
    // fails and parks: its deadline (3.4 s) must still be watched.
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_millis(1800));
    t.script([
        CallFault::FailAll(ErrorClass::Transient),
        CallFault::FailAll(ErrorClass::Transient),
    ]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .retry_budget(RetryBudgetConfig {
            ratio: 0.0,
            min_per_sec: 0,
        })
        .delivery_timeout(Duration::from_millis(2500))
        .build()
        .expect("build");
    let start = Instant::now();
    let z = p.enqueue(Message::new("a", "z")).await.expect("enqueue z");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let x = p.enqueue(Message::new("b", "x")).await.expect("enqueue x");
    let e = tokio::time::timeout(Duration::from_secs(60), x)
        .await
        .expect("x must end, not hang parked")
        .expect_err("x times out");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    assert!(
        start.elapsed() <= Duration::from_millis(3410),
        "x ended late: {:?}",
        start.elapsed()
    );
    assert!(z.await.is_err());
}

/// A transport with a settle time is not cut off at the deadline: its answer about what it
/// had already handed to the broker is the outcome (here: stored, so delivered, not a failure
/// that was stored anyway). Past the settle time it is cut off as before.
#[tokio::test(start_paused = true)]
async fn a_late_answer_within_the_settle_time_is_the_outcome() {
    for (settle, delivered) in [
        (Duration::from_secs(5), true),
        (Duration::from_secs(1), false),
    ] {
        let t = MemoryTransport::new();
        t.set_latency(Duration::from_secs(3));
        t.set_settle_time(settle);
        let p = Producer::builder(t.clone())
            .delivery_timeout(Duration::from_secs(1))
            .build()
            .expect("build");
        let start = Instant::now();
        let outcome = p.send(Message::new("a", "late")).await;
        if delivered {
            assert!(outcome.is_ok(), "settle {settle:?}: {outcome:?}");
            let took = start.elapsed();
            assert!(
                took >= Duration::from_secs(3) && took < Duration::from_millis(3100),
                "ends with the answer (3 s latency, 5 ms linger): {took:?}"
            );
        } else {
            let e = outcome.expect_err("cut off after the settle time");
            assert!(
                matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
                "{e}"
            );
            assert!(e.to_string().contains("settle"), "{e}");
            let took = start.elapsed();
            assert!(
                took >= Duration::from_secs(2) && took < Duration::from_millis(2100),
                "deadline plus settle time: {took:?}"
            );
        }
        p.close(Duration::from_secs(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_cut_off_attempt_carries_the_transport_diagnosis_and_keeps_the_real_last_error() {
    let t = MemoryTransport::new();
    t.set_diagnosis(Some("broker-1:9092: connection refused"));
    // First attempt: a real transport error. Second: hangs until herald cuts it off.
    t.script([
        CallFault::FailAll(ErrorClass::Transient),
        CallFault::Delay(Duration::from_secs(3600)),
    ]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("build");
    let e = p.send(msg(0)).await.expect_err("times out");
    match e.reason() {
        FailureReason::DeliveryTimeout {
            last: Some(last), ..
        } => {
            assert_eq!(
                last.code(),
                Some("SCRIPTED"),
                "the transport's own error, not the cut-off: {last}"
            );
        }
        other => panic!("expected a delivery timeout, got {other}"),
    }
    // A hung first attempt: the cut-off is all there is, with the diagnosis in it.
    let t = MemoryTransport::new();
    t.set_diagnosis(Some("broker-1:9092: connection refused"));
    t.set_latency(Duration::from_secs(3600));
    let p = Producer::builder(t.clone())
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("build");
    let e = p.send(msg(0)).await.expect_err("times out");
    assert!(
        e.to_string().contains("broker-1:9092: connection refused"),
        "{e}"
    );
}

/// A transport that learns of a failure after the fact (a lost acknowledgement, an asynchronous
/// delivery report) has already let later messages of the key through: the pipeline sends them
/// again behind the retry, so the broker's last copies are in order and the outcomes are true.
#[tokio::test(start_paused = true)]
async fn a_message_stored_after_a_failure_of_its_key_is_sent_again_behind_the_retry() {
    let t = MemoryTransport::new();
    t.script([CallFault::StoreThenFail(vec![0])]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .batching(SizeOrLinger::new(4, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let keyed = [
        msg(0).with_key("a"),
        msg(1).with_key("b"),
        msg(2).with_key("a"),
        msg(3).with_key("a"),
    ];
    let mut futures = Vec::new();
    for m in keyed {
        futures.push(p.enqueue(m).await.expect("enqueue"));
    }
    let mut attempts = Vec::new();
    for f in futures {
        attempts.push(f.await.expect("delivered").attempts);
    }
    // a-0 failed (though stored); a-2 and a-3 were stored after it, so they go again.
    assert_eq!(attempts, [2, 1, 2, 2]);
    let log: Vec<String> = t
        .received()
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    let last_of = |payload: &str| log.iter().rposition(|p| p == payload).expect("stored");
    assert!(
        last_of("m-0") < last_of("m-2") && last_of("m-2") < last_of("m-3"),
        "key a's last copies out of order: {log:?}"
    );
    assert_eq!(p.stats().totals.retries, 3);
}

/// A message the broker stored after a failure of its key is sent again behind the retry; when
/// that copy fails for good, the message is handed back, and its error says that the broker
/// holds the first copy (where, and that it may be out of order), instead of passing for a
/// message that was never stored.
#[tokio::test(start_paused = true)]
async fn a_held_message_whose_copy_fails_says_its_first_copy_is_stored() {
    for second_call in [
        CallFault::FailAll(ErrorClass::Transient),
        CallFault::FailAll(ErrorClass::Permanent),
    ] {
        let t = MemoryTransport::new();
        t.script([CallFault::StoreThenFail(vec![0]), second_call.clone()]);
        let p = Producer::builder(t.clone())
            .retry(fast_retry().max_attempts(2))
            .batching(SizeOrLinger::new(3, 1 << 20, Duration::from_millis(1)))
            .build()
            .expect("build");
        let mut futures = Vec::new();
        for m in [
            msg(0).with_key("a"),
            msg(1).with_key("b"),
            msg(2).with_key("a"),
        ] {
            futures.push(p.enqueue(m).await.expect("enqueue"));
        }
        let mut fates = Vec::new();
        for f in futures {
            fates.push(f.await);
        }
        let log: Vec<String> = t
            .received()
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
            .collect();
        let first = fates[0].as_ref().expect_err("m-0 failed twice");
        assert_eq!(
            first.stored_copy(),
            None,
            "{second_call:?}: m-0's first copy was reported failed by the transport itself"
        );
        assert!(fates[1].is_ok(), "m-1 has a key of its own");
        let held = fates[2].as_ref().expect_err("m-2's copy failed");
        assert_eq!(held.attempts(), 2);
        let ack = held
            .stored_copy()
            .unwrap_or_else(|| panic!("{second_call:?}: m-2's first copy is stored: {log:?}"));
        let at = usize::try_from(ack.offset.expect("the memory transport gives offsets"))
            .expect("offset");
        assert_eq!(log[at], "m-2", "the copy the ack points at: {log:?}");
        assert!(
            held.to_string().contains("stored an earlier copy"),
            "{held}"
        );
        let _ = p.close(Duration::from_secs(5)).await;
    }
}

/// Under relaxed ordering there is no order to keep: what the broker took stays delivered.
#[tokio::test(start_paused = true)]
async fn relaxed_ordering_keeps_deliveries_after_a_failure_of_their_key() {
    let t = MemoryTransport::new();
    t.script([CallFault::StoreThenFail(vec![0])]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .ordering(OrderingMode::Relaxed)
        .batching(SizeOrLinger::new(2, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let first = p.enqueue(msg(0).with_key("a")).await.expect("enqueue");
    let second = p.enqueue(msg(1).with_key("a")).await.expect("enqueue");
    assert_eq!(first.await.expect("delivered").attempts, 2);
    assert_eq!(second.await.expect("delivered").attempts, 1);
}

/// Every accepted message gets an id, and keeps it through its retries.
#[tokio::test(start_paused = true)]
async fn accepted_messages_get_ids_that_survive_retries() {
    let t = MemoryTransport::new();
    t.script([CallFault::StoreThenFail(vec![0, 1, 2])]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .batching(SizeOrLinger::new(3, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let given = herald_core::MessageId::from_u128(42);
    let receipt = p.send_all([msg(0), msg(1), msg(2).with_id(given)]).await;
    assert!(receipt.wait().await.all_delivered());
    let ids: Vec<_> = t
        .received()
        .iter()
        .map(|m| m.id().expect("every message sent has an id"))
        .collect();
    assert_eq!(
        ids.len(),
        6,
        "each stored twice: the first acknowledgement was lost"
    );
    assert_eq!(
        ids[..3],
        ids[3..],
        "a retry carries the id of the first attempt"
    );
    assert_ne!(ids[0], ids[1], "ids are unique");
    assert_eq!(ids[2], given, "a given id is kept");
}

/// A future dropped after its fate arrived but before anyone polled it (a `select!` that lost):
/// the failure inside, and the message in it, must not vanish with it.
#[tokio::test(start_paused = true)]
async fn a_failure_whose_future_is_dropped_unpolled_goes_to_the_unclaimed_list() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let fate = p
        .enqueue(Message::new("t", "bad-1"))
        .await
        .expect("accepted");
    eventually(Duration::from_secs(1), "the failure to land", || {
        p.stats().totals.failed == 1
    })
    .await;
    drop(fate);
    assert_eq!(p.stats().unclaimed, 1);
    let report = p.close(Duration::from_secs(1)).await;
    assert_eq!(report.unclaimed.len(), 1);
    assert_eq!(report.unclaimed[0].message().payload().as_ref(), b"bad-1");
}

/// `send_all` cancelled while it waits for space: what it had accepted still ends normally,
/// and what it had taken from the iterator but not handed over comes back as `Cancelled`.
#[tokio::test(start_paused = true)]
async fn a_cancelled_send_all_hands_back_what_it_took_and_did_not_send() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(10));
    let p = Producer::builder(t.clone())
        .buffer(2, 1 << 20)
        .batching(SizeOrLinger::new(2, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let mut msgs = (0..10).map(msg).chain((10..15).map(msg));
    let call = p.send_all(msgs.by_ref().take(10));
    let cut = tokio::time::timeout(Duration::from_secs(1), call).await;
    assert!(
        cut.is_err(),
        "the call waits for space while the first batch is in flight"
    );
    assert_eq!(
        msgs.count(),
        5,
        "messages beyond the call's chunk stay in the iterator"
    );
    let report = p.close(Duration::from_secs(60)).await;
    assert!(report.drained);
    assert_eq!(t.received().len(), 2, "the two accepted were delivered");
    let cancelled: Vec<_> = report
        .unclaimed
        .iter()
        .map(|e| {
            assert!(matches!(e.reason(), FailureReason::Cancelled), "{e}");
            String::from_utf8_lossy(e.message().payload()).into_owned()
        })
        .collect();
    let expected: Vec<_> = (2..10).map(|i| format!("m-{i}")).collect();
    assert_eq!(cancelled, expected, "taken, not sent, handed back in order");
    assert_eq!(report.totals.failed, 8);
}

#[derive(Debug)]
struct PanickingRetry;
impl herald_retry::RetryPolicy for PanickingRetry {
    fn decide(
        &self,
        _: &herald_retry::RetryContext,
        _: &mut fastrand::Rng,
    ) -> herald_retry::RetryDecision {
        panic!("retry policy bug")
    }
}

/// A retry policy that panics ends the message it was asked about, naming the panic; the
/// producer goes on.
#[tokio::test(start_paused = true)]
async fn a_panicking_retry_policy_fails_its_message_and_the_producer_goes_on() {
    let t = MemoryTransport::new();
    t.script([CallFault::FailAll(ErrorClass::Transient)]);
    let p = Producer::builder(t.clone())
        .retry(PanickingRetry)
        .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let e = p.send(msg(0)).await.expect_err("the policy panicked");
    match e.reason() {
        FailureReason::Panicked { site, message } => {
            assert_eq!(*site, "retry_policy");
            assert!(message.contains("retry policy bug"), "{message}");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_eq!(p.send(msg(1)).await.expect("delivered").attempts, 1);
}

#[derive(Debug)]
struct RetryNever;
impl herald_retry::RetryPolicy for RetryNever {
    fn decide(
        &self,
        _: &herald_retry::RetryContext,
        _: &mut fastrand::Rng,
    ) -> herald_retry::RetryDecision {
        herald_retry::RetryDecision::Retry {
            after: Duration::MAX,
        }
    }
}

/// A retry policy asking for a pause longer than the clock can hold: the message waits until
/// its deadline and ends there. Before, `now + Duration::MAX` panicked inside the dispatcher,
/// losing the batch's fates (its futures panicked "dropped unanswered") and hanging `flush`.
#[tokio::test(start_paused = true)]
async fn a_retry_pause_past_the_deadline_ends_at_the_deadline() {
    let t = MemoryTransport::new();
    t.script([CallFault::FailAll(ErrorClass::Transient)]);
    let p = Producer::builder(t.clone())
        .retry(RetryNever)
        .delivery_timeout(Duration::from_secs(1))
        .build()
        .expect("build");
    let f = p.enqueue(msg(0)).await.expect("enqueue");
    let e = tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("ends by its deadline")
        .expect_err("not delivered");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    tokio::time::timeout(Duration::from_secs(5), p.flush())
        .await
        .expect("flush returns");
    assert_eq!(p.send(msg(1)).await.expect("delivered").attempts, 1);
}

/// A message the broker refused for good is `Rejected`, even when a close ran out of time
/// meanwhile. Before, it was `Closed` (transient): a spool would keep it and send it again.
#[tokio::test(start_paused = true)]
async fn a_permanent_refusal_after_a_close_ran_out_of_time_is_rejected() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(60));
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .build()
        .expect("build");
    let f = p
        .enqueue(Message::new("t", "bad-1"))
        .await
        .expect("enqueue");
    let report = p.close(Duration::from_secs(1)).await;
    assert!(!report.drained);
    let e = f.await.expect_err("refused");
    assert!(matches!(e.reason(), FailureReason::Rejected(_)), "{e}");
}

#[derive(Debug)]
struct PanickingBatches;
impl herald_batch::BatchPolicy for PanickingBatches {
    fn admits(&self, _: herald_batch::BatchStats, _: usize) -> bool {
        panic!("batch policy bug")
    }
    fn is_full(&self, _: herald_batch::BatchStats) -> bool {
        false
    }
    fn linger(&self) -> Duration {
        Duration::from_millis(1)
    }
}

/// A batch policy that panics is no longer asked: messages go one per batch, all delivered.
#[tokio::test(start_paused = true)]
async fn a_panicking_batch_policy_does_not_stop_the_producer() {
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone())
        .batching(PanickingBatches)
        .build()
        .expect("build");
    let all = async { p.send_all((0..5).map(msg)).await.wait().await };
    let report = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("the producer must not stop on a panicking batch policy");
    assert_eq!(report.delivered, 5);
    assert_eq!(t.received().len(), 5);
}

/// An unclaimed hook that panics loses nothing: the failure is kept for `close`.
#[tokio::test(start_paused = true)]
async fn a_panicking_unclaimed_hook_keeps_the_failure_for_close() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t.clone())
        .on_unclaimed(|_| panic!("hook bug"))
        .build()
        .expect("build");
    drop(p.send_all([Message::new("t", "bad-1")]).await);
    let report = p.close(Duration::from_secs(5)).await;
    assert_eq!(report.unclaimed.len(), 1);
    assert_eq!(p.stats().unclaimed, 1);
}

/// A sender waiting for buffer space when the producer closes is refused at once (`Closed`),
/// not kept waiting for space a stalled broker may never free.
#[tokio::test(start_paused = true)]
async fn close_wakes_senders_waiting_for_space() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(3600));
    let p = Producer::builder(t.clone())
        .buffer(1, 1 << 20)
        .delivery_timeout(Duration::from_secs(7200))
        .build()
        .expect("build");
    let _first = p.enqueue(msg(0)).await.expect("accepted");
    let waiting = {
        let p = p.clone();
        tokio::spawn(async move { p.enqueue(msg(1)).await.map(|_| ()) })
    };
    eventually(Duration::from_secs(1), "the batch to be in flight", || {
        p.stats().in_flight_batches == 1
    })
    .await;
    assert!(!waiting.is_finished(), "the second enqueue waits for space");
    let closing = {
        let p = p.clone();
        tokio::spawn(async move { p.close(Duration::from_secs(1)).await })
    };
    let refused = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("refused well before the broker answers")
        .expect("join")
        .expect_err("closed");
    assert!(
        matches!(refused.reason(), FailureReason::Closed),
        "{refused}"
    );
    drop(closing);
}

/// Strict ordering with a transport that keeps order across calls: up to `pipeline_depth`
/// batches of one destination go out at once; a transport that does not say so gets one.
#[tokio::test(start_paused = true)]
async fn strict_order_pipelines_batches_only_where_the_transport_keeps_order_across_calls() {
    for (ordered, expected) in [(true, 4), (false, 1)] {
        let t = MemoryTransport::new();
        t.keep_order_across_calls(ordered);
        t.set_latency(Duration::from_secs(3600));
        let p = Producer::builder(t.clone())
            .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
            .pipeline_depth(4)
            .delivery_timeout(Duration::from_secs(7200))
            .build()
            .expect("build");
        for i in 0..8 {
            let _receipt = p.enqueue(msg(i).with_key("k")).await.expect("accepted");
        }
        eventually(Duration::from_secs(10), "the first batch sent", || {
            t.calls() >= 1
        })
        .await;
        // Every call answers in an hour: whatever was going to start has started after 10 s.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            t.calls(),
            expected,
            "batches in flight (ordered: {ordered})"
        );
    }
}

/// Several batches of one key in flight, the first failing late: the later ones, stored
/// meanwhile, are sent again behind its retry, and their answers (which came first) are acted
/// on after the first batch's.
#[tokio::test(start_paused = true)]
async fn a_late_failure_holds_the_later_batches_of_its_key_already_stored() {
    let t = MemoryTransport::new();
    t.keep_order_across_calls(true);
    t.script([CallFault::Slow(
        Duration::from_millis(100),
        Box::new(CallFault::FailSome(vec![0])),
    )]);
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
        .retry(fast_retry())
        .pipeline_depth(4)
        .build()
        .expect("build");
    let mut fates = Vec::new();
    for i in 0..3 {
        fates.push(p.enqueue(msg(i).with_key("k")).await.expect("accepted"));
    }
    let mut attempts = Vec::new();
    for f in fates {
        attempts.push(f.await.expect("delivered").attempts);
    }
    let stored: Vec<String> = t
        .received()
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    assert_eq!(
        stored,
        ["m-1", "m-2", "m-0", "m-1", "m-2"],
        "the later messages stored ahead of the failed one are stored again after it"
    );
    assert_eq!(attempts, [2, 2, 2]);
}

/// The calls of a destination start in the order their batches were cut, even on a runtime
/// with several workers (whose schedulers may run the task spawned last first): a transport that
/// keeps order across calls then stores every message of a key in sending order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_start_in_sending_order_on_a_multi_threaded_runtime() {
    let t = MemoryTransport::new();
    t.keep_order_across_calls(true);
    t.set_latency(Duration::from_micros(200));
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
        .pipeline_depth(8)
        .max_in_flight(8)
        .build()
        .expect("build");
    let n = 3_000;
    let report = p
        .send_all((0..n).map(|i| msg(i).with_key("k")))
        .await
        .wait()
        .await;
    assert_eq!(report.delivered, n as u64);
    let stored: Vec<String> = t
        .received()
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    let first_out_of_order = stored.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_out_of_order, None, "stored in sending order");
}

/// Batches in flight together fail together when a connection is lost: under a pipeline they
/// count as one failure for the circuit breaker, as one batch at a time would, so the circuit
/// does not open sooner because of the depth.
#[tokio::test(start_paused = true)]
async fn batches_in_flight_together_count_once_against_the_circuit_breaker() {
    let t = MemoryTransport::new();
    t.keep_order_across_calls(true);
    t.set_latency(Duration::from_millis(100));
    t.script(vec![CallFault::FailAll(ErrorClass::Transient); 4]);
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
        .retry(fast_retry())
        .pipeline_depth(4)
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(60),
            ..CircuitBreakerConfig::default()
        })
        .build()
        .expect("build");
    let mut fates = Vec::new();
    for i in 0..4 {
        fates.push(p.enqueue(msg(i).with_key("k")).await.expect("accepted"));
    }
    let started = Instant::now();
    for f in fates {
        assert_eq!(f.await.expect("delivered").attempts, 2);
    }
    assert_eq!(p.stats().circuit, CircuitState::Closed);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the retries did not wait for an open circuit"
    );
}

/// `enqueue_tagged` without a store: each accepted message's fate reaches the sink once, with
/// its tag (a rejection included); a message refused at the door comes back from the call
/// with its tag and never reaches the sink; a panicking sink does not lose a failure.
#[tokio::test(start_paused = true)]
async fn enqueue_tagged_reports_each_fate_once_with_its_tag() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t.clone())
        .max_message_bytes(1024)
        .build()
        .expect("producer");
    type Fates = Vec<(u64, Result<(), String>)>;
    let fates: Arc<Mutex<Fates>> = Arc::default();
    let sink: Arc<dyn herald_core::FateSink> = {
        let fates = fates.clone();
        Arc::new(
            move |tag: u64, outcome: Result<herald_core::Delivery, SendError>| {
                if tag == 99 {
                    panic!("a sink that panics");
                }
                let outcome = outcome.map(|_| ()).map_err(|e| e.to_string());
                fates.lock().expect("fates").push((tag, outcome));
            },
        )
    };
    let mut msgs: Vec<(u64, Message)> = (0..10u64).map(|i| (i, msg(i as usize))).collect();
    msgs.push((10, Message::new("t", "bad one")));
    msgs.push((11, Message::new("t", vec![b'x'; 2048])));
    msgs.push((99, Message::new("t", "bad for the panicking sink")));
    let refused = p.enqueue_tagged(msgs, &sink).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, 11);
    assert!(matches!(
        refused[0].1.reason(),
        FailureReason::TooLarge { .. }
    ));
    eventually(Duration::from_secs(10), "every fate", || {
        fates.lock().expect("fates").len() == 11
    })
    .await;
    let mut got = fates.lock().expect("fates").clone();
    got.sort_by_key(|(tag, _)| *tag);
    let tags: Vec<u64> = got.iter().map(|(tag, _)| *tag).collect();
    assert_eq!(tags, (0..=10).collect::<Vec<_>>(), "each once");
    assert!(got[..10].iter().all(|(_, o)| o.is_ok()), "{got:?}");
    assert!(got[10].1.is_err(), "the rejected one: {got:?}");
    let report = p.close(Duration::from_secs(10)).await;
    assert_eq!(
        report.unclaimed.len(),
        1,
        "the failure the sink panicked on is kept: {report:?}"
    );
    assert_eq!(
        report.unclaimed[0].message().payload().as_ref(),
        b"bad for the panicking sink"
    );
}

/// A sink that takes fates in runs (`FateSink::fates`) as its `behaviour` says, recording each
/// (tag, delivered, taken by `fates` or by `fate`) and the size of each `fates` call.
struct RunSink {
    behaviour: RunBehaviour,
    seen: Mutex<Vec<(u64, bool, &'static str)>>,
    calls: Mutex<Vec<usize>>,
}

#[derive(Clone, Copy)]
enum RunBehaviour {
    /// Takes every fate, and panics on tag 11 (in `fates` and in `fate`).
    PanicsOnEleven,
    /// Takes only the first fate of each call.
    TakesOne,
}

impl RunSink {
    fn new(behaviour: RunBehaviour) -> Arc<Self> {
        Arc::new(Self {
            behaviour,
            seen: Mutex::default(),
            calls: Mutex::default(),
        })
    }

    fn take(
        &self,
        tag: u64,
        outcome: &Result<herald_core::Delivery, SendError>,
        via: &'static str,
    ) {
        if tag == 11 && matches!(self.behaviour, RunBehaviour::PanicsOnEleven) {
            panic!("a sink that panics on 11");
        }
        self.seen
            .lock()
            .expect("seen")
            .push((tag, outcome.is_ok(), via));
    }
}

impl herald_core::FateSink for RunSink {
    fn fate(&self, tag: u64, outcome: Result<herald_core::Delivery, SendError>) {
        self.take(tag, &outcome, "fate");
    }

    fn fates(
        &self,
        fates: &mut dyn Iterator<Item = (u64, Result<herald_core::Delivery, SendError>)>,
    ) {
        let (n, _) = fates.size_hint();
        self.calls.lock().expect("calls").push(n);
        match self.behaviour {
            RunBehaviour::PanicsOnEleven => {
                for (tag, outcome) in fates {
                    self.take(tag, &outcome, "fates");
                }
            }
            RunBehaviour::TakesOne => {
                if let Some((tag, outcome)) = fates.next() {
                    self.take(tag, &outcome, "fates");
                }
            }
        }
    }
}

/// Sends tags 0 to 12 (10 a rejected message, 11 a rejected one the panicking sink dies on) in
/// one batch through `sink`, and returns what `close` kept.
async fn run_through(sink: Arc<RunSink>) -> Vec<SendError> {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(100, 1 << 20, Duration::from_millis(5)))
        .build()
        .expect("producer");
    let mut msgs: Vec<(u64, Message)> = (0..10u64).map(|i| (i, msg(i as usize))).collect();
    msgs.push((10, Message::new("t", "bad one")));
    msgs.push((11, Message::new("t", "bad for the panicking sink")));
    msgs.push((12, msg(12)));
    let as_sink: Arc<dyn herald_core::FateSink> = sink.clone();
    assert!(p.enqueue_tagged(msgs, &as_sink).await.is_empty());
    p.flush().await;
    p.close(Duration::from_secs(10)).await.unclaimed
}

/// Fates that end together reach a sink in one `fates` call; a sink that panics in it loses
/// nothing but the news it panicked on (that failure is kept for `close`): it is asked again
/// with the fates after it.
#[tokio::test(start_paused = true)]
async fn a_batch_s_fates_reach_the_sink_in_one_call_and_a_panic_in_it_loses_no_failure() {
    let sink = RunSink::new(RunBehaviour::PanicsOnEleven);
    let unclaimed = run_through(sink.clone()).await;
    assert_eq!(unclaimed.len(), 1, "{unclaimed:?}");
    assert_eq!(
        unclaimed[0].message().payload().as_ref(),
        b"bad for the panicking sink"
    );
    let mut seen = sink.seen.lock().expect("seen").clone();
    seen.sort_by_key(|(tag, ..)| *tag);
    let tags: Vec<u64> = seen.iter().map(|(tag, ..)| *tag).collect();
    let mut expected: Vec<u64> = (0..=10).collect();
    expected.push(12);
    assert_eq!(
        tags, expected,
        "each once but the one it panicked on: {seen:?}"
    );
    assert!(
        seen.iter().all(|(tag, ok, _)| *ok == (*tag != 10)),
        "{seen:?}"
    );
    assert!(seen.iter().all(|(.., via)| *via == "fates"), "{seen:?}");
    let calls = sink.calls.lock().expect("calls").clone();
    assert!(calls.iter().any(|&n| n > 1), "no run of fates: {calls:?}");
}

/// A sink that leaves fates untaken in `fates` gets them through `fate`, each once.
#[tokio::test(start_paused = true)]
async fn fates_a_sink_leaves_untaken_come_one_by_one() {
    let sink = RunSink::new(RunBehaviour::TakesOne);
    let unclaimed = run_through(sink.clone()).await;
    assert!(unclaimed.is_empty(), "{unclaimed:?}");
    let seen = sink.seen.lock().expect("seen").clone();
    let mut tags: Vec<u64> = seen.iter().map(|(tag, ..)| *tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..=12).collect::<Vec<_>>(), "each once: {seen:?}");
    assert!(seen.iter().any(|(.., via)| *via == "fate"), "{seen:?}");
}

/// `enqueue_tagged` without a store admits as much as the buffer has room for and waits for
/// the rest in order (the command's path): 25 messages through a buffer of 10 with the broker
/// held, the 8th too large; after a close, every message comes back with its tag.
#[tokio::test(start_paused = true)]
async fn enqueue_tagged_waits_for_room_in_order_and_hands_back_refusals_with_their_tags() {
    let t = MemoryTransport::new();
    let producer = Producer::builder(t.clone())
        .buffer(10, 1 << 20)
        .max_message_bytes(1_000)
        .build()
        .expect("producer");
    t.hold();
    let fates: Arc<Mutex<Vec<(u64, bool)>>> = Arc::default();
    let sink: Arc<dyn herald_core::FateSink> = {
        let fates = fates.clone();
        Arc::new(
            move |tag: u64, outcome: Result<herald_core::Delivery, SendError>| {
                fates.lock().expect("fates").push((tag, outcome.is_ok()));
            },
        )
    };
    let msgs: Vec<(u64, Message)> = (0..25u64)
        .map(|i| {
            let m = if i == 7 {
                Message::new("t", vec![b'x'; 2_000])
            } else {
                msg(i as usize)
            };
            (100 + i, m)
        })
        .collect();
    let call = tokio::spawn({
        let (producer, sink) = (producer.clone(), sink.clone());
        async move { producer.enqueue_tagged(msgs, &sink).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!call.is_finished(), "25 messages do not fit a buffer of 10");
    t.release();
    let refused = call.await.expect("join");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, 107);
    assert!(matches!(
        refused[0].1.reason(),
        FailureReason::TooLarge { .. }
    ));
    eventually(Duration::from_secs(10), "every fate", || {
        fates.lock().expect("fates").len() == 24
    })
    .await;
    let mut got = fates.lock().expect("fates").clone();
    got.sort_unstable();
    let want: Vec<(u64, bool)> = (100..125)
        .filter(|&t| t != 107)
        .map(|t| (t, true))
        .collect();
    assert_eq!(got, want, "each delivered once, with its tag");
    let sent: Vec<_> = t.received().iter().map(|m| m.payload().clone()).collect();
    let in_order: Vec<_> = (0..25)
        .filter(|&i| i != 7)
        .map(|i| bytes::Bytes::from(format!("m-{i}")))
        .collect();
    assert_eq!(sent, in_order);
    producer.close(Duration::from_secs(1)).await;
    let refused = producer
        .enqueue_tagged((0..3u64).map(|i| (i, msg(i as usize))).collect(), &sink)
        .await;
    let tags: Vec<u64> = refused.iter().map(|(tag, _)| *tag).collect();
    assert_eq!(tags, [0, 1, 2]);
    assert!(refused
        .iter()
        .all(|(_, e)| matches!(e.reason(), FailureReason::Closed)));
    assert_eq!(
        fates.lock().expect("fates").len(),
        24,
        "the sink heard nothing more"
    );
}

#[tokio::test(start_paused = true)]
async fn enqueue_many_accepts_in_order_waits_for_room_and_answers_each_in_its_place() {
    // A buffer of 10 and 25 messages, the 8th too large: the call takes what fits, waits for
    // the broker to free room, and returns one answer per message in input order.
    let t = MemoryTransport::new();
    let producer = Producer::builder(t.clone())
        .buffer(10, 1 << 20)
        .max_message_bytes(1_000)
        .build()
        .expect("producer");
    t.hold();
    let msgs: Vec<Message> = (0..25)
        .map(|i| {
            if i == 7 {
                Message::new("t", vec![b'x'; 2_000])
            } else {
                msg(i)
            }
        })
        .collect();
    let call = tokio::spawn({
        let producer = producer.clone();
        async move { producer.enqueue_many(msgs).await }
    });
    // With the broker held, the buffer fills at 10 and the call waits for room.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!call.is_finished(), "25 messages do not fit a buffer of 10");
    t.release();
    let answers = call.await.expect("join");
    assert_eq!(answers.len(), 25);
    let mut futures = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        match a {
            Err(e) => {
                assert_eq!(i, 7, "only the large message is refused: {e}");
                assert!(matches!(e.reason(), FailureReason::TooLarge { .. }), "{e}");
            }
            Ok(f) => futures.push((i, f)),
        }
    }
    assert_eq!(futures.len(), 24);
    for (i, f) in futures {
        let d = f.await.unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(d.attempts, 1, "message {i}");
    }
    // Delivered in input order (one key-less destination, strict ordering).
    let got: Vec<_> = t.received().iter().map(|m| m.payload().clone()).collect();
    let want: Vec<_> = (0..25)
        .filter(|&i| i != 7)
        .map(|i| bytes::Bytes::from(format!("m-{i}")))
        .collect();
    assert_eq!(got, want);
    // After a close, every message comes back refused, each in its place.
    producer.close(Duration::from_secs(1)).await;
    let answers = producer.enqueue_many((0..3).map(msg).collect()).await;
    assert_eq!(answers.len(), 3);
    for a in answers {
        let e = a.expect_err("closed");
        assert!(matches!(e.reason(), FailureReason::Closed), "{e}");
    }
}

#[tokio::test(start_paused = true)]
async fn enqueue_many_takes_a_long_run_in_chunks_and_keeps_its_order() {
    // More than one chunk (1 024) in one call, the buffer large enough for all.
    let t = MemoryTransport::new();
    let producer = Producer::builder(t.clone()).build().expect("producer");
    let answers = producer.enqueue_many((0..3_000).map(msg).collect()).await;
    assert_eq!(answers.len(), 3_000);
    for (i, a) in answers.into_iter().enumerate() {
        a.unwrap_or_else(|e| panic!("message {i}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
    }
    let got: Vec<_> = t.received().iter().map(|m| m.payload().clone()).collect();
    let want: Vec<_> = (0..3_000)
        .map(|i| bytes::Bytes::from(format!("m-{i}")))
        .collect();
    assert_eq!(got, want);
}

/// On a one-thread runtime nothing but the sending task runs until it yields, and admission
/// never waits while the buffer has room: a task sending in a loop must give way now and then,
/// or the dispatcher sends nothing until the whole buffer (here room for all 20 000) is full.
/// Checked the moment the sending returns, before anything else awaits: some batches are out
/// and acknowledged already, by every way in that a loop uses.
#[tokio::test(flavor = "current_thread")]
async fn a_task_sending_in_a_loop_lets_the_dispatcher_send_meanwhile() {
    const N: usize = 20_000;
    let producer = |t: &MemoryTransport| Producer::builder(t.clone()).build().expect("build");

    let t = MemoryTransport::counting();
    let p = producer(&t);
    let receipt = p.send_all((0..N).map(msg)).await;
    assert!(
        t.delivered() > 0,
        "send_all: nothing sent before it returned"
    );
    assert_eq!(receipt.wait().await.delivered as usize, N);

    let t = MemoryTransport::counting();
    let p = producer(&t);
    let mut futures = Vec::with_capacity(N);
    for i in 0..N {
        futures.push(p.enqueue(msg(i)).await.expect("room for all"));
    }
    assert!(t.delivered() > 0, "enqueue: nothing sent during the loop");
    for f in futures {
        f.await.expect("delivered");
    }

    let t = MemoryTransport::counting();
    let p = producer(&t);
    let sink: Arc<dyn herald_core::FateSink> = Arc::new(|_tag, _fate| {});
    for run in 0..(N / 1000) {
        let msgs = (run * 1000..(run + 1) * 1000)
            .map(|i| (i as u64, msg(i)))
            .collect();
        assert!(p.enqueue_tagged(msgs, &sink).await.is_empty());
    }
    assert!(
        t.delivered() > 0,
        "enqueue_tagged: nothing sent during the loop"
    );
    p.flush().await;
    assert_eq!(t.delivered() as usize, N);
}

/// A store of the tests' own: `durable` makes each submission's durability future, `settle`
/// runs on every settlement; it recovers nothing and does not read back.
struct FakeStore {
    name: &'static str,
    durable: Box<dyn Fn() -> herald_core::Durable + Send + Sync>,
    settle: Box<dyn Fn() + Send + Sync>,
}

impl FakeStore {
    fn new(
        name: &'static str,
        durable: impl Fn() -> herald_core::Durable + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            durable: Box::new(durable),
            settle: Box::new(|| {}),
        }
    }

    fn on_settle(mut self, settle: impl Fn() + Send + Sync + 'static) -> Self {
        self.settle = Box::new(settle);
        self
    }
}

impl herald_core::Store for FakeStore {
    fn submit(
        &self,
        messages: &[Message],
    ) -> Result<herald_core::Submitted, herald_core::StoreError> {
        Ok(herald_core::Submitted {
            tokens: (0..messages.len() as u64).collect(),
            durable: (self.durable)(),
        })
    }
    fn settle(&self, _: &[herald_core::StoreToken]) {
        (self.settle)();
    }
    fn recover(
        &self,
        _: usize,
    ) -> Result<Vec<(herald_core::StoreToken, Message)>, herald_core::StoreError> {
        Ok(Vec::new())
    }
    fn describe(&self) -> String {
        self.name.into()
    }
}

/// A store whose writes never become durable (a failed fsync).
fn never_durable() -> FakeStore {
    FakeStore::new("never durable", || {
        Box::pin(async { Err(herald_core::StoreError::failed("fsync failed")) })
    })
}

/// A message its store could not make durable was never accepted: not in the totals, and not
/// in `herald_messages_accepted_total` either (the metric counted it, and a counter cannot
/// take it back).
#[tokio::test]
async fn a_message_the_store_could_not_make_durable_is_not_counted_accepted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let p = metrics::with_local_recorder(&recorder, || {
        Producer::builder(MemoryTransport::new())
            .store(never_durable())
            .build()
            .expect("build")
    });
    let e = p.send(msg(0)).await.expect_err("never durable");
    assert!(matches!(e.reason(), FailureReason::Store(_)), "{e}");
    let totals = p.stats().totals;
    assert_eq!((totals.accepted, totals.failed), (0, 1));
    let accepted: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == herald_core::metrics::MESSAGES_ACCEPTED)
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(
        accepted, totals.accepted,
        "the metric agrees with the totals"
    );
    p.close(Duration::from_secs(5)).await;
}

/// A runtime of one worker thread, as an application's.
fn one_worker() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A runtime on the calling thread.
fn this_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// `flush`, then `close` without a deadline, on `p` end within 10 s each, everything drained.
async fn flush_and_close_end(p: &Producer) {
    tokio::time::timeout(Duration::from_secs(10), p.flush())
        .await
        .expect("flush ends");
    let report = tokio::time::timeout(Duration::from_secs(10), p.close(Duration::MAX))
        .await
        .expect("close ends");
    assert!(report.drained, "{report:?}");
}

/// The runtime that runs a producer's tasks shuts down while a message is in flight and more
/// are queued behind it, and the producer lives on in code on another runtime:
/// every message is handed back `Closed`, a new one is refused, and `flush` and `close` end.
/// Before, nothing answered them while a handle lived: futures, `flush` and `close(MAX)`
/// waited for ever.
#[test]
fn messages_whose_producer_runtime_shuts_down_are_handed_back_closed() {
    let t = MemoryTransport::new();
    t.hold();
    let first = one_worker();
    let (p, futures) = first.block_on(async {
        let p = Producer::builder(t.clone())
            .batching(SizeOrLinger::new(1, 1 << 20, Duration::ZERO))
            .build()
            .expect("producer");
        let mut futures = Vec::new();
        for i in 0..5 {
            futures.push(p.enqueue(msg(i)).await.expect("accepted"));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while t.calls() == 0 {
            assert!(std::time::Instant::now() < deadline, "no call was made");
            tokio::task::yield_now().await;
        }
        (p, futures)
    });
    drop(first);
    let second = this_thread();
    second.block_on(async {
        for f in futures {
            let e = tokio::time::timeout(Duration::from_secs(10), f)
                .await
                .expect("answered")
                .expect_err("never sent");
            assert!(matches!(e.reason(), FailureReason::Closed), "{e}");
        }
        let stats = p.stats();
        assert_eq!(stats.totals.accepted, 5, "{stats:?}");
        assert_eq!(stats.totals.failed, 5, "{stats:?}");
        let refused = p.try_send(msg(9)).expect_err("nothing sends it");
        assert!(
            matches!(refused.reason(), FailureReason::Closed),
            "{refused}"
        );
        flush_and_close_end(&p).await;
    });
}

/// A store that takes messages and never says whether they are durable (an fsync that hangs).
fn durable_never() -> FakeStore {
    FakeStore::new("durable never", || Box::pin(std::future::pending()))
}

/// A stored message whose store had not made it durable when the runtime of the producer's
/// tasks shut down is handed back `Closed` and not kept: the store may never hold it, so its
/// caller must keep it. It was marked kept in the store, which a caller (the command's
/// dead-letter file) takes as "sent by the next producer".
#[test]
fn a_stored_message_not_yet_durable_when_the_runtime_shuts_down_is_not_kept() {
    let first = one_worker();
    let (p, future) = first.block_on(async {
        let p = Producer::builder(MemoryTransport::new())
            .store(durable_never())
            .build()
            .expect("producer");
        let future = p.try_send(msg(0)).expect("stored");
        (p, future)
    });
    drop(first);
    let second = this_thread();
    second.block_on(async {
        let e = tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("answered")
            .expect_err("never sent");
        assert!(matches!(e.reason(), FailureReason::Closed), "{e}");
        assert!(!e.is_kept_in_store(), "{e}");
        let totals = p.stats().totals;
        assert_eq!((totals.accepted, totals.failed), (0, 1), "{totals:?}");
        tokio::time::timeout(Duration::from_secs(10), p.flush())
            .await
            .expect("flush ends");
    });
}

/// The runtime of a producer with a store shuts down before its tasks ever ran (the recovery
/// of what the store holds among them): `flush` and `close` on another runtime end. They
/// waited for ever for the recovery.
#[test]
fn a_producer_whose_runtime_shuts_down_before_its_recovery_can_be_flushed() {
    let first = this_thread();
    // Nothing awaited: the producer's tasks are spawned, not run, before the runtime goes.
    let p = first.block_on(async {
        Producer::builder(MemoryTransport::new())
            .store(durable_never())
            .build()
            .expect("producer")
    });
    drop(first);
    let second = this_thread();
    second.block_on(async {
        flush_and_close_end(&p).await;
    });
}

/// A store of one's own whose durability future panics once and whose `settle` panics once,
/// saying so in its flags.
#[derive(Default)]
struct Panicky {
    durable_panicked: std::sync::atomic::AtomicBool,
    settle_panicked: std::sync::atomic::AtomicBool,
}

impl Panicky {
    fn store(flags: &Arc<Self>) -> FakeStore {
        use std::sync::atomic::Ordering;
        let (d, s) = (flags.clone(), flags.clone());
        FakeStore::new("panicky", move || {
            let first = !d.durable_panicked.swap(true, Ordering::AcqRel);
            Box::pin(async move {
                assert!(!first, "the store's fsync panicked");
                Ok(())
            })
        })
        .on_settle(move || {
            assert!(
                s.settle_panicked.swap(true, Ordering::AcqRel),
                "the store's settle panicked"
            );
        })
    }
}

/// A store's panics are contained: the message whose durability panicked is handed back as
/// not stored, the next ones go through (the store's confirmer ended at the first panic, and
/// every later message was refused), and a panicking `settle` leaves `flush` able to end (it
/// left the message counted as unsettled, and took the dispatcher down).
#[tokio::test]
async fn a_store_that_panics_fails_only_what_it_panicked_on() {
    let store = Arc::new(Panicky::default());
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone())
        .store(Panicky::store(&store))
        .build()
        .expect("build");
    let e = p.send(msg(0)).await.expect_err("its fsync panicked");
    assert!(matches!(e.reason(), FailureReason::Store(_)), "{e}");
    assert!(e.to_string().contains("panicked"), "{e}");
    assert!(!e.is_kept_in_store(), "{e}");
    // The first delivery's settle panics, the second's does not.
    p.send(msg(1)).await.expect("delivered");
    p.send(msg(2)).await.expect("delivered");
    tokio::time::timeout(Duration::from_secs(10), p.flush())
        .await
        .expect("flush ends");
    assert_eq!(t.delivered(), 2);
    assert!(store
        .settle_panicked
        .load(std::sync::atomic::Ordering::Acquire));
}

/// A store that makes every message durable at once and does not read back (so the stage
/// holds at most a buffer's worth in memory, then refuses with `BufferFull`, and a sender
/// waits for room).
fn held_in_memory() -> FakeStore {
    FakeStore::new("held in memory", || Box::pin(async { Ok(()) }))
}

/// With a store, an `enqueue` cancelled while it waits for room hands its message to the
/// unclaimed hook as `Cancelled`, as documented. The failure went into the call's own
/// receiver, dropped with it unread: counted failed, heard by nobody.
#[tokio::test(start_paused = true)]
async fn a_stored_enqueue_cancelled_while_waiting_for_room_reaches_the_unclaimed_hook() {
    let t = MemoryTransport::new();
    t.hold();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let p = {
        let heard = heard.clone();
        Producer::builder(t.clone())
            .buffer(1, 1 << 20)
            .store(held_in_memory())
            .on_unclaimed(move |e| heard.lock().expect("heard").push(e))
            .build()
            .expect("build")
    };
    let _in_flight = p.enqueue(msg(0)).await.expect("accepted");
    eventually(Duration::from_secs(5), "the first is sent", || {
        t.calls() == 1
    })
    .await;
    let _staged = p.enqueue(msg(1)).await.expect("accepted");
    let waited = tokio::time::timeout(Duration::from_secs(1), p.enqueue(msg(2))).await;
    assert!(waited.is_err(), "it should have waited for room");
    let heard = std::mem::take(&mut *heard.lock().expect("heard"));
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert!(
        matches!(heard[0].reason(), FailureReason::Cancelled),
        "{}",
        heard[0]
    );
    assert_eq!(heard[0].message().payload(), msg(2).payload());
}

/// The same for a failed stored message, which is settled when the last copy of its error
/// goes, often inside the pipeline (a sink that drops the error it is handed): a panicking
/// `settle` there unwound through the pipeline's completions, before they lowered the count
/// `flush` waits on.
#[tokio::test]
async fn a_store_that_panics_settling_a_failed_message_leaves_flush_able_to_end() {
    let store = Arc::new(Panicky::default());
    let t = MemoryTransport::new();
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t.clone())
        .store(Panicky::store(&store))
        .build()
        .expect("build");
    // Its first durability future panics: spent on a message of its own.
    let _first = p.send(msg(0)).await.expect_err("its fsync panicked");
    let sink: Arc<dyn herald_core::FateSink> =
        Arc::new(|_tag: u64, _fate: Result<herald_core::Delivery, SendError>| {});
    let refused = p
        .enqueue_tagged(vec![(1, Message::new("t", "bad one"))], &sink)
        .await;
    assert!(refused.is_empty(), "{refused:?}");
    tokio::time::timeout(Duration::from_secs(10), p.flush())
        .await
        .expect("flush ends");
    assert!(
        store
            .settle_panicked
            .load(std::sync::atomic::Ordering::Acquire),
        "the settle ran"
    );
    p.send(msg(2)).await.expect("the producer goes on");
}
