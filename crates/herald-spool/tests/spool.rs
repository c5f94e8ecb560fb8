//! The spool's behaviour through its public API: appends and reading back, settlement and
//! segment deletion, limits, damage found at open, the lock, sync policies, inspect and check.

mod common;

use std::fs::OpenOptions;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant, SystemTime};

use common::{ids, message, read_all, records_in, same, segments, TempDir};
use herald_core::Message;
use herald_spool::{check, inspect, Spool, SpoolConfig, SpoolError, SpoolId, SyncPolicy};

fn open(config: SpoolConfig) -> (Spool, herald_spool::Recovery) {
    Spool::open(config).expect("the spool opens")
}

/// Polls `done` until it holds, failing after 10 s.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn appended_messages_come_back_in_order_after_a_reopen_with_every_field() {
    let tmp = TempDir::new("order");
    let before = SystemTime::now() - Duration::from_millis(5);
    let sent: Vec<Message> = (0..20).map(message).collect();
    let mut given = Vec::new();
    {
        let (spool, recovery) = open(SpoolConfig::new(tmp.spool()));
        assert_eq!(recovery.pending_messages, 0);
        assert!(recovery.damage.is_empty());
        given.push(spool.append(&sent[0]).expect("append"));
        given.extend(spool.append_all(&sent[1..15]).expect("append_all"));
        for m in &sent[15..] {
            given.push(spool.append(m).expect("append"));
        }
        assert!(
            given.windows(2).all(|w| w[0] < w[1]),
            "ids increase: {given:?}"
        );
        spool.close().expect("closes cleanly");
    }
    let after = SystemTime::now() + Duration::from_millis(5);
    let (spool, recovery) = open(SpoolConfig::new(tmp.spool()));
    assert_eq!(recovery.pending_messages, 20);
    assert!(recovery.first_new_id() > given[19]);
    let back: Vec<_> = spool
        .cursor()
        .until(recovery.first_new_id())
        .collect::<Result<_, _>>()
        .expect("reads");
    assert_eq!(ids(&back), given);
    for (r, m) in back.iter().zip(&sent) {
        assert!(same(&r.message, m), "{:?} != {m:?}", r.message);
        assert!(r.appended_at >= before && r.appended_at <= after);
    }
    let next = spool.append(&message(99)).expect("append after reopen");
    assert_eq!(next, recovery.first_new_id());
}

#[test]
fn a_cursor_follows_appends_skips_settled_records_and_respects_its_limits() {
    let tmp = TempDir::new("cursor");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()).segment_bytes(300));
    let first = spool
        .append_all(&(0..10).map(message).collect::<Vec<_>>())
        .expect("append");
    let mut cursor = spool.cursor();
    let batch = cursor.read_batch(3, u64::MAX).expect("read");
    assert_eq!(ids(&batch), first[..3]);
    let one_byte = cursor.read_batch(100, 1).expect("read");
    assert_eq!(
        ids(&one_byte),
        first[3..4],
        "max_bytes stops after the first record"
    );
    spool.settle_all(&[first[4], first[6]]).expect("settle");
    let rest = cursor.read_batch(100, u64::MAX).expect("read");
    assert_eq!(ids(&rest), [first[5], first[7], first[8], first[9]]);
    assert!(cursor.read_batch(100, u64::MAX).expect("read").is_empty());
    assert!(!cursor.wait(Duration::from_millis(20)), "nothing new");

    let appender = {
        let spool = Arc::new(spool);
        let s = Arc::clone(&spool);
        (
            std::thread::spawn(move || s.append(&message(10)).expect("append")),
            spool,
        )
    };
    assert!(
        cursor.wait(Duration::from_secs(10)),
        "an append wakes the cursor"
    );
    let id = appender.0.join().expect("appender");
    assert_eq!(ids(&cursor.read_batch(100, u64::MAX).expect("read")), [id]);
    assert_eq!(cursor.position(), SpoolId::from_u64(id.as_u64() + 1));
}

