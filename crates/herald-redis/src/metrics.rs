//! Metrics the Redis transport adds to herald's. Same rules as `herald_core::metrics`:
//! Prometheus names, low-cardinality labels only: `transport="redis"`, and `producer` when the
//! transport is given a name with [`RedisConfig::metrics_name`](crate::RedisConfig::metrics_name)
//! (the same label key, and the name to give is the producer's, as `ProducerBuilder::name`);
//! never a stream key, message key or server address with credentials.

use metrics::{counter, gauge, Counter, Gauge, Label};

/// 1 while a connection to the server is up, else 0. Gauge.
pub const CONNECTED: &str = "herald_redis_connected";
/// Connections opened, the first one included. Counter.
pub const CONNECTIONS_OPENED: &str = "herald_redis_connections_opened_total";
/// Failed connection attempts. Counter.
pub const CONNECT_FAILURES: &str = "herald_redis_connect_failures_total";
/// Connections lost: a batch's pipeline failed on a closed or broken connection (each is
/// replaced by a new one on the next send, never resumed). Counter.
pub const CONNECTIONS_LOST: &str = "herald_redis_connections_lost_total";
/// Connections given up because a batch's replies did not come within the ack timeout (a
/// half-open connection, a hung server), or because the server refused a write as a replica
/// (`READONLY`, `MASTERDOWN`: after a failover). Counter.
pub const ABANDONED: &str = "herald_redis_connections_abandoned_total";
/// Error replies the server gave to XADDs (`-OOM`, `-WRONGTYPE`, `-NOPERM`, ...), one per
/// message refused. Counter.
pub const SERVER_ERRORS: &str = "herald_redis_server_errors_total";
/// Batches whose `WAIT` (`?wait=N`) came back with fewer replicas than asked for within its
/// timeout: their messages were failed as transient and retried. Counter.
pub const WAIT_SHORT: &str = "herald_redis_wait_short_total";

/// Every metric name above.
pub const ALL: &[&str] = &[
    CONNECTED,
    CONNECTIONS_OPENED,
    CONNECT_FAILURES,
    CONNECTIONS_LOST,
    ABANDONED,
    SERVER_ERRORS,
    WAIT_SHORT,
];

/// The handles, registered once per transport.
#[derive(Clone)]
pub(crate) struct RedisMetrics {
    pub(crate) connected: Gauge,
    pub(crate) opened: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) lost: Counter,
    pub(crate) abandoned: Counter,
    pub(crate) server_errors: Counter,
    pub(crate) wait_short: Counter,
}

impl RedisMetrics {
    /// The handles of a transport, labelled `producer` with `name` when it has one.
    pub(crate) fn new(name: Option<&str>) -> Self {
        let mut labels = vec![Label::new("transport", "redis")];
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
            server_errors: counter!(SERVER_ERRORS, l()),
            wait_short: counter!(WAIT_SHORT, l()),
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
            assert!(name.starts_with("herald_redis_"), "{name}");
        }
        let gauges = [CONNECTED];
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
            (
                RedisMetrics::new(Some("billing")),
                RedisMetrics::new(Some("audit")),
            )
        });
        billing.server_errors.increment(2);
        audit.server_errors.increment(5);
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
                            .any(|l| l.key() == "transport" && l.value() == "redis")
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
        assert_eq!(value(SERVER_ERRORS, "billing"), 2.0);
        assert_eq!(value(SERVER_ERRORS, "audit"), 5.0);
        assert_eq!(value(CONNECTED, "billing"), 1.0);
        assert_eq!(value(CONNECTED, "audit"), 0.0);
        for name in ALL {
            value(name, "billing");
            value(name, "audit");
        }
    }
}
