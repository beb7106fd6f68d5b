//! Drain: every session is told, with a `Migrate` push, to resume on another node. The drain
//! task walks the sessions in paced slices; each session gets one Migrate, with one push id,
//! retransmitted until acknowledged; if it was given up unacknowledged, telling the session
//! again sends the same push id (and the same target), so a client sees one move, however many
//! times it is told.
//!
//! With the Migrates that send clients to a node, the drain sends that node their verifiers
//! (`Expect`), so it takes their Resumes at once, without a Redis lookup: a drain of a million
//! sessions then costs Redis no read per client, and the receiving nodes no deferred job.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use sigrouter_proto::{Addr, Message, Migrate, Secret};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::outbox::Outbox;
use super::state::{Expected, PushTarget, State};
use crate::cluster::wire::{Body, ExpectedSession, MAX_EXPECT};

/// Most clients a node waits for on other nodes' word at once; past that, a Resume costs a
/// lookup as usual.
const MAX_EXPECTED: usize = 262_144;

/// Node `from` (draining) says these clients are on their way here.
pub(crate) fn expect(st: &State, now: Instant, from: &str, sessions: &[ExpectedSession]) {
    if st.is_draining() || st.expected.len() >= MAX_EXPECTED {
        return;
    }
    let from: Arc<str> = from.into();
    for e in sessions.iter().take(MAX_EXPECT) {
        st.expected.insert(
            e.uuid,
            Expected {
                verifier: e.verifier,
                from: from.clone(),
                at: now,
            },
        );
        st.expected_ages.written(e.uuid, now);
    }
}

/// The verifier and old node of client `uuid` if another node said it is coming and `secret`
/// is its secret, checked here (the entry is then used up; a wrong secret leaves it).
pub(crate) fn take_expected(
    st: &State,
    uuid: &Uuid,
    secret: &Secret,
) -> Option<([u8; 32], Arc<str>)> {
    if st.expected.is_empty() {
        return None;
    }
    let v = secret.verifier();
    let (_, e) = st
        .expected
        .remove_if(uuid, |_, e| bool::from(e.verifier[..].ct_eq(&v[..])))?;
    st.metrics.resumed_expected.increment(1);
    Some((e.verifier, e.from))
}

/// Expect datagrams for the clients sent to each node, by the node's public address.
#[derive(Default)]
struct Expects {
    by_target: HashMap<SocketAddr, Vec<ExpectedSession>>,
}

impl Expects {
    fn add(&mut self, st: &State, uuid: Uuid, to: Option<Addr>) {
        let (Some(to), Some(verifier)) = (to, st.sessions.verifier(&uuid)) else {
            return;
        };
        self.by_target
            .entry(to.0)
            .or_default()
            .push(ExpectedSession { uuid, verifier });
    }

    /// Sends them to the node each public address names (none where several nodes share one,
    /// as behind a proxy: who gets the client is then the proxy's choice).
    fn send(self, st: &State, out: &mut Outbox) {
        let Some(c) = &st.cluster else {
            return;
        };
        if self.by_target.is_empty() {
            return;
        }
        let table = c.table();
        for (public, sessions) in self.by_target {
            let mut named = table.iter().filter(|n| n.public == public);
            let (Some(node), None) = (named.next(), named.next()) else {
                continue;
            };
            for chunk in sessions.chunks(MAX_EXPECT) {
                let body = Body::Expect {
                    sessions: chunk.to_vec(),
                };
                if let Some((_, bytes)) = c.envelope(&node.id, None, body) {
                    out.send_node(node.internal, bytes);
                }
            }
        }
    }
}

/// Tells each of `uuids` still here to resume at `to()` (None: the same public address, from a
/// new local port). Skips a session whose Migrate is still being retransmitted. Returns how
/// many Migrates were sent.
pub(crate) fn migrate(
    st: &State,
    now: Instant,
    uuids: &[Uuid],
    mut to: impl FnMut() -> Option<SocketAddr>,
    out: &mut Outbox,
) -> usize {
    let mut n = 0;
    let mut expects = Expects::default();
    for uuid in uuids {
        let told = st.migrations.get(uuid).map(|e| *e);
        let target = match told {
            Some((push, _)) if st.pushes.contains(&(*uuid, push)) => continue,
            Some((push, to)) => {
                let Some(p) = st.sessions.peer(uuid) else {
                    continue;
                };
                let t = PushTarget {
                    uuid: *uuid,
                    push,
                    secret: p.secret,
                    addr: p.addr,
                };
                (t, to)
            }
            None => {
                let Some(t) = st.next_push(uuid) else {
                    continue;
                };
                let to = to().map(Addr);
                st.migrations.insert(*uuid, (t.push, to));
                (t, to)
            }
        };
        let (t, to) = target;
        expects.add(st, *uuid, to);
        let msg = Message::Migrate(Migrate { push: t.push, to });
        st.push(now, t, msg, out);
        n += 1;
    }
    expects.send(st, out);
    st.metrics.migrates.increment(n as u64);
    n
}
