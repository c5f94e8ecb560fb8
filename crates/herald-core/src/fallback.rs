//! [`Fallback`]: transports composed into one, the first preferred, the next ones taking over
//! while it is down.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use herald_retry::{
    CircuitBreaker, CircuitBreakerConfig, CircuitState, Generation, InvalidSetting,
};

use crate::error::{ErrorClass, TransportError};
use crate::health::TransportHealth;
use crate::message::{Destination, Message};
use crate::metrics::check_producer_label;
use crate::producer::clock_now;
use crate::transport::{BatchOutcome, Transport};

/// The code of the error a [`Fallback`] gives when every route's circuit is open.
pub const NO_ROUTE_OPEN: &str = "herald_fallback_all_open";

/// One transport of a [`Fallback`], with its name and its own circuit breaker.
struct Route {
    name: String,
    transport: Arc<dyn Transport>,
    /// Where this route sends every batch, when not where its messages say.
    destination: Option<Destination>,
    breaker: Mutex<CircuitBreaker>,
    batches: metrics::Counter,
}

/// A call on a route whose breaker has not heard how it went yet, with the breaker's
/// generation it was sent under: dropped so (the call cut off), it tells the breaker the call
/// failed.
struct CutOff<'a>(Option<(&'a Route, Generation)>);

impl CutOff<'_> {
    /// The call ended with its outcomes: the caller tells the breaker itself.
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for CutOff<'_> {
    fn drop(&mut self) {
        if let Some((route, sent)) = self.0 {
            route
                .breaker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .on_failure_of(sent, clock_now());
        }
    }
}

/// A [`Transport`] made of several: a batch goes to the first route whose circuit lets it
/// through, so the primary takes everything while it works and a fallback takes over while it
/// fails. Transports compose this way whatever they are: a Kafka cluster and a second one, or
/// Kafka then RabbitMQ.
///
/// Each route has its own circuit breaker ([`CircuitBreakerConfig`], by default opening after
/// 3 consecutive failed batches, for 5 s). While the primary's circuit is closed its failures
/// come back to the producer, which retries them as usual; once it opens, batches go to the
/// next route whose circuit is closed. When the primary's circuit lets a probe through (after
/// `open_for`) the next batch tries it again: if it succeeds, traffic is back on the primary.
/// When every circuit is open, batches fail transiently without being sent
/// ([`NO_ROUTE_OPEN`]), and the producer retries them until their delivery timeout.
///
/// Every delivery says which route took it ([`Ack::route`](crate::Ack::route): 0 the primary,
/// 1 the first fallback, ...), and `herald_fallback_batches_total{route}` counts the batches
/// each route took.
///
/// Order: per key, order holds within each route, not across a switch (a message sent to the
/// fallback may be read before an earlier one the primary stored). Consumers that need one
/// order across routes must merge them.
///
/// ```
/// use herald_core::{async_trait, Ack, BatchOutcome, Destination, Fallback, Message, Producer};
/// use herald_core::{Transport, TransportError};
///
/// /// A cluster that is down, and one that takes everything.
/// struct Down;
/// struct Up;
/// #[async_trait]
/// impl Transport for Down {
///     fn name(&self) -> &'static str { "down" }
///     async fn send_batch(&self, _: &Destination, b: &[Message]) -> BatchOutcome {
///         b.iter().map(|_| Err(TransportError::transient("unreachable"))).collect()
///     }
/// }
/// #[async_trait]
/// impl Transport for Up {
///     fn name(&self) -> &'static str { "up" }
///     async fn send_batch(&self, _: &Destination, b: &[Message]) -> BatchOutcome {
///         b.iter().map(|_| Ok(Ack::default())).collect()
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = Fallback::new("eu-west", Down)?.or("eu-central", Up)?;
/// let producer = Producer::builder(transport).build()?;
/// // Retried on the primary until its circuit opens, then taken by the fallback.
/// let delivery = producer.send(Message::new("orders", "o-1")).await?;
/// assert_eq!(delivery.ack.route, Some(1));
/// # Ok(())
/// # }
/// ```
pub struct Fallback {
    routes: Vec<Route>,
    breaker: CircuitBreakerConfig,
    /// The route that took the last batch.
    last: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.routes.iter().map(|r| r.name.as_str()).collect();
        f.debug_struct("Fallback").field("routes", &names).finish()
    }
}

impl Fallback {
    /// A fallback whose primary route is `transport`, named `name` (the `route` label of its
    /// metrics: letters, digits, `_`, `-`, `.`, at most 64 bytes).
    pub fn new(name: &str, transport: impl Transport) -> Result<Self, InvalidSetting> {
        Self {
            routes: Vec::new(),
            breaker: CircuitBreakerConfig {
                failure_threshold: 3,
                ..CircuitBreakerConfig::default()
            },
            last: std::sync::atomic::AtomicUsize::new(0),
        }
        .or(name, transport)
    }

