//! One connection at a time to one server of a list: opened on demand, given up when lost, and
//! opened again in rounds (every server once, from the one after the lost one), with the
//! reconnect backoff between rounds that found none. A dial cut off by its caller (a batch
//! whose time ran out before the connect timeout) counts as a failed attempt, and the next
//! call starts at the server after it. The rule every adapter with a server list keeps; what
//! is logged and counted on the way stays the adapter's ([`Dialer`]).

use std::future::Future;
use std::time::Duration;

use herald_retry::{Backoff, Jitter};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::url::Endpoint;
use crate::{ErrorClass, TransportError};

/// How a connection came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// The first connection of this transport.
    First,
    /// Again to the server of the connection before.
    Reconnected,
    /// To another server than the connection before, the server `from` of the list.
    FailedOver {
        /// The index of the server of the connection before.
        from: usize,
    },
}

/// What an adapter gives a [`Rotation`]: how to open a connection to one server, whether one
/// is still up, and what to log and count as connections come and go.
pub trait Dialer<L>: Sync {
    /// Whether `live` is still up (a lost one is replaced on the next call).
    fn is_up(&self, live: &L) -> bool;
    /// Opens a connection to the server `index` of the list. The rotation bounds it by its
    /// connect timeout.
    fn open(&self, index: usize) -> impl Future<Output = Result<L, TransportError>> + Send;
    /// The server `index` as the errors name it (a redacted URL, `host:port`).
    fn describe(&self, index: usize) -> String;
    /// One attempt on the server `index` failed (each is counted).
    fn attempt_failed(&self, index: usize);
    /// A connection to the server `index` is up, after `failed_rounds` rounds that found none.
    fn opened(&self, index: usize, live: &L, how: Opened, failed_rounds: u32);
    /// A round found no server: `error` says why; the next round is due in `retry_in`.
    fn round_failed(&self, error: &TransportError, failed_rounds: u32, retry_in: Duration);
    /// The connection `live` to the server `index` is gone (lost or given up); the next round
    /// starts at the server `next`.
    fn lost(&self, index: usize, live: &L, next: usize);
}

/// The words of the errors a rotation returns: `peer` ("the broker", "NATS"), `entry`
/// ("address", "server") and the code of a round in which none answered.
#[derive(Clone, Copy, Debug)]
pub struct Wording {
    /// What is connected to, as in "reconnecting to {peer}".
    pub peer: &'static str,
    /// What one entry of the list is, as in "no {entry} of the list answered".
    pub entry: &'static str,
    /// The code of that error (`NO_ADDRESS`, `NO_SERVER`).
    pub no_entry_code: &'static str,
}

struct Link<L> {
    live: Option<L>,
    /// The server (index in the list) of `live`, or of the last connection.
    current: usize,
    /// Where the next round starts: the first server at start, the one after the server of a
    /// connection that was lost.
    next: usize,
    failures: u32,
    next_attempt: Option<Instant>,
    /// A connection was up before: a new one on another server is a failover.
    live_before: bool,
    /// Why the last round found no server; cleared when one answers. A call that finds the
    /// next round not due yet says it, so that a delivery timeout names the real cause.
    last_failure: Option<TransportError>,
}

/// The wait after the `failures`-th failed round in a row: `backoff`'s delay, the doubling
/// stopped at the 16th failure (2^15 times the minimum, when the maximum is higher still).
/// Without jitter (what a rotation uses) it never draws from the generator.
pub fn round_delay(backoff: &Backoff, failures: u32) -> Duration {
    backoff.delay(failures.min(16), None, &mut fastrand::Rng::with_seed(0))
}

/// A round of [`Rotation::live`] under way, with the lock. The call may be dropped while a
/// server is being dialled (the batch it serves ran out of time, before the connect timeout):
/// that attempt then counts as failed and the next call starts at the server after it. Else a
/// server that never answers (a black hole) would be dialled first by every call whose time
/// left is below the connect timeout, the others never tried and nothing counted.
struct Dialing<'a, L, D: Dialer<L>> {
    link: tokio::sync::MutexGuard<'a, Link<L>>,
    dialer: &'a D,
    n: usize,
    /// The server being dialled.
    at: Option<usize>,
}

impl<L, D: Dialer<L>> Drop for Dialing<'_, L, D> {
    fn drop(&mut self) {
        if let Some(index) = self.at.take() {
            self.link.next = (index + 1) % self.n;
            self.dialer.attempt_failed(index);
        }
    }
}

