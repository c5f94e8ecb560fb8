//! What the adapters' real-broker tests share: waiting on a condition with a deadline, a free
//! port for a server of the test's own, a run sent in parts around a fault, and the check that
//! a run lost nothing and kept per-key order of first copies.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_core::{BulkReceipt, Message, Producer};
use tokio::time::Instant;

/// Waits until `cond` holds, checking every 20 ms; panics, naming `what`, after `within`.
pub async fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port on 127.0.0.1 that nothing listens on now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A run sent in parts, each only when the test sends it: a fault (a cut, a restart) made
/// between two parts comes in the middle of the run however fast the parts before it went.
/// Sent at once, a run can be delivered whole (or sit whole in the client's queue, flushed in
/// a burst) between two looks at a counter, so that a fault meant for its middle comes after
/// its end: on a fast broker a whole run takes a tenth of a second, and a loaded machine can
/// hold a test's thread for that long.
#[derive(Debug)]
pub struct RunInParts<'a> {
    producer: &'a Producer,
    parts: std::slice::Chunks<'a, Message>,
    receipts: Vec<BulkReceipt>,
    sent: usize,
    total: usize,
    /// How many messages the last part sent held.
    last_len: usize,
}

impl<'a> RunInParts<'a> {
    /// `msgs` in `parts` parts of (nearly) equal size, nothing sent yet.
    pub fn new(producer: &'a Producer, msgs: &'a [Message], parts: usize) -> Self {
        let size = msgs.len().div_ceil(parts.max(1)).max(1);
        Self {
            producer,
            parts: msgs.chunks(size),
            receipts: Vec::new(),
            sent: 0,
            total: msgs.len(),
            last_len: 0,
        }
    }

    /// Sends the next part (panics if none is left); returns how many messages are sent so far.
    pub async fn send_next(&mut self) -> usize {
        let part = self.parts.next().expect("a part left to send");
        self.receipts
            .push(self.producer.send_all(part.to_vec()).await);
        self.last_len = part.len();
        self.sent += part.len();
        self.sent
    }

    /// Waits (up to `within`, looking every millisecond) until a message of the last part sent
    /// has ended: the connection carries that part, and a fault made now finds nearly all of it
    /// outstanding (a look every 20 ms could find a small part done).
    pub async fn wait_flowing(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let last = self.receipts.last().expect("a part sent");
        while last.pending() >= self.last_len {
            assert!(
                Instant::now() < deadline,
                "nothing delivered within {within:?} of sending part of a run ({} sent)",
                self.sent
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Messages sent so far and not yet delivered or failed: those a fault made now finds
    /// outstanding.
    pub fn outstanding(&self) -> usize {
        self.receipts.iter().map(BulkReceipt::pending).sum()
    }

    /// Sends what is left, waits (up to `within`) for every message's fate and asserts that
    /// all were delivered (naming how many failed, and the first).
    pub async fn finish(mut self, within: Duration) {
        while self.parts.len() > 0 {
            self.send_next().await;
        }
        let deadline = Instant::now() + within;
        let (mut delivered, mut failed) = (0, Vec::new());
        for receipt in self.receipts {
            let report = tokio::time::timeout_at(deadline, receipt.wait())
                .await
                .expect("the run ends");
            delivered += report.delivered;
            failed.extend(report.failed);
        }
        assert!(
            failed.is_empty(),
            "{} failed, first: {:?}",
            failed.len(),
            failed.first()
        );
        assert_eq!(delivered, self.total as u64);
    }
}

/// The connection-cut tests' run: `msgs` in three parts; once each of the first two is being
/// delivered, every connection through `proxy` is cut (a close, then a reset; new connections
/// are refused for half a second), and the next part goes only once `lost` has held (the
/// transport saw the loss: `|| true` where it cannot tell) and a new connection came through
/// the proxy (deliveries counted after a cut can be answers that came before it, and a cut
/// while none is open cuts nothing). Then waits (up to `within`) for every message, asserts
/// that all were delivered, that the proxy cut twice and saw a new connection after each cut,
/// and that both cuts found messages outstanding, and returns how many. `proxy` must not have
/// cut before.
pub async fn cut_twice_mid_run(
    producer: &Producer,
    msgs: &[Message],
    proxy: &crate::proxy::FaultProxy,
    lost: impl Fn() -> bool,
    within: Duration,
) -> Vec<usize> {
    let mut run = RunInParts::new(producer, msgs, 3);
    let mut outstanding = Vec::new();
    for round in 0..2 {
        run.send_next().await;
        run.wait_flowing(within).await;
        let accepted = proxy.accepted();
        if round == 0 {
            proxy.cut_for(Duration::from_millis(500));
        } else {
            proxy.reset_for(Duration::from_millis(500));
        }
        outstanding.push(run.outstanding());
        wait_for(
            Duration::from_secs(5),
            "the transport to see the loss",
            &lost,
        )
        .await;
        wait_for(within, "a new connection after the cut", || {
            proxy.accepted() > accepted
        })
        .await;
    }
    run.finish(within).await;
    assert_eq!(proxy.cuts(), 2);
    assert!(proxy.accepted() >= 3, "a new connection after each cut");
    assert!(
        outstanding.iter().all(|&n| n > 0),
        "both cuts came with messages outstanding: {outstanding:?}"
    );
    outstanding
}

/// Per key, the positions (in `sent`) of the first copy of each message that arrived, in
/// arrival order; asserts they increase, and that every message arrived. Messages are told
/// apart by payload, so `sent` must hold distinct payloads, each with a key.
pub fn assert_complete_in_key_order(what: &str, sent: &[Message], got: &[Message]) {
    let position: HashMap<&[u8], usize> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.payload().as_ref(), i))
        .collect();
    let mut seen = HashSet::new();
    let mut last: HashMap<Vec<u8>, usize> = HashMap::new();
    for m in got {
        let Some(&i) = position.get(m.payload().as_ref()) else {
            panic!("{what}: a message that was never sent arrived");
        };
        if seen.insert(i) {
            let key = m.key().expect("every message has a key").to_vec();
            assert_eq!(
                Some(&key[..]),
                sent[i].key().map(|k| k.as_ref()),
                "{what}: key as sent"
            );
            if let Some(prev) = last.insert(key, i) {
                assert!(
                    prev < i,
                    "{what}: per-key order: #{i} first arrived after #{prev}"
                );
            }
        }
    }
    assert_eq!(
        seen.len(),
        sent.len(),
        "{what}: nothing lost ({} arrivals)",
        got.len()
    );
}

/// A transport whose first connection attempt just failed (its server unreachable for a
/// while): its health is `Down` with a diagnosis now, and turns `Up` by itself, without
/// traffic, as a producer reads it (polled every 200 ms), within 30 s, connected to
/// `endpoint`.
pub async fn down_then_up_without_traffic(t: &dyn herald_core::Transport, endpoint: &str) {
    use herald_core::TransportHealth;
    assert!(
        matches!(t.health(), TransportHealth::Down(_)),
        "{:?}",
        t.health()
    );
    assert!(t.diagnosis().is_some(), "no diagnosis while down");
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.health() != TransportHealth::Up {
        assert!(
            Instant::now() < deadline,
            "still {:?} long after the server came back",
            t.health()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(t.endpoint().as_deref(), Some(endpoint));
}
