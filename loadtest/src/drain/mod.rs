//! `drain`: one node holding many sessions drains while heartbeats on the other nodes go on.
//!
//! Starts redis-server and `--nodes` `sigrouter serve` processes in cluster mode (the
//! rolling-upgrade run's process handling), registers `--sessions` simulated clients on the
//! first node (many per socket, each from its own loopback address: see `fleet`) and
//! `--hb-sessions` on the others, heartbeats those at `--hb-rate` per second, then sends the
//! first node SIGTERM. Every simulated client follows its own `Migrate` as the client library
//! does: verify, acknowledge, Resume at the node named (and on at the node an `Error Draining`
//! names). The run reports how long until every session resumed elsewhere and how many did
//! not, the receiving nodes' resumes by cause (from their /metrics), the heartbeat latency on
//! the other nodes before, during and after the drain, and a reachability check afterwards:
//! every session heartbeats the node holding it, a client of the library queries a sample of
//! the sessions and connects to some (they accept).
//!
//! The simulated sessions do not heartbeat while they wait (a million would need 67,000 per
//! second at the default 15 s): the nodes get `--missed-heartbeats 40` so that none expires
//! during the run. The loaded node gets the node-wide new-session budget raised, only so that
//! registration is quick; the receiving nodes keep their defaults.
//!
//! # Layout
//! - `fleet`: the simulated clients (lanes of sessions on one socket each).
//! - `plot`: DIR/drain.svg.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::distributions::{Alphanumeric, DistString};
use rand::seq::SliceRandom;
use serde_json::{json, Value};
use sigrouter_client::{Client, ClientConfig, ConnectOutcome};
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use uuid::Uuid;

use crate::scale::procs::rss;
use crate::stats;
use crate::upgrade::procs::{start_all, Exit, Node, NodeSettings, Redis};

mod args;
mod fleet;
mod plot;
mod watch;

use args::validate;
pub(crate) use args::Args;
use watch::{drain_line, metric, Cpu, Lanes};

