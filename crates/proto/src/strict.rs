//! Binary fields are MessagePack `bin` and nothing else.
//!
//! `docs/PROTOCOL.md` section 2 makes a binary field sent as a `str` or as an array of integers
//! a malformed datagram. Two layers hold that line:
//!
//! - The field deserializers here ([`bin`], [`uuid`](fn@uuid), [`uuids`], [`pad`], used by the
//!   message structs) and those of `types` built on [`bin`] ([`Addr`](crate::Addr),
//!   [`Secret`](crate::Secret), the payload) accept only bytes: a string or a sequence is a
//!   type error. The `uuid` crate's own deserializer would take the text form and a sequence of
//!   16 integers, and `serde_bytes` takes both too.
//! - [`check_bin_fields`] looks at the MessagePack markers of the body. rmp-serde hands a `str`
//!   whose content is not UTF-8 to a visitor as bytes, so a field deserializer cannot tell
//!   `str` 16 of raw UUID bytes from `bin` 16 (exactly what a MessagePack library configured
//!   for "raw" strings sends). The codec therefore also checks, for the keys each type declares
//!   binary ([`BinField`]), that the value's marker is `bin 8/16/32`.

use std::fmt;

use serde::de::{Deserialize, Deserializer, Visitor};
use uuid::Uuid;

use crate::error::DecodeError;
use crate::limits::MAX_BODY_DEPTH;

/// Deserializes a MessagePack `bin` through `parse`, which sees the bytes and may refuse them
/// (wrong length). Anything but bytes is an error.
pub(crate) fn bin<'de, D, T>(
    d: D,
    what: &'static str,
    parse: impl FnOnce(&[u8]) -> Option<T>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<F> {
        what: &'static str,
        parse: F,
    }
    impl<'de, T, F: FnOnce(&[u8]) -> Option<T>> Visitor<'de> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{} as MessagePack bin", self.what)
        }
        // `visit_borrowed_bytes` and `visit_byte_buf` forward here; `visit_str` and
        // `visit_seq` keep their default, an invalid-type error.
        fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<T, E> {
            let what = self.what;
            (self.parse)(b).ok_or_else(|| E::invalid_length(b.len(), &what))
        }
    }
    d.deserialize_bytes(V { what, parse })
}

/// A UUID: `bin` of exactly 16 bytes.
pub(crate) fn uuid<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
    BinUuid::deserialize(d).map(|u| u.0)
}

/// An array of UUIDs, each `bin` 16.
pub(crate) fn uuids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Uuid>, D::Error> {
    let v = Vec::<BinUuid>::deserialize(d)?;
    Ok(v.into_iter().map(|u| u.0).collect())
}

/// Padding: `bin` of any length.
pub(crate) fn pad<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    bin(d, "pad", |b| Some(b.to_vec()))
}

struct BinUuid(Uuid);

impl<'de> Deserialize<'de> for BinUuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bin(d, "a 16-byte UUID", |b| Uuid::from_slice(b).ok().map(Self))
    }
}

/// The wire shape of a binary field, as far as [`check_bin_fields`] is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinShape {
    /// `bin`.
    Bin,
    /// `bin` or nil.
    OptBin,
    /// An array of `bin`.
    List,
}

/// A binary field of a body: its key and shape.
pub(crate) type BinField = (&'static str, BinShape);

const BIN8: u8 = 0xc4;
const BIN16: u8 = 0xc5;
const BIN32: u8 = 0xc6;
const NIL: u8 = 0xc0;

/// Checks that every key of the body map is a `str`, that every value under a key of
/// `fields` has the `bin` marker its shape asks for, and that nothing follows the map (trailing
/// bytes are a malformed datagram, not something to ignore). Runs after the body decoded, so
/// it can assume a well-formed map; it still never panics on anything.
pub(crate) fn check_bin_fields(body: &[u8], fields: &[BinField]) -> Result<(), DecodeError> {
    let mut rest = body;
    let n = map_len(&mut rest)?;
    for _ in 0..n {
        let key = str_bytes(&mut rest)?;
        let shape = fields
            .iter()
            .find(|(k, _)| k.as_bytes() == key)
            .map(|(_, s)| *s);
        match shape {
            None => skip(&mut rest)?,
            Some(BinShape::Bin) => bin_value(&mut rest, false)?,
            Some(BinShape::OptBin) => bin_value(&mut rest, true)?,
            Some(BinShape::List) => {
                for _ in 0..array_len(&mut rest)? {
                    bin_value(&mut rest, false)?;
                }
            }
        }
    }
    if !rest.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok(())
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if rest.len() < n {
        return Err(DecodeError::Malformed);
    }
    let (h, t) = rest.split_at(n);
    *rest = t;
    Ok(h)
}

fn be_len(rest: &mut &[u8], width: usize) -> Result<usize, DecodeError> {
    let b = take(rest, width)?;
    Ok(b.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x)))
}

fn map_len(rest: &mut &[u8]) -> Result<usize, DecodeError> {
    match take(rest, 1)?[0] {
        m @ 0x80..=0x8f => Ok(usize::from(m & 0x0f)),
        0xde => be_len(rest, 2),
        0xdf => be_len(rest, 4),
        _ => Err(DecodeError::Malformed),
    }
}