/// One connection at a time over a list of servers; see the module docs.
pub struct Rotation<L> {
    link: Mutex<Link<L>>,
    endpoints: Vec<Endpoint>,
    backoff: Backoff,
    connect_timeout: Duration,
    wording: Wording,
}

impl<L: Clone> Rotation<L> {
    /// Over `endpoints` (at least one), in the order given; rounds that find no server are
    /// spaced by `min` doubling up to `max` (no jitter); each attempt is bounded by
    /// `connect_timeout`.
    pub fn new(
        endpoints: Vec<Endpoint>,
        (min, max): (Duration, Duration),
        connect_timeout: Duration,
        wording: Wording,
    ) -> Self {
        assert!(!endpoints.is_empty(), "a rotation needs a server");
        Self {
            link: Mutex::new(Link {
                live: None,
                current: 0,
                next: 0,
                failures: 0,
                next_attempt: None,
                live_before: false,
                last_failure: None,
            }),
            endpoints,
            backoff: Backoff::new(min, max).with_jitter(Jitter::None),
            connect_timeout,
            wording,
        }
    }

    /// The servers, in the order rounds go through them.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The live connection, opened (or replaced) if there is none, after waiting out the
    /// backoff of a failed round. A call that waited and still finds the next round not due
    /// (another call's round failed meanwhile) returns a transient `RECONNECTING` error that
    /// ends with that round's error.
    pub async fn live(&self, dialer: &impl Dialer<L>) -> Result<L, TransportError> {
        let mut waited = false;
        let link = loop {
            let mut link = self.link.lock().await;
            if let Some(live) = &link.live {
                if dialer.is_up(live) {
                    return Ok(live.clone());
                }
                self.lose(&mut link, dialer);
            }
            match link.next_attempt {
                // Wait out the backoff without holding the lock (other calls wait alongside,
                // not behind), then look again: another call may have connected meanwhile.
                Some(at) if at > Instant::now() => {
                    if waited {
                        let e = TransportError::transient(format!(
                            "reconnecting to {}: the last attempt failed and the next one is not due yet; retried",
                            self.wording.peer
                        ))
                        .with_code("RECONNECTING");
                        return Err(match &link.last_failure {
                            Some(last) => e.with_context(format!("the last attempt: {last}")),
                            None => e,
                        });
                    }
                    drop(link);
                    tokio::time::sleep_until(at).await;
                    waited = true;
                }
                _ => break link,
            }
        };
        // One round: every server once, from `next` on; the first that answers is the
        // connection. A round that finds none is one failure for the backoff.
        let n = self.endpoints.len();
        let mut errors = Vec::with_capacity(n);
        let mut dialing = Dialing {
            link,
            dialer,
            n,
            at: None,
        };
        for k in 0..n {
            let index = (dialing.link.next + k) % n;
            dialing.at = Some(index);
            let dialed = tokio::time::timeout(self.connect_timeout, dialer.open(index)).await;
            dialing.at = None;
            let link = &mut dialing.link;
            let error = match dialed {
                Ok(Ok(live)) => {
                    let how = match (link.live_before, index == link.current) {
                        (false, _) => Opened::First,
                        (true, true) => Opened::Reconnected,
                        (true, false) => Opened::FailedOver { from: link.current },
                    };
                    dialer.opened(index, &live, how, link.failures);
                    link.live_before = true;
                    link.current = index;
                    link.next = index;
                    link.failures = 0;
                    link.next_attempt = None;
                    link.last_failure = None;
                    link.live = Some(live.clone());
                    return Ok(live);
                }
                Ok(Err(e)) => e,
                Err(_) => TransportError::transient(format!(
                    "connecting to {} took longer than {:?}; is {} reachable?",
                    dialer.describe(index),
                    self.connect_timeout,
                    self.wording.peer
                ))
                .with_code("CONNECT_TIMEOUT"),
            };
            dialer.attempt_failed(index);
            errors.push(error);
        }
        let link = &mut dialing.link;
        let e = self.round_error(errors);
        link.failures = link.failures.saturating_add(1);
        let delay = round_delay(&self.backoff, link.failures);
        link.next_attempt = Some(Instant::now() + delay);
        link.last_failure = Some(e.clone());
        dialer.round_failed(&e, link.failures, delay);
        Err(e)
    }

