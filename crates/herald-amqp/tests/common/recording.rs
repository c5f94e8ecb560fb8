//! A transport that records every call it passes on to the one it wraps: when it began and
//! ended, the node the wrapped transport was connected to then, and each message's outcome. The
//! real-broker order tests print a message's history from it when they find the order broken,
//! so that a failure seen once on a loaded machine says what happened.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use herald_amqp::AmqpTransport;
use herald_core::{
    async_trait, BatchOutcome, Destination, EarlyAcks, Message, Transport, TransportHealth,
};

/// One call of `send_batch*`.
pub(crate) struct Call {
    /// In the order the calls began.
    pub(crate) number: usize,
    pub(crate) began_ms: u128,
    pub(crate) ended_ms: u128,
    /// `connected_node()` when the call began and when it ended.
    pub(crate) node_before: Option<String>,
    pub(crate) node_after: Option<String>,
    /// Each message's payload (as text) and outcome: `ok`, or the error's code and message.
    pub(crate) messages: Vec<(String, String)>,
    /// Each message's outcome in a word: `ok`, or the error's code.
    pub(crate) codes: Vec<String>,
}

/// [`AmqpTransport`], recording its calls.
#[derive(Clone)]
pub(crate) struct Recording {
    inner: AmqpTransport,
    start: Instant,
    calls: Arc<Mutex<Vec<Call>>>,
    begun: Arc<std::sync::atomic::AtomicUsize>,
}

impl Recording {
    pub(crate) fn new(inner: AmqpTransport) -> Self {
        Self {
            inner,
            start: Instant::now(),
            calls: Arc::default(),
            begun: Arc::default(),
        }
    }

    /// Every attempt of the message `payload`, in the order the calls began, one line each, with
    /// the other messages of its batch that share `key_prefix` (its key's messages).
    pub(crate) fn history(&self, payload: &str, key_prefix: &str) -> String {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lines = Vec::new();
        let mut sorted: Vec<&Call> = calls.iter().collect();
        sorted.sort_by_key(|c| c.number);
        for call in sorted {
            let Some((_, outcome)) = call.messages.iter().find(|(p, _)| p == payload) else {
                continue;
            };
            let same_key: Vec<&str> = call
                .messages
                .iter()
                .filter(|(p, _)| p.starts_with(key_prefix))
                .map(|(p, _)| p.as_str())
                .collect();
            let first_last = match (same_key.first(), same_key.last()) {
                (Some(a), Some(b)) => format!("{a}..{b}"),
                _ => String::new(),
            };
            lines.push(format!(
                "  call {} ({} messages, {} of the key: {first_last}) {}-{} ms on {:?} -> {:?}: {outcome}",
                call.number,
                call.messages.len(),
                same_key.len(),
                call.began_ms,
                call.ended_ms,
                call.node_before,
                call.node_after,
            ));
        }
        if lines.is_empty() {
            return format!("  {payload}: never sent");
        }
        format!("{payload}:\n{}", lines.join("\n"))
    }

    /// How many outcomes of every call ended with each error code (`ok` for the delivered),
    /// most first: what the retries were made of.
    pub(crate) fn codes(&self) -> String {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for call in calls.iter() {
            for code in &call.codes {
                *counts.entry(code.as_str()).or_default() += 1;
            }
        }
        let mut counts: Vec<(&str, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn record(
        &self,
        number: usize,
        began_ms: u128,
        node_before: Option<String>,
        batch: &[Message],
        outcomes: &BatchOutcome,
    ) {
        let messages = batch
            .iter()
            .zip(outcomes)
            .map(|(m, o)| {
                let payload = String::from_utf8_lossy(m.payload()).into_owned();
                let outcome = match o {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => format!("{:?} {}", e.code(), e.message()),
                };
                (payload, outcome)
            })
            .collect();
        let codes = outcomes
            .iter()
            .map(|o| match o {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.code().unwrap_or("(no code)").to_owned(),
            })
            .collect();
        let call = Call {
            codes,
            number,
            began_ms,
            ended_ms: self.start.elapsed().as_millis(),
            node_before,
            node_after: self.inner.connected_node(),
            messages,
        };
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
    }
}

#[async_trait]
impl Transport for Recording {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome {
        let number = self.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (began_ms, node) = (
            self.start.elapsed().as_millis(),
            self.inner.connected_node(),
        );
        // No await before the wrapped call's: its first poll takes the destination's turn.
        let outcomes = self.inner.send_batch(destination, batch).await;
        self.record(number, began_ms, node, batch, &outcomes);
        outcomes
    }

    async fn send_batch_answering(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
        early: EarlyAcks,
    ) -> BatchOutcome {
        let number = self.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (began_ms, node) = (
            self.start.elapsed().as_millis(),
            self.inner.connected_node(),
        );
        let outcomes = self
            .inner
            .send_batch_answering(destination, batch, deadline, early)
            .await;
        self.record(number, began_ms, node, batch, &outcomes);
        outcomes
    }

    fn settle_time(&self) -> std::time::Duration {
        self.inner.settle_time()
    }

    fn keeps_order_across_calls(&self) -> bool {
        self.inner.keeps_order_across_calls()
    }

    fn suggested_pipeline_depth(&self) -> Option<usize> {
        self.inner.suggested_pipeline_depth()
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    fn diagnosis(&self) -> Option<String> {
        self.inner.diagnosis()
    }

    fn health(&self) -> TransportHealth {
        self.inner.health()
    }

    fn endpoint(&self) -> Option<String> {
        self.inner.endpoint()
    }
}
