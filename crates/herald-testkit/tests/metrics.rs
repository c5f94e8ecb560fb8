//! The pipeline's metrics match what happened, checked with metrics-util's debugging recorder.
//! Its own test binary: it installs the process-wide recorder.

use std::collections::HashMap;
use std::time::Duration;

use herald_batch::SizeOrLinger;
use herald_core::metrics as names;
use herald_core::{ErrorClass, Message, Producer};
use herald_testkit::scenario::ScriptedFaults;
use herald_testkit::{CallFault, MemoryTransport};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

#[tokio::test(start_paused = true)]
async fn metrics_count_sent_failed_and_retried_messages() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let (scenario, builder) = ScriptedFaults::new();
    let p = builder.build().expect("build");
    let t = scenario.transport.clone();
    scenario.run(&p).await;
    let totals = p.stats().totals;
    p.close(Duration::from_secs(5)).await;

    let mut counters: HashMap<(String, Vec<(String, String)>), u64> = HashMap::new();
    let mut histograms: HashMap<String, usize> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let (kind, key) = key.into_parts();
        let labels: Vec<(String, String)> = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        assert!(
            labels
                .iter()
                .any(|(k, v)| k == "transport" && v == "memory"),
            "{key:?} lacks the transport label"
        );
        match (kind, value) {
            (MetricKind::Counter, DebugValue::Counter(n)) => {
                counters.insert((key.name().to_owned(), labels), n);
            }
            (MetricKind::Histogram, DebugValue::Histogram(v)) => {
                *histograms.entry(key.name().to_owned()).or_default() += v.len();
            }
            _ => {}
        }
    }
    let counter = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("transport".to_owned(), "memory".to_owned())];
        labels.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        counters
            .get(&(name.to_owned(), labels.clone()))
            .copied()
            .unwrap_or_else(|| {
                panic!(
                    "no counter {name} {labels:?}; have {:?}",
                    counters.keys().collect::<Vec<_>>()
                )
            })
    };
    assert_eq!(
        counter(names::MESSAGES_ACCEPTED, &[]),
        100,
        "the oversized one is refused, not accepted"
    );
    assert_eq!(counter(names::MESSAGES_DELIVERED, &[]), 96);
    assert_eq!(
        counter(
            names::MESSAGES_FAILED,
            &[("class", "permanent"), ("reason", "rejected")]
        ),
        4
    );
    assert_eq!(
        counter(
            names::MESSAGES_FAILED,
            &[("class", "permanent"), ("reason", "too_large")]
        ),
        1
    );
    assert_eq!(counter(names::RETRIES, &[]), totals.retries);
    assert_eq!(counter(names::BATCHES, &[]), totals.batches);
    assert_eq!(
        histograms[names::SEND_LATENCY],
        96,
        "one latency sample per delivered message"
    );
    assert_eq!(histograms[names::BATCH_MESSAGES] as u64, totals.batches);
    assert_eq!(t.delivered(), 96);
    assert_eq!(counter(names::MESSAGES_FAILED_STORED_COPY, &[]), 0);

    // A message stored, then held for its key's order, whose copy then fails: counted apart.
    let t = MemoryTransport::new();
    t.script([
        CallFault::StoreThenFail(vec![0]),
        CallFault::FailAll(ErrorClass::Permanent),
    ]);
    let p = Producer::builder(t.clone())
        .batching(SizeOrLinger::new(2, 1 << 20, Duration::from_millis(1)))
        .build()
        .expect("build");
    let fates = p
        .send_all([
            Message::new("t", "a").with_key("k"),
            Message::new("t", "b").with_key("k"),
        ])
        .await
        .wait()
        .await;
    assert_eq!(fates.failed.len(), 2);
    p.close(Duration::from_secs(5)).await;
    let stored_copies: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == names::MESSAGES_FAILED_STORED_COPY)
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(stored_copies, 1, "b's first copy is stored");
}
