//! herald-nats: a herald [`Transport`](herald_core::Transport) for NATS JetStream, on
//! [async-nats](https://docs.rs/async-nats).
//!
//! - [`NatsConfig`]: a `nats://` / `tls://` URL
//!   (`nats://[user:password@]host:port[,host:port...]/SUBJECT?stream=NAME`) plus typed options
//!   (ack timeout, window, connect timeout, reconnect backoff, key header, streams to declare,
//!   a `.creds` file or NKey seed to authenticate with, a CA file and a client certificate).
//! - [`NatsTransport`]: JetStream publishes, each message acknowledged by its PubAck; the
//!   herald message id as `Nats-Msg-Id`, so that JetStream drops the copy a retry would add;
//!   a lost connection replaced by a new one, never resumed, so that per-key order holds.
//! - [`subject`], [`validate_subject`], [`validate_stream_name`]: how a herald
//!   [`Destination`](herald_core::Destination) names a NATS subject, and NATS's naming rules.
//! - [`Declare`]: the streams declared on every new connection.
//! - [`metrics`]: the names of the metrics it adds (connected, connections opened, lost and
//!   abandoned, connect failures, duplicates dropped, server errors).
//!
//! async-nats's types never appear in this crate's API.
//!
//! ```no_run
//! use herald_core::{Message, Producer};
//! use herald_nats::{NatsConfig, NatsTransport};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = NatsConfig::from_url("nats://127.0.0.1:4222/orders.eu?stream=ORDERS")?;
//! let orders = config.destination().expect("the URL names a subject");
//! let transport = NatsTransport::new(config)?;
//! transport.connect().await?; // optional: surfaces a wrong URL, credentials or stream now
//! let producer = Producer::builder(transport).build()?;
//! producer.send(Message::new(orders, "created #42").with_key("customer-7")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Crate feature flags
//!
//! - `baseline`: the `baseline` module, raw async-nats publishing at its best and at its most
//!   naive, and the `nats-baseline` binary on it, that `herald bench --baseline` (and a
//!   `cargo xtask bench nats`) compare herald with.

mod auth;
mod config;
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

pub use config::NatsConfig;
pub use destination::{subject, validate_stream_name, validate_subject, MAX_STREAM_NAME_BYTES};
pub use error::ConfigError;
pub use topology::Declare;
pub use transport::NatsTransport;
pub use url::{DEFAULT_PORT, QUERY_PARAMETERS};
