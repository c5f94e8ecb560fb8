//! Publishing: a batch streamed over the channels with publisher confirms, one deadline for the
//! whole batch, and the outcome of every message (confirm, return, nack, per-key order).

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{Hash, Hasher};

use futures_util::future::join_all;
use herald_core::{
    Ack, BatchOutcome, Bytes, Destination, EarlyAcks, ErrorClass, Message, TransportError, Turn,
};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::confirms::{Identity, Publish, Ticket};
use crate::connection::{Inner, Live, Publisher};
use crate::destination::Route;
use crate::error::{classify_on_channel, max_size_from_text, reply_code};
use crate::metrics::AmqpMetrics;

/// Sends one batch to `destination`: what
/// [`Transport::send_batch`](herald_core::Transport::send_batch) does.
pub(crate) async fn send_batch(
    inner: &Inner,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
    early: Option<&EarlyAcks>,
) -> BatchOutcome {
    // The destination's turn first, before any other await: calls of one destination hand their
    // messages to the channels in the order herald started them (see
    // `Transport::keeps_order_across_calls`), and wait for their confirms side by side.
    inner
        .turns
        .run(destination, batch, async |turn| {
            send_in_turn(inner, turn, destination, batch, until, early).await
        })
        .await
}

/// [`send_batch`] in the destination's turn.
async fn send_in_turn(
    inner: &Inner,
    turn: &mut Turn,
    destination: &Destination,
    batch: &[Message],
    until: Option<std::time::Instant>,
    early: Option<&EarlyAcks>,
) -> BatchOutcome {
    inner.in_use();
    let fail_all = |e: TransportError| batch.iter().map(|_| Err(e.clone())).collect();
    let route = match Route::parse(destination) {
        Ok(r) => r,
        Err(e) => return fail_all(e),
    };
    let live = match answering_live(inner).await {
        Ok(l) => l,
        Err(e) => return fail_all(e),
    };
    if let Err(e) = inner.wait_unblocked().await {
        return fail_all(e);
    }
    let mut outcomes: Vec<Option<Result<Ack, TransportError>>> = vec![None; batch.len()];
    let publishing = Publishing {
        route: &route,
        // One deadline for the whole batch: publishes and confirms share it.
        deadline: Instant::now() + inner.config.confirm_timeout,
        until,
        early,
    };
    let channels = inner.config.channels;
    let mut slots: Vec<Vec<usize>> = vec![Vec::new(); channels];
    for (i, m) in batch.iter().enumerate() {
        if let Some(e) = unpublishable(&inner.config, m) {
            outcomes[i] = Some(Err(e));
            continue;
        }
        slots[slot_for(m.key(), destination, channels)].push(i);
    }
    let mut groups: Vec<Group> = slots
        .into_iter()
        .enumerate()
        .filter(|(_, idxs)| !idxs.is_empty())
        .map(|(slot, idxs)| Group {
            slot,
            publisher: None,
            idxs,
        })
        .collect();
    // Re-publishing a nacked first publish may take at most half the batch's time: the rest of
    // the batch needs the other half.
    let probing_ends = Instant::now() + inner.config.confirm_timeout / 2;
    let mut pause = inner.config.reconnect_min;
    let mut nacked: Vec<(usize, TransportError)> = Vec::new();
    loop {
        let path = current_channels(inner, &live, &mut groups, publishing, &mut outcomes).await;
        // After a reconnect or a channel replaced, the keys that failed in the calls before (on
        // the lost connection or the given-up channel) are not sent on the new one ahead of
        // their retries.
        let hold = turn.enter(path).await;
        if !nacked.is_empty() && (Instant::now() >= probing_ends || publishing.too_late()) {
            // Waiting for the calls before took the time left for publishing again (or
            // herald's deadline for the attempt passed).
            give_up(&mut groups, &mut nacked, &mut outcomes, &route.describe());
        }
        for g in &mut groups {
            g.idxs.retain(|&i| match hold.check(&batch[i]) {
                Some(held) => {
                    outcomes[i] = Some(Err(held));
                    false
                }
                None => true,
            });
        }
        nacked =
            match first_alone(inner, &live, &mut groups, publishing, batch, &mut outcomes).await {
                Probed::Done => break,
                // No first publish was nacked this round: the nacks of an earlier round are
                // over (those channels were published on again since).
                Probed::AgainNow => {
                    nacked.clear();
                    continue;
                }
                Probed::Nacked(nacked) => nacked,
            };
        // A channel's first publish was nacked: the queue is not ready for it (a new leader
        // being elected). It is published again on a new channel after a pause, in this call's
        // turn, so that no later call of the destination goes ahead of it; the pauses double as
        // the reconnect backoff does.
        if Instant::now() + pause >= probing_ends {
            give_up(&mut groups, &mut nacked, &mut outcomes, &route.describe());
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(inner.config.reconnect_max);
    }
    // A group left without a channel (its channel closed under it when the time for publishing
    // again ran out) sends nothing.
    for g in groups.iter_mut().filter(|g| g.publisher.is_none()) {
        let e = not_sent_in_time(&route.describe());
        for &i in &g.idxs {
            outcomes[i] = Some(Err(e.clone()));
        }
        g.idxs.clear();
    }
    let sends = groups.into_iter().filter_map(|g| {
        let publisher = g.publisher?;
        (!g.idxs.is_empty())
            .then(|| publish_group(inner, g.slot, publisher, publishing, batch, g.idxs))
    });
    let published = join_all(sends).await;
    // What failed before the turn passes holds its key for the next call at once: that call may
    // not wait for this one to finish (same path).
    let known = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().map(|o| (i, o)))
        .chain(
            published
                .iter()
                .flat_map(|p| p.out.iter().map(|(i, o)| (*i, o))),
        );
    for (i, o) in known {
        if let Err(e) = o {
            match not_its_own(&batch[i], e) {
                Some(own) => turn.failed(&batch[i], &own),
                None => turn.failed(&batch[i], e),
            }
        }
    }
    turn.handed_over();
    let settles = published
        .into_iter()
        .map(|published| settle_group(inner, &live, publishing, published));
    for group in join_all(settles).await {
        for (i, o) in group {
            outcomes[i] = Some(o);
        }
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
    if !live.is_connected() {
        inner.set_connected(false);
    } else if confirms_stopped(&outcomes) {
        // The connection looks up but the broker stopped confirming (a half-open TCP
        // connection, a node that hangs): give it up, so that the retry goes to the next
        // address instead of waiting on this one again.
        inner.abandon(&live).await;
    }
    finish(batch, outcomes)
}

/// The live connection to publish on: a new one if the broker has left a publish on the one in
/// use unanswered for the confirm timeout without blocking the connection (flow control). Each
/// batch gives up a connection whose confirms stopped coming when its own confirm timeout
/// passes (`confirms_stopped`); this finds it when the batches on it were all cut off before
/// that (their delivery deadlines came first), which would otherwise keep it in use.
async fn answering_live(inner: &Inner) -> Result<std::sync::Arc<Live>, TransportError> {
    let live = inner.live().await?;
    let timeout = inner.config.confirm_timeout;
    // As a batch's own check (`settle`): a block since a confirm timeout before the publish
    // started is the broker's flow control and its aftermath (after an alarm clears, the
    // broker first works through what it held), not a hang.
    let silent = live.unanswered_for().is_some_and(|waited| {
        waited >= timeout
            && !Instant::now()
                .checked_sub(waited.saturating_add(timeout))
                // So early in the process that the clock cannot say: spared.
                .is_none_or(|since| inner.blocked_after(since))
    });
    if silent {
        inner.abandon(&live).await;
        return inner.live().await;
    }
    Ok(live)
}

/// Whether some message of the batch got no confirm within the confirm timeout while the broker
/// did not block the connection (a blocked connection is the broker's flow control, not a hang).
fn confirms_stopped(outcomes: &[Result<Ack, TransportError>]) -> bool {
    outcomes
        .iter()
        .any(|o| matches!(o, Err(e) if matches!(e.code(), Some("CONFIRM_TIMEOUT" | "TIMEOUT"))))
}

/// The AMQP `message_id` of a message: the value of its `header` when it has one (an id of the
/// user's own), else its herald [`MessageId`](herald_core::MessageId) as UUID text, given when
/// the producer accepted it and kept across retries, so that a retry carries the id of the
/// first attempt and two messages with the same content carry two ids. A message without
/// either (a transport driven without a producer) gets no `message_id`.
fn message_id(msg: &Message, header: Option<&str>) -> Option<String> {
    if let Some(name) = header {
        if let Some(h) = msg.headers().iter().find(|h| h.name == name) {
            return Some(String::from_utf8_lossy(&h.value).into_owned());
        }
    }
    msg.id().map(|id| String::from(&*id.text()))
}

/// Why `msg` cannot be published, if it cannot: AMQP short strings (header names, the
/// `message_id` property) hold at most 255 bytes, and lapin panics on a longer one. Permanent:
/// sent again, it would fail the same way.
fn unpublishable(config: &AmqpConfig, msg: &Message) -> Option<TransportError> {
    let invalid = |what: &str, len: usize| {
        Some(
            TransportError::permanent(format!(
                "{what} is {len} bytes; AMQP allows at most 255 (a short string)"
            ))
            .with_code("INVALID_HEADER"),
        )
    };
    if let Some(h) = msg.headers().iter().find(|h| h.name.len() > 255) {
        return invalid("a header name", h.name.len());
    }
    // The key header's name is checked once, when the transport is built
    // (`AmqpConfig::validate`).
    match message_id(msg, config.message_id_header.as_deref()) {
        Some(id) if id.len() > 255 => invalid("the message id (its message-id header)", id.len()),
        _ => None,
    }
}

fn properties(config: &AmqpConfig, msg: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    for h in msg.headers() {
        headers.insert(
            ShortString::from(h.name.as_str()),
            AMQPValue::LongString(LongString::from(h.value.to_vec())),
        );
    }
    if let (Some(name), Some(key)) = (&config.key_header, msg.key()) {
        headers.insert(
            ShortString::from(name.as_str()),
            AMQPValue::LongString(LongString::from(key.to_vec())),
        );
    }
    let mut props = BasicProperties::default();
    if let Some(id) = message_id(msg, config.message_id_header.as_deref()) {
        props = props.with_message_id(id.into());
    }
    if config.persistent {
        props = props.with_delivery_mode(2);
    }
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    props
}

/// Hands `msg` to lapin on `publisher`'s channel: its first poll takes the delivery tag and
/// queues the frames (see [`Publisher::publish`]); the ticket waits for the rest.
fn start(
    config: &AmqpConfig,
    publisher: &Publisher,
    route: &Route,
    msg: &Message,
) -> lapin::Result<Ticket> {
    let properties = properties(config, msg);
    let message_id = properties.message_id().clone();
    let identity = Identity {
        exchange: ShortString::from(route.exchange.as_str()),
        routing_key: ShortString::from(route.routing_key.as_str()),
        headers: message_id
            .is_none()
            .then(|| properties.headers().clone())
            .flatten(),
        message_id,
        payload: msg.payload().clone(),
    };
    let options = BasicPublishOptions {
        mandatory: config.mandatory,
        immediate: false,
    };
    let (channel, exchange, routing_key, payload) = (
        publisher.channel.clone(),
        identity.exchange.clone(),
        identity.routing_key.clone(),
        identity.payload.clone(),
    );
    let publish: Publish = Box::pin(async move {
        channel
            .basic_publish(exchange, routing_key, options, &payload, properties)
            .await
    });
    publisher.publish(identity, publish)
}

/// What [`publish_group`] leaves to [`settle_group`]: the outcomes known, and the confirms still
/// to come, on the channel it published on.
struct Published {
    slot: usize,
    channel: Option<lapin::Channel>,
    out: Vec<(usize, Result<Ack, TransportError>)>,
    pending: VecDeque<(usize, Ticket)>,
}

/// The messages of a batch that go through one channel.
struct Group {
    slot: usize,
    /// The slot's channel, as of the path the call entered its turn with.
    publisher: Option<Publisher>,
    /// The messages still to publish, in batch order.
    idxs: Vec<usize>,
}

/// Sets each group's channel to its slot's current one (opening it if needed) and returns the
/// path they all belong to: read before the channels, and read again until no channel was
/// replaced in between, so that a call never publishes on a channel older than the path it
/// enters its turn with. A group whose channel cannot be opened fails with that error.
async fn current_channels(
    inner: &Inner,
    live: &Live,
    groups: &mut [Group],
    publishing: Publishing<'_>,
    outcomes: &mut [Option<Result<Ack, TransportError>>],
) -> u64 {
    let (deadline, target) = (publishing.deadline, publishing.route.describe());
    let target = target.as_str();
    loop {
        let path = live.path();
        let opening = groups
            .iter()
            .filter(|g| !g.idxs.is_empty())
            .map(|g| async move {
                match tokio::time::timeout_at(deadline, live.channel(g.slot)).await {
                    Ok(opened) => opened,
                    Err(_) => Err(stalled(inner, target, "opening a channel")),
                }
            });
        let opened = join_all(opening).await;
        for (g, opened) in groups.iter_mut().filter(|g| !g.idxs.is_empty()).zip(opened) {
            match opened {
                Ok(p) => g.publisher = Some(p),
                Err(e) => {
                    g.publisher = None;
                    for &i in &g.idxs {
                        outcomes[i] = Some(Err(e.clone()));
                    }
                    g.idxs.clear();
                }
            }
        }
        if live.path() == path {
            return path;
        }
    }
}

/// What [`first_alone`] found.
enum Probed {
    /// Every channel is proven for the route, its first publish was unroutable (the route stays
    /// unproven, the rest streams), or it failed for a reason that ends its group.
    Done,
    /// A first publish was too large (the broker closed the channel): the next message of its
    /// group goes alone in its place, on a new channel, now.
    AgainNow,
    /// These slots' first publishes were nacked, with these errors: again, after a pause.
    Nacked(Vec<(usize, TransportError)>),
}

/// Publishes, on each channel that has not published to the route yet, the first message of its
/// group alone, and waits for its confirm: only then does the rest of the group stream.
///
/// RabbitMQ 3.10 answers a channel's first publishes to a quorum queue whose leader it cannot
/// reach (a new leader is being elected after a node died) with nacks, and takes the channel's
/// later ones once the election is over. Streamed, a key's message could be nacked and a later
/// one of its key, a few publishes behind, stored: the retry then landed behind it. So:
/// - confirmed: the channel is proven for the route, and the message is delivered;
/// - nacked: the channel is given up and the message stays first in its group, to go out again
///   on a new channel ([`Probed::Nacked`]: the caller pauses and enters its turn again);
/// - failed for good: a missing or refused destination fails the group; a message too large
///   (the broker closed the channel) lets the next one go alone in its place, on a new channel
///   ([`Probed::AgainNow`]); an unroutable one says nothing about the channel, and the others
///   stream (a headers exchange, which routes each message on its own, may then route them to
///   a queue the channel did not reach yet);
/// - another transient failure (no confirm in time, the connection lost): the group fails, the
///   rest unsent (`NOT_SENT`); the caller tells the turn before the next call's turn begins.
///
/// One round trip per channel and route, after each connect or channel replaced.
async fn first_alone(
    inner: &Inner,
    live: &Live,
    groups: &mut [Group],
    publishing: Publishing<'_>,
    batch: &[Message],
    outcomes: &mut [Option<Result<Ack, TransportError>>],
) -> Probed {
    let route = publishing.route;
    let target = route.describe();
    let unproven =
        |g: &Group| g.publisher.as_ref().is_some_and(|p| !p.proven(route)) && !g.idxs.is_empty();
    let probing = groups.iter().filter(|g| unproven(g)).map(|g| async move {
        let publisher = g.publisher.as_ref().expect("unproven: has a channel");
        publish_alone(inner, publisher, publishing, &batch[g.idxs[0]]).await
    });
    let probed: Vec<Result<Ack, TransportError>> = join_all(probing).await;
    let (mut again, mut nacked) = (false, Vec::new());
    for (g, outcome) in groups.iter_mut().filter(|g| unproven(g)).zip(probed) {
        let first = g.idxs[0];
        let publisher = g.publisher.as_ref().expect("unproven: has a channel");
        match outcome {
            Ok(ack) => {
                publisher.prove(route);
                outcomes[first] = Some(told(publishing.early, first, Ok(ack)));
                g.idxs.remove(0);
            }
            // The destination is missing or refused: so for all of them.
            Err(e) if matches!(e.code(), Some("NOT_FOUND" | "ACCESS_REFUSED")) => {
                for &i in &g.idxs {
                    outcomes[i] = Some(Err(e.clone()));
                }
                g.idxs.clear();
            }
            // The channel was closed by another destination's oversized message: not this
            // one's end, and nothing more goes out on it.
            Err(e) if let Some(own) = not_its_own(&batch[first], &e) => {
                g.publisher = None;
                fail_unsent(&mut g.idxs, &own, outcomes, &target);
            }
            Err(e) if e.class() == ErrorClass::Permanent => {
                // Too large: the broker closed the channel; the next message goes alone on a
                // new one. Unroutable: the others stream (the route stays unproven).
                if e.code() == Some("PRECONDITION_FAILED") {
                    g.publisher = None;
                    again = true;
                }
                outcomes[first] = Some(Err(e));
                g.idxs.remove(0);
            }
            Err(e) if e.code() == Some("NACK") => {
                if live.retire(g.slot, &publisher.channel).await {
                    inner.metrics.channels_retired.increment(1);
                    tracing::debug!(
                        transport = "amqp",
                        target = %target,
                        channel = g.slot,
                        "the broker nacked the first publish on a channel: again on a new channel"
                    );
                }
                g.publisher = None;
                nacked.push((g.slot, e));
            }
            Err(e) => fail_unsent(&mut g.idxs, &e, outcomes, &target),
        }
    }
    if !nacked.is_empty() {
        Probed::Nacked(nacked)
    } else if again {
        Probed::AgainNow
    } else {
        Probed::Done
    }
}

/// The time for publishing nacked first publishes again is over: each ends with its last nack,
/// the rest of its group unsent.
fn give_up(
    groups: &mut [Group],
    nacked: &mut Vec<(usize, TransportError)>,
    outcomes: &mut [Option<Result<Ack, TransportError>>],
    target: &str,
) {
    for (slot, e) in nacked.drain(..) {
        if let Some(g) = groups.iter_mut().find(|g| g.slot == slot) {
            fail_unsent(&mut g.idxs, &e, outcomes, target);
        }
    }
}

/// A message not handed to lapin because its batch's time was up: never sent, so not a sign that
/// the broker stopped confirming.
fn not_sent_in_time(target: &str) -> TransportError {
    TransportError::transient(format!(
        "not sent: the batch's time (or the attempt's deadline) was up before this message to {target} was published; retried"
    ))
    .with_code("NOT_SENT")
}

/// The first of `idxs` failed with `e`: it ends with `e`, the others unsent.
fn fail_unsent(
    idxs: &mut Vec<usize>,
    e: &TransportError,
    outcomes: &mut [Option<Result<Ack, TransportError>>],
    target: &str,
) {
    let unsent = TransportError::transient(format!(
        "not sent: the first message published to {target} on a new channel failed ({}), so the others waiting for it were not sent; retried",
        e.message()
    ))
    .with_code("NOT_SENT");
    for (n, &i) in idxs.iter().enumerate() {
        outcomes[i] = Some(Err(if n == 0 { e.clone() } else { unsent.clone() }));
    }
    idxs.clear();
}

/// Publishes `msg` on `channel` and waits for its confirm, within the batch's deadline; nothing
/// is published once the deadline has passed.
async fn publish_alone(
    inner: &Inner,
    publisher: &Publisher,
    publishing: Publishing<'_>,
    msg: &Message,
) -> Result<Ack, TransportError> {
    let Publishing {
        route, deadline, ..
    } = publishing;
    let target = route.describe();
    if publishing.too_late() {
        return Err(not_sent_in_time(&target));
    }
    let ticket = match start(&inner.config, publisher, route, msg) {
        Ok(ticket) => ticket,
        Err(e) => return Err(classify_on_channel(&e, route, &target)),
    };
    write_done(inner, route, &target, deadline, ticket.written()).await?;
    settle(inner, &ticket, route, &target, deadline).await
}

/// Waits, within `deadline`, for lapin to write a publish it was handed (it stops writing while
/// the broker blocks the connection: bounded too); the confirm to come, or the classified error.
async fn write_done(
    inner: &Inner,
    route: &Route,
    target: &str,
    deadline: Instant,
    written: impl Future<Output = lapin::Result<()>>,
) -> Result<(), TransportError> {
    match tokio::time::timeout_at(deadline, written).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(classify_on_channel(&e, route, target)),
        Err(_) => Err(stalled(inner, target, "publishing")),
    }
}

