//! A model test: any sequence of appends, batch appends, settlements, reads and crashes (the
//! spool dropped, the newest segment optionally cut at a random byte of the last append, as a
//! write torn by a crash during that append) and reopens gives back exactly the records that
//! were appended and not settled, in order, with their contents; and a segment file other than
//! the newest exists only while it holds a pending record.

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;

use common::{message, records_in, same, segments, TempDir};
use herald_core::Message;
use herald_spool::{Spool, SpoolConfig, SpoolId, SyncPolicy};
use proptest::prelude::*;
use proptest::sample::Index;

#[derive(Debug, Clone)]
enum Op {
    /// Message numbers: one is `append`, more are one `append_all`.
    Append(Vec<u64>),
    /// Picks among every id ever given (settled ones included).
    Settle(Vec<Index>),
    /// Drop without `close`; maybe tear the last append; reopen.
    Crash { tear: Option<Index> },
    /// A fresh cursor reads exactly the model's records.
    Read,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(0u64..1000, 1..5).prop_map(Op::Append),
        3 => proptest::collection::vec(any::<Index>(), 1..4).prop_map(Op::Settle),
        1 => proptest::option::of(any::<Index>()).prop_map(|tear| Op::Crash { tear }),
        1 => Just(Op::Read),
    ]
}

/// What the spool must hold: id → message number, for every appended, unsettled record.
type Model = BTreeMap<u64, u64>;

fn check_contents(
    spool: &Spool,
    model: &Model,
    until: Option<SpoolId>,
) -> Result<(), TestCaseError> {
    let cursor = match until {
        Some(end) => spool.cursor().until(end),
        None => spool.cursor(),
    };
    let back: Vec<_> = cursor
        .collect::<Result<_, _>>()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let got: Vec<u64> = back.iter().map(|r| r.id.as_u64()).collect();
    let want: Vec<u64> = model.keys().copied().collect();
    prop_assert_eq!(got, want);
    for r in &back {
        let n = model[&r.id.as_u64()];
        prop_assert!(
            same(&r.message, &message(n)),
            "record {} holds another message",
            r.id
        );
    }
    Ok(())
}

fn check_invariants(spool: &Spool, model: &Model) -> Result<(), TestCaseError> {
    let stats = spool.stats();
    prop_assert_eq!(stats.pending_messages, model.len() as u64);
    let files = segments(spool.dir());
    prop_assert_eq!(stats.segments, files.len());
    let firsts: Vec<u64> = files
        .iter()
        .map(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX)
        })
        .collect();
    for (i, first) in firsts
        .iter()
        .enumerate()
        .take(firsts.len().saturating_sub(1))
    {
        let end = firsts[i + 1];
        prop_assert!(
            model.range(first..&end).next().is_some(),
            "segment {} holds no pending record but was not deleted",
            first
        );
    }
    Ok(())
}

/// Cuts the newest segment somewhere in the records of the last append; drops the records
/// cut from the model; returns the torn tail open should report, `(offset, bytes)`.
fn tear(
    dir: &std::path::Path,
    appended: &[u64],
    at: Index,
    model: &mut Model,
) -> Option<(u64, u64)> {
    let seg = segments(dir).pop()?;
    let recs = records_in(&seg);
    let candidates: Vec<(u64, u64, u64)> = recs
        .into_iter()
        .filter(|r| appended.contains(&r.2))
        .collect();
    let start = candidates.first()?.0;
    let len = std::fs::metadata(&seg).ok()?.len();
    let cut = start + at.index((len - start) as usize) as u64;
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .ok()?
        .set_len(cut)
        .ok()?;
    let mut torn = None;
    for (offset, rlen, seq) in candidates {
        if offset + rlen > cut {
            model.remove(&seq);
            if offset < cut && torn.is_none() {
                torn = Some((offset, cut - offset));
            }
        }
    }
    torn
}

