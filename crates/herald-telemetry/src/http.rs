//! A small HTTP/1.1 server for two read-only endpoints. Every response closes its connection;
//! requests are bounded in size and time, and connections in number: when every slot is taken,
//! the oldest connection still waiting for its request head makes room for the new one, so that
//! idle or slow clients cannot keep `/health` and `/metrics` from anyone else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use crate::{Telemetry, TelemetryError};

/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// How long and how many.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a client has to send its request head.
    pub(crate) head_timeout: Duration,
    /// How long a client has to take its response.
    pub(crate) write_timeout: Duration,
    /// Connections held at once: many idle or slow clients cannot take the process's file
    /// descriptors (which the broker connections need) or its memory (one rendered body each).
    pub(crate) max_connections: usize,
}

impl Limits {
    pub(crate) const DEFAULT: Self = Self {
        head_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(10),
        max_connections: 32,
    };
}

pub(crate) async fn bind(addr: &str) -> Result<TcpListener, TelemetryError> {
    let parsed: SocketAddr = addr.trim().parse().map_err(|e: std::net::AddrParseError| {
        TelemetryError::InvalidAddress {
            input: addr.to_owned(),
            reason: e.to_string(),
        }
    })?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| TelemetryError::Bind {
            addr: parsed,
            source,
        })
}

pub(crate) fn serve(listener: TcpListener, telemetry: Telemetry) -> Result<Server, TelemetryError> {
    serve_with(listener, telemetry, Limits::DEFAULT)
}

/// The connections being served, by id in accept order (the oldest first).
#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    live: BTreeMap<u64, Live>,
}

#[derive(Debug)]
struct Live {
    /// Its request head is read: it is being answered (for at most the write timeout).
    answering: bool,
    /// Set once its task is spawned, before the next connection is accepted.
    task: Option<AbortHandle>,
}

impl Connections {
    /// Makes room for one more connection below `max`, and returns the tasks to end for it:
    /// the oldest connections still waiting for their request head (idle, or sending it slowly:
    /// nothing is lost but a request not yet made), or, when every one is being answered, the
    /// oldest of those (a client slow to take its response). So a new client is always served,
    /// and a probe, which sends its request at once and takes a small answer, can only be
    /// pushed out by `max` newer connections arriving while it is answered.
    fn make_room(&mut self, max: usize) -> Vec<AbortHandle> {
        let mut ended = Vec::new();
        while self.live.len() >= max.max(1) {
            let oldest = self
                .live
                .iter()
                .find(|(_, c)| !c.answering)
                .or_else(|| self.live.iter().next())
                .map(|(&id, _)| id);
            match oldest.and_then(|id| self.live.remove(&id)) {
                Some(c) => ended.extend(c.task),
                None => break,
            }
        }
        ended
    }
}

fn lock(connections: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    // Nothing panics while holding it; a poisoned registry is still consistent.
    connections.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes a connection off the registry when its task ends (answered, failed, timed out or
/// ended by [`Connections::make_room`], which took it off already).
struct Registered {
    connections: Arc<Mutex<Connections>>,
    id: u64,
}

impl Registered {
    fn answering(&self) {
        if let Some(c) = lock(&self.connections).live.get_mut(&self.id) {
            c.answering = true;
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.connections).live.remove(&self.id);
    }
}

pub(crate) fn serve_with(
    listener: TcpListener,
    telemetry: Telemetry,
    limits: Limits,
) -> Result<Server, TelemetryError> {
    let local_addr = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    let connections = Arc::new(Mutex::new(Connections::default()));
    let registry = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            // A failed accept (out of file descriptors, say) is retried after a pause rather
            // than ending the server.
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (id, ended) = {
                let mut live = lock(&registry);
                let ended = live.make_room(limits.max_connections);
                let id = live.next_id;
                live.next_id += 1;
                live.live.insert(
                    id,
                    Live {
                        answering: false,
                        task: None,
                    },
                );
                (id, ended)
            };
            // Outside the lock: an ended task takes itself off the registry as it goes.
            for task in ended {
                task.abort();
            }
            let registered = Registered {
                connections: registry.clone(),
                id,
            };
            let telemetry = telemetry.clone();
            let task = tokio::spawn(async move {
                let _answered =
                    answer(stream, &telemetry, &limits, || registered.answering()).await;
                drop(registered);
            });
            // Unless it has ended already (and taken itself off).
            if let Some(live) = lock(&registry).live.get_mut(&id) {
                live.task = Some(task.abort_handle());
            }
        }
    });
    Ok(Server {
        local_addr,
        task,
        #[cfg(test)]
        connections,
    })
}

