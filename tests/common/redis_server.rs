//! A real redis-server on a free loopback port, killed on drop.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{eventually, stable_port, T};

/// A real redis-server on a free loopback port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_on(stable_port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sigrouter-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let r = Self {
            port,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if r.cmd(&["PING"]).is_ok() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs one command synchronously (a plain client of our own, not the code under test).
    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// Sends a command without waiting for its answer (DEBUG SLEEP).
    pub fn cmd_detached(&self, args: &[&str]) {
        let url = self.url();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_connection().unwrap();
            let mut cmd = redis::cmd(&args[0]);
            for a in &args[1..] {
                cmd.arg(a);
            }
            let _: redis::RedisResult<redis::Value> = cmd.query(&mut c);
        });
    }

    /// Whether Redis is not answering a new connection and a PING within `within` (blocked
    /// by DEBUG SLEEP). Setting up a connection needs Redis's answer too (redis-rs sends
    /// CLIENT SETINFO), so the whole exchange is bounded by `within`: a sleep shorter than the
    /// deadline is seen while it lasts, not waited out.
    pub fn is_blocked_for(&self, within: Duration) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let start = Instant::now();
        let Ok(mut c) = client.get_connection_with_timeout(within) else {
            return true;
        };
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            return true;
        }
        let _ = c.set_read_timeout(Some(left));
        redis::cmd("PING").query::<String>(&mut c).is_err()
    }

    /// [`Self::is_blocked_for`] one second: only a long DEBUG SLEEP counts.
    pub fn is_blocked(&self) -> bool {
        self.is_blocked_for(Duration::from_secs(1))
    }

    /// Whether a client's presence record names `node`.
    pub fn presence_on(&self, uuid: &Uuid, node: &str) -> bool {
        let key = format!("sigrouter:presence:{{{}}}", uuid.simple());
        match self.cmd(&["GET", &key]) {
            Ok(redis::Value::BulkString(b)) => {
                String::from_utf8_lossy(&b).starts_with(&format!("{node} "))
            }
            _ => false,
        }
    }

    /// How many times Redis has run each command (lower-case name) since it started, from
    /// `INFO commandstats`: what the nodes asked of it, counted by Redis itself.
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let info = match self
            .cmd(&["INFO", "commandstats"])
            .expect("INFO commandstats")
        {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("unexpected INFO reply {other:?}"),
        };
        info.lines()
            .filter_map(|l| {
                let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until Redis names `node` as where client `uuid` is.
pub async fn wait_presence(redis: &Redis, uuid: &Uuid, node: &str) {
    let ok = eventually(T, || redis.presence_on(uuid, node)).await;
    assert!(ok, "presence of {uuid} never named {node}");
}