fn array_len(rest: &mut &[u8]) -> Result<usize, DecodeError> {
    match take(rest, 1)?[0] {
        m @ 0x90..=0x9f => Ok(usize::from(m & 0x0f)),
        0xdc => be_len(rest, 2),
        0xdd => be_len(rest, 4),
        _ => Err(DecodeError::Malformed),
    }
}

/// A map key: `str` only (section 2: the keys are strings).
fn str_bytes<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let n = match take(rest, 1)?[0] {
        m @ 0xa0..=0xbf => usize::from(m & 0x1f),
        0xd9 => be_len(rest, 1)?,
        0xda => be_len(rest, 2)?,
        0xdb => be_len(rest, 4)?,
        _ => return Err(DecodeError::Malformed),
    };
    take(rest, n)
}

fn bin_value(rest: &mut &[u8], nil_ok: bool) -> Result<(), DecodeError> {
    let n = match take(rest, 1)?[0] {
        BIN8 => be_len(rest, 1)?,
        BIN16 => be_len(rest, 2)?,
        BIN32 => be_len(rest, 4)?,
        NIL if nil_ok => 0,
        _ => return Err(DecodeError::Malformed),
    };
    take(rest, n).map(|_| ())
}

/// Skips one value of any type (an unknown or non-binary field), nested at most
/// `MAX_BODY_DEPTH` deep like the body itself.
fn skip(rest: &mut &[u8]) -> Result<(), DecodeError> {
    skip_nested(rest, 1)
}

fn skip_nested(rest: &mut &[u8], depth: usize) -> Result<(), DecodeError> {
    if depth > MAX_BODY_DEPTH {
        return Err(DecodeError::Malformed);
    }
    let (data, items) = match take(rest, 1)?[0] {
        // Fixints, nil, booleans: the marker is the value.
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
        m @ 0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
        m @ 0x90..=0x9f => (0, usize::from(m & 0x0f)),
        m @ 0xa0..=0xbf => (usize::from(m & 0x1f), 0),
        // bin 8/16/32, str 8/16/32.
        0xc4 | 0xd9 => (be_len(rest, 1)?, 0),
        0xc5 | 0xda => (be_len(rest, 2)?, 0),
        0xc6 | 0xdb => (be_len(rest, 4)?, 0),
        // ext 8/16/32: length, type byte, data.
        0xc7 => (be_len(rest, 1)? + 1, 0),
        0xc8 => (be_len(rest, 2)? + 1, 0),
        0xc9 => (be_len(rest, 4)?.saturating_add(1), 0),
        // Numbers of fixed width.
        0xcc | 0xd0 => (1, 0),
        0xcd | 0xd1 => (2, 0),
        0xca | 0xce | 0xd2 => (4, 0),
        0xcb | 0xcf | 0xd3 => (8, 0),
        // fixext 1/2/4/8/16: type byte and data.
        0xd4 => (2, 0),
        0xd5 => (3, 0),
        0xd6 => (5, 0),
        0xd7 => (9, 0),
        0xd8 => (17, 0),
        0xdc => (0, be_len(rest, 2)?),
        0xdd => (0, be_len(rest, 4)?),
        0xde => (0, 2 * be_len(rest, 2)?),
        0xdf => (0, be_len(rest, 4)?.saturating_mul(2)),
        // 0xc1 is never used.
        _ => return Err(DecodeError::Malformed),
    };
    take(rest, data)?;
    // Each item is at least one byte, so a made-up count runs out of input quickly.
    for _ in 0..items {
        skip_nested(rest, depth + 1)?;
    }
    Ok(())
}

