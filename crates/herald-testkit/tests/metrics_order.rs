//! A delivery is counted in `herald_messages_delivered_total` before its caller hears of it, so
//! that a caller who waits for an outcome and then scrapes sees it counted. The clean CI run of
//! 8ca5068 failed herald-telemetry's scrape test so: 48 delivered in the scrape for 96 in the
//! report, the count of the last batch made after its receipt had woken the test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use herald_core::metrics::MESSAGES_DELIVERED;
use herald_core::{Message, Producer};
use herald_testkit::MemoryTransport;
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// The delivered counter, holding each count back until the caller has been told (at most
/// half a second): counted after the caller heard, the count is still short when the caller
/// looks, every time; counted before, the caller hears only once it is made.
#[derive(Default)]
struct Delivered {
    counted: AtomicU64,
    told: Mutex<bool>,
    told_changed: Condvar,
}

impl Delivered {
    fn caller_told(&self) {
        *self.told.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.told_changed.notify_all();
    }
}

impl CounterFn for Delivered {
    fn increment(&self, n: u64) {
        if n == 0 {
            return;
        }
        let told = self.told.lock().unwrap_or_else(PoisonError::into_inner);
        let _held = self
            .told_changed
            .wait_timeout_while(told, Duration::from_millis(500), |told| !*told)
            .unwrap_or_else(PoisonError::into_inner);
        self.counted.fetch_add(n, Ordering::SeqCst);
    }

    fn absolute(&self, n: u64) {
        self.counted.store(n, Ordering::SeqCst);
    }
}

/// Hands out [`Delivered`] for the delivered counter and no-ops for everything else.
struct OnlyDelivered(Arc<Delivered>);

impl Recorder for OnlyDelivered {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == MESSAGES_DELIVERED {
            Counter::from_arc(Arc::clone(&self.0))
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_counted_before_its_caller_hears_of_it() {
    let delivered = Arc::new(Delivered::default());
    let recorder = OnlyDelivered(Arc::clone(&delivered));
    // The producer's counters are bound to the recorder current when it is built.
    let p = metrics::with_local_recorder(&recorder, || {
        Producer::builder(MemoryTransport::new()).build()
    })
    .expect("build");
    p.send_all((0..10).map(|i| Message::new("t", format!("m-{i}"))))
        .await
        .wait()
        .await;
    let counted = delivered.counted.load(Ordering::SeqCst);
    delivered.caller_told();
    assert_eq!(
        counted, 10,
        "counted when the caller heard all ten delivered"
    );
    p.close(Duration::from_secs(5)).await;
}