    /// Gives up on the connection `is_it` picks if it is still the one in use (its
    /// acknowledgements stopped coming: a half-open TCP connection, a hung server), so that
    /// the next call opens a new one from the next server on. Returns the connection given up
    /// and its server, for the adapter to close.
    pub async fn abandon(
        &self,
        is_it: impl Fn(&L) -> bool,
        dialer: &impl Dialer<L>,
    ) -> Option<(L, usize)> {
        let mut link = self.link.lock().await;
        let live = link.live.clone().filter(|l| is_it(l))?;
        let index = link.current;
        self.lose(&mut link, dialer);
        Some((live, index))
    }

    /// Takes the connection out (a close): the next call opens a new one, from the same
    /// server on. Returns it and its server.
    pub async fn take(&self) -> Option<(L, usize)> {
        let mut link = self.link.lock().await;
        let index = link.current;
        link.live.take().map(|l| (l, index))
    }

    fn lose(&self, link: &mut Link<L>, dialer: &impl Dialer<L>) {
        if let Some(live) = link.live.take() {
            link.next = (link.current + 1) % self.endpoints.len();
            dialer.lost(link.current, &live, link.next);
        }
    }

    /// The error of a round in which no server answered: the only one, or each server's,
    /// permanent only if every server refused for good (wrong credentials everywhere).
    fn round_error(&self, mut errors: Vec<TransportError>) -> TransportError {
        if errors.len() == 1 {
            return errors.remove(0);
        }
        let class = if errors.iter().all(|e| e.class() == ErrorClass::Permanent) {
            ErrorClass::Permanent
        } else {
            ErrorClass::Transient
        };
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        TransportError::new(
            class,
            format!(
                "no {} of the list answered: {}",
                self.wording.entry,
                text.join("; ")
            ),
        )
        .with_code(self.wording.no_entry_code)
    }
}

