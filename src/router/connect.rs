//! Connections from Connect to the target's answer: local first (a target on this node never
//! touches Redis or the network), else forwarded in one hop to the node that holds the target,
//! after a presence lookup when the cache has nothing fresh.

use std::sync::Arc;
use std::time::Instant;

use sigrouter_proto::{
    self as proto, Addr, Answer, ConnectFailed, Connected, ErrorCode, FailReason, Incoming,
    Message, Payload,
};
use uuid::Uuid;

use super::conns::{Conn, ConnState, Remote, Role};
use super::outbox::{ConnectLookup, Job, Outbox};
use super::state::{ErrorTo, OnReply, State};
use crate::cluster::wire::Body;
use crate::cluster::{NodeInfo, NodeState};
use crate::session::{Remembered, SenderView};

/// The target's answer, as delivered to the initiator.
pub(crate) struct Outcome {
    /// Accepted (Connected) or rejected (ConnectFailed).
    pub(crate) accept: bool,
    /// The target.
    pub(crate) peer: Uuid,
    /// The target's observed address.
    pub(crate) observed: Addr,
    /// The target's local addresses.
    pub(crate) local: Vec<Addr>,
    /// The Accept or Reject payload.
    pub(crate) payload: Payload,
}

/// Answers a Connect that failed, remembering the outcome.
fn connect_failed(
    st: &State,
    now: Instant,
    uuid: Uuid,
    rid: u64,
    reason: FailReason,
    out: &mut Outbox,
) {
    st.metrics.outcome(Some(reason));
    let msg = Message::ConnectFailed(ConnectFailed {
        rid,
        reason,
        payload: Payload::new(),
    });
    st.answer_later(now, uuid, rid, msg, out);
}

/// Connect from session `uuid`.
pub(crate) fn connect(
    st: &State,
    now: Instant,
    uuid: Uuid,
    view: &SenderView,
    c: proto::Connect,
    out: &mut Outbox,
) {
    if c.to == uuid {
        st.error(
            now,
            ErrorTo::Sender(view),
            c.rid,
            ErrorCode::BadRequest,
            out,
        );
        return;
    }
    let id = Uuid::new_v4();
    // Local first: a target on this node never touches Redis or the network.
    if let Some(target) = st.next_push(&c.to) {
        start(st, now, id, uuid, c.rid, c.to, Some(target.push));
        let incoming = Message::Incoming(Incoming {
            push: target.push,
            connection: id,
            from: uuid,
            observed: Addr(view.addr),
            local: st.sessions.local(&uuid),
            payload: c.payload,
        });
        st.push(now, target, incoming, out);
        return;
    }
    let Some(cluster) = &st.cluster else {
        connect_failed(st, now, uuid, c.rid, FailReason::Offline, out);
        return;
    };
    let cached = cluster.cached_presence(&c.to, now);
    if matches!(cached, Some(None)) {
        tracing::debug!(target = %c.to, "offline (cached: nowhere)");
        connect_failed(st, now, uuid, c.rid, FailReason::Offline, out);
        return;
    }
    start(st, now, id, uuid, c.rid, c.to, None);
    let body = Body::Incoming {
        conn: id,
        from: uuid,
        to: c.to,
        observed: Addr(view.addr),
        local: st.sessions.local(&uuid),
        payload: c.payload,
    };
    // A fresh cache entry naming a known, active node: forward now, no Redis, no waiting.
    // (A draining node is moving its clients away: the directory knows better.)
    if let Some(Some(node_id)) = cached {
        let node = cluster
            .node(&node_id)
            .filter(|n| n.state == NodeState::Active);
        if let Some(node) = node {
            forward_incoming(st, now, &node, body, false, out);
            return;
        }
    }
    if !st.job_start(uuid) {
        st.metrics.rate_limited_jobs.increment(1);
        fail_pending(st, now, id, FailReason::RetryLater, out);
        return;
    }
    out.jobs.push(Job::Connect(ConnectLookup {
        conn: id,
        target: c.to,
        fresh: false,
        body,
    }));
}

/// Records a pending connection on the initiator's node and marks the Connect's request id
/// as pending (retransmissions wait for the outcome). `local_push`: the Incoming pushed to a
/// target on this node; `None` while the target is looked up elsewhere.
fn start(
    st: &State,
    now: Instant,
    id: Uuid,
    initiator: Uuid,
    rid: u64,
    target: Uuid,
    local_push: Option<u64>,
) {
    let role = match local_push {
        Some(_) => Role::Local,
        None => Role::Initiator(None),
    };
    st.conns.start(
        id,
        Conn {
            initiator,
            target,
            initiator_rid: rid,
            started: now,
            state: ConnState::Pending {
                deadline: now + st.settings.connect_timeout,
                push: local_push,
            },
            role,
        },
    );
    st.sessions
        .remember(&initiator, rid, Remembered::Pending, now);
}

/// Completes a Connect job: forward to `node`, or fail the pending connection.
pub(crate) fn complete_connect(
    st: &State,
    now: Instant,
    job: ConnectLookup,
    found: Result<Arc<NodeInfo>, FailReason>,
    out: &mut Outbox,
) {
    // It may have arrived here meanwhile (moving between nodes): deliver locally.
    if deliver_pending_locally(st, now, job.conn, job.target, &job.body, out) {
        return;
    }
    match found {
        Ok(node) => forward_incoming(st, now, &node, job.body, job.fresh, out),
        Err(reason) => fail_pending(st, now, job.conn, reason, out),
    }
}

