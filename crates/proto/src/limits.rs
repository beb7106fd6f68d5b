//! Size limits: the datagram size, the hello padding, and the limits on fields that
//! MessagePack alone does not bound.

use crate::messages::Message;
use crate::types::{Addr, Payload};

/// Largest datagram either side may send or accept.
pub const MAX_DATAGRAM: usize = 1200;
/// Smallest `Register` or `Resume` datagram the server answers. The client pads up to it, so the
/// answer (at most this long) is never larger than the request: no amplification.
pub const MIN_HELLO_LEN: usize = 256;
/// Largest opaque payload in `Connect`, `Accept`, `Reject` and `Signal`.
pub const MAX_PAYLOAD: usize = 1024;
/// Most local addresses a client may announce.
pub const MAX_LOCAL_ADDRS: usize = 4;
/// Most UUIDs in one `Query`.
pub const MAX_QUERY: usize = 32;

impl Message {
    /// Checks the limits that MessagePack alone does not enforce.
    pub(crate) fn check_limits(&self) -> bool {
        let p = |p: &Payload| p.len() <= MAX_PAYLOAD;
        let l = |l: &[Addr]| l.len() <= MAX_LOCAL_ADDRS;
        match self {
            Self::Register(m) => l(&m.local),
            Self::Resume(m) => l(&m.local),
            Self::Query(m) => m.uuids.len() <= MAX_QUERY,
            Self::QueryResult(m) => m.online.len() <= MAX_QUERY,
            Self::Connect(m) => p(&m.payload),
            Self::Accept(m) | Self::Reject(m) => p(&m.payload),
            Self::Signal(m) => p(&m.payload),
            Self::Connected(m) => p(&m.payload) && l(&m.local),
            Self::ConnectFailed(m) => p(&m.payload),
            Self::Incoming(m) => p(&m.payload) && l(&m.local),
            Self::SignalPush(m) => p(&m.payload),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::*;
    use uuid::Uuid;

    fn key() -> Secret {
        Secret([7; 32])
    }

    #[test]
    fn oversized_payload_is_out_of_range() {
        let m = Message::Signal(Signal {
            rid: 1,
            uuid: Uuid::nil(),
            connection: Uuid::nil(),
            payload: Payload::from(vec![1; MAX_PAYLOAD + 1]),
        });
        let b = encode(&m, Some(&key())).unwrap();
        assert_eq!(decode(&b), Err(DecodeError::OutOfRange));
    }
}