#[test]
fn skip_to_reads_from_an_id_on_across_segments_and_never_moves_back() {
    let tmp = TempDir::new("skip");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()).segment_bytes(300));
    let given = spool
        .append_all(&(0..30).map(message).collect::<Vec<_>>())
        .expect("append");
    assert!(segments(&tmp.spool()).len() > 3, "several segments");
    let mut cursor = spool.cursor();
    cursor.skip_to(given[17]);
    assert_eq!(
        ids(&cursor.read_batch(2, u64::MAX).expect("read")),
        given[17..19]
    );
    cursor.skip_to(given[5]);
    assert_eq!(
        ids(&cursor.read_batch(2, u64::MAX).expect("read")),
        given[19..21],
        "never back"
    );
    cursor.skip_to(given[25]);
    assert_eq!(
        ids(&cursor.read_batch(100, u64::MAX).expect("read")),
        given[25..]
    );
}

#[test]
fn a_segment_goes_once_all_its_records_are_settled_in_any_order_but_the_active_one_stays() {
    let tmp = TempDir::new("delete");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()).segment_bytes(250));
    let all = spool
        .append_all(&(0..12).map(message).collect::<Vec<_>>())
        .expect("append");
    let files = segments(&tmp.spool());
    assert!(files.len() >= 4, "small segments: {files:?}");
    let second: Vec<SpoolId> = records_in(&files[1])
        .iter()
        .map(|r| SpoolId::from_u64(r.2))
        .collect();
    assert!(second.len() >= 2);
    // Settle the second segment's records backwards: the file stays until the last one.
    for (i, id) in second.iter().rev().enumerate() {
        assert!(
            files[1].exists(),
            "deleted after {i} of {} settlements",
            second.len()
        );
        spool.settle(*id).expect("settle");
    }
    assert!(
        !files[1].exists(),
        "deleted once all its records are settled"
    );
    assert!(files[0].exists() && files[2].exists());
    spool.settle_all(&all).expect("settle all");
    let left = segments(&tmp.spool());
    assert_eq!(left.len(), 1, "only the active segment is left: {left:?}");
    assert_eq!(left[0], *files.last().expect("a last segment"));
    let stats = spool.stats();
    assert_eq!((stats.pending_messages, stats.pending_bytes), (0, 0));
    assert_eq!(stats.segments, 1);
    drop(spool);
    let (spool, recovery) = open(SpoolConfig::new(tmp.spool()).segment_bytes(250));
    assert_eq!(recovery.pending_messages, 0);
    assert!(read_all(&spool).is_empty());
    assert_eq!(
        segments(&tmp.spool()).len(),
        1,
        "the settled active segment went at open"
    );
    assert!(spool.append(&message(1)).expect("append") > *all.last().expect("ids"));
}

#[test]
fn settlements_survive_a_reopen_and_the_settle_log_stays_small() {
    let tmp = TempDir::new("settle");
    let config = || {
        SpoolConfig::new(tmp.spool())
            .segment_bytes(4096)
            .sync(SyncPolicy::Os)
    };
    let (spool, _) = open(config());
    let mut pending = Vec::new();
    for round in 0..80u64 {
        let batch: Vec<Message> = (0..100).map(|i| message(round * 100 + i)).collect();
        let new = spool.append_all(&batch).expect("append");
        pending.extend(new);
        // Settle most of what is pending, one by one and out of order; keep every 7th.
        let (keep, done): (Vec<SpoolId>, Vec<SpoolId>) =
            pending.iter().partition(|id| id.as_u64().is_multiple_of(7));
        for id in done.iter().rev() {
            spool.settle(*id).expect("settle");
        }
        pending = keep;
    }
    // Without rewrites the log would hold 6858 frames of 20 bytes (134 KiB).
    let log = std::fs::metadata(tmp.spool().join("settled.log"))
        .expect("settle log")
        .len();
    assert!(
        log < 100 * 1024,
        "the settle log is rewritten as it grows: {log} bytes"
    );
    assert_eq!(spool.stats().pending_messages, pending.len() as u64);
    drop(spool);
    let (spool, recovery) = open(config());
    assert_eq!(recovery.pending_messages, pending.len() as u64);
    assert_eq!(ids(&read_all(&spool)), pending);
    let log = std::fs::metadata(tmp.spool().join("settled.log"))
        .expect("settle log")
        .len();
    assert!(log < 16 * 1024, "rewritten at open: {log} bytes");
}