use fleet::{Ctl, Lane, CHECK, HOLD, REGISTER, STOP, TIMELINE_S};

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Runs the drain and returns the summary (`passed` says whether the criteria held).
pub(crate) async fn run(a: Args) -> anyhow::Result<Option<Value>> {
    validate(&a)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let bin = match &a.sigrouter {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("sigrouter"),
    };
    anyhow::ensure!(bin.exists(), "no sigrouter binary at {}", bin.display());
    let drain_secs = a.drain_secs.unwrap_or(20.0);

    // ------------------------------------------------------------ processes
    eprintln!("starting redis-server and {} nodes", a.nodes);
    let redis = Redis::start(&a.out).await?;
    let key_file = a.out.join("cluster.key");
    std::fs::write(
        &key_file,
        Alphanumeric.sample_string(&mut rand::thread_rng(), 48),
    )?;
    let settings = NodeSettings {
        bin: &bin,
        redis_url: &redis.url(),
        key_file: &key_file,
        public_addr: None,
        drain_secs: a.drain_secs,
        dir: &a.out,
    };
    let mut common: Vec<String> = vec![
        "--max-sessions".into(),
        (a.sessions + a.hb_sessions + 100_000).to_string(),
        // The simulated sessions do not heartbeat while they wait: none may expire.
        "--missed-heartbeats".into(),
        "40".into(),
        // The simulated clients do not follow `Retry` (the client library does): near the
        // session cap a node under `pressure` would answer their Registers and Resumes so.
        "--address-validation".into(),
        "never".into(),
    ];
    common.extend(a.node_args.iter().cloned());
    let mut nodes = Vec::new();
    for i in 1..=a.nodes {
        let mut n = Node::new(&format!("n{i}"), &settings)?;
        n.add_args(&common);
        if i == 1 {
            // Registration speed only; the receiving nodes keep the default budget.
            n.add_args(&[
                "--new-session-rate".into(),
                "10000000".into(),
                "--new-session-burst".into(),
                "10000000".into(),
            ]);
        }
        nodes.push(n);
    }
    start_all(&mut nodes).await?;
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(nodes.iter().map(|n| n.addr).collect());
    stats::check_targets(&addrs, false)?;

    // ------------------------------------------------------------ registration
    let ctl = Arc::new(Ctl::default());
    ctl.set_phase(REGISTER);
    let mut lanes = Vec::new();
    for k in 0..a.lanes {
        let n = a.sessions / a.lanes + usize::from(k < a.sessions % a.lanes);
        lanes.push(Lane::new(n, addrs.clone(), 0, 0.0, ctl.clone()).await?);
    }
    let others = a.nodes - 1;
    for i in 0..others {
        let n = a.hb_sessions / others + usize::from(i < a.hb_sessions % others);
        let rate = a.hb_rate / others as f64;
        lanes.push(Lane::new(n, addrs.clone(), (i + 1) as u8, rate, ctl.clone()).await?);
    }
    let fleet_lanes = a.lanes;
    let total = (a.sessions + a.hb_sessions) as u64;
    eprintln!(
        "registering {} sessions on n1 over {} sockets, {} on the other nodes",
        a.sessions, a.lanes, a.hb_sessions
    );
    let n1_pid = nodes[0].pid().context("n1 is not running")?;
    let rss_before = rss(n1_pid).unwrap_or(0);
    let reg_started = Instant::now();
    let mut run = Lanes::start(ctl.clone(), lanes);
    let reg_deadline = reg_started + Duration::from_secs_f64(a.register_timeout);
    let mut last_print = Instant::now();
    loop {
        let done =
            ctl.registered.load(Ordering::Relaxed) + ctl.register_refused.load(Ordering::Relaxed);
        if done >= total || Instant::now() >= reg_deadline {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            eprintln!(
                "[{:6.1}s] registered {done} of {total}",
                reg_started.elapsed().as_secs_f64()
            );
        }
        sleep(Duration::from_millis(50)).await;
    }
    let register_s = reg_started.elapsed();
    let registered = ctl.registered.load(Ordering::Relaxed);
    anyhow::ensure!(
        registered == total,
        "{registered} of {total} sessions registered within {:.0} s",
        a.register_timeout
    );
    let rss_registered = rss(n1_pid).unwrap_or(0);
    eprintln!(
        "registered {registered} in {:.1}s ({:.0}/s); n1 RSS {:.0} MB",
        register_s.as_secs_f64(),
        registered as f64 / register_s.as_secs_f64(),
        rss_registered as f64 / 1e6
    );
    ctl.set_phase(HOLD);
    // Every presence record in Redis before the drain (a Resume elsewhere is checked there).
    let end = Instant::now() + Duration::from_secs(120);
    while redis.dbsize().await.unwrap_or(0) < total + 1 {
        anyhow::ensure!(
            Instant::now() < end,
            "Redis never held every presence record"
        );
        sleep(Duration::from_millis(100)).await;
    }

    // ------------------------------------------------------------ the drain
    sleep(Duration::from_secs_f64(a.baseline_secs)).await;
    let mut pids = vec![("redis".to_string(), redis.pid().unwrap_or(0))];
    for n in &nodes {
        pids.push((n.id.clone(), n.pid().unwrap_or(0)));
    }
    pids.push(("loadtest".into(), std::process::id()));
    let mut cpu = Cpu::start(pids);
    let mut drained = nodes.remove(0);
    let t0 = Instant::now();
    let _ = ctl.t0.set(t0.into_std());
    eprintln!("SIGTERM n1 ({} sessions)", a.sessions);
    let allowance = Duration::from_secs_f64(drain_secs + 15.0);
    let exit = tokio::spawn(async move {
        let r = drained.drain(allowance).await;
        (drained, r, t0.elapsed())
    });
    let fleet_total = a.sessions as u64;
    let give_up = t0 + Duration::from_secs_f64(drain_secs + 20.0);
    let mut exited_at: Option<Instant> = None;
    let mut last_print = Instant::now();
    loop {
        let resumed = ctl.resumed.load(Ordering::Relaxed);
        let lost = ctl.resume_lost.load(Ordering::Relaxed);
        let now = Instant::now();
        if resumed + lost >= fleet_total {
            break;
        }
        if exit.is_finished() && exited_at.is_none() {
            exited_at = Some(now);
        }
        // Resumes already on their way when the node exited still count.
        if exited_at.is_some_and(|t| now >= t + Duration::from_secs(3)) || now >= give_up {
            break;
        }
        // The drained node's CPU time is read while it still runs.
        cpu.sample();
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = now;
            eprintln!(
                "[{:6.1}s] told {} resumed {} redirected {} retried {}",
                (now - t0).as_secs_f64(),
                ctl.migrated.load(Ordering::Relaxed),
                resumed,
                ctl.redirected.load(Ordering::Relaxed),
                ctl.resume_retried.load(Ordering::Relaxed)
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    let done_at = Instant::now();
    let _ = ctl.t_done.set(done_at.into_std());
    let (cpu_drain, cpu_drain_sum) = cpu.since();
    eprintln!(
        "drain over after {:.2}s: {} of {} resumed",
        (done_at - t0).as_secs_f64(),
        ctl.resumed.load(Ordering::Relaxed),
        fleet_total
    );
    sleep(Duration::from_secs_f64(a.after_secs)).await;
    let (drained, exit_status, exit_after) = exit.await?;
    let exit_status = match exit_status? {
        Exit::Exited(s) => s.to_string(),
        Exit::Killed => "killed".to_string(),
    };
    let drained_log = drained.log().to_path_buf();
    drop(drained);

    // ------------------------------------------------------------ what the nodes counted
    let mut per_node = serde_json::Map::new();
    let mut cause = BTreeMap::<&str, f64>::new();
    for n in &nodes {
        let page = n.metrics_page().await.unwrap_or_default();
        let c = |k: &str| {
            metric(
                &page,
                &format!("sigrouter_sessions_resumed_total{{cause=\"{k}\"}}"),
            )
        };
        for k in ["migrate", "failover", "local"] {
            *cause.entry(k).or_default() += c(k);
        }
        per_node.insert(
            n.id.clone(),
            json!({
                "sessions": metric(&page, "sigrouter_sessions "),
                "resumed": { "migrate": c("migrate"), "failover": c("failover"), "local": c("local") },
                "tx_dropped": metric(&page, "sigrouter_tx_dropped_total"),
                "rate_limited": metric(&page, "sigrouter_rate_limited_total"),
                "resumes_expected": metric(&page, "sigrouter_resumes_expected_total"),
                "redis_commands": metric(&page, "sigrouter_redis_commands_total"),
            }),
        );
    }

    // ------------------------------------------------------------ reachability
    let _ = ctl.t_after_end.set(std::time::Instant::now());
    eprintln!("checking: every session heartbeats the node holding it");
    run.park(CHECK).await?;
    let held: Vec<(Uuid, u8)> = run.lanes().take(fleet_lanes).flat_map(Lane::held).collect();
    let held_total: u64 = run.lanes().map(|l| l.held().count() as u64).sum();
    run.resume();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let seen =
            ctl.check_acked.load(Ordering::Relaxed) + ctl.check_failed.load(Ordering::Relaxed);
        if seen >= held_total || Instant::now() >= end {
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    eprintln!("checking: a client of the library queries and connects to a sample");
    let mut rng = rand::thread_rng();
    let sample: Vec<(Uuid, u8)> = held
        .choose_multiple(&mut rng, a.sample.min(held.len()))
        .copied()
        .collect();
    let connects: Vec<(Uuid, u8)> = sample
        .iter()
        .copied()
        .take((a.sample / 10).max(1))
        .collect();
    let mut checker_cfg = ClientConfig::new(addrs[1]);
    checker_cfg.fallback_servers = addrs[1..].to_vec();
    let (checker, _events) = Client::register(checker_cfg)
        .await
        .context("registering the checking client")?;
    let uuids: Vec<Uuid> = sample.iter().map(|(u, _)| *u).collect();
    let online = checker.query(&uuids).await?;
    let online_n = online.iter().filter(|o| **o).count();
    let mut connected = 0usize;
    let mut outcomes = BTreeMap::<String, u64>::new();
    // All at once: a failing connect takes its whole deadline (12 s), one after another they
    // would take minutes.
    let mut tries = JoinSet::new();
    for (u, _) in &connects {
        let (checker, u) = (checker.clone(), *u);
        tries.spawn(async move { checker.connect(u, b"check").await });
    }
    while let Some(r) = tries.join_next().await {
        let k = match r? {
            Ok(ConnectOutcome::Connected { .. }) => {
                connected += 1;
                "connected".to_string()
            }
            Ok(ConnectOutcome::Failed { reason, .. }) => reason.name().to_string(),
            Err(e) => format!("error: {e}"),
        };
        *outcomes.entry(k).or_default() += 1;
    }
    let cross = connects.iter().filter(|(_, n)| *n != 1).count();
    let _ = tokio::time::timeout(Duration::from_secs(2), checker.bye()).await;
    run.park(STOP).await?;

    // ------------------------------------------------------------ the report
    let mut migrates_per_s = vec![0u64; TIMELINE_S];
    let mut resumes_per_s = vec![0u64; TIMELINE_S];
    let mut hb = [stats::histogram(), stats::histogram(), stats::histogram()];
    let mut hb_per_s: Vec<Histogram<u64>> = (0..TIMELINE_S).map(|_| stats::histogram()).collect();
    let mut hb_sent = [0u64; 3];
    let mut hb_lost = [0u64; 3];
    let mut hb_errors = BTreeMap::<&str, u64>::new();
    let mut check_failures = BTreeMap::<&str, u64>::new();
    let mut resumed_at = stats::histogram();
    let mut told_to_resumed = stats::histogram();
    let mut on_node = vec![0u64; a.nodes];
    let mut not_resumed = 0u64;
    for (i, l) in run.lanes().enumerate() {
        let r = &l.report;
        for s in 0..TIMELINE_S {
            migrates_per_s[s] += r.migrates_per_s[s];
            resumes_per_s[s] += r.resumes_per_s[s];
            hb_per_s[s].add(&r.hb_per_s[s]).ok();
        }
        for w in 0..3 {
            hb[w].add(&r.hb[w]).ok();
            hb_sent[w] += r.hb_sent[w];
            hb_lost[w] += r.hb_lost[w];
        }
        for (k, v) in &r.hb_errors {
            *hb_errors.entry(k).or_default() += v;
        }
        for (k, v) in &r.check_failures {
            *check_failures.entry(k).or_default() += v;
        }
        if i < fleet_lanes {
            for s in &l.sessions {
                if s.resumed_ms == u32::MAX {
                    not_resumed += 1;
                    continue;
                }
                on_node[s.node as usize] += 1;
                // Milliseconds since SIGTERM, recorded in the histogram's µs.
                stats::record(&mut resumed_at, u64::from(s.resumed_ms) * 1000);
                if s.migrated_ms != u32::MAX {
                    stats::record(
                        &mut told_to_resumed,
                        u64::from(s.resumed_ms.saturating_sub(s.migrated_ms)) * 1000,
                    );
                }
            }
        }
    }
    let all_resumed_s = (not_resumed == 0).then(|| resumed_at.max() as f64 / 1e6);
    let hb_json = |w: usize| {
        let lost_share = if hb_sent[w] > 0 {
            hb_lost[w] as f64 / hb_sent[w] as f64
        } else {
            0.0
        };
        json!({
            "sent": hb_sent[w],
            "answered": hb[w].len(),
            "lost": hb_lost[w],
            "lost_share": (lost_share * 1e6).round() / 1e6,
            "latency": stats::summary(&hb[w], "ms"),
        })
    };
    let last_s = ((done_at - t0).as_secs() as usize + 2).min(TIMELINE_S);
    let timeline: Vec<Value> = (0..last_s)
        .map(|s| {
            json!({
                "t": s,
                "migrates_first_seen": migrates_per_s[s],
                "resumed": resumes_per_s[s],
                "hb_answered": hb_per_s[s].len(),
                "hb_p99_ms": if hb_per_s[s].is_empty() { Value::Null } else { json!(hb_per_s[s].value_at_quantile(0.99) as f64 / 1000.0) },
            })
        })
        .collect();
    let plot_path = a.out.join("drain.svg");
    let plot_secs: Vec<plot::Second> = (0..last_s)
        .map(|s| plot::Second {
            told: migrates_per_s[s],
            resumed: resumes_per_s[s],
            hb_p99_ms: (!hb_per_s[s].is_empty())
                .then(|| hb_per_s[s].value_at_quantile(0.99) as f64 / 1000.0),
        })
        .collect();
    let title = format!(
        "drain of {} sessions off one of {} nodes (--drain-secs {drain_secs})",
        a.sessions, a.nodes
    );
    let hb_before_p99 = (!hb[0].is_empty()).then(|| hb[0].value_at_quantile(0.99) as f64 / 1000.0);
    if let Err(e) = plot::plot(
        &plot_path,
        &title,
        &plot_secs,
        fleet_total,
        drain_secs,
        hb_before_p99,
    ) {
        eprintln!("could not draw {}: {e}", plot_path.display());
    }
    let lost = ctl.resume_lost.load(Ordering::Relaxed);
    let check_acked = ctl.check_acked.load(Ordering::Relaxed);
    let check_failed = ctl.check_failed.load(Ordering::Relaxed);
    let during_lost_share = if hb_sent[1] > 0 {
        hb_lost[1] as f64 / hb_sent[1] as f64
    } else {
        0.0
    };
    let mut reasons = Vec::new();
    if not_resumed > 0 {
        reasons.push(format!(
            "{not_resumed} of {fleet_total} sessions did not resume elsewhere"
        ));
    }
    match all_resumed_s {
        Some(t) if t > drain_secs => reasons.push(format!(
            "the last session resumed after {t:.2} s, past --drain-secs {drain_secs}"
        )),
        _ => {}
    }
    if exit_status == "killed" {
        reasons.push("the drained node did not exit by itself".into());
    }
    if check_failed > 0 || check_acked < held_total {
        reasons.push(format!(
            "{} of {held_total} sessions did not answer at their node afterwards",
            held_total - check_acked.min(held_total)
        ));
    }
    if online_n < sample.len() {
        reasons.push(format!(
            "{} of {} sampled sessions offline afterwards",
            sample.len() - online_n,
            sample.len()
        ));
    }
    if connected < connects.len() {
        reasons.push(format!(
            "{} of {} connects to sampled sessions failed",
            connects.len() - connected,
            connects.len()
        ));
    }
    if during_lost_share > 0.001 {
        reasons.push(format!(
            "{:.3} % of heartbeats on the other nodes went unanswered during the drain",
            during_lost_share * 100.0
        ));
    }
    let passed = reasons.is_empty();
    let result = json!({
        "tool": "sigrouter-loadtest drain",
        "params": {
            "sessions": a.sessions,
            "nodes": a.nodes,
            "drain_secs": drain_secs,
            "lanes": a.lanes,
            "hb_sessions": a.hb_sessions,
            "hb_rate_per_s": a.hb_rate,
            "node_args": a.node_args,
        },
        "register": {
            "sessions": registered,
            "secs": secs(register_s),
            "n1_rss_before_bytes": rss_before,
            "n1_rss_registered_bytes": rss_registered,
        },
        "drain": {
            "told": ctl.migrated.load(Ordering::Relaxed),
            "migrate_repeats": ctl.migrate_repeats.load(Ordering::Relaxed),
            "resumed": ctl.resumed.load(Ordering::Relaxed),
            "not_resumed": not_resumed,
            "lost_unauthorized": lost,
            "redirected_by_draining": ctl.redirected.load(Ordering::Relaxed),
            "resume_retried": ctl.resume_retried.load(Ordering::Relaxed),
            "resume_retransmits": ctl.resume_retransmits.load(Ordering::Relaxed),
            "all_resumed_after_s": all_resumed_s,
            "resumed_at_ms": stats::summary(&resumed_at, "ms"),
            "told_to_resumed_ms": stats::summary(&told_to_resumed, "ms"),
            "resumed_on": addrs.iter().enumerate().skip(1).map(|(i, _)| (format!("n{}", i + 1), on_node[i])).collect::<BTreeMap<_, _>>(),
            "n1_exit": exit_status,
            "n1_exit_after_s": secs(exit_after),
            "n1_drain_log": drain_line(&drained_log),
            "cpu_s_during": cpu_drain,
            "cpu_us_per_resumed_session": (ctl.resumed.load(Ordering::Relaxed) > 0).then(|| {
                (cpu_drain_sum * 1e6 / ctl.resumed.load(Ordering::Relaxed) as f64).round()
            }),
        },
        "resumed_by_cause": cause,
        "nodes_after": per_node,
        "heartbeats_other_nodes": {
            "before": hb_json(0),
            "during": hb_json(1),
            "after": hb_json(2),
            "errors": hb_errors,
        },
        "reachability": {
            "heartbeat_answered": check_acked,
            "heartbeat_unanswered": check_failed,
            "heartbeat_failures": check_failures,
            "held": held_total,
            "query_sample": sample.len(),
            "query_online": online_n,
            "connect_sample": connects.len(),
            "connect_cross_node": cross,
            "connected": connected,
            "connect_outcomes": outcomes,
            "incoming_accepted": ctl.accepted.load(Ordering::Relaxed),
        },
        "fleet_errors": {
            "bad_datagrams": ctl.bad.load(Ordering::Relaxed),
            "send_errors": ctl.send_errors.load(Ordering::Relaxed),
            "register_refused": ctl.register_refused.load(Ordering::Relaxed),
        },
        "timeline": timeline,
        "criteria": { "passed": passed, "reasons": reasons },
        "logs": { "n1": drained_log.display().to_string() },
        "plot": plot_path.display().to_string(),
    });
    let path = a.out.join("result.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    drop(nodes);
    drop(redis);
    Ok(Some(json!({
        "mode": "drain",
        "passed": passed,
        "reasons": result["criteria"]["reasons"],
        "sessions": a.sessions,
        "all_resumed_after_s": all_resumed_s,
        "not_resumed": not_resumed,
        "resumed_by_cause": result["resumed_by_cause"],
        "heartbeat_p99_ms": {
            "before": result["heartbeats_other_nodes"]["before"]["latency"]["p99"],
            "during": result["heartbeats_other_nodes"]["during"]["latency"]["p99"],
            "after": result["heartbeats_other_nodes"]["after"]["latency"]["p99"],
        },
        "heartbeats_lost_during": hb_lost[1],
        "reachability": result["reachability"],
        "result": path.display().to_string(),
        "plot": plot_path.display().to_string(),
    })))
}
