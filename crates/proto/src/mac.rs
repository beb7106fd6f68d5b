//! The MAC on authenticated types: HMAC-SHA256 keyed by the session secret, truncated.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::header::{peek_header, MAC_LEN};
use crate::types::Secret;

type HmacSha256 = Hmac<Sha256>;

pub(crate) fn mac_tag(key: &Secret, data: &[u8]) -> [u8; MAC_LEN] {
    // A 32-byte key is always a valid HMAC key.
    let mut m = <HmacSha256 as Mac>::new_from_slice(&key.0).expect("hmac takes any key length");
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut tag = [0u8; MAC_LEN];
    tag.copy_from_slice(&full[..MAC_LEN]);
    tag
}

/// Checks the MAC at the end of an authenticated datagram in constant time. Returns false for
/// unauthenticated types and short datagrams.
pub fn verify_mac(buf: &[u8], key: &Secret) -> bool {
    let Ok(h) = peek_header(buf) else {
        return false;
    };
    if !h.ty.is_authenticated() {
        return false;
    }
    let (data, tag) = buf.split_at(buf.len() - MAC_LEN);
    let expect = mac_tag(key, data);
    expect.ct_eq(tag).into()
}

#[cfg(test)]
mod tests {
    use crate::*;
    use uuid::Uuid;

    fn key() -> Secret {
        Secret([7; 32])
    }

    #[test]
    fn roundtrip_authenticated_and_mac_checks() {
        let m = Message::Heartbeat(Heartbeat {
            rid: 9,
            uuid: Uuid::from_u128(1),
        });
        let b = encode(&m, Some(&key())).unwrap();
        assert_eq!(decode(&b).unwrap(), m);
        assert!(verify_mac(&b, &key()));
        assert!(!verify_mac(&b, &Secret([8; 32])));
        let mut bad = b.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(!verify_mac(&bad, &key()));
    }
}
