//! Publishing: a batch published to its subject without waiting per message (up to a window of
//! unacknowledged messages), its PubAcks awaited within one deadline for the whole batch, and
//! the outcome of every message, in order: PubAck, JetStream's refusal, a permission
//! violation, a lost connection, per-key order.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex as StdMutex, PoisonError};

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::publish::PublishAck;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures_util::FutureExt;
use herald_core::{
    Ack, BatchOutcome, Destination, EarlyAcks, Message, MessageId, TransportError, Turn,
};
use tokio::time::Instant;

use crate::config::NatsConfig;
use crate::connection::{Inner, Live};
use crate::destination;
use crate::error::{classify_publish, denied};

/// A PubAck on its way.
type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// The header JetStream deduplicates by, as text.
const MSG_ID: &str = "Nats-Msg-Id";

/// What one batch's publishing shares.
struct Batch<'a> {
    inner: &'a Inner,
    live: &'a Live,
    subject: &'a str,
    /// This transport declared a stream capturing the subject.
    declared: bool,
    deadline: Instant,
    /// herald's deadline for the attempt, if it gave one: nothing is published past it.
    until: Option<std::time::Instant>,
    /// Where a PubAck is told as it comes.
    early: Option<EarlyAcks>,
    /// The errors the server had reported before the batch's first publish: a publish denial
    /// reported by then concerns earlier publishes (permissions may have changed since).
    errors_before: u64,
}

/// Sends one batch to `destination`: what
/// [`Transport::send_batch`](herald_core::Transport::send_batch) does.
pub(crate) async fn send_batch(
    inner: &Inner,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
    early: Option<EarlyAcks>,
) -> BatchOutcome {
    // The destination's turn first, before any other await: calls of one subject publish in
    // the order herald started them (see `Transport::keeps_order_across_calls`), and wait for
    // their PubAcks side by side.
    inner
        .turns
        .run(destination, batch, async |turn| {
            send_in_turn(inner, turn, destination, batch, until, early).await
        })
        .await
}

/// The live connection to publish to `subject` on: a new one if the one in use has answered
/// nothing for `ack_timeout` though it looks up (see `Live::silent_for`).
async fn answering_live(
    inner: &Inner,
    subject: &str,
) -> Result<std::sync::Arc<Live>, TransportError> {
    let live = inner.live().await?;
    let silent = live
        .silent_for()
        .is_some_and(|silent| silent >= inner.config.ack_timeout);
    // A denied reply inbox leaves every publish of the connection unanswered: the inbox is
    // subscribed once, when the connection first publishes, and a reload that grants it later
    // does not subscribe it again. So a connection whose inbox was denied is given up too,
    // and the next one asks again. (A denied publish is answered by an error, which ends the
    // silence: only the inbox's denial counts here, which a `since` past every publish
    // denial's count asks for.)
    if silent || live.denial(subject, u64::MAX).is_some() {
        inner.abandon(&live).await;
        return inner.live().await;
    }
    Ok(live)
}

