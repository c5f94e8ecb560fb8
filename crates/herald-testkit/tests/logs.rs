//! What a producer logs, read back as the `herald` command prints it (`LogCapture`): one line
//! per circuit breaker transition, delivery timeouts summed up in a few lines however many
//! messages expire, the retry budget running dry once per dry spell. Tokio's paused clock:
//! backoffs, deadlines and the log's rate limit pass in virtual time.

use std::time::Duration;

use herald_batch::SizeOrLinger;
use herald_core::{ErrorClass, FailureReason, Fallback, Message, Producer};
use herald_retry::{Backoff, CircuitBreakerConfig, ExponentialRetry, Jitter, RetryBudgetConfig};
use herald_testkit::{CallFault, LogCapture, MemoryTransport};
use tokio::time::Instant;
use tracing::Level;

/// Backoff without jitter: every message of a batch gets the same decision.
fn steady_retry() -> ExponentialRetry {
    ExponentialRetry::new(
        Backoff::new(Duration::from_millis(10), Duration::from_millis(100))
            .with_jitter(Jitter::None),
    )
}

/// The captured lines that contain `needle`.
fn lines_with(logs: &LogCapture, needle: &str) -> Vec<String> {
    logs.text()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The value of `name=VALUE` in a line, without quotes.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.split('"').next();
    }
    rest.split(' ').next()
}

fn count_of(line: &str) -> u64 {
    field(line, "count")
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no count in: {line}"))
}

/// Waits, in virtual time, until `cond` holds; panics after `limit`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opening_is_one_warning_and_its_closing_is_info() {
    let logs = LogCapture::start_at(Level::INFO);
    let t = MemoryTransport::new();
    t.script(vec![CallFault::FailAll(ErrorClass::Transient); 3]);
    let p = Producer::builder(t.clone())
        .name("orders-eu")
        .retry(steady_retry())
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
            enabled: true,
        })
        .build()
        .expect("build");
    let d = p
        .send(Message::new("t", "m"))
        .await
        .expect("delivered by the probe once the circuit lets it through");
    assert_eq!(d.attempts, 4);
    p.close(Duration::from_secs(1)).await;

    let circuit = lines_with(&logs, "circuit breaker");
    let states: Vec<(&str, &str)> = circuit
        .iter()
        .map(|l| {
            let level = if l.contains(" WARN ") {
                "WARN"
            } else if l.contains(" INFO ") {
                "INFO"
            } else {
                "other"
            };
            (level, field(l, "circuit").unwrap_or("none"))
        })
        .collect();
    assert_eq!(
        states,
        [("WARN", "open"), ("INFO", "half_open"), ("INFO", "closed")],
        "one line per transition, in order:\n{}",
        circuit.join("\n")
    );
    let open = &circuit[0];
    assert_eq!(field(open, "from"), Some("closed"), "{open}");
    assert_eq!(field(open, "producer"), Some("orders-eu"), "{open}");
    assert_eq!(field(open, "transport"), Some("memory"), "{open}");
    assert_eq!(field(open, "failure_threshold"), Some("3"), "{open}");
    assert_eq!(field(open, "open_for_ms"), Some("5000"), "{open}");
    assert_eq!(field(&circuit[2], "from"), Some("half_open"));
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_fails_opens_the_circuit_again_with_one_more_warning() {
    let logs = LogCapture::start();
    let t = MemoryTransport::new();
    // Three failures open the circuit; the first probe fails too; the second goes through.
    t.script(vec![CallFault::FailAll(ErrorClass::Transient); 4]);
    let p = Producer::builder(t.clone())
        .retry(steady_retry())
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
            enabled: true,
        })
        .build()
        .expect("build");
    p.send(Message::new("t", "m")).await.expect("delivered");
    p.close(Duration::from_secs(1)).await;
    let warnings = lines_with(&logs, "circuit breaker");
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert_eq!(field(&warnings[0], "from"), Some("closed"));
    assert_eq!(field(&warnings[1], "from"), Some("half_open"));
    assert!(warnings.iter().all(|l| field(l, "circuit") == Some("open")));
    // No name given: no producer field at all (not an empty one).
    assert!(
        warnings.iter().all(|l| !l.contains("producer=")),
        "{warnings:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_delivery_timeouts_are_a_handful_of_lines_that_count_them_all() {
    const N: u64 = 10_000;
    let logs = LogCapture::start();
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        1_000_000,
    ));
    let p = Producer::builder(t.clone())
        .name("bulk")
        .batching(SizeOrLinger::new(500, 64 << 20, Duration::from_millis(5)))
        .buffer(2 * N as usize, 256 << 20)
        .retry(steady_retry().unlimited_attempts())
        .retry_budget(RetryBudgetConfig::unlimited())
        .circuit_breaker(CircuitBreakerConfig::disabled())
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("build");
    let dests = ["orders", "payments"];
    let receipt = p
        .send_all((0..N).map(|i| Message::new(dests[(i % 2) as usize], format!("m-{i}"))))
        .await;
    let report = receipt.wait().await;
    assert_eq!(report.failed.len() as u64, N);
    assert!(report
        .failed
        .iter()
        .all(|e| matches!(e.reason(), FailureReason::DeliveryTimeout { .. })));

    // The first line goes out at once; the rest, held back by the rate limit, within its
    // interval, without waiting for a close.
    let timeouts = || lines_with(&logs, "delivery timeout");
    let first = timeouts();
    assert_eq!(first.len(), 1, "said at once, then held back: {first:#?}");
    assert!(
        count_of(&first[0]) > 1,
        "a summary, not a line per message: {}",
        first[0]
    );
    eventually(
        Duration::from_secs(11),
        "the held-back timeouts to be logged",
        || timeouts().iter().map(|l| count_of(l)).sum::<u64>() == N,
    )
    .await;
    p.close(Duration::from_secs(1)).await;

    let lines = timeouts();
    assert!(
        lines.len() <= 3,
        "{} lines for {N} timeouts: {lines:#?}",
        lines.len()
    );
    assert_eq!(
        lines.iter().map(|l| count_of(l)).sum::<u64>(),
        N,
        "{lines:#?}"
    );
    let mut named = std::collections::BTreeSet::new();
    for line in &lines {
        assert!(line.contains(" WARN "), "{line}");
        assert_eq!(field(line, "producer"), Some("bulk"), "{line}");
        assert_eq!(field(line, "delivery_timeout_ms"), Some("2000"), "{line}");
        assert!(line.contains("SCRIPTED"), "the last error says why: {line}");
        let destinations = field(line, "destinations").unwrap_or_default();
        named.extend(destinations.split(", ").map(str::to_owned));
    }
    assert_eq!(named.into_iter().collect::<Vec<_>>(), dests, "{lines:#?}");
    // Nothing else was said per message or per batch.
    assert_eq!(logs.text().lines().count(), lines.len(), "{}", logs.text());
}

