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
//!
//! Key rotation: a node signs with one key and may accept a second ([`decode_any`]), so a
//! fleet moves to a new key in steps without refusing a datagram (docs/OPERATIONS.md).

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
    /// A client resumed on the receiver and left the sender: the connections it had here,
    /// for the receiver to carry on (new variants go last: older nodes drop what they cannot
    /// decode, and the sender's retransmission gives up).
    Handover {
        /// The client that moved.
        uuid: Uuid,
        /// Its established connections.
        conns: Vec<HandedConn>,
    },
    /// The far end of connection `conn` is now on node `node` (internal address `addr`).
    Rehome {
        /// Connection id.
        conn: Uuid,
        /// The node that now holds the far end.
        node: String,
        /// Its internal address.
        addr: Addr,
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
    /// "These clients are on their way to you": sent by a draining node along with the
    /// Migrates that send them to the receiver, so that it can take their Resumes without
    /// asking Redis (and tell the sender when each arrived). One-shot, never retransmitted (a
    /// lost one costs a lookup per client): a repeat is a replay.
    Expect {
        /// At most [`MAX_EXPECT`] clients.
        sessions: Vec<ExpectedSession>,
    },
}

/// A client a draining node sent to the receiver of [`Body::Expect`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedSession {
    /// The client.
    pub uuid: Uuid,
    /// The verifier of its session secret (what Redis would have said).
    #[serde(with = "serde_bytes")]
    pub verifier: [u8; 32],
}

/// Most clients one [`Body::Expect`] names (it fits a datagram whatever the node ids).
pub const MAX_EXPECT: usize = 16;

/// One established connection handed from a client's old node to its new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedConn {
    /// Connection id.
    pub conn: Uuid,
    /// Who asked.
    pub initiator: Uuid,
    /// Who was asked.
    pub target: Uuid,
    /// The node holding the other end.
    pub peer_node: String,
    /// Its internal address.
    pub peer_addr: Addr,
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
    /// Missing or wrong MAC (a node with another cluster key, or a forgery).
    #[error("bad cluster MAC")]
    BadMac,
    /// Authentic, but addressed to another node (or claiming to come from this one).
    #[error("cluster datagram addressed to another node")]
    Misaddressed,
    /// Authentic, but its timestamp is outside the freshness window (a replay, or clocks
    /// apart by more than the window).
    #[error("stale cluster datagram (replay or clock skew)")]
    Stale,
}

impl From<WireError> for crate::metrics::ClusterRefusal {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Malformed => Self::Malformed,
            WireError::BadMac => Self::BadMac,
            WireError::Misaddressed => Self::Misaddressed,
            WireError::Stale => Self::Stale,
        }
    }
}

impl WireError {
    /// A short label for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadMac => "bad_mac",
            Self::Misaddressed => "misaddressed",
            Self::Stale => "stale",
        }
    }
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
    decode_any(buf, &[key]).map(|(env, _)| env)
}

/// Like [`decode`], accepting a MAC made with any of `keys`; also returns the index of the key
/// that matched.
pub fn decode_any(buf: &[u8], keys: &[&[u8]]) -> Result<(Envelope, usize), WireError> {
    let data = framed(buf)?;
    let (data, t) = data.split_at(data.len() - MAC_LEN);
    let which = keys
        .iter()
        .position(|k| bool::from(tag(k, data).ct_eq(t)))
        .ok_or(WireError::BadMac)?;
    Ok((body(data)?, which))
}

/// The sender a datagram claims, read WITHOUT checking its MAC: for log lines about refused
/// datagrams only, never for a decision.
pub fn claimed_sender(buf: &[u8]) -> Option<String> {
    let data = framed(buf).ok()?;
    body(&data[..data.len() - MAC_LEN]).ok().map(|e| e.from)
}

fn framed(buf: &[u8]) -> Result<&[u8], WireError> {
    if buf.len() < HEADER + MAC_LEN + 1 || buf.len() > MAX_DATAGRAM + 256 {
        return Err(WireError::Malformed);
    }
    if buf[..2] != MAGIC || buf[2] != VERSION {
        return Err(WireError::Malformed);
    }
    Ok(buf)
}

fn body(data: &[u8]) -> Result<Envelope, WireError> {
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
        assert_eq!(claimed_sender(&b).as_deref(), Some("a"));
    }

    #[test]
    fn a_second_key_is_accepted_and_named() {
        let (old, new, other) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let by_old = encode(&env(), &old).unwrap();
        let by_new = encode(&env(), &new).unwrap();
        assert_eq!(decode_any(&by_old, &[&old, &new]), Ok((env(), 0)));
        assert_eq!(decode_any(&by_new, &[&old, &new]), Ok((env(), 1)));
        assert_eq!(decode_any(&by_new, &[&old]), Err(WireError::BadMac));
        assert_eq!(decode_any(&by_new, &[&old, &other]), Err(WireError::BadMac));
        // A forged sender name is still readable for the log line, and still refused.
        assert_eq!(claimed_sender(&by_new).as_deref(), Some("a"));
    }

    /// A full Expect fits a datagram with 64-character node ids (a Kubernetes pod name, the
    /// default node id there, has at most 63).
    #[test]
    fn a_full_expect_fits_a_datagram() {
        let long = "n".repeat(64);
        let e = Envelope {
            from: long.clone(),
            to: long,
            ts: u64::MAX,
            seq: u64::MAX,
            body: Body::Expect {
                sessions: vec![
                    ExpectedSession {
                        uuid: Uuid::from_u128(u128::MAX),
                        verifier: [0xff; 32],
                    };
                    MAX_EXPECT
                ],
            },
        };
        let b = encode(&e, &[1u8; 32]).expect("fits");
        assert_eq!(decode(&b, &[1u8; 32]).unwrap(), e);
    }
}
