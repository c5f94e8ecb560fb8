//! herald-telemetry: Prometheus metrics and health for herald producers.
//!
//! herald's crates emit their metrics through the [`metrics`] facade (the catalogue:
//! `docs/operations/metrics.md`). This crate installs a Prometheus recorder for them, with
//! histogram buckets chosen for herald's histograms, and serves (HTTP/1.1, `GET` and `HEAD`):
//!
//! - `GET /metrics`: the Prometheus text exposition format.
//! - `GET /health`: a JSON body with each watched producer's health (healthy / degraded /
//!   unhealthy, and why) and an HTTP status load balancers understand: 200 while every producer
//!   is healthy or degraded, 503 when one is unhealthy.
//! - `GET /health/ready`: the readiness probe. The same body and status as `/health`: 503 while
//!   a producer cannot deliver now (broker connection down, circuit open, closed).
//! - `GET /health/live`: the liveness probe. 200 while every watched producer's pipeline runs,
//!   a broker outage included; 503 only when a producer is closing or closed, or every watched
//!   producer has gone ([`HealthReport::is_live`]). Restarting a process because its broker is
//!   down would throw away what it buffered and not bring the broker back.
//!
//! `docs/operations/README.md` (section "Probes") says which Kubernetes probe to wire to which
//! endpoint.
//!
//! Install the recorder **before building the producer**: a producer registers its pipeline's
//! metrics once, when it is built, with the recorder in force then; one built earlier records
//! them nowhere, for good ([`Telemetry::watch`] warns of it, [`Telemetry::records`] tells).
//!
//! ```no_run
//! use herald_core::{Producer, Transport};
//! # async fn run(transport: impl Transport) -> Result<(), Box<dyn std::error::Error>> {
//! // Installs the process-wide recorder and serves /metrics, /health, /health/live and
//! // /health/ready on 127.0.0.1:9464.
//! let (telemetry, server) = herald_telemetry::prometheus("127.0.0.1:9464").await?;
//! // Then the producer.
//! let producer = Producer::builder(transport).build()?;
//! telemetry.watch("orders", &producer);
//! println!("scrape http://{}/metrics", server.local_addr());
//! # Ok(())
//! # }
//! ```
//!
//! Users who already run an HTTP server install the recorder without one and render on demand:
//!
//! ```no_run
//! # fn run() -> Result<(), herald_telemetry::TelemetryError> {
//! let telemetry = herald_telemetry::Prometheus::new().install()?;
//! let body: String = telemetry.render(); // serve this at your own /metrics
//! let health = telemetry.health();       // and this (health.to_json(), health.http_status(),
//!                                        // health.is_live(), health.is_ready())
//! # Ok(())
//! # }
//! ```

mod histogram;
mod http;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use herald_core::{metrics as core_metrics, Health, HealthIssue, HealthStatus, Producer};
use metrics_exporter_prometheus::formatting::sanitize_metric_name;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use histogram::Fixed;

pub use histogram::Recorder;
pub use http::Server;

