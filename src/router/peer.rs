//! Requests from other nodes, received on the cluster port, and the replies to this node's own
//! requests. A node only forwards what its own clients asked; the receiving node only delivers
//! locally (one hop, never re-forwarded).

use std::net::SocketAddr;
use std::time::Instant;

use sigrouter_proto::{Ack, ErrorCode, FailReason, Incoming, Message};

use super::connect::{self, Outcome};
use super::conns::{Conn, ConnState, Remote, Role};
use super::drain;
use super::leave::{self, Why};
use super::outbox::{ConnectLookup, Job, Outbox};
use super::relay;
use super::state::{ErrorTo, OnReply, State};
use super::whohas::{self, Asks};
use crate::cluster::membership::MemberError;
use crate::cluster::wire::{Body, Envelope, Status};
use crate::metrics::DropReason;

/// Handles one datagram from another node.
pub(crate) fn handle(
    st: &State,
    asks: &Asks,
    now: Instant,
    src: SocketAddr,
    buf: &[u8],
    out: &mut Outbox,
) {
    let Some(cluster) = &st.cluster else {
        return;
    };
    let Ok(env) = cluster.open(buf) else {
        st.metrics.drop(DropReason::ClusterAuth);
        return;
    };
    st.metrics.forwarded_in.increment(1);
    if let Body::Reply { status } = env.body {
        on_reply(st, now, env.seq, Some(status), out);
        return;
    }
    if is_one_shot(&env.body) {
        // Never retransmitted: a repeat is a replay.
        let reply = matches!(env.body, Body::Holds { .. });
        if !cluster.first_time(&env.from, env.seq, reply, now) {
            st.metrics.drop(DropReason::ClusterAuth);
            return;
        }
        one_shot(st, asks, now, src, env, out);
        return;
    }
    // A repeat (our reply was lost): answer the same, do nothing twice.
    let status = match cluster.seen(&env.from, env.seq) {
        Some(s) => s,
        None => {
            let kind = body_name(&env.body);
            let from = Remote {
                node: env.from.as_str().into(),
                addr: src,
            };
            let s = apply(st, now, from, env.body, out);
            tracing::debug!(from = %env.from, seq = env.seq, kind, status = ?s, "node request");
            cluster.remember(&env.from, env.seq, s, now);
            s
        }
    };
    if let Some((_, bytes)) = cluster.envelope(&env.from, Some(env.seq), Body::Reply { status }) {
        out.send_node(src, bytes);
    }
}

/// Membership messages and presence lookups: one-way, or answered afresh, never remembered.
fn is_one_shot(b: &Body) -> bool {
    matches!(
        b,
        Body::Swim(_)
            | Body::Join { .. }
            | Body::WhoHas { .. }
            | Body::Holds { .. }
            | Body::Expect { .. }
    )
}

/// Handles a one-shot datagram seen for the first time.
fn one_shot(
    st: &State,
    asks: &Asks,
    now: Instant,
    src: SocketAddr,
    env: Envelope,
    out: &mut Outbox,
) {
    let Some(cluster) = &st.cluster else {
        return;
    };
    match env.body {
        Body::Swim(data) => {
            let (r, sends) = cluster.membership_handle(now, &env.from, &data);
            if let Err(e) = r {
                tracing::debug!(from = %env.from, error = %e, "membership message refused");
                if matches!(e, MemberError::Spoofed) {
                    st.metrics.drop(DropReason::ClusterAuth);
                }
            }
            for (to, bytes) in sends {
                out.send_node(to, bytes);
            }
        }
        Body::Join { member } => {
            if member.id != env.from {
                st.metrics.drop(DropReason::ClusterAuth);
                return;
            }
            for (to, bytes) in cluster.membership_join(now, member) {
                out.send_node(to, bytes);
            }
        }
        Body::WhoHas { uuids, verifier } => {
            let body = whohas::answer(st, &uuids, verifier);
            if let Some((_, bytes)) = cluster.envelope(&env.from, Some(env.seq), body) {
                out.send_node(src, bytes);
            }
        }
        Body::Holds { held, verified } => {
            whohas::on_holds(st, asks, now, &env.from, env.seq, &held, verified, out);
        }
        Body::Expect { sessions } => drain::expect(st, now, &env.from, &sessions),
        _ => {}
    }
}