#[test]
fn settle_refuses_ids_never_given_and_settling_twice_is_harmless() {
    let tmp = TempDir::new("unknown");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()));
    let id = spool.append(&message(1)).expect("append");
    let never = SpoolId::from_u64(id.as_u64() + 5);
    match spool.settle_all(&[id, never]) {
        Err(SpoolError::UnknownId { id: bad, next, .. }) => {
            assert_eq!((bad, next), (never, SpoolId::from_u64(id.as_u64() + 1)));
        }
        other => panic!("expected UnknownId, got {other:?}"),
    }
    assert_eq!(
        spool.stats().pending_messages,
        1,
        "nothing settled by a refused call"
    );
    spool.settle(id).expect("settle");
    spool.settle(id).expect("settle again");
    spool.settle_all(&[]).expect("settle nothing");
    assert_eq!(spool.stats().pending_messages, 0);
}

#[test]
fn unsynced_settlements_stay_below_settle_sync_every_and_the_interval_syncs_the_rest() {
    let tmp = TempDir::new("settle-sync");
    let (spool, _) = open(
        SpoolConfig::new(tmp.spool())
            .settle_sync_every(4)
            .settle_sync_interval(Duration::from_millis(20)),
    );
    let all = spool
        .append_all(&(0..10).map(message).collect::<Vec<_>>())
        .expect("append");
    let fsyncs = spool.stats().fsyncs;
    for id in &all[..9] {
        spool.settle(*id).expect("settle");
        // The writer thread syncs at once when four are waiting; the settling thread does
        // not wait for it.
        eventually("the settle log synced below settle_sync_every", || {
            spool.stats().unsynced_settlements < 4
        });
    }
    assert!(
        spool.stats().fsyncs >= fsyncs + 2,
        "every 4th settlement syncs"
    );
    // The ninth is unsynced until the interval passes.
    eventually("the settle interval's fsync", || {
        spool.stats().unsynced_settlements == 0
    });
}

