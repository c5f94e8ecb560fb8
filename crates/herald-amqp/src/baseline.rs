//! The raw-lapin baselines herald is measured against (`cargo xtask bench amqp`, `herald bench
//! --baseline`). They live here because lapin's types never leave this crate.
//!
//! Both publish persistent (`delivery_mode` 2), mandatory messages with publisher confirms, like
//! [`crate::AmqpTransport`]: [`raw_streaming`] at its best (several channels, a window of
//! unconfirmed messages each, confirms awaited as they come), [`raw_naive`] the common pattern
//! (one channel, each confirm awaited before the next publish).

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::AmqpConfig;

/// What one run did.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Messages confirmed by the broker.
    pub delivered: u64,
    /// Wall time from the first publish to the last confirm.
    pub elapsed: Duration,
}

impl Run {
    /// Confirmed messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Why a baseline run stopped: a connection, channel or publish error, or a message the broker
/// did not confirm. Runs stop at the first error; the broker's address is never in it with a
/// password.
#[derive(Debug, thiserror::Error)]
#[error("AMQP baseline: {0}")]
pub struct BaselineError(String);

impl From<lapin::Error> for BaselineError {
    fn from(e: lapin::Error) -> Self {
        Self(e.to_string())
    }
}

/// A connection to the first broker of `config`, with its TLS settings (CA and client
/// certificate) as herald's own connections have them.
async fn connect(config: &AmqpConfig) -> Result<Connection, BaselineError> {
    let tls = crate::connection::tls_config(config).map_err(|e| BaselineError(e.to_string()))?;
    if config.url.tls {
        herald_core::tls::ensure_crypto_provider();
    }
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| BaselineError(format!("no async runtime for lapin: {e}")))?;
    Connection::connect_uri_with_config(
        config.url.to_lapin(&config.url.endpoints[0]),
        ConnectionProperties::default(),
        tls,
        runtime,
    )
    .await
    .map_err(|e| BaselineError(format!("connecting to {}: {e}", config.redacted_url())))
}

/// Closes `ch` and waits for the broker's answer. A channel handle that is dropped open closes
/// itself in the background, and if the connection closes meanwhile, lapin logs the clash as
/// an `ERROR` "Connection error: invalid channel state: Closing" in the middle of the
/// command's output: so every channel of the baselines is closed before its connection.
async fn close_channel(ch: Channel) -> Result<(), BaselineError> {
    // Closed already (by the broker, after an error the run has reported): nothing to do.
    closed(ch.close(200, "OK".into()).await, "closing a channel")
}

async fn close(conn: Connection) -> Result<(), BaselineError> {
    // Every channel is closed first (see `close_channel`); should one still be closing on
    // its own, this fails with "invalid channel state: Closing": the work is done by then and
    // the socket goes with `conn`, so that is not an error of the run.
    closed(conn.close(200, "OK".into()).await, "closing the connection")
}

/// The outcome of closing a channel or a connection: "invalid channel state" (one closing or
/// closed already) is not an error of the run.
fn closed(r: Result<(), lapin::Error>, what: &'static str) -> Result<(), BaselineError> {
    match r {
        Err(e) if !matches!(e.kind(), lapin::ErrorKind::InvalidChannelState(..)) => {
            Err(step(what)(e))
        }
        _ => Ok(()),
    }
}

/// Names the step that failed.
fn step(what: &'static str) -> impl Fn(lapin::Error) -> BaselineError {
    move |e| BaselineError(format!("{what}: {e}"))
}

/// Deletes and declares the durable queue `herald-bench-{tag}-{pid}`, and returns its name.
pub async fn fresh_queue(config: &AmqpConfig, tag: &str) -> Result<String, BaselineError> {
    let conn = connect(config).await?;
    let name = format!("herald-bench-{tag}-{}", std::process::id());
    let ch = conn
        .create_channel()
        .await
        .map_err(step("opening a channel"))?;
    ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await
        .map_err(step("deleting the queue"))?;
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(step("declaring the queue"))?;
    close_channel(ch).await?;
    close(conn).await?;
    Ok(name)
}

/// Deletes the queue `name`.
pub async fn delete_queue(config: &AmqpConfig, name: &str) -> Result<(), BaselineError> {
    let conn = connect(config).await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(step("opening a channel"))?;
    ch.queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .map_err(step("deleting the queue"))?;
    close_channel(ch).await?;
    close(conn).await
}

fn props() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

const OPTS: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

