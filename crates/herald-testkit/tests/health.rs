//! A producer's health follows what happens to it: circuit breaker, transport connection, buffer,
//! error rate, close; and subscribers hear about changes. Tokio's paused clock: intervals pass in
//! virtual time.

use std::time::Duration;

use herald_batch::SizeOrLinger;
use herald_core::{
    BuildError, ErrorClass, Health, HealthIssue, HealthPolicy, HealthStatus, Message, Producer,
    TransportHealth,
};
use herald_retry::{Backoff, CircuitBreakerConfig, ExponentialRetry};
use herald_testkit::{CallFault, MemoryTransport};
use tokio::sync::watch;

fn codes(h: &Health) -> Vec<&'static str> {
    h.issues.iter().map(HealthIssue::code).collect()
}

/// Waits (virtual time) until the watched health satisfies `cond`; panics after `limit`.
async fn wait_for(
    rx: &mut watch::Receiver<Health>,
    limit: Duration,
    what: &str,
    cond: impl FnMut(&Health) -> bool,
) -> Health {
    let found = match tokio::time::timeout(limit, rx.wait_for(cond)).await {
        Ok(Ok(h)) => Some(h.clone()),
        Ok(Err(_)) => panic!("health channel closed while waiting for: {what}"),
        Err(_) => None,
    };
    found.unwrap_or_else(|| panic!("timed out waiting for: {what}; health is {}", *rx.borrow()))
}

fn fast_retry() -> ExponentialRetry {
    ExponentialRetry::new(Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(100),
    ))
}

