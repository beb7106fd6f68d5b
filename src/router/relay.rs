//! Signals between the two ends of an established connection, and the acknowledgements of
//! server pushes. A Signal to a peer on another node is forwarded there; the sender's Ack
//! waits for that node's reply, so a relayed Signal keeps its delivery guarantee.

use std::time::Instant;

use sigrouter_proto::{self as proto, ErrorCode, Message, Payload, PushAck, SignalPush};
use uuid::Uuid;

use super::leave::{self, Why};
use super::outbox::Outbox;
use super::state::{ErrorTo, OnReply, PushKind, State};
use crate::cluster::wire::Body;
use crate::session::{Remembered, SenderView};

/// Signal from session `uuid`.
pub(crate) fn signal(
    st: &State,
    now: Instant,
    uuid: Uuid,
    view: &SenderView,
    s: proto::Signal,
    out: &mut Outbox,
) {
    let Some((other, role)) = st.conns.signal_from(now, &s.connection, uuid) else {
        st.error(
            now,
            ErrorTo::Sender(view),
            s.rid,
            ErrorCode::UnknownConnection,
            out,
        );
        return;
    };
    if let (Some(remote), Some(_)) = (role.remote(), &st.cluster) {
        st.sessions.remember(&uuid, s.rid, Remembered::Pending, now);
        let body = Body::Signal {
            conn: s.connection,
            from: uuid,
            to: other,
            payload: s.payload,
        };
        let on_reply = OnReply::AckClient { uuid, rid: s.rid };
        st.node_request(now, remote, body, on_reply, out);
        return;
    }
    if !push_signal(st, now, s.connection, uuid, other, s.payload, out) {
        // The other end acknowledged a Migrate and has not resumed elsewhere yet: the
        // connection follows it in a moment, so the sender tries again.
        let code = if st.migrating.contains_key(&other) {
            ErrorCode::RetryLater
        } else {
            ErrorCode::UnknownConnection
        };
        st.error(now, ErrorTo::Sender(view), s.rid, code, out);
        return;
    }
    st.ack(now, view, s.rid, out);
}

/// Pushes a Signal to `to`, held here. False if it is not.
pub(crate) fn push_signal(
    st: &State,
    now: Instant,
    conn: Uuid,
    from: Uuid,
    to: Uuid,
    payload: Payload,
    out: &mut Outbox,
) -> bool {
    let Some(target) = st.next_push(&to) else {
        return false;
    };
    let msg = Message::SignalPush(SignalPush {
        push: target.push,
        connection: conn,
        from,
        payload,
    });
    st.push(now, target, msg, out);
    st.metrics.signals_relayed.increment(1);
    true
}

/// PushAck from session `uuid` (MAC already checked): stops the push's retransmission.
pub(crate) fn push_ack(st: &State, now: Instant, uuid: Uuid, a: PushAck, out: &mut Outbox) {
    st.sessions.keepalive(&uuid, now);
    let acked = st.pushes.remove(&(uuid, a.push));
    if acked == Some(PushKind::Migrate) && st.is_draining() {
        // The client is moving: let go now, so connects waiting for it here are handed back
        // at once (retry-later) instead of waiting on a client that will answer elsewhere.
        // The new node re-publishes its presence.
        leave::leave(st, now, uuid, Why::Migrating, out);
    }
}
