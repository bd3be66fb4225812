//! Session lifecycle: create (from the warm pool or fresh), refresh, delete, expiry on a timer
//! queue, edit sessions and restart recovery. The one owner of session state.
//!
//! Every live session is in `live` (memory, the source of truth for routing) and in the store
//! (so a restart can adopt its sandbox). A session leaves `live` before its sandbox is destroyed,
//! so nothing routes to a sandbox that is going away.

mod admission;
mod custom;
mod metrics;
mod pool;
mod save_locks;
mod timers;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use burrow_environments::{Catalog, Environment, usage};
use burrow_runtime::{Backend, Limits, Sandbox, SandboxSpec};
use burrow_store::{CustomEnvironment, EditBase, EnvironmentState, Principal, SessionRow, Store};
use futures_util::StreamExt;

pub use admission::{Budget, Refusal, Resource};
use admission::{Exceeded, Promised};
pub use custom::EnvironmentUpdate;
pub use metrics::Metrics;
use pool::Pool;
use save_locks::SaveLocks;
use timers::Timers;

/// Sandboxes a restart probes at once: each probe may wait its whole timeout on a sandbox that
/// does not answer, and the server listens only after all of them.
const RECOVERY_PROBES: usize = 64;
/// How often a destroy is tried before a delete reports that its sandbox is still there...
const DESTROY_TRIES: u32 = 3;
/// ...and how often, after that, it is tried again in the background until it succeeds.
const DESTROY_RETRY: Duration = Duration::from_secs(5);

/// How sessions behave on this node.
#[derive(Debug, Clone)]
pub struct Config {
    /// A session lives this long after its create or last refresh.
    pub ttl: Duration,
    /// Ready sandboxes kept per pooled environment.
    pub pool_size: usize,
    /// The environments the pool keeps ready; `None` = every available one.
    pub pool_environments: Option<Vec<String>>,
    /// Limits of every sandbox, unless its environment has its own in `environment_limits`.
    pub limits: Limits,
    pub environment_limits: HashMap<String, Limits>,
    /// Live sessions this node runs at most, and one team at most (edit sessions included).
    pub max_sessions: usize,
    pub max_sessions_per_team: usize,
    /// Creates are refused (and the pool not refilled) while the host has less memory
    /// available than this many bytes (`MemAvailable`); 0 turns the check off.
    pub min_available_memory: u64,
    /// This node's ID, the `clientID` of its sessions.
    pub client_id: String,
    /// What the sandboxes of this node may be promised together (their limits summed).
    pub host_budget: Budget,
    /// The part of `host_budget` one team may be promised, in (0, 1].
    pub team_share: f64,
    /// Custom environments one team may have.
    pub max_environments_per_team: usize,
    /// Bytes of disk one team's saved edits may hold (see `burrow_environments::usage`).
    pub edit_quota_per_team: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown environment {name:?}; available environments: {available}")]
    UnknownEnvironment { name: String, available: String },
    #[error("environment {name:?} is not available on this server: {reason}")]
    Unavailable { name: String, reason: String },
    #[error("session '{0}' was not found")]
    NotFound(String),
    #[error(
        "environment '{0}' was not found among your team's environments (GET /envs lists them)"
    )]
    EnvironmentNotFound(String),
    #[error("environment ID {0:?} is invalid: use 1-64 characters of [A-Za-z0-9_-]")]
    InvalidEnvironmentId(String),
    #[error("environment ID {0:?} is taken; choose another, or POST /envs for a fresh one")]
    EnvironmentIdTaken(String),
    #[error("cannot create a session right now: {0}")]
    Sandbox(String),
    #[error(
        "{scope} already runs {limit} sessions, its limit; delete some or let them expire (the operator sets the limit with --{flag})"
    )]
    TooMany {
        scope: &'static str,
        limit: usize,
        flag: &'static str,
    },
    #[error(
        "your team has used its share of this server, {0}; delete some sessions (the operator \
         sets the share with --team-share)"
    )]
    TeamShare(Refusal),
    #[error(
        "this server has promised all it has, {0}; try again later{hint}",
        hint = match .0.resource {
            Resource::Memory => " (the operator sets --memory-overcommit)",
            Resource::Disk => " (the operator sets --disk-overcommit)",
            Resource::Pids => "",
        }
    )]
    HostFull(Refusal),
    #[error(
        "your team has {0} custom environments, its limit; delete some (the operator sets the \
         limit with --max-environments-per-team)"
    )]
    TooManyEnvironments(usize),
    #[error(
        "session '{session}' ended, but what it changed was not saved: your team's saved edits \
         hold {} MiB and this session wrote up to {} MiB more, past the {} MiB quota; delete \
         custom environments you no longer need (the operator sets the quota with \
         --edit-quota-per-team)",
        used >> 20, need >> 20, quota >> 20
    )]
    EditQuota {
        session: String,
        used: u64,
        need: u64,
        quota: u64,
    },
    #[error("{0}")]
    Store(#[from] burrow_store::Error),
    #[error(
        "this server is low on memory: {} MiB available, below the {} MiB it keeps free \
         (--min-available-memory); try again later",
        available >> 20,
        floor >> 20
    )]
    LowMemory { available: u64, floor: u64 },
    #[error("{0}")]
    Environment(#[from] burrow_environments::Error),
    #[error("session '{session}' ended, but what it changed could not be saved: {reason}")]
    EditsLost { session: String, reason: String },
    #[error(
        "session '{session}' ended, but what it changed was not saved: environment \
         '{environment}' was {what} while the session ran, which drops its saved edits"
    )]
    EditsDropped {
        session: String,
        environment: String,
        what: &'static str,
    },
    /// Why is in the server's log, with the session's ID: it names host paths.
    #[error(
        "session '{0}' ended, but its sandbox could not be removed yet; burrow keeps trying \
         in the background"
    )]
    Teardown(String),
}