fn acked(c: &Confirmation) -> Result<(), BaselineError> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => Err(BaselineError(format!("not confirmed: {other:?}"))),
    }
}

/// What a baseline message carries besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Nothing: `delivery_mode` 2 only.
    Bare,
    /// What herald's messages carry in the benchmarks: a `message_id` (UUID text, as herald's
    /// `MessageId`) and the key (64 keys) in the header the config names (`x-herald-key` by
    /// default), so that the broker parses and stores the same properties for both; the
    /// `message_id` alone when the config sends no key header (`AmqpConfig::key_header(None)`,
    /// `?key_header=`).
    LikeHerald,
    /// A `message_id` only: what herald's messages carry with `AmqpConfig::key_header(None)`.
    IdOnly,
}

/// The properties of message `i` of a channel's share; `key_header` names the header of
/// [`Carry::LikeHerald`]'s key.
fn carried(carry: Carry, key_header: &str, channel: usize, i: usize) -> BasicProperties {
    match carry {
        Carry::Bare => props(),
        Carry::IdOnly => {
            let id = herald_core::MessageId::from_u128(((channel as u128) << 64) | i as u128);
            props().with_message_id(id.text().to_string().into())
        }
        Carry::LikeHerald => {
            let id = herald_core::MessageId::from_u128(((channel as u128) << 64) | i as u128);
            let mut headers = FieldTable::default();
            headers.insert(
                key_header.into(),
                lapin::types::AMQPValue::LongString(format!("key-{}", i % 64).into()),
            );
            props()
                .with_message_id(id.text().to_string().into())
                .with_headers(headers)
        }
    }
}

/// One channel's share, streaming: at most `window` unconfirmed, confirms awaited as they come.
async fn stream_on(
    ch: Channel,
    exchange: String,
    routing_key: String,
    payload: Vec<u8>,
    (n, window): (usize, usize),
    (carry, key_header, channel): (Carry, String, usize),
) -> Result<Channel, BaselineError> {
    let mut pending = VecDeque::with_capacity(window);
    for i in 0..n {
        if pending.len() >= window {
            if let Some(c) = pending.pop_front() {
                let c: lapin::PublisherConfirm = c;
                acked(&c.await?)?;
            }
        }
        pending.push_back(
            ch.basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                OPTS,
                &payload,
                carried(carry, &key_header, channel, i),
            )
            .await?,
        );
    }
    for c in pending {
        acked(&c.await?)?;
    }
    // Closed by the caller once the clock stopped.
    Ok(ch)
}

/// Raw lapin at its best: `n` messages of `payload` bytes to `exchange` (`""`: the default
/// exchange) with `routing_key`, spread over `channels` channels with at most `window`
/// unconfirmed messages each.
pub async fn raw_streaming(
    config: &AmqpConfig,
    exchange: &str,
    routing_key: &str,
    payload: usize,
    n: usize,
    channels: usize,
    window: usize,
) -> Result<Run, BaselineError> {
    raw_streaming_carrying(
        config,
        (exchange, routing_key),
        payload,
        n,
        (channels, window),
        Carry::Bare,
    )
    .await
}

/// [`raw_streaming`], its messages carrying `carry`.
pub async fn raw_streaming_carrying(
    config: &AmqpConfig,
    (exchange, routing_key): (&str, &str),
    payload: usize,
    n: usize,
    (channels, window): (usize, usize),
    carry: Carry,
) -> Result<Run, BaselineError> {
    let (channels, window) = (channels.max(1), window.max(1));
    // Like herald under this config: without a key header (`?key_header=`), the id alone.
    let (carry, key_header) = match (carry, config.key_header_name()) {
        (Carry::LikeHerald, None) => (Carry::IdOnly, String::new()),
        (other, name) => (other, name.unwrap_or_default().to_owned()),
    };
    let conn = connect(config).await?;
    let mut chans = Vec::new();
    for _ in 0..channels {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        chans.push(ch);
    }
    let start = Instant::now();
    let shares = chans.into_iter().enumerate().map(|(i, ch)| {
        let share = n / channels + usize::from(i < n % channels);
        tokio::spawn(stream_on(
            ch,
            exchange.to_owned(),
            routing_key.to_owned(),
            vec![b'x'; payload],
            (share, window),
            (carry, key_header.clone(), i),
        ))
    });
    let mut done = Vec::with_capacity(channels);
    for r in join_all(shares).await {
        done.push(r.map_err(|e| BaselineError(format!("publishing task: {e}")))??);
    }
    let elapsed = start.elapsed();
    for ch in done {
        close_channel(ch).await?;
    }
    close(conn).await?;
    Ok(Run {
        delivered: n as u64,
        elapsed,
    })
}

