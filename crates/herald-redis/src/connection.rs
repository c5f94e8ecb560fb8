//! Connections: one multiplexed redis-rs connection at a time, opened on demand, replaced
//! (never resumed) after a loss, with backoff between failed attempts (a
//! `herald_core::rotation::Rotation` over the URL's one server); and the health verdict they
//! add up to.
//!
//! Why a connection is replaced, not resumed, and why that keeps per-key order: Redis executes
//! the commands of one connection in the order they arrive, and a batch is one pipeline on one
//! connection. When the connection breaks, what Redis appended is a prefix of what was sent;
//! the transport fails the whole batch as transient (it cannot tell which replies were lost),
//! and herald retries it, in order, on a new connection. First copies thus stay in per-key
//! order; the prefix Redis had appended is appended again (at-least-once: Redis Streams have
//! no idempotent producer, see the guarantees). redis-rs's `ConnectionManager`, which
//! reconnects underneath its callers, is not used: the transport wants to know each loss, count
//! it and report it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use herald_core::rotation::{Dialer, Opened, Rotation, Wording};
use herald_core::{TransportError, TransportHealth};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
};

use crate::config::RedisConfig;
use crate::error::{classify_connect, ConfigError};
use crate::metrics::RedisMetrics;

/// The transport's view of its connection.
#[derive(Debug, Default)]
struct Flow {
    /// Up; set false as soon as a batch finds the connection broken.
    connected: AtomicBool,
    /// Why the last connection attempt failed; cleared when one opens. What
    /// [`Transport::health`](herald_core::Transport::health) reports as down.
    down: StdMutex<Option<String>>,
    /// A background reconnection attempt is under way (see `Inner::probe`).
    probing: AtomicBool,
    /// `Transport::close` ran, and no batch has been sent since: no background reconnection.
    closed: AtomicBool,
    /// A connection was up at some point: "not connected" then means lost, not "not yet".
    ever_up: AtomicBool,
}

/// One live connection.
pub(crate) struct Live {
    pub(crate) conn: MultiplexedConnection,
    /// This connection's path number (see `herald_core::Turn::enter`).
    pub(crate) path: u64,
    /// A batch found it broken (or gave up on it): no batch uses it any more.
    lost: AtomicBool,
    /// Pipelines the server answered (or refused) so far. See [`Live::silent_for`].
    answers: std::sync::atomic::AtomicU64,
    /// See [`Live::silent_for`].
    silence: herald_core::rotation::SilenceWatch,
    /// Pipelines ending in `WAIT` sent and not yet answered: Redis answers a connection in
    /// order, so each waits behind the `WAIT`s before it.
    pub(crate) waits: std::sync::atomic::AtomicUsize,
}

impl Live {
    pub(crate) fn is_connected(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
    }

    /// A pipeline goes out: unless others already wait, its time starts
    /// [`Live::silent_for`]'s watch.
    pub(crate) fn expecting(&self) {
        let answers = self.answers.load(Ordering::Acquire);
        self.silence
            .expecting(herald_core::rotation::SilenceWatch::snapshot(answers));
    }

    /// The server answered a pipeline (Redis answers in order: the ones before too, or they
    /// were given up on).
    pub(crate) fn answered(&self) {
        self.answers.fetch_add(1, Ordering::AcqRel);
    }

    /// How long pipelines have waited without the server answering any, if some wait.
    /// Batches cut off at their delivery deadline never see their own replies time out, so a
    /// connection gone silent (a half-open TCP connection, a hung server; redis-rs sends no
    /// pings) is given up by this instead, at the start of the next batch, once silent for as
    /// long as a pipeline may take (the ack timeout, plus `WAIT`'s).
    pub(crate) fn silent_for(&self) -> Option<Duration> {
        self.silence
            .silent_for(self.answers.load(Ordering::Acquire))
    }
}

/// Why a connection is given up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Broken or closed.
    Lost,
    /// Silent: its replies stopped coming.
    Silent,
    /// Its server refused a write as a replica.
    Replica,
    /// A reply that is no entry id: its replies may be out of step with its commands.
    OutOfStep,
}

/// What every clone of a [`RedisTransport`](crate::RedisTransport) shares: the settings, the
/// client, the connection, the health state and the metrics.
pub(crate) struct Inner {
    pub(crate) config: RedisConfig,
    client: Client,
    /// The connection, over a list of one server: the URL's.
    rotation: Rotation<Arc<Live>>,
    flow: Flow,
    pub(crate) metrics: RedisMetrics,
    /// `redis://host:port` (no credentials), for messages.
    pub(crate) server: String,
    /// The order in which calls of one stream hand their pipelines to the connection.
    pub(crate) turns: herald_core::Turns,
}

