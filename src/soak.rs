//! `burrow soak`: the long-run check of issue 6 ("Load"). Several hundred sessions are driven the
//! way the SDK drives them — a refresh every 5 s, processes and file writes over one envd
//! websocket each — for a fixed time against the real server (this binary, started as a child
//! process), while sessions are replaced at a steady rate. Every failed request is counted and
//! fails the run, the latency percentiles are printed, and the server's memory, descriptors and
//! threads are sampled at every interval: a leak shows up as drift between the first interval
//! after warm-up and the end, or as descriptors not returned once every session is gone.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use burrow_client::{Client, Envd, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use crate::child_server::{ChildServer, percentile, proc_field};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Sessions kept live at once.
    #[arg(long, default_value_t = 300)]
    sessions: usize,
    /// How long the load runs, after the sessions are created.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Environment of the sessions.
    #[arg(long, default_value = "Bash")]
    env: String,
    /// Seconds between two samples of the server (one table row each).
    #[arg(long, default_value_t = 60)]
    report_every: u64,
    /// Sessions replaced per minute (half deleted, half abandoned to expire, as the SDK's
    /// `close()` does), so create, delete and expiry keep running.
    #[arg(long, default_value_t = 6)]
    churn: u32,
}

const DOMAIN: &str = "localhost";
/// The SDK's `SESSION_REFRESH_PERIOD`.
const REFRESH: Duration = Duration::from_secs(5);
/// A session runs a process and writes a file every 10–20 s (uniformly jittered, so the load is
/// spread out rather than in waves).
const WORK_MIN: Duration = Duration::from_secs(10);
const WORK_MAX: Duration = Duration::from_secs(20);
/// Requests in flight at most: the machine has 2 cores, shared by the server, the sandboxes and
/// this client; the steady load needs far fewer, so this only caps bursts (warm-up, stalls).
const MAX_IN_FLIGHT: usize = 16;
/// Ready sandboxes the server keeps (its default), passed explicitly so the idle state at the
/// start and the end are known to be the same.
const POOL: usize = 2;
/// How far the server may drift and still count as flat.
const RSS_SLACK_KIB: u64 = 4 * 1024;
const FD_SLACK: i64 = 8;
const THREAD_SLACK: i64 = 4;
/// Failures printed as they happen; the rest are only counted.
const PRINTED_FAILURES: u64 = 20;

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(soak(args))
}

/// Waits until the server is idle: no session listed and the pool full.
async fn wait_idle(server: &ChildServer, env: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if server.client.list_sessions().await?.is_empty() && server.pool_ready(env).await? >= POOL
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the server did not get back to idle (no session, pool full) within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one sample of the server and the host holds.
#[derive(Clone, Copy)]
struct Probe {
    rss_kib: u64,
    fds: usize,
    threads: u64,
    available_kib: u64,
    /// Sandbox cgroups of the server's node (sessions, pool, abandoned ones not yet expired);
    /// unknown until a session has told us the node's ID.
    cgroups: Option<usize>,
}

impl Probe {
    fn take(pid: u32, node: Option<&str>) -> anyhow::Result<Probe> {
        let status = format!("/proc/{pid}/status");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("cannot list /proc/{pid}/fd"))?
            .count();
        let cgroups = node.and_then(|node| {
            [
                format!("/sys/fs/cgroup/memory/burrow/{node}"),
                format!("/sys/fs/cgroup/burrow/{node}"),
            ]
            .iter()
            .find_map(|dir| std::fs::read_dir(dir).ok())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .count()
            })
        });
        Ok(Probe {
            rss_kib: proc_field(&status, "VmRSS:")?,
            fds,
            threads: proc_field(&status, "Threads:")?,
            available_kib: proc_field("/proc/meminfo", "MemAvailable:")?,
            cgroups,
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The operations timed and counted, each one what an SDK call does on the wire.
#[derive(Clone, Copy)]
enum Kind {
    /// POST /sessions.
    Create,
    /// Opening envd's websocket through the gateway.
    Connect,
    /// POST /sessions/{id}/refresh.
    Refresh,
    /// Subscribe to exit and stdout, start `echo`, its output and exit, unsubscribe.
    Exec,
    /// `filesystem_write` then `filesystem_read` of the same file.
    File,
    /// DELETE /sessions/{id}.
    Delete,
}

const KINDS: [Kind; 6] = [
    Kind::Create,
    Kind::Connect,
    Kind::Refresh,
    Kind::Exec,
    Kind::File,
    Kind::Delete,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Create => "create (POST /sessions)",
            Kind::Connect => "envd websocket open",
            Kind::Refresh => "refresh",
            Kind::Exec => "exec round trip (echo, stdout, exit)",
            Kind::File => "file write + read back",
            Kind::Delete => "delete (DELETE /sessions/{id})",
        }
    }
}

