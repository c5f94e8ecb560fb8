//! [`ProducerBuilder`]: every setting with its default, checked at `build`.

use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
use std::time::Duration;

use herald_batch::{BatchPolicy, SizeOrLinger};
use herald_retry::{CircuitBreakerConfig, ExponentialRetry, RetryBudgetConfig, RetryPolicy};

use super::completion::UnclaimedHook;
use super::order::OrderingMode;
use super::stage::{self, Stage};
use super::state::{clock_now, Config, Shared};
use super::{dispatch, health, Handle, Producer};
use crate::error::{BuildError, SendError};
use crate::health::HealthPolicy;
use crate::store::Store;
use crate::transport::Transport;

/// The batch policy, and whether it is herald's own [`SizeOrLinger`]: that one cannot panic
/// (comparisons and a saturating sum), so the producer asks it directly, where a user's policy is
/// asked behind a guard against panics (`catch_unwind` on every question, two a message, which
/// cost `send_all` about 6 % of its instructions: 1 047 against 980 a message).
pub(crate) struct Batching {
    pub(crate) policy: Box<dyn BatchPolicy>,
    pub(crate) own: bool,
}

impl Batching {
    fn own(policy: SizeOrLinger) -> Self {
        Self {
            policy: Box::new(policy),
            own: true,
        }
    }
}

/// Builds a [`Producer`]. Every setting has a default; [`ProducerBuilder::build`] checks them
/// all and names the first that cannot work.
pub struct ProducerBuilder {
    transport: Arc<dyn Transport>,
    batching: Batching,
    retry: Arc<dyn RetryPolicy>,
    budget: RetryBudgetConfig,
    breaker: CircuitBreakerConfig,
    max_buffered_messages: usize,
    max_buffered_bytes: usize,
    max_message_bytes: usize,
    /// `None`: the default ([`DEFAULT_MAX_IN_FLIGHT`], or the pipeline depth if deeper).
    max_in_flight: Option<usize>,
    /// `None`: the transport's suggestion, else [`DEFAULT_PIPELINE_DEPTH`].
    pipeline_depth: Option<usize>,
    delivery_timeout: Duration,
    ordering: OrderingMode,
    on_unclaimed: Option<UnclaimedHook>,
    health: HealthPolicy,
    name: Option<String>,
    store: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for ProducerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerBuilder")
            .field("transport", &self.transport.name())
            .field("batching", &self.batching.policy)
            .field("retry", &self.retry)
            .field("budget", &self.budget)
            .field("breaker", &self.breaker)
            .field("max_buffered_messages", &self.max_buffered_messages)
            .field("max_buffered_bytes", &self.max_buffered_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_in_flight", &self.in_flight_in_effect())
            .field("pipeline_depth", &self.depth_in_effect())
            .field("delivery_timeout", &self.delivery_timeout)
            .field("ordering", &self.ordering)
            .field("on_unclaimed", &self.on_unclaimed.is_some())
            .field("health", &self.health)
            .field("name", &self.name)
            .field("store", &self.store.as_ref().map(|s| s.describe()))
            .finish()
    }
}

impl ProducerBuilder {
    pub(super) fn new(transport: Arc<dyn Transport>) -> Self {
        Self {
            transport,
            batching: Batching::own(SizeOrLinger::default()),
            retry: Arc::new(ExponentialRetry::default()),
            budget: RetryBudgetConfig::default(),
            breaker: CircuitBreakerConfig::default(),
            max_buffered_messages: 100_000,
            max_buffered_bytes: 64 << 20,
            max_message_bytes: 1 << 20,
            max_in_flight: None,
            pipeline_depth: None,
            delivery_timeout: Duration::from_secs(120),
            ordering: OrderingMode::Strict,
            on_unclaimed: None,
            health: HealthPolicy::default(),
            name: None,
            store: None,
        }
    }

    /// The batching policy. Default: [`SizeOrLinger::default`] (1 024 messages, 1 MiB, no linger).
    #[must_use]
    pub fn batching(mut self, policy: impl BatchPolicy) -> Self {
        self.batching = match (&policy as &dyn std::any::Any).downcast_ref::<SizeOrLinger>() {
            Some(own) => Batching::own(own.clone()),
            None => Batching {
                policy: Box::new(policy),
                own: false,
            },
        };
        self
    }

    /// The retry policy. Default: [`ExponentialRetry::default`] (100 ms doubling to 10 s, full
    /// jitter, attempts bounded only by the delivery timeout).
    #[must_use]
    pub fn retry(mut self, policy: impl RetryPolicy) -> Self {
        self.retry = Arc::new(policy);
        self
    }