/// The redis-rs client for `config`: address, TLS (the system's roots, or the CA file), user,
/// password and database. Nothing connects yet.
pub(crate) fn client(config: &RedisConfig) -> Result<Client, ConfigError> {
    let url = &config.url;
    let addr = if url.tls {
        // redis-rs builds its TLS configuration with rustls's process-wide crypto provider.
        herald_core::tls::ensure_crypto_provider();
        ConnectionAddr::TcpTls {
            host: url.endpoint.host.clone(),
            port: url.endpoint.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(url.endpoint.host.clone(), url.endpoint.port)
    };
    let mut redis = RedisConnectionInfo::default().set_db(i64::from(url.db.unwrap_or(0)));
    if let Some(user) = &url.user {
        redis = redis.set_username(user);
    }
    if let Some(password) = &url.password {
        redis = redis.set_password(password.expose());
    }
    let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
    let info = addr
        .into_connection_info()
        .map_err(|e| invalid("url", e.to_string()))?
        .set_redis_settings(redis);
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| invalid(field, format!("cannot be read ({}): {e}", path.display())))
    };
    let files = &config.url.tls_files;
    if !files.any() {
        return Client::open(info).map_err(|e| invalid("url", e.to_string()));
    }
    let root_cert = files
        .ca_file()
        .map(|path| read("tls_ca_file", path))
        .transpose()?;
    let client_tls = match files.client_cert() {
        None => None,
        Some(c) => Some(redis::ClientTlsConfig {
            client_cert: read("tls_client_cert", &c.cert_file)?,
            client_key: read("tls_client_cert", &c.key_file)?,
        }),
    };
    let field = if client_tls.is_some() {
        "tls_client_cert"
    } else {
        "tls_ca_file"
    };
    Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| invalid(field, e.to_string()))
}

/// Pipelines that may wait in a connection's queue to be written (see `Inner::dial`).
const PIPELINE_QUEUE: usize = 4096;

impl Inner {
    /// The shared state for checked settings; nothing connects yet.
    pub(crate) fn new(config: RedisConfig) -> Result<Self, ConfigError> {
        let metrics = RedisMetrics::new(config.metrics_name.as_deref());
        // No jitter: `RedisConfig::reconnect_backoff` promises `min`, doubling, up to `max`.
        let rotation = Rotation::new(
            vec![config.url.endpoint.clone()],
            (config.reconnect_min, config.reconnect_max),
            config.connect_timeout,
            Wording {
                peer: "the server",
                entry: "server",
                no_entry_code: "NO_SERVER",
            },
        );
        Ok(Self {
            client: client(&config)?,
            server: config.url.server(),
            config,
            rotation,
            flow: Flow::default(),
            metrics,
            turns: herald_core::Turns::default(),
        })
    }

    /// A batch is on its way: reconnecting in the background is allowed again after a close.
    pub(crate) fn in_use(&self) {
        self.flow.closed.store(false, Ordering::Release);
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.flow.connected.load(Ordering::Acquire)
    }

    /// Connects unless connected; see [`RedisTransport::connect`](crate::RedisTransport::connect).
    pub(crate) async fn connect(&self) -> Result<(), TransportError> {
        self.live().await.map(|_| ())
    }

    fn set_down(&self, why: Option<String>) {
        *self
            .flow
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = why;
    }

