//! Shared helpers for integration tests: a real node on a free loopback port and a raw UDP
//! client that crafts datagrams with the protocol codec (no mocks anywhere).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sigrouter::proto::{self, Message, Secret};
use sigrouter::server::Server;
use sigrouter::Config;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A node running in this process until dropped.
pub struct Node {
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub router: std::sync::Arc<sigrouter::router::Router>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        ..Config::default()
    }
}

impl Node {
    pub async fn start(cfg: Config) -> Self {
        let server = Server::bind(cfg).await.expect("bind");
        let addr = server.local_addr();
        let metrics = server.metrics_addr();
        let router = server.router();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            metrics,
            router,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A hand-driven client: one socket, explicit request ids, every datagram visible.
pub struct Raw {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub uuid: Uuid,
    pub secret: Secret,
    pub observed: SocketAddr,
    pub rid: u64,
}

impl Raw {
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
        let reg = loop {
            match recv_msg(&sock, Duration::from_secs(5))
                .await
                .expect("Registered")
            {
                Message::Registered(r) => break r,
                other => panic!("expected Registered, got {other:?}"),
            }
        };
        Self {
            sock,
            server,
            uuid: reg.uuid,
            secret: reg.secret,
            observed: reg.observed.0,
            rid: 1,
        }
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

    /// Next message that carries a valid MAC (or is unauthenticated), within `t`.
    pub async fn recv(&self, t: Duration) -> Option<Message> {
        let deadline = Instant::now() + t;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (n, _) = tokio::time::timeout(left, self.sock.recv_from(&mut buf))
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
            return Some(m);
        }
    }

    /// Receives until `f` accepts a message (acknowledging pushes on the way) or `t` passes.
    pub async fn recv_until<T>(
        &self,
        t: Duration,
        mut f: impl FnMut(&Message) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let m = self.recv(left).await?;
            if let Some(p) = m.push_id() {
                self.ack(p).await;
            }
            if let Some(v) = f(&m) {
                return Some(v);
            }
        }
    }

    pub async fn ack(&self, push: u64) {
        self.send(&Message::PushAck(proto::PushAck {
            uuid: self.uuid,
            push,
        }))
        .await;
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

/// Polls `f` until it is true or `t` passes; returns whether it became true.
pub async fn eventually(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
