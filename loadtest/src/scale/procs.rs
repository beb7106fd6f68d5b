//! The servers under test as processes: starting them, pausing them, and reading their memory
//! and CPU time from `/proc`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigrouter_proto::{self as proto, Message};
use tokio::net::UdpSocket;

use super::sock::Kind;

/// How long a started server gets to answer its first datagram.
const STARTUP: Duration = Duration::from_secs(20);

/// A server process this tool started; killed when dropped.
pub(super) struct Spawned(pub(super) Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = signal(self.0.id(), "CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends a signal (by name, as `kill -NAME`) to a process this tool started.
pub(super) fn signal(pid: u32, name: &str) -> io::Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("kill -{name} {pid} failed")))
    }
}

/// Resident memory of `pid` in bytes (`VmRSS`).
pub(crate) fn rss(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// CPU time (user + system, every thread) of `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); the first field after ')' is field 3.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux when that cannot be run).
pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// A free UDP port on loopback (bound and released: the server binds it right after).
fn free_port() -> io::Result<u16> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(s.local_addr()?.port())
}

/// Waits until the server at `to` answers: a Register for a router (one extra session), any
/// datagram for the echo server.
pub(super) async fn wait_ready(
    to: SocketAddr,
    kind: Kind,
    child: Option<&mut Spawned>,
) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(bind_for(to)).await?;
    let mut m = Message::Register(proto::Register {
        rid: 1,
        local: vec![],
        token: Vec::new(),
        pad: vec![],
    });
    let bytes = proto::encode_hello(&mut m)?;
    let deadline = Instant::now() + STARTUP;
    let mut buf = [0u8; 2048];
    let mut child = child;
    while Instant::now() < deadline {
        if let Some(c) = child.as_deref_mut() {
            if let Some(st) = c.0.try_wait()? {
                anyhow::bail!("the server at {to} exited at start ({st})");
            }
        }
        let _ = sock.send_to(&bytes, to).await;
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(100), sock.recv_from(&mut buf)).await
        {
            let ok = match kind {
                Kind::Echo => true,
                Kind::Router => matches!(proto::decode(&buf[..n]), Ok(Message::Registered(_))),
            };
            if ok {
                return Ok(());
            }
        }
    }
    anyhow::bail!("the server at {to} did not answer within {STARTUP:?}")
}

pub(super) fn bind_for(to: SocketAddr) -> SocketAddr {
    match (to.is_ipv4(), to.ip().is_loopback()) {
        (true, true) => (Ipv4Addr::LOCALHOST, 0).into(),
        (true, false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (false, true) => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
        (false, false) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Whether `bin serve` takes `flag` (older builds lack some limits).
fn serve_takes(bin: &str, flag: &str) -> bool {
    Command::new(bin)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// Starts a router binary on a free loopback port with load-test limits.
pub(super) fn spawn_router(
    bin: &str,
    sessions: usize,
    workers: usize,
    extra: &[String],
) -> anyhow::Result<(SocketAddr, Spawned)> {
    let port = free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let big = "1000000000".to_string();
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .args(["--listen", &addr.to_string(), "--metrics-listen", "off"])
        .args(["--register-rate", &big, "--register-burst", &big])
        .args(["--session-rate", &big, "--session-burst", &big]);
    // The node-wide budget of new sessions (builds that have one) would pace registration.
    if serve_takes(bin, "--new-session-rate") {
        cmd.args(["--new-session-rate", &big, "--new-session-burst", &big]);
    }
    // Address validation (builds that have it) would answer the last tenth of the sessions,
    // above 90% of --max-sessions, with Retry, which these raw sockets do not follow: the
    // sources here are real, and the figures are about the router's work per session.
    if serve_takes(bin, "--address-validation") {
        cmd.args(["--address-validation", "never"]);
    }
    cmd.args(["--max-sessions", &(sessions + 1024).to_string()])
        // Sessions must outlive the phases in which they get no heartbeat (another target is
        // measured): 200 missed heartbeats of 15 s.
        .args(["--missed-heartbeats", "200"])
        .args(["--workers", &workers.to_string()])
        .args(extra)
        .env("SIGROUTER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {bin}: {e}"))?;
    Ok((addr, Spawned(child)))
}

/// Starts this binary's `echo-server` on a free loopback port.
pub(super) fn spawn_echo(workers: usize, total_s: f64) -> anyhow::Result<(SocketAddr, Spawned)> {
    let port = free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let me = std::env::current_exe()?;
    let child = Command::new(me)
        .args([
            "--threads",
            "0",
            "echo-server",
            "--listen",
            &addr.to_string(),
        ])
        .args(["--workers", &workers.to_string()])
        .args(["--duration", &format!("{:.0}", total_s.clamp(60.0, 3600.0))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((addr, Spawned(child)))
}
