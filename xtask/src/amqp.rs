//! Provisioning and benchmarks for the amqp adapter.
//!
//! A broker for the tests, first that works:
//! 1. `$HERALD_AMQP_URL`, used as it is;
//! 2. the machine's RabbitMQ on 127.0.0.1:5672 (guest/guest), used as it is, never reconfigured;
//! 3. a RabbitMQ node of our own from Debian's `rabbitmq-server` (installed when missing) on
//!    free ports, with its own folders and config file, stopped and removed afterwards;
//! 4. Docker's `rabbitmq:3` image where an engine answers, removed afterwards.
//!
//! `HERALD_AMQP_PROVISION=local` (or `docker`) forces choice 3 (or 4).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::broker::{docker_engine, free_port, port_open, Broker};
use crate::process::{apt_get, on_path, run};

const SHARED: &str = "127.0.0.1:5672";
const SHARED_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Finds or starts a broker for the integration tests. `HERALD_AMQP_PROVISION=local` or
/// `=docker` skips the earlier choices (to test those paths on a machine that has a broker).
pub(crate) fn provision() -> Result<Broker> {
    match std::env::var("HERALD_AMQP_PROVISION").as_deref() {
        Ok("local") => {
            if !ensure_rabbitmq_server() {
                bail!(
                    "HERALD_AMQP_PROVISION=local: no rabbitmq-server and it could not be installed"
                );
            }
            return start_local_node();
        }
        Ok("docker") => return start_docker(),
        _ => {}
    }
    if let Ok(url) = std::env::var("HERALD_AMQP_URL") {
        eprintln!("amqp: using HERALD_AMQP_URL");
        return Ok(given(url));
    }
    if port_open(SHARED) && amqp_ready(SHARED) {
        eprintln!("amqp: using the machine's RabbitMQ on {SHARED}");
        return Ok(given(SHARED_URL.to_owned()));
    }
    if ensure_rabbitmq_server() {
        if port_open(SHARED) && amqp_ready(SHARED) {
            // Installing the package started the machine's own service.
            eprintln!("amqp: using the RabbitMQ service the package started on {SHARED}");
            return Ok(given(SHARED_URL.to_owned()));
        }
        match start_local_node() {
            Ok(b) => return Ok(b),
            Err(e) => eprintln!("amqp: could not start a local rabbitmq-server node: {e:#}"),
        }
    }
    if docker_engine() {
        return start_docker();
    }
    bail!(
        "no RabbitMQ for the amqp tests: set HERALD_AMQP_URL, run one on {SHARED}, install \
         Debian's rabbitmq-server, or start a Docker engine"
    )
}

fn given(url: String) -> Broker {
    Broker {
        env: vec![("HERALD_AMQP_URL", url)],
        stop: None,
    }
}

/// Whether an AMQP broker answers the protocol header on `addr` (a bound port alone can be a
/// node still booting).
fn amqp_ready(addr: &str) -> bool {
    let Ok(sock) = addr.parse() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&sock, Duration::from_secs(1)) else {
        return false;
    };
    let _timeout = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut first = [0u8; 1];
    // A method frame (type 1: connection.start) answers the AMQP 0-9-1 header.
    s.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && s.read_exact(&mut first).is_ok()
        && first[0] == 1
}

