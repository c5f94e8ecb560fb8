//! The message vocabulary: what an application hands to herald.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use thin_vec::ThinVec;

/// Where a message goes: a Kafka topic, an AMQP exchange or queue, as the transport reads it.
///
/// Cheap to clone (a shared string), so build it once and clone it into each message. Equality and
/// hashing are by name.
#[derive(Clone, Eq, PartialOrd, Ord)]
pub struct Destination(Arc<str>);

/// By name, and at once for clones of one destination: the producer compares each message's
/// destination with its queue's (`Arc<str>` compares its bytes even when both point to the same
/// string; `Arc`'s pointer check before comparing is for sized values only).
impl PartialEq for Destination {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

/// By name, as equality.
impl std::hash::Hash for Destination {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

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
///
/// Every message gets a [`MessageId`] when a producer accepts it (unless it was given one with
/// [`Message::with_id`]); the id stays with it through retries and when it is handed back in a
/// `SendError`, so sending a failed message again keeps its id. Equality and hashing compare
/// content (destination, key, payload, headers), not the id.
pub struct Message {
    destination: Destination,
    key: Option<Bytes>,
    payload: Bytes,
    /// One pointer wide, with nothing allocated while empty (most messages): a message is
    /// moved several times on the hot path, and a `Vec` here (24 bytes) kept it above the 128
    /// bytes that x86-64 moves in registers (see the size check below).
    pub(crate) headers: ThinVec<Header>,
    id: Option<MessageId>,
    /// Its producer span from acceptance to its fate (feature `otel`, see `crate::trace`):
    /// boxed, and `None` when no subscriber records it, so that it costs a message 8 bytes
    /// instead of 40 (a message is moved several times on the hot path).
    #[cfg(feature = "otel")]
    pub(crate) span: Option<Box<tracing::Span>>,
}

/// A copy is the same message without its producer span (feature `otel`): the span ends with
/// the fate of the one the producer accepted, not when the last copy (one a test transport
/// kept, say) is dropped.
impl Clone for Message {
    fn clone(&self) -> Self {
        Self {
            destination: self.destination.clone(),
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers: self.headers.clone(),
            id: self.id,
            #[cfg(feature = "otel")]
            span: None,
        }
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.destination == other.destination
            && self.key == other.key
            && self.payload == other.payload
            && self.headers() == other.headers()
    }
}

impl Eq for Message {}

impl std::hash::Hash for Message {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.destination.hash(state);
        self.key.hash(state);
        self.payload.hash(state);
        self.headers().hash(state);
    }
}

/// A message's identity: 128 bits in the UUIDv7 layout (48 bits of Unix time in milliseconds,
/// then random bits), so ids sort roughly by acceptance time and never repeat in practice.
///
/// Assigned when a producer accepts the message, kept across retries, and sent to the broker
/// (AMQP `message_id`; a Kafka header when `KafkaConfig::message_id_header` is set) so that
/// consumers can drop the duplicates that
/// at-least-once delivery allows. `Display` is the usual 36-character UUID text.
///
/// Held as two 64-bit halves, high first (so that the derived order is the number's), rather
/// than one `u128`: a `u128` is 16-byte aligned, which made `Option<MessageId>` 32 bytes and
/// every [`Message`] 8 to 16 bytes larger, moved several times per message on the hot path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    high: u64,
    low: u64,
}

