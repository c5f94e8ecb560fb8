//! The record framing: one message as bytes in a segment file, and back.
//!
//! ```text
//! offset  size  field
//!      0     4  magic  "HSPL"
//!      4     1  version (1)
//!      5     1  flags: bit 0 = key present, bit 1 = message id present; others 0
//!      6     2  reserved, 0
//!      8     4  body length, u32 little-endian
//!     12     4  CRC-32 (IEEE) of bytes 0..12, 16..32 and the body
//!     16     8  sequence number (the SpoolId), u64 LE
//!     24     8  append time, Unix milliseconds, u64 LE
//!     32     -  body:
//!                 [id: 16 bytes, big-endian]                    if flag bit 1
//!                 destination: u32 LE length, UTF-8 bytes
//!                 [key: u32 LE length, bytes]                   if flag bit 0
//!                 header count: u32 LE, then per header:
//!                   name: u32 LE length, UTF-8 bytes; value: u32 LE length, bytes
//!                 payload: u32 LE length, bytes
//! ```
//!
//! The first 16 bytes (magic to CRC), the 32-byte header length and the CRC's coverage are the
//! same in every version, so a reader can verify a record of a newer version and refuse it
//! rather than take it for damage.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::{Bytes, Message, MessageId};

/// Every record starts with these bytes.
pub(crate) const MAGIC: [u8; 4] = *b"HSPL";
/// The version this build writes and reads.
pub(crate) const VERSION: u8 = 1;
/// Bytes before the body.
pub(crate) const HEADER_LEN: usize = 32;
/// The largest body a reader accepts (a segment is at most 1 GiB).
pub(crate) const MAX_BODY: u32 = 1 << 30;

const FLAG_KEY: u8 = 1;
const FLAG_ID: u8 = 2;

/// A record's header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) version: u8,
    pub(crate) flags: u8,
    pub(crate) body_len: u32,
    pub(crate) crc: u32,
    pub(crate) seq: u64,
    pub(crate) time_ms: u64,
}

impl Header {
    /// Header and body.
    pub(crate) fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.body_len)
    }
}

/// Parses the fixed header; says why it cannot be one. The CRC is checked separately.
pub(crate) fn parse_header(b: &[u8; HEADER_LEN]) -> Result<Header, &'static str> {
    if b[0..4] != MAGIC {
        return Err("no record magic");
    }
    if b[4] == 0 {
        return Err("version 0");
    }
    if b[6..8] != [0, 0] {
        return Err("reserved header bytes are not zero");
    }
    let body_len = u32_at(b, 8);
    if body_len > MAX_BODY {
        return Err("impossible body length");
    }
    Ok(Header {
        version: b[4],
        flags: b[5],
        body_len,
        crc: u32_at(b, 12),
        seq: u64_at(b, 16),
        time_ms: u64_at(b, 24),
    })
}

/// The CRC a record with this header and body must carry.
pub(crate) fn crc_of(header: &[u8; HEADER_LEN], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[0..12]);
    h.update(&header[16..HEADER_LEN]);
    h.update(body);
    h.finalize()
}

/// A message encoded as a record whose sequence number and time are filled in by [`seal`]
/// (the checksum of the body, the costly part, is computed before, outside any lock).
///
/// [`seal`]: Encoded::seal
pub(crate) struct Encoded {
    bytes: Vec<u8>,
    body_crc: crc32fast::Hasher,
}

impl Encoded {
    /// Header and body.
    pub(crate) fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    /// Gives the record its sequence number and time, and its CRC.
    pub(crate) fn seal(&mut self, seq: u64, time_ms: u64) -> &[u8] {
        self.bytes[16..24].copy_from_slice(&seq.to_le_bytes());
        self.bytes[24..32].copy_from_slice(&time_ms.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&self.bytes[0..12]);
        h.update(&self.bytes[16..HEADER_LEN]);
        h.combine(&self.body_crc);
        let crc = h.finalize();
        self.bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        &self.bytes
    }
}

/// The encoded size of `message` (header included), without encoding it.
pub(crate) fn encoded_len(message: &Message) -> u64 {
    let mut n = HEADER_LEN as u64 + 4 + message.destination().as_str().len() as u64 + 4 + 4;
    if message.id().is_some() {
        n += 16;
    }
    if let Some(key) = message.key() {
        n += 4 + key.len() as u64;
    }
    for h in message.headers() {
        n += 8 + h.name.len() as u64 + h.value.len() as u64;
    }
    n + message.payload().len() as u64
}

