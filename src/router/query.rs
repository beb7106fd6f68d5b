//! Query: which of some clients are online. Answered at once from the local sessions and the
//! presence cache; anything the cache does not know becomes a lookup job.

use std::time::Instant;

use sigrouter_proto::{self as proto, ErrorCode, Message, QueryResult};
use uuid::Uuid;

use super::outbox::{Job, Outbox};
use super::state::{ErrorTo, State};
use crate::session::SenderView;

/// Query from session `uuid`.
pub(crate) fn query(
    st: &State,
    now: Instant,
    uuid: Uuid,
    view: &SenderView,
    q: proto::Query,
    out: &mut Outbox,
) {
    let mut online = Vec::with_capacity(q.uuids.len());
    let mut unknown = false;
    for u in &q.uuids {
        if st.sessions.contains(u) {
            online.push(true);
            continue;
        }
        match &st.cluster {
            None => online.push(false),
            Some(c) => match c.cached_presence(u, now) {
                Some(Some(node)) => online.push(*node != *c.id && c.node(&node).is_some()),
                Some(None) => online.push(false),
                None => {
                    unknown = true;
                    break;
                }
            },
        }
    }
    if unknown {
        if !st.job_start(uuid) {
            st.metrics.rate_limited_jobs.increment(1);
            st.error(
                now,
                ErrorTo::Sender(view),
                q.rid,
                ErrorCode::RetryLater,
                out,
            );
            return;
        }
        out.jobs.push(Job::Query {
            uuid,
            rid: q.rid,
            uuids: q.uuids,
        });
        return;
    }
    st.send(
        view,
        Message::QueryResult(QueryResult { rid: q.rid, online }),
        out,
    );
}

/// Completes a Query job: `online` per asked UUID, or `None` if the directory failed.
pub(crate) fn complete_query(
    st: &State,
    now: Instant,
    uuid: Uuid,
    rid: u64,
    online: Option<Vec<bool>>,
    out: &mut Outbox,
) {
    let Some(p) = st.sessions.peer(&uuid) else {
        return;
    };
    let view = SenderView::to_peer(uuid, p);
    match online {
        Some(online) => st.send(
            &view,
            Message::QueryResult(QueryResult { rid, online }),
            out,
        ),
        None => st.error(now, ErrorTo::Sender(&view), rid, ErrorCode::RetryLater, out),
    }
}