/// Latencies of the successful operations (in completion order) and failure counts, per kind.
#[derive(Default)]
struct Stats {
    samples: [Vec<Duration>; KINDS.len()],
    failures: [u64; KINDS.len()],
    abandoned: u64,
}

impl Stats {
    fn operations(&self) -> u64 {
        self.samples.iter().map(|s| s.len() as u64).sum::<u64>() + self.failures()
    }

    fn failures(&self) -> u64 {
        self.failures.iter().sum()
    }
}

/// The p-th percentile of `samples` (sorted in place).
fn pct(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    percentile(samples, p)
}

/// A failed operation; what failed was recorded and printed by [`Load::op`].
struct Failed;

/// Uniform in `[lo, hi)`.
fn between(rng: &mut impl Rng, lo: Duration, hi: Duration) -> Duration {
    lo + Duration::from_nanos(rng.random_range(0..(hi - lo).as_nanos().max(1) as u64))
}

/// A session with its envd websocket open.
struct Live {
    session: Session,
    envd: Envd,
    /// Processes run so far, for unique process IDs and output.
    runs: u64,
}

/// What every session task shares.
struct Load {
    client: Client,
    env: String,
    limit: Semaphore,
    stats: Mutex<Stats>,
    started: Instant,
    live: AtomicUsize,
}

impl Load {
    /// Runs `f` once a request slot is free, and records its latency or its failure.
    async fn op<T>(
        &self,
        kind: Kind,
        what: &str,
        f: impl Future<Output = anyhow::Result<T>>,
    ) -> Result<T, Failed> {
        let _permit = self
            .limit
            .acquire()
            .await
            .expect("the limiter is never closed");
        let start = Instant::now();
        let result = f.await;
        let took = start.elapsed();
        let mut stats = self.stats.lock().expect("no panics while locked");
        match result {
            Ok(v) => {
                stats.samples[kind as usize].push(took);
                Ok(v)
            }
            Err(e) => {
                stats.failures[kind as usize] += 1;
                let n = stats.failures();
                if n <= PRINTED_FAILURES {
                    eprintln!(
                        "failure {n} at {:.1} s: {} {what}: {e:#}",
                        self.started.elapsed().as_secs_f64(),
                        kind.name()
                    );
                }
                if n == PRINTED_FAILURES {
                    eprintln!("(further failures are counted, not printed)");
                }
                Err(Failed)
            }
        }
    }

    /// Creates a session and opens its websocket, as `Session.open()` does.
    async fn open(&self) -> Result<Live, Failed> {
        let session = self
            .op(Kind::Create, &self.env, async {
                Ok(self.client.create_session(&self.env).await?)
            })
            .await?;
        let envd = self
            .op(Kind::Connect, &session.session_id, async {
                Ok(self.client.envd(&session, DOMAIN).await?)
            })
            .await;
        match envd {
            Ok(envd) => {
                self.live.fetch_add(1, Ordering::Relaxed);
                Ok(Live {
                    session,
                    envd,
                    runs: 0,
                })
            }
            Err(Failed) => {
                self.client.delete_session(&session.session_id).await.ok();
                Err(Failed)
            }
        }
    }

