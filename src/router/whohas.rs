//! Presence lookups asked of the other nodes ("who holds X?") when Redis cannot answer: it is
//! down, failed, or slower than the hedge delay. Sans-IO like the rest of the router: a lookup
//! sends one `WhoHas` datagram to each other node in the table, collects their `Holds`
//! answers (each answered from the holder's own sessions), and completes what waited on it
//! (a Connect, a Resume, a Query) as a Redis answer would have.
//!
//! Bounds: at most [`MAX_FANOUT`] nodes asked per lookup, a node-wide budget of lookups per
//! second and at most [`MAX_ASKS`] in flight (past either, the request gets retry-later),
//! concurrent Connects to the same client share one lookup, and every lookup ends by
//! [`ASK_DEADLINE`]. `WhoHas` datagrams are one-shot (a lost one costs the client a retry, never
//! a retransmission), so a repeated one is a replay and is dropped.
//!
//! A positive answer is cached like a Redis answer (30 s). "Held nowhere" is not cached: a
//! Resume that follows it at once must still be checked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use sigrouter_proto::{self as proto, ErrorCode, FailReason};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::connect;
use super::hello::{self, Hello};
use super::outbox::{ConnectLookup, Outbox};
use super::query;
use super::state::{ErrorTo, State};
use crate::cluster::wire::{Body, MAX_WHO_HAS};
use crate::limit::{Quota, Shared};
use crate::metrics::{DropReason, PeerOutcome};

/// Most nodes one lookup asks.
pub(crate) const MAX_FANOUT: usize = 32;
/// Most lookups in flight on this node.
pub(crate) const MAX_ASKS: usize = 1024;
/// Lookups started per second, node-wide (sustained), and at once.
const ASK_RATE: u32 = 2000;
const ASK_BURST: u32 = 500;
/// A lookup with silent nodes ends after this long.
pub(crate) const ASK_DEADLINE: Duration = Duration::from_millis(500);

/// What waits on a lookup.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// A Connect whose target's node is looked for (holds one of its session's job slots).
    Connect(ConnectLookup),
    /// A Resume of a session this node does not hold.
    Resume {
        /// Source of the Resume.
        src: SocketAddr,
        /// Its size (bounds the answer).
        req_len: usize,
        /// The request.
        msg: proto::Resume,
    },
    /// A Query (holds one of its session's job slots).
    Query {
        /// The asking session.
        uuid: Uuid,
        /// Its request id.
        rid: u64,
        /// The clients asked about, in order.
        uuids: Vec<Uuid>,
    },
}

/// One lookup in flight.
#[derive(Debug)]
struct Ask {
    uuids: Vec<Uuid>,
    verifier: Option<[u8; 32]>,
    /// Sequence numbers sent, with the node each went to.
    sent: Vec<(u64, Arc<str>)>,
    /// Nodes not heard from yet.
    pending: Vec<Arc<str>>,
    /// Every other node in the table was asked.
    complete: bool,
    /// Per client: the first node that said it holds it.
    holders: Vec<Option<Arc<str>>>,
    /// With a verifier: the holder's verdict on it.
    verified: Option<(bool, Arc<str>)>,
    deadline: Instant,
    waiters: Vec<Waiter>,
}

impl Ask {
    fn done(&self) -> bool {
        self.pending.is_empty() || self.holders.iter().all(Option::is_some)
    }
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    asks: HashMap<u64, Ask>,
    /// Sequence number sent -> lookup.
    by_seq: HashMap<u64, u64>,
    /// A Connect's target -> the lookup Connects to it share.
    by_target: HashMap<Uuid, u64>,
}

/// Lookups in flight. Locked only for bookkeeping, never while completing what waited.
#[derive(Debug)]
pub(crate) struct Asks {
    inner: Mutex<Inner>,
    budget: Shared,
}

impl Default for Asks {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            budget: Shared::new(Quota::per_second(ASK_RATE, ASK_BURST)),
        }
    }
}

