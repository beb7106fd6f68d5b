//! Hand-made datagrams, for tests of the router that must break the rules on purpose (a wrong
//! MAC, a repeated request id, a spoofed sender). Applications use [`Client`](crate::Client).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_proto::{
    decode, encode, encode_hello, verify_mac, DecodeError, EncodeError, Message, Register, Secret,
    MAX_DATAGRAM,
};
use tokio::net::UdpSocket;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

/// One datagram received by a [`RawClient`].
#[derive(Clone, Debug)]
pub struct Received {
    /// The decoded message, or why it did not decode.
    pub msg: Result<Message, DecodeError>,
    /// Whether it carries a valid MAC under the session secret.
    pub mac_ok: bool,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its sender.
    pub from: SocketAddr,
}

/// A bare socket with a registered session: no retransmission, no heartbeats, no push
/// acknowledgements; every datagram is the test's to send and read.
#[derive(Debug)]
pub struct RawClient {
    /// The socket.
    pub socket: UdpSocket,
    /// The router.
    pub server: SocketAddr,
    /// The session's UUID.
    pub uuid: Uuid,
    /// The session secret.
    pub secret: Secret,
}

fn enc(e: EncodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

impl RawClient {
    /// Binds `127.0.0.1:0` (or `[::1]:0`) and registers at `server`, sending `Register` up to
    /// five times, a second apart.
    pub async fn register(server: SocketAddr) -> io::Result<Self> {
        let bind: SocketAddr = if server.is_ipv4() {
            "127.0.0.1:0".parse().expect("literal")
        } else {
            "[::1]:0".parse().expect("literal")
        };
        let socket = UdpSocket::bind(bind).await?;
        let rid = u64::from(rand::random::<u32>());
        let mut m = Message::Register(Register {
            rid,
            local: Vec::new(),
            pad: Vec::new(),
        });
        let hello = encode_hello(&mut m).map_err(enc)?;
        let mut buf = vec![0u8; MAX_DATAGRAM + 512];
        for _ in 0..5 {
            socket.send_to(&hello, server).await?;
            let until = Instant::now() + Duration::from_secs(1);
            while let Ok(r) = timeout(
                until.saturating_duration_since(Instant::now()),
                socket.recv_from(&mut buf),
            )
            .await
            {
                let (n, _) = r?;
                match decode(&buf[..n]) {
                    Ok(Message::Registered(r)) if r.rid == rid => {
                        return Ok(Self {
                            socket,
                            server,
                            uuid: r.uuid,
                            secret: r.secret,
                        })
                    }
                    Ok(Message::Error(e)) if e.rid == rid => {
                        return Err(io::Error::other(format!(
                            "register refused: {}",
                            e.code.name()
                        )))
                    }
                    _ => {}
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no Registered"))
    }

    /// Encodes `msg` as a well-behaved client would: hellos padded, authenticated types
    /// MAC'd with this session's secret.
    pub fn encode(&self, msg: &Message) -> io::Result<Vec<u8>> {
        let mut m = msg.clone();
        match m {
            Message::Register(_) | Message::Resume(_) => encode_hello(&mut m),
            _ => encode(&m, Some(&self.secret)),
        }
        .map_err(enc)
    }

    /// Sends `msg` to the router, encoded by [`encode`](Self::encode).
    pub async fn send(&self, msg: &Message) -> io::Result<()> {
        let b = self.encode(msg)?;
        self.send_bytes(&b).await
    }

    /// Sends exactly these bytes to the router.
    pub async fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        self.socket.send_to(bytes, self.server).await.map(|_| ())
    }

    /// The next datagram, or `None` if nothing arrives within `wait`.
    pub async fn recv(&self, wait: Duration) -> io::Result<Option<Received>> {
        let mut buf = vec![0u8; MAX_DATAGRAM + 512];
        match timeout(wait, self.socket.recv_from(&mut buf)).await {
            Err(_) => Ok(None),
            Ok(r) => {
                let (n, from) = r?;
                let bytes = buf[..n].to_vec();
                Ok(Some(Received {
                    msg: decode(&bytes),
                    mac_ok: verify_mac(&bytes, &self.secret),
                    from,
                    bytes,
                }))
            }
        }
    }

    /// The first decoded message within `wait` for which `pred` holds; others are skipped.
    pub async fn recv_until(
        &self,
        wait: Duration,
        mut pred: impl FnMut(&Message) -> bool,
    ) -> io::Result<Option<Received>> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(left).await? {
                None => return Ok(None),
                Some(r) if r.msg.as_ref().is_ok_and(&mut pred) => return Ok(Some(r)),
                Some(_) => {}
            }
        }
    }
}