    /// The retry budget, counted in requests: each batch sent deposits `ratio` of a token, each
    /// retry of a failed batch's messages (sent again together) takes one, and `min_per_sec`
    /// tokens come per second regardless. A retry held back by the budget waits (within its
    /// delivery timeout) instead of failing. Default: [`RetryBudgetConfig::default`] (0.2 and
    /// 10/s, as tower's).
    #[must_use]
    pub fn retry_budget(mut self, budget: RetryBudgetConfig) -> Self {
        self.budget = budget;
        self
    }

    /// The circuit breaker consulted before each batch. Default: [`CircuitBreakerConfig::default`].
    #[must_use]
    pub fn circuit_breaker(mut self, breaker: CircuitBreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Buffer limits: messages and bytes accepted and not yet ended. When either is reached,
    /// `send` waits and `try_send` hands the message back. Default: 100 000 messages, 64 MiB.
    #[must_use]
    pub fn buffer(mut self, max_messages: usize, max_bytes: usize) -> Self {
        self.max_buffered_messages = max_messages;
        self.max_buffered_bytes = max_bytes;
        self
    }

    /// The largest message accepted (payload, key and headers); a larger one fails its own send
    /// with a permanent error at once. Default: 1 MiB.
    #[must_use]
    pub fn max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// Most batches the transport sends at once. Default: 8, or the pipeline depth if that is
    /// deeper.
    #[must_use]
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = Some(max);
        self
    }

    /// Under strict ordering, the most batches of one destination in flight at once, where the
    /// transport keeps order across calls ([`Transport::keeps_order_across_calls`]: herald-kafka
    /// with idempotence, herald-amqp, herald-nats, herald-redis, herald-mqtt); other transports
    /// (`Fallback`) send one batch per destination at a time whatever this says. Deeper pipelines hide the network's round trip: with one batch
    /// in flight, each batch waits for the acknowledgements of the one before. Per-key order
    /// is kept at every depth (docs/guarantees.md, Ordering); a transient failure costs up to
    /// `depth - 1` batches' worth of resent messages of its key. Also capped by
    /// [`max_in_flight`](Self::max_in_flight). Default: the transport's own
    /// ([`Transport::suggested_pipeline_depth`]: herald-kafka and herald-mqtt 16), else 4.
    #[must_use]
    pub fn pipeline_depth(mut self, depth: usize) -> Self {
        self.pipeline_depth = Some(depth);
        self
    }

    /// The pipeline depth in effect: set, or the transport's suggestion, or the default.
    fn depth_in_effect(&self) -> usize {
        self.pipeline_depth
            .or_else(|| self.transport.suggested_pipeline_depth())
            .unwrap_or(DEFAULT_PIPELINE_DEPTH)
    }

    /// The in-flight limit in effect: set, or the default, raised to a deeper pipeline (only
    /// where the transport pipelines at all: one that does not keep order across calls sends
    /// one batch per destination at a time).
    fn in_flight_in_effect(&self) -> usize {
        self.max_in_flight.unwrap_or_else(|| {
            if self.transport.keeps_order_across_calls() {
                DEFAULT_MAX_IN_FLIGHT.max(self.depth_in_effect())
            } else {
                DEFAULT_MAX_IN_FLIGHT
            }
        })
    }

    /// The whole life of a message, from acceptance to acknowledgement, retries included (like
    /// Kafka's `delivery.timeout.ms`). Default: 120 s.
    #[must_use]
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Ordering mode. Default: [`OrderingMode::Strict`].
    #[must_use]
    pub fn ordering(mut self, ordering: OrderingMode) -> Self {
        self.ordering = ordering;
        self
    }

    /// Called with every failed message whose caller stopped listening (a dropped future or
    /// receipt): an *unclaimed* failure, for example to write it to a store of its own. Without
    /// a hook, such messages are kept and returned by [`Producer::close`] in
    /// [`CloseReport::unclaimed`](super::CloseReport::unclaimed). Runs on the producer's tasks:
    /// keep it quick.
    #[must_use]
    pub fn on_unclaimed(mut self, hook: impl Fn(SendError) + Send + Sync + 'static) -> Self {
        self.on_unclaimed = Some(Arc::new(hook));
        self
    }

