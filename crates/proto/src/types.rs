//! Wire forms of the field types that are not plain MessagePack: socket addresses, session
//! secrets and opaque payloads.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::strict;

/// Length of a session secret.
pub const SECRET_LEN: usize = 32;

/// A socket address on the wire: MessagePack `bin` of 6 bytes (IPv4 address, port big-endian)
/// or 18 bytes (IPv6 address, port big-endian). Decodes from `bin` only, never `str` or an array.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addr(pub SocketAddr);

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Self {
        Self(a)
    }
}

impl Addr {
    /// The 6- or 18-byte wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = match self.0.ip() {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        v.extend_from_slice(&self.0.port().to_be_bytes());
        v
    }

    /// Parses the 6- or 18-byte wire form.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let ip = match b.len() {
            6 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            18 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&b[..16]);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return None,
        };
        let port = u16::from_be_bytes([b[b.len() - 2], b[b.len() - 1]]);
        Some(Self(SocketAddr::new(ip, port)))
    }
}

impl Serialize for Addr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The wire form built on the stack: encoding an answer allocates nothing.
        let mut b = [0u8; 18];
        let n = match self.0.ip() {
            IpAddr::V4(ip) => {
                b[..4].copy_from_slice(&ip.octets());
                4
            }
            IpAddr::V6(ip) => {
                b[..16].copy_from_slice(&ip.octets());
                16
            }
        };
        b[n..n + 2].copy_from_slice(&self.0.port().to_be_bytes());
        s.serialize_bytes(&b[..n + 2])
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        strict::bin(d, "a 6- or 18-byte address", Self::from_bytes)
    }
}

/// A 32-byte session secret, MessagePack `bin` 32 (only). Compared in constant time; never
/// printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret(pub [u8; SECRET_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// SHA-256 of the secret: what may be stored outside the owning node to validate a Resume.
    pub fn verifier(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"sigrouter-v1-resume");
        h.update(self.0);
        h.finalize().into()
    }

    /// Builds a secret from 32 bytes of randomness.
    pub fn from_bytes(b: [u8; SECRET_LEN]) -> Self {
        Self(b)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        strict::bin(d, "a 32-byte secret", |b| b.try_into().ok().map(Self))
    }
}

/// An opaque application payload, MessagePack `bin`, at most
/// [`MAX_PAYLOAD`](crate::MAX_PAYLOAD) bytes. The message structs decode it from `bin` only.
pub type Payload = serde_bytes::ByteBuf;

/// Deserializes a payload field: `bin` of any length (the limit is checked after decoding).
pub(crate) fn payload<'de, D: Deserializer<'de>>(d: D) -> Result<Payload, D::Error> {
    strict::bin(d, "payload", |b| Some(Payload::from(b.to_vec())))
}
