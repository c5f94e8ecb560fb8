//! herald-redis: a herald [`Transport`](herald_core::Transport) for Redis Streams, on the
//! [redis](https://docs.rs/redis) crate.
//!
//! - [`RedisConfig`]: a `redis://` / `rediss://` URL
//!   (`redis://[user:password@]host:port[/DB]/STREAMKEY[?maxlen=N&wait=N&wait_timeout_ms=MS]`)
//!   plus typed options (ack timeout, connect timeout, reconnect backoff, largest message,
//!   trimming, `WAIT`, a CA file).
//! - [`RedisTransport`]: each batch one pipeline of `XADD`s, each message acknowledged by the
//!   entry id Redis replied with; a lost connection replaced by a new one, never resumed, so
//!   that per-key order holds.
//! - [`stream`], [`validate_stream_key`]: how a herald
//!   [`Destination`](herald_core::Destination) names a stream key.
//! - [`FIELD_PAYLOAD`], [`FIELD_KEY`], [`FIELD_ID`], [`HEADER_PREFIX`]: the fields of the
//!   entries it appends (headers as `h:NAME`, kept apart from the others by the prefix).
//! - [`metrics`]: the names of the metrics it adds (connected, connections opened, lost and
//!   abandoned, connect failures, server errors, short `WAIT`s).
//!
//! redis-rs's types never appear in this crate's API.
//!
//! ```no_run
//! use herald_core::{Message, Producer};
//! use herald_redis::{RedisConfig, RedisTransport};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RedisConfig::from_url("redis://127.0.0.1:6379/orders?maxlen=1000000")?;
//! let orders = config.destination().expect("the URL names a stream");
//! let transport = RedisTransport::new(config)?;
//! transport.connect().await?; // optional: surfaces a wrong URL, password or database now
//! let producer = Producer::builder(transport).build()?;
//! producer.send(Message::new(orders, "created #42").with_key("customer-7")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Crate feature flags
//!
//! - `baseline`: the `baseline` module, raw redis-rs appending at its best (pipelined `XADD`s)
//!   and at its most naive (each `XADD` awaited), and the `redis-baseline` binary on it, that
//!   `herald bench --baseline` (and a `cargo xtask bench redis`) compare herald with.

mod config;
mod connection;
mod destination;
mod error;
pub mod metrics;
mod publish;
mod transport;
mod url;

#[cfg(feature = "baseline")]
pub mod baseline;

pub use config::{RedisConfig, DEFAULT_MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES_LIMIT};
pub use destination::{stream, validate_stream_key};
pub use error::ConfigError;
pub use publish::{entry_id, entry_offset, FIELD_ID, FIELD_KEY, FIELD_PAYLOAD, HEADER_PREFIX};
pub use transport::RedisTransport;
pub use url::{DEFAULT_PORT, QUERY_PARAMETERS};