/// The running `/metrics` and `/health` server. Stops when shut down or dropped.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
    #[cfg(test)]
    connections: Arc<Mutex<Connections>>,
}

impl Server {
    /// The address it listens on (with the port picked when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections held now, and how many of them are being answered.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let c = lock(&self.connections);
        let answering = c.live.values().filter(|l| l.answering).count();
        (c.live.len(), answering)
    }

    /// Stops accepting connections; requests being answered finish on their own.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    extra: &'static str,
}

fn route(method: &str, path: &str, telemetry: &Telemetry) -> Response {
    let path = path.split('?').next().unwrap_or(path);
    let text = |status, body: &str| Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.to_owned(),
        extra: "",
    };
    if method != "GET" && method != "HEAD" {
        return Response {
            extra: "Allow: GET, HEAD\r\n",
            ..text(405, "only GET and HEAD\n")
        };
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: telemetry.render(),
            extra: "",
        },
        "/health" => {
            let report = telemetry.health();
            Response {
                status: report.http_status(),
                content_type: "application/json",
                body: report.to_json(),
                extra: "Cache-Control: no-store\r\n",
            }
        }
        _ => text(404, "not found: try /metrics or /health\n"),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Where the request head ends: at the first blank line, `\r\n\r\n` or (from lenient clients)