/// Once `settle_sync_every` settlements wait, the writer thread syncs the settle log, also
/// while four appenders keep it writing (the settling thread no longer syncs it itself).
#[test]
fn settlements_are_synced_while_appends_never_pause() {
    let tmp = TempDir::new("settle-busy");
    let (spool, _) = open(
        SpoolConfig::new(tmp.spool())
            .sync(SyncPolicy::Interval(Duration::from_secs(3600)))
            .settle_sync_every(4)
            .settle_sync_interval(Duration::from_secs(3600))
            .max_bytes(1 << 30),
    );
    let spool = Arc::new(spool);
    let ids = spool
        .append_all(&(0..40).map(message).collect::<Vec<_>>())
        .expect("append");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four appenders: while the writer writes one round, the next one fills.
    let appenders: Vec<_> = (0..4)
        .map(|_| {
            let (spool, stop) = (Arc::clone(&spool), Arc::clone(&stop));
            std::thread::spawn(move || {
                let batch: Vec<Message> = (0..64).map(message).collect();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    spool.append_all(&batch).expect("append");
                }
            })
        })
        .collect();
    for id in ids {
        spool.settle(id).expect("settle");
        eventually("the settle log synced below settle_sync_every", || {
            spool.stats().unsynced_settlements < 4
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for a in appenders {
        a.join().expect("appender");
    }
}

#[test]
fn full_names_the_limit_appends_nothing_and_settling_a_whole_segment_frees_room() {
    let tmp = TempDir::new("full");
    let m = Message::new("d", vec![7u8; 100]);
    let (spool, _) = open(
        SpoolConfig::new(tmp.spool())
            .segment_bytes(300)
            .max_bytes(900),
    );
    let mut ids = Vec::new();
    let err = loop {
        match spool.append(&m) {
            Ok(id) => ids.push(id),
            Err(e) => break e,
        }
        assert!(ids.len() < 100, "never full");
    };
    assert!(err.is_full(), "{err}");
    assert!(
        matches!(err, SpoolError::Full { limit: 900, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("max_bytes = 900") && text.contains("full"),
        "{text}"
    );
    let before = spool.stats();
    assert!(
        spool.append_all(&[m.clone(), m.clone()]).is_err(),
        "a batch is all or nothing"
    );
    assert_eq!(spool.stats().pending_messages, before.pending_messages);
    assert!(before.disk_bytes <= 900);
    // Settling one record frees nothing (its segment still holds others)...
    spool.settle(ids[0]).expect("settle");
    assert!(spool.append(&m).expect_err("still full").is_full());
    // ...settling its whole segment does.
    let first = &segments(&tmp.spool())[0];
    let in_first: Vec<SpoolId> = records_in(first)
        .iter()
        .map(|r| SpoolId::from_u64(r.2))
        .collect();
    spool.settle_all(&in_first).expect("settle");
    spool.append(&m).expect("room again");
}

#[test]
fn a_message_larger_than_a_segment_is_refused_with_both_sizes() {
    let tmp = TempDir::new("large");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()).segment_bytes(1000));
    let err = spool
        .append(&Message::new("d", vec![0u8; 2000]))
        .expect_err("too large");
    assert!(
        matches!(err, SpoolError::TooLarge { limit: 1000, size } if size > 2000),
        "{err:?}"
    );
    assert!(err.to_string().contains("segment_bytes = 1000"), "{err}");
    assert_eq!(spool.stats().pending_messages, 0);
}

#[test]
fn a_torn_tail_is_cut_at_the_last_good_record_and_reported() {
    let tmp = TempDir::new("torn");
    let config = || SpoolConfig::new(tmp.spool());
    let (spool, _) = open(config());
    let given = spool
        .append_all(&(0..5).map(message).collect::<Vec<_>>())
        .expect("append");
    drop(spool);
    let seg = segments(&tmp.spool()).pop().expect("a segment");
    let recs = records_in(&seg);
    let (last_at, last_len, _) = recs[4];
    // The last record half written, then garbage after it.
    let file = OpenOptions::new().write(true).open(&seg).expect("open");
    file.set_len(last_at + last_len / 2).expect("cut");
    drop(file);
    let (spool, recovery) = open(config());
    assert_eq!(recovery.damage.torn.len(), 1, "{:?}", recovery.damage);
    let torn = &recovery.damage.torn[0];
    assert_eq!(
        (torn.segment.as_path(), torn.offset, torn.bytes),
        (seg.as_path(), last_at, last_len / 2)
    );
    assert_eq!(recovery.damage.torn_bytes(), last_len / 2);
    assert_eq!(
        std::fs::metadata(&seg).expect("segment").len(),
        last_at,
        "cut"
    );
    assert_eq!(recovery.pending_messages, 4);
    assert_eq!(ids(&read_all(&spool)), given[..4]);
    let id = spool.append(&message(9)).expect("appends go on");
    drop(spool);

    // Zeros after the last record (a file extended but never written) are torn too.
    let seg = segments(&tmp.spool()).pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).expect("read");
    let end = bytes.len() as u64;
    bytes.extend_from_slice(&[0u8; 100]);
    std::fs::write(&seg, &bytes).expect("write");
    let (spool, recovery) = open(config());
    assert_eq!(recovery.damage.torn.len(), 1);
    assert_eq!(
        (
            recovery.damage.torn[0].offset,
            recovery.damage.torn[0].bytes
        ),
        (end, 100)
    );
    let back = ids(&read_all(&spool));
    assert_eq!(back, [given[0], given[1], given[2], given[3], id]);
}

/// Damage at the end of a segment that is not the newest is damage to records that were
/// durable (each segment is fsynced whole before the next begins): counted as corrupt, and
/// the file left as it is. It was taken for a torn write: cut off, and not counted, so the
/// corrupt-records alert stayed quiet.
#[test]
fn damage_at_the_end_of_an_older_segment_is_corrupt_not_torn() {
    let tmp = TempDir::new("sealed-end");
    let config = || SpoolConfig::new(tmp.spool()).segment_bytes(4096);
    let (spool, _) = open(config());
    let mut given = Vec::new();
    while segments(&tmp.spool()).len() < 2 {
        given.push(spool.append(&message(given.len() as u64)).expect("append"));
    }
    drop(spool);
    let first = segments(&tmp.spool()).remove(0);
    let recs = records_in(&first);
    let (last_at, last_len, _) = *recs.last().expect("records");
    let mut bytes = std::fs::read(&first).expect("read");
    let end = bytes.len();
    bytes[end - 1] ^= 0x20;
    std::fs::write(&first, &bytes).expect("write");

    let (spool, recovery) = open(config());
    assert!(recovery.damage.torn.is_empty(), "{:?}", recovery.damage);
    assert_eq!(recovery.damage.corrupt_records, 1, "{:?}", recovery.damage);
    let c = &recovery.damage.corrupt[0];
    assert_eq!((c.offset, c.bytes), (last_at, last_len));
    assert_eq!(
        std::fs::metadata(&first).expect("segment").len(),
        end as u64,
        "not cut"
    );
    assert_eq!(recovery.pending_messages, given.len() as u64 - 1);
    drop(spool);
    // `herald spool check` reads it the same way, without the lock.
    let checked = check(tmp.spool(), false).expect("check");
    assert!(checked.damage.torn.is_empty(), "{:?}", checked.damage);
    assert_eq!(checked.damage.corrupt_records, 1, "{:?}", checked.damage);
}

/// The open lists the first 1 000 damaged records, and `SpoolStats::corrupt_records` counted
/// only those: a spool with more read as if it had 1 000.
#[test]
fn every_damaged_record_is_counted_not_only_the_thousand_listed() {
    const N: u64 = 1_100;
    let tmp = TempDir::new("many-corrupt");
    let config = || SpoolConfig::new(tmp.spool());
    let (spool, _) = open(config());
    spool
        .append_all(&(0..2 * N).map(message).collect::<Vec<_>>())
        .expect("append");
    drop(spool);
    let seg = segments(&tmp.spool()).pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).expect("read");
    // A payload byte flipped in every other record: N damaged records, each between two
    // good ones.
    for (offset, len, _) in records_in(&seg).into_iter().step_by(2) {
        bytes[(offset + len - 2) as usize] ^= 0x20;
    }
    std::fs::write(&seg, &bytes).expect("write");
    let (spool, recovery) = open(config());
    assert_eq!(recovery.damage.corrupt_records, N);
    assert_eq!(
        recovery.damage.corrupt.len(),
        1_000,
        "the list stops at 1 000"
    );
    assert_eq!(spool.stats().corrupt_records, N);
    // Reading meets them all again: each still counts once.
    assert_eq!(read_all(&spool).len(), N as usize);
    assert_eq!(spool.stats().corrupt_records, N);
}

