//! A running producer, scraped over HTTP: `/metrics` parses as the Prometheus text format and
//! its numbers are what happened; `/health` follows the producer. Its own test binary: it
//! installs the process-wide recorder (once: the second install must fail).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald_core::{Message, Producer, TransportHealth};
use herald_telemetry::{Prometheus, TelemetryError};
use herald_testkit::scenario::ScriptedFaults;
use herald_testkit::MemoryTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> Reply {
    tokio::time::timeout(Duration::from_secs(30), request_now(addr, method, path))
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} {path} within 30 s"))
}

async fn request_now(addr: std::net::SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    Reply {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `name{labels}` (labels sorted) -> value, and metric name -> declared type.
type Samples = BTreeMap<String, f64>;

/// Parses the Prometheus text exposition format, strictly enough to fail on garbage.
fn parse(text: &str) -> (Samples, BTreeMap<String, String>) {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}")),
        };
        let key = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("closing brace");
                let mut pairs: Vec<&str> = labels.split(',').filter(|p| !p.is_empty()).collect();
                for p in &pairs {
                    let (k, v) = p.split_once('=').expect("label=value");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "label name {k:?}"
                    );
                    assert!(v.starts_with('"') && v.ends_with('"'), "quoted value {v:?}");
                }
                pairs.sort_unstable();
                format!("{name}{{{}}}", pairs.join(","))
            }
        };
        assert!(samples.insert(key.clone(), value).is_none(), "{key} twice");
    }
    (samples, types)
}

