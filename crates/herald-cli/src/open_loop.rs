//! Open-loop load for `herald bench --rate`: messages go out on a fixed schedule whatever the
//! acknowledgements do, and each is timed from the moment it was *due* to its acknowledgement.
//! A sender that falls behind (backpressure, a stall) is charged for the wait of every message
//! behind it, as a steady stream of requests would be: no coordinated omission.
//!
//! herald and the raw clients go through the same pacer and the same clock: a thread of its own
//! sleeps until the next message is due (`std::thread::sleep`: tens of microseconds late, where
//! the runtime's timer rounds to a millisecond), hands every message due by then to the sender,
//! and passes each acknowledgement's future to a task that notes when it completes.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::mpsc;

/// Something that sends message `i` of a run: the future `send` returns ends once the message
/// is handed over (it may wait for room, as a bounded buffer does); the future *it* returns ends
/// with the message's acknowledgement (`true`) or failure (`false`).
pub(crate) trait Sender: Send + 'static {
    fn send(&mut self, i: u64) -> impl Future<Output = BoxFuture<'static, bool>>;
}

/// What an open-loop run measured.
#[derive(Debug)]
pub(crate) struct Paced {
    /// Due-to-acknowledgement times of the acknowledged messages, shortest first.
    latencies: Vec<Duration>,
    /// Messages that failed.
    pub(crate) failed: u64,
    /// From the first message's due time to the last acknowledgement.
    pub(crate) elapsed: Duration,
    /// How far behind its schedule the pacer fell at worst (handing over waited): more than a
    /// few milliseconds means the sender could not take the rate.
    pub(crate) behind: Duration,
}

impl Paced {
    pub(crate) fn delivered(&self) -> u64 {
        self.latencies.len() as u64
    }

    /// The due-to-acknowledgement time at quantile `q` (0..=1) of the acknowledged messages:
    /// exact (every message's time is kept), `None` when none was acknowledged.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.latencies.len();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies[rank - 1])
    }
}

/// When message `i` is due, `rate` messages a second from `start`.
fn due(start: Instant, rate: f64, i: u64) -> Instant {
    start + Duration::from_secs_f64(i as f64 / rate)
}

/// The longest run `--rate` may schedule.
const LONGEST_RUN: Duration = Duration::from_secs(24 * 60 * 60);

/// `--rate`: a positive, finite number of messages a second, at which `n` messages take at
/// most [`LONGEST_RUN`] (a schedule beyond any clock's range would panic).
pub(crate) fn check_rate(rate: f64, n: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        rate.is_finite() && rate > 0.0,
        "--rate must be a positive number of messages per second, not {rate}"
    );
    let secs = n as f64 / rate;
    anyhow::ensure!(
        secs <= LONGEST_RUN.as_secs_f64(),
        "--rate {rate} with {n} messages would run for {secs:.0} s; at most {} s (24 h): raise --rate or lower --messages",
        LONGEST_RUN.as_secs()
    );
    Ok(())
}

