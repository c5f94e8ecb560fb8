//! Why a transport could not be built ([`ConfigError`]), and the table from librdkafka's error
//! codes to herald's error classes.
//!
//! The rule: **transient** when the same message could succeed later without anybody changing
//! anything (a broker restarting, a leader moving, a timeout, a full local queue, a lost
//! connection); **permanent** when it cannot (too large, unknown topic with auto-creation off,
//! not authorized, invalid). Unknown codes are transient: a message retried in vain until its
//! delivery timeout is better than a message dropped that could have gone.

use herald_core::{ErrorClass, TransportError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The class of a librdkafka error code.
pub(crate) fn class_of(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        // The message itself cannot be accepted.
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidMessage
        | C::BadMessage
        | C::InvalidTopic
        | C::InvalidRequiredAcks
        | C::InvalidTimestamp
        | C::InvalidArgument
        | C::InvalidRecord
        | C::UnsupportedForMessageFormat
        | C::PolicyViolation
        | C::KeySerialization
        | C::ValueSerialization => ErrorClass::Permanent,
        // The destination does not exist (auto-creation off) or we may not write to it.
        C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::SecurityDisabled
        | C::UnsupportedSASLMechanism
        | C::UnsupportedVersion
        | C::UnsupportedFeature
        | C::InvalidConfig => ErrorClass::Permanent,
        // Everything else: brokers moving, restarting, slow or unreachable; local queue full;
        // purged in-flight messages after a producer rebuild; fatal idempotence errors (the
        // transport rebuilds its producer and the message is retried).
        _ => ErrorClass::Transient,
    }
}

/// Whether this error means the producer's idempotence state is no good any more, so that
/// retrying on the same producer would fail again: a fatal error, or a broker that does not know
/// the producer (a broker restarted without its producer state answers "unknown broker error"
/// to every produce request of the old producer id). The transport then builds a new producer.
pub(crate) fn needs_new_producer(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal
            | C::Unknown
            | C::UnknownProducerId
            | C::OutOfOrderSequenceNumber
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping
    )
}

/// A herald error from a librdkafka error, with the client's code.
pub(crate) fn transport_error(e: &KafkaError) -> TransportError {
    match e.rdkafka_error_code() {
        Some(code) => TransportError::new(class_of(code), e.to_string())
            .with_code(format!("{code:?}"))
            .with_source(e.clone()),
        // Errors without a librdkafka code (a topic name with a NUL byte, say) are the
        // caller's: permanent.
        None => TransportError::permanent(e.to_string()).with_source(e.clone()),
    }
}

/// Why a [`crate::KafkaTransport`] could not be built. Named like every herald adapter's
/// (`herald_amqp::ConfigError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting that cannot work.
    #[error("invalid Kafka setting `{field}`: {reason}")]
    Invalid {
        /// The setting, as [`crate::KafkaConfig`] names it, or the librdkafka property.
        field: String,
        /// What is wrong and what to do instead.
        reason: String,
    },
    /// A property given with [`crate::KafkaConfig::property`] that herald sets itself.
    #[error("librdkafka property `{key}` conflicts with herald: {reason}")]
    Conflict {
        /// The property.
        key: String,
        /// Why herald manages it and how to change it instead.
        reason: String,
    },
    /// librdkafka refused the configuration (an unknown property, a bad value, or a feature
    /// missing from this build such as SSL without the `ssl` feature, or a TLS file that
    /// does not exist or does not parse, named by its property). librdkafka's words are in
    /// the message itself, not repeated as a source (an error chain would print them twice).
    #[error("librdkafka refused the configuration: {0}")]
    Client(KafkaError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as C;

    #[test]
    fn the_table_classifies_what_the_issue_names() {
        for code in [
            C::MessageSizeTooLarge,
            C::UnknownTopicOrPartition,
            C::TopicAuthorizationFailed,
            C::InvalidTopic,
        ] {
            assert_eq!(class_of(code), ErrorClass::Permanent, "{code:?}");
        }
        for code in [
            C::NotEnoughReplicas,
            C::NotEnoughReplicasAfterAppend,
            C::LeaderNotAvailable,
            C::NotLeaderForPartition,
            C::BrokerTransportFailure,
            C::MessageTimedOut,
            C::RequestTimedOut,
            C::QueueFull,
            C::AllBrokersDown,
            C::PurgeInflight,
            C::PurgeQueue,
            C::Fatal,
            C::OutOfOrderSequenceNumber,
            C::UnknownProducerId,
            C::Unknown,
            C::KafkaStorageError,
            C::NetworkException,
        ] {
            assert_eq!(class_of(code), ErrorClass::Transient, "{code:?}");
        }
    }

    #[test]
    fn producer_state_errors_ask_for_a_new_producer() {
        for code in [
            C::Fatal,
            C::Unknown,
            C::UnknownProducerId,
            C::OutOfOrderSequenceNumber,
        ] {
            assert!(needs_new_producer(code), "{code:?}");
            assert_eq!(class_of(code), ErrorClass::Transient, "{code:?} is retried");
        }
        for code in [
            C::LeaderNotAvailable,
            C::MessageTimedOut,
            C::MessageSizeTooLarge,
        ] {
            assert!(!needs_new_producer(code), "{code:?}");
        }
    }

    #[test]
    fn errors_carry_the_code_and_the_class() {
        let e = transport_error(&KafkaError::MessageProduction(C::MessageSizeTooLarge));
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert_eq!(e.code(), Some("MessageSizeTooLarge"));
        let e = transport_error(&KafkaError::MessageProduction(C::LeaderNotAvailable));
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(
            e.to_string().contains("LeaderNotAvailable") || e.to_string().contains("leader"),
            "{e}"
        );
    }
}
