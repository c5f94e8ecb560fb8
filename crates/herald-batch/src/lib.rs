//! Batching for herald: when a group of messages for one destination is sent together.
//!
//! Two pieces, both pure logic (the clock is an argument, nothing sleeps):
//!
//! - [`BatchPolicy`], the decision: may this message join the batch, is the batch full, how long
//!   may the oldest message wait. [`SizeOrLinger`] is the default (max messages, max bytes, linger).
//! - [`Accumulator`], the per-destination queues the producer pipeline fills and drains. It also
//!   enforces the pipeline's per-destination gates (batches in flight, "blocked until"), because
//!   ordering depends on them and they are easiest to test here, without a runtime.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//! use herald_batch::{Accumulator, SizeOrLinger};
//!
//! let policy = SizeOrLinger::new(2, 1 << 20, Duration::from_millis(5));
//! let mut acc: Accumulator<&str, u32> = Accumulator::new(policy, None);
//! let t0 = Instant::now();
//! acc.push_back(&"orders", 1, 100, t0);
//! assert!(acc.pop_ready(t0, false).is_none(), "not full, linger not over");
//! acc.push_back(&"orders", 2, 100, t0);
//! let batch = acc.pop_ready(t0, false).expect("two messages fill the batch");
//! assert_eq!(batch.items, vec![1, 2]);
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A setting that cannot work; `field` names it (for example `batch.max_messages`). One type
/// for every policy crate: it is herald-retry's, where the shared vocabulary lives.
pub use herald_retry::InvalidSetting;

/// The size of a batch being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStats {
    /// Messages in the batch.
    pub messages: usize,
    /// Sum of the messages' sizes in bytes (payload, key and headers).
    pub bytes: usize,
}

/// Decides how messages are grouped into batches.
///
/// Object safe, so a producer can hold any policy behind `Box<dyn BatchPolicy>`.
///
/// ```
/// use std::time::Duration;
/// use herald_batch::{BatchPolicy, BatchStats};
///
/// /// Sends every message on its own, at once.
/// #[derive(Debug)]
/// struct OneByOne;
/// impl BatchPolicy for OneByOne {
///     fn admits(&self, batch: BatchStats, _bytes: usize) -> bool { batch.messages == 0 }
///     fn is_full(&self, batch: BatchStats) -> bool { batch.messages >= 1 }
///     fn linger(&self) -> Duration { Duration::ZERO }
/// }
/// let policy: Box<dyn BatchPolicy> = Box::new(OneByOne);
/// assert!(policy.is_full(BatchStats { messages: 1, bytes: 10 }));
/// ```
pub trait BatchPolicy: Send + Sync + fmt::Debug + 'static {
    /// Whether a message of `message_bytes` may join a batch that already holds `batch`.
    /// An empty batch admits any message whatever this says (a message larger than every
    /// batch is rejected before it reaches the accumulator, by the producer's max message
    /// size): the accumulator does not ask then.
    fn admits(&self, batch: BatchStats, message_bytes: usize) -> bool;
    /// Whether the batch should go now, whatever its age.
    fn is_full(&self, batch: BatchStats) -> bool;
    /// How long the oldest message of a batch may wait for company.
    fn linger(&self) -> Duration;
    /// Checked once when the producer is built. Default: nothing to check.
    fn validate(&self) -> Result<(), InvalidSetting> {
        Ok(())
    }
}

const _: Option<&dyn BatchPolicy> = None;

/// The default policy: a batch goes when it holds `max_messages` or `max_bytes`, or when its
/// oldest message has waited `linger`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeOrLinger {
    max_messages: usize,
    max_bytes: usize,
    linger: Duration,
}