/// Publishes the messages `idxs` of `batch` on `publisher`'s channel (slot `slot`), streaming:
/// at most `window` unconfirmed at a time, everything (publishes, confirms) bounded by the
/// batch's `deadline`. Returns when every message is published (or failed): the confirms of
/// the last window are left to [`settle_group`].
async fn publish_group(
    inner: &Inner,
    slot: usize,
    publisher: Publisher,
    publishing: Publishing<'_>,
    batch: &[Message],
    idxs: Vec<usize>,
) -> Published {
    let Publishing {
        route,
        deadline,
        early,
        ..
    } = publishing;
    let target = route.describe();
    let config = &inner.config;
    let mut out = Vec::with_capacity(idxs.len());
    let written =
        async |ticket: &Ticket| write_done(inner, route, &target, deadline, ticket.written()).await;
    let mut flight: VecDeque<(usize, Ticket)> =
        VecDeque::with_capacity(config.window.min(idxs.len()));
    let mut broken: Option<TransportError> = None;
    for i in idxs {
        while broken.is_none() && flight.len() >= config.window {
            if let Some((j, ticket)) = flight.pop_front() {
                let outcome = match written(&ticket).await {
                    Ok(()) => settle(inner, &ticket, route, &target, deadline).await,
                    Err(e) => {
                        // Not written: nothing more goes out on this channel in this batch.
                        broken = Some(e.clone());
                        Err(e)
                    }
                };
                out.push((j, told(early, j, outcome)));
            }
        }
        if let Some(e) = &broken {
            out.push((i, Err(e.clone())));
            continue;
        }
        if publishing.too_late() {
            // The batch's time is up (a confirm timed out above, say), or herald's for the
            // attempt: what is not handed to lapin yet stays with herald, rather than going
            // out to be retried as well.
            let e = not_sent_in_time(&target);
            out.push((i, Err(e.clone())));
            broken = Some(e);
            continue;
        }
        // The first poll takes the delivery tag and queues the frames for lapin's I/O thread,
        // in call order (lapin 4's `basic_publish` does both before its first await: the
        // order of delivery tags, and so of confirms, rests on that; `Publisher::publish` keeps
        // other tasks publishing on the channel out of that step meanwhile). The wait for the
        // thread to write them is not this loop's: awaiting it here put a wake-up of each
        // thread by the other between every two publishes. It is awaited when the window is
        // full, or after the channel's last publish.
        match start(config, &publisher, route, &batch[i]) {
            Ok(ticket) => flight.push_back((i, ticket)),
            Err(e) => {
                let e = classify_on_channel(&e, route, &target);
                out.push((i, Err(e.clone())));
                broken = Some(e);
            }
        }
    }
    let mut pending = VecDeque::with_capacity(flight.len());
    for (j, ticket) in flight {
        match written(&ticket).await {
            Ok(()) => pending.push_back((j, ticket)),
            Err(e) => out.push((j, Err(e))),
        }
    }
    Published {
        slot,
        channel: Some(publisher.channel.clone()),
        out,
        pending,
    }
}

