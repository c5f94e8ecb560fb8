//! Kafka for `cargo xtask it` and `cargo xtask bench kafka`.
//!
//! Where a broker comes from, in order: `HERALD_KAFKA_BOOTSTRAP` as given; Docker's
//! `apache/kafka` (tests/docker-compose.yml) where a Docker engine answers; otherwise Tansu, a
//! Kafka-protocol broker, installed once with `cargo install` and started on a free port with
//! in-memory storage. Tests that restart a broker start their own Tansu (`HERALD_TANSU_BIN`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::broker::{docker_engine, free_port, Broker};
use crate::process::{cargo, kill_tree, on_path, project_root, run};
use crate::report::{machine, replace_section, thousands, ROUND_TRIPS_MS};

const TANSU_VERSION: &str = "0.6.0";

/// Finds or starts a broker for the integration tests.
pub(crate) fn provision() -> Result<Broker> {
    let tansu = tansu_bin().ok();
    let mut env = Vec::new();
    if let Some(bin) = &tansu {
        env.push(("HERALD_TANSU_BIN", bin.display().to_string()));
    }
    if let Ok(bootstrap) = std::env::var("HERALD_KAFKA_BOOTSTRAP") {
        eprintln!("kafka: using HERALD_KAFKA_BOOTSTRAP={bootstrap}");
        env.push(("HERALD_KAFKA_BOOTSTRAP", bootstrap));
        return Ok(Broker { env, stop: None });
    }
    if docker_engine() {
        let compose = project_root().join("tests/docker-compose.yml");
        let compose = compose.to_str().context("utf-8 path")?.to_owned();
        run(
            "docker compose up kafka",
            Command::new("docker").args(["compose", "-f", &compose, "up", "-d", "--wait", "kafka"]),
        )?;
        env.push(("HERALD_KAFKA_BOOTSTRAP", "127.0.0.1:9092".into()));
        let stop = move || {
            let stopped = Command::new("docker")
                .args(["compose", "-f", &compose, "rm", "-sf", "kafka"])
                .status();
            if !stopped.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("kafka: could not remove the kafka container: {stopped:?}");
            }
        };
        return Ok(Broker {
            env,
            stop: Some(Box::new(stop)),
        });
    }
    let bin = match tansu {
        Some(bin) => bin,
        None => {
            let bin = install_tansu()?;
            env.push(("HERALD_TANSU_BIN", bin.display().to_string()));
            bin
        }
    };
    // A port free when picked may be taken before Tansu binds it: then Tansu exits at once,
    // and another port is tried.
    let mut attempts = 0;
    let (mut child, addr) = loop {
        attempts += 1;
        let port = free_port()?;
        let mut child = start_tansu(&bin, port, "memory://tansu/")?;
        let addr = format!("127.0.0.1:{port}");
        match wait_for(&addr, Duration::from_secs(60), &mut child) {
            Ok(()) => break (child, addr),
            Err(e) => {
                stop_child(&mut child);
                if attempts >= 3 || !e.is::<crate::broker::ExitedEarly>() {
                    return Err(e);
                }
                eprintln!("kafka: {e:#}; trying another port");
            }
        }
    };
    eprintln!("kafka: Tansu {TANSU_VERSION} on {addr} (memory storage)");
    env.push(("HERALD_KAFKA_BOOTSTRAP", addr));
    let stop = move || stop_child(&mut child);
    Ok(Broker {
        env,
        stop: Some(Box::new(stop)),
    })
}

pub(crate) fn stop_child(child: &mut Child) {
    if let Err(e) = child.kill().and_then(|()| child.wait().map(drop)) {
        eprintln!("kafka: could not stop Tansu (pid {}): {e}", child.id());
    }
}

/// `tansu` at the wanted version, on PATH or in cargo's bin folder.
pub(crate) fn tansu_bin() -> Result<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin/tansu"));
    for candidate in cargo_bin.into_iter().chain([PathBuf::from("tansu")]) {
        let out = Command::new(&candidate).arg("--version").output();
        if let Ok(out) = out {
            if String::from_utf8_lossy(&out.stdout).contains(TANSU_VERSION) {
                return Ok(candidate);
            }
        }
    }
    bail!("tansu {TANSU_VERSION} is not installed")
}

