//! The `herald` command as a user runs it, herald and the raw client in the same run, three
//! rounds each, medians with their range; Kafka (Tansu) and RabbitMQ (and MQTT for latency):
//! - `cargo xtask bench command`: throughput, `herald bench --baseline` (the `command`
//!   section of docs/benchmarks.md);
//! - `cargo xtask bench latency`: latency under a steady load, `herald bench --rate R
//!   --baseline` (open loop: herald and the raw client each send on the same fixed schedule,
//!   every message timed from its due time to its acknowledgement; the `latency` section).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::process::{cargo, run};
use crate::proxy::DelayProxy;
use crate::report::{machine, median_range, replace_section, thousands, two};
use crate::{amqp, kafka, mqtt, pin};

/// Seconds of sending per latency run (`HERALD_BENCH_LATENCY_SECONDS` to change).
const SECONDS: u64 = 5;
const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Broker {
    Kafka,
    RabbitMQ,
    Mqtt,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Kafka => "Kafka",
            Broker::RabbitMQ => "RabbitMQ",
            Broker::Mqtt => "MQTT",
        }
    }
}

/// Latency: rates (msgs/s). Kafka takes 100 000 with room to spare on this machine;
/// RabbitMQ's raw best is about 20 000 persistent messages a second here, so 10 000 is half
/// its capacity; Mosquitto's QoS 1 is about 100 000, so 5 000 is well inside it.
const RATES: &[(Broker, u64)] = &[
    (Broker::Kafka, 10_000),
    (Broker::Kafka, 100_000),
    (Broker::RabbitMQ, 1_000),
    (Broker::RabbitMQ, 10_000),
    (Broker::Mqtt, 1_000),
    (Broker::Mqtt, 5_000),
];

/// Throughput: message sizes, and messages per run.
const SIZES: &[(Broker, u64)] = &[
    (Broker::Kafka, 100),
    (Broker::Kafka, 1024),
    (Broker::RabbitMQ, 100),
    (Broker::RabbitMQ, 1024),
];

fn messages(broker: Broker, size: u64) -> u64 {
    match (broker, size) {
        (Broker::Kafka, s) if s >= 1024 => 300_000,
        (Broker::Kafka, _) => 1_000_000,
        (Broker::RabbitMQ | Broker::Mqtt, _) => 100_000,
    }
}

/// The release `herald`, built first.
fn herald(root: &Path) -> Result<PathBuf> {
    run(
        "build the herald command",
        cargo().args(["build", "--release", "-p", "herald-cli"]),
    )?;
    Ok(crate::process::target_dir(root).join("release/herald"))
}

