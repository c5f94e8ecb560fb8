//! Metrics the NATS transport adds to herald's. Same rules as `herald_core::metrics`: Prometheus
//! names, low-cardinality labels only: `transport="nats"`, and `producer` when the transport is
//! given a name with [`NatsConfig::metrics_name`](crate::NatsConfig::metrics_name) (the same
//! label key, and the name to give is the producer's, as `ProducerBuilder::name`); never a
//! subject, stream or key.

use metrics::{counter, gauge, Counter, Gauge, Label};

/// 1 while a connection to a server is up, else 0. Gauge.
pub const CONNECTED: &str = "herald_nats_connected";
/// Connections opened, the first one included. Counter.
pub const CONNECTIONS_OPENED: &str = "herald_nats_connections_opened_total";
/// Failed connection attempts (one per server tried). Counter.
pub const CONNECT_FAILURES: &str = "herald_nats_connect_failures_total";
/// Connections lost: closed by the server or the network (each is replaced by a new one on the
/// next send, never resumed). Counter.
pub const CONNECTIONS_LOST: &str = "herald_nats_connections_lost_total";
/// 1 for the server of the list the connection is up on, 0 for the others; label `node`
/// (`host:port`, one series per server given, so bounded by the configuration). Gauge.
pub const NODE_CONNECTED: &str = "herald_nats_node_connected";
/// Connections opened on another server than the one before. Counter.
pub const FAILOVERS: &str = "herald_nats_failovers_total";
/// Connections given up because their PubAcks stopped coming within the ack timeout (a
/// half-open connection, a hung server). Counter.
pub const ABANDONED: &str = "herald_nats_connections_abandoned_total";
/// Messages JetStream acknowledged as duplicates (their `Nats-Msg-Id` was already in the
/// stream's duplicate window): a retry of a message the stream had stored, dropped. Counter.
pub const DUPLICATES: &str = "herald_nats_duplicates_total";
/// Errors the server reported on a connection (`-ERR`: permission violations and others).
/// Counter.
pub const SERVER_ERRORS: &str = "herald_nats_server_errors_total";

/// Every metric name above.
pub const ALL: &[&str] = &[
    CONNECTED,
    CONNECTIONS_OPENED,
    CONNECT_FAILURES,
    CONNECTIONS_LOST,
    NODE_CONNECTED,
    FAILOVERS,
    ABANDONED,
    DUPLICATES,
    SERVER_ERRORS,
];

/// The handles, registered once per transport.
#[derive(Clone)]
pub(crate) struct NatsMetrics {
    pub(crate) connected: Gauge,
    pub(crate) opened: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) lost: Counter,
    pub(crate) failovers: Counter,
    pub(crate) abandoned: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) server_errors: Counter,
    labels: Vec<Label>,
}

impl NatsMetrics {
    /// The handles of a transport, labelled `producer` with `name` when it has one.
    pub(crate) fn new(name: Option<&str>) -> Self {
        let mut labels = vec![Label::new("transport", "nats")];
        if let Some(name) = name {
            labels.push(Label::new("producer", name.to_owned()));
        }
        let l = || labels.clone();
        Self {
            connected: gauge!(CONNECTED, l()),
            opened: counter!(CONNECTIONS_OPENED, l()),
            connect_failures: counter!(CONNECT_FAILURES, l()),
            lost: counter!(CONNECTIONS_LOST, l()),
            failovers: counter!(FAILOVERS, l()),
            abandoned: counter!(ABANDONED, l()),
            duplicates: counter!(DUPLICATES, l()),
            server_errors: counter!(SERVER_ERRORS, l()),
            labels,
        }
    }

    /// The `herald_nats_node_connected` series of one server.
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
            assert!(name.starts_with("herald_nats_"), "{name}");
        }
        let gauges = [CONNECTED, NODE_CONNECTED];
        for name in ALL {
            assert_eq!(
                name.ends_with("_total"),
                !gauges.contains(name),
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
            let both = (
                NatsMetrics::new(Some("billing")),
                NatsMetrics::new(Some("audit")),
            );
            both.0.node("nats-1:4222").set(1.0);
            both.1.node("nats-1:4222").set(0.0);
            both
        });
        billing.duplicates.increment(2);
        audit.duplicates.increment(5);
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
                            .any(|l| l.key() == "transport" && l.value() == "nats")
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
        assert_eq!(value(DUPLICATES, "billing"), 2.0);
        assert_eq!(value(DUPLICATES, "audit"), 5.0);
        assert_eq!(value(CONNECTED, "billing"), 1.0);
        assert_eq!(value(CONNECTED, "audit"), 0.0);
        assert_eq!(value(NODE_CONNECTED, "billing"), 1.0);
        for name in ALL {
            value(name, "billing");
            value(name, "audit");
        }
    }
}
