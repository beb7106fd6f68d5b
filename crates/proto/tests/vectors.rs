//! Checks the hex test vectors in `docs/PROTOCOL.md` against the codec.
//!
//! The document is the source of truth: every ```` ```vector ```` block in it is parsed, decoded,
//! MAC-checked with the block's secret, compared with the message `vectors/expected.rs` expects under
//! that name, and re-encoded byte for byte. `print_vectors` (ignored) prints the blocks from
//! [`vectors`]; run it only after a deliberate wire change, then paste its output into the
//! document:
//!
//! ```text
//! cargo test -p sigrouter-proto --test vectors -- --ignored --nocapture print_vectors
//! ```

#[path = "vectors/expected.rs"]
mod expected;

use std::collections::{BTreeMap, BTreeSet};

use sigrouter_proto::*;
use uuid::Uuid;

use expected::{secret_a, secret_b, vectors, Vector};

/// One parsed ```` ```vector ```` block: `key: value` lines (`#` starts a comment); a value
/// may continue on the following indented lines.
#[derive(Debug, Default)]
struct Block {
    fields: BTreeMap<String, String>,
}

impl Block {
    fn get(&self, k: &str) -> &str {
        self.fields
            .get(k)
            .unwrap_or_else(|| panic!("vector {:?} has no `{k}:` line", self.fields.get("name")))
    }
}

fn parse_doc(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut cur: Option<Block> = None;
    let mut last_key = String::new();
    for (n, line) in doc.lines().enumerate() {
        let t = line.trim_end();
        match &mut cur {
            None if t.trim_start() == "```vector" => cur = Some(Block::default()),
            None => {}
            Some(_) if t.trim_start() == "```" => out.push(cur.take().unwrap()),
            Some(b) => {
                if t.starts_with(char::is_whitespace) && !t.trim().is_empty() {
                    // Continuation of the previous value.
                    let v = b
                        .fields
                        .get_mut(&last_key)
                        .unwrap_or_else(|| panic!("line {}: continuation without a key", n + 1));
                    v.push_str(t.trim());
                } else if let Some((k, v)) = t.split_once(':') {
                    // `#` starts a comment to the end of the line.
                    let v = v.split('#').next().unwrap_or_default();
                    last_key = k.trim().to_string();
                    let old = b.fields.insert(last_key.clone(), v.trim().to_string());
                    assert!(old.is_none(), "line {}: duplicate key {k}", n + 1);
                } else {
                    assert!(t.is_empty(), "line {}: not `key: value`: {t}", n + 1);
                }
            }
        }
    }
    assert!(cur.is_none(), "unterminated vector block");
    out
}

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn hex_of(s: &str) -> Vec<u8> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(&compact).unwrap_or_else(|e| panic!("bad hex {compact}: {e}"))
}

#[test]
fn document_vectors_decode_verify_and_reencode() {
    let blocks = parse_doc(&doc());
    let expected: BTreeMap<&str, Vector> = vectors().into_iter().map(|v| (v.name, v)).collect();
    let mut seen_names = BTreeSet::new();
    let mut seen_types = BTreeSet::new();

    for b in &blocks {
        let name = b.get("name");
        assert!(
            seen_names.insert(name.to_string()),
            "duplicate vector {name}"
        );
        let want = expected
            .get(name)
            .unwrap_or_else(|| panic!("vector {name} in the document is not known to this test"));
        let bytes = hex_of(b.get("hex"));

        // Header.
        let h = peek_header(&bytes).unwrap_or_else(|e| panic!("{name}: header: {e}"));
        let ty_field = b.get("type");
        let ty_byte = u8::from_str_radix(ty_field.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("{name}: bad type {ty_field}"));
        assert_eq!(h.ty as u8, ty_byte, "{name}: type byte");
        assert_eq!(
            b.get("len").parse::<usize>().unwrap(),
            bytes.len(),
            "{name}: len"
        );

        // Body.
        let msg = decode(&bytes).unwrap_or_else(|e| panic!("{name}: decode: {e}"));
        assert_eq!(
            msg, want.msg,
            "{name}: decoded message differs from the expected one"
        );

        // MAC.
        let auth = h.ty.is_authenticated();
        match (auth, b.fields.get("secret"), want.key) {
            (true, Some(s), Some((who, k))) => {
                let doc_key = Secret(hex_of(s).try_into().expect("secret is 32 bytes"));
                assert!(doc_key.ct_eq(&k), "{name}: secret is not client {who}'s");
                assert!(verify_mac(&bytes, &doc_key), "{name}: MAC does not verify");
                let other = if who == "A" { secret_b() } else { secret_a() };
                assert!(
                    !verify_mac(&bytes, &other),
                    "{name}: MAC verifies with a wrong key"
                );
                assert_eq!(
                    hex_of(b.get("mac")),
                    bytes[bytes.len() - MAC_LEN..],
                    "{name}: mac line"
                );
            }
            (false, None, None) => {
                assert!(
                    !b.fields.contains_key("mac"),
                    "{name}: mac on a type without one"
                );
            }
            other => panic!("{name}: authenticated={auth} but secret/key = {other:?}"),
        }

        // Re-encode byte for byte.
        let key = want.key.map(|(_, k)| k);
        let again = encode(&msg, key.as_ref()).unwrap();
        assert_eq!(
            hex::encode(&again),
            hex::encode(&bytes),
            "{name}: re-encoding"
        );
        if matches!(h.ty, MsgType::Register | MsgType::Resume) {
            assert!(bytes.len() >= MIN_HELLO_LEN, "{name}: not padded");
        }
        seen_types.insert(h.ty as u8);
    }

    let missing: Vec<&str> = expected
        .keys()
        .filter(|n| !seen_names.contains(**n))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "vectors missing from the document: {missing:?}"
    );
    let all: BTreeSet<u8> = (0..=255u8)
        .filter(|b| MsgType::from_u8(*b).is_some())
        .collect();
    assert_eq!(all.len(), 21);
    assert_eq!(seen_types, all, "not every message type has a vector");
}

