//! The anti-replay window of a session, as DTLS (RFC 6347 §4.1.2.6) and IPsec ESP (RFC 4303
//! §3.4.3) keep it: the highest request id seen and a bitmap of the [`WINDOW`] ids at and
//! below it. An id above the window is new (and slides it); an id inside is new once, then a
//! duplicate; an id below is a stale replay. The router remembers answers for exactly the ids
//! this window can still call duplicates, so the window we accept and the memory that
//! deduplicates are the same size.

/// How many request ids below the newest are still accepted (once each).
pub(crate) const WINDOW: u64 = 128;

/// What a request id is, seen by the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not seen before; `newest` when it is the highest so far (only those may move the
    /// session's address).
    New {
        /// Highest id so far.
        newest: bool,
    },
    /// Seen before, inside the window: a retransmission (or a replay).
    Duplicate,
    /// Below the window: too old to tell, dropped.
    Stale,
}

/// Highest id seen and a bitmap: bit `i` set means id `top - i` was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReplayWindow {
    top: u64,
    bits: [u64; 2],
}

impl ReplayWindow {
    /// A window whose only id seen is `rid` (the Register or Resume that opened the session).
    pub(crate) fn starting_at(rid: u64) -> Self {
        Self {
            top: rid,
            bits: [1, 0],
        }
    }

    /// The highest id seen.
    #[cfg(test)]
    pub(crate) fn top(&self) -> u64 {
        self.top
    }

    /// Whether `rid` is still inside the window (retransmissions of it can be told apart).
    pub(crate) fn covers(&self, rid: u64) -> bool {
        rid <= self.top && self.top - rid < WINDOW
    }

    fn bit(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64) {
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
    }

    fn slide(&mut self, by: u64) {
        let v = (u128::from(self.bits[1]) << 64) | u128::from(self.bits[0]);
        let v = if by >= WINDOW { 0 } else { v << by };
        self.bits = [v as u64, (v >> 64) as u64];
    }

    /// Classifies `rid` and records it as seen.
    pub(crate) fn check(&mut self, rid: u64) -> Seen {
        if rid > self.top {
            self.slide(rid - self.top);
            self.top = rid;
            self.set(0);
            return Seen::New { newest: true };
        }
        let back = self.top - rid;
        if back >= WINDOW {
            return Seen::Stale;
        }
        if self.bit(back) {
            return Seen::Duplicate;
        }
        self.set(back);
        Seen::New { newest: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_once_then_duplicate_then_stale() {
        let mut w = ReplayWindow::starting_at(10);
        assert_eq!(w.check(10), Seen::Duplicate);
        assert_eq!(w.check(12), Seen::New { newest: true });
        assert_eq!(w.check(11), Seen::New { newest: false });
        assert_eq!(w.check(11), Seen::Duplicate);
        assert_eq!(w.check(12), Seen::Duplicate);
        assert_eq!(w.check(12 + WINDOW - 1), Seen::New { newest: true });
        // 12 is now the oldest id inside the window: still known.
        assert_eq!(w.check(12), Seen::Duplicate);
        assert_eq!(w.check(11), Seen::Stale);
        assert!(w.covers(12) && !w.covers(11));
    }

    #[test]
    fn a_jump_past_the_window_forgets_everything_below() {
        let mut w = ReplayWindow::starting_at(1);
        assert_eq!(w.check(1 + 1000), Seen::New { newest: true });
        assert_eq!(w.check(1000), Seen::New { newest: false });
        assert_eq!(w.check(1), Seen::Stale);
        assert_eq!(w.top(), 1001);
    }

    #[test]
    fn the_bitmap_crosses_its_word_boundary() {
        let mut w = ReplayWindow::starting_at(100);
        for rid in 101..=200 {
            assert_eq!(w.check(rid), Seen::New { newest: true });
        }
        for rid in 100..=200 {
            assert_eq!(w.check(rid), Seen::Duplicate, "{rid}");
        }
        // Never seen, still inside the window (128 ids: 73..=200): new once.
        assert_eq!(w.check(73), Seen::New { newest: false });
        assert_eq!(w.check(73), Seen::Duplicate);
        assert_eq!(w.check(72), Seen::Stale);
    }
}