#[tokio::test(start_paused = true)]
async fn timeouts_after_the_rate_limit_has_passed_are_said_at_once() {
    let logs = LogCapture::start();
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        10_000,
    ));
    let p = Producer::builder(t.clone())
        .retry(steady_retry().unlimited_attempts())
        .retry_budget(RetryBudgetConfig::unlimited())
        .circuit_breaker(CircuitBreakerConfig::disabled())
        .delivery_timeout(Duration::from_secs(1))
        .build()
        .expect("build");
    let timeouts = || lines_with(&logs, "delivery timeout");
    p.send(Message::new("a", "1")).await.expect_err("times out");
    assert_eq!(timeouts().len(), 1);
    tokio::time::sleep(Duration::from_secs(20)).await;
    p.send(Message::new("b", "2")).await.expect_err("times out");
    let lines = timeouts();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(count_of(&lines[1]), 1);
    assert_eq!(field(&lines[1], "destinations"), Some("b"));
    p.close(Duration::from_secs(1)).await;
    assert_eq!(timeouts().len(), 2, "nothing left to say at close");
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_running_dry_is_one_warning_and_its_return_is_info() {
    let logs = LogCapture::start_at(Level::INFO);
    let t = MemoryTransport::new();
    // Attempt 1 fails and takes the one token the floor holds; attempt 2 fails and must wait
    // for the floor to refill (a second); attempt 3 goes through.
    t.script(vec![CallFault::FailAll(ErrorClass::Transient); 2]);
    let p = Producer::builder(t.clone())
        .name("orders-eu")
        .retry(steady_retry())
        .retry_budget(RetryBudgetConfig {
            ratio: 0.0,
            min_per_sec: 1,
        })
        .circuit_breaker(CircuitBreakerConfig::disabled())
        .delivery_timeout(Duration::from_secs(30))
        .build()
        .expect("build");
    let start = Instant::now();
    let d = p
        .send(Message::new("orders", "m"))
        .await
        .expect("delivered");
    assert_eq!(d.attempts, 3);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "the retry waited for the budget: {:?}",
        start.elapsed()
    );
    p.close(Duration::from_secs(1)).await;

    let dry = lines_with(&logs, "retry budget exhausted");
    assert_eq!(
        dry.len(),
        1,
        "one line for the dry spell, not one per look at the budget:\n{}",
        logs.text()
    );
    let line = &dry[0];
    assert!(line.contains(" WARN "), "{line}");
    assert_eq!(field(line, "producer"), Some("orders-eu"), "{line}");
    assert_eq!(field(line, "transport"), Some("memory"), "{line}");
    assert_eq!(field(line, "destination"), Some("orders"), "{line}");
    assert_eq!(field(line, "held_back"), Some("1"), "{line}");
    assert_eq!(field(line, "budget_min_per_sec"), Some("1"), "{line}");
    let back = lines_with(&logs, "retry budget available again");
    assert_eq!(back.len(), 1, "{}", logs.text());
    assert!(back[0].contains(" INFO "), "{}", back[0]);
}