#[test]
fn damaged_records_in_the_middle_are_skipped_and_reported_with_segment_and_offset() {
    let tmp = TempDir::new("corrupt");
    let config = || SpoolConfig::new(tmp.spool());
    let (spool, _) = open(config());
    let given = spool
        .append_all(&(0..10).map(message).collect::<Vec<_>>())
        .expect("append");
    drop(spool);
    let seg = segments(&tmp.spool()).pop().expect("a segment");
    let recs = records_in(&seg);
    let mut bytes = std::fs::read(&seg).expect("read");
    // Record 3: a payload byte flipped. Record 6: its length field, so that only a scan for
    // the next record's magic finds where to go on.
    bytes[(recs[3].0 + recs[3].1 - 2) as usize] ^= 0x20;
    bytes[(recs[6].0 + 10) as usize] ^= 0x55;
    std::fs::write(&seg, &bytes).expect("write");

    let (spool, recovery) = open(config());
    let found: Vec<(&std::path::Path, u64, u64)> = recovery
        .damage
        .corrupt
        .iter()
        .map(|c| (c.segment.as_path(), c.offset, c.bytes))
        .collect();
    assert_eq!(
        found,
        [
            (seg.as_path(), recs[3].0, recs[3].1),
            (seg.as_path(), recs[6].0, recs[6].1)
        ],
        "{:?}",
        recovery.damage
    );
    assert_eq!(recovery.damage.corrupt_records, 2);
    assert!(recovery.damage.torn.is_empty());
    assert_eq!(recovery.pending_messages, 8);
    let back = read_all(&spool);
    let want: Vec<SpoolId> = given
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 6)
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(ids(&back), want);
    for r in &back {
        let i = given.iter().position(|g| *g == r.id).expect("known id") as u64;
        assert!(same(&r.message, &message(i)));
    }
    assert_eq!(
        spool.stats().corrupt_records,
        2,
        "counted once, however often read"
    );
    assert_eq!(
        std::fs::read(&seg).expect("read"),
        bytes,
        "the damaged segment is left as it is"
    );
}

