//! `burrow bench`: the figures the README and docs/benchmarks.md claim, measured against the real
//! server (this binary, started as child processes) over its public API, side by side with a raw
//! baseline taken in the same run: `unshare` with the same namespaces exec'ing `true`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use burrow_client::{Client, Session};

use crate::child_server::{ChildServer, percentile, proc_field};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds of each sequential measurement.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Sessions created at once for the concurrent time-to-interactive figure.
    #[arg(long, default_value_t = 100)]
    concurrent: usize,
    /// Creates of each paced measurement (one at a time, an interval apart).
    #[arg(long, default_value_t = 30)]
    paced_rounds: usize,
    /// Bursts of `--concurrent` sessions measured with a pool sized for them.
    #[arg(long, default_value_t = 5)]
    bursts: usize,
    /// Idle sessions held at once for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Environment to benchmark.
    #[arg(long, default_value = "Bash")]
    env: String,
    /// Run only these sections (all when omitted).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// A flag for the measured servers, e.g. `--server-arg=--network --server-arg=none`;
    /// repeatable.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    server_arg: Vec<String>,
}

impl BenchArgs {
    /// The measured servers' flags: the session TTL and `--server-arg`s.
    fn server_flags(&self) -> Vec<&str> {
        SESSION_TTL
            .iter()
            .copied()
            .chain(self.server_arg.iter().map(String::as_str))
            .collect()
    }
}

/// The parts of the run, each on its own server.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// The raw `unshare` + exec baseline.
    Baseline,
    /// Creates, destroys, exec round trips and time to interactive without a pool.
    NoPool,
    /// Host memory per idle sandbox.
    Idle,
    /// Creates and time to interactive from the pool.
    Pool,
    /// Time to interactive of a burst, with a pool sized for it.
    Burst,
    /// Creates one at a time, 100 ms and 1 s apart, without and with the pool.
    Paced,
}

const DOMAIN: &str = "localhost";

/// Sessions outlive every measurement.
const SESSION_TTL: &[&str] = &["--session-ttl", "30m"];

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

/// Sorted samples of one measurement.
struct Samples(Vec<Duration>);

impl Samples {
    fn new(mut v: Vec<Duration>) -> Samples {
        v.sort();
        Samples(v)
    }

    fn pct(&self, p: usize) -> Duration {
        percentile(&self.0, p)
    }
}

fn row(name: &str, s: &Samples) {
    println!(
        "{name:<52} {:>9.2} ms {:>9.2} ms {:>6}",
        s.pct(50).as_secs_f64() * 1e3,
        s.pct(99).as_secs_f64() * 1e3,
        s.0.len()
    );
}

/// Memory as the host sees it: what the node's sandboxes are charged (their cgroups, kernel
/// memory included), what the server process holds, and MemAvailable.
struct MemoryProbe {
    sandboxes_kib: u64,
    server_kib: u64,
    available_kib: u64,
}

