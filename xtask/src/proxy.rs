//! The testkit's delaying proxy as a process of its own (its `delay_proxy` example), for every
//! benchmark that runs through a round trip: the command's (`cargo xtask bench command`) and the
//! library's (`cargo xtask bench kafka`, `amqp`). A process of its own, on neither side's
//! runtime or threads: in the benchmark's process the proxy's copying would share herald's
//! runtime (and not the raw client's, whose client runs threads of its own), which leans the
//! comparison against herald.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// Builds the proxy (release) and says where it is.
pub(crate) fn build(root: &Path) -> Result<PathBuf> {
    crate::process::run(
        "build the delaying proxy",
        crate::process::cargo().args([
            "build",
            "--release",
            "-p",
            "herald-testkit",
            "--example",
            "delay_proxy",
        ]),
    )?;
    Ok(crate::process::target_dir(root).join("release/examples/delay_proxy"))
}

/// A running proxy that delays each direction by half of a round trip; killed when dropped.
pub(crate) struct DelayProxy(Child);

impl DelayProxy {
    /// Listens on `127.0.0.1:port` and forwards to `target` with a round trip of `rtt_ms`
    /// added (half each way; an odd number of milliseconds rounds down, as the proxy takes
    /// whole milliseconds one way), once it accepts connections.
    pub(crate) fn start(bin: &Path, port: u16, target: &str, rtt_ms: u64) -> Result<Self> {
        let child = Command::new(bin)
            .arg(format!("127.0.0.1:{port}"))
            .arg(target)
            .arg((rtt_ms / 2).to_string())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the delaying proxy")?;
        let mut proxy = DelayProxy(child);
        crate::broker::wait_listening(
            &format!("127.0.0.1:{port}"),
            std::time::Duration::from_secs(10),
            " (the delaying proxy)",
            Some(&mut proxy.0),
        )?;
        Ok(proxy)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        let _gone = self.0.kill().and_then(|()| self.0.wait());
    }
}

/// A proxy in front of the server of `url` (its host and port, `default_port` when it names
/// none), and `url` through it (see [`through`]).
pub(crate) fn in_front_of(
    bin: &Path,
    url: &str,
    default_port: u16,
    rtt_ms: u64,
) -> Result<(DelayProxy, String)> {
    let port = crate::broker::free_port()?;
    let (target, proxied) = through(url, default_port, port)?;
    Ok((DelayProxy::start(bin, port, &target, rtt_ms)?, proxied))
}

/// The server `url` names (`host:port`, `default_port` when it names none), and `url` with a
/// proxy on `127.0.0.1:port` in its place, credentials, path and query kept. One server: an
/// address list (`h1:5672,h2:5672`) is not a URL this reads.
fn through(url: &str, default_port: u16, port: u16) -> Result<(String, String)> {
    let mut proxied = url::Url::parse(url).context("the broker's URL")?;
    let target = format!(
        "{}:{}",
        proxied.host_str().context("the broker's URL has no host")?,
        proxied.port().unwrap_or(default_port)
    );
    proxied
        .set_host(Some("127.0.0.1"))
        .context("the broker's URL cannot take the proxy's address")?;
    proxied
        .set_port(Some(port))
        .map_err(|()| anyhow::anyhow!("the broker's URL cannot take a port"))?;
    Ok((target, proxied.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_takes_the_server_s_place_in_the_url() {
        let (target, url) =
            through("amqp://u:p%40ss@rabbit.internal/%2F?queue=q", 5672, 4100).expect("a URL");
        assert_eq!(target, "rabbit.internal:5672");
        assert_eq!(url, "amqp://u:p%40ss@127.0.0.1:4100/%2F?queue=q");
        let (target, url) = through("amqp://[::1]:5673/%2f", 5672, 4100).expect("IPv6");
        assert_eq!(
            (target.as_str(), url.as_str()),
            ("[::1]:5673", "amqp://127.0.0.1:4100/%2f")
        );
        assert!(through("amqp://h1:5672,h2:5672/%2f", 5672, 4100).is_err());
    }
}
