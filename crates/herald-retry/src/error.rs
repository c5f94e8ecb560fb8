//! The shared vocabulary: error classes and configuration mistakes.

use std::fmt;

/// Whether retrying can help.
///
/// Adapters map every broker error code to a class once (in their `error` module), so that
/// policies never need to know broker-specific codes: a policy only sees this class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The failure may go away on its own (leader election, timeout, throttling, connection
    /// reset): trying again later can succeed.
    Transient,
    /// The failure will happen again for the same message (too large, unauthorized, invalid
    /// topic): retrying only wastes time and budget.
    Permanent,
}

impl ErrorClass {
    /// `true` for [`ErrorClass::Transient`]: the one question a retry policy asks first.
    #[must_use]
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorClass::Transient)
    }

    /// A stable, lowercase name (`"transient"` / `"permanent"`), usable as a low-cardinality
    /// metric label or log field without allocating.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A setting that cannot work; `field` names it (e.g. `"retry.max_attempts"`).
///
/// Returned by the `validate` methods so that a configuration mistake fails when the producer
/// is built, naming the exact setting to fix, instead of misbehaving at 3 a.m.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{field}`: {reason}")]
pub struct InvalidSetting {
    /// The dotted name of the setting, as an operator would write it in configuration.
    pub field: &'static str,
    /// Why the value cannot work and, where useful, what would.
    pub reason: String,
}

impl InvalidSetting {
    /// Shorthand for building the error, so that validators stay one line per rule.
    #[must_use]
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidSetting {
            field,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_class_names() {
        assert!(ErrorClass::Transient.is_transient());
        assert!(!ErrorClass::Permanent.is_transient());
        assert_eq!(ErrorClass::Transient.to_string(), "transient");
        assert_eq!(ErrorClass::Permanent.to_string(), "permanent");
        assert_eq!(ErrorClass::Permanent.as_str(), "permanent");
    }

    #[test]
    fn invalid_setting_message_names_field() {
        let e = InvalidSetting::new("retry.max_attempts", "must be at least 1");
        assert_eq!(
            e.to_string(),
            "invalid setting `retry.max_attempts`: must be at least 1"
        );
    }
}
