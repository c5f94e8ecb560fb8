//! Destinations: a herald [`Destination`] is the NATS subject a message is published to, which
//! a JetStream stream captures; and NATS's naming rules for subjects and stream names, as public
//! functions the command reuses.

use herald_core::{Destination, TransportError};

/// The longest stream name accepted, in bytes (the server's limit on names that become
/// directory names of its file store).
pub const MAX_STREAM_NAME_BYTES: usize = 255;

/// A destination that is the subject `name` (`orders.created`, `billing.eu.invoices`). The
/// message goes to whichever JetStream stream captures that subject: a stream must exist for it
/// (or be declared with [`Declare::Stream`](crate::Declare::Stream) or the URL's `?stream=`),
/// else every message to it fails as permanent `NO_STREAM`.
pub fn subject(name: &str) -> Destination {
    Destination::new(name)
}

/// Whether `subject` can be published to: not empty, no whitespace or control characters, no
/// empty token (a leading, trailing or doubled `.`), and no wildcard token (`*` or `>`: those
/// select subjects, they are not one). `Err` says what is wrong, as a phrase that follows "the
/// subject" (`is empty`).
///
/// ```
/// use herald_nats::validate_subject;
/// assert!(validate_subject("orders.eu.created").is_ok());
/// assert!(validate_subject("orders.>").is_err());
/// assert!(validate_subject("orders..eu").is_err());
/// ```
pub fn validate_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("is empty".into());
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("holds whitespace or a control character".into());
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err("has an empty token (a leading, trailing or doubled `.`)".into());
        }
        if token == "*" || token == ">" {
            return Err(format!(
                "holds the wildcard `{token}`: messages are published to one concrete subject"
            ));
        }
    }
    Ok(())
}

/// Whether `name` can name a JetStream stream: 1 to [`MAX_STREAM_NAME_BYTES`] bytes, none of
/// them whitespace, a control character, `.`, `*`, `>`, `/` or `\` (the server refuses those:
/// names become directory names). `Err` says what is wrong, as a phrase that follows "the
/// stream name".
///
/// ```
/// use herald_nats::validate_stream_name;
/// assert!(validate_stream_name("ORDERS").is_ok());
/// assert!(validate_stream_name("orders.eu").is_err());
/// ```
pub fn validate_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_STREAM_NAME_BYTES {
        return Err(format!("is longer than {MAX_STREAM_NAME_BYTES} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "holds {:?}, which stream names may not (no whitespace, `.`, `*`, `>`, `/` or `\\`)",
            c
        ));
    }
    Ok(())
}

/// Whether `pattern` (a stream's subject, possibly with wildcards: `*` one token, `>` one or
/// more trailing tokens) captures the concrete `subject`.
pub(crate) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            // `*` stands for one token, not for the many a `>` in a pattern stands for.
            (Some("*"), Some(b)) if b != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The subject of a destination, or a permanent `INVALID_DESTINATION` error saying why it is
/// not one.
pub(crate) fn parse(d: &Destination) -> Result<String, TransportError> {
    validate_subject(d.as_str()).map_err(|reason| {
        TransportError::permanent(format!(
            "destination `{d}` is not a NATS subject one can publish to: it {reason}"
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
    fn subjects_to_publish_to() {
        for good in [
            "orders",
            "orders.eu.created",
            "a-b_c.d~e",
            "x.y*z",
            "café.été",
        ] {
            assert!(validate_subject(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("", "is empty"),
            ("orders eu", "whitespace"),
            ("orders\teu", "whitespace"),
            (".orders", "empty token"),
            ("orders.", "empty token"),
            ("orders..eu", "empty token"),
            ("orders.*", "wildcard `*`"),
            ("orders.>", "wildcard `>`"),
            (">", "wildcard"),
        ] {
            let e = validate_subject(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let e = parse(&Destination::new("orders.*")).expect_err("wildcard");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, Some("INVALID_DESTINATION"))
        );
        assert!(e.message().contains("`orders.*`"), "{e}");
        assert_eq!(
            parse(&subject("orders.eu")).ok().as_deref(),
            Some("orders.eu")
        );
    }

    #[test]
    fn stream_names() {
        for good in [
            "ORDERS",
            "orders-eu_1",
            "x".repeat(MAX_STREAM_NAME_BYTES).as_str(),
        ] {
            assert!(validate_stream_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a.b",
            "a b",
            "a*",
            "a>",
            "a/b",
            "a\\b",
            "a\nb",
            &"x".repeat(MAX_STREAM_NAME_BYTES + 1),
        ] {
            assert!(validate_stream_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_capture_subjects() {
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.eu"));
        assert!(subject_matches("orders.*", "orders.eu"));
        assert!(!subject_matches("orders.*", "orders.eu.x"));
        assert!(!subject_matches("orders.*", "orders"));
        assert!(subject_matches("orders.>", "orders.eu.x"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches(">", "anything.at.all"));
        assert!(subject_matches("*.eu.>", "orders.eu.created"));
        assert!(!subject_matches("billing.>", "orders.eu"));
        // A pattern as the subject (a stream to declare): `*` does not cover `>`.
        assert!(!subject_matches("orders.*", "orders.>"));
        assert!(subject_matches("orders.>", "orders.*"));
        assert!(subject_matches("orders.*", "orders.*"));
    }
}
