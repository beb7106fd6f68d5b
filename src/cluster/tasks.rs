//! The cluster's background tasks, one owner each: the node-table refresher (the only writer
//! of the snapshot), the registry publisher (this node's own record) and the presence writer
//! (batched, pipelined presence updates).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::Pipeline;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lookup::format_presence;
use super::{now_ms, Cluster, LocalSessions, NodeInfo, NodeState, PresenceOp};
use crate::store::{presence_key, NODES_KEY};

/// Registry records live this many renewal periods without a renewal.
const RECORD_PERIODS: u32 = 3;
/// The registry hash itself expires if no node renews it for this long.
const REGISTRY_KEY_TTL_MS: u64 = 120_000;
/// How long a nudge waits for more nudges before the refresher reads.
const NUDGE_DEBOUNCE: Duration = Duration::from_millis(20);
/// Least time between two registry reads.
const MIN_GAP: Duration = Duration::from_millis(50);
/// Most presence commands in one pipeline.
const BATCH: usize = 512;

/// Sets the presence of a client this node holds, if absent or already ours (periodic refresh
/// must not take a client back from the node it moved to).
const REFRESH_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0";

/// Deletes a client's presence only if it still names this node.
const DEL_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Rebuilds the node table every `period` and whenever nudged; the only writer of it. On a
/// Redis failure the last snapshot stays in use.
pub async fn run_refresher(cluster: Arc<Cluster>, period: Duration, stop: CancellationToken) {
    // The first table should include this node: wait (briefly) for its first publication.
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = cluster.first_published() => {}
        _ = tokio::time::sleep(period) => {}
    }
    let mut last = tokio::time::Instant::now();
    loop {
        cluster.take_nudge();
        last = last.max(tokio::time::Instant::now());
        let read_started = std::time::Instant::now();
        match read_nodes(&cluster).await {
            Ok((live, expired)) => {
                cluster.store_table(live);
                cluster.count_unsure_resumes(read_started);
                if !expired.is_empty() {
                    let mut p = redis::pipe();
                    p.cmd("HDEL").arg(NODES_KEY).arg(&expired).ignore();
                    let _ = cluster.store.pipeline(&p, 1).await;
                }
            }
            Err(()) => tracing::debug!("node table refresh failed; keeping the last snapshot"),
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(last + period) => break,
                _ = cluster.nudged() => {
                    // Gather the misses that arrive together, and keep reads apart, so a storm
                    // of misses costs one read.
                    tokio::time::sleep(NUDGE_DEBOUNCE).await;
                    tokio::time::sleep_until(last + MIN_GAP).await;
                    if cluster.take_nudge() {
                        break;
                    }
                }
            }
        }
    }
}

async fn read_nodes(cluster: &Cluster) -> Result<(Vec<NodeInfo>, Vec<String>), ()> {
    let all: Vec<(String, String)> = cluster
        .store
        .query(redis::cmd("HGETALL").arg(NODES_KEY))
        .await
        .map_err(|_| ())?;
    let now = now_ms();
    let (mut live, mut expired) = (Vec::new(), Vec::new());
    for (id, json) in all {
        match serde_json::from_str::<NodeInfo>(&json) {
            Ok(n) if n.expires_ms > now => live.push(n),
            Ok(_) => expired.push(id),
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "unreadable registry record");
                expired.push(id);
            }
        }
    }
    Ok((live, expired))
}