impl MemoryProbe {
    fn take(server_pid: u32, node: Option<&str>) -> anyhow::Result<MemoryProbe> {
        let sandboxes_kib = match node {
            None => 0,
            Some(node) => {
                [
                    format!("/sys/fs/cgroup/memory/burrow/{node}/memory.usage_in_bytes"),
                    format!("/sys/fs/cgroup/burrow/{node}/memory.current"),
                ]
                .iter()
                .find_map(|p| std::fs::read_to_string(p).ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("cannot read the node's memory cgroup")?
                    / 1024
            }
        };
        Ok(MemoryProbe {
            sandboxes_kib,
            server_kib: proc_field(&format!("/proc/{server_pid}/status"), "VmRSS:")?,
            available_kib: proc_field("/proc/meminfo", "MemAvailable:")?,
        })
    }
}

/// Waits until the machine is quiet: the kernel tears down destroyed sandboxes' network
/// namespaces in the background, seconds after they are gone, and a burst measured on top of
/// that measures the teardown too. Quiet = 90% of the CPU idle for a whole second (the teardown
/// pauses for RCU grace periods, so a shorter look can fall into a pause), at most a minute.
async fn settle() -> anyhow::Result<()> {
    let idle_total = || -> anyhow::Result<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: idle and iowait count as idle.
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        Ok((idle, cpu.iter().take(8).sum()))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = 0;
    while quiet < 4 && Instant::now() < deadline {
        let (idle0, total0) = idle_total()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (idle1, total1) = idle_total()?;
        let ticks = total1.saturating_sub(total0);
        quiet = if ticks == 0 || (idle1 - idle0) * 10 >= ticks * 9 {
            quiet + 1
        } else {
            0
        };
    }
    Ok(())
}

/// POST /sessions → envd websocket → `true` exits: what an SDK user waits for.
async fn time_to_interactive(client: &Client, env: &str) -> anyhow::Result<(Duration, Session)> {
    let start = Instant::now();
    let session = client.create_session(env).await?;
    let mut envd = client.envd(&session, DOMAIN).await?;
    let (code, sub) = envd.exec("tti", "true").await?;
    let took = start.elapsed();
    if code != 0 {
        bail!("`true` exited with {code}");
    }
    envd.unsubscribe(&sub).await?;
    Ok((took, session))
}

/// `n` sessions made interactive at once; each one's time to interactive.
async fn burst(
    server: &ChildServer,
    env: &str,
    n: usize,
) -> anyhow::Result<Vec<(Duration, Session)>> {
    let client = Arc::new(Client::new(
        &format!("http://{}", server.client.addr()),
        None,
    )?);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            let env = env.to_string();
            tokio::spawn(async move { time_to_interactive(&client, &env).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    println!(
        "burrow bench: {} rounds, environment {}",
        args.rounds, args.env
    );
    println!(
        "{:<52} {:>12} {:>12} {:>6}",
        "measurement", "p50", "p99", "n"
    );
    for section in <Section as clap::ValueEnum>::value_variants() {
        if !args.only.is_empty() && !args.only.contains(section) {
            continue;
        }
        // Each section starts on a quiet machine: the one before leaves sandboxes being torn
        // down. (The burst settles again before each of its bursts, after filling the pool.)
        settle().await?;
        match section {
            Section::Baseline => baseline(&args).await?,
            Section::NoPool => no_pool(&args).await?,
            Section::Idle => idle(&args).await?,
            Section::Pool => pool(&args).await?,
            Section::Burst => pool_burst(&args).await?,
            Section::Paced => paced(&args).await?,
        }
    }
    Ok(())
}

async fn baseline(args: &BenchArgs) -> anyhow::Result<()> {
    let mut baseline = Vec::new();
    for _ in 0..args.rounds {
        let start = Instant::now();
        let status = tokio::process::Command::new("unshare")
            .args([
                "--user", "--mount", "--pid", "--fork", "--net", "--ipc", "--uts", "--cgroup",
                "true",
            ])
            .status()
            .await
            .context("cannot run `unshare` (util-linux) for the baseline")?;
        if !status.success() {
            bail!("baseline `unshare … true` failed: {status}");
        }
        baseline.push(start.elapsed());
    }
    row(
        "baseline: unshare (same namespaces) + exec true",
        &Samples::new(baseline),
    );
    Ok(())
}

/// Without the pool: every create starts a sandbox.
async fn no_pool(args: &BenchArgs) -> anyhow::Result<()> {
    let env = args.env.as_str();
    let server = ChildServer::start("bench", 0, env, &args.server_flags()).await?;
    let client = &server.client;
    let (mut create, mut destroy) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let t = Instant::now();
        let s = client.create_session(env).await?;
        create.push(t.elapsed());
        let t = Instant::now();
        client.delete_session(&s.session_id).await?;
        destroy.push(t.elapsed());
    }
    row(
        "create → ready, no pool (POST /sessions)",
        &Samples::new(create),
    );
    row(
        "destroy (DELETE /sessions/{id}, sandbox gone)",
        &Samples::new(destroy),
    );

    let mut tti = Vec::new();
    for _ in 0..args.rounds {
        let (took, s) = time_to_interactive(client, env).await?;
        tti.push(took);
        client.delete_session(&s.session_id).await?;
    }
    row(
        "time to interactive, no pool, sequential",
        &Samples::new(tti),
    );

    let session = client.create_session(env).await?;
    let mut envd = client.envd(&session, DOMAIN).await?;
    let mut exec = Vec::new();
    for i in 0..args.rounds {
        let t = Instant::now();
        let (_, sub) = envd.exec(&format!("p{i}"), "true").await?;
        exec.push(t.elapsed());
        envd.unsubscribe(&sub).await?;
    }
    row(
        "exec round trip: process.start(\"true\") → onExit",
        &Samples::new(exec),
    );
    drop(envd);
    client.delete_session(&session.session_id).await?;

    let mut tti = Vec::new();
    for (took, s) in burst(&server, env, args.concurrent).await? {
        tti.push(took);
        server.client.delete_session(&s.session_id).await?;
    }
    row(
        &format!("time to interactive, no pool, {} at once", args.concurrent),
        &Samples::new(tti),
    );
    server.stop().await
}

async fn idle(args: &BenchArgs) -> anyhow::Result<()> {
    let env = args.env.as_str();
    let server = ChildServer::start("bench", 0, env, &args.server_flags()).await?;
    let client = Arc::new(Client::new(
        &format!("http://{}", server.client.addr()),
        None,
    )?);
    let before = MemoryProbe::take(server.pid(), None)?;
    let started = Instant::now();
    let mut idle = Vec::new();
    for chunk in (0..args.idle).collect::<Vec<_>>().chunks(16) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|_| {
                let client = client.clone();
                let env = env.to_string();
                tokio::spawn(async move { client.create_session(&env).await })
            })
            .collect();
        for t in tasks {
            idle.push(t.await??);
        }
    }
    let launch = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = idle.first().map(|s| s.client_id.as_str());
    let after = MemoryProbe::take(server.pid(), node)?;
    let live = client.list_sessions().await?.len();
    let n = args.idle.max(1) as f64;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{:<52} {:>9.2} MiB ({live} live at once, started in {:.1} s)",
        "host memory per idle sandbox: sandbox cgroups + server",
        mib(after.sandboxes_kib + after.server_kib.saturating_sub(before.server_kib)) / n,
        launch.as_secs_f64()
    );
    println!(
        "{:<52} {:>9.2} MiB (cross-check, noisy)",
        "  MemAvailable drop per sandbox",
        mib(before.available_kib.saturating_sub(after.available_kib)) / n,
    );
    let started = Instant::now();
    for s in &idle {
        client.delete_session(&s.session_id).await?;
    }
    println!(
        "{:<52} {:>9.1} s for {}",
        "delete all idle sandboxes",
        started.elapsed().as_secs_f64(),
        idle.len()
    );
    server.stop().await
}