/// Waits for the confirms [`publish_group`] left, within the batch's `deadline`, and gives the
/// channel up if the broker nacked a message on it. Returns the outcome of each message, by
/// index.
async fn settle_group(
    inner: &Inner,
    live: &Live,
    publishing: Publishing<'_>,
    published: Published,
) -> Vec<(usize, Result<Ack, TransportError>)> {
    let Publishing {
        route,
        deadline,
        early,
        ..
    } = publishing;
    let Published {
        slot,
        channel,
        mut out,
        pending,
    } = published;
    let Some(channel) = channel else {
        return out;
    };
    let target = route.describe();
    for (j, ticket) in pending {
        let outcome = settle(inner, &ticket, route, &target, deadline).await;
        out.push((j, told(early, j, outcome)));
    }
    if out
        .iter()
        .any(|(_, o)| matches!(o, Err(e) if e.code() == Some("NACK")))
    {
        // A nacked message is retried: on a new channel, not on one the broker may go on
        // nacking (see `Live::retire`).
        tracing::debug!(
            transport = "amqp",
            target = %target,
            channel = slot,
            "the broker nacked a publish: the channel is replaced for the retry"
        );
        if live.retire(slot, &channel).await {
            inner.metrics.channels_retired.increment(1);
        }
    }
    out
}

