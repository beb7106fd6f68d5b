//! Retransmission and retry schedules. Pure: no clock, no I/O.

use std::time::Duration;

use rand::Rng;

/// A doubling delay with a cap: `initial, 2*initial, 4*initial, ..., max, max, ...`.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// A schedule starting at `initial` and never exceeding `max` (nor going below 1 ms).
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            next: initial.min(max.max(initial)),
            max: max.max(initial),
        }
    }

    /// The pause before retrying a request the server refused for now (rate limited, draining,
    /// retry later): longer than a retransmission, since the server asked us to slow down.
    pub(crate) fn retry() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(2))
    }

    /// The pause between attempts to get back online (re-home, migrate): up to 10 s.
    pub(crate) fn reconnect() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(10))
    }

    /// The next delay; the one after it doubles, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    /// The next delay scaled by a random factor in [0.5, 1.5), so that many clients told to
    /// back off at the same moment (a draining node) do not all come back together.
    pub(crate) fn next_jittered(&mut self) -> Duration {
        let d = self.next_delay();
        d.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(ms(250), ms(2000));
        let got: Vec<_> = (0..7).map(|_| b.next_delay()).collect();
        assert_eq!(
            got,
            [250, 500, 1000, 2000, 2000, 2000, 2000].map(ms).to_vec()
        );
    }

    #[test]
    fn cap_below_initial_is_raised_and_zero_is_clamped() {
        let mut b = Backoff::new(ms(300), ms(100));
        assert_eq!(b.next_delay(), ms(300));
        assert_eq!(b.next_delay(), ms(300));
        let mut z = Backoff::new(Duration::ZERO, ms(4));
        assert_eq!(
            (0..4).map(|_| z.next_delay()).collect::<Vec<_>>(),
            [1, 2, 4, 4].map(ms).to_vec()
        );
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        let mut b = Backoff::new(ms(1000), ms(1000));
        for _ in 0..200 {
            let d = b.next_jittered();
            assert!(d >= ms(500) && d < ms(1500), "{d:?}");
        }
    }
}
