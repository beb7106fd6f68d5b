//! Protocol exchanges between two hand-driven clients: Connect and its answer, outcome and
//! Signal relay, each checked as it goes.

use std::time::{Duration, Instant};

use sigrouter::proto::{self, FailReason, Message};
use uuid::Uuid;

use super::raw::{payload, Raw};
use super::T;

/// Sends Connect from `a` to `b`; returns the Incoming `b` sees (already acked).
pub async fn connect(a: &mut Raw, b: &Raw, text: &str) -> (u64, proto::Incoming) {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let rid = a.send_connect(b.uuid, text).await;
        let from = a.uuid;
        // A retry-later (cluster state not at hand yet) is retried, as a real client does.
        let got = tokio::select! {
            inc = b.recv_until(T, |m| match m {
                Message::Incoming(i) if i.from == from && i.payload == payload(text) => Some(i.clone()),
                _ => None,
            }) => inc.map(|i| (rid, i)),
            _ = a.recv_until(T, |m| matches!(m, Message::ConnectFailed(f) if f.rid == rid && f.reason == FailReason::RetryLater).then_some(())) => None,
        };
        if let Some(r) = got {
            return r;
        }
        assert!(Instant::now() < end, "no Incoming for the Connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn answer(b: &mut Raw, conn: Uuid, accept: bool, text: &str) {
    let rid = b.next_rid();
    let ans = proto::Answer {
        rid,
        uuid: b.uuid,
        connection: conn,
        payload: payload(text),
    };
    b.send(&if accept {
        Message::Accept(ans)
    } else {
        Message::Reject(ans)
    })
    .await;
    b.recv_until(T, |m| {
        matches!(m, Message::Ack(a) if a.rid == rid).then_some(())
    })
    .await
    .expect("Ack for the answer");
}

pub async fn outcome(a: &Raw, rid: u64) -> Message {
    a.recv_until(Duration::from_secs(15), |m| match m {
        Message::Connected(c) if c.rid == rid => Some(m.clone()),
        Message::ConnectFailed(c) if c.rid == rid => Some(m.clone()),
        _ => None,
    })
    .await
    .expect("an outcome for the Connect")
}

pub async fn signal(from: &mut Raw, to: &Raw, connection: Uuid, text: &str) {
    let rid = from.next_rid();
    let uuid = from.uuid;
    from.send(&Message::Signal(proto::Signal {
        rid,
        uuid,
        connection,
        payload: payload(text),
    }))
    .await;
    from.recv_until(T, |m| {
        matches!(m, Message::Ack(a) if a.rid == rid).then_some(())
    })
    .await
    .expect("Signal acked");
    let got = to
        .recv_until(T, |m| match m {
            Message::SignalPush(s) => Some(s.clone()),
            _ => None,
        })
        .await
        .expect("SignalPush");
    assert_eq!(
        (got.from, got.connection, got.payload),
        (uuid, connection, payload(text))
    );
}

/// A Connect to `to` (nobody online) fails with `offline`.
pub async fn assert_offline(a: &mut Raw, to: Uuid) {
    let rid = a.send_connect(to, "").await;
    match outcome(a, rid).await {
        Message::ConnectFailed(f) => assert_eq!(f.reason, FailReason::Offline),
        m => panic!("expected offline, got {m:?}"),
    }
}
