//! A real Prometheus scrapes a node's /metrics and answers queries about it: the exposition
//! format, names, labels and values are what operators will see. Also the probe endpoints,
//! every metric the dashboard and the alerts name, and the post-mortem's failure (a node-table
//! refresher that cannot refresh) firing its alert, from the repository's own rule file,
//! within a minute.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    answer, cluster_config, connect, free_port, outcome, test_config, wait_for_nodes, Node, Raw,
    Redis,
};
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
    start_prometheus_with(target, "sigrouter", None)
}

/// Prometheus scraping `target` every second as job `job`, evaluating `rules` every second.
fn start_prometheus_with(target: std::net::SocketAddr, job: &str, rules: Option<&Path>) -> Prom {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("sigrouter-prom-{port}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    let rule_files = rules
        .map(|r| format!("rule_files:\n  - '{}'\n", r.display()))
        .unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
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

fn repo_file(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Metric names (`sigrouter_*`, `process_*`) in a text: PromQL, descriptions, comments.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (text[i..].starts_with("sigrouter_") || text[i..].starts_with("process_"))
        {
            let end = text[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| i + e);
            out.insert(text[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let redis = Redis::start();
    let mut cfg = cluster_config(&redis.url(), "names-1");
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let n1 = Node::start(cfg).await;
    let n2 = Node::start(cluster_config(&redis.url(), "names-2")).await;
    wait_for_nodes(&[&n1, &n2], 2).await;
    // Traffic that fills the histograms: a local and a cross-node connect.
    let mut a = Raw::register(n1.addr).await;
    let mut b = Raw::register(n1.addr).await;
    let mut c = Raw::register(n2.addr).await;
    let (rid, inc) = connect(&mut a, &b, "x").await;
    answer(&mut b, inc.connection, true, "").await;
    assert!(matches!(outcome(&a, rid).await, Message::Connected(_)));
    let (rid, inc) = connect(&mut a, &c, "y").await;
    answer(&mut c, inc.connection, true, "").await;
    assert!(matches!(outcome(&a, rid).await, Message::Connected(_)));

    let (status, text) = http_get(n1.metrics.unwrap(), "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            exported.insert(rest.split(' ').next().unwrap().to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            exported.insert(name.to_string());
        }
    }
    let dashboard = std::fs::read_to_string(repo_file("grafana/sigrouter.json")).unwrap();
    let rules = std::fs::read_to_string(repo_file("k8s/monitoring/sigrouter.rules.yaml")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut used = BTreeSet::new();
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match x {
                        serde_json::Value::String(s) if k == "expr" || k == "description" => {
                            out.push(s.clone())
                        }
                        _ => exprs(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
            _ => {}
        }
    }
    let mut texts = Vec::new();
    exprs(&dash, &mut texts);
    texts.push(rules);
    for t in &texts {
        used.extend(names_in(t));
    }
    assert!(used.len() > 30, "found only {used:?}");
    for must in [
        "sigrouter_build_info",
        "sigrouter_node_table_age_seconds",
        "sigrouter_oldest_waiting_request_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            used.contains(must),
            "the dashboard and alerts never use {must}"
        );
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named by grafana/sigrouter.json or the alert rules but not exported by a cluster node: {missing:?}"
    );
    println!(
        "{} metric names used by the dashboard and the alerts, all exported",
        used.len()
    );
}

/// The post-mortem's failure: the node table stops being refreshed. Here Redis sleeps (DEBUG
/// SLEEP), so every refresh fails; a real Prometheus scrapes the node every second and
/// evaluates the repository's rule file. The table's age must rise on /metrics and
/// SigrouterNodeTableStale must fire within a minute, while SigrouterRequestsStalled stays
/// silent (every wait still ends at its deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_table_that_stops_refreshing_fires_its_alert_within_a_minute() {
    let redis = Redis::start();
    let mut cfg = cluster_config(&redis.url(), "stale-1");
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    if let Some(cc) = cfg.cluster.as_mut() {
        // The production refresh period; a short Redis deadline so each attempt fails fast.
        cc.table_period = Duration::from_secs(5);
        cc.redis_timeout = Duration::from_millis(300);
    }
    let node = Node::start(cfg).await;
    // An annotation-style job name: no rule may depend on job="sigrouter".
    let prom = start_prometheus_with(
        node.metrics.unwrap(),
        "kubernetes-pods",
        Some(&repo_file("k8s/monitoring/sigrouter.rules.yaml")),
    );
    let age_q = "sigrouter_node_table_age_seconds";
    let stale_q = "ALERTS{alertname=\"SigrouterNodeTableStale\",alertstate=\"firing\"}";
    let stalled_q = "ALERTS{alertname=\"SigrouterRequestsStalled\"}";
    // Healthy first: Prometheus sees a young table, and the rules are loaded and quiet.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let age = query(&prom, age_q).await;
        let rules_loaded = query(&prom, "count(ALERTS) or vector(0)").await.is_some();
        if age.is_some_and(|a| a < 6.0) && rules_loaded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the node: {age:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(query(&prom, stale_q).await, None);

    let hung = Instant::now();
    redis.cmd_detached(&["DEBUG", "SLEEP", "90"]);
    let mut seen = Vec::new();
    let fired = loop {
        let age = query(&prom, age_q).await;
        if let Some(a) = age {
            if seen.last().is_none_or(|(_, last)| *last != a) {
                seen.push((hung.elapsed().as_secs_f64(), a));
            }
        }
        assert_eq!(
            query(&prom, stalled_q).await,
            None,
            "SigrouterRequestsStalled fired: waits have deadlines"
        );
        if query(&prom, stale_q).await == Some(1.0) {
            break hung.elapsed();
        }
        assert!(
            hung.elapsed() < Duration::from_secs(60),
            "SigrouterNodeTableStale did not fire within a minute; ages seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ages: Vec<f64> = seen.iter().map(|(_, a)| *a).collect();
    println!(
        "refresher failing from t=0: SigrouterNodeTableStale fired at t={:.1}s; table ages Prometheus saw (t, age): {:?}",
        fired.as_secs_f64(),
        seen.iter()
            .map(|(t, a)| format!("({t:.0}s, {a:.0}s)"))
            .collect::<Vec<_>>()
    );
    assert!(
        ages.windows(2).all(|w| w[1] >= w[0]),
        "the age must only grow while nothing refreshes: {ages:?}"
    );
    assert!(
        ages.last().is_some_and(|a| *a > 30.0),
        "fired before the age passed 30 s: {ages:?}"
    );
}