#[tokio::test(start_paused = true)]
async fn a_transport_that_goes_down_makes_the_producer_unhealthy_and_back() {
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone()).build().expect("build");
    let mut rx = p.health_watch();
    assert_eq!(
        p.health(),
        Health::default(),
        "healthy when nothing happened"
    );

    t.set_health(TransportHealth::Down(
        "127.0.0.1:9092: Connection refused".into(),
    ));
    // Published by the periodic evaluation (every second by default), without anyone asking.
    let h = wait_for(&mut rx, Duration::from_secs(2), "unhealthy", |h| {
        h.status == HealthStatus::Unhealthy
    })
    .await;
    assert_eq!(codes(&h), ["transport_down"]);
    assert!(h.to_string().contains("Connection refused"), "{h}");

    t.set_health(TransportHealth::Blocked("memory alarm".into()));
    let h = wait_for(&mut rx, Duration::from_secs(2), "degraded", |h| {
        h.status == HealthStatus::Degraded
    })
    .await;
    assert_eq!(codes(&h), ["broker_blocked"]);

    t.set_health(TransportHealth::Up);
    wait_for(&mut rx, Duration::from_secs(2), "healthy", |h| {
        h.status == HealthStatus::Healthy
    })
    .await;
    p.close(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_published_at_once_and_clears_when_the_broker_is_back() {
    let t = MemoryTransport::new();
    t.script(vec![CallFault::FailAll(ErrorClass::Transient); 3]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
            enabled: true,
        })
        .health(HealthPolicy {
            // Long: the change must come from the breaker's kick, not the periodic evaluation.
            interval: Duration::from_secs(600),
            error_window: Duration::from_secs(600),
            ..HealthPolicy::default()
        })
        .build()
        .expect("build");
    let mut rx = p.health_watch();
    let f = p.enqueue(Message::new("t", "m")).await.expect("enqueue");
    let h = wait_for(&mut rx, Duration::from_secs(2), "circuit open", |h| {
        h.status == HealthStatus::Unhealthy
    })
    .await;
    assert_eq!(codes(&h), ["circuit_open"]);
    // The probe after `open_for` succeeds: the message is delivered and the circuit closes.
    f.await.expect("delivered after the circuit closes");
    wait_for(&mut rx, Duration::from_secs(2), "circuit closed", |h| {
        h.status == HealthStatus::Healthy
    })
    .await;
    p.close(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_buffer_above_its_high_water_mark_is_degraded() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(10));
    let p = Producer::builder(t.clone())
        .buffer(10, 1 << 20)
        .batching(SizeOrLinger::new(100, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let mut futures = Vec::new();
    for i in 0..8 {
        futures.push(
            p.enqueue(Message::new("t", format!("m{i}")))
                .await
                .expect("enqueue"),
        );
    }
    assert_eq!(
        p.health().status,
        HealthStatus::Healthy,
        "8 of 10 is not above 80 %"
    );
    futures.push(p.enqueue(Message::new("t", "m8")).await.expect("enqueue"));
    let h = p.health();
    assert_eq!(codes(&h), ["buffer_high_water"]);
    assert_eq!(
        h.issues[0],
        HealthIssue::BufferHighWater {
            messages: 9,
            max_messages: 10,
            bytes: 18,
            max_bytes: 1 << 20
        }
    );
    for f in futures {
        f.await.expect("delivered");
    }
    assert_eq!(p.health().status, HealthStatus::Healthy);
    p.close(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn the_error_rate_over_the_window_degrades_then_fails_health() {
    let t = MemoryTransport::new();
    t.reject_payload_prefix("poison");
    let p = Producer::builder(t.clone())
        .health(HealthPolicy {
            error_window: Duration::from_secs(10),
            min_messages: 20,
            ..HealthPolicy::default()
        })
        .build()
        .expect("build");
    let mut rx = p.health_watch();
    let send = |poison: usize, clean: usize| {
        let msgs = (0..poison)
            .map(|i| Message::new("t", format!("poison-{i}")))
            .chain((0..clean).map(|i| Message::new("t", format!("ok-{i}"))));
        let p = p.clone();
        async move { p.send_all(msgs.collect::<Vec<_>>()).await.wait().await }
    };
    // 1 failure in 19: below min_messages, no verdict.
    let r = send(1, 18).await;
    assert_eq!(r.failed.len(), 1);
    assert_eq!(p.health().status, HealthStatus::Healthy);
    // 10 in 100 ended: 10 %, above the 5 % degraded threshold.
    send(9, 72).await;
    let h = p.health();
    assert_eq!(
        h.issues,
        [HealthIssue::ErrorRate {
            failed: 10,
            ended: 100,
            window: Duration::from_secs(10),
            status: HealthStatus::Degraded
        }]
    );
    // The health task publishes once per interval (the clock is paused: a sleep past it lets
    // the task run first, no guessing).
    let next_evaluation = || tokio::time::sleep(Duration::from_millis(1500));
    next_evaluation().await;
    // A count changing inside the same issue does not wake subscribers; the value is current.
    rx.mark_unchanged();
    send(1, 0).await;
    next_evaluation().await;
    assert!(
        !rx.has_changed().expect("open"),
        "woken for a count: {}",
        *rx.borrow()
    );
    assert!(matches!(
        rx.borrow().issues[0],
        HealthIssue::ErrorRate { failed: 11, .. }
    ));
    // Mostly failures: unhealthy.
    send(200, 0).await;
    assert_eq!(p.health().status, HealthStatus::Unhealthy);
    next_evaluation().await;
    assert!(
        rx.has_changed().expect("open"),
        "a status change wakes subscribers"
    );
    // The window moves on: old failures are forgotten.
    tokio::time::sleep(Duration::from_secs(11)).await;
    send(0, 50).await;
    assert_eq!(p.health().status, HealthStatus::Healthy, "{}", p.health());
    p.close(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_closed_producer_is_unhealthy_and_says_so_last() {
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone()).build().expect("build");
    let mut rx = p.health_watch();
    p.send(Message::new("t", "m")).await.expect("delivered");
    p.close(Duration::from_secs(1)).await;
    let h = wait_for(&mut rx, Duration::from_secs(2), "closed", |h| {
        h.status == HealthStatus::Unhealthy
    })
    .await;
    assert_eq!(codes(&h), ["closed"]);
    // The health task has ended with the pipeline: the channel's sender is gone.
    drop(p);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rx.has_changed().is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health task still running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(codes(&rx.borrow()), ["closed"]);
}

#[tokio::test(start_paused = true)]
async fn health_policies_that_cannot_work_are_refused_at_build() {
    let r = Producer::builder(MemoryTransport::new())
        .health(HealthPolicy {
            buffer_high_water: 1.5,
            ..HealthPolicy::default()
        })
        .build();
    match r {
        Err(BuildError::Invalid { field, reason }) => {
            assert_eq!(field, "health");
            assert!(reason.contains("buffer_high_water"), "{reason}");
        }
        other => panic!("expected an invalid setting, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_producer_says_closed_last_too() {
    let t = MemoryTransport::new();
    let p = Producer::builder(t.clone()).build().expect("build");
    let rx = p.health_watch();
    p.send(Message::new("t", "m")).await.expect("delivered");
    // Dropping the last handle closes the producer, as `close` does.
    drop(p);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rx.has_changed().is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipeline still running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(codes(&rx.borrow()), ["closed"], "{}", *rx.borrow());
}

/// A transport whose first `health` call, once armed, waits until released: an evaluation held
/// up in the middle, after it read the producer's state.
struct SlowHealth {
    inner: MemoryTransport,
    armed: std::sync::atomic::AtomicBool,
    entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

#[herald_core::async_trait]
impl herald_core::Transport for SlowHealth {
    fn name(&self) -> &'static str {
        "slow-health"
    }
    async fn send_batch(
        &self,
        destination: &herald_core::Destination,
        batch: &[Message],
    ) -> herald_core::BatchOutcome {
        self.inner.send_batch(destination, batch).await
    }
    fn health(&self) -> TransportHealth {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let entered = self.entered.lock().expect("entered").take();
            let release = self.release.lock().expect("release").take();
            if let (Some(entered), Some(release)) = (entered, release) {
                entered.send(()).expect("the test waits");
                release.recv().expect("the test releases");
            }
        }
        TransportHealth::Up
    }
}

/// The health task's evaluation reads the producer open, is held up, and finishes only after the
/// producer has closed and published "closed": its stale "healthy" must not be published over
/// "closed" (the evaluation tickets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_that_started_before_close_does_not_overwrite_closed() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let t = std::sync::Arc::new(SlowHealth {
        inner: MemoryTransport::new(),
        armed: std::sync::atomic::AtomicBool::new(false),
        entered: std::sync::Mutex::new(Some(entered_tx)),
        release: std::sync::Mutex::new(Some(release_rx)),
    });
    let p = Producer::builder_shared(t.clone())
        .health(HealthPolicy {
            interval: Duration::from_millis(20),
            ..HealthPolicy::default()
        })
        .build()
        .expect("build");
    let mut rx = p.health_watch();
    p.send(Message::new("t", "m")).await.expect("delivered");
    // The health task's next periodic evaluation takes its ticket, reads "open", and is held.
    t.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::task::spawn_blocking(move || entered_rx.recv().expect("the health task evaluates"))
        .await
        .expect("join");
    // Meanwhile the producer closes: the dispatcher's last word publishes "closed".
    p.close(Duration::from_secs(5)).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        rx.wait_for(|h| codes(h) == ["closed"]).await.is_ok()
    })
    .await;
    assert_eq!(closed, Ok(true), "closed was published");
    // Now the held evaluation finishes, with what it read before the close.
    release_tx.send(()).expect("release");
    drop(p);
    // The pipeline (and its watch sender) goes once the health task has finished.
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while rx.changed().await.is_ok() {}
    })
    .await;
    assert!(gone.is_ok(), "the health task finished");
    assert_eq!(codes(&rx.borrow()), ["closed"], "{}", *rx.borrow());
}

