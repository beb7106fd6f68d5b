//! Metric names, descriptions and handles, and the HTTP endpoint for `/metrics`, `/healthz` and
//! `/readyz`.
//!
//! Each node owns its own Prometheus recorder (no global state), so several nodes in one test
//! process keep separate figures. Handles are registered once at start; the packet path only
//! increments them. Label values come from small enums, never from a UUID or an address.
//!
//! Counters that every datagram touches (datagrams in and out, requests by type, drops by
//! reason, duplicates, routed and forwarded requests) are [`HotCounter`]s: each thread adds to
//! its own cache-padded row of cells, so socket loops on different cores never write to the
//! same cache line; `/metrics` sums the rows when it is rendered.
//!
//! Figures that are ages or read from the OS (process CPU, memory, open files; the age of the
//! node table and of the oldest waiting request) are computed when `/metrics` is scraped, by
//! collectors registered with [`Metrics::on_render`]: a stuck task cannot freeze them.

mod hot;
mod http;
mod peer;
mod reasons;

pub use hot::HotCounter;
pub use http::{bind_http, serve_http, Health};
pub use peer::{PeerMetrics, PeerOutcome};
pub use reasons::{ClusterRefusal, DropReason};

use std::sync::{Arc, Mutex};

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use sigrouter_proto::{FailReason, MsgType};

use hot::HotCounters;
use reasons::{OUTCOMES, REQ_TYPES, WIRE_ERRORS};

type Collector = Box<dyn Fn() + Send + Sync>;

/// The version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this binary was built from (`SIGROUTER_COMMIT` at build time, else the
/// repository's HEAD, else `unknown`).
pub const COMMIT: &str = match option_env!("SIGROUTER_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// Every metric handle a node uses.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    recorder: Arc<PrometheusRecorder>,
    collectors: Arc<Mutex<Vec<Collector>>>,
    process: metrics_process::Collector,
    /// Every hot counter with the exported counter it is summed into.
    hot: Arc<[(HotCounter, Counter)]>,
    requests: [HotCounter; 10],
    dropped: [HotCounter; 15],
    cluster_refused: [Counter; 4],
    outcomes: [Counter; 5],
    /// Datagrams received on the client port.
    pub rx_datagrams: HotCounter,
    /// Datagrams sent on the client port.
    pub tx_datagrams: HotCounter,
    /// Datagrams dropped because a socket's outbound queue was full.
    pub tx_dropped_queue: Counter,
    /// Datagrams the kernel refused to send.
    pub tx_dropped_error: Counter,
    /// STUN Binding requests answered.
    pub stun_answered: Counter,
    /// Sessions held now.
    pub sessions: Gauge,
    /// The session cap.
    pub max_sessions: Gauge,
    /// Sessions created by Register.
    pub registered: Counter,
    /// Sessions taken back by Resume on the node that held them.
    pub resumed_local: Counter,
    /// Sessions resumed here that came from a draining node (they followed a Migrate): counted
    /// where they arrive, so the figures outlive the drained node.
    pub resumed_migrate: Counter,
    /// Sessions resumed here from another node that was not draining (it died, or the client
    /// re-homed on its own).
    pub resumed_failover: Counter,
    /// Resumes taken on a draining node's word (`Expect`), with no directory lookup.
    pub resumed_expected: Counter,
    /// Sessions expired for lack of heartbeats.
    pub expired: Counter,
    /// Session addresses moved by a NAT rebinding.
    pub rebinds: Counter,
    /// Retransmitted requests answered from memory.
    pub duplicates: HotCounter,
    /// Requests refused by a per-session rate limit.
    pub rate_limited: Counter,
    /// Register/Resume refused by the per-source rate limit.
    pub rate_limited_source: Counter,
    /// Register/Resume refused by the node-wide budget of new sessions.
    pub rate_limited_new_sessions: Counter,
    /// Requests refused because their session has too many lookups in flight.
    pub rate_limited_jobs: Counter,
    /// Register refused by the session cap.
    pub capacity_refused: Counter,
    /// Address validation: `Retry` answers sent.
    pub validation_retry_sent: Counter,
    /// Address validation: tokens accepted.
    pub validation_valid: Counter,
    /// Address validation: tokens refused as not this node's for this address and port.
    pub validation_invalid: Counter,
    /// Address validation: tokens refused as too old.
    pub validation_expired: Counter,
    /// Server pushes sent the first time.
    pub pushes_sent: Counter,
    /// Server push retransmissions.
    pub push_retransmits: Counter,
    /// Pushes given up unacknowledged.
    pub pushes_expired: Counter,
    /// Seconds from Connect to its outcome.
    pub connect_seconds: Histogram,
    /// Signals relayed.
    pub signals_relayed: Counter,
    /// Time a handler waited for a newer node table (cluster mode).
    pub table_wait_seconds: Histogram,
    /// Requests waiting on cluster state right now.
    pub waiting_requests: Gauge,
    /// Age of the oldest request waiting on cluster state (0 when none waits).
    pub oldest_waiting_seconds: Gauge,
    /// Age of the node table's last successful refresh.
    pub table_age_seconds: Gauge,
    /// Redis commands sent.
    pub redis_commands: Counter,
    /// Redis errors and timeouts.
    pub redis_errors: Counter,
    /// Whether Redis answered the last probe (1) or not (0).
    pub redis_up: Gauge,
    /// Node-table snapshots built.
    pub table_refreshes: Counter,
    /// Nodes in the current table.
    pub cluster_nodes: Gauge,
    /// Datagrams forwarded to other nodes.
    pub forwarded: Counter,
    /// Datagrams received from other nodes.
    pub forwarded_in: HotCounter,
    /// Migrate pushes sent while draining.
    pub migrates: Counter,
    /// Routed requests (Connect, Accept, Reject, Signal, Query) — the denominator of Redis
    /// commands per routed request.
    pub routed: HotCounter,
    /// Membership and lookups among nodes (cluster mode).
    pub peers: PeerMetrics,
}

