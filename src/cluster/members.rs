//! The [`Cluster`]'s side of membership: runs the SWIM state machine (see [`super::membership`])
//! under its lock for one call at a time, wraps what it wants sent in envelopes, counts its
//! events and wakes the refresher when the view changes.

use std::net::SocketAddr;
use std::time::Instant;

use super::membership::{self, MemberError, MemberId, MemberView, Membership};
use super::{wire, Cluster, NodeInfo, Sends};

impl Cluster {
    /// Runs `f` on the membership, then takes what it wants sent (wrapped in envelopes),
    /// counts its events and wakes the refresher if the view changed. The lock is held for
    /// `f` and the takes only.
    fn with_membership<R>(&self, f: impl FnOnce(&mut Membership) -> R) -> (R, Sends) {
        let (r, swim, joins, events, changed, me, active) = {
            let mut m = self.lock_membership();
            let r = f(&mut m);
            (
                r,
                m.take_outbox(),
                m.take_joins(),
                m.take_events(),
                m.take_changed(),
                m.me().clone(),
                m.active_count(),
            )
        };
        let mut out = Vec::with_capacity(swim.len() + joins.len());
        for (to, data) in swim {
            match self.envelope(&to.id, None, wire::Body::Swim(data)) {
                Some((_, b)) => out.push((to.internal, b)),
                None => tracing::error!(to = %to.id, "a SWIM message does not fit a datagram"),
            }
        }
        for addr in joins {
            let body = wire::Body::Join { member: me.clone() };
            if let Some((_, b)) = self.envelope("", None, body) {
                out.push((addr, b));
            }
        }
        for e in events {
            match e {
                membership::Event::Up(id) => {
                    tracing::info!(node = %id, "member up");
                    self.metrics.peers.member_event(true);
                }
                membership::Event::Down(id) => {
                    tracing::info!(node = %id, "member down");
                    self.metrics.peers.member_event(false);
                }
            }
        }
        if changed {
            self.metrics.peers.members.set(active as f64);
            self.members_changed.notify_one();
        }
        (r, out)
    }

    /// Handles a SWIM message from node `from` (authenticated by its envelope).
    pub fn membership_handle(
        &self,
        now: Instant,
        from: &str,
        data: &[u8],
    ) -> (Result<(), MemberError>, Sends) {
        self.with_membership(|m| m.handle(now, from, data))
    }

    /// A node that knows only our address asked us to announce ourselves.
    pub fn membership_join(&self, now: Instant, member: MemberId) -> Sends {
        self.with_membership(|m| m.announce(now, member)).1
    }

    /// Membership timers and metadata broadcasts due at `now`, and anything queued since the
    /// last call (seeds, joins).
    pub fn membership_tick(&self, now: Instant, sessions: u64) -> Sends {
        let behind = self.presence_behind();
        self.with_membership(|m| {
            m.set_unpublished(now, behind);
            m.tick(now, sessions)
        })
        .1
    }

    /// Leaves the cluster (end of drain, shutdown): a few members hear it at once.
    pub fn membership_leave(&self, now: Instant) -> Sends {
        self.with_membership(|m| m.leave(now)).1
    }

    /// Seeds membership with the registry's nodes (sent at the next tick).
    pub fn membership_seed(&self, now: Instant, nodes: &[NodeInfo]) {
        self.lock_membership().seed(now, nodes);
    }

    /// Asks the nodes at `addrs` to announce themselves (sent at the next tick).
    pub fn membership_join_addrs(&self, addrs: &[SocketAddr]) {
        self.lock_membership().join(addrs);
    }

    /// Active members other than this node.
    pub fn membership_active(&self) -> usize {
        self.lock_membership().active_count()
    }

    /// The membership view, for the refresher's merge.
    pub fn membership_view(&self) -> Vec<MemberView> {
        self.lock_membership().view()
    }

    /// Waits until the membership view changes (refresher only).
    pub(crate) async fn members_changed(&self) {
        self.members_changed.notified().await;
    }
}