impl SizeOrLinger {
    /// A policy with these limits; [`BatchPolicy::validate`] checks them when the producer is built.
    pub fn new(max_messages: usize, max_bytes: usize, linger: Duration) -> Self {
        Self {
            max_messages,
            max_bytes,
            linger,
        }
    }
    /// Most messages in one batch.
    pub fn max_messages(&self) -> usize {
        self.max_messages
    }
    /// Most bytes in one batch (a single larger message still goes, alone).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

impl Default for SizeOrLinger {
    /// 1 024 messages, 1 MiB, no linger. A batch goes as soon as its destination may send;
    /// what arrives while the destination's batches are in flight (the producer's in-flight
    /// limits) gathers into the next one, so batches grow with the load, not with a timer
    /// (Nagle's rule; Kafka's Java producer with `linger.ms` 0). Measured with the `herald`
    /// command (docs/benchmarks.md, "Latency under a steady load"): against 5 ms, p50 at a
    /// steady 10 000 msgs/s to Kafka fell from 5.3 to 2.7 ms and at 1 000 msgs/s to RabbitMQ
    /// from 4.7 to 0.8 ms, and throughput did not fall (Kafka through the command rose).
    fn default() -> Self {
        Self::new(1024, 1 << 20, Duration::ZERO)
    }
}

/// Never panics (comparisons and a saturating sum): herald's producer asks this policy without
/// the guard against panics it puts around any other, so it must stay that way.
impl BatchPolicy for SizeOrLinger {
    fn admits(&self, batch: BatchStats, message_bytes: usize) -> bool {
        batch.messages == 0
            || (batch.messages < self.max_messages
                && batch.bytes.saturating_add(message_bytes) <= self.max_bytes)
    }
    fn is_full(&self, batch: BatchStats) -> bool {
        batch.messages >= self.max_messages || batch.bytes >= self.max_bytes
    }
    fn linger(&self) -> Duration {
        self.linger
    }
    fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_messages == 0 {
            return Err(InvalidSetting {
                field: "batch.max_messages",
                reason: "must be at least 1".into(),
            });
        }
        if self.max_bytes == 0 {
            return Err(InvalidSetting {
                field: "batch.max_bytes",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// A destination's queue in one [`Accumulator`], found with [`Accumulator::slot`]. Valid for the
/// accumulator that gave it, until its next call other than [`Accumulator::push_back_at`]: a
/// new destination's queue may take the place of idle ones (see [`Accumulator::slot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(usize);

/// A batch taken from the accumulator.
#[derive(Debug)]
pub struct Batch<D, T> {
    /// Where every item of the batch goes.
    pub destination: D,
    /// The items, in queue order.
    pub items: Vec<T>,
    /// Sum of the items' sizes.
    pub bytes: usize,
}

/// A batch taken with [`Accumulator::pop_ready_into`]: its items went to the caller's collection.
#[derive(Debug)]
pub struct Cut<D, C> {
    /// Where every item of the batch goes.
    pub destination: D,
    /// The collection the items were handed to, in queue order.
    pub items: C,
    /// How many items were taken.
    pub messages: usize,
    /// Sum of the items' sizes.
    pub bytes: usize,
}

#[derive(Debug)]
struct Queue<D, T> {
    destination: D,
    items: VecDeque<(T, usize)>,
    bytes: usize,
    /// When the oldest item that has not been part of a batch yet arrived: linger counts from here.
    oldest: Option<Instant>,
    /// Batches of this destination taken and not yet reported done.
    in_flight: usize,
    /// Reasons the destination may not send, besides in-flight: a count of holds
    /// (for example retries of this destination that wait elsewhere).
    holds: usize,
    /// No batch before this instant (a backoff in strict ordering).
    blocked_until: Option<Instant>,
}

impl<D, T> Queue<D, T> {
    fn stats(&self) -> BatchStats {
        BatchStats {
            messages: self.items.len(),
            bytes: self.bytes,
        }
    }
}

/// Per-destination queues of items waiting to be batched.
///
/// `D` is the destination, `T` the item. Items keep their order within a destination: batches are
/// cut from the front of the queue, and [`Accumulator::push_front`] puts retried items back ahead
/// of newer ones. Destinations are served round-robin.
///
/// Gates, per destination: at most `max_in_flight_per_destination` batches taken and not yet
/// reported back with [`Accumulator::batch_done`]; none while [`Accumulator::hold`] is in force;
/// none before [`Accumulator::block_until`].
#[derive(Debug)]
pub struct Accumulator<D, T> {
    policy: Box<dyn BatchPolicy>,
    max_in_flight_per_destination: Option<usize>,
    queues: Vec<Queue<D, T>>,
    index: HashMap<D, usize>,
    /// Round-robin cursor for `pop_ready`.
    cursor: usize,
    /// The last destination pushed to, to skip hashing in the common one-destination case.
    last: Option<usize>,
    messages: usize,
    bytes: usize,
    /// How many queues there may be before a new destination's first makes the accumulator
    /// drop the idle ones (see `sweep`).
    sweep_at: usize,
    /// Queues kept before any sweep: [`KEEP_QUEUES`] (lower in tests).
    keep: usize,
}

/// Queues kept however idle: a producer's usual handful of destinations never pays for
/// sweeps, nor for making their queues again.
const KEEP_QUEUES: usize = 64;

impl<D: Hash + Eq + Clone, T> Accumulator<D, T> {
    /// An empty accumulator. `max_in_flight_per_destination: Some(1)` is what strict per-key
    /// ordering needs; `None` means no per-destination limit.
    pub fn new(policy: impl BatchPolicy, max_in_flight_per_destination: Option<usize>) -> Self {
        Self::with_boxed_policy(Box::new(policy), max_in_flight_per_destination)
    }

    /// As [`Accumulator::new`], with a policy already boxed.
    pub fn with_boxed_policy(
        policy: Box<dyn BatchPolicy>,
        max_in_flight_per_destination: Option<usize>,
    ) -> Self {
        Self {
            policy,
            max_in_flight_per_destination,
            queues: Vec::new(),
            index: HashMap::new(),
            cursor: 0,
            last: None,
            messages: 0,
            bytes: 0,
            sweep_at: KEEP_QUEUES,
            keep: KEEP_QUEUES,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &dyn BatchPolicy {
        &*self.policy
    }

    /// Items waiting, over all destinations.
    pub fn len(&self) -> usize {
        self.messages
    }

    /// Whether no item waits.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Bytes waiting, over all destinations.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn queue_index(&mut self, destination: &D) -> usize {
        if let Some(i) = self.last {
            if self.queues[i].destination == *destination {
                return i;
            }
        }
        let i = match self.index.get(destination) {
            Some(&i) => i,
            None => {
                if self.queues.len() >= self.sweep_at {
                    self.sweep();
                }
                let i = self.queues.len();
                self.queues.push(Queue {
                    destination: destination.clone(),
                    items: VecDeque::new(),
                    bytes: 0,
                    oldest: None,
                    in_flight: 0,
                    holds: 0,
                    blocked_until: None,
                });
                self.index.insert(destination.clone(), i);
                i
            }
        };
        self.last = Some(i);
        i
    }

    /// Drops the queues with nothing to keep: no item, no batch in flight, no hold, no backoff
    /// set (the next batch cut clears a backoff; one whose queue emptied otherwise keeps its
    /// queue until then). Without it, every destination ever used would keep its queue for
    /// the accumulator's life (a topic per device: memory without bound), and every
    /// `pop_ready`/`next_wakeup` would scan them all. Called when a new destination finds
    /// `sweep_at` queues; the next sweep waits until there are twice as many as were kept
    /// (at least [`KEEP_QUEUES`]), so each destination's first item pays O(1) on average,
    /// and a destination that comes back after a sweep only gets a new, empty queue.
    fn sweep(&mut self) {
        let idle = |q: &Queue<D, T>| {
            q.items.is_empty() && q.in_flight == 0 && q.holds == 0 && q.blocked_until.is_none()
        };
        if self.queues.iter().any(idle) {
            // The cursor stays on the queue it pointed at, or the next one kept.
            let cursor = self.cursor;
            let kept_before_cursor = self.queues[..cursor.min(self.queues.len())]
                .iter()
                .filter(|q| !idle(q))
                .count();
            self.queues.retain(|q| !idle(q));
            self.index.clear();
            for (i, q) in self.queues.iter().enumerate() {
                self.index.insert(q.destination.clone(), i);
            }
            self.cursor = if kept_before_cursor < self.queues.len() {
                kept_before_cursor
            } else {
                0
            };
            self.last = None;
        }
        self.sweep_at = (2 * self.queues.len()).max(self.keep);
    }

    /// How many destinations have a queue (those with items, batches in flight, holds or a
    /// backoff, and idle ones not dropped yet).
    pub fn destinations(&self) -> usize {
        self.queues.len()
    }

    /// Appends an item of `bytes` to its destination's queue. Returns whether that queue now
    /// deserves the dispatcher's attention: it was empty (a new linger deadline starts) or it
    /// holds a full batch.
    pub fn push_back(&mut self, destination: &D, item: T, bytes: usize, now: Instant) -> bool {
        let slot = self.slot(destination);
        self.push_back_at(slot, item, bytes, now)
    }

    /// The queue of `destination`, created if new. With [`Accumulator::push_back_at`], lets a
    /// caller whose item holds its own destination push it without cloning the destination.
    /// Creating a queue may drop idle ones (every queue with nothing in it, in flight, held
    /// or backing off), which moves the others: use the slot at once.
    pub fn slot(&mut self, destination: &D) -> Slot {
        Slot(self.queue_index(destination))
    }

    /// As [`Accumulator::push_back`], into a queue found with [`Accumulator::slot`].
    #[inline(always)] // once per message: a call copies the item into its argument
    pub fn push_back_at(&mut self, slot: Slot, item: T, bytes: usize, now: Instant) -> bool {
        let q = &mut self.queues[slot.0];
        let was_empty = q.items.is_empty();
        q.items.push_back((item, bytes));
        q.bytes += bytes;
        if q.oldest.is_none() {
            q.oldest = Some(now);
        }
        self.messages += 1;
        self.bytes += bytes;
        was_empty || self.policy.is_full(q.stats())
    }

    /// Puts items back at the front of their destination's queue, keeping their order: they go
    /// out before anything pushed after them. Used for retries under strict ordering. They count
    /// as having lingered already.
    pub fn push_front<I>(&mut self, destination: &D, items: I, now: Instant)
    where
        I: IntoIterator<Item = (T, usize)>,
        I::IntoIter: DoubleEndedIterator,
    {
        let i = self.queue_index(destination);
        let q = &mut self.queues[i];
        for (item, bytes) in items.into_iter().rev() {
            q.bytes += bytes;
            self.messages += 1;
            self.bytes += bytes;
            q.items.push_front((item, bytes));
        }
        let linger = self.policy.linger();
        q.oldest = Some(
            now.checked_sub(linger)
                .unwrap_or(now)
                .min(q.oldest.unwrap_or(now)),
        );
    }

    /// Keeps the destination from sending until `until` (a backoff). A later call replaces an
    /// earlier one.
    pub fn block_until(&mut self, destination: &D, until: Instant) {
        let i = self.queue_index(destination);
        self.queues[i].blocked_until = Some(until);
    }

    /// Adds a hold on the destination: no batch is taken while any hold is in force.
    pub fn hold(&mut self, destination: &D) {
        let i = self.queue_index(destination);
        self.queues[i].holds += 1;
    }

    /// Releases one hold taken with [`Accumulator::hold`].
    pub fn release(&mut self, destination: &D) {
        let i = self.queue_index(destination);
        let q = &mut self.queues[i];
        q.holds = q.holds.saturating_sub(1);
    }

    /// Reports that a batch taken from this destination is finished, freeing its in-flight slot.
    pub fn batch_done(&mut self, destination: &D) {
        let i = self.queue_index(destination);
        let q = &mut self.queues[i];
        q.in_flight = q.in_flight.saturating_sub(1);
    }

    fn sendable(&self, q: &Queue<D, T>, now: Instant) -> bool {
        q.holds == 0
            && self
                .max_in_flight_per_destination
                .is_none_or(|max| q.in_flight < max)
            && q.blocked_until.is_none_or(|t| t <= now)
    }

    fn due(&self, q: &Queue<D, T>, now: Instant, force: bool) -> bool {
        !q.items.is_empty()
            && (force
                || self.policy.is_full(q.stats())
                || q.oldest
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.policy.linger()))
    }

    /// Takes the next batch that may go at `now`: from a destination whose gates are open and
    /// whose queue holds a full batch, or whose oldest item has lingered long enough, or any
    /// item at all when `force` (a flush). `None` when no destination qualifies.
    pub fn pop_ready(&mut self, now: Instant, force: bool) -> Option<Batch<D, T>> {
        self.pop_ready_into(now, force, Vec::with_capacity)
            .map(|cut| Batch {
                destination: cut.destination,
                items: cut.items,
                bytes: cut.bytes,
            })
    }

    /// As [`Accumulator::pop_ready`], handing the batch's items, in queue order, to a
    /// collection made by `make` (given how many items the batch holds) rather than to a
    /// `Vec`. For a caller that splits or sorts the items as they come out:
    /// each item is moved once instead of twice.
    pub fn pop_ready_into<C: Extend<T>>(
        &mut self,
        now: Instant,
        force: bool,
        make: impl FnOnce(usize) -> C,
    ) -> Option<Cut<D, C>> {
        let n = self.queues.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let q = &self.queues[i];
            if self.sendable(q, now) && self.due(q, now, force) {
                self.cursor = (i + 1) % n;
                return Some(self.cut(i, now, make));
            }
        }
        None
    }

    fn cut<C: Extend<T>>(
        &mut self,
        i: usize,
        now: Instant,
        make: impl FnOnce(usize) -> C,
    ) -> Cut<D, C> {
        let policy = &*self.policy;
        let q = &mut self.queues[i];
        let mut stats = BatchStats::default();
        // The policy first, over the queue as it stands; then the batch's items handed over
        // in one go (each moved once, into a collection made to their number).
        let mut take = 0;
        for (_, bytes) in &q.items {
            // Not asked for the first: a policy refusing it would leave the queue as it is,
            // ready again at once, for ever.
            if take > 0 && !policy.admits(stats, *bytes) {
                break;
            }
            stats.messages += 1;
            stats.bytes += bytes;
            take += 1;
            if policy.is_full(stats) {
                break;
            }
        }
        let mut items = make(take);
        items.extend(q.items.drain(..take).map(|(item, _)| item));
        q.bytes -= stats.bytes;
        q.in_flight += 1;
        q.blocked_until = None;
        // What stays behind has waited since at least now; it may already be a full batch.
        q.oldest = if q.items.is_empty() {
            None
        } else {
            Some(q.oldest.map_or(now, |t| t.min(now)))
        };
        self.messages -= stats.messages;
        self.bytes -= stats.bytes;
        Cut {
            destination: q.destination.clone(),
            items,
            messages: stats.messages,
            bytes: stats.bytes,
        }
    }

    /// The earliest instant at which [`Accumulator::pop_ready`] could return a batch that it
    /// cannot return now, considering linger and "blocked until" (not holds or in-flight slots,
    /// which change only through calls). `None` when nothing waits on time.
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let linger = self.policy.linger();
        self.queues
            .iter()
            .filter(|q| !q.items.is_empty() && q.holds == 0)
            .filter_map(|q| {
                // A full batch waits on nothing but its gates.
                let linger_at = if self.policy.is_full(q.stats()) {
                    None
                } else {
                    q.oldest.map(|t| t + linger)
                };
                let at = match (linger_at, q.blocked_until) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }?;
                (at > now).then_some(at)
            })
            .min()
    }

    /// Removes every item for which `remove` returns true (for example: past its deadline), from
    /// all destinations, and returns them with their destinations. Order among the rest is kept.
    pub fn remove_where(&mut self, mut remove: impl FnMut(&T) -> bool) -> Vec<(D, T)> {
        let mut removed = Vec::new();
        for q in &mut self.queues {
            if !q.items.iter().any(|(item, _)| remove(item)) {
                continue;
            }
            let mut kept = VecDeque::with_capacity(q.items.len());
            for (item, bytes) in q.items.drain(..) {
                if remove(&item) {
                    q.bytes -= bytes;
                    self.messages -= 1;
                    self.bytes -= bytes;
                    removed.push((q.destination.clone(), item));
                } else {
                    kept.push_back((item, bytes));
                }
            }
            q.items = kept;
            if q.items.is_empty() {
                q.oldest = None;
            }
        }
        removed
    }

    /// Every waiting item with its destination, destination by destination, in queue order.
    pub fn iter(&self) -> impl Iterator<Item = (&D, &T)> + '_ {
        self.queues
            .iter()
            .flat_map(|q| q.items.iter().map(move |(item, _)| (&q.destination, item)))
    }

