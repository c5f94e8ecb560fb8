//! Destinations: a herald [`Destination`] is the key of the Redis stream a message is appended
//! to (`XADD key * ...`), created by Redis on the first append; and the rules for such keys, as
//! public functions the command reuses.

use herald_core::{Destination, TransportError};

/// A destination that is the stream key `key` (`orders`, `orders:eu`, `app/orders`). Redis
/// creates the stream on the first `XADD`; a key that holds another type (a string, a list)
/// fails every message as permanent `WRONGTYPE`.
pub fn stream(key: &str) -> Destination {
    Destination::new(key)
}

/// Whether `key` can name a stream in herald: not empty and no control characters (Redis keys
/// are binary-safe, but a herald destination is text, shown in logs and reports). `Err` says
/// what is wrong, as a phrase that follows "the stream key".
///
/// ```
/// use herald_redis::validate_stream_key;
/// assert!(validate_stream_key("orders:eu").is_ok());
/// assert!(validate_stream_key("").is_err());
/// ```
pub fn validate_stream_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("is empty".into());
    }
    if key.chars().any(char::is_control) {
        return Err("holds a control character".into());
    }
    Ok(())
}

/// The stream key of a destination, or a permanent `INVALID_DESTINATION` error saying why it
/// is not one.
pub(crate) fn parse(d: &Destination) -> Result<&str, TransportError> {
    validate_stream_key(d.as_str()).map_err(|reason| {
        TransportError::permanent(format!(
            "destination `{}` is not a Redis stream key: it {reason}",
            d.as_str().escape_debug()
        ))
        .with_code("INVALID_DESTINATION")
    })?;
    Ok(d.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::ErrorClass;

    #[test]
    fn stream_keys() {
        for good in ["orders", "orders:eu", "app/orders", "a b", "café", "42"] {
            assert!(validate_stream_key(good).is_ok(), "{good}");
        }
        for (bad, says) in [("", "is empty"), ("a\nb", "control"), ("a\0b", "control")] {
            let e = validate_stream_key(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let e = parse(&Destination::new("")).expect_err("empty");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
        );
        assert_eq!(parse(&stream("orders:eu")).ok(), Some("orders:eu"));
    }
}
