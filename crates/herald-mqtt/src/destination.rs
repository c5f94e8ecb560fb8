//! Destinations: a herald [`Destination`] is the MQTT topic a message is published to; and
//! MQTT's rules for a topic one publishes to, as public functions the command reuses.

use herald_core::{Destination, TransportError};

/// The longest topic MQTT can carry, in bytes of UTF-8 (a two-byte length prefix).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// A destination that is the topic `name` (`plant/line-3/temperature`). MQTT brokers keep no
/// store per topic: a message is handed to the subscribers matching its topic when it
/// arrives (and kept for those with persistent sessions), so a topic needs no declaration.
pub fn topic(name: &str) -> Destination {
    Destination::new(name)
}

/// What MQTT text may not hold without a broker being free to drop the client: besides NUL
/// (never allowed), the control characters U+0001–U+001F and U+007F–U+009F and the Unicode
/// non-characters (U+FDD0–U+FDEF, and U+xFFFE and U+xFFFF of every plane). MQTT 5 (1.5.4)
/// lets a receiver treat them as a malformed packet; Mosquitto does, and closes the
/// connection. Says which, as a phrase that follows "holds".
pub(crate) fn refused_char(text: &str) -> Option<String> {
    // Printable ASCII, what keys and header values mostly are, holds none of them: known from
    // the bytes, without decoding characters (this runs for every message's key).
    if text.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        return None;
    }
    let c = text.chars().find(|&c| {
        let n = u32::from(c);
        n <= 0x1F
            || (0x7F..=0x9F).contains(&n)
            || (0xFDD0..=0xFDEF).contains(&n)
            || n & 0xFFFE == 0xFFFE
    })?;
    let what = if c == '\0' {
        "a NUL character"
    } else if u32::from(c) <= 0x9F {
        "a control character"
    } else {
        "a Unicode non-character"
    };
    Some(format!(
        "{what} (U+{:04X}), which MQTT lets a broker refuse by closing the connection",
        u32::from(c)
    ))
}

/// Whether one can publish to `topic`: not empty, at most [`MAX_TOPIC_BYTES`] bytes, no NUL,
/// control or non-character (which a broker may refuse by dropping the client), and no
/// wildcard (`+` or `#`: those select topics in a subscription, they are
/// not one). Slashes are level separators; empty levels (`a//b`, `/a`) are allowed, as MQTT
/// allows them. `Err` says what is wrong, as a phrase that follows "the topic" (`is empty`).
///
/// ```
/// use herald_mqtt::validate_topic;
/// assert!(validate_topic("plant/line-3/temperature").is_ok());
/// assert!(validate_topic("plant/+/temperature").is_err());
/// assert!(validate_topic("plant/#").is_err());
/// assert!(validate_topic("").is_err());
/// ```
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("is empty".into());
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(format!("is longer than {MAX_TOPIC_BYTES} bytes"));
    }
    if let Some(refused) = refused_char(topic) {
        return Err(format!("holds {refused}"));
    }
    if let Some(w) = topic.chars().find(|c| matches!(c, '+' | '#')) {
        return Err(format!(
            "holds the wildcard `{w}`: messages are published to one concrete topic"
        ));
    }
    // The broker's own topics, and shared subscriptions' filters: no broker takes a publish
    // there (Mosquitto drops it, and over MQTT 3.1.1 acknowledges it as if taken). Other `$`
    // topics are a broker's to allow (AWS IoT's `$aws/...`).
    if let Some(prefix) = ["$SYS/", "$share/"]
        .into_iter()
        .find(|p| topic.starts_with(p))
    {
        return Err(format!(
            "starts with `{prefix}`, which is the broker's own (`$SYS`) or a shared subscription's filter (`$share`), not a topic clients publish to"
        ));
    }
    Ok(())
}

/// The topic of a destination, or a permanent `INVALID_DESTINATION` error saying why it is
/// not one.
pub(crate) fn parse(d: &Destination) -> Result<String, TransportError> {
    validate_topic(d.as_str()).map_err(|reason| {
        TransportError::permanent(format!(
            "destination `{d}` is not an MQTT topic one can publish to: it {reason}"
        ))
        .with_code("INVALID_DESTINATION")
    })?;
    Ok(d.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::ErrorClass;

    #[test]
    fn topics_to_publish_to() {
        for good in [
            "orders",
            "plant/line-3/temperature",
            "/leading",
            "a//b",
            "café/été",
            "a\u{a0}b\u{fdcf}\u{fdf0}\u{fffd}",
            "$app/x",
            " a b~",
        ] {
            assert!(validate_topic(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("", "is empty"),
            ("a/+/b", "wildcard `+`"),
            ("a/#", "wildcard `#`"),
            ("a+b", "wildcard `+`"),
            ("a\0b", "NUL"),
            ("a\tb", "control character (U+0009)"),
            ("a\u{7f}b", "control character (U+007F)"),
            ("a\u{9f}b", "control character (U+009F)"),
            ("a\u{fdd0}b", "non-character (U+FDD0)"),
            ("a\u{fffe}", "non-character (U+FFFE)"),
            ("a\u{10ffff}", "non-character (U+10FFFF)"),
            ("$SYS/broker/uptime", "`$SYS/`"),
            ("$share/group/orders", "`$share/`"),
        ] {
            let e = validate_topic(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert!(validate_topic(&"x".repeat(MAX_TOPIC_BYTES)).is_ok());
        assert!(validate_topic(&"x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
        let e = parse(&Destination::new("a/#")).expect_err("wildcard");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
        );
        assert!(e.message().contains("`a/#`"), "{e}");
        assert_eq!(parse(&topic("a/b")).ok().as_deref(), Some("a/b"));
    }
}