/// What every channel's share of a batch publishes with.
#[derive(Clone, Copy)]
struct Publishing<'a> {
    route: &'a Route,
    /// The batch's deadline: publishes and confirms share it.
    deadline: Instant,
    /// herald's deadline for the attempt, if it gave one: nothing is published past it (see
    /// `Transport::send_batch_until`), though confirms are still awaited until `deadline`.
    until: Option<std::time::Instant>,
    /// Where a confirm is told as it comes.
    early: Option<&'a EarlyAcks>,
}

impl Publishing<'_> {
    /// Past the batch's deadline or herald's: what is not published yet is not.
    fn too_late(&self) -> bool {
        Instant::now() >= self.deadline || herald_core::deadline_passed(self.until)
    }
}

/// `outcome`, the message at `index`'s, told early if the broker confirmed it.
fn told(
    early: Option<&EarlyAcks>,
    index: usize,
    outcome: Result<Ack, TransportError>,
) -> Result<Ack, TransportError> {
    if let (Some(early), Ok(ack)) = (early, &outcome) {
        early.ack(index, *ack);
    }
    outcome
}

/// The batch deadline passed while a publish (or a channel open) could not go out.
fn stalled(inner: &Inner, target: &str, what: &str) -> TransportError {
    let timeout = inner.config.confirm_timeout;
    if inner.is_blocked() {
        TransportError::transient(format!(
            "the broker blocked the connection (connection.blocked: a memory or disk alarm) while {what} to {target}, for longer than the batch's {timeout:?}; retried"
        ))
        .with_code("CONNECTION_BLOCKED")
    } else {
        TransportError::transient(format!(
            "{what} to {target} did not complete within the batch's {timeout:?}; retried"
        ))
        .with_code("TIMEOUT")
    }
}

