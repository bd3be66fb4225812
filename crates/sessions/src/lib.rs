//! Session lifecycle: create (from the warm pool or fresh), refresh, delete, expiry on a timer
//! queue, edit sessions and restart recovery. The one owner of session state.
//!
//! Every live session is in `live` (memory, the source of truth for routing) and in the store
//! (so a restart can adopt its sandbox). A session leaves `live` before its sandbox is destroyed,
//! so nothing routes to a sandbox that is going away.

mod custom;
mod metrics;
mod pool;
mod timers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use burrow_environments::{Catalog, Environment};
use burrow_runtime::{Backend, Limits, Sandbox, SandboxSpec};
use burrow_store::{CustomEnvironment, EnvironmentState, Principal, SessionRow, Store};

pub use custom::EnvironmentUpdate;
pub use metrics::Metrics;
use pool::Pool;
use timers::Timers;

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
    #[error("this API key does not own session '{0}'")]
    NotOwner(String),
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
}

/// A session as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: String,
    pub client_id: String,
    pub environment: String,
    pub edit_enabled: bool,
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
    edit_enabled: bool,
    sandbox: Sandbox,
    deadline: Instant,
}

/// See [`Inner::saving`].
type SaveLock = Arc<tokio::sync::Mutex<()>>;

struct Inner {
    config: Config,
    store: Arc<Store>,
    backend: Arc<dyn Backend>,
    catalog: Arc<Catalog>,
    live: Mutex<HashMap<String, Live>>,
    /// Creates in flight per team (see [`Sessions::reserve`]); locked after `live`.
    pending: Mutex<HashMap<i64, usize>>,
    /// Serialises edit-session creation so one (team, environment) never gets two.
    edit_create: tokio::sync::Mutex<()>,
    /// Per (team, custom environment): held while an edit session of it ends and its changes are
    /// saved, and waited for by every create of it, so a session created after an edit session
    /// ended starts from what it saved and two edit sessions never overlap.
    saving: Mutex<HashMap<(i64, String), SaveLock>>,
    timers: Timers,
    pool: Pool,
    metrics: Metrics,
}

