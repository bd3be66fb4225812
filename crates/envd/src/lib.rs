//! envd, the agent inside each sandbox: the envd JSON-RPC websocket, `/file`, and a tunnel to TCP
//! ports inside the sandbox, served over one unix socket. Runs inside the sandbox; never sees the host.
//!
//! It is PID 1 of its sandbox, so it also reaps every orphan there. It must not depend on other
//! burrow crates. Wire behaviour: `e2b-v0-wire.md` §4–§6 as amended by `DECISIONS.md`.
//!
//! Map of the crate:
//! - `connection`: one websocket and its JSON-RPC dispatch (`rpc` frames it, `outbox` bounds what
//!   is queued for it); `hub` holds the subscriptions of the whole sandbox;
//! - services: `filesystem` (+ `watch`), `process`, `terminal`, `ports` (`codeSnippet`), sharing
//!   `child` (how children start and are read) and `reaper`;
//! - plain HTTP: `file` (`/file`), `tunnel` (`/tunnel/{port}`), `/ping`, and `/health` for the
//!   current E2B SDKs (`is_running`, and their probe after a failed call).
//! - `connect`: the Connect services the current E2B SDKs call (`/process.Process/*`, e2b v2 wire
//!   spec §5-§6), beside the JSON-RPC above.

mod child;
mod connect;
mod connection;
mod file;
mod filesystem;
mod first_shell;
mod hub;
mod outbox;
mod ports;
mod process;
mod reaper;
mod rpc;
mod terminal;
mod tunnel;
mod user_fs;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State as Shared};
use axum::routing::{get, post};

/// Who envd runs processes and terminals as, and the environment they start from.
#[derive(Debug, Clone)]
pub struct Config {
    /// uid/gid of the sandbox user (`user`, 1000 in built-in environments). Processes, terminals
    /// and files written over RPC or `/file` belong to this user.
    pub uid: u32,
    pub gid: u32,
    /// The user's name (`USER`, `LOGNAME`).
    pub user: String,
    /// The user's home (`HOME`, default upload directory, base of relative paths).
    pub home: PathBuf,
    /// Where processes and terminals start when the request names no directory (the
    /// environment definition's `workdir`; the home in built-in environments).
    pub workdir: PathBuf,
    /// Start the first command's login shell once the first `/ping` is answered (a pooled
    /// sandbox, whose client comes later; see `first_shell.rs`).
    pub ready_shell: bool,
    /// The login shell used as `$SHELL -l -c CMD` for processes and `$SHELL -i -l` for terminals.
    pub shell: PathBuf,
    /// Base environment every process and terminal starts from (PATH, LANG, ...), before
    /// `HOME`/`USER`/`LOGNAME` and the request's own variables.
    pub env: Vec<(String, String)>,
}

/// Serve envd on an already-bound listener until the process ends. Builds a current-thread tokio
/// runtime (envd must be small: it runs once per sandbox), installs the SIGCHLD reaper, serves.
pub fn run(listener: std::os::unix::net::UnixListener, config: Config) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // File operations run on blocking threads; a few suffice for one sandbox.
        .max_blocking_threads(8)
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        serve(listener, config).await
    })
}

/// The same on a caller's runtime (used by tests and benchmarks).
pub async fn serve(listener: tokio::net::UnixListener, config: Config) -> std::io::Result<()> {
    let sigchld = reaper::listen()?;
    tokio::spawn(reaper::run(sigchld));
    let state = Arc::new(State::new(config));
    axum::serve(listener, router(state)).await
}

/// Everything the handlers share; one per sandbox.
pub(crate) struct State {
    pub(crate) config: Config,
    pub(crate) hub: hub::Hub,
    pub(crate) processes: process::Processes,
    /// Processes started over Connect (`process.Process`), by pid.
    pub(crate) connect_processes: connect::Processes,
    /// Directory watchers polled over Connect (`filesystem.Filesystem/CreateWatcher`), by id.
    pub(crate) connect_watchers: connect::Watchers,
    pub(crate) terminals: terminal::Terminals,
    pub(crate) watcher: watch::Watcher,
    pub(crate) first_shell: first_shell::FirstShell,
    next_connection: AtomicU64,
}

impl State {
    fn new(config: Config) -> Self {
        Self {
            first_shell: first_shell::FirstShell::default(),
            config,
            hub: hub::Hub::default(),
            processes: process::Processes::default(),
            connect_processes: connect::Processes::default(),
            connect_watchers: connect::Watchers::default(),
            terminals: terminal::Terminals::default(),
            watcher: watch::Watcher::default(),
            next_connection: AtomicU64::new(1),
        }
    }

    pub(crate) fn new_connection_id(&self) -> hub::ConnectionId {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Frees what ended subscriptions held (directory watches).
    pub(crate) fn release(&self, topics: impl IntoIterator<Item = hub::Topic>) {
        for topic in topics {
            if let hub::Topic::Watch(dir) = topic {
                self.watcher.release(&dir);
            }
        }
    }
}

/// The server's readiness probe. Once it has been answered, the sandbox's first shell starts.
async fn ping(Shared(state): Shared<Arc<State>>) -> &'static str {
    if state.config.ready_shell {
        tokio::spawn(async move { state.first_shell.start(&state.config) });
    }
    "pong"
}

/// The current E2B SDKs' liveness probe (wire spec §4.3): `204`. Unlike `/ping` it is no
/// readiness signal, so it starts nothing.
async fn health() -> axum::http::StatusCode {
    axum::http::StatusCode::NO_CONTENT
}

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/health", get(health))
        .route("/ws", get(connection::upgrade))
        .route(
            "/file",
            get(file::download)
                .post(file::upload)
                .options(file::preflight),
        )
        .route("/tunnel/{port}", get(tunnel::open))
        // The Connect services of the current E2B SDKs (e2b v2 wire spec §5-§6).
        .route("/process.Process/{method}", post(connect::process))
        .route("/filesystem.Filesystem/{method}", post(connect::filesystem))
        .route(
            "/files",
            get(connect::files::download).post(connect::files::upload),
        )
        // Uploads are streamed to disk; the sandbox's disk limit bounds them, not envd.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Locks a mutex even if a panicking handler poisoned it: the maps it guards stay consistent
/// because every critical section is a handful of map operations.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random ID of `len` characters from `[a-z0-9]`.
pub(crate) fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}

/// Entry points for the AFL++ targets in `fuzz/`, which cannot reach private modules. Not an API:
/// nothing but those targets may use it.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;

    use serde_json::Value;

    /// What [`serve`](crate::serve) serves on `config` (`/ws`, `/file`, ...), without the SIGCHLD
    /// reaper, so that a target can drive it in memory.
    pub fn router(config: crate::Config) -> axum::Router {
        crate::router(Arc::new(crate::State::new(config)))
    }

    /// How envd classifies one websocket message (`rpc::parse`).
    #[derive(Debug)]
    pub enum Parsed {
        /// A call; `id` is `None` for a notification.
        Call {
            id: Option<Value>,
            method: String,
            params: Option<Value>,
        },
        /// Answered at once with this error.
        Refused {
            id: Value,
            code: i64,
            message: String,
        },
    }

    /// `rpc::parse` in public types, so a target checks envd's own decision, not a copy of it.
    pub fn parse(message: &[u8]) -> Parsed {
        match crate::rpc::parse(message) {
            crate::rpc::Incoming::Request { id, method, params } => {
                Parsed::Call { id, method, params }
            }
            crate::rpc::Incoming::Invalid { id, error } => Parsed::Refused {
                id,
                code: error.code,
                message: error.message,
            },
        }
    }
}
