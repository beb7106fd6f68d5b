//! The node-to-node datagram format: sans-IO, authenticated with the shared cluster key.
//!
//! ```text
//! "SN" | version 1 | 0 | MessagePack Envelope | HMAC-SHA256(cluster key) truncated to 16 bytes
//! ```
//!
//! The MAC covers the sender and the intended receiver node ids, a timestamp and a sequence
//! number, so a datagram cannot be sent on to another node, re-labelled with another node id,
//! or replayed once outside a short window (the receiver also remembers recent sequence numbers
//! per sender and answers a repeat with the reply it already gave, doing nothing twice).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sigrouter_proto::{Addr, Payload, MAC_LEN, MAX_DATAGRAM};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::membership::MemberId;

/// First two bytes of a node-to-node datagram.
pub const MAGIC: [u8; 2] = [0x53, 0x4E];
const VERSION: u8 = 1;
const HEADER: usize = 4;

/// Outcome a receiving node reports for a forwarded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Done (pushed to the local client, or recorded).
    Ok,
    /// The client named is not held by this node.
    NotHere,
    /// The connection named is not known here.
    UnknownConnection,
}

/// What travels between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A Connect for a client held by the receiver: push Incoming to it.
    Incoming {
        /// Connection id chosen by the initiator's node.
        conn: Uuid,
        /// Initiator.
        from: Uuid,
        /// Target (held by the receiver).
        to: Uuid,
        /// Initiator's observed address.
        observed: Addr,
        /// Initiator's local addresses.
        local: Vec<Addr>,
        /// Connect payload.
        payload: Payload,
    },
    /// The target's Accept or Reject, for the initiator's node.
    Answered {
        /// Connection id.
        conn: Uuid,
        /// Accepted (true) or rejected.
        accept: bool,
        /// The target.
        peer: Uuid,
        /// Target's observed address.
        observed: Addr,
        /// Target's local addresses.
        local: Vec<Addr>,
        /// Accept/Reject payload.
        payload: Payload,
    },
    /// A Signal for the peer held by the receiver.
    Signal {
        /// Connection id.
        conn: Uuid,
        /// Sender.
        from: Uuid,
        /// Recipient (held by the receiver).
        to: Uuid,
        /// Signal payload.
        payload: Payload,
    },
    /// The target of a pending connection left the sending node before answering.
    Abort {
        /// Connection id.
        conn: Uuid,
    },
    /// The client resumed on the sending node: forget its session.
    Moved {
        /// The client.
        uuid: Uuid,
    },
    /// The answer to request `seq` of the receiver.
    Reply {
        /// Outcome.
        status: Status,
    },
    /// A SWIM membership message (`foca`'s encoding). One-way: a repeat is a replay.
    Swim(#[serde(with = "serde_bytes")] Vec<u8>),
    /// "Announce yourself to me": sent to a seed known only by its address, so `to` is empty.
    /// One-way: a repeat is a replay.
    Join {
        /// The sender's membership identity.
        member: MemberId,
    },
    /// "Which of these clients do you hold?": a presence lookup while Redis is unavailable,
    /// answered from the receiver's own sessions with [`Body::Holds`] under the same sequence
    /// number. One-shot (never retransmitted, never remembered): a repeat is a replay.
    WhoHas {
        /// The clients asked about (at most [`MAX_WHO_HAS`]; the rest are not answered).
        uuids: Vec<Uuid>,
        /// With one client: the verifier of the secret a Resume presented; the holder says
        /// whether it matches its own.
        verifier: Option<[u8; 32]>,
    },
    /// The answer to [`Body::WhoHas`] `seq`.
    Holds {
        /// Per client asked: held by the sender.
        held: Vec<bool>,
        /// With a verifier asked about a client held here: whether it matched.
        verified: Option<bool>,
    },
}

/// Most clients one [`Body::WhoHas`] asks about.
pub const MAX_WHO_HAS: usize = sigrouter_proto::MAX_QUERY;

/// A node-to-node datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Sending node id.
    pub from: String,
    /// Receiving node id.
    pub to: String,
    /// Sender's wall clock, milliseconds since the Unix epoch.
    pub ts: u64,
    /// Sender's sequence number (for a Reply: the sequence number being answered).
    pub seq: u64,
    /// The message.
    pub body: Body,
}

/// Why an internal datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not our format.
    #[error("malformed cluster datagram")]
    Malformed,
    /// Missing or wrong MAC.
    #[error("bad cluster MAC")]
    BadMac,
}

fn tag(key: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac takes any key length");
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut t = [0u8; MAC_LEN];
    t.copy_from_slice(&full[..MAC_LEN]);
    t
}

/// Encodes and authenticates an envelope.
pub fn encode(env: &Envelope, key: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(0);
    rmp_serde::encode::write_named(&mut out, env).ok()?;
    let t = tag(key, &out);
    out.extend_from_slice(&t);
    (out.len() <= MAX_DATAGRAM + 256).then_some(out)
}

/// Checks the MAC, then decodes. Freshness and addressing are checked by the caller.
pub fn decode(buf: &[u8], key: &[u8]) -> Result<Envelope, WireError> {
    if buf.len() < HEADER + MAC_LEN + 1 || buf.len() > MAX_DATAGRAM + 256 {
        return Err(WireError::Malformed);
    }
    if buf[..2] != MAGIC || buf[2] != VERSION {
        return Err(WireError::Malformed);
    }
    let (data, t) = buf.split_at(buf.len() - MAC_LEN);
    if !bool::from(tag(key, data).ct_eq(t)) {
        return Err(WireError::BadMac);
    }
    let mut rest = &data[HEADER..];
    let env: Envelope = rmp_serde::from_read(&mut rest).map_err(|_| WireError::Malformed)?;
    if !rest.is_empty() {
        return Err(WireError::Malformed);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            from: "a".into(),
            to: "b".into(),
            ts: 1,
            seq: 2,
            body: Body::Moved { uuid: Uuid::nil() },
        }
    }

    #[test]
    fn roundtrip_and_forgeries() {
        let key = [9u8; 32];
        let b = encode(&env(), &key).unwrap();
        assert_eq!(decode(&b, &key).unwrap(), env());
        assert_eq!(decode(&b, &[8u8; 32]), Err(WireError::BadMac));
        let mut relabelled = b.clone();
        let i = relabelled.iter().position(|&c| c == b'a').unwrap();
        relabelled[i] = b'c';
        assert_eq!(decode(&relabelled, &key), Err(WireError::BadMac));
        assert_eq!(
            decode(&b[..b.len() - MAC_LEN], &key),
            Err(WireError::BadMac)
        );
        assert_eq!(decode(b"SN", &key), Err(WireError::Malformed));
    }
}
