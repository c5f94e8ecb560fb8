//! Property tests of the whole pipeline on the in-memory transport, under arbitrary fault
//! scripts, in Tokio's paused (virtual) time so that backoffs and timeouts cost nothing.
//!
//! Properties:
//! - every message ends exactly once: delivered (and then stored by the transport) or handed
//!   back in an error, never both, never neither;
//! - without lost acknowledgements (`CallFault::StoreThenFail`), a delivered message is stored
//!   once and a failed one never; with them, a message may be stored and reported failed (the
//!   broker took it, the ack was lost) or stored twice (retried): at least once, never lost;
//! - a message the transport rejects permanently is never retried and never stored;
//! - a failed message whose error names a stored copy (`SendError::stored_copy`) has one, at
//!   the offset it names;
//! - under strict ordering, per key (no key is one key), the last stored copies of the
//!   delivered messages are in sending order, lost acknowledgements included, and with several
//!   batches of the destination in flight (`pipeline_depth`, a transport that keeps order across
//!   calls and stores a call's messages before its delay: its answers come late and out of
//!   order), and with a transport that answers each stored message early, before its call
//!   returns (and may be cut off after);
//! - the producer's totals agree with what happened, and the buffer is empty at the end.

use std::collections::HashMap;
use std::time::Duration;

use herald_core::{Destination, ErrorClass, FailureReason, Message, OrderingMode, Producer};
use herald_retry::{Backoff, ExponentialRetry};
use herald_testkit::{CallFault, MemoryTransport};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    messages: Vec<(Option<u8>, bool)>, // (key, poison)
    script: Vec<CallFault>,
    ordering: OrderingMode,
    batch_max: usize,
    in_flight: usize,
    buffer: usize,
    max_attempts: Option<u32>,
    timeout_ms: u64,
    bulk: bool,
    /// `Some(depth)`: the transport keeps order across calls, and strict ordering keeps up to
    /// `depth` batches of the destination in flight.
    pipelined: Option<usize>,
    /// The transport answers each message it stores early, before its call returns.
    early: bool,
}

fn fault() -> impl Strategy<Value = CallFault> {
    prop_oneof![
        3 => Just(CallFault::Pass),
        3 => Just(CallFault::FailAll(ErrorClass::Transient)),
        1 => Just(CallFault::FailAll(ErrorClass::Permanent)),
        3 => prop::collection::vec(0usize..20, 1..4).prop_map(CallFault::FailSome),
        2 => prop::collection::vec(0usize..20, 1..4).prop_map(CallFault::StoreThenFail),
        1 => (1u64..300).prop_map(|ms| CallFault::Delay(Duration::from_millis(ms))),
        2 => ((1u64..300), prop::collection::vec(0usize..20, 1..4)).prop_map(|(ms, at)| {
            CallFault::Slow(Duration::from_millis(ms), Box::new(CallFault::FailSome(at)))
        }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(
            (prop::option::of(0u8..4), prop::bool::weighted(0.05)),
            1..150,
        ),
        prop::collection::vec(fault(), 0..30),
        prop_oneof![Just(OrderingMode::Strict), Just(OrderingMode::Relaxed)],
        1usize..40,
        1usize..6,
        1usize..60,
        prop::option::of(1u32..6),
        prop_oneof![Just(200u64), Just(2_000), Just(60_000)],
        any::<bool>(),
        (prop::option::of(1usize..6), any::<bool>()),
    )
        .prop_map(
            |(
                messages,
                script,
                ordering,
                batch_max,
                in_flight,
                buffer,
                max_attempts,
                timeout_ms,
                bulk,
                (pipelined, early),
            )| Case {
                messages,
                script,
                ordering,
                batch_max,
                in_flight,
                buffer,
                max_attempts,
                timeout_ms,
                bulk,
                pipelined,
                early,
            },
        )
}

struct Ran {
    delivered: Vec<String>,
    /// Payload, class, reason, attempts, and the offset of the stored copy the error names.
    failed: Vec<(String, ErrorClass, FailureReason, u32, Option<i64>)>,
    stored: Vec<Message>,
    totals: herald_core::Totals,
    buffered_after: usize,
}

fn run(case: &Case) -> Ran {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    // A watchdog in virtual time: a case that deadlocks (nothing runnable, no timer) or
    // livelocks on timers reaches it at once in paused time and fails, so that proptest shrinks
    // it instead of the test hanging. Legitimate cases end well inside it: the longest delivery
    // timeout is 60 s and close waits at most 600 s. (A task spinning without yielding to the
    // clock stops virtual time, and no watchdog in it can fire: the dispatcher must never do
    // that, see `an_open_circuit_past_its_time_with_nothing_to_send_does_not_spin`.)
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(4 * 3600), run_case(case))
            .await
            .expect("the case ends within four virtual hours")
    })
}

