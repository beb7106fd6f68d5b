//! Register and Resume: the unauthenticated requests that create or take back a session.
//! Their answers are never larger than the request (the client pads it), so a spoofed source
//! gains nothing by sending them.
//!
//! Address validation (`--address-validation`): when it applies, a Register, or a Resume
//! from an address that is not the session's, without a valid token gets `Retry` with a token
//! for its source address and port ([`super::token`]) and creates nothing: no session, no
//! remembered answer, no presence write, no lookup job. The order of the checks keeps every
//! answer that needs no state first: duplicate Register (the session exists already), the
//! per-prefix limit, draining, the session cap; then validation; then the node-wide budget
//! and the session. A draining node creates nothing for a hello, so it does not validate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hmac::Mac;
use rand::RngCore;
use sigrouter_proto::{
    self as proto, Addr, ErrorCode, ErrorMsg, Message, Retry, Secret, MIN_HELLO_LEN,
};
use uuid::Uuid;

use super::conns::Remote;
use super::drain;
use super::outbox::{Job, Outbox, ResumeLookup};
use super::state::{ErrorTo, OnReply, State};
use super::token::Check;
use crate::cluster::wire::Body;
use crate::cluster::PresenceOp;
use crate::config::AddressValidation;
use crate::metrics::DropReason;
use crate::session::NewSession;

/// A Register or Resume as it arrived.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hello {
    /// Its source.
    pub(crate) src: SocketAddr,
    /// Its size (bounds every answer).
    pub(crate) len: usize,
    /// Its request id.
    pub(crate) rid: u64,
}

impl Hello {
    fn error_to(&self) -> ErrorTo<'static> {
        ErrorTo::Source {
            src: self.src,
            req_len: self.len,
        }
    }
}

/// Refuses a Register or Resume while the node drains, naming an active node to go to when
/// one is known (a client then goes straight there instead of trying this one again).
fn draining(st: &State, h: Hello, out: &mut Outbox) {
    let to = st.cluster.as_ref().and_then(|c| {
        c.table()
            .pick_active(&c.id)
            .map(|n| n.public)
            .filter(|a| !a.ip().is_unspecified())
    });
    let msg = Message::Error(ErrorMsg {
        rid: h.rid,
        code: ErrorCode::Draining,
        to: to.map(Addr),
    });
    st.reply_bounded(h.src, h.len, &msg, out);
}

/// Per-IP limit for Register/Resume. Over the limit: a small Error (never larger than the
/// request), so honest clients back off and floods gain nothing.
fn allowed(st: &State, now: Instant, h: Hello, out: &mut Outbox) -> bool {
    if h.len < MIN_HELLO_LEN {
        st.metrics.drop(DropReason::Unpadded);
        return false;
    }
    if !st.register_limiter.check(st.sources.key(h.src), st.ns(now)) {
        st.metrics.rate_limited_source.increment(1);
        st.error(now, h.error_to(), h.rid, ErrorCode::RateLimited, out);
        return false;
    }
    true
}

/// Whether `h` may go on: yes when the node does not validate addresses now, or `token` is
/// valid for its source. Otherwise answers `Retry` with a fresh token (an invalid or expired
/// token is counted first: after a NAT rebinding between the two datagrams, the client pays
/// one more round trip) and returns false.
fn validated(st: &State, now: Instant, h: Hello, token: &[u8], out: &mut Outbox) -> bool {
    let needed = match st.settings.address_validation {
        AddressValidation::Never => false,
        AddressValidation::Always => true,
        AddressValidation::Pressure => st.under_pressure(now),
    };
    if !needed {
        return true;
    }
    let ns = st.ns(now);
    if !token.is_empty() {
        let m = &st.metrics;
        match st.tokens.check(token, h.src, ns) {
            Check::Valid => {
                m.validation_valid.increment(1);
                return true;
            }
            Check::Invalid => m.validation_invalid.increment(1),
            Check::Expired => m.validation_expired.increment(1),
        }
    }
    st.metrics.validation_retry_sent.increment(1);
    let msg = Message::Retry(Retry {
        rid: h.rid,
        token: st.tokens.issue(h.src, ns).to_vec(),
    });
    st.reply_bounded(h.src, h.len, &msg, out);
    false
}

