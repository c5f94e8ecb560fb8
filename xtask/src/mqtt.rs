//! An MQTT broker for `cargo xtask it mqtt` and the command's real-broker tests: the one given
//! in `HERALD_MQTT_URL`, else the machine's Mosquitto on 127.0.0.1:1883 when it answers an MQTT
//! CONNECT, else a `mosquitto` of our own on a free port (Debian's `mosquitto`), stopped and
//! its folder removed afterwards. The machine's broker is used as it is, never reconfigured.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::broker::{free_port, port_open, Broker};

const SHARED: &str = "127.0.0.1:1883";

/// An MQTT broker, and `HERALD_MQTT_URL` for the tests.
pub(crate) fn provision() -> Result<Broker> {
    if let Ok(url) = std::env::var("HERALD_MQTT_URL") {
        eprintln!("mqtt: using HERALD_MQTT_URL");
        return Ok(given(url));
    }
    if port_open(SHARED) && answers_mqtt(SHARED) {
        eprintln!("mqtt: using the machine's MQTT broker on {SHARED}");
        return Ok(given(format!("mqtt://{SHARED}")));
    }
    start_own()
}

fn given(url: String) -> Broker {
    Broker {
        env: vec![("HERALD_MQTT_URL", url)],
        stop: None,
    }
}

/// Whether the broker at `addr` accepts an anonymous MQTT 3.1.1 connection (CONNACK return
/// code 0); the probe disconnects at once and leaves no session (Clean Session).
fn answers_mqtt(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _timeout = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let id = b"herald-xtask-probe";
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10];
    body.extend_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap_or(0)];
    packet.extend_from_slice(&body);
    let mut connack = [0u8; 4];
    let ok = stream.write_all(&packet).is_ok()
        && stream.read_exact(&mut connack).is_ok()
        && connack == [0x20, 0x02, connack[2], 0x00];
    // DISCONNECT; the broker closes the connection either way.
    let _sent = stream.write_all(&[0xE0, 0x00]);
    ok
}

/// `mosquitto` on a free port with a configuration of our own, stopped on drop.
fn start_own() -> Result<Broker> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("herald-xtask-mqtt-{port}"));
    let _stale = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).context("mqtt: a folder for mosquitto")?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .context("mqtt: mosquitto's configuration")?;
    let binary = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("mosquitto");
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(
            "mqtt: no MQTT broker on 127.0.0.1:1883 and `mosquitto` could not be started \
             (Debian: apt-get install mosquitto), or set HERALD_MQTT_URL",
        )?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(port_open(&addr) && answers_mqtt(&addr)) {
        if Instant::now() >= deadline || child.try_wait().ok().flatten().is_some() {
            let _killed = child.kill();
            let _reaped = child.wait();
            let _removed = std::fs::remove_dir_all(&dir);
            bail!("mqtt: the mosquitto started on {addr} did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("mqtt: started mosquitto on {addr}");
    Ok(Broker {
        env: vec![("HERALD_MQTT_URL", format!("mqtt://{addr}"))],
        stop: Some(Box::new(move || {
            let _killed = child.kill();
            let _reaped = child.wait();
            let _removed = std::fs::remove_dir_all(&dir);
        })),
    })
}

/// `cargo xtask bench mqtt`: `mqtt-baseline` against the broker, its figures written to
/// `target/bench/mqtt.json` and the `mqtt` section of docs/benchmarks.md.
pub(crate) fn bench(root: &std::path::Path) -> Result<()> {
    crate::report::Baseline {
        name: "mqtt",
        package: "herald-mqtt",
        messages: ("HERALD_BENCH_MQTT_MESSAGES", "100000"),
        intro,
        rtts: None,
    }
    .run(root, provision()?)
}

/// The opening of the `mqtt` section of docs/benchmarks.md for one run of `mqtt-baseline`.
fn intro(json: &serde_json::Value, machine: &str) -> String {
    format!(
        "Run: `cargo xtask bench mqtt` on {machine}, broker on the same machine ({}). {} \
         messages per run, QoS 1, MQTT 5, each run to a topic of its own with no subscriber.\n\n\
         Every variant sends the key and an id as user properties, as herald \
         does; every client sets `TCP_NODELAY` and polls its event loop on a task of its own, as \
         herald does. Mosquitto keeps its default `set_tcp_nodelay false` (see \
         docs/guarantees.md, MQTT, on Nagle).\n\n",
        json["broker"].as_str().unwrap_or("?"),
        json["messages"],
    )
}