    /// Adds `transport` as the next route, tried when every route before it has its circuit
    /// open. Names must differ.
    pub fn or(mut self, name: &str, transport: impl Transport) -> Result<Self, InvalidSetting> {
        check_producer_label(name)
            .map_err(|why| InvalidSetting::new("fallback.route", format!("a route name {why}")))?;
        if self.routes.iter().any(|r| r.name == name) {
            return Err(InvalidSetting::new(
                "fallback.route",
                format!("`{name}` is used twice"),
            ));
        }
        if self.routes.len() >= usize::from(u8::MAX) {
            return Err(InvalidSetting::new("fallback.route", "at most 255 routes"));
        }
        self.routes.push(Route {
            name: name.to_owned(),
            transport: Arc::new(transport),
            destination: None,
            breaker: Mutex::new(self.breaker.build()),
            batches: metrics::counter!(
                crate::metrics::FALLBACK_BATCHES,
                "route" => name.to_owned()
            ),
        });
        Ok(self)
    }

    /// The circuit breaker of every route, those added before and after. Default: opens after
    /// 3 consecutive failed batches, for 5 s, then lets 1 probe batch through. A disabled
    /// breaker never opens, so its route is never passed over.
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        for r in &self.routes {
            *r.breaker.lock().unwrap_or_else(PoisonError::into_inner) = config.build();
        }
        self.breaker = config;
        self
    }

    /// Makes the route added last send every batch to `destination` instead of the one its
    /// messages name: for a fallback on another cluster or broker where the same stream has
    /// another name (a Kafka topic `orders` falling back to a RabbitMQ queue `orders-dr`).
    #[must_use]
    pub fn with_destination(mut self, destination: impl Into<Destination>) -> Self {
        if let Some(last) = self.routes.last_mut() {
            last.destination = Some(destination.into());
        }
        self
    }

    /// The names of the routes, in order.
    pub fn routes(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.name.as_str()).collect()
    }

    /// The circuit state of route `index`.
    pub fn route_state(&self, index: usize) -> Option<CircuitState> {
        self.routes.get(index).map(|r| {
            r.breaker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .state()
        })
    }

    /// The first route whose circuit lets a batch through now, with its breaker's generation
    /// (see [`Generation`]: a batch that lands after its route's circuit opened again changes
    /// nothing).
    fn pick(&self) -> Option<(usize, Generation)> {
        let now = clock_now();
        self.routes.iter().enumerate().find_map(|(i, r)| {
            let mut breaker = r.breaker.lock().unwrap_or_else(PoisonError::into_inner);
            breaker.allow(now).then(|| (i, breaker.generation()))
        })
    }

    fn all_open(&self, n: usize) -> BatchOutcome {
        let names = self.routes();
        tracing::debug!(
            transport = "fallback",
            routes = %names.join(", "),
            "every route has its circuit open: the batch fails transiently and is retried"
        );
        let e = TransportError::transient(format!(
            "every route of the fallback ({}) has its circuit open after repeated failures; retried",
            names.join(", ")
        ))
        .with_code(NO_ROUTE_OPEN);
        vec![Err(e); n]
    }

    /// Sends on route `index` and tells its breaker how it went.
    async fn send_on(
        &self,
        (index, sent): (usize, Generation),
        destination: &Destination,
        batch: &[Message],
        deadline: Option<std::time::Instant>,
    ) -> BatchOutcome {
        let route = &self.routes[index];
        let destination = route.destination.as_ref().unwrap_or(destination);
        // Cut off before its breaker hears how it went (the pipeline drops a call at its
        // deadline), the call counts as failed: otherwise a half-open route's probe stays in
        // flight for good, and the route shut.
        let cut_off = CutOff(Some((route, sent)));
        // Counted, and the route shown as the endpoint, when the batch is handed to it: a call
        // cut off at its deadline (a route that hangs) counts too.
        route.batches.increment(1);
        let previous = self.last.swap(index, std::sync::atomic::Ordering::Relaxed);
        if previous != index {
            let from = &self.routes[previous].name;
            if index > previous {
                tracing::warn!(
                    transport = "fallback",
                    from = %from,
                    to = %route.name,
                    "traffic moved to a later route: the routes before it have their circuits open"
                );
            } else {
                tracing::info!(
                    transport = "fallback",
                    from = %from,
                    to = %route.name,
                    "traffic back on an earlier route"
                );
            }
        }
        let mut outcomes = match deadline {
            Some(d) => {
                route
                    .transport
                    .send_batch_until(destination, batch, d)
                    .await
            }
            None => route.transport.send_batch(destination, batch).await,
        };
        // As the pipeline judges its own breaker: the route failed if the broker took nothing
        // and every error was transient. Outcomes missing (a transport answering fewer than
        // the batch's messages) count as transient failures, as the pipeline counts them.
        let failed = !batch.is_empty()
            && outcomes.iter().take(batch.len()).all(|o| {
                o.as_ref()
                    .is_err_and(|e| e.class() == ErrorClass::Transient)
            });
        cut_off.answered();
        let (before, after) = {
            let now = clock_now();
            let mut breaker = route.breaker.lock().unwrap_or_else(PoisonError::into_inner);
            let before = breaker.state();
            if failed {
                breaker.on_failure_of(sent, now);
            } else {
                breaker.on_success_of(sent, now);
            }
            (before, breaker.state())
        };
        match after {
            CircuitState::Open if before != CircuitState::Open => tracing::warn!(
                transport = "fallback",
                route = %route.name,
                "the route's circuit opened after repeated failures: batches go to the next route until a probe gets through"
            ),
            CircuitState::Closed if before != CircuitState::Closed => tracing::info!(
                transport = "fallback",
                route = %route.name,
                "the route's circuit closed: it takes batches again"
            ),
            _ => {}
        }
        let tag = u8::try_from(index).unwrap_or(u8::MAX);
        for ack in outcomes.iter_mut().flatten() {
            ack.route = Some(tag);
        }
        outcomes
    }

    async fn send(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: Option<std::time::Instant>,
    ) -> BatchOutcome {
        match self.pick() {
            Some(picked) => self.send_on(picked, destination, batch, deadline).await,
            None => self.all_open(batch.len()),
        }
    }
}