/// How long a connection has sent nothing while it owes answers: what finds a connection gone
/// silent (a half-open TCP connection, a hung server) when every call on it is cut off at its
/// delivery deadline before its own answers could time out. The adapter counts what the server
/// sends (`heard`: answers, errors, anything); a batch takes a [`snapshot`](Self::snapshot)
/// before its first publish and, once that is out, starts the watch with
/// [`expecting`](Self::expecting) unless it runs; anything heard since ends it. One lock per
/// batch, nothing per message.
#[derive(Debug, Default)]
pub struct SilenceWatch {
    /// When the first publish since the server last sent anything went out, and what had been
    /// heard by then.
    from: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl SilenceWatch {
    /// The time and the count heard so far, taken before a publish (so that an answer quicker
    /// than [`expecting`](Self::expecting) still counts).
    pub fn snapshot(heard: u64) -> (Instant, u64) {
        (Instant::now(), heard)
    }

    /// A publish (taken at `snapshot`) is out: starts the watch unless it runs since the
    /// server last sent anything (a watch that something heard since has ended, checked or
    /// not, and starts again here).
    pub fn expecting(&self, snapshot: (Instant, u64)) {
        let mut from = self
            .from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if from.is_none_or(|(_, heard)| heard != snapshot.1) {
            *from = Some(snapshot);
        }
    }

    /// How long the server has sent nothing while publishes waited for it, if they did and it
    /// has not: `heard` is the count now. Anything heard ends the watch.
    pub fn silent_for(&self, heard: u64) -> Option<Duration> {
        let mut from = self
            .from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (since, then) = (*from)?;
        if heard != then {
            *from = None;
            return None;
        }
        Some(since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex as StdMutex};

    #[tokio::test(start_paused = true)]
    async fn the_silence_watch_runs_from_the_first_unanswered_publish_until_anything_is_heard() {
        let watch = SilenceWatch::default();
        assert_eq!(watch.silent_for(0), None, "nothing waits");
        watch.expecting(SilenceWatch::snapshot(5));
        tokio::time::advance(Duration::from_secs(2)).await;
        // A later publish does not restart it.
        watch.expecting(SilenceWatch::snapshot(5));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(watch.silent_for(5), Some(Duration::from_secs(3)));
        // Anything heard ends it; the next publish starts it again.
        assert_eq!(watch.silent_for(6), None);
        assert_eq!(watch.silent_for(6), None);
        watch.expecting(SilenceWatch::snapshot(6));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(watch.silent_for(6), Some(Duration::from_secs(1)));
        // A watch something was heard since ends even unchecked: the next publish starts it.
        watch.expecting(SilenceWatch::snapshot(7));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(watch.silent_for(7), Some(Duration::from_secs(2)));
        // An answer quicker than `expecting` (heard between snapshot and expecting) counts.
        let watch = SilenceWatch::default();
        let before = SilenceWatch::snapshot(7);
        watch.expecting(before);
        assert_eq!(watch.silent_for(8), None);
    }

    /// Servers that answer or not as the test says; records what the rotation reports.
    #[derive(Default)]
    struct Fake {
        up: StdMutex<Vec<bool>>,
        /// Servers that never answer a dial (a black hole), by index.
        hangs: StdMutex<Vec<usize>>,
        events: StdMutex<Vec<String>>,
    }

    #[derive(Clone, Debug)]
    struct Conn {
        index: usize,
        alive: Arc<AtomicBool>,
    }

    impl Dialer<Conn> for Fake {
        fn is_up(&self, live: &Conn) -> bool {
            live.alive.load(Ordering::Acquire)
        }
        async fn open(&self, index: usize) -> Result<Conn, TransportError> {
            if self
                .hangs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&index)
            {
                std::future::pending::<()>().await;
            }
            if self.up.lock().unwrap_or_else(|e| e.into_inner())[index] {
                Ok(Conn {
                    index,
                    alive: Arc::new(AtomicBool::new(true)),
                })
            } else {
                Err(TransportError::transient(format!("s{index} refused")))
            }
        }
        fn describe(&self, index: usize) -> String {
            format!("s{index}")
        }
        fn attempt_failed(&self, index: usize) {
            self.say(format!("failed s{index}"));
        }
        fn opened(&self, index: usize, _: &Conn, how: Opened, failed_rounds: u32) {
            self.say(format!("opened s{index} {how:?} after {failed_rounds}"));
        }
        fn round_failed(&self, _: &TransportError, failed_rounds: u32, retry_in: Duration) {
            self.say(format!(
                "round {failed_rounds} failed, next in {retry_in:?}"
            ));
        }
        fn lost(&self, index: usize, _: &Conn, next: usize) {
            self.say(format!("lost s{index}, next s{next}"));
        }
    }

    impl Fake {
        fn say(&self, e: String) {
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(e);
        }
        fn set_up(&self, up: &[bool]) {
            *self.up.lock().unwrap_or_else(|e| e.into_inner()) = up.to_vec();
        }
        fn events(&self) -> Vec<String> {
            std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
        }
    }

    fn rotation(n: usize) -> Rotation<Conn> {
        let endpoints = (0..n)
            .map(|i| Endpoint {
                host: format!("s{i}"),
                port: 1,
            })
            .collect();
        Rotation::new(
            endpoints,
            (Duration::from_secs(1), Duration::from_secs(4)),
            Duration::from_secs(5),
            Wording {
                peer: "the test server",
                entry: "server",
                no_entry_code: "NO_SERVER",
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_connection_fails_over_to_the_next_server_and_rounds_back_off() {
        let fake = Fake::default();
        fake.set_up(&[true, true, false]);
        let r = rotation(3);
        let first = r.live(&fake).await.expect("s0 answers");
        assert_eq!(first.index, 0);
        assert_eq!(fake.events(), ["opened s0 First after 0"]);
        let again = r.live(&fake).await.expect("still up");
        assert!(
            Arc::ptr_eq(&first.alive, &again.alive),
            "the same connection"
        );

        first.alive.store(false, Ordering::Release);
        let second = r.live(&fake).await.expect("s1 answers");
        assert_eq!(second.index, 1);
        assert_eq!(
            fake.events(),
            [
                "lost s0, next s1",
                "opened s1 FailedOver { from: 0 } after 0"
            ]
        );

        // Everything down: one round, every server once from s2 on, then the backoff.
        fake.set_up(&[false, false, false]);
        second.alive.store(false, Ordering::Release);
        let e = r.live(&fake).await.expect_err("none answers");
        assert_eq!(e.code(), Some("NO_SERVER"));
        assert_eq!(e.class(), ErrorClass::Transient);
        assert_eq!(
            fake.events(),
            [
                "lost s1, next s2",
                "failed s2",
                "failed s0",
                "failed s1",
                "round 1 failed, next in 1s"
            ]
        );
        // The next call waits out the backoff (paused clock: exactly 1 s), then tries again.
        let t0 = Instant::now();
        fake.set_up(&[false, true, false]);
        let back = r.live(&fake).await.expect("s1 answers again");
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        assert_eq!(back.index, 1);
        assert_eq!(
            fake.events(),
            ["failed s2", "failed s0", "opened s1 Reconnected after 1"]
        );
    }

    /// A call dropped while it dials a server that never answers (its batch's time ran out
    /// before the connect timeout) counts that attempt failed, and the next call starts at the
    /// next server. Nothing was recorded, and every such call dialled the same black hole.
    #[tokio::test(start_paused = true)]
    async fn a_dial_cut_off_counts_failed_and_the_next_call_tries_the_next_server() {
        let fake = Fake::default();
        fake.set_up(&[true, true]);
        fake.hangs.lock().expect("hangs").push(0);
        let r = rotation(2);
        let cut = tokio::time::timeout(Duration::from_secs(1), r.live(&fake)).await;
        assert!(cut.is_err(), "cut off before the 5 s connect timeout");
        assert_eq!(fake.events(), ["failed s0"]);
        let live = r.live(&fake).await.expect("s1 answers");
        assert_eq!(live.index, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rounds_back_off_doubling_up_to_the_maximum_without_jitter() {
        let fake = Fake::default();
        fake.set_up(&[false]);
        let r = rotation(1);
        for _ in 0..5 {
            let _e = r.live(&fake).await.expect_err("down");
        }
        let waits: Vec<String> = fake
            .events()
            .into_iter()
            .filter(|e| e.starts_with("round"))
            .collect();
        assert_eq!(
            waits,
            [
                "round 1 failed, next in 1s",
                "round 2 failed, next in 2s",
                "round 3 failed, next in 4s",
                "round 4 failed, next in 4s",
                "round 5 failed, next in 4s"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_finds_the_next_round_not_due_names_the_last_failure() {
        let fake = Fake::default();
        fake.set_up(&[false]);
        let r = rotation(1);
        let _first = r.live(&fake).await.expect_err("down");
        // Two calls wait out the backoff together; the first to look runs the round (which
        // fails again), the other then finds the next round not due.
        let (a, b) = tokio::join!(r.live(&fake), r.live(&fake));
        let errors = [a.expect_err("down"), b.expect_err("down")];
        let waiting = errors
            .iter()
            .find(|e| e.code() == Some("RECONNECTING"))
            .unwrap_or_else(|| panic!("one call found the round not due: {errors:?}"));
        assert_eq!(waiting.class(), ErrorClass::Transient);
        assert!(
            waiting.to_string().contains("the last attempt: ")
                && waiting.to_string().contains("s0 refused"),
            "the cause is named: {waiting}"
        );
        // Once a server answers, the failure is forgotten.
        fake.set_up(&[true]);
        let _up = r.live(&fake).await.expect("s0 answers");
        assert!(r.link.lock().await.last_failure.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_connection_is_replaced_from_the_next_server() {
        let fake = Fake::default();
        fake.set_up(&[true, true]);
        let r = rotation(2);
        let first = r.live(&fake).await.expect("s0");
        let stale = first.clone();
        let other = Conn {
            index: 9,
            alive: Arc::new(AtomicBool::new(true)),
        };
        assert!(
            r.abandon(|l| Arc::ptr_eq(&l.alive, &other.alive), &fake)
                .await
                .is_none(),
            "not the connection in use: nothing given up"
        );
        let (gone, index) = r
            .abandon(|l| Arc::ptr_eq(&l.alive, &stale.alive), &fake)
            .await
            .expect("given up");
        assert_eq!((gone.index, index), (0, 0));
        assert_eq!(r.live(&fake).await.expect("s1").index, 1);
        let (_, index) = r.take().await.expect("closed");
        assert_eq!(index, 1);
        assert!(r.take().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn servers_that_all_refuse_for_good_make_a_permanent_round() {
        struct Refusing;
        impl Dialer<Conn> for Refusing {
            fn is_up(&self, _: &Conn) -> bool {
                true
            }
            async fn open(&self, index: usize) -> Result<Conn, TransportError> {
                Err(TransportError::permanent(format!("s{index}: bad password")))
            }
            fn describe(&self, index: usize) -> String {
                format!("s{index}")
            }
            fn attempt_failed(&self, _: usize) {}
            fn opened(&self, _: usize, _: &Conn, _: Opened, _: u32) {}
            fn round_failed(&self, _: &TransportError, _: u32, _: Duration) {}
            fn lost(&self, _: usize, _: &Conn, _: usize) {}
        }
        let e = rotation(2).live(&Refusing).await.expect_err("refused");
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(
            e.to_string().contains("no server of the list answered"),
            "{e}"
        );
    }
}
