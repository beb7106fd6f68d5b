//! What the client tells the application without being asked.

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_proto::FailReason;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Something that happened to the session: a server push, or the client moving itself.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Another client wants to connect. Answer with [`Client::accept`](crate::Client::accept)
    /// or [`Client::reject`](crate::Client::reject) before the router's connect timeout.
    Incoming {
        /// The connection, for accept, reject and signal.
        connection: Uuid,
        /// The initiator's session UUID.
        from: Uuid,
        /// The initiator's address as the router sees it.
        observed: SocketAddr,
        /// The initiator's local addresses.
        local: Vec<SocketAddr>,
        /// The initiator's `Connect` payload.
        payload: Vec<u8>,
    },
    /// A signaling payload from the peer of a connection.
    Signal {
        /// The connection.
        connection: Uuid,
        /// The peer that sent it.
        from: Uuid,
        /// Opaque payload.
        payload: Vec<u8>,
    },
    /// The router asked the client to move; it rebound to a new local port and resumed at
    /// `to`, keeping its UUID.
    Migrated {
        /// The router address now holding the session.
        to: SocketAddr,
    },
    /// Heartbeats went unanswered; the client rebound to a new local port and resumed at the
    /// configured server address, keeping its UUID.
    Rehomed {
        /// The configured server address.
        server: SocketAddr,
    },
    /// The router no longer held the session (`UnknownSession`); the client resumed it at the
    /// same address, keeping its UUID.
    Resumed {
        /// The router address now holding the session.
        server: SocketAddr,
    },
    /// The session could not be resumed (it expired while the client was away) so the client
    /// registered a new one: peers must learn the new UUID.
    Reregistered {
        /// The new session UUID.
        uuid: Uuid,
    },
    /// No router took the session: every address the client knows (the one a router named,
    /// the configured servers, those routers named before) failed or said `Draining`. The
    /// client keeps trying, all of them again after `retry_in` (a capped, jittered pause that
    /// grows up to 10 s); a `Migrated` or `Rehomed` event says when one took it. Until then
    /// requests fail or wait.
    Stranded {
        /// The addresses tried in the round that failed, in order.
        tried: Vec<SocketAddr>,
        /// The pause before the next round.
        retry_in: Duration,
    },
    /// A heartbeat showed a new public address (the NAT mapping changed).
    ObservedChanged {
        /// The address the router now sees.
        observed: SocketAddr,
    },
}

/// The stream of [`Event`]s of one client. Read it, or drop it: while it is full, the client
/// stops acknowledging pushes (the router retransmits them later), so events are delayed
/// rather than lost.
#[derive(Debug)]
pub struct Events {
    pub(crate) rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client is closed and every event has been read.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// The answer to [`Client::connect`](crate::Client::connect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// The target accepted.
    Connected {
        /// The connection, for [`Client::signal`](crate::Client::signal).
        connection: Uuid,
        /// The peer's session UUID.
        peer: Uuid,
        /// The peer's address as the router sees it.
        observed: SocketAddr,
        /// The peer's local addresses.
        local: Vec<SocketAddr>,
        /// The peer's `Accept` payload.
        payload: Vec<u8>,
    },
    /// No connection.
    Failed {
        /// Why. `RetryLater` only once [`ClientConfig::connect_timeout`] has passed: until then
        /// the client retries it by itself.
        ///
        /// [`ClientConfig::connect_timeout`]: crate::ClientConfig::connect_timeout
        reason: FailReason,
        /// The target's `Reject` payload (empty otherwise).
        payload: Vec<u8>,
    },
}
