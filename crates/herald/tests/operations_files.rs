//! The files operators load next to herald stay in step with the code and with each other:
//! docs/operations/alerts.yml and docs/operations/grafana-dashboard.json name only metrics herald
//! emits (a histogram's `_bucket`, `_sum` and `_count` series included) and recording rules
//! alerts.yml defines; every alert has its runbook section on docs/operations/alerts.md, a
//! `runbook` link to it, and unit tests in docs/operations/alerts.test.yml that show it both
//! firing and silent; the dashboard is JSON Grafana can import.

use std::collections::{BTreeMap, BTreeSet};

fn read(file: &str) -> String {
    let path = format!(
        "{}/../../docs/operations/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every metric the code emits.
fn emitted() -> BTreeSet<&'static str> {
    herald::metrics::ALL
        .iter()
        .chain(herald::kafka::metrics::ALL)
        .chain(herald::amqp::metrics::ALL)
        .chain(herald::spool::metrics::ALL)
        .chain(herald::nats::metrics::ALL)
        .chain(herald::redis::metrics::ALL)
        .chain(herald::mqtt::metrics::ALL)
        .copied()
        .collect()
}

/// The histograms, by the type column of docs/operations/metrics.md (which
/// tests/metrics_catalogue.rs keeps equal to the code's names).
fn histograms() -> BTreeSet<String> {
    read("metrics.md")
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            (name.starts_with("herald_") && cells.get(2) == Some(&"histogram"))
                .then(|| name.to_owned())
        })
        .collect()
}

/// Every token `herald_[a-z0-9_]+` (or, with `sep = ':'`, `herald:[a-z0-9_:]+`) not inside a
/// longer identifier.
fn tokens(text: &str, sep: char) -> BTreeSet<String> {
    let prefix = format!("herald{sep}");
    let ident = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ':';
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices(&prefix) {
        if text[..at].chars().next_back().is_some_and(ident) {
            continue;
        }
        let rest = &text[at + prefix.len()..];
        let len = rest
            .find(|c: char| !(ident(c) && (sep == ':' || c != ':')))
            .unwrap_or(rest.len());
        if len > 0 {
            found.insert(format!("{prefix}{}", &rest[..len]));
        }
    }
    found
}

/// The metric names `file` uses that herald does not emit.
fn unknown_metrics(file: &str, text: &str) -> Vec<String> {
    let emitted = emitted();
    let histograms = histograms();
    assert!(
        histograms.contains("herald_send_latency_seconds"),
        "metrics.md lists no histograms: {histograms:?}"
    );
    let used = tokens(text, '_');
    assert!(!used.is_empty(), "{file} names no herald metric");
    used.into_iter()
        .filter(|name| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| histograms.contains(*b)))
                .unwrap_or(name);
            !emitted.contains(base)
        })
        .collect()
}

/// `key: value` lines of a YAML file, in order (enough for the flat keys used here).
fn yaml_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            let v = l.strip_prefix(key)?.strip_prefix(':')?.trim();
            Some(v.trim_matches('"').trim_matches('\''))
        })
        .collect()
}

fn alerts() -> Vec<String> {
    let names: Vec<String> = yaml_values(&read("alerts.yml"), "alert")
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 10, "alerts.yml: only {names:?}");
    names
}

#[test]
fn the_alert_rules_name_only_metrics_herald_emits() {
    let text = read("alerts.yml");
    let unknown = unknown_metrics("alerts.yml", &text);
    assert!(
        unknown.is_empty(),
        "docs/operations/alerts.yml uses metrics herald does not emit: {unknown:?}"
    );
    let recorded: BTreeSet<String> = yaml_values(&text, "record")
        .into_iter()
        .map(str::to_owned)
        .collect();
    for name in &recorded {
        assert!(
            name.starts_with("herald:"),
            "recording rule {name}: not herald:..."
        );
    }
    let undefined: Vec<_> = tokens(&text, ':').difference(&recorded).cloned().collect();
    assert!(
        undefined.is_empty(),
        "alerts.yml uses recording rules it does not define: {undefined:?}"
    );
}

#[test]
fn the_dashboard_is_grafana_json_on_metrics_herald_emits() {
    let text = read("grafana-dashboard.json");
    let unknown = unknown_metrics("grafana-dashboard.json", &text);
    assert!(
        unknown.is_empty(),
        "docs/operations/grafana-dashboard.json uses metrics herald does not emit: {unknown:?}"
    );
    let recorded: BTreeSet<String> = yaml_values(&read("alerts.yml"), "record")
        .into_iter()
        .map(str::to_owned)
        .collect();
    let undefined: Vec<_> = tokens(&text, ':').difference(&recorded).cloned().collect();
    assert!(
        undefined.is_empty(),
        "the dashboard uses recording rules alerts.yml does not define: {undefined:?}"
    );

    let dash: serde_json::Value =
        serde_json::from_str(&text).expect("grafana-dashboard.json is not JSON");
    assert!(dash["title"].is_string(), "no title");
    assert!(dash["schemaVersion"].as_u64().is_some(), "no schemaVersion");
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    assert_eq!(
        var("transport")["definition"],
        "label_values(herald_messages_accepted_total, transport)"
    );
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_u64()), "{title}: panel id repeated");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: no gridPos");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(expr.contains("herald_"), "{title}: {expr}");
            queries += 1;
        }
    }
    assert!(queries > 20, "only {queries} queries");
}

#[test]
fn every_alert_has_a_runbook_section_and_link() {
    let alerts = alerts();
    let page = read("alerts.md");
    let headings: BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| l.trim_start_matches('#').trim())
        .collect();
    let missing: Vec<_> = alerts
        .iter()
        .filter(|a| !headings.contains(a.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts without a section on docs/operations/alerts.md: {missing:?}"
    );

    // Each alert's runbook annotation (the `runbook:` after its `alert:`) links to its section.
    let rules = read("alerts.yml");
    let runbooks: Vec<&str> = yaml_values(&rules, "runbook");
    assert_eq!(
        runbooks.len(),
        alerts.len(),
        "one runbook annotation per alert"
    );
    for (alert, link) in alerts.iter().zip(&runbooks) {
        let anchor = format!("alerts.md#{}", alert.to_lowercase());
        assert!(
            link.ends_with(&anchor),
            "{alert}: runbook {link}, want …{anchor}"
        );
    }
    let mut seen = BTreeSet::new();
    for a in &alerts {
        assert!(seen.insert(a), "alert {a} defined twice");
    }
}

#[test]
fn every_alert_is_tested_firing_and_silent() {
    let tests = read("alerts.test.yml");
    // alertname -> (cases expecting alerts, cases expecting none)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.strip_prefix("alertname:") else {
            continue;
        };
        let next = lines[i + 1..]
            .iter()
            .find(|l| l.starts_with("exp_alerts:"))
            .expect("alertname without exp_alerts");
        let entry = cases.entry(name.trim().to_owned()).or_default();
        if next.trim_end() == "exp_alerts: []" {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    for alert in alerts() {
        let (firing, silent) = cases.get(&alert).copied().unwrap_or_default();
        assert!(
            firing > 0 && silent > 0,
            "{alert}: alerts.test.yml has {firing} firing and {silent} silent cases; want both"
        );
    }
}
