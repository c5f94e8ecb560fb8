//! `cargo xtask bench command|latency --pin`: the broker on CPU 0 and the `herald` command on
//! CPU 1, with `taskset` (util-linux), so that the two do not take each other's cycles and a
//! run varies less. The broker is found by the port it listens on (`ss -ltnp`), whoever
//! started it: a broker this machine runs as a service (RabbitMQ, Mosquitto) is pinned too, and
//! its affinity restored when its rounds end (also after a failed round). Each side then has
//! one core where an unpinned run shares two: the figures are lower (and on some machines
//! steadier, not on all: docs/benchmarks.md), another regime than the one users run in (docs/benchmarks.md says which a section comes from).
//!
//! Why a hand-written lookup: no crate maps a listening port to its process portably, and `ss`
//! already does; what is parsed here is one `pid=N` field of its output.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// The CPU the broker runs on; the command gets [`CLIENT_CPU`].
pub(crate) const BROKER_CPU: u32 = 0;
/// The CPU the `herald` command runs on.
pub(crate) const CLIENT_CPU: u32 = 1;

/// A broker's processes pinned to [`BROKER_CPU`]; their affinity is put back on drop.
pub(crate) struct Pinned {
    /// (pid, its affinity mask before, as `taskset -p` printed it).
    before: Vec<(u32, String)>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (pid, mask) in &self.before {
            let restored = Command::new("taskset")
                .args(["-a", "-p", mask, &pid.to_string()])
                .output();
            if !restored.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!(
                    "pin: could not restore process {pid}'s affinity to {mask}: {restored:?}; run `taskset -a -p {mask} {pid}`"
                );
            }
        }
    }
}

/// Checks that this machine can pin: two CPUs or more, and `taskset` and `ss` at hand.
pub(crate) fn check() -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!("--pin needs two CPUs or more; this machine has {cpus}");
    }
    for tool in ["taskset", "ss"] {
        let found = Command::new(tool).arg("--version").output();
        if !found.is_ok_and(|o| o.status.success()) {
            bail!("--pin needs `{tool}` (util-linux / iproute2), which is not on the PATH");
        }
    }
    Ok(())
}

/// Pins the processes listening on `port` (the broker) to [`BROKER_CPU`].
pub(crate) fn broker(port: u16) -> Result<Pinned> {
    let out = Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .context("running ss")?;
    let pids = listening_pids(&String::from_utf8_lossy(&out.stdout));
    if pids.is_empty() {
        bail!("--pin: no process found listening on port {port} (ss -ltnp needs to run as the broker's user or root)");
    }
    let mut pinned = Pinned { before: Vec::new() };
    for pid in pids {
        let shown = Command::new("taskset")
            .args(["-p", &pid.to_string()])
            .output()
            .context("running taskset")?;
        let text = String::from_utf8_lossy(&shown.stdout);
        let mask = text
            .rsplit(": ")
            .next()
            .map(str::trim)
            .filter(|m| !m.is_empty() && shown.status.success())
            .with_context(|| format!("taskset -p {pid} printed no mask: {text}"))?
            .to_owned();
        let set = Command::new("taskset")
            .args(["-a", "-p", "-c", &BROKER_CPU.to_string(), &pid.to_string()])
            .output()
            .context("running taskset")?;
        if !set.status.success() {
            bail!(
                "taskset could not pin process {pid}: {}",
                String::from_utf8_lossy(&set.stderr)
            );
        }
        eprintln!("pin: the broker (process {pid}, port {port}) on CPU {BROKER_CPU}, until its rounds end (mask {mask} before)");
        pinned.before.push((pid, mask));
    }
    Ok(pinned)
}

/// The process ids in `ss -Hltnp` output (`users:(("beam.smp",pid=2994,fd=35))`), each once.
fn listening_pids(ss: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = ss
        .split("pid=")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The port of a broker address: `host:port`, or a URL's authority (`amqp://u:p@host:port/vhost`).
pub(crate) fn port_of(address: &str) -> Result<u16> {
    let with_scheme = if address.contains("://") {
        address.to_owned()
    } else {
        format!("tcp://{address}")
    };
    // The address itself stays out of the error: a URL may carry credentials.
    let url = url::Url::parse(&with_scheme)
        .context("a broker address that is neither host:port nor a URL")?;
    url.port()
        .or_else(|| match url.scheme() {
            "amqp" => Some(5672),
            "mqtt" => Some(1883),
            _ => None,
        })
        // Never the address itself as the fallback: it may carry credentials.
        .with_context(|| {
            format!(
                "no port in the broker address (host {})",
                url.host_str().unwrap_or("none")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pids_of_ss_output_are_read_once_each() {
        let ss = "LISTEN 0 128 127.0.0.1:5672 0.0.0.0:* users:((\"beam.smp\",pid=2994,fd=35))\n\
                  LISTEN 0 128 [::1]:5672 [::]:* users:((\"beam.smp\",pid=2994,fd=36),(\"other\",pid=17,fd=3))\n";
        assert_eq!(listening_pids(ss), vec![17, 2994]);
        assert!(listening_pids("").is_empty());
    }

    #[test]
    fn ports_come_from_addresses_and_urls_without_their_credentials_in_errors() {
        assert_eq!(port_of("127.0.0.1:39025").ok(), Some(39025));
        assert_eq!(
            port_of("amqp://guest:guest@127.0.0.1:5673/%2f").ok(),
            Some(5673)
        );
        assert_eq!(port_of("amqp://guest:guest@127.0.0.1/%2f").ok(), Some(5672));
        assert_eq!(port_of("mqtt://127.0.0.1:18831").ok(), Some(18831));
        let err = port_of("nats://user:secret@127.0.0.1")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("127.0.0.1") && !err.contains("secret"),
            "{err}"
        );
        let err = port_of("amqp://user:secret@[bad")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("neither") && !err.contains("secret"), "{err}");
    }
}
