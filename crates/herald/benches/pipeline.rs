//! Pipeline overhead: herald over the in-memory (counting) transport, against a bare Tokio
//! channel moving the same messages, in the same run. Run through `cargo xtask bench pipeline`,
//! or directly: `cargo bench -p herald --bench pipeline -- [--messages N] [--json FILE]`.
//!
//! Each figure is the median of several rounds; messages are built before the clock starts
//! (100-byte payloads, no key), so every variant moves exactly the same values.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald::testkit::MemoryTransport;
use herald::{Destination, FateSink, Message, OrderingMode, Producer};

const ROUNDS: usize = 5;
static PAYLOAD: [u8; 100] = [b'x'; 100];

struct Figure {
    name: &'static str,
    what: &'static str,
    runtime: &'static str,
    secs: f64,
}

fn messages(n: usize) -> Vec<Message> {
    let dest = Destination::new("bench");
    (0..n)
        .map(|_| Message::new(dest.clone(), Bytes::from_static(&PAYLOAD)))
        .collect()
}

fn runtime(multi: bool) -> tokio::runtime::Runtime {
    let mut b = if multi {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().expect("runtime")
}

/// Median seconds over `ROUNDS` of `f`, which gets fresh messages and returns its own timing.
fn median(n: usize, mut f: impl FnMut(Vec<Message>) -> Duration) -> f64 {
    let mut secs: Vec<f64> = (0..ROUNDS).map(|_| f(messages(n)).as_secs_f64()).collect();
    secs.sort_by(f64::total_cmp);
    secs[ROUNDS / 2]
}

/// The baseline: one task sends every message into a bounded channel, another receives and
/// drops them. What any pipeline costs at the very least: a hand-off between tasks.
fn channel(n: usize, multi: bool) -> f64 {
    let rt = runtime(multi);
    median(n, |msgs| {
        rt.block_on(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(100_000);
            let start = Instant::now();
            let consumer = tokio::spawn(async move {
                let mut count = 0usize;
                while let Some(m) = rx.recv().await {
                    count += m.payload().len() / 100;
                }
                count
            });
            for m in msgs {
                tx.send(m).await.expect("receiver alive");
            }
            drop(tx);
            assert_eq!(consumer.await.expect("consumer"), n);
            start.elapsed()
        })
    })
}

/// The floor of any per-message future: as `channel`, with a oneshot answer per message that
/// the consumer sends at once and the sender awaits after sending everything (as
/// `herald_enqueue` awaits its futures).
fn channel_oneshot(n: usize) -> f64 {
    let rt = runtime(false);
    median(n, |msgs| {
        rt.block_on(async move {
            type Answer = Result<herald::Delivery, herald::SendError>;
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(
                Message,
                tokio::sync::oneshot::Sender<Answer>,
            )>(100_000);
            let start = Instant::now();
            let consumer = tokio::spawn(async move {
                while let Some((m, answer)) = rx.recv().await {
                    let answered = answer.send(Ok(herald::Delivery {
                        ack: herald::Ack::default(),
                        attempts: 1,
                        latency: Duration::from_nanos(m.payload().len() as u64),
                    }));
                    assert!(answered.is_ok(), "the sender holds every receiver");
                }
            });
            let mut answers = Vec::with_capacity(n);
            for m in msgs {
                let (atx, arx) = tokio::sync::oneshot::channel();
                tx.send((m, atx)).await.expect("receiver alive");
                answers.push(arx);
            }
            drop(tx);
            for a in answers {
                a.await.expect("answered").expect("delivered");
            }
            consumer.await.expect("consumer");
            start.elapsed()
        })
    })
}

fn producer(ordering: OrderingMode) -> (Producer, MemoryTransport) {
    let transport = MemoryTransport::counting();
    let mut builder = Producer::builder(transport.clone()).ordering(ordering);
    // Experiment: `HERALD_BENCH_LINGER_MS=N` runs the default batch sizes with another linger.
    if let Some(ms) = std::env::var("HERALD_BENCH_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let default = herald::batch::SizeOrLinger::default();
        builder = builder.batching(herald::batch::SizeOrLinger::new(
            default.max_messages(),
            default.max_bytes(),
            Duration::from_millis(ms),
        ));
    }
    let producer = builder.build().expect("default settings build");
    (producer, transport)
}

/// herald's bulk path: `send_all`, one receipt for all, waited until every message is acked.
fn herald_send_all(n: usize, multi: bool, ordering: OrderingMode) -> f64 {
    herald_send_all_with(n, multi, ordering, None)
}

