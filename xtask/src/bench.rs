//! `cargo xtask bench`: runs the benchmarks (the pipeline here, the brokers' in `kafka.rs`,
//! `amqp.rs`, `nats.rs`, `redis.rs` and `mqtt.rs`, the spool's in `spool.rs`, the `herald`
//! command's throughput and latency under a steady load in `command.rs`), rewrites their sections of docs/benchmarks.md, then the summary table and
//! docs/benchmarks-throughput.svg (drawn by `chart.rs`) from the last runs in target/bench.

use std::path::Path;

use anyhow::{Context, Result};

use crate::process::{cargo, run};
use crate::report::{machine, replace_section, thousands};
use crate::{amqp, chart, command, kafka, mqtt, nats, redis, spool};

/// Which benchmarks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Which {
    /// herald's pipeline alone, on an in-memory transport, against a bare tokio channel
    Pipeline,
    /// herald against raw rdkafka at its best and the naive pattern, on one Kafka broker
    Kafka,
    /// only the Kafka runs at 2 and 10 ms of round trip (`kafka` runs them too)
    KafkaRtt,
    /// herald against raw lapin at its best and the naive pattern, on one RabbitMQ broker
    Amqp,
    /// herald against raw async-nats at its best (PubAcks awaited as they come) and the naive
    /// pattern, on one JetStream server
    Nats,
    /// herald against raw redis-rs at its best (pipelined XADD) and the naive pattern, on one
    /// Redis server
    Redis,
    /// herald against raw rumqttc at its best (many publishes in flight) and the naive
    /// pattern, on one MQTT broker
    Mqtt,
    /// herald with the spool against herald without it, to one Kafka broker and to the
    /// in-memory transport, and the memory a million spooled messages cost
    Spool,
    /// the `herald` command's throughput as a user runs it (`herald bench --baseline`), Kafka
    /// and RabbitMQ, 100 B and 1 KiB, three rounds
    Command,
    /// latency under a steady load: the `herald` command in open loop (`herald bench --rate`)
    /// against the raw client on the same schedule, Kafka and RabbitMQ, two rates each
    Latency,
    /// pipeline, kafka, amqp, nats, redis, mqtt, spool, command and latency, in that order
    All,
    /// none: only the summary table and the chart, from the last runs
    Summary,
}

/// Runs `which` benchmarks, then rewrites the summary and the chart from the last runs.
pub(crate) fn bench(root: &Path, which: Which, pinned: bool) -> Result<()> {
    if pinned {
        if !matches!(which, Which::Command | Which::Latency) {
            anyhow::bail!("--pin applies to `command` and `latency` only (the runs of the herald command against a broker)");
        }
        crate::pin::check()?;
    }
    match which {
        Which::Pipeline => bench_pipeline(root)?,
        Which::Kafka => kafka::bench(root)?,
        Which::KafkaRtt => kafka::bench_rtt(root)?,
        Which::Amqp => amqp::bench(root)?,
        Which::Nats => nats::bench(root)?,
        Which::Redis => redis::bench(root)?,
        Which::Mqtt => mqtt::bench(root)?,
        Which::Spool => spool::bench(root)?,
        Which::Command => command::bench_throughput(root, pinned)?,
        Which::Latency => command::bench_latency(root, pinned)?,
        Which::All => {
            bench_pipeline(root)?;
            kafka::bench(root)?;
            amqp::bench(root)?;
            nats::bench(root)?;
            redis::bench(root)?;
            mqtt::bench(root)?;
            spool::bench(root)?;
            command::bench_throughput(root, false)?;
            command::bench_latency(root, false)?;
        }
        Which::Summary => {}
    }
    // The summary reads whatever runs are in target/bench, this one included. The spool's,
    // the round-trip, the command's and the latency runs are not in it: after those alone it
    // is left as it is.
    if matches!(
        which,
        Which::Spool | Which::KafkaRtt | Which::Command | Which::Latency
    ) {
        return Ok(());
    }
    bench_summary(root)
}