fn get(samples: &Samples, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:#?}", samples.keys()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_producer_is_scraped_and_its_health_served() {
    // A malformed address is refused before anything is installed, so the next call works.
    let e = herald_telemetry::prometheus("localhost:metrics")
        .await
        .expect_err("malformed");
    assert!(matches!(e, TelemetryError::InvalidAddress { .. }), "{e}");

    let (telemetry, server) = herald_telemetry::prometheus("127.0.0.1:0")
        .await
        .expect("install and serve");
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback());

    // Installing twice says so.
    let e = Prometheus::new().install().expect_err("second recorder");
    assert!(e.to_string().contains("already installed"), "{e}");
    let e = herald_telemetry::prometheus("127.0.0.1:0")
        .await
        .expect_err("second recorder");
    assert!(matches!(e, TelemetryError::AlreadyInstalled), "{e}");
    // A taken address is named.
    let e = telemetry.serve(&addr.to_string()).await.expect_err("taken");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");

    // A run with scripted faults: a whole batch fails once (transient), then two messages of the
    // next; four poison messages are rejected (permanent); one is too large to accept.
    let (scenario, builder) = ScriptedFaults::new();
    let t = scenario.transport.clone();
    let p = builder.build().expect("build");
    telemetry.watch("orders", &p);
    scenario.run(&p).await;
    let totals = p.stats().totals;

    let reply = request(addr, "GET", "/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers.contains("text/plain; version=0.0.4"),
        "{}",
        reply.headers
    );
    let (s, types) = parse(&reply.body);
    let l = "{transport=\"memory\"}";
    assert_eq!(
        get(&s, &format!("herald_messages_accepted_total{l}")),
        100.0
    );
    assert_eq!(
        get(&s, &format!("herald_messages_delivered_total{l}")),
        96.0
    );
    assert_eq!(
        get(&s, &format!("herald_retries_total{l}")),
        totals.retries as f64
    );
    assert_eq!(
        get(
            &s,
            "herald_messages_failed_total{class=\"permanent\",reason=\"rejected\",transport=\"memory\"}"
        ),
        4.0
    );
    assert_eq!(
        get(
            &s,
            "herald_messages_failed_total{class=\"permanent\",reason=\"too_large\",transport=\"memory\"}"
        ),
        1.0
    );
    // Failure series exist before their first failure, so that rate() sees it.
    assert_eq!(
        get(
            &s,
            "herald_messages_failed_total{class=\"transient\",reason=\"delivery_timeout\",transport=\"memory\"}"
        ),
        0.0
    );
    assert_eq!(
        get(&s, &format!("herald_buffer_max_messages{l}")),
        100_000.0
    );
    // Histograms are histograms (not summaries), with herald's buckets.
    assert_eq!(types["herald_send_latency_seconds"], "histogram");
    assert_eq!(types["herald_messages_delivered_total"], "counter");
    assert_eq!(types["herald_buffer_messages"], "gauge");
    assert_eq!(
        get(&s, &format!("herald_send_latency_seconds_count{l}")),
        96.0
    );
    assert_eq!(
        get(
            &s,
            "herald_send_latency_seconds_bucket{le=\"+Inf\",transport=\"memory\"}"
        ),
        96.0
    );
    assert!(
        s.contains_key("herald_send_latency_seconds_bucket{le=\"0.0005\",transport=\"memory\"}")
    );
    assert_eq!(
        get(&s, &format!("herald_batches_total{l}")),
        get(&s, &format!("herald_batch_messages_count{l}"))
    );

    // A named producer keeps its own series.
    let billing = Producer::builder(MemoryTransport::new())
        .name("billing")
        .build()
        .expect("build");
    let r = billing
        .send_all(
            (0..3)
                .map(|i| Message::new("b", format!("b{i}")))
                .collect::<Vec<_>>(),
        )
        .await
        .wait()
        .await;
    assert_eq!(r.delivered, 3);
    billing.close(Duration::from_secs(5)).await;
    let (s, _) = parse(&request(addr, "GET", "/metrics").await.body);
    assert_eq!(
        get(
            &s,
            "herald_messages_delivered_total{producer=\"billing\",transport=\"memory\"}"
        ),
        3.0
    );
    assert_eq!(
        get(&s, &format!("herald_messages_delivered_total{l}")),
        96.0
    );

    // A producer closed on purpose is no operational problem: its health gauge, which outlives
    // it in the recorder, reads healthy again (its watchers were told "closed").
    assert_eq!(
        get(
            &s,
            "herald_health_status{producer=\"billing\",transport=\"memory\"}"
        ),
        0.0
    );

    // Health: healthy, then down when the transport says so, with 503.
    let reply = request(addr, "GET", "/health").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["producers"][0]["name"], "orders");
    assert_eq!(body["producers"][0]["transport"], "memory");

    t.set_health(TransportHealth::Down(
        "10.0.0.1:5672: Connection refused".into(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = request(addr, "GET", "/health").await;
        if reply.status == 503 {
            break reply;
        }
        assert!(Instant::now() < deadline, "never unhealthy: {}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!(body["status"], "unhealthy");
    let issue = &body["producers"][0]["issues"][0];
    assert_eq!(issue["code"], "transport_down");
    assert!(
        issue["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Connection refused")),
        "{issue}"
    );
    let (s, _) = parse(&request(addr, "GET", "/metrics").await.body);
    assert_eq!(get(&s, &format!("herald_health_status{l}")), 2.0);
    assert_eq!(get(&s, &format!("herald_transport_up{l}")), 0.0);

    // The rest of HTTP: HEAD has no body, other methods and paths are refused.
    let reply = request(addr, "HEAD", "/health").await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.is_empty());
    assert_eq!(request(addr, "POST", "/metrics").await.status, 405);
    assert_eq!(request(addr, "GET", "/nope").await.status, 404);
    assert_eq!(request(addr, "GET", "/metrics?x=1").await.status, 200);

    // A producer that closed and went away leaves the report.
    p.close(Duration::from_secs(5)).await;
    drop(p);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = telemetry.health();
        if h.producers.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still reported: {h:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last one gone: a process shutting down stays unhealthy, so traffic stays away.
    let reply = request(addr, "GET", "/health").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!(body["producers"], serde_json::json!([]));
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("gone")),
        "{body}"
    );

    server.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still listening after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
