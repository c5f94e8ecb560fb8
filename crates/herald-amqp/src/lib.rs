//! herald-amqp: a herald [`Transport`](herald_core::Transport) for RabbitMQ and other AMQP 0-9-1
//! brokers, on [lapin](https://docs.rs/lapin).
//!
//! - [`AmqpConfig`]: an `amqp://` / `amqps://` URL plus typed options (channels, confirm
//!   window, persistence, mandatory, timeouts, TLS CA, topology to declare).
//! - [`AmqpTransport`]: publisher confirms always on, streamed over several channels; unroutable
//!   messages come back as permanent `NO_ROUTE` errors; reconnects after a loss; waits while
//!   the broker blocks the connection.
//! - [`queue`] and [`exchange`]: how a herald [`Destination`](herald_core::Destination) names
//!   an AMQP target (`"queue"` or `"exchange/routing-key"`); [`name_fits`]: AMQP's length
//!   limit on those names.
//! - [`split_query`], [`percent_decode`], [`percent_encode`]: the URL rules, for programs that
//!   take an AMQP URL with parameters of their own (the `herald` CLI's `--to`).
//!
//! - [`metrics`]: the names of the metrics it adds (connection blocked, connected, reconnects,
//!   returned and nacked messages).
//!
//! lapin's types never appear in this crate's API.
//!
//! ```no_run
//! use herald_amqp::{AmqpConfig, AmqpTransport};
//! use herald_core::{Message, Producer};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = AmqpTransport::new(AmqpConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2F")?)?;
//! transport.connect().await?; // optional: surfaces a wrong URL or credentials now
//! let producer = Producer::builder(transport).build()?;
//! producer.send(Message::new(herald_amqp::queue("orders"), "created #42").with_key("customer-7")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Crate feature flags
//!
//! - `baseline`: the [`baseline`] module, raw lapin publishing at its best and at its most
//!   naive, and the `amqp-baseline` binary on it, that `cargo xtask bench amqp` and
//!   `herald bench --baseline` compare herald with.

mod config;
mod confirms;
mod connection;
mod destination;
mod error;
pub mod metrics;
mod publish;
mod topology;
mod transport;
mod url;

#[cfg(feature = "baseline")]
pub mod baseline;

pub use config::{AmqpConfig, DEFAULT_KEY_HEADER};
pub use destination::{exchange, name_fits, queue, MAX_NAME_BYTES};
pub use error::ConfigError;
pub use topology::{Declare, ExchangeKind};
pub use transport::AmqpTransport;
pub use url::{percent_decode, percent_encode, split_query, Route, QUERY_PARAMETERS};
