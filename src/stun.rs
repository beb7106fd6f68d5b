//! Sans-IO answers to STUN Binding requests (RFC 8489) arriving on the client port.
//!
//! Clients and standard ICE stacks can learn their server-reflexive address from the same port
//! they use for signaling. The caller demultiplexes with [`sigrouter_proto::is_stun`] and hands
//! the datagram to [`answer`], which returns the bytes to send back to the sender, from the same
//! port, or why nothing should be sent.
//!
//! Only the unauthenticated Binding request is served: the answer is a Binding success response
//! with `XOR-MAPPED-ADDRESS`, plus `FINGERPRINT` when the request carried one. Indications,
//! responses, other methods, requests with comprehension-required attributes (`USERNAME`,
//! `MESSAGE-INTEGRITY`, `CHANGE-REQUEST`, ...) and anything malformed are dropped without an
//! answer, and never panic.
//!
//! # Amplification
//!
//! A STUN Binding request is unauthenticated, so its source address may be spoofed. The
//! smallest valid request is the 20-byte header alone; its answer is 32 bytes for an IPv4
//! sender and 44 bytes for an IPv6 sender (header plus an 8- or 20-byte `XOR-MAPPED-ADDRESS`),
//! a ratio of 1.6 and 2.2. That is what the standard requires and what every public STUN server
//! sends, and the absolute size is tiny, so it is accepted. Nothing is added beyond it unless
//! the request pays for it: `FINGERPRINT` (8 bytes) only when the request carried one (so the
//! request was at least 28 bytes), `SOFTWARE` only when the whole answer still fits in the
//! request's size. Every answer is at most `request length + 24` bytes ([`MAX_GROWTH`]).
//! Rate limiting, if any, is the caller's business.

use std::net::{IpAddr, SocketAddr};

use stun_types::attribute::{Software, XorMappedAddress};
use stun_types::message::{
    Message, MessageClass, MessageType, MessageWriteVec, StunParseError, BINDING,
};
use stun_types::prelude::*;

/// Length of the fixed STUN header.
const HEADER_LEN: usize = 20;
/// STUN magic cookie, bytes 4..8 of every RFC 5389/8489 message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// `FINGERPRINT` attribute type.
const FINGERPRINT: u16 = 0x8028;
/// What the `SOFTWARE` attribute says, when there is room for it.
const SOFTWARE: &str = "sigrouter";

/// Most bytes an answer adds to the size of the request it answers: an IPv6
/// `XOR-MAPPED-ADDRESS` (24 bytes) on a bare 20-byte header.
pub const MAX_GROWTH: usize = 24;

/// Why a datagram that looked like STUN got no answer. Each variant is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum StunDrop {
    /// Not a well-formed STUN message: too short, no magic cookie, a length field that does not
    /// match the datagram, broken attribute framing, or an attribute after `FINGERPRINT`.
    #[error("malformed STUN message")]
    Malformed,
    /// A well-formed STUN message that is not a Binding request: an indication, a response, or
    /// another method.
    #[error("not a STUN Binding request")]
    NotBindingRequest,
    /// The request's `FINGERPRINT` does not match its contents.
    #[error("STUN fingerprint mismatch")]
    BadFingerprint,
    /// The request carries a comprehension-required attribute this responder does not
    /// implement (for example `USERNAME` or `MESSAGE-INTEGRITY`: no STUN authentication here).
    #[error("STUN request with an unsupported comprehension-required attribute")]
    UnknownAttribute,
}

impl StunDrop {
    /// A short lowercase name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotBindingRequest => "not_binding_request",
            Self::BadFingerprint => "bad_fingerprint",
            Self::UnknownAttribute => "unknown_attribute",
        }
    }
}