/// Applies a request from node `from`; returns the status to reply with.
fn apply(st: &State, now: Instant, from_node: Remote, body: Body, out: &mut Outbox) -> Status {
    match body {
        Body::Incoming {
            conn,
            from,
            to,
            observed,
            local,
            payload,
        } => {
            let Some(target) = st.next_push(&to) else {
                return Status::NotHere;
            };
            st.conns.start(
                conn,
                Conn {
                    initiator: from,
                    target: to,
                    initiator_rid: 0,
                    started: now,
                    state: ConnState::Pending {
                        deadline: now + st.settings.connect_timeout,
                        push: Some(target.push),
                    },
                    role: Role::Target(from_node),
                },
            );
            let msg = Message::Incoming(Incoming {
                push: target.push,
                connection: conn,
                from,
                observed,
                local,
                payload,
            });
            st.push(now, target, msg, out);
            Status::Ok
        }
        Body::Answered {
            conn,
            accept,
            peer,
            observed,
            local,
            payload,
        } => {
            let Some(c) = st.conns.answer(now, &conn, peer, accept, true) else {
                return Status::UnknownConnection;
            };
            if !accept {
                st.conns.remove(&conn);
            }
            let outcome = Outcome {
                accept,
                peer,
                observed,
                local,
                payload,
            };
            connect::deliver_outcome(st, now, &c, conn, outcome, out);
            Status::Ok
        }
        Body::Signal {
            conn,
            from,
            to,
            payload,
        } => {
            if !st.conns.forwarded_signal(now, &conn, from, to) {
                // Its end here moved on a moment ago: pass it on (the sender learns the new
                // node from a Rehome).
                let moved = st.moved_conns.get(&conn).map(|m| m.0.clone());
                let Some(next) = moved else {
                    return Status::UnknownConnection;
                };
                let body = Body::Signal {
                    conn,
                    from,
                    to,
                    payload,
                };
                st.node_request(now, &next, body, OnReply::Nothing, out);
                return Status::Ok;
            }
            if relay::push_signal(st, now, conn, from, to, payload, out) {
                Status::Ok
            } else {
                Status::NotHere
            }
        }
        Body::Abort { conn } => {
            // The target left its node before answering: the initiator tries again.
            let ours = st
                .conns
                .get(&conn)
                .is_some_and(|c| !matches!(c.role, Role::Target(_)) && c.is_pending());
            if ours {
                connect::fail_pending(st, now, conn, FailReason::RetryLater, out);
            }
            Status::Ok
        }
        Body::Moved { uuid } => {
            // The presence now names the new node: do not delete it. Its connections follow.
            leave::leave(st, now, uuid, Why::Moved(from_node), out);
            Status::Ok
        }
        Body::Handover { uuid, conns } => {
            if !st.sessions.contains(&uuid) {
                return Status::NotHere;
            }
            for h in conns {
                let other = if h.initiator == uuid {
                    h.target
                } else {
                    h.initiator
                };
                let peer = Remote {
                    node: h.peer_node.as_str().into(),
                    addr: h.peer_addr.0,
                };
                let role = if st.me().is_some_and(|me| me.node == peer.node)
                    && st.sessions.contains(&other)
                {
                    Role::Local
                } else if h.initiator == uuid {
                    Role::Initiator(Some(peer))
                } else {
                    Role::Target(peer)
                };
                let conn = Conn {
                    initiator: h.initiator,
                    target: h.target,
                    initiator_rid: 0,
                    started: now,
                    state: ConnState::Established { last: now },
                    role,
                };
                st.conns.adopt(h.conn, conn);
            }
            Status::Ok
        }
        Body::Rehome { conn, node, addr } => {
            let Some(c) = st.conns.get(&conn) else {
                return Status::UnknownConnection;
            };
            let remote = Remote {
                node: node.as_str().into(),
                addr: addr.0,
            };
            let role = match c.role {
                Role::Initiator(_) => Role::Initiator(Some(remote)),
                Role::Target(_) => Role::Target(remote),
                Role::Local => return Status::UnknownConnection,
            };
            st.conns.set_role(&conn, role);
            Status::Ok
        }
        Body::Reply { .. }
        | Body::Swim(_)
        | Body::Join { .. }
        | Body::WhoHas { .. }
        | Body::Holds { .. }
        | Body::Expect { .. } => Status::Ok,
    }
}

/// Node-to-node request `seq` was answered with `status` (`None`: it never was, by its
/// deadline): does what was planned for it.
pub(crate) fn on_reply(
    st: &State,
    now: Instant,
    seq: u64,
    status: Option<Status>,
    out: &mut Outbox,
) {
    let Some(then) = st.node_requests.remove(&seq) else {
        return; // a repeat reply
    };
    complete(st, now, then, status, out);
}

/// Runs what was planned for a node-to-node request once its outcome is known.
pub(crate) fn complete(
    st: &State,
    now: Instant,
    then: OnReply,
    status: Option<Status>,
    out: &mut Outbox,
) {
    tracing::debug!(?status, ?then, "node request answered");
    match then {
        OnReply::Nothing => {}
        OnReply::AckClient { uuid, rid } => match status {
            Some(Status::Ok) => st.answer_later(now, uuid, rid, Message::Ack(Ack { rid }), out),
            // The connection is known there but its end is not held: it is between nodes (it
            // acknowledged a Migrate and has not resumed yet), and the connection follows it.
            Some(Status::NotHere) => {
                st.error(now, ErrorTo::Session(uuid), rid, ErrorCode::RetryLater, out)
            }
            Some(_) => st.error(
                now,
                ErrorTo::Session(uuid),
                rid,
                ErrorCode::UnknownConnection,
                out,
            ),
            None => st.error(now, ErrorTo::Session(uuid), rid, ErrorCode::RetryLater, out),
        },
        OnReply::Incoming {
            conn,
            target,
            body,
            retried,
        } => {
            if status == Some(Status::Ok) {
                return;
            }
            if let Some(c) = &st.cluster {
                c.invalidate(&target);
            }
            let initiator = match &body {
                Body::Incoming { from, .. } => *from,
                _ => uuid::Uuid::nil(),
            };
            if status.is_some() && !retried && st.job_start(initiator) {
                // The client moved or left since the lookup: look again, once, afresh.
                out.jobs.push(Job::Connect(ConnectLookup {
                    conn,
                    target,
                    fresh: true,
                    body,
                }));
            } else {
                // Still not where the directory says (it is moving), or the node did not
                // answer: the client retries.
                connect::fail_pending(st, now, conn, FailReason::RetryLater, out);
            }
        }
    }
}

fn body_name(b: &Body) -> &'static str {
    match b {
        Body::Incoming { .. } => "incoming",
        Body::Answered { .. } => "answered",
        Body::Signal { .. } => "signal",
        Body::Abort { .. } => "abort",
        Body::Moved { .. } => "moved",
        Body::Reply { .. } => "reply",
        Body::Handover { .. } => "handover",
        Body::Rehome { .. } => "rehome",
        Body::Swim(_) => "swim",
        Body::Join { .. } => "join",
        Body::WhoHas { .. } => "who-has",
        Body::Holds { .. } => "holds",
        Body::Expect { .. } => "expect",
    }
}