impl MessageId {
    /// An id from its 128 bits (for example one read back from a broker).
    pub const fn from_u128(bits: u128) -> Self {
        Self {
            high: (bits >> 64) as u64,
            low: bits as u64,
        }
    }
    /// Its 128 bits.
    pub const fn as_u128(self) -> u128 {
        (self.high as u128) << 64 | self.low as u128
    }
    /// Its 16 bytes, big-endian (the UUID byte order).
    pub const fn to_bytes(self) -> [u8; 16] {
        self.as_u128().to_be_bytes()
    }
    /// Its 36-character UUID text, as `Display` writes it, without allocating or going through
    /// a formatter: for adapters that put the id on every message (a formatter's `to_string`
    /// costs several times more).
    pub fn text(self) -> IdText {
        let mut text = [0u8; 36];
        uuid::Uuid::from_u128(self.as_u128())
            .hyphenated()
            .encode_lower(&mut text);
        IdText(text)
    }
    /// An id for a message accepted at `unix_millis`, with `random` as its other bits.
    pub(crate) fn v7(unix_millis: u64, random: u128) -> Self {
        let mut bytes = [0u8; 10];
        bytes.copy_from_slice(&random.to_be_bytes()[..10]);
        let uuid = uuid::Builder::from_unix_timestamp_millis(unix_millis, &bytes).into_uuid();
        Self::from_u128(uuid.as_u128())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_u128(self.as_u128()).hyphenated(), f)
    }
}

/// A [`MessageId`]'s UUID text ([`MessageId::text`]): a `str` of 36 bytes, on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdText([u8; 36]);

impl std::ops::Deref for IdText {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a UUID's text is ASCII")
    }
}

impl fmt::Debug for IdText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl std::str::FromStr for MessageId {
    type Err = InvalidMessageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::try_parse(s)
            .map(|u| Self::from_u128(u.as_u128()))
            .map_err(|_| InvalidMessageId)
    }
}

/// Text that is not a message id (a UUID, 32 hex digits with or without hyphens).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a message id: expected a UUID such as 0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70")]
pub struct InvalidMessageId;

impl Message {
    /// A message with a payload and no key.
    pub fn new(destination: impl Into<Destination>, payload: impl Into<Bytes>) -> Self {
        Self {
            destination: destination.into(),
            key: None,
            payload: payload.into(),
            headers: ThinVec::new(),
            id: None,
            #[cfg(feature = "otel")]
            span: None,
        }
    }
    /// Gives the message its id now, instead of at acceptance: to send it again under the id
    /// it had (read from a dead-letter record, say), so that consumers see one message.
    #[must_use]
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }
    /// Its id: set by [`Message::with_id`] or when a producer accepted it; `None` before. Inside
    /// a transport's `send_batch` every message has one.
    pub fn id(&self) -> Option<MessageId> {
        self.id
    }
    pub(crate) fn id_or_insert_with(&mut self, make: impl FnOnce() -> MessageId) -> MessageId {
        *self.id.get_or_insert_with(make)
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
    /// Sends it somewhere else, keeping everything else (its id included).
    #[must_use]
    pub fn with_destination(mut self, destination: impl Into<Destination>) -> Self {
        self.destination = destination.into();
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
                .headers()
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
    }
    /// Takes the message apart. A message with headers copies them into the `Vec` (they are
    /// kept in a smaller list, see `Message`'s size check).
    pub fn into_parts(self) -> (Destination, Option<Bytes>, Bytes, Vec<Header>) {
        (
            self.destination,
            self.key,
            self.payload,
            self.headers.into(),
        )
    }
}

/// Payloads and keys are shown by length only: they may hold personal data or secrets.
impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("destination", &self.destination)
            .field("key_len", &self.key.as_ref().map(Bytes::len))
            .field("payload_len", &self.payload.len())
            .field("headers", &self.headers().len())
            .field("id", &self.id)
            .finish()
    }
}

