//! Topology: the JetStream streams the transport declares on every new connection (and again
//! after a publish found no stream for a subject one of them captures).

use std::time::Duration;

use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, stream};
use herald_core::TransportError;

use crate::destination::{subject_matches, validate_stream_name, validate_subject};

/// One piece of topology the transport declares on every new connection. Declaring needs
/// permission on the JetStream API (`$JS.API.STREAM.INFO.*` and `$JS.API.STREAM.CREATE.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Declare {
    /// A stream named `name` capturing `subjects` (wildcards allowed), created if no stream
    /// of that name exists, with file storage and the server's defaults for the rest (limits
    /// retention, no limits, a 2-minute duplicate window for `Nats-Msg-Id`). An existing stream
    /// is left as it is; if it captures none of `subjects`, the declaration fails (transient
    /// `DECLARE_FAILED`, saying so).
    Stream {
        /// Its name.
        name: String,
        /// The subjects it captures.
        subjects: Vec<String>,
    },
}

impl Declare {
    /// A stream `name` capturing `subjects`: see [`Declare::Stream`].
    pub fn stream<S: Into<String>>(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        Self::Stream {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether this declaration creates a stream capturing `subject`.
    pub(crate) fn captures(&self, subject: &str) -> bool {
        match self {
            Self::Stream { subjects, .. } => subjects.iter().any(|p| subject_matches(p, subject)),
        }
    }

    /// What is wrong with it, if anything: a phrase for `ConfigError::Invalid`.
    pub(crate) fn check(&self) -> Result<(), String> {
        match self {
            Self::Stream { name, subjects } => {
                validate_stream_name(name).map_err(|r| format!("the stream name {r}"))?;
                if subjects.is_empty() {
                    return Err(format!("stream {name:?} captures no subject"));
                }
                for s in subjects {
                    // Wildcards are allowed in what a stream captures: check the rest.
                    let concrete = s.replace(['*', '>'], "x");
                    validate_subject(&concrete)
                        .map_err(|r| format!("stream {name:?}: the subject {s:?} {r}"))?;
                }
                Ok(())
            }
        }
    }
}

/// Declares the topology on a new connection, each request bounded by `timeout`.
pub(crate) async fn declare(
    js: &jetstream::Context,
    topology: &[Declare],
    timeout: Duration,
) -> Result<(), TransportError> {
    // Transient: a declaration can fail for a while (a server without quorum, permissions being
    // granted); every batch fails until it succeeds, so keep retrying. Subjects that clash with
    // existing streams are permanent: only a change of configuration helps.
    let fail = |what: String| {
        TransportError::transient(format!(
            "declaring the configured topology failed: {what}; herald retries, fix the declaration or the server if this persists"
        ))
        .with_code("DECLARE_FAILED")
    };
    for item in topology {
        match item {
            Declare::Stream { name, subjects } => {
                let config = stream::Config {
                    name: name.clone(),
                    subjects: subjects.clone(),
                    storage: stream::StorageType::File,
                    ..stream::Config::default()
                };
                let stream = tokio::time::timeout(timeout, js.get_or_create_stream(config))
                    .await
                    .map_err(|_| fail(format!("stream \"{name}\": no answer within {timeout:?}")))?
                    .map_err(|e| match e.kind() {
                        // Another stream captures these subjects: a configuration to fix, not
                        // a moment to wait out.
                        CreateStreamErrorKind::JetStream(js)
                            if js.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
                        {
                            TransportError::permanent(format!(
                                "declaring stream \"{name}\" failed: its subjects {subjects:?} overlap those of another stream ({e}): name that stream in the URL (?stream=), or drop the declaration"
                            ))
                            .with_code("STREAM_SUBJECT_OVERLAP")
                        }
                        _ => fail(format!("stream \"{name}\": {e}")),
                    })?;
                let has = &stream.cached_info().config.subjects;
                let missing: Vec<&String> = subjects
                    .iter()
                    .filter(|s| !has.iter().any(|p| subject_matches(p, s)))
                    .collect();
                if !missing.is_empty() {
                    return Err(TransportError::permanent(format!(
                        "declaring stream \"{name}\" failed: it exists but does not capture {missing:?} (its subjects: {has:?}): add them to it, or name another stream"
                    ))
                    .with_code("STREAM_SUBJECTS_MISSING"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_checked_and_know_what_they_capture() {
        assert!(Declare::stream("ORDERS", ["orders.>"]).check().is_ok());
        assert!(Declare::stream("ORDERS", ["orders.*.created"])
            .check()
            .is_ok());
        assert!(Declare::stream("a.b", ["x"]).check().is_err());
        assert!(Declare::stream("S", Vec::<String>::new()).check().is_err());
        assert!(Declare::stream("S", ["a..b"]).check().is_err());
        let d = Declare::stream("ORDERS", ["orders.>", "refunds"]);
        assert!(d.captures("orders.eu"));
        assert!(d.captures("refunds"));
        assert!(!d.captures("billing"));
    }
}
