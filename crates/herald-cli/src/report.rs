//! How results are shown: numbers for people, and the `--report json` line for programs.

use std::time::Duration;

use serde_json::Value;

/// `--report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReportFormat {
    /// A summary for people.
    Text,
    /// The summary, then one JSON object on the last line of stdout.
    Json,
}

/// Process exit statuses (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Every message was acknowledged.
    Ok = 0,
    /// Some messages failed or input lines were malformed: all are in the dead-letter file
    /// (messages a spool kept for the next run excepted).
    Failed = 1,
    /// A usage or configuration error: nothing was sent.
    Usage = 2,
    /// Input could not be read to its end, or the dead-letter file could not be written.
    Io = 3,
    /// Interrupted (Ctrl-C): what was read and not acknowledged is in the dead-letter file (with
    /// a spool: still in the spool, for the next run).
    Interrupted = 130,
}

impl Exit {
    pub(crate) fn code(self) -> u8 {
        self as u8
    }
}

/// `1 234 567`: digits grouped by thousands.
pub(crate) fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// Messages per second, or 0 for an empty interval.
pub(crate) fn rate(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// `12.3 ms`, `1.52 s`, `850 µs`.
pub(crate) fn duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Milliseconds as a JSON number (three decimals), or null.
pub(crate) fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        Value::from((d.as_secs_f64() * 1e6).round() / 1e3)
    })
}

/// Seconds or a rate rounded to three decimals, as JSON.
pub(crate) fn num(x: f64) -> Value {
    Value::from((x * 1e3).round() / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1 000");
        assert_eq!(count(200_000), "200 000");
        assert_eq!(count(1_234_567), "1 234 567");
        assert_eq!(duration(Duration::from_micros(850)), "850 µs");
        assert_eq!(duration(Duration::from_micros(12_345)), "12.3 ms");
        assert_eq!(duration(Duration::from_millis(1_520)), "1.52 s");
        assert_eq!(ms(None), Value::Null);
        assert_eq!(ms(Some(Duration::from_micros(1_500))), Value::from(1.5));
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert_eq!(rate(10, Duration::from_secs(2)), 5.0);
        assert_eq!(Exit::Interrupted.code(), 130);
    }
}
