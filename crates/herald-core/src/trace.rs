//! Trace context (the `otel` feature): every accepted message gets a producer span, and that
//! span's W3C trace context travels in the message's headers.
//!
//! - At acceptance ([`accepting`]) a span `send {destination}` starts as a child of the caller's
//!   current span (target `herald::trace`, level INFO, OpenTelemetry's messaging attributes), and
//!   its context is written into the headers `traceparent` (and `tracestate` when there is one)
//!   through the application's global propagator, or W3C Trace Context when none is set. A
//!   consumer that extracts it continues the trace under herald's span. A message that already
//!   has a `traceparent` header keeps it.
//! - The span lives with the message through batching and retries and ends with its fate
//!   ([`delivered`], [`failed`]): message id, attempts, partition and offset where the broker
//!   gives them, `error.type` (the [`FailureReason`] label) on failure, and the size of the
//!   batch that carried it ([`sending`]).
//! - Spans are `tracing` spans: they reach OpenTelemetry through the application's
//!   `tracing-opentelemetry` layer. Without one, nothing is injected and a span costs what any
//!   `tracing` span costs under the application's subscriber. A span no subscriber records is
//!   not kept with the message (so `tracing`'s `log` feature, without a subscriber, logs the
//!   span's opening and closing at acceptance, and nothing at its fate).
//!
//! Without the feature these functions do nothing and compile away.

use crate::error::FailureReason;
use crate::message::Message;
use crate::transport::Ack;

#[cfg(feature = "otel")]
mod enabled {
    use opentelemetry::propagation::{Injector, TextMapPropagator};
    use opentelemetry::trace::TraceContextExt;
    use tracing::field::Empty;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{Ack, FailureReason, Message};
    use crate::message::Header;
    use crate::Transport;

    /// OpenTelemetry's `messaging.system` for a transport's name.
    fn messaging_system(transport: &'static str) -> &'static str {
        match transport {
            "amqp" => "rabbitmq",
            other => other,
        }
    }

    /// Starts the message's span and injects its context (if `transport` carries headers),
    /// unless it has a span already.
    ///
    /// In place: once per message, and a message moved in and out is copied twice.
    #[inline]
    pub(crate) fn accepting(msg: &mut Message, transport: &dyn Transport) {
        // Where no subscriber was ever set (global or scoped), the span would be disabled and
        // no span is current, so there is nothing to record or inject: known without making
        // the span (about 60 instructions a message on `send_all`'s path).
        if msg.span.is_none() && tracing::dispatcher::has_been_set() {
            start(msg, transport);
        }
    }

    fn start(msg: &mut Message, transport: &dyn Transport) {
        let headers = transport.carries_headers();
        let transport = transport.name();
        let destination = msg.destination().as_str();
        let span = tracing::info_span!(
            target: "herald::trace",
            "send",
            otel.name = format!("send {destination}"),
            otel.kind = "producer",
            otel.status_code = Empty,
            messaging.system = messaging_system(transport),
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = destination,
            messaging.message.id = Empty,
            messaging.batch.message_count = Empty,
            messaging.destination.partition.id = Empty,
            messaging.kafka.offset = Empty,
            error.type = Empty,
            herald.attempts = Empty,
        );
        if headers {
            inject(&span, msg);
        }
        // A span no subscriber records is kept as none: nothing would be recorded on it.
        if !span.is_disabled() {
            msg.span = Some(Box::new(span));
        }
    }

    /// Writes the context of `span` (or of the caller's span when `span` is not recorded, a
    /// filter having turned it off) into the headers.
    fn inject(span: &tracing::Span, msg: &mut Message) {
        // A span no subscriber records has no context (`context()` makes an empty one), and
        // where no subscriber was ever set no span is current either: then there is nothing to
        // inject, known without asking (the caller's span costs a look-up of the dispatcher,
        // once per message). `has_been_set` is what tracing's own macros ask for that.
        let mut cx = if span.is_disabled() {
            opentelemetry::Context::new()
        } else {
            span.context()
        };
        if !cx.span().span_context().is_valid() {
            if !tracing::dispatcher::has_been_set() {
                return;
            }
            cx = tracing::Span::current().context();
        }
        if !cx.span().span_context().is_valid()
            || msg
                .headers()
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("traceparent"))
        {
            return;
        }
        let mut headers = Headers(&mut msg.headers);
        opentelemetry::global::get_text_map_propagator(|global| {
            if global.fields().next().is_some() {
                global.inject_context(&cx, &mut headers);
            } else {
                // No propagator set (the no-op default): W3C Trace Context.
                opentelemetry_sdk::propagation::TraceContextPropagator::new()
                    .inject_context(&cx, &mut headers);
            }
        });
    }

    struct Headers<'a>(&'a mut thin_vec::ThinVec<Header>);

    impl Injector for Headers<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.push(Header {
                name: key.to_owned(),
                value: value.into(),
            });
        }
    }

    /// Records on each span the size of the batch carrying it (two messages or more).
    pub(crate) fn sending(messages: &[Message]) {
        if messages.len() < 2 {
            return;
        }
        for span in messages.iter().filter_map(|m| m.span.as_deref()) {
            span.record("messaging.batch.message_count", messages.len());
        }
    }

    /// Ends the span of a delivered message.
    pub(crate) fn delivered(msg: &mut Message, ack: &Ack, attempts: u32) {
        let Some(span) = msg.span.take() else { return };
        record_common(&span, msg, attempts);
        if let Some(partition) = ack.partition {
            span.record("messaging.destination.partition.id", partition.to_string());
        }
        if let (Some(offset), Some(_)) = (ack.offset, ack.partition) {
            span.record("messaging.kafka.offset", offset);
        }
    }

    /// Ends the span of a message handed back.
    pub(crate) fn failed(msg: &mut Message, reason: &FailureReason, attempts: u32) {
        let Some(span) = msg.span.take() else { return };
        record_common(&span, msg, attempts);
        span.record("error.type", reason.label());
        span.record("otel.status_code", "ERROR");
    }

    fn record_common(span: &tracing::Span, msg: &Message, attempts: u32) {
        if let Some(id) = msg.id() {
            span.record("messaging.message.id", tracing::field::display(id));
        }
        span.record("herald.attempts", attempts);
    }
}

#[cfg(feature = "otel")]
pub(crate) use enabled::{accepting, delivered, failed, sending};

#[cfg(not(feature = "otel"))]
mod disabled {
    use super::{Ack, FailureReason, Message};

    #[inline(always)]
    pub(crate) fn accepting(_msg: &mut Message, _transport: &dyn crate::Transport) {}
    #[inline(always)]
    pub(crate) fn sending(_messages: &[Message]) {}
    #[inline(always)]
    pub(crate) fn delivered(_msg: &mut Message, _ack: &Ack, _attempts: u32) {}
    #[inline(always)]
    pub(crate) fn failed(_msg: &mut Message, _reason: &FailureReason, _attempts: u32) {}
}

#[cfg(not(feature = "otel"))]
pub(crate) use disabled::{accepting, delivered, failed, sending};