/// The labels of a sample line of the text format, after its `{`: `key="value"` pairs up to the
/// closing `}`, values unescaped (`\\`, `\"`, `\n`). `None` if the line is not of that form.
fn label_pairs(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = text;
    loop {
        if rest.starts_with('}') {
            return Some(pairs);
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        pairs.push((key.to_owned(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Buckets of `herald_send_latency_seconds`: from half a millisecond to past the default
/// delivery timeout (120 s), so that p50 on a healthy broker and p99 during an outage both
/// fall inside. A message can be delivered after its delivery timeout by up to its transport's
/// settle time (herald-kafka's default is librdkafka's request timeout plus a second, 31 s),
/// hence the 180 s bucket.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 180.0,
];
/// Buckets of `herald_batch_messages`.
pub const BATCH_MESSAGES_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0, 20000.0, 50000.0,
];
/// Buckets of `herald_batch_bytes`: 1 KiB to 16 MiB by fours.
pub const BATCH_BYTES_BUCKETS: &[f64] = &[
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// What went wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The listen address is not `HOST:PORT` with an IP host.
    #[error("invalid telemetry listen address `{input}`: {reason} (expected IP:PORT, for example 127.0.0.1:9464)")]
    InvalidAddress {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The listen address could not be bound (taken, or not an address of this machine).
    #[error("cannot listen for telemetry on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason ("Address already in use").
        #[source]
        source: std::io::Error,
    },
    /// A metrics recorder is already installed in this process.
    #[error("a metrics recorder is already installed in this process (the `metrics` crate allows one): install herald's once, or use Prometheus::build and compose it with yours")]
    AlreadyInstalled,
    /// Bucket bounds that cannot make a histogram.
    #[error("invalid histogram buckets for `{metric}`: {reason}")]
    InvalidBuckets {
        /// The metric.
        metric: String,
        /// What is wrong.
        reason: String,
    },
}

/// Builds herald's Prometheus recorder.
#[derive(Debug, Clone)]
pub struct Prometheus {
    buckets: Vec<(String, Vec<f64>)>,
    labels: Vec<(String, String)>,
    upkeep: Duration,
}

impl Default for Prometheus {
    fn default() -> Self {
        Self::new()
    }
}

impl Prometheus {
    /// herald's buckets ([`LATENCY_BUCKETS`] for `herald_send_latency_seconds` and any other
    /// histogram, [`BATCH_MESSAGES_BUCKETS`], [`BATCH_BYTES_BUCKETS`]); histograms, not
    /// summaries, so that quantiles aggregate across instances.
    pub fn new() -> Self {
        Self {
            buckets: vec![
                (
                    core_metrics::SEND_LATENCY.to_owned(),
                    LATENCY_BUCKETS.to_vec(),
                ),
                (
                    core_metrics::BATCH_MESSAGES.to_owned(),
                    BATCH_MESSAGES_BUCKETS.to_vec(),
                ),
                (
                    core_metrics::BATCH_BYTES.to_owned(),
                    BATCH_BYTES_BUCKETS.to_vec(),
                ),
            ],
            labels: Vec::new(),
            upkeep: Duration::from_secs(5),
        }
    }

    /// Other bucket bounds for one histogram (by its full name, matched as Prometheus spells it:
    /// `my.hist` and `my_hist` are one histogram). Bounds must be finite and strictly
    /// increasing. A histogram with set bounds is counted into its buckets as each value is
    /// recorded, by herald-telemetry; other histograms are left to metrics-exporter-prometheus,
    /// with [`LATENCY_BUCKETS`].
    pub fn buckets(mut self, metric: &str, bounds: &[f64]) -> Result<Self, TelemetryError> {
        let invalid = |reason: &str| TelemetryError::InvalidBuckets {
            metric: metric.to_owned(),
            reason: reason.to_owned(),
        };
        if bounds.is_empty() {
            return Err(invalid("no bounds"));
        }
        if bounds.iter().any(|b| !b.is_finite()) {
            return Err(invalid("bounds must be finite (+Inf is always added)"));
        }
        if bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid("bounds must be strictly increasing"));
        }
        let spelled = sanitize_metric_name(metric);
        self.buckets
            .retain(|(m, _)| sanitize_metric_name(m) != spelled);
        self.buckets.push((metric.to_owned(), bounds.to_vec()));
        Ok(self)
    }

    /// A label added to every metric (`instance_role="billing"`, say). Keep it low-cardinality
    /// and free of secrets.
    pub fn global_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    fn builder(&self) -> Result<PrometheusBuilder, TelemetryError> {
        let mut b = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .map_err(|e| TelemetryError::InvalidBuckets {
                metric: "(default)".into(),
                reason: e.to_string(),
            })?;
        // The histograms with set bounds never reach the exporter (see `histogram.rs`).
        for (k, v) in &self.labels {
            b = b.add_global_label(k, v);
        }
        Ok(b)
    }

    /// Builds the recorder without installing it, for users who compose recorders or install
    /// one per test (`metrics::with_local_recorder`). The returned [`Telemetry`] renders what
    /// that recorder records.
    pub fn build(self) -> Result<(Recorder, Telemetry), TelemetryError> {
        let upkeep = self.upkeep;
        let (recorder, handle, own) = self.parts()?;
        Ok((recorder, Telemetry::new(handle, own, upkeep, false)))
    }

    /// Builds the recorder and installs it as the process-wide `metrics` recorder. Fails with
    /// [`TelemetryError::AlreadyInstalled`] if this process has one already.
    pub fn install(self) -> Result<Telemetry, TelemetryError> {
        let upkeep = self.upkeep;
        let (recorder, handle, own) = self.parts()?;
        metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::AlreadyInstalled)?;
        // Only once installed: its upkeep then runs as long as the process.
        Ok(Telemetry::new(handle, own, upkeep, true))
    }

    /// The exporter for every metric, except the histograms with set buckets: those are
    /// counted into their buckets as they are recorded (see `histogram.rs` for why).
    fn parts(self) -> Result<(Recorder, PrometheusHandle, Arc<Fixed>), TelemetryError> {
        let exporter = self.builder()?.build_recorder();
        let handle = exporter.handle();
        let own = Arc::new(Fixed::new(&self.buckets, &self.labels));
        Ok((Recorder::new(exporter, own.clone()), handle, own))
    }
}

/// Installs herald's Prometheus recorder process-wide and serves `/metrics`, `/health`,
/// `/health/live` and `/health/ready` on `addr` (`IP:PORT`; `127.0.0.1:0` picks a free port). Call from within a Tokio runtime.
///
/// Errors: a malformed or taken address, or a recorder already installed, each named. The
/// address is checked and bound before the recorder is installed, so a bad address leaves the
/// process without a recorder and the call can be retried.
pub async fn prometheus(addr: &str) -> Result<(Telemetry, Server), TelemetryError> {
    let listener = http::bind(addr).await?;
    let telemetry = Prometheus::new().install()?;
    let server = http::serve(listener, telemetry.clone())?;
    Ok((telemetry, server))
}

struct Watched {
    name: String,
    transport: &'static str,
    health: watch::Receiver<Health>,
}

struct Inner {
    handle: PrometheusHandle,
    own: Arc<Fixed>,
    watched: Mutex<Watching>,
}

#[derive(Default)]
struct Watching {
    producers: Vec<Watched>,
    /// A watched producer went away (closed and dropped) and none has been watched since: a
    /// process shutting down. `/health` stays unhealthy rather than turn healthy with nobody
    /// left to send.
    gone: bool,
}

/// Renders metrics and reports the health of watched producers. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .lock()
            .producers
            .iter()
            .map(|w| w.name.clone())
            .collect();
        f.debug_struct("Telemetry")
            .field("watched", &names)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// `forever`: the recorder is process-wide, so its upkeep runs as long as the process;
    /// otherwise as long as a clone of this `Telemetry` lives.
    fn new(handle: PrometheusHandle, own: Arc<Fixed>, upkeep: Duration, forever: bool) -> Self {
        let upkeep_handle = handle.clone();
        let inner = Arc::new(Inner {
            handle,
            own,
            watched: Mutex::new(Watching::default()),
        });
        let alive = Arc::downgrade(&inner);
        // The recorder needs its histograms drained now and then, whether or not anyone
        // scrapes; a thread, so that no runtime is required. Should the thread fail to start,
        // rendering drains them too.
        let _detached = std::thread::Builder::new()
            .name("herald-telemetry-upkeep".into())
            .spawn(move || {
                while forever || alive.strong_count() > 0 {
                    upkeep_handle.run_upkeep();
                    std::thread::sleep(upkeep);
                }
            });
        Self { inner }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watching> {
        self.inner
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this telemetry records `producer`'s metrics. A producer registers its
    /// pipeline's series (accepted, delivered, latency, buffer, health...) once, when it is
    /// built, with the recorder in force then: one built before [`Prometheus::install`] (or
    /// outside the `metrics::with_local_recorder` of a [`Prometheus::build`]) records them
    /// nowhere, for good, and only its failure counters, looked up per event, reach the
    /// recorder later. Looks for the series every producer sets at build time
    /// (`herald_buffer_max_messages` with its `transport` and `producer` labels): two
    /// producers with the same transport and name (or both unnamed) share their series, so one
    /// recorded answers for both.
    pub fn records(&self, producer: &Producer) -> bool {
        let (transport, name) = (producer.transport_name(), producer.name());
        let series = format!("{}{{", core_metrics::BUFFER_MAX_MESSAGES);
        self.inner.handle.render().lines().any(|line| {
            let Some(labels) = line.strip_prefix(&series).and_then(label_pairs) else {
                return false;
            };
            let value = |key: &str| {
                labels
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
            };
            value("transport") == Some(transport) && value("producer") == name
        })
    }

    /// Everything recorded, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut text = self.inner.handle.render();
        self.inner.own.render(&mut text);
        text
    }

    /// Adds `producer` to the health report under `name` (replacing a producer watched under
    /// that name). Holds only its health channel, not the producer: a producer that is dropped
    /// leaves the report once its pipeline has finished (when the last one has left that way,
    /// the report stays unhealthy: see [`Telemetry::health`]).
    ///
    /// Logs a warning (target `herald_telemetry`) when this telemetry does not record the
    /// producer's metrics: see [`Telemetry::records`].
    pub fn watch(&self, name: impl Into<String>, producer: &Producer) {
        let name = name.into();
        if !self.records(producer) {
            tracing::warn!(
                watched = %name,
                transport = producer.transport_name(),
                "this producer's metrics are not recorded here: it was built before the \
                 recorder was installed (install it first, then build the producer); its \
                 health is watched, but /metrics will lack its pipeline's series"
            );
        }
        let mut watching = self.lock();
        watching.gone = false;
        let watched = &mut watching.producers;
        watched.retain(|w| w.name != name);
        watched.push(Watched {
            name,
            transport: producer.transport_name(),
            health: producer.health_watch(),
        });
    }

    /// Removes the producer watched under `name`; whether there was one. Unlike a producer
    /// that goes away on its own, one removed here leaves no trace in the report.
    pub fn unwatch(&self, name: &str) -> bool {
        let mut watching = self.lock();
        let before = watching.producers.len();
        watching.producers.retain(|w| w.name != name);
        watching.producers.len() != before
    }

    /// The health of every watched producer, as last published (at most one
    /// [`herald_core::HealthPolicy::interval`] old), and the worst of them. A producer that
    /// closed and was dropped leaves the report; once every watched producer has left that
    /// way (a process shutting down), the report is unhealthy with no producers, so that a load
    /// balancer keeps traffic away, until another producer is watched.
    pub fn health(&self) -> HealthReport {
        let mut watching = self.lock();
        // A producer whose pipeline has finished and whose handles are gone has left.
        let before = watching.producers.len();
        watching
            .producers
            .retain(|w| w.health.has_changed().is_ok());
        if watching.producers.len() < before && watching.producers.is_empty() {
            watching.gone = true;
        }
        let producers: Vec<ProducerHealth> = watching
            .producers
            .iter()
            .map(|w| ProducerHealth {
                name: w.name.clone(),
                transport: w.transport,
                health: w.health.borrow().clone(),
            })
            .collect();
        let (status, detail) = if producers.is_empty() && watching.gone {
            (
                HealthStatus::Unhealthy,
                Some("every watched producer has closed and gone".to_owned()),
            )
        } else {
            let worst = producers.iter().map(|p| p.health.status).max();
            (worst.unwrap_or_default(), None)
        };
        HealthReport {
            status,
            producers,
            detail,
        }
    }

    /// Serves `/metrics`, `/health`, `/health/live` and `/health/ready` on `addr` (`IP:PORT`) until the returned [`Server`] is
    /// shut down or dropped. For users who installed the recorder themselves; see
    /// [`prometheus`].
    pub async fn serve(&self, addr: &str) -> Result<Server, TelemetryError> {
        let listener = http::bind(addr).await?;
        http::serve(listener, self.clone())
    }
}

/// One watched producer's health.
#[derive(Debug, Clone, PartialEq)]
pub struct ProducerHealth {
    /// The name it was watched under.
    pub name: String,
    /// Its transport (`kafka`, `amqp`, ...).
    pub transport: &'static str,
    /// Its health.
    pub health: Health,
}

/// The health of every watched producer.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// The worst status among the producers; healthy when none is watched, unhealthy when every
    /// watched producer has gone.
    pub status: HealthStatus,
    /// Each producer's health.
    pub producers: Vec<ProducerHealth>,
    /// Why the status is what it is when no producer explains it (all have gone).
    pub detail: Option<String>,
}