/// Turns a pending connection whose target turned out to be local into a local one.
/// Returns false if the target is not here.
fn deliver_pending_locally(
    st: &State,
    now: Instant,
    conn: Uuid,
    target: Uuid,
    body: &Body,
    out: &mut Outbox,
) -> bool {
    let Body::Incoming {
        from,
        observed,
        local,
        payload,
        ..
    } = body
    else {
        return false;
    };
    let Some(t) = st.next_push(&target) else {
        return false;
    };
    if st.conns.make_local(&conn, t.push) {
        let msg = Message::Incoming(Incoming {
            push: t.push,
            connection: conn,
            from: *from,
            observed: *observed,
            local: local.clone(),
            payload: payload.clone(),
        });
        st.push(now, t, msg, out);
    }
    true
}

/// Forwards the Incoming of a pending connection to the node holding its target.
/// `retried`: this forward follows a fresh lookup after a "not here".
pub(crate) fn forward_incoming(
    st: &State,
    now: Instant,
    node: &NodeInfo,
    body: Body,
    retried: bool,
    out: &mut Outbox,
) {
    let Body::Incoming {
        conn, to: target, ..
    } = body
    else {
        return;
    };
    let remote = Remote {
        node: node.id.as_str().into(),
        addr: node.internal,
    };
    if st.conns.forwarded_to(&conn, remote.clone()) {
        let on_reply = OnReply::Incoming {
            conn,
            target,
            body: body.clone(),
            retried,
        };
        st.node_request(now, &remote, body, on_reply, out);
    }
}

/// Fails a pending connection (if still pending) with `reason`.
#[track_caller]
pub(crate) fn fail_pending(
    st: &State,
    now: Instant,
    conn: Uuid,
    reason: FailReason,
    out: &mut Outbox,
) {
    let Some(c) = st.conns.remove(&conn) else {
        return;
    };
    tracing::debug!(
        target: "sigrouter::connect_failed",
        %conn,
        reason = reason.name(),
        at = %std::panic::Location::caller(),
        remote = ?c.role.remote().map(|r| r.node.clone()),
        "connect failed"
    );
    if let ConnState::Pending { push, .. } = c.state {
        if let Some(push) = push {
            st.pushes.remove(&(c.target, push));
        }
        if st.sessions.contains(&c.initiator) {
            connect_failed(st, now, c.initiator, c.initiator_rid, reason, out);
        }
    }
}

/// Accept or Reject from the target, session `uuid`.
pub(crate) fn answer_incoming(
    st: &State,
    now: Instant,
    uuid: Uuid,
    view: &SenderView,
    a: Answer,
    accept: bool,
    out: &mut Outbox,
) {
    let Some(conn) = st.conns.answer(now, &a.connection, uuid, accept, false) else {
        st.error(
            now,
            ErrorTo::Sender(view),
            a.rid,
            ErrorCode::UnknownConnection,
            out,
        );
        return;
    };
    let ConnState::Pending { push, .. } = conn.state else {
        // Already answered under another request id: nothing more to do.
        st.ack(now, view, a.rid, out);
        return;
    };
    // The answer proves the Incoming arrived.
    if let Some(push) = push {
        st.pushes.remove(&(uuid, push));
    }
    if !accept {
        st.conns.remove(&a.connection);
    }
    if let (Some(remote), Some(_)) = (conn.role.remote(), &st.cluster) {
        // The initiator is on another node: the Ack waits for that node's reply.
        st.sessions.remember(&uuid, a.rid, Remembered::Pending, now);
        let body = Body::Answered {
            conn: a.connection,
            accept,
            peer: uuid,
            observed: Addr(view.addr),
            local: st.sessions.local(&uuid),
            payload: a.payload,
        };
        let on_reply = OnReply::AckClient { uuid, rid: a.rid };
        st.node_request(now, remote, body, on_reply, out);
        return;
    }
    st.ack(now, view, a.rid, out);
    let outcome = Outcome {
        accept,
        peer: uuid,
        observed: Addr(view.addr),
        local: st.sessions.local(&uuid),
        payload: a.payload,
    };
    deliver_outcome(st, now, &conn, a.connection, outcome, out);
}

/// Tells the (local) initiator of connection `id` how its Connect ended.
pub(crate) fn deliver_outcome(
    st: &State,
    now: Instant,
    conn: &Conn,
    id: Uuid,
    o: Outcome,
    out: &mut Outbox,
) {
    if !st.sessions.contains(&conn.initiator) {
        st.conns.remove(&id);
        return;
    }
    let (msg, reason) = if o.accept {
        let m = Message::Connected(Connected {
            rid: conn.initiator_rid,
            connection: id,
            peer: o.peer,
            observed: o.observed,
            local: o.local,
            payload: o.payload,
        });
        (m, None)
    } else {
        let m = Message::ConnectFailed(ConnectFailed {
            rid: conn.initiator_rid,
            reason: FailReason::Rejected,
            payload: o.payload,
        });
        (m, Some(FailReason::Rejected))
    };
    st.metrics.outcome(reason);
    st.metrics
        .connect_seconds
        .record(now.saturating_duration_since(conn.started).as_secs_f64());
    st.answer_later(now, conn.initiator, conn.initiator_rid, msg, out);
}
