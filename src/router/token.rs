//! Address-validation tokens: the stateless proof, as in QUIC's Retry, that the source of a
//! `Register` or `Resume` receives datagrams at the address it claims.
//!
//! A token is 21 bytes, opaque to clients:
//!
//! ```text
//! +--------+----------------------+--------------------------------------------+
//! | format | issued (u32, BE)     | tag: HMAC-SHA256(key, format | issued |    |
//! | 0x01   | seconds of the node's| ip as 16 bytes (IPv4 mapped) | port BE), |
//! |        | clock                | first 16 bytes                             |
//! +--------+----------------------+--------------------------------------------+
//! ```
//!
//! The key is a random node secret that rotates every [`ROTATION`]: the one of the period the
//! token was issued in checks it, so the current and the previous secret are kept. A token is
//! valid for [`LIFETIME`] after it was issued (never longer than two rotation periods), from
//! the same IP address **and port** only; nothing is stored per token, and checking one costs
//! one HMAC. The clock is the router's (`now` since the router was built), so tokens behave
//! the same under the simulated time of the router's tests, and no token outlives the
//! process.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Length of a token.
pub const TOKEN_LEN: usize = 1 + 4 + TAG_LEN;
/// How often the node secret changes; the previous one is still accepted.
pub const ROTATION: Duration = Duration::from_secs(60);
/// How long a token is accepted after it was issued.
pub const LIFETIME: Duration = Duration::from_secs(60);

const FORMAT: u8 = 1;
const TAG_LEN: usize = 16;
const NS: u64 = 1_000_000_000;
/// A token issued up to this far "in the future" is accepted: two threads may read the clock
/// a little apart, and issuing rounds up to the current secret's period.
const SKEW_SECS: u64 = 2;

// The rules above, checked when the crate compiles: the secret that signed a token is still
// held for as long as the token is valid, and a token fits the protocol's limit.
const _: () = {
    assert!(LIFETIME.as_secs() <= ROTATION.as_secs());
    assert!(TOKEN_LEN <= sigrouter_proto::MAX_TOKEN);
};

/// What checking a token found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Issued by this node, to this address and port, less than [`LIFETIME`] ago.
    Valid,
    /// Issued by this node but too long ago (or its secret is gone).
    Expired,
    /// Not a token of this node for this address and port (forged, another address or port,
    /// another node or process, damaged).
    Invalid,
}

impl Check {
    /// The metric label of the outcome.
    pub fn name(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Expired => "expired",
            Self::Invalid => "invalid",
        }
    }
}

/// The secrets of one rotation period and the one before.
struct Keys {
    /// The rotation period (seconds of the node's clock / [`ROTATION`]) of `cur`.
    period: u64,
    cur: Hmac<Sha256>,
    /// The secret of `period - 1`, if this node had one.
    prev: Option<Hmac<Sha256>>,
}

fn random_key() -> Hmac<Sha256> {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    <Hmac<Sha256> as Mac>::new_from_slice(&k).expect("HMAC takes any key length")
}

