//! The socket task: the only owner of the UDP socket. It sends what the handles and the
//! supervisor queue, receives, authenticates, routes answers to their waiters by request id,
//! acknowledges pushes and hands new ones to the application.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigrouter_proto::{
    decode, encode, verify_mac, Message, PushAck, Secret, MAC_LEN, MAX_DATAGRAM,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use uuid::Uuid;

use crate::event::Event;
use crate::loss::Loss;
use crate::shared::{DriverCmd, Shared, SupCmd};
use crate::window::{PushKey, PushWindow};

/// How long a push is remembered for duplicate suppression. The router retransmits a push for
/// about 8 s; the protocol asks clients to remember push ids for at least 10 s.
const PUSH_MEMORY: Duration = Duration::from_secs(30);
/// Most pushes remembered at once, whatever their age: bounds memory if the router floods us.
const PUSH_MEMORY_CAP: usize = 16_384;

pub(crate) struct Driver {
    shared: Arc<Shared>,
    socket: UdpSocket,
    rx: mpsc::Receiver<DriverCmd>,
    events: mpsc::Sender<Event>,
    window: PushWindow,
    loss_in: Loss,
    loss_out: Loss,
}

impl Driver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        socket: UdpSocket,
        rx: mpsc::Receiver<DriverCmd>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let seed = shared.cfg.loss_seed;
        Self {
            shared,
            socket,
            rx,
            events,
            window: PushWindow::new(PUSH_MEMORY, PUSH_MEMORY_CAP),
            loss_in: Loss::new(seed),
            loss_out: Loss::new(seed ^ 0xA5A5_A5A5_A5A5_A5A5),
        }
    }

    pub(crate) async fn run(mut self) {
        // Larger than any valid datagram, so oversized ones are seen whole and rejected.
        let mut buf = vec![0u8; MAX_DATAGRAM + 512];
        let shutdown = self.shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    None => break,
                    Some(DriverCmd::Send { to, bytes }) => self.send(to, &bytes).await,
                    Some(DriverCmd::Rebind { reply }) => {
                        let r = self.rebind().await;
                        let _ = reply.send(r);
                    }
                },
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        if let Some((to, ack)) = self.on_datagram(&buf[..n], from) {
                            self.send(to, &ack).await;
                        }
                    }
                    Err(e) => {
                        // Transient (an ICMP error reported on some platforms); do not spin.
                        tracing::debug!(error = %e, "recv failed");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                },
            }
        }
    }

    async fn send(&mut self, to: SocketAddr, bytes: &[u8]) {
        if self.loss_out.drop_next(self.shared.drop_rates().1) {
            return;
        }
        if let Err(e) = self.socket.send_to(bytes, to).await {
            // The request's retransmission timer covers it.
            tracing::debug!(error = %e, %to, "send failed");
        }
    }

    async fn rebind(&mut self) -> io::Result<SocketAddr> {
        let ip = self.socket.local_addr()?.ip();
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        // The old socket closes here: whatever the router sends to the old port is gone.
        self.socket = socket;
        self.shared.update(|s| s.local = local);
        tracing::debug!(%local, "rebound");
        Ok(local)
    }

    /// Handles one received datagram; returns a datagram to send back (a `PushAck`).
    fn on_datagram(&mut self, buf: &[u8], from: SocketAddr) -> Option<(SocketAddr, Vec<u8>)> {
        if self.loss_in.drop_next(self.shared.drop_rates().0) {
            return None;
        }
        let msg = match decode(buf) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, %from, "undecodable datagram dropped");
                return None;
            }
        };
        let s = self.shared.session();
        let ty = msg.ty();
        if ty.is_authenticated() {
            let secret = s.secret?;
            if !verify_mac(buf, &secret) {
                tracing::debug!(%from, ty = ty.name(), "bad MAC, dropped");
                return None;
            }
            if let Some(push) = msg.push_id() {
                let body = &buf[..buf.len() - MAC_LEN];
                return self.on_push(msg, push, body, from, s.uuid, secret);
            }
        } else if from != s.server {
            // Registered, Error and Retry carry no MAC: accept them only from the router we
            // asked.
            tracing::debug!(%from, ty = ty.name(), "unauthenticated datagram from a stranger");
            return None;
        }
        // A SessionError (its MAC verified above) is handled exactly like an Error.
        let msg = match msg {
            Message::SessionError(e) => Message::Error(e),
            m => m,
        };
        match &msg {
            Message::Registered(_)
            | Message::HeartbeatAck(_)
            | Message::QueryResult(_)
            | Message::Connected(_)
            | Message::ConnectFailed(_)
            | Message::Ack(_)
            | Message::Error(_)
            | Message::Retry(_) => {
                let rid = msg.rid()?;
                match self.shared.take_pending(rid) {
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    None => tracing::trace!(rid, "late or duplicate answer"),
                }
            }
            _ => tracing::debug!(
                ty = ty.name(),
                "client message type from the router, dropped"
            ),
        }
        None
    }

    /// Acknowledges a push (every copy of it) and surfaces it once. A push the application
    /// has no room for is not acknowledged: the router retransmits it later.
    fn on_push(
        &mut self,
        msg: Message,
        push: u64,
        body: &[u8],
        from: SocketAddr,
        uuid: Uuid,
        secret: Secret,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let ack = encode(&Message::PushAck(PushAck { uuid, push }), Some(&secret)).ok()?;
        let key = PushKey::new(push, body);
        if self.window.contains(&key) {
            tracing::trace!(push, "duplicate push acknowledged again");
            return Some((from, ack));
        }
        let delivered = match msg {
            Message::Incoming(m) => self.deliver(Event::Incoming {
                connection: m.connection,
                from: m.from,
                observed: m.observed.0,
                local: m.local.iter().map(|a| a.0).collect(),
                payload: m.payload.into_vec(),
            }),
            Message::SignalPush(m) => self.deliver(Event::Signal {
                connection: m.connection,
                from: m.from,
                payload: m.payload.into_vec(),
            }),
            Message::Migrate(m) => match self.shared.sup_tx.try_send(SupCmd::Migrate {
                to: m.to.map(|a| a.0),
                from,
            }) {
                Ok(()) | Err(TrySendError::Closed(_)) => true,
                Err(TrySendError::Full(_)) => false,
            },
            _ => true,
        };
        if !delivered {
            tracing::debug!(push, "no room for a push; not acknowledged");
            return None;
        }
        self.window.insert(key, Instant::now());
        Some((from, ack))
    }

    fn deliver(&self, ev: Event) -> bool {
        match self.events.try_send(ev) {
            // Nobody listens any more: acknowledge so the router stops retransmitting.
            Ok(()) | Err(TrySendError::Closed(_)) => true,
            Err(TrySendError::Full(_)) => false,
        }
    }
}
