//! The raw-redis-rs baselines herald is measured against (`herald bench --baseline`, the
//! `redis-baseline` binary). They live here because redis-rs's types never leave this crate.
//!
//! Both append to a stream and count a message only once Redis replied with its entry id,
//! like [`crate::RedisTransport`]: [`raw_pipelined`] at its best (one multiplexed connection,
//! pipelines of many `XADD`s, several pipelines in flight), [`raw_naive`] the common pattern
//! (each `XADD` awaited before the next).
//!
//! Both write the entries herald writes for the benchmark's messages: `payload`, `key` (one of
//! 64, as `herald bench` sends) and `id` (36 characters of UUID text, made per message), so
//! that the comparison measures herald, not a smaller entry (Redis's own work per `XADD` grows
//! with its fields: with `payload` alone, the raw client appends about half again as many).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::RedisConfig;

/// What one run did.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Messages Redis appended (replied to with an entry id).
    pub delivered: u64,
    /// Wall time from the first `XADD` to the last reply.
    pub elapsed: Duration,
}

impl Run {
    /// Appended messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Why a baseline run stopped: a connection or command error, or an `XADD` Redis refused. Runs
/// stop at the first error; the server's password is never in it.
#[derive(Debug, thiserror::Error)]
#[error("Redis baseline: {0}")]
pub struct BaselineError(String);

/// Names the step that failed.
fn step<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> BaselineError {
    move |e| BaselineError(format!("{what}: {e}"))
}

/// A multiplexed connection to the server of `config`, with its credentials, database and TLS
/// settings.
async fn connect(config: &RedisConfig) -> Result<MultiplexedConnection, BaselineError> {
    let client = crate::connection::client(config).map_err(step("the settings"))?;
    let options = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&options)
        .await
        .map_err(|e| BaselineError(format!("connecting to {}: {e}", config.redacted_url())))
}

/// Deletes the key `herald:bench:{tag}:{pid}` (a stream from an earlier run) and returns it:
/// a stream key that holds nothing.
pub async fn fresh_stream(config: &RedisConfig, tag: &str) -> Result<String, BaselineError> {
    let key = format!("herald:bench:{tag}:{}", std::process::id());
    delete_stream(config, &key).await?;
    Ok(key)
}

/// How many entries the stream `key` holds (`XLEN`).
pub async fn stream_len(config: &RedisConfig, key: &str) -> Result<u64, BaselineError> {
    let mut conn = connect(config).await?;
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut conn)
        .await
        .map_err(step("XLEN"))
}

/// Deletes the stream `key` (`DEL`; a missing key is fine).
pub async fn delete_stream(config: &RedisConfig, key: &str) -> Result<(), BaselineError> {
    let mut conn = connect(config).await?;
    redis::cmd("DEL")
        .arg(key)
        .query_async::<i64>(&mut conn)
        .await
        .map_err(step("DEL"))?;
    Ok(())
}

/// Keys of the benchmark's messages, as `herald bench` sends them.
const KEYS: usize = 64;

/// `XADD key * payload BODY key KEY id ID`: the entry herald writes for the `n`-th message of a
/// benchmark.
fn xadd(key: &str, body: &[u8], n: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key)
        .arg("*")
        .arg("payload")
        .arg(body)
        .arg("key")
        .arg(format!("key-{}", n % KEYS))
        .arg("id")
        .arg(format!(
            "{:08x}-0000-7000-8000-{:012x}",
            std::process::id(),
            n
        ));
    cmd
}

/// One pipeline's replies: all entry ids, or the first refusal.
fn check(replies: Vec<Value>) -> Result<u64, BaselineError> {
    for r in &replies {
        if let Value::ServerError(e) = r {
            return Err(BaselineError(format!("XADD refused: {e}")));
        }
    }
    Ok(replies.len() as u64)
}

/// Raw redis-rs at its best: `n` messages of `payload` bytes appended to `key` on one
/// multiplexed connection, in pipelines of `pipeline` `XADD`s (one round trip each), with up to
/// `in_flight` pipelines outstanding.
pub async fn raw_pipelined(
    config: &RedisConfig,
    key: &str,
    payload: usize,
    n: usize,
    pipeline: usize,
    in_flight: usize,
) -> Result<Run, BaselineError> {
    let pipeline = pipeline.max(1);
    let in_flight = in_flight.max(1);
    let conn = connect(config).await?;
    let body = vec![b'x'; payload];
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(in_flight);
    let mut delivered = 0;
    let mut left = n;
    while left > 0 {
        if pending.len() >= in_flight {
            if let Some(task) = pending.pop_front() {
                delivered += join(task).await?;
            }
        }
        let count = left.min(pipeline);
        let first = n - left;
        left -= count;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for i in first..first + count {
            pipe.add_command(xadd(key, &body, i));
        }
        let mut conn = conn.clone();
        pending.push_back(tokio::spawn(async move {
            pipe.query_async::<Vec<Value>>(&mut conn).await
        }));
    }
    for task in pending {
        delivered += join(task).await?;
    }
    Ok(Run {
        delivered,
        elapsed: start.elapsed(),
    })
}

async fn join(
    task: tokio::task::JoinHandle<redis::RedisResult<Vec<Value>>>,
) -> Result<u64, BaselineError> {
    check(
        task.await
            .map_err(step("a pipeline's task"))?
            .map_err(step("a pipeline"))?,
    )
}

/// The naive pattern: each `XADD` awaited before the next.
pub async fn raw_naive(
    config: &RedisConfig,
    key: &str,
    payload: usize,
    n: usize,
) -> Result<Run, BaselineError> {
    let mut conn = connect(config).await?;
    let body = vec![b'x'; payload];
    let start = Instant::now();
    for i in 0..n {
        xadd(key, &body, i)
            .query_async::<Value>(&mut conn)
            .await
            .map_err(step("XADD"))?;
    }
    Ok(Run {
        delivered: n as u64,
        elapsed: start.elapsed(),
    })
}

/// The raw client one message at a time, for open-loop runs (`herald bench --rate
/// --baseline`): each `XADD` sent as it is due on one multiplexed connection (which writes
/// concurrent commands out together), its reply awaited on its own.
pub struct OneByOne {
    conn: MultiplexedConnection,
    key: String,
    body: Vec<u8>,
}

impl OneByOne {
    /// A connected client: one entry is appended first, as for the other baselines.
    pub async fn connect(
        config: &RedisConfig,
        key: &str,
        payload: usize,
    ) -> Result<Self, BaselineError> {
        let mut conn = connect(config).await?;
        let body = vec![b'x'; payload];
        xadd(key, &body, 0)
            .query_async::<Value>(&mut conn)
            .await
            .map_err(step("XADD"))?;
        Ok(Self {
            conn,
            key: key.to_owned(),
            body,
        })
    }

    /// Appends the `i`-th message (sent at once, from a task of its own); the future ends with
    /// its entry id (`true`) or an error (`false`). Call it within a Tokio runtime.
    pub fn send(&self, i: u64) -> impl std::future::Future<Output = bool> + Send + 'static {
        let cmd = xadd(
            &self.key,
            &self.body,
            usize::try_from(i).unwrap_or(usize::MAX),
        );
        let mut conn = self.conn.clone();
        let reply = tokio::spawn(async move { cmd.query_async::<Value>(&mut conn).await });
        async move { matches!(reply.await, Ok(Ok(_))) }
    }
}