/// This node's registry record now.
pub fn own_record(cluster: &Cluster, router: &dyn LocalSessions, period: Duration) -> NodeInfo {
    NodeInfo {
        id: cluster.id.to_string(),
        public: cluster.cfg.public_addr,
        internal: cluster.cfg.advertise,
        state: if cluster.is_draining() {
            NodeState::Draining
        } else {
            NodeState::Active
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        sessions: router.session_count() as u64,
        started_ms: cluster.started_ms,
        expires_ms: now_ms()
            + u64::try_from((period * RECORD_PERIODS).as_millis()).unwrap_or(u64::MAX),
    }
}

/// Writes this node's record once. `Some(true)` when the record was missing before (first
/// publication, or Redis lost its data), `None` when Redis did not take it.
pub async fn publish_self(
    cluster: &Cluster,
    router: &dyn LocalSessions,
    period: Duration,
) -> Option<bool> {
    let rec = own_record(cluster, router, period);
    let json = serde_json::to_string(&rec).ok()?;
    let mut p = redis::pipe();
    p.cmd("HSET").arg(NODES_KEY).arg(&rec.id).arg(json);
    p.cmd("PEXPIRE").arg(NODES_KEY).arg(REGISTRY_KEY_TTL_MS);
    let v = cluster.store.pipeline(&p, 2).await.ok()?;
    Some(matches!(v.first(), Some(redis::Value::Int(1))))
}

/// Removes this node's record (end of drain).
pub async fn unpublish_self(cluster: &Cluster) {
    let mut p = redis::pipe();
    p.cmd("HDEL").arg(NODES_KEY).arg(&*cluster.id).ignore();
    let _ = cluster.store.pipeline(&p, 1).await;
}

/// Renews this node's record every `period`. After Redis comes back it asks the presence
/// writer to re-publish every session (Redis may have lost them).
pub async fn run_registry(
    cluster: Arc<Cluster>,
    router: Arc<dyn LocalSessions>,
    period: Duration,
    stop: CancellationToken,
) {
    let mut first = true;
    let mut recoveries = cluster.store.recoveries();
    loop {
        let r = publish_self(&cluster, &*router, period).await;
        if first {
            // The refresher waits for this before its first read (success or not).
            first = false;
            cluster.mark_first_published();
        } else if r == Some(true) || cluster.store.recoveries() != recoveries {
            // Redis was unreachable, or lost our record: it may have lost presence too.
            tracing::info!("redis back: re-publishing registry record and all presence");
            cluster.republish.store(true, Ordering::Relaxed);
            cluster.nudge();
        }
        recoveries = cluster.store.recoveries();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Applies presence writes in pipelined batches, refreshes every session's presence TTL every
/// `refresh`, and re-publishes everything after a failure. Never blocks a request: requests
/// only enqueue.
pub async fn run_presence_writer(
    cluster: Arc<Cluster>,
    router: Arc<dyn LocalSessions>,
    mut rx: mpsc::Receiver<PresenceOp>,
    ttl: Duration,
    refresh: Duration,
    stop: CancellationToken,
) {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut last_refresh = tokio::time::Instant::now();
    let mut ops: Vec<PresenceOp> = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut ops, BATCH) => if n == 0 { return },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let full =
            cluster.republish.swap(false, Ordering::Relaxed) || last_refresh.elapsed() >= refresh;
        if full {
            last_refresh = tokio::time::Instant::now();
        }
        let mut failed = false;
        for chunk in ops.chunks(BATCH) {
            let mut p = redis::pipe();
            for op in chunk {
                add_op(&mut p, &cluster, op, ttl_ms, false);
            }
            failed |= cluster.store.pipeline(&p, chunk.len()).await.is_err();
        }
        ops.clear();
        if full && !failed {
            let all = router.presence_snapshot();
            for chunk in all.chunks(BATCH) {
                let mut p = redis::pipe();
                for (u, v) in chunk {
                    add_op(&mut p, &cluster, &PresenceOp::Put(*u, *v), ttl_ms, true);
                }
                if cluster.store.pipeline(&p, chunk.len()).await.is_err() {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            cluster.republish.store(true, Ordering::Relaxed);
        }
    }
}

fn add_op(p: &mut Pipeline, cluster: &Cluster, op: &PresenceOp, ttl_ms: u64, refresh: bool) {
    match op {
        PresenceOp::Put(u, v) if refresh => {
            p.cmd("EVAL")
                .arg(REFRESH_SCRIPT)
                .arg(1)
                .arg(presence_key(u))
                .arg(&*cluster.id)
                .arg(format_presence(&cluster.id, v))
                .arg(ttl_ms)
                .ignore();
        }
        PresenceOp::Put(u, v) => {
            p.cmd("SET")
                .arg(presence_key(u))
                .arg(format_presence(&cluster.id, v))
                .arg("PX")
                .arg(ttl_ms)
                .ignore();
        }
        PresenceOp::Del(u) => {
            p.cmd("EVAL")
                .arg(DEL_SCRIPT)
                .arg(1)
                .arg(presence_key(u))
                .arg(&*cluster.id)
                .ignore();
        }
    }
}
