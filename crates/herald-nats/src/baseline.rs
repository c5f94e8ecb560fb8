//! The raw-async-nats baselines herald is measured against (`herald bench --baseline`, the
//! `nats-baseline` binary). They live here because async-nats's types never leave this crate.
//!
//! Both publish to JetStream and count a message only once its PubAck came, like
//! [`crate::NatsTransport`]: [`raw_streaming`] at its best (one connection, publishing on
//! without waiting, up to a window of PubAcks outstanding, awaited as they come), [`raw_naive`]
//! the common pattern (each PubAck awaited before the next publish).
//!
//! Every message carries the headers herald sends for the benchmark's messages: its key in
//! `x-herald-key` (one of 64, as `herald bench` sends) and a `Nats-Msg-Id` of 36 characters of
//! UUID text, made per message, which JetStream indexes for its duplicate window: the
//! comparison measures herald, not a lighter message.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};

use crate::NatsConfig;

/// What one run did.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Messages JetStream acknowledged.
    pub delivered: u64,
    /// Wall time from the first publish to the last PubAck.
    pub elapsed: Duration,
}

impl Run {
    /// Acknowledged messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Why a baseline run stopped: a connection or publish error, or a message JetStream did not
/// acknowledge. Runs stop at the first error; the server's address is never in it with a
/// password.
#[derive(Debug, thiserror::Error)]
#[error("NATS baseline: {0}")]
pub struct BaselineError(String);

/// Names the step that failed.
fn step<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> BaselineError {
    move |e| BaselineError(format!("{what}: {e}"))
}

/// Keys of the benchmark's messages, as `herald bench` sends them.
const KEYS: usize = 64;

/// Runs in this process so far: each run's ids are its own, so that JetStream's duplicate
/// window never drops a later run's message as a copy of an earlier one's.
static RUNS: AtomicU32 = AtomicU32::new(0);

/// A number for a new run.
fn next_run() -> u32 {
    RUNS.fetch_add(1, Ordering::Relaxed)
}

/// The headers herald sends with the `n`-th message of a benchmark: its key and its id (unique
/// to the process, the run and the message).
fn headers(run: u32, n: usize) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-herald-key", format!("key-{}", n % KEYS).as_str());
    h.insert(
        "Nats-Msg-Id",
        format!(
            "{:08x}-{:04x}-7000-8000-{:012x}",
            std::process::id(),
            run & 0xffff,
            n
        )
        .as_str(),
    );
    h
}

/// A stream made for one run, and the subject it captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scratch {
    /// The stream's name.
    pub stream: String,
    /// The subject to publish to.
    pub subject: String,
}

/// A client on the first server of `config`, with its credentials and TLS settings.
async fn connect(config: &NatsConfig) -> Result<Client, BaselineError> {
    let credentials = config.url.credentials.clone();
    let signer = crate::auth::signer_for(config).map_err(|e| BaselineError(e.to_string()))?;
    let mut options = ConnectOptions::with_auth_callback(move |nonce| {
        std::future::ready(crate::auth::answer(&credentials, signer.as_deref(), &nonce))
    })
    .connection_timeout(config.connect_timeout)
    .require_tls(config.url.tls);
    if let Some(ca) = config.url.tls_files.ca_file() {
        options = options.add_root_certificates(ca.to_owned());
    }
    if let Some(c) = config.url.tls_files.client_cert() {
        options = options.add_client_certificate(c.cert_file, c.key_file);
    }
    let server = crate::url::server_addr(&config.url.endpoints[0], config.url.tls);
    options
        .connect(server.as_str())
        .await
        .map_err(|e| BaselineError(format!("connecting to {}: {e}", config.redacted_url())))
}

/// A JetStream context whose own in-flight limit never holds a window back.
fn context(client: Client, config: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.ack_timeout)
        .max_ack_inflight(1 << 30)
        .build(client)
}

/// Deletes and creates the file-backed stream `HERALD_BENCH_{tag}_{pid}` capturing the subject
/// `herald.bench.{tag}.{pid}`.
pub async fn fresh_stream(config: &NatsConfig, tag: &str) -> Result<Scratch, BaselineError> {
    let js = context(connect(config).await?, config);
    let pid = std::process::id();
    let scratch = Scratch {
        stream: format!("HERALD_BENCH_{}_{pid}", tag.to_ascii_uppercase()),
        subject: format!("herald.bench.{tag}.{pid}"),
    };
    // Not there yet is fine.
    let _deleted = js.delete_stream(&scratch.stream).await;
    js.create_stream(stream::Config {
        name: scratch.stream.clone(),
        subjects: vec![scratch.subject.clone()],
        storage: stream::StorageType::File,
        ..stream::Config::default()
    })
    .await
    .map_err(step("creating the stream"))?;
    Ok(scratch)
}