/// Answers a STUN Binding request from `from` with a Binding success response carrying
/// `XOR-MAPPED-ADDRESS` (and `FINGERPRINT` if the request had one, `SOFTWARE` if the request
/// was large enough to pay for it). Returns `Err` for anything else: not a Binding request,
/// malformed, indications. Never panics.
///
/// An IPv4-mapped IPv6 `from` (a dual-stack socket) is reported as the IPv4 address it is.
pub fn answer(req: &[u8], from: SocketAddr) -> Result<Vec<u8>, StunDrop> {
    let framing = check_framing(req)?;
    let mtype = MessageType::from_bytes(req).map_err(|_| StunDrop::Malformed)?;
    if !mtype.has_class(MessageClass::Request) || !mtype.has_method(BINDING) {
        return Err(StunDrop::NotBindingRequest);
    }
    if framing.unknown_required {
        return Err(StunDrop::UnknownAttribute);
    }
    let has_fingerprint = framing.fingerprint;
    // The framing is known good here, so this parse only verifies FINGERPRINT (and does not
    // reach stun-types' per-datagram warnings for broken framing).
    let msg = Message::from_bytes(req).map_err(|e| match e {
        StunParseError::FingerprintMismatch => StunDrop::BadFingerprint,
        _ => StunDrop::Malformed,
    })?;

    let from = SocketAddr::new(canonical(from.ip()), from.port());
    let xor = XorMappedAddress::new(from, msg.transaction_id());
    let fingerprint_len = if has_fingerprint { 8 } else { 0 };
    let base_len = HEADER_LEN + 4 + xor.padded_len() + fingerprint_len;
    let software = Software::new(SOFTWARE).ok();

    let mut out = Message::builder_success(&msg, MessageWriteVec::with_capacity(base_len + 16));
    // Neither write can fail on a fresh success response with room to spare; map rather than
    // unwrap so that a future library change cannot turn into a panic on the network path.
    out.add_attribute(&xor).map_err(|_| StunDrop::Malformed)?;
    if let Some(sw) = &software {
        if base_len + 4 + sw.padded_len() <= req.len() {
            out.add_attribute(sw).map_err(|_| StunDrop::Malformed)?;
        }
    }
    if has_fingerprint {
        out.add_fingerprint().map_err(|_| StunDrop::Malformed)?;
    }
    let out = out.finish();
    debug_assert!(out.len() <= req.len() + MAX_GROWTH);
    Ok(out)
}

/// What [`check_framing`] found among the attributes.
struct Framing {
    /// The message ends with a `FINGERPRINT` attribute.
    fingerprint: bool,
    /// The message has a comprehension-required attribute (none is implemented here).
    unknown_required: bool,
}

