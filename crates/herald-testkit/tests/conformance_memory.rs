//! The conformance suite on the in-memory transport: the reference every adapter is held to.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_transport_passes_the_conformance_suite() {
    let harness = herald_testkit::MemoryHarness::new();
    herald_testkit::conformance::run(&harness).await;
    assert!(
        harness.transport().closes() >= 7,
        "every check closes its producer"
    );
}
