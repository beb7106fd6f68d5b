//! Client settings.

use std::net::SocketAddr;
use std::time::Duration;

/// How a [`Client`](crate::Client) reaches and stays with a router. Start from
/// [`ClientConfig::new`] and change fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The router's public address (a load balancer, or one node). Re-homing comes back here
    /// first.
    pub server: SocketAddr,
    /// More router addresses to try, in order, after [`server`](Self::server) when
    /// registering, re-homing or migrating (for example the other nodes of a cluster without
    /// a load balancer in front): when `server` does not answer or says `Draining`, and when
    /// a `Migrate` names no address. Empty by default.
    pub fallback_servers: Vec<SocketAddr>,
    /// Local address to bind. `None` binds the wildcard address of the server's family on an
    /// ephemeral port. Rebinds (migrate, re-home, draining) keep the IP and take a new port.
    pub bind: Option<SocketAddr>,
    /// Local (LAN) addresses announced to peers for same-network hole punching, at most
    /// [`MAX_LOCAL_ADDRS`](sigrouter_proto::MAX_LOCAL_ADDRS). Empty announces the address this
    /// host uses to reach the server, with the client's current port.
    pub local_addrs: Vec<SocketAddr>,
    /// Consecutive unanswered heartbeats after which the client rebinds and resumes at
    /// [`server`](Self::server).
    pub missed_acks_before_rehome: u32,
    /// Overall deadline of one request (retransmissions and retries after `retry-later` or
    /// `RateLimited` included), except `Connect`.
    pub request_timeout: Duration,
    /// Overall deadline of a `Connect`, retries after `retry-later` included; longer than the
    /// router's own connect timeout (10 s by default), since the router answers only once the
    /// target has decided.
    pub connect_timeout: Duration,
    /// First retransmission timeout of a request; doubles after each retransmission.
    pub initial_rto: Duration,
    /// Largest retransmission timeout.
    pub max_rto: Duration,
    /// Test hook: probability in `[0, 1]` of dropping each received datagram, as if lost on
    /// the way. Deterministic (seeded by [`loss_seed`](Self::loss_seed)).
    pub drop_inbound: f64,
    /// Test hook: probability in `[0, 1]` of dropping each datagram instead of sending it.
    pub drop_outbound: f64,
    /// Seed of the simulated-loss generator.
    pub loss_seed: u64,
}

impl ClientConfig {
    /// Defaults for `server`: 3 missed heartbeats before re-homing, 5 s per request, 12 s per
    /// connect, retransmissions at 250 ms doubling to 2 s, no simulated loss.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            fallback_servers: Vec::new(),
            bind: None,
            local_addrs: Vec::new(),
            missed_acks_before_rehome: 3,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(12),
            initial_rto: Duration::from_millis(250),
            max_rto: Duration::from_secs(2),
            drop_inbound: 0.0,
            drop_outbound: 0.0,
            loss_seed: 0x5167_5eed,
        }
    }

    /// Every router address, the configured one first.
    pub(crate) fn servers(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.server];
        v.extend(
            self.fallback_servers
                .iter()
                .copied()
                .filter(|a| *a != self.server),
        );
        v
    }

    /// The address the first socket binds.
    pub(crate) fn bind_addr(&self) -> SocketAddr {
        self.bind.unwrap_or_else(|| match self.server {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        })
    }
}
