//! A real Prometheus scrapes a node's /metrics and answers queries about it: the exposition
//! format, names, labels and values are what operators will see. Also the probe endpoints.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{answer, connect, free_port, outcome, test_config, Node, Raw};
use sigrouter::proto::Message;

struct Prom {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Prom {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_prometheus(target: std::net::SocketAddr) -> Prom {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("sigrouter-prom-{port}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: sigrouter\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus must be installed (scripts/test installs it)");
    Prom { child, port, dir }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Asks Prometheus for an instant query; returns the first sample's value.
async fn query(prom: &Prom, q: &str) -> Option<f64> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", prom.port).parse().unwrap();
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(addr, &format!("/api/v1/query?query={enc}")).await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_node() {
    let mut cfg = test_config();
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let node = Node::start(cfg).await;
    let maddr = node.metrics.unwrap();

    // Probes: liveness and readiness up; unknown paths 404.
    assert_eq!(http_get(maddr, "/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(http_get(maddr, "/readyz").await.map(|r| r.0), Some(200));
    assert_eq!(http_get(maddr, "/nope").await.map(|r| r.0), Some(404));

    let mut a = Raw::register(node.addr).await;
    let mut b = Raw::register(node.addr).await;
    for _ in 0..3 {
        let (rid, inc) = connect(&mut a, &b, "x").await;
        answer(&mut b, inc.connection, true, "").await;
        assert!(matches!(outcome(&a, rid).await, Message::Connected(_)));
    }
    let prom = start_prometheus(maddr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = (None, None, None);
    while Instant::now() < deadline {
        seen = (
            query(&prom, "sigrouter_sessions").await,
            query(&prom, "sigrouter_connects_total{outcome=\"connected\"}").await,
            query(&prom, "sigrouter_connect_seconds_count").await,
        );
        if seen == (Some(2.0), Some(3.0), Some(3.0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        seen,
        (Some(2.0), Some(3.0), Some(3.0)),
        "what Prometheus saw"
    );
    // The scrape is healthy (Prometheus parsed every line).
    assert_eq!(query(&prom, "up{job=\"sigrouter\"}").await, Some(1.0));
    assert_eq!(
        query(
            &prom,
            "scrape_samples_post_metric_relabeling{job=\"sigrouter\"} > 50"
        )
        .await
        .map(|v| v > 50.0),
        Some(true)
    );
}