/// The naive pattern: one channel, each publish's confirm awaited before the next.
pub async fn raw_naive(
    config: &AmqpConfig,
    exchange: &str,
    routing_key: &str,
    payload: usize,
    n: usize,
) -> Result<Run, BaselineError> {
    let conn = connect(config).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; payload];
    let start = Instant::now();
    for _ in 0..n {
        let c = ch
            .basic_publish(exchange.into(), routing_key.into(), OPTS, &body, props())
            .await?
            .await?;
        acked(&c)?;
    }
    let elapsed = start.elapsed();
    close_channel(ch).await?;
    close(conn).await?;
    Ok(Run {
        delivered: n as u64,
        elapsed,
    })
}

/// Raw lapin one message at a time, at the caller's pace: each publish's confirm is its own
/// future, the publishes spread over several channels in turn. The baseline of `herald bench
/// --rate`, where a fixed schedule, not the client, sets the pace.
pub struct OneByOne {
    conn: Connection,
    channels: Vec<Channel>,
    exchange: String,
    routing_key: String,
    payload: std::sync::Arc<[u8]>,
    next: usize,
}

impl OneByOne {
    /// A connection with `channels` confirming channels; one message is published and
    /// confirmed on each first.
    pub async fn connect(
        config: &AmqpConfig,
        exchange: &str,
        routing_key: &str,
        payload: usize,
        channels: usize,
    ) -> Result<Self, BaselineError> {
        let conn = connect(config).await?;
        let mut chans = Vec::new();
        let body = vec![b'x'; payload];
        for _ in 0..channels.max(1) {
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let c = ch
                .basic_publish(exchange.into(), routing_key.into(), OPTS, &body, props())
                .await?
                .await?;
            acked(&c)?;
            chans.push(ch);
        }
        Ok(Self {
            conn,
            channels: chans,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            payload: body.into(),
            next: 0,
        })
    }

    /// Publishes one message on the next channel; the future it returns ends with its confirm
    /// (`true`) or anything else (`false`: a nack, a return, an error).
    ///
    /// The publish is handed to lapin before this returns (its first poll takes the delivery tag
    /// and queues the frames), and lapin's write is awaited in the returned future with the
    /// confirm, not here: awaiting each write here, as the pattern in lapin's examples does, made
    /// the pacer wait for lapin's I/O thread between every two messages and fall behind its
    /// schedule at 10 000 messages a second. herald hands its publishes over the same way.
    pub async fn publish(&mut self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let ch = self.channels[self.next % self.channels.len()].clone();
        self.next = self.next.wrapping_add(1);
        let (exchange, routing_key) = (
            ShortString::from(self.exchange.as_str()),
            ShortString::from(self.routing_key.as_str()),
        );
        let payload = self.payload.clone();
        let mut confirmed = Box::pin(async move {
            let confirm = ch
                .basic_publish(exchange, routing_key, OPTS, &payload, props())
                .await;
            match confirm {
                Ok(c) => matches!(c.await, Ok(c) if acked(&c).is_ok()),
                Err(_) => false,
            }
        });
        // The first poll queues the publish, in call order; its waker is a no-op, the caller's
        // polls of the returned future bring the real one.
        let first = confirmed
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        async move {
            match first {
                std::task::Poll::Ready(ok) => ok,
                std::task::Poll::Pending => confirmed.await,
            }
        }
    }

    /// Closes the channels, then the connection.
    pub async fn close(self) -> Result<(), BaselineError> {
        for ch in self.channels {
            close_channel(ch).await?;
        }
        close(self.conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw client's "like herald" messages carry the key under the header the config names,
    /// as herald's do; they always named it `x-herald-key`.
    #[test]
    fn the_key_rides_in_the_header_the_config_names() {
        let props = carried(Carry::LikeHerald, "x-k", 0, 65);
        let headers = props.headers().as_ref().expect("headers");
        let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-k"]);
        assert!(props.message_id().is_some());
        let id_only = carried(Carry::IdOnly, "", 0, 65);
        assert!(id_only.headers().is_none() && id_only.message_id().is_some());
        assert!(carried(Carry::Bare, "x-k", 0, 65).message_id().is_none());
    }
}