/// `cargo install tansu` at the wanted version, with the features the tests use (`memory://`
/// storage, and `sqlite://` for the restart tests).
fn install_command() -> Command {
    let mut cmd = cargo();
    cmd.args([
        "install",
        "tansu",
        "--version",
        TANSU_VERSION,
        "--features",
        "dynostore,libsql",
        "--locked",
    ]);
    // A folder of its own in the workspace's target, not cargo's temporary one: an install
    // that was stopped (a run that failed first) leaves nothing in /tmp, and the next one in
    // this checkout picks up what it had compiled.
    cmd.arg("--target-dir")
        .arg(project_root().join("target/tansu-install"));
    cmd
}

/// Tansu's install when [`InstallInBackground::start`] began one: taken (and waited for) by
/// [`install_tansu`], killed by the guard's drop when nothing took it.
static BACKGROUND: Mutex<Option<Child>> = Mutex::new(None);

/// Where the background install writes its output.
fn background_log() -> PathBuf {
    project_root().join("target/it/tansu-install.log")
}

/// Tansu's install started before the checks that do not need it, so that its compiling (7 to 18
/// minutes on two cores, measured) overlaps theirs and the time the other brokers' tests spend
/// waiting on their brokers, instead of adding to the run. At lowest priority (`nice -n 19`),
/// so that it takes mostly the CPU the checks in front leave idle (it still shares memory and
/// the disk with them); where there is no `nice`, it is not started in the background, and
/// Kafka's provisioning installs Tansu in front of Kafka's tests as before. The Kafka tests wait for it
/// ([`provision`]). Dropping the guard kills an install that nothing waited for (a run that
/// failed earlier), so no compiler outlives the run.
pub(crate) struct InstallInBackground(());

impl InstallInBackground {
    /// Starts the install where Kafka's provisioning would install Tansu: no broker given, no
    /// Docker engine, Tansu not installed. Otherwise does nothing.
    pub(crate) fn start() -> Result<Self> {
        let mut background = BACKGROUND.lock().expect("not poisoned");
        // Asked once per run (`ci` starts it, `it` asks again): the probes below run a
        // `tansu --version` and a `docker info`, not worth repeating for an install under way.
        let needed = background.is_none()
            && std::env::var_os("HERALD_KAFKA_BOOTSTRAP").is_none()
            && tansu_bin().is_err()
            && !docker_engine()
            && on_path("nice");
        if needed {
            let log_path = background_log();
            std::fs::create_dir_all(log_path.parent().context("target/it")?)?;
            let log = std::fs::File::create(&log_path)?;
            let install = install_command();
            let mut cmd = Command::new("nice");
            cmd.args(["-n", "19"])
                .arg(install.get_program())
                .args(install.get_args())
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log));
            eprintln!(
                "kafka: installing Tansu {TANSU_VERSION} in the background for the Kafka tests \
                 (output in {})",
                log_path.display()
            );
            match cmd.spawn() {
                Ok(child) => *background = Some(child),
                // Not fatal: Kafka's provisioning installs it in the foreground instead.
                Err(e) => eprintln!(
                    "kafka: could not start Tansu's install in the background ({e}); it will \
                     be installed before Kafka's tests"
                ),
            }
        }
        Ok(InstallInBackground(()))
    }
}

impl Drop for InstallInBackground {
    fn drop(&mut self) {
        let taken = BACKGROUND.lock().map(|mut b| b.take());
        if let Ok(Some(mut child)) = taken {
            if let Ok(None) = child.try_wait() {
                eprintln!("kafka: stopping Tansu's install: nothing needs it any more");
                kill_tree(&mut child);
            }
        }
    }
}

