//! A small TCP fault proxy for broker tests: listens on `127.0.0.1:0`, forwards every connection
//! to a target, and on demand cuts all open connections (closing them, or resetting them as a
//! failing network or host does) and refuses new ones for a while. A reset from either side is
//! passed on to the other as a reset, not a close. With
//! [`FaultProxy::start_with_latency`] it also delays every byte by a fixed time each way, as a
//! network between zones would, without limiting throughput (this machine has no kernel
//! traffic shaping).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use herald_testkit::proxy::FaultProxy;
//! let proxy = FaultProxy::start("127.0.0.1:5672").await?;
//! let url = format!("amqp://guest:guest@{}/%2F", proxy.addr());
//! // ... connect a client to `url`, then, in the middle of a run:
//! proxy.cut_for(Duration::from_secs(1));
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug)]
struct State {
    /// Bumped on every cut, with whether it resets: connections opened before a cut end when
    /// they see it.
    generation: watch::Sender<(u64, bool)>,
    /// New connections are refused (accepted and closed at once) until then.
    refuse_until: Mutex<Option<Instant>>,
    accepted: AtomicU64,
    /// Connections forwarded and not yet ended (by either side, or a cut).
    open: AtomicU64,
    cuts: AtomicU64,
    /// Where new connections go (see [`FaultProxy::retarget`]).
    target: Mutex<String>,
}

