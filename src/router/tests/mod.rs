//! A simulated-time harness for the sans-IO router: tests drive [`Router`] directly with
//! hand-made datagrams from any source address (IPv4 and IPv6) and a fake clock, and assert the
//! exact datagrams (byte for byte: the expected message is encoded and compared) and jobs in
//! the [`Outbox`]. No sockets, no sleeps: time moves only when a test calls
//! [`Sim::advance`].
//!
//! Cluster-mode routers get a [`Cluster`] whose Redis is never contacted (jobs are completed
//! by the test, as `jobs::run` would) and a node table the test writes; node-to-node
//! datagrams are carried between two `Sim`s by hand.

mod abuse;
mod connect;
mod dedup;
mod hello;
mod limits;
mod moves;
mod peer;
mod pushes;
mod whohas;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigrouter_proto::{self as proto, Addr, Message, Secret};
use uuid::Uuid;

use super::{Job, Outbox, Router, Transmit};
use crate::cluster::{wire, Cluster, NodeInfo, NodeState, PresenceOp};
use crate::config::{ClusterConfig, Config};
use crate::metrics::Metrics;
use crate::store::Store;

/// The cluster key of simulated clusters.
pub(super) const KEY: [u8; 32] = [7; 32];

/// A client source address: 192.0.2.`n`:`port` (documentation range).
pub(super) fn v4(n: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), port)
}

/// A client source address: 2001:db8::`n`, port `port`.
pub(super) fn v6(n: u16, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n)),
        port,
    )
}

/// The internal address of simulated node `n`.
pub(super) fn node_addr(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)), 7500)
}

/// Limits high enough that only tests about limits meet them.
pub(super) fn config() -> Config {
    Config {
        register_rate: 10_000,
        register_burst: 10_000,
        session_rate: 10_000,
        session_burst: 10_000,
        new_session_rate: 1_000_000,
        new_session_burst: 1_000_000,
        ..Config::default()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// One simulated node.
pub(super) struct Sim {
    pub(super) router: Router,
    pub(super) now: Instant,
    pub(super) cfg: Config,
    /// Presence writes the router queued (cluster mode).
    presence: Option<crate::cluster::PresenceRx>,
}

impl Sim {
    /// A single node with the test limits.
    pub(super) fn new() -> Self {
        Self::with(config())
    }

    /// A single node with `cfg`.
    pub(super) fn with(cfg: Config) -> Self {
        Self {
            router: Router::new(&cfg, Metrics::new(), None),
            now: Instant::now(),
            cfg,
            presence: None,
        }
    }

    /// Node `id` (internal address [`node_addr`]`(n)`) of a cluster; the node table holds it
    /// and `others`.
    pub(super) fn node(id: &str, n: u8, others: &[(&str, u8)]) -> Self {
        let mut cfg = config();
        let mut cc = ClusterConfig::new("redis://127.0.0.1:1/", id, node_addr(n), KEY.to_vec());
        cc.public_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)), 7400);
        cfg.cluster = Some(cc.clone());
        let metrics = Metrics::new();
        // The lazy Redis handle wants a runtime to exist; it is never driven, and Redis is
        // never contacted.
        let _rt = runtime().enter();
        let store = Store::open(&cc.redis_url, cc.redis_timeout, metrics.clone()).expect("lazy");
        let (cluster, rx) = Cluster::new(cc, Arc::new(store), metrics.clone());
        let sim = Self {
            router: Router::new(&cfg, metrics, Some(cluster)),
            now: Instant::now(),
            cfg,
            presence: Some(rx),
        };
        let mut table = vec![(id, n)];
        table.extend_from_slice(others);
        sim.set_table(&table, &[]);
        sim
    }

    /// Writes the node table: active nodes, then draining ones.
    pub(super) fn set_table(&self, active: &[(&str, u8)], draining: &[(&str, u8)]) {
        let rec = |(id, n): (&str, u8), state| NodeInfo {
            id: id.to_string(),
            public: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)), 7400),
            internal: node_addr(n),
            state,
            version: "test".into(),
            sessions: 0,
            started_ms: 0,
            expires_ms: u64::MAX,
        };
        let nodes = active
            .iter()
            .map(|a| rec(*a, NodeState::Active))
            .chain(draining.iter().map(|d| rec(*d, NodeState::Draining)))
            .collect();
        self.cluster().store_table(nodes);
    }

    pub(super) fn cluster(&self) -> &Arc<Cluster> {
        self.router.cluster().expect("cluster mode")
    }

    /// Moves the fake clock forward.
    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// A client datagram from `src`.
    pub(super) fn recv(&self, src: SocketAddr, bytes: &[u8]) -> Outbox {
        let mut out = Outbox::default();
        self.router.handle(self.now, src, bytes, &mut out);
        out
    }

    /// A node-to-node datagram.
    pub(super) fn recv_node(&self, t: &Transmit, from: SocketAddr) -> Outbox {
        let mut out = Outbox::default();
        self.router
            .handle_internal(self.now, from, &t.bytes, &mut out);
        out
    }

    /// One run of the timer.
    pub(super) fn tick(&self) -> Outbox {
        let mut out = Outbox::default();
        self.router.tick(self.now, &mut out);
        out
    }

    /// One run of the slow sweep: the sessions it expired and what it sent.
    pub(super) fn sweep(&self) -> (Vec<Uuid>, Outbox) {
        let mut out = Outbox::default();
        let gone = self.router.sweep(self.now, &mut out);
        (gone, out)
    }

    /// Presence writes queued since the last call.
    pub(super) fn presence_ops(&mut self) -> Vec<PresenceOp> {
        let mut v = Vec::new();
        if let Some(rx) = &mut self.presence {
            while let Ok((op, _)) = rx.try_recv() {
                v.push(op);
            }
        }
        v
    }

    /// A counter or gauge from the node's own metrics (`name` with its labels, as rendered).
    pub(super) fn metric(&self, name: &str) -> f64 {
        let text = self.router.metrics().render();
        text.lines()
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name).then(|| v.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Registers a client from `addr` announcing `local` addresses.
    pub(super) fn register(&self, addr: SocketAddr, local: Vec<Addr>) -> Client {
        let bytes = register_datagram(1, local.clone());
        let out = self.recv(addr, &bytes);
        let t = only_client(&out);
        assert_eq!(t.to, addr);
        let Ok(Message::Registered(r)) = proto::decode(&t.bytes) else {
            panic!("expected Registered, got {:?}", proto::decode(&t.bytes));
        };
        let c = Client {
            uuid: r.uuid,
            secret: r.secret,
            addr,
            local,
            rid: 1,
        };
        assert_eq!(
            t.bytes,
            proto::encode(&self.registered(&c, 1, addr), None).unwrap()
        );
        c
    }

    /// The exact Registered this node sends `c` for request `rid` from `from`.
    pub(super) fn registered(&self, c: &Client, rid: u64, from: SocketAddr) -> Message {
        Message::Registered(proto::Registered {
            rid,
            uuid: c.uuid,
            secret: c.secret,
            observed: Addr(from),
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u32,
            ttl_ms: self.cfg.session_ttl.as_millis() as u32,
        })
    }
}

