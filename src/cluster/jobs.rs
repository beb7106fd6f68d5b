//! Deferred jobs: the only request-driven code that awaits Redis or a newer node table. They
//! run in their own tasks (bounded in number by the caller), each step under a deadline, and
//! hand their result back to the [`Router`], which decides what to send.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sigrouter_proto::FailReason;
use uuid::Uuid;

use super::{Cluster, NodeInfo, NodeState};
use crate::router::{Job, Outbox, Router};
use crate::store::presence_key;

/// How long a request may wait for a node table that knows a node it has not seen yet.
pub const TABLE_WAIT: Duration = Duration::from_secs(1);

/// Runs one job to completion and returns what the router decided.
pub async fn run(job: Job, router: &Router, cluster: &Cluster) -> Outbox {
    let mut out = Outbox::default();
    match job {
        Job::Connect {
            conn,
            target,
            fresh,
            body,
        } => {
            let started = Instant::now();
            let found = resolve(cluster, &target, fresh).await;
            tracing::debug!(%conn, %target, fresh, found = ?found.as_ref().map(|n| n.id.clone()), took = ?started.elapsed(), "connect lookup");
            router.complete_connect(Instant::now(), conn, target, body, fresh, found, &mut out);
        }
        Job::Resume { src, req_len, msg } => {
            let found = lookup(cluster, &msg.uuid)
                .await
                .map(|p| p.map(|(node, verifier)| (verifier, node)));
            router.complete_resume(Instant::now(), src, req_len, msg, found, &mut out);
        }
        Job::Query { uuid, rid, uuids } => {
            let mut online = Vec::with_capacity(uuids.len());
            let mut failed = false;
            for u in &uuids {
                if router.is_local(u) {
                    online.push(true);
                    continue;
                }
                let now = Instant::now();
                let node = match cluster.cached_presence(u, now) {
                    Some(n) => n,
                    None => match lookup(cluster, u).await {
                        Ok(p) => {
                            let n = p.map(|(n, _)| n);
                            cluster.cache_presence(*u, n.clone(), now);
                            n
                        }
                        Err(()) => {
                            failed = true;
                            break;
                        }
                    },
                };
                online.push(node.is_some_and(|n| *n != *cluster.id && cluster.node(&n).is_some()));
            }
            router.complete_query(uuid, rid, (!failed).then_some(online), &mut out);
        }
    }
    out
}

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

/// Parses `"<node id> <hex verifier>"`.
pub fn parse_presence(v: &str) -> Option<(Arc<str>, [u8; 32])> {
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

/// Formats a presence value.
pub fn format_presence(node: &str, verifier: &[u8; 32]) -> String {
    let mut s = String::with_capacity(node.len() + 65);
    s.push_str(node);
    s.push(' ');
    for b in verifier {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Finds the node holding `target`: cache, then Redis, then the node table (waiting briefly
/// for a newer one when the node is new to us).
async fn resolve(
    cluster: &Cluster,
    target: &Uuid,
    fresh: bool,
) -> Result<Arc<NodeInfo>, FailReason> {
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
            let n = lookup(cluster, target)
                .await
                .map_err(|()| FailReason::RetryLater)?
                .map(|(n, _)| n);
            if n.is_none() && cluster.store.recovered_within(cluster.recovery_grace()) {
                // Redis just came back (perhaps empty) and nodes are still re-publishing:
                // "nowhere" is not to be trusted yet.
                return Err(FailReason::RetryLater);
            }
            cluster.cache_presence(*target, n.clone(), now);
            n
        }
    };
    let node = node.ok_or(FailReason::Offline)?;
    if *node == *cluster.id {
        // The directory says here, but the session is not (the caller checked): it is moving
        // away or was just dropped; a retry will know.
        return Err(FailReason::RetryLater);
    }
    cluster
        .wait_for_node(&node, TABLE_WAIT)
        .await
        .ok_or(FailReason::RetryLater)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_value_roundtrip() {
        let v = format_presence("node-a b", &[0xAB; 32]);
        let (n, ver) = parse_presence(&v).unwrap();
        assert_eq!((&*n, ver), ("node-a b", [0xAB; 32]));
        assert!(parse_presence("node zz").is_none());
    }
}