/// The keys whose values a body holds as `bin` or as an array of `bin`: what the encoder
/// wrote, for the test that compares it with each type's table of binary fields.
#[cfg(test)]
pub(crate) fn written_bin_fields(body: &[u8]) -> Vec<(String, BinShape)> {
    let mut rest = body;
    let mut out = Vec::new();
    for _ in 0..map_len(&mut rest).unwrap() {
        let key = String::from_utf8(str_bytes(&mut rest).unwrap().to_vec()).unwrap();
        let first = rest[0];
        if matches!(first, BIN8 | BIN16 | BIN32) {
            bin_value(&mut rest, false).unwrap();
            out.push((key, BinShape::Bin));
        } else if let (0x91..=0x9f, Some(BIN8..=BIN32)) = (first, rest.get(1)) {
            for _ in 0..array_len(&mut rest).unwrap() {
                bin_value(&mut rest, false).unwrap();
            }
            out.push((key, BinShape::List));
        } else {
            skip(&mut rest).unwrap();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[test]
    fn field_deserializers_take_bytes_only() {
        #[derive(Debug, serde::Deserialize)]
        struct U(#[serde(deserialize_with = "uuid")] Uuid);
        let addr = |b: &[u8]| rmp_serde::from_slice::<Addr>(b);
        let secret = |b: &[u8]| rmp_serde::from_slice::<Secret>(b);
        let uuid = |b: &[u8]| rmp_serde::from_slice::<U>(b);
        let ip = [192, 0, 2, 1, 0x0f, 0xa0];
        assert!(addr(&[&[BIN8, 6][..], &ip].concat()).is_ok());
        assert!(addr(&[&[0x96][..], &[1, 2, 3, 4, 5, 6]].concat()).is_err());
        assert!(addr(b"\xa6abcdef").is_err());
        assert!(secret(&[&[BIN8, 32][..], &[b'x'; 32]].concat()).is_ok());
        assert!(secret(&[&[0xd9, 32][..], &[b'x'; 32]].concat()).is_err());
        assert!(secret(&[&[0xdc, 0, 32][..], &[1; 32]].concat()).is_err());
        assert_eq!(
            uuid(&[&[BIN8, 16][..], &[b'x'; 16]].concat()).unwrap().0,
            Uuid::from_bytes([b'x'; 16])
        );
        assert!(uuid(&[&[0xb0][..], &[b'x'; 16]].concat()).is_err());
        assert!(uuid(&[&[0xdc, 0, 16][..], &[1; 16]].concat()).is_err());
        assert!(uuid(b"\xd9\x24aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa").is_err());
        // rmp-serde hands a `str` that is not UTF-8 to the visitor as bytes, so the field
        // deserializers alone take it; `check_bin_fields` is what refuses it in `decode`.
        assert!(addr(&[&[0xa6][..], &ip].concat()).is_ok());
        assert_eq!(
            check_bin_fields(
                &[&[0x81, 0xa1, b'o', 0xa6][..], &ip].concat(),
                &[("o", BinShape::Bin)]
            ),
            Err(DecodeError::Malformed)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 5000,
            ..Default::default()
        })]

        /// The skipper consumes exactly what rmp-serde would, and fails where it fails.
        #[test]
        fn skip_agrees_with_rmp_serde(b in proptest::prop_oneof![
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48),
            // Mostly container markers and short lengths: deep nesting, depth limits.
            proptest::collection::vec(
                proptest::sample::select(vec![
                    0x91u8, 0x92, 0x9f, 0x81, 0x82, 0xdc, 0xde, 0x00, 0x01, 0x02, 0xa1, 0xc4,
                    0xd9, 0xc0, 0xd4, 0xc7, 0xcc, 0xcf, 0xff, 0xc1,
                ]),
                0..48,
            ),
        ]) {
            let mut ours = &b[..];
            let r1 = skip(&mut ours).map(|()| ours.len());
            let mut theirs = &b[..];
            let mut de = rmp_serde::Deserializer::new(&mut theirs);
            de.set_max_depth(MAX_BODY_DEPTH);
            let r2 = serde::de::IgnoredAny::deserialize(&mut de).map(|_| theirs.len());
            proptest::prop_assert_eq!(r1.ok(), r2.ok(), "{:02x?}", b);
        }
    }

    #[test]
    fn skip_handles_every_kind_of_value() {
        #[derive(serde::Serialize)]
        struct All {
            i: Vec<i64>,
            u: Vec<u64>,
            f: (f32, f64),
            s: Vec<String>,
            b: serde_bytes::ByteBuf,
            o: Option<bool>,
            m: std::collections::BTreeMap<String, Vec<Option<u8>>>,
        }
        let v = All {
            i: vec![-1, -33, -129, -40_000, -3_000_000_000, 5],
            u: vec![0, 200, 60_000, 4_000_000_000, u64::MAX],
            f: (1.5, 2.5),
            s: vec![
                "".into(),
                "x".repeat(40),
                "y".repeat(300),
                "z".repeat(70_000),
            ],
            b: serde_bytes::ByteBuf::from(vec![1; 70_000]),
            o: None,
            m: [("k".to_string(), vec![Some(1), None])].into(),
        };
        let mut b = rmp_serde::to_vec_named(&v).unwrap();
        b.push(0xc3);
        let mut rest = &b[..];
        skip(&mut rest).unwrap();
        assert_eq!(rest, &[0xc3]);
        // Ext types too: fixext 1 and ext 8.
        let mut rest: &[u8] = &[0xd4, 1, 2, 0xc7, 2, 9, 1, 2, 0xc0];
        skip(&mut rest).unwrap();
        skip(&mut rest).unwrap();
        assert_eq!(rest, &[0xc0]);
        // Truncated and reserved.
        assert!(skip(&mut &[0xcd, 1][..]).is_err());
        assert!(skip(&mut &[0xc1][..]).is_err());
    }

    #[test]
    fn non_string_keys_are_malformed() {
        // {0: 3} and {bin "rid": 3}: serde would take both as the field `rid`.
        assert_eq!(
            check_bin_fields(&[0x81, 0x00, 0x03], &[]),
            Err(DecodeError::Malformed)
        );
        assert_eq!(
            check_bin_fields(&[0x81, BIN8, 3, b'r', b'i', b'd', 0x03], &[]),
            Err(DecodeError::Malformed)
        );
        assert_eq!(
            check_bin_fields(&[0x81, 0xa3, b'r', b'i', b'd', 0x03], &[]),
            Ok(())
        );
    }
}