pub(super) fn name(s: &'static str) -> KeyName {
    KeyName::from_const_str(s)
}

impl Metrics {
    /// Builds a recorder of our own and registers every handle on it (cluster metrics too).
    pub fn new() -> Self {
        Self::with_cluster(true)
    }

    /// Like [`Metrics::new`]; with `cluster` false the cluster-only metrics (Redis, node
    /// table, forwarding) are not exported at all, so a single node shows no misleading
    /// `sigrouter_redis_up 0`.
    pub fn with_cluster(cluster: bool) -> Self {
        let recorder: PrometheusRecorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
            .expect("static non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        let recorder = Arc::new(recorder);
        let r = &*recorder;
        let md = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let counter = |n: &'static str, unit: Option<Unit>, d: &'static str, labels: Vec<Label>| {
            r.describe_counter(name(n), unit, SharedString::const_str(d));
            r.register_counter(&Key::from_parts(n, labels), &md)
        };
        let gauge = |n: &'static str, d: &'static str| {
            r.describe_gauge(name(n), None, SharedString::const_str(d));
            r.register_gauge(&Key::from_name(n), &md)
        };
        let hist = |n: &'static str, d: &'static str| {
            r.describe_histogram(name(n), Some(Unit::Seconds), SharedString::const_str(d));
            r.register_histogram(&Key::from_name(n), &md)
        };
        let requests = REQ_TYPES.map(|t| {
            counter(
                "sigrouter_requests_total",
                Some(Unit::Count),
                "Client requests received and decoded, by type.",
                vec![Label::from_static_parts("type", t.name())],
            )
        });
        let mut dropped_vec = Vec::with_capacity(14);
        for d in &DropReason::ALL {
            dropped_vec.push(counter(
                "sigrouter_dropped_total",
                Some(Unit::Count),
                "Datagrams dropped without an answer, by reason.",
                vec![Label::from_static_parts("reason", d.name())],
            ));
        }
        let dropped: [Counter; 15] = dropped_vec.try_into().unwrap_or_else(|_| unreachable!());
        let outcomes = OUTCOMES.map(|o| {
            counter(
                "sigrouter_connects_total",
                Some(Unit::Count),
                "Connect outcomes seen by initiators.",
                vec![Label::from_static_parts("outcome", o)],
            )
        });
        let build_info = {
            let n = "sigrouter_build_info";
            r.describe_gauge(
                name(n),
                None,
                SharedString::const_str("Always 1; the labels say which build runs."),
            );
            r.register_gauge(
                &Key::from_parts(
                    n,
                    vec![
                        Label::from_static_parts("version", VERSION),
                        Label::from_static_parts("commit", COMMIT),
                    ],
                ),
                &md,
            )
        };
        build_info.set(1.0);
        let limited = |limit: &'static str| {
            counter(
                "sigrouter_rate_limited_total",
                Some(Unit::Count),
                "Requests refused by a rate limit: limit=source (Register/Resume per source prefix), new_sessions (the node-wide budget), jobs (lookups in flight per session) or session.",
                vec![Label::from_static_parts("limit", limit)],
            )
        };
        let resumed = |cause: &'static str| {
            counter(
                "sigrouter_sessions_resumed_total",
                Some(Unit::Count),
                "Sessions taken back by Resume, by cause: local (on the node that held it), migrate (from a draining node, after a Migrate), failover (from another node).",
                vec![Label::from_static_parts("cause", cause)],
            )
        };
        let validation = |outcome: &'static str| {
            counter(
                "sigrouter_address_validation_total",
                Some(Unit::Count),
                "Address validation of Register and Resume from a new address, by outcome: retry_sent (a Retry with a token answered the request; nothing was created), valid (a token came back and was accepted), invalid (a token that is not this node's for the source address and port), expired (a token too old).",
                vec![Label::from_static_parts("outcome", outcome)],
            )
        };
        let tx_dropped = |reason: &'static str| {
            counter(
                "sigrouter_tx_dropped_total",
                Some(Unit::Count),
                "Datagrams the node decided to send and did not: reason=queue_full (a socket's outbound queue was full) or send_error (the kernel refused it). Pushes and node requests are retransmitted.",
                vec![Label::from_static_parts("reason", reason)],
            )
        };
        let cluster_refused = WIRE_ERRORS.map(|e| {
            if cluster {
                counter(
                    "sigrouter_cluster_refused_total",
                    Some(Unit::Count),
                    "Node-to-node datagrams refused, by reason: bad_mac (another cluster key), stale (clock skew or replay), misaddressed (meant for another node id), malformed.",
                    vec![Label::from_static_parts("reason", e.name())],
                )
            } else {
                Counter::noop()
            }
        });
        let process = metrics_process::Collector::new("");
        metrics::with_local_recorder(r, || process.describe());
        let c = |n, d| counter(n, Some(Unit::Count), d, vec![]);
        let cc = |n, d| if cluster { c(n, d) } else { Counter::noop() };
        let cgauge = |n, d| if cluster { gauge(n, d) } else { Gauge::noop() };
        let chist = |n, d| {
            if cluster {
                hist(n, d)
            } else {
                Histogram::noop()
            }
        };
        let mut hot = HotCounters::new();
        let requests = requests.map(|c| hot.feed(c));
        let dropped = dropped.map(|c| hot.feed(c));
        Self {
            requests,
            dropped,
            cluster_refused,
            outcomes,
            rx_datagrams: hot.feed(c(
                "sigrouter_rx_datagrams_total",
                "Datagrams received on the client port.",
            )),
            tx_datagrams: hot.feed(c(
                "sigrouter_tx_datagrams_total",
                "Datagrams sent on the client port.",
            )),
            tx_dropped_queue: tx_dropped("queue_full"),
            tx_dropped_error: tx_dropped("send_error"),
            stun_answered: c(
                "sigrouter_stun_answered_total",
                "STUN Binding requests answered.",
            ),
            sessions: gauge("sigrouter_sessions", "Sessions held by this node."),
            max_sessions: gauge(
                "sigrouter_max_sessions",
                "Session cap of this node (--max-sessions).",
            ),
            registered: c(
                "sigrouter_sessions_registered_total",
                "Sessions created by Register.",
            ),
            resumed_local: resumed("local"),
            resumed_migrate: resumed("migrate"),
            resumed_failover: resumed("failover"),
            resumed_expected: c(
                "sigrouter_resumes_expected_total",
                "Resumes taken on their draining node's word, without a directory lookup.",
            ),
            expired: c(
                "sigrouter_sessions_expired_total",
                "Sessions expired after missed heartbeats.",
            ),
            rebinds: c(
                "sigrouter_rebinds_total",
                "Session addresses moved by a NAT rebinding.",
            ),
            duplicates: hot.feed(c(
                "sigrouter_duplicate_requests_total",
                "Retransmitted requests answered from memory.",
            )),
            rate_limited: limited("session"),
            rate_limited_source: limited("source"),
            rate_limited_new_sessions: limited("new_sessions"),
            rate_limited_jobs: limited("jobs"),
            capacity_refused: c(
                "sigrouter_capacity_refused_total",
                "Registers refused by the session cap.",
            ),
            validation_retry_sent: validation("retry_sent"),
            validation_valid: validation("valid"),
            validation_invalid: validation("invalid"),
            validation_expired: validation("expired"),
            pushes_sent: c("sigrouter_pushes_total", "Server pushes sent."),
            push_retransmits: c(
                "sigrouter_push_retransmits_total",
                "Server push retransmissions.",
            ),
            pushes_expired: c(
                "sigrouter_pushes_expired_total",
                "Pushes given up unacknowledged.",
            ),
            connect_seconds: hist(
                "sigrouter_connect_seconds",
                "Time from Connect to its outcome.",
            ),
            signals_relayed: c(
                "sigrouter_signals_relayed_total",
                "Signals relayed between peers.",
            ),
            table_wait_seconds: chist(
                "sigrouter_table_wait_seconds",
                "Time a request waited for a newer node table after a miss.",
            ),
            waiting_requests: cgauge(
                "sigrouter_waiting_requests",
                "Requests waiting on cluster state now (stuck requests show here).",
            ),
            oldest_waiting_seconds: cgauge(
                "sigrouter_oldest_waiting_request_seconds",
                "Age of the oldest request waiting on cluster state; 0 when none waits.",
            ),
            table_age_seconds: cgauge(
                "sigrouter_node_table_age_seconds",
                "Seconds since the node table was last refreshed from Redis successfully.",
            ),
            redis_commands: cc("sigrouter_redis_commands_total", "Redis commands sent."),
            redis_errors: cc("sigrouter_redis_errors_total", "Redis errors and timeouts."),
            redis_up: cgauge(
                "sigrouter_redis_up",
                "1 if Redis answered the last probe, else 0.",
            ),
            table_refreshes: cc(
                "sigrouter_node_table_refreshes_total",
                "Node-table snapshots built.",
            ),
            cluster_nodes: cgauge(
                "sigrouter_cluster_nodes",
                "Nodes in the current node table.",
            ),
            forwarded: cc(
                "sigrouter_forwarded_total",
                "Datagrams forwarded to other nodes.",
            ),
            forwarded_in: hot.feed(cc(
                "sigrouter_forwarded_in_total",
                "Datagrams received from other nodes.",
            )),
            migrates: cc(
                "sigrouter_migrates_total",
                "Migrate pushes sent while draining.",
            ),
            routed: hot.feed(c(
                "sigrouter_routed_requests_total",
                "Connect, Accept, Reject, Signal and Query requests.",
            )),
            peers: PeerMetrics::new(r, &md, cluster),
            hot: hot.exported.into(),
            handle,
            recorder,
            collectors: Arc::default(),
            process,
        }
    }

    /// Registers a function that updates gauges just before each render (ages, OS figures).
    /// It must be quick and must not block.
    pub fn on_render(&self, f: impl Fn() + Send + Sync + 'static) {
        self.collectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(f));
    }

    /// Exports which cluster keys this node uses, by fingerprint
    /// (`sigrouter_cluster_key_info{role="sign"|"accept",fingerprint}`), so a key rotation can
    /// be checked node by node without showing a key.
    pub fn set_cluster_keys(&self, sign: &str, accept: Option<&str>) {
        let n = "sigrouter_cluster_key_info";
        self.recorder.describe_gauge(
            name(n),
            None,
            SharedString::const_str(
                "Always 1: the fingerprints of the cluster keys this node signs with (role=sign) and also accepts (role=accept).",
            ),
        );
        let md = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let mut keys = vec![("sign", sign)];
        keys.extend(accept.map(|a| ("accept", a)));
        for (role, fp) in keys {
            let labels = vec![
                Label::from_static_parts("role", role),
                Label::new("fingerprint", fp.to_string()),
            ];
            self.recorder
                .register_gauge(&Key::from_parts(n, labels), &md)
                .set(1.0);
        }
    }

    /// Counts a decoded request.
    pub fn request(&self, t: MsgType) {
        if let Some(i) = REQ_TYPES.iter().position(|x| *x == t) {
            self.requests[i].increment(1);
        }
    }

    /// Counts a drop.
    pub fn drop(&self, d: DropReason) {
        self.dropped[d.index()].increment(1);
    }

    /// Counts a refused node-to-node datagram by reason (they are also counted in
    /// `sigrouter_dropped_total{reason="cluster_auth"}`).
    pub fn cluster_refused(&self, e: ClusterRefusal) {
        if let Some(i) = WIRE_ERRORS.iter().position(|x| *x == e) {
            self.cluster_refused[i].increment(1);
        }
    }

    /// Counts a Connect outcome.
    pub fn outcome(&self, r: Option<FailReason>) {
        let i = match r {
            None => 0,
            Some(FailReason::Offline) => 1,
            Some(FailReason::Rejected) => 2,
            Some(FailReason::Timeout) => 3,
            // The router never produces `Other` (it exists for older clients of newer
            // routers); counted with the transient failures if it ever did.
            Some(FailReason::RetryLater | FailReason::Other) => 4,
        };
        self.outcomes[i].increment(1);
    }

    /// The Prometheus text exposition of this node's metrics.
    pub fn render(&self) -> String {
        for (h, c) in self.hot.iter() {
            c.absolute(h.value());
        }
        metrics::with_local_recorder(&*self.recorder, || self.process.collect());
        for f in self
            .collectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            f();
        }
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::hot::HOT_ROWS;
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Hot counters bumped from many threads (more than there are rows) add up in /metrics,
    /// and each node keeps its own figures.
    #[test]
    fn hot_counters_from_every_thread_are_summed_at_render() {
        let m = Metrics::new();
        let other = Metrics::new();
        std::thread::scope(|s| {
            for _ in 0..(2 * HOT_ROWS + 3) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        m.rx_datagrams.increment(1);
                        m.request(MsgType::Heartbeat);
                    }
                    m.tx_datagrams.increment(7);
                    m.drop(DropReason::BadMac);
                });
            }
        });
        other.rx_datagrams.increment(5);
        let threads = (2 * HOT_ROWS + 3) as f64;
        let text = m.render();
        assert_eq!(
            value(&text, "sigrouter_rx_datagrams_total"),
            Some(1000.0 * threads)
        );
        assert_eq!(
            value(&text, "sigrouter_requests_total{type=\"heartbeat\"}"),
            Some(1000.0 * threads)
        );
        assert_eq!(
            value(&text, "sigrouter_tx_datagrams_total"),
            Some(7.0 * threads)
        );
        assert_eq!(
            value(&text, "sigrouter_dropped_total{reason=\"bad_mac\"}"),
            Some(threads)
        );
        assert_eq!(
            value(&other.render(), "sigrouter_rx_datagrams_total"),
            Some(5.0)
        );
        // Rendering again changes nothing; later increments show at the next render.
        m.rx_datagrams.increment(1);
        assert_eq!(
            value(&m.render(), "sigrouter_rx_datagrams_total"),
            Some(1000.0 * threads + 1.0)
        );
    }
}
