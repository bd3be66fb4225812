//! `burrow serve`: wires store, environments, runtime, sessions and the HTTP surface together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use burrow_api::AppState;
use burrow_environments::Catalog;
use burrow_gateway::{Gateway, Limits as GatewayLimits};
use burrow_runtime::{Limits, Namespaces, RuntimeConfig};
use burrow_sessions::{Budget, Config as SessionsConfig, Sessions};
use burrow_store::Store;
use tracing_subscriber::EnvFilter;

use crate::cli::{parse_bytes, parse_duration};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    On,
    Off,
}

/// `--network`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// A veth per sandbox, NAT to the internet, nothing of the host or private networks.
    Internet,
    /// Only `lo`.
    None,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on. Anything but loopback exposes the API to the network.
    #[arg(long, env = "BURROW_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Where burrow keeps its database, environments and sandbox sockets.
    #[arg(long, env = "BURROW_DATA_DIR", default_value = "burrow-data")]
    data_dir: PathBuf,
    /// Sandboxes are reached at {port}-{sessionID}-{clientID}.{domain}.
    #[arg(long, env = "BURROW_DOMAIN", default_value = "localhost")]
    domain: String,
    /// How long a session lives after its create or last refresh (e.g. 15s, 2m).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    session_ttl: Duration,
    /// `off` lets anyone who can reach the server create sessions (single-user laptops only).
    #[arg(long, value_enum, default_value = "on")]
    auth: Auth,
    /// Ready sandboxes kept per available environment, so creates are instant.
    #[arg(long, default_value_t = 2)]
    pool_size: usize,
    /// Comma-separated environments the pool keeps ready (default: every available one).
    #[arg(long, value_delimiter = ',', value_name = "ENV,...")]
    pool_environments: Option<Vec<String>>,
    /// Memory limit per sandbox (e.g. 512MiB, 2GiB).
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    memory: u64,
    /// Process limit per sandbox.
    #[arg(long, default_value_t = 256)]
    pids: u64,
    /// Size of each sandbox's writable filesystem layer: an ext4 filesystem of its own, in a
    /// sparse file under the data dir.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    disk: u64,
    /// Relative CPU weight per sandbox (1-10000; 100 is an equal share).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10000))]
    cpu_weight: u64,
    /// Live sessions this server runs at most; creates beyond it get 429.
    #[arg(long, default_value_t = 2000)]
    max_sessions: usize,
    /// Live sessions one team runs at most; creates beyond it get 429.
    #[arg(long, default_value_t = 500)]
    max_sessions_per_team: usize,
    /// How many times over the host's memory the sandboxes' memory limits may add up to (idle
    /// sandboxes use a few MiB of theirs); creates beyond it get 503.
    #[arg(long, default_value_t = 8.0, value_parser = parse_positive)]
    memory_overcommit: f64,
    /// How many times over the data dir's free space (at start, less 10% of it or 64 MiB,
    /// whichever is more) the sandboxes' disk limits may add up to; creates beyond it get 503.
    /// Above 1, sandboxes that all fill their disks fill the data dir's filesystem.
    #[arg(long, default_value_t = 1.0, value_parser = parse_positive)]
    disk_overcommit: f64,
    /// The part (0-1] of the host's promised memory, processes and disk one team's sessions may
    /// hold; creates beyond it get 429.
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    team_share: f64,
    /// Custom environments (`/envs`) one team may have; more get 429.
    #[arg(long, default_value_t = 100)]
    max_environments_per_team: usize,
    /// Disk one team's saved edit sessions may hold (what their versions share with nothing
    /// else); a save past it is refused with 507.
    #[arg(long, default_value = "10GiB", value_parser = parse_bytes)]
    edit_quota_per_team: u64,
    /// Memory the host keeps available: while MemAvailable is below it, creates get 503 and the
    /// warm pool is not refilled (0 turns the check off).
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes_or_zero)]
    min_available_memory: u64,
    /// Limits of one environment, overriding the ones above for its sandboxes; repeatable.
    /// E.g. `--environment-limits Java:memory=2GiB,pids=1024`.
    #[arg(long, value_name = "ENV:KEY=VALUE,...")]
    environment_limits: Vec<String>,
    /// Client connections open at once (API, websockets and tunnels to sandboxes); more get 503.
    /// Default: 16384, or fewer if the open-file limit cannot give each two descriptors.
    #[arg(long)]
    max_connections: Option<NonZeroUsize>,
    /// Connections through the gateway to one session's sandbox at once; more get 429.
    #[arg(long, default_value = "1024")]
    max_connections_per_session: NonZeroUsize,
    /// Connections through the gateway to one team's sandboxes at once (websockets, tunnels,
    /// requests in flight); more get 429. Default: half of --max-connections.
    #[arg(long)]
    max_connections_per_team: Option<NonZeroUsize>,
    /// Connections that have not yet sent a complete request head; beyond it a new connection
    /// must send its head at once or get 503. Default: a quarter of --max-connections.
    #[arg(long)]
    max_pending_heads: Option<NonZeroUsize>,
    /// How long a request body proxied to a sandbox (an upload) may go without a byte; longer
    /// gets 408, the connection is closed and the upload aborted. Websockets and tunnels are
    /// exempt.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    body_idle_timeout: Duration,
    /// How long a sandbox's envd may take to accept a gateway connection, and to answer a
    /// request's head once it has the request; longer gets 504. Upgraded connections (websockets,
    /// tunnels) never time out.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    envd_timeout: Duration,
    /// What sandboxes reach: `internet` (needs nftables) or `none` (only their own `lo`).
    #[arg(long, value_enum, default_value = "internet")]
    network: Network,
    /// Where sandboxes' addresses come from, a /30 each (default: a /16 of 10.0.0.0/8 the host
    /// does not route, kept for later runs in <data-dir>/network/subnet).
    #[arg(long, value_name = "CIDR")]
    sandbox_subnet: Option<burrow_runtime::Subnet>,
    /// Name servers the sandboxes' resolver forwards to (default: the host's, from
    /// /etc/resolv.conf); comma-separated IP or IP:PORT.
    #[arg(long, value_delimiter = ',', value_name = "IP[:PORT],...", value_parser = parse_upstream)]
    dns_upstream: Vec<SocketAddr>,
    /// When given, sandboxes reach only these networks (IPv4 CIDRs or addresses,
    /// comma-separated); an environment's `egress_allow` can narrow it, not widen it. Nothing of
    /// the host or private networks is reachable either way.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    egress_allow: Vec<burrow_environments::Cidr>,
    /// Networks no sandbox reaches, whatever an allow list says (IPv4 CIDRs or addresses,
    /// comma-separated); environments' `egress_deny` add to it.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    egress_deny: Vec<burrow_environments::Cidr>,
}