fn run(ops: Vec<Op>, segment_bytes: u64, sync: SyncPolicy) -> Result<(), TestCaseError> {
    let tmp = TempDir::new("model");
    let config = || {
        SpoolConfig::new(tmp.spool())
            .segment_bytes(segment_bytes)
            .sync(sync)
            .settle_sync_every(3)
    };
    let fail = |e: herald_spool::SpoolError| TestCaseError::fail(e.to_string());
    let mut spool = Spool::open(config()).map_err(fail)?.0;
    let mut model = Model::new();
    let mut given: Vec<SpoolId> = Vec::new();
    let mut last_append: Option<Vec<u64>> = None;
    for op in ops {
        match op {
            Op::Append(nums) => {
                let msgs: Vec<Message> = nums.iter().map(|&n| message(n)).collect();
                let fsyncs = spool.stats().fsyncs;
                let ids = if msgs.len() == 1 {
                    vec![spool.append(&msgs[0]).map_err(fail)?]
                } else {
                    spool.append_all(&msgs).map_err(fail)?
                };
                if matches!(sync, SyncPolicy::Group) {
                    // Group commit returns an append once an fsync covers it (a drop, the
                    // crash below, would not show one that did not wait).
                    prop_assert!(
                        spool.stats().fsyncs > fsyncs,
                        "an append returned before an fsync"
                    );
                }
                prop_assert_eq!(ids.len(), nums.len());
                for (id, n) in ids.iter().zip(&nums) {
                    prop_assert!(given.last().is_none_or(|last| id > last), "ids increase");
                    model.insert(id.as_u64(), *n);
                    given.push(*id);
                }
                last_append = Some(ids.iter().map(|id| id.as_u64()).collect());
            }
            Op::Settle(picks) => {
                last_append = None;
                if given.is_empty() {
                    continue;
                }
                let ids: Vec<SpoolId> = picks.iter().map(|p| *p.get(&given)).collect();
                spool.settle_all(&ids).map_err(fail)?;
                for id in ids {
                    model.remove(&id.as_u64());
                }
            }
            Op::Crash { tear: at } => {
                drop(spool);
                let expected_torn = match (at, last_append.take()) {
                    (Some(at), Some(appended)) => {
                        let torn = tear(&tmp.spool(), &appended, at, &mut model);
                        // The ids of records lost with a torn write may be given again: they
                        // were never durable, so nobody can hold them.
                        given.retain(|id| {
                            !appended.contains(&id.as_u64()) || model.contains_key(&id.as_u64())
                        });
                        torn
                    }
                    _ => None,
                };
                let (reopened, recovery) = Spool::open(config()).map_err(fail)?;
                spool = reopened;
                let torn: Vec<(u64, u64)> = recovery
                    .damage
                    .torn
                    .iter()
                    .map(|t| (t.offset, t.bytes))
                    .collect();
                prop_assert_eq!(torn, expected_torn.into_iter().collect::<Vec<_>>());
                prop_assert_eq!(recovery.damage.corrupt_records, 0);
                prop_assert_eq!(recovery.pending_messages, model.len() as u64);
                check_contents(&spool, &model, Some(recovery.first_new_id()))?;
            }
            Op::Read => {
                last_append = None;
                check_contents(&spool, &model, None)?;
            }
        }
        check_invariants(&spool, &model)?;
    }
    check_contents(&spool, &model, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_spool_keeps_exactly_what_was_appended_and_not_settled(
        ops in proptest::collection::vec(op(), 1..40),
        segment_bytes in prop_oneof![Just(120u64), Just(300), Just(1000), Just(1 << 20)],
    ) {
        run(ops, segment_bytes, SyncPolicy::Os)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// The same with group commit: every append that returned is there after the crash.
    #[test]
    fn with_group_commit_every_append_that_returned_survives(
        ops in proptest::collection::vec(op(), 1..30),
        segment_bytes in prop_oneof![Just(300u64), Just(1 << 20)],
    ) {
        run(ops, segment_bytes, SyncPolicy::Group)?;
    }
}
