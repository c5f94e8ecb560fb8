//! docs/operations/metrics.md lists exactly the metrics the code emits, with a type that
//! matches the name (counters, and only counters, end in `_total`).

use std::collections::BTreeSet;

#[test]
fn the_metrics_page_and_the_code_name_the_same_metrics() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/operations/metrics.md"
    ))
    .expect("docs/operations/metrics.md");
    let rows: Vec<(String, String)> = page
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cells.get(2).copied().unwrap_or("").to_owned();
            name.starts_with("herald_").then(|| (name.to_owned(), kind))
        })
        .collect();
    let documented: BTreeSet<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    let emitted: BTreeSet<&str> = herald::metrics::ALL
        .iter()
        .chain(herald::kafka::metrics::ALL)
        .chain(herald::amqp::metrics::ALL)
        .chain(herald::spool::metrics::ALL)
        .chain(herald::nats::metrics::ALL)
        .chain(herald::redis::metrics::ALL)
        .chain(herald::mqtt::metrics::ALL)
        .copied()
        .collect();
    let missing: Vec<_> = emitted.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&emitted).collect();
    assert!(
        missing.is_empty(),
        "emitted but not on docs/operations/metrics.md: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "on docs/operations/metrics.md but not emitted: {stale:?}"
    );
    assert_eq!(rows.len(), documented.len(), "a metric is listed twice");
    for (name, kind) in &rows {
        assert!(
            ["counter", "gauge", "histogram"].contains(&kind.as_str()),
            "{name}: type `{kind}`"
        );
        assert_eq!(
            name.ends_with("_total"),
            kind == "counter",
            "{name}: counters, and only counters, end in _total"
        );
    }
}
