//! From a herald [`Destination`] to a Kafka topic: the destination is the topic's name, checked
//! against Kafka's rules before librdkafka sees it (librdkafka would otherwise create a topic
//! handle for it and report the problem per message, later and less clearly).
//!
//! [`validate_topic_name`] is the one statement of those rules; the `herald` CLI checks the
//! topic of a `kafka://` URL with it too.

use herald_core::{Destination, TransportError};

/// The longest topic name Kafka accepts, in bytes (all of them ASCII).
const MAX_TOPIC_LEN: usize = 249;

/// Why a name is not a valid Kafka topic name. Its `Display` is the reason alone (`it is
/// empty`), to follow the name: herald's own errors read "invalid Kafka topic name `NAME`:
/// REASON".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicNameError {
    /// The name is empty.
    #[error("it is empty")]
    Empty,
    /// The name is `.` or `..`, which Kafka reserves.
    #[error("`.` and `..` are not allowed")]
    Dots,
    /// The name is longer than 249 characters.
    #[error("longer than 249 characters")]
    TooLong,
    /// The name holds this character; only ASCII letters, digits, `.`, `_` and `-` are allowed.
    #[error("`{0}` is not allowed (only ASCII letters, digits, `.`, `_`, `-`)")]
    Char(char),
}

/// Checks `name` against Kafka's rules for topic names: not empty, not `.` or `..`, at most 249
/// characters, only ASCII letters, digits, `.`, `_` and `-`. The first rule broken, in that
/// order, is the one reported.
pub fn validate_topic_name(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(TopicNameError::Dots);
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(TopicNameError::TooLong);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(TopicNameError::Char(c));
    }
    Ok(())
}

/// The topic `destination` names, or the permanent error every message sent there gets.
pub(crate) fn topic(destination: &Destination) -> Result<&str, TransportError> {
    let name = destination.as_str();
    validate_topic_name(name).map_err(|why| {
        TransportError::permanent(format!("invalid Kafka topic name `{name}`: {why}"))
            .with_code("INVALID_TOPIC_NAME")
    })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str) -> Result<&str, TransportError> {
        topic(&Destination::new(name)).map(|_| name)
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check("orders.v1_EU-west").is_ok());
        let e = check("bad topic").expect_err("space");
        assert!(
            e.to_string()
                .contains("invalid Kafka topic name `bad topic`"),
            "{e}"
        );
        assert_eq!(e.class(), herald_core::ErrorClass::Permanent);
        assert!(check("").is_err());
        assert!(check("..").is_err());
        assert!(check(&"x".repeat(250)).is_err());
    }

    #[test]
    fn each_rule_has_its_reason() {
        assert_eq!(validate_topic_name(""), Err(TopicNameError::Empty));
        assert_eq!(validate_topic_name("."), Err(TopicNameError::Dots));
        assert_eq!(validate_topic_name(".."), Err(TopicNameError::Dots));
        assert_eq!(validate_topic_name("..."), Ok(()));
        assert_eq!(validate_topic_name(&"x".repeat(249)), Ok(()));
        // Length is checked before characters.
        assert_eq!(
            validate_topic_name(&"é".repeat(125)),
            Err(TopicNameError::TooLong)
        );
        assert_eq!(validate_topic_name("a/b"), Err(TopicNameError::Char('/')));
        assert_eq!(
            TopicNameError::Char(' ').to_string(),
            "` ` is not allowed (only ASCII letters, digits, `.`, `_`, `-`)"
        );
    }
}
