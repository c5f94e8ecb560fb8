//! Redis for `cargo xtask it redis`, `cargo xtask bench redis` and the command's real-broker
//! tests: the one given in `HERALD_REDIS_URL`, else the machine's server on 127.0.0.1:6379 when
//! it answers PING, else a `redis-server` of our own on a free port (Debian's `redis-server`;
//! nothing kept on disk), stopped afterwards.
//!
//! The machine's server is shared: the tests use keys of their own and delete them; nothing
//! here flushes or reconfigures it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::broker::{free_port, Broker};

const SHARED: &str = "127.0.0.1:6379";

/// A Redis server, and `HERALD_REDIS_URL` for the tests.
pub(crate) fn provision() -> Result<Broker> {
    if let Ok(url) = std::env::var("HERALD_REDIS_URL") {
        eprintln!("redis: using HERALD_REDIS_URL");
        return Ok(given(url));
    }
    if answers(SHARED) {
        eprintln!("redis: using the machine's Redis on {SHARED}");
        return Ok(given(format!("redis://{SHARED}")));
    }
    start_own()
}

fn given(url: String) -> Broker {
    Broker {
        env: vec![("HERALD_REDIS_URL", url)],
        stop: None,
    }
}

/// Whether the server at `addr` answers `PING` with `+PONG` within 2 s.
fn answers(addr: &str) -> bool {
    let Ok(addr) = addr.parse() else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _timeout = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 16];
    stream.write_all(b"PING\r\n").is_ok()
        && stream
            .read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// `redis-server` on a free port, nothing on disk (no RDB, no AOF), stopped on drop.
fn start_own() -> Result<Broker> {
    let port = free_port()?;
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(
            "redis: nothing answers on 127.0.0.1:6379 and `redis-server` could not be started \
             (Debian: apt-get install redis-server), or set HERALD_REDIS_URL",
        )?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answers(&addr) {
        if Instant::now() >= deadline || child.try_wait().ok().flatten().is_some() {
            let _killed = child.kill();
            let _reaped = child.wait();
            bail!("redis: the redis-server started on {addr} did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("redis: started redis-server on {addr}");
    Ok(Broker {
        env: vec![("HERALD_REDIS_URL", format!("redis://{addr}"))],
        stop: Some(Box::new(move || {
            let _killed = child.kill();
            let _reaped = child.wait();
        })),
    })
}

/// `cargo xtask bench redis`: the `redis-baseline` binary (raw redis-rs pipelined and naive,
/// herald in three settings, 100 B and 1 KiB) against the Redis that [`provision`] finds,
/// its figures in target/bench/redis.json and the `redis` section of docs/benchmarks.md.
pub(crate) fn bench(root: &Path) -> Result<()> {
    crate::report::Baseline {
        name: "redis",
        package: "herald-redis",
        messages: ("HERALD_BENCH_REDIS_MESSAGES", "200000"),
        intro,
        rtts: None,
    }
    .run(root, provision()?)
}

/// The opening of the `redis` section of docs/benchmarks.md for one run of `redis-baseline`.
fn intro(json: &serde_json::Value, machine: &str) -> String {
    format!(
        "Run: `cargo xtask bench redis` on {machine}, server on the same machine ({}). {} \
         messages per run to a fresh stream; the raw run sends pipelines of {} `XADD`s, {} in \
         flight on one multiplexed connection.\n\n\
         Both write the same entries: `payload`, `key` (64 keys) and `id` (the \
         herald id; the raw run makes one per message).\n\n",
        json["broker"].as_str().unwrap_or("?"),
        json["messages"],
        json["pipeline"],
        json["in_flight"],
    )
}
