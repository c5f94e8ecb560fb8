//! Every metric herald-core emits, by name. Dashboards and alert rules depend on these names:
//! change them only with a migration note.
//!
//! Emitted through the [`metrics`] facade: with no recorder installed each update is a call into
//! a no-op, and the handles below are registered once per producer, not per message. Labels are
//! low-cardinality only: `transport` (the transport's name), and for failures `class` and
//! `reason`. Never a key, a payload or a destination.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::error::FailureReason;

/// Messages accepted into the producer's buffer. Counter.
pub const MESSAGES_ACCEPTED: &str = "herald_messages_accepted_total";
/// Messages the broker acknowledged. Counter.
pub const MESSAGES_DELIVERED: &str = "herald_messages_delivered_total";
/// Messages handed back to the caller, by `class` (transient/permanent) and `reason`
/// (rejected, retries_exhausted, delivery_timeout, too_large, buffer_full, closed). Counter.
/// `too_large`, `buffer_full` and `closed` can happen before acceptance; the others after.
pub const MESSAGES_FAILED: &str = "herald_messages_failed_total";
/// Failed messages whose caller had stopped listening (handed to the dead-letter hook or kept
/// for `close`). Counter.
pub const MESSAGES_UNCLAIMED: &str = "herald_messages_unclaimed_total";
/// Message retries scheduled (one per message per retry). Counter.
pub const RETRIES: &str = "herald_retries_total";
/// Retry groups (the retried messages of one batch) the retry budget held back, each counted
/// once. Counter.
pub const RETRY_BUDGET_DENIED: &str = "herald_retry_budget_denied_total";
/// Batches handed to the transport. Counter.
pub const BATCHES: &str = "herald_batches_total";
/// Messages per batch. Histogram.
pub const BATCH_MESSAGES: &str = "herald_batch_messages";
/// Bytes per batch. Histogram.
pub const BATCH_BYTES: &str = "herald_batch_bytes";
/// From acceptance to acknowledgement, per delivered message. Histogram, seconds.
pub const SEND_LATENCY: &str = "herald_send_latency_seconds";
/// Messages accepted and not yet ended (queued, waiting to retry or in flight). Gauge.
pub const BUFFER_MESSAGES: &str = "herald_buffer_messages";
/// Bytes of those messages. Gauge.
pub const BUFFER_BYTES: &str = "herald_buffer_bytes";
/// Batches being sent by the transport now. Gauge.
pub const INFLIGHT_BATCHES: &str = "herald_inflight_batches";
/// Circuit breaker state: 0 closed, 1 half-open, 2 open. Gauge.
pub const CIRCUIT_STATE: &str = "herald_circuit_state";

/// Every metric name above, for catalogues and drift checks.
pub const ALL: &[&str] = &[
    MESSAGES_ACCEPTED,
    MESSAGES_DELIVERED,
    MESSAGES_FAILED,
    MESSAGES_UNCLAIMED,
    RETRIES,
    RETRY_BUDGET_DENIED,
    BATCHES,
    BATCH_MESSAGES,
    BATCH_BYTES,
    SEND_LATENCY,
    BUFFER_MESSAGES,
    BUFFER_BYTES,
    INFLIGHT_BATCHES,
    CIRCUIT_STATE,
];

/// Handles registered once per producer.
pub(crate) struct Metrics {
    transport: &'static str,
    pub(crate) accepted: Counter,
    pub(crate) delivered: Counter,
    pub(crate) retries: Counter,
    pub(crate) budget_denied: Counter,
    pub(crate) unclaimed: Counter,
    pub(crate) batches: Counter,
    pub(crate) batch_messages: Histogram,
    pub(crate) batch_bytes: Histogram,
    pub(crate) latency: Histogram,
    pub(crate) buffer_messages: Gauge,
    pub(crate) buffer_bytes: Gauge,
    pub(crate) inflight: Gauge,
    pub(crate) circuit: Gauge,
}

impl Metrics {
    pub(crate) fn new(transport: &'static str) -> Self {
        let l = [("transport", transport)];
        Self {
            transport,
            accepted: counter!(MESSAGES_ACCEPTED, &l),
            delivered: counter!(MESSAGES_DELIVERED, &l),
            retries: counter!(RETRIES, &l),
            budget_denied: counter!(RETRY_BUDGET_DENIED, &l),
            unclaimed: counter!(MESSAGES_UNCLAIMED, &l),
            batches: counter!(BATCHES, &l),
            batch_messages: histogram!(BATCH_MESSAGES, &l),
            batch_bytes: histogram!(BATCH_BYTES, &l),
            latency: histogram!(SEND_LATENCY, &l),
            buffer_messages: gauge!(BUFFER_MESSAGES, &l),
            buffer_bytes: gauge!(BUFFER_BYTES, &l),
            inflight: gauge!(INFLIGHT_BATCHES, &l),
            circuit: gauge!(CIRCUIT_STATE, &l),
        }
    }

    /// Failures are rare, so their handle is looked up when one happens.
    pub(crate) fn failed(&self, reason: &FailureReason, n: u64) {
        counter!(
            MESSAGES_FAILED,
            "transport" => self.transport,
            "class" => reason.class().as_str(),
            "reason" => reason.label()
        )
        .increment(n);
    }
}
