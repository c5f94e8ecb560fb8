//! herald's project chores, one entry point: `cargo xtask <command>`.
//!
//! - `ci`: what CI runs: format check, clippy with warnings as errors, every test of the
//!   workspace (unit, property, conformance, mock-cluster, doc tests), the alert rules' promtool
//!   tests, the docs with warnings as errors, then `it` (every broker).
//! - `rules`: `promtool check rules` and `promtool test rules` on docs/operations (see
//!   `rules.rs`).
//! - `bench [pipeline]`: runs the benchmarks and rewrites their section of docs/benchmarks.md.
//!
//! - `it [kafka|amqp|cli]`: integration tests against real brokers, found or started (see
//!   `it.rs`): each adapter's `tests/it.rs`, and the `herald` command's `tests/real_brokers.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod amqp;
mod chart;
mod it;
mod kafka;
mod rules;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&root, &args[1..]),
        Some("it") => it::it(&args[1..]),
        Some("rules") => rules::test(&root),
        Some("help") | Some("--help") | None => {
            println!("{}", HELP);
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}

const HELP: &str = "cargo xtask <command>

commands:
  ci                 fmt check, clippy -D warnings, all workspace tests, rules, docs -D warnings, it
  rules              promtool check and unit tests of docs/operations/alerts.yml
  it [TARGET...]     integration tests against real brokers (kafka, amqp, cli), provisioned and torn down
  bench [NAME]       run benchmarks (pipeline, kafka, amqp; default all), rewrite docs/benchmarks.md
                     and docs/benchmarks-throughput.svg (`summary`: only those, from the last runs)";

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Whether `program` is on the PATH.
pub(crate) fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `apt-get ARGS` without questions, in `dir` if given; whether it succeeded.
pub(crate) fn apt_get(args: &[&str], dir: Option<&Path>) -> bool {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.status().is_ok_and(|s| s.success())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("\n==> {what}: {}", shown(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// As [`run`], but a command still running after `limit` is killed with everything it
/// started (cargo, the test binary, the brokers the tests spawned) and counts as failed: a hung
/// test must end the run with a clear error, not hold CI until its own time limit.
fn run_within(what: &str, cmd: &mut Command, limit: Duration) -> Result<()> {
    eprintln!(
        "\n==> {what} (time limit {} s): {}",
        limit.as_secs(),
        shown(cmd)
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {what}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{what} failed ({status})");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut pids = descendants(child.id());
            pids.push(child.id());
            for pid in &pids {
                // Already gone is fine: the kill is only to end what still runs.
                let _gone = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            let _reaped = child.wait();
            bail!(
                "{what} was still running after {} s and was killed (the test printed last \
                 above without a result is the one that hung; raise the limit with \
                 HERALD_IT_TIMEOUT_SECS if the machine is just slow)",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every process below `pid` (children, their children, ...), from /proc; empty where there is
/// no /proc. Daemons that left the tree (a detached broker) are not included.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so split after
        // the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((child, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, ppid) in &parent_of {
            if ppid == p && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

fn ci() -> Result<()> {
    run(
        "format check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            // The benchmark baselines and every facade part, not only the defaults.
            "--features",
            "herald-kafka/baseline,herald-amqp/baseline,herald/full",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run("tests", cargo().args(["test", "--workspace"]))?;
    rules::test(&project_root())?;
    run(
        "docs",
        cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    // Real brokers last: found or started, tested, and stopped again.
    it::it(&[])?;
    eprintln!("\nxtask ci: all checks passed");
    Ok(())
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    let which = args.first().map(String::as_str).unwrap_or("all");
    match which {
        "pipeline" => bench_pipeline(root)?,
        "kafka" => kafka::bench(root)?,
        "amqp" => amqp::bench(root)?,
        "all" => {
            bench_pipeline(root)?;
            kafka::bench(root)?;
            amqp::bench(root)?;
        }
        "summary" => {}
        other => bail!("unknown benchmark `{other}`: pipeline, kafka, amqp, summary"),
    }
    // The summary reads whatever runs are in target/bench, this one included.
    bench_summary(root)
}

/// One broker and message size: herald against the raw client at its best and the naive pattern.
struct Row {
    broker: &'static str,
    size: u64,
    herald: f64,
    raw: f64,
    naive: f64,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The rows of the last Kafka and RabbitMQ runs (target/bench/*.json), where there are some.
fn broker_rows(root: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    if let Some(k) = read_json(&root.join("target/bench/kafka.json")) {
        for r in k["rows"].as_array().into_iter().flatten() {
            rows.push(Row {
                broker: "Kafka",
                size: r["size"].as_u64().unwrap_or(0),
                herald: r["herald_msgs_per_sec"].as_f64().unwrap_or(0.0),
                raw: r["raw_best_msgs_per_sec"].as_f64().unwrap_or(0.0),
                naive: r["naive_msgs_per_sec"].as_f64().unwrap_or(0.0),
            });
        }
    }
    if let Some(a) = read_json(&root.join("target/bench/amqp.json")) {
        let figures = a["figures"].as_array().cloned().unwrap_or_default();
        let mut sizes: Vec<u64> = figures
            .iter()
            .filter_map(|f| f["payload_bytes"].as_u64())
            .collect();
        sizes.dedup();
        for size in sizes {
            let rate = |name: &str| {
                figures
                    .iter()
                    .find(|f| f["payload_bytes"].as_u64() == Some(size) && f["name"] == name)
                    .and_then(|f| f["msgs_per_sec"].as_f64())
                    .unwrap_or(0.0)
            };
            rows.push(Row {
                broker: "RabbitMQ",
                size,
                herald: rate("herald_default"),
                raw: rate("raw_streaming"),
                naive: rate("raw_naive"),
            });
        }
    }
    rows
}

/// The summary table and the throughput chart, from the last runs of every benchmark.
fn bench_summary(root: &Path) -> Result<()> {
    let rows = broker_rows(root);
    let mut body = format!(
        "From the runs below (`cargo xtask bench`, {}). Chart: [benchmarks-throughput.svg](benchmarks-throughput.svg) (log scale).\n\n",
        machine()
    );
    body.push_str("| broker | message | herald (msgs/s) | raw client at its best (msgs/s) | naive: await each send (msgs/s) | herald / raw | herald / naive |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        body.push_str(&format!(
            "| {} | {} B | {} | {} | {} | {:.2}× | {:.0}× |\n",
            r.broker,
            r.size,
            thousands(r.herald),
            thousands(r.raw),
            thousands(r.naive),
            r.herald / r.raw,
            r.herald / r.naive
        ));
    }
    if let Some(p) = read_json(&root.join("target/bench/pipeline.json")) {
        let figure = |name: &str| {
            p["figures"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["name"] == name))
                .and_then(|f| f["msgs_per_sec"].as_f64())
                .unwrap_or(0.0)
        };
        let (herald, channel) = (figure("herald_send_all"), figure("channel"));
        body.push_str(&format!(
            "| pipeline alone (in-memory transport) | 100 B | {} | {} (bare tokio channel) | | {:.2}× | |\n",
            thousands(herald),
            thousands(channel),
            herald / channel
        ));
    }
    replace_section(&root.join("docs/benchmarks.md"), "summary", &body)?;
    let groups: Vec<chart::Group> = rows
        .iter()
        .map(|r| chart::Group {
            label: format!("{} {} B", r.broker, r.size),
            values: vec![r.herald, r.raw, r.naive],
        })
        .collect();
    let svg = chart::bars(
        "Throughput by broker and message size (msgs/s, log scale)",
        "messages per second",
        &[
            "herald",
            "raw client at its best",
            "naive (await each send)",
        ],
        &groups,
    );
    std::fs::write(root.join("docs/benchmarks-throughput.svg"), svg)?;
    eprintln!("docs/benchmarks.md: summary updated; docs/benchmarks-throughput.svg written");
    Ok(())
}

fn bench_pipeline(root: &Path) -> Result<()> {
    let out = root.join("target/bench/pipeline.json");
    std::fs::create_dir_all(out.parent().context("target/bench")?)?;
    let messages = std::env::var("HERALD_BENCH_MESSAGES").unwrap_or_else(|_| "2000000".into());
    run(
        "pipeline benchmark",
        cargo().args([
            "bench",
            "-p",
            "herald",
            "--bench",
            "pipeline",
            "--",
            "--messages",
            &messages,
            "--json",
            out.to_str().context("utf-8 path")?,
        ]),
    )?;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let mut table = String::new();
    table.push_str(&format!(
        "Run: `cargo xtask bench pipeline` on {}. {} messages of {} bytes, median of {} rounds.\n\n",
        machine(),
        json["messages"],
        json["payload_bytes"],
        json["rounds"]
    ));
    table.push_str("| variant | runtime | msgs/s | ns/msg | vs channel (same runtime) |\n|---|---|---:|---:|---:|\n");
    for f in json["figures"].as_array().context("figures")? {
        table.push_str(&format!(
            "| {} ({}) | {} | {} | {:.1} | {:.2}× |\n",
            f["name"].as_str().unwrap_or("?"),
            f["what"].as_str().unwrap_or("?"),
            f["runtime"].as_str().unwrap_or("?"),
            thousands(f["msgs_per_sec"].as_f64().unwrap_or(0.0)),
            f["ns_per_msg"].as_f64().unwrap_or(0.0),
            f["ratio_vs_channel"].as_f64().unwrap_or(0.0),
        ));
    }
    if let Some(ratio) = json["telemetry_ratio"].as_f64() {
        table.push_str(&format!(
            "\nTelemetry overhead: `herald_send_all` with herald-telemetry's Prometheus recorder recording every metric runs at {ratio:.2}× the rate of `herald_send_all` with no recorder (same run).\n"
        ));
    }
    replace_section(&root.join("docs/benchmarks.md"), "pipeline", &table)?;
    eprintln!("docs/benchmarks.md: pipeline section updated");
    Ok(())
}

/// A command as it may appear in a log: program and arguments, and the names of the environment
/// variables it sets but never their values (`HERALD_AMQP_URL` can hold a password).
fn shown(cmd: &Command) -> String {
    let mut s = String::new();
    for (key, _) in cmd.get_envs() {
        s.push_str(&format!("{}=<set> ", key.to_string_lossy()));
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Rewrites the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
fn replace_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        bail!("{} has no {begin} … {end} section", path.display());
    };
    let new = format!("{}{begin}\n{body}{}", &text[..b], &text[e..]);
    std::fs::write(path, new)?;
    Ok(())
}

fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// What the figures were measured on: CPU model, cores, date.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {date}")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn a_command_past_its_time_limit_is_killed_with_its_children() {
        let pid_file = std::env::temp_dir().join(format!("xtask-watchdog-{}", std::process::id()));
        let start = Instant::now();
        // A shell with a child of its own, as cargo runs the test binary.
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("sleep 30 & echo $! > {}; wait", pid_file.display()));
        let err = super::run_within("sleepy", &mut cmd, Duration::from_secs(1))
            .expect_err("past its limit");
        assert!(err.to_string().contains("still running after 1 s"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        let pid = std::fs::read_to_string(&pid_file).expect("the shell wrote its child's pid");
        let _removed = std::fs::remove_file(&pid_file);
        // Gone, or a zombie waiting for init to reap it: not running.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
        let running = stat.is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        });
        assert!(!running, "the child {} outlived the watchdog", pid.trim());
        let mut ok = std::process::Command::new("true");
        super::run_within("quick", &mut ok, Duration::from_secs(20)).expect("within its limit");
    }

    #[test]
    fn logged_commands_never_show_environment_values() {
        let mut cmd = std::process::Command::new("cargo");
        cmd.arg("test")
            .env("HERALD_AMQP_URL", "amqp://app:s3cret@rabbit/%2f");
        let line = super::shown(&cmd);
        assert!(!line.contains("s3cret"), "{line}");
        assert!(
            line.contains("HERALD_AMQP_URL=<set>") && line.ends_with("cargo test"),
            "{line}"
        );
    }
}
