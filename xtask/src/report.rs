//! Writing measured figures into the docs: a section of a Markdown file, numbers with
//! thousands separators, and the machine the figures were measured on.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The round trips (ms) the Kafka and RabbitMQ benchmarks add through the delaying proxy,
/// after their runs on localhost; the summary and the chart show them too.
pub(crate) const ROUND_TRIPS_MS: &[u64] = &[2, 10];

/// The text of `path` and where its section NAME lies: the end of `<!-- NAME:begin -->` and
/// the start of `<!-- NAME:end -->`.
fn locate(path: &Path, name: &str) -> Result<(String, usize, usize)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        bail!("{} has no {begin} … {end} section", path.display());
    };
    Ok((text, b + begin.len(), e))
}

/// The text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
pub(crate) fn section(path: &Path, name: &str) -> Result<String> {
    let (text, start, end) = locate(path, name)?;
    if start > end {
        bail!(
            "{}: the {name} section ends before it begins",
            path.display()
        );
    }
    Ok(text[start..end].to_owned())
}

/// Rewrites the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
pub(crate) fn replace_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let (text, start, end) = locate(path, name)?;
    let new = format!("{}\n{body}{}", &text[..start], &text[end..]);
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

/// The median of `v` (of an even count: the mean of the middle two) and the range, each
/// written by `show`: `(median, "1.23 (1.10–1.40)")`.
pub(crate) fn median_range(v: Vec<f64>, show: impl Fn(f64) -> String) -> (f64, String) {
    let (median, lo, hi) = median_min_max(v);
    (
        median,
        format!("{} ({}–{})", show(median), show(lo), show(hi)),
    )
}

/// The median of `v` (of an even count: the mean of the middle two), its smallest and its
/// largest.
fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

/// Two decimals.
pub(crate) fn two(x: f64) -> String {
    format!("{x:.2}")
}

/// A ratio: two decimals and `×`.
pub(crate) fn times(x: f64) -> String {
    format!("{x:.2}×")
}

