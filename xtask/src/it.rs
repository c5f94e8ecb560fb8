//! `cargo xtask it`: broker integration tests. For each broker: find or start one, run its
//! adapter's integration tests against it, and always stop what was started, also when the
//! tests fail.
//!
//! Integration tests live in each adapter crate as `tests/it.rs`, every test marked
//! `#[ignore = "needs a broker: cargo xtask it"]`, so that `cargo test --workspace` stays
//! hermetic. They read the broker's address from the environment (`HERALD_KAFKA_BOOTSTRAP`,
//! `HERALD_AMQP_URL`); a broker given that way by the user is used as it is.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{cargo, run_within};

/// A broker ready for tests: the environment the tests need, and what to undo afterwards.
pub(crate) struct Broker {
    pub(crate) env: Vec<(&'static str, String)>,
    /// Runs on drop: stops what provisioning started. `None` when the broker was already there.
    pub(crate) stop: Option<Box<dyn FnOnce()>>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// A broker (or several) and the tests run against it.
struct Target {
    name: &'static str,
    package: &'static str,
    /// The test target (`tests/NAME.rs`) whose ignored tests need the broker.
    test: &'static str,
    provision: fn() -> Result<Broker>,
}

/// Kafka and RabbitMQ together, for the CLI's tests; both stopped afterwards.
fn provision_all() -> Result<Broker> {
    let mut kafka = crate::kafka::provision()?;
    let mut amqp = crate::amqp::provision()?;
    let mut env = std::mem::take(&mut kafka.env);
    env.append(&mut amqp.env);
    let stops: Vec<Box<dyn FnOnce()>> = [kafka.stop.take(), amqp.stop.take()]
        .into_iter()
        .flatten()
        .collect();
    Ok(Broker {
        env,
        stop: Some(Box::new(move || stops.into_iter().for_each(|stop| stop()))),
    })
}

const TARGETS: &[Target] = &[
    Target {
        name: "kafka",
        package: "herald-kafka",
        test: "it",
        provision: crate::kafka::provision,
    },
    Target {
        name: "amqp",
        package: "herald-amqp",
        test: "it",
        provision: crate::amqp::provision,
    },
    Target {
        name: "cli",
        package: "herald-cli",
        test: "real_brokers",
        provision: provision_all,
    },
];

pub(crate) fn it(args: &[String]) -> Result<()> {
    let wanted: Vec<&str> = if args.is_empty() {
        TARGETS.iter().map(|t| t.name).collect()
    } else {
        args.iter().map(String::as_str).collect()
    };
    for name in &wanted {
        let Some(target) = TARGETS.iter().find(|t| t.name == *name) else {
            let known: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
            bail!("unknown broker `{name}`; known: {known:?}");
        };
        eprintln!("\n==> it {}: provisioning a broker", target.name);
        let broker = (target.provision)()?;
        let mut cmd = cargo();
        cmd.args([
            "test",
            "-p",
            target.package,
            "--test",
            target.test,
            "--",
            "--ignored",
            "--test-threads=1",
        ]);
        for (k, v) in &broker.env {
            cmd.env(k, v);
        }
        let result = run_within(&format!("it {}", target.name), &mut cmd, time_limit()?);
        drop(broker);
        result?;
    }
    if wanted.is_empty() {
        eprintln!("xtask it: no broker adapters yet");
    }
    Ok(())
}

/// How long one target's tests may run, build included: `HERALD_IT_TIMEOUT_SECS`, default 15
/// minutes (they take about two, or seven with a cold build of the test binaries).
fn time_limit() -> Result<std::time::Duration> {
    match std::env::var("HERALD_IT_TIMEOUT_SECS") {
        Ok(v) => match v.parse::<u64>() {
            Ok(secs) if secs > 0 => Ok(std::time::Duration::from_secs(secs)),
            _ => bail!("HERALD_IT_TIMEOUT_SECS must be a number of seconds above 0, got {v:?}"),
        },
        Err(_) => Ok(std::time::Duration::from_secs(15 * 60)),
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

/// Whether a Docker engine answers (the client alone is not enough).
pub(crate) fn docker_engine() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}
