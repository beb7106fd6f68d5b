//! Telling STUN apart from this protocol on a shared port.

/// STUN magic cookie (RFC 8489 section 5).
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// True when a datagram looks like STUN: the two top bits of the first byte are zero and bytes
/// 4..8 hold the magic cookie. Our magic starts with 0x53 (top bits 01), so the two never clash.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= 20 && buf[0] & 0xC0 == 0 && buf[4..8] == STUN_MAGIC_COOKIE
}

#[cfg(test)]
mod tests {
    use crate::*;

    #[test]
    fn stun_demux() {
        let mut s = [0u8; 20];
        s[1] = 1;
        s[4..8].copy_from_slice(&STUN_MAGIC_COOKIE);
        assert!(is_stun(&s));
        assert!(!is_stun(b"SR\x01\x01................"));
    }
}