    /// Takes every waiting item out, destination by destination, in queue order (for a close
    /// that ran out of time).
    pub fn drain_all(&mut self) -> Vec<(D, T)> {
        self.remove_where(|_| true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(m: usize, b: usize) -> SizeOrLinger {
        SizeOrLinger::new(m, b, Duration::from_millis(10))
    }

    /// A policy that refuses a message even into an empty batch (its own byte limit below
    /// the message's size). Before, the cut took nothing and left the queue ready: the
    /// producer's dispatcher cut empty batches of it for ever, under its state lock.
    #[derive(Debug)]
    struct ByBytes(usize);
    impl BatchPolicy for ByBytes {
        fn admits(&self, batch: BatchStats, message_bytes: usize) -> bool {
            batch.bytes + message_bytes <= self.0
        }
        fn is_full(&self, _: BatchStats) -> bool {
            false
        }
        fn linger(&self) -> Duration {
            Duration::ZERO
        }
    }

    #[test]
    fn an_empty_batch_takes_its_first_message_whatever_the_policy_says() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(ByBytes(10), None);
        acc.push_back(&"a", 1, 20, t0);
        acc.push_back(&"a", 2, 5, t0);
        let b = acc.pop_ready(t0, true).expect("a batch");
        assert_eq!(b.items, vec![1]);
    }

    /// Every destination ever used kept its queue before: 10 000 topics, 10 000 queues for
    /// the accumulator's life, each scanned by every `pop_ready`.
    #[test]
    fn idle_queues_of_past_destinations_are_dropped() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(10, 1000), Some(1));
        for d in 0..10_000u32 {
            acc.push_back(&d, d, 1, t0);
            let b = acc.pop_ready(t0, true).expect("a batch");
            assert_eq!(b.items, vec![d]);
            acc.batch_done(&d);
        }
        assert!(
            acc.destinations() <= 2 * KEEP_QUEUES,
            "{} queues kept",
            acc.destinations()
        );
        assert!(acc.is_empty());
    }

