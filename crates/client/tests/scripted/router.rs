//! The scripted router: a plain UDP socket on 127.0.0.1 that speaks the real codec and answers
//! as each test says, and the helpers the tests build their scripts from.

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_client::{Client, ClientConfig, ErrorCode, Event, Events, FailReason, Secret};
use sigrouter_proto::{
    decode, encode, verify_mac, Addr, ConnectFailed, ErrorMsg, Incoming, Message, Payload,
    Registered, MIN_HELLO_LEN,
};
use tokio::net::UdpSocket;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

pub(crate) const WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Router {
    pub(crate) sock: UdpSocket,
    pub(crate) uuid: Uuid,
    pub(crate) secret: Secret,
}

impl Router {
    pub(crate) async fn new(uuid: Uuid, secret: Secret) -> Self {
        Self {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            uuid,
            secret,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// The next datagram: decoded message, raw bytes, sender.
    pub(crate) async fn recv(&self) -> (Message, Vec<u8>, SocketAddr) {
        self.recv_until(Instant::now() + WAIT)
            .await
            .expect("a datagram from the client")
    }

    /// The next datagram if one comes before `deadline`.
    pub(crate) async fn recv_until(
        &self,
        deadline: Instant,
    ) -> Option<(Message, Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        let b = buf[..n].to_vec();
        let m = decode(&b).expect("client sent a valid datagram");
        if m.ty().is_authenticated() {
            assert!(verify_mac(&b, &self.secret), "client MAC must verify");
        }
        Some((m, b, from))
    }

    pub(crate) async fn send(&self, m: &Message, to: SocketAddr) {
        let key = m.ty().is_authenticated().then_some(&self.secret);
        let b = encode(m, key).unwrap();
        self.sock.send_to(&b, to).await.unwrap();
    }

    pub(crate) async fn send_with_key(&self, m: &Message, key: &Secret, to: SocketAddr) {
        self.sock
            .send_to(&encode(m, Some(key)).unwrap(), to)
            .await
            .unwrap();
    }

    pub(crate) fn registered(&self, rid: u64, observed: SocketAddr) -> Message {
        Message::Registered(Registered {
            rid,
            uuid: self.uuid,
            secret: self.secret,
            observed: Addr(observed),
            heartbeat_ms: 60_000,
            ttl_ms: 180_000,
        })
    }

    /// Expects a PushAck for `push` from `from`.
    pub(crate) async fn expect_ack(&self, push: u64) -> SocketAddr {
        match self.recv().await {
            (Message::PushAck(a), _, from) => {
                assert_eq!((a.uuid, a.push), (self.uuid, push));
                from
            }
            (other, _, _) => panic!("expected PushAck {push}, got {other:?}"),
        }
    }
}

/// Registers a client at `r`, answering its Register by script.
pub(crate) async fn register(r: &Router, cfg: ClientConfig) -> (Client, Events, SocketAddr) {
    let reg = tokio::spawn(Client::register(cfg));
    let (m, bytes, from) = r.recv().await;
    let Message::Register(reg_msg) = m else {
        panic!("expected Register, got {m:?}")
    };
    assert!(bytes.len() >= MIN_HELLO_LEN, "Register must be padded");
    assert_eq!(
        reg_msg.local,
        vec![Addr(from)],
        "announces its local address"
    );
    r.send(&r.registered(reg_msg.rid, from), from).await;
    let (client, events) = reg.await.unwrap().expect("registered");
    assert_eq!(client.uuid(), r.uuid);
    assert_eq!(client.observed(), from);
    (client, events, from)
}

pub(crate) fn incoming(push: u64, connection: Uuid, payload: &[u8]) -> Message {
    Message::Incoming(Incoming {
        push,
        connection,
        from: Uuid::from_u128(7),
        observed: Addr("192.0.2.1:4000".parse().unwrap()),
        local: vec![Addr("10.0.0.7:4000".parse().unwrap())],
        payload: Payload::from(payload.to_vec()),
    })
}

pub(crate) async fn next_event(events: &mut Events) -> Event {
    timeout(WAIT, events.recv())
        .await
        .expect("an event")
        .expect("events open")
}

pub(crate) fn connect_failed(rid: u64, reason: FailReason) -> Message {
    Message::ConnectFailed(ConnectFailed {
        rid,
        reason,
        payload: Payload::default(),
    })
}

pub(crate) fn error(rid: u64, code: ErrorCode) -> Message {
    Message::Error(ErrorMsg::new(rid, code))
}

/// Runs `call` while the scripted router answers each request it receives with
/// `answer(request)` (`None`: silence). Returns the call's result, how long it took, and every
/// request received with the time since the call started.
pub(crate) async fn scripted<T: Send + 'static>(
    r: &Router,
    at: SocketAddr,
    call: impl std::future::Future<Output = T> + Send + 'static,
    mut answer: impl FnMut(&Message) -> Option<Message>,
) -> (T, Duration, Vec<(Duration, Message)>) {
    let started = Instant::now();
    let mut task = tokio::spawn(call);
    let mut seen = Vec::new();
    let result = loop {
        tokio::select! {
            done = &mut task => break done.unwrap(),
            (m, _, _) = r.recv() => {
                seen.push((started.elapsed(), m.clone()));
                if let Some(a) = answer(&m) {
                    r.send(&a, at).await;
                }
            }
        }
    };
    (result, started.elapsed(), seen)
}

/// The pause before retry `n` (0-based) after a refusal: 250 ms doubling to 2 s, times a
/// jitter factor in [0.5, 1.5). Returns (lowest, highest) with `slack` added on top for a busy
/// machine.
pub(crate) fn retry_pause_bounds(n: u32, slack: Duration) -> (Duration, Duration) {
    let base = Duration::from_millis(250 * 2u64.pow(n)).min(Duration::from_secs(2));
    (base / 2, base * 3 / 2 + slack)
}