/// A create's claim on one session of its team's (and the node's) capacity.
struct Slot<'a> {
    sessions: &'a Sessions,
    team_id: i64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .sessions
            .inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pending.get_mut(&self.team_id) {
            *n -= 1;
            if *n == 0 {
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

impl Sessions {
    /// Adopts what a previous run left (live sessions whose sandbox still answers), destroys the
    /// rest, and starts the expiry timer and the pool.
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
                saving: Mutex::new(HashMap::new()),
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

    async fn recover(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let rows = inner.store.sessions()?;
        let present: Vec<String> = inner.backend.list().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list sandboxes left by a previous run");
            Vec::new()
        });
        let now_ms = unix_ms(SystemTime::now());
        let mut adopted = Vec::new();
        for row in rows {
            let alive =
                present.contains(&row.sandbox_id) && inner.backend.probe(&row.sandbox_id).await;
            let uid_base = inner.backend.uid_base(&row.sandbox_id);
            let (true, Ok(uid_base)) = (alive, uid_base) else {
                tracing::info!(session = %row.id, sandbox = %row.sandbox_id, "session lost its sandbox while the server was down; removing it");
                inner.store.delete_session(&row.id)?;
                continue;
            };
            // Clients could not refresh while the server was down: give them one TTL to come back.
            let remaining_ms = (row.expires_at - now_ms).max(inner.config.ttl.as_millis() as i64);
            let deadline = Instant::now() + Duration::from_millis(remaining_ms as u64);
            let sandbox = Sandbox {
                socket: inner.backend.socket_path(&row.sandbox_id),
                id: row.sandbox_id.clone(),
                uid_base,
            };
            tracing::info!(session = %row.id, sandbox = %row.sandbox_id, "adopted session");
            self.insert_live(
                row.id.clone(),
                Live {
                    team_id: row.team_id,
                    environment: row.environment,
                    edit_enabled: row.edit_enabled,
                    sandbox,
                    deadline,
                },
            );
            adopted.push(row.sandbox_id);
        }
        for id in present.iter().filter(|id| !adopted.contains(id)) {
            tracing::info!(sandbox = %id, "destroying a sandbox no session owns");
            if let Err(e) = inner.backend.destroy(id).await {
                tracing::warn!(sandbox = %id, error = %e, "cannot destroy leftover sandbox");
            }
        }
        Ok(())
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
            self.forget(&session_id, &sandbox_id).await;
        }
    }

    /// Deletes a session's row and its sandbox, after it has left `live`.
    async fn forget(&self, session_id: &str, sandbox_id: &str) {
        if let Err(e) = self.inner.store.delete_session(session_id) {
            tracing::error!(session = %session_id, error = %e, "cannot delete session from the store");
        }
        if let Err(e) = self.inner.backend.destroy(sandbox_id).await {
            tracing::error!(session = %session_id, sandbox = %sandbox_id, error = %e, "cannot destroy sandbox");
        }
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
            edit_enabled: live.edit_enabled,
        }
    }

    /// A built-in environment by name, or a custom environment of the principal's team by ID
    /// (its saved edits if it has any, else its template's root); other teams' custom IDs are
    /// simply unknown.
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
        let snapshots = self.inner.catalog.snapshots(custom.team_id);
        let id = custom.id.clone();
        let saved = tokio::task::spawn_blocking(move || snapshots.current(&id))
            .await
            .expect("reading a snapshot does not panic")?;
        Ok(match saved {
            Some(snapshot) => Arc::new(template.with_snapshot(snapshot)),
            None => template,
        })
    }

    /// The lock of a (team, environment) that an ending edit session holds while it saves.
    fn saving(&self, team_id: i64, environment: &str) -> SaveLock {
        self.inner
            .saving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((team_id, environment.to_string()))
            .or_default()
            .clone()
    }

    /// Saves what an ending edit session changed as its custom environment's new version (an
    /// edit session of a built-in environment saves nothing: built-ins are shared by every
    /// team). The session has left `live`; its sandbox is frozen here and destroyed after.
    async fn save_edits(&self, session_id: &str, session: &Live) -> Result<(), Error> {
        let lost = |reason: String| Error::EditsLost {
            session: session_id.to_string(),
            reason,
        };
        let Some(custom) = self
            .inner
            .store
            .environment(session.team_id, &session.environment)?
        else {
            return Ok(());
        };
        let frozen = self
            .inner
            .backend
            .freeze(&session.sandbox.id)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let base = self.custom_root(&custom).await?;
        let snapshots = self.inner.catalog.snapshots(custom.team_id);
        let started = Instant::now();
        let saved = tokio::task::spawn_blocking(move || {
            snapshots.commit(&custom.id, &base.rootfs, &frozen.upper, frozen.owners)
        })
        .await
        .expect("saving a snapshot does not panic")
        .map_err(|e| lost(e.to_string()))?;
        tracing::info!(session = %session_id, environment = %session.environment, version = %saved.version, took = ?started.elapsed(), "edit session saved");
        Ok(())
    }

    /// Ends a session that has left `live`: an edit session saves its changes first, then the
    /// sandbox goes. The caller holds the environment's `saving` lock for an edit session.
    async fn end(&self, session_id: &str, session: Live) -> Result<(), Error> {
        let saved = if session.edit_enabled {
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
        self.forget(session_id, &session.sandbox.id).await;
        saved
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
    /// environment. Returns once the sandbox's envd answers.
    pub async fn create(
        &self,
        principal: &Principal,
        environment: &str,
        edit_enabled: bool,
    ) -> Result<SessionInfo, Error> {
        let started = Instant::now();
        let result = self
            .create_inner(principal, environment, edit_enabled)
            .await;
        match &result {
            Ok(_) => self.inner.metrics.record_create(started.elapsed()),
            Err(_) => self.inner.metrics.create_failures.inc(),
        }
        result
    }

    async fn create_inner(
        &self,
        principal: &Principal,
        environment: &str,
        edit_enabled: bool,
    ) -> Result<SessionInfo, Error> {
        let custom = self
            .inner
            .store
            .environment(principal.team_id, environment)?;
        // Only a custom environment saves edits. A create of one waits for an edit session of
        // it that is being saved; an edit session keeps the lock until it is live, so that no
        // other one can start from an older root.
        let _saving = match &custom {
            Some(_) => {
                let saving = self
                    .saving(principal.team_id, environment)
                    .lock_owned()
                    .await;
                edit_enabled.then_some(saving)
            }
            None => None,
        };
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
                self.refresh(&info.session_id, Some(principal))?;
                return Ok(info);
            }
            Some(guard)
        } else {
            None
        };
        let _slot = self.reserve(principal)?;
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
                    limits: self.inner.config.limits_for(&env.name),
                    environment: env.clone(),
                    ready_shell: false,
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
        let deadline = Instant::now() + self.inner.config.ttl;
        let row = SessionRow {
            id: id.clone(),
            team_id: principal.team_id,
            environment: environment.to_string(),
            edit_enabled,
            sandbox_id: sandbox.id.clone(),
            created_at: unix_ms(SystemTime::now()),
            expires_at: deadline_ms(deadline),
        };
        if let Err(e) = self.inner.store.insert_session(&row) {
            let _ = self.inner.backend.destroy(&sandbox.id).await;
            return Err(e.into());
        }
        let live = Live {
            team_id: principal.team_id,
            environment: environment.to_string(),
            edit_enabled,
            sandbox,
            deadline,
        };
        let info = self.info(&id, &live);
        self.insert_live(id.clone(), live);
        self.inner.metrics.creates.inc();
        tracing::info!(session = %id, environment = %info.environment, team = %principal.team, "session created");
        Ok(info)
    }

    /// Takes a slot for one more session of the principal's team, refusing one that would take
    /// the node or the team past its limit, so one key cannot take every process and byte of
    /// memory the node has. Slots of creates still in flight count, so concurrent creates
    /// cannot overshoot; the slot is given back when the create ends (its session, if any, is
    /// in `live` by then).
    fn reserve(&self, principal: &Principal) -> Result<Slot<'_>, Error> {
        let config = &self.inner.config;
        let live = self.live();
        let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let all = live.len() + pending.values().sum::<usize>();
        if all >= config.max_sessions {
            return Err(Error::TooMany {
                scope: "this server",
                limit: config.max_sessions,
                flag: "max-sessions",
            });
        }
        let team = live
            .values()
            .filter(|l| l.team_id == principal.team_id)
            .count()
            + pending.get(&principal.team_id).copied().unwrap_or(0);
        if team >= config.max_sessions_per_team {
            return Err(Error::TooMany {
                scope: "your team",
                limit: config.max_sessions_per_team,
                flag: "max-sessions-per-team",
            });
        }
        *pending.entry(principal.team_id).or_default() += 1;
        Ok(Slot {
            sessions: self,
            team_id: principal.team_id,
        })
    }

    /// Re-arms the session's TTL. Without a key the session ID is the capability (the SDK
    /// refreshes keyless); with one, it must be the owner's (or an admin's).
    pub fn refresh(&self, id: &str, principal: Option<&Principal>) -> Result<(), Error> {
        let deadline = Instant::now() + self.inner.config.ttl;
        {
            let mut live = self.live();
            let Some(session) = live.get_mut(id) else {
                return Err(Error::NotFound(id.to_string()));
            };
            if let Some(p) = principal
                && !p.admin
                && p.team_id != session.team_id
            {
                return Err(Error::NotOwner(id.to_string()));
            }
            session.deadline = deadline;
        }
        self.inner.timers.push(deadline, id.to_string());
        self.inner
            .store
            .set_session_expiry(id, deadline_ms(deadline))?;
        self.inner.metrics.refreshes.inc();
        Ok(())
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

    /// Deletes a session and returns once its sandbox is gone. Another team's session is
    /// reported as not found, so IDs of other teams cannot be probed.
    pub async fn delete(&self, id: &str, principal: &Principal) -> Result<(), Error> {
        let owned = |l: &Live| principal.admin || l.team_id == principal.team_id;
        let Some((session, _saving)) = self.leave_live(id, owned).await else {
            return Err(Error::NotFound(id.to_string()));
        };
        let ended = self.end(id, session).await;
        self.inner.metrics.deletes.inc();
        tracing::info!(session = %id, "session deleted");
        ended
    }

    /// Where the gateway sends a live session's traffic, and whose it is.
    pub fn route(&self, id: &str) -> Option<SessionRoute> {
        self.live().get(id).map(|l| SessionRoute {
            socket: l.sandbox.socket.clone(),
            team_id: l.team_id,
        })
    }

    /// Live sessions per environment, for the metrics.
    fn live_by_environment(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for l in self.live().values() {
            *counts.entry(l.environment.clone()).or_default() += 1;
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
    ) -> Option<(Live, Option<tokio::sync::OwnedMutexGuard<()>>)> {
        let edit = match self.live().get(id) {
            Some(l) if applies(l) => l.edit_enabled.then(|| (l.team_id, l.environment.clone())),
            _ => return None,
        };
        let saves = |(team_id, environment): &(i64, String)| {
            // A store error here shows again, and is reported, when the edits are saved.
            matches!(
                self.inner.store.environment(*team_id, environment),
                Ok(Some(_))
            )
        };
        let saving = match edit.filter(saves) {
            Some((team_id, environment)) => {
                Some(self.saving(team_id, &environment).lock_owned().await)
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
                    // A failed save is logged and counted by `end`; nobody waits for it here.
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
