//! `cargo xtask bench latency`: latency under a steady load. The `herald` command in open loop
//! (`herald bench --rate R --baseline`): herald and the raw client each send on the same fixed
//! schedule, and every message is timed from its due time to its acknowledgement. Kafka (Tansu)
//! and RabbitMQ, at two rates each, three rounds (herald then raw in each), medians with their
//! range; rewrites the `latency` section of docs/benchmarks.md.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::process::{cargo, run};
use crate::report::{machine, replace_section, thousands};
use crate::{amqp, kafka};

/// Seconds of sending per run (`HERALD_BENCH_LATENCY_SECONDS` to change).
const SECONDS: u64 = 5;
const ROUNDS: usize = 3;
/// Rates (msgs/s): Kafka takes 100 000 with room to spare on this machine; RabbitMQ's raw best
/// is about 20 000 persistent messages a second here, so 10 000 is half its capacity.
const KAFKA_RATES: &[u64] = &[10_000, 100_000];
const AMQP_RATES: &[u64] = &[1_000, 10_000];

/// One round's figures (ms) for herald or raw: p50, p99, p99.9.
type Quantiles = [f64; 3];

struct Row {
    broker: &'static str,
    rate: u64,
    herald: Vec<Quantiles>,
    raw: Vec<Quantiles>,
}

fn quantiles(json: &serde_json::Value, prefix: &str) -> Result<Quantiles> {
    let get = |name: &str| {
        json[format!("{prefix}{name}")]
            .as_f64()
            .with_context(|| format!("no {prefix}{name} in {json}"))
    };
    Ok([get("p50_ms")?, get("p99_ms")?, get("p999_ms")?])
}

/// Runs `herald bench --rate` once and returns herald's and raw's quantiles.
fn round(herald: &Path, to: &str, rate: u64) -> Result<(Quantiles, Quantiles)> {
    let seconds: u64 = std::env::var("HERALD_BENCH_LATENCY_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SECONDS);
    let out = Command::new(herald)
        .args(["bench", "--to", to, "--baseline", "--report", "json"])
        .args(["--rate", &rate.to_string()])
        .args(["--messages", &(rate * seconds).to_string()])
        .args(["--size", "100"])
        .output()
        .context("running target/release/herald")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    if !out.status.success() {
        bail!(
            "herald bench --rate {rate} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = stdout
        .lines()
        .last()
        .context("herald bench printed nothing")?;
    let json: serde_json::Value = serde_json::from_str(last).context("the JSON report")?;
    for prefix in ["", "raw_"] {
        if json[format!("{prefix}failed")].as_u64() != Some(0) {
            bail!("{prefix}failed in {json}");
        }
    }
    Ok((quantiles(&json, "")?, quantiles(&json, "raw_")?))
}

/// `ROUNDS` rounds of `one` (given the round's number) at `rate` on `broker`.
fn rounds(
    broker: &'static str,
    rate: u64,
    mut one: impl FnMut(usize) -> Result<(Quantiles, Quantiles)>,
) -> Result<Row> {
    let mut row = Row {
        broker,
        rate,
        herald: Vec::new(),
        raw: Vec::new(),
    };
    for r in 0..ROUNDS {
        let (h, raw) = one(r)?;
        row.herald.push(h);
        row.raw.push(raw);
    }
    Ok(row)
}

/// The median of the rounds' figure `i`, and the range: `1.23 (1.10–1.40)`.
fn median_range(rounds: &[Quantiles], i: usize) -> (f64, String) {
    let mut v: Vec<f64> = rounds.iter().map(|q| q[i]).collect();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    let text = format!("{median:.2} ({:.2}–{:.2})", v[0], v[v.len() - 1]);
    (median, text)
}

pub(crate) fn bench(root: &Path) -> Result<()> {
    run(
        "build the herald command",
        cargo().args(["build", "--release", "-p", "herald-cli"]),
    )?;
    let herald = root.join("target/release/herald");
    let pid = std::process::id();
    let mut rows = Vec::new();
    {
        let broker = kafka::provision()?;
        let bootstrap = broker.var("HERALD_KAFKA_BOOTSTRAP")?;
        for &rate in KAFKA_RATES {
            rows.push(rounds("Kafka", rate, |r| {
                round(
                    &herald,
                    &format!("kafka://{bootstrap}/latency-{rate}-{r}-{pid}"),
                    rate,
                )
            })?);
        }
    }
    {
        let broker = amqp::provision()?;
        let url = broker.var("HERALD_AMQP_URL")?;
        let sep = if url.contains('?') { '&' } else { '?' };
        for &rate in AMQP_RATES {
            rows.push(rounds("RabbitMQ", rate, |r| {
                // A queue of its own per round, deleted after it: a long queue would slow the
                // broker down round after round.
                let queue = format!("herald-latency-{rate}-{r}-{pid}");
                let result = round(&herald, &format!("{url}{sep}queue={queue}"), rate);
                amqp::delete_queue(&url, &queue)?;
                result
            })?);
        }
    }
    let mut body = format!(
        "Run: `cargo xtask bench latency` on {}: `herald bench --rate R --messages {SECONDS}×R --size 100 --baseline` (the command, open loop), {ROUNDS} rounds of herald then the raw client, each figure the median of the rounds with their range in brackets, in ms. Kafka: Tansu `memory://` on the same machine; RabbitMQ: the machine's node, persistent messages to a durable queue.\n\n",
        machine()
    );
    body.push_str("| broker | rate (msgs/s) | herald p50 | raw p50 | herald p99 | raw p99 | herald p99.9 | raw p99.9 | herald p99 − raw p99 | within 1 ms or 10 %? |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut json_rows = Vec::new();
    for row in &rows {
        let (h50, h50s) = median_range(&row.herald, 0);
        let (r50, r50s) = median_range(&row.raw, 0);
        let (h99, h99s) = median_range(&row.herald, 1);
        let (r99, r99s) = median_range(&row.raw, 1);
        let (h999, h999s) = median_range(&row.herald, 2);
        let (r999, r999s) = median_range(&row.raw, 2);
        let within = h99 - r99 <= 1.0 || h99 <= r99 * 1.1;
        body.push_str(&format!(
            "| {} | {} | {h50s} | {r50s} | {h99s} | {r99s} | {h999s} | {r999s} | {:+.2} | {} |\n",
            row.broker,
            thousands(row.rate as f64),
            h99 - r99,
            if within { "yes" } else { "no" }
        ));
        json_rows.push(serde_json::json!({
            "broker": row.broker, "rate": row.rate,
            "herald_p50_ms": h50, "raw_p50_ms": r50,
            "herald_p99_ms": h99, "raw_p99_ms": r99,
            "herald_p999_ms": h999, "raw_p999_ms": r999,
        }));
    }
    let out = root.join("target/bench/latency.json");
    std::fs::create_dir_all(out.parent().context("target/bench")?)?;
    std::fs::write(&out, serde_json::json!({ "rows": json_rows }).to_string())?;
    replace_section(&root.join("docs/benchmarks.md"), "latency", &body)?;
    eprintln!("docs/benchmarks.md: latency section updated");
    Ok(())
}
