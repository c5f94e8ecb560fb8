//! The input lines handed to the producer whose fates the collector has not taken yet, kept
//! when the dead-letter file is written in input order (see `Engine::start`): each with a copy
//! of its message (`None` for a malformed line), and which of them comes first.
//!
//! Two or three operations per message on the command's hot path, so the structure is chosen
//! for them. Lines come in input order and mostly end in it, so the copies sit in a window
//! indexed by line from the first outstanding one on: adding is a push at the back, ending a
//! line is an index, and the first outstanding line is at the front once the ended ones there
//! are popped; memory is touched in order. A `BTreeMap` took about 1 500 instructions a message
//! for the same (callgrind, `herald produce` of 200 000 lines to Kafka), and a hash map, though
//! cheaper in instructions, made the command slower (its accesses are scattered over a table
//! of megabytes: 0.90-1.00 M msgs/s against the `BTreeMap`'s 1.04-1.10 M, alternating runs).
//!
//! Memory: one slot per line from the first outstanding one to the last handed over. A line
//! that stays outstanding while many after it end (a message stuck in retries) would make that
//! window grow with ended lines, so once ended slots outnumber live ones by far, the live ones
//! move to an ordered map of stragglers and the window starts afresh: at most about two slots
//! per outstanding line, whatever stays stuck.

use std::collections::{BTreeMap, VecDeque};

use herald::Message;

/// Ended slots a window may hold beyond twice its live ones before its live ones move out.
const SLACK: usize = 4096;

#[derive(Default)]
pub(crate) struct Outstanding {
    /// One slot per line from `base` on: `Some(copy)` while outstanding (the copy is `None`
    /// for a malformed line), `None` once ended, or for a line never handed over (a blank line
    /// skipped). The front slot, if any, is outstanding.
    window: VecDeque<Option<Option<Message>>>,
    /// The line of `window[0]`.
    base: u64,
    /// Outstanding lines in the window.
    live: usize,
    /// Outstanding lines below the window: moved out of a window that was mostly ended.
    stragglers: BTreeMap<u64, Option<Message>>,
}

impl Outstanding {
    /// Line `line` was handed over, with a copy of its message (`None`: a malformed line).
    /// Lines come in input order (one below the window, not expected, is kept apart).
    pub(crate) fn add(&mut self, line: u64, copy: Option<Message>) {
        if self.window.is_empty() {
            self.base = line;
        }
        if line < self.base {
            self.stragglers.insert(line, copy);
            return;
        }
        if self.window.len() > 2 * self.live + SLACK {
            self.move_out_stragglers();
            self.base = line;
        }
        let at = usize::try_from(line - self.base).expect("a window of lines that fits in memory");
        if self.window.len() <= at {
            self.window.resize_with(at + 1, || None);
        }
        if self.window[at].replace(copy).is_none() {
            self.live += 1;
        }
    }

    /// The fate of line `line` is in: its copy goes.
    pub(crate) fn end(&mut self, line: u64) {
        let slot = line
            .checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| self.window.get_mut(at));
        match slot {
            Some(slot) => {
                if slot.take().is_some() {
                    self.live -= 1;
                }
                while self.window.front().is_some_and(Option::is_none) {
                    self.window.pop_front();
                    self.base += 1;
                }
            }
            None => {
                self.stragglers.remove(&line);
            }
        }
    }

    /// The first line still outstanding, if any.
    pub(crate) fn first(&self) -> Option<u64> {
        let in_window = (!self.window.is_empty()).then_some(self.base);
        self.stragglers.keys().next().copied().or(in_window)
    }

    /// Every line still outstanding with its copy, in input order; none is left.
    pub(crate) fn take(&mut self) -> Vec<(u64, Option<Message>)> {
        self.move_out_stragglers();
        std::mem::take(&mut self.stragglers).into_iter().collect()
    }

    /// Moves the window's outstanding lines to the stragglers and empties it.
    fn move_out_stragglers(&mut self) {
        let base = self.base;
        for (at, slot) in self.window.drain(..).enumerate() {
            if let Some(copy) = slot {
                self.stragglers.insert(base + at as u64, copy);
            }
        }
        self.live = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(line: u64) -> Option<Message> {
        Some(Message::new("t", format!("m-{line}")))
    }

    fn lines(taken: &[(u64, Option<Message>)]) -> Vec<u64> {
        taken.iter().map(|(line, _)| *line).collect()
    }

    #[test]
    fn the_first_outstanding_line_follows_the_ends() {
        let mut o = Outstanding::default();
        assert_eq!(o.first(), None);
        for line in 1..=200 {
            o.add(line, msg(line));
        }
        assert_eq!(o.first(), Some(1));
        for line in (2..=150).rev() {
            o.end(line);
        }
        assert_eq!(o.first(), Some(1), "line 1 still holds the rest back");
        o.end(1);
        assert_eq!(o.first(), Some(151), "past the lines that ended before it");
        o.end(151);
        o.end(151);
        assert_eq!(
            o.first(),
            Some(152),
            "a second end of a line changes nothing"
        );
        for line in 152..=200 {
            o.end(line);
        }
        assert_eq!(o.first(), None);
        assert!(o.window.is_empty());
        o.add(201, None);
        assert_eq!(o.first(), Some(201), "after the window emptied");
    }

    #[test]
    fn gaps_between_lines_and_a_line_below_the_window_are_kept() {
        let mut o = Outstanding::default();
        o.add(1_000, msg(1_000));
        o.add(5_000, None);
        o.end(1_000);
        assert_eq!(
            o.first(),
            Some(5_000),
            "the blank lines between were never outstanding"
        );
        o.add(7, msg(7));
        assert_eq!(o.first(), Some(7));
        o.end(7);
        assert_eq!(o.first(), Some(5_000));
        assert_eq!(lines(&o.take()), [5_000]);
    }

    #[test]
    fn a_stuck_line_does_not_make_the_window_grow_with_the_lines_ended_after_it() {
        let mut o = Outstanding::default();
        o.add(1, msg(1));
        let n = 10 * SLACK as u64;
        for line in 2..n {
            o.add(line, msg(line));
            o.end(line);
            assert!(
                o.window.len() <= 2 * o.live + SLACK + 1,
                "line {line}: {} slots for {} outstanding",
                o.window.len(),
                o.live
            );
        }
        assert_eq!(o.first(), Some(1), "the stuck line is still first");
        o.add(n, msg(n));
        assert_eq!(lines(&o.take()), [1, n]);
        assert_eq!(o.first(), None);
    }

    #[test]
    fn what_is_taken_comes_in_input_order_with_its_copy() {
        let mut o = Outstanding::default();
        for line in [3, 9, 64, 70, 200] {
            o.add(line, if line == 9 { None } else { msg(line) });
        }
        o.add(2, msg(2));
        o.end(64);
        let taken = o.take();
        assert_eq!(lines(&taken), [2, 3, 9, 70, 200]);
        assert!(taken[2].1.is_none(), "the malformed line has no copy");
        assert_eq!(
            taken[3].1.as_ref().map(|m| m.payload().clone()),
            Some(herald::Bytes::from_static(b"m-70"))
        );
        assert_eq!(o.first(), None, "nothing is left");
    }
}