/// A session as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: String,
    pub client_id: String,
    pub environment: String,
    /// The built-in environment it runs (`environment` itself, or a custom one's template).
    pub template: String,
    pub edit_enabled: bool,
    pub started_at: SystemTime,
    /// When it ends unless refreshed or given another timeout.
    pub end_at: SystemTime,
    pub metadata: BTreeMap<String, String>,
    /// What its sandbox may use.
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// What a create asks for besides the environment.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    /// A shared, persistent edit session of the environment (see [`Sessions::create`]).
    pub edit_enabled: bool,
    /// A sandbox of the current E2B API: it lives this long from its create (until
    /// [`Sessions::set_timeout`] says otherwise), and a refresh never shortens that. `None`: the
    /// session-era lifetime, one refresh TTL at a time.
    pub timeout: Option<Duration>,
    /// The client's labels, returned with the session.
    pub metadata: BTreeMap<String, String>,
}

/// A live session as the gateway needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRoute {
    /// envd's unix socket on the host.
    pub socket: PathBuf,
    /// The team that owns the session.
    pub team_id: i64,
}

struct Live {
    team_id: i64,
    environment: String,
    /// The built-in environment it runs: metrics name this, never a team's custom ID.
    template: String,
    edit_enabled: bool,
    /// An edit session of a custom environment: the root it started from.
    edit_base: Option<EditBase>,
    /// What its sandbox was promised (see `admission`).
    limits: Limits,
    sandbox: Sandbox,
    deadline: Instant,
    /// Unix milliseconds.
    created_at: i64,
    metadata: BTreeMap<String, String>,
}

struct Inner {
    config: Config,
    store: Arc<Store>,
    backend: Arc<dyn Backend>,
    catalog: Arc<Catalog>,
    live: Mutex<HashMap<String, Live>>,
    /// What creates in flight were promised, per team (see [`Sessions::reserve`]); locked
    /// after `live`.
    pending: Mutex<HashMap<i64, Promised>>,
    /// Serialises edit-session creation so one (team, environment) never gets two.
    edit_create: tokio::sync::Mutex<()>,
    /// Per (team, custom environment): held while an edit session of it ends and its changes are
    /// saved, and waited for by every create of it, so a session created after an edit session
    /// ended starts from what it saved and two edit sessions never overlap.
    saving: SaveLocks,
    timers: Timers,
    pool: Pool,
    metrics: Metrics,
}

/// A create's claim on one session of its team's (and the node's) capacity.
struct Slot<'a> {
    sessions: &'a Sessions,
    team_id: i64,
    limits: Limits,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .sessions
            .inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(promised) = pending.get_mut(&self.team_id) {
            promised.remove(&self.limits);
            if promised.sessions == 0 {
                pending.remove(&self.team_id);
            }
        }
    }
}

/// The sessions of this node. Cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The wall-clock time (unix ms) of a monotonic deadline, for the store.
fn deadline_ms(deadline: Instant) -> i64 {
    let now = Instant::now();
    let wall = SystemTime::now();
    let at = if deadline >= now {
        wall + (deadline - now)
    } else {
        wall - (now - deadline)
    };
    unix_ms(at)
}

fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// A session ID: 20 characters of `[a-z0-9]`, about 103 random bits, since knowing it is enough
/// to refresh the session (the SDK refreshes without a key).
fn new_session_id() -> String {
    burrow_store::random_alnum(20)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

impl Config {
    /// Refuses a new sandbox while the host is short of memory: its start and its first steps
    /// would push the host towards the kernel's OOM killer, which may pick the server itself.
    /// (Sandboxes together are capped by the node's cgroup; this guards everything else.)
    fn check_memory(&self) -> Result<(), Error> {
        let floor = self.min_available_memory;
        match available_memory() {
            Some(available) if available < floor => Err(Error::LowMemory { available, floor }),
            _ => Ok(()),
        }
    }

    /// The limits of a sandbox of `environment`.
    pub fn limits_for(&self, environment: &str) -> Limits {
        self.environment_limits
            .get(environment)
            .copied()
            .unwrap_or(self.limits)
    }
}

/// Runs `work` to its end on its own task, whatever happens to the caller: a request whose client
/// goes away must not stop a sandbox's start or teardown halfway (a sandbox nobody owns, a
/// session half-made, an edit session left frozen).
async fn detached<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> T {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

impl Sessions {
    /// Adopts what a previous run left (live sessions whose sandbox still answers), finishes the
    /// ends that were under way, destroys the rest, and starts the expiry timer and the pool.
    pub async fn start(
        config: Config,
        store: Arc<Store>,
        backend: Arc<dyn Backend>,
        catalog: Arc<Catalog>,
    ) -> Result<Sessions, Error> {
        let sessions = Sessions {
            inner: Arc::new(Inner {
                pool: Pool::new(config.pool_size),
                config,
                store,
                backend,
                catalog,
                live: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                edit_create: tokio::sync::Mutex::new(()),
                saving: SaveLocks::default(),
                timers: Timers::default(),
                metrics: Metrics::default(),
            }),
        };
        sessions.recover().await?;
        tokio::spawn(sessions.clone().expire_loop());
        pool::spawn_filler(sessions.clone());
        Ok(sessions)
    }

    fn live(&self) -> MutexGuard<'_, HashMap<String, Live>> {
        self.inner.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> burrow_store::Result<T> + Send + 'static,
    ) -> Result<T, Error> {
        Ok(self.inner.store.call(f).await?)
    }

    async fn recover(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let rows = self.store(Store::sessions).await?;
        let present: Vec<String> = inner.backend.list().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list sandboxes left by a previous run");
            Vec::new()
        });
        let (ending, rows): (Vec<SessionRow>, Vec<SessionRow>) =
            rows.into_iter().partition(|r| r.ending);
        // Probed at once, a bounded number at a time: one sandbox that does not answer costs
        // one probe timeout, not one per session behind it.
        let probed: Vec<(SessionRow, bool)> = futures_util::stream::iter(rows)
            .map(|row| async {
                let alive =
                    present.contains(&row.sandbox_id) && inner.backend.probe(&row.sandbox_id).await;
                (row, alive)
            })
            .buffer_unordered(RECOVERY_PROBES)
            .collect()
            .await;
        let now_ms = unix_ms(SystemTime::now());
        let mut kept: Vec<String> = Vec::new();
        for (row, alive) in probed {
            let uid_base = inner.backend.uid_base(&row.sandbox_id);
            let (true, Ok(uid_base)) = (alive, uid_base) else {
                tracing::info!(session = %row.id, sandbox = %row.sandbox_id, "session lost its sandbox while the server was down; removing it");
                let id = row.id.clone();
                self.store(move |s| s.delete_session(&id)).await?;
                continue;
            };
            // Clients could not refresh while the server was down: give them one TTL to come back.
            // A sandbox the client gave a lifetime is not refreshed: its end stays where it was.
            let grace_ms = match row.timeout_ms {
                Some(_) => 0,
                None => inner.config.ttl.as_millis() as i64,
            };
            let remaining_ms = (row.expires_at - now_ms).max(grace_ms);
            let deadline = Instant::now() + Duration::from_millis(remaining_ms as u64);
            tracing::info!(session = %row.id, sandbox = %row.sandbox_id, "adopted session");
            kept.push(row.sandbox_id.clone());
            let mut live = self.adopted(&row, uid_base, deadline);
            if row.edit_enabled && row.edit_base.is_none() {
                live.edit_base = self.legacy_edit_base(&row).await.unwrap_or_else(|e| {
                    tracing::warn!(session = %row.id, "edit session's root unknown, its edits will not be saved: {e}");
                    None
                });
            }
            self.insert_live(row.id, live);
        }
        for row in ending {
            // An end the previous run did not finish (an edit session frozen mid-save, say):
            // finish it now. The save lock is taken before the server listens, so no create of
            // the environment starts from the root the save is about to replace.
            kept.push(row.sandbox_id.clone());
            let saving = match row.edit_base {
                Some(_) => Some(inner.saving.lock(row.team_id, &row.environment).await),
                None => None,
            };
            let live = match inner.backend.uid_base(&row.sandbox_id) {
                Ok(uid_base) if present.contains(&row.sandbox_id) => {
                    Some(self.adopted(&row, uid_base, Instant::now()))
                }
                _ => None,
            };
            let this = self.clone();
            tokio::spawn(async move {
                tracing::info!(session = %row.id, "finishing the end of a session the previous run left under way");
                let ended = if let Some(live) = live {
                    this.end(&row.id, live).await
                } else {
                    this.inner.metrics.edit_save_failures.inc();
                    this.forget_row(&row.id).await;
                    Err(Error::EditsLost {
                        session: row.id.clone(),
                        reason: "its sandbox died while the server was down".into(),
                    })
                };
                if let Err(e) = ended {
                    tracing::error!(session = %row.id, "{e}");
                }
                drop(saving);
            });
        }
        for id in present.iter().filter(|id| !kept.contains(id)) {
            tracing::info!(sandbox = %id, "destroying a sandbox no session owns");
            if let Err(e) = inner.backend.destroy(id).await {
                tracing::warn!(sandbox = %id, error = %e, "cannot destroy leftover sandbox");
            }
        }
        Ok(())
    }

    /// The root of an edit session started by a burrow that did not record it: the one its
    /// environment runs now, which is what that burrow's save would have used.
    async fn legacy_edit_base(&self, row: &SessionRow) -> Result<Option<EditBase>, Error> {
        let (team_id, environment) = (row.team_id, row.environment.clone());
        let Some(custom) = self
            .store(move |s| s.environment(team_id, &environment))
            .await?
        else {
            return Ok(None);
        };
        let root = self.custom_root(&custom).await?;
        Ok(Some(EditBase {
            snapshot: root.snapshot.as_ref().map(|s| s.version.clone()),
            rootfs: root.rootfs.clone(),
        }))
    }

    /// The live state of a session a previous run of the server started.
    fn adopted(&self, row: &SessionRow, uid_base: u32, deadline: Instant) -> Live {
        Live {
            team_id: row.team_id,
            environment: row.environment.clone(),
            template: row.template.clone(),
            edit_enabled: row.edit_enabled,
            edit_base: row.edit_base.clone(),
            limits: self.inner.config.limits_for(&row.template),
            sandbox: Sandbox {
                socket: self.inner.backend.socket_path(&row.sandbox_id),
                id: row.sandbox_id.clone(),
                uid_base,
            },
            deadline,
            created_at: row.created_at,
            metadata: row.metadata.clone(),
        }
    }

    fn insert_live(&self, id: String, live: Live) {
        self.inner.timers.push(live.deadline, id.clone());
        let sandbox_id = live.sandbox.id.clone();
        self.live().insert(id.clone(), live);
        tokio::spawn(self.clone().watch_sandbox(id, sandbox_id));
    }

    /// Removes a session whose sandbox died on its own, so the API stops reporting it.
    async fn watch_sandbox(self, session_id: String, sandbox_id: String) {
        self.inner.backend.wait_exit(&sandbox_id).await;
        let removed = {
            let mut live = self.live();
            match live.get(&session_id) {
                Some(l) if l.sandbox.id == sandbox_id => live.remove(&session_id),
                _ => None,
            }
        };
        if removed.is_some() {
            tracing::warn!(session = %session_id, sandbox = %sandbox_id, "sandbox died; session is gone");
            self.inner.metrics.sandbox_deaths.inc();
            if let Err(e) = self.forget(&session_id, &sandbox_id).await {
                tracing::error!(session = %session_id, "{e}");
            }
        }
    }

    async fn forget_row(&self, session_id: &str) {
        let id = session_id.to_string();
        if let Err(e) = self.store(move |s| s.delete_session(&id)).await {
            tracing::error!(session = %session_id, error = %e, "cannot delete session from the store");
        }
    }

    /// Deletes a session's row and destroys its sandbox, after the session has left `live`. A
    /// destroy that keeps failing is reported, and tried again in the background until it
    /// succeeds (a restart would destroy the sandbox too: no session owns it any more).
    async fn forget(&self, session_id: &str, sandbox_id: &str) -> Result<(), Error> {
        self.forget_row(session_id).await;
        let backend = &self.inner.backend;
        let mut tries = 0;
        let error = loop {
            tries += 1;
            match backend.destroy(sandbox_id).await {
                Ok(()) => return Ok(()),
                Err(e) if tries >= DESTROY_TRIES => break e,
                Err(e) => {
                    tracing::warn!(session = %session_id, sandbox = %sandbox_id, error = %e, "cannot destroy sandbox; trying again");
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
            }
        };
        tracing::error!(session = %session_id, sandbox = %sandbox_id, error = %error, "cannot destroy sandbox; retrying in the background");
        self.inner.metrics.destroy_failures.inc();
        let backend = backend.clone();
        let sandbox = sandbox_id.to_string();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(DESTROY_RETRY).await;
                match backend.destroy(&sandbox).await {
                    Ok(()) => {
                        tracing::info!(%sandbox, "sandbox destroyed after all");
                        break;
                    }
                    Err(e) => tracing::warn!(%sandbox, error = %e, "cannot destroy sandbox yet"),
                }
            }
        });
        Err(Error::Teardown(session_id.to_string()))
    }

    pub fn client_id(&self) -> &str {
        &self.inner.config.client_id
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// The Prometheus text exposition of this node's session metrics.
    pub fn render_metrics(&self) -> String {
        self.inner
            .metrics
            .render(&self.live_by_environment(), &self.inner.pool.counts())
    }

    fn info(&self, id: &str, live: &Live) -> SessionInfo {
        SessionInfo {
            session_id: id.to_string(),
            client_id: self.inner.config.client_id.clone(),
            environment: live.environment.clone(),
            template: live.template.clone(),
            edit_enabled: live.edit_enabled,
            started_at: from_unix_ms(live.created_at),
            end_at: from_unix_ms(deadline_ms(live.deadline)),
            metadata: live.metadata.clone(),
            memory_bytes: live.limits.memory_bytes,
            disk_bytes: live.limits.disk_bytes,
        }
    }

    /// A built-in environment by name, or a custom environment of the principal's team by ID
    /// (its saved edits if it has any, else its template's root).
    /// `custom` is the team's custom environment called `name`, if there is one.
    async fn environment(
        &self,
        name: &str,
        custom: Option<CustomEnvironment>,
    ) -> Result<Arc<Environment>, Error> {
        let Some(custom) = custom else {
            return self.builtin(name);
        };
        if custom.state != EnvironmentState::Done {
            return Err(Error::Unavailable {
                name: name.to_string(),
                reason: format!(
                    "its state is {}; set it to Done with PUT /envs/{name}/state",
                    custom.state.as_str()
                ),
            });
        }
        self.custom_root(&custom).await
    }

    /// What a custom environment runs: its template, with its saved edits if it has any.
    async fn custom_root(&self, custom: &CustomEnvironment) -> Result<Arc<Environment>, Error> {
        let template = self.builtin(&custom.template)?;
        let saved = self.current_snapshot(custom).await?;
        Ok(match saved {
            Some(snapshot) => Arc::new(template.with_snapshot(snapshot)),
            None => template,
        })
    }

    async fn current_snapshot(
        &self,
        custom: &CustomEnvironment,
    ) -> Result<Option<burrow_environments::Snapshot>, Error> {
        let snapshots = self.inner.catalog.snapshots(custom.team_id);
        let id = custom.id.clone();
        Ok(tokio::task::spawn_blocking(move || snapshots.current(&id))
            .await
            .expect("reading a snapshot does not panic")?)
    }

    /// Saves what an ending edit session changed as its custom environment's new version (an
    /// edit session of a built-in environment saves nothing: built-ins are shared by every
    /// team). The session has left `live`; its sandbox is frozen here and destroyed after.
    ///
    /// The changes are applied to the root the session started from, and only if that is still
    /// what the environment runs: an environment replaced or given another template while the
    /// session ran has dropped its saved edits, and a save must not bring them back.
    async fn save_edits(&self, session_id: &str, session: &Live) -> Result<(), Error> {
        let lost = |reason: String| Error::EditsLost {
            session: session_id.to_string(),
            reason,
        };
        let Some(base) = &session.edit_base else {
            return Ok(());
        };
        let (team_id, environment) = (session.team_id, session.environment.clone());
        let dropped = |what| Error::EditsDropped {
            session: session_id.to_string(),
            environment: session.environment.clone(),
            what,
        };
        let Some(custom) = self
            .store(move |s| s.environment(team_id, &environment))
            .await?
        else {
            return Err(dropped("deleted"));
        };
        let now = self.current_snapshot(&custom).await?.map(|s| s.version);
        if custom.template != session.template || now != base.snapshot {
            return Err(dropped("replaced or given another template"));
        }
        let frozen = self
            .inner
            .backend
            .freeze(&session.sandbox.id)
            .await
            .map_err(|e| lost(e.to_string()))?;
        self.check_edit_quota(session_id, session.team_id, &frozen.upper)
            .await?;
        let snapshots = self.inner.catalog.snapshots(custom.team_id);
        let started = Instant::now();
        let root = base.rootfs.clone();
        let saved = tokio::task::spawn_blocking(move || {
            snapshots.commit(&custom.id, &root, &frozen.upper, frozen.owners)
        })
        .await
        .expect("saving a snapshot does not panic")
        .map_err(|e| lost(e.to_string()))?;
        tracing::info!(session = %session_id, environment = %session.environment, version = %saved.version, took = ?started.elapsed(), "edit session saved");
        Ok(())
    }

    /// Refuses a save that could take the team's saved edits past their quota: what they hold
    /// now plus everything the session wrote (an upper bound of what the save adds).
    async fn check_edit_quota(
        &self,
        session_id: &str,
        team_id: i64,
        upper: &Path,
    ) -> Result<(), Error> {
        let environments = self.store(move |s| s.environments(team_id)).await?;
        let snapshots = self.inner.catalog.snapshots(team_id);
        let upper = upper.to_path_buf();
        let (used, need) = tokio::task::spawn_blocking(move || {
            let mut used = 0;
            for env in &environments {
                if let Some(version) = snapshots.current(&env.id)? {
                    used += usage::unshared_bytes(&version.rootfs())?;
                }
            }
            Ok::<_, burrow_environments::Error>((used, usage::file_bytes(&upper)?))
        })
        .await
        .expect("measuring saved edits does not panic")?;
        let quota = self.inner.config.edit_quota_per_team;
        if used + need > quota {
            return Err(Error::EditQuota {
                session: session_id.to_string(),
                used,
                need,
                quota,
            });
        }
        Ok(())
    }

    /// Ends a session that has left `live`: an edit session saves its changes first, then the
    /// sandbox goes. The caller holds the environment's `saving` lock for an edit session. A
    /// failed save is reported before a failed teardown.
    async fn end(&self, session_id: &str, session: Live) -> Result<(), Error> {
        let saved = if session.edit_base.is_some() {
            let id = session_id.to_string();
            // A restart that finds the session so marked finishes its end, save included.
            self.store(move |s| s.set_session_ending(&id)).await?;
            let saved = self.save_edits(session_id, &session).await;
            match &saved {
                Ok(()) => self.inner.metrics.edit_saves.inc(),
                Err(e) => {
                    self.inner.metrics.edit_save_failures.inc();
                    tracing::error!(session = %session_id, "{e}");
                }
            }
            saved
        } else {
            Ok(())
        };
        let gone = self.forget(session_id, &session.sandbox.id).await;
        saved.and(gone)
    }

    fn builtin(&self, name: &str) -> Result<Arc<Environment>, Error> {
        let Some(env) = self.inner.catalog.get(name) else {
            return Err(Error::UnknownEnvironment {
                name: name.to_string(),
                available: self.available().join(", "),
            });
        };
        if let Err(reason) = &env.availability {
            return Err(Error::Unavailable {
                name: name.to_string(),
                reason: reason.clone(),
            });
        }
        Ok(env)
    }

    /// Names of the built-in environments this node can run.
    pub fn available(&self) -> Vec<String> {
        self.inner
            .catalog
            .list()
            .iter()
            .filter(|e| e.availability.is_ok())
            .map(|e| e.name.clone())
            .collect()
    }

    /// Creates a session, or for `edit_enabled` returns the team's existing edit session of that
    /// environment. Returns once the sandbox's envd answers. Runs to its end even if the caller
    /// stops waiting (the session then expires unrefreshed).
    pub async fn create(
        &self,
        principal: &Principal,
        environment: &str,
        new: NewSession,
    ) -> Result<SessionInfo, Error> {
        let (this, principal, environment) =
            (self.clone(), principal.clone(), environment.to_string());
        detached(async move {
            let started = Instant::now();
            let result = this.create_inner(&principal, &environment, new).await;
            match &result {
                Ok(_) => this.inner.metrics.record_create(started.elapsed()),
                Err(_) => this.inner.metrics.create_failures.inc(),
            }
            result
        })
        .await
    }

    async fn create_inner(
        &self,
        principal: &Principal,
        environment: &str,
        new: NewSession,
    ) -> Result<SessionInfo, Error> {
        let edit_enabled = new.edit_enabled;
        let (team_id, name) = (principal.team_id, environment.to_string());
        let custom = self.store(move |s| s.environment(team_id, &name)).await?;
        // Only a custom environment saves edits. A create of one waits for an edit session of
        // it that is being saved; an edit session keeps the lock until it is live, so that no
        // other one can start from an older root.
        let _saving = match &custom {
            Some(_) => {
                let saving = self.inner.saving.lock(principal.team_id, environment).await;
                edit_enabled.then_some(saving)
            }
            None => None,
        };
        let saves_edits = edit_enabled && custom.is_some();
        let env = self.environment(environment, custom).await?;
        let _edit_guard = if edit_enabled {
            let guard = self.inner.edit_create.lock().await;
            let existing = {
                let live = self.live();
                live.iter()
                    .find(|(_, l)| {
                        l.edit_enabled
                            && l.team_id == principal.team_id
                            && l.environment == environment
                    })
                    .map(|(id, l)| self.info(id, l))
            };
            if let Some(info) = existing {
                // Joining the shared session counts as a refresh of it.
                self.refresh(&info.session_id, Some(principal)).await?;
                return Ok(info);
            }
            Some(guard)
        } else {
            None
        };
        let limits = self.inner.config.limits_for(&env.name);
        let _slot = self.reserve(principal, limits)?;
        self.inner.config.check_memory()?;
        // The pool holds sandboxes of the catalog's environments, not of saved edits.
        let pooled = match env.snapshot {
            None => self.inner.pool.take(&env, &*self.inner.backend).await,
            Some(_) => None,
        };
        let sandbox = match pooled {
            Some(sandbox) => sandbox,
            None => {
                let spec = SandboxSpec {
                    limits,
                    environment: env.clone(),
                    ready_shell: false,
                    egress: env.egress.clone(),
                };
                self.inner
                    .backend
                    .create(&spec)
                    .await
                    .map_err(|e| Error::Sandbox(e.to_string()))?
            }
        };
        self.inner.pool.wake();
        let id = new_session_id();
        let deadline = Instant::now() + new.timeout.unwrap_or(self.inner.config.ttl);
        let created_at = unix_ms(SystemTime::now());
        let edit_base = saves_edits.then(|| EditBase {
            snapshot: env.snapshot.as_ref().map(|s| s.version.clone()),
            rootfs: env.rootfs.clone(),
        });
        let row = SessionRow {
            id: id.clone(),
            team_id: principal.team_id,
            environment: environment.to_string(),
            template: env.name.clone(),
            edit_enabled,
            sandbox_id: sandbox.id.clone(),
            created_at,
            expires_at: deadline_ms(deadline),
            ending: false,
            edit_base: edit_base.clone(),
            timeout_ms: new.timeout.map(|t| t.as_millis() as i64),
            metadata: new.metadata.clone(),
        };
        if let Err(e) = self.store(move |s| s.insert_session(&row)).await {
            let _ = self.inner.backend.destroy(&sandbox.id).await;
            return Err(e);
        }
        let live = Live {
            team_id: principal.team_id,
            environment: environment.to_string(),
            template: env.name.clone(),
            edit_enabled,
            edit_base,
            limits,
            sandbox,
            deadline,
            created_at,
            metadata: new.metadata,
        };
        let info = self.info(&id, &live);
        self.insert_live(id.clone(), live);
        self.inner.metrics.creates.inc();
        tracing::info!(session = %id, environment = %info.environment, team = %principal.team, "session created");
        Ok(info)
    }

    /// Takes a slot for one more session of the principal's team, with `limits`, refusing one
    /// that would take the node or the team past its number of sessions, or past what it may be
    /// promised of the host's memory, processes and disk (`admission`), so that one key cannot take
    /// what the other teams' sessions need. Slots of creates still in flight count, so
    /// concurrent creates cannot overshoot; the slot is given back when the create ends (its
    /// session, if any, is in `live` by then). The warm pool's sandboxes count against the host.
    fn reserve(&self, principal: &Principal, limits: Limits) -> Result<Slot<'_>, Error> {
        let config = &self.inner.config;
        let pooled: Vec<Limits> = self
            .inner
            .pool
            .counts()
            .into_iter()
            .flat_map(|(env, n)| std::iter::repeat_n(config.limits_for(&env), n))
            .collect();
        let live = self.live();
        let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = pending.values().fold(Promised::default(), |a, p| a.plus(p));
        let mut team = pending.get(&principal.team_id).copied().unwrap_or_default();
        for l in live.values() {
            all.add(&l.limits);
            if l.team_id == principal.team_id {
                team.add(&l.limits);
            }
        }
        if all.sessions >= config.max_sessions {
            return Err(Error::TooMany {
                scope: "this server",
                limit: config.max_sessions,
                flag: "max-sessions",
            });
        }
        if team.sessions >= config.max_sessions_per_team {
            return Err(Error::TooMany {
                scope: "your team",
                limit: config.max_sessions_per_team,
                flag: "max-sessions-per-team",
            });
        }
        for l in &pooled {
            all.add(l);
        }
        admission::admit(&limits, &team, &all, &config.host_budget, config.team_share).map_err(
            |e| match e {
                Exceeded::Team(refusal) => Error::TeamShare(refusal),
                Exceeded::Host(refusal) => Error::HostFull(refusal),
            },
        )?;
        pending.entry(principal.team_id).or_default().add(&limits);
        Ok(Slot {
            sessions: self,
            team_id: principal.team_id,
            limits,
        })
    }

    /// Re-arms the session's TTL: it lives at least one TTL from now (a sandbox whose timeout
    /// ends later keeps its end). Without a key the session ID is the capability (the SDK
    /// refreshes keyless); with one, it must be the owner's (or an admin's): another team's
    /// session is not found, as for a delete, so IDs of other teams cannot be probed.
    pub async fn refresh(&self, id: &str, principal: Option<&Principal>) -> Result<(), Error> {
        let deadline = {
            let mut live = self.live();
            let session = live
                .get_mut(id)
                .filter(|l| principal.is_none_or(|p| p.admin || p.team_id == l.team_id))
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            session.deadline = session.deadline.max(Instant::now() + self.inner.config.ttl);
            session.deadline
        };
        self.inner.timers.push(deadline, id.to_string());
        let (id, at) = (id.to_string(), deadline_ms(deadline));
        self.store(move |s| s.set_session_expiry(&id, at)).await?;
        self.inner.metrics.refreshes.inc();
        Ok(())
    }

    /// Gives the session a lifetime of `timeout` from now, shorter or longer than what it had
    /// (E2B's `set_timeout`); recorded as the client's lifetime, so a restart keeps its end.
    /// Another team's session is not found.
    pub async fn set_timeout(
        &self,
        id: &str,
        principal: &Principal,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        {
            let mut live = self.live();
            let session = live
                .get_mut(id)
                .filter(|l| principal.admin || principal.team_id == l.team_id)
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            session.deadline = deadline;
        }
        self.inner.timers.push(deadline, id.to_string());
        let (id, at, ms) = (
            id.to_string(),
            deadline_ms(deadline),
            timeout.as_millis() as i64,
        );
        self.store(move |s| s.set_session_timeout(&id, ms, at))
            .await
    }

    /// One of the caller's team's sessions (any, for an admin); another team's is not found.
    pub fn get(&self, id: &str, principal: &Principal) -> Result<SessionInfo, Error> {
        let live = self.live();
        live.get(id)
            .filter(|l| principal.admin || l.team_id == principal.team_id)
            .map(|l| self.info(id, l))
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// The caller's team's sessions; an admin sees every session.
    pub fn list(&self, principal: &Principal) -> Vec<SessionInfo> {
        let live = self.live();
        let mut out: Vec<SessionInfo> = live
            .iter()
            .filter(|(_, l)| principal.admin || l.team_id == principal.team_id)
            .map(|(id, l)| self.info(id, l))
            .collect();
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        out
    }

    /// Deletes a session and returns once its sandbox is gone (and an edit session's changes
    /// are saved), even if the caller stops waiting. Another team's session is reported as not
    /// found, so IDs of other teams cannot be probed.
    pub async fn delete(&self, id: &str, principal: &Principal) -> Result<(), Error> {
        let (this, id, principal) = (self.clone(), id.to_string(), principal.clone());
        detached(async move {
            let owned = |l: &Live| principal.admin || l.team_id == principal.team_id;
            let Some((session, _saving)) = this.leave_live(&id, owned).await else {
                return Err(Error::NotFound(id));
            };
            let ended = this.end(&id, session).await;
            this.inner.metrics.deletes.inc();
            tracing::info!(session = %id, "session deleted");
            ended
        })
        .await
    }

    /// Where the gateway sends a live session's traffic, and whose it is.
    pub fn route(&self, id: &str) -> Option<SessionRoute> {
        self.live().get(id).map(|l| SessionRoute {
            socket: l.sandbox.socket.clone(),
            team_id: l.team_id,
        })
    }

    /// Live sessions per environment, for the metrics: built-in names only (a custom
    /// environment counts as its template), since `/metrics` needs no key.
    fn live_by_environment(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for l in self.live().values() {
            *counts.entry(l.template.clone()).or_default() += 1;
        }
        let mut out: Vec<_> = counts.into_iter().collect();
        out.sort();
        out
    }

    /// Takes session `id` out of `live` if `applies` to it; an edit session of a custom
    /// environment takes the environment's `saving` lock first, which the caller holds until the
    /// session has ended (and its edits are saved).
    async fn leave_live(
        &self,
        id: &str,
        applies: impl Fn(&Live) -> bool,
    ) -> Option<(Live, Option<save_locks::SaveGuard>)> {
        let edit = match self.live().get(id) {
            Some(l) if applies(l) => l
                .edit_base
                .is_some()
                .then(|| (l.team_id, l.environment.clone())),
            _ => return None,
        };
        let saving = match edit {
            Some((team_id, environment)) => {
                Some(self.inner.saving.lock(team_id, &environment).await)
            }
            None => None,
        };
        let mut live = self.live();
        match live.get(id) {
            Some(l) if applies(l) => live.remove(id).map(|session| (session, saving)),
            _ => None,
        }
    }

    async fn expire_loop(self) {
        let due_now = |l: &Live| l.deadline <= Instant::now();
        loop {
            let due = self.inner.timers.next_due().await;
            // Most entries are stale (a refresh pushed a later one): skip them here.
            if !self.live().get(&due).is_some_and(due_now) {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                if let Some((session, _saving)) = this.leave_live(&due, due_now).await {
                    tracing::info!(session = %due, "session expired");
                    this.inner.metrics.expiries.inc();
                    // A failure is logged and counted by `end`; nobody waits for it here.
                    let _ = this.end(&due, session).await;
                }
            });
        }
    }

    /// Stops handing out sandboxes and destroys the warm pool. Live sessions keep running: the
    /// next start adopts them.
    pub async fn shutdown(&self) {
        self.inner.pool.drain(&*self.inner.backend).await;
    }
}
