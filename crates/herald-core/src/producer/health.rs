//! The producer's health: evaluated from the pipeline's state and the transport's, published
//! on a watch channel and as gauges by a task of its own. Circuit breaker transitions are
//! logged here too, where they are noticed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use herald_retry::CircuitState;
use tokio::sync::{watch, Notify};

use super::dispatch::Spoken;
use super::state::{clock_now, Shared, State};
use crate::health::{ErrorWindow, Health, HealthIssue, HealthStatus, TransportHealth};

/// Health as last evaluated, published to subscribers.
pub(crate) struct HealthMonitor {
    window: Mutex<ErrorWindow>,
    pub(crate) tx: watch::Sender<Health>,
    /// Wakes the health task early: the circuit changed state, or the producer is closing.
    pub(crate) kick: Arc<Notify>,
    /// The ticket of the evaluation last published (see `Shared::evaluate_health`).
    published: AtomicU64,
    /// What the log has said lately (delivery timeouts, retry budget), for the dispatcher to
    /// speak on changes and at a bounded rate: kept beside health, which watches the same
    /// signals.
    pub(crate) spoken: Mutex<Spoken>,
}

impl HealthMonitor {
    pub(crate) fn new() -> Self {
        Self {
            window: Mutex::new(ErrorWindow::starting(clock_now())),
            tx: watch::Sender::new(Health::default()),
            kick: Arc::new(Notify::new()),
            published: AtomicU64::new(0),
            spoken: Mutex::new(Spoken::default()),
        }
    }
}

impl Shared {
    /// Evaluates the producer's health now, sets its gauges and publishes it. Subscribers are
    /// woken only when the status or the set of issues changes, not when a count in one does.
    ///
    /// Each evaluation takes a ticket with its snapshot of the state; one that read the state
    /// earlier than the last published never publishes (a stale "healthy" read before a close
    /// must not overwrite the final "closed").
    ///
    /// `publish`: false for an evaluation on demand ([`crate::Producer::health`]), which
    /// neither takes the watch channel's lock (a caller may hold a `borrow()` of it) nor moves
    /// the gauges; the health task and the dispatcher's last word publish.
    pub(crate) fn evaluate_health(&self, now: Instant, publish: bool) -> Health {
        let (ticket, circuit, retry_at, messages, bytes, totals, refused, closing) = {
            let mut st = self.lock();
            st.health_ticket += 1;
            (
                st.health_ticket,
                st.breaker.state(),
                st.breaker.retry_at(),
                st.buffered_messages,
                st.buffered_bytes,
                st.totals,
                st.refused,
                st.closing,
            )
        };
        let policy = &self.config.health;
        let mut issues = Vec::new();
        if closing {
            issues.push(HealthIssue::Closed);
        }
        if self.dispatcher_gone.load(Ordering::Acquire) {
            issues.push(HealthIssue::PipelineStopped);
        }
        let open_past = circuit == CircuitState::Open && retry_at.is_some_and(|t| t <= now);
        let circuit = effective_circuit(circuit, retry_at, now);
        match circuit {
            // Open past its `open_for` (see `effective_circuit`): with messages waiting, the next
            // batch probes; with none, nothing is held back and nothing is known against the
            // broker, so an idle producer is not kept degraded until it sends again.
            CircuitState::HalfOpen if open_past && messages == 0 => {}
            CircuitState::Open => issues.push(HealthIssue::CircuitOpen),
            CircuitState::HalfOpen => issues.push(HealthIssue::CircuitHalfOpen),
            CircuitState::Closed => {}
        }
        let transport = self.transport.health();
        let up = !matches!(transport, TransportHealth::Down(_));
        match transport {
            TransportHealth::Down(why) => issues.push(HealthIssue::TransportDown(why)),
            TransportHealth::Blocked(why) => issues.push(HealthIssue::BrokerBlocked(why)),
            TransportHealth::Up => {}
        }
        let (max_messages, max_bytes) = (
            self.config.max_buffered_messages,
            self.config.max_buffered_bytes,
        );
        let high = |used: usize, max: usize| used as f64 > policy.buffer_high_water * max as f64;
        if high(messages, max_messages) || high(bytes, max_bytes) {
            issues.push(HealthIssue::BufferHighWater {
                messages,
                max_messages,
                bytes,
                max_bytes,
            });
        }
        if let Some(usage) = self.store.as_ref().and_then(|s| s.usage()) {
            if usage.max_bytes > 0
                && usage.used_bytes as f64 > policy.buffer_high_water * usage.max_bytes as f64
            {
                issues.push(HealthIssue::StoreHighWater {
                    pending_messages: usage.pending_messages,
                    used_bytes: usage.used_bytes,
                    max_bytes: usage.max_bytes,
                });
            }
        }
        let (failed, ended) = self
            .health
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(
                now,
                totals.delivered,
                totals.failed - refused,
                policy.error_window,
            );
        if ended > 0 && ended >= policy.min_messages {
            let rate = failed as f64 / ended as f64;
            let status = if rate >= policy.unhealthy_error_rate {
                HealthStatus::Unhealthy
            } else if rate >= policy.degraded_error_rate {
                HealthStatus::Degraded
            } else {
                HealthStatus::Healthy
            };
            if status != HealthStatus::Healthy {
                issues.push(HealthIssue::ErrorRate {
                    failed,
                    ended,
                    window: policy.error_window,
                    status,
                });
            }
        }
        let mut health = Health::from_issues(issues);
        health.endpoint = self.transport.endpoint();
        if !publish {
            return health;
        }
        let stopped = self.stopped.load(Ordering::Acquire);
        self.health.tx.send_if_modified(|seen| {
            // Under the channel's lock: tickets are compared and published one at a time.
            if ticket < self.health.published.load(Ordering::Relaxed) {
                return false;
            }
            self.health.published.store(ticket, Ordering::Relaxed);
            // A producer that has finished closing reports "closed" to its watchers, but the
            // gauge goes back to 0: its series outlives it in the recorder, and an alert on a
            // producer closed on purpose would fire for the rest of the process's life.
            let gauge = if stopped {
                0.0
            } else {
                health.status.as_gauge()
            };
            self.metrics.health.set(gauge);
            self.metrics
                .transport_up
                .set(if up || stopped { 1.0 } else { 0.0 });
            self.metrics
                .circuit
                .set(if stopped { 0.0 } else { circuit.as_gauge() });
            let changed = seen.status != health.status
                || seen.issues.len() != health.issues.len()
                || seen
                    .issues
                    .iter()
                    .zip(&health.issues)
                    .any(|(a, b)| a.code() != b.code());
            *seen = health.clone();
            changed
        });
        health
    }

