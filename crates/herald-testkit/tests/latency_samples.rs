//! The send-latency histogram takes exactly one sample per delivered message whichever way the
//! message is answered: with its batch, or early (each acknowledged on its own), to a future per
//! message or to a sink of tagged fates, where herald records a run of samples at once. Its own
//! test binary: it installs the process-wide recorder.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_core::metrics as names;
use herald_core::{Delivery, FateSink, Message, Producer, SendError};
use herald_testkit::checks::wait_for;
use herald_testkit::MemoryTransport;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// Counts delivered fates.
struct Count(AtomicUsize);

impl FateSink for Count {
    fn fate(&self, _tag: u64, outcome: Result<Delivery, SendError>) {
        assert!(outcome.is_ok(), "{outcome:?}");
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Latency samples recorded since the last snapshot (a snapshot takes a histogram's samples).
fn latency_samples(snapshotter: &Snapshotter) -> usize {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            match (kind, value) {
                (MetricKind::Histogram, DebugValue::Histogram(v))
                    if key.name() == names::SEND_LATENCY =>
                {
                    Some(v.len())
                }
                _ => None,
            }
        })
        .sum()
}

#[tokio::test]
async fn one_latency_sample_per_message_answered_with_its_batch_or_early() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    for early in [false, true] {
        let t = MemoryTransport::new();
        // Early: each message acknowledged at once, its batch's outcome 2 ms later.
        t.answer_early(early);
        t.set_latency(Duration::from_millis(2));
        let p = Producer::builder(t.clone()).build().expect("build");
        let msg = |i: usize| Message::new("t", format!("m{i}")).with_key(format!("k{}", i % 7));

        // Tagged fates to one sink, in runs (the command's path).
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let sink: Arc<dyn FateSink> = count.clone();
        let n = 3_000;
        let msgs = (0..n).map(|i| (i as u64, msg(i))).collect();
        assert!(p.enqueue_tagged(msgs, &sink).await.is_empty());
        wait_for(
            Duration::from_secs(10),
            &format!("every fate (early {early})"),
            || count.0.load(Ordering::Acquire) >= n,
        )
        .await;
        assert_eq!(latency_samples(&snapshotter), n, "early {early}, tagged");

        // A future per message.
        let futures: Vec<_> = (0..500).map(|i| p.enqueue(msg(i))).collect();
        for f in futures {
            f.await.expect("accepted").await.expect("delivered");
        }
        assert_eq!(latency_samples(&snapshotter), 500, "early {early}, futures");

        // One receipt for all.
        let report = p.send_all((0..2_000).map(msg)).await.wait().await;
        assert!(report.all_delivered(), "early {early}: {:?}", report.failed);
        assert_eq!(
            latency_samples(&snapshotter),
            2_000,
            "early {early}, send_all"
        );
        p.close(Duration::from_secs(5)).await;
        assert_eq!(t.delivered(), 5_500, "early {early}");
    }
}
