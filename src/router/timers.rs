//! Time-driven work: retransmissions and timeouts (the tick, every few tens of milliseconds)
//! and slow housekeeping (the sweeps: expiry, forgotten answers, idle connections).

use std::time::{Duration, Instant};

use sigrouter_proto::FailReason;
use uuid::Uuid;

use super::connect;
use super::leave::{self, Why};
use super::outbox::Outbox;
use super::peer;
use super::retransmit::Due;
use super::state::State;

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
    st.migrating_ages.sweep(&st.migrating, now, |(t, _)| *t);
    st.moved_conns_ages.sweep(&st.moved_conns, now, |(_, t)| *t);
    st.expected_ages.sweep(&st.expected, now, |e| e.at);
    st.register_limiter.forget_idle(st.ns(now));
    st.stun_limiter.forget_idle(st.ns(now));
    sweep_conns(st, now);
    gone
}

/// Forgets established connections that went idle or lost their local end, among those due
/// for a look (each is looked at every ten seconds).
fn sweep_conns(st: &State, now: Instant) {
    // An end on another node is that node's business; ours must still be here.
    // A session on its way to another node still counts: its connections wait for it.
    let here = |u: &Uuid| st.sessions.contains(u) || st.migrating.contains_key(u);
    st.conns.look_due(now, |c, last| {
        let gone = if c.role.remote().is_some() {
            !here(&c.initiator) && !here(&c.target)
        } else {
            !here(&c.initiator) || !here(&c.target)
        };
        gone || now.saturating_duration_since(last) > CONN_IDLE
    });
}