/// Register: a new session with a fresh UUID and secret.
pub(crate) fn register(st: &State, now: Instant, h: Hello, m: proto::Register, out: &mut Outbox) {
    if h.len < MIN_HELLO_LEN {
        st.metrics.drop(DropReason::Unpadded);
        return;
    }
    // A retransmitted Register gets the session it already created: its UUID is derived from
    // the source, the request id and the time, so finding it needs no memory of its own.
    let epoch = st.ns(now) / st.settings.dedup_window.as_nanos().max(1) as u64;
    // Derived once: the UUID a new session gets is the one looked for first.
    let uuid = derived_uuid(st, h, epoch);
    let answered = |u: Uuid, out: &mut Outbox| {
        let Some(p) = st.sessions.peer(&u).filter(|p| p.addr == h.src) else {
            return false;
        };
        st.metrics.duplicates.increment(1);
        let msg = st.registered(h.rid, u, p.secret, h.src);
        st.reply_bounded(h.src, h.len, &msg, out);
        true
    };
    if answered(uuid, out) || (epoch > 0 && answered(derived_uuid(st, h, epoch - 1), out)) {
        return;
    }
    if !allowed(st, now, h, out) {
        return;
    }
    if st.is_draining() {
        draining(st, h, out);
        return;
    }
    if st.sessions.len() >= st.settings.max_sessions {
        st.metrics.capacity_refused.increment(1);
        st.error(now, h.error_to(), h.rid, ErrorCode::Capacity, out);
        return;
    }
    if !validated(st, now, h, &m.token, out) {
        return;
    }
    if !st.new_sessions.check(st.ns(now)) {
        st.metrics.rate_limited_new_sessions.increment(1);
        st.error(now, h.error_to(), h.rid, ErrorCode::RateLimited, out);
        return;
    }
    // Cluster mode: a secret any node can check when Redis and the session's node are both
    // gone (see `Cluster::session_secret`).
    let secret = match &st.cluster {
        Some(c) => Secret(c.session_secret(&uuid)),
        None => {
            let mut secret = [0u8; proto::SECRET_LEN];
            rand::thread_rng().fill_bytes(&mut secret);
            Secret(secret)
        }
    };
    let verifier = secret.verifier();
    let session = NewSession {
        secret,
        verifier,
        addr: h.src,
        local: m.local,
        rid: h.rid,
    };
    st.sessions.insert(uuid, session, now);
    st.publish(PresenceOp::Put(uuid, verifier));
    st.metrics.registered.increment(1);
    st.count_sessions();
    let msg = st.registered(h.rid, uuid, secret, h.src);
    st.reply_bounded(h.src, h.len, &msg, out);
}

/// Resume: takes back a session held here, or (cluster mode) asks the directory about one
/// held elsewhere.
pub(crate) fn resume(st: &State, now: Instant, h: Hello, m: proto::Resume, out: &mut Outbox) {
    if !allowed(st, now, h, out) {
        return;
    }
    // From the address the session has now: nothing moves, no proof needed.
    let from_current = st.sessions.peer(&m.uuid).is_some_and(|p| p.addr == h.src);
    if !from_current && !st.is_draining() && !validated(st, now, h, &m.token, out) {
        return;
    }
    let held = st.sessions.secret(&m.uuid);
    if held.is_none() && !st.is_draining() {
        // Its old node (draining) said it is coming, and with what secret: no lookup.
        if let Some((verifier, old)) = drain::take_expected(st, &m.uuid, &m.secret) {
            return take_over(st, now, h, m, verifier, old, out);
        }
    }
    match held {
        Some(s) if s.ct_eq(&m.secret) => {
            if st.is_draining() {
                // Still here while draining: the client was told to move; keep it moving.
                draining(st, h, out);
                return;
            }
            if !st.sessions.resume(&m.uuid, h.src, m.local, h.rid, now) {
                st.error(now, h.error_to(), h.rid, ErrorCode::Unauthorized, out);
                return;
            }
            st.metrics.resumed_local.increment(1);
            let msg = st.registered(h.rid, m.uuid, m.secret, h.src);
            st.reply_bounded(h.src, h.len, &msg, out);
        }
        Some(_) => st.error(now, h.error_to(), h.rid, ErrorCode::Unauthorized, out),
        None if st.is_draining() => draining(st, h, out),
        // The directory said moments ago it knows nothing of this UUID: no second lookup.
        None if st
            .cluster
            .as_ref()
            .is_some_and(|c| c.cached_presence(&m.uuid, now) == Some(None)) =>
        {
            st.error(now, h.error_to(), h.rid, ErrorCode::Unauthorized, out)
        }
        None if st.cluster.is_some() => {
            // Held elsewhere (or was): the presence directory can vouch for the secret.
            out.jobs.push(Job::Resume {
                src: h.src,
                req_len: h.len,
                msg: m,
            });
        }
        // Single-node mode cannot check the secret of a session it never held (the node
        // restarted, or the session expired): the client registers anew.
        None => st.error(now, h.error_to(), h.rid, ErrorCode::Unauthorized, out),
    }
}

