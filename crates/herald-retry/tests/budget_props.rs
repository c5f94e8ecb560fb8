//! Properties of `RetryBudget` (deliverable 3): the documented guarantee, checked over every
//! prefix and every sub-interval of random histories.

use std::time::{Duration, Instant};

use herald_retry::{RetryBudget, RetryBudgetConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Deposit(u64),
    Withdraw,
    Balance,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop_oneof![0u64..5, 0u64..100, 0u64..100_000].prop_map(Op::Deposit),
        6 => Just(Op::Withdraw),
        1 => Just(Op::Balance),
    ]
}

/// Time steps in milliseconds: often none (bursts), often sub-second, sometimes long.
fn step_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(0u64),
        4 => 0u64..1_000,
        1 => 0u64..30_000,
    ]
}

fn ratio() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(0.2),
        Just(0.1),
        Just(1.0),
        0.0f64..2.0,
        0.0f64..1000.0
    ]
}

/// What happened at one step, for checking the guarantee afterwards.
#[derive(Debug, Clone, Copy)]
struct Event {
    at_ms: u64,
    deposited: u64,
    withdrawn: bool,
}

fn run(ratio: f64, min_per_sec: u32, history: &[(u64, Op)], backwards: bool) -> Vec<Event> {
    let base = Instant::now();
    let mut budget = RetryBudgetConfig { ratio, min_per_sec }.build(base);
    let mut now_ms = 0u64;
    let mut events = Vec::with_capacity(history.len());
    for (step, op) in history {
        // With `backwards`, odd steps jump back in time; the effective time is the latest seen.
        let call_ms = if backwards && step % 2 == 1 {
            now_ms.saturating_sub(*step * 7)
        } else {
            now_ms += step;
            now_ms
        };
        let now = base + Duration::from_millis(call_ms);
        let mut event = Event {
            at_ms: now_ms,
            deposited: 0,
            withdrawn: false,
        };
        match op {
            Op::Deposit(n) => {
                budget.deposit(*n, now);
                event.deposited = *n;
            }
            Op::Withdraw => event.withdrawn = budget.try_withdraw(now),
            Op::Balance => {
                let b = budget.balance(now);
                assert!(b >= 0.0 && b.is_finite());
            }
        }
        events.push(event);
    }
    events
}

fn check_guarantee(ratio: f64, min_per_sec: u32, events: &[Event]) -> Result<(), TestCaseError> {
    // From creation (time 0), for every prefix.
    let (mut withdrawn, mut deposited) = (0u64, 0u64);
    for e in events {
        withdrawn += u64::from(e.withdrawn);
        deposited += e.deposited;
        let elapsed = e.at_ms as f64 / 1000.0;
        let bound = ratio * deposited as f64 + f64::from(min_per_sec) * (elapsed + 1.0) + 1e-6;
        prop_assert!(
            withdrawn as f64 <= bound,
            "{} withdrawals > {} (deposits {}, elapsed {} s)",
            withdrawn,
            bound,
            deposited,
            elapsed
        );
    }
    // Every sub-interval [t_i, t_j]: deposits from 10 s before t_i count. Times are
    // non-decreasing, so the deposits that count form a range of a prefix sum.
    let mut prefix = vec![0u64; events.len() + 1];
    for (k, e) in events.iter().enumerate() {
        prefix[k + 1] = prefix[k] + e.deposited;
    }
    for i in 0..events.len() {
        let t0 = events[i].at_ms;
        let first = events.partition_point(|e| e.at_ms + 10_000 < t0);
        let mut withdrawn = 0u64;
        for j in i..events.len() {
            if !events[j].withdrawn {
                continue;
            }
            withdrawn += 1;
            let deposited = prefix[j + 1] - prefix[first];
            let elapsed = (events[j].at_ms - t0) as f64 / 1000.0;
            let bound = ratio * deposited as f64 + f64::from(min_per_sec) * (elapsed + 1.0) + 1e-6;
            prop_assert!(
                withdrawn as f64 <= bound,
                "interval [{}, {}] ms: {} withdrawals > {}",
                t0,
                events[j].at_ms,
                withdrawn,
                bound
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Property 3: withdrawals <= ratio * deposits + min_per_sec * (elapsed_secs + 1), for
    /// every prefix and every sub-interval of arbitrary interleavings at non-decreasing times.
    #[test]
    fn withdrawals_never_exceed_the_budget(
        ratio in ratio(),
        min_per_sec in prop_oneof![Just(0u32), 0u32..20, 0u32..1000],
        history in proptest::collection::vec((step_ms(), op()), 0..300),
    ) {
        let events = run(ratio, min_per_sec, &history, false);
        check_guarantee(ratio, min_per_sec, &events)?;
    }

    /// The same guarantee when `now` sometimes goes backwards (elapsed time is measured on
    /// the latest time seen); nothing panics.
    #[test]
    fn backwards_time_does_not_break_the_guarantee(
        ratio in ratio(),
        min_per_sec in 0u32..20,
        history in proptest::collection::vec((step_ms(), op()), 0..300),
    ) {
        let events = run(ratio, min_per_sec, &history, true);
        check_guarantee(ratio, min_per_sec, &events)?;
    }

    /// The budget is not trivially stingy: right after deposits, everything that was
    /// deposited (up to rounding to micro-tokens) plus the floor can be withdrawn.
    #[test]
    fn deposits_and_floor_are_fully_usable(
        ratio in prop_oneof![Just(0.2), Just(0.3), 0.0f64..2.0, 0.0f64..100.0],
        min_per_sec in 0u32..50,
        n in prop_oneof![0u64..100, 0u64..5_000],
        later_ms in 0u64..9_000,
    ) {
        let t0 = Instant::now();
        let mut budget = RetryBudget::new(ratio, min_per_sec, t0);
        budget.deposit(n, t0);
        let now = t0 + Duration::from_millis(later_ms);
        let mut count = 0u64;
        while budget.try_withdraw(now) {
            count += 1;
            prop_assert!(count <= 20_000_000);
        }
        let expected = ratio * n as f64 + f64::from(min_per_sec);
        prop_assert!(count as f64 <= expected + 1e-6, "{} > {}", count, expected);
        prop_assert!(count as f64 >= expected - 1.0 - n as f64 * 1e-6 - 1e-9, "{} << {}", count, expected);
        prop_assert!(budget.balance(now) < 1.0);
    }

    /// The stored balance never exceeds ratio * (deposits of the last 10 s) + min_per_sec.
    #[test]
    fn balance_is_capped_by_the_window(
        ratio in ratio(),
        min_per_sec in 0u32..20,
        history in proptest::collection::vec((step_ms(), prop_oneof![0u64..100].prop_map(Op::Deposit)), 0..100),
    ) {
        let base = Instant::now();
        let mut budget = RetryBudget::new(ratio, min_per_sec, base);
        let mut now_ms = 0u64;
        let mut deposits: Vec<(u64, u64)> = Vec::new();
        for (step, op) in &history {
            now_ms += step;
            let now = base + Duration::from_millis(now_ms);
            if let Op::Deposit(n) = op {
                budget.deposit(*n, now);
                deposits.push((now_ms, *n));
            }
            let recent: u64 = deposits.iter().filter(|(at, _)| at + 10_000 > now_ms).map(|(_, n)| n).sum();
            let cap = ratio * recent as f64 + f64::from(min_per_sec) + 1e-6;
            prop_assert!(budget.balance(now) <= cap, "{} > {}", budget.balance(now), cap);
        }
    }
}
