//! The recorder herald installs: metrics-exporter-prometheus for every metric but the histograms
//! whose buckets are set (herald's latency and batch histograms, and any given with
//! [`crate::Prometheus::buckets`]), which are counted here into those buckets as they are
//! recorded.
//!
//! Why not leave those to the exporter too: it keeps every sample, with a time stamp, on a
//! lock-free list until its upkeep or a scrape folds them into the buckets. For
//! `herald_send_latency_seconds`, recorded once per delivered message, that was about 140
//! instructions a message by callgrind (a clock read, an epoch pin, a generation counter;
//! docs/benchmarks.md, "The recorder's histograms counted in place") and memory that grows with
//! the message rate between upkeeps; here a record is a search of the bounds, an atomic add to
//! the bucket and a compare-and-swap of the sum. The text is written with the exporter's own
//! formatting functions and by its rules: a name is matched as sanitized, a key is one series
//! whatever the order of its labels (as `metrics::Key` compares), and keys with equal label sets
//! (the exporter's `LabelSet`, global labels included) are one series. So a scrape reads as when
//! the exporter kept them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use indexmap::IndexMap;
use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use metrics_exporter_prometheus::formatting::{
    sanitize_metric_name, write_help_line, write_metric_line, write_type_line,
};
use metrics_exporter_prometheus::{LabelSet, PrometheusRecorder};

/// herald's Prometheus recorder, from [`crate::Prometheus::build`]: install it, or compose it
/// with recorders of your own. [`crate::Telemetry::render`] renders what it records.
pub struct Recorder {
    exporter: PrometheusRecorder,
    own: Arc<Fixed>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    pub(crate) fn new(exporter: PrometheusRecorder, own: Arc<Fixed>) -> Self {
        Self { exporter, own }
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.exporter.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.exporter.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if !self.own.describe(&key, &description) {
            self.exporter.describe_histogram(key, unit, description);
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.exporter.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.exporter.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        match self.own.register(key) {
            Some(h) => Histogram::from_arc(h),
            None => self.exporter.register_histogram(key, metadata),
        }
    }
}

/// The histograms with set buckets, by name, and the global labels their lines carry.
pub(crate) struct Fixed {
    /// By sanitized name: the exporter matches bucket settings, and groups series into
    /// families, by the sanitized name too (`my.hist` and `my_hist` are one family).
    bounds: HashMap<String, Arc<[f64]>>,
    global: IndexMap<String, String>,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    families: BTreeMap<String, Family>,
    /// Every key registered, to its series: a key registered again (its labels in any order)
    /// is found here without building its label set.
    by_key: HashMap<Key, Arc<Buckets>>,
}

#[derive(Default)]
struct Family {
    description: Option<String>,
    /// By label set, global labels included (a key's label overrides a global one of the same
    /// name), in the order they were first registered.
    series: IndexMap<LabelSet, Arc<Buckets>>,
}

impl Fixed {
    /// `bounds`: per histogram name, finite and strictly increasing (checked by the builder).
    /// Of two names that sanitize alike, the later's bounds count.
    pub(crate) fn new(bounds: &[(String, Vec<f64>)], global: &[(String, String)]) -> Self {
        Self {
            bounds: bounds
                .iter()
                .map(|(name, b)| (sanitize_metric_name(name), Arc::from(b.as_slice())))
                .collect(),
            global: global.iter().cloned().collect(),
            state: RwLock::new(State::default()),
        }
    }

    /// The histogram of `key`, if its name has set buckets. herald registers its handles once
    /// per producer; a key registered again is found under the read lock.
    fn register(&self, key: &Key) -> Option<Arc<Buckets>> {
        let name = sanitize_metric_name(key.name());
        let bounds = self.bounds.get(&name)?;
        let found = self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_key
            .get(key)
            .cloned();
        if found.is_some() {
            return found;
        }
        let labels = LabelSet::from_key_and_global(key, &self.global);
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let series = state
            .families
            .entry(name)
            .or_default()
            .series
            .entry(labels)
            .or_insert_with(|| Arc::new(Buckets::new(bounds.clone())))
            .clone();
        state.by_key.insert(key.clone(), series.clone());
        Some(series)
    }

    /// Keeps the description of one of these histograms (the first given, as the exporter
    /// does); whether `key` is one.
    fn describe(&self, key: &KeyName, description: &str) -> bool {
        let name = sanitize_metric_name(key.as_str());
        if !self.bounds.contains_key(&name) {
            return false;
        }
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state
            .families
            .entry(name)
            .or_default()
            .description
            .get_or_insert_with(|| description.to_owned());
        true
    }

