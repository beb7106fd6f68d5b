//! Metrics of membership and of presence lookups among nodes (cluster mode).

use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;

use super::name;

/// Outcomes of presence lookups asked of the other nodes.
const PEER_OUTCOMES: [&str; 5] = ["found", "nowhere", "unanswered", "limited", "refused"];

/// How a presence lookup asked of the other nodes ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerOutcome {
    /// A node said it holds the client.
    Found,
    /// Every node said it does not.
    Nowhere,
    /// Some nodes did not answer in time (or were not asked) and none holds it.
    Unanswered,
    /// Not asked: the node's lookup budget was spent.
    Limited,
    /// The holder said the secret a Resume presented is wrong.
    Refused,
}

/// Metrics of membership and of lookups among nodes (cluster mode).
#[derive(Clone)]
pub struct PeerMetrics {
    lookups: [Counter; 5],
    events: [Counter; 2],
    /// Presence lookups from other nodes answered from this node's sessions.
    pub answered: Counter,
    /// Other nodes this node's membership sees alive or suspect.
    pub members: Gauge,
}

impl PeerMetrics {
    pub(super) fn new(r: &PrometheusRecorder, md: &Metadata<'_>, cluster: bool) -> Self {
        let counter = |n: &'static str, d: &'static str, labels: Vec<Label>| {
            if !cluster {
                return Counter::noop();
            }
            r.describe_counter(name(n), Some(Unit::Count), SharedString::const_str(d));
            r.register_counter(&Key::from_parts(n, labels), md)
        };
        let lookups = PEER_OUTCOMES.map(|o| {
            counter(
                "sigrouter_peer_lookups_total",
                "Presence lookups asked of the other nodes (Redis unavailable or slow), by outcome.",
                vec![Label::from_static_parts("outcome", o)],
            )
        });
        let events = ["up", "down"].map(|e| {
            counter(
                "sigrouter_membership_events_total",
                "Other nodes seen coming up or going down by membership.",
                vec![Label::from_static_parts("event", e)],
            )
        });
        let members = if cluster {
            let n = "sigrouter_membership_members";
            r.describe_gauge(
                name(n),
                None,
                SharedString::const_str("Other nodes membership sees alive or suspect."),
            );
            r.register_gauge(&Key::from_name(n), md)
        } else {
            Gauge::noop()
        };
        Self {
            lookups,
            events,
            answered: counter(
                "sigrouter_peer_lookups_answered_total",
                "Presence lookups from other nodes answered from this node's sessions.",
                vec![],
            ),
            members,
        }
    }

    /// Counts a presence lookup asked of the other nodes.
    pub fn lookup(&self, o: PeerOutcome) {
        self.lookups[o as usize].increment(1);
    }

    /// Counts a member coming up (`true`) or going down.
    pub fn member_event(&self, up: bool) {
        self.events[usize::from(!up)].increment(1);
    }
}
