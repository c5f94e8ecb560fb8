//! Shared test code: stand-ins for a broker for the hermetic tests (a fake AMQP server, and a
//! port nothing listens on), and RabbitMQ nodes and clusters of a test's own for the real-broker
//! tests.

// Each test file compiles its own copy of this module and uses a part of it.
#![allow(dead_code)]

pub(crate) mod cluster;
pub(crate) mod fake_broker;
pub(crate) mod node;

use std::time::Duration;

use tokio::time::Instant;

/// No broker needed: a port on this machine that nothing listens on.
pub(crate) fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `cond` holds, checking every 20 ms; panics, naming `what`, after `within`.
pub(crate) async fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