    /// Every series recorded so far, in the Prometheus text format, as the exporter writes a
    /// histogram: `# HELP` if described, `# TYPE`, then per series its cumulative `_bucket`
    /// lines, `+Inf`, `_sum` and `_count`, and a blank line after the family.
    pub(crate) fn render(&self, out: &mut String) {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        for (name, family) in &state.families {
            if family.series.is_empty() {
                continue;
            }
            if let Some(description) = &family.description {
                write_help_line(out, name, None, None, description);
            }
            write_type_line(out, name, None, None, "histogram");
            for (labels, buckets) in &family.series {
                let (cumulative, sum) = buckets.snapshot();
                let total = cumulative.last().copied().unwrap_or(0);
                for (le, count) in buckets.bounds.iter().zip(&cumulative) {
                    write_metric_line(
                        out,
                        name,
                        Some("bucket"),
                        labels,
                        Some(("le", le)),
                        count,
                        None,
                    );
                }
                write_metric_line(
                    out,
                    name,
                    Some("bucket"),
                    labels,
                    Some(("le", "+Inf")),
                    total,
                    None,
                );
                write_metric_line::<&str, f64>(out, name, Some("sum"), labels, None, sum, None);
                write_metric_line::<&str, u64>(out, name, Some("count"), labels, None, total, None);
            }
            out.push('\n');
        }
    }
}

/// One series: a count per bucket (the last one above every bound), and the sum.
pub(crate) struct Buckets {
    bounds: Arc<[f64]>,
    counts: Box<[AtomicU64]>,
    /// The sum of the samples, as `f64` bits.
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: Arc<[f64]>) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// The count of each bucket and of `+Inf`, cumulative, and the sum. Taken while others
    /// record, a bucket may miss a sample its sum has (or the other way round), as with any
    /// scrape of a live histogram; the buckets never decrease and `+Inf` is their total.
    fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut running = 0u64;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                running += c.load(Ordering::Relaxed);
                running
            })
            .collect();
        (cumulative, f64::from_bits(self.sum.load(Ordering::Relaxed)))
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        self.record_many(value, 1);
    }

    /// `count` samples of `value` at once: herald records a batch delivered together this
    /// way, one bucket search and one add for all of them.
    fn record_many(&self, value: f64, count: usize) {
        if count == 0 {
            return;
        }
        // The first bucket whose bound is at or above the value (`le`); a NaN counts in
        // `+Inf` only, as the exporter counts it.
        let i = if value.is_nan() {
            self.bounds.len()
        } else {
            self.bounds.partition_point(|b| *b < value)
        };
        self.counts[i].fetch_add(count as u64, Ordering::Relaxed);
        // Exact for one sample: `value * 1.0` is `value`, NaN and infinities included.
        let added = value * count as f64;
        // Never `Err`: the closure always gives a value.
        let _previous = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + added).to_bits())
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::{Label, Recorder as _};
    use metrics_exporter_prometheus::PrometheusBuilder;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1, 1.0];

    /// The family `name` in `text`: its header lines (`# HELP`, `# TYPE`) in order, and each
    /// series' lines in order, keyed by its labels without `le` (series come in hash order in
    /// the exporter's text, so they are compared as a set).
    fn family(text: &str, name: &str) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
        let mut header = Vec::new();
        let mut series: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in text.lines() {
            if line == format!("# HELP {name}")
                || line.starts_with(&format!("# HELP {name} "))
                || line == format!("# TYPE {name} histogram")
            {
                header.push(line.to_owned());
            } else if let Some(rest) = line.strip_prefix(name) {
                let labels = rest
                    .split_once('{')
                    .and_then(|(_, r)| r.split_once('}'))
                    .map(|(l, _)| {
                        l.split(',')
                            .filter(|p| !p.starts_with("le="))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                series.entry(labels).or_default().push(line.to_owned());
            }
        }
        (header, series)
    }

    #[test]
    fn a_run_of_samples_counts_as_the_samples_one_by_one() {
        let bounds: Arc<[f64]> = Arc::from(BOUNDS);
        let (run, one_by_one) = (Buckets::new(bounds.clone()), Buckets::new(bounds));
        for (value, n) in [(0.005, 3), (0.5, 1), (7.0, 2), (0.01, 0), (f64::NAN, 2)] {
            run.record_many(value, n);
            for _ in 0..n {
                one_by_one.record(value);
            }
        }
        let (counts, sum) = run.snapshot();
        assert_eq!(counts, vec![0, 3, 3, 4, 8], "cumulative, +Inf last");
        let (counts_one, sum_one) = one_by_one.snapshot();
        assert_eq!(counts, counts_one);
        // A NaN makes both sums NaN, as the exporter's would be.
        assert!(sum.is_nan() && sum_one.is_nan(), "{sum} {sum_one}");
        let finite = Buckets::new(Arc::from(BOUNDS));
        finite.record_many(0.25, 4);
        assert_eq!(finite.snapshot(), (vec![0, 0, 0, 4, 4], 1.0));
    }

    /// Records `samples` into `name` under each of `keys`' labels, through `recorder`.
    fn record(recorder: &dyn metrics::Recorder, name: &str, keys: &[Vec<Label>], samples: &[f64]) {
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        // Described per spelling: the first description given is the one shown.
        let description = format!("Test \"{name}\"\\n.");
        recorder.describe_histogram(name.to_owned().into(), None, description.into());
        for labels in keys {
            let h = recorder
                .register_histogram(&Key::from_parts(name.to_owned(), labels.clone()), &meta);
            for &s in samples {
                h.record(s);
            }
        }
    }

    /// What a scrape shows for a histogram counted here is what the exporter showed when it
    /// kept the histogram itself, series for series and line for line: the same samples (sums
    /// included), labels (a key's label overriding a global one, two keys that come out as one
    /// label set), a name given in two spellings that sanitize alike, a description, NaN.
    #[test]
    fn renders_as_the_exporter_renders_the_same_samples() {
        let name = "herald_test_seconds";
        let global = [
            ("region".to_owned(), "eu \"1\"".to_owned()),
            ("producer".to_owned(), "billing".to_owned()),
        ];
        let mut builder = PrometheusBuilder::new()
            .set_buckets(BOUNDS)
            .expect("bounds");
        for (k, v) in &global {
            builder = builder.add_global_label(k, v);
        }
        let exporter = builder.build_recorder();
        let own = Fixed::new(
            &[("herald_test.seconds".to_owned(), BOUNDS.to_vec())],
            &global,
        );
        let ours = Recorder::new(PrometheusBuilder::new().build_recorder(), Arc::new(own));
        let keys = [
            vec![Label::new("transport", "kafka")],
            vec![Label::new("transport", "amqp"), Label::new("route", "a\\b")],
            // Two keys, one label set once the global `producer` is added to the first.
            vec![Label::new("transport", "nats")],
            vec![
                Label::new("transport", "nats"),
                Label::new("producer", "billing"),
            ],
            // A key's label over the global one.
            vec![Label::new("transport", "redis"), Label::new("region", "us")],
            // One key, its labels given in two orders.
            vec![Label::new("transport", "mqtt"), Label::new("route", "r")],
            vec![Label::new("route", "r"), Label::new("transport", "mqtt")],
        ];
        // Finite, so that the sums compare (NaN and infinity have a series of their own). The
        // exporter adds a merged series' samples key by key and this side as they come: for
        // these samples both orders give the same sum to the bit (each key records the same
        // run).
        let samples = [0.0005, 0.001, 0.002, 0.01, 0.5, 1.0, 3.0, 0.07, -1.0];
        for r in [&exporter as &dyn metrics::Recorder, &ours] {
            // Two spellings of one name: one family, as the exporter makes it.
            record(r, name, &keys[..3], &samples);
            record(r, "herald_test.seconds", &keys[3..], &samples);
            record(
                r,
                name,
                &[vec![Label::new("transport", "nan")]],
                &[0.5, f64::NAN, f64::INFINITY],
            );
        }
        let expected = exporter.handle().render();
        let mut got = String::new();
        ours.own.render(&mut got);
        let (expected, got) = (family(&expected, name), family(&got, name));
        assert_eq!(expected.0.len(), 2, "HELP and TYPE: {expected:?}");
        assert_eq!(expected.1.len(), 6, "six label sets: {expected:?}");
        assert_eq!(expected, got);
    }

    #[test]
    fn only_histograms_with_set_buckets_are_counted_here() {
        let own = Arc::new(Fixed::new(&[("mine".to_owned(), BOUNDS.to_vec())], &[]));
        let exporter = PrometheusBuilder::new().build_recorder();
        let handle = exporter.handle();
        let r = Recorder::new(exporter, own.clone());
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        r.register_histogram(&Key::from_name("mine"), &meta)
            .record(0.5);
        r.register_histogram(&Key::from_name("theirs"), &meta)
            .record(0.5);
        let mut text = String::new();
        own.render(&mut text);
        assert!(text.contains("mine_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(!text.contains("theirs"), "{text}");
        let rendered = handle.render();
        assert!(rendered.contains("theirs"), "{rendered}");
        assert!(!rendered.contains("mine"), "{rendered}");
    }

    /// The whole scrape, through [`crate::Prometheus`]: every family once, whichever spelling
    /// of a name was recorded and whoever counted it.
    #[test]
    fn a_scrape_has_each_family_once() {
        let (recorder, telemetry) = crate::Prometheus::new()
            .buckets("my.hist", BOUNDS)
            .expect("bounds")
            .build()
            .expect("recorder");
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("my.hist").record(0.5);
            metrics::histogram!("my_hist", "transport" => "kafka").record(0.5);
            metrics::histogram!(herald_core::metrics::SEND_LATENCY, "transport" => "memory")
                .record(0.002);
            metrics::histogram!("other_seconds").record(0.5);
            metrics::counter!("herald_test_total").increment(1);
        });
        let text = telemetry.render();
        let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let all = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), all, "{text}");
        for family in ["my_hist", "herald_send_latency_seconds", "other_seconds"] {
            assert!(
                types.contains(&format!("# TYPE {family} histogram").as_str()),
                "{text}"
            );
        }
        assert!(text.contains("my_hist_count 1\n"), "{text}");
        assert!(
            text.contains("my_hist_count{transport=\"kafka\"} 1\n"),
            "{text}"
        );
    }
}
