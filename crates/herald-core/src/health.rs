//! How a producer is doing, in one word and its reasons: what `/health` serves and what alerts
//! and load balancers act on.
//!
//! A producer evaluates its health every [`HealthPolicy::interval`] (and at once when its
//! circuit breaker changes state or it closes), publishes it on a watch channel
//! ([`crate::Producer::health_watch`]) and as the `herald_health_status` gauge.
//! [`crate::Producer::health`] evaluates it on demand.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// The one-word verdict. Ordered: `Healthy < Degraded < Unhealthy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum HealthStatus {
    /// Sending works.
    #[default]
    Healthy,
    /// Sending works, with trouble an operator should look at: messages wait or fail more than
    /// they should. Load balancers keep sending traffic.
    Degraded,
    /// Sending does not work now (circuit open, broker connection down) or the producer is
    /// closed. Load balancers should stop sending traffic.
    Unhealthy,
}

impl HealthStatus {
    /// `healthy`, `degraded` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }

    /// The value of the `herald_health_status` gauge: 0, 1 or 2.
    pub fn as_gauge(self) -> f64 {
        match self {
            HealthStatus::Healthy => 0.0,
            HealthStatus::Degraded => 1.0,
            HealthStatus::Unhealthy => 2.0,
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a transport knows about its connection to the broker ([`crate::Transport::health`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TransportHealth {
    /// Connected, or nothing known against it.
    #[default]
    Up,
    /// Connected, but the broker refuses to take messages for now (RabbitMQ's
    /// `connection.blocked` under a memory or disk alarm). The text says why; no secrets.
    Blocked(String),
    /// No usable connection to the broker. The text says which and why; no secrets.
    Down(String),
}

/// One reason a producer is not healthy.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HealthIssue {
    /// The circuit breaker is open: batches are held back after repeated transient failures.
    /// Unhealthy.
    CircuitOpen,
    /// The circuit breaker is probing whether the broker is back. Degraded.
    CircuitHalfOpen,
    /// The transport has no usable connection. Unhealthy.
    TransportDown(String),
    /// The broker blocks publishing. Degraded.
    BrokerBlocked(String),
    /// The buffer is filling up: senders will soon wait (or `try_send` fail). Degraded.
    BufferHighWater {
        /// Messages buffered.
        messages: usize,
        /// The buffer's limit in messages.
        max_messages: usize,
        /// Bytes buffered.
        bytes: usize,
        /// The buffer's limit in bytes.
        max_bytes: usize,
    },
    /// The producer's [store](crate::Store) (the spool) is filling up: once full, senders wait
    /// (or `try_send` fails). Degraded.
    StoreHighWater {
        /// Messages stored and not yet ended.
        pending_messages: u64,
        /// Bytes the store takes.
        used_bytes: u64,
        /// Its size limit.
        max_bytes: u64,
    },
    /// Too many accepted messages failed over the recent window: degraded at
    /// [`HealthPolicy::degraded_error_rate`], unhealthy at [`HealthPolicy::unhealthy_error_rate`].
    /// Messages refused before acceptance (a full buffer under `try_send`, too large, closed)
    /// are backpressure or caller mistakes and do not count.
    ErrorRate {
        /// Messages that failed in the window.
        failed: u64,
        /// Messages that ended (delivered or failed) in the window.
        ended: u64,
        /// The window it was measured over.
        window: Duration,
        /// The verdict this rate gives.
        status: HealthStatus,
    },
    /// The producer is closing or closed. Unhealthy.
    Closed,
    /// The producer's dispatcher task ended although the producer was not closed (its runtime
    /// shut down or dropped the task, or a fault in herald panicked it): nothing is sent any
    /// more, and what was pending has been handed back as
    /// [`FailureReason::Closed`](crate::FailureReason::Closed). Unhealthy, and not live: a
    /// liveness probe should restart the process.
    PipelineStopped,
}

impl HealthIssue {
    /// How bad this issue alone is.
    pub fn status(&self) -> HealthStatus {
        match self {
            HealthIssue::CircuitOpen
            | HealthIssue::TransportDown(_)
            | HealthIssue::Closed
            | HealthIssue::PipelineStopped => HealthStatus::Unhealthy,
            HealthIssue::CircuitHalfOpen
            | HealthIssue::BrokerBlocked(_)
            | HealthIssue::BufferHighWater { .. }
            | HealthIssue::StoreHighWater { .. } => HealthStatus::Degraded,
            HealthIssue::ErrorRate { status, .. } => *status,
        }
    }

    /// A stable, machine-readable name: `circuit_open`, `circuit_half_open`, `transport_down`,
    /// `broker_blocked`, `buffer_high_water`, `store_high_water`, `error_rate`, `closed`,
    /// `pipeline_stopped`.
    pub fn code(&self) -> &'static str {
        match self {
            HealthIssue::CircuitOpen => "circuit_open",
            HealthIssue::CircuitHalfOpen => "circuit_half_open",
            HealthIssue::TransportDown(_) => "transport_down",
            HealthIssue::BrokerBlocked(_) => "broker_blocked",
            HealthIssue::BufferHighWater { .. } => "buffer_high_water",
            HealthIssue::StoreHighWater { .. } => "store_high_water",
            HealthIssue::ErrorRate { .. } => "error_rate",
            HealthIssue::Closed => "closed",
            HealthIssue::PipelineStopped => "pipeline_stopped",
        }
    }
}

impl fmt::Display for HealthIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthIssue::CircuitOpen => f.write_str(
                "circuit breaker open after repeated transient failures: batches are held back",
            ),
            HealthIssue::CircuitHalfOpen => {
                f.write_str("circuit breaker half-open: probing whether the broker is back")
            }
            HealthIssue::TransportDown(why) => write!(f, "broker connection down: {why}"),
            HealthIssue::BrokerBlocked(why) => write!(f, "broker blocks publishing: {why}"),
            HealthIssue::BufferHighWater {
                messages,
                max_messages,
                bytes,
                max_bytes,
            } => write!(
                f,
                "buffer above its high-water mark: {messages} of {max_messages} messages, {bytes} of {max_bytes} bytes"
            ),
            HealthIssue::StoreHighWater {
                pending_messages,
                used_bytes,
                max_bytes,
            } => write!(
                f,
                "store (spool) above its high-water mark: {used_bytes} of {max_bytes} bytes, {pending_messages} messages pending"
            ),
            HealthIssue::ErrorRate {
                failed,
                ended,
                window,
                ..
            } => write!(
                f,
                "{failed} of {ended} messages failed in the last {:?} ({:.1} %)",
                window,
                100.0 * *failed as f64 / (*ended).max(1) as f64
            ),
            HealthIssue::Closed => f.write_str("producer closing or closed"),
            HealthIssue::PipelineStopped => f.write_str(
                "the producer's dispatcher task ended without a close: nothing is sent any more",
            ),
        }
    }
}