#[tokio::test(start_paused = true)]
async fn a_budget_that_never_refills_warns_once_while_its_retries_wait_out_their_deadline() {
    let logs = LogCapture::start();
    let t = MemoryTransport::new();
    t.script(std::iter::repeat_n(
        CallFault::FailAll(ErrorClass::Transient),
        100,
    ));
    let p = Producer::builder(t.clone())
        .retry(steady_retry())
        .retry_budget(RetryBudgetConfig {
            ratio: 0.0,
            min_per_sec: 0,
        })
        .circuit_breaker(CircuitBreakerConfig::disabled())
        .delivery_timeout(Duration::from_secs(5))
        .build()
        .expect("build");
    let e = p
        .send(Message::new("orders", "m"))
        .await
        .expect_err("no retry is ever allowed");
    assert!(
        matches!(e.reason(), FailureReason::DeliveryTimeout { .. }),
        "{e}"
    );
    assert_eq!(t.calls(), 1, "never retried");
    p.close(Duration::from_secs(1)).await;
    // Looked at the budget every 100 ms for 5 s: one line all the same.
    assert_eq!(
        lines_with(&logs, "retry budget exhausted").len(),
        1,
        "{}",
        logs.text()
    );
    assert_eq!(
        lines_with(&logs, "delivery timeout").len(),
        1,
        "{}",
        logs.text()
    );
}

/// A `Fallback` says when a route's circuit opens and traffic moves to the next route (warn),
/// and when traffic returns and the route's circuit closes (info): one line each.
#[tokio::test(start_paused = true)]
async fn a_fallback_says_when_traffic_moves_and_when_it_comes_back() {
    let logs = LogCapture::start_at(Level::INFO);
    let primary = MemoryTransport::new();
    primary.script([
        CallFault::FailAll(ErrorClass::Transient),
        CallFault::FailAll(ErrorClass::Transient),
    ]);
    let f = Fallback::new("primary", primary.clone())
        .and_then(|f| f.or("secondary", MemoryTransport::new()))
        .expect("names")
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(1),
            half_open_probes: 1,
            enabled: true,
        });
    let p = Producer::builder(f)
        .retry(steady_retry())
        .circuit_breaker(CircuitBreakerConfig::disabled())
        .batching(SizeOrLinger::new(10, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let first = p
        .send_all((0..20).map(|i| Message::new("t", format!("m-{i}"))))
        .await
        .wait()
        .await;
    assert_eq!(first.delivered, 20);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = p.send(Message::new("t", "probe")).await.expect("delivered");
    assert_eq!(d.ack.route, Some(0), "back on the primary");
    let said = lines_with(&logs, "transport=\"fallback\"");
    let expect = [
        ("WARN", "route=primary", "circuit opened"),
        ("WARN", "to=secondary", "traffic moved to a later route"),
        // Said when the probe is handed to the primary, then its success closes the circuit.
        ("INFO", "to=primary", "traffic back on an earlier route"),
        ("INFO", "route=primary", "circuit closed"),
    ];
    assert_eq!(said.len(), expect.len(), "{said:#?}");
    for (line, (level, field, what)) in said.iter().zip(expect) {
        assert!(
            line.contains(level) && line.contains(field) && line.contains(what),
            "expected {level} {field} {what}, got: {line}"
        );
    }
}
