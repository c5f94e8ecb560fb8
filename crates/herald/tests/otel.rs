//! Trace context (feature `otel`): the spans herald records and the `traceparent` it writes,
//! read through OpenTelemetry's in-memory exporter; and, ignored unless `cargo xtask it` runs
//! them with a broker, the header read back from Kafka and RabbitMQ.
#![cfg(feature = "otel")]

use std::time::Duration;

use herald::testkit::MemoryTransport;
use herald::{Destination, Message, Producer};
use opentelemetry::trace::{
    SpanId, SpanKind, Status, TraceContextExt, TraceId, TracerProvider as _,
};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// The tests of this file one at a time: `tracing` caches which callsites are enabled across
/// all the threads' subscribers, and a test without one running beside a test with one can
/// leave a span disabled for a moment.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A subscriber that sends every span to an in-memory exporter, and that exporter.
fn otel() -> (
    impl tracing::Subscriber + Send + Sync,
    InMemorySpanExporter,
    SdkTracerProvider,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("herald-test"));
    (
        tracing_subscriber::registry().with(layer),
        exporter,
        provider,
    )
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn header(msg: &Message, name: &str) -> Option<String> {
    msg.headers()
        .iter()
        .find(|h| h.name == name)
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The caller's trace id and span id, for the span `request`.
fn ids(request: &tracing::Span) -> (TraceId, SpanId) {
    let cx = request.context();
    let span = cx.span();
    (
        span.span_context().trace_id(),
        span.span_context().span_id(),
    )
}

/// Each message in `received` (as the broker gave it back: id from `message_id`, headers)
/// has a `send {destination}` span under `caller`, whose context its `traceparent` names.
fn assert_traced(
    exporter: &InMemorySpanExporter,
    provider: &SdkTracerProvider,
    system: &str,
    destination: &str,
    caller: (TraceId, SpanId),
    received: &[(String, Option<String>)],
) {
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let name = format!("send {destination}");
    let sends: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
    // The trace as a reader of it would see it (`--nocapture`; docs/operations shows one).
    for span in spans
        .iter()
        .filter(|s| s.name == name || s.span_context.span_id() == caller.1)
    {
        let took = span
            .end_time
            .duration_since(span.start_time)
            .unwrap_or_default();
        let attributes: Vec<String> = span
            .attributes
            .iter()
            .filter(|kv| {
                !kv.key.as_str().starts_with("code.") && !kv.key.as_str().starts_with("thread.")
            })
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        eprintln!(
            "{}{} ({took:.1?}, span {}, parent {}) {}",
            if span.span_context.span_id() == caller.1 {
                ""
            } else {
                "  "
            },
            span.name,
            span.span_context.span_id(),
            span.parent_span_id,
            attributes.join(" ")
        );
    }
    assert_eq!(
        sends.len(),
        received.len(),
        "one send span per message: {spans:#?}"
    );
    for (id, traceparent) in received {
        let span = sends
            .iter()
            .find(|s| {
                attribute(s, "messaging.message.id").map(Value::as_str) == Some(id.clone().into())
            })
            .unwrap_or_else(|| panic!("no span with messaging.message.id {id}: {sends:#?}"));
        assert_eq!(span.span_kind, SpanKind::Producer);
        assert_eq!(
            span.span_context.trace_id(),
            caller.0,
            "same trace as the caller"
        );
        assert_eq!(span.parent_span_id, caller.1, "child of the caller's span");
        // The header the broker kept names this very span: a consumer continues under it.
        assert_eq!(
            traceparent.as_deref(),
            Some(
                format!(
                    "00-{}-{}-01",
                    span.span_context.trace_id(),
                    span.span_context.span_id()
                )
                .as_str()
            ),
            "message {id}"
        );
        assert_eq!(
            attribute(span, "messaging.system").map(Value::as_str),
            Some(system.to_owned().into())
        );
        assert_eq!(
            attribute(span, "messaging.destination.name").map(Value::as_str),
            Some(destination.to_owned().into())
        );
        assert_eq!(
            attribute(span, "messaging.operation.type").map(Value::as_str),
            Some("send".into())
        );
        assert_eq!(attribute(span, "error.type"), None);
        assert_eq!(span.status, Status::Unset);
    }
}

#[test]
fn each_message_gets_a_send_span_under_the_callers_span_and_its_traceparent() {
    let _serial = serial();
    let (subscriber, exporter, provider) = otel();
    let transport = MemoryTransport::new();
    let _guard = tracing::subscriber::set_default(subscriber);
    let caller = runtime().block_on(async {
        let producer = Producer::builder(transport.clone())
            .build()
            .expect("producer");
        let request = tracing::info_span!("handle request");
        let caller = ids(&request);
        async {
            let orders = Destination::new("orders");
            let a = producer.enqueue(Message::new(orders.clone(), "a").with_key("k"));
            let a = a.await.expect("accepted");
            let b = producer
                .enqueue(Message::new(orders, "b").with_key("k"))
                .await
                .expect("accepted");
            a.await.expect("delivered");
            b.await.expect("delivered");
        }
        .instrument(request)
        .await;
        producer.close(Duration::from_secs(5)).await;
        caller
    });
    let received: Vec<(String, Option<String>)> = transport
        .received()
        .iter()
        .map(|m| (m.id().expect("id").to_string(), header(m, "traceparent")))
        .collect();
    assert_eq!(received.len(), 2);
    assert_traced(&exporter, &provider, "memory", "orders", caller, &received);
}

/// Turns herald's own spans off (what a filter on the target `herald::trace` does), and leaves
/// every other span on.
struct WithoutHeraldSpans;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WithoutHeraldSpans {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // Asked each time: an interest cached as never would outlive this test's subscriber.
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        metadata.target() != "herald::trace"
    }
}

