//! sigrouter: a UDP signaling router for large fleets of peer-to-peer clients.
//!
//! A client registers over UDP and gets a server-assigned UUID; heartbeats keep it online.
//! Client A asks to connect to client B by UUID; the router tells both sides each other's
//! observed and local addresses (for UDP hole punching) and relays their signaling messages.
//! Many nodes run side by side; Redis says which node holds each client and which nodes exist,
//! and a request for a client on another node is forwarded there in one hop.
//!
//! # Layout
//! - [`config`]: one validated, immutable [`Config`] from flags and `SIGROUTER_*` variables.
//! - [`proto`] (the `sigrouter-proto` crate): the sans-IO wire codec, documented in
//!   `docs/PROTOCOL.md`.
//! - [`stun`]: sans-IO answers to STUN Binding requests on the client port.
//! - `session`: the session map (dashmap); returns clones, never guards.
//! - [`router`]: pure decisions: given a datagram, the time and the state, what to send where,
//!   and which lookups to defer. Never awaits.
//! - `net`: the only owner of sockets; feeds the router and sends what it decides.
//! - [`cluster`]: the node-table snapshot and its single refresher, presence, the registry
//!   publisher, node-to-node wire format, and the deferred jobs that await Redis.
//! - [`store`]: Redis I/O with deadlines: the only place that awaits Redis.
//! - [`server`]: wires the parts together, owns every task, drains and shuts down.
//! - [`metrics`]: metric names, descriptions and the `/metrics`, `/healthz`, `/readyz` endpoint.
//!
//! # Locking rules
//! Nothing on the request path holds a lock, a map guard or an `arc_swap::Guard` across an
//! `.await`: the router is synchronous, map guards live for one statement, and the node table
//! is an immutable snapshot that handlers only load (see `clippy.toml`).

pub mod cluster;
pub mod config;
mod jobs;
mod limit;
pub mod metrics;
mod net;
pub mod router;
pub mod server;
mod session;
pub mod store;
pub mod stun;
mod timer;

pub use config::{AddressValidation, Config, ServeArgs};
pub use sigrouter_proto as proto;