fn wait_ready(addr: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if amqp_ready(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

fn has_rabbitmq_server() -> bool {
    Path::new("/usr/sbin/rabbitmq-server").exists() || on_path("rabbitmq-server")
}

/// True when `rabbitmq-server` is there, installing Debian's package if it is missing.
fn ensure_rabbitmq_server() -> bool {
    if has_rabbitmq_server() {
        return true;
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        return false;
    }
    eprintln!("amqp: installing Debian's rabbitmq-server");
    let _updated = apt_get(&["update", "-q"], None);
    apt_get(&["install", "-y", "-q", "rabbitmq-server"], None) && has_rabbitmq_server()
}

/// A node of our own: own name, ports, folders and config file (the machine's config may pin
/// the listener to 5672). Stopped and removed when the tests end.
fn start_local_node() -> Result<Broker> {
    let port = free_port()?;
    let dist = free_port()?;
    let name = format!("herald-xtask-{}", std::process::id());
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(dir.join("mnesia"))?;
    std::fs::create_dir_all(dir.join("log"))?;
    std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
    std::fs::write(
        dir.join("rabbitmq.conf"),
        format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
    )?;
    let chowned = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !chowned {
        bail!("could not give {} to the rabbitmq user", dir.display());
    }
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    let env: Vec<(String, String)> = vec![
        ("RABBITMQ_NODENAME".into(), name.clone()),
        ("RABBITMQ_NODE_PORT".into(), port.to_string()),
        ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
        ("RABBITMQ_DIST_PORT".into(), dist.to_string()),
        ("RABBITMQ_MNESIA_BASE".into(), d("mnesia")),
        ("RABBITMQ_LOG_BASE".into(), d("log")),
        ("RABBITMQ_PID_FILE".into(), d("node.pid")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), d("enabled_plugins")),
        ("RABBITMQ_CONFIG_FILE".into(), d("rabbitmq.conf")),
    ];
    let stop = {
        let (name, env, dir) = (name.clone(), env.clone(), dir.clone());
        move || stop_local_node(&name, &env, &dir)
    };
    eprintln!("amqp: starting a rabbitmq-server node of our own ({name}) on 127.0.0.1:{port}");
    let started = Command::new("rabbitmq-server")
        .arg("-detached")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .context("run rabbitmq-server -detached")?;
    let addr = format!("127.0.0.1:{port}");
    if !started.success() || !wait_ready(&addr, Duration::from_secs(90)) {
        stop();
        bail!("the node did not answer AMQP on {addr} within 90 s");
    }
    Ok(Broker {
        env: vec![(
            "HERALD_AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )],
        stop: Some(Box::new(stop)),
    })
}

/// The folder-name prefixes of RabbitMQ nodes of our own: xtask's (`herald-xtask-PID`) and the
/// AMQP tests' (`herald-it-PID-PORT`, `herald-cluster-PID-K-PORT`), each in the temporary folder
/// and named after the process that started it.
const OWN_NODE_PREFIXES: [&str; 3] = ["herald-xtask-", "herald-it-", "herald-cluster-"];

/// The process that started the node whose folder is `folder`, if the folder is one of ours.
fn starter_of(folder: &str) -> Option<u32> {
    let rest = OWN_NODE_PREFIXES
        .iter()
        .find_map(|p| folder.strip_prefix(p))?;
    rest.split('-').next()?.parse().ok()
}

/// Stops the RabbitMQ nodes of our own that a run killed before it could stop them left
/// behind (they run detached, so killing a run's process tree leaves them), and removes their
/// folders: those whose starting process is gone. A node's process is killed only if its
/// environment names the node's folder (its pid file may be stale, the pid reused).
pub(crate) fn reap_orphaned_nodes() {
    // Without /proc (not Linux) whether a starter runs is not known here: nothing is touched.
    if !Path::new("/proc/self").exists() {
        return;
    }
    reap_orphaned_nodes_in(&std::env::temp_dir(), |pid| {
        Path::new(&format!("/proc/{pid}")).exists()
    });
}

/// [`reap_orphaned_nodes`] in `temp`, where `running(pid)` tells whether a starter runs.
fn reap_orphaned_nodes_in(temp: &Path, running: impl Fn(u32) -> bool) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let folder = entry.file_name().to_string_lossy().into_owned();
        let Some(starter) = starter_of(&folder) else {
            continue;
        };
        if running(starter) {
            continue; // its run goes on (or the pid is taken again: left for later)
        }
        let dir = entry.path();
        let node = std::fs::read_to_string(dir.join("node.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = node {
            // Exactly the variable our nodes are started with: a longer folder's name (the
            // node of run 123 for run 12's) must not match.
            let mnesia = format!("RABBITMQ_MNESIA_BASE={}", dir.join("mnesia").display());
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let ours = environ
                .split(|b| *b == 0)
                .any(|var| var == mnesia.as_bytes());
            if ours {
                let killed = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                eprintln!(
                    "amqp: {} the RabbitMQ node {folder} (pid {pid}) left by an earlier run",
                    if killed { "stopped" } else { "could not stop" }
                );
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("amqp: warning: could not remove {}: {e}", dir.display());
        }
    }
}

fn stop_local_node(name: &str, env: &[(String, String)], dir: &PathBuf) {
    let stopped = Command::new("rabbitmqctl")
        .args(["-n", name, "stop"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .is_ok_and(|o| o.status.success());
    if !stopped {
        eprintln!("amqp: warning: `rabbitmqctl -n {name} stop` failed; the node may still run");
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("amqp: warning: could not remove {}: {e}", dir.display());
    }
}

fn start_docker() -> Result<Broker> {
    let port = free_port()?;
    let name = format!("herald-amqp-it-{}", std::process::id());
    eprintln!("amqp: starting Docker's rabbitmq:3 as {name} on 127.0.0.1:{port}");
    run(
        "docker run rabbitmq",
        Command::new("docker").args([
            "run",
            "-d",
            "--rm",
            "--name",
            &name,
            "-p",
            &format!("127.0.0.1:{port}:5672"),
            "rabbitmq:3",
        ]),
    )?;
    let stop = {
        let name = name.clone();
        move || {
            let removed = Command::new("docker")
                .args(["rm", "-f", &name])
                .output()
                .is_ok_and(|o| o.status.success());
            if !removed {
                eprintln!("amqp: warning: could not remove container {name}");
            }
        }
    };
    let addr = format!("127.0.0.1:{port}");
    if !wait_ready(&addr, Duration::from_secs(120)) {
        stop();
        bail!("the rabbitmq container did not answer AMQP on {addr} within 120 s");
    }
    Ok(Broker {
        env: vec![(
            "HERALD_AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )],
        stop: Some(Box::new(stop)),
    })
}

/// `cargo xtask bench amqp`: herald vs raw lapin (streaming confirms, same channels and
/// window) vs the naive pattern (await each confirm), persistent 100 B and 1 KiB messages to a
/// durable queue, in one run; rewrites the amqp section of docs/benchmarks.md.
pub(crate) fn bench(root: &Path) -> Result<()> {
    crate::report::Baseline {
        name: "amqp",
        package: "herald-amqp",
        messages: ("HERALD_BENCH_AMQP_MESSAGES", "100000"),
        intro,
        rtts: Some(crate::report::Rtts {
            ms: crate::report::ROUND_TRIPS_MS,
            messages: "50000",
            url_var: "HERALD_AMQP_URL",
            default_port: 5672,
        }),
    }
    .run(root, provision()?)
}

/// The opening of the `amqp` section of docs/benchmarks.md for one run of `amqp-baseline`.
fn intro(json: &serde_json::Value, machine: &str) -> String {
    format!(
        "Run: `cargo xtask bench amqp` on {machine}, broker on the same machine ({}). {} persistent \
         messages per run to a fresh durable classic queue; {} channels × {} unconfirmed.\n\n\
         herald's messages carry 64 keys (spread over the channels) and its `message_id` and \
         key header. The raw runs send bare payloads, except the one \"with herald's \
         `message_id` and key header\": the column \"same properties\" is each variant's \
         ratio to that one, like for like.\n\n",
        json["broker"].as_str().unwrap_or("?"),
        json["messages"],
        json["channels"],
        json["window"],
    )
}

/// Deletes the queue `name` on the broker at `url` (`amqp-baseline --delete-queue`).
pub(crate) fn delete_queue(url: &str, name: &str) -> Result<()> {
    run(
        &format!("delete the queue {name}"),
        crate::process::cargo()
            .args([
                "run",
                "--release",
                "-q",
                "-p",
                "herald-amqp",
                "--features",
                "baseline",
            ])
            .args(["--bin", "amqp-baseline", "--", "--delete-queue", name])
            .env("HERALD_AMQP_URL", url),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_node_folders_name_their_starter_and_no_other_folder_does() {
        assert_eq!(starter_of("herald-xtask-4242"), Some(4242));
        assert_eq!(starter_of("herald-it-4242-35001"), Some(4242));
        assert_eq!(starter_of("herald-cluster-4242-2-35001"), Some(4242));
        for other in [
            "herald-spool-settle-1",
            "herald-it-",
            "rabbitmq",
            "herald-it-x-1",
        ] {
            assert_eq!(starter_of(other), None, "{other}");
        }
    }

    /// A process killed on drop (a failed test leaves none holding its output open).
    struct Killed(std::process::Child);

    impl Drop for Killed {
        fn drop(&mut self) {
            let _gone = self.0.kill();
            let _reaped = self.0.wait();
        }
    }

    /// Stands in for a detached node: a process whose environment names the folder `names`
    /// as a node's names its own, and its pid in `dir/node.pid`.
    fn fake_node(dir: &Path, names: Option<&Path>) -> Killed {
        std::fs::create_dir_all(dir).expect("node folder");
        let mut cmd = Command::new("sleep");
        cmd.arg("600")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(folder) = names {
            cmd.env("RABBITMQ_MNESIA_BASE", folder.join("mnesia"));
        }
        let child = cmd.spawn().expect("sleep runs");
        std::fs::write(dir.join("node.pid"), format!("{}\n", child.id())).expect("pid file");
        Killed(child)
    }

    #[test]
    fn nodes_whose_starter_is_gone_are_stopped_and_their_folders_removed() {
        let temp = std::env::temp_dir().join(format!("xtask-reap-{}", std::process::id()));
        let _absent = std::fs::remove_dir_all(&temp);
        // Starters told apart by the test, not by /proc: a pid that has just exited can be
        // taken again at once (CI's test runs wrap the pid space), and its run then looks alive.
        let (gone, alive) = (4_000_001, std::process::id());
        let orphan_dir = temp.join(format!("herald-it-{gone}-1"));
        let stranger_dir = temp.join(format!("herald-cluster-{gone}-0-2"));
        let live_dir = temp.join(format!("herald-xtask-{alive}"));
        // A stale pid file naming a process whose folder's name only starts like its own.
        let prefix_dir = temp.join(format!("herald-xtask-{gone}"));
        let longer = temp.join(format!("herald-xtask-{gone}7"));
        let mut orphan = fake_node(&orphan_dir, Some(&orphan_dir));
        let mut stranger = fake_node(&stranger_dir, None);
        let mut live = fake_node(&live_dir, Some(&live_dir));
        let mut other = fake_node(&prefix_dir, Some(&longer));
        reap_orphaned_nodes_in(&temp, |pid| pid == alive);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = orphan.0.try_wait().expect("state") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the orphaned node is still running"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success(), "killed: {status:?}");
        assert!(!orphan_dir.exists());
        // A pid that is not its node's is left running; the folder goes all the same.
        assert_eq!(stranger.0.try_wait().expect("state"), None);
        assert!(!stranger_dir.exists());
        assert_eq!(
            other.0.try_wait().expect("state"),
            None,
            "another folder's node"
        );
        assert!(!prefix_dir.exists());
        // A run still going keeps its node.
        assert_eq!(live.0.try_wait().expect("state"), None);
        assert!(live_dir.join("node.pid").exists());
        std::fs::remove_dir_all(&temp).expect("cleanup");
    }
}
