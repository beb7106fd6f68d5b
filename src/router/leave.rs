//! A session leaves this node: it said Bye, went silent, acknowledged a Migrate while the node
//! drains, or resumed on another node. Connections still waiting for its answer are handed back
//! at once (retry-later to the initiator, or `Abort` to the initiator's node) instead of waiting
//! out their timeout; its established connections end with it, or, when it moved, follow it:
//! the new node gets them (`Handover`), a third node holding the far end learns where it went
//! (`Rehome`), and for a while a Signal still sent here is passed on.

use std::time::Instant;

use sigrouter_proto::{Addr, FailReason};
use uuid::Uuid;

use super::connect;
use super::conns::{Conn, Remote, Role};
use super::outbox::Outbox;
use super::state::{OnReply, State};
use crate::cluster::wire::{Body, HandedConn};
use crate::cluster::PresenceOp;

/// Connections per `Handover` datagram (each well under 100 bytes).
const HANDOVER_CHUNK: usize = 8;

/// Why a session leaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Why {
    /// It said Bye: the directory forgets it.
    Bye,
    /// Its TTL passed without a word: the directory forgets it.
    Expired,
    /// It acknowledged a Migrate: it is on its way to another node, whose presence record will
    /// name it; its connections wait here for that node to ask.
    Migrating,
    /// It resumed on node `to` (which now names it in the directory).
    Moved(Remote),
}

/// Removes session `uuid` (an expired one was removed by the expiry check itself) and deals
/// with its connections. Returns whether it was here.
pub(crate) fn leave(st: &State, now: Instant, uuid: Uuid, why: Why, out: &mut Outbox) -> bool {
    st.migrations.remove(&uuid);
    if why == Why::Migrating {
        return migrating(st, now, uuid, out);
    }
    let here = match why {
        Why::Expired => true,
        _ => st.sessions.take(&uuid).is_some(),
    };
    if here {
        if matches!(why, Why::Bye | Why::Expired) {
            st.publish(PresenceOp::Del(uuid));
        }
        st.count_sessions();
    }
    // A client that acknowledged a Migrate left already; its connections waited for this.
    let was_migrating = st.migrating.remove(&uuid).is_some();
    let follow_up = was_migrating && matches!(why, Why::Moved(_));
    if !(here || follow_up) {
        return false;
    }
    let conns = st.conns.of_session(&uuid);
    let mut handed = Vec::new();
    for (id, c) in conns {
        if c.is_pending() {
            if c.target == uuid {
                hand_back(st, now, id, &c, out);
            }
            // As the initiator: the outcome finds it gone.
            continue;
        }
        match &why {
            Why::Moved(to) => handed.extend(hand_over(st, now, uuid, id, &c, to, out)),
            _ => {
                st.conns.remove(&id);
            }
        }
    }
    if let Why::Moved(to) = why {
        for chunk in handed.chunks(HANDOVER_CHUNK) {
            let body = Body::Handover {
                uuid,
                conns: chunk.to_vec(),
            };
            st.node_request(now, &to, body, OnReply::Nothing, out);
        }
    }
    true
}

/// Session `uuid` acknowledged a Migrate: it is on its way to another node, whose `Moved` may
/// be handled on another thread at the same moment. The session is in `migrating` before it
/// leaves the sessions, and its connections stay indexed, so that a concurrent `Moved` (for it,
/// or for the other end of one of its connections) always finds it in one or the other and
/// finds its connections: otherwise a connection could be dropped, or wait here for a `Moved`
/// that already came.
fn migrating(st: &State, now: Instant, uuid: Uuid, out: &mut Outbox) -> bool {
    let Some(verifier) = st.sessions.verifier(&uuid) else {
        return false;
    };
    // Kept with its verifier: while Redis cannot answer, this node still vouches for the
    // session to the node it resumes at (which then tells it the session moved).
    st.migrating.insert(uuid, (now, verifier));
    st.migrating_ages.written(uuid, now);
    if st.sessions.take(&uuid).is_none() {
        // Its Moved came in between and dealt with it.
        st.migrating.remove(&uuid);
        return false;
    }
    st.count_sessions();
    // Connects still waiting for its answer are handed back; established connections wait,
    // indexed, for its new node to ask.
    for (id, c) in st.conns.pending_of(&uuid) {
        if c.target == uuid {
            hand_back(st, now, id, &c, out);
        }
    }
    true
}

/// A pending connection whose target left before answering.
fn hand_back(st: &State, now: Instant, id: Uuid, c: &Conn, out: &mut Outbox) {
    match &c.role {
        Role::Target(remote) => {
            st.conns.remove(&id);
            st.node_request(now, remote, Body::Abort { conn: id }, OnReply::Nothing, out);
        }
        _ => connect::fail_pending(st, now, id, FailReason::RetryLater, out),
    }
}

/// Established connection `id` of `uuid`, which moved to node `to`: what the new node needs
/// to carry it on. The end that stays here now spans to `to`; if the other end is on a third
/// node, that node learns where `uuid` went.
fn hand_over(
    st: &State,
    now: Instant,
    uuid: Uuid,
    id: Uuid,
    c: &Conn,
    to: &Remote,
    out: &mut Outbox,
) -> Option<HandedConn> {
    let other = c.other(uuid);
    // An end that acknowledged a Migrate is still this node's until its new node says Moved:
    // when both ends of a connection here move, the first to arrive elsewhere must not take
    // the connection with it (the second would find nothing to hand over).
    let other_here = c.local_ends().any(|e| e == other)
        && (st.sessions.contains(&other) || st.migrating.contains_key(&other));
    let peer = if other_here {
        let role = if other == c.initiator {
            Role::Initiator(Some(to.clone()))
        } else {
            Role::Target(to.clone())
        };
        st.conns.set_role(&id, role);
        st.me()?
    } else {
        let far = c.role.remote().cloned();
        st.conns.remove(&id);
        let far = far?;
        st.moved_conns.insert(id, (to.clone(), now));
        st.moved_conns_ages.written(id, now);
        if far.node != to.node {
            let body = Body::Rehome {
                conn: id,
                node: to.node.to_string(),
                addr: Addr(to.addr),
            };
            st.node_request(now, &far, body, OnReply::Nothing, out);
        }
        far
    };
    Some(HandedConn {
        conn: id,
        initiator: c.initiator,
        target: c.target,
        peer_node: peer.node.to_string(),
        peer_addr: Addr(peer.addr),
    })
}