    /// Ends a session the way a client does: DELETE, or (`abandon`) closing the websocket and no
    /// longer refreshing, as the SDK's `close()` does, which leaves it to expiry.
    async fn close(&self, live: Live, abandon: bool) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        let id = live.session.session_id;
        drop(live.envd);
        if abandon {
            self.stats.lock().expect("no panics while locked").abandoned += 1;
        } else {
            self.op(Kind::Delete, &id, async {
                Ok(self.client.delete_session(&id).await?)
            })
            .await
            .ok();
        }
    }

    /// Gets rid of a session after one of its requests failed; it may be gone already, so the
    /// DELETE is best effort and not counted again.
    async fn discard(&self, live: Live) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        drop(live.envd);
        self.client
            .delete_session(&live.session.session_id)
            .await
            .ok();
    }

    /// Refreshes every [`REFRESH`] from `first` until `until`.
    async fn refresh_loop(&self, id: &str, first: Instant, until: Instant) -> Result<(), Failed> {
        let mut next = first;
        while next < until {
            sleep_until(next.into()).await;
            self.op(Kind::Refresh, id, async {
                Ok(self.client.refresh_session(id).await?)
            })
            .await?;
            next += REFRESH;
        }
        sleep_until(until.into()).await;
        Ok(())
    }

    /// Runs a process and round-trips a file every 10–20 s from `first` until `until`.
    async fn work_loop(
        &self,
        rng: &mut impl Rng,
        id: &str,
        envd: &mut Envd,
        runs: &mut u64,
        first: Instant,
        until: Instant,
    ) -> Result<(), Failed> {
        let mut next = first;
        while next < until {
            sleep_until(next.into()).await;
            *runs += 1;
            let n = *runs;
            self.op(Kind::Exec, id, async {
                let want = format!("soak {id} {n}");
                let (code, stdout) = envd
                    .exec_stdout(&format!("p{n}"), &format!("echo {want}"))
                    .await?;
                if code != 0 || stdout != [want.as_str()] {
                    bail!("`echo {want}` exited with {code} and printed {stdout:?}");
                }
                Ok(())
            })
            .await?;
            self.op(Kind::File, id, async {
                let path = "/home/user/soak.txt";
                let content = format!("soak {id} {n} ünïcødé\n").repeat(16);
                envd.filesystem_write(path, &content).await?;
                let back = envd.filesystem_read(path).await?;
                if back != content {
                    bail!(
                        "{path} read back {} bytes, wrote {}",
                        back.len(),
                        content.len()
                    );
                }
                Ok(())
            })
            .await?;
            next += between(rng, WORK_MIN, WORK_MAX);
        }
        sleep_until(until.into()).await;
        Ok(())
    }

    /// Drives one session slot until `deadline`: the session is replaced at each of
    /// `replace_at` (deleted, or abandoned when its flag says so), and after any failure.
    /// Returns the session live at the end.
    async fn slot(
        self: Arc<Self>,
        mut live: Option<Live>,
        mut replace_at: VecDeque<(Instant, bool)>,
        deadline: Instant,
    ) -> Option<Live> {
        let mut rng = StdRng::from_os_rng();
        // Sessions created during warm-up start at random offsets, so the refreshes and the work
        // of all of them do not come in waves; later ones start as a fresh SDK session does.
        let mut first_refresh = Instant::now() + between(&mut rng, Duration::ZERO, REFRESH);
        loop {
            let Some(mut current) = live.take() else {
                let now = Instant::now();
                if now >= deadline {
                    return None;
                }
                while replace_at.front().is_some_and(|&(t, _)| t <= now) {
                    replace_at.pop_front();
                }
                match self.open().await {
                    Ok(l) => live = Some(l),
                    Err(Failed) => tokio::time::sleep(REFRESH).await,
                }
                first_refresh = Instant::now() + REFRESH;
                continue;
            };
            let until = replace_at
                .front()
                .map_or(deadline, |&(t, _)| t.min(deadline));
            let first_work = Instant::now() + between(&mut rng, Duration::ZERO, WORK_MAX);
            let id = current.session.session_id.clone();
            let ran = tokio::try_join!(
                self.refresh_loop(&id, first_refresh, until),
                self.work_loop(
                    &mut rng,
                    &id,
                    &mut current.envd,
                    &mut current.runs,
                    first_work,
                    until
                ),
            );
            match (ran, replace_at.front()) {
                (Err(Failed), _) => self.discard(current).await,
                (Ok(_), Some(&(_, abandon))) if until < deadline => {
                    replace_at.pop_front();
                    self.close(current, abandon).await;
                }
                (Ok(_), _) => return Some(current),
            }
        }
    }
}

/// One table row per report interval: the load since the previous row, then the server.
struct Report {
    load_start: Instant,
    previous_ops: u64,
    previous_failures: u64,
    previous_len: [usize; KINDS.len()],
}

impl Report {
    fn header() {
        println!(
            "{:>7} {:>8} {:>7} {:>6} {:>12} {:>12} {:>8} {:>6} {:>7} {:>9} {:>7}",
            "time",
            "sessions",
            "ops",
            "failed",
            "refresh p99",
            "exec p99",
            "RSS MiB",
            "fds",
            "threads",
            "avail MiB",
            "cgroups"
        );
    }