/// Encodes `message`, or returns its encoded size if its body would exceed [`MAX_BODY`].
pub(crate) fn encode(message: &Message) -> Result<Encoded, u64> {
    let len = encoded_len(message);
    let body_len = len - HEADER_LEN as u64;
    if body_len > u64::from(MAX_BODY) {
        return Err(len);
    }
    let mut bytes = Vec::with_capacity(len as usize);
    let mut flags = 0;
    if message.key().is_some() {
        flags |= FLAG_KEY;
    }
    if message.id().is_some() {
        flags |= FLAG_ID;
    }
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&[VERSION, flags, 0, 0]);
    bytes.extend_from_slice(&(body_len as u32).to_le_bytes());
    bytes.extend_from_slice(&[0; HEADER_LEN - 12]);
    if let Some(id) = message.id() {
        bytes.extend_from_slice(&id.to_bytes());
    }
    // Every length below is at most the body length, which fits in a u32.
    let put = |bytes: &mut Vec<u8>, field: &[u8]| {
        bytes.extend_from_slice(&(field.len() as u32).to_le_bytes());
        bytes.extend_from_slice(field);
    };
    put(&mut bytes, message.destination().as_str().as_bytes());
    if let Some(key) = message.key() {
        put(&mut bytes, key);
    }
    bytes.extend_from_slice(&(message.headers().len() as u32).to_le_bytes());
    for h in message.headers() {
        put(&mut bytes, h.name.as_bytes());
        put(&mut bytes, &h.value);
    }
    put(&mut bytes, message.payload());
    debug_assert_eq!(bytes.len() as u64, len);
    let mut body_crc = crc32fast::Hasher::new();
    body_crc.update(&bytes[HEADER_LEN..]);
    Ok(Encoded { bytes, body_crc })
}

/// Reads the body's fields in order; every length is checked against what is left.
struct Fields<'a> {
    body: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, &'static str> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.body.len())
            .ok_or("a field runs past the end of the body")?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let r = self.take(4)?;
        Ok(u32_at(self.body, r.start))
    }
    fn field(&mut self) -> Result<std::ops::Range<usize>, &'static str> {
        let n = self.u32()?;
        self.take(n as usize)
    }
    fn text(&mut self) -> Result<std::ops::Range<usize>, &'static str> {
        let r = self.field()?;
        std::str::from_utf8(&self.body[r.clone()]).map_err(|_| "a name is not UTF-8")?;
        Ok(r)
    }
}

/// Where each field of a body is.
struct Layout {
    id: Option<MessageId>,
    destination: std::ops::Range<usize>,
    key: Option<std::ops::Range<usize>>,
    headers: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    payload: std::ops::Range<usize>,
}

fn layout(flags: u8, body: &[u8]) -> Result<Layout, &'static str> {
    if flags & !(FLAG_KEY | FLAG_ID) != 0 {
        return Err("unknown flags");
    }
    let mut f = Fields { body, at: 0 };
    let id = if flags & FLAG_ID != 0 {
        let r = f.take(16)?;
        let mut b = [0u8; 16];
        b.copy_from_slice(&body[r]);
        Some(MessageId::from_u128(u128::from_be_bytes(b)))
    } else {
        None
    };
    let destination = f.text()?;
    let key = if flags & FLAG_KEY != 0 {
        Some(f.field()?)
    } else {
        None
    };
    let count = f.u32()?;
    // Each header takes at least 8 bytes: a count beyond that is damage, not a reason to
    // allocate.
    if count as usize > (body.len() - f.at) / 8 {
        return Err("more headers than the body can hold");
    }
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = f.text()?;
        let value = f.field()?;
        headers.push((name, value));
    }
    let payload = f.field()?;
    if f.at != body.len() {
        return Err("bytes left after the payload");
    }
    Ok(Layout {
        id,
        destination,
        key,
        headers,
        payload,
    })
}

/// Checks that a body holds a well-formed message, without building it.
pub(crate) fn validate_body(flags: u8, body: &[u8]) -> Result<(), &'static str> {
    layout(flags, body).map(|_| ())
}

