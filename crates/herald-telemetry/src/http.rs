//! A small HTTP/1.1 server for two read-only endpoints. Every response closes its connection;
//! requests are bounded in size and time, so a slow or hostile client costs one task briefly.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::{Telemetry, TelemetryError};

/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take its response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections answered at once; more are closed as soon as they are accepted, so that many
/// idle or slow clients cannot take the process's file descriptors (which the broker
/// connections need) or its memory (one rendered body each).
const MAX_CONNECTIONS: usize = 32;

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
    let local_addr = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            // A failed accept (out of file descriptors, say) is retried after a pause rather
            // than ending the server.
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Busy: closed unanswered; a scraper retries at its next interval.
                drop(stream);
                continue;
            };
            let telemetry = telemetry.clone();
            tokio::spawn(async move {
                let _answered = answer(stream, &telemetry).await;
                drop(slot);
            });
        }
    });
    Ok(Server { local_addr, task })
}

/// The running `/metrics` and `/health` server. Stops when shut down or dropped.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// The address it listens on (with the port picked when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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

async fn answer(mut stream: TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = head_end(&buf) {
                return Ok::<_, std::io::Error>(Some(end));
            }
            if buf.len() >= MAX_REQUEST {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
    let (response, head_only) = match head? {
        None => (
            Response {
                status: 431,
                content_type: "text/plain; charset=utf-8",
                body: "request head too large\n".into(),
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
    tokio::time::timeout(WRITE_TIMEOUT, async {
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
    async fn more_clients_than_slots_are_turned_away_and_the_server_still_answers() {
        let (_recorder, telemetry) = crate::Prometheus::new().build().expect("recorder");
        let listener = bind("127.0.0.1:0").await.expect("bind");
        let server = serve(listener, telemetry).expect("serve");
        let addr = server.local_addr();
        // Clients that connect and say nothing hold every slot (each for READ_TIMEOUT).
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // One more is closed at once, unanswered: it reads the end of the stream.
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let mut got = Vec::new();
        let closed = tokio::time::timeout(READ_TIMEOUT / 2, extra.read_to_end(&mut got)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a connection past the limit was kept: {closed:?}"
        );
        // Slots come back when the idle clients go.
        drop(idle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"GET /health HTTP/1.0\n\n")
                .await
                .expect("write");
            let mut reply = String::new();
            let read = tokio::time::timeout(Duration::from_secs(2), c.read_to_string(&mut reply));
            if matches!(read.await, Ok(Ok(_))) && reply.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no answer once the idle clients left: {reply:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_client_that_never_reads_its_response_costs_a_task_only_briefly() {
        let (recorder, telemetry) = crate::Prometheus::new().build().expect("recorder");
        // A /metrics body far larger than the sockets' buffers.
        metrics::with_local_recorder(&recorder, || {
            for i in 0..20_000 {
                metrics::counter!("herald_test_series_total", "series" => format!("{i:0>100}"))
                    .increment(1);
            }
        });
        assert!(telemetry.render().len() > 2 << 20);
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(4096).expect("sndbuf");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(8).expect("listen");
        let client = tokio::net::TcpSocket::new_v4().expect("socket");
        client.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut client = client
            .connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("request");
        // The client never reads: the server gives up on it rather than wait forever.
        let answered = tokio::time::timeout(
            READ_TIMEOUT + WRITE_TIMEOUT + Duration::from_secs(5),
            answer(stream, &telemetry),
        )
        .await;
        assert!(
            matches!(answered, Ok(Err(_))),
            "still writing to a client that does not read"
        );
        drop(client);
    }
}