/// The node's token issuer and checker. Lock-free: the secrets sit behind an `ArcSwap`, and
/// the first request of a new period installs the next secret.
pub struct Tokens {
    keys: ArcSwap<Keys>,
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokens {
    /// A fresh random secret for period 0.
    pub fn new() -> Self {
        Self {
            keys: ArcSwap::from_pointee(Keys {
                period: 0,
                cur: random_key(),
                prev: None,
            }),
        }
    }

    /// The secrets for `period`, rotated first if it is a new one.
    fn keys(&self, period: u64) -> Arc<Keys> {
        let k = self.keys.load_full();
        if period <= k.period {
            return k;
        }
        self.keys.rcu(|k| {
            if period <= k.period {
                return Arc::clone(k);
            }
            Arc::new(Keys {
                period,
                cur: random_key(),
                prev: (period == k.period + 1).then(|| k.cur.clone()),
            })
        });
        self.keys.load_full()
    }

    fn tag(key: &Hmac<Sha256>, issued: u32, src: SocketAddr) -> [u8; TAG_LEN] {
        let mut m = key.clone();
        let ip = match src.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        m.update(&[FORMAT]);
        m.update(&issued.to_be_bytes());
        m.update(&ip);
        m.update(&src.port().to_be_bytes());
        let full = m.finalize().into_bytes();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }

    /// A token for `src`, issued at `now_ns` (nanoseconds of the router's clock).
    pub fn issue(&self, src: SocketAddr, now_ns: u64) -> [u8; TOKEN_LEN] {
        let mut secs = now_ns / NS;
        let period = secs / ROTATION.as_secs();
        let keys = self.keys(period);
        if keys.period > period {
            // Another thread, a moment ahead, rotated already: issue in its period.
            secs = keys.period * ROTATION.as_secs();
        }
        let issued = u32::try_from(secs).unwrap_or(u32::MAX);
        let mut t = [0u8; TOKEN_LEN];
        t[0] = FORMAT;
        t[1..5].copy_from_slice(&issued.to_be_bytes());
        t[5..].copy_from_slice(&Self::tag(&keys.cur, issued, src));
        t
    }

    /// Checks a token that `src` sent at `now_ns`.
    pub fn check(&self, token: &[u8], src: SocketAddr, now_ns: u64) -> Check {
        if token.len() != TOKEN_LEN || token[0] != FORMAT {
            return Check::Invalid;
        }
        let issued = u32::from_be_bytes([token[1], token[2], token[3], token[4]]);
        let now = now_ns / NS;
        if u64::from(issued) > now + SKEW_SECS {
            return Check::Invalid;
        }
        let issued_period = u64::from(issued) / ROTATION.as_secs();
        let keys = self.keys(now / ROTATION.as_secs());
        let key = if issued_period == keys.period {
            Some(&keys.cur)
        } else if issued_period + 1 == keys.period {
            keys.prev.as_ref()
        } else {
            None
        };
        // The secret of its period is gone: too old to authenticate, counted as expired. With
        // a secret, the tag is checked before the age, so a forged token counts as invalid.
        let Some(key) = key else {
            return Check::Expired;
        };
        let ok: bool = Self::tag(key, issued, src).ct_eq(&token[5..]).into();
        if !ok {
            return Check::Invalid;
        }
        if now.saturating_sub(u64::from(issued)) >= LIFETIME.as_secs() {
            return Check::Expired;
        }
        Check::Valid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const S: u64 = NS;

    #[test]
    fn bound_to_address_port_and_time() {
        let t = Tokens::new();
        let src = a("192.0.2.1:4000");
        let tok = t.issue(src, 10 * S);
        assert_eq!(t.check(&tok, src, 10 * S), Check::Valid);
        assert_eq!(t.check(&tok, src, 69 * S), Check::Valid);
        assert_eq!(t.check(&tok, src, 70 * S), Check::Expired);
        assert_eq!(t.check(&tok, a("192.0.2.1:4001"), 11 * S), Check::Invalid);
        assert_eq!(t.check(&tok, a("192.0.2.2:4000"), 11 * S), Check::Invalid);
        assert_eq!(
            t.check(&tok, a("[::ffff:192.0.2.1]:4000"), 11 * S),
            Check::Valid
        );
        let mut bad = tok;
        bad[20] ^= 1;
        assert_eq!(t.check(&bad, src, 11 * S), Check::Invalid);
        // Moving the issue time forward (to live longer) breaks the tag.
        let mut later = tok;
        later[4] += 30;
        assert_eq!(t.check(&later, src, 45 * S), Check::Invalid);
        assert_eq!(t.check(&tok[..20], src, 11 * S), Check::Invalid);
        assert_eq!(t.check(&[], src, 11 * S), Check::Invalid);
        // Another node (or the same one after a restart) has other secrets.
        assert_eq!(Tokens::new().check(&tok, src, 11 * S), Check::Invalid);
    }

    #[test]
    fn the_previous_secret_is_accepted_then_forgotten() {
        let t = Tokens::new();
        let src = a("[2001:db8::1]:5000");
        let tok = t.issue(src, 59 * S);
        assert_eq!(t.check(&tok, src, 61 * S), Check::Valid);
        assert_eq!(t.check(&tok, src, 118 * S), Check::Valid);
        assert_eq!(t.check(&tok, src, 119 * S), Check::Expired);
        // Two rotations later the secret that signed it is gone.
        assert_eq!(t.check(&tok, src, 121 * S), Check::Expired);
        // A node idle for several periods keeps no stale previous secret.
        let t = Tokens::new();
        let old = t.issue(src, S);
        assert_eq!(t.check(&old, src, 500 * S), Check::Expired);
        let fresh = t.issue(src, 500 * S);
        assert_eq!(t.check(&fresh, src, 501 * S), Check::Valid);
    }
}