    /// A sweep drops only queues with nothing to keep: one in flight keeps its gate, one held
    /// its hold, one backing off its backoff, one with items its items and their order.
    #[test]
    fn a_sweep_keeps_what_gates_or_holds_a_destination() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(10, 1000), Some(1));
        acc.keep = 2;
        acc.sweep_at = 2;
        // "f" has a batch in flight, "h" a hold, "b" a backoff, "q" items waiting.
        acc.push_back(&"f", 1, 1, t0);
        assert_eq!(acc.pop_ready(t0, true).unwrap().destination, "f");
        acc.hold(&"h");
        acc.block_until(&"b", t0 + Duration::from_secs(60));
        acc.hold(&"q");
        acc.push_back(&"q", 2, 1, t0);
        acc.push_back(&"q", 3, 1, t0);
        // Many destinations come and go: sweeps run.
        let names: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for (i, d) in names.iter().enumerate() {
            acc.push_back(d, 100 + i as u32, 1, t0);
            let b = acc.pop_ready(t0, true).unwrap();
            assert_eq!(b.destination, *d);
            acc.batch_done(d);
        }
        assert!(acc.destinations() < 20, "{} queues", acc.destinations());
        // The in-flight gate of "f" holds; the hold of "h" holds; the backoff of "b" holds.
        acc.push_back(&"f", 4, 1, t0);
        acc.push_back(&"h", 5, 1, t0);
        acc.push_back(&"b", 6, 1, t0);
        assert!(acc.pop_ready(t0, true).is_none());
        acc.release(&"q");
        assert_eq!(acc.pop_ready(t0, true).unwrap().items, vec![2, 3]);
        acc.batch_done(&"f");
        assert_eq!(acc.pop_ready(t0, true).unwrap().items, vec![4]);
        acc.release(&"h");
        assert_eq!(acc.pop_ready(t0, true).unwrap().items, vec![5]);
        assert!(acc.pop_ready(t0, true).is_none(), "b backs off");
        let later = t0 + Duration::from_secs(60);
        assert_eq!(acc.pop_ready(later, true).unwrap().items, vec![6]);
    }

    #[test]
    fn linger_releases_a_partial_batch() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(10, 1000), None);
        assert!(acc.push_back(&"a", 1, 10, t0), "first item starts a linger");
        assert!(!acc.push_back(&"a", 2, 10, t0));
        assert!(acc
            .pop_ready(t0 + Duration::from_millis(9), false)
            .is_none());
        assert_eq!(acc.next_wakeup(t0), Some(t0 + Duration::from_millis(10)));
        let b = acc
            .pop_ready(t0 + Duration::from_millis(10), false)
            .unwrap();
        assert_eq!(b.items, vec![1, 2]);
        assert_eq!(b.bytes, 20);
        assert!(acc.is_empty());
        assert_eq!(acc.bytes(), 0);
    }

    /// Splits items by parity as they come out, recording the capacity it was made with.
    #[derive(Debug, Default)]
    struct ByParity {
        capacity: usize,
        even: Vec<u32>,
        odd: Vec<u32>,
    }

    impl Extend<u32> for ByParity {
        fn extend<I: IntoIterator<Item = u32>>(&mut self, items: I) {
            for i in items {
                if i % 2 == 0 {
                    self.even.push(i);
                } else {
                    self.odd.push(i);
                }
            }
        }
    }

    #[test]
    fn pop_ready_into_hands_the_batch_to_the_callers_collection_in_order() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(4, 1000), None);
        for i in 0..6 {
            acc.push_back(&"a", i, 10, t0);
        }
        let make = |capacity| ByParity {
            capacity,
            ..ByParity::default()
        };
        let cut = acc.pop_ready_into(t0, false, make).expect("a full batch");
        assert_eq!(cut.destination, "a");
        assert_eq!((cut.messages, cut.bytes), (4, 40));
        assert_eq!(cut.items.capacity, 4, "made to the batch's number of items");
        assert_eq!((cut.items.even, cut.items.odd), (vec![0, 2], vec![1, 3]));
        assert_eq!((acc.len(), acc.bytes()), (2, 20));
        // What is left is cut the same way as by `pop_ready`.
        acc.batch_done(&"a");
        assert_eq!(acc.pop_ready(t0, true).unwrap().items, vec![4, 5]);
    }

    #[test]
    fn force_releases_at_once() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(10, 1000), None);
        acc.push_back(&"a", 1, 10, t0);
        assert!(acc.pop_ready(t0, false).is_none());
        assert_eq!(acc.pop_ready(t0, true).unwrap().items, vec![1]);
    }

    #[test]
    fn bytes_limit_cuts_batches_and_a_big_item_goes_alone() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(100, 100), None);
        acc.push_back(&"a", 1, 60, t0);
        acc.push_back(&"a", 2, 60, t0);
        acc.push_back(&"a", 3, 500, t0);
        let b = acc.pop_ready(t0, false).unwrap();
        assert_eq!(b.items, vec![1], "60 + 60 > 100");
        acc.batch_done(&"a");
        let late = t0 + Duration::from_secs(1);
        assert_eq!(acc.pop_ready(late, false).unwrap().items, vec![2]);
        assert_eq!(acc.pop_ready(late, false).unwrap().items, vec![3]);
        assert!(acc.pop_ready(late, true).is_none());
    }

    #[test]
    fn in_flight_limit_holds_and_blocks_per_destination() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(1, 1000), Some(1));
        for i in 0..3 {
            acc.push_back(&"a", i, 1, t0);
        }
        acc.push_back(&"b", 10, 1, t0);
        let first = acc.pop_ready(t0, false).unwrap();
        assert_eq!(first.destination, "a");
        let second = acc.pop_ready(t0, false).unwrap();
        assert_eq!(second.destination, "b", "a has a batch in flight");
        assert!(acc.pop_ready(t0, false).is_none());
        acc.batch_done(&"a");
        acc.hold(&"a");
        assert!(acc.pop_ready(t0, false).is_none(), "held");
        acc.release(&"a");
        acc.block_until(&"a", t0 + Duration::from_millis(3));
        assert!(acc.pop_ready(t0, false).is_none(), "blocked");
        assert_eq!(acc.next_wakeup(t0), Some(t0 + Duration::from_millis(3)));
        let third = acc.pop_ready(t0 + Duration::from_millis(3), false).unwrap();
        assert_eq!(third.items, vec![1]);
    }

    #[test]
    fn push_front_goes_first_in_order() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(10, 1000), None);
        acc.push_back(&"a", 3, 1, t0);
        acc.push_front(&"a", vec![(1, 1), (2, 1)], t0);
        let b = acc.pop_ready(t0, false).unwrap();
        assert_eq!(
            b.items,
            vec![1, 2, 3],
            "retried items have lingered already"
        );
    }

    #[test]
    fn remove_where_keeps_order_and_counts() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(policy(10, 1000), None);
        for i in 0..6 {
            acc.push_back(&(i % 2), i, 2, t0);
        }
        let removed = acc.remove_where(|i| *i >= 3);
        let mut ids: Vec<_> = removed.iter().map(|(_, i)| *i).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![3, 4, 5]);
        assert_eq!(acc.len(), 3);
        assert_eq!(acc.bytes(), 6);
        let mut rest = Vec::new();
        while let Some(b) = acc.pop_ready(t0, true) {
            rest.extend(b.items);
        }
        rest.sort_unstable();
        assert_eq!(rest, vec![0, 1, 2]);
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let e = SizeOrLinger::new(0, 10, Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "batch.max_messages");
        let e = SizeOrLinger::new(1, 0, Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "batch.max_bytes");
        assert!(e.to_string().contains("batch.max_bytes"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push { dest: u8, bytes: usize },
        Pop { advance_ms: u64, force: bool },
        Done { dest: u8 },
    }

    /// Destinations in the property test: more than its accumulator keeps idle, so that
    /// sweeps run among the rest.
    const DESTS: u8 = 6;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..DESTS, 1usize..300).prop_map(|(dest, bytes)| Op::Push { dest, bytes }),
            2 => (0u64..20, any::<bool>()).prop_map(|(advance_ms, force)| Op::Pop { advance_ms, force }),
            1 => (0u8..DESTS).prop_map(|dest| Op::Done { dest }),
        ]
    }

    proptest! {
        /// Batches never exceed their limits (but for a lone oversized item), nothing is lost or
        /// duplicated, order per destination holds, and the in-flight gate is respected.
        #[test]
        fn batches_respect_limits_and_order(
            max_messages in 1usize..8,
            max_bytes in 1usize..1000,
            in_flight in prop::option::of(1usize..3),
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let p = SizeOrLinger::new(max_messages, max_bytes, Duration::from_millis(5));
            let mut acc = Accumulator::new(p, in_flight);
            acc.keep = 2;
            acc.sweep_at = 2;
            let mut now = Instant::now();
            let mut next_id = 0u32;
            let mut popped: Vec<(u8, u32)> = Vec::new();
            let mut flying = [0usize; DESTS as usize];
            let sizes: &mut HashMap<u32, usize> = &mut HashMap::new();
            for op in ops {
                match op {
                    Op::Push { dest, bytes } => {
                        acc.push_back(&dest, next_id, bytes, now);
                        sizes.insert(next_id, bytes);
                        next_id += 1;
                    }
                    Op::Pop { advance_ms, force } => {
                        now += Duration::from_millis(advance_ms);
                        if let Some(b) = acc.pop_ready(now, force) {
                            let n = b.items.len();
                            prop_assert!(n >= 1);
                            prop_assert!(n <= max_messages);
                            let total: usize = b.items.iter().map(|i| sizes[i]).sum();
                            prop_assert_eq!(total, b.bytes);
                            prop_assert!(total <= max_bytes || n == 1, "{} bytes in {} items", total, n);
                            let d = b.destination;
                            flying[d as usize] += 1;
                            if let Some(max) = in_flight {
                                prop_assert!(flying[d as usize] <= max);
                            }
                            popped.extend(b.items.into_iter().map(|i| (d, i)));
                        }
                    }
                    Op::Done { dest } => {
                        if flying[dest as usize] > 0 {
                            flying[dest as usize] -= 1;
                            acc.batch_done(&dest);
                        }
                    }
                }
            }
            for d in 0..DESTS { for _ in 0..flying[d as usize] { acc.batch_done(&d); } }
            while let Some(b) = acc.pop_ready(now, true) {
                let d = b.destination;
                popped.extend(b.items.into_iter().map(|i| (d, i)));
                acc.batch_done(&d);
            }
            prop_assert!(acc.is_empty());
            prop_assert_eq!(acc.bytes(), 0);
            prop_assert_eq!(popped.len() as u32, next_id, "every item comes out once");
            for d in 0..DESTS {
                let ids: Vec<u32> = popped.iter().filter(|(x, _)| *x == d).map(|(_, i)| *i).collect();
                prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "order within destination {}", d);
            }
        }
    }
}