/// Rounds of each `*-baseline` run on localhost: `HERALD_BENCH_ROUNDS`, default 3. Every
/// round runs the raw client, the naive pattern and herald's variants one after the other, so
/// rounds alternate herald and raw.
fn rounds() -> usize {
    std::env::var("HERALD_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1)
}

/// The figure of the raw client at its best sending what herald's messages carry (an id and a
/// key header), where a run has one (herald-testkit's `baseline::LIKE_HERALD`).
pub(crate) const LIKE_HERALD: &str = "raw_like_herald";

/// One JSON of figures from the rounds of a `*-baseline` run: each figure's `msgs_per_sec` is
/// the median of its rounds (`msgs_per_sec_range`: the slowest and the fastest), and `vs_raw`
/// and `vs_naive` the medians of the ratios taken within each round (`vs_raw_range`); where the
/// rounds have a [`LIKE_HERALD`] figure of that payload, `vs_like` (`vs_like_range`) the same
/// against it.
pub(crate) fn merge_rounds(runs: &[serde_json::Value]) -> Result<serde_json::Value> {
    use serde_json::json;
    let first = runs.first().context("no rounds")?;
    let rate = |run: &serde_json::Value, payload: &serde_json::Value, name: &str| {
        run["figures"].as_array().and_then(|f| {
            f.iter()
                .find(|f| &f["payload_bytes"] == payload && f["name"] == name)
                .and_then(|f| f["msgs_per_sec"].as_f64())
        })
    };
    let spread = |v: Vec<f64>| -> (f64, serde_json::Value) {
        let (median, lo, hi) = median_min_max(v);
        (median, json!([lo, hi]))
    };
    let mut figures = Vec::new();
    for f in first["figures"].as_array().context("figures")? {
        let (payload, name) = (&f["payload_bytes"], f["name"].as_str().unwrap_or_default());
        // Every round's figure of `name` (over its `base`'s, if given).
        let per_round = |base: Option<&str>| -> Result<Vec<f64>> {
            runs.iter()
                .map(|r| {
                    let x = rate(r, payload, name).with_context(|| {
                        format!("{name} at {payload} B is missing from a round")
                    })?;
                    let Some(base) = base else { return Ok(x) };
                    let b = rate(r, payload, base).with_context(|| {
                        format!("{base} at {payload} B is missing from a round")
                    })?;
                    Ok(x / b)
                })
                .collect()
        };
        // In any round: then every round must have it (a round without it is an error below).
        let has_like = runs.iter().any(|r| rate(r, payload, LIKE_HERALD).is_some());
        let (rate, rate_range) = spread(per_round(None)?);
        let (vs_raw, vs_raw_range) = spread(per_round(Some("raw_streaming"))?);
        let (vs_naive, _) = spread(per_round(Some("raw_naive"))?);
        let mut figure = json!({
            "payload_bytes": payload,
            "name": name,
            "what": f["what"],
            "msgs_per_sec": rate,
            "msgs_per_sec_range": rate_range,
            "vs_raw": vs_raw,
            "vs_raw_range": vs_raw_range,
            "vs_naive": vs_naive,
        });
        if has_like {
            let (vs_like, vs_like_range) = spread(per_round(Some(LIKE_HERALD))?);
            figure["vs_like"] = json!(vs_like);
            figure["vs_like_range"] = vs_like_range;
        }
        figures.push(figure);
    }
    let mut doc = first.clone();
    doc["rounds"] = json!(runs.len());
    doc["figures"] = serde_json::Value::Array(figures);
    Ok(doc)
}

/// `x` with its range from `f[range]`, if it has one: `945 494 (930 747–1 022 977)`.
pub(crate) fn with_range(f: &serde_json::Value, value: &str, show: fn(f64) -> String) -> String {
    let x = show(f[value].as_f64().unwrap_or(0.0));
    match f[format!("{value}_range")].as_array().map(Vec::as_slice) {
        Some([lo, hi]) => format!(
            "{x} ({}–{})",
            show(lo.as_f64().unwrap_or(0.0)),
            show(hi.as_f64().unwrap_or(0.0))
        ),
        _ => x,
    }
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
    /// Runs again through the testkit's delaying proxy, into the `{name}-rtt` section; `None`:
    /// none.
    pub(crate) rtts: Option<Rtts<'a>>,
}

/// The round-trip runs of a [`Baseline`].
pub(crate) struct Rtts<'a> {
    /// Round trips, in ms.
    pub(crate) ms: &'a [u64],
    /// Messages per run.
    pub(crate) messages: &'a str,
    /// The environment variable with the broker's URL, which the proxy goes in front of...
    pub(crate) url_var: &'static str,
    /// ...and its port when the URL names none.
    pub(crate) default_port: u16,
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
        let mut runs = Vec::new();
        let mut result = Ok(());
        for round in 0..rounds() {
            let one = out.with_file_name(format!("{}-round-{round}.json", self.name));
            match self
                .run_binary(&broker, &messages, None, &one)
                .and_then(|()| Ok(serde_json::from_str(&std::fs::read_to_string(&one)?)?))
            {
                Ok(json) => runs.push(json),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let result = result.and_then(|()| {
            let merged = merge_rounds(&runs)?;
            Ok(std::fs::write(
                &out,
                serde_json::to_string_pretty(&merged)?,
            )?)
        });
        let mut rtt_runs = Vec::new();
        if let (Ok(()), Some(rtts)) = (&result, &self.rtts) {
            match crate::proxy::build(root) {
                Ok(proxy_bin) => {
                    for &rtt in rtts.ms {
                        let out = root.join(format!("target/bench/{}-rtt-{rtt}.json", self.name));
                        let run = self.run_binary(
                            &broker,
                            rtts.messages,
                            Some((rtts, &proxy_bin, rtt)),
                            &out,
                        );
                        rtt_runs.push((rtt, run.map(|()| out)));
                    }
                }
                Err(e) => rtt_runs.extend(rtts.ms.first().map(|&rtt| (rtt, Err(e)))),
            }
        }
        drop(broker);
        result?;
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        let mut table = (self.intro)(&json, &machine());
        table.push_str(&format!(
            "Median of {} rounds, the slowest and the fastest in brackets; each round runs every \
             variant in turn (raw, naive, herald's), so herald and raw alternate, and a ratio is \
             taken within its round. The machine is shared with the broker: single runs vary by \
             ±15 %.\n\n",
            json["rounds"]
        ));
        table.push_str(&figures_table(&json)?);
        replace_section(&root.join("docs/benchmarks.md"), self.name, &table)?;
        eprintln!(
            "docs/benchmarks.md: {} section updated\n\n{table}",
            self.name
        );
        let Some(rtts) = self.rtts.as_ref().filter(|_| !rtt_runs.is_empty()) else {
            return Ok(());
        };
        let mut rtt_table = format!(
            "Run: `cargo xtask bench {}` on {}: the same variants again, {} messages each, every \
             variant through herald-testkit's delaying proxy, a process of its own in front of \
             the broker (`delay_proxy`: half the round trip each way, throughput not limited). \
             One run each: expect ±15 %.\n\n",
            self.name,
            machine(),
            rtts.messages
        );
        rtt_table.push_str(
            "| round trip | payload | variant | msgs/s | vs raw best | vs raw best, same properties |\n|---:|---|---|---:|---:|---:|\n",
        );
        for (rtt, run) in rtt_runs {
            let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run?)?)?;
            for f in json["figures"].as_array().context("figures")? {
                rtt_table.push_str(&format!(
                    "| {rtt} ms | {} B | {} | {} | {:.2}× | {} |\n",
                    f["payload_bytes"],
                    f["what"].as_str().unwrap_or("?"),
                    thousands(f["msgs_per_sec"].as_f64().unwrap_or(0.0)),
                    f["vs_raw"].as_f64().unwrap_or(0.0),
                    f["vs_like"].as_f64().map_or("—".to_owned(), times),
                ));
            }
        }
        let section = format!("{}-rtt", self.name);
        replace_section(&root.join("docs/benchmarks.md"), &section, &rtt_table)?;
        eprintln!("docs/benchmarks.md: {section} section updated\n\n{rtt_table}");
        Ok(())
    }

    /// One run of the binary against `broker`; with `rtt`, through the proxy (`bin`) adding
    /// that many ms of round trip.
    fn run_binary(
        &self,
        broker: &crate::broker::Broker,
        messages: &str,
        rtt: Option<(&Rtts<'_>, &Path, u64)>,
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
        for (k, v) in &broker.env {
            cmd.env(k, v);
        }
        let (what, _proxy) = match rtt {
            Some((rtts, bin, ms)) => {
                let direct = broker.var(rtts.url_var)?;
                let (proxy, url) = crate::proxy::in_front_of(bin, &direct, rtts.default_port, ms)?;
                cmd.args(["--rtt-ms", &ms.to_string()])
                    .env(rtts.url_var, url);
                (
                    format!("{} benchmark at {ms} ms round trip", self.name),
                    Some(proxy),
                )
            }
            None => (format!("{} benchmark", self.name), None),
        };
        crate::process::run(&what, &mut cmd)
    }
}