/// `\n\n`.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Reads a request head into `buf`: where it ends, or `None` when it is longer than
/// [`MAX_REQUEST`] (`buf` then holds that much, and no more is read).
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(buf) {
            return Ok(Some(end));
        }
        let room = MAX_REQUEST.saturating_sub(buf.len()).min(chunk.len());
        if room == 0 {
            return Ok(None);
        }
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one request and answers it; `answering` is called once the request head is read.
async fn answer(
    mut stream: TcpStream,
    telemetry: &Telemetry,
    limits: &Limits,
    answering: impl FnOnce(),
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(limits.head_timeout, read_head(&mut stream, &mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    answering();
    let (response, head_only) = match head {
        None => (
            Response {
                status: 431,
                content_type: "text/plain; charset=utf-8",
                body: format!("request head longer than {MAX_REQUEST} bytes\n"),
                extra: "",
            },
            false,
        ),
        Some(end) => {
            let line = String::from_utf8_lossy(&buf[..end]);
            let mut parts = line.lines().next().unwrap_or("").split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(method), Some(path), Some(version)) if version.starts_with("HTTP/1.") => {
                    (route(method, path, telemetry), method == "HEAD")
                }
                _ => (
                    Response {
                        status: 400,
                        content_type: "text/plain; charset=utf-8",
                        body: "malformed request line\n".into(),
                        extra: "",
                    },
                    false,
                ),
            }
        }
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
        response.extra,
    );
    // A client that does not take its response (a full receive window) must not hold the
    // task and its socket forever.
    tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            stream.write_all(response.body.as_bytes()).await?;
        }
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Far above every timeout the tests set: only a server that never answers reaches it.
    const DEADLINE: Duration = Duration::from_secs(5);

    async fn server(limits: Limits) -> (Server, metrics_exporter_prometheus::PrometheusRecorder) {
        let (recorder, telemetry) = crate::Prometheus::new().build().expect("recorder");
        (
            serve_with(small_buffers(), telemetry, limits).expect("serve"),
            recorder,
        )
    }

    /// A listener whose connections have small send buffers: a response they cannot hand to
    /// the kernel at once waits for the client.
    fn small_buffers() -> TcpListener {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(4096).expect("sndbuf");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        socket.listen(64).expect("listen")
    }

    /// Sends `request` on a new connection and reads the reply to its end (or to a reset: what
    /// came before it is kept), within [`DEADLINE`].
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        // A server that answers before reading all of it may reset the connection: its reply
        // still comes first.
        let _sent = c.write_all(request).await;
        read_reply(&mut c).await
    }

    async fn read_reply(c: &mut TcpStream) -> String {
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(DEADLINE, async {
            loop {
                match c.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => reply.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "no reply within {DEADLINE:?}");
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// Waits until `ok` holds, polling `server`'s registry, failing after [`DEADLINE`].
    async fn wait_for(server: &Server, what: &str, ok: impl Fn((usize, usize)) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !ok(server.held()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {:?} held, answering",
                server.held()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn malformed_and_taken_addresses_are_named() {
        let e = bind("localhost:notaport").await.expect_err("malformed");
        assert!(
            e.to_string()
                .contains("invalid telemetry listen address `localhost:notaport`"),
            "{e}"
        );
        let taken = bind("127.0.0.1:0").await.expect("free port");
        let addr = taken.local_addr().expect("addr").to_string();
        let e = bind(&addr).await.expect_err("taken");
        assert!(matches!(e, TelemetryError::Bind { .. }), "{e}");
        assert!(e.to_string().contains(&addr), "{e}");
    }

    #[test]
    fn request_heads_end_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(23));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[tokio::test]
    async fn idle_connections_do_not_keep_health_dark() {
        // The limits in production: idle clients would hold each slot for 5 s.
        let (server, _recorder) = server(Limits::DEFAULT).await;
        let addr = server.local_addr();
        // More clients that connect and say nothing than there are slots.
        let mut idle = Vec::new();
        for _ in 0..Limits::DEFAULT.max_connections + 8 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // A probe is answered at once, not after the idle clients time out.
        let reply = exchange(addr, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
        // The oldest idle client made room: it was closed, unanswered.
        assert_eq!(read_reply(&mut idle[0]).await, "");
        let (held, _) = server.held();
        assert!(held <= Limits::DEFAULT.max_connections, "{held} held");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_head_timeout() {
        let (server, _recorder) = server(Limits {
            head_timeout: Duration::from_millis(100),
            ..Limits::DEFAULT
        })
        .await;
        let mut idle = TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        assert_eq!(read_reply(&mut idle).await, "");
        wait_for(&server, "the connection is still held", |(held, _)| {
            held == 0
        })
        .await;
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_answered_431() {
        let (server, _recorder) = server(Limits::DEFAULT).await;
        let addr = server.local_addr();
        // Exactly the most that is read, without its end.
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        request.resize(MAX_REQUEST, b'x');
        let reply = exchange(addr, &request).await;
        assert!(
            reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{reply:?}"
        );
        // Longer, with its end: the end is never read.
        request.resize(2 * MAX_REQUEST, b'x');
        request.extend_from_slice(b"\r\n\r\n");
        let reply = exchange(addr, &request).await;
        assert!(
            reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{reply:?}"
        );
        // Exactly the most that is read, its end included: a request.
        let mut request = b"GET /health HTTP/1.1\r\nX-Filler: ".to_vec();
        request.resize(MAX_REQUEST - 4, b'x');
        request.extend_from_slice(b"\r\n\r\n");
        let reply = exchange(addr, &request).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
    }

    /// A `/metrics` body far larger than the sockets' buffers.
    fn huge_metrics(recorder: &metrics_exporter_prometheus::PrometheusRecorder) {
        metrics::with_local_recorder(recorder, || {
            for i in 0..20_000 {
                metrics::counter!("herald_test_series_total", "series" => format!("{i:0>100}"))
                    .increment(1);
            }
        });
    }

    /// A client with a small receive buffer that asks for `/metrics` and never reads.
    async fn never_reads(addr: SocketAddr) -> TcpStream {
        let client = tokio::net::TcpSocket::new_v4().expect("socket");
        client.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut client = client.connect(addr).await.expect("connect");
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("request");
        client
    }

    #[tokio::test]
    async fn a_client_that_never_reads_its_response_costs_a_task_only_briefly() {
        let (recorder, telemetry) = crate::Prometheus::new().build().expect("recorder");
        huge_metrics(&recorder);
        assert!(telemetry.render().len() > 2 << 20);
        let listener = small_buffers();
        let client = never_reads(listener.local_addr().expect("addr"));
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (stream, _) = accepted.expect("accept");
        let limits = Limits {
            write_timeout: Duration::from_millis(100),
            ..Limits::DEFAULT
        };
        // The client never reads: the server gives up on it rather than wait forever.
        let answered =
            tokio::time::timeout(DEADLINE, answer(stream, &telemetry, &limits, || {})).await;
        assert!(
            matches!(&answered, Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut),
            "still writing to a client that does not read: {answered:?}"
        );
        drop(client);
    }

    #[tokio::test]
    async fn clients_that_do_not_take_their_responses_do_not_keep_health_dark() {
        // Every slot answering a client that never reads, for longer than the test runs.
        let limits = Limits {
            write_timeout: Duration::from_secs(600),
            max_connections: 2,
            ..Limits::DEFAULT
        };
        let (server, recorder) = server(limits).await;
        huge_metrics(&recorder);
        let addr = server.local_addr();
        let stuck = [never_reads(addr).await, never_reads(addr).await];
        wait_for(&server, "the slow clients are not both answered", |held| {
            held == (2, 2)
        })
        .await;
        let reply = exchange(addr, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
        drop(stuck);
    }
}
