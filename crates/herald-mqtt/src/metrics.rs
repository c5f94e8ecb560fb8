//! Metrics the MQTT transport adds to herald's. Same rules as `herald_core::metrics`: Prometheus
//! names, low-cardinality labels only: `transport="mqtt"`, and `producer` when the transport is
//! given a name with [`MqttConfig::metrics_name`](crate::MqttConfig::metrics_name) (the same
//! label key, and the name to give is the producer's, as `ProducerBuilder::name`); never a
//! topic, key or client id.

use metrics::{counter, gauge, Counter, Gauge, Label};

/// 1 while a connection to the broker is up, else 0. Gauge.
pub const CONNECTED: &str = "herald_mqtt_connected";
/// Connections opened, the first one included. Counter.
pub const CONNECTIONS_OPENED: &str = "herald_mqtt_connections_opened_total";
/// Failed connection attempts. Counter.
pub const CONNECT_FAILURES: &str = "herald_mqtt_connect_failures_total";
/// Connections lost: closed by the broker or the network (each is replaced by a new one with
/// a clean session on the next send, never resumed). Counter.
pub const CONNECTIONS_LOST: &str = "herald_mqtt_connections_lost_total";
/// Connections herald gave up: the broker acknowledged nothing for the ack timeout while
/// publishes waited (a half-open connection, a hung broker), or a publish was cut off
/// half-way (its batch's deadline passed while the client's queue was full). Counter.
pub const ABANDONED: &str = "herald_mqtt_connections_abandoned_total";
/// Publishes the broker answered with a failure reason code (MQTT 5 PUBACK, PUBREC or
/// PUBCOMP). Counter.
pub const REFUSED: &str = "herald_mqtt_publishes_refused_total";
/// Publishes the broker acknowledged with reason 0x10, "No matching subscribers": accepted
/// (delivered, for herald) with no subscriber to hand them to. Counter.
pub const NO_SUBSCRIBERS: &str = "herald_mqtt_no_subscribers_total";

/// Every metric name above.
pub const ALL: &[&str] = &[
    CONNECTED,
    CONNECTIONS_OPENED,
    CONNECT_FAILURES,
    CONNECTIONS_LOST,
    ABANDONED,
    REFUSED,
    NO_SUBSCRIBERS,
];

/// The handles, registered once per transport.
#[derive(Clone)]
pub(crate) struct MqttMetrics {
    pub(crate) connected: Gauge,
    pub(crate) opened: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) lost: Counter,
    pub(crate) abandoned: Counter,
    pub(crate) refused: Counter,
    pub(crate) no_subscribers: Counter,
}

impl MqttMetrics {
    /// The handles of a transport, labelled `producer` with `name` when it has one.
    pub(crate) fn new(name: Option<&str>) -> Self {
        let mut labels = vec![Label::new("transport", "mqtt")];
        if let Some(name) = name {
            labels.push(Label::new("producer", name.to_owned()));
        }
        let l = || labels.clone();
        Self {
            connected: gauge!(CONNECTED, l()),
            opened: counter!(CONNECTIONS_OPENED, l()),
            connect_failures: counter!(CONNECT_FAILURES, l()),
            lost: counter!(CONNECTIONS_LOST, l()),
            abandoned: counter!(ABANDONED, l()),
            refused: counter!(REFUSED, l()),
            no_subscribers: counter!(NO_SUBSCRIBERS, l()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn names_follow_prometheus_conventions() {
        for name in ALL {
            assert!(name.starts_with("herald_mqtt_"), "{name}");
            assert_eq!(
                name.ends_with("_total"),
                *name != CONNECTED,
                "counters, and only counters, end in _total: {name}"
            );
        }
        let unique: std::collections::BTreeSet<_> = ALL.iter().collect();
        assert_eq!(unique.len(), ALL.len());
    }

    #[test]
    fn two_named_transports_keep_separate_series() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (billing, audit) = metrics::with_local_recorder(&recorder, || {
            (
                MqttMetrics::new(Some("billing")),
                MqttMetrics::new(Some("audit")),
            )
        });
        billing.refused.increment(2);
        audit.refused.increment(5);
        billing.connected.set(1.0);
        audit.connected.set(0.0);
        let snap = snapshotter.snapshot().into_vec();
        let value = |name: &str, producer: &str| {
            let found: Vec<f64> = snap
                .iter()
                .filter(|(k, ..)| {
                    k.key().name() == name
                        && k.key()
                            .labels()
                            .any(|l| l.key() == "producer" && l.value() == producer)
                        && k.key()
                            .labels()
                            .any(|l| l.key() == "transport" && l.value() == "mqtt")
                })
                .map(|(.., v)| match v {
                    DebugValue::Gauge(g) => g.into_inner(),
                    DebugValue::Counter(c) => *c as f64,
                    DebugValue::Histogram(_) => f64::NAN,
                })
                .collect();
            assert_eq!(
                found.len(),
                1,
                "one {name} series for {producer}: {found:?}"
            );
            found[0]
        };
        assert_eq!(value(REFUSED, "billing"), 2.0);
        assert_eq!(value(REFUSED, "audit"), 5.0);
        assert_eq!(value(CONNECTED, "billing"), 1.0);
        assert_eq!(value(CONNECTED, "audit"), 0.0);
        for name in ALL {
            value(name, "billing");
            value(name, "audit");
        }
    }
}
