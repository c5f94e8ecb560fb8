//! The recorder herald installs: metrics-exporter-prometheus for every metric but the histograms
//! whose buckets are set (herald's own, and any given with [`crate::Prometheus::buckets`]),
//! which are counted here into those buckets as they are recorded.
//!
//! Why not leave those to the exporter too: it keeps every sample, with a time stamp, on a
//! lock-free list until its upkeep or a scrape folds them into the buckets. For
//! `herald_send_latency_seconds`, recorded once per delivered message, that was about 140
//! instructions a message (a clock read, an epoch pin, a generation counter) and memory that
//! grows with the message rate between upkeeps; here a record is a search of the bounds and
//! three atomic adds. The text is written with the exporter's own formatting functions, so a
//! scrape reads the same as when the exporter kept them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    bounds: HashMap<String, Arc<[f64]>>,
    global: IndexMap<String, String>,
    families: Mutex<BTreeMap<String, Family>>,
}

#[derive(Default)]
struct Family {
    description: Option<String>,
    series: HashMap<Key, Arc<Buckets>>,
}

impl Fixed {
    /// `bounds`: per histogram name, finite and strictly increasing (checked by the builder).
    pub(crate) fn new(bounds: &[(String, Vec<f64>)], global: &[(String, String)]) -> Self {
        Self {
            bounds: bounds
                .iter()
                .map(|(name, b)| (name.clone(), Arc::from(b.as_slice())))
                .collect(),
            global: global.iter().cloned().collect(),
            families: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Family>> {
        self.families.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The histogram of `key`, if its name has set buckets (registered once per series; the
    /// handle is what herald keeps and records through).
    fn register(&self, key: &Key) -> Option<Arc<Buckets>> {
        let bounds = self.bounds.get(key.name())?;
        let mut families = self.lock();
        let family = families.entry(key.name().to_owned()).or_default();
        let series = family
            .series
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Buckets::new(bounds.clone())));
        Some(series.clone())
    }

    /// Keeps the description of one of these histograms; whether `key` is one.
    fn describe(&self, key: &KeyName, description: &str) -> bool {
        if !self.bounds.contains_key(key.as_str()) {
            return false;
        }
        let mut families = self.lock();
        let family = families.entry(key.as_str().to_owned()).or_default();
        family
            .description
            .get_or_insert_with(|| description.to_owned());
        true
    }

    /// Every series recorded so far, in the Prometheus text format, as the exporter writes a
    /// histogram: cumulative `_bucket` lines, `+Inf`, `_sum` and `_count`.
    pub(crate) fn render(&self, out: &mut String) {
        let families = self.lock();
        for (name, family) in families.iter() {
            if family.series.is_empty() {
                continue;
            }
            let name = sanitize_metric_name(name);
            if let Some(description) = &family.description {
                write_help_line(out, &name, None, None, description);
            }
            write_type_line(out, &name, None, None, "histogram");
            for (key, buckets) in &family.series {
                let labels = LabelSet::from_key_and_global(key, &self.global);
                let (cumulative, sum) = buckets.snapshot();
                let total = cumulative.last().copied().unwrap_or(0);
                for (le, count) in buckets.bounds.iter().zip(&cumulative) {
                    write_metric_line(
                        out,
                        &name,
                        Some("bucket"),
                        &labels,
                        Some(("le", le)),
                        count,
                        None,
                    );
                }
                write_metric_line(
                    out,
                    &name,
                    Some("bucket"),
                    &labels,
                    Some(("le", "+Inf")),
                    total,
                    None,
                );
                write_metric_line::<&str, f64>(out, &name, Some("sum"), &labels, None, sum, None);
                write_metric_line::<&str, u64>(
                    out,
                    &name,
                    Some("count"),
                    &labels,
                    None,
                    total,
                    None,
                );
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
        // The first bucket whose bound is at or above the value (`le`); a NaN counts in
        // `+Inf` only, as the exporter counts it.
        let i = if value.is_nan() {
            self.bounds.len()
        } else {
            self.bounds.partition_point(|b| *b < value)
        };
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut sum = self.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(sum) + value).to_bits();
            match self
                .sum
                .compare_exchange_weak(sum, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => sum = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::{Label, Recorder as _};
    use metrics_exporter_prometheus::PrometheusBuilder;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1, 1.0];

    /// The lines of one metric family in `text`, in order.
    fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    || l.strip_prefix("# TYPE ")
                        .is_some_and(|r| r.starts_with(name))
            })
            .collect()
    }

    /// What a scrape shows for a histogram counted here is what the exporter showed when it
    /// kept the histogram itself, line for line: the same samples, labels (global ones too),
    /// bounds, edge values and NaN.
    #[test]
    fn renders_as_the_exporter_renders_the_same_samples() {
        let name = "herald_test_seconds";
        let global = [("region".to_owned(), "eu \"1\"".to_owned())];
        let exporter = PrometheusBuilder::new()
            .set_buckets(BOUNDS)
            .expect("bounds")
            .add_global_label("region", "eu \"1\"")
            .build_recorder();
        let own = Fixed::new(&[(name.to_owned(), BOUNDS.to_vec())], &global);
        let ours = Recorder::new(PrometheusBuilder::new().build_recorder(), Arc::new(own));
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let samples = [0.0005, 0.001, 0.002, 0.01, 0.5, 1.0, 3.0, f64::NAN, 0.07];
        for labels in [
            vec![Label::new("transport", "kafka")],
            vec![
                Label::new("transport", "amqp"),
                Label::new("producer", "a\\b"),
            ],
        ] {
            let key = Key::from_parts(name, labels);
            let (theirs, mine) = (
                exporter.register_histogram(&key, &meta),
                ours.register_histogram(&key, &meta),
            );
            for s in samples {
                theirs.record(s);
                mine.record(s);
            }
        }
        let expected = exporter.handle().render();
        let mut got = String::new();
        ours.own.render(&mut got);
        let (mut expected, mut got) = (family(&expected, name), family(&got, name));
        assert!(expected.len() > 10, "{expected:?}");
        // Series come in hash order in both: compare them as sets of lines, then the TYPE line
        // first in both.
        assert_eq!(expected[0], got[0]);
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(expected, got);
    }

    #[test]
    fn only_histograms_with_set_buckets_are_counted_here() {
        let own = Arc::new(Fixed::new(&[("mine".to_owned(), BOUNDS.to_vec())], &[]));
        let exporter = PrometheusBuilder::new().build_recorder();
        let handle = exporter.handle();
        let r = Recorder::new(exporter, own.clone());
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        r.describe_histogram("mine".into(), None, "Mine, \"quoted\".".into());
        r.register_histogram(&Key::from_name("mine"), &meta)
            .record(0.5);
        r.register_histogram(&Key::from_name("theirs"), &meta)
            .record(0.5);
        let mut text = String::new();
        own.render(&mut text);
        assert!(text.contains("# HELP mine Mine, \"quoted\".\n"), "{text}");
        assert!(text.contains("mine_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(!text.contains("theirs"), "{text}");
        let rendered = handle.render();
        assert!(rendered.contains("theirs"), "{rendered}");
        assert!(!rendered.contains("mine"), "{rendered}");
    }
}
