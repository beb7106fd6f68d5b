//! The anti-replay window of a session, as DTLS (RFC 6347 §4.1.2.6) and IPsec ESP (RFC 4303
//! §3.4.3) keep it: the highest request id seen and a bitmap of the [`WINDOW`] ids at and
//! below it. An id above the window is new (and slides it); an id inside is new once, then a
//! duplicate; an id below is a stale replay. The router remembers answers for exactly the ids
//! this window can still call duplicates, so the window we accept and the memory that
//! deduplicates are the same size.

/// How many request ids below the newest are still accepted (once each). A client may have a
/// burst of requests in flight (the session rate limit's burst is 200) and retransmits each
/// with its id: the window covers them all.
pub(crate) const WINDOW: u64 = 256;
const WORDS: usize = (WINDOW / 64) as usize;

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
    bits: [u64; WORDS],
}

impl ReplayWindow {
    /// A window whose only id seen is `rid` (the Register or Resume that opened the session).
    pub(crate) fn starting_at(rid: u64) -> Self {
        let mut bits = [0; WORDS];
        bits[0] = 1;
        Self { top: rid, bits }
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

    /// Shifts the bitmap towards older ids by `by` (bits past the window fall off).
    fn slide(&mut self, by: u64) {
        if by >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let (words, shift) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.bits[j]);
            let carry = match (shift, i.checked_sub(words + 1)) {
                (0, _) | (_, None) => 0,
                (s, Some(j)) => self.bits[j] >> (64 - s),
            };
            self.bits[i] = lo.checked_shl(shift).unwrap_or(0) | carry;
        }
    }

    /// Classifies `rid` without recording it.
    pub(crate) fn peek(&self, rid: u64) -> Seen {
        if rid > self.top {
            return Seen::New { newest: true };
        }
        let back = self.top - rid;
        if back >= WINDOW {
            Seen::Stale
        } else if self.bit(back) {
            Seen::Duplicate
        } else {
            Seen::New { newest: false }
        }
    }

    /// Records `rid` as seen (a no-op for a stale one).
    pub(crate) fn mark(&mut self, rid: u64) {
        if rid > self.top {
            self.slide(rid - self.top);
            self.top = rid;
            self.set(0);
        } else if self.top - rid < WINDOW {
            self.set(self.top - rid);
        }
    }

    /// Classifies `rid` and records it as seen.
    #[cfg(test)]
    pub(crate) fn check(&mut self, rid: u64) -> Seen {
        let seen = self.peek(rid);
        self.mark(rid);
        seen
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
    fn the_bitmap_crosses_its_word_boundaries() {
        let mut w = ReplayWindow::starting_at(1000);
        for rid in 1001..=1100 {
            assert_eq!(w.check(rid), Seen::New { newest: true });
        }
        for rid in 1000..=1100 {
            assert_eq!(w.check(rid), Seen::Duplicate, "{rid}");
        }
        // Never seen, still inside the window: new once.
        let oldest = 1100 - (WINDOW - 1);
        assert_eq!(w.check(oldest), Seen::New { newest: false });
        assert_eq!(w.check(oldest), Seen::Duplicate);
        assert_eq!(w.check(oldest - 1), Seen::Stale);
        // Every bit survives a slide by any amount, across every word boundary.
        for by in 1..WINDOW + 2 {
            let mut w = ReplayWindow::starting_at(1000);
            for rid in 1000 - (WINDOW - 1)..=1000 {
                w.check(rid);
            }
            w.check(1000 + by);
            for rid in 1000 + by - (WINDOW - 1)..=1000 {
                assert_eq!(w.peek(rid), Seen::Duplicate, "slide {by}, rid {rid}");
            }
            for rid in (1001..1000 + by).filter(|r| 1000 + by - r < WINDOW) {
                assert_eq!(
                    w.peek(rid),
                    Seen::New { newest: false },
                    "slide {by}, rid {rid}"
                );
            }
        }
    }
}