    fn down(&self) -> Option<String> {
        self.flow
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_connected(&self, up: bool) {
        self.flow.connected.store(up, Ordering::Release);
        if up {
            self.flow.ever_up.store(true, Ordering::Release);
        }
        self.metrics.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// While down, tries to reconnect in the background (one attempt at a time, on the usual
    /// reconnect backoff): connections open on demand, so without it a producer that gets no
    /// traffic because it reports itself down would never find the server back. Needs a Tokio
    /// runtime; without one, the next send reconnects.
    fn probe(self: &Arc<Self>) {
        let flow = &self.flow;
        if flow.closed.load(Ordering::Acquire) || flow.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            flow.probing.store(false, Ordering::Release);
            return;
        };
        let inner = Arc::clone(self);
        runtime.spawn(async move {
            // Success clears `down`; a failure records why and pushes the next attempt back.
            let _outcome = inner.connect().await;
            inner.flow.probing.store(false, Ordering::Release);
        });
    }

    /// The live connection, opened (or replaced) if there is none, after waiting out the
    /// backoff of a failed attempt (`herald_core::rotation`).
    pub(crate) async fn live(&self) -> Result<Arc<Live>, TransportError> {
        self.rotation.live(self).await
    }

    /// Opens a multiplexed connection to the server.
    async fn dial(&self) -> Result<Arc<Live>, TransportError> {
        let options = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            // One deadline per batch, the transport's own (`ack_timeout`).
            .set_response_timeout(None)
            // A call's place in a stream's write order is taken when its pipeline enters this
            // queue (see `publish`). redis-rs's default of 50 can fill with enough calls in
            // flight (a large `max_in_flight`, several producers on one transport); calls
            // waiting for room then enter in the order their tasks happen to run, not the
            // order they asked, and two pipelines of a stream could be written the wrong
            // way round, both answered with ids. A queue entry is a pipeline waiting to be
            // written, so room for many costs little.
            .set_pipeline_buffer_size(PIPELINE_QUEUE);
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&options)
            .await
            .map_err(|e| classify_connect(&e, &self.server))?;
        // A server that is loading its dataset (just restarted with an AOF or RDB) refuses
        // every command with LOADING until it is done, and may finish in the middle of a
        // pipeline: the pipeline's first XADDs refused, its later ones appended, first copies
        // out of per-key order. So a connection is used once the server answers a PING
        // without LOADING (any other answer will do; an ACL user without +ping gets NOPERM,
        // which Redis checks first, so for it this check sees nothing). The rotation bounds
        // the whole of this by the connect timeout.
        let cmd = redis::cmd("PING");
        if let Err(e) = cmd.query_async::<redis::Value>(&mut conn).await {
            if e.code() == Some("LOADING") || crate::error::breaks_connection(&e) {
                return Err(classify_connect(&e, &self.server));
            }
        }
        Ok(Arc::new(Live {
            conn,
            path: herald_core::Turns::fresh_path(),
            lost: AtomicBool::new(false),
            answers: std::sync::atomic::AtomicU64::new(0),
            waits: std::sync::atomic::AtomicUsize::new(0),
            silence: herald_core::rotation::SilenceWatch::default(),
        }))
    }

    /// A batch found `live` broken: it is never used again, and the next batch opens a new
    /// connection. Counted once per connection.
    pub(crate) async fn lost(&self, live: &Arc<Live>) {
        self.give_up(live, GiveUp::Lost).await;
    }

    /// Gives up on `live` (its replies stopped coming within the ack timeout: a half-open TCP
    /// connection, a hung server), so that the next send opens a new one. The connection
    /// closes once the batches still holding it are done.
    pub(crate) async fn abandon(&self, live: &Arc<Live>) {
        self.give_up(live, GiveUp::Silent).await;
    }

    /// Gives up on `live` for `why` (its server a replica now, `READONLY` or `MASTERDOWN` after
    /// a failover; or its replies out of step), so that the next send opens a new connection
    /// (which follows the primary's name). Counted as abandoned.
    ///
    /// Without waiting: marked lost at once (the rotation replaces it at the next call), so
    /// that a call holding replies already read is not cut off waiting for the rotation's lock
    /// with them (the entries they name reported failed, and appended again).
    pub(crate) fn give_up_now(&self, live: &Arc<Live>, why: GiveUp) {
        if self.mark_given_up(live, why) {
            self.set_connected(false);
        }
    }

    async fn give_up(&self, live: &Arc<Live>, why: GiveUp) {
        if self.mark_given_up(live, why) {
            // Taken out if it is still the connection in use (`Dialer::lost` marks it down).
            let _given_up = self.rotation.abandon(|l| Arc::ptr_eq(l, live), self).await;
        }
    }

    /// Marks `live` lost, counting and logging why, unless it was already: false then.
    fn mark_given_up(&self, live: &Arc<Live>, why: GiveUp) -> bool {
        if live.lost.swap(true, Ordering::AcqRel) {
            return false;
        }
        let (counter, what) = match why {
            GiveUp::Silent => {
                self.metrics.abandoned.increment(1);
                tracing::warn!(
                    transport = "redis",
                    producer = self.producer(),
                    server = %self.server,
                    ack_timeout_ms = u64::try_from(self.config.ack_timeout.as_millis()).unwrap_or(u64::MAX),
                    "the Redis server stopped answering: connection given up, the next batch opens a new one"
                );
                return true;
            }
            GiveUp::Replica => (
                &self.metrics.abandoned,
                "the Redis server is a replica now (READONLY or MASTERDOWN: after a failover the old primary becomes one): connection given up, the next batch opens a new one to the primary's name",
            ),
            GiveUp::OutOfStep => (
                &self.metrics.abandoned,
                "the Redis server answered an XADD with a reply that is no entry id: the connection's replies may be out of step with its commands; connection given up, the next batch opens a new one",
            ),
            GiveUp::Lost => (
                &self.metrics.lost,
                "the connection to the Redis server was lost; the next batch opens a new one",
            ),
        };
        counter.increment(1);
        tracing::warn!(
            transport = "redis",
            producer = self.producer(),
            server = %self.server,
            "{what}"
        );
        true
    }

