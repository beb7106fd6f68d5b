//! Address validation: the client answers `Retry` with the same request, a new request id and
//! the token; a `Retry` from anyone but its router is ignored.

use sigrouter_client::{Client, ClientConfig, Secret};
use sigrouter_proto::{Message, Retry, MIN_HELLO_LEN};
use uuid::Uuid;

use crate::router::Router;

#[tokio::test]
async fn a_retry_is_answered_with_the_token_and_a_new_request_id() {
    let r = Router::new(Uuid::new_v4(), Secret([5; 32])).await;
    let stranger = Router::new(Uuid::new_v4(), Secret([6; 32])).await;
    let reg = tokio::spawn(Client::register(ClientConfig::new(r.addr())));
    let (m, _, from) = r.recv().await;
    let Message::Register(first) = m else {
        panic!("expected Register, got {m:?}")
    };
    assert!(first.token.is_empty(), "no token at first");
    // A forged Retry from elsewhere comes first; then the router's own.
    let forged = Message::Retry(Retry {
        rid: first.rid,
        token: b"forged".to_vec(),
    });
    stranger.send(&forged, from).await;
    let token = vec![0x42; 21];
    let retry = Message::Retry(Retry {
        rid: first.rid,
        token: token.clone(),
    });
    r.send(&retry, from).await;
    // The next Register carries the router's token under a new request id (retransmissions of
    // the first one, sent before the Retry arrived, may come in between).
    let second = loop {
        let (m, bytes, again) = r.recv().await;
        assert_eq!(
            again, from,
            "from the same socket: the token is bound to it"
        );
        let Message::Register(m) = m else {
            panic!("expected Register, got {m:?}")
        };
        assert!(bytes.len() >= MIN_HELLO_LEN, "still padded");
        if m.rid == first.rid {
            assert!(m.token.is_empty(), "a retransmission is unchanged");
            continue;
        }
        break m;
    };
    assert!(second.rid > first.rid);
    assert_eq!(second.token, token);
    assert_eq!(second.local, first.local);
    r.send(&r.registered(second.rid, from), from).await;
    let (client, _events) = reg.await.unwrap().expect("registered after the Retry");
    assert_eq!(client.uuid(), r.uuid);
}
