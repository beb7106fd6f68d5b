//! Where to take the session next: the order in which the client tries router addresses when
//! it has to (re)establish the session somewhere. Pure: no clock, no I/O.
//!
//! A walk goes in rounds. The first round tries, each once: the address a router named (a
//! `Migrate` target, or the `to` of an `Error Draining`), then the configured servers, then
//! addresses routers named before; the address being left (a draining or silent node) comes
//! last, so it is tried only when nothing else is known. An address that answers `Draining`
//! (or `Capacity`) is not tried again in that round; the address it names, if any, is tried
//! next. When a round is over without success the caller pauses and starts the next round, in
//! which every address is tried again (a drained node may be back, upgraded, by then).

use std::collections::VecDeque;
use std::net::SocketAddr;

/// Redirects (`Error Draining` naming an address) followed in one round: bounds a ping-pong
/// between routers whose views of the cluster disagree.
const MAX_REDIRECTS_PER_ROUND: u32 = 8;

/// Addresses in the order to try them; see the module documentation.
#[derive(Clone, Debug)]
pub(crate) struct Walk {
    /// What is left of this round, next first.
    round: VecDeque<SocketAddr>,
    /// Every address, in the order later rounds try them.
    all: Vec<SocketAddr>,
    /// Addresses that said `Draining` (or `Capacity`) this round.
    refused: Vec<SocketAddr>,
    /// Addresses tried this round, in order (repeats after a redirect included).
    tried: Vec<SocketAddr>,
    redirects: u32,
}

fn push_new(v: &mut Vec<SocketAddr>, a: SocketAddr) {
    if !v.contains(&a) {
        v.push(a);
    }
}

impl Walk {
    /// A walk that starts at `first` (named by a router), then `servers` (configured, in
    /// order), then `told` (named by routers before, most recent first); `leaving` (the node
    /// the client is moving away from) comes last in the first round, unless a router named
    /// it as `first` (a load balancer's address is both).
    pub(crate) fn new(
        first: Option<SocketAddr>,
        leaving: Option<SocketAddr>,
        servers: &[SocketAddr],
        told: &[SocketAddr],
    ) -> Self {
        let mut all = Vec::new();
        for a in first.iter().chain(servers).chain(told) {
            push_new(&mut all, *a);
        }
        if let Some(l) = leaving {
            push_new(&mut all, l);
        }
        let mut round: VecDeque<SocketAddr> = all.iter().copied().collect();
        if let Some(l) = leaving.filter(|l| Some(*l) != first) {
            round.retain(|a| *a != l);
            round.push_back(l);
        }
        Self {
            round,
            all,
            refused: Vec::new(),
            tried: Vec::new(),
            redirects: 0,
        }
    }

    /// The next address to try this round; `None` when the round is over.
    pub(crate) fn next(&mut self) -> Option<SocketAddr> {
        let a = self.round.pop_front()?;
        self.tried.push(a);
        Some(a)
    }

    /// `from` said it takes no sessions (`Draining` or `Capacity`), naming `to` or nothing.
    /// `from` is not tried again this round; `to` is tried next, unless it too refused this
    /// round (a redirect to the very address that answered is followed: that address is a
    /// load balancer, and the next try, from a new local port, may reach another node).
    pub(crate) fn refused(&mut self, from: SocketAddr, to: Option<SocketAddr>) {
        push_new(&mut self.refused, from);
        self.round.retain(|a| *a != from);
        let Some(to) = to else { return };
        if (to != from && self.refused.contains(&to)) || self.redirects >= MAX_REDIRECTS_PER_ROUND {
            return;
        }
        self.redirects += 1;
        self.round.retain(|a| *a != to);
        self.round.push_front(to);
        push_new(&mut self.all, to);
    }

    /// The addresses tried this round, in order.
    pub(crate) fn tried(&self) -> &[SocketAddr] {
        &self.tried
    }

    /// Starts the next round: every address again, in the order of [`Walk::new`] without the
    /// special place of the address being left.
    pub(crate) fn next_round(&mut self) {
        self.round = self.all.iter().copied().collect();
        self.refused.clear();
        self.tried.clear();
        self.redirects = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn drain(w: &mut Walk) -> Vec<u16> {
        std::iter::from_fn(|| w.next()).map(|x| x.port()).collect()
    }

    #[test]
    fn named_address_first_then_servers_then_told_and_the_one_left_last() {
        let mut w = Walk::new(Some(a(9)), Some(a(1)), &[a(1), a(2), a(3)], &[a(7), a(2)]);
        assert_eq!(drain(&mut w), [9, 2, 3, 7, 1]);
        w.next_round();
        assert_eq!(drain(&mut w), [9, 1, 2, 3, 7]);
    }

    #[test]
    fn a_load_balancer_named_as_target_is_not_put_last() {
        // Migrate{to: the proxy} from the proxy's address.
        let mut w = Walk::new(Some(a(5)), Some(a(5)), &[a(5)], &[]);
        assert_eq!(drain(&mut w), [5]);
        // The only address, and it is being left: still tried.
        let mut w = Walk::new(None, Some(a(5)), &[a(5)], &[]);
        assert_eq!(drain(&mut w), [5]);
    }

    #[test]
    fn a_draining_address_is_skipped_for_the_round_and_its_redirect_followed() {
        let mut w = Walk::new(None, None, &[a(1), a(2), a(3)], &[]);
        assert_eq!(w.next(), Some(a(1)));
        // 1 is draining and names 3: 3 next, then 2; 1 never again this round.
        w.refused(a(1), Some(a(3)));
        assert_eq!(w.next(), Some(a(3)));
        // 3 is draining too and names 1, which already refused: not followed.
        w.refused(a(3), Some(a(1)));
        assert_eq!(drain(&mut w), [2]);
        assert_eq!(
            w.tried().iter().map(|x| x.port()).collect::<Vec<_>>(),
            [1, 3, 2]
        );
        // The next round tries everything again (a drained node may be back).
        w.next_round();
        assert_eq!(drain(&mut w), [1, 2, 3]);
    }

    #[test]
    fn a_redirect_to_a_new_address_is_remembered_for_later_rounds() {
        let mut w = Walk::new(None, None, &[a(1)], &[]);
        assert_eq!(w.next(), Some(a(1)));
        w.refused(a(1), Some(a(4)));
        assert_eq!(drain(&mut w), [4]);
        w.next_round();
        assert_eq!(drain(&mut w), [1, 4]);
    }

    #[test]
    fn redirects_to_the_answering_address_are_bounded() {
        let mut w = Walk::new(None, None, &[a(5)], &[]);
        let mut n = 0;
        while let Some(x) = w.next() {
            n += 1;
            w.refused(x, Some(x));
        }
        assert_eq!(n, 1 + MAX_REDIRECTS_PER_ROUND);
    }
}