/// `IP` (port 53) or `IP:PORT`.
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

/// `--max-connections` when not given.
const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// The least default cap: below it the server would be unusable, and running out of
/// descriptors (which it warns about) is the lesser evil.
const MIN_DEFAULT_CONNECTIONS: usize = 1024;
/// Descriptors kept out of the connection budget: the database, logs, the warm pool, connections
/// being refused and spare; one per sandbox is added on top.
const RESERVED_FDS: u64 = 1024;

fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    match parse_positive(s)? {
        v if v <= 1.0 => Ok(v),
        _ => Err(format!("{s:?} is more than 1 (the whole host)")),
    }
}

/// A size, or `0` for none.
fn parse_bytes_or_zero(s: &str) -> Result<u64, String> {
    if s == "0" { Ok(0) } else { parse_bytes(s) }
}

/// The connection cap: `wanted`, or a default that leaves descriptors for every sandbox the
/// server may run, since each proxied connection takes two (the client's and envd's socket).
fn max_connections(wanted: Option<NonZeroUsize>, fd_limit: u64, max_sessions: usize) -> usize {
    let reserved = RESERVED_FDS + max_sessions as u64;
    let fits = usize::try_from(fd_limit.saturating_sub(reserved) / 2).unwrap_or(usize::MAX);
    match wanted {
        Some(wanted) => {
            if wanted.get() > fits {
                tracing::warn!(
                    "--max-connections {wanted} may run out of descriptors: the open-file limit \
                     ({fd_limit}) holds about {fits} proxied connections next to {max_sessions} sessions"
                );
            }
            wanted.get()
        }
        None if fits < MIN_DEFAULT_CONNECTIONS => {
            tracing::warn!(
                "the open-file limit ({fd_limit}) is low for {max_sessions} sessions: allowing \
                 {MIN_DEFAULT_CONNECTIONS} connections, which may run out of descriptors; raise \
                 the limit or lower --max-sessions"
            );
            MIN_DEFAULT_CONNECTIONS
        }
        None => DEFAULT_MAX_CONNECTIONS.min(fits),
    }
}

