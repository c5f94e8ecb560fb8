//! What the adapters' `*-baseline` binaries share (the runs `cargo xtask bench` makes): their
//! command line (`--messages N`, `--json FILE`, ...), one figure per variant and payload, and
//! the JSON they write, each figure also as a ratio to the raw client at its best
//! (`raw_streaming`) and to the naive pattern (`raw_naive`) of its payload, and, where the run
//! has one, to the raw client at its best sending the same properties as herald's messages
//! (`raw_like_herald`: `vs_like`).

use std::str::FromStr;

/// One measured variant.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Payload size, bytes.
    pub payload: usize,
    /// Stable name: `raw_streaming`, `raw_naive`, `herald_default`, ...
    pub name: &'static str,
    /// What was run, for the docs' tables.
    pub what: String,
    /// Messages per second.
    pub rate: f64,
}

/// The binary's command line: `--name value` pairs.
#[derive(Debug, Clone)]
pub struct Args(Vec<String>);

impl Args {
    /// The process's arguments.
    pub fn from_env() -> Self {
        Self(std::env::args().skip(1).collect())
    }

    /// The value after `name`, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    /// The value after `name` parsed, or `default` when it is not given.
    pub fn number<T: FromStr>(&self, name: &str, default: T) -> Result<T, T::Err> {
        self.value(name).map_or(Ok(default), str::parse)
    }
}

/// The name of the figure of the raw client at its best sending what herald's messages carry
/// (an id, a key header), where a broker's bare payloads would not be a like-for-like
/// comparison.
pub const LIKE_HERALD: &str = "raw_like_herald";

/// `doc` (an object: the broker, the settings) with `figures` added, written to the `--json`
/// file of `args`, or printed when there is none.
pub fn write_report(
    args: &Args,
    mut doc: serde_json::Value,
    figures: &[Figure],
) -> std::io::Result<()> {
    let rate_of = |payload: usize, name: &str| {
        figures
            .iter()
            .find(|g| g.payload == payload && g.name == name)
            .map_or(f64::NAN, |g| g.rate)
    };
    let json: Vec<serde_json::Value> = figures
        .iter()
        .map(|f| {
            let mut json = serde_json::json!({
                "payload_bytes": f.payload,
                "name": f.name,
                "what": f.what,
                "msgs_per_sec": f.rate,
                "vs_raw": f.rate / rate_of(f.payload, "raw_streaming"),
                "vs_naive": f.rate / rate_of(f.payload, "raw_naive"),
            });
            let like = rate_of(f.payload, LIKE_HERALD);
            if !like.is_nan() {
                json["vs_like"] = (f.rate / like).into();
            }
            json
        })
        .collect();
    doc["figures"] = serde_json::Value::Array(json);
    let text = serde_json::to_string_pretty(&doc)?;
    match args.value("--json") {
        Some(path) => std::fs::write(path, text),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}
