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
/// with `hint` (where to look). With the `child` that should listen there, fails as soon as it
/// has exited (it could not bind the port, say), and does not take another process listening
/// there for it once it is gone: the error says so, and `ExitedEarly` marks it for a retry.
pub(crate) fn wait_listening(
    addr: &str,
    limit: std::time::Duration,
    hint: &str,
    mut child: Option<&mut std::process::Child>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + limit;
    let exited = |child: &mut Option<&mut std::process::Child>| -> Result<()> {
        match child.as_mut().map(|c| c.try_wait()).transpose()? {
            Some(Some(status)) => Err(anyhow::Error::new(ExitedEarly).context(format!(
                "the process that was to listen on {addr} exited ({status}) first{hint}"
            ))),
            _ => Ok(()),
        }
    };
    loop {
        exited(&mut child)?;
        if port_open(addr) {
            // Checked again (best effort): a process that failed to bind may have gone while
            // another one answered on the port.
            return exited(&mut child);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("nothing listens on {addr} after {limit:?}{hint}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Marks the error of [`wait_listening`] whose process exited before it listened: with a port
/// from [`free_port`], most likely taken by another process in between, so worth a new port.
#[derive(Debug)]
pub(crate) struct ExitedEarly;

impl std::fmt::Display for ExitedEarly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("exited before it listened")
    }
}

impl std::error::Error for ExitedEarly {}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn waiting_for_a_process_that_exited_fails_at_once_and_says_so() {
        let addr = format!("127.0.0.1:{}", free_port().expect("a free port"));
        let mut child = Command::new("true").spawn().expect("`true` runs");
        let limit = Duration::from_secs(60);
        let started = Instant::now();
        let err = wait_listening(&addr, limit, " (a hint)", Some(&mut child))
            .expect_err("the process exited");
        assert!(err.is::<ExitedEarly>(), "{err:#}");
        let text = format!("{err:#}");
        assert!(
            text.contains("exited") && text.contains(&addr) && text.contains("a hint"),
            "{text}"
        );
        // Well before the limit: it did not wait for the port.
        assert!(
            started.elapsed() < limit / 2,
            "waited {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_listening_port_ends_the_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let addr = listener.local_addr().expect("its address").to_string();
        wait_listening(&addr, Duration::from_secs(10), "", None).expect("it listens");
    }
}