/// From the pool: each create takes a ready sandbox; the pool refills between rounds.
async fn pool(args: &BenchArgs) -> anyhow::Result<()> {
    const POOL: usize = 2;
    let env = args.env.as_str();
    let server = ChildServer::start("bench", POOL, env, &args.server_flags()).await?;
    let client = &server.client;
    let (mut create, mut tti) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        server.wait_pool(env, POOL).await?;
        let t = Instant::now();
        let s = client.create_session(env).await?;
        create.push(t.elapsed());
        client.delete_session(&s.session_id).await?;
        server.wait_pool(env, POOL).await?;
        let (took, s) = time_to_interactive(client, env).await?;
        tti.push(took);
        client.delete_session(&s.session_id).await?;
    }
    row(
        "create → ready, from the pool (POST /sessions)",
        &Samples::new(create),
    );
    row(
        "time to interactive, from the pool, sequential",
        &Samples::new(tti),
    );
    server.stop().await
}

/// Creates as users make them: one at a time, an interval apart, without a pool (the previous
/// sandbox deleted right after its create, so its teardown overlaps the next create, or all of
/// them kept to the end) and from the pool. Compare with the back-to-back rows of `no-pool`
/// and `pool` and with the baseline.
async fn paced(args: &BenchArgs) -> anyhow::Result<()> {
    const POOL: usize = 2;
    let env = args.env.as_str();
    for interval in [Duration::from_millis(100), Duration::from_secs(1)] {
        let apart = format!("{} ms apart", interval.as_millis());
        let server = ChildServer::start("bench", 0, env, &args.server_flags()).await?;
        let client = &server.client;
        for delete_each in [true, false] {
            let (mut create, mut kept) = (Vec::new(), Vec::new());
            for _ in 0..args.paced_rounds {
                tokio::time::sleep(interval).await;
                let t = Instant::now();
                let s = client.create_session(env).await?;
                create.push(t.elapsed());
                if delete_each {
                    client.delete_session(&s.session_id).await?;
                } else {
                    kept.push(s);
                }
            }
            let how = if delete_each {
                "each deleted after"
            } else {
                "all kept"
            };
            row(
                &format!("create, no pool, {apart}, {how}"),
                &Samples::new(create),
            );
            for s in kept {
                client.delete_session(&s.session_id).await?;
            }
            settle().await?;
        }
        server.stop().await?;

        let server = ChildServer::start("bench", POOL, env, &args.server_flags()).await?;
        server.wait_pool(env, POOL).await?;
        let mut create = Vec::new();
        for _ in 0..args.paced_rounds {
            tokio::time::sleep(interval).await;
            let t = Instant::now();
            let s = server.client.create_session(env).await?;
            create.push(t.elapsed());
            server.client.delete_session(&s.session_id).await?;
        }
        row(
            &format!("create, from the pool, {apart}"),
            &Samples::new(create),
        );
        server.stop().await?;
        settle().await?;
    }
    Ok(())
}

/// A pool sized for the burst: every one of the concurrent sessions finds a ready sandbox.
/// Repeated `--bursts` times (the spread between bursts on 2 cores is wide): each burst's
/// median is printed, and the row holds all their samples together.
async fn pool_burst(args: &BenchArgs) -> anyhow::Result<()> {
    let env = args.env.as_str();
    let server = ChildServer::start("bench", args.concurrent, env, &args.server_flags()).await?;
    let (mut all, mut medians) = (Vec::new(), Vec::new());
    for _ in 0..args.bursts {
        server.wait_pool(env, args.concurrent).await?;
        settle().await?;
        let mut tti = Vec::new();
        for (took, session) in burst(&server, env, args.concurrent).await? {
            tti.push(took);
            server.client.delete_session(&session.session_id).await?;
        }
        let samples = Samples::new(tti);
        medians.push(format!("{:.0}", samples.pct(50).as_secs_f64() * 1e3));
        all.extend(samples.0);
    }
    row(
        &format!(
            "time to interactive, pool of {0}, {0} at once",
            args.concurrent
        ),
        &Samples::new(all),
    );
    println!("{:<52} {} ms", "  median of each burst", medians.join(", "));
    server.stop().await
}
