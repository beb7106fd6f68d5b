//! Simulated packet loss, a test hook: a deterministic PRNG decides which datagrams to drop.

/// A seeded generator of drop decisions (SplitMix64).
#[derive(Clone, Debug)]
pub(crate) struct Loss {
    state: u64,
}

impl Loss {
    /// A generator with a fixed seed, so a lossy test drops the same datagrams every run.
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Whether to drop the next datagram, with probability `p` (0 never draws, 1 or more
    /// always drops).
    pub(crate) fn drop_next(&mut self, p: f64) -> bool {
        if p <= 0.0 || p.is_nan() {
            return false;
        }
        if p >= 1.0 {
            return true;
        }
        // 53 random bits to a float in [0, 1).
        let x = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        x < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_close_to_p_and_deterministic() {
        let mut a = Loss::new(42);
        let mut b = Loss::new(42);
        let n = 10_000;
        let mut dropped = 0;
        for _ in 0..n {
            let x = a.drop_next(0.3);
            assert_eq!(x, b.drop_next(0.3));
            dropped += usize::from(x);
        }
        let rate = dropped as f64 / n as f64;
        assert!((0.27..0.33).contains(&rate), "{rate}");
        assert!(!a.drop_next(0.0));
        assert!(a.drop_next(1.0));
    }
}
