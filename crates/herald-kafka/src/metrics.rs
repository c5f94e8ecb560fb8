//! Metrics the Kafka transport adds to herald's, from librdkafka's statistics
//! (`statistics.interval.ms`) and its own events. Same rules as `herald_core::metrics`:
//! Prometheus names, low-cardinality labels only: `transport="kafka"`, and `producer` when the
//! transport is given a name with [`KafkaConfig::metrics_name`](crate::KafkaConfig::metrics_name)
//! (the same label key as herald's own metrics; give it the producer's name, as
//! `ProducerBuilder::name`); never a topic or a key.

use std::collections::HashMap;

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
    }

    /// Counts the retries of one producer's statistics; `seen` is that producer's own (see
    /// [`retries_since`]).
    pub(crate) fn record_retries(&self, s: &Statistics, seen: &mut HashMap<String, u64>) {
        let brokers = s
            .brokers
            .iter()
            .map(|(name, b)| (name.as_str(), b.txretries));
        self.retries.increment(retries_since(seen, brokers));
    }
}

/// How many retries librdkafka made since its last statistics: per broker, what its count grew
/// by since `seen` (that producer's last counts, by broker). Kept per producer and per broker:
/// a broker missing from one report, or an old producer still reporting beside a rebuilt one,
/// is not counted again.
fn retries_since<'a>(
    seen: &mut HashMap<String, u64>,
    brokers: impl Iterator<Item = (&'a str, u64)>,
) -> u64 {
    let mut grew = 0;
    for (name, count) in brokers {
        let last = seen.insert(name.to_owned(), count).unwrap_or(0);
        grew += count.saturating_sub(last);
    }
    grew
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    /// Before, one total for every producer and broker: a broker missing from one report, or
    /// an old producer reporting beside its replacement, had its retries counted again.
    #[test]
    fn client_retries_count_each_producer_and_broker_once() {
        let (mut old, mut new) = (HashMap::new(), HashMap::new());
        let since = |seen: &mut HashMap<String, u64>, brokers: &[(&str, u64)]| {
            super::retries_since(seen, brokers.iter().copied())
        };
        assert_eq!(since(&mut old, &[("a", 100), ("b", 50)]), 150);
        // b left this report: nothing new.
        assert_eq!(since(&mut old, &[("a", 100)]), 0);
        // b is back with 5 more, a has 10 more.
        assert_eq!(since(&mut old, &[("a", 110), ("b", 55)]), 15);
        // A rebuilt producer counts from 0, its predecessor still reporting beside it.
        assert_eq!(since(&mut new, &[("a", 2)]), 2);
        assert_eq!(since(&mut old, &[("a", 110), ("b", 55)]), 0);
        assert_eq!(since(&mut new, &[("a", 3)]), 1);
    }
}
