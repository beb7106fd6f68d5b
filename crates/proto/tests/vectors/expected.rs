//! The messages the document's vectors must decode to, by vector name, and the secrets and
//! identifiers they are built from.

use std::net::SocketAddr;

use sigrouter_proto::*;
use uuid::Uuid;

/// Secret of client A: bytes 0x01..=0x20.
pub(crate) fn secret_a() -> Secret {
    Secret(std::array::from_fn(|i| i as u8 + 0x01))
}

/// Secret of client B: bytes 0x21..=0x40.
pub(crate) fn secret_b() -> Secret {
    Secret(std::array::from_fn(|i| i as u8 + 0x21))
}

pub(crate) fn uuid_a() -> Uuid {
    Uuid::parse_str("aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa").unwrap()
}

pub(crate) fn uuid_b() -> Uuid {
    Uuid::parse_str("bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb").unwrap()
}

pub(crate) fn uuid_c() -> Uuid {
    Uuid::parse_str("cccccccc-cccc-4ccc-8ccc-cccccccccccc").unwrap()
}

pub(crate) fn v4() -> Addr {
    Addr("192.0.2.1:4000".parse::<SocketAddr>().unwrap())
}

pub(crate) fn v6() -> Addr {
    Addr("[2001:db8::1]:5000".parse::<SocketAddr>().unwrap())
}

pub(crate) fn payload(s: &str) -> Payload {
    Payload::from(s.as_bytes().to_vec())
}

