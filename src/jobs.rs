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
                    None => match lookup::lookup_hedged(cluster, u).await {
                        Ok(p) if p.is_some() || !cluster.presence_unsettled() => {
                            let n = p.map(|(n, _)| n);
                            cluster.cache_presence(*u, n.clone(), now);
                            n
                        }
                        _ => {
                            failed = true;
                            break;
                        }
                    },
                };
                online.push(node.is_some_and(|n| *n != *cluster.id && cluster.node(&n).is_some()));
            }
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