#[test]
fn a_second_open_fails_naming_the_holders_pid_and_succeeds_once_it_is_dropped() {
    let tmp = TempDir::new("lock");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()));
    let err = Spool::open(SpoolConfig::new(tmp.spool())).expect_err("locked");
    let pid = std::process::id();
    assert!(
        matches!(err, SpoolError::Locked { pid: Some(p), .. } if p == pid),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&format!("in use by process {pid}")), "{text}");
    assert!(text.contains(&tmp.spool().display().to_string()), "{text}");
    drop(spool);
    let (_spool, _) = open(SpoolConfig::new(tmp.spool()));
}

/// A folder that holds no spool (a wrong path: its parent, say) is an error for inspect and
/// check, not an empty spool; check with repair does not make it one with a lock file.
#[test]
fn a_folder_without_a_spool_is_no_empty_spool() {
    let tmp = TempDir::new("not-a-spool");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()));
    spool.append_all(&[message(1)]).expect("append");
    drop(spool);
    for result in [
        inspect(tmp.path()),
        check(tmp.path(), false),
        check(tmp.path(), true),
    ] {
        let e = result.expect_err("the parent holds no spool");
        assert!(matches!(e, SpoolError::NotASpool { .. }), "{e:?}");
        assert!(e.to_string().contains("holds no spool"), "{e}");
    }
    assert!(!tmp.path().join("lock").exists(), "check made no lock file");
    assert_eq!(
        inspect(tmp.spool())
            .expect("the spool")
            .stats
            .pending_messages,
        1
    );
    // Segments without their lock file (copied elsewhere) are still a spool.
    std::fs::remove_file(tmp.spool().join("lock")).expect("remove the lock file");
    assert_eq!(
        inspect(tmp.spool())
            .expect("segments alone")
            .stats
            .pending_messages,
        1
    );
}

