//! The Register and Resume datagrams the raw-socket load tools send: padded as the protocol
//! requires, no local addresses, no address-validation token (the tools run against nodes
//! started with `--address-validation never`).

use sigrouter_proto::{self as proto, Message, Secret};
use uuid::Uuid;

/// A Register (`resume` is `None`) or a Resume of `(uuid, secret)`, encoded with request id
/// `rid`.
pub(crate) fn hello(rid: u64, resume: Option<(Uuid, Secret)>) -> Vec<u8> {
    let mut m = match resume {
        None => Message::Register(proto::Register {
            rid,
            local: vec![],
            token: Vec::new(),
            pad: vec![],
        }),
        Some((uuid, secret)) => Message::Resume(proto::Resume {
            rid,
            uuid,
            secret,
            local: vec![],
            token: Vec::new(),
            pad: vec![],
        }),
    };
    proto::encode_hello(&mut m).expect("a hello without local addresses always encodes")
}