/// `wanted`, or `1/divisor` of `max_connections` (at least one).
fn share(wanted: Option<NonZeroUsize>, max_connections: usize, divisor: usize) -> usize {
    wanted.map_or((max_connections / divisor).max(1), NonZeroUsize::get)
}

/// Parses `ENV:memory=…,pids=…,disk=…,cpu-weight=…` on top of the server-wide `base`.
fn environment_limits(spec: &str, base: Limits) -> anyhow::Result<(String, Limits)> {
    let (env, pairs) = spec
        .split_once(':')
        .with_context(|| format!("--environment-limits {spec:?}: expected ENV:KEY=VALUE,..."))?;
    let mut limits = base;
    for pair in pairs.split(',') {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--environment-limits {spec:?}: {pair:?} is not KEY=VALUE"))?;
        let bad = |e: String| anyhow::anyhow!("--environment-limits {spec:?}: {e}");
        match key {
            "memory" => limits.memory_bytes = parse_bytes(value).map_err(bad)?,
            "disk" => limits.disk_bytes = parse_bytes(value).map_err(bad)?,
            "pids" => limits.pids = value.parse().map_err(|e| bad(format!("pids: {e}")))?,
            "cpu-weight" => {
                limits.cpu_weight = value.parse().map_err(|e| bad(format!("cpu-weight: {e}")))?
            }
            _ => anyhow::bail!(
                "--environment-limits {spec:?}: unknown limit {key:?}; use memory, disk, pids or cpu-weight"
            ),
        }
    }
    limits.validate()?;
    Ok((env.to_string(), limits))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

/// Creates the data dir (owner-only) and returns its absolute path.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    dir.canonicalize()
        .with_context(|| format!("cannot resolve the data dir {}", dir.display()))
}

/// Every websocket and tunnel holds two descriptors; the default soft limit (often 1024) would
/// cap the server at a few hundred clients, so take what the hard limit allows. Returns the
/// limit in force afterwards.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            // Cannot happen for RLIMIT_NOFILE; assume the usual soft default.
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let soft = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
                return soft;
            }
        }
    }
    limit.rlim_cur
}