async fn settle(
    inner: &Inner,
    ticket: &Ticket,
    route: &Route,
    target: &str,
    deadline: Instant,
) -> Result<Ack, TransportError> {
    let timeout = inner.config.confirm_timeout;
    // The broker stops reading a blocked connection: no confirm can come, and the connection
    // is not hung (`confirms_stopped` gives up only on a CONFIRM_TIMEOUT). After the alarm
    // clears, the broker works through what it held first: a batch that began within one
    // confirm timeout of the unblocking is still its aftermath.
    let aftermath = deadline
        .checked_sub(timeout.saturating_mul(2))
        .unwrap_or(deadline);
    match tokio::time::timeout_at(deadline, ticket.confirmed()).await {
        Err(_) if inner.blocked_after(aftermath) => {
            Err(TransportError::transient(format!(
                "no publisher confirm for a message to {target} within {timeout:?} of the batch's start: the broker blocked the connection meanwhile (connection.blocked: a memory or disk alarm); it is retried (possibly a duplicate)"
            ))
            .with_code("CONNECTION_BLOCKED"))
        }
        Err(_) => Err(TransportError::transient(format!(
            "no publisher confirm from the broker within {timeout:?} of the batch's start for a message to {target}; it is retried (possibly a duplicate)"
        ))
        .with_code("CONFIRM_TIMEOUT")),
        Ok(Err(e)) => Err(classify_on_channel(&e, route, target)),
        Ok(Ok(c)) => confirmation(&inner.metrics, c, target),
    }
}