/// One test vector: its name, which secret keys its MAC (if any), and the message.
pub(crate) struct Vector {
    pub(crate) name: &'static str,
    /// The fields, for the line above the block in the document.
    pub(crate) desc: &'static str,
    pub(crate) key: Option<(&'static str, Secret)>,
    pub(crate) msg: Message,
}

/// The expected messages, by vector name, in document order.
pub(crate) fn vectors() -> Vec<Vector> {
    let a = Some(("A", secret_a()));
    let b = Some(("B", secret_b()));
    // Register and Resume are built unpadded; `encode_hello` pads them to 256 bytes.
    let pad = |mut m: Message| {
        let len = encode_hello(&mut m).unwrap().len();
        assert!(len >= MIN_HELLO_LEN);
        m
    };
    vec![
        Vector {
            name: "register",
            desc: "Register{rid: 1, local: [192.0.2.1:4000, [2001:db8::1]:5000], pad: zeros up to 256 bytes}",
            key: None,
            msg: pad(Message::Register(Register {
                rid: 1,
                local: vec![v4(), v6()],
                pad: vec![],
            })),
        },
        Vector {
            name: "resume",
            desc: "Resume{rid: 2, uuid: A, secret: A's, local: [192.0.2.1:4000], pad: zeros up to 256 bytes}",
            key: None,
            msg: pad(Message::Resume(Resume {
                rid: 2,
                uuid: uuid_a(),
                secret: secret_a(),
                local: vec![v4()],
                pad: vec![],
            })),
        },
        Vector {
            name: "heartbeat",
            desc: "Heartbeat{rid: 3, uuid: A}, MAC'd by A",
            key: a,
            msg: Message::Heartbeat(Heartbeat {
                rid: 3,
                uuid: uuid_a(),
            }),
        },
        Vector {
            name: "query",
            desc: "Query{rid: 4, uuid: A, uuids: [B, C]}, MAC'd by A",
            key: a,
            msg: Message::Query(Query {
                rid: 4,
                uuid: uuid_a(),
                uuids: vec![uuid_b(), uuid_c()],
            }),
        },
        Vector {
            name: "connect",
            desc: "Connect{rid: 5, uuid: A, to: B, payload: \"hello\"}, MAC'd by A",
            key: a,
            msg: Message::Connect(Connect {
                rid: 5,
                uuid: uuid_a(),
                to: uuid_b(),
                payload: payload("hello"),
            }),
        },
        Vector {
            name: "accept",
            desc: "Accept{rid: 1000, uuid: B, connection: C, payload: \"ok\"}, MAC'd by B",
            key: b,
            msg: Message::Accept(Answer {
                rid: 1000,
                uuid: uuid_b(),
                connection: uuid_c(),
                payload: payload("ok"),
            }),
        },
        Vector {
            name: "reject",
            desc: "Reject{rid: 1001, uuid: B, connection: C, payload: \"busy\"}, MAC'd by B",
            key: b,
            msg: Message::Reject(Answer {
                rid: 1001,
                uuid: uuid_b(),
                connection: uuid_c(),
                payload: payload("busy"),
            }),
        },
        Vector {
            name: "signal",
            desc: "Signal{rid: 6, uuid: A, connection: C, payload: \"candidate\"}, MAC'd by A",
            key: a,
            msg: Message::Signal(Signal {
                rid: 6,
                uuid: uuid_a(),
                connection: uuid_c(),
                payload: payload("candidate"),
            }),
        },
        Vector {
            name: "bye",
            desc: "Bye{rid: 7, uuid: A}, MAC'd by A",
            key: a,
            msg: Message::Bye(Bye {
                rid: 7,
                uuid: uuid_a(),
            }),
        },
        Vector {
            name: "push_ack",
            desc: "PushAck{uuid: B, push: 1}, MAC'd by B",
            key: b,
            msg: Message::PushAck(PushAck {
                uuid: uuid_b(),
                push: 1,
            }),
        },
        Vector {
            name: "registered",
            desc: "Registered{rid: 1, uuid: A, secret: A's, observed: 192.0.2.1:4000, heartbeat_ms: 15000, ttl_ms: 45000}",
            key: None,
            msg: Message::Registered(Registered {
                rid: 1,
                uuid: uuid_a(),
                secret: secret_a(),
                observed: v4(),
                heartbeat_ms: 15_000,
                ttl_ms: 45_000,
            }),
        },
        Vector {
            name: "heartbeat_ack",
            desc: "HeartbeatAck{rid: 3, observed: 192.0.2.1:4000}, to A",
            key: a,
            msg: Message::HeartbeatAck(HeartbeatAck {
                rid: 3,
                observed: v4(),
            }),
        },
        Vector {
            name: "query_result",
            desc: "QueryResult{rid: 4, online: [true, false]}, to A",
            key: a,
            msg: Message::QueryResult(QueryResult {
                rid: 4,
                online: vec![true, false],
            }),
        },
        Vector {
            name: "connected",
            desc: "Connected{rid: 5, connection: C, peer: B, observed: [2001:db8::1]:5000, local: [192.0.2.1:4000], payload: \"ok\"}, to A",
            key: a,
            msg: Message::Connected(Connected {
                rid: 5,
                connection: uuid_c(),
                peer: uuid_b(),
                observed: v6(),
                local: vec![v4()],
                payload: payload("ok"),
            }),
        },
        Vector {
            name: "connect_failed",
            desc: "ConnectFailed{rid: 5, reason: Rejected (2), payload: \"busy\"}, to A",
            key: a,
            msg: Message::ConnectFailed(ConnectFailed {
                rid: 5,
                reason: FailReason::Rejected,
                payload: payload("busy"),
            }),
        },
        Vector {
            name: "ack",
            desc: "Ack{rid: 1000}, to B",
            key: b,
            msg: Message::Ack(Ack { rid: 1000 }),
        },
        Vector {
            name: "error",
            desc: "Error{rid: 2, code: RateLimited (4)}",
            key: None,
            msg: Message::Error(ErrorMsg {
                rid: 2,
                code: ErrorCode::RateLimited,
                to: None,
            }),
        },
        Vector {
            name: "error_draining",
            desc: "Error{rid: 2, code: Draining (7), to: [2001:db8::1]:5000}",
            key: None,
            msg: Message::Error(ErrorMsg {
                rid: 2,
                code: ErrorCode::Draining,
                to: Some(v6()),
            }),
        },
        Vector {
            name: "session_error",
            desc: "SessionError{rid: 3, code: RateLimited (4)}, to A",
            key: a,
            msg: Message::SessionError(ErrorMsg {
                rid: 3,
                code: ErrorCode::RateLimited,
                to: None,
            }),
        },
        Vector {
            name: "incoming",
            desc: "Incoming{push: 1, connection: C, from: A, observed: 192.0.2.1:4000, local: [[2001:db8::1]:5000], payload: \"hello\"}, to B",
            key: b,
            msg: Message::Incoming(Incoming {
                push: 1,
                connection: uuid_c(),
                from: uuid_a(),
                observed: v4(),
                local: vec![v6()],
                payload: payload("hello"),
            }),
        },
        Vector {
            name: "signal_push",
            desc: "SignalPush{push: 2, connection: C, from: A, payload: \"candidate\"}, to B",
            key: b,
            msg: Message::SignalPush(SignalPush {
                push: 2,
                connection: uuid_c(),
                from: uuid_a(),
                payload: payload("candidate"),
            }),
        },
        Vector {
            name: "migrate",
            desc: "Migrate{push: 3, to: [2001:db8::1]:5000}, to A",
            key: a,
            msg: Message::Migrate(Migrate {
                push: 3,
                to: Some(v6()),
            }),
        },
        Vector {
            name: "migrate_same_node",
            desc: "Migrate{push: 4, to: nil}, to A",
            key: a,
            msg: Message::Migrate(Migrate { push: 4, to: None }),
        },
    ]
}