/// `herald_send_all`, with the producer built while `recorder` is the thread's metrics
/// recorder (so its handles record there), if one is given.
fn herald_send_all_with(
    n: usize,
    multi: bool,
    ordering: OrderingMode,
    recorder: Option<&dyn metrics::Recorder>,
) -> f64 {
    let rt = runtime(multi);
    median(n, |msgs| {
        rt.block_on(async move {
            let (p, t) = match recorder {
                Some(r) => metrics::with_local_recorder(r, || producer(ordering)),
                None => producer(ordering),
            };
            let start = Instant::now();
            let report = p.send_all(msgs).await.wait().await;
            let took = start.elapsed();
            assert_eq!(report.delivered as usize, n);
            assert_eq!(t.delivered() as usize, n);
            p.close(Duration::from_secs(10)).await;
            took
        })
    })
}

/// As `herald_send_all` (strict, one thread), with herald-telemetry's Prometheus recorder
/// recording every metric: the cost of telemetry.
fn herald_send_all_prometheus(n: usize) -> f64 {
    let (recorder, telemetry) = herald::telemetry::Prometheus::new()
        .build()
        .expect("herald's buckets are valid");
    let secs = herald_send_all_with(n, false, OrderingMode::Strict, Some(&recorder));
    // The recorder really recorded: every round's deliveries are in the latency histogram.
    let rendered = telemetry.render();
    let count = rendered
        .lines()
        .find_map(|l| l.strip_prefix("herald_send_latency_seconds_count{transport=\"memory\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(count, Some((n * ROUNDS) as f64), "{rendered}");
    secs
}

/// herald's per-message path: `enqueue` gives a future per message; all awaited at the end.
fn herald_enqueue(n: usize, multi: bool) -> f64 {
    let rt = runtime(multi);
    median(n, |msgs| {
        rt.block_on(async move {
            let (p, _t) = producer(OrderingMode::Strict);
            let start = Instant::now();
            let mut futures = Vec::with_capacity(n);
            for m in msgs {
                futures.push(p.enqueue(m).await.expect("accepted"));
            }
            for f in futures {
                f.await.expect("delivered");
            }
            let took = start.elapsed();
            p.close(Duration::from_secs(10)).await;
            took
        })
    })
}

/// The command's path: `enqueue_tagged` in runs of 1 024, every fate to one sink (which counts
/// them here), waited until the sink has heard of every message.
fn herald_enqueue_tagged(n: usize) -> f64 {
    let rt = runtime(false);
    median(n, |msgs| {
        rt.block_on(async move {
            let (p, _t) = producer(OrderingMode::Strict);
            let heard = Arc::new((AtomicUsize::new(0), tokio::sync::Notify::new()));
            let sink: Arc<dyn FateSink> = {
                let heard = heard.clone();
                Arc::new(move |_tag, outcome: Result<_, _>| {
                    assert!(outcome.is_ok(), "delivered");
                    if heard.0.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        heard.1.notify_one();
                    }
                })
            };
            let start = Instant::now();
            let mut msgs = (0u64..).zip(msgs);
            loop {
                let run: Vec<(u64, Message)> = msgs.by_ref().take(1024).collect();
                if run.is_empty() {
                    break;
                }
                assert!(p.enqueue_tagged(run, &sink).await.is_empty(), "accepted");
            }
            while heard.0.load(Ordering::Relaxed) < n {
                heard.1.notified().await;
            }
            let took = start.elapsed();
            p.close(Duration::from_secs(10)).await;
            took
        })
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: usize = arg("--messages")
        .map(|s| s.parse().expect("--messages takes a number"))
        .unwrap_or(2_000_000);

    if let Some(only) = arg("--only") {
        // For profilers: one variant (its rounds, as in the full run), no report.
        let secs = match only.as_str() {
            "channel" => channel(n, false),
            "channel_oneshot" => channel_oneshot(n),
            "herald_send_all" => herald_send_all(n, false, OrderingMode::Strict),
            "herald_send_all_relaxed" => herald_send_all(n, false, OrderingMode::Relaxed),
            "herald_send_all_prometheus" => herald_send_all_prometheus(n),
            "herald_enqueue" => herald_enqueue(n, false),
            "herald_enqueue_tagged" => herald_enqueue_tagged(n),
            other => panic!(
                "--only takes channel, channel_oneshot, herald_send_all, herald_send_all_relaxed, \
                 herald_send_all_prometheus, herald_enqueue or herald_enqueue_tagged, not {other}"
            ),
        };
        eprintln!("{only}: {:.1} ns/msg", secs * 1e9 / n as f64);
        return;
    }
    let mut figures = vec![
        Figure {
            name: "channel",
            what: "bare tokio mpsc channel, one task to another (baseline)",
            runtime: "current_thread",
            secs: channel(n, false),
        },
        Figure {
            name: "channel_oneshot",
            what: "bare channel with a oneshot answer per message, all awaited at the end: the floor of any future per message",
            runtime: "current_thread",
            secs: channel_oneshot(n),
        },
        Figure {
            name: "herald_send_all",
            what: "herald send_all, strict ordering, in-memory transport",
            runtime: "current_thread",
            secs: herald_send_all(n, false, OrderingMode::Strict),
        },
        Figure {
            name: "herald_send_all_relaxed",
            what: "herald send_all, relaxed ordering",
            runtime: "current_thread",
            secs: herald_send_all(n, false, OrderingMode::Relaxed),
        },
        Figure {
            name: "herald_send_all_prometheus",
            what: "herald send_all, strict ordering, Prometheus recorder installed",
            runtime: "current_thread",
            secs: herald_send_all_prometheus(n),
        },
        Figure {
            name: "herald_enqueue",
            what: "herald enqueue, one future per message",
            runtime: "current_thread",
            secs: herald_enqueue(n, false),
        },
        Figure {
            name: "herald_enqueue_tagged",
            what: "herald enqueue_tagged in runs of 1 024, every fate to one sink (the command's path)",
            runtime: "current_thread",
            secs: herald_enqueue_tagged(n),
        },
    ];
    figures.push(Figure {
        name: "channel_mt",
        what: "bare tokio mpsc channel (baseline)",
        runtime: "multi_thread(2)",
        secs: channel(n, true),
    });
    figures.push(Figure {
        name: "herald_send_all_mt",
        what: "herald send_all, strict ordering",
        runtime: "multi_thread(2)",
        secs: herald_send_all(n, true, OrderingMode::Strict),
    });

    let secs = |name: &str| {
        figures
            .iter()
            .find(|f| f.name == name)
            .map_or(f64::NAN, |f| f.secs)
    };
    let base_st = secs("channel");
    let base_mt = secs("channel_mt");
    let telemetry_ratio = secs("herald_send_all") / secs("herald_send_all_prometheus");
    // `enqueue` against what a future per message costs at the least (rates: the inverse).
    let enqueue_vs_floor = secs("channel_oneshot") / secs("herald_enqueue");
    println!("pipeline benchmark: {n} messages of 100 bytes, median of {ROUNDS} rounds");
    println!(
        "{:<26} {:<16} {:>12} {:>9} {:>16}",
        "variant", "runtime", "msgs/s", "ns/msg", "vs channel"
    );
    let mut json = Vec::new();
    for f in &figures {
        let base = if f.runtime == "current_thread" {
            base_st
        } else {
            base_mt
        };
        let rate = n as f64 / f.secs;
        let ns = f.secs * 1e9 / n as f64;
        let ratio = rate / (n as f64 / base);
        println!(
            "{:<26} {:<16} {:>12.0} {:>9.1} {:>15.2}x",
            f.name, f.runtime, rate, ns, ratio
        );
        json.push(format!(
            "{{\"name\":\"{}\",\"what\":\"{}\",\"runtime\":\"{}\",\"msgs_per_sec\":{:.0},\"ns_per_msg\":{:.1},\"ratio_vs_channel\":{:.3}}}",
            f.name, f.what, f.runtime, rate, ns, ratio
        ));
    }
    println!(
        "telemetry: send_all with the Prometheus recorder runs at {telemetry_ratio:.2}x the rate without one"
    );
    println!(
        "enqueue: {enqueue_vs_floor:.2}x the rate of a bare channel with a oneshot answer per message"
    );
    if let Some(path) = arg("--json") {
        let body = format!(
            "{{\"messages\":{n},\"payload_bytes\":100,\"rounds\":{ROUNDS},\"telemetry_ratio\":{telemetry_ratio:.3},\"enqueue_vs_floor\":{enqueue_vs_floor:.3},\"figures\":[{}]}}\n",
            json.join(",")
        );
        std::fs::write(&path, body).expect("write --json file");
        println!("wrote {path}");
    }
}
