//! What the adapters' real-broker tests share: waiting on a condition with a deadline, a free
//! port for a server of the test's own, and the check that a run lost nothing and kept per-key
//! order of first copies.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_core::Message;
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
