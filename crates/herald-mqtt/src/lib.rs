//! herald-mqtt: a herald [`Transport`](herald_core::Transport) for MQTT brokers (Mosquitto,
//! EMQX, HiveMQ, VerneMQ, …): a session of its own on the socket, with the packet codec of
//! [rumqttc](https://docs.rs/rumqttc) for CONNECT and CONNACK.
//!
//! - [`MqttConfig`]: an `mqtt://` / `mqtts://` URL
//!   (`mqtt://[user:password@]host:port/TOPIC?qos=1&version=5`) plus typed options (ack
//!   timeout, window, connect timeout, reconnect backoff, keep-alive, maximum packet size, the
//!   user properties that carry the key and the message id).
//! - [`MqttTransport`]: QoS 1 publishes acknowledged by their PUBACK (QoS 2: by their
//!   PUBCOMP), many in flight; MQTT 5 by default, with the herald key, message id and headers
//!   as user properties; MQTT 3.1.1 on request (`?version=3`), refusing what it cannot carry;
//!   a lost connection replaced by a new one with a clean session, never resumed, so that
//!   per-key order holds.
//! - [`topic`], [`validate_topic`]: how a herald [`Destination`](herald_core::Destination)
//!   names an MQTT topic, and MQTT's rules for a topic one publishes to.
//! - [`metrics`]: the names of the metrics it adds (connected, connections opened, lost and
//!   abandoned, connect failures, refused publishes, publishes without subscribers).
//!
//! rumqttc's types never appear in this crate's API.
//!
//! Why its own session rather than rumqttc's event loop: one write for a batch's publishes
//! rather than one for each, PINGREQs without rumqttc's millisecond of delay, and every
//! acknowledgement read whatever its reason code (`wire`'s documentation says more).
//!
//! ```no_run
//! use herald_core::{Message, Producer};
//! use herald_mqtt::{MqttConfig, MqttTransport};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = MqttConfig::from_url("mqtt://127.0.0.1:1883/plant/line-3/temperature")?;
//! let temperature = config.destination().expect("the URL names a topic");
//! let transport = MqttTransport::new(config)?;
//! transport.connect().await?; // optional: surfaces a wrong URL or credentials now
//! let producer = Producer::builder(transport).build()?;
//! producer.send(Message::new(temperature, "21.5").with_key("sensor-7")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Crate feature flags
//!
//! - `baseline`: the `baseline` module, raw rumqttc publishing at its best and at its most
//!   naive, and one message at a time on a schedule (`herald bench --rate --baseline`), and
//!   the `mqtt-baseline` binary on it, that `herald bench --baseline` (and
//!   `cargo xtask bench mqtt`) compare herald with.

mod answers;
mod config;
mod connection;
mod destination;
mod error;
pub mod metrics;
mod publish;
mod transport;
mod url;
mod wire;

#[cfg(feature = "baseline")]
pub mod baseline;

pub use config::{MqttConfig, Qos, Version};
pub use destination::{topic, validate_topic, MAX_TOPIC_BYTES};
pub use error::ConfigError;
pub use transport::MqttTransport;
pub use url::{DEFAULT_PORT, DEFAULT_TLS_PORT, QUERY_PARAMETERS};
