//! The node table from the registry and the membership view.

use std::collections::HashMap;

use super::member::MemberView;
use crate::cluster::table::{NodeInfo, NodeState};

/// The node table from the Redis registry and the membership view: a member declared down
/// hides a registry record of the same life (or an older one); an active member is listed even
/// without a registry record (Redis may be down), with its metadata; a node only in the
/// registry is listed as the registry says. Draining wins over active for the same life.
pub fn merge(redis: &[NodeInfo], view: &[MemberView]) -> Vec<NodeInfo> {
    let mut out: HashMap<String, NodeInfo> = HashMap::with_capacity(redis.len() + view.len());
    for r in redis {
        out.insert(r.id.clone(), r.clone());
    }
    for m in view {
        let id = &m.id;
        let rec = out.get(&id.id);
        // A registry record of a later life than the member we know: the node restarted and
        // membership has not caught up yet; the registry is right.
        if rec.is_some_and(|r| r.started_ms > id.started_ms) {
            continue;
        }
        if !m.active {
            out.remove(&id.id);
            continue;
        }
        let same_life = rec.filter(|r| r.started_ms == id.started_ms);
        let draining = m
            .meta
            .as_ref()
            .is_some_and(|x| x.state == NodeState::Draining)
            || same_life.is_some_and(|r| r.state == NodeState::Draining);
        let info = NodeInfo {
            id: id.id.clone(),
            public: id.public,
            internal: id.internal,
            state: if draining {
                NodeState::Draining
            } else {
                NodeState::Active
            },
            version: m
                .meta
                .as_ref()
                .map(|x| x.version.clone())
                .or_else(|| same_life.map(|r| r.version.clone()))
                .unwrap_or_default(),
            sessions: m
                .meta
                .as_ref()
                .map(|x| x.sessions)
                .or_else(|| same_life.map(|r| r.sessions))
                .unwrap_or(0),
            started_ms: id.started_ms,
            expires_ms: same_life.map_or(0, |r| r.expires_ms),
        };
        out.insert(id.id.clone(), info);
    }
    let mut v: Vec<NodeInfo> = out.into_values().collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}
