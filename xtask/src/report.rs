//! Writing measured figures into the docs: a section of a Markdown file, numbers with
//! thousands separators, and the machine the figures were measured on.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The round trips (ms) the Kafka and RabbitMQ benchmarks add through the delaying proxy,
/// after their runs on localhost; the summary and the chart show them too.
pub(crate) const ROUND_TRIPS_MS: &[u64] = &[2, 10];

/// Rewrites the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
pub(crate) fn replace_section(path: &Path, name: &str, body: &str) -> Result<()> {
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

/// `x` rounded, its digits grouped by three with spaces: `1 234 567`.
pub(crate) fn thousands(x: f64) -> String {
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
pub(crate) fn machine() -> String {
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

/// One run of a broker's `*-baseline` binary (herald-amqp, -nats, -redis, -mqtt: they all write
/// the same JSON, a list of figures per payload size and variant).
pub(crate) struct Baseline<'a> {
    /// The benchmark's name: `target/bench/{name}.json`, the `{name}` section of
    /// docs/benchmarks.md, `cargo xtask bench {name}`.
    pub(crate) name: &'a str,
    /// The crate whose `{name}-baseline` binary (feature `baseline`) runs it.
    pub(crate) package: &'a str,
    /// Messages per run: the environment variable that overrides it, and the default.
    pub(crate) messages: (&'a str, &'a str),
    /// The section's opening: what was run, where, and what to expect of the figures.
    pub(crate) intro: fn(&serde_json::Value, &str) -> String,
    /// Round trips (ms) to run again at, through the testkit's delaying proxy (`--rtt-ms`), into
    /// the `{name}-rtt` section, with this many messages per run; empty: none.
    pub(crate) rtts: (&'a [u64], &'a str),
}

impl Baseline<'_> {
    /// Runs the binary against `broker` (stopped afterwards, whatever happens), writes its
    /// figures to target/bench and its section of docs/benchmarks.md.
    pub(crate) fn run(&self, root: &Path, broker: crate::broker::Broker) -> Result<()> {
        use anyhow::Context;
        let out = root.join(format!("target/bench/{}.json", self.name));
        std::fs::create_dir_all(out.parent().context("target/bench")?)?;
        let (var, default) = self.messages;
        let messages = std::env::var(var).unwrap_or_else(|_| default.into());
        let result = self.run_binary(&broker, &messages, None, &out);
        let mut rtt_runs = Vec::new();
        if result.is_ok() {
            for &rtt in self.rtts.0 {
                let out = root.join(format!("target/bench/{}-rtt-{rtt}.json", self.name));
                let run = self.run_binary(&broker, self.rtts.1, Some(rtt), &out);
                rtt_runs.push((rtt, run.map(|()| out)));
            }
        }
        drop(broker);
        result?;
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        let mut table = (self.intro)(&json, &machine());
        table.push_str(&figures_table(&json)?);
        replace_section(&root.join("docs/benchmarks.md"), self.name, &table)?;
        eprintln!(
            "docs/benchmarks.md: {} section updated\n\n{table}",
            self.name
        );
        if rtt_runs.is_empty() {
            return Ok(());
        }
        let mut rtt_table = format!(
            "Run: `cargo xtask bench {}` on {}: the same variants again, {} messages each, every \
             variant through herald-testkit's `FaultProxy::start_with_latency` (half the round \
             trip each way, throughput not limited). One run each: expect ±15 %.\n\n",
            self.name,
            machine(),
            self.rtts.1
        );
        rtt_table.push_str(
            "| round trip | payload | variant | msgs/s | vs raw best |\n|---:|---|---|---:|---:|\n",
        );
        for (rtt, run) in rtt_runs {
            let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run?)?)?;
            for f in json["figures"].as_array().context("figures")? {
                rtt_table.push_str(&format!(
                    "| {rtt} ms | {} B | {} | {} | {:.2}× |\n",
                    f["payload_bytes"],
                    f["what"].as_str().unwrap_or("?"),
                    thousands(f["msgs_per_sec"].as_f64().unwrap_or(0.0)),
                    f["vs_raw"].as_f64().unwrap_or(0.0),
                ));
            }
        }
        let section = format!("{}-rtt", self.name);
        replace_section(&root.join("docs/benchmarks.md"), &section, &rtt_table)?;
        eprintln!("docs/benchmarks.md: {section} section updated\n\n{rtt_table}");
        Ok(())
    }

    /// One run of the binary against `broker`, through a proxy adding `rtt` ms if given.
    fn run_binary(
        &self,
        broker: &crate::broker::Broker,
        messages: &str,
        rtt: Option<u64>,
        out: &Path,
    ) -> Result<()> {
        use anyhow::Context;
        let bin = format!("{}-baseline", self.name);
        let mut cmd = crate::process::cargo();
        cmd.args([
            "run",
            "--release",
            "-p",
            self.package,
            "--features",
            "baseline",
            "--bin",
            &bin,
            "--",
            "--messages",
            messages,
            "--json",
            out.to_str().context("utf-8 path")?,
        ]);
        let what = match rtt {
            Some(ms) => {
                cmd.args(["--rtt-ms", &ms.to_string()]);
                format!("{} benchmark at {ms} ms round trip", self.name)
            }
            None => format!("{} benchmark", self.name),
        };
        for (k, v) in &broker.env {
            cmd.env(k, v);
        }
        crate::process::run(&what, &mut cmd)
    }
}

/// The figures of a `*-baseline` run as a table: payload, variant, rate, against raw and naive.
pub(crate) fn figures_table(json: &serde_json::Value) -> Result<String> {
    use anyhow::Context;
    let mut table = String::from(
        "| payload | variant | msgs/s | vs raw best | vs naive |\n|---|---|---:|---:|---:|\n",
    );
    for f in json["figures"].as_array().context("figures")? {
        table.push_str(&format!(
            "| {} B | {} | {} | {:.2}× | {:.1}× |\n",
            f["payload_bytes"],
            f["what"].as_str().unwrap_or("?"),
            thousands(f["msgs_per_sec"].as_f64().unwrap_or(0.0)),
            f["vs_raw"].as_f64().unwrap_or(0.0),
            f["vs_naive"].as_f64().unwrap_or(0.0),
        ));
    }
    Ok(table)
}