fn install_tansu() -> Result<PathBuf> {
    let background = BACKGROUND.lock().expect("not poisoned").take();
    if let Some(mut child) = background {
        let log = background_log();
        eprintln!(
            "kafka: waiting for Tansu's install in the background (output in {})",
            log.display()
        );
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "installing Tansu {TANSU_VERSION} failed ({status}): see {}",
                log.display()
            );
        }
        return tansu_bin();
    }
    eprintln!("kafka: installing Tansu {TANSU_VERSION} (once; 7 to 18 minutes on 2 cores)");
    run("cargo install tansu", &mut install_command())?;
    tansu_bin()
}

/// Starts `tansu broker` on `port` with `storage`; its output goes to target/it/tansu-PORT.log.
fn start_tansu(bin: &Path, port: u16, storage: &str) -> Result<Child> {
    start_tansu_advertising(bin, port, port, storage)
}

/// As `start_tansu`, telling clients to connect to `advertised` (a proxy's port) instead.
pub(crate) fn start_tansu_advertising(
    bin: &Path,
    port: u16,
    advertised: u16,
    storage: &str,
) -> Result<Child> {
    let logs = project_root().join("target/it");
    std::fs::create_dir_all(&logs)?;
    let log = std::fs::File::create(logs.join(format!("tansu-{port}.log")))?;
    let url = format!("tcp://127.0.0.1:{port}");
    Command::new(bin)
        .arg("broker")
        .env("LISTENER_URL", &url)
        .env(
            "ADVERTISED_LISTENER_URL",
            format!("tcp://127.0.0.1:{advertised}"),
        )
        .env("STORAGE_ENGINE", storage)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()))
}

/// Waits until the Tansu started on `addr` (`child`) listens; fails at once if it exits.
pub(crate) fn wait_for(addr: &str, limit: Duration, child: &mut Child) -> Result<()> {
    crate::broker::wait_listening(addr, limit, ": see target/it/tansu-*.log", Some(child))
}

/// `cargo xtask bench kafka`: herald, raw rdkafka at its best and the naive pattern on one
/// broker in one run; rewrites the Kafka section of docs/benchmarks.md.
pub(crate) fn bench(root: &Path) -> Result<()> {
    let broker = provision()?;
    let bootstrap = broker.var("HERALD_KAFKA_BOOTSTRAP")?;
    let out = root.join("target/bench/kafka.json");
    std::fs::create_dir_all(out.parent().context("target/bench")?)?;
    let messages =
        std::env::var("HERALD_BENCH_KAFKA_MESSAGES").unwrap_or_else(|_| "1000000".into());
    run(
        "kafka benchmark",
        bench_example().args([
            "--bootstrap",
            &bootstrap,
            "--messages",
            &messages,
            "--naive",
            "300",
            "--json",
            out.to_str().context("utf-8 path")?,
        ]),
    )?;
    drop(broker);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let mut body = format!(
        "Run: `cargo xtask bench kafka` on {}, against {} (Tansu `memory://` when no other broker is given); herald at its default settings; 5 rounds, raw and herald alternating (who goes first too), rates the medians, herald / raw taken within each round (median, range).\n\n",
        machine(),
        bootstrap
    );
    body.push_str("| message | messages | raw rdkafka best (msgs/s) | herald (msgs/s) | naive (msgs/s) | herald / raw | herald / naive |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for r in json["rows"].as_array().context("rows")? {
        let raw = r["raw_best_msgs_per_sec"].as_f64().unwrap_or(0.0);
        let her = r["herald_msgs_per_sec"].as_f64().unwrap_or(0.0);
        let naive = r["naive_msgs_per_sec"].as_f64().unwrap_or(0.0);
        body.push_str(&format!(
            "| {} B | {} | {} | {} | {:.0} | {} | {:.0}× |\n",
            r["size"],
            r["messages"],
            thousands(raw),
            thousands(her),
            naive,
            vs_raw(r),
            her / naive
        ));
    }
    replace_section(&root.join("docs/benchmarks.md"), "kafka", &body)?;
    eprintln!("docs/benchmarks.md: kafka section updated");
    bench_rtt(root)
}