impl HealthReport {
    /// 200 while no producer is unhealthy (degraded still takes traffic), 503 otherwise.
    pub fn http_status(&self) -> u16 {
        if self.is_ready() {
            200
        } else {
            503
        }
    }

    /// Whether the watched producers can deliver now: no producer is unhealthy (degraded ones
    /// still deliver). What a readiness probe asks (`/health/ready`, the same verdict as
    /// [`HealthReport::http_status`]): false during a broker outage, so that traffic goes to
    /// instances that can send, and true again once the broker is back.
    pub fn is_ready(&self) -> bool {
        self.status != HealthStatus::Unhealthy
    }

    /// Whether the watched producers' pipelines still run. What a liveness probe asks
    /// (`/health/live`): false only when a producer is closing or closed (its
    /// [`HealthIssue::Closed`]), its dispatcher task ended without a close
    /// ([`HealthIssue::PipelineStopped`]: dropped by its runtime, or panicked), or every watched
    /// producer has closed and gone. A broker outage, an open circuit, a full buffer or a high
    /// error rate leave it true: restarting the process would throw away the messages it
    /// buffered and would not bring the broker back.
    ///
    /// A producer whose health task is gone too (its whole runtime shut down) keeps its last
    /// health: run the telemetry on the same runtime as the producers, so that it goes with
    /// them.
    pub fn is_live(&self) -> bool {
        let gone = self.producers.is_empty() && self.status == HealthStatus::Unhealthy;
        !gone && self.closed().next().is_none()
    }

