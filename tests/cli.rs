//! `sigrouter client listen|connect|query` against a real node over UDP, run in-process
//! through `cli::run_with` (the binary's own module, compiled in here) with flags parsed by clap exactly as the binary does.

mod common;
// The binary's own module, compiled in here; the test drives `run_with`, not `run`.
#[path = "../src/bin/sigrouter/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use cli::{run_with, ClientCommand};
use common::{test_config, Node};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: ClientCommand,
}

fn parse(args: &[&str]) -> ClientCommand {
    let mut v = vec!["client"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).expect("flags parse").cmd
}

/// Sends every complete line written to it into a channel.
struct LineSink {
    buf: Vec<u8>,
    tx: mpsc::UnboundedSender<String>,
}

impl Write for LineSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        while let Some(i) = self.buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let _ = self
                .tx
                .send(String::from_utf8_lossy(&line).trim_end().to_owned());
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `listen` command running in the background.
struct Listener {
    lines: mpsc::UnboundedReceiver<String>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<i32>,
}

impl Listener {
    fn start(args: &[&str]) -> Self {
        let cmd = parse(args);
        let (tx, lines) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let sink = LineSink {
                buf: Vec::new(),
                tx,
            };
            run_with(cmd, sink, async {
                let _ = stopped.await;
            })
            .await
            .expect("listen runs")
        });
        Self {
            lines,
            stop: Some(stop),
            task,
        }
    }

    /// The next line whose "event" is `event`, skipping others.
    async fn next(&mut self, event: &str) -> Value {
        let found = timeout(WAIT, async {
            loop {
                let line = self.lines.recv().await.expect("listen output ended");
                let v: Value = serde_json::from_str(&line).expect("a JSON line");
                if v["event"] == event {
                    return v;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {event:?} line within {WAIT:?}"))
    }

    async fn stop(mut self) -> i32 {
        let _ = self.stop.take().unwrap().send(());
        timeout(WAIT, self.task)
            .await
            .expect("listen stops")
            .unwrap()
    }
}

/// Runs a one-shot command; returns its exit code and its JSON lines.
async fn run(args: &[&str]) -> (i32, Vec<Value>) {
    let mut out = Vec::new();
    let code = timeout(
        Duration::from_secs(30),
        run_with(parse(args), &mut out, std::future::pending()),
    )
    .await
    .expect("command finishes")
    .expect("command runs");
    let lines = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    (code, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_connect_signal_query_and_exit_codes() {
    let node = Node::start(test_config()).await;
    let server = node.addr.to_string();
    let mut listener = Listener::start(&[
        "listen",
        "--server",
        &server,
        "--payload",
        "welcome",
        "--echo-signals",
    ]);
    let reg = listener.next("registered").await;
    let uuid = reg["uuid"].as_str().unwrap().to_owned();
    assert!(reg["observed"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(reg["local"].as_str().unwrap().starts_with("127.0.0.1:"));

    // Connect with a signal: the listener accepts with its payload and echoes the signal.
    let (code, lines) = run(&[
        "connect",
        "--server",
        &server,
        "--to",
        &uuid,
        "--payload",
        "offer",
        "--signal",
        "ping",
    ])
    .await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let connected = &lines[0];
    assert_eq!(connected["event"], "connected");
    assert_eq!(connected["peer"], uuid.as_str());
    assert_eq!(connected["payload"], "welcome");
    assert_eq!(connected["observed"], reg["observed"]);
    assert_eq!(connected["local"], Value::from(vec![reg["local"].clone()]));
    let echoed = &lines[1];
    assert_eq!(echoed["event"], "signal");
    assert_eq!(echoed["connection"], connected["connection"]);
    assert_eq!(echoed["from"], uuid.as_str());
    assert_eq!(echoed["payload"], "ping");

    let incoming = listener.next("incoming").await;
    assert_eq!(incoming["connection"], connected["connection"]);
    assert_eq!(incoming["payload"], "offer");
    assert!(incoming["observed"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(incoming["local"].as_array().unwrap().len(), 1);
    let signal = listener.next("signal").await;
    assert_eq!(signal["payload"], "ping");
    assert_eq!(signal["from"], incoming["from"]);

    // Nobody there: exit 1 with the reason.
    let nobody = uuid::Uuid::new_v4().to_string();
    let (code, lines) = run(&["connect", "--server", &server, "--to", &nobody]).await;
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["event"], "connect_failed");
    assert_eq!(lines[0]["reason"], "offline");

    // Query: one line per UUID, in order.
    let (code, lines) = run(&["query", "--server", &server, &uuid, &nobody]).await;
    assert_eq!(code, 0);
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"uuid": uuid, "online": true}),
            serde_json::json!({"uuid": nobody, "online": false}),
        ]
    );

    // Stopping the listener says Bye: it is offline at once.
    assert_eq!(listener.stop().await, 0);
    let (_, lines) = run(&["query", "--server", &server, &uuid]).await;
    assert_eq!(lines[0]["online"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_print_one_json_line_and_exit_2() {
    // A UDP port that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = silent.local_addr().unwrap().to_string();
    let (code, lines) = run(&[
        "query",
        "--server",
        &server,
        "--request-timeout-secs",
        "0.5",
        &uuid::Uuid::new_v4().to_string(),
    ])
    .await;
    assert_eq!(code, 2);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["event"], "error");
    assert!(
        lines[0]["error"].as_str().unwrap().contains("no answer"),
        "{lines:?}"
    );

    let (code, lines) = run(&[
        "connect",
        "--server",
        "no-port-here",
        "--to",
        &server_uuid(),
    ])
    .await;
    assert_eq!(code, 2);
    assert_eq!(lines[0]["event"], "error");

    let (code, lines) = run(&[
        "connect",
        "--server",
        &server,
        "--to",
        &server_uuid(),
        "--connect-timeout-secs=0",
    ])
    .await;
    assert_eq!(code, 2);
    assert!(lines[0]["error"]
        .as_str()
        .unwrap()
        .contains("--connect-timeout-secs"));
}

fn server_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[test]
fn flags_parse_and_bad_input_is_refused() {
    assert!(
        Cli::try_parse_from(["client", "query", "--server", "h:1"]).is_err(),
        "needs a UUID"
    );
    assert!(Cli::try_parse_from(["client", "connect", "--server", "h:1", "--to", "x"]).is_err());
    match parse(&[
        "listen",
        "--server",
        "h:1",
        "--local",
        "10.0.0.2:5000,10.0.0.3:5000",
    ]) {
        ClientCommand::Listen(a) => {
            assert_eq!(a.router.local.len(), 2);
            assert!(!a.echo_signals);
            assert_eq!(a.payload, "");
        }
        other => panic!("{other:?}"),
    }
}

/// The real binary: flags from `SIGROUTER_*` variables, a line visible while the process
/// still runs (flushed), SIGTERM ends `listen` with a Bye and exit 0.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reads_env_flushes_lines_and_stops_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    /// Kills the child if the test fails before it ends by itself.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }

    let node = Node::start(test_config()).await;
    let server = node.addr.to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_sigrouter"))
        .args(["client", "listen"])
        .env("SIGROUTER_SERVER", &server)
        .env("SIGROUTER_ECHO_SIGNALS", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sigrouter");
    let mut child = Reap(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, mut lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = timeout(WAIT, lines.recv())
        .await
        .expect("a line while listen runs")
        .expect("stdout open");
    let reg: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(reg["event"], "registered");
    let uuid = reg["uuid"].as_str().unwrap().to_owned();

    // connect through the binary too, with every flag from the environment.
    let out = tokio::task::spawn_blocking({
        let (server, uuid) = (server.clone(), uuid.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_sigrouter"))
                .args(["client", "connect"])
                .env("SIGROUTER_SERVER", server)
                .env("SIGROUTER_TO", uuid)
                .env("SIGROUTER_PAYLOAD", "offer")
                .env("SIGROUTER_SIGNAL", "ping")
                .output()
                .expect("run connect")
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let connect_lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(connect_lines[0]["event"], "connected");
    assert_eq!(connect_lines[0]["peer"], uuid.as_str());
    assert_eq!(connect_lines[1]["event"], "signal");
    assert_eq!(connect_lines[1]["payload"], "ping");

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(code.code(), Some(0));
    // It said Bye on the way out.
    let (_, q) = run(&["query", "--server", &server, &uuid]).await;
    assert_eq!(q[0]["online"], false);
}
