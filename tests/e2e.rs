//! The acceptance run, as a new user would do it: a `sigrouter serve` process, a
//! `sigrouter client listen` process and a `sigrouter client connect` process over real UDP on
//! loopback. Each client learns the other's observed address; SIGTERM stops the server with
//! exit code 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sigrouter");

fn udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads JSON lines from a child's stdout on a thread.
fn lines(child: &mut std::process::Child) -> mpsc::Receiver<Value> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn next_event(rx: &mpsc::Receiver<Value>, event: &str) -> Value {
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("no {event} line"));
        if v["event"] == event {
            return v;
        }
    }
}

#[test]
fn serve_listen_and_connect_processes_exchange_addresses() {
    let server = format!("127.0.0.1:{}", udp_port());
    let mut serve = Command::new(BIN)
        .args(["serve", "--listen", &server, "--metrics-listen", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut listen = Command::new(BIN)
        .args([
            "client",
            "listen",
            "--server",
            &server,
            "--payload",
            "welcome",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(&mut listen);
    // The server may take a moment to bind; the client retransmits its Register meanwhile.
    let reg = next_event(&rx, "registered");
    let uuid = reg["uuid"].as_str().unwrap().to_string();

    let out = Command::new(BIN)
        .args([
            "client",
            "connect",
            "--server",
            &server,
            "--to",
            &uuid,
            "--payload",
            "hello",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let connected: Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(connected["event"], "connected");
    assert_eq!(connected["peer"], uuid.as_str());
    assert_eq!(connected["payload"], "welcome");
    // The initiator learned the listener's observed address...
    assert_eq!(connected["observed"], reg["observed"]);
    // ...and the listener learned the initiator's.
    let incoming = next_event(&rx, "incoming");
    assert_eq!(incoming["connection"], connected["connection"]);
    assert_eq!(incoming["payload"], "hello");
    let theirs = incoming["observed"].as_str().unwrap();
    assert!(
        theirs.starts_with("127.0.0.1:") && theirs != reg["observed"].as_str().unwrap(),
        "{theirs}"
    );

    let _ = listen.kill();
    let _ = listen.wait();
    let pid = serve.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = serve.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "serve did not exit cleanly on SIGTERM"
    );
}
