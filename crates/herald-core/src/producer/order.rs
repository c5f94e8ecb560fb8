//! The ordering rule, in one place: what strict ordering asks of the accumulator, and where.
//!
//! Strict ordering keeps the messages of one destination and key in acceptance order, retries
//! included. It takes three gates, each applied here and nowhere else:
//! - **one batch in flight per destination** ([`OrderingMode::in_flight_per_destination`], given
//!   to the accumulator when the producer is built);
//! - **a destination with retries waiting is held**: nothing of it goes out until they are
//!   queued again ([`OrderingMode::retries_parked`], when a batch lands with retries);
//! - **retries go back in front, whole, and release the hold** ([`OrderingMode::requeue`]), or
//!   the hold is released when they end without being queued again (expired or abandoned:
//!   [`OrderingMode::retries_ended`]).
//!
//! Within a batch, the per-key hold ([`crate::KeyHold`]) keeps a message delivered after a
//! transient failure of its key from staying ahead of that message's retry
//! ([`OrderingMode::hold_keys`]).
//!
//! Relaxed ordering takes none of them: batches of a destination go out concurrently and
//! retries rejoin the back of the queue.

use std::time::Instant;

use herald_batch::Accumulator;

use super::state::Entry;
use crate::error::TransportError;
use crate::key_hold::KeyHold;
use crate::message::{Destination, Message};
use crate::transport::Ack;

/// How strictly the producer keeps order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingMode {
    /// Messages with the same destination and key reach the broker in the order they were
    /// accepted, retries included. Per destination, one batch is in flight at a time and a
    /// retried message goes out before anything accepted after it.
    #[default]
    Strict,
    /// Batches of one destination go out concurrently (up to the producer's max in-flight) and
    /// retried messages rejoin the back of the queue: more throughput under faults, no order
    /// guarantee.
    Relaxed,
}

type Queue = Accumulator<Destination, Entry>;

impl OrderingMode {
    /// The accumulator's limit of batches in flight per destination.
    pub(crate) fn in_flight_per_destination(self) -> Option<usize> {
        match self {
            OrderingMode::Strict => Some(1),
            OrderingMode::Relaxed => None,
        }
    }

    /// A batch of `destination` landed with messages to retry, now parked for their backoff.
    pub(crate) fn retries_parked(self, acc: &mut Queue, destination: &Destination) {
        if self == OrderingMode::Strict {
            acc.hold(destination);
        }
    }

    /// Parked retries of `destination` go back into its queue.
    pub(crate) fn requeue(
        self,
        acc: &mut Queue,
        destination: &Destination,
        entries: Vec<Entry>,
        now: Instant,
    ) {
        let sized = entries.into_iter().map(|e| {
            let size = e.1.size;
            (e, size)
        });
        match self {
            OrderingMode::Strict => {
                acc.push_front(destination, sized.collect::<Vec<_>>(), now);
                acc.release(destination);
            }
            OrderingMode::Relaxed => {
                for (e, size) in sized {
                    acc.push_back(destination, e, size, now);
                }
            }
        }
    }

    /// The per-key hold ([`KeyHold::apply`]) on a batch's outcomes: under strict ordering, a
    /// message delivered after a transient failure of its key in the same batch is sent again
    /// behind that message's retry. Relaxed ordering promises no order, so it keeps the
    /// delivery.
    pub(crate) fn hold_keys(self, batch: &[Message], outcomes: &mut [Result<Ack, TransportError>]) {
        if self == OrderingMode::Strict {
            KeyHold::apply(batch, outcomes);
        }
    }

    /// Parked retries of `destination` ended without going back into its queue (their
    /// deadline passed, or a close abandoned them).
    pub(crate) fn retries_ended(self, acc: &mut Queue, destination: &Destination) {
        if self == OrderingMode::Strict {
            acc.release(destination);
        }
    }
}
