//! NATS with JetStream for `cargo xtask it nats` and the command's real-broker tests: the one
//! given in `HERALD_NATS_URL`, else the machine's server on 127.0.0.1:4222 when it has
//! JetStream, else a `nats-server -js` of our own on a free port (Debian's `nats-server`),
//! stopped and its store removed afterwards.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::broker::{free_port, port_open, Broker};

const SHARED: &str = "127.0.0.1:4222";

/// A NATS server with JetStream, and `HERALD_NATS_URL` for the tests.
pub(crate) fn provision() -> Result<Broker> {
    if let Ok(url) = std::env::var("HERALD_NATS_URL") {
        eprintln!("nats: using HERALD_NATS_URL");
        return Ok(given(url));
    }
    if port_open(SHARED) && has_jetstream(SHARED) {
        eprintln!("nats: using the machine's NATS server on {SHARED} (JetStream on)");
        return Ok(given(format!("nats://{SHARED}")));
    }
    start_own()
}

fn given(url: String) -> Broker {
    Broker {
        env: vec![("HERALD_NATS_URL", url)],
        stop: None,
    }
}

/// Whether the server at `addr` says, in its INFO line, that JetStream is on.
fn has_jetstream(addr: &str) -> bool {
    let Ok(stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _timeout = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok()
        && line.starts_with("INFO ")
        && line.contains("\"jetstream\":true")
}

/// `nats-server -js` on a free port with its own store folder, stopped on drop.
fn start_own() -> Result<Broker> {
    let port = free_port()?;
    let store = std::env::temp_dir().join(format!("herald-xtask-nats-{port}"));
    let _stale = std::fs::remove_dir_all(&store);
    let mut child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(
            "nats: no NATS server with JetStream on 127.0.0.1:4222 and `nats-server` could not \
             be started (Debian: apt-get install nats-server), or set HERALD_NATS_URL",
        )?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !has_jetstream(&addr) {
        if Instant::now() >= deadline || child.try_wait().ok().flatten().is_some() {
            let _killed = child.kill();
            let _reaped = child.wait();
            let _removed = std::fs::remove_dir_all(&store);
            bail!(
                "nats: the nats-server started on {addr} did not answer with JetStream within 30 s"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("nats: started nats-server -js on {addr}");
    Ok(Broker {
        env: vec![("HERALD_NATS_URL", format!("nats://{addr}"))],
        stop: Some(Box::new(move || {
            let _killed = child.kill();
            let _reaped = child.wait();
            let _removed = std::fs::remove_dir_all(&store);
        })),
    })
}

/// `cargo xtask bench nats`: `nats-baseline` against the JetStream server [`provision`] finds,
/// its figures in `target/bench/nats.json` and the `nats` section of docs/benchmarks.md.
pub(crate) fn bench(root: &std::path::Path) -> Result<()> {
    crate::report::Baseline {
        name: "nats",
        package: "herald-nats",
        messages: ("HERALD_BENCH_NATS_MESSAGES", "100000"),
        intro,
        rtts: None,
    }
    .run(root, provision()?)
}

/// The opening of the `nats` section of docs/benchmarks.md for one run of `nats-baseline`.
fn intro(json: &serde_json::Value, machine: &str) -> String {
    format!(
        "Run: `cargo xtask bench nats` on {machine}, server on the same machine ({}). {} \
         messages per run to a fresh file-backed JetStream stream, PubAcks awaited as they come \
         (raw: a window of {} outstanding).\n\n\
         Every variant sends the key and an id (`Nats-Msg-Id`, which JetStream \
         indexes for its duplicate window) as headers, as herald does.\n\n",
        json["broker"].as_str().unwrap_or("?"),
        json["messages"],
        json["window"],
    )
}