/// [`send_batch`] in the subject's turn.
async fn send_in_turn(
    inner: &Inner,
    turn: &mut Turn,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
    early: Option<EarlyAcks>,
) -> BatchOutcome {
    inner.in_use();
    let fail_all = |e: TransportError| batch.iter().map(|_| Err(e.clone())).collect();
    let subject = match destination::parse(destination) {
        Ok(s) => s,
        Err(e) => return fail_all(e),
    };
    let live = match answering_live(inner, &subject).await {
        Ok(l) => l,
        Err(e) => return fail_all(e),
    };
    if let Err(e) = inner.redeclare(&live).await {
        return fail_all(e);
    }
    // Not sent: keys that failed in the calls before, if this call is on a new connection.
    // (On a new connection, this waits for the calls before to end.)
    let mut hold = turn.enter(live.path).await;
    let b = Batch {
        inner,
        live: &live,
        subject: &subject,
        declared: inner.config.topology.iter().any(|d| d.captures(&subject)),
        // One deadline for the whole batch: publishes and PubAcks share it. From its turn,
        // not from before the wait for the calls ahead of it: a batch left with a sliver of
        // time would take its PubAcks for missing and give a sound connection up.
        deadline: Instant::now() + inner.config.ack_timeout,
        until,
        early,
        errors_before: live.errors_heard(),
    };
    let mut outcomes: Vec<Option<Result<Ack, TransportError>>> = vec![None; batch.len()];
    let mut pending: VecDeque<(usize, AckFuture)> =
        VecDeque::with_capacity(inner.config.window.min(batch.len()));
    // Once the connection is gone (or the batch's time is up), nothing more is published.
    let mut broken: Option<TransportError> = None;
    // The silence watch starts with the batch's first publish out (see `Live::silent_for`).
    let mut expecting = false;
    for (i, msg) in batch.iter().enumerate() {
        if let Some(e) = &broken {
            outcomes[i] = Some(Err(e.clone()));
            continue;
        }
        // A copy to be stored again behind an earlier message of its key (see `Resends`) waits
        // for the PubAcks of everything before it: if that message is refused again, this one
        // is held, not stored out of order once more under yet another id.
        let barrier =
            !pending.is_empty() && msg.id().is_some_and(|id| inner.resends.token(id).is_some());
        while pending.len() >= inner.config.window || (barrier && !pending.is_empty()) {
            if let Some((j, ack)) = pending.pop_front() {
                let outcome = b.settle(j, ack).await;
                if let Err(e) = &outcome {
                    hold.failed(&batch[j], e);
                }
                outcomes[j] = Some(outcome);
            }
        }
        // Not even sent behind a transient failure of its key (the pipeline retries it after).
        if let Some(held) = hold.check(msg) {
            outcomes[i] = Some(Err(held));
            continue;
        }
        let publish = match message(&inner.config, msg, &inner.resends) {
            Ok(p) => p,
            Err(e) => {
                outcomes[i] = Some(Err(e));
                continue;
            }
        };
        if !live.is_connected() {
            let e = b.lost();
            outcomes[i] = Some(Err(e.clone()));
            broken = Some(e);
            continue;
        }
        if herald_core::deadline_passed(b.until) {
            let e = b.not_sent_in_time();
            outcomes[i] = Some(Err(e.clone()));
            broken = Some(e);
            continue;
        }
        let snapshot = (!expecting).then(|| live.snapshot());
        let sent =
            tokio::time::timeout_at(b.deadline, live.js.send_publish(subject.clone(), publish))
                .await;
        match sent {
            Ok(Ok(ack)) => {
                if let Some(snapshot) = snapshot {
                    live.expecting(snapshot);
                    expecting = true;
                }
                pending.push_back((i, ack.into_future()));
            }
            Ok(Err(e)) => {
                let e = b.error(&e);
                hold.failed(msg, &e);
                if matches!(e.code(), Some("CONNECTION_LOST" | "CLIENT_ERROR")) {
                    broken = Some(e.clone());
                }
                outcomes[i] = Some(Err(e));
            }
            Err(_) => {
                let e = b.timeout("publishing");
                outcomes[i] = Some(Err(e.clone()));
                broken = Some(e);
            }
        }
    }
    // What failed before the turn passes holds its key for the next call at once.
    turn.hand_over(batch, &outcomes);
    for (j, ack) in pending {
        outcomes[j] = Some(b.settle(j, ack).await);
    }
    let outcomes: BatchOutcome = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Err(TransportError::transient(
                    "internal: message not published; retried",
                ))
            })
        })
        .collect();
    inner.resends.stored(batch, &outcomes);
    if live.is_connected()
        && outcomes
            .iter()
            .any(|o| matches!(o, Err(e) if e.code() == Some("TIMEOUT")))
    {
        // The connection looks up but PubAcks stopped coming (a half-open TCP connection, a
        // hung server): give it up, so that the retry goes out on a new one.
        inner.abandon(&live).await;
    }
    // A later message of a key stored after its earlier one failed transiently is held by the
    // pipeline (`KeyHold`, under strict ordering) and sent again behind the retry, under a
    // Nats-Msg-Id of its own (`Resends`), so that JetStream stores that copy, the one in order.
    outcomes
}

