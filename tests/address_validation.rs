//! Address validation in the real binary: `sigrouter serve` started with
//! `SIGROUTER_ADDRESS_VALIDATION=always`, against a bare datagram and the client library.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_client::{Client, ClientConfig};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

/// The real binary, `sigrouter serve` with `SIGROUTER_ADDRESS_VALIDATION=always`: a bare
/// Register (a source that does not follow Retry) gets a Retry no larger than itself, and the
/// client library registers through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_validates_addresses_when_told_and_the_client_follows() {
    use sigrouter::proto::{self, Message};

    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], common::stable_port()));
    let _serve = Reap(
        std::process::Command::new(env!("CARGO_BIN_EXE_sigrouter"))
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--metrics-listen",
                "off",
            ])
            .env("SIGROUTER_ADDRESS_VALIDATION", "always")
            .env("SIGROUTER_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn sigrouter serve"),
    );
    let mut m = Message::Register(proto::Register {
        rid: 1,
        local: vec![],
        token: Vec::new(),
        pad: vec![],
    });
    let req = proto::encode_hello(&mut m).unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let until = Instant::now() + WAIT;
    let mut buf = [0u8; 2048];
    // Until the node is up: send, wait a moment for the answer.
    let answer = loop {
        assert!(Instant::now() < until, "the node never answered");
        sock.send_to(&req, addr).await.unwrap();
        let wait = tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf));
        if let Ok(Ok((n, _))) = wait.await {
            break buf[..n].to_vec();
        }
    };
    assert!(answer.len() <= req.len());
    match proto::decode(&answer) {
        Ok(Message::Retry(r)) => assert_eq!(r.rid, 1),
        other => panic!("expected Retry, got {other:?}"),
    }
    let (c, _events) = Client::register(ClientConfig::new(addr))
        .await
        .expect("register through the Retry");
    assert!(!c.uuid().is_nil());
    c.heartbeat().await.unwrap();
}