/// Checks the header and walks the attributes' type-length-value framing without the STUN
/// library (which logs a warning for each malformed message, unwelcome for datagrams anyone
/// can send).
fn check_framing(req: &[u8]) -> Result<Framing, StunDrop> {
    if req.len() < HEADER_LEN || req[0] & 0xC0 != 0 || req[4..8] != MAGIC_COOKIE {
        return Err(StunDrop::Malformed);
    }
    let body_len = usize::from(u16::from_be_bytes([req[2], req[3]]));
    if body_len != req.len() - HEADER_LEN || body_len % 4 != 0 {
        return Err(StunDrop::Malformed);
    }
    let mut at = HEADER_LEN;
    let mut unknown = false;
    let mut fingerprint = false;
    while at < req.len() {
        if fingerprint {
            // FINGERPRINT must be the last attribute.
            return Err(StunDrop::Malformed);
        }
        let Some(tl) = req.get(at..at + 4) else {
            return Err(StunDrop::Malformed);
        };
        let ty = u16::from_be_bytes([tl[0], tl[1]]);
        let len = usize::from(u16::from_be_bytes([tl[2], tl[3]]));
        let padded = (len + 3) & !3;
        if at + 4 + padded > req.len() {
            return Err(StunDrop::Malformed);
        }
        if ty == FINGERPRINT {
            if len != 4 {
                return Err(StunDrop::Malformed);
            }
            fingerprint = true;
        } else if ty < 0x8000 {
            // Comprehension-required (RFC 8489 section 14): nothing in that range is served.
            unknown = true;
        }
        at += 4 + padded;
    }
    Ok(Framing {
        fingerprint,
        unknown_required: unknown,
    })
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use stun_types::attribute::{Fingerprint, RawAttribute, Username};
    use stun_types::message::{MessageWrite, TransactionId};

    fn request(fingerprint: bool, software: Option<&str>) -> Vec<u8> {
        let mut m = Message::builder_request(BINDING, MessageWriteVec::new());
        if let Some(s) = software {
            m.add_attribute(&Software::new(s).unwrap()).unwrap();
        }
        if fingerprint {
            m.add_fingerprint().unwrap();
        }
        m.finish()
    }

    /// Parses an answer and returns the mapped address, checking everything else about it.
    fn mapped(req: &[u8], resp: &[u8]) -> SocketAddr {
        let q = Message::from_bytes(req).unwrap();
        let r = Message::from_bytes(resp).expect("answer parses (and its fingerprint checks)");
        assert!(r.has_class(MessageClass::Success));
        assert!(r.has_method(BINDING));
        assert_eq!(r.transaction_id(), q.transaction_id());
        assert_eq!(
            r.has_attribute(Fingerprint::TYPE),
            q.has_attribute(Fingerprint::TYPE)
        );
        assert!(resp.len() <= req.len() + MAX_GROWTH);
        r.attribute::<XorMappedAddress>()
            .unwrap()
            .addr(r.transaction_id())
    }

    #[test]
    fn answers_ipv4() {
        let req = request(false, None);
        assert_eq!(req.len(), 20);
        let from: SocketAddr = "203.0.113.7:54321".parse().unwrap();
        let resp = answer(&req, from).unwrap();
        assert_eq!(resp.len(), 32);
        assert_eq!(mapped(&req, &resp), from);
    }

    #[test]
    fn answers_ipv6() {
        let req = request(false, None);
        let from: SocketAddr = "[2001:db8::42]:3478".parse().unwrap();
        let resp = answer(&req, from).unwrap();
        assert_eq!(resp.len(), 44);
        assert_eq!(mapped(&req, &resp), from);
    }

    #[test]
    fn ipv4_mapped_sender_is_reported_as_ipv4() {
        let req = request(false, None);
        let resp = answer(&req, "[::ffff:198.51.100.9]:4000".parse().unwrap()).unwrap();
        assert_eq!(resp.len(), 32);
        assert_eq!(
            mapped(&req, &resp),
            "198.51.100.9:4000".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn fingerprint_is_echoed_and_checked() {
        let req = request(true, None);
        assert_eq!(req.len(), 28);
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let resp = answer(&req, from).unwrap();
        assert_eq!(resp.len(), 40);
        assert_eq!(mapped(&req, &resp), from);

        let mut bad = req.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(answer(&bad, from), Err(StunDrop::BadFingerprint));
    }

    #[test]
    fn software_only_when_the_request_pays_for_it() {
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let sw = |resp: &[u8]| {
            Message::from_bytes(resp)
                .unwrap()
                .has_attribute(Software::TYPE)
        };
        let small = request(true, Some("x"));
        assert!(!sw(&answer(&small, from).unwrap()));
        let big = request(true, Some("a rather long client software description"));
        let resp = answer(&big, from).unwrap();
        assert!(sw(&resp));
        assert!(resp.len() <= big.len());
        assert_eq!(mapped(&big, &resp), from);
    }

    #[test]
    fn drops_everything_else() {
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let ok = request(false, None);

        assert_eq!(answer(b"", from), Err(StunDrop::Malformed));
        assert_eq!(answer(&ok[..19], from), Err(StunDrop::Malformed));
        assert_eq!(answer(&[0xff; 64], from), Err(StunDrop::Malformed));
        let mut ours = b"SR\x01\x03".to_vec();
        ours.resize(49, 0);
        assert_eq!(answer(&ours, from), Err(StunDrop::Malformed));

        // Length field disagreeing with the datagram, or not a multiple of 4.
        let mut long = ok.clone();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(answer(&long, from), Err(StunDrop::Malformed));
        let mut odd = ok.clone();
        odd[3] = 2;
        odd.extend_from_slice(&[0; 2]);
        assert_eq!(answer(&odd, from), Err(StunDrop::Malformed));
        // An attribute running past the end.
        let mut trunc = ok.clone();
        trunc[3] = 8;
        trunc.extend_from_slice(&[0x80, 0x22, 0x00, 0x10, 0, 0, 0, 0]);
        assert_eq!(answer(&trunc, from), Err(StunDrop::Malformed));
        // Without the magic cookie (RFC 3489).
        let mut classic = ok.clone();
        classic[4] = 0;
        assert_eq!(answer(&classic, from), Err(StunDrop::Malformed));

        // Indication, success response, other method.
        let ind = Message::builder_indication(BINDING, MessageWriteVec::new()).finish();
        assert_eq!(answer(&ind, from), Err(StunDrop::NotBindingRequest));
        let resp = answer(&ok, from).unwrap();
        assert_eq!(answer(&resp, from), Err(StunDrop::NotBindingRequest));
        let mut allocate = ok.clone();
        allocate[1] = 0x03;
        assert_eq!(answer(&allocate, from), Err(StunDrop::NotBindingRequest));

        // Comprehension-required attributes.
        let mut m = Message::builder_request(BINDING, MessageWriteVec::new());
        m.add_attribute(&Username::new("user").unwrap()).unwrap();
        assert_eq!(answer(&m.finish(), from), Err(StunDrop::UnknownAttribute));
        // A comprehension-optional unknown attribute is fine.
        let mut m = Message::builder_request(BINDING, MessageWriteVec::new());
        m.add_attribute(&RawAttribute::new(0xC001.into(), &[1, 2, 3]))
            .unwrap();
        let req = m.finish();
        assert_eq!(mapped(&req, &answer(&req, from).unwrap()), from);
        // An attribute after FINGERPRINT.
        let mut after = request(true, None);
        after[3] += 8;
        after.extend_from_slice(&[0x80, 0x22, 0x00, 0x04, b'a', b'b', b'c', b'd']);
        assert_eq!(answer(&after, from), Err(StunDrop::Malformed));
    }

    #[test]
    fn names_are_distinct() {
        let all = [
            StunDrop::Malformed,
            StunDrop::NotBindingRequest,
            StunDrop::BadFingerprint,
            StunDrop::UnknownAttribute,
        ];
        let names: std::collections::HashSet<_> = all.iter().map(|d| d.name()).collect();
        assert_eq!(names.len(), all.len());
    }

    #[test]
    fn transaction_id_is_echoed() {
        let tid = TransactionId::from(0x0102_0304_0506_0708_090a_0b0c_u128);
        let req = Message::builder(
            MessageType::from_class_method(MessageClass::Request, BINDING),
            tid,
            MessageWriteVec::new(),
        )
        .finish();
        let resp = answer(&req, "192.0.2.1:1".parse().unwrap()).unwrap();
        assert_eq!(resp[8..20], req[8..20]);
        assert_eq!(Message::from_bytes(&resp).unwrap().transaction_id(), tid);
    }

    fn arb_from() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            any::<([u8; 4], u16)>().prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            any::<([u8; 16], u16)>().prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200), from in arb_from()) {
            if let Ok(r) = answer(&b, from) {
                prop_assert!(r.len() <= b.len() + MAX_GROWTH);
            }
        }

        /// Well-framed random attribute lists in a Binding request: comprehension-optional
        /// ones are ignored, comprehension-required ones get the request dropped.
        #[test]
        fn random_attributes(
            attrs in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 0..12)), 0..5),
            fp in any::<bool>(),
            from in arb_from(),
        ) {
            let mut req = request(false, None);
            for (ty, v) in &attrs {
                let ty = if *ty == FINGERPRINT { FINGERPRINT + 1 } else { *ty };
                req.extend_from_slice(&ty.to_be_bytes());
                req.extend_from_slice(&(v.len() as u16).to_be_bytes());
                req.extend_from_slice(v);
                req.resize((req.len() + 3) & !3, 0);
            }
            let n = (req.len() - HEADER_LEN) as u16;
            req[2..4].copy_from_slice(&n.to_be_bytes());
            if fp {
                // Append a correct FINGERPRINT (CRC-32 XOR 0x5354554e, RFC 8489 14.7).
                req[2..4].copy_from_slice(&(n + 8).to_be_bytes());
                let crc = u32::from_be_bytes(Fingerprint::compute(&[&req])) ^ 0x5354_554e;
                req.extend_from_slice(&[0x80, 0x28, 0, 4]);
                req.extend_from_slice(&crc.to_be_bytes());
            }
            let required = attrs.iter().any(|(ty, _)| *ty < 0x8000);
            match answer(&req, from) {
                Ok(r) => {
                    prop_assert!(!required);
                    prop_assert!(r.len() <= req.len() + MAX_GROWTH);
                    prop_assert_eq!(mapped(&req, &r), SocketAddr::new(canonical(from.ip()), from.port()));
                }
                Err(e) => {
                    prop_assert!(required);
                    prop_assert_eq!(e, StunDrop::UnknownAttribute);
                }
            }
        }

        #[test]
        fn flipped_requests_never_panic(
            fp in any::<bool>(),
            sw in proptest::option::of("[a-z]{0,40}"),
            flips in proptest::collection::vec((any::<usize>(), 0..8u8), 1..4),
            from in arb_from(),
        ) {
            let mut req = request(fp, sw.as_deref());
            for (i, bit) in flips {
                let n = req.len();
                req[i % n] ^= 1 << bit;
            }
            if let Ok(r) = answer(&req, from) {
                prop_assert!(r.len() <= req.len() + MAX_GROWTH);
            }
        }
    }
}