#[test]
fn parser_reads_continuations() {
    let doc = "x\n```vector\nname: a\nhex:\n  0102\n  0304\n```\n";
    let b = parse_doc(doc);
    assert_eq!(b.len(), 1);
    assert_eq!(hex_of(b[0].get("hex")), vec![1, 2, 3, 4]);
}

/// Prints the vector blocks for the document from [`vectors`].
#[test]
#[ignore = "generator: run by hand after a deliberate wire change"]
fn print_vectors() {
    for v in vectors() {
        let key = v.key.map(|(_, k)| k);
        let mut msg = v.msg.clone();
        let bytes = if matches!(msg, Message::Register(_) | Message::Resume(_)) {
            encode_hello(&mut msg).unwrap()
        } else {
            encode(&msg, key.as_ref()).unwrap()
        };
        assert_eq!(msg, v.msg);
        println!("`{}`:", v.desc);
        println!();
        println!("```vector");
        println!("name: {}", v.name);
        println!("type: 0x{:02x}", msg.ty() as u8);
        if let Some((who, k)) = v.key {
            println!("secret: {}  # client {who}", hex::encode(k.0));
        }
        println!("len: {}", bytes.len());
        println!("hex:");
        for chunk in bytes.chunks(32) {
            println!("  {}", hex::encode(chunk));
        }
        if key.is_some() {
            println!("mac: {}", hex::encode(&bytes[bytes.len() - MAC_LEN..]));
        }
        println!("```");
        println!();
    }
}

/// The keys of a MessagePack map, in wire order.
struct MapKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for MapKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MapKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map with string keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<MapKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(MapKeys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// Section 6 of the document: for each type code, the keys of its table in order, each with
/// whether it may be absent (its type ends with `?`).
fn documented_fields(doc: &str) -> BTreeMap<u8, Vec<(String, bool)>> {
    let mut out = BTreeMap::new();
    let mut codes: Vec<u8> = Vec::new();
    let mut in_section = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            in_section = line.starts_with("## 6. ");
            codes.clear();
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            // "### 0x06 Accept and 0x07 Reject (...)" names two codes.
            codes = h
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("0x"))
                .map(|c| u8::from_str_radix(c, 16).expect("type code in heading"))
                .collect();
            for c in &codes {
                out.insert(*c, Vec::new());
            }
        } else if let Some(rest) = line.strip_prefix("| `") {
            let key = rest.split('`').next().unwrap().to_string();
            let optional = line.split('|').nth(2).unwrap().trim().ends_with('?');
            for c in &codes {
                out.get_mut(c).unwrap().push((key.clone(), optional));
            }
        }
    }
    out
}