/// The message a verified record holds. Its fields share `body`'s buffer (no copies).
pub(crate) fn decode(flags: u8, body: Bytes) -> Result<Message, &'static str> {
    let l = layout(flags, &body)?;
    let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&body[r]).into_owned();
    let mut message = Message::new(text(l.destination), body.slice(l.payload));
    if let Some(key) = l.key {
        message = message.with_key(body.slice(key));
    }
    for (name, value) in l.headers {
        message = message.with_header(text(name), body.slice(value));
    }
    if let Some(id) = l.id {
        message = message.with_id(id);
    }
    Ok(message)
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The `SystemTime` of a record's time stamp.
pub(crate) fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes, seals and reads back through the same steps a reader takes.
    fn round_trip(m: &Message, seq: u64, time: u64) -> (Header, Message) {
        let mut e = encode(m).expect("encodes");
        assert_eq!(e.len(), encoded_len(m));
        let bytes = e.seal(seq, time).to_vec();
        let head: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("32 bytes");
        let h = parse_header(&head).expect("a header");
        assert_eq!(h.record_len(), bytes.len() as u64);
        assert_eq!(crc_of(&head, &bytes[HEADER_LEN..]), h.crc, "CRC matches");
        validate_body(h.flags, &bytes[HEADER_LEN..]).expect("valid body");
        let back = decode(h.flags, Bytes::copy_from_slice(&bytes[HEADER_LEN..])).expect("decodes");
        (h, back)
    }

    fn same(a: &Message, b: &Message) {
        assert_eq!(a, b, "content");
        assert_eq!(a.id(), b.id(), "id");
        assert_eq!(a.key().is_some(), b.key().is_some(), "key presence");
    }

    #[test]
    fn every_field_round_trips() {
        let m = Message::new("orders.v1", "payload bytes")
            .with_key("customer-7")
            .with_header("trace-id", "abc")
            .with_header("empty", "")
            .with_header("bin", vec![0u8, 255, 7])
            .with_id(MessageId::from_u128(
                0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70,
            ));
        let (h, back) = round_trip(&m, 42, 1_700_000_000_123);
        same(&m, &back);
        assert_eq!(
            (h.seq, h.time_ms, h.version),
            (42, 1_700_000_000_123, VERSION)
        );
        assert_eq!(back.headers()[2].value.as_ref(), &[0u8, 255, 7]);
    }

    #[test]
    fn no_key_no_headers_no_id_and_empty_key_are_kept_apart() {
        let bare = Message::new("t", "");
        let (_, back) = round_trip(&bare, 0, 0);
        same(&bare, &back);
        assert_eq!(back.key(), None);
        assert_eq!(back.id(), None);
        assert!(back.headers().is_empty());
        let empty_key = Message::new("t", "").with_key("");
        let (_, back) = round_trip(&empty_key, u64::MAX, u64::MAX);
        same(&empty_key, &back);
        assert_eq!(back.key().map(|k| k.len()), Some(0));
    }

    #[test]
    fn a_large_payload_round_trips() {
        let payload: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let m = Message::new("big", payload).with_id(MessageId::from_u128(7));
        let (h, back) = round_trip(&m, 9, 9);
        same(&m, &back);
        assert_eq!(
            h.body_len as usize,
            back.payload().len() + 4 + 3 + 4 + 4 + 16
        );
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let m = Message::new("dest", "some payload")
            .with_key("k")
            .with_header("h", "v")
            .with_id(MessageId::from_u128(1));
        let mut e = encode(&m).expect("encodes");
        let good = e.seal(5, 6).to_vec();
        for at in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[at] ^= bit;
                let head: [u8; HEADER_LEN] = bad[..HEADER_LEN].try_into().expect("32 bytes");
                let verified = parse_header(&head)
                    .ok()
                    .filter(|h| h.record_len() == bad.len() as u64)
                    .is_some_and(|h| crc_of(&head, &bad[HEADER_LEN..]) == h.crc);
                assert!(
                    !verified,
                    "a flip of bit {bit:#x} at byte {at} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn bad_headers_and_bodies_say_why() {
        let mut e = encode(&Message::new("d", "p")).expect("encodes");
        let good: [u8; HEADER_LEN] = e.seal(1, 1)[..HEADER_LEN].try_into().expect("32");
        let mut h = good;
        h[0] = b'X';
        assert_eq!(parse_header(&h), Err("no record magic"));
        let mut h = good;
        h[4] = 0;
        assert_eq!(parse_header(&h), Err("version 0"));
        let mut h = good;
        h[7] = 1;
        assert_eq!(parse_header(&h), Err("reserved header bytes are not zero"));
        let mut h = good;
        h[8..12].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert_eq!(parse_header(&h), Err("impossible body length"));
        // Bodies whose lengths lie are refused, never read past their end or over-allocated.
        assert!(validate_body(0, &[1, 0, 0, 0]).is_err());
        assert!(validate_body(0, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(validate_body(0x80, &[]).is_err());
        let mut body = vec![0u8; 4]; // empty destination
        body.extend_from_slice(&0u32.to_le_bytes()); // no headers
        body.extend_from_slice(&0u32.to_le_bytes()); // empty payload
        assert_eq!(validate_body(0, &body), Ok(()));
        body.push(0);
        assert_eq!(validate_body(0, &body), Err("bytes left after the payload"));
        let mut not_utf8 = vec![1u8, 0, 0, 0, 0xff];
        not_utf8.extend_from_slice(&[0; 8]);
        assert_eq!(validate_body(0, &not_utf8), Err("a name is not UTF-8"));
    }
}