    /// Tells the health task when the circuit breaker changed state since it last looked, and
    /// logs the transition: the dispatcher calls this after every change it makes to the
    /// breaker, so each transition is logged once, never per batch.
    pub(crate) fn note_circuit(&self, st: &mut State) {
        let now = st.breaker.state();
        if now != st.circuit_seen {
            let was = std::mem::replace(&mut st.circuit_seen, now);
            self.health.kick.notify_one();
            self.log_circuit(was, now, st);
        }
    }

    /// One line per circuit breaker transition: opening is actionable (warn), probing and
    /// closing are not (info).
    fn log_circuit(&self, was: CircuitState, now: CircuitState, st: &State) {
        let producer = self.config.name.as_deref();
        let transport = self.transport.name();
        let config = st.breaker.config();
        let open_for_ms = u64::try_from(config.open_for.as_millis()).unwrap_or(u64::MAX);
        match (was, now) {
            (CircuitState::HalfOpen, CircuitState::Open) => tracing::warn!(
                producer,
                transport,
                circuit = %now,
                from = %was,
                open_for_ms,
                "circuit breaker open again: the probe failed; nothing is sent until open_for has passed"
            ),
            (_, CircuitState::Open) => tracing::warn!(
                producer,
                transport,
                circuit = %now,
                from = %was,
                failure_threshold = config.failure_threshold,
                open_for_ms,
                buffered = st.buffered_messages,
                "circuit breaker open: batches kept failing; nothing is sent until open_for has passed, messages wait in the buffer"
            ),
            (_, CircuitState::HalfOpen) => tracing::info!(
                producer,
                transport,
                circuit = %now,
                from = %was,
                probes = config.half_open_probes,
                "circuit breaker half-open: probing the broker"
            ),
            (_, CircuitState::Closed) => tracing::info!(
                producer,
                transport,
                circuit = %now,
                from = %was,
                "circuit breaker closed: the broker answers again"
            ),
        }
    }
}

/// Evaluates and publishes the producer's health every `interval`, and at once when kicked;
/// evaluates a last time (closed) and ends when the dispatcher has finished. Holds the pipeline
/// only while evaluating, so it never keeps a dropped producer alive.
pub(crate) async fn run_health(shared: Weak<Shared>, kick: Arc<Notify>, interval: Duration) {
    loop {
        let notified = kick.notified();
        {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.evaluate_health(clock_now(), true);
            if shared.stopped.load(Ordering::Acquire) {
                return;
            }
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// The breaker's state as operators should see it: open past its `open_for` is half-open (the
/// next batch probes), though the breaker itself moves there only when a batch asks.
pub(crate) fn effective_circuit(
    state: CircuitState,
    retry_at: Option<Instant>,
    now: Instant,
) -> CircuitState {
    match state {
        CircuitState::Open if retry_at.is_some_and(|t| t <= now) => CircuitState::HalfOpen,
        other => other,
    }
}
