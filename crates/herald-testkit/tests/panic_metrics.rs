//! Panics in user code that the pipeline contains are counted in
//! `herald_user_code_panics_total`, by site. Its own test binary: it installs the process-wide
//! recorder.

use std::time::Duration;

use herald_batch::SizeOrLinger;
use herald_core::metrics as names;
use herald_core::{ErrorClass, Message, Producer};
use herald_testkit::{CallFault, MemoryTransport};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[derive(Debug)]
struct PanickingRetry;
impl herald_retry::RetryPolicy for PanickingRetry {
    fn decide(
        &self,
        _: &herald_retry::RetryContext,
        _: &mut fastrand::Rng,
    ) -> herald_retry::RetryDecision {
        panic!("retry policy bug")
    }
}

#[tokio::test(start_paused = true)]
async fn contained_panics_are_counted_by_site() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let t = MemoryTransport::new();
    t.script([CallFault::FailAll(ErrorClass::Transient)]);
    t.reject_payload_prefix("bad");
    let p = Producer::builder(t.clone())
        .retry(PanickingRetry)
        .batching(SizeOrLinger::new(1, 1 << 20, Duration::from_millis(1)))
        .on_unclaimed(|_| panic!("hook bug"))
        .build()
        .expect("build");
    p.send(Message::new("t", "m-0"))
        .await
        .expect_err("the retry policy panicked");
    drop(p.send_all([Message::new("t", "bad-1")]).await);
    let report = p.close(Duration::from_secs(5)).await;
    assert_eq!(
        report.unclaimed.len(),
        1,
        "the hook's panic keeps the failure"
    );

    // One snapshot: the debugging recorder hands a counter's value over once.
    let snapshot = snapshotter.snapshot().into_vec();
    let panics = |site: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(key, ..)| {
                let key = key.key();
                key.name() == names::USER_CODE_PANICS
                    && key.labels().any(|l| l.key() == "site" && l.value() == site)
            })
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{} is a counter, not {other:?}", names::USER_CODE_PANICS),
            })
            .sum()
    };
    // The policy is asked about both failures (the transient one and the rejected one).
    assert_eq!(panics("retry_policy"), 2);
    assert_eq!(panics("unclaimed_hook"), 1);
    assert_eq!(panics("batch_policy"), 0);
}