/// Completes a Resume job with what the directory said.
pub(crate) fn complete_resume(
    st: &State,
    now: Instant,
    h: Hello,
    m: proto::Resume,
    found: ResumeLookup,
    out: &mut Outbox,
) {
    let (verifier, old) = match found {
        Ok(Some(v)) => v,
        Ok(None) => {
            if let Some(c) = &st.cluster {
                c.cache_presence(m.uuid, None, now);
            }
            return st.error(now, h.error_to(), h.rid, ErrorCode::Unauthorized, out);
        }
        Err(()) => return st.error(now, h.error_to(), h.rid, ErrorCode::RetryLater, out),
    };
    let ok: bool = subtle::ConstantTimeEq::ct_eq(&m.secret.verifier()[..], &verifier[..]).into();
    if !ok {
        return st.error(now, h.error_to(), h.rid, ErrorCode::Unauthorized, out);
    }
    take_over(st, now, h, m, verifier, old, out);
}

/// Takes a session held elsewhere (or nowhere) whose secret was checked against `verifier`;
/// `old` names the node that held it ("" for none).
pub(crate) fn take_over(
    st: &State,
    now: Instant,
    h: Hello,
    m: proto::Resume,
    verifier: [u8; 32],
    old: Arc<str>,
    out: &mut Outbox,
) {
    if st.is_draining() {
        // The drain began while the directory was asked: taking the session now would leave
        // it here untold (the drain walks the sessions it held when it began).
        return draining(st, h, out);
    }
    if st.sessions.len() >= st.settings.max_sessions {
        st.metrics.capacity_refused.increment(1);
        return st.error(now, h.error_to(), h.rid, ErrorCode::Capacity, out);
    }
    // No node-wide budget here: a Resume proved its secret against the directory (clients of
    // a draining or dead node arrive in a burst, and they are not a flood).
    let session = NewSession {
        secret: m.secret,
        verifier,
        addr: h.src,
        local: m.local.clone(),
        rid: h.rid,
    };
    st.sessions.insert(m.uuid, session, now);
    st.publish(PresenceOp::Put(m.uuid, verifier));
    if let Some(c) = &st.cluster {
        // By cause: migrate (the old node drains) or failover; may wait for the next table.
        c.count_resume(&old);
    }
    st.count_sessions();
    if let Some(c) = &st.cluster {
        c.cache_presence(m.uuid, Some(c.id.clone()), now);
        // Tell the old node to let go, so its drain finishes early and it stops answering
        // for this client.
        if *old != *c.id {
            if let Some(node) = c.node(&old) {
                let to = Remote {
                    node: node.id.as_str().into(),
                    addr: node.internal,
                };
                st.node_request(
                    now,
                    &to,
                    Body::Moved { uuid: m.uuid },
                    OnReply::Nothing,
                    out,
                );
            }
        }
    }
    let msg = st.registered(h.rid, m.uuid, m.secret, h.src);
    st.reply_bounded(h.src, h.len, &msg, out);
}

/// The UUID of the session a Register from `h` creates in dedup epoch `epoch`: a MAC of the
/// source, the request id and the epoch under this node's own random key, so it is as
/// unpredictable as a random UUID, and a retransmission finds the session it created.
fn derived_uuid(st: &State, h: Hello, epoch: u64) -> Uuid {
    let mut m = st.uuid_mac();
    match h.src.ip() {
        std::net::IpAddr::V4(ip) => m.update(&ip.octets()),
        std::net::IpAddr::V6(ip) => m.update(&ip.octets()),
    }
    m.update(&h.src.port().to_be_bytes());
    m.update(&h.rid.to_be_bytes());
    m.update(&epoch.to_be_bytes());
    let tag = m.finalize().into_bytes();
    let mut b = [0u8; 16];
    b.copy_from_slice(&tag[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}
