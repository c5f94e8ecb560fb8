//! Metrics the Kafka transport adds to herald's, from librdkafka's statistics
//! (`statistics.interval.ms`) and its own events. Same rules as `herald_core::metrics`:
//! Prometheus names, low-cardinality labels only: `transport="kafka"`, and `producer` when the
//! transport is given a name with [`KafkaConfig::metrics_name`](crate::KafkaConfig::metrics_name)
//! (the same label key as herald's own metrics; give it the producer's name, as
//! `ProducerBuilder::name`); never a topic or a key.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, gauge, Counter, Gauge, Label};
use rdkafka::statistics::Statistics;

/// Messages waiting in librdkafka's queue or in flight to brokers. Gauge.
pub const QUEUE_MESSAGES: &str = "herald_kafka_queue_messages";
/// Slowest broker's average round-trip time over the last statistics window. Gauge, seconds.
pub const BROKER_RTT: &str = "herald_kafka_broker_rtt_seconds";
/// Produce requests librdkafka sent to a broker again (its `txretries`, summed over brokers).
/// Messages it put back in its queue when a connection went down, to send in a new request, are
/// not counted here (they show in [`QUEUE_MESSAGES`]): a broker outage may read 0. Counter.
pub const CLIENT_RETRIES: &str = "herald_kafka_client_retries_total";
/// Times a send met a full librdkafka queue and waited. Counter.
pub const QUEUE_FULL: &str = "herald_kafka_queue_full_total";
/// Producers rebuilt after a fatal error. Counter.
pub const REBUILDS: &str = "herald_kafka_producer_rebuilds_total";

/// Every metric name above.
pub const ALL: &[&str] = &[
    QUEUE_MESSAGES,
    BROKER_RTT,
    CLIENT_RETRIES,
    QUEUE_FULL,
    REBUILDS,
];

pub(crate) struct KafkaMetrics {
    queue: Gauge,
    rtt: Gauge,
    retries: Counter,
    /// librdkafka's own retry total at the last statistics report: the counter grows by the
    /// difference, so that a rebuilt producer (whose total starts again at 0) and several
    /// transports in one process add up instead of hiding one another.
    retries_seen: AtomicU64,
    pub(crate) queue_full: Counter,
    pub(crate) rebuilds: Counter,
}

impl KafkaMetrics {
    /// The handles of a transport, labelled `producer` with `name` when it has one.
    pub(crate) fn new(name: Option<&str>) -> Self {
        let mut labels = vec![Label::new("transport", "kafka")];
        if let Some(name) = name {
            labels.push(Label::new("producer", name.to_owned()));
        }
        let l = || labels.clone();
        Self {
            queue: gauge!(QUEUE_MESSAGES, l()),
            rtt: gauge!(BROKER_RTT, l()),
            retries: counter!(CLIENT_RETRIES, l()),
            retries_seen: AtomicU64::new(0),
            queue_full: counter!(QUEUE_FULL, l()),
            rebuilds: counter!(REBUILDS, l()),
        }
    }

    pub(crate) fn record(&self, s: &Statistics) {
        self.queue.set(s.msg_cnt as f64);
        let rtt_us = s
            .brokers
            .values()
            .filter_map(|b| b.rtt.as_ref().map(|w| w.avg))
            .max()
            .unwrap_or(0);
        self.rtt.set(rtt_us as f64 / 1e6);
        let total = s.brokers.values().map(|b| b.txretries).sum();
        self.retries.increment(self.retries_since_last(total));
    }

    /// How much librdkafka's retry total grew since the last report; a total below the last
    /// one is a new producer's, counted from 0.
    fn retries_since_last(&self, total: u64) -> u64 {
        let last = self.retries_seen.swap(total, Ordering::Relaxed);
        if total >= last {
            total - last
        } else {
            total
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_retries_add_up_across_a_rebuilt_producer() {
        let m = super::KafkaMetrics::new(None);
        // 5, then 8 (3 more), then a rebuilt producer reports 2 and 3.
        let deltas: Vec<u64> = [5, 8, 2, 3]
            .into_iter()
            .map(|t| m.retries_since_last(t))
            .collect();
        assert_eq!(deltas, vec![5, 3, 2, 1]);
    }
}
