//! Drain: every session is told, with a `Migrate` push, to resume on another node.

use std::net::SocketAddr;
use std::time::Instant;

use sigrouter_proto::{Addr, Message, Migrate};

use super::outbox::Outbox;
use super::state::State;

/// Pushes Migrate to every session: resume at `to()` (None: the same public address, from a
/// new local port). Returns how many were told.
pub(crate) fn migrate_all(
    st: &State,
    now: Instant,
    mut to: impl FnMut() -> Option<SocketAddr>,
    out: &mut Outbox,
) -> usize {
    let mut n = 0;
    for uuid in st.sessions.uuids() {
        let Some(target) = st.next_push(&uuid) else {
            continue;
        };
        let msg = Message::Migrate(Migrate {
            push: target.push,
            to: to().map(Addr),
        });
        st.push(now, target, msg, out);
        n += 1;
    }
    st.metrics.migrates.increment(n as u64);
    n
}