/// A padded Register datagram.
pub(super) fn register_datagram(rid: u64, local: Vec<Addr>) -> Vec<u8> {
    let mut m = Message::Register(proto::Register {
        rid,
        local,
        pad: vec![],
    });
    proto::encode_hello(&mut m).unwrap()
}

/// A padded Resume datagram.
pub(super) fn resume_datagram(c: &Client, rid: u64, secret: Secret) -> Vec<u8> {
    let mut m = Message::Resume(proto::Resume {
        rid,
        uuid: c.uuid,
        secret,
        local: c.local.clone(),
        pad: vec![],
    });
    proto::encode_hello(&mut m).unwrap()
}

/// A registered client, as it would hold its session.
#[derive(Clone, Debug)]
pub(super) struct Client {
    pub(super) uuid: Uuid,
    pub(super) secret: Secret,
    pub(super) addr: SocketAddr,
    pub(super) local: Vec<Addr>,
    /// Last request id used.
    pub(super) rid: u64,
}

impl Client {
    /// The next request id.
    pub(super) fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    /// `m` encoded and MAC'd with this client's secret.
    pub(super) fn sign(&self, m: &Message) -> Vec<u8> {
        proto::encode(m, Some(&self.secret)).unwrap()
    }

    /// The exact bytes this client should receive for `m` (MAC'd with its secret).
    pub(super) fn expect(&self, m: &Message) -> Vec<u8> {
        self.sign(m)
    }

    /// The exact `SessionError` this client should receive for request `rid`.
    pub(super) fn error(&self, rid: u64, code: proto::ErrorCode) -> Vec<u8> {
        self.expect(&Message::SessionError(proto::ErrorMsg::new(rid, code)))
    }

    pub(super) fn heartbeat(&self, rid: u64) -> Vec<u8> {
        self.sign(&Message::Heartbeat(proto::Heartbeat {
            rid,
            uuid: self.uuid,
        }))
    }