/// The outcome of one publisher confirm.
fn confirmation(
    metrics: &AmqpMetrics,
    confirmation: Confirmation,
    target: &str,
) -> Result<Ack, TransportError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(Ack::default()),
        Confirmation::Ack(Some(returned)) => {
            metrics.returned.increment(1);
            let info = reply_code(returned.reply_code);
            Err(TransportError::new(
                info.class,
                format!(
                    "unroutable: the broker returned the message sent to {target}: {} {}; {}",
                    returned.reply_code, returned.reply_text, info.advice
                ),
            )
            .with_code(info.name))
        }
        Confirmation::Nack(returned) => {
            metrics.nacked.increment(1);
            let why = returned.map_or(String::new(), |r| {
                format!(" (returned: {} {})", r.reply_code, r.reply_text)
            });
            Err(TransportError::transient(format!(
                "the broker nacked a message to {target} (basic.nack: it could not take it now){why}; it is retried"
            ))
            .with_code("NACK"))
        }
        Confirmation::NotRequested => Err(TransportError::transient(format!(
            "no publisher confirm for a message to {target}: confirms were not enabled on its channel; it is retried"
        ))
        .with_code("NOT_CONFIRMED")),
    }
}

fn slot_for(key: Option<&Bytes>, destination: &Destination, channels: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match key {
        Some(k) => k.hash(&mut h),
        None => destination.hash(&mut h),
    }
    (h.finish() % channels as u64) as usize
}

