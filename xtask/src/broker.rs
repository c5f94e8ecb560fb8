//! What the broker modules (`kafka.rs`, `amqp.rs`) share: the [`Broker`] they hand to `it` and
//! to the benchmarks, and probes of the machine (open ports, a Docker engine, a free port).

use std::process::Command;

use anyhow::Result;

/// A broker ready for tests: the environment the tests need, and what to undo afterwards.
pub(crate) struct Broker {
    pub(crate) env: Vec<(&'static str, String)>,
    /// Runs on drop: stops what provisioning started. `None` when the broker was already there.
    pub(crate) stop: Option<Box<dyn FnOnce()>>,
}

impl Broker {
    /// The value provisioning set for `name` (`HERALD_KAFKA_BOOTSTRAP`, say).
    pub(crate) fn var(&self, name: &str) -> anyhow::Result<String> {
        self.env
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("the broker's provisioning set no {name}"))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// Whether something accepts TCP connections on `addr` within a second.
pub(crate) fn port_open(addr: &str) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1)).is_ok())
}

/// Waits until something accepts TCP connections on `addr`; after `limit`, an error that ends
/// with `hint` (where to look).
pub(crate) fn wait_listening(addr: &str, limit: std::time::Duration, hint: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while !port_open(addr) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("nothing listens on {addr} after {limit:?}{hint}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// Whether a Docker engine answers (the client alone is not enough).
pub(crate) fn docker_engine() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