impl Asks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lookups in flight.
    pub(crate) fn len(&self) -> usize {
        self.lock().asks.len()
    }

    fn take(inner: &mut Inner, id: u64) -> Option<Ask> {
        let ask = inner.asks.remove(&id)?;
        for (seq, _) in &ask.sent {
            inner.by_seq.remove(seq);
        }
        if ask.verifier.is_none()
            && ask.uuids.len() == 1
            && inner.by_target.get(&ask.uuids[0]) == Some(&id)
        {
            inner.by_target.remove(&ask.uuids[0]);
        }
        Some(ask)
    }
}

/// Looks for `uuids` on the other nodes (with `verifier`: asks the holder to check it), for
/// `waiter`.
pub(crate) fn start(
    st: &State,
    asks: &Asks,
    now: Instant,
    uuids: Vec<Uuid>,
    verifier: Option<[u8; 32]>,
    waiter: Waiter,
    out: &mut Outbox,
) {
    let Some(cluster) = &st.cluster else {
        return;
    };
    let shareable = matches!(waiter, Waiter::Connect(_)) && verifier.is_none() && uuids.len() == 1;
    let mut waiter = Some(waiter);
    {
        let mut inner = asks.lock();
        if shareable {
            if let Some(id) = inner.by_target.get(&uuids[0]).copied() {
                if let (Some(a), Some(w)) = (inner.asks.get_mut(&id), waiter.take()) {
                    a.waiters.push(w);
                    return;
                }
            }
        }
        if inner.asks.len() >= MAX_ASKS {
            drop(inner);
            st.metrics.peers.lookup(PeerOutcome::Limited);
            return fail_waiters(st, now, waiter.into_iter().collect(), out);
        }
    }
    if !asks.budget.check(st.ns(now)) {
        st.metrics.peers.lookup(PeerOutcome::Limited);
        return fail_waiters(st, now, waiter.into_iter().collect(), out);
    }
    let uuids: Vec<Uuid> = uuids.into_iter().take(MAX_WHO_HAS).collect();
    let table = cluster.table();
    let mut nodes: Vec<_> = table.iter().filter(|n| *n.id != *cluster.id).collect();
    nodes.shuffle(&mut rand::thread_rng());
    let complete = nodes.len() <= MAX_FANOUT;
    nodes.truncate(MAX_FANOUT);
    let mut sent = Vec::with_capacity(nodes.len());
    for n in &nodes {
        let body = Body::WhoHas {
            uuids: uuids.clone(),
            verifier,
        };
        if let Some((seq, bytes)) = cluster.envelope(&n.id, None, body) {
            sent.push((seq, Arc::<str>::from(n.id.as_str())));
            out.send_node(n.internal, bytes);
        }
    }
    let ask = Ask {
        holders: vec![None; uuids.len()],
        uuids,
        verifier,
        pending: sent.iter().map(|(_, n)| n.clone()).collect(),
        sent,
        complete,
        verified: None,
        deadline: now + ASK_DEADLINE,
        waiters: waiter.into_iter().collect(),
    };
    if ask.pending.is_empty() {
        // No other node known: nobody to ask.
        return finish(st, now, ask, out);
    }
    let mut inner = asks.lock();
    inner.next += 1;
    let id = inner.next;
    for (seq, _) in &ask.sent {
        inner.by_seq.insert(*seq, id);
    }
    if shareable {
        inner.by_target.insert(ask.uuids[0], id);
    }
    inner.asks.insert(id, ask);
}

