//! Drain: every session is told, with a `Migrate` push, to resume on another node. The drain
//! task walks the sessions in paced slices; each session gets one Migrate, with one push id,
//! retransmitted until acknowledged; if it was given up unacknowledged, telling the session
//! again sends the same push id (and the same target), so a client sees one move, however many
//! times it is told.

use std::net::SocketAddr;
use std::time::Instant;

use sigrouter_proto::{Addr, Message, Migrate};
use uuid::Uuid;

use super::outbox::Outbox;
use super::state::{PushTarget, State};

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
        let msg = Message::Migrate(Migrate { push: t.push, to });
        st.push(now, t, msg, out);
        n += 1;
    }
    st.metrics.migrates.increment(n as u64);
    n
}
