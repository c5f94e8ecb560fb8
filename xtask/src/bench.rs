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
pub(crate) fn bench(root: &Path, which: Which) -> Result<()> {
    match which {
        Which::Pipeline => bench_pipeline(root)?,
        Which::Kafka => kafka::bench(root)?,
        Which::KafkaRtt => kafka::bench_rtt(root)?,
        Which::Amqp => amqp::bench(root)?,
        Which::Nats => nats::bench(root)?,
        Which::Redis => redis::bench(root)?,
        Which::Mqtt => mqtt::bench(root)?,
        Which::Spool => spool::bench(root)?,
        Which::Command => command::bench_throughput(root)?,
        Which::Latency => command::bench_latency(root)?,
        Which::All => {
            bench_pipeline(root)?;
            kafka::bench(root)?;
            amqp::bench(root)?;
            nats::bench(root)?;
            redis::bench(root)?;
            mqtt::bench(root)?;
            spool::bench(root)?;
            command::bench_throughput(root)?;
            command::bench_latency(root)?;
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
struct Row {
    broker: String,
    size: u64,
    herald: f64,
    raw: f64,
    naive: f64,
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
            .map(|r| Row {
                broker: broker.to_owned(),
                size: r["size"].as_u64().unwrap_or(0),
                herald: r["herald_msgs_per_sec"].as_f64().unwrap_or(0.0),
                raw: r["raw_best_msgs_per_sec"].as_f64().unwrap_or(0.0),
                naive: r["naive_msgs_per_sec"].as_f64().unwrap_or(0.0),
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
    let rate = |size: u64, name: &str| {
        figures
            .iter()
            .find(|f| f["payload_bytes"].as_u64() == Some(size) && f["name"] == name)
            .and_then(|f| f["msgs_per_sec"].as_f64())
            .unwrap_or(0.0)
    };
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
        })
        .collect()
}

/// The summary table and the throughput chart, from the last runs of every benchmark.
fn bench_summary(root: &Path) -> Result<()> {
    let rows = broker_rows(root);
    let mut body = format!(
        "From the runs below (`cargo xtask bench`, {}). Chart: [benchmarks-throughput.svg](benchmarks-throughput.svg) (log scale). Rows with a round trip went through the testkit's delaying proxy, herald and the raw client alike (Kafka: a Tansu of its own advertising the proxy's address; RabbitMQ: the proxy in front of the node); the others on localhost.\n\n",
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
    replace_section(&root.join("docs/benchmarks.md"), "pipeline", &table)?;
    eprintln!("docs/benchmarks.md: pipeline section updated");
    Ok(())
}