/// The answer `ack` holds already, if it does, whatever is left of the task's cooperative
/// budget. A plain `now_or_never` is `None` for an answer in its channel once the task has
/// used up Tokio's budget (a batch settling its PubAcks in a row does): taken as lost, a
/// message JetStream stored and acknowledged was reported failed (found with a server killed
/// while batches settled: thousands of PubAcks in hand, reported `CONNECTION_LOST`); and the
/// batch's call, left pending for want of budget, could meet its deadline with PubAcks in
/// hand, or a denial reported meanwhile be taken for the message's own.
fn in_hand<F: Future + Unpin>(ack: &mut F) -> Option<F::Output> {
    tokio::task::coop::unconstrained(ack).now_or_never()
}

/// Messages stored ahead of the retry of an earlier message of their key, which the pipeline
/// sends again behind it ([`herald_core::Transport::delivered_but_held`]). JetStream would drop
/// that copy by its `Nats-Msg-Id` (the message's herald id), keeping only the first, out of
/// order; so until a copy of it is stored again, such a message goes out as `ID-TOKEN`, a
/// random token of its own, kept across its retries (JetStream drops their copies, as for any
/// message). Bounded: the oldest entries go beyond [`Resends::MAX`].
#[derive(Debug, Default)]
pub(crate) struct Resends {
    /// Whether `ids` holds anything: the common case takes no lock.
    any: AtomicBool,
    ids: StdMutex<(HashMap<MessageId, u32>, VecDeque<MessageId>)>,
}

impl Resends {
    const MAX: usize = 65_536;

    /// `messages` are to be stored again, each under a new token.
    pub(crate) fn held(&self, messages: &[&Message]) {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, order) = &mut *ids;
        for id in messages.iter().filter_map(|m| m.id()) {
            if tokens.insert(id, fastrand::u32(..)).is_none() {
                order.push_back(id);
            }
        }
        while order.len() > Self::MAX {
            if let Some(oldest) = order.pop_front() {
                tokens.remove(&oldest);
            }
        }
        self.any.store(!tokens.is_empty(), Ordering::Release);
    }

    /// The token `id` goes out with, if it is to be stored again.
    fn token(&self, id: MessageId) -> Option<u32> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        ids.0.get(&id).copied()
    }

    /// The messages of `batch` stored this time need no token any more (held again, they get
    /// a new one).
    fn stored(&self, batch: &[Message], outcomes: &[Result<Ack, TransportError>]) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, order) = &mut *ids;
        for (m, o) in batch.iter().zip(outcomes) {
            if let (Some(id), Ok(_)) = (m.id(), o) {
                if tokens.remove(&id).is_some() {
                    order.retain(|o| *o != id);
                }
            }
        }
        self.any.store(!tokens.is_empty(), Ordering::Release);
    }
}

