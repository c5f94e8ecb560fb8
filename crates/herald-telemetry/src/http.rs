//! The HTTP/1.1 server of `/metrics` and the health endpoints, on hyper. Every response closes
//! its connection. Requests are bounded in size (hyper answers 431 to a longer head) and time (a
//! head must arrive within hyper's header read timeout; a response must be taken within the
//! write timeout), and connections in number.
//!
//! The connection limit must not let idle clients starve the probes: a kubelet or a load
//! balancer that finds every slot held by clients that connected and said nothing would see a
//! healthy process as dead. So the limit closes rather than refuses: when every slot is taken,
//! the oldest connection still waiting for its request head (idle, or sending it slowly; nothing
//! is lost but a request not yet made) makes room for the new one, and only when every slot is
//! being answered does the oldest of those go. A probe sends its request at once and takes a
//! small answer: it can only be pushed out by `max_connections` newer connections arriving
//! while it is answered. (A reserved share for probes would still let idle clients fill that
//! share; a shorter idle timeout alone would leave probes waiting for it.)

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

use crate::{Telemetry, TelemetryError};

/// The longest request head read (hyper's smallest buffer); a longer one is answered 431.
const MAX_REQUEST: usize = 8 * 1024;

/// How long and how many.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a client has to send its request head (hyper's header read timeout, from the
    /// moment the connection is accepted).
    pub(crate) head_timeout: Duration,
    /// How long a client has to take its response, from the moment its request is read.
    pub(crate) write_timeout: Duration,
    /// Connections held at once: many idle or slow clients cannot take the process's file
    /// descriptors (which the broker connections need) or its memory (one rendered body each).
    /// When all are held, a new connection closes an idle one (see the module's documentation).
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

/// The running server of `/metrics`, `/health`, `/health/live` and `/health/ready`. Stops
/// when shut down or dropped.
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

type Body = Full<Bytes>;

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A health answer: JSON, never cached, 200 or 503.
fn health(ok: bool, body: String) -> Response<Body> {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = respond(status, "application/json", body);
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The answer to `request` (hyper leaves the body out for `HEAD`, and answers malformed
/// requests itself).
fn route<B>(request: &Request<B>, telemetry: &Telemetry) -> Response<Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            telemetry.render(),
        ),
        "/health" => {
            let report = telemetry.health();
            health(report.is_ready(), report.to_json())
        }
        // The same verdict under the name Kubernetes' readiness probe asks for.
        "/health/ready" => {
            let report = telemetry.health();
            health(report.is_ready(), report.to_json())
        }
        "/health/live" => {
            let report = telemetry.health();
            health(report.is_live(), report.liveness_json())
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /health, /health/live or /health/ready\n".into(),
        ),
    }
}

/// Serves one connection (one request: responses close it); `answering` is called once its
/// request head is read. Ends with `TimedOut` when the response is not taken within the write
/// timeout, with hyper's error when the head is late, too long or malformed.
async fn answer(
    stream: TcpStream,
    telemetry: &Telemetry,
    limits: &Limits,
    answering: impl Fn(),
) -> std::io::Result<()> {
    let answered = Notify::new();
    let service = hyper::service::service_fn(|request: Request<Incoming>| {
        answering();
        answered.notify_one();
        std::future::ready(Ok::<_, Infallible>(route(&request, telemetry)))
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // hyper has no write timeout: a client that does not take its response (a full receive
    // window) must not hold the task and its socket forever.
    let write_deadline = async {
        answered.notified().await;
        tokio::time::sleep(limits.write_timeout).await;
    };
    tokio::select! {
        served = connection => served.map_err(std::io::Error::other),
        () = write_deadline => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Far above every timeout the tests set: only a server that never answers reaches it.
    const DEADLINE: Duration = Duration::from_secs(5);

    async fn server(limits: Limits) -> (Server, crate::Recorder) {
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

    #[tokio::test]
    async fn malformed_requests_are_answered_400_and_every_answer_closes() {
        let (server, _recorder) = server(Limits::DEFAULT).await;
        let addr = server.local_addr();
        for request in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /health HTTP/9.9\r\n\r\n",
            b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            let reply = exchange(addr, request).await;
            assert!(
                reply.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{reply:?}"
            );
        }
        // A client asking to keep the connection open gets its answer, and the connection
        // closes after it (`exchange` reads to the end).
        let reply = exchange(
            addr,
            b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
        assert!(reply.contains("connection: close\r\n"), "{reply:?}");
        assert!(reply.ends_with("{\"live\":true}"), "{reply:?}");
        // HEAD: the head of GET's answer, no body.
        let reply = exchange(addr, b"HEAD /health/ready HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
        assert!(reply.ends_with("\r\n\r\n"), "{reply:?}");
    }

    #[tokio::test]
    async fn idle_connections_do_not_keep_health_dark() {
        // The connection limit in production; idle clients would hold each slot for longer than
        // the test runs, so that only the limit's policy can make room.
        let limits = Limits {
            head_timeout: Duration::from_secs(600),
            ..Limits::DEFAULT
        };
        let (server, _recorder) = server(limits).await;
        let addr = server.local_addr();
        // More clients that connect and say nothing than there are slots.
        let mut idle = Vec::new();
        for _ in 0..Limits::DEFAULT.max_connections + 8 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Probes are answered at once, not after the idle clients time out.
        for path in ["/health", "/health/live", "/health/ready"] {
            let reply = exchange(
                addr,
                format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            )
            .await;
            assert!(
                reply.starts_with("HTTP/1.1 200 OK\r\n"),
                "{path}: {reply:?}"
            );
        }
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
    fn huge_metrics(recorder: &crate::Recorder) {
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