    pub(super) fn connect(&self, rid: u64, to: Uuid, payload: &[u8]) -> Vec<u8> {
        self.sign(&Message::Connect(proto::Connect {
            rid,
            uuid: self.uuid,
            to,
            payload: payload.to_vec().into(),
        }))
    }

    pub(super) fn accept(&self, rid: u64, conn: Uuid, payload: &[u8]) -> Vec<u8> {
        self.sign(&Message::Accept(proto::Answer {
            rid,
            uuid: self.uuid,
            connection: conn,
            payload: payload.to_vec().into(),
        }))
    }

    pub(super) fn reject(&self, rid: u64, conn: Uuid, payload: &[u8]) -> Vec<u8> {
        self.sign(&Message::Reject(proto::Answer {
            rid,
            uuid: self.uuid,
            connection: conn,
            payload: payload.to_vec().into(),
        }))
    }

    pub(super) fn signal(&self, rid: u64, conn: Uuid, payload: &[u8]) -> Vec<u8> {
        self.sign(&Message::Signal(proto::Signal {
            rid,
            uuid: self.uuid,
            connection: conn,
            payload: payload.to_vec().into(),
        }))
    }

    pub(super) fn query(&self, rid: u64, uuids: Vec<Uuid>) -> Vec<u8> {
        self.sign(&Message::Query(proto::Query {
            rid,
            uuid: self.uuid,
            uuids,
        }))
    }

    pub(super) fn bye(&self, rid: u64) -> Vec<u8> {
        self.sign(&Message::Bye(proto::Bye {
            rid,
            uuid: self.uuid,
        }))
    }

    pub(super) fn push_ack(&self, push: u64) -> Vec<u8> {
        self.sign(&Message::PushAck(proto::PushAck {
            uuid: self.uuid,
            push,
        }))
    }
}

/// The one client datagram in `out` (nothing else may be there).
pub(super) fn only_client(out: &Outbox) -> &Transmit {
    assert_eq!(out.client.len(), 1, "client datagrams: {:?}", decoded(out));
    assert!(out.cluster.is_empty() && out.jobs.is_empty(), "{out:?}");
    &out.client[0]
}

/// The one node-to-node datagram in `out` (nothing else may be there).
pub(super) fn only_node(out: &Outbox) -> &Transmit {
    assert_eq!(out.cluster.len(), 1, "{out:?}");
    assert!(out.client.is_empty() && out.jobs.is_empty(), "{out:?}");
    &out.cluster[0]
}

/// The one job in `out` (nothing else may be there).
pub(super) fn only_job(out: &Outbox) -> &Job {
    assert_eq!(out.jobs.len(), 1, "{out:?}");
    assert!(out.client.is_empty() && out.cluster.is_empty(), "{out:?}");
    &out.jobs[0]
}

/// Asserts `out` holds exactly these client datagrams, in this order.
pub(super) fn assert_client(out: &Outbox, expected: &[(SocketAddr, Vec<u8>)]) {
    let got: Vec<(SocketAddr, Vec<u8>)> = out
        .client
        .iter()
        .map(|t| (t.to, t.bytes.to_vec()))
        .collect();
    assert!(
        got == expected,
        "got {:?}\nexpected {:?}",
        decoded(out),
        expected
            .iter()
            .map(|(a, b)| (*a, proto::decode(b)))
            .collect::<Vec<_>>()
    );
    assert!(out.cluster.is_empty() && out.jobs.is_empty(), "{out:?}");
}

/// The client datagrams of `out`, decoded (for failure messages).
pub(super) fn decoded(out: &Outbox) -> Vec<(SocketAddr, Result<Message, proto::DecodeError>)> {
    out.client
        .iter()
        .map(|t| (t.to, proto::decode(&t.bytes)))
        .collect()
}

/// The message of a client datagram (MAC not checked: see [`Client::expect`]).
pub(super) fn msg(t: &Transmit) -> Message {
    proto::decode(&t.bytes).expect("the router sends only valid datagrams")
}

/// An unauthenticated Error (the answer to Register, Resume, or a request from an unknown
/// session).
pub(super) fn error(rid: u64, code: proto::ErrorCode) -> Vec<u8> {
    proto::encode(&Message::Error(proto::ErrorMsg::new(rid, code)), None).unwrap()
}

/// Opens a node-to-node datagram addressed to node `to`.
pub(super) fn open_envelope(t: &Transmit) -> wire::Envelope {
    wire::decode(&t.bytes, &KEY).expect("a valid node datagram")
}
