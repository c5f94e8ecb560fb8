//! Every metric herald-core emits, by name. Dashboards and alert rules depend on these names:
//! change them only with a migration note.
//!
//! Emitted through the [`metrics`] facade: with no recorder installed each update is a call into
//! a no-op, and the handles below are registered once per producer, not per message. Labels are
//! low-cardinality only: `transport` (the transport's name), `producer` (the producer's name,
//! only when one is given with `ProducerBuilder::name`), and for failures `class` and `reason`.
//! Never a key, a payload or a destination.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label};

use crate::error::FailureReason;

/// Messages accepted into the producer's buffer (with a store, once the store has them
/// durably). Counter.
pub const MESSAGES_ACCEPTED: &str = "herald_messages_accepted_total";
/// Messages the broker acknowledged. Counter. A message is counted before its caller is told,
/// so a caller that waited for it sees it counted; one answered early, before its batch landed
/// (Kafka's per-message acknowledgements), is counted when the batch lands.
pub const MESSAGES_DELIVERED: &str = "herald_messages_delivered_total";
/// Messages handed back to the caller, by `class` (transient/permanent) and `reason`
/// (rejected, retries_exhausted, delivery_timeout, too_large, buffer_full, closed, cancelled,
/// panicked, store_full, store_failed). Counter. `too_large`, `buffer_full`, `closed`,
/// `cancelled` and the `store_` ones can happen before acceptance; the others after.
pub const MESSAGES_FAILED: &str = "herald_messages_failed_total";
/// Failed messages (counted in `herald_messages_failed_total` too) of which the broker had
/// acknowledged a copy that the per-key hold sent again behind an earlier message of their
/// key: stored, possibly ahead of that message (see `SendError::stored_copy`). Counter.
pub const MESSAGES_FAILED_STORED_COPY: &str = "herald_messages_failed_stored_copy_total";
/// Failed messages whose caller had stopped listening (handed to the unclaimed hook or kept
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
/// The buffer's limit in messages (`ProducerBuilder::buffer`), set once: with
/// `herald_buffer_messages`, how full the buffer is. Gauge.
pub const BUFFER_MAX_MESSAGES: &str = "herald_buffer_max_messages";
/// The buffer's limit in bytes, set once. Gauge.
pub const BUFFER_MAX_BYTES: &str = "herald_buffer_max_bytes";
/// Batches being sent by the transport now. Gauge.
pub const INFLIGHT_BATCHES: &str = "herald_inflight_batches";
/// Circuit breaker state: 0 closed, 1 half-open, 2 open. Gauge.
pub const CIRCUIT_STATE: &str = "herald_circuit_state";
/// The producer's health: 0 healthy, 1 degraded, 2 unhealthy (see [`crate::Health`]). Gauge.
pub const HEALTH_STATUS: &str = "herald_health_status";
/// 1 while the transport reports a usable broker connection, 0 while it reports none. Gauge.
pub const TRANSPORT_UP: &str = "herald_transport_up";
/// Panics in user code the producer runs (a retry or batch policy, the unclaimed hook), by
/// `site` (`retry_policy`, `batch_policy`, `unclaimed_hook`, `transport`: a transport's
/// `delivered_but_held`, `store`: a store's durability future or `settle`), each contained.
/// Counter.
pub const USER_CODE_PANICS: &str = "herald_user_code_panics_total";
/// Batches handed to each route of a [`Fallback`](crate::Fallback), a call cut off at its
/// deadline included; label `route` (the names given
/// to the fallback's routes). Counter.
pub const FALLBACK_BATCHES: &str = "herald_fallback_batches_total";

/// The rule for a `producer` label value, one for every crate that takes one
/// (`ProducerBuilder::name`, the adapters' `metrics_name`): 1 to 64 ASCII letters, digits, `_`,
/// `-` or `.`. `Err` says what is wrong without echoing the value (it may be anything pasted
/// by mistake: a URL with its password, say).
pub fn check_producer_label(name: &str) -> Result<(), String> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    const RULE: &str =
        "use 1 to 64 ASCII letters, digits, `_`, `-` or `.` (it becomes a metric label)";
    if name.is_empty() {
        return Err(format!("is empty: {RULE}"));
    }
    if name.len() > 64 {
        return Err(format!("is {} bytes long: {RULE}", name.len()));
    }
    match name.char_indices().find(|(_, c)| !fine(*c)) {
        Some((at, c)) if c.is_ascii_graphic() => Err(format!("holds `{c}` (at byte {at}): {RULE}")),
        Some((at, _)) => Err(format!(
            "holds a space, a control or a non-ASCII character (at byte {at}): {RULE}"
        )),
        None => Ok(()),
    }
}