/// Node `from` answered our `WhoHas` `seq`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn on_holds(
    st: &State,
    asks: &Asks,
    now: Instant,
    from: &str,
    seq: u64,
    held: &[bool],
    verified: Option<bool>,
    out: &mut Outbox,
) {
    let done = {
        let mut inner = asks.lock();
        let Some(id) = inner.by_seq.get(&seq).copied() else {
            return; // late: the lookup already ended
        };
        let Some(ask) = inner.asks.get_mut(&id) else {
            return;
        };
        if !ask.sent.iter().any(|(s, n)| *s == seq && **n == *from) {
            // An answer from a node this sequence number did not go to.
            drop(inner);
            st.metrics.drop(DropReason::ClusterAuth);
            return;
        }
        let Some(i) = ask.pending.iter().position(|n| **n == *from) else {
            return;
        };
        let node = ask.pending.swap_remove(i);
        for (slot, h) in ask.holders.iter_mut().zip(held) {
            if *h && slot.is_none() {
                *slot = Some(node.clone());
            }
        }
        if let (Some(v), Some(true)) = (verified, held.first()) {
            if ask.verifier.is_some() && ask.verified.is_none() {
                ask.verified = Some((v, node.clone()));
            }
        }
        if ask.done() {
            Asks::take(&mut inner, id)
        } else {
            None
        }
    };
    if let Some(ask) = done {
        finish(st, now, ask, out);
    }
}

/// Ends lookups past their deadline.
pub(crate) fn tick(st: &State, asks: &Asks, now: Instant, out: &mut Outbox) {
    let expired: Vec<Ask> = {
        let mut inner = asks.lock();
        if inner.asks.is_empty() {
            return;
        }
        let ids: Vec<u64> = inner
            .asks
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| Asks::take(&mut inner, id))
            .collect()
    };
    for ask in expired {
        finish(st, now, ask, out);
    }
}

/// Where a client is, as far as the answers tell.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Held(Arc<str>),
    Nowhere,
    Unknown,
}

/// Completes what waited on a lookup that ended.
fn finish(st: &State, now: Instant, ask: Ask, out: &mut Outbox) {
    let Some(cluster) = &st.cluster else {
        return;
    };
    let all_answered = ask.pending.is_empty() && ask.complete;
    let verdicts: Vec<Verdict> = ask
        .holders
        .iter()
        .map(|h| match h {
            Some(n) => Verdict::Held(n.clone()),
            None if all_answered => Verdict::Nowhere,
            None => Verdict::Unknown,
        })
        .collect();
    for (u, v) in ask.uuids.iter().zip(&verdicts) {
        if let Verdict::Held(n) = v {
            cluster.cache_presence(*u, Some(n.clone()), now);
        }
    }
    let outcome = if matches!(ask.verified, Some((false, _))) {
        PeerOutcome::Refused
    } else if verdicts.iter().any(|v| matches!(v, Verdict::Held(_))) {
        PeerOutcome::Found
    } else if verdicts.iter().all(|v| *v == Verdict::Nowhere) {
        PeerOutcome::Nowhere
    } else {
        PeerOutcome::Unanswered
    };
    st.metrics.peers.lookup(outcome);
    tracing::debug!(uuids = ?ask.uuids, ?verdicts, ?outcome, "peer lookup");
    for w in ask.waiters {
        match w {
            Waiter::Connect(l) => {
                if let Some(initiator) = l.initiator() {
                    st.job_done(initiator);
                }
                let found = match verdicts.first() {
                    Some(Verdict::Held(n)) => cluster.node(n).ok_or(FailReason::RetryLater),
                    Some(Verdict::Nowhere) => Err(FailReason::Offline),
                    _ => Err(FailReason::RetryLater),
                };
                connect::complete_connect(st, now, l, found, out);
            }
            Waiter::Resume { src, req_len, msg } => {
                resume(
                    st,
                    now,
                    src,
                    req_len,
                    msg,
                    &ask.verified,
                    verdicts.first(),
                    out,
                );
            }
            Waiter::Query { uuid, rid, uuids } => {
                st.job_done(uuid);
                let online: Option<Vec<bool>> = uuids
                    .iter()
                    .map(|u| {
                        if st.sessions.contains(u) {
                            return Some(true);
                        }
                        match ask.uuids.iter().position(|x| x == u).map(|i| &verdicts[i]) {
                            Some(Verdict::Held(n)) => Some(cluster.node(n).is_some()),
                            Some(Verdict::Nowhere) => Some(false),
                            _ => None,
                        }
                    })
                    .collect();
                query::complete_query(st, now, uuid, rid, online, out);
            }
        }
    }
}

