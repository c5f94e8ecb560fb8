//! `cargo xtask bench spool`: herald with the spool against herald without it, on one Kafka
//! broker (100 B and 1 KiB, each sync policy, interleaved rounds), then on the in-memory
//! transport (the spool's own cost), and the memory a spool of a million waiting messages
//! costs while a producer sends them. Rewrites the `spool` section of docs/benchmarks.md.

use std::path::Path;

use anyhow::{Context, Result};

use crate::kafka::provision;
use crate::process::{cargo, run};
use crate::report::{machine, replace_section, thousands};

/// Runs the spool benchmarks and writes their section.
pub(crate) fn bench(root: &Path) -> Result<()> {
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let messages = std::env::var("HERALD_BENCH_SPOOL_MESSAGES").unwrap_or_else(|_| "200000".into());
    let broker = provision()?;
    let bootstrap = broker.var("HERALD_KAFKA_BOOTSTRAP")?;
    let kafka_json = out.join("spool-kafka.json");
    let with_kafka = ["--messages", &messages, "--kafka", &bootstrap];
    example("producer", &with_kafka, &kafka_json)?;
    drop(broker);
    let memory_json = out.join("spool-memory.json");
    let recovering = [
        "--messages",
        &messages,
        "--recover",
        "1000000",
        "--outage",
        "250000",
        "--outage",
        "2000000",
    ];
    example("producer", &recovering, &memory_json)?;
    let stores_json = out.join("spool-stores.json");
    example("stores", &[], &stores_json)?;

    let read = |p: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
    };
    let (kafka, memory, stores) = (read(&kafka_json)?, read(&memory_json)?, read(&stores_json)?);
    let mut body = format!(
        "Run: `cargo xtask bench spool` on {}: {} messages per run, `send_all`, {} rounds with the modes interleaved (each round starting with another mode; on Kafka a new topic per run); median (min-max), and the ratio to no spool taken within each round. Kafka: Tansu at {bootstrap} (`memory://`).\n\n",
        machine(),
        kafka["messages"],
        kafka["rounds"]
    );
    for (title, json) in [
        ("Kafka", &kafka),
        ("in-memory transport (the spool's own cost)", &memory),
    ] {
        body.push_str(&format!("{title}:\n\n| message | mode | msgs/s | spread | / no spool |\n|---|---|---:|---:|---:|\n"));
        for r in json["rows"].as_array().context("rows")? {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            body.push_str(&format!(
                "| {} B | {} | {} | {}-{} | {:.2}× ({:.2}-{:.2}) |\n",
                r["size"],
                r["mode"].as_str().unwrap_or(""),
                thousands(f("msgs_per_sec")),
                thousands(f("min")),
                thousands(f("max")),
                f("ratio"),
                f("ratio_min"),
                f("ratio_max"),
            ));
        }
        body.push('\n');
    }
    // A figure of a memory run, in MiB.
    let mib =
        |run: &serde_json::Value, k: &str| run[k].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
    let rec = &memory["recovery"];
    body.push_str(&format!(
        "Memory: {} messages of 100 B left in a spool (as by a crash during an outage), sent by a producer opened on it to the in-memory transport at {} msgs/s: resident memory {:.0} MiB before, {:.0} MiB at most while sending (+{:.0} MiB; the spool is read in batches, never whole).\n",
        rec["messages"],
        thousands(rec["msgs_per_sec"].as_f64().unwrap_or(0.0)),
        mib(rec, "rss_before_bytes"),
        mib(rec, "rss_peak_bytes"),
        mib(rec, "rss_peak_bytes") - mib(rec, "rss_before_bytes"),
    ));
    for o in memory["outage"].as_array().context("outage")? {
        body.push_str(&format!(
            "\nMemory during an outage: {} messages of 100 B given to `send_all` (buffer: the default 100 000) while the broker stalled, accepted at {} msgs/s, then delivered: resident memory {:.0} MiB before, {:.0} MiB at most while they were accepted (+{:.0} MiB), {:.0} MiB at most until they were delivered (+{:.0} MiB).\n",
            o["messages"],
            thousands(o["accepted_per_sec"].as_f64().unwrap_or(0.0)),
            mib(o, "rss_before_bytes"),
            mib(o, "rss_peak_accepting_bytes"),
            mib(o, "rss_peak_accepting_bytes") - mib(o, "rss_before_bytes"),
            mib(o, "rss_peak_delivering_bytes"),
            mib(o, "rss_peak_delivering_bytes") - mib(o, "rss_before_bytes"),
        ));
    }
    body.push_str("\nStorage candidates (`crates/herald-spool/examples/stores.rs`): group-commit appends per second, each append returning once fsynced, median of 3 runs with the candidates alternating; redb given the same group commit by a writer thread (one transaction, one fsync, per group).\n\n| message | appenders | spool (segment log) | redb | spool / redb |\n|---|---:|---:|---:|---:|\n");
    for r in stores["appends"].as_array().context("appends")? {
        let (s, d) = (
            r["spool"].as_f64().unwrap_or(0.0),
            r["redb"].as_f64().unwrap_or(0.0),
        );
        body.push_str(&format!(
            "| {} B | {} | {} | {} | {:.2}× |\n",
            r["size"],
            r["appenders"],
            thousands(s),
            thousands(d),
            s / d
        ));
    }
    let rec = &stores["recovery"];
    body.push_str(&format!(
        "\nRecovery: reopening {} records of 100 B and reading them all back in order, as messages: spool {:.3} s, redb {:.3} s.\n",
        rec["records"],
        rec["spool_s"].as_f64().unwrap_or(0.0),
        rec["redb_s"].as_f64().unwrap_or(0.0),
    ));
    replace_section(&root.join("docs/benchmarks.md"), "spool", &body)?;
    eprintln!("docs/benchmarks.md: spool section updated");
    Ok(())
}

/// `cargo run --release -p herald-spool --example NAME -- ARGS --json OUT`.
fn example(name: &str, args: &[&str], json: &Path) -> Result<()> {
    run(
        &format!("spool benchmark: {name}"),
        cargo()
            .args([
                "run",
                "--release",
                "-p",
                "herald-spool",
                "--example",
                name,
                "--",
            ])
            .args(args)
            .args(["--json", json.to_str().context("utf-8 path")?]),
    )
}