impl Batch<'_> {
    /// Waits for one PubAck, until the batch's deadline, a permission violation on the subject,
    /// or the loss of the connection (after which no PubAck can come). A PubAck is told early
    /// at once (`index` is the message's place in the batch).
    async fn settle(&self, index: usize, ack: AckFuture) -> Result<Ack, TransportError> {
        let outcome = self.wait(ack).await;
        if let (Some(early), Ok(ack)) = (&self.early, &outcome) {
            early.ack(index, *ack);
        }
        outcome
    }

    async fn wait(&self, mut ack: AckFuture) -> Result<Ack, TransportError> {
        loop {
            // A PubAck in hand is the outcome, before a denial or a loss is looked at, and
            // whatever the task's budget (see `in_hand`). Most PubAcks are in by the time their
            // turn to be awaited comes (they arrive in bursts): one that is needs neither the
            // watch on the connection, nor the permission check, nor the batch's deadline
            // timer, which cost more than the PubAck itself. Unconstrained, a batch's PubAcks
            // in hand settle in one go rather than 128 at a time.
            if let Some(r) = in_hand(&mut ack) {
                return self.outcome(r);
            }
            let changed = self.live.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(d) = self.live.denial(self.subject, self.errors_before) {
                return Err(denied(&d, self.subject));
            }
            if !self.live.is_connected() {
                // An answer read before the loss is in its channel already (it may have come
                // since the look above).
                return match in_hand(&mut ack) {
                    Some(r) => self.outcome(r),
                    None => Err(self.lost()),
                };
            }
            tokio::select! {
                biased;
                r = &mut ack => return self.outcome(r),
                () = &mut changed => {}
                () = tokio::time::sleep_until(self.deadline) => {
                    return Err(self.timeout("waiting for its PubAck"));
                }
            }
        }
    }

    fn outcome(&self, r: Result<PublishAck, PublishError>) -> Result<Ack, TransportError> {
        match r {
            Ok(ack) => {
                if ack.duplicate {
                    self.inner.metrics.duplicates.increment(1);
                }
                Ok(Ack {
                    offset: i64::try_from(ack.sequence).ok(),
                    ..Ack::default()
                })
            }
            Err(e) => Err(self.error(&e)),
        }
    }

    /// Classifies a publish or PubAck error, asking for the declarations again after a missing
    /// stream this transport declares.
    fn error(&self, e: &PublishError) -> TransportError {
        let err = classify_publish(e, self.subject, self.declared);
        if err.code() == Some("NO_STREAM") && self.declared {
            self.live
                .redeclare
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if err.code() == Some("CLIENT_ERROR") && !self.live.is_connected() {
            return self.lost();
        }
        err
    }

    fn lost(&self) -> TransportError {
        TransportError::transient(format!(
            "the connection to {} was lost before the PubAck for a message to \"{}\" came; herald reconnects and retries (a duplicate is dropped by its Nats-Msg-Id)",
            self.inner.server_of(self.live),
            self.subject
        ))
        .with_code("CONNECTION_LOST")
    }

    /// A message not published because herald's deadline for the attempt had passed: never
    /// sent, so never stored.
    fn not_sent_in_time(&self) -> TransportError {
        TransportError::transient(format!(
            "not sent: the attempt's deadline passed before this message to \"{}\" was published",
            self.subject
        ))
        .with_code("NOT_SENT")
    }

    fn timeout(&self, what: &str) -> TransportError {
        TransportError::transient(format!(
            "{what} to \"{}\" did not complete within the batch's ack timeout of {:?}; retried (a duplicate is dropped by its Nats-Msg-Id)",
            self.subject, self.inner.config.ack_timeout
        ))
        .with_code("TIMEOUT")
    }
}

/// A header name or value NATS cannot carry: the message can never be sent as it is.
fn invalid(what: &str, why: &str) -> TransportError {
    TransportError::permanent(format!(
        "the message cannot be sent to NATS: its {what} {why} (NATS headers are text lines)"
    ))
    .with_code("INVALID_HEADER")
}

/// A header value as NATS text: UTF-8 without CR or LF.
fn text_value(bytes: &[u8], what: &str) -> Result<HeaderValue, TransportError> {
    let text = std::str::from_utf8(bytes).map_err(|_| invalid(what, "is not UTF-8"))?;
    HeaderValue::from_str(text).map_err(|_| invalid(what, "holds a line break"))
}