/// The batch-level rules of AMQP on a finished batch: a whole-destination error (missing
/// exchange, refused access) becomes the outcome of every failed message, and an oversized-
/// message refusal is attributed to the oversized messages only.
///
/// Per-key order is not enforced here: the pipeline applies
/// [`KeyHold`](herald_core::KeyHold) to every batch's outcomes under strict ordering (and
/// relaxed ordering promises no order), so confirmed messages are reported as confirmed.
pub(crate) fn finish(
    batch: &[Message],
    mut outcomes: Vec<Result<Ack, TransportError>>,
) -> BatchOutcome {
    // A destination-wide permanent error explains every other failure of the batch.
    let whole = outcomes.iter().find_map(|o| match o {
        Err(e)
            if e.class() == ErrorClass::Permanent
                && e.code()
                    .is_some_and(|c| c == "NOT_FOUND" || c == "ACCESS_REFUSED") =>
        {
            Some(e.clone())
        }
        _ => None,
    });
    if let Some(whole) = whole {
        for o in &mut outcomes {
            if o.is_err() {
                *o = Err(whole.clone());
            }
        }
    }
    for (m, o) in batch.iter().zip(outcomes.iter_mut()) {
        if let Err(e) = o {
            if let Some(own) = not_its_own(m, e) {
                *o = Err(own);
            }
        }
    }
    outcomes
}