/// Completes a Resume from the holder's verdict, or, when no node holds the session (its node
/// died with Redis down), from the secret this cluster derives for the UUID.
#[allow(clippy::too_many_arguments)]
fn resume(
    st: &State,
    now: Instant,
    src: SocketAddr,
    req_len: usize,
    msg: proto::Resume,
    verified: &Option<(bool, Arc<str>)>,
    verdict: Option<&Verdict>,
    out: &mut Outbox,
) {
    let h = Hello {
        src,
        len: req_len,
        rid: msg.rid,
    };
    let to = ErrorTo::Source { src, req_len };
    let Some(cluster) = &st.cluster else {
        return;
    };
    match (verified, verdict) {
        (Some((true, holder)), _) => {
            let found = Ok(Some((msg.secret.verifier(), holder.clone())));
            hello::complete_resume(st, now, h, msg, found, out);
        }
        (Some((false, _)), _) => st.error(now, to, msg.rid, ErrorCode::Unauthorized, out),
        // Held, but the holder gave no verdict (it cannot happen with a verifier asked): let
        // the client try again.
        (None, Some(Verdict::Held(_))) => st.error(now, to, msg.rid, ErrorCode::RetryLater, out),
        (None, v) => {
            let derived = cluster.session_secret(&msg.uuid);
            if bool::from(derived.ct_eq(&msg.secret.0)) {
                // Nobody holds it and the secret is the one this cluster gave that UUID.
                let found = Ok(Some((msg.secret.verifier(), Arc::from(""))));
                hello::complete_resume(st, now, h, msg, found, out);
            } else if v == Some(&Verdict::Nowhere) {
                st.error(now, to, msg.rid, ErrorCode::Unauthorized, out);
            } else {
                st.error(now, to, msg.rid, ErrorCode::RetryLater, out);
            }
        }
    }
}

/// Fails what waited on a lookup that could not be started.
fn fail_waiters(st: &State, now: Instant, waiters: Vec<Waiter>, out: &mut Outbox) {
    for w in waiters {
        match w {
            Waiter::Connect(l) => {
                if let Some(initiator) = l.initiator() {
                    st.job_done(initiator);
                }
                connect::fail_pending(st, now, l.conn, FailReason::RetryLater, out);
            }
            Waiter::Resume { src, req_len, msg } => {
                let to = ErrorTo::Source { src, req_len };
                st.error(now, to, msg.rid, ErrorCode::RetryLater, out);
            }
            Waiter::Query { uuid, rid, .. } => {
                st.job_done(uuid);
                query::complete_query(st, now, uuid, rid, None, out);
            }
        }
    }
}

/// Answers another node's `WhoHas` from this node's sessions.
pub(crate) fn answer(st: &State, uuids: &[Uuid], verifier: Option<[u8; 32]>) -> Body {
    let uuids = &uuids[..uuids.len().min(MAX_WHO_HAS)];
    // A session that acknowledged a Migrate from here and waits to be taken counts as held:
    // the node that takes it must name this one as the old node and tell it.
    let held: Vec<bool> = uuids
        .iter()
        .map(|u| st.sessions.contains(u) || st.migrating.contains_key(u))
        .collect();
    let verified = match (verifier, uuids) {
        (Some(v), [u]) => st
            .sessions
            .secret(u)
            .map(|s| s.verifier())
            .or_else(|| st.migrating.get(u).map(|m| m.1))
            .map(|mine| bool::from(mine[..].ct_eq(&v[..]))),
        _ => None,
    };
    st.metrics.peers.answered.increment(1);
    Body::Holds { held, verified }
}
