//! The input lines handed to the producer whose fates the collector has not taken yet, kept
//! when the dead-letter file is written in input order (see `Engine::start`): each with a copy
//! of its message (`None` for a malformed line), and which of them comes first.
//!
//! Two or three operations per message on the command's hot path, so the structure is chosen
//! for them: a hash map of the copies (insert, remove), and one bit per line in a window from
//! the first outstanding line on, which gives that first line without a sorted map. A
//! `BTreeMap` did both at about 1 700 instructions a message (callgrind, `herald produce` of
//! 200 000 lines to Kafka), a sixth of the command's work per message.
//!
//! Memory: the copies of the outstanding lines (what the producer holds: its buffer bounds
//! it), and one bit per line from the first outstanding one to the last handed over (a line
//! stuck for two minutes behind a million lines a second costs 15 MB).

use std::collections::{HashMap, VecDeque};

use herald::Message;

type Copies = HashMap<u64, Option<Message>, foldhash::fast::FixedState>;

#[derive(Default)]
pub(crate) struct Outstanding {
    copies: Copies,
    /// One bit per line from `base` on, set while that line is outstanding.
    bits: VecDeque<u64>,
    /// The line of the lowest bit of `bits[0]`, a multiple of 64.
    base: u64,
}

impl Outstanding {
    /// Line `line` was handed over, with a copy of its message (`None`: a malformed line).
    /// Lines come in input order; one below the window (not expected) widens it.
    pub(crate) fn add(&mut self, line: u64, copy: Option<Message>) {
        if self.bits.is_empty() {
            self.base = line & !63;
        }
        while line < self.base {
            self.bits.push_front(0);
            self.base -= 64;
        }
        let at = line - self.base;
        let word = usize::try_from(at / 64).expect("a window of lines that fits in memory");
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << (at % 64);
        self.copies.insert(line, copy);
    }

    /// The fate of line `line` is in: its copy goes.
    pub(crate) fn end(&mut self, line: u64) {
        if self.copies.remove(&line).is_none() {
            return;
        }
        // Its bit is set, so its word is still in the window (only empty words leave).
        let at = line - self.base;
        self.bits[(at / 64) as usize] &= !(1 << (at % 64));
    }

    /// The first line still outstanding, if any.
    pub(crate) fn first(&mut self) -> Option<u64> {
        while self.bits.front() == Some(&0) {
            self.bits.pop_front();
            self.base += 64;
        }
        let word = *self.bits.front()?;
        Some(self.base + u64::from(word.trailing_zeros()))
    }

    /// Every line still outstanding with its copy, in input order; none is left.
    pub(crate) fn take(&mut self) -> Vec<(u64, Option<Message>)> {
        let mut all: Vec<_> = self.copies.drain().collect();
        all.sort_unstable_by_key(|(line, _)| *line);
        self.bits.clear();
        all
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
    fn the_first_outstanding_line_follows_the_ends_across_words() {
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
        assert_eq!(o.first(), Some(151), "past two whole words of ended lines");
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
        assert_eq!(o.copies.len(), 2);
    }

    #[test]
    fn what_is_taken_comes_in_input_order_with_its_copy() {
        let mut o = Outstanding::default();
        for line in [3, 70, 9, 64, 200] {
            o.add(line, if line == 9 { None } else { msg(line) });
        }
        o.end(64);
        let taken = o.take();
        assert_eq!(lines(&taken), [3, 9, 70, 200]);
        assert!(taken[1].1.is_none(), "the malformed line has no copy");
        assert_eq!(
            taken[2].1.as_ref().map(|m| m.payload().clone()),
            Some(bytes_of("m-70"))
        );
        assert_eq!(o.first(), None, "nothing is left");
    }

    fn bytes_of(s: &'static str) -> herald::Bytes {
        herald::Bytes::from_static(s.as_bytes())
    }
}
