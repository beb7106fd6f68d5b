//! Time-driven work: retransmissions and timeouts (the tick, every few tens of milliseconds)
//! and slow housekeeping (the sweeps: expiry, forgotten answers, idle connections).

use std::time::{Duration, Instant};

use sigrouter_proto::FailReason;
use uuid::Uuid;

use super::connect;
use super::conns::Conns;
use super::leave::{self, Why};
use super::outbox::Outbox;
use super::peer;
use super::retransmit::Due;
use super::state::State;

/// How long a moving session's connections wait for its new node, and how long Signals for a
/// connection that moved on are passed on.
const MOVE_MEMORY: Duration = Duration::from_secs(30);
/// An established connection with no Signal for this long is forgotten.
const CONN_IDLE: Duration = Duration::from_secs(600);

/// Retransmissions and timeouts due at `now`.
pub(crate) fn tick(st: &State, now: Instant, out: &mut Outbox) {
    for (key, due) in st.pushes.due(now) {
        match due {
            Due::Expired(_) => st.metrics.pushes_expired.increment(1),
            Due::Resend { bytes, .. } => {
                // Pushes follow the session's address (it may have rebound since).
                let Some(addr) = st.sessions.addr(&key.0) else {
                    st.pushes.remove(&key);
                    continue;
                };
                st.metrics.push_retransmits.increment(1);
                out.send_client(addr, bytes);
            }
        }
    }
    for (_, due) in st.node_requests.due(now) {
        match due {
            Due::Expired(then) => peer::complete(st, now, then, None, out),
            Due::Resend { to, bytes } => out.send_node(to, bytes),
        }
    }
    for (id, conn) in st.conns.timed_out(now) {
        tracing::debug!(
            conn = %id,
            initiator = %conn.initiator,
            target = %conn.target,
            role = ?conn.role,
            "connect timed out"
        );
        // Only the initiator's node answers the Connect; a target-side pending entry
        // (initiator remote) just goes away.
        connect::fail_pending(st, now, id, FailReason::Timeout, out);
    }
}

/// Expires sessions whose check is due, forgets old answers, prunes rate-limiter state.
/// Returns the expired sessions.
pub(crate) fn sweep(st: &State, now: Instant, out: &mut Outbox) -> Vec<Uuid> {
    let gone = st.sessions.expire(now);
    for u in &gone {
        leave::leave(st, now, *u, Why::Expired, out);
    }
    st.metrics.expired.increment(gone.len() as u64);
    st.count_sessions();
    if let Some(c) = &st.cluster {
        c.sweep(now);
    }
    let forget = |t: &Instant| now.saturating_duration_since(*t) <= MOVE_MEMORY;
    st.migrating.retain(|_, t| forget(t));
    st.moved_conns.retain(|_, (_, t)| forget(t));
    st.register_limiter.forget_idle(st.ns(now));
    st.stun_limiter.forget_idle(st.ns(now));
    gone
}

/// Forgets established connections that went idle or lost their local end.
pub(crate) fn sweep_conns(st: &State, now: Instant) {
    for e in st.conns.established() {
        // An end on another node is that node's business; ours must still be here.
        // A session on its way to another node still counts: its connections wait for it.
        let here = |u: &Uuid| st.sessions.contains(u) || st.migrating.contains_key(u);
        let gone = if e.spans_nodes {
            !here(&e.initiator) && !here(&e.target)
        } else {
            !here(&e.initiator) || !here(&e.target)
        };
        if Conns::idle(&e, now, CONN_IDLE) || gone {
            st.conns.remove(&e.id);
        }
    }
}
