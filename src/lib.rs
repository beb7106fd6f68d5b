//! sigrouter: a UDP signaling router for large fleets of peer-to-peer clients.
//!
//! # Layout
//! - `config`: one validated, immutable [`Config`] from flags and `SIGROUTER_*` variables.
//! - [`sigrouter_proto`] (re-exported as [`proto`]): the sans-IO wire codec.
//! - `stun`: sans-IO answers to STUN Binding requests on the client port.
//! - `session`: the session map (dashmap); returns clones, never guards.
//! - `router`: pure decisions: given a datagram, the time and the state, what to send where.
//! - `net`: the only owner of sockets; feeds the router and sends what it decides.
//! - `server`: wires the parts together, owns every background task, shuts down gracefully.
//! - `metrics`: metric names, descriptions and the Prometheus/health endpoint.
//! - `cli`: the `sigrouter client …` commands, built on [`sigrouter_client`].

pub mod cli;
pub mod config;
pub mod stun;

pub use config::{Config, ServeArgs};
pub use sigrouter_proto as proto;
pub mod cluster;
pub mod metrics;
mod net;
pub mod router;
pub mod server;
mod session;
pub mod store;