/// What is published for `msg`: its payload and [`headers`].
fn message(
    config: &NatsConfig,
    msg: &Message,
    resends: &Resends,
) -> Result<Publish, TransportError> {
    let mut publish = Publish::build().payload(msg.payload().clone());
    if let Some(headers) = headers(config, msg, resends)? {
        publish = publish.headers(headers);
    }
    Ok(publish)
}

/// The NATS headers of `msg`: its own headers, its key in the key header, and its herald id as
/// `Nats-Msg-Id` (unless it carries a `Nats-Msg-Id` header of its own, which is sent as it is),
/// so that JetStream drops a retried copy it already holds; a copy sent again to keep its
/// key's order gets an id of its own (see [`Resends`]). `None`: no header at all.
fn headers(
    config: &NatsConfig,
    msg: &Message,
    resends: &Resends,
) -> Result<Option<HeaderMap>, TransportError> {
    let mut headers = HeaderMap::new();
    let mut own_id = false;
    for h in msg.headers() {
        let name = HeaderName::from_str(&h.name)
            .ok()
            .filter(|_| !h.name.is_empty())
            .ok_or_else(|| {
                invalid(
                    "header name",
                    "is empty or holds a `:`, whitespace or a non-ASCII character",
                )
            })?;
        // JetStream reads the header by its exact name.
        own_id |= h.name == MSG_ID;
        headers.append(name, text_value(&h.value, "header value")?);
    }
    if let (Some(name), Some(key)) = (&config.key_header, msg.key()) {
        let name = HeaderName::from_str(name)
            .map_err(|_| invalid("key header name", "is not a header name"))?;
        headers.insert(name, text_value(key, "key")?);
    }
    if !own_id {
        if let Some(id) = msg.id() {
            let text = match resends.token(id) {
                None => String::from(&*id.text()),
                Some(token) => format!("{}-{token:08x}", &*id.text()),
            };
            let id = HeaderValue::from_str(&text).map_err(|_| invalid("id", "is not text"))?;
            headers.insert(NATS_MESSAGE_ID, id);
        }
    }
    Ok((!headers.is_empty()).then_some(headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{ErrorClass, MessageId};

    fn config() -> NatsConfig {
        NatsConfig::from_url("nats://h/orders").expect("url")
    }

    /// An answer in its channel is in hand though the task's budget is spent: a batch settles
    /// thousands of PubAcks in a row, and the one checked after a loss must not look missing.
    #[tokio::test]
    async fn an_answer_in_its_channel_is_in_hand_whatever_the_budget() {
        use futures_util::FutureExt;
        let answered = |n: usize| {
            (0..n)
                .map(|i| {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    tx.send(i).expect("receiver alive");
                    rx
                })
                .collect::<Vec<_>>()
        };
        // What spends the budget: ready answers taken one after another, never yielding.
        let mut spent = 0;
        for mut rx in answered(1_000) {
            if (&mut rx).now_or_never().is_none() {
                break;
            }
            spent += 1;
        }
        assert!(
            spent < 1_000,
            "Tokio's budget did not run out in {spent} answers"
        );
        for (i, mut rx) in answered(10).into_iter().enumerate() {
            assert_eq!(in_hand(&mut rx).map(Result::ok), Some(Some(i)));
        }
    }

    /// The headers `msg` is published with, as (name, value) text pairs, sorted.
    fn sent_headers(config: &NatsConfig, msg: &Message) -> Vec<(String, String)> {
        sent_headers_with(config, msg, &Resends::default())
    }

    fn sent_headers_with(
        config: &NatsConfig,
        msg: &Message,
        resends: &Resends,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(h) = headers(config, msg, resends).expect("publishable") {
            for (name, values) in h.iter() {
                for v in values {
                    out.push((name.to_string(), v.to_string()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_message_to_store_again_gets_an_id_of_its_own_until_stored() {
        let c = config();
        let id = MessageId::from_u128(0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70);
        let m = Message::new("orders", "p").with_id(id);
        let other = Message::new("orders", "q").with_id(MessageId::from_u128(7));
        let resends = Resends::default();
        let msg_id = |m: &Message, r: &Resends| sent_headers_with(&c, m, r)[0].1.clone();
        assert_eq!(msg_id(&m, &resends), "0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70");
        resends.held(&[&m]);
        let again = msg_id(&m, &resends);
        assert!(
            again.starts_with("0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70-") && again.len() == 36 + 9,
            "{again}"
        );
        assert_eq!(msg_id(&m, &resends), again, "kept across retries");
        assert_eq!(
            msg_id(&other, &resends),
            "00000000-0000-0000-0000-000000000007"
        );
        // Stored: its own id again; held once more: a new token (a fresh copy).
        let ack = Ack::default();
        resends.stored(std::slice::from_ref(&m), &[Ok(ack)]);
        assert_eq!(msg_id(&m, &resends), "0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70");
        assert!(resends.ids.lock().expect("lock").1.is_empty());
        // Refused: still to store again, under the same token.
        resends.held(&[&m]);
        let token = msg_id(&m, &resends);
        resends.stored(
            std::slice::from_ref(&m),
            &[Err(TransportError::transient("full"))],
        );
        assert_eq!(msg_id(&m, &resends), token);
    }

    #[test]
    fn the_msg_id_is_the_message_s_own_id() {
        let c = config();
        let id = MessageId::from_u128(0x0190_b6d2_7c4e_7a51_8f3e_2b9d_4c1a_6e70);
        let m = Message::new("orders", "p").with_id(id);
        assert_eq!(
            sent_headers(&c, &m),
            [(
                MSG_ID.to_owned(),
                "0190b6d2-7c4e-7a51-8f3e-2b9d4c1a6e70".to_owned()
            )]
        );
        // A retry carries the same id: JetStream drops it if it holds the first copy.
        assert_eq!(sent_headers(&c, &m.clone()), sent_headers(&c, &m));
        // A Nats-Msg-Id of the caller's own is sent as it is.
        let own = m.clone().with_header("Nats-Msg-Id", "order-42");
        assert_eq!(
            sent_headers(&c, &own),
            [(MSG_ID.to_owned(), "order-42".to_owned())]
        );
        // Without an id (a transport driven without a producer): no header, rather than one a
        // retry would not repeat.
        assert!(sent_headers(&c, &Message::new("orders", "p")).is_empty());
    }

    #[test]
    fn headers_and_the_key_travel_as_nats_headers() {
        let c = config();
        let m = Message::new("orders", "p")
            .with_key("customer-7")
            .with_header("trace-id", "abc")
            .with_header("trace-id", "def");
        assert_eq!(
            sent_headers(&c, &m),
            [
                ("trace-id".to_owned(), "abc".to_owned()),
                ("trace-id".to_owned(), "def".to_owned()),
                ("x-herald-key".to_owned(), "customer-7".to_owned()),
            ]
        );
        let no_key = c.clone().key_header(None);
        assert_eq!(sent_headers(&no_key, &m).len(), 2);
        let renamed = c.key_header(Some("Partition-Key".into()));
        assert!(sent_headers(&renamed, &m).contains(&("Partition-Key".into(), "customer-7".into())));
    }

    #[test]
    fn what_nats_headers_cannot_carry_is_permanent() {
        let c = config();
        for m in [
            Message::new("orders", "p").with_key(vec![0xff, 0xfe]),
            Message::new("orders", "p").with_key("a\r\nb"),
            Message::new("orders", "p").with_header("bad name", "v"),
            Message::new("orders", "p").with_header("a:b", "v"),
            Message::new("orders", "p").with_header("", "v"),
            Message::new("orders", "p").with_header("n", "line\nbreak"),
        ] {
            let e = headers(&c, &m, &Resends::default()).expect_err("not publishable");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Permanent, Some("INVALID_HEADER")),
                "{e}"
            );
        }
    }
}
