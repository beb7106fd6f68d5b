//! A session leaves this node: it said Bye, went silent, resumed elsewhere, or acknowledged a
//! Migrate while the node drains. Connections still waiting for its answer are handed back at
//! once (retry-later to the initiator, or `Abort` to the initiator's node) instead of waiting
//! out their timeout.

use std::time::Instant;

use sigrouter_proto::FailReason;
use uuid::Uuid;

use super::connect;
use super::conns::Role;
use super::outbox::Outbox;
use super::state::{OnReply, State};
use crate::cluster::wire::Body;
use crate::cluster::PresenceOp;

/// Why a session leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Why {
    /// It said Bye: the directory forgets it.
    Bye,
    /// Its TTL passed without a word: the directory forgets it.
    Expired,
    /// It resumed on another node, whose presence record now names it: leave the record.
    Moved,
}

/// Removes session `uuid` (an expired one was removed by the expiry check itself) and hands
/// back the connections waiting on it. Returns whether it was here.
pub(crate) fn leave(st: &State, now: Instant, uuid: Uuid, why: Why, out: &mut Outbox) -> bool {
    let here = match why {
        // Expiry removed it itself (only if still silent).
        Why::Expired => true,
        Why::Bye | Why::Moved => st.sessions.remove(&uuid),
    };
    if !here {
        return false;
    }
    if why != Why::Moved {
        st.publish(PresenceOp::Del(uuid));
    }
    st.count_sessions();
    for (id, conn) in st.conns.pending_for(&uuid) {
        match &conn.role {
            Role::Target(remote) => {
                st.conns.remove(&id);
                let body = Body::Abort { conn: id };
                st.node_request(now, remote, body, OnReply::Nothing, out);
            }
            _ => connect::fail_pending(st, now, id, FailReason::RetryLater, out),
        }
    }
    true
}
