//! `burrow serve` as a child process, for the commands that measure it from the outside
//! (`burrow bench`, `burrow soak`): a free port, a throwaway data dir, `--auth off`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use burrow_client::Client;

pub struct ChildServer {
    child: tokio::process::Child,
    pub client: Client,
    data_dir: PathBuf,
    pub log: PathBuf,
}

impl ChildServer {
    /// Starts the server with a warm pool of `pool_size` for `env` only, no session caps, and
    /// `extra` flags; returns once `/health` answers. `tag` names its data dir and log.
    pub async fn start(
        tag: &str,
        pool_size: usize,
        env: &str,
        extra: &[&str],
    ) -> anyhow::Result<ChildServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data_dir =
            std::env::temp_dir().join(format!("burrow-{tag}-{}", burrow_store::random_alnum(8)));
        let log = std::env::temp_dir().join(format!("burrow-{tag}-{port}.log"));
        let child = tokio::process::Command::new("/proc/self/exe")
            .args(["serve", "--auth", "off"])
            .args(["--max-sessions", "100000"])
            .args(["--max-sessions-per-team", "100000"])
            // The benchmark measures burrow with as many sessions as it asks for, not admission.
            .args(["--memory-overcommit", "1000", "--disk-overcommit", "1000"])
            .args(["--team-share", "1"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--pool-size")
            .arg(pool_size.to_string())
            .arg("--pool-environments")
            .arg(env)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            // Its own process group: a Ctrl-C at the terminal reaches only the measuring
            // command, which then deletes the sessions before stopping the server.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `burrow serve`")?;
        let client = Client::new(&format!("http://127.0.0.1:{port}"), None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((status, _)) = client
                .request(burrow_client::Method::GET, "/health", None, None)
                .await
                && status.is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the server did not come up within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(ChildServer {
            child,
            client,
            data_dir,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Ready sandboxes in the pool of `env` (from `/metrics`).
    pub async fn pool_ready(&self, env: &str) -> anyhow::Result<usize> {
        let gauge = format!("burrow_pool_ready{{environment=\"{env}\"}} ");
        let (_, body) = self
            .client
            .request(burrow_client::Method::GET, "/metrics", None, None)
            .await?;
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(&gauge)?.parse().ok())
            .unwrap_or(0))
    }

    /// Waits until the warm pool holds `n` ready sandboxes of `env`.
    pub async fn wait_pool(&self, env: &str, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = self.pool_ready(env).await?;
            if ready >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the pool did not fill to {n} within 120 s (at {ready})");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Deletes whatever sessions are left, stops the server and removes its data dir.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for s in self.client.list_sessions().await? {
            self.client.delete_session(&s.session_id).await?;
        }
        if let Some(pid) = self.child.id() {
            // SAFETY: sending a signal to our own child process has no memory-safety effects.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await??;
        std::fs::remove_dir_all(&self.data_dir).ok();
        Ok(())
    }
}

/// The `p`-th percentile of `sorted` (zero when there is no sample).
pub fn percentile(sorted: &[Duration], p: usize) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[(n * p / 100).min(n - 1)],
    }
}

/// A `Key: 123 kB` (or `Key: 123`) field of a /proc file.
pub fn proc_field(path: &str, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}