#[test]
fn inspect_gives_the_numbers_stats_gives_while_the_spool_is_open() {
    let tmp = TempDir::new("inspect");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()).segment_bytes(400));
    let given = spool
        .append_all(&(0..30).map(message).collect::<Vec<_>>())
        .expect("append");
    spool.settle_all(&given[..12]).expect("settle");
    spool.settle_all(&given[20..25]).expect("settle");
    let stats = spool.stats();
    let seen = inspect(tmp.spool()).expect("inspects without the lock");
    assert_eq!(seen.stats.pending_messages, 13);
    assert_eq!(
        (
            seen.stats.pending_messages,
            seen.stats.pending_bytes,
            seen.stats.disk_bytes
        ),
        (
            stats.pending_messages,
            stats.pending_bytes,
            stats.disk_bytes
        )
    );
    assert_eq!(seen.stats.segments, stats.segments);
    assert_eq!(seen.stats.oldest_pending, stats.oldest_pending);
    assert!(stats.oldest_pending.is_some());
    assert_eq!(seen.stats.next_id, stats.next_id);
    assert_eq!(seen.lock_pid, Some(std::process::id()));
    assert!(seen.damage.is_empty() && !seen.repaired);
    assert!(stats.fsyncs > 0 && stats.fsync_time > Duration::ZERO);
    assert!(matches!(
        check(tmp.spool(), true),
        Err(SpoolError::Locked { .. })
    ));
    assert_eq!(check(tmp.spool(), false).expect("check").stats, seen.stats);
    drop(spool);

    // Offline: a torn tail is found by check, and cut by check with repair.
    let seg = segments(&tmp.spool()).pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).expect("read");
    bytes.extend_from_slice(b"HSPL\x01 half a record");
    std::fs::write(&seg, &bytes).expect("write");
    let found = check(tmp.spool(), false).expect("check");
    assert_eq!(found.damage.torn_bytes(), 19);
    assert_eq!(
        std::fs::read(&seg).expect("read"),
        bytes,
        "check without repair changes nothing"
    );
    let repaired = check(tmp.spool(), true).expect("repair");
    assert!(repaired.repaired);
    assert_eq!(repaired.damage.torn_bytes(), 19);
    assert_eq!(repaired.stats.pending_messages, 13);
    assert!(check(tmp.spool(), false).expect("check").damage.is_empty());
    let (spool, recovery) = open(SpoolConfig::new(tmp.spool()).segment_bytes(400));
    assert!(recovery.damage.is_empty());
    assert_eq!(
        ids(&read_all(&spool)),
        [&given[12..20], &given[25..]].concat()
    );
}

#[test]
fn a_batch_is_one_write_and_one_fsync() {
    let tmp = TempDir::new("batch");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()));
    let before = spool.stats().fsyncs;
    spool
        .append_all(&(0..100).map(message).collect::<Vec<_>>())
        .expect("append");
    assert_eq!(spool.stats().fsyncs, before + 1);
}

#[test]
fn concurrent_appenders_each_get_their_own_ids_in_order() {
    let tmp = TempDir::new("concurrent");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()).segment_bytes(8192));
    let spool = Arc::new(spool);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || {
                (0..40u64)
                    .map(|i| {
                        (
                            spool.append(&message(t * 1000 + i)).expect("append"),
                            t * 1000 + i,
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        let mine = t.join().expect("appender");
        assert!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "one thread's ids increase"
        );
        all.extend(mine);
    }
    all.sort();
    let back = read_all(&spool);
    assert_eq!(back.len(), 320);
    for (r, (id, i)) in back.iter().zip(&all) {
        assert_eq!(r.id, *id);
        assert!(same(&r.message, &message(*i)));
    }
    let stats = spool.stats();
    assert!(
        stats.fsyncs <= 320 + 10,
        "at most one fsync per append: {}",
        stats.fsyncs
    );
}

/// Polls a future on this thread until it completes (10 s at most).
fn block_on<F: Future + Unpin>(mut f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Poll::Ready(out) = std::pin::Pin::new(&mut f).poll(&mut cx) {
            return out;
        }
        assert!(Instant::now() < deadline, "the future never completed");
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

#[test]
fn submitted_appends_can_be_awaited_and_their_ids_are_known_at_once() {
    let tmp = TempDir::new("submit");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()));
    let tickets: Vec<_> = (0..50)
        .map(|i| {
            spool
                .submit(&[message(i), message(i + 100)])
                .expect("submit")
        })
        .collect();
    let known: Vec<SpoolId> = tickets.iter().flat_map(|t| t.ids().to_vec()).collect();
    let mut done = Vec::new();
    for t in tickets {
        done.extend(block_on(t).expect("durable"));
    }
    assert_eq!(done, known);
    assert_eq!(ids(&read_all(&spool)), known);
    assert!(spool.stats().fsyncs < 50 + 10);
    let empty = spool.submit(&[]).expect("submit nothing");
    assert!(empty.wait().expect("nothing to wait for").is_empty());
}

