//! STUN interop against a third-party client: Debian coturn's `turnutils_stunclient`.
//!
//! The binary comes from the `coturn` package (`apt-get install coturn`). These tests fail, not
//! skip, when it is missing: a green run must mean the interop was really checked.
//!
//! - `stunclient_against_stun_answer`: a plain std UDP loop around [`sigrouter::stun::answer`],
//!   which proves the codec on its own (IPv4, and IPv6 when the host has `::1`).
//! - `stunclient_against_server`: the same against a running [`sigrouter::server::Server`]
//!   (which cannot tell us the client's port, so the IP is checked), plus a request from a
//!   socket whose port we know, to check the exact mapped address end to end.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stun_types::attribute::XorMappedAddress;
use stun_types::message::{Message, MessageClass, MessageWriteVec, BINDING};
use stun_types::prelude::*;

const STUNCLIENT: &str = "/usr/bin/turnutils_stunclient";
/// `turnutils_stunclient` waits for its answer forever; this is how long we let it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `turnutils_stunclient -p PORT HOST` and returns its stdout; panics with what it printed
/// if it fails or hangs (no answer).
fn run_stunclient(server: SocketAddr) -> String {
    assert!(
        Path::new(STUNCLIENT).exists(),
        "{STUNCLIENT} is missing: install Debian's coturn package (apt-get install coturn)"
    );
    let out_file = tempfile(server);
    let mut child = Command::new(STUNCLIENT)
        .arg("-p")
        .arg(server.port().to_string())
        .arg(server.ip().to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {STUNCLIENT}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > CLIENT_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "{STUNCLIENT} got no answer from {server} in {CLIENT_TIMEOUT:?}; it printed:\n{}",
                std::fs::read_to_string(&out_file).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_file).unwrap();
    std::fs::remove_file(&out_file).ok();
    assert!(status.success(), "{STUNCLIENT} failed ({status}):\n{out}");
    out
}

fn tempfile(server: SocketAddr) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "sigrouter-stunclient-{}-{}.out",
        std::process::id(),
        server.port()
    ))
}

/// The address on the client's `UDP reflexive addr` line, e.g.
/// `0: : UDP reflexive addr: 127.0.0.1:41234`.
fn reflexive(out: &str) -> SocketAddr {
    let line = out
        .lines()
        .find(|l| l.contains("UDP reflexive addr"))
        .unwrap_or_else(|| panic!("no `UDP reflexive addr` line in:\n{out}"));
    let addr = line
        .rsplit("addr:")
        .next()
        .unwrap()
        .trim()
        .trim_matches(|c| c == '[' || c == ']');
    parse_printed(addr).unwrap_or_else(|| panic!("cannot parse an address in {line:?}"))
}

/// coturn prints IPv6 as `::1:5000` (address, colon, port, no brackets).
fn parse_printed(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let (ip, port) = s.rsplit_once(':')?;
    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
}

/// A STUN responder made of a std socket and [`sigrouter::stun::answer`]; records who asked.
struct Responder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    fn start(bind: &str) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                seen2.lock().unwrap().push(from);
                if let Ok(resp) = sigrouter::stun::answer(&buf[..n], from) {
                    sock.send_to(&resp, from).unwrap();
                }
            }
        });
        Ok(Self {
            addr,
            seen,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

fn check_responder(bind: &str) {
    let r = Responder::start(bind).unwrap();
    let out = run_stunclient(r.addr);
    eprintln!("{STUNCLIENT} against {}:\n{out}", r.addr);
    let got = reflexive(&out);
    let seen = r.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        1,
        "one request expected, saw {seen:?}; output:\n{out}"
    );
    assert_eq!(
        got, seen[0],
        "reflexive address vs the request's source; output:\n{out}"
    );
    assert_eq!(got.ip(), r.addr.ip());
    assert_ne!(got.port(), r.addr.port());
}

#[test]
fn stunclient_against_stun_answer() {
    check_responder("127.0.0.1:0");
    // IPv6 when the host has it (CI containers may not).
    if UdpSocket::bind("[::1]:0").is_ok() {
        check_responder("[::1]:0");
    } else {
        eprintln!("no ::1 on this host: IPv6 interop not checked");
    }
}

/// Sends a Binding request from a socket whose address we know and returns the mapped address
/// from the answer.
fn ask(server: SocketAddr) -> (SocketAddr, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let req = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
    let mut buf = [0u8; 1500];
    for _ in 0..10 {
        sock.send_to(&req, server).unwrap();
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            assert_eq!(from, server, "answer must come from the port asked");
            let resp = Message::from_bytes(&buf[..n]).expect("a STUN answer");
            assert!(resp.has_class(MessageClass::Success) && resp.has_method(BINDING));
            let mapped = resp
                .attribute::<XorMappedAddress>()
                .expect("XOR-MAPPED-ADDRESS")
                .addr(resp.transaction_id());
            return (sock.local_addr().unwrap(), mapped);
        }
    }
    panic!("no STUN answer from {server}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stunclient_against_server() -> anyhow::Result<()> {
    let server = sigrouter::server::Server::bind(sigrouter::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await?;
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        stop_rx.await.ok();
    }));

    let ((local, mapped), out) = tokio::task::spawn_blocking(move || {
        let exact = ask(addr);
        (exact, run_stunclient(addr))
    })
    .await?;
    assert_eq!(mapped, local, "XOR-MAPPED-ADDRESS is the request's source");
    let got = reflexive(&out);
    assert_eq!(got.ip(), "127.0.0.1".parse::<std::net::IpAddr>()?, "{out}");
    assert_ne!(got.port(), 0, "{out}");
    assert_ne!(got.port(), addr.port(), "{out}");

    stop_tx.send(()).ok();
    tokio::time::timeout(Duration::from_secs(10), running).await???;
    Ok(())
}