/// A channel closed for an oversized message fails every message that was in flight on it:
/// only those above the limit end for good. For another message of that channel, the
/// transient error it really has (`CHANNEL_CLOSED`); `None` when `e` is `msg`'s own.
fn not_its_own(msg: &Message, e: &TransportError) -> Option<TransportError> {
    if e.code() != Some("PRECONDITION_FAILED") {
        return None;
    }
    let max = max_size_from_text(e.message())?;
    (msg.payload().len() <= max).then(|| {
        TransportError::transient(format!(
            "the channel was closed by another message's error ({}); retried",
            e.message()
        ))
        .with_code("CHANNEL_CLOSED")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_not_requested_or_nacked_are_transient() {
        let metrics = AmqpMetrics::new(None);
        let e = confirmation(&metrics, Confirmation::NotRequested, "queue \"q\"")
            .expect_err("not confirmed is not delivered");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some("NOT_CONFIRMED"))
        );
        let returned = lapin::message::BasicReturnMessage {
            delivery: lapin::message::Delivery::mock(1, "".into(), "q".into(), false, vec![]),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        };
        let e = confirmation(&metrics, Confirmation::Nack(Some(returned)), "queue \"q\"")
            .expect_err("nacked");
        assert_eq!((e.class(), e.code()), (ErrorClass::Transient, Some("NACK")));
        let e =
            confirmation(&metrics, Confirmation::Nack(None), "queue \"q\"").expect_err("nacked");
        assert_eq!((e.class(), e.code()), (ErrorClass::Transient, Some("NACK")));
        assert!(confirmation(&metrics, Confirmation::Ack(None), "q").is_ok());
    }

    /// The AMQP `message_id` a message is published with.
    fn sent_id(config: &AmqpConfig, m: &Message) -> Option<String> {
        properties(config, m)
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
    }

    #[test]
    fn the_message_id_is_the_message_s_own_id_not_a_hash_of_its_content() {
        let config = AmqpConfig::from_url("amqp://h").expect("url");
        // Two identical lines (`herald produce --format lines`: no key, no headers) are two
        // messages: a consumer deduplicating on `message_id` must keep both.
        let a = Message::new("q", "same line").with_id(herald_core::MessageId::from_u128(1));
        let b = Message::new("q", "same line").with_id(herald_core::MessageId::from_u128(2));
        assert_ne!(
            sent_id(&config, &a),
            sent_id(&config, &b),
            "identical content, two ids"
        );
        let a_id = a.id().expect("given").to_string();
        assert_eq!(a_id.len(), 36, "UUID text");
        assert_eq!(sent_id(&config, &a).as_deref(), Some(a_id.as_str()));
        // A retry sends the same message (its id kept): the same `message_id`.
        assert_eq!(sent_id(&config, &a.clone()), sent_id(&config, &a));
        // A header named by `message_id_header` still wins.
        let given = a.clone().with_header("message-id", "order-42");
        assert_eq!(sent_id(&config, &given).as_deref(), Some("order-42"));
        let ignored = config.clone().message_id_header(None);
        assert_eq!(sent_id(&ignored, &given).as_deref(), Some(a_id.as_str()));
        // Neither (a transport driven without a producer): no `message_id` rather than a
        // made-up one that a retry would not keep.
        assert_eq!(sent_id(&config, &Message::new("q", "same line")), None);
    }

    /// The headers a message is published with, by name.
    fn sent_headers(config: &AmqpConfig, m: &Message) -> Vec<String> {
        properties(config, m)
            .headers()
            .as_ref()
            .map(|t| t.inner().keys().map(|k| k.as_str().to_owned()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_key_travels_in_the_header_the_url_names_or_in_none() {
        let m = Message::new("q", "p")
            .with_key("customer-7")
            .with_id(herald_core::MessageId::from_u128(1));
        for (url, headers) in [
            ("amqp://h/%2f?queue=q", vec!["x-herald-key"]),
            (
                "amqp://h/%2f?queue=q&key_header=order-key",
                vec!["order-key"],
            ),
            ("amqp://h/%2f?queue=q&key_header=", vec![]),
        ] {
            let config = AmqpConfig::from_url(url).expect("url");
            assert_eq!(sent_headers(&config, &m), headers, "{url}");
            // The message id goes either way: it is herald's deduplication key.
            assert!(sent_id(&config, &m).is_some(), "{url}");
        }
        let e = AmqpConfig::from_url(&format!("amqp://h/?key_header={}", "k".repeat(256)))
            .expect_err("longer than a short string");
        assert!(e.to_string().contains("key_header"), "{e}");
    }

    #[test]
    fn same_key_same_channel() {
        let d = Destination::new("q");
        let k = Bytes::from_static(b"customer-7");
        assert_eq!(slot_for(Some(&k), &d, 8), slot_for(Some(&k), &d, 8));
        assert_eq!(slot_for(None, &d, 8), slot_for(None, &d, 8));
        let used: std::collections::HashSet<usize> = (0..64)
            .map(|i| slot_for(Some(&Bytes::from(format!("k{i}"))), &d, 8))
            .collect();
        assert!(used.len() > 4, "keys spread over channels: {used:?}");
    }

    fn keyed(keys: &[&'static str]) -> Vec<Message> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| Message::new("q", format!("m{i}")).with_key(*k))
            .collect()
    }

    #[test]
    fn confirmed_messages_stay_confirmed_the_pipeline_holds_keys() {
        // The per-key hold is the pipeline's (`herald_core::KeyHold`, under strict ordering):
        // the transport reports what the broker said, a confirm after a failure of its key too.
        let batch = keyed(&["a", "b", "a", "b", "a"]);
        let outcomes = vec![
            Ok(Ack::default()),
            Ok(Ack::default()),
            Err(TransportError::transient("nack").with_code("NACK")),
            Ok(Ack::default()),
            Ok(Ack::default()),
        ];
        let out = finish(&batch, outcomes);
        assert!(out[0].is_ok() && out[1].is_ok() && out[3].is_ok());
        assert_eq!(out[2].as_ref().err().and_then(|e| e.code()), Some("NACK"));
        assert!(out[4].is_ok(), "confirmed: {:?}", out[4]);
        // What the pipeline then makes of it: the later `a` held, with core's code.
        let mut held = out;
        assert_eq!(herald_core::KeyHold::apply(&batch, &mut held), 1);
        let e = held[4].as_ref().expect_err("held by the pipeline's rule");
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Transient, Some(herald_core::KEY_HELD))
        );
    }

    #[test]
    fn a_permanent_failure_does_not_hold_back_others() {
        let batch = keyed(&["a", "a", "a"]);
        let outcomes = vec![
            Ok(Ack::default()),
            Err(TransportError::permanent("unroutable").with_code("NO_ROUTE")),
            Ok(Ack::default()),
        ];
        let out = finish(&batch, outcomes);
        assert!(out[0].is_ok() && out[2].is_ok());
        assert_eq!(
            out[1].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Permanent)
        );
    }

    #[test]
    fn a_missing_exchange_fails_the_whole_batch_permanently() {
        let batch = keyed(&["a", "b", "c"]);
        let outcomes = vec![
            Err(TransportError::permanent("no exchange \"x\"").with_code("NOT_FOUND")),
            Err(TransportError::transient("closed").with_code("CHANNEL_CLOSED")),
            Err(TransportError::transient("closed").with_code("CHANNEL_CLOSED")),
        ];
        for o in finish(&batch, outcomes) {
            let e = o.expect_err("failed");
            assert_eq!(
                (e.class(), e.code()),
                (ErrorClass::Permanent, Some("NOT_FOUND"))
            );
        }
    }

    #[test]
    fn an_oversized_message_fails_alone() {
        let batch = vec![
            Message::new("q", vec![0u8; 10]).with_key("a"),
            Message::new("q", vec![0u8; 2000]).with_key("b"),
        ];
        let text = "broker closed the channel: 406 PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000";
        let err = TransportError::permanent(text).with_code("PRECONDITION_FAILED");
        let out = finish(&batch, vec![Err(err.clone()), Err(err)]);
        assert_eq!(
            out[0].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Transient)
        );
        assert_eq!(
            out[1].as_ref().err().map(TransportError::class),
            Some(ErrorClass::Permanent)
        );
    }
}