/// Sends `n` messages through `sender` at `rate` messages a second and times each from its
/// due time to its acknowledgement, and gives `sender` back (to be closed). Runs the pacer on a
/// blocking thread of the current runtime.
pub(crate) async fn run<S: Sender>(sender: S, rate: f64, n: u64) -> anyhow::Result<(Paced, S)> {
    check_rate(rate, n)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, BoxFuture<'static, bool>)>();
    let handle = tokio::runtime::Handle::current();
    // A moment from now, so that the first messages are not already late when the thread starts.
    let start = Instant::now() + Duration::from_millis(10);
    let pacer = tokio::task::spawn_blocking(move || {
        let mut sender = sender;
        let mut behind = Duration::ZERO;
        let mut i = 0;
        while i < n {
            let now = Instant::now();
            let next = due(start, rate, i);
            if next > now {
                std::thread::sleep(next - now);
                continue;
            }
            behind = behind.max(now - next);
            // Every message due by now, in one go.
            let elapsed = now.saturating_duration_since(start).as_secs_f64();
            let end = ((elapsed * rate).floor() as u64 + 1).clamp(i + 1, n);
            let collecting = handle.block_on(async {
                for k in i..end {
                    let ack = sender.send(k).await;
                    if tx.send((k, ack)).is_err() {
                        return false;
                    }
                }
                true
            });
            // The collector outlives the pacer unless the run was dropped (or failed): then
            // sending stops too.
            if !collecting {
                break;
            }
            i = end;
        }
        (behind, sender)
    });
    let mut inflight = FuturesUnordered::new();
    // Every acknowledged message's time is kept (16 bytes each); reserved up front only for
    // runs of ordinary length.
    let mut latencies = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(1 << 22));
    let (mut failed, mut last) = (0u64, start);
    let mut open = true;
    loop {
        tokio::select! {
            got = rx.recv(), if open => match got {
                Some((k, ack)) => inflight.push(async move { (k, ack.await, Instant::now()) }),
                None => open = false,
            },
            Some((k, ok, at)) = inflight.next(), if !inflight.is_empty() => {
                last = last.max(at);
                if ok {
                    latencies.push(at.saturating_duration_since(due(start, rate, k)));
                } else {
                    failed += 1;
                }
            }
            else => break,
        }
    }
    let (behind, sender) = pacer.await.context("the pacing thread failed")?;
    latencies.sort_unstable();
    let paced = Paced {
        latencies,
        failed,
        elapsed: last.saturating_duration_since(start),
        behind,
    };
    Ok((paced, sender))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acknowledges message `i` after `delay(i)`.
    struct Delayed(fn(u64) -> Duration);

    impl Sender for Delayed {
        async fn send(&mut self, i: u64) -> BoxFuture<'static, bool> {
            let d = (self.0)(i);
            Box::pin(async move {
                tokio::time::sleep(d).await;
                i % 10 != 9
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn times_each_message_from_its_due_time_and_counts_failures() {
        // 200 messages at 2 000/s (100 ms); one in ten fails; the rest take 20 ms, except
        // every hundredth, which takes 60.
        let (paced, _) = run(
            Delayed(|i| Duration::from_millis(if i % 100 == 0 { 60 } else { 20 })),
            2_000.0,
            200,
        )
        .await
        .expect("run");
        assert_eq!((paced.delivered(), paced.failed), (180, 20));
        let p50 = paced.quantile(0.5).expect("p50");
        assert!(p50 >= Duration::from_millis(20), "{p50:?}");
        // Timed from the start of the run instead, the median would be over 70 ms.
        assert!(p50 < Duration::from_millis(55), "{p50:?}");
        assert!(paced.quantile(1.0).expect("max") >= Duration::from_millis(60));
        // The schedule holds: 200 messages at 2 000/s end after 100 ms, plus the last delay.
        assert!(
            paced.elapsed >= Duration::from_millis(115),
            "{:?}",
            paced.elapsed
        );
    }

    /// Hands over message `i` only after `stall` when `i` is 0: the pacer falls behind.
    #[derive(Debug)]
    struct Stalls(Duration);

    impl Sender for Stalls {
        async fn send(&mut self, i: u64) -> BoxFuture<'static, bool> {
            if i == 0 {
                tokio::time::sleep(self.0).await;
            }
            Box::pin(async { true })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_that_falls_behind_is_charged_for_every_message_behind_it() {
        // 1 000/s; the first hand-over takes 50 ms, so messages 1..50 were due before they
        // could go: measured from their due times, about half of the first fifty waited over
        // 25 ms although each was acknowledged at once.
        let (paced, _) = run(Stalls(Duration::from_millis(50)), 1_000.0, 100)
            .await
            .expect("run");
        assert_eq!(paced.delivered(), 100);
        assert!(
            paced.behind >= Duration::from_millis(45),
            "{:?}",
            paced.behind
        );
        assert!(
            paced.quantile(0.75).expect("p75") >= Duration::from_millis(10),
            "{:?}",
            paced.quantile(0.75)
        );
    }

    #[tokio::test]
    async fn refuses_a_rate_that_is_not_positive() {
        let e = run(Stalls(Duration::ZERO), 0.0, 1)
            .await
            .expect_err("a rate of 0");
        assert!(e.to_string().contains("--rate"), "{e}");
    }

    #[test]
    fn quantiles_are_exact_ranks() {
        let p = Paced {
            latencies: (1..=1000).map(Duration::from_micros).collect(),
            failed: 0,
            elapsed: Duration::ZERO,
            behind: Duration::ZERO,
        };
        assert_eq!(p.quantile(0.5), Some(Duration::from_micros(500)));
        assert_eq!(p.quantile(0.99), Some(Duration::from_micros(990)));
        assert_eq!(p.quantile(0.999), Some(Duration::from_micros(999)));
        assert_eq!(p.quantile(0.0), Some(Duration::from_micros(1)));
        let empty = Paced {
            latencies: Vec::new(),
            ..p
        };
        assert_eq!(empty.quantile(0.5), None);
    }
}