#[async_trait]
impl Transport for Fallback {
    fn name(&self) -> &'static str {
        "fallback"
    }

    async fn send_batch(&self, destination: &Destination, batch: &[Message]) -> BatchOutcome {
        self.send(destination, batch, None).await
    }

    async fn send_batch_until(
        &self,
        destination: &Destination,
        batch: &[Message],
        deadline: std::time::Instant,
    ) -> BatchOutcome {
        self.send(destination, batch, Some(deadline)).await
    }

    /// Only if every route does: a batch may go to any of them.
    fn carries_headers(&self) -> bool {
        self.routes.iter().all(|r| r.transport.carries_headers())
    }

    fn settle_time(&self) -> Duration {
        self.routes
            .iter()
            .map(|r| r.transport.settle_time())
            .max()
            .unwrap_or_default()
    }

    /// Told to every route (which one delivered them is not kept): a route whose broker
    /// never saw them sends them under their usual id, as before, at worst once more under a
    /// new one.
    fn delivered_but_held(&self, destination: &Destination, messages: &[&Message]) {
        for r in &self.routes {
            let destination = r.destination.as_ref().unwrap_or(destination);
            r.transport.delivered_but_held(destination, messages);
        }
    }

    async fn close(&self) {
        for r in &self.routes {
            r.transport.close().await;
        }
    }

    /// Each route's diagnosis, named.
    fn diagnosis(&self) -> Option<String> {
        let parts: Vec<String> = self
            .routes
            .iter()
            .filter_map(|r| r.transport.diagnosis().map(|d| format!("{}: {d}", r.name)))
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// The route that took the last batch, and where it sends: `primary` or
    /// `fallback-1: rabbit-2:5672`.
    fn endpoint(&self) -> Option<String> {
        let route = self
            .routes
            .get(self.last.load(std::sync::atomic::Ordering::Relaxed))?;
        Some(match route.transport.endpoint() {
            Some(e) => format!("{}: {e}", route.name),
            None => route.name.clone(),
        })
    }

    /// Up while some route is up; blocked or down (naming each route) when none is.
    fn health(&self) -> TransportHealth {
        let all: Vec<(&str, TransportHealth)> = self
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.transport.health()))
            .collect();
        if all.iter().any(|(_, h)| *h == TransportHealth::Up) {
            return TransportHealth::Up;
        }
        let text: Vec<String> = all
            .iter()
            .map(|(name, h)| match h {
                TransportHealth::Up => format!("{name}: up"),
                TransportHealth::Blocked(why) => format!("{name}: blocked: {why}"),
                TransportHealth::Down(why) => format!("{name}: down: {why}"),
            })
            .collect();
        if all
            .iter()
            .any(|(_, h)| matches!(h, TransportHealth::Blocked(_)))
        {
            TransportHealth::Blocked(text.join("; "))
        } else {
            TransportHealth::Down(text.join("; "))
        }
    }
}