/// With herald's spans filtered out, the caller's span context still travels in the headers:
/// a consumer continues the caller's trace.
#[test]
fn with_herald_s_spans_filtered_out_the_caller_s_context_travels() {
    let _serial = serial();
    let (subscriber, exporter, provider) = otel();
    let transport = MemoryTransport::new();
    let _guard = tracing::subscriber::set_default(subscriber.with(WithoutHeraldSpans));
    let caller = runtime().block_on(async {
        let producer = Producer::builder(transport.clone())
            .build()
            .expect("producer");
        let request = tracing::info_span!("handle request");
        let caller = ids(&request);
        producer
            .send(Message::new("orders", "a"))
            .instrument(request)
            .await
            .expect("delivered");
        producer.close(Duration::from_secs(5)).await;
        caller
    });
    let received = transport.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        header(&received[0], "traceparent"),
        Some(format!("00-{}-{}-01", caller.0, caller.1)),
        "the caller's context"
    );
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    assert!(
        spans.iter().all(|s| !s.name.starts_with("send ")),
        "no span of herald's: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
}

/// A transport whose messages carry no headers (MQTT 3.1.1): the memory transport, saying so.
struct Headerless(MemoryTransport);

#[herald::async_trait]
impl herald::Transport for Headerless {
    fn name(&self) -> &'static str {
        "headerless"
    }
    fn carries_headers(&self) -> bool {
        false
    }
    async fn send_batch(
        &self,
        destination: &Destination,
        batch: &[Message],
    ) -> herald::BatchOutcome {
        self.0.send_batch(destination, batch).await
    }
}

