//! The Kubernetes probes over HTTP, against a producer on the in-memory transport: during a
//! broker outage `/health/live` stays 200 while `/health/ready` turns 503; after it both are
//! 200; a closed producer, and one that has gone, is not live. The recorder is built, not
//! installed, so this binary needs no process-wide state.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use herald_core::{HealthPolicy, Producer, TransportHealth};
use herald_telemetry::Prometheus;
use herald_testkit::MemoryTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a verdict may take to change: the producers here evaluate their health every 20 ms.
const DEADLINE: Duration = Duration::from_secs(10);

/// `GET path`: the status and the body (the server closes every connection after its answer).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer to GET {path} within {DEADLINE:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    (status, body.to_owned())
}

/// Asks `path` until it answers `status`, failing after [`DEADLINE`]; the body of that answer.
async fn until(addr: SocketAddr, path: &str, status: u16) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (got, body) = get(addr, path).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still {got}, not {status}, after {DEADLINE:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_stays_up_through_a_broker_outage_while_ready_follows_it() {
    let (_recorder, telemetry) = Prometheus::new().build().expect("recorder");
    let server = telemetry.serve("127.0.0.1:0").await.expect("serve");
    let addr = server.local_addr();
    let transport = MemoryTransport::new();
    let producer = Producer::builder(transport.clone())
        .health(HealthPolicy {
            interval: Duration::from_millis(20),
            ..HealthPolicy::default()
        })
        .build()
        .expect("producer");
    telemetry.watch("orders", &producer);

    assert_eq!(
        get(addr, "/health/live").await,
        (200, r#"{"live":true}"#.into())
    );
    let (status, body) = get(addr, "/health/ready").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["status"], "healthy");

    // The broker goes away: not ready (traffic goes elsewhere), still live (a restart would
    // throw the buffer away and not bring the broker back).
    transport.set_health(TransportHealth::Down(
        "10.0.0.1:5672: Connection refused".into(),
    ));
    let body = json(&until(addr, "/health/ready", 503).await);
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert_eq!(
        body["producers"][0]["issues"][0]["code"], "transport_down",
        "{body}"
    );
    assert_eq!(get(addr, "/health").await.0, 503);
    assert_eq!(
        get(addr, "/health/live").await,
        (200, r#"{"live":true}"#.into())
    );
    // Still live after the outage has lasted a while (several health evaluations).
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        assert_eq!(get(addr, "/health/live").await.0, 200);
        assert_eq!(get(addr, "/health/ready").await.0, 503);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The broker is back: ready again, and live all along.
    transport.set_health(TransportHealth::Up);
    let body = json(&until(addr, "/health/ready", 200).await);
    assert_eq!(body["status"], "healthy", "{body}");
    assert_eq!(
        get(addr, "/health/live").await,
        (200, r#"{"live":true}"#.into())
    );

    // Closed: its pipeline is done, so the process no longer works: not live, not ready.
    producer.close(Duration::from_secs(5)).await;
    let body = json(&until(addr, "/health/live", 503).await);
    assert_eq!(body["live"], false, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("orders")),
        "{body}"
    );
    assert_eq!(get(addr, "/health/ready").await.0, 503);

    // Gone (closed and dropped, the last watched one): still not live.
    drop(producer);
    let deadline = Instant::now() + DEADLINE;
    while !telemetry.health().producers.is_empty() {
        assert!(Instant::now() < deadline, "the closed producer never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(addr, "/health/live").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        json(&body)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("gone")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_producer_watched_yet_both_probes_answer_200() {
    let (_recorder, telemetry) = Prometheus::new().build().expect("recorder");
    let server = telemetry.serve("127.0.0.1:0").await.expect("serve");
    let addr = server.local_addr();
    assert_eq!(
        get(addr, "/health/live").await,
        (200, r#"{"live":true}"#.into())
    );
    assert_eq!(get(addr, "/health/ready").await.0, 200);
}
