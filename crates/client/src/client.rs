//! The public handle.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sigrouter_proto::{
    Answer, Bye, Connect, Message, Payload, Query, Secret, Signal, MAX_PAYLOAD, MAX_QUERY,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::DropGuard;
use uuid::Uuid;

use crate::config::ClientConfig;
use crate::driver::Driver;
use crate::error::ClientError;
use crate::event::{ConnectOutcome, Events};
use crate::shared::{Hello, Shared};
use crate::supervisor;
use crate::walk::Walk;

/// Events the application has not read yet. Past this, pushes wait at the router.
const EVENT_QUEUE: usize = 1024;

/// A registered session with a router. Cheap to clone; every clone drives the same session.
/// Background tasks (socket, heartbeats, resumes) run until [`close`](Self::close),
/// [`bye`](Self::bye), or until the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _stop_on_last_drop: Arc<DropGuard>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.shared.session();
        f.debug_struct("Client")
            .field("uuid", &s.uuid)
            .field("server", &s.server)
            .field("local", &s.local)
            .finish_non_exhaustive()
    }
}

/// The IP this host would use to reach `server`: connecting a UDP socket sends nothing, it
/// only asks the routing table.
fn route_ip(cfg: &ClientConfig) -> Option<IpAddr> {
    let mut bind = cfg.bind_addr();
    bind.set_port(0);
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(cfg.server).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

fn check_payload(p: &[u8]) -> Result<Payload, ClientError> {
    if p.len() > MAX_PAYLOAD {
        return Err(ClientError::PayloadTooLarge);
    }
    Ok(Payload::from(p.to_vec()))
}

fn expect_ack(m: Message) -> Result<(), ClientError> {
    match m {
        Message::Ack(_) => Ok(()),
        _ => Err(ClientError::Unexpected("expected Ack")),
    }
}

impl Client {
    /// Registers a new session at `cfg.server` and starts heartbeating.
    pub async fn register(cfg: ClientConfig) -> Result<(Self, Events), ClientError> {
        Self::start(cfg, Hello::Register).await
    }

    /// Takes back an existing session (for example after a process restart), keeping its
    /// UUID. Fails with [`ClientError::Server`]`(Unauthorized)` if the router does not know it.
    pub async fn resume(
        cfg: ClientConfig,
        uuid: Uuid,
        secret: Secret,
    ) -> Result<(Self, Events), ClientError> {
        Self::start(cfg, Hello::Resume { uuid, secret }).await
    }

    async fn start(cfg: ClientConfig, hello: Hello) -> Result<(Self, Events), ClientError> {
        let socket = UdpSocket::bind(cfg.bind_addr()).await?;
        let local = socket.local_addr()?;
        let route = route_ip(&cfg);
        let (out_tx, out_rx) = mpsc::channel(256);
        let (sup_tx, sup_rx) = mpsc::channel(16);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let within = cfg.request_timeout;
        let shared = Arc::new(Shared::new(cfg, local, route, out_tx, sup_tx));
        shared
            .tracker
            .spawn(Driver::new(shared.clone(), socket, out_rx, ev_tx.clone()).run());
        let client = Self {
            _stop_on_last_drop: Arc::new(shared.shutdown.clone().drop_guard()),
            shared,
        };
        // The configured servers in order; one that says Draining is not asked again, the
        // address it names is asked next.
        let walk = Walk::new(None, None, &client.shared.cfg.servers(), &[]);
        let deadline = Instant::now() + within;
        let register_if_gone = false;
        let registered = client
            .shared
            .guarded(client.shared.walk(
                hello,
                walk,
                Some(deadline),
                false,
                register_if_gone,
                |_, _| {},
            ))
            .await;
        if let Err(e) = registered {
            client.close().await;
            return Err(e);
        }
        let shared = client.shared.clone();
        client
            .shared
            .tracker
            .spawn(supervisor::run(shared, sup_rx, ev_tx));
        Ok((client, Events { rx: ev_rx }))
    }

    /// The session's UUID: what peers connect to. Stable across migrations and re-homes
    /// (it changes only after [`Event::Reregistered`](crate::Event::Reregistered)).
    pub fn uuid(&self) -> Uuid {
        self.shared.session().uuid
    }

    /// The session secret. Keep it to [`resume`](Self::resume) later; never log it.
    pub fn secret(&self) -> Secret {
        self.shared
            .session()
            .secret
            .expect("a Client exists only after registration")
    }

    /// Our public address as the router last saw it.
    pub fn observed(&self) -> SocketAddr {
        let s = self.shared.session();
        s.observed.unwrap_or(s.local)
    }

    /// Our local UDP address: the current port, with the IP used to reach the router when the
    /// socket is bound to a wildcard address. Changes on migration and re-home.
    pub fn local_addr(&self) -> SocketAddr {
        let s = self.shared.session();
        self.shared.local_addr(&s)
    }

    /// The router address currently holding the session.
    pub fn server(&self) -> SocketAddr {
        self.shared.session().server
    }

    /// Test hook: changes the simulated loss rates (see [`ClientConfig::drop_inbound`]) while
    /// the client runs, for example to make heartbeats go unanswered.
    pub fn set_simulated_loss(&self, inbound: f64, outbound: f64) {
        self.shared.set_drop_rates(inbound, outbound);
    }

    /// One application request, waiting for a free in-flight slot first (the wait counts
    /// against the deadline).
    async fn call(
        &self,
        connect: bool,
        build: impl Fn(u64, Uuid) -> Message,
    ) -> Result<Message, ClientError> {
        let cfg = &self.shared.cfg;
        let within = if connect {
            cfg.connect_timeout
        } else {
            cfg.request_timeout
        };
        let deadline = Instant::now() + within;
        self.shared
            .guarded(async {
                let _slot = timeout_at(deadline, self.shared.in_flight.acquire())
                    .await
                    .map_err(|_| ClientError::Timeout)?
                    .map_err(|_| ClientError::Closed)?;
                let left = deadline.saturating_duration_since(Instant::now());
                self.shared.request(left, true, build).await
            })
            .await
    }

    /// Sends one heartbeat now (besides the automatic ones) and returns the observed address.
    pub async fn heartbeat(&self) -> Result<SocketAddr, ClientError> {
        let m = self
            .call(false, |rid, uuid| {
                Message::Heartbeat(sigrouter_proto::Heartbeat { rid, uuid })
            })
            .await?;
        let Message::HeartbeatAck(a) = m else {
            return Err(ClientError::Unexpected("expected HeartbeatAck"));
        };
        self.shared.update(|s| s.observed = Some(a.observed.0));
        Ok(a.observed.0)
    }

    /// Which of `uuids` are online, in order. Lists longer than
    /// [`MAX_QUERY`] are asked in several requests.
    pub async fn query(&self, uuids: &[Uuid]) -> Result<Vec<bool>, ClientError> {
        let mut online = Vec::with_capacity(uuids.len());
        for chunk in uuids.chunks(MAX_QUERY) {
            let m = self
                .call(false, |rid, uuid| {
                    Message::Query(Query {
                        rid,
                        uuid,
                        uuids: chunk.to_vec(),
                    })
                })
                .await?;
            match m {
                Message::QueryResult(r) if r.online.len() == chunk.len() => online.extend(r.online),
                _ => return Err(ClientError::Unexpected("expected QueryResult")),
            }
        }
        Ok(online)
    }

    /// Asks to connect to `to`, handing it `payload`. Waits until the target accepts or
    /// rejects, or the router gives up (up to [`ClientConfig::connect_timeout`]).
    pub async fn connect(&self, to: Uuid, payload: &[u8]) -> Result<ConnectOutcome, ClientError> {
        let payload = check_payload(payload)?;
        let m = self
            .call(true, |rid, uuid| {
                Message::Connect(Connect {
                    rid,
                    uuid,
                    to,
                    payload: payload.clone(),
                })
            })
            .await?;
        match m {
            Message::Connected(c) => Ok(ConnectOutcome::Connected {
                connection: c.connection,
                peer: c.peer,
                observed: c.observed.0,
                local: c.local.iter().map(|a| a.0).collect(),
                payload: c.payload.into_vec(),
            }),
            Message::ConnectFailed(f) => Ok(ConnectOutcome::Failed {
                reason: f.reason,
                payload: f.payload.into_vec(),
            }),
            _ => Err(ClientError::Unexpected(
                "expected Connected or ConnectFailed",
            )),
        }
    }

    async fn answer(
        &self,
        accept: bool,
        connection: Uuid,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let payload = check_payload(payload)?;
        let m = self
            .call(false, |rid, uuid| {
                let a = Answer {
                    rid,
                    uuid,
                    connection,
                    payload: payload.clone(),
                };
                if accept {
                    Message::Accept(a)
                } else {
                    Message::Reject(a)
                }
            })
            .await?;
        expect_ack(m)
    }

    /// Accepts an [`Event::Incoming`](crate::Event::Incoming) connection, handing the initiator `payload`.
    pub async fn accept(&self, connection: Uuid, payload: &[u8]) -> Result<(), ClientError> {
        self.answer(true, connection, payload).await
    }

    /// Rejects an [`Event::Incoming`](crate::Event::Incoming) connection, handing the initiator `payload`.
    pub async fn reject(&self, connection: Uuid, payload: &[u8]) -> Result<(), ClientError> {
        self.answer(false, connection, payload).await
    }

    /// Relays `payload` to the peer of an established connection; returns once the router
    /// has taken it (it then pushes it to the peer, retransmitting as needed).
    pub async fn signal(&self, connection: Uuid, payload: &[u8]) -> Result<(), ClientError> {
        let payload = check_payload(payload)?;
        let m = self
            .call(false, |rid, uuid| {
                Message::Signal(Signal {
                    rid,
                    uuid,
                    connection,
                    payload: payload.clone(),
                })
            })
            .await?;
        expect_ack(m)
    }

    /// Ends the session at the router and stops the background tasks; later calls on any
    /// clone return [`ClientError::Closed`]. The session is gone even if this returns an
    /// error (the router expires it after missed heartbeats).
    pub async fn bye(&self) -> Result<(), ClientError> {
        // Stop heartbeats and resumes first, so nothing brings the session back.
        self.shared.supervisor_stop.cancel();
        let within = self.shared.cfg.request_timeout;
        let r = self
            .shared
            .guarded(
                self.shared
                    .request(within, false, |rid, uuid| Message::Bye(Bye { rid, uuid })),
            )
            .await;
        self.shared.shutdown.cancel();
        match r {
            Ok(m) => expect_ack(m),
            // Not held there: already gone, which is what we wanted.
            Err(ClientError::Server(sigrouter_proto::ErrorCode::UnknownSession)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops the background tasks without telling the router (the session stays until it
    /// expires, and can be resumed) and waits for them to finish.
    pub async fn close(self) {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}