/// The figures of a `*-baseline` run as a table: payload, variant, rate, against raw and naive.
/// With a column against the raw client sending the same properties where the run has that
/// figure.
pub(crate) fn figures_table(json: &serde_json::Value) -> Result<String> {
    use anyhow::Context;
    let figures = json["figures"].as_array().context("figures")?;
    let like = figures.iter().any(|f| f.get("vs_like").is_some());
    let mut table = String::from(if like {
        "| payload | variant | msgs/s | vs raw best | vs raw best, same properties | vs naive |\n|---|---|---:|---:|---:|---:|\n"
    } else {
        "| payload | variant | msgs/s | vs raw best | vs naive |\n|---|---|---:|---:|---:|\n"
    });
    for f in figures {
        let like = if !like {
            String::new()
        } else if f.get("vs_like").is_some() {
            format!(" {} |", with_range(f, "vs_like", times))
        } else {
            " — |".to_owned()
        };
        table.push_str(&format!(
            "| {} B | {} | {} | {} |{like} {:.1}× |\n",
            f["payload_bytes"],
            f["what"].as_str().unwrap_or("?"),
            with_range(f, "msgs_per_sec", thousands),
            with_range(f, "vs_raw", times),
            f["vs_naive"].as_f64().unwrap_or(0.0),
        ));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn median_range_writes_the_median_then_the_range() {
        let (m, text) = median_range(vec![1_022_977.0, 930_747.0, 945_494.0], thousands);
        assert_eq!(m, 945_494.0);
        assert_eq!(text, "945 494 (930 747–1 022 977)");
        let (_, text) = median_range(vec![0.66, 0.59, 0.631], two);
        assert_eq!(text, "0.63 (0.59–0.66)");
        let (m, _) = median_range(vec![4.0, 1.0, 2.0, 10.0], two);
        assert_eq!(m, 3.0, "the mean of the middle two");
    }

    /// One round of a `*-baseline` binary: raw, naive and herald at 100 B.
    fn round(raw: f64, naive: f64, herald: f64) -> serde_json::Value {
        let f = |name: &str, rate: f64| json!({"payload_bytes": 100, "name": name, "what": name, "msgs_per_sec": rate});
        json!({"broker": "b", "figures": [
            f("raw_streaming", raw), f("raw_naive", naive), f("herald_default", herald)
        ]})
    }

    #[test]
    fn rounds_with_a_raw_client_sending_herald_s_properties_get_a_ratio_to_it() {
        let like = |rate: f64| json!({"payload_bytes": 100, "name": LIKE_HERALD, "what": "raw, same properties", "msgs_per_sec": rate});
        let runs: Vec<serde_json::Value> = [
            (100.0, 84.0, 90.0),
            (80.0, 60.0, 66.0),
            (120.0, 110.0, 100.0),
        ]
        .into_iter()
        .map(|(raw, like_rate, herald)| {
            let mut r = round(raw, 10.0, herald);
            r["figures"]
                .as_array_mut()
                .expect("figures")
                .push(like(like_rate));
            r
        })
        .collect();
        let doc = merge_rounds(&runs).expect("merge");
        let herald = &doc["figures"][2];
        // 90/84, 66/60, 100/110 within each round.
        assert_eq!(herald["vs_like"], 1.0714285714285714);
        assert_eq!(herald["vs_like_range"], json!([100.0 / 110.0, 1.1]));
        assert_eq!(doc["figures"][3]["vs_like"], 1.0);
        let table = figures_table(&doc).expect("table");
        assert!(
            table.starts_with("| payload | variant | msgs/s | vs raw best | vs raw best, same properties | vs naive |"),
            "{table}"
        );
        assert!(
            table.contains("| 100 B | herald_default | 90 (66–100) | 0.83× (0.82×–0.90×) | 1.07× (0.91×–1.10×) | 9.0× |"),
            "{table}"
        );
        // Every row has the column.
        for line in table.lines() {
            assert_eq!(line.matches('|').count(), 7, "{line}");
        }
        // A round without it cannot give the ratio.
        let mut short = runs.clone();
        short[1]["figures"].as_array_mut().expect("figures").pop();
        let err = merge_rounds(&short).expect_err("missing in a round");
        assert!(
            err.to_string().contains("raw_like_herald at 100 B"),
            "{err}"
        );
    }

    #[test]
    fn rounds_merge_into_medians_and_ratios_taken_within_each_round() {
        // herald beats raw in the rounds where raw is slow: the ratio of the medians (1.0)
        // is not the median of the ratios.
        let runs = [
            round(100.0, 10.0, 90.0),
            round(80.0, 10.0, 100.0),
            round(120.0, 8.0, 110.0),
        ];
        let doc = merge_rounds(&runs).expect("merge");
        assert_eq!(doc["rounds"], 3);
        assert_eq!(doc["broker"], "b");
        let herald = &doc["figures"][2];
        assert_eq!(herald["name"], "herald_default");
        assert_eq!(herald["msgs_per_sec"], 100.0);
        assert_eq!(herald["msgs_per_sec_range"], json!([90.0, 110.0]));
        assert_eq!(herald["vs_raw"], 0.9166666666666666);
        assert_eq!(herald["vs_raw_range"], json!([0.9, 1.25]));
        assert_eq!(herald["vs_naive"], 10.0);
        assert_eq!(with_range(herald, "vs_raw", times), "0.92× (0.90×–1.25×)");
        assert_eq!(
            with_range(herald, "msgs_per_sec", thousands),
            "100 (90–110)"
        );
        let mut short = round(1.0, 1.0, 1.0);
        short["figures"].as_array_mut().expect("figures").pop();
        let err = merge_rounds(&[runs[0].clone(), short]).expect_err("missing figure");
        assert!(err.to_string().contains("herald_default at 100 B"), "{err}");
        // No raw client with herald's properties in these rounds: no such ratio or column.
        assert!(herald.get("vs_like").is_none());
        let table = figures_table(&doc).expect("table");
        assert!(!table.contains("same properties"), "{table}");
        let mut no_raw = round(1.0, 1.0, 1.0);
        no_raw["figures"].as_array_mut().expect("figures").remove(0);
        let err = merge_rounds(&[no_raw.clone(), no_raw]).expect_err("missing raw");
        assert!(err.to_string().contains("raw_streaming at 100 B"), "{err}");
    }
}