    /// Keeps every accepted message in `store` (herald-spool's on-disk spool) until its fate is
    /// final, so that a crash, a kill or a deploy loses nothing accepted. Default: none, every
    /// accepted message lives in memory only.
    ///
    /// With a store:
    /// - A message is *accepted* once the store has it durably (as its sync policy says):
    ///   [`Producer::send`], [`Producer::enqueue`] and [`Producer::send_all`] return after
    ///   that. [`Producer::try_send`] returns once the store has taken the message; if making
    ///   it durable then fails, its future ends with [`FailureReason::Store`](crate::FailureReason::Store).
    /// - It leaves the store once delivered, or failed and handed back. A message failed as
    ///   [`Closed`](crate::FailureReason::Closed) (a close that ran out of time) is handed back
    ///   and also kept: the next producer on the store sends it again.
    /// - What an earlier producer left in the store is sent first, before anything new, in the
    ///   order it was accepted; its failures go to the unclaimed hook (or
    ///   [`Producer::close`]'s report).
    /// - A full store is backpressure: `send` waits for room, `try_send` hands the message
    ///   back with [`FailureReason::Store`](crate::FailureReason::Store).
    /// - Stored messages wait in memory too while the buffer is full (so memory is bounded by
    ///   the store's size, not by the buffer's).
    #[must_use]
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The old name of [`ProducerBuilder::on_unclaimed`].
    #[deprecated(
        note = "renamed `on_unclaimed`: \"dead letter\" names the herald command's file of every failure"
    )]
    #[must_use]
    pub fn dead_letter(self, hook: impl Fn(SendError) + Send + Sync + 'static) -> Self {
        self.on_unclaimed(hook)
    }

    /// Names the producer: every metric it emits carries the label `producer` with this name,
    /// so that several producers on one transport in one process keep separate series. Up to
    /// 64 ASCII letters, digits, `_`, `-` or `.`; a name per producer, never per message.
    /// Default: no name and no `producer` label.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// When the producer counts as degraded or unhealthy, and how often health is evaluated.
    /// Default: [`HealthPolicy::default`].
    pub fn health(mut self, policy: HealthPolicy) -> Self {
        self.health = policy;
        self
    }

    fn validate(&self) -> Result<(), BuildError> {
        let invalid = |field, reason: &str| {
            Err(BuildError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.max_buffered_messages == 0 {
            return invalid("buffer.max_messages", "must be at least 1");
        }
        if self.max_buffered_bytes == 0 {
            return invalid("buffer.max_bytes", "must be at least 1");
        }
        if self.max_message_bytes == 0 {
            return invalid("max_message_bytes", "must be at least 1");
        }
        if self.max_message_bytes > self.max_buffered_bytes {
            return Err(BuildError::Invalid {
                field: "max_message_bytes",
                reason: format!(
                    "{} is larger than buffer.max_bytes ({}): such a message could never be buffered",
                    self.max_message_bytes, self.max_buffered_bytes
                ),
            });
        }
        if self.in_flight_in_effect() == 0 {
            return invalid("max_in_flight", "must be at least 1");
        }
        if self.depth_in_effect() == 0 {
            return invalid("pipeline_depth", "must be at least 1");
        }
        if self.delivery_timeout.is_zero() {
            return invalid("delivery_timeout", "must be more than zero");
        }
        if self.delivery_timeout > MAX_DELIVERY_TIMEOUT {
            return invalid(
                "delivery_timeout",
                "must be at most 365 days (a message is kept in memory until then)",
            );
        }
        self.batching.policy.validate()?;
        if self.batching.policy.linger() >= self.delivery_timeout {
            return Err(BuildError::Invalid {
                field: "batch.linger",
                reason: format!(
                    "{:?} is not shorter than delivery_timeout ({:?}): messages would expire while lingering",
                    self.batching.policy.linger(),
                    self.delivery_timeout
                ),
            });
        }
        self.retry.validate()?;
        self.budget.validate()?;
        self.breaker.validate()?;
        if let Some(name) = &self.name {
            crate::metrics::check_producer_label(name).map_err(|reason| BuildError::Invalid {
                field: "name",
                reason,
            })?;
        }
        self.health.check().map_err(|reason| BuildError::Invalid {
            field: "health",
            reason,
        })?;
        Ok(())
    }

    /// Checks every setting and starts the producer's dispatcher on the current Tokio runtime.
    pub fn build(self) -> Result<Producer, BuildError> {
        self.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let config = Config {
            max_buffered_messages: self.max_buffered_messages,
            max_buffered_bytes: self.max_buffered_bytes,
            max_message_bytes: self.max_message_bytes,
            max_in_flight: self.in_flight_in_effect(),
            pipeline_depth: if self.transport.keeps_order_across_calls() {
                self.depth_in_effect()
            } else {
                1
            },
            delivery_timeout: self.delivery_timeout,
            ordering: self.ordering,
            retry: self.retry,
            health: self.health,
            name: self.name,
        };
        let (stage, admissions) = match self.store {
            Some(store) => {
                let (stage, rx) = Stage::new(store.clone());
                (Some(stage), Some((store, rx)))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared::new(
            config,
            self.batching,
            self.budget.build(clock_now()),
            self.breaker.build(),
            self.transport,
            self.on_unclaimed,
            stage,
        ));
        let _dispatcher = runtime.spawn(dispatch::run_dispatcher(shared.clone()));
        if let Some((store, rx)) = admissions {
            stage::hold_for_recovery(&shared);
            runtime.spawn(stage::run_admitter(shared.clone(), store, rx));
        }
        runtime.spawn(health::run_health(
            Arc::downgrade(&shared),
            shared.health.kick.clone(),
            self.health.interval,
        ));
        Ok(Producer {
            handle: Arc::new(Handle {
                shared,
                #[cfg(test)]
                dispatcher: Mutex::new(Some(_dispatcher)),
            }),
        })
    }
}

/// Batches of one destination in flight under strict ordering, by default (where the transport
/// keeps order across calls).
pub(crate) const DEFAULT_PIPELINE_DEPTH: usize = 4;

/// Batches in flight at once, by default (raised to the pipeline depth if that is deeper).
const DEFAULT_MAX_IN_FLIGHT: usize = 8;

/// The longest delivery timeout accepted: long enough for any outage, short enough that
/// deadlines never overflow the clock.
const MAX_DELIVERY_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{async_trait, Ack, BatchOutcome, Destination, Message, Producer};

    /// Suggests a pipeline depth; keeps order across calls unless said otherwise.
    struct Suggests(Option<usize>, bool);

    fn suggests(depth: Option<usize>) -> Suggests {
        Suggests(depth, true)
    }

    #[async_trait]
    impl Transport for Suggests {
        fn name(&self) -> &'static str {
            "suggests"
        }
        async fn send_batch(&self, _: &Destination, batch: &[Message]) -> BatchOutcome {
            batch.iter().map(|_| Ok(Ack::default())).collect()
        }
        fn keeps_order_across_calls(&self) -> bool {
            self.1
        }
        fn suggested_pipeline_depth(&self) -> Option<usize> {
            self.0
        }
    }

    /// herald's own batch policy is asked without the guard against panics (it has none);
    /// any other, and a policy of the user's type that wraps it, behind it.
    #[test]
    fn only_herald_s_own_batch_policy_goes_unguarded() {
        #[derive(Debug)]
        struct Wraps(SizeOrLinger);
        impl BatchPolicy for Wraps {
            fn admits(&self, batch: herald_batch::BatchStats, bytes: usize) -> bool {
                self.0.admits(batch, bytes)
            }
            fn is_full(&self, batch: herald_batch::BatchStats) -> bool {
                self.0.is_full(batch)
            }
            fn linger(&self) -> Duration {
                self.0.linger()
            }
        }
        let own = |b: ProducerBuilder| b.batching.own;
        assert!(own(Producer::builder(suggests(None))), "the default");
        let custom = SizeOrLinger::new(7, 1 << 10, Duration::from_millis(3));
        let set = Producer::builder(suggests(None)).batching(custom.clone());
        assert!(set.batching.own);
        assert_eq!(
            set.batching.policy.linger(),
            Duration::from_millis(3),
            "its settings kept"
        );
        assert!(!own(
            Producer::builder(suggests(None)).batching(Wraps(custom))
        ));
    }

    /// (pipeline depth, max in flight) of a built producer.
    fn limits(builder: ProducerBuilder) -> (usize, usize) {
        let producer = builder.build().expect("build");
        let config = &producer.handle.shared.config;
        (config.pipeline_depth, config.max_in_flight)
    }

    #[tokio::test]
    async fn the_transport_suggests_the_pipeline_depth_and_what_is_set_wins() {
        assert_eq!(
            limits(Producer::builder(suggests(None))),
            (4, 8),
            "herald's defaults"
        );
        assert_eq!(
            limits(Producer::builder(suggests(Some(16)))),
            (16, 16),
            "the suggestion, with room in flight for it"
        );
        assert_eq!(
            limits(Producer::builder(suggests(Some(16))).pipeline_depth(2)),
            (2, 8),
            "a depth set wins"
        );
        assert_eq!(
            limits(Producer::builder(suggests(Some(16))).max_in_flight(4)),
            (16, 4),
            "an in-flight limit set wins (and caps the depth)"
        );
        assert_eq!(
            limits(Producer::builder(Suggests(Some(16), false))),
            (1, 8),
            "no pipeline where the transport does not keep order across calls, so no more room"
        );
    }
}