/// A producer's health: the worst status of its issues, and the issues.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Health {
    /// The verdict: the worst of `issues`, or healthy when there are none.
    pub status: HealthStatus,
    /// Everything wrong now, worst first.
    pub issues: Vec<HealthIssue>,
    /// Where the producer sends now, as its transport says ([`crate::Transport::endpoint`]):
    /// the broker node in use, for example.
    pub endpoint: Option<String>,
}

impl Health {
    /// Health from its issues.
    pub fn from_issues(mut issues: Vec<HealthIssue>) -> Self {
        issues.sort_by_key(|i| std::cmp::Reverse(i.status()));
        let status = issues
            .iter()
            .map(HealthIssue::status)
            .max()
            .unwrap_or_default();
        Self {
            status,
            issues,
            endpoint: None,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.status.as_str())?;
        for (i, issue) in self.issues.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// When a producer counts as degraded or unhealthy. Set with
/// [`crate::ProducerBuilder::health`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthPolicy {
    /// Degraded when the buffer holds more than this share of its message or byte limit, or
    /// the producer's store (the spool) more than this share of its size limit. Default 0.8.
    pub buffer_high_water: f64,
    /// Degraded when at least this share of the messages that ended in the window failed.
    /// Default 0.05.
    pub degraded_error_rate: f64,
    /// Unhealthy when at least this share failed. Default 0.5.
    pub unhealthy_error_rate: f64,
    /// The window error rates are measured over. Default 60 s.
    pub error_window: Duration,
    /// No error-rate verdict from fewer messages than this in the window. Default 20.
    pub min_messages: u64,
    /// How often health is evaluated and published. Default 1 s.
    pub interval: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            buffer_high_water: 0.8,
            degraded_error_rate: 0.05,
            unhealthy_error_rate: 0.5,
            error_window: Duration::from_secs(60),
            min_messages: 20,
            interval: Duration::from_secs(1),
        }
    }
}

