//! Topology: the exchanges, queues and bindings the transport declares when it connects, and
//! after every reconnect.

use herald_core::TransportError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;

use crate::error::classify;

/// How a [`Declare::Exchange`] routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// Routes by exact routing key.
    Direct,
    /// Routes to every bound queue.
    Fanout,
    /// Routes by routing-key pattern.
    Topic,
    /// Routes by header values.
    Headers,
}

/// One piece of topology the transport declares when it connects, and again after every
/// reconnect (declarations are idempotent). Declaring needs the `configure` permission.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Declare {
    /// A durable exchange.
    Exchange {
        /// Its name.
        name: String,
        /// How it routes.
        kind: ExchangeKind,
    },
    /// A durable queue; `quorum` makes it a replicated quorum queue (`x-queue-type: quorum`).
    Queue {
        /// Its name.
        name: String,
        /// Quorum (true) or classic (false).
        quorum: bool,
    },
    /// Binds `queue` to `exchange` with `routing_key`.
    Binding {
        /// The queue.
        queue: String,
        /// The exchange.
        exchange: String,
        /// The binding key.
        routing_key: String,
    },
}

/// Declares the topology on a short-lived channel.
pub(crate) async fn declare(
    connection: &Connection,
    topology: &[Declare],
) -> Result<(), TransportError> {
    // Transient: a declaration can fail for a while (a node down, a queue being deleted,
    // permissions being granted); every batch fails until it succeeds, so keep retrying.
    let fail = |what: String| {
        move |e: lapin::Error| {
            let c = classify(&e, &what);
            TransportError::transient(format!(
                "declaring the configured topology failed: {} (code {}); herald retries, fix the declaration or the broker if this persists",
                c.message(),
                c.code().unwrap_or("-")
            ))
            .with_code("DECLARE_FAILED")
            .with_source(e)
        }
    };
    let ch = connection
        .create_channel()
        .await
        .map_err(fail("topology declaration".into()))?;
    for item in topology {
        match item {
            Declare::Exchange { name, kind } => {
                let kind = match kind {
                    ExchangeKind::Direct => lapin::ExchangeKind::Direct,
                    ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
                    ExchangeKind::Topic => lapin::ExchangeKind::Topic,
                    ExchangeKind::Headers => lapin::ExchangeKind::Headers,
                };
                ch.exchange_declare(
                    name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(fail(format!("declaring exchange \"{name}\"")))?;
            }
            Declare::Queue { name, quorum } => {
                let mut args = FieldTable::default();
                if *quorum {
                    args.insert(
                        "x-queue-type".into(),
                        AMQPValue::LongString("quorum".into()),
                    );
                }
                ch.queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(fail(format!("declaring queue \"{name}\"")))?;
            }
            Declare::Binding {
                queue,
                exchange,
                routing_key,
            } => {
                ch.queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(fail(format!(
                    "binding queue \"{queue}\" to exchange \"{exchange}\""
                )))?;
            }
        }
    }
    ch.close(200, "OK".into())
        .await
        .map_err(fail("closing the declaration channel".into()))?;
    Ok(())
}