/// Every metric name above, for catalogues and drift checks.
pub const ALL: &[&str] = &[
    MESSAGES_ACCEPTED,
    MESSAGES_DELIVERED,
    MESSAGES_FAILED,
    MESSAGES_FAILED_STORED_COPY,
    USER_CODE_PANICS,
    MESSAGES_UNCLAIMED,
    RETRIES,
    RETRY_BUDGET_DENIED,
    BATCHES,
    BATCH_MESSAGES,
    BATCH_BYTES,
    SEND_LATENCY,
    BUFFER_MESSAGES,
    BUFFER_BYTES,
    BUFFER_MAX_MESSAGES,
    BUFFER_MAX_BYTES,
    INFLIGHT_BATCHES,
    CIRCUIT_STATE,
    HEALTH_STATUS,
    TRANSPORT_UP,
    FALLBACK_BATCHES,
];

/// Handles registered once per producer.
pub(crate) struct Metrics {
    /// `transport`, and `producer` when the producer has a name.
    labels: Vec<Label>,
    pub(crate) accepted: Counter,
    pub(crate) delivered: Counter,
    pub(crate) failed_stored_copy: Counter,
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
    pub(crate) health: Gauge,
    pub(crate) transport_up: Gauge,
}

impl Metrics {
    /// Registers the producer's handles. The failure series are registered at zero, so that
    /// `rate()` and `increase()` see a producer's first failure (a counter that appears with
    /// its first increment has no earlier sample to compare with).
    pub(crate) fn new(
        transport: &'static str,
        producer: Option<&str>,
        max_messages: usize,
        max_bytes: usize,
    ) -> Self {
        let mut labels = vec![Label::new("transport", transport)];
        if let Some(name) = producer {
            labels.push(Label::new("producer", name.to_owned()));
        }
        let l = || labels.clone();
        for (class, reason) in [
            ("permanent", "rejected"),
            ("transient", "rejected"),
            ("transient", "retries_exhausted"),
            ("transient", "delivery_timeout"),
            ("permanent", "too_large"),
            ("transient", "buffer_full"),
            ("transient", "closed"),
            ("transient", "cancelled"),
            ("permanent", "panicked"),
            ("transient", "store_full"),
            ("transient", "store_failed"),
        ] {
            let mut with = l();
            with.push(Label::new("class", class));
            with.push(Label::new("reason", reason));
            counter!(MESSAGES_FAILED, with).increment(0);
        }
        gauge!(BUFFER_MAX_MESSAGES, l()).set(max_messages as f64);
        gauge!(BUFFER_MAX_BYTES, l()).set(max_bytes as f64);
        let failed_stored_copy = counter!(MESSAGES_FAILED_STORED_COPY, l());
        failed_stored_copy.increment(0);
        Self {
            accepted: counter!(MESSAGES_ACCEPTED, l()),
            delivered: counter!(MESSAGES_DELIVERED, l()),
            failed_stored_copy,
            retries: counter!(RETRIES, l()),
            budget_denied: counter!(RETRY_BUDGET_DENIED, l()),
            unclaimed: counter!(MESSAGES_UNCLAIMED, l()),
            batches: counter!(BATCHES, l()),
            batch_messages: histogram!(BATCH_MESSAGES, l()),
            batch_bytes: histogram!(BATCH_BYTES, l()),
            latency: histogram!(SEND_LATENCY, l()),
            buffer_messages: gauge!(BUFFER_MESSAGES, l()),
            buffer_bytes: gauge!(BUFFER_BYTES, l()),
            inflight: gauge!(INFLIGHT_BATCHES, l()),
            circuit: gauge!(CIRCUIT_STATE, l()),
            health: gauge!(HEALTH_STATUS, l()),
            transport_up: gauge!(TRANSPORT_UP, l()),
            labels,
        }
    }

    /// The counter of panics in user code contained at `site`.
    pub(crate) fn panic_counter(&self, site: &'static str) -> Counter {
        let mut labels = self.labels.clone();
        labels.push(Label::new("site", site));
        counter!(USER_CODE_PANICS, labels)
    }

    /// Failures are rare, so their handle is looked up when one happens.
    pub(crate) fn failed(&self, reason: &FailureReason, n: u64) {
        let mut labels = self.labels.clone();
        labels.push(Label::new("class", reason.class().as_str()));
        labels.push(Label::new("reason", reason.label()));
        counter!(MESSAGES_FAILED, labels).increment(n);
    }
}

#[cfg(test)]
mod tests {
    use super::check_producer_label;

    /// A refused name is not echoed: it may be a URL pasted in by mistake, password and all.
    #[test]
    fn a_refused_label_says_why_without_echoing_it() {
        assert!(check_producer_label("billing-eu.1").is_ok());
        for (name, why) in [
            ("amqp://app:hunter2@rabbit", "holds `:` (at byte 4)"),
            ("", "is empty"),
            ("hunter2 x", "holds a space"),
        ] {
            let e = check_producer_label(name).expect_err(name);
            assert!(e.starts_with(why), "{e}");
            assert!(name.is_empty() || !e.contains("hunter2"), "{e}");
        }
        let long = "hunter2".repeat(10);
        let e = check_producer_label(&long).expect_err("too long");
        assert!(
            e.starts_with("is 70 bytes long") && !e.contains("hunter2"),
            "{e}"
        );
    }
}