/// One broker and message size: herald against the raw client at its best and the naive pattern.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    broker: String,
    size: u64,
    herald: f64,
    raw: f64,
    naive: f64,
    /// herald / raw as the table shows it: `0.97×` or, over rounds, `0.97× (0.93×–1.01×)`.
    ratio: String,
    /// herald / naive.
    vs_naive: f64,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The rows of the last runs of every broker (target/bench/*.json), where there are some: each
/// broker on localhost, then (Kafka, RabbitMQ) through the proxy at each round trip.
fn broker_rows(root: &Path) -> Vec<Row> {
    let bench = root.join("target/bench");
    let mut rows = Vec::new();
    let kafka_rows = |json: &serde_json::Value, broker: &str| -> Vec<Row> {
        json["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let herald = r["herald_msgs_per_sec"].as_f64().unwrap_or(0.0);
                let raw = r["raw_best_msgs_per_sec"].as_f64().unwrap_or(0.0);
                Row {
                    broker: broker.to_owned(),
                    size: r["size"].as_u64().unwrap_or(0),
                    herald,
                    raw,
                    naive: r["naive_msgs_per_sec"].as_f64().unwrap_or(0.0),
                    ratio: crate::kafka::vs_raw(r),
                    vs_naive: herald / r["naive_msgs_per_sec"].as_f64().unwrap_or(0.0),
                }
            })
            .collect()
    };
    if let Some(k) = read_json(&bench.join("kafka.json")) {
        rows.extend(kafka_rows(&k, "Kafka"));
    }
    for &rtt in crate::report::ROUND_TRIPS_MS {
        if let Some(k) = read_json(&bench.join(format!("kafka-rtt-{rtt}.json"))) {
            rows.extend(kafka_rows(&k, &format!("Kafka, {rtt} ms round trip")));
        }
    }
    // The *-baseline binaries all write the same figures.
    if let Some(json) = read_json(&bench.join("amqp.json")) {
        rows.extend(baseline_rows(&json, "RabbitMQ"));
    }
    for &rtt in crate::report::ROUND_TRIPS_MS {
        if let Some(json) = read_json(&bench.join(format!("amqp-rtt-{rtt}.json"))) {
            rows.extend(baseline_rows(
                &json,
                &format!("RabbitMQ, {rtt} ms round trip"),
            ));
        }
    }
    for (name, broker) in [("nats", "NATS"), ("redis", "Redis"), ("mqtt", "MQTT")] {
        if let Some(json) = read_json(&bench.join(format!("{name}.json"))) {
            rows.extend(baseline_rows(&json, broker));
        }
    }
    rows
}

/// The rows of one `*-baseline` run: per payload size, herald's default settings against the
/// raw client at its best and the naive pattern.
fn baseline_rows(json: &serde_json::Value, broker: &str) -> Vec<Row> {
    let figures = json["figures"].as_array().cloned().unwrap_or_default();
    let figure = |size: u64, name: &str| {
        figures
            .iter()
            .find(|f| f["payload_bytes"].as_u64() == Some(size) && f["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    let rate = |size: u64, name: &str| figure(size, name)["msgs_per_sec"].as_f64().unwrap_or(0.0);
    let mut sizes: Vec<u64> = figures
        .iter()
        .filter_map(|f| f["payload_bytes"].as_u64())
        .collect();
    sizes.dedup();
    sizes
        .into_iter()
        .map(|size| Row {
            broker: broker.to_owned(),
            size,
            herald: rate(size, "herald_default"),
            raw: rate(size, "raw_streaming"),
            naive: rate(size, "raw_naive"),
            ratio: ratio_cell(&figure(size, "herald_default")),
            vs_naive: figure(size, "herald_default")["vs_naive"]
                .as_f64()
                .unwrap_or(0.0),
        })
        .collect()
}

/// herald / raw for the summary: against the raw client's bare payloads and, where the run
/// measured it, against the raw client sending the same properties as herald's messages:
/// `0.84× (0.79×–0.85×); same properties: 0.96× (0.94×–1.04×)`.
fn ratio_cell(herald: &serde_json::Value) -> String {
    use crate::report::{times, with_range};
    let bare = with_range(herald, "vs_raw", times);
    if herald.get("vs_like").is_some() {
        format!(
            "{bare}; same properties: {}",
            with_range(herald, "vs_like", times)
        )
    } else {
        bare
    }
}

/// The broker rows of the summary, in the order the table shows them.
fn summary_order() -> Vec<String> {
    let mut order = Vec::new();
    for broker in ["Kafka", "RabbitMQ"] {
        order.push(broker.to_owned());
        for rtt in crate::report::ROUND_TRIPS_MS {
            order.push(format!("{broker}, {rtt} ms round trip"));
        }
    }
    order.extend(["NATS", "Redis", "MQTT"].map(String::from));
    order
}

/// One row of the summary table.
fn row_line(r: &Row) -> String {
    format!(
        "| {} | {} B | {} | {} | {} | {} | {:.0}× |\n",
        r.broker,
        r.size,
        thousands(r.herald),
        thousands(r.raw),
        thousands(r.naive),
        r.ratio,
        r.vs_naive
    )
}

/// A row of the summary table as [`row_line`] wrote it.
fn parse_row(line: &str) -> Option<Row> {
    let cells: Vec<&str> = line
        .trim()
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect();
    let [broker, size, herald, raw, naive, ratio, vs_naive] = cells[..] else {
        return None;
    };
    let number = |s: &str| s.replace(' ', "").trim_end_matches('×').parse::<f64>().ok();
    Some(Row {
        broker: broker.to_owned(),
        size: size.trim_end_matches(" B").parse().ok()?,
        herald: number(herald)?,
        raw: number(raw)?,
        naive: number(naive)?,
        ratio: ratio.to_owned(),
        vs_naive: number(vs_naive)?,
    })
}

/// The summary table and the throughput chart: each broker's rows from its last run in
/// target/bench, or, for a broker not run since, the rows the summary already shows (so that
/// `cargo xtask bench nats` updates the NATS rows and keeps the others).
fn bench_summary(root: &Path) -> Result<()> {
    let doc = root.join("docs/benchmarks.md");
    let before = crate::report::section(&doc, "summary")?;
    let fresh = broker_rows(root);
    let kept: Vec<Row> = before.lines().filter_map(parse_row).collect();
    let mut rows = Vec::new();
    for broker in summary_order() {
        let of = |r: &&Row| r.broker == broker;
        let new: Vec<&Row> = fresh.iter().filter(of).collect();
        let pick = if new.is_empty() {
            kept.iter().filter(of).collect()
        } else {
            new
        };
        rows.extend(pick.into_iter().cloned());
    }
    let mut body = format!(
        "Each row from the last run of its section below (`cargo xtask bench`, or one section alone; each section gives its machine and date); summary written on {}. Chart: [benchmarks-throughput.svg](benchmarks-throughput.svg) (log scale). Rows with a round trip went through the testkit's delaying proxy, herald and the raw client alike (Kafka: a Tansu of its own advertising the proxy's address; RabbitMQ: the proxy in front of the node); the others on localhost.\n\n",
        machine()
    );
    body.push_str("| broker | message | herald (msgs/s) | raw client at its best (msgs/s) | naive: await each send (msgs/s) | herald / raw | herald / naive |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        body.push_str(&row_line(r));
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
    } else if let Some(line) = before.lines().find(|l| l.starts_with("| pipeline alone")) {
        body.push_str(line);
        body.push('\n');
    }
    replace_section(&root.join("docs/benchmarks.md"), "summary", &body)?;
    let groups: Vec<chart::Group> = rows
        .iter()
        .map(|r| chart::Group {
            // Two lines: "Kafka, 2 ms round trip" is drawn "Kafka +2 ms" over "100 B".
            label: format!(
                "{}\n{} B",
                r.broker.replace(", ", " +").replace(" round trip", ""),
                r.size
            ),
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
    if let Some(ratio) = json["enqueue_vs_floor"].as_f64() {
        table.push_str(&format!(
            "\nPer-message futures: `herald_enqueue` runs at {ratio:.2}× the rate of `channel_oneshot`, the bare channel with a oneshot answer per message held until the end (what a future per message costs at the least; same run).\n"
        ));
    }
    replace_section(&root.join("docs/benchmarks.md"), "pipeline", &table)?;
    eprintln!("docs/benchmarks.md: pipeline section updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_s_ratio_adds_the_one_against_the_same_properties_where_measured() {
        let bare = serde_json::json!({"vs_raw": 0.84, "vs_raw_range": [0.79, 0.85]});
        assert_eq!(ratio_cell(&bare), "0.84× (0.79×–0.85×)");
        let mut like = bare.clone();
        like["vs_like"] = 0.96.into();
        like["vs_like_range"] = serde_json::json!([0.94, 1.04]);
        let cell = ratio_cell(&like);
        assert_eq!(
            cell,
            "0.84× (0.79×–0.85×); same properties: 0.96× (0.94×–1.04×)"
        );
        let row = Row {
            broker: "RabbitMQ".into(),
            size: 100,
            herald: 15_537.0,
            raw: 18_601.0,
            naive: 2_032.0,
            ratio: cell,
            vs_naive: 8.0,
        };
        assert_eq!(parse_row(&row_line(&row)), Some(row));
    }

    #[test]
    fn a_summary_row_reads_back_as_written() {
        let row = Row {
            broker: "Kafka, 2 ms round trip".into(),
            size: 1024,
            herald: 260_535.0,
            raw: 271_367.0,
            naive: 162.0,
            ratio: "0.96× (0.91×–1.02×)".into(),
            vs_naive: 1610.0,
        };
        let line = row_line(&row);
        assert_eq!(
            line,
            "| Kafka, 2 ms round trip | 1024 B | 260 535 | 271 367 | 162 | 0.96× (0.91×–1.02×) | 1610× |\n"
        );
        assert_eq!(parse_row(&line), Some(row));
        assert_eq!(parse_row("|---|---:|"), None);
        assert_eq!(
            parse_row("| pipeline alone (in-memory transport) | 100 B | 2 017 141 | 5 675 016 (bare tokio channel) | | 0.36× | |"),
            None
        );
    }
}