#[tokio::test(start_paused = true)]
async fn an_idle_producer_is_not_unhealthy_forever_once_the_circuit_may_probe() {
    let t = MemoryTransport::new();
    t.script(vec![CallFault::FailAll(ErrorClass::Transient); 3]);
    let p = Producer::builder(t.clone())
        .retry(fast_retry())
        .delivery_timeout(Duration::from_secs(2))
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
            enabled: true,
        })
        .build()
        .expect("build");
    let mut rx = p.health_watch();
    let e = p.send(Message::new("t", "m")).await.expect_err("times out");
    assert!(
        matches!(
            e.reason(),
            herald_core::FailureReason::DeliveryTimeout { .. }
        ),
        "{e}"
    );
    assert_eq!(p.stats().buffered_messages, 0);
    // Nothing is held back any more, and after `open_for` the next batch may probe: not
    // unhealthy (which would drain the traffic that would close the circuit), nor degraded
    // while nothing waits (which would page someone about a producer with nothing to send).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let h = wait_for(&mut rx, Duration::from_secs(2), "healthy", |h| {
        h.status == HealthStatus::Healthy
    })
    .await;
    assert!(h.issues.is_empty(), "{h}");
    assert_eq!(
        p.stats().circuit,
        herald_retry::CircuitState::Open,
        "the breaker itself waits for a batch"
    );
    // A message waiting with the breaker open past `open_for`: the next batch probes.
    t.set_latency(Duration::from_secs(30));
    let waiting = p
        .enqueue(Message::new("t", "probe"))
        .await
        .expect("accepted");
    assert_eq!(
        codes(&p.health()),
        ["circuit_half_open"],
        "a probe is under way"
    );
    drop(waiting);
    p.close(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn refusals_before_acceptance_are_not_an_error_rate() {
    let t = MemoryTransport::new();
    t.set_latency(Duration::from_secs(5));
    let p = Producer::builder(t.clone())
        .buffer(10, 1 << 20)
        .build()
        .expect("build");
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..100 {
        match p.try_send(Message::new("t", format!("m{i}"))) {
            Ok(f) => accepted.push(f),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((accepted.len(), refused), (10, 90));
    assert_eq!(
        p.stats().totals.failed,
        90,
        "refusals are failures in the totals"
    );
    // A full buffer under try_send is backpressure: degraded for the buffer, not an error rate.
    assert_eq!(codes(&p.health()), ["buffer_high_water"]);
    for f in accepted {
        f.await.expect("delivered");
    }
    assert_eq!(p.health().status, HealthStatus::Healthy);
    p.close(Duration::from_secs(1)).await;
}
