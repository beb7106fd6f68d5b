//! Deferred jobs: the only request-driven code that awaits Redis or a newer node table. The
//! router hands them out in its [`Outbox`]; `net` runs each in its own task (bounded in
//! number), every step under a deadline, and hands the result back to the [`Router`], which
//! decides what to send. This module sits above both: it uses the router and the cluster
//! state, and neither uses it.

use std::time::Instant;

use crate::cluster::lookup::{self, Resolved};
use crate::cluster::Cluster;
use crate::router::{Job, Outbox, Router, Waiter};

/// Runs one job to completion and returns what the router decided.
pub(crate) async fn run(job: Job, router: &Router, cluster: &Cluster) -> Outbox {
    let mut out = Outbox::default();
    match job {
        Job::Connect(l) => {
            let started = Instant::now();
            let found = lookup::resolve(cluster, &l.target, l.fresh).await;
            tracing::debug!(conn = %l.conn, target = %l.target, fresh = l.fresh, found = ?found, took = ?started.elapsed(), "connect lookup");
            let now = Instant::now();
            match found {
                Resolved::Node(n) => router.complete_connect(now, l, Ok(n), &mut out),
                Resolved::Failed(r) => router.complete_connect(now, l, Err(r), &mut out),
                Resolved::AskPeers => {
                    router.ask_peers(now, vec![l.target], None, Waiter::Connect(l), &mut out)
                }
            }
        }
        Job::Resume { src, req_len, msg } => {
            // Its old node's word may have come since the Resume did (a draining node sends it
            // with the Migrate, by another socket): then no lookup.
            if router.resume_expected(Instant::now(), src, req_len, &msg, &mut out) {
                return out;
            }
            let found = lookup::lookup_hedged(cluster, &msg.uuid).await;
            let now = Instant::now();
            let just_back = cluster.presence_unsettled();
            match found {
                Ok(Some((node, verifier))) => {
                    let found = Ok(Some((verifier, node)));
                    router.complete_resume(now, src, req_len, msg, found, &mut out);
                }
                Ok(None) if !just_back => {
                    router.complete_resume(now, src, req_len, msg, Ok(None), &mut out);
                }
                // Redis cannot say (or just came back, perhaps empty): the node that holds the
                // session checks the secret.
                _ => {
                    let uuids = vec![msg.uuid];
                    let verifier = Some(msg.secret.verifier());
                    let w = Waiter::Resume { src, req_len, msg };
                    router.ask_peers(now, uuids, verifier, w, &mut out);
                }
            }
        }
        Job::Query { uuid, rid, uuids } => {
            let (online, failed) = query_presence(router, cluster, &uuids).await;
            if failed {
                // Redis cannot say: ask the other nodes about every client not held here.
                let ask: Vec<_> = uuids
                    .iter()
                    .filter(|u| !router.is_local(u))
                    .copied()
                    .collect();
                let w = Waiter::Query { uuid, rid, uuids };
                router.ask_peers(Instant::now(), ask, None, w, &mut out);
            } else {
                router.complete_query(uuid, rid, Some(online), &mut out);
            }
        }
    }
    out
}

/// Whether each of `uuids` is online (here, or at a node of the table), with one Redis call
/// (`MGET`, hedged like a single lookup) for those neither held here nor cached; `true` in
/// the second place when Redis could not say and the other nodes must be asked.
async fn query_presence(
    router: &Router,
    cluster: &Cluster,
    uuids: &[uuid::Uuid],
) -> (Vec<bool>, bool) {
    let now = Instant::now();
    let mut nodes: Vec<Option<Option<std::sync::Arc<str>>>> = uuids
        .iter()
        .map(|u| {
            if router.is_local(u) {
                Some(None) // answered by `is_local` below
            } else {
                cluster.cached_presence(u, now)
            }
        })
        .collect();
    let missing: Vec<usize> = (0..uuids.len()).filter(|&i| nodes[i].is_none()).collect();
    if !missing.is_empty() {
        let keys: Vec<&uuid::Uuid> = missing.iter().map(|&i| &uuids[i]).collect();
        let Ok(found) = lookup::lookup_many_hedged(cluster, &keys).await else {
            return (Vec::new(), true);
        };
        for (&i, p) in missing.iter().zip(found) {
            if p.is_none() && cluster.presence_unsettled() {
                // "Nowhere" from a Redis that may have lost records: the nodes decide.
                return (Vec::new(), true);
            }
            let n = p.map(|(n, _)| n);
            cluster.cache_presence(uuids[i], n.clone(), now);
            nodes[i] = Some(n);
        }
    }
    let online = uuids
        .iter()
        .zip(nodes)
        .map(|(u, n)| {
            router.is_local(u)
                || n.flatten()
                    .is_some_and(|n| *n != *cluster.id && cluster.node(&n).is_some())
        })
        .collect();
    (online, false)
}
