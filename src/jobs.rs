//! Deferred jobs: the only request-driven code that awaits Redis or a newer node table. The
//! router hands them out in its [`Outbox`]; `net` runs each in its own task (bounded in
//! number), every step under a deadline, and hands the result back to the [`Router`], which
//! decides what to send. This module sits above both: it uses the router and the cluster
//! state, and neither uses it.

use std::time::Instant;

use crate::cluster::{lookup, Cluster};
use crate::router::{Job, Outbox, Router};

/// Runs one job to completion and returns what the router decided.
pub(crate) async fn run(job: Job, router: &Router, cluster: &Cluster) -> Outbox {
    let mut out = Outbox::default();
    match job {
        Job::Connect(l) => {
            let started = Instant::now();
            let found = lookup::resolve(cluster, &l.target, l.fresh).await;
            tracing::debug!(conn = %l.conn, target = %l.target, fresh = l.fresh, found = ?found.as_ref().map(|n| n.id.clone()), took = ?started.elapsed(), "connect lookup");
            router.complete_connect(Instant::now(), l, found, &mut out);
        }
        Job::Resume { src, req_len, msg } => {
            let found = lookup::lookup(cluster, &msg.uuid)
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
                    None => match lookup::lookup(cluster, u).await {
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
