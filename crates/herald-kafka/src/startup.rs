//! A new producer's first message, without librdkafka's half-second start-up wait.
//!
//! An idempotent librdkafka producer sends nothing before the cluster has given it a producer
//! id, and it asks for one only when a metadata answer arrives while a broker it learnt from
//! the cluster (not the bootstrap address) is up, or else when a 500 ms timer fires. With the
//! default sparse connections, the one metadata answer of a start comes through the bootstrap
//! connection, which librdkafka closes as soon as it has learnt the brokers: so the timer
//! decides, and every new producer's first message waits about half a second (`strace` and
//! librdkafka's `debug=eos,broker,metadata` log show it; the raw client pays it too).
//!
//! So, the first time a producer is used, a short-lived thread asks for the topic's metadata
//! again and again (every [`EVERY`], each request waiting up to [`EACH`]) until the producer's
//! first delivery report arrives or [`FOR`] has passed. One of those requests opens the
//! learnt broker's connection and its answer makes librdkafka ask for the id at once: on a
//! local broker the first message is acknowledged about 50 ms after the producer was made
//! (librdkafka spaces its connection attempts 50 ms apart), instead of about 500 ms. The
//! thread holds the producer weakly, so a closed producer ends it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rdkafka::producer::Producer as _;

use crate::connection::Client;

/// How long the nudging goes on at most: past it, librdkafka's own timer has fired anyway.
const FOR: Duration = Duration::from_secs(1);
/// The pause between two metadata requests.
const EVERY: Duration = Duration::from_millis(20);
/// How long one metadata request may wait for a broker and its answer.
const EACH: Duration = Duration::from_millis(200);

/// One producer's start-up, kept in its context: whether its nudge has begun, and whether its
/// first delivery report has come (from then on it has its producer id).
pub(crate) struct Startup {
    /// Off when idempotence is off: librdkafka then sends without a producer id.
    wanted: bool,
    begun: AtomicBool,
    reported: AtomicBool,
}

impl Startup {
    pub(crate) fn new(idempotent: bool) -> Self {
        Self {
            wanted: idempotent,
            begun: AtomicBool::new(false),
            reported: AtomicBool::new(false),
        }
    }

    /// Called on every delivery report: a load, and a store the first time.
    #[inline]
    pub(crate) fn reported(&self) {
        if !self.reported.load(Ordering::Relaxed) {
            self.reported.store(true, Ordering::Release);
        }
    }

    fn has_report(&self) -> bool {
        self.reported.load(Ordering::Acquire)
    }

    /// Whether the nudge is to begin now: the first call only (a load, on every batch, once
    /// it has begun).
    fn claim(&self) -> bool {
        self.wanted
            && !self.begun.load(Ordering::Relaxed)
            && !self.begun.swap(true, Ordering::AcqRel)
    }
}

/// Starts the nudge for `producer` the first time it is used.
pub(crate) fn nudge_once(producer: &Arc<Client>, topic: &str) {
    if !producer.context().startup.claim() {
        return;
    }
    let (weak, topic) = (Arc::downgrade(producer), topic.to_owned());
    let started = std::thread::Builder::new()
        .name("herald-kafka-start".into())
        .spawn(move || nudge(&weak, &topic));
    if let Err(e) = started {
        tracing::debug!(error = %e, "no thread for the start-up metadata requests: the first message waits for librdkafka's timer");
    }
}

/// Asks for `topic`'s metadata until the producer's first delivery report, for [`FOR`] at most.
fn nudge(producer: &Weak<Client>, topic: &str) {
    let requests = repeat_until(Instant::now() + FOR, EVERY, || {
        let Some(producer) = producer.upgrade() else {
            return false;
        };
        if producer.context().startup.has_report() {
            return false;
        }
        // The answer does not matter (a producer that cannot reach a broker says so through
        // its delivery reports); its arrival does.
        let _answer = producer.client().fetch_metadata(Some(topic), EACH);
        true
    });
    tracing::debug!(
        topic,
        requests,
        "start-up metadata requests done (the producer has its id, or librdkafka's own timer took over)"
    );
}

/// Runs `step` until it returns false or `until` has passed, pausing `every` between runs;
/// returns how many runs asked to go on.
fn repeat_until(until: Instant, every: Duration, mut step: impl FnMut() -> bool) -> usize {
    let mut went_on = 0;
    while Instant::now() < until && step() {
        went_on += 1;
        std::thread::sleep(every);
    }
    went_on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_until_told_to_stop_or_the_time_is_up() {
        let mut left = 3;
        let runs = repeat_until(
            Instant::now() + Duration::from_secs(60),
            Duration::ZERO,
            || {
                left -= 1;
                left > 0
            },
        );
        assert_eq!(runs, 2, "stops at the first `false`");

        let past = Instant::now()
            .checked_sub(Duration::from_millis(1))
            .expect("an instant a millisecond ago");
        let runs = repeat_until(past, Duration::ZERO, || panic!("runs after its time"));
        assert_eq!(runs, 0, "nothing runs once the time is up");
    }

    #[test]
    fn each_producer_is_nudged_once_and_only_when_idempotent() {
        let first = Startup::new(true);
        assert!(first.claim(), "the first producer's first batch");
        assert!(!first.claim(), "not again for its later batches");
        let rebuilt = Startup::new(true);
        assert!(
            rebuilt.claim(),
            "a producer rebuilt after a fatal error starts afresh"
        );
        assert!(!rebuilt.claim());
        assert!(
            !Startup::new(false).claim(),
            "without idempotence librdkafka does not wait for a producer id"
        );
    }

    #[test]
    fn the_first_report_is_remembered() {
        let startup = Startup::new(true);
        assert!(!startup.has_report());
        startup.reported();
        startup.reported();
        assert!(startup.has_report());
    }
}