impl HealthPolicy {
    /// Names the first setting that cannot work.
    pub(crate) fn check(&self) -> Result<(), String> {
        let share = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(format!("health: {name} must be in (0, 1], got {v}"))
            }
        };
        share("buffer_high_water", self.buffer_high_water)?;
        share("degraded_error_rate", self.degraded_error_rate)?;
        share("unhealthy_error_rate", self.unhealthy_error_rate)?;
        if self.unhealthy_error_rate < self.degraded_error_rate {
            return Err(format!(
                "health: unhealthy_error_rate ({}) is below degraded_error_rate ({})",
                self.unhealthy_error_rate, self.degraded_error_rate
            ));
        }
        if self.interval > self.error_window {
            return Err(format!(
                "health: interval ({:?}) is longer than error_window ({:?}): the error rate would be measured over the interval",
                self.interval, self.error_window
            ));
        }
        if self.error_window.is_zero() || self.interval.is_zero() {
            return Err("health: error_window and interval must be above zero".into());
        }
        if self.error_window > Duration::from_secs(24 * 3600)
            || self.interval > Duration::from_secs(3600)
        {
            return Err("health: error_window is at most a day, interval at most an hour".into());
        }
        Ok(())
    }
}

/// Totals sampled over time, to measure the error rate over a sliding window.
#[derive(Debug, Default)]
pub(crate) struct ErrorWindow {
    /// (time, delivered, failed), oldest first; the first is at or before the window's start.
    samples: VecDeque<(Instant, u64, u64)>,
}

impl ErrorWindow {
    /// A window for a producer built at `start`, when nothing had ended yet.
    pub(crate) fn starting(start: Instant) -> Self {
        Self {
            samples: VecDeque::from([(start, 0, 0)]),
        }
    }

    /// Records the running totals at `now` and returns (failed, ended) over the window.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        delivered: u64,
        failed: u64,
        window: Duration,
    ) -> (u64, u64) {
        let start = now.checked_sub(window);
        while let (Some(start), Some(second)) = (start, self.samples.get(1)) {
            if second.0 > start {
                break;
            }
            self.samples.pop_front();
        }
        // About 32 samples per window, however often health is read.
        let step = window / 32;
        if self
            .samples
            .back()
            .is_none_or(|last| now.saturating_duration_since(last.0) >= step)
        {
            self.samples.push_back((now, delivered, failed));
        }
        let Some(&(_, d0, f0)) = self.samples.front() else {
            return (0, 0);
        };
        let failed = failed.saturating_sub(f0);
        (failed, delivered.saturating_sub(d0) + failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_the_worst_issue_and_issues_come_worst_first() {
        assert_eq!(Health::from_issues(vec![]).status, HealthStatus::Healthy);
        let h = Health::from_issues(vec![
            HealthIssue::CircuitHalfOpen,
            HealthIssue::TransportDown("127.0.0.1:9: refused".into()),
        ]);
        assert_eq!(h.status, HealthStatus::Unhealthy);
        assert_eq!(h.issues[0].code(), "transport_down");
        assert_eq!(
            h.to_string(),
            "unhealthy: broker connection down: 127.0.0.1:9: refused; circuit breaker half-open: probing whether the broker is back"
        );
    }

    #[test]
    fn the_error_window_forgets_what_is_older_than_the_window() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let mut e = ErrorWindow::default();
        assert_eq!(e.observe(t0, 0, 0, w), (0, 0));
        assert_eq!(
            e.observe(t0 + Duration::from_secs(10), 90, 10, w),
            (10, 100)
        );
        // 70 s in: the sample at 0 s is older than the window; the one at 10 s is its start.
        assert_eq!(
            e.observe(t0 + Duration::from_secs(70), 190, 10, w),
            (0, 100)
        );
        // Read often, it keeps a bounded number of samples.
        for i in 0..10_000u64 {
            e.observe(
                t0 + Duration::from_secs(70) + Duration::from_millis(i),
                190,
                10,
                w,
            );
        }
        assert!(e.samples.len() <= 40, "{}", e.samples.len());
    }

    #[test]
    fn policies_that_cannot_work_are_named() {
        assert!(HealthPolicy::default().check().is_ok());
        let e = HealthPolicy {
            buffer_high_water: 0.0,
            ..HealthPolicy::default()
        }
        .check()
        .expect_err("invalid");
        assert!(e.contains("buffer_high_water"), "{e}");
        let e = HealthPolicy {
            degraded_error_rate: 0.6,
            ..HealthPolicy::default()
        }
        .check()
        .expect_err("invalid");
        assert!(e.contains("unhealthy_error_rate"), "{e}");
        let e = HealthPolicy {
            interval: Duration::from_secs(120),
            ..HealthPolicy::default()
        }
        .check()
        .expect_err("invalid");
        assert!(e.contains("interval"), "{e}");
    }
}