/// Raises the host-wide budgets that every sandbox draws from to what systemd sets on current
/// distributions: `kernel.pid_max` to 4194304, since admission control promises three quarters
/// of it to sandboxes and the kernel's default (32768) would hold fewer than a hundred; and
/// `fs.file-max` to its maximum, since a sandbox's open files are charged to its memory cgroup
/// (its memory limit bounds them) and a host-wide count would be one pool that a single sandbox
/// could drain for all the others.
fn raise_host_budgets() {
    for (file, wanted) in [
        ("/proc/sys/kernel/pid_max", 4_194_304u64),
        ("/proc/sys/fs/file-max", i64::MAX as u64),
    ] {
        let current = std::fs::read_to_string(file)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if current.is_some_and(|c| c < wanted) {
            match std::fs::write(file, wanted.to_string()) {
                Ok(()) => tracing::info!("raised {file} from {} to {wanted}", current.unwrap_or(0)),
                Err(e) => tracing::warn!(
                    "cannot raise {file}: {e}; sandboxes share the smaller host-wide budget"
                ),
            }
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let fd_limit = raise_fd_limit();
    let max_connections = max_connections(args.max_connections, fd_limit, args.max_sessions);
    let max_connections_per_team = share(args.max_connections_per_team, max_connections, 2);
    let max_pending_heads = share(args.max_pending_heads, max_connections, 4);
    raise_host_budgets();
    // Bind first: a start that cannot listen must not print (and so waste) the admin key.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let data_dir = prepare_data_dir(&args.data_dir)?;
    let store = Arc::new(Store::open(&data_dir.join("burrow.db"))?);
    let node_id = store.node_id()?;
    let auth_off = match args.auth {
        Auth::On => {
            if !store.has_keys()? {
                let key = store.create_key("admin", true)?;
                println!("admin key: {}", key.key);
                tracing::info!(
                    "created the admin key (printed once above; `burrow keys create` makes more)"
                );
            }
            None
        }
        Auth::Off => {
            tracing::warn!(
                "AUTH IS OFF: anyone who can reach {} can run code on this machine",
                args.listen
            );
            Some(store.default_principal()?)
        }
    };
    let limits = Limits {
        memory_bytes: args.memory,
        pids: args.pids,
        cpu_weight: args.cpu_weight,
        disk_bytes: args.disk,
    };
    limits.validate()?;
    let environment_limits: HashMap<String, Limits> = args
        .environment_limits
        .iter()
        .map(|spec| environment_limits(spec, limits))
        .collect::<anyhow::Result<_>>()?;
    let mut runtime_config = RuntimeConfig::new(data_dir.clone(), node_id.clone());
    runtime_config.network = match args.network {
        Network::None => None,
        Network::Internet => Some(burrow_runtime::NetworkConfig {
            subnet: args.sandbox_subnet,
            dns_upstream: args.dns_upstream.clone(),
            egress_allow: args.egress_allow.clone(),
            egress_deny: args.egress_deny.clone(),
        }),
    };
    let catalog = Arc::new(Catalog::load(&data_dir, runtime_config.uid_base)?);
    for name in args.pool_environments.iter().flatten() {
        if catalog.get(name).is_none() {
            anyhow::bail!("--pool-environments: unknown environment {name:?}; see `burrow env ls`");
        }
    }
    for name in environment_limits.keys() {
        if catalog.get(name).is_none() {
            anyhow::bail!(
                "--environment-limits: unknown environment {name:?}; see `burrow env ls`"
            );
        }
    }
    for env in catalog.list() {
        match &env.availability {
            Ok(()) => tracing::info!(environment = %env.name, "environment available"),
            Err(why) => tracing::info!(environment = %env.name, "environment unavailable: {why}"),
        }
    }
    let backend = Arc::new(Namespaces::new(runtime_config)?);
    let sessions = Sessions::start(
        SessionsConfig {
            ttl: args.session_ttl,
            pool_size: args.pool_size,
            pool_environments: args.pool_environments.clone(),
            limits,
            environment_limits,
            max_sessions: args.max_sessions,
            max_sessions_per_team: args.max_sessions_per_team,
            min_available_memory: args.min_available_memory,
            client_id: node_id.clone(),
            host_budget: Budget::of_host(args.memory_overcommit, &data_dir, args.disk_overcommit)
                .with_context(|| {
                format!("cannot read the free space of {}", data_dir.display())
            })?,
            team_share: args.team_share,
            max_environments_per_team: args.max_environments_per_team,
            edit_quota_per_team: args.edit_quota_per_team,
        },
        store.clone(),
        backend.clone(),
        catalog,
    )
    .await?;
    let state = Arc::new(AppState {
        sessions: sessions.clone(),
        store,
        domain: args.domain.clone(),
        auth_off,
        gateway: Gateway::new(GatewayLimits {
            connections_per_session: args.max_connections_per_session.get(),
            connections_per_team: max_connections_per_team,
            envd_timeout: args.envd_timeout,
            body_idle_timeout: args.body_idle_timeout,
        }),
    });
    tracing::info!(
        node = %node_id,
        data_dir = %data_dir.display(),
        max_connections,
        max_connections_per_team,
        max_pending_heads,
        "listening on http://{}; sandboxes at {{port}}-{{sessionID}}-{node_id}.{}",
        listener.local_addr()?,
        args.domain
    );
    let stopping = Arc::new(tokio::sync::Notify::new());
    // Interactive traffic (terminals, JSON-RPC) is many small writes: never let Nagle hold them.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // Not `axum::serve`: burrow_api::serve also drops connections that do not send a request.
    let caps = burrow_api::ConnectionCaps {
        max_connections,
        max_pending_heads,
    };
    let server = burrow_api::serve(listener, burrow_api::app(state), caps, {
        let stopping = stopping.clone();
        async move {
            stop_signal().await;
            stopping.notify_one();
        }
    });
    // Requests in flight get a few seconds to finish; idle keep-alive clients do not hold the stop.
    tokio::select! {
        result = server => result?,
        _ = async { stopping.notified().await; tokio::time::sleep(Duration::from_secs(5)).await } => {
            tracing::warn!("connections still open after 5 s; stopping anyway");
        }
    }
    tracing::info!("stopping: live sessions keep running and are adopted by the next start");
    sessions.shutdown().await;
    // The node's parent cgroups go when no sandbox is left in them; live ones keep them.
    backend.remove_node_cgroups();
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_cap_fits_the_descriptors() {
        // Plenty of descriptors: the default.
        assert_eq!(
            max_connections(None, 1 << 20, 2000),
            DEFAULT_MAX_CONNECTIONS
        );
        // 20,000: two per connection after 2,000 sessions and the reserve.
        assert_eq!(max_connections(None, 20_000, 2000), (20_000 - 3024) / 2);
        // Too few for the sessions (a low limit, or a huge --max-sessions): a usable floor.
        assert_eq!(max_connections(None, 256, 2000), MIN_DEFAULT_CONNECTIONS);
        assert_eq!(
            max_connections(None, 20_000, 100_000),
            MIN_DEFAULT_CONNECTIONS
        );
        // Asked for explicitly: taken as is.
        let ten = NonZeroUsize::new(10).unwrap();
        assert_eq!(max_connections(Some(ten), 256, 2000), 10);
    }

    #[test]
    fn per_team_and_pending_caps_default_to_a_share_of_the_server_cap() {
        assert_eq!(share(None, 16_384, 2), 8192);
        assert_eq!(share(None, 16_384, 4), 4096);
        assert_eq!(share(None, 1, 4), 1);
        assert_eq!(share(NonZeroUsize::new(7), 16_384, 2), 7);
    }

    #[test]
    fn environment_limits_override_the_base() {
        let base = Limits::default();
        let (env, l) = environment_limits("Java:memory=2GiB,pids=1024", base).unwrap();
        assert_eq!(env, "Java");
        assert_eq!((l.memory_bytes, l.pids), (2 << 30, 1024));
        assert_eq!(
            (l.disk_bytes, l.cpu_weight),
            (base.disk_bytes, base.cpu_weight)
        );
        for bad in [
            "Java",
            "Java:memory",
            "Java:color=red",
            "Java:pids=x",
            "Java:memory=0",
        ] {
            assert!(environment_limits(bad, base).is_err(), "{bad}");
        }
    }
}