/// A TCP proxy that can cut connections. Stops (and closes everything) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> std::io::Result<Self> {
        Self::start_with_latency(target, Duration::ZERO).await
    }

    /// Like [`start`](Self::start), and every byte reaches the other side `one_way` after the
    /// proxy read it, in both directions (a round trip of twice `one_way`). Reading never
    /// waits for the delayed writes, so the delay adds latency, not a cap on throughput: what
    /// is in flight is held in memory, as on a long network path.
    pub async fn start_with_latency(target: &str, one_way: Duration) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", target, one_way).await
    }

    /// Like [`start_with_latency`](Self::start_with_latency), listening on `listen`: for a
    /// broker that must be told the proxy's address before the proxy starts (Tansu
    /// advertises the address it is given, and clients then connect there).
    pub async fn start_on(listen: &str, target: &str, one_way: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            generation: watch::channel((0, false)).0,
            refuse_until: Mutex::new(None),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            target: Mutex::new(target.to_owned()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of file descriptors, say: try again shortly, without spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Before the refusal is looked at: `cut_for` sets the refusal and then cuts,
                // so a cut made in between is seen by one or the other.
                let mut cut = st.generation.subscribe();
                let refusing = st
                    .refuse_until
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_some_and(|t| Instant::now() < t);
                if refusing {
                    drop(client);
                    continue;
                }
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let open = OpenGuard::new(st.clone());
                let target = st
                    .target
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                tokio::spawn(async move {
                    let _open = open;
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _nodelay = (client.set_nodelay(true), server.set_nodelay(true));
                    let (mut client, mut server) = (client, server);
                    let reset = if one_way.is_zero() {
                        tokio::select! {
                            copied = tokio::io::copy_bidirectional(&mut client, &mut server) => {
                                copied.is_err_and(|e| is_reset(&e))
                            }
                            _changed = cut.changed() => cut.borrow().1,
                        }
                    } else {
                        let (mut client_read, mut client_write) = client.split();
                        let (mut server_read, mut server_write) = server.split();
                        let both = async {
                            let up = delayed_copy(&mut client_read, &mut server_write, one_way);
                            let down = delayed_copy(&mut server_read, &mut client_write, one_way);
                            tokio::pin!(up, down);
                            let (mut up_ended, mut down_ended, mut reset) = (false, false, false);
                            // Both directions to their end. A side that reset while read is
                            // done with: both end then (what came before the reset was
                            // delivered). One that reset while written to is read from by
                            // the other direction, which ends in its turn, delivering what it
                            // holds.
                            while !(up_ended && down_ended) {
                                let ended = tokio::select! {
                                    ended = &mut up, if !up_ended => {
                                        up_ended = true;
                                        ended
                                    }
                                    ended = &mut down, if !down_ended => {
                                        down_ended = true;
                                        ended
                                    }
                                };
                                match ended {
                                    Ended::Closed => {}
                                    Ended::ResetReading => return true,
                                    Ended::ResetWriting => reset = true,
                                }
                            }
                            reset
                        };
                        tokio::select! {
                            reset = both => reset,
                            _changed = cut.changed() => cut.borrow().1,
                        }
                    };
                    if reset {
                        // Closed with no lingering: a reset (RST), each side seeing
                        // "connection reset" as from a failed network or host.
                        let _abort = (client.set_zero_linger(), server.set_zero_linger());
                    }
                    // Dropping both ends closes them: the client sees its connection end.
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection now and refuses new ones for `refuse` (zero: accept again at
    /// once).
    pub fn cut_for(&self, refuse: Duration) {
        self.cut(refuse, false);
    }

    /// As [`cut_for`](Self::cut_for), resetting the connections (RST) instead of closing them:
    /// each side reads "connection reset", as when a host or a network path fails.
    pub fn reset_for(&self, refuse: Duration) {
        self.cut(refuse, true);
    }

    fn cut(&self, refuse: Duration, reset: bool) {
        *self
            .state
            .refuse_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + refuse);
        self.state.cuts.fetch_add(1, Ordering::Relaxed);
        self.state
            .generation
            .send_modify(|(g, resets)| (*g, *resets) = (*g + 1, reset));
    }

    /// Sends new connections to `target` (`host:port`) from now on; open ones stay where they
    /// are, as when a name's address changes in DNS (a managed broker's failover).
    pub fn retarget(&self, target: &str) {
        *self
            .state
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = target.to_owned();
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections forwarded now: accepted and not yet ended by either side (or a cut).
    pub fn open(&self) -> u64 {
        self.state.open.load(Ordering::Relaxed)
    }

    /// Cuts made so far.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::Relaxed)
    }
}

/// Counts one forwarded connection in [`State::open`] while it lives.
struct OpenGuard(Arc<State>);

impl OpenGuard {
    fn new(state: Arc<State>) -> Self {
        state.open.fetch_add(1, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an I/O error is the peer's reset.
fn is_reset(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::ConnectionReset
}

/// How one direction of a delayed connection ended.
enum Ended {
    /// Its input closed (or failed otherwise), what it held delivered, its output closed.
    Closed,
    /// Its input was reset: what came before was delivered, `delay` after the reset.
    ResetReading,
    /// Its output was reset (the side it writes to is gone).
    ResetWriting,
}

/// One direction of a delayed connection: what is read at `t` is written at `t + delay`, in
/// order. The reader hands chunks over without waiting for the writer; at the end of the input
/// the writer delivers what is still held, then closes its side.
async fn delayed_copy(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    delay: Duration,
) -> Ended {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A chunk (`Ok`), or the input's end (`Err`, `true` when it was a reset).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Result<Vec<u8>, bool>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (chunk, end) = match from.read(&mut buf).await {
                Ok(0) => (Err(false), true),
                Ok(n) => (Ok(buf[..n].to_vec()), false),
                Err(e) => (Err(is_reset(&e)), true),
            };
            if tx.send((Instant::now() + delay, chunk)).is_err() || end {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Ok(chunk) => {
                    if let Err(e) = to.write_all(&chunk).await {
                        return if is_reset(&e) {
                            Ended::ResetWriting
                        } else {
                            Ended::Closed
                        };
                    }
                }
                Err(true) => return Ended::ResetReading,
                Err(false) => break,
            }
        }
        let _closed = to.shutdown().await;
        Ended::Closed
    };
    tokio::pin!(reader, writer);
    // Reading stops once nothing more can be written (an idle peer would hold it for ever).
    tokio::select! {
        ended = &mut writer => ended,
        () = &mut reader => writer.await,
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Ends the forwarding tasks with a close, whatever the last cut was.
        self.state
            .generation
            .send_modify(|(g, reset)| (*g, *reset) = (*g + 1, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_then_cuts_then_refuses_then_accepts() {
        let proxy = FaultProxy::start(&echo_server().await.to_string())
            .await
            .expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        echoed(&mut c, b"ping").await;

        // Refusals for two seconds: the steps below fit in them on a loaded machine too.
        const REFUSE: Duration = Duration::from_secs(2);
        let cut_at = tokio::time::Instant::now();
        proxy.cut_for(REFUSE);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("the cut closes the connection");
        assert!(n.map_or(true, |n| n == 0));

        // Refused while the cut lasts: the proxy closes the new connection at once.
        let mut r = TcpStream::connect(proxy.addr()).await.expect("tcp accept");
        let mut one = [0u8; 1];
        let got = tokio::time::timeout(Duration::from_secs(5), r.read(&mut one))
            .await
            .expect("closed at once");
        assert!(got.map_or(true, |n| n == 0));

        tokio::time::sleep_until(cut_at + REFUSE + Duration::from_millis(100)).await;
        let mut c = TcpStream::connect(proxy.addr())
            .await
            .expect("connect again");
        echoed(&mut c, b"pong").await;
        assert_eq!(proxy.cuts(), 1);
        assert_eq!(proxy.accepted(), 2);
    }

    /// Sends `word` through `c` and reads it back from the echo server behind.
    async fn echoed(c: &mut TcpStream, word: &[u8; 4]) {
        c.write_all(word).await.expect("write");
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, word);
    }

    /// A server on `127.0.0.1:0` running `serve` for each connection.
    async fn server<F>(serve: fn(TcpStream) -> F) -> SocketAddr
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s));
            }
        });
        addr
    }

    async fn echo_server() -> SocketAddr {
        server(|mut s| async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        })
        .await
    }

    /// A round trip takes at least twice the one-way delay; bytes written back to back are
    /// delayed side by side, not one after another, and arrive whole and in order.
    #[tokio::test]
    async fn latency_delays_each_way_without_limiting_what_is_in_flight() {
        let one_way = Duration::from_millis(40);
        let proxy = FaultProxy::start_with_latency(&echo_server().await.to_string(), one_way)
            .await
            .expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        c.set_nodelay(true).expect("nodelay");
        let t0 = Instant::now();
        echoed(&mut c, b"ping").await;
        assert!(t0.elapsed() >= 2 * one_way, "{:?}", t0.elapsed());

        // 25 writes without waiting: a proxy that delayed them one after another would take
        // 25 round trips (2 s); delayed side by side they take about one (the bound is half of
        // the serial time, far from both).
        let sent: Vec<u8> = (0..25u8).flat_map(|i| [i; 100]).collect();
        let t0 = Instant::now();
        for chunk in sent.chunks(100) {
            c.write_all(chunk).await.expect("write");
            tokio::task::yield_now().await;
        }
        let mut got = vec![0u8; sent.len()];
        c.read_exact(&mut got).await.expect("echo");
        assert_eq!(got, sent, "whole and in order");
        let took = t0.elapsed();
        assert!(
            took >= 2 * one_way && took < 25 * one_way,
            "{took:?}: not one round trip's worth"
        );
    }

    /// What [`resetting_server`] says before it resets.
    const LAST_WORDS: &[u8] = b"last words";

    /// A server that answers one read with its last words, then, 50 ms later, resets the
    /// connection.
    async fn resetting_server() -> SocketAddr {
        server(|mut s| async move {
            let mut buf = [0u8; 64];
            if s.read(&mut buf).await.is_ok() {
                let _sent = s.write_all(LAST_WORDS).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _abort = s.set_zero_linger();
            }
        })
        .await
    }

    /// What a client reads until its connection ends: the bytes, and whether it ended with a
    /// reset (else with a close).
    async fn read_until_the_end(c: &mut (impl AsyncReadExt + Unpin)) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) => return false,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return is_reset(&e),
                }
            }
        })
        .await
        .expect("the connection ends within 5 s");
        (got, ended)
    }

    /// A reset was passed on as a close (in both modes), and a cut could only close: a client
    /// never saw the "connection reset" a failed host or network gives.
    #[tokio::test]
    async fn resets_reach_the_client_as_resets_after_what_came_before() {
        for one_way in [Duration::ZERO, Duration::from_millis(20)] {
            let server = resetting_server().await;
            let proxy = FaultProxy::start_with_latency(&server.to_string(), one_way)
                .await
                .expect("proxy");
            let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
            c.write_all(b"hello").await.expect("write");
            let (got, reset) = read_until_the_end(&mut c).await;
            assert!(reset, "the server's reset passed on ({one_way:?})");
            // Undelayed, the reset may overtake bytes the proxy had not read yet, as on a
            // network; delayed, what was read before it arrives first.
            if !one_way.is_zero() {
                assert_eq!(got, LAST_WORDS);
            }

            let proxy = FaultProxy::start_with_latency(&echo_server().await.to_string(), one_way)
                .await
                .expect("proxy");
            let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
            echoed(&mut c, b"ping").await;
            proxy.reset_for(Duration::ZERO);
            let (_, reset) = read_until_the_end(&mut c).await;
            assert!(reset, "reset_for resets ({one_way:?})");
            let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
            // Forwarded before the cut (an echo through the proxy).
            echoed(&mut c, b"ping").await;
            proxy.cut_for(Duration::ZERO);
            let (_, reset) = read_until_the_end(&mut c).await;
            assert!(!reset, "cut_for closes ({one_way:?})");
        }
    }

    /// A client still writing when its server resets: delayed, the proxy took the reset on a
    /// write and dropped what the server had said before it, still held for the client.
    #[tokio::test]
    async fn a_reset_met_while_writing_still_delivers_what_came_before() {
        let server = resetting_server().await;
        // Longer than the server's pause before its reset: its last words are still held
        // when it comes.
        let proxy = FaultProxy::start_with_latency(&server.to_string(), Duration::from_millis(100))
            .await
            .expect("proxy");
        let c = TcpStream::connect(proxy.addr()).await.expect("connect");
        let (mut read, mut write) = c.into_split();
        write.write_all(b"hello").await.expect("write");
        let writing = tokio::spawn(async move {
            while write.write_all(b"more").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let (got, _) = read_until_the_end(&mut read).await;
        writing.abort();
        assert_eq!(got, LAST_WORDS);
    }
}