/// A message is moved several times between the caller and the transport, so its size is paid
/// per message: 176 bytes → 136 (with `otel`; 144 → 128 without) took a quarter of the
/// instructions off `send_all` (docs/benchmarks.md, "A smaller `Message`"), and 136 → 120
/// (headers behind one pointer, a `ThinVec`) brought it under the 128 bytes that x86-64
/// moves in registers rather than through a call to `memcpy` ("Headers behind a pointer"
/// there). Checked when the crate compiles, with or without `otel` (its span adds 8 bytes), so
/// that it cannot grow back unnoticed.
#[cfg(target_pointer_width = "64")]
const _: () = {
    let limit = if cfg!(feature = "otel") { 120 } else { 112 };
    assert!(std::mem::size_of::<Message>() <= limit, "a Message grew");
    assert!(std::mem::size_of::<Option<MessageId>>() == 24);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_equal_and_hash_alike_by_name_whether_shared_or_not() {
        use std::hash::BuildHasher;
        let orders = Destination::new("orders");
        let same_name = Destination::new(String::from("orders"));
        let hasher = std::collections::hash_map::RandomState::new();
        for other in [orders.clone(), same_name] {
            assert_eq!(orders, other);
            assert_eq!(hasher.hash_one(&orders), hasher.hash_one(&other));
            assert_eq!(hasher.hash_one(&orders), hasher.hash_one("orders"));
        }
        assert_ne!(orders, Destination::new("order"));
    }

    #[test]
    fn headers_keep_their_order_and_a_message_without_any_allocates_none() {
        let bare = Message::new("t", "p");
        assert!(bare.headers().is_empty());
        assert!(
            !bare.headers.has_capacity(),
            "no allocation without headers"
        );
        let m = Message::new("t", "p")
            .with_header("a", "1")
            .with_header("b", "2");
        let names: Vec<&str> = m.headers().iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(m.size(), 1 + 2 + 2);
        assert_eq!(m.clone(), m);
        assert_ne!(m, bare);
        let (_, _, _, headers) = m.into_parts();
        assert_eq!(headers.len(), 2);
        assert!(bare.into_parts().3.is_empty());
    }

    #[test]
    fn ids_are_uuid_v7_in_time_order_and_round_trip_as_text() {
        let early = MessageId::v7(1_700_000_000_000, u128::MAX);
        let late = MessageId::v7(1_700_000_000_001, 0);
        assert!(early < late, "time-ordered");
        let text = early.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "7", "version 7: {text}");
        assert_eq!(text.parse::<MessageId>(), Ok(early));
        assert_eq!("not-an-id".parse::<MessageId>(), Err(InvalidMessageId));
        assert_eq!(MessageId::from_u128(early.as_u128()), early);
        assert_eq!(early.to_bytes(), early.as_u128().to_be_bytes());
    }

    #[test]
    fn ids_order_and_round_trip_as_the_128_bit_number() {
        let edges = [
            0,
            1,
            u64::MAX as u128,
            1 << 64,
            (1 << 64) + 1,
            u128::MAX - 1,
            u128::MAX,
        ];
        for a in edges {
            assert_eq!(MessageId::from_u128(a).as_u128(), a, "{a:x}");
            for b in edges {
                let (ia, ib) = (MessageId::from_u128(a), MessageId::from_u128(b));
                assert_eq!(ia.cmp(&ib), a.cmp(&b), "{a:x} against {b:x}");
            }
        }
    }

    #[test]
    fn an_id_s_text_is_its_display() {
        for bits in [
            0,
            u128::MAX,
            0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70,
            1 << 100,
        ] {
            let id = MessageId::from_u128(bits);
            assert_eq!(&*id.text(), id.to_string(), "{bits:x}");
        }
        assert_eq!(
            &*MessageId::from_u128(0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70).text(),
            "0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70"
        );
    }

    #[test]
    fn equality_is_by_content_and_the_id_stays_once_given() {
        let id = MessageId::v7(1, 2);
        let plain = Message::new("t", "p").with_key("k");
        let mut with = plain.clone().with_id(id);
        assert_eq!(plain, with);
        assert_eq!(with.id_or_insert_with(|| MessageId::v7(9, 9)), id);
        assert_eq!(with.id(), Some(id));
    }

    #[test]
    fn debug_hides_payload_and_key() {
        let m = Message::new("t", "secret-payload").with_key("secret-key");
        let s = format!("{m:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("payload_len: 14"), "{s}");
    }
}
