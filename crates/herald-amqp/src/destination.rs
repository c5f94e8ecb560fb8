//! Destinations: how a herald [`Destination`] names an AMQP exchange and routing key, and the
//! length rule AMQP names follow.

use herald_core::{Destination, TransportError};

/// The longest exchange name, queue name or routing key, in bytes: AMQP carries them as short
/// strings, whose length is a single byte.
pub const MAX_NAME_BYTES: usize = 255;

/// Whether `name` (an exchange, a queue, a routing key or a header's name) fits in an AMQP
/// short string: at most [`MAX_NAME_BYTES`] bytes.
pub fn name_fits(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES
}

/// Where a [`Destination`] goes, in AMQP terms.
///
/// - `"orders"`: the default exchange (`""`) with routing key `orders`, that is straight into
///   the queue `orders`.
/// - `"events/order.created"`: the exchange `events` with routing key `order.created`.
/// - `"events/"`: the exchange `events` with an empty routing key (fanout).
///
/// AMQP names cannot hold `/`, so the first `/` always separates exchange and routing key.
/// Build destinations with [`queue`] and [`exchange`] rather than by hand.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Route {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
}

impl Route {
    pub(crate) fn parse(d: &Destination) -> Result<Self, TransportError> {
        let (exchange, routing_key) = d.as_str().split_once('/').unwrap_or(("", d.as_str()));
        if !name_fits(exchange) || !name_fits(routing_key) {
            return Err(TransportError::permanent(format!(
                "destination `{d}`: AMQP exchange names and routing keys are at most {MAX_NAME_BYTES} bytes"
            ))
            .with_code("INVALID_DESTINATION"));
        }
        if exchange.is_empty() && routing_key.is_empty() {
            return Err(TransportError::permanent(
                "empty destination: name a queue, or `exchange/routing-key`",
            )
            .with_code("INVALID_DESTINATION"));
        }
        Ok(Self {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        })
    }

    pub(crate) fn describe(&self) -> String {
        if self.exchange.is_empty() {
            format!("queue \"{}\" (default exchange)", self.routing_key)
        } else {
            format!(
                "exchange \"{}\" routing key \"{}\"",
                self.exchange, self.routing_key
            )
        }
    }
}

/// A destination that is the queue `name`, reached through the default exchange.
pub fn queue(name: &str) -> Destination {
    Destination::new(name)
}

/// A destination that is `exchange`, with `routing_key` (may be empty for fanout exchanges).
pub fn exchange(exchange: &str, routing_key: &str) -> Destination {
    Destination::new(format!("{exchange}/{routing_key}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::ErrorClass;

    #[test]
    fn destinations_map_to_exchange_and_routing_key() {
        let r = Route::parse(&queue("orders")).expect("valid");
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("", "orders")
        );
        let r = Route::parse(&exchange("events", "order.created")).expect("valid");
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("events", "order.created")
        );
        let r = Route::parse(&exchange("fan", "")).expect("valid");
        assert_eq!((r.exchange.as_str(), r.routing_key.as_str()), ("fan", ""));
        let e = Route::parse(&Destination::new("")).expect_err("empty");
        assert_eq!(e.class(), ErrorClass::Permanent);
        let long = "x".repeat(256);
        assert!(Route::parse(&Destination::new(long)).is_err());
    }

    #[test]
    fn names_fit_in_a_short_string() {
        assert!(name_fits(""));
        assert!(name_fits(&"x".repeat(MAX_NAME_BYTES)));
        assert!(!name_fits(&"x".repeat(MAX_NAME_BYTES + 1)));
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        assert!(!name_fits(&"é".repeat(128)));
        let e = Route::parse(&exchange("e", &"k".repeat(256))).expect_err("too long");
        assert!(e.message().contains("at most 255 bytes"), "{e}");
    }
}