/// Over a transport that carries no headers, herald writes no `traceparent` (the transport
/// would refuse every message for it), and still records the message's span.
#[test]
fn no_traceparent_is_written_where_messages_carry_no_headers() {
    let _serial = serial();
    let (subscriber, exporter, provider) = otel();
    let transport = MemoryTransport::new();
    let _guard = tracing::subscriber::set_default(subscriber);
    runtime().block_on(async {
        let producer = Producer::builder(Headerless(transport.clone()))
            .build()
            .expect("producer");
        producer
            .send(Message::new("orders", "a"))
            .instrument(tracing::info_span!("handle request"))
            .await
            .expect("delivered");
        producer.close(Duration::from_secs(5)).await;
    });
    let received = transport.received();
    assert_eq!(received.len(), 1);
    assert!(
        received[0].headers().is_empty(),
        "{:?}",
        received[0].headers()
    );
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    assert!(
        spans.iter().any(|s| s.name == "send orders"),
        "the send span is recorded: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
}

#[test]
fn a_message_handed_back_ends_its_span_with_the_error_type() {
    let _serial = serial();
    let (subscriber, exporter, provider) = otel();
    let transport = MemoryTransport::new();
    transport.reject_payload_prefix("poison");
    let _guard = tracing::subscriber::set_default(subscriber);
    runtime().block_on(
        async {
            let producer = Producer::builder(transport.clone())
                .build()
                .expect("producer");
            let err = producer
                .send(Message::new("orders", "poison pill"))
                .await
                .expect_err("rejected");
            assert_eq!(err.reason().label(), "rejected");
            producer.close(Duration::from_secs(5)).await;
        }
        .instrument(tracing::info_span!("handle request")),
    );
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let send = spans
        .iter()
        .find(|s| s.name == "send orders")
        .unwrap_or_else(|| panic!("no send span: {spans:#?}"));
    assert_eq!(
        attribute(send, "error.type").map(Value::as_str),
        Some("rejected".into())
    );
    assert!(
        matches!(send.status, Status::Error { .. }),
        "{:?}",
        send.status
    );
}

#[test]
fn a_traceparent_set_by_the_caller_is_kept_and_without_a_layer_nothing_is_added() {
    let _serial = serial();
    let transport = MemoryTransport::new();
    runtime().block_on(async {
        let producer = Producer::builder(transport.clone())
            .build()
            .expect("producer");
        // No OpenTelemetry layer at all: no header.
        producer
            .send(Message::new("orders", "plain"))
            .await
            .expect("delivered");
        // With a layer, a caller's own traceparent stays as it is.
        let (subscriber, _exporter, _provider) = otel();
        let _guard = tracing::subscriber::set_default(subscriber);
        let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        producer
            .send(Message::new("orders", "own").with_header("traceparent", own))
            .instrument(tracing::info_span!("handle request"))
            .await
            .expect("delivered");
        producer.close(Duration::from_secs(5)).await;
    });
    let received = transport.received();
    assert_eq!(received.len(), 2);
    assert!(
        received[0].headers().is_empty(),
        "{:?}",
        received[0].headers()
    );
    let own: Vec<_> = received[1]
        .headers()
        .iter()
        .filter(|h| h.name == "traceparent")
        .collect();
    assert_eq!(own.len(), 1);
    assert_eq!(
        &own[0].value[..],
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
}

/// Sends three keyed messages inside a caller's span; the caller's ids.
async fn send_three(producer: &Producer, destination: &Destination) -> (TraceId, SpanId) {
    let request = tracing::info_span!("handle request");
    let caller = ids(&request);
    let msgs = (0..3).map(|i| {
        Message::new(destination.clone(), format!("{{\"id\": {i}}}")).with_key(format!("k{i}"))
    });
    async {
        for msg in msgs {
            producer.send(msg).await.expect("delivered");
        }
    }
    .instrument(request)
    .await;
    caller
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("herald-otel-{name}-{}-{nanos}", std::process::id())
}

// One thread: the subscriber is this thread's own (`set_default`), and a span closed on
// another thread would not close its parent there.
#[tokio::test]
#[ignore = "needs Kafka: cargo xtask it kafka"]
// The guard only keeps the other tests of this file out; nothing in this test waits for it.
#[allow(clippy::await_holding_lock)]
async fn kafka_keeps_the_traceparent_for_the_consumer() {
    let _serial = serial();
    use herald::kafka::{admin, KafkaConfig, KafkaTransport};
    let bootstrap = std::env::var("HERALD_KAFKA_BOOTSTRAP")
        .expect("HERALD_KAFKA_BOOTSTRAP is not set: run with `cargo xtask it kafka`");
    let topic = unique("kafka");
    admin::create_topic(&bootstrap, &topic, 1, 1)
        .await
        .expect("create topic");
    let (subscriber, exporter, provider) = otel();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Message ids in a header, to find each message's span again.
    let config = KafkaConfig::new(bootstrap.clone())
        .message_id_header(Some(herald::kafka::MESSAGE_ID_HEADER.to_owned()));
    let producer = Producer::builder(KafkaTransport::new(config).expect("transport"))
        .build()
        .expect("producer");
    let caller = send_three(&producer, &Destination::new(topic.as_str())).await;
    producer.close(Duration::from_secs(10)).await;
    let (b, t) = (bootstrap.clone(), topic.clone());
    let read = tokio::task::spawn_blocking(move || {
        admin::read_topic(&b, &t, 3, Duration::from_secs(60)).expect("read back")
    })
    .await
    .expect("read");
    let received: Vec<(String, Option<String>)> = read
        .iter()
        .map(|m| {
            (
                header(m, herald::kafka::MESSAGE_ID_HEADER).expect("message id header"),
                header(m, "traceparent"),
            )
        })
        .collect();
    assert_traced(&exporter, &provider, "kafka", &topic, caller, &received);
}

// One thread: the subscriber is this thread's own (`set_default`), and a span closed on
// another thread would not close its parent there.
#[tokio::test]
#[ignore = "needs RabbitMQ: cargo xtask it amqp"]
// The guard only keeps the other tests of this file out; nothing in this test waits for it.
#[allow(clippy::await_holding_lock)]
async fn rabbitmq_keeps_the_traceparent_for_the_consumer() {
    let _serial = serial();
    use herald::amqp::{AmqpConfig, AmqpTransport};
    use lapin::options::{BasicGetOptions, QueueDeleteOptions};
    use lapin::types::AMQPValue;
    let url = std::env::var("HERALD_AMQP_URL")
        .expect("HERALD_AMQP_URL is not set: run with `cargo xtask it amqp`");
    let queue = unique("amqp");
    // The queue in the URL: declared (durable, classic) when the transport connects.
    let config = AmqpConfig::from_url(&format!("{url}?queue={queue}")).expect("config");
    let destination = config
        .route()
        .map(herald::amqp::Route::destination)
        .expect("route");
    let (subscriber, exporter, provider) = otel();
    let _guard = tracing::subscriber::set_default(subscriber);
    let producer = Producer::builder(AmqpTransport::new(config).expect("transport"))
        .build()
        .expect("producer");
    let caller = send_three(&producer, &destination).await;
    producer.close(Duration::from_secs(10)).await;

    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut received = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "got {received:?}");
        let Some(m) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let props = &m.delivery.properties;
        let id = props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .expect("message_id");
        let traceparent = props.headers().as_ref().and_then(|h| {
            h.inner().iter().find_map(|(k, v)| match v {
                AMQPValue::LongString(s) if k.as_str() == "traceparent" => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            })
        });
        received.push((id, traceparent));
    }
    let _deleted = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    assert_traced(
        &exporter,
        &provider,
        "rabbitmq",
        destination.as_str(),
        caller,
        &received,
    );
}
