//! Runs with known outcomes, for tests that check what a producer reported (metrics, exports)
//! against what happened.

use std::time::Duration;

use herald_core::{ErrorClass, Message, Producer, ProducerBuilder};
use herald_retry::{Backoff, ExponentialRetry};

use crate::{CallFault, MemoryTransport};

/// A run with scripted faults and known numbers: 101 messages to destination `t`, in batches of
/// 50; the first call fails whole (transient) and the second fails its first two messages
/// (transient), so at least 52 retries; 4 `poison-*` payloads are rejected (permanent); one
/// message is too large to accept.
#[derive(Debug)]
pub struct ScriptedFaults {
    /// The transport, scripted.
    pub transport: MemoryTransport,
    /// The messages to `send_all`.
    pub messages: Vec<Message>,
}

impl ScriptedFaults {
    /// Messages the run delivers.
    pub const DELIVERED: u64 = 96;
    /// Messages rejected by the transport (permanent).
    pub const REJECTED: u64 = 4;
    /// Messages refused as too large before acceptance.
    pub const TOO_LARGE: u64 = 1;
    /// The fewest retries the run makes: the whole first batch, then two messages.
    pub const MIN_RETRIES: u64 = 52;

    /// The transport and messages, and a builder for a producer on that transport (fast
    /// retries, batches of 50, a 100-byte message limit): add telemetry or a name, then build.
    pub fn new() -> (Self, ProducerBuilder) {
        let transport = MemoryTransport::new();
        transport.reject_payload_prefix("poison");
        transport.script([
            CallFault::FailAll(ErrorClass::Transient),
            CallFault::FailSome(vec![0, 1]),
        ]);
        let builder = Producer::builder(transport.clone())
            .retry(ExponentialRetry::new(Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(50),
            )))
            .batching(herald_batch::SizeOrLinger::new(
                50,
                1 << 20,
                Duration::from_millis(2),
            ))
            .max_message_bytes(100);
        let mut messages: Vec<Message> = (0..100)
            .map(|i| {
                if i % 25 == 7 {
                    Message::new("t", format!("poison-{i}"))
                } else {
                    Message::new("t", format!("m-{i}"))
                }
            })
            .collect();
        messages.push(Message::new("t", vec![b'x'; 101]));
        (
            Self {
                transport,
                messages,
            },
            builder,
        )
    }

    /// Sends the messages through `producer` (built from [`ScriptedFaults::new`]'s builder),
    /// waits for every outcome and checks the run's known numbers: what the metrics must then
    /// show. Panics naming the number that differs.
    pub async fn run(self, producer: &Producer) {
        let report = producer.send_all(self.messages).await.wait().await;
        assert_eq!(report.delivered, Self::DELIVERED, "delivered");
        assert_eq!(
            report.failed.len() as u64,
            Self::REJECTED + Self::TOO_LARGE,
            "failed"
        );
        let retries = producer.stats().totals.retries;
        assert!(
            retries >= Self::MIN_RETRIES,
            "a whole batch of 50 failed, then 2 messages: {retries} retries"
        );
    }
}

/// Sends `signal` (`STOP`, `CONT`, ...) to the process `pid` with `kill`; panics if that fails.
/// `STOP` makes a server of a test's own hang with its sockets open: no answer, no error. For
/// `STOP` and `CONT` it returns once the process is stopped, or no longer stopped (as
/// `/proc/PID/stat` says; a signal is delivered a little after `kill` returns), within 10 s.
pub fn signal(pid: u32, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(sent, "kill -{signal} {pid}");
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the command's name, which is in parentheses.
                let after = stat.rsplit_once(')')?.1;
                after.split_whitespace().next().map(|s| s == "T")
            })
    };
    let want = match signal {
        "STOP" => true,
        "CONT" => false,
        _ => return,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stopped() != Some(want) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} not {} 10 s after kill -{signal}",
            if want { "stopped" } else { "running" }
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server that hangs with its connection open is given up. `transport` is connected
/// through `proxy` to the server process `pid`; a producer on it (quick retries, a delivery
/// timeout of 2 s, shorter than any adapter's ack timeout here) sends to `destination`; then
/// the process is stopped (`kill -STOP`, see [`signal`]), and the producer sends one message at
/// a time, each failing transiently, until herald opens another connection through the proxy
/// (within 30 s); then the process resumes, and sends go through again within 60 s. The
/// producer is closed at the end.
pub async fn a_hung_server_is_given_up(
    transport: impl herald_core::Transport,
    destination: &herald_core::Destination,
    proxy: &crate::proxy::FaultProxy,
    pid: u32,
) {
    use tokio::time::Instant;
    let p = Producer::builder(transport)
        .retry(
            ExponentialRetry::new(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(500),
            ))
            .unlimited_attempts(),
        )
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .expect("producer");
    p.send(Message::new(destination.clone(), "before"))
        .await
        .expect("before the hang");
    let connections = proxy.accepted();
    signal(pid, "STOP");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failed = 0;
    while proxy.accepted() == connections {
        assert!(
            Instant::now() < deadline,
            "the silent connection is still in use after 30 s ({failed} sends failed)"
        );
        // A publish the server took just before it stopped may still be answered.
        if let Err(e) = p
            .send(Message::new(destination.clone(), format!("hung-{failed}")))
            .await
        {
            assert_eq!(e.class(), ErrorClass::Transient, "{e}");
            failed += 1;
        }
    }
    // The hang was real: a send met it (else the new connection proves nothing).
    assert!(failed > 0, "no send failed while the server was stopped");
    signal(pid, "CONT");
    // Back: sends go through again (the first may still meet the connection opened while it
    // hung).
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = p.send(Message::new(destination.clone(), "after")).await {
        assert!(
            Instant::now() < deadline,
            "still failing 60 s after the server came back: {e}"
        );
    }
    p.close(Duration::from_secs(10)).await;
}