    /// What [`Transport::health`](herald_core::Transport::health) reports (documented there);
    /// while down, it starts a background reconnection attempt.
    pub(crate) fn health(self: &Arc<Self>) -> TransportHealth {
        match self.down() {
            Some(why) => {
                self.probe();
                TransportHealth::Down(why)
            }
            None => TransportHealth::Up,
        }
    }

    /// What [`Transport::diagnosis`](herald_core::Transport::diagnosis) reports: why the last
    /// connection attempt failed, or that the connection was lost.
    pub(crate) fn diagnosis(&self) -> Option<String> {
        self.down().or_else(|| {
            (self.flow.ever_up.load(Ordering::Acquire) && !self.is_connected()).then(|| {
                format!(
                    "the connection to {} was lost; the next send opens a new one",
                    self.server
                )
            })
        })
    }

    /// The transport's metrics name, for log events.
    fn producer(&self) -> Option<&str> {
        self.config.metrics_name.as_deref()
    }

    /// `host:port` of the server while a connection is up.
    pub(crate) fn endpoint(&self) -> Option<String> {
        self.is_connected()
            .then(|| self.config.url.endpoint.to_string())
    }

    /// Closes the connection, if one is up, and stops background reconnection until the next
    /// batch. Every message already has its outcome: dropping the connection closes it.
    pub(crate) async fn close(&self) {
        self.flow.closed.store(true, Ordering::Release);
        if let Some((live, _)) = self.rotation.take().await {
            live.lost.store(true, Ordering::Release);
        }
        self.set_connected(false);
    }
}

/// The rotation's view of the transport: how the connection opens, and what is logged, counted
/// and recorded as it comes and goes. One server: a round is one attempt.
impl Dialer<Arc<Live>> for Inner {
    fn is_up(&self, live: &Arc<Live>) -> bool {
        live.is_connected()
    }

    async fn open(&self, _index: usize) -> Result<Arc<Live>, TransportError> {
        self.dial().await
    }

    fn describe(&self, _index: usize) -> String {
        self.server.clone()
    }

    fn attempt_failed(&self, _index: usize) {
        self.metrics.connect_failures.increment(1);
    }

    fn opened(&self, _index: usize, _live: &Arc<Live>, _how: Opened, failed_attempts: u32) {
        let message = if self.flow.ever_up.load(Ordering::Acquire) {
            "reconnected to the Redis server"
        } else {
            "connected to the Redis server"
        };
        tracing::info!(
            transport = "redis",
            producer = self.producer(),
            server = %self.server,
            failed_attempts,
            "{message}"
        );
        self.metrics.opened.increment(1);
        self.set_connected(true);
        self.set_down(None);
    }

    fn round_failed(&self, error: &TransportError, _failed_attempts: u32, _retry_in: Duration) {
        tracing::warn!(
            transport = "redis",
            producer = self.producer(),
            error = %error,
            "cannot connect to the Redis server; retried on the reconnect backoff"
        );
        self.set_down(Some(error.to_string()));
    }

    fn lost(&self, _index: usize, _live: &Arc<Live>, _next: usize) {
        self.set_connected(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rustls panics when redis-rs builds a TLS configuration in a process with two crypto
    /// providers and none chosen (an application that also brings aws-lc-rs; this workspace
    /// has ring alone, so the panic itself cannot be shown here): a `rediss://` client makes
    /// sure one is chosen. Before, none was.
    #[test]
    fn a_rediss_client_has_a_crypto_provider_chosen() {
        client(&RedisConfig::from_url("rediss://h/s").expect("url")).expect("client");
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[test]
    fn a_missing_ca_file_is_a_setting_error() {
        let config = RedisConfig::from_url("rediss://h/s")
            .expect("url")
            .tls_ca_file("/nonexistent/ca.pem");
        match client(&config) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "tls_ca_file"),
            other => panic!("{:?}", other.err()),
        }
    }
}