/// How many messages the stream `name` holds.
pub async fn stream_messages(config: &NatsConfig, name: &str) -> Result<u64, BaselineError> {
    let js = context(connect(config).await?, config);
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(step("looking the stream up"))?;
    let info = stream
        .info()
        .await
        .map_err(step("reading the stream's state"))?;
    Ok(info.state.messages)
}

/// Deletes the stream `name`.
pub async fn delete_stream(config: &NatsConfig, name: &str) -> Result<(), BaselineError> {
    let js = context(connect(config).await?, config);
    js.delete_stream(name)
        .await
        .map_err(step("deleting the stream"))?;
    Ok(())
}

/// Raw async-nats at its best: `n` messages of `payload` bytes to `subject` on one
/// connection, published without waiting, with at most `window` PubAcks outstanding, awaited
/// as they come.
pub async fn raw_streaming(
    config: &NatsConfig,
    subject: &str,
    payload: usize,
    n: usize,
    window: usize,
) -> Result<Run, BaselineError> {
    let window = window.max(1);
    let js = context(connect(config).await?, config);
    let run = next_run();
    let body = herald_core::Bytes::from(vec![b'x'; payload]);
    let subject = subject.to_owned();
    let start = Instant::now();
    // On a task of its own, as an application runs it: a worker thread, where the client's
    // connection task wakes it, not the runtime's `block_on` thread.
    tokio::spawn(async move {
        let mut pending = VecDeque::with_capacity(window.min(n));
        for i in 0..n {
            if pending.len() >= window {
                if let Some(ack) = pending.pop_front() {
                    let ack: jetstream::context::PublishAckFuture = ack;
                    ack.await.map_err(step("PubAck"))?;
                }
            }
            let ack = js
                .publish_with_headers(subject.clone(), headers(run, i), body.clone())
                .await
                .map_err(step("publishing"))?;
            pending.push_back(ack);
        }
        for ack in pending {
            ack.into_future().await.map_err(step("PubAck"))?;
        }
        Ok::<_, BaselineError>(())
    })
    .await
    .map_err(step("the publishing task"))??;
    Ok(Run {
        delivered: n as u64,
        elapsed: start.elapsed(),
    })
}

/// The naive pattern: each publish's PubAck awaited before the next publish.
pub async fn raw_naive(
    config: &NatsConfig,
    subject: &str,
    payload: usize,
    n: usize,
) -> Result<Run, BaselineError> {
    let js = context(connect(config).await?, config);
    let run = next_run();
    let body = herald_core::Bytes::from(vec![b'x'; payload]);
    let subject = subject.to_owned();
    let start = Instant::now();
    for i in 0..n {
        js.publish_with_headers(subject.clone(), headers(run, i), body.clone())
            .await
            .map_err(step("publishing"))?
            .await
            .map_err(step("PubAck"))?;
    }
    Ok(Run {
        delivered: n as u64,
        elapsed: start.elapsed(),
    })
}

/// The raw client one message at a time, for open-loop runs (`herald bench --rate
/// --baseline`): each message published as it is due, its PubAck awaited on its own while the
/// next ones go out.
pub struct OneByOne {
    js: jetstream::Context,
    subject: String,
    body: herald_core::Bytes,
    run: u32,
}

impl OneByOne {
    /// A connected client: one message is published and acknowledged first, as for the other
    /// baselines.
    pub async fn connect(
        config: &NatsConfig,
        subject: &str,
        payload: usize,
    ) -> Result<Self, BaselineError> {
        let js = context(connect(config).await?, config);
        let run = next_run();
        let body = herald_core::Bytes::from(vec![b'x'; payload]);
        js.publish_with_headers(subject.to_owned(), headers(run, usize::MAX), body.clone())
            .await
            .map_err(step("publishing"))?
            .await
            .map_err(step("PubAck"))?;
        Ok(Self {
            js,
            subject: subject.to_owned(),
            body,
            run,
        })
    }

    /// Publishes the `i`-th message; the future ends with its PubAck (`true`) or failure
    /// (`false`).
    pub async fn publish(
        &self,
        i: u64,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let n = usize::try_from(i).unwrap_or(usize::MAX);
        let ack = self
            .js
            .publish_with_headers(
                self.subject.clone(),
                headers(self.run, n),
                self.body.clone(),
            )
            .await
            .ok();
        async move {
            match ack {
                Some(ack) => ack.into_future().await.is_ok(),
                None => false,
            }
        }
    }
}