#[test]
fn document_field_tables_match_the_wire() {
    let doc = doc();
    let tables = documented_fields(&doc);
    assert_eq!(
        tables.len(),
        21,
        "section 6 documents {} types",
        tables.len()
    );
    for b in parse_doc(&doc) {
        let bytes = hex_of(b.get("hex"));
        let h = peek_header(&bytes).unwrap();
        let end = bytes.len() - if h.ty.is_authenticated() { MAC_LEN } else { 0 };
        let keys: MapKeys = rmp_serde::from_slice(&bytes[HEADER_LEN..end]).unwrap();
        // The table's keys in order, less the optional ones this datagram leaves out.
        let expected: Vec<String> = tables[&(h.ty as u8)]
            .iter()
            .filter(|(k, optional)| !optional || keys.0.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(
            keys.0,
            expected,
            "{}: wire keys vs the table in section 6",
            b.get("name")
        );
    }
}

/// The redirect in `Error` is optional both ways: an `Error` without it (as every server sent
/// before it existed) decodes, with any code; and a receiver that predates it, which knows only
/// `rid` and `code` and ignores unknown keys as section 2 requires, decodes an `Error` that
/// has it.
#[test]
fn error_redirect_is_optional_both_ways() {
    let plain = |code: ErrorCode| {
        Ok(Message::Error(ErrorMsg {
            rid: 2,
            code,
            to: None,
        }))
    };
    // Old-style Error{rid: 2, code: 7}, no `to`: Draining without a redirect.
    let old = hex_of("5352018782a372696402a4636f646507");
    assert_eq!(decode(&old), plain(ErrorCode::Draining));
    // `to: nil` is the same as absent.
    let nil = hex_of("5352018783a372696402a4636f646507a2746fc0");
    assert_eq!(decode(&nil), plain(ErrorCode::Draining));
    // `to` must be an address like any other.
    let str_to = hex_of("5352018783a372696402a4636f646507a2746fa6c00002010fa0");
    assert_eq!(decode(&str_to), Err(DecodeError::Malformed));

    // A receiver from before the field: the body with only the fields it knew.
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct OldError {
        rid: u64,
        code: u16,
    }
    let doc = doc();
    let blocks = parse_doc(&doc);
    let redirect = blocks
        .iter()
        .find(|b| b.get("name") == "error_draining")
        .unwrap();
    let bytes = hex_of(redirect.get("hex"));
    let old: OldError = rmp_serde::from_slice(&bytes[HEADER_LEN..]).unwrap();
    assert_eq!(old, OldError { rid: 2, code: 7 });
}

/// The leniency section 2 promises receivers: any key order, unknown keys ignored, any integer
/// width; and the strictness: missing or repeated keys and trailing bytes are malformed.
#[test]
fn documented_decoding_rules() {
    let uuid = [0xaa; 16];
    let hb = |body: &[u8]| {
        let mut d = b"SR\x01\x03".to_vec();
        d.extend_from_slice(body);
        d.extend_from_slice(&[0; MAC_LEN]);
        decode(&d)
    };
    let mut uuid_kv = vec![0xa4, b'u', b'u', b'i', b'd', 0xc4, 0x10];
    uuid_kv.extend_from_slice(&uuid);
    let rid = |v: &[u8]| [&[0xa3, b'r', b'i', b'd'][..], v].concat();
    let want = Ok(Message::Heartbeat(Heartbeat {
        rid: 3,
        uuid: Uuid::from_bytes(uuid),
    }));

    // Canonical, reordered, unknown key (with a nested value), wide integer.
    assert_eq!(hb(&[&[0x82][..], &rid(&[3]), &uuid_kv].concat()), want);
    assert_eq!(hb(&[&[0x82][..], &uuid_kv, &rid(&[3])].concat()), want);
    let extra = [
        0xa5, b'e', b'x', b't', b'r', b'a', 0x92, 0x01, 0x81, 0xa1, b'x', 0xc0,
    ];
    assert_eq!(
        hb(&[&[0x83][..], &rid(&[3]), &extra, &uuid_kv].concat()),
        want
    );
    assert_eq!(
        hb(&[&[0x82][..], &rid(&[0xcf, 0, 0, 0, 0, 0, 0, 0, 3]), &uuid_kv].concat()),
        want
    );

    // Missing key, repeated key, trailing bytes, negative rid, uuid of the wrong length.
    let malformed = Err(DecodeError::Malformed);
    assert_eq!(hb(&[&[0x81][..], &rid(&[3])].concat()), malformed);
    assert_eq!(
        hb(&[&[0x83][..], &rid(&[3]), &rid(&[4]), &uuid_kv].concat()),
        malformed
    );
    assert_eq!(
        hb(&[&[0x82][..], &rid(&[3]), &uuid_kv, &[0xc0]].concat()),
        malformed
    );
    assert_eq!(
        hb(&[&[0x82][..], &rid(&[0xff]), &uuid_kv].concat()),
        malformed
    );
    let short_uuid = [0xa4, b'u', b'u', b'i', b'd', 0xc4, 0x02, 1, 2];
    assert_eq!(
        hb(&[&[0x82][..], &rid(&[3]), &short_uuid].concat()),
        malformed
    );

    // The body must be a map: the same fields as a positional array are malformed.
    let arr = [&[0x92, 0x03][..], &uuid_kv[5..]].concat();
    assert_eq!(hb(&arr), malformed);

    // Nesting: the body map plus 6 levels in an unknown field is fine, one more is malformed.
    let nested = |levels: usize| {
        let mut v = vec![0xa1, b'x'];
        v.extend(std::iter::repeat_n(0x91, levels));
        v.push(0xc0);
        hb(&[&[0x83][..], &rid(&[3]), &v, &uuid_kv].concat())
    };
    assert_eq!(nested(6), want);
    assert_eq!(nested(7), malformed);

    // Migrate's `to` may be absent.
    let mut d = b"SR\x01\x92\x81\xa4push\x04".to_vec();
    d.extend_from_slice(&[0; MAC_LEN]);
    assert_eq!(
        decode(&d),
        Ok(Message::Migrate(Migrate { push: 4, to: None }))
    );
}