    /// The producers whose health says closed, or stopped without a close.
    fn closed(&self) -> impl Iterator<Item = &ProducerHealth> {
        self.producers.iter().filter(|p| {
            p.health
                .issues
                .iter()
                .any(|i| matches!(i, HealthIssue::Closed | HealthIssue::PipelineStopped))
        })
    }

    /// The JSON body of `/health/live`: `{"live":true}`, or `{"live":false,"detail":"..."}`
    /// naming the closed producers (or saying that every one has gone).
    pub fn liveness_json(&self) -> String {
        if self.is_live() {
            return serde_json::json!({ "live": true }).to_string();
        }
        let closed: Vec<&str> = self.closed().map(|p| p.name.as_str()).collect();
        let detail = if closed.is_empty() {
            self.detail
                .clone()
                .unwrap_or_else(|| "every watched producer has closed and gone".to_owned())
        } else {
            format!("producer closing, closed or stopped: {}", closed.join(", "))
        };
        serde_json::json!({ "live": false, "detail": detail }).to_string()
    }

    /// The JSON body of `/health`:
    /// `{"status":"degraded","producers":[{"name":"orders","transport":"kafka","status":"degraded","issues":[{"code":"buffer_high_water","status":"degraded","detail":"..."}]}]}`,
    /// with `"endpoint":"rabbit-2:5672"` in a producer whose transport says where it sends.
    pub fn to_json(&self) -> String {
        let producers: Vec<serde_json::Value> = self
            .producers
            .iter()
            .map(|p| {
                let issues: Vec<serde_json::Value> = p
                    .health
                    .issues
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "code": i.code(),
                            "status": i.status().as_str(),
                            "detail": i.to_string(),
                        })
                    })
                    .collect();
                let mut producer = serde_json::json!({
                    "name": p.name,
                    "transport": p.transport,
                    "status": p.health.status.as_str(),
                    "issues": issues,
                });
                if let Some(endpoint) = &p.health.endpoint {
                    producer["endpoint"] = serde_json::Value::from(endpoint.as_str());
                }
                producer
            })
            .collect();
        let mut body =
            serde_json::json!({ "status": self.status.as_str(), "producers": producers });
        if let Some(detail) = &self.detail {
            body["detail"] = serde_json::Value::from(detail.as_str());
        }
        body.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_json_names_the_endpoint_when_the_transport_says_it() {
        let mut health = Health::from_issues(vec![]);
        let report = |health: Health| HealthReport {
            status: health.status,
            producers: vec![ProducerHealth {
                name: "orders".into(),
                transport: "amqp",
                health,
            }],
            detail: None,
        };
        let silent: serde_json::Value =
            serde_json::from_str(&report(health.clone()).to_json()).expect("JSON");
        assert!(silent["producers"][0].get("endpoint").is_none(), "{silent}");
        health.endpoint = Some("rabbit-2:5672".into());
        let told: serde_json::Value =
            serde_json::from_str(&report(health).to_json()).expect("JSON");
        assert_eq!(told["producers"][0]["endpoint"], "rabbit-2:5672", "{told}");
    }

    #[test]
    fn label_pairs_reads_escaped_values_and_whole_keys() {
        let pairs = label_pairs(r#"app_producer="x",transport="a\"b\\c\nd",producer="p"} 1"#)
            .expect("labels");
        assert_eq!(
            pairs,
            [
                ("app_producer".to_owned(), "x".to_owned()),
                ("transport".to_owned(), "a\"b\\c\nd".to_owned()),
                ("producer".to_owned(), "p".to_owned()),
            ]
        );
        assert_eq!(label_pairs("} 1"), Some(Vec::new()));
        assert_eq!(label_pairs(r#"a="unterminated"#), None);
    }

    /// A producer built before the recorder registers its pipeline's series nowhere, for
    /// good; the README showed that order. `records` tells (and `watch` warns); one built
    /// under the recorder is recorded, named or not.
    #[tokio::test]
    async fn a_producer_built_before_the_recorder_is_not_recorded_and_is_told() {
        let build = |name: Option<&str>| {
            let mut b = Producer::builder(herald_testkit::MemoryTransport::new());
            if let Some(n) = name {
                b = b.name(n);
            }
            b.build().expect("builds")
        };
        let (early, early_unnamed) = (build(Some("early")), build(None));
        let (recorder, telemetry) = Prometheus::new().build().expect("recorder");
        let named = metrics::with_local_recorder(&recorder, || build(Some("late")));
        assert!(!telemetry.records(&early), "{}", telemetry.render());
        assert!(!telemetry.records(&early_unnamed), "{}", telemetry.render());
        assert!(telemetry.records(&named), "{}", telemetry.render());
        let unnamed = metrics::with_local_recorder(&recorder, || build(None));
        assert!(telemetry.records(&unnamed), "{}", telemetry.render());
        for p in [early, early_unnamed, named, unnamed] {
            p.close(Duration::from_secs(5)).await;
        }
    }

    #[test]
    fn a_stopped_pipeline_is_not_live_and_says_which() {
        let report = |issues: Vec<HealthIssue>| {
            let health = Health::from_issues(issues);
            HealthReport {
                status: health.status,
                producers: vec![ProducerHealth {
                    name: "orders".into(),
                    transport: "kafka",
                    health,
                }],
                detail: None,
            }
        };
        let outage = report(vec![HealthIssue::TransportDown("refused".into())]);
        assert!(outage.is_live(), "a broker outage stays live");
        let stopped = report(vec![HealthIssue::PipelineStopped]);
        assert!(!stopped.is_live());
        assert!(!stopped.is_ready());
        let body: serde_json::Value = serde_json::from_str(&stopped.liveness_json()).expect("JSON");
        assert_eq!(body["live"], false);
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("orders")),
            "{body}"
        );
    }
}
