//! The message vocabulary: what an application hands to herald.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// Where a message goes: a Kafka topic, an AMQP exchange or queue, as the transport reads it.
///
/// Cheap to clone (a shared string), so build it once and clone it into each message. Equality and
/// hashing are by name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination(Arc<str>);

impl Destination {
    /// A destination named `name`. Transports check the name when they first use it.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }
    /// The name, as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Destination {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Destination {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// One message header. Values are bytes; names are strings (Kafka and AMQP both key headers by
/// string).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: Bytes,
}

/// A message to produce: a destination, an optional key, a payload and headers.
///
/// The key decides ordering: messages with the same destination and key reach the broker in the
/// order they were sent (see the producer's ordering mode). Payload and key are [`Bytes`], so
/// cloning a message or handing it back inside an error copies no data.
///
/// ```
/// use herald_core::{Destination, Message};
/// let orders = Destination::new("orders");
/// let msg = Message::new(orders.clone(), "created #42")
///     .with_key("customer-7")
///     .with_header("trace-id", "abc123");
/// assert_eq!(msg.size(), "created #42".len() + "customer-7".len() + "trace-id".len() + 6);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Message {
    destination: Destination,
    key: Option<Bytes>,
    payload: Bytes,
    headers: Vec<Header>,
}

impl Message {
    /// A message with a payload and no key.
    pub fn new(destination: impl Into<Destination>, payload: impl Into<Bytes>) -> Self {
        Self {
            destination: destination.into(),
            key: None,
            payload: payload.into(),
            headers: Vec::new(),
        }
    }
    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }
    /// Where it goes.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }
    /// The key, if any.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }
    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// The headers, in the order they were added.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }
    /// Size counted against buffer and batch limits: payload, key, header names and values.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
    }
    /// Takes the message apart.
    pub fn into_parts(self) -> (Destination, Option<Bytes>, Bytes, Vec<Header>) {
        (self.destination, self.key, self.payload, self.headers)
    }
}

/// Payloads and keys are shown by length only: they may hold personal data or secrets.
impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("destination", &self.destination)
            .field("key_len", &self.key.as_ref().map(Bytes::len))
            .field("payload_len", &self.payload.len())
            .field("headers", &self.headers.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_payload_and_key() {
        let m = Message::new("t", "secret-payload").with_key("secret-key");
        let s = format!("{m:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("payload_len: 14"), "{s}");
    }
}
