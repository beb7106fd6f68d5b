//! Presence lookups: where a client is, from the local cache or Redis, and the node that
//! holds it from the node table (waiting briefly for a newer snapshot when the node is new).
//! Awaited only by deferred jobs, never by a socket loop; every Redis call has a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sigrouter_proto::FailReason;
use uuid::Uuid;

use super::{Cluster, NodeInfo, NodeState};
use crate::store::presence_key;

/// How long a lookup that found a client nowhere waits before it looks again.
const OFFLINE_RECHECK: Duration = Duration::from_millis(150);
/// How long a request may wait for a node table that knows a node it has not seen yet.
pub const TABLE_WAIT: Duration = Duration::from_secs(1);

/// Reads a client's presence: `(node, verifier)`, `None` if it is nowhere, `Err` if Redis
/// failed or timed out.
pub async fn lookup(cluster: &Cluster, uuid: &Uuid) -> Result<Option<(Arc<str>, [u8; 32])>, ()> {
    let v: Option<String> = cluster
        .store
        .query(redis::cmd("GET").arg(presence_key(uuid)))
        .await
        .map_err(|_| ())?;
    Ok(v.and_then(|v| parse_presence(&v)))
}

/// Parses `"<node id> <hex verifier> t<claimed ms>"` (or the older form without the claim
/// time).
pub fn parse_presence(v: &str) -> Option<(Arc<str>, [u8; 32])> {
    let v = match v.rsplit_once(" t") {
        Some((head, t)) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => v,
    };
    let (node, hex) = v.rsplit_once(' ')?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((node.into(), out))
}

/// Formats a presence value: the node, the verifier, and when the node claimed the client
/// (ms since the Unix epoch; 0 when a node re-publishes a record Redis lost).
pub fn format_presence(node: &str, verifier: &[u8; 32], claimed_ms: u64) -> String {
    let mut s = String::with_capacity(node.len() + 90);
    s.push_str(node);
    s.push(' ');
    for b in verifier {
        s.push_str(&format!("{b:02x}"));
    }
    s.push_str(&format!(" t{claimed_ms}"));
    s
}

/// Reads a client's presence unless Redis is known to be down, giving up after the hedge
/// delay (`--redis-hedge-ms`): `Err` means "ask the other nodes". A healthy Redis answers in
/// about a millisecond, so only a failing or stalled one hands lookups to the peers.
pub async fn lookup_hedged(
    cluster: &Cluster,
    uuid: &Uuid,
) -> Result<Option<(Arc<str>, [u8; 32])>, ()> {
    if !cluster.store.is_up() {
        // Known down (the last call failed): the background tasks find out when it is back.
        return Err(());
    }
    match tokio::time::timeout(cluster.cfg.redis_hedge, lookup(cluster, uuid)).await {
        Ok(r) => r,
        Err(_) => Err(()),
    }
}

/// Where a Connect's target is, as far as this node can tell without the other nodes.
#[derive(Debug)]
pub enum Resolved {
    /// Held by this node of the table.
    Node(Arc<NodeInfo>),
    /// The Connect fails with this reason.
    Failed(FailReason),
    /// Redis could not say (down, failing, slower than the hedge, or just back and perhaps
    /// empty): ask the other nodes.
    AskPeers,
}

/// Finds the node holding `target`: cache, then Redis (hedged), then the node table (waiting
/// briefly for a newer one when the node is new to us).
pub async fn resolve(cluster: &Cluster, target: &Uuid, fresh: bool) -> Resolved {
    let r = resolve_inner(cluster, target, fresh).await;
    match r {
        Ok(n) => Resolved::Node(n),
        Err(None) => Resolved::AskPeers,
        Err(Some(reason)) => Resolved::Failed(reason),
    }
}

async fn resolve_inner(
    cluster: &Cluster,
    target: &Uuid,
    fresh: bool,
) -> Result<Arc<NodeInfo>, Option<FailReason>> {
    let now = Instant::now();
    // The cache is trusted only while it names an active node we know; a draining or
    // vanished node means the client is moving: ask the directory.
    let cached = if fresh {
        None
    } else {
        cluster.cached_presence(target, now).filter(|n| match n {
            Some(id) => cluster
                .node(id)
                .is_some_and(|n| n.state == NodeState::Active),
            None => true,
        })
    };
    let node = match cached {
        Some(n) => n,
        None => {
            let mut n = lookup_hedged(cluster, target)
                .await
                .map_err(|()| None)?
                .map(|(n, _)| n);
            if n.is_none() && !cluster.presence_unsettled() {
                // A client that registered on another node moments ago may not be in the
                // directory yet (presence is written in batches, off the request path): look
                // once more before calling it offline, which the asker may cache and believe.
                tokio::time::sleep(OFFLINE_RECHECK).await;
                n = lookup_hedged(cluster, target)
                    .await
                    .map_err(|()| None)?
                    .map(|(n, _)| n);
            }
            if n.is_none() && cluster.presence_unsettled() {
                // Redis just came back (perhaps empty) and nodes are still re-publishing, or a
                // node's writes failed: "nowhere" is not to be trusted; the nodes know.
                return Err(None);
            }
            cluster.cache_presence(*target, n.clone(), now);
            n
        }
    };
    let node = node.ok_or(Some(FailReason::Offline))?;
    if *node == *cluster.id {
        // The directory says here, but the session is not (the caller checked): it is moving
        // away or was just dropped; a retry will know.
        return Err(Some(FailReason::RetryLater));
    }
    cluster
        .wait_for_node(&node, TABLE_WAIT)
        .await
        .ok_or(Some(FailReason::RetryLater))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_value_roundtrip() {
        let v = format_presence("node-a b", &[0xAB; 32], 1_700_000_000_123);
        assert!(v.ends_with(" t1700000000123"), "{v}");
        let (n, ver) = parse_presence(&v).unwrap();
        assert_eq!((&*n, ver), ("node-a b", [0xAB; 32]));
        assert!(parse_presence("node zz").is_none());
        // The older form, without the claim time.
        let old = format!("node t1 {}", "ab".repeat(32));
        assert_eq!(parse_presence(&old).map(|(n, _)| n), Some("node t1".into()));
    }
}