async fn run_case(case: &Case) -> Ran {
    {
        let transport = MemoryTransport::new();
        transport.reject_payload_prefix("poison");
        transport.script(case.script.clone());
        transport.keep_order_across_calls(case.pipelined.is_some());
        transport.answer_early(case.early);
        let mut retry = ExponentialRetry::new(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(500),
        ));
        retry = match case.max_attempts {
            Some(n) => retry.max_attempts(n),
            None => retry.unlimited_attempts(),
        };
        let producer = Producer::builder(transport.clone())
            .batching(herald_batch::SizeOrLinger::new(
                case.batch_max,
                1 << 20,
                Duration::from_millis(3),
            ))
            .retry(retry)
            .ordering(case.ordering)
            .max_in_flight(case.in_flight)
            .pipeline_depth(case.pipelined.unwrap_or(1))
            .buffer(case.buffer, 1 << 20)
            .delivery_timeout(Duration::from_millis(case.timeout_ms))
            .build()
            .expect("valid settings");
        let dest = Destination::new("prop");
        let msgs: Vec<Message> = case
            .messages
            .iter()
            .enumerate()
            .map(|(i, (key, poison))| {
                let payload = if *poison {
                    format!("poison-{i}")
                } else {
                    format!("m-{i}")
                };
                let m = Message::new(dest.clone(), payload);
                match key {
                    Some(k) => m.with_key(vec![*k]),
                    None => m,
                }
            })
            .collect();
        let mut delivered = Vec::new();
        let mut failed = Vec::new();
        let mut record_failure = |e: herald_core::SendError| {
            let payload = String::from_utf8_lossy(e.message().payload()).into_owned();
            let copy = e.stored_copy().map(|ack| ack.offset.expect("offsets"));
            failed.push((payload, e.class(), e.reason().clone(), e.attempts(), copy));
        };
        if case.bulk {
            let report = producer.send_all(msgs.clone()).await.wait().await;
            for e in report.failed {
                record_failure(e);
            }
            // Delivered ones are known by elimination; checked against the transport below.
            let failed_payloads: Vec<&String> = failed.iter().map(|f| &f.0).collect();
            delivered = msgs
                .iter()
                .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
                .filter(|p| !failed_payloads.contains(&p))
                .collect();
            assert_eq!(
                report.delivered as usize,
                delivered.len(),
                "bulk counts add up"
            );
        } else {
            let mut futures = Vec::new();
            for m in msgs.clone() {
                futures.push((
                    m.payload().clone(),
                    producer.enqueue(m).await.expect("enqueue"),
                ));
            }
            for (payload, f) in futures {
                match f.await {
                    Ok(_) => delivered.push(String::from_utf8_lossy(&payload).into_owned()),
                    Err(e) => record_failure(e),
                }
            }
        }
        let close = producer.close(Duration::from_secs(600)).await;
        assert!(close.drained);
        assert!(close.unclaimed.is_empty());
        Ran {
            delivered,
            failed,
            stored: transport.received(),
            totals: close.totals,
            buffered_after: producer.stats().buffered_messages,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn every_message_ends_exactly_once_in_order(case in case()) {
        let ran = run(&case);
        let n = case.messages.len();
        prop_assert_eq!(ran.delivered.len() + ran.failed.len(), n, "each message ends once");

        // With several batches in flight, a message stored after a transient failure of its key
        // in an earlier batch is sent again behind that message's retry (stored twice, or
        // stored and then failed); and a call that stores before its delay may be cut off at
        // its deadline after it stored. Both are lost acknowledgements, in effect. So is a
        // call that acknowledged early and was then cut off: what strict ordering had not
        // answered yet (an earlier message of its key could still fail) is sent again.
        let lossy = case.script.iter().any(|f| {
            matches!(f, CallFault::StoreThenFail(_))
                || ((case.pipelined.is_some() || case.early) && *f != CallFault::Pass)
        });
        let mut stored_count: HashMap<String, usize> = HashMap::new();
        for m in &ran.stored {
            *stored_count.entry(String::from_utf8_lossy(m.payload()).into_owned()).or_default() += 1;
        }
        for p in &ran.delivered {
            let copies = stored_count.get(p).copied().unwrap_or(0);
            prop_assert!(copies >= 1, "delivered {} is not stored", p);
            prop_assert!(lossy || copies == 1, "delivered {} stored {} times without a lost ack", p, copies);
        }
        for (p, class, reason, attempts, copy) in &ran.failed {
            prop_assert!(lossy || !stored_count.contains_key(p), "failed {} was stored anyway", p);
            if let Some(at) = copy {
                // An error that names a stored copy names one of this message.
                let named = usize::try_from(*at).ok().and_then(|at| ran.stored.get(at));
                prop_assert!(
                    named.is_some_and(|m| String::from_utf8_lossy(m.payload()) == p.as_str()),
                    "failed {} names a stored copy at {} that is not one of it", p, at
                );
                prop_assert_eq!(case.ordering, OrderingMode::Strict, "only the key rule holds copies");
            }
            if matches!(reason, FailureReason::Rejected(_)) {
                prop_assert_eq!(*class, ErrorClass::Permanent, "rejected means permanent");
                // A poison message is refused on every attempt, so no copy of it exists.
                prop_assert!(!p.starts_with("poison") || !stored_count.contains_key(p), "rejected {} was stored", p);
            }
            if let Some(max) = case.max_attempts {
                prop_assert!(*attempts <= max, "{} attempts > max {}", attempts, max);
            }
        }
        if !lossy {
            prop_assert_eq!(ran.stored.len(), ran.delivered.len(), "nothing stored but the delivered");
        }

        if case.ordering == OrderingMode::Strict {
            // Per key, the last copy of each delivered message: in sending order.
            let seq_of = |m: &Message| -> usize {
                String::from_utf8_lossy(m.payload())
                    .rsplit('-').next().and_then(|s| s.parse().ok()).expect("seq")
            };
            let delivered: std::collections::HashSet<&str> =
                ran.delivered.iter().map(String::as_str).collect();
            let mut last_copy: HashMap<usize, (Option<Vec<u8>>, usize)> = HashMap::new();
            for (at, m) in ran.stored.iter().enumerate() {
                if delivered.contains(String::from_utf8_lossy(m.payload()).as_ref()) {
                    last_copy.insert(seq_of(m), (m.key().map(|k| k.to_vec()), at));
                }
            }
            let mut by_position: Vec<(usize, Option<Vec<u8>>, usize)> =
                last_copy.into_iter().map(|(seq, (key, at))| (at, key, seq)).collect();
            by_position.sort();
            let mut last: HashMap<Option<Vec<u8>>, usize> = HashMap::new();
            for (_, key, seq) in by_position {
                if let Some(prev) = last.insert(key.clone(), seq) {
                    prop_assert!(prev < seq, "key {:?}: #{} last stored after #{}", key, seq, prev);
                }
            }
        }

        prop_assert_eq!(ran.totals.accepted as usize, n);
        prop_assert_eq!(ran.totals.delivered as usize, ran.delivered.len());
        prop_assert_eq!(ran.totals.failed as usize, ran.failed.len());
        prop_assert_eq!(ran.buffered_after, 0);
    }
}
