//! A hand-driven client: one socket, explicit request ids, every datagram visible.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sigrouter::proto::{self, Message, Payload, Secret};
use tokio::net::UdpSocket;
use uuid::Uuid;

/// A hand-driven client: one socket, explicit request ids, every datagram visible.
pub struct Raw {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub uuid: Uuid,
    pub secret: Secret,
    pub observed: SocketAddr,
    pub rid: u64,
    /// Messages read while waiting for something else, handed out first by later reads.
    pub backlog: std::sync::Mutex<std::collections::VecDeque<Message>>,
}

impl Raw {
    /// A Raw client for an existing session on a given socket.
    pub fn with(
        sock: UdpSocket,
        server: SocketAddr,
        uuid: Uuid,
        secret: Secret,
        observed: SocketAddr,
        rid: u64,
    ) -> Self {
        Self {
            sock,
            server,
            uuid,
            secret,
            observed,
            rid,
            backlog: Default::default(),
        }
    }

    pub async fn socket() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// Registers over a fresh socket.
    pub async fn register(server: SocketAddr) -> Self {
        let sock = Self::socket().await;
        let mut m = Message::Register(proto::Register {
            rid: 1,
            local: vec![proto::Addr(sock.local_addr().unwrap())],
            pad: vec![],
        });
        let b = proto::encode_hello(&mut m).unwrap();
        sock.send_to(&b, server).await.unwrap();
        let reg = match recv_msg(&sock, Duration::from_secs(5))
            .await
            .expect("Registered")
        {
            Message::Registered(r) => r,
            other => panic!("expected Registered, got {other:?}"),
        };
        Self::with(sock, server, reg.uuid, reg.secret, reg.observed.0, 1)
    }

    pub fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    /// Encodes with this session's secret and sends.
    pub async fn send(&self, m: &Message) -> Vec<u8> {
        let b = proto::encode(m, Some(&self.secret)).unwrap();
        self.sock.send_to(&b, self.server).await.unwrap();
        b
    }

    /// Next message (the backlog first) that carries a valid MAC (or is unauthenticated),
    /// within `t`.
    pub async fn recv(&self, t: Duration) -> Option<Message> {
        if let Some(m) = self.backlog.lock().unwrap().pop_front() {
            return Some(m);
        }
        self.recv_socket(t).await
    }

    async fn recv_socket(&self, t: Duration) -> Option<Message> {
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(t, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        let b = &buf[..n];
        let m = proto::decode(b).expect("server sent a valid datagram");
        if m.ty().is_authenticated() {
            assert!(
                proto::verify_mac(b, &self.secret),
                "server datagram with a bad MAC"
            );
        }
        Some(m)
    }

    /// Receives until `f` accepts a message (acknowledging pushes on the way) or `t` passes.
    /// Messages `f` does not want stay in the backlog for later reads (cancel-safe: nothing
    /// is held outside the backlog across an await).
    pub async fn recv_until<T>(
        &self,
        t: Duration,
        mut f: impl FnMut(&Message) -> Option<T>,
    ) -> Option<T> {
        {
            let mut b = self.backlog.lock().unwrap();
            for i in 0..b.len() {
                if let Some(v) = f(&b[i]) {
                    b.remove(i);
                    return Some(v);
                }
            }
        }
        let deadline = Instant::now() + t;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let m = self.recv_socket(left).await?;
            if let Some(p) = m.push_id() {
                self.ack(p).await;
            }
            if let Some(v) = f(&m) {
                return Some(v);
            }
            let mut b = self.backlog.lock().unwrap();
            // Retransmitted pushes are kept once.
            if !b.contains(&m) {
                b.push_back(m);
            }
        }
        None
    }

    /// Everything that arrives within `window` (the backlog first), acknowledging pushes on
    /// the way: for checks that something did *not* arrive. The window always runs to its end.
    pub async fn collect(&self, window: Duration) -> Vec<Message> {
        let mut got: Vec<Message> = self.backlog.lock().unwrap().drain(..).collect();
        let deadline = Instant::now() + window;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(m) = self.recv_socket(left).await else {
                break;
            };
            if let Some(p) = m.push_id() {
                self.ack(p).await;
            }
            got.push(m);
        }
        got
    }

    pub async fn ack(&self, push: u64) {
        self.send(&Message::PushAck(proto::PushAck {
            uuid: self.uuid,
            push,
        }))
        .await;
    }

    /// Sends a Connect to `to` with a text payload; returns its request id.
    pub async fn send_connect(&mut self, to: Uuid, text: &str) -> u64 {
        let rid = self.next_rid();
        self.send(&Message::Connect(proto::Connect {
            rid,
            uuid: self.uuid,
            to,
            payload: payload(text),
        }))
        .await;
        rid
    }

    pub async fn heartbeat(&mut self) -> proto::HeartbeatAck {
        let rid = self.next_rid();
        self.send(&Message::Heartbeat(proto::Heartbeat {
            rid,
            uuid: self.uuid,
        }))
        .await;
        self.recv_until(Duration::from_secs(5), |m| match m {
            Message::HeartbeatAck(a) if a.rid == rid => Some(a.clone()),
            _ => None,
        })
        .await
        .expect("HeartbeatAck")
    }

    pub async fn query(&mut self, uuids: Vec<Uuid>) -> Vec<bool> {
        let rid = self.next_rid();
        self.send(&Message::Query(proto::Query {
            rid,
            uuid: self.uuid,
            uuids,
        }))
        .await;
        self.recv_until(Duration::from_secs(5), |m| match m {
            Message::QueryResult(a) if a.rid == rid => Some(a.online.clone()),
            _ => None,
        })
        .await
        .expect("QueryResult")
    }
}

/// Receives and decodes one datagram (no MAC check).
pub async fn recv_msg(sock: &UdpSocket, t: Duration) -> Option<Message> {
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(t, sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    proto::decode(&buf[..n]).ok()
}

/// A payload of the bytes of `s`.
pub fn payload(s: &str) -> Payload {
    Payload::from(s.as_bytes().to_vec())
}