    fn row(&mut self, load: &Load, probe: &Probe) {
        let stats = load.stats.lock().expect("no panics while locked");
        let mut recent = |kind: Kind| {
            let all = &stats.samples[kind as usize];
            let mut since = all[self.previous_len[kind as usize]..].to_vec();
            self.previous_len[kind as usize] = all.len();
            pct(&mut since, 99)
        };
        let (refresh, exec) = (recent(Kind::Refresh), recent(Kind::Exec));
        println!(
            "{:>6.0}s {:>8} {:>7} {:>6} {:>9.2} ms {:>9.2} ms {:>8.1} {:>6} {:>7} {:>9.0} {:>7}",
            self.load_start.elapsed().as_secs_f64(),
            load.live.load(Ordering::Relaxed),
            stats.operations() - self.previous_ops,
            stats.failures() - self.previous_failures,
            ms(refresh),
            ms(exec),
            mib(probe.rss_kib),
            probe.fds,
            probe.threads,
            mib(probe.available_kib),
            probe.cgroups.map_or("-".to_string(), |c| c.to_string()),
        );
        self.previous_ops = stats.operations();
        self.previous_failures = stats.failures();
    }
}

async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    if args.sessions == 0 || args.report_every == 0 {
        bail!("--sessions and --report-every must be at least 1");
    }
    if args.minutes * 60 < 2 * args.report_every {
        bail!("--minutes must cover at least two --report-every intervals, to measure drift");
    }
    println!(
        "burrow soak: {} sessions of {} for {} min, {} replaced a minute, sampled every {} s",
        args.sessions, args.env, args.minutes, args.churn, args.report_every
    );
    let server = ChildServer::start("soak", POOL, &args.env, &[]).await?;
    println!("server log: {}", server.log.display());
    // Ctrl-C still deletes the sessions and stops the server, which would otherwise be killed
    // with its sandboxes left running.
    let outcome = tokio::select! {
        outcome = drive(&args, &server) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let stopped = server.stop().await;
    outcome.and(stopped)
}

