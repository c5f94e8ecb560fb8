//! Metrics the AMQP transport adds to herald's. Same rules as `herald_core::metrics`: Prometheus
//! names, low-cardinality labels only: `transport="amqp"`, and `producer` when the transport
//! is given a name with [`AmqpConfig::metrics_name`](crate::AmqpConfig::metrics_name) (the
//! same label key, and the name to give is the producer's, as `ProducerBuilder::name`); never a
//! queue, exchange or key.

use metrics::{counter, gauge, Counter, Gauge, Label};

/// 1 while the broker blocks the connection (`connection.blocked`: a memory or disk alarm),
/// else 0. Gauge.
pub const CONNECTION_BLOCKED: &str = "herald_amqp_connection_blocked";
/// 1 while a connection to the broker is up, else 0. Gauge.
pub const CONNECTED: &str = "herald_amqp_connected";
/// Connections opened, the first one included. Counter.
pub const CONNECTIONS_OPENED: &str = "herald_amqp_connections_opened_total";
/// Failed connection attempts. Counter.
pub const CONNECT_FAILURES: &str = "herald_amqp_connect_failures_total";
/// Times the broker sent `connection.blocked`. Counter.
pub const BLOCKED_EVENTS: &str = "herald_amqp_blocked_total";
/// Messages the broker returned as unroutable (`basic.return`). Counter.
pub const RETURNED: &str = "herald_amqp_returned_total";
/// Messages the broker nacked (`basic.nack`). Counter.
pub const NACKED: &str = "herald_amqp_nacked_total";
/// 1 for the address of the list the connection is up on, 0 for the others; label `node`
/// (`host:port`, one series per address given, so bounded by the configuration). Gauge.
pub const NODE_CONNECTED: &str = "herald_amqp_node_connected";
/// Connections opened on another address than the one before (a node lost, the next one
/// taken). Counter.
pub const FAILOVERS: &str = "herald_amqp_failovers_total";
/// Connections given up because their confirms stopped coming within the confirm timeout (a
/// half-open connection, a hung node). Counter.
pub const ABANDONED: &str = "herald_amqp_connections_abandoned_total";
/// Channels given up after the broker nacked a publish on them (a streamed one, or the first
/// publish to a route, which then goes out again on a new channel after a pause), so that the
/// retry goes out on a new channel. Counter.
pub const CHANNELS_RETIRED: &str = "herald_amqp_channels_retired_total";

/// Every metric name above.
pub const ALL: &[&str] = &[
    CONNECTION_BLOCKED,
    CONNECTED,
    CONNECTIONS_OPENED,
    CONNECT_FAILURES,
    BLOCKED_EVENTS,
    RETURNED,
    NACKED,
    NODE_CONNECTED,
    FAILOVERS,
    ABANDONED,
    CHANNELS_RETIRED,
];

/// The handles, registered once per transport.
#[derive(Clone)]
pub(crate) struct AmqpMetrics {
    pub(crate) blocked: Gauge,
    pub(crate) connected: Gauge,
    pub(crate) opened: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) blocked_events: Counter,
    pub(crate) returned: Counter,
    pub(crate) nacked: Counter,
    pub(crate) failovers: Counter,
    pub(crate) abandoned: Counter,
    pub(crate) channels_retired: Counter,
    labels: Vec<Label>,
}

impl AmqpMetrics {
    /// The handles of a transport, labelled `producer` with `name` when it has one.
    pub(crate) fn new(name: Option<&str>) -> Self {
        let mut labels = vec![Label::new("transport", "amqp")];
        if let Some(name) = name {
            labels.push(Label::new("producer", name.to_owned()));
        }
        let l = || labels.clone();
        Self {
            blocked: gauge!(CONNECTION_BLOCKED, l()),
            connected: gauge!(CONNECTED, l()),
            opened: counter!(CONNECTIONS_OPENED, l()),
            connect_failures: counter!(CONNECT_FAILURES, l()),
            blocked_events: counter!(BLOCKED_EVENTS, l()),
            returned: counter!(RETURNED, l()),
            nacked: counter!(NACKED, l()),
            failovers: counter!(FAILOVERS, l()),
            abandoned: counter!(ABANDONED, l()),
            channels_retired: counter!(CHANNELS_RETIRED, l()),
            labels,
        }
    }

    /// The `herald_amqp_node_connected` series of one address.
    pub(crate) fn node(&self, address: &str) -> Gauge {
        let mut labels = self.labels.clone();
        labels.push(Label::new("node", address.to_owned()));
        gauge!(NODE_CONNECTED, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn names_follow_prometheus_conventions() {
        for name in ALL {
            assert!(name.starts_with("herald_amqp_"), "{name}");
        }
        for counter in [
            CONNECTIONS_OPENED,
            CONNECT_FAILURES,
            BLOCKED_EVENTS,
            RETURNED,
            NACKED,
            FAILOVERS,
            ABANDONED,
            CHANNELS_RETIRED,
        ] {
            assert!(counter.ends_with("_total"), "{counter}");
        }
    }

    #[test]
    fn handles_reach_the_recorder() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let m = metrics::with_local_recorder(&recorder, || AmqpMetrics::new(None));
        m.blocked.set(1.0);
        m.returned.increment(2);
        let snap = snapshotter.snapshot().into_vec();
        let value = |name: &str| {
            snap.iter()
                .find(|(k, ..)| k.key().name() == name)
                .map(|(k, _, _, v)| {
                    assert!(k
                        .key()
                        .labels()
                        .any(|l| l.key() == "transport" && l.value() == "amqp"));
                    match v {
                        DebugValue::Gauge(g) => g.into_inner(),
                        DebugValue::Counter(c) => *c as f64,
                        DebugValue::Histogram(_) => f64::NAN,
                    }
                })
        };
        assert_eq!(value(CONNECTION_BLOCKED), Some(1.0));
        assert_eq!(value(RETURNED), Some(2.0));
    }

    #[test]
    fn two_named_transports_keep_separate_series() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (billing, audit) = metrics::with_local_recorder(&recorder, || {
            let both = (
                AmqpMetrics::new(Some("billing")),
                AmqpMetrics::new(Some("audit")),
            );
            // The node series appear when a connection opens on an address.
            both.0.node("rabbit-1:5672").set(1.0);
            both.1.node("rabbit-1:5672").set(0.0);
            both
        });
        billing.returned.increment(2);
        audit.returned.increment(5);
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
                            .any(|l| l.key() == "transport" && l.value() == "amqp")
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
        assert_eq!(value(RETURNED, "billing"), 2.0);
        assert_eq!(value(RETURNED, "audit"), 5.0);
        assert_eq!(value(CONNECTED, "billing"), 1.0);
        assert_eq!(value(CONNECTED, "audit"), 0.0);
        assert_eq!(value(NODE_CONNECTED, "billing"), 1.0);
        assert_eq!(value(NODE_CONNECTED, "audit"), 0.0);
        // Every metric of each: all carry the label, none is shared.
        for name in ALL {
            value(name, "billing");
            value(name, "audit");
        }
    }
}