/// herald / raw of a row of the Kafka benchmark: taken within each round, the median and the
/// range (`0.91× (0.85×–0.97×)`); from the two medians in files written before it said so.
pub(crate) fn vs_raw(row: &serde_json::Value) -> String {
    if row.get("vs_raw").is_some() {
        crate::report::with_range(row, "vs_raw", crate::report::times)
    } else {
        let raw = row["raw_best_msgs_per_sec"].as_f64().unwrap_or(0.0);
        crate::report::times(row["herald_msgs_per_sec"].as_f64().unwrap_or(0.0) / raw)
    }
}

/// `cargo run --release -p herald-kafka --features baseline --example bench --`, its
/// arguments to follow.
fn bench_example() -> Command {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "herald-kafka",
        "--features",
        "baseline",
    ])
    .args(["--example", "bench", "--"]);
    cmd
}

/// Messages per run of `bench_rtt` (at each of `ROUND_TRIPS_MS`).
const RTT_MESSAGES: &str = "200000";

/// The Kafka benchmark again at 2 and 10 ms of round trip: for each, a Tansu of its own that
/// advertises the address of the benchmark's delaying proxy (so that every connection, the
/// one to the partition leader included, takes the round trip), 3 rounds. Needs Tansu; with
/// a broker given by `HERALD_KAFKA_BOOTSTRAP` or Docker's, says so and skips.
pub(crate) fn bench_rtt(root: &Path) -> Result<()> {
    let Ok(bin) = tansu_bin() else {
        eprintln!("kafka: no Tansu here, so no round-trip runs (they need a broker that advertises the proxy's address)");
        return Ok(());
    };
    let proxy_bin = crate::proxy::build(root)?;
    let mut rows = Vec::new();
    for &rtt in ROUND_TRIPS_MS {
        let (port, proxy) = (free_port()?, free_port()?);
        let mut child = start_tansu_advertising(&bin, port, proxy, "memory://tansu/")?;
        let out = root.join(format!("target/bench/kafka-rtt-{rtt}.json"));
        let result = wait_for(
            &format!("127.0.0.1:{port}"),
            Duration::from_secs(60),
            &mut child,
        )
        .and_then(|()| {
            let _proxy = crate::proxy::DelayProxy::start(
                &proxy_bin,
                proxy,
                &format!("127.0.0.1:{port}"),
                rtt,
            )?;
            run(
                &format!("kafka benchmark at {rtt} ms round trip"),
                bench_example()
                    .args(["--bootstrap", &format!("127.0.0.1:{proxy}")])
                    .args(["--rtt-ms", &rtt.to_string()])
                    .args([
                        "--messages",
                        RTT_MESSAGES,
                        "--rounds",
                        "3",
                        "--naive",
                        "100",
                    ])
                    .args(["--json", out.to_str().context("utf-8 path")?]),
            )
        });
        stop_child(&mut child);
        result?;
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        for r in json["rows"].as_array().context("rows")? {
            let raw = r["raw_best_msgs_per_sec"].as_f64().unwrap_or(0.0);
            let her = r["herald_msgs_per_sec"].as_f64().unwrap_or(0.0);
            let naive = r["naive_msgs_per_sec"].as_f64().unwrap_or(0.0);
            rows.push(format!(
                "| {rtt} ms | {} B | {} | {} | {} | {naive:.0} | {} |\n",
                r["size"],
                r["messages"],
                thousands(raw),
                thousands(her),
                vs_raw(r)
            ));
        }
    }
    let mut body = format!(
        "Run: `cargo xtask bench kafka` on {}: every variant through herald-testkit's delaying proxy, a process of its own (`delay_proxy`: half the round trip each way, throughput not limited), Tansu `memory://` advertising the proxy's address; 3 rounds, raw and herald alternating (who goes first too), rates the medians, herald / raw taken within each round (median, range); naive 100 messages.\n\n",
        machine()
    );
    body.push_str("| round trip | message | messages | raw rdkafka best (msgs/s) | herald (msgs/s) | naive (msgs/s) | herald / raw |\n|---:|---|---:|---:|---:|---:|---:|\n");
    body.extend(rows);
    replace_section(&root.join("docs/benchmarks.md"), "kafka-rtt", &body)?;
    eprintln!("docs/benchmarks.md: kafka-rtt section updated");
    Ok(())
}