async fn drive(args: &SoakArgs, server: &ChildServer) -> anyhow::Result<()> {
    wait_idle(server, &args.env).await?;
    let idle_before = Probe::take(server.pid(), None)?;
    let load = Arc::new(Load {
        client: Client::new(&format!("http://{}", server.client.addr()), None)?,
        env: args.env.clone(),
        limit: Semaphore::new(MAX_IN_FLIGHT),
        stats: Mutex::default(),
        started: Instant::now(),
        live: AtomicUsize::new(0),
    });

    let mut opening = JoinSet::new();
    for _ in 0..args.sessions {
        let load = load.clone();
        opening.spawn(async move { load.open().await.ok() });
    }
    let opened: Vec<Option<Live>> = opening.join_all().await;
    let node = opened
        .iter()
        .flatten()
        .next()
        .map(|l| l.session.client_id.clone());
    println!(
        "warm-up: {} of {} sessions created and connected in {:.1} s; server node {}",
        load.live.load(Ordering::Relaxed),
        args.sessions,
        load.started.elapsed().as_secs_f64(),
        node.as_deref().unwrap_or("unknown")
    );

    let load_start = Instant::now();
    let deadline = load_start + Duration::from_secs(args.minutes * 60);
    // Replacements evenly spaced over the run, half a spacing off the minute (and so off the
    // samples), each of a random session, alternately deleted and abandoned.
    let mut rng = StdRng::from_os_rng();
    let mut replace_at = vec![VecDeque::new(); args.sessions];
    let replacements = args.minutes * u64::from(args.churn);
    for k in 0..replacements {
        let at = load_start + Duration::from_secs(60) * (2 * k as u32 + 1) / (2 * args.churn);
        replace_at[rng.random_range(0..args.sessions)].push_back((at, k % 2 == 0));
    }
    let mut slots = JoinSet::new();
    for (live, replace_at) in opened.into_iter().zip(replace_at) {
        slots.spawn(load.clone().slot(live, replace_at, deadline));
    }

    Report::header();
    let mut report = Report {
        load_start,
        previous_ops: 0,
        previous_failures: 0,
        previous_len: [0; KINDS.len()],
    };
    let mut probes = Vec::new();
    let every = Duration::from_secs(args.report_every);
    let mut at = load_start;
    while at < deadline {
        at = (at + every).min(deadline);
        sleep_until(at.into()).await;
        let probe = Probe::take(server.pid(), node.as_deref())?;
        report.row(&load, &probe);
        probes.push(probe);
    }
    let remaining: Vec<Live> = slots.join_all().await.into_iter().flatten().collect();

    let mut closing = JoinSet::new();
    for live in remaining {
        let load = load.clone();
        closing.spawn(async move { load.close(live, false).await });
    }
    closing.join_all().await;
    wait_idle(server, &args.env).await?;
    // Sessions leave the list before their sandboxes are gone when they expire.
    let settled = Instant::now() + Duration::from_secs(10);
    let idle_after = loop {
        let probe = Probe::take(server.pid(), node.as_deref())?;
        if probe.cgroups.is_none_or(|c| c == POOL) || Instant::now() > settled {
            break probe;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    summary(&load, &probes, &idle_before, &idle_after)
}

/// Prints the latencies, the totals and the drift, and fails the run on any failure or drift.
fn summary(load: &Load, probes: &[Probe], before: &Probe, after: &Probe) -> anyhow::Result<()> {
    let mut stats = load.stats.lock().expect("no panics while locked");
    println!();
    println!(
        "{:<38} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "operation", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "failed"
    );
    for kind in KINDS {
        let failed = stats.failures[kind as usize];
        let samples = &mut stats.samples[kind as usize];
        let [p50, p90, p99] = [50, 90, 99].map(|p| pct(samples, p));
        println!(
            "{:<38} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            kind.name(),
            samples.len(),
            ms(p50),
            ms(p90),
            ms(p99),
            ms(samples.last().copied().unwrap_or_default()),
            failed
        );
    }
    let (ops, failures) = (stats.operations(), stats.failures());
    println!(
        "total: {ops} operations, {failures} failed; {} sessions abandoned to expiry",
        stats.abandoned
    );

    let (first, last) = match probes {
        [first, .., last] => (first, last),
        _ => bail!("fewer than two samples: nothing to compare"),
    };
    let rss_growth = last.rss_kib as i64 - first.rss_kib as i64;
    let fd_growth = last.fds as i64 - first.fds as i64;
    let thread_growth = last.threads as i64 - first.threads as i64;
    let idle_fd_growth = after.fds as i64 - before.fds as i64;
    let idle_thread_growth = after.threads as i64 - before.threads as i64;
    let mut drifts = Vec::new();
    let mut check = |flat: bool, what: String| {
        println!("{} {what}", if flat { "flat " } else { "DRIFT" });
        if !flat {
            drifts.push(what);
        }
    };
    println!("\nserver drift, first interval after warm-up → end of the load:");
    check(
        rss_growth < RSS_SLACK_KIB as i64,
        format!(
            "RSS {:.2} → {:.2} MiB ({:+.2} MiB; allowed < {:.0})",
            mib(first.rss_kib),
            mib(last.rss_kib),
            rss_growth as f64 / 1024.0,
            mib(RSS_SLACK_KIB)
        ),
    );
    check(
        fd_growth <= FD_SLACK,
        format!(
            "fds {} → {} ({fd_growth:+}; allowed ≤ +{FD_SLACK})",
            first.fds, last.fds
        ),
    );
    check(
        thread_growth <= THREAD_SLACK,
        format!(
            "threads {} → {} ({thread_growth:+}; allowed ≤ +{THREAD_SLACK})",
            first.threads, last.threads
        ),
    );
    println!("idle server (pool only), before the sessions → after all were gone:");
    check(
        idle_fd_growth <= FD_SLACK,
        format!(
            "fds {} → {} ({idle_fd_growth:+}; allowed ≤ +{FD_SLACK})",
            before.fds, after.fds
        ),
    );
    check(
        idle_thread_growth <= THREAD_SLACK,
        format!(
            "threads {} → {} ({idle_thread_growth:+}; allowed ≤ +{THREAD_SLACK})",
            before.threads, after.threads
        ),
    );
    check(
        after.cgroups.is_none_or(|c| c == POOL),
        format!(
            "sandbox cgroups left: {} (the pool holds {POOL})",
            after
                .cgroups
                .map_or("unknown".to_string(), |c| c.to_string())
        ),
    );
    println!(
        "host MemAvailable {:.0} → {:.0} MiB over the load (shared host, not judged)",
        mib(first.available_kib),
        mib(last.available_kib)
    );
    if failures > 0 {
        bail!("{failures} of {ops} operations failed");
    }
    if !drifts.is_empty() {
        bail!("the server did not stay flat: {}", drifts.join("; "));
    }
    println!("soak passed: no failure, server flat");
    Ok(())
}