/// Runs `herald bench --to TO --baseline --report json ARGS` and returns its JSON report; an
/// error if it failed or any message of herald or the raw client failed.
fn bench_json(herald: &Path, to: &str, args: &[String], pinned: bool) -> Result<Value> {
    let mut command = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", &pin::CLIENT_CPU.to_string()]).arg(herald);
        c
    } else {
        Command::new(herald)
    };
    let out = command
        .args(["bench", "--to", to, "--baseline", "--report", "json"])
        .args(args)
        .output()
        .with_context(|| format!("running {}", herald.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    if !out.status.success() {
        bail!(
            "herald bench {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = stdout
        .lines()
        .last()
        .context("herald bench printed nothing")?;
    let json: Value = serde_json::from_str(last).context("the JSON report")?;
    if json["failed"].as_u64() != Some(0) {
        bail!("herald lost messages: {json}");
    }
    Ok(json)
}

/// For each (broker, parameter) of `plan`, `ROUNDS` rounds of `one(to, broker, parameter)`,
/// each to a topic or queue of its own (`{tag}-{parameter}-{round}-{pid}`; queues deleted after
/// their round: a long queue would slow the broker down round after round). With `pinned`,
/// each broker runs on its CPU for its rounds (see `pin`).
fn rounds<T>(
    plan: &[(Broker, u64)],
    tag: &str,
    pinned: bool,
    mut one: impl FnMut(&str, Broker, u64) -> Result<T>,
) -> Result<Vec<(Broker, u64, Vec<T>)>> {
    let pin_broker = |address: &str| -> Result<Option<pin::Pinned>> {
        if pinned {
            Ok(Some(pin::broker(pin::port_of(address)?)?))
        } else {
            Ok(None)
        }
    };
    let pid = std::process::id();
    let mut out = Vec::new();
    if plan.iter().any(|(b, _)| *b == Broker::Kafka) {
        let broker = kafka::provision()?;
        let bootstrap = broker.var("HERALD_KAFKA_BOOTSTRAP")?;
        // Dropped (affinity restored) before the broker is (stopped, if provisioning started it).
        let _pinned = pin_broker(bootstrap.split(',').next().unwrap_or(&bootstrap))?;
        for &(b, p) in plan.iter().filter(|(b, _)| *b == Broker::Kafka) {
            let mut got = Vec::new();
            for r in 0..ROUNDS {
                got.push(one(
                    &format!("kafka://{bootstrap}/{tag}-{p}-{r}-{pid}"),
                    b,
                    p,
                )?);
            }
            out.push((b, p, got));
        }
    }
    if plan.iter().any(|(b, _)| *b == Broker::RabbitMQ) {
        let broker = amqp::provision()?;
        let url = broker.var("HERALD_AMQP_URL")?;
        let sep = if url.contains('?') { '&' } else { '?' };
        let _pinned = pin_broker(&url)?;
        for &(b, p) in plan.iter().filter(|(b, _)| *b == Broker::RabbitMQ) {
            let mut got = Vec::new();
            for r in 0..ROUNDS {
                let queue = format!("herald-{tag}-{p}-{r}-{pid}");
                let result = one(&format!("{url}{sep}queue={queue}"), b, p);
                amqp::delete_queue(&url, &queue)?;
                got.push(result?);
            }
            out.push((b, p, got));
        }
    }
    if plan.iter().any(|(b, _)| *b == Broker::Mqtt) {
        let broker = mqtt::provision()?;
        let url = broker.var("HERALD_MQTT_URL")?;
        let _pinned = pin_broker(&url)?;
        for &(b, p) in plan.iter().filter(|(b, _)| *b == Broker::Mqtt) {
            let mut got = Vec::new();
            for r in 0..ROUNDS {
                got.push(one(&format!("{url}/herald/{tag}-{p}-{r}-{pid}"), b, p)?);
            }
            out.push((b, p, got));
        }
    }
    Ok(out)
}

/// One throughput round's rates (msgs/s).
#[derive(Clone, Copy)]
struct Rates {
    herald: f64,
    /// The raw client at its best.
    raw: f64,
    /// The raw client sending what herald sends (its message properties), where the command
    /// measures it (RabbitMQ: `raw alike`).
    like: Option<f64>,
}

/// One throughput round: `herald bench --baseline` of `messages` of `size` bytes to `to`.
/// `raw_first`: the raw clients run before herald (`--baseline-first`). On Kafka each run
/// writes behind what the one before stored in the round's topic (on RabbitMQ each raw run has
/// a queue of its own), and a broker warms up: the callers alternate it.
fn throughput_round(
    herald: &Path,
    to: &str,
    messages: u64,
    size: u64,
    pinned: bool,
    raw_first: bool,
) -> Result<Rates> {
    let mut args = vec![
        "--messages".into(),
        messages.to_string(),
        "--size".into(),
        size.to_string(),
        "--naive-messages".into(),
        "100".into(),
    ];
    if raw_first {
        args.push("--baseline-first".into());
    }
    let json = bench_json(herald, to, &args, pinned)?;
    let rate = |name: &str| {
        json[name]
            .as_f64()
            .with_context(|| format!("no {name} in {json}"))
    };
    Ok(Rates {
        herald: rate("herald_msgs_per_sec")?,
        raw: rate("raw_best_msgs_per_sec")?,
        like: json["raw_like_herald_msgs_per_sec"].as_f64(),
    })
}

/// Messages per throughput round through the delaying proxy (as the library's round-trip
/// runs: the raw clients need longer there, RabbitMQ's most).
fn rtt_messages(broker: Broker) -> u64 {
    match broker {
        Broker::Kafka => 200_000,
        Broker::RabbitMQ | Broker::Mqtt => 50_000,
    }
}

/// Throughput rounds through the delaying proxy at `rtt_ms` of round trip, for every size of
/// `SIZES`: Kafka on a Tansu of its own advertising the proxy's address (so that every
/// connection, the partition leader's too, takes the round trip; skipped, and said, without
/// Tansu), RabbitMQ through the proxy in front of its node.
fn rtt_rounds(herald: &Path, proxy_bin: &Path, rtt_ms: u64) -> Result<Vec<Row>> {
    let pid = std::process::id();
    let mut rows = Vec::new();
    match kafka::tansu_bin() {
        Err(_) => eprintln!("command: no Tansu here, so no Kafka rows at {rtt_ms} ms (they need a broker that advertises the proxy's address)"),
        Ok(bin) => {
            let (port, proxy_port) = (crate::broker::free_port()?, crate::broker::free_port()?);
            let mut tansu = kafka::start_tansu_advertising(&bin, port, proxy_port, "memory://tansu/")?;
            let result = (|| -> Result<()> {
                kafka::wait_for(&format!("127.0.0.1:{port}"), std::time::Duration::from_secs(60), &mut tansu)?;
                let _proxy = DelayProxy::start(proxy_bin, proxy_port, &format!("127.0.0.1:{port}"), rtt_ms)?;
                rows.extend(sized_rows(Broker::Kafka, rtt_ms, |size, r| {
                    let to = format!("kafka://127.0.0.1:{proxy_port}/command-rtt{rtt_ms}-{size}-{r}-{pid}");
                    throughput_round(herald, &to, rtt_messages(Broker::Kafka), size, false, r % 2 == 1)
                })?);
                Ok(())
            })();
            kafka::stop_child(&mut tansu);
            result?;
        }
    }
    let broker = amqp::provision()?;
    let direct = broker.var("HERALD_AMQP_URL")?;
    let (_proxy, url) = crate::proxy::in_front_of(proxy_bin, &direct, 5672, rtt_ms)?;
    let sep = if url.contains('?') { '&' } else { '?' };
    rows.extend(sized_rows(Broker::RabbitMQ, rtt_ms, |size, r| {
        let queue = format!("herald-command-rtt{rtt_ms}-{size}-{r}-{pid}");
        let to = format!("{url}{sep}queue={queue}");
        let result = throughput_round(
            herald,
            &to,
            rtt_messages(Broker::RabbitMQ),
            size,
            false,
            r % 2 == 1,
        );
        amqp::delete_queue(&direct, &queue)?;
        result
    })?);
    Ok(rows)
}

/// For each size of `SIZES` for `broker`, `ROUNDS` rounds of `round(size, round)`: one row each.
fn sized_rows(
    broker: Broker,
    rtt_ms: u64,
    mut round: impl FnMut(u64, usize) -> Result<Rates>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(_, size) in SIZES.iter().filter(|(b, _)| *b == broker) {
        let got = (0..ROUNDS)
            .map(|r| round(size, r))
            .collect::<Result<Vec<_>>>()?;
        rows.push(Row {
            broker,
            rtt_ms,
            size,
            got,
        });
    }
    Ok(rows)
}

/// One line of the command's throughput table: its rounds' rates.
struct Row {
    broker: Broker,
    /// 0: on localhost, no proxy.
    rtt_ms: u64,
    size: u64,
    got: Vec<Rates>,
}

/// `cargo xtask bench command`.
pub(crate) fn bench_throughput(root: &Path, pinned: bool) -> Result<()> {
    let herald = herald(root)?;
    // Who goes first alternates from round to round (see `throughput_round`).
    let mut round = 0;
    let runs = rounds(SIZES, "command", pinned, |to, broker, size| {
        round += 1;
        throughput_round(
            &herald,
            to,
            messages(broker, size),
            size,
            pinned,
            round % 2 == 0,
        )
    })?;
    let mut rows: Vec<Row> = runs
        .into_iter()
        .map(|(broker, size, got)| Row {
            broker,
            rtt_ms: 0,
            size,
            got,
        })
        .collect();
    if !pinned {
        let proxy_bin = crate::proxy::build(root)?;
        for &rtt in crate::report::ROUND_TRIPS_MS {
            rows.extend(rtt_rounds(&herald, &proxy_bin, rtt)?);
        }
    }
    let mut body = format!(
        "Run: `cargo xtask bench command{}` on {}: `herald bench --to URL --messages N --size S --baseline` (the release command as a user runs it: herald's default settings, messages handed over as `herald produce` hands over what it reads; then the raw client at its best), {ROUNDS} rounds, each a topic or queue of its own. Every run timed from a connected client (herald, and Kafka's raw client, send one message and wait for its acknowledgement first). Figures: median of the rounds (range in brackets); the ratio is taken within each round. Kafka: Tansu `memory://` on the same machine, 1 000 000 messages of 100 B, 300 000 of 1 KiB; RabbitMQ: the machine's node, 100 000 persistent messages to a durable queue; its rounds also run the raw client sending herald's message properties (a message id, the key as a header), and the last column is herald against that run. On Kafka each round's runs (herald, the raw client, a naive one) write to its one topic in turn; on RabbitMQ each raw run (raw, raw with the properties, naive) writes to a new queue of its own, declared as herald declares the round's queue and deleted after it, so that no run writes behind messages another stored (a queue nobody consumes from is slower to write to the more it holds). herald goes first in one round and the raw clients in the next (`--baseline-first`), alternately.{}\n\n",
        pin_flag(pinned),
        machine(),
        if pinned {
            format!("{} No round-trip rows in a pinned run (the proxy would need a core too).", pin_sentence(pinned))
        } else {
            format!(" Round-trip rows: herald and the raw client alike through the testkit's delaying proxy (`delay_proxy`, half the round trip each way, throughput not limited), {} messages per round to Kafka (a Tansu `memory://` of its own advertising the proxy's address), {} to RabbitMQ (the proxy in front of the node).", thousands(rtt_messages(Broker::Kafka) as f64), thousands(rtt_messages(Broker::RabbitMQ) as f64))
        },
    );
    body.push_str(&table(rows));
    replace_section(&root.join("docs/benchmarks.md"), "command", &body)?;
    eprintln!("docs/benchmarks.md: command section updated");
    Ok(())
}

/// The command's throughput table, Kafka first, by round trip and size. The column of herald
/// against the raw client sending the same properties is there when some row has that figure
/// (a cell without one says so).
fn table(mut rows: Vec<Row>) -> String {
    let has_like = rows.iter().any(|r| r.got.iter().any(|g| g.like.is_some()));
    let mut body = String::from(
        "| broker | round trip | message | herald (msgs/s) | raw client at its best (msgs/s) | herald / raw |",
    );
    body.push_str(if has_like {
        " herald / raw, same properties |\n|---|---:|---:|---:|---:|---:|---:|\n"
    } else {
        "\n|---|---:|---:|---:|---:|---:|\n"
    });
    rows.sort_by_key(|r| (r.broker != Broker::Kafka, r.rtt_ms, r.size));
    for Row {
        broker,
        rtt_ms,
        size,
        got,
    } in rows
    {
        let (_, herald) = median_range(got.iter().map(|g| g.herald).collect(), thousands);
        let (_, raw) = median_range(got.iter().map(|g| g.raw).collect(), thousands);
        let (_, ratio) = median_range(got.iter().map(|g| g.herald / g.raw).collect(), two);
        let rtt = if rtt_ms == 0 {
            "localhost".to_owned()
        } else {
            format!("{rtt_ms} ms")
        };
        body.push_str(&format!(
            "| {} | {rtt} | {size} B | {herald} | {raw} | {ratio}× |",
            broker.name(),
        ));
        if has_like {
            // Within each round, and only when every round has the figure.
            let like: Option<Vec<f64>> = got.iter().map(|g| Some(g.herald / g.like?)).collect();
            match like {
                Some(like) => {
                    let (_, like) = median_range(like, two);
                    body.push_str(&format!(" {like}× |"));
                }
                None if got.iter().any(|g| g.like.is_some()) => {
                    body.push_str(" not in every round |");
                }
                None => body.push_str(" not measured |"),
            }
        }
        body.push('\n');
    }
    body
}

/// The flag as the run line shows it.
fn pin_flag(pinned: bool) -> &'static str {
    if pinned {
        " --pin"
    } else {
        ""
    }
}

/// What the run line says of pinning.
fn pin_sentence(pinned: bool) -> String {
    if pinned {
        format!(
            " Pinned: the broker on CPU {}, the command (herald and the raw client alike) on CPU {}; each side has one core, so the figures are lower than unpinned ones (and not always steadier), another regime.",
            pin::BROKER_CPU,
            pin::CLIENT_CPU
        )
    } else {
        String::new()
    }
}

/// One round's figures (ms) for herald or raw: p50, p99, p99.9.
type Quantiles = [f64; 3];

fn quantiles(json: &Value, prefix: &str) -> Result<Quantiles> {
    let get = |name: &str| {
        json[format!("{prefix}{name}")]
            .as_f64()
            .with_context(|| format!("no {prefix}{name} in {json}"))
    };
    Ok([get("p50_ms")?, get("p99_ms")?, get("p999_ms")?])
}

/// `cargo xtask bench latency`.
pub(crate) fn bench_latency(root: &Path, pinned: bool) -> Result<()> {
    let herald = herald(root)?;
    let seconds: u64 = std::env::var("HERALD_BENCH_LATENCY_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SECONDS);
    // Who goes first alternates from round to round: on Kafka the second writes behind the
    // first, and a broker warms up.
    let mut round = 0;
    let runs = rounds(RATES, "latency", pinned, |to, _, rate| {
        round += 1;
        let mut args = vec![
            "--rate".into(),
            rate.to_string(),
            "--messages".into(),
            (rate * seconds).to_string(),
            "--size".into(),
            "100".into(),
        ];
        if round % 2 == 0 {
            args.push("--baseline-first".into());
        }
        let json = bench_json(&herald, to, &args, pinned)?;
        if json["raw_failed"].as_u64() != Some(0) {
            bail!("the raw client lost messages: {json}");
        }
        Ok((quantiles(&json, "")?, quantiles(&json, "raw_")?))
    })?;
    let mut body = format!(
        "Run: `cargo xtask bench latency{}` on {}: `herald bench --rate R --messages {SECONDS}×R --size 100 --baseline` (the command, open loop), {ROUNDS} rounds of herald and the raw client (on one topic; on RabbitMQ the raw client on a new queue of its own, declared as herald's), who goes first alternating (`--baseline-first`), each figure the median of the rounds with their range in brackets, in ms. Kafka: Tansu `memory://` on the same machine; RabbitMQ: the machine's node, persistent messages to a durable queue; MQTT: the machine's Mosquitto, QoS 1.{}\n\n",
        pin_flag(pinned),
        machine(),
        pin_sentence(pinned),
    );
    body.push_str("| broker | rate (msgs/s) | herald p50 | raw p50 | herald p99 | raw p99 | herald p99.9 | raw p99.9 | herald p99 − raw p99 | within 1 ms or 10 %? |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut json_rows = Vec::new();
    for (broker, rate, got) in &runs {
        let figure = |side: usize, i: usize| {
            median_range(
                got.iter()
                    .map(|g| if side == 0 { g.0[i] } else { g.1[i] })
                    .collect(),
                two,
            )
        };
        let (h50, h50s) = figure(0, 0);
        let (r50, r50s) = figure(1, 0);
        let (h99, h99s) = figure(0, 1);
        let (r99, r99s) = figure(1, 1);
        let (h999, h999s) = figure(0, 2);
        let (r999, r999s) = figure(1, 2);
        let within = h99 - r99 <= 1.0 || h99 <= r99 * 1.1;
        body.push_str(&format!(
            "| {} | {} | {h50s} | {r50s} | {h99s} | {r99s} | {h999s} | {r999s} | {:+.2} | {} |\n",
            broker.name(),
            thousands(*rate as f64),
            h99 - r99,
            if within { "yes" } else { "no" }
        ));
        json_rows.push(serde_json::json!({
            "broker": broker.name(), "rate": rate,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(broker: Broker, size: u64, got: &[(f64, f64, Option<f64>)]) -> Row {
        Row {
            broker,
            rtt_ms: 0,
            size,
            got: got
                .iter()
                .map(|&(herald, raw, like)| Rates { herald, raw, like })
                .collect(),
        }
    }

    #[test]
    fn the_same_properties_column_is_there_only_when_measured() {
        let kafka = || row(Broker::Kafka, 100, &[(90.0, 100.0, None); 3]);
        let without = table(vec![kafka()]);
        assert!(!without.contains("same properties"), "{without}");
        assert!(
            without.contains(
                "| Kafka | localhost | 100 B | 90 (90–90) | 100 (100–100) | 0.90 (0.90–0.90)× |\n"
            ),
            "{without}"
        );

        let rabbit = row(
            Broker::RabbitMQ,
            1024,
            &[
                (92.0, 100.0, Some(80.0)),
                (95.0, 100.0, Some(100.0)),
                (99.0, 100.0, Some(90.0)),
            ],
        );
        let with = table(vec![rabbit, kafka()]);
        let lines: Vec<&str> = with.lines().collect();
        assert!(
            lines[0].ends_with("| herald / raw, same properties |"),
            "{with}"
        );
        assert_eq!(lines[1], "|---|---:|---:|---:|---:|---:|---:|");
        // Kafka first; its cell says it has no figure.
        assert!(
            lines[2].starts_with("| Kafka |") && lines[2].ends_with(" not measured |"),
            "{with}"
        );
        // A row with the figure in some rounds only says so.
        let partly = row(
            Broker::RabbitMQ,
            100,
            &[(90.0, 100.0, Some(80.0)), (90.0, 100.0, None)],
        );
        let partly = table(vec![partly]);
        assert!(
            partly
                .lines()
                .nth(2)
                .is_some_and(|l| l.ends_with(" not in every round |")),
            "{partly}"
        );
        // Ratios within each round: 92/80, 95/100, 99/90.
        assert!(
            lines[3].starts_with("| RabbitMQ |") && lines[3].ends_with(" 1.10 (0.95–1.15)× |"),
            "{with}"
        );
    }
}