#[test]
fn os_and_interval_policies_return_before_the_fsync_and_sync_forces_one() {
    let tmp = TempDir::new("policies");
    let (spool, _) = open(SpoolConfig::new(tmp.spool()).sync(SyncPolicy::Os));
    spool
        .append_all(&(0..10).map(message).collect::<Vec<_>>())
        .expect("append");
    spool.settle(SpoolId::from_u64(0)).expect("settle");
    assert_eq!(spool.stats().fsyncs, 0, "Os never fsyncs by itself");
    spool.sync().expect("sync");
    assert_eq!(spool.stats().fsyncs, 2, "the segment and the settle log");
    drop(spool);

    let tmp = TempDir::new("interval");
    let (spool, _) =
        open(SpoolConfig::new(tmp.spool()).sync(SyncPolicy::Interval(Duration::from_millis(30))));
    let fsyncs = spool.stats().fsyncs;
    let ids = spool
        .append_all(&(0..10).map(message).collect::<Vec<_>>())
        .expect("append");
    // Readable once written: the cursor does not wait for the interval's fsync.
    assert_eq!(read_all(&spool).len(), 10);
    eventually("the interval's fsync", || spool.stats().fsyncs > fsyncs);
    assert_eq!(self::ids(&read_all(&spool)), ids);
}

#[test]
fn open_errors_name_the_setting_or_the_path() {
    let tmp = TempDir::new("errors");
    let err = Spool::open(SpoolConfig::new(tmp.spool()).segment_bytes(1)).expect_err("invalid");
    assert!(
        matches!(
            err,
            SpoolError::InvalidSetting {
                setting: "segment_bytes",
                ..
            }
        ),
        "{err}"
    );
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("write");
    let err = Spool::open(SpoolConfig::new(file.join("spool"))).expect_err("not creatable");
    let text = err.to_string();
    assert!(
        text.starts_with("create spool directory") && text.contains("a-file"),
        "{text}"
    );
    let err = inspect(tmp.path().join("missing")).expect_err("missing");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn ids_never_repeat_even_when_every_segment_was_deleted() {
    let tmp = TempDir::new("ids");
    let config = || SpoolConfig::new(tmp.spool()).segment_bytes(200);
    let mut last = None;
    for _ in 0..3 {
        let (spool, _) = open(config());
        let given = spool
            .append_all(&(0..6).map(message).collect::<Vec<_>>())
            .expect("append");
        if let Some(last) = last {
            assert!(given[0] > last, "{:?} after {last:?}", given[0]);
        }
        spool.settle_all(&given).expect("settle");
        last = given.last().copied();
    }
}

/// A spool holds payloads, keys and headers: its folder and files were created with the
/// process's default modes (0755 and 0644 under the usual umask), readable by every user of
/// the machine. They are their owner's alone now; a folder that exists keeps its mode.
#[cfg(unix)]
#[test]
fn the_spool_folder_and_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new("modes");
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode();
    {
        let (spool, _) = open(SpoolConfig::new(tmp.spool()));
        let id = spool.append(&message(0)).expect("append");
        spool.append(&message(1)).expect("append");
        spool.settle(id).expect("settle");
        spool.close().expect("closes cleanly");
    }
    // Reopened: the settle log is written anew, a new segment starts.
    let (spool, _) = open(SpoolConfig::new(tmp.spool()));
    spool.close().expect("closes cleanly");
    assert_eq!(mode(&tmp.spool()) & 0o777, 0o700, "the spool folder");
    let files: Vec<_> = std::fs::read_dir(tmp.spool())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(
        files.len() >= 3,
        "segments, the lock, the settle log: {files:?}"
    );
    for f in &files {
        assert_eq!(mode(f) & 0o077, 0, "{} is {:o}", f.display(), mode(f));
    }
    // A folder the user made keeps its mode.
    let own = tmp.spool().with_file_name("own");
    std::fs::create_dir(&own).expect("mkdir");
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let (spool, _) = open(SpoolConfig::new(own.clone()));
    spool.close().expect("closes cleanly");
    assert_eq!(mode(&own) & 0o777, 0o750);
}
