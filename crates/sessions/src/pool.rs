//! The warm pool: sandboxes started ahead of demand, per available environment, so that
//! `POST /sessions` only has to hand one out. One background task refills it, one sandbox at a
//! time, so the pool never competes with requests for more than one start at once, and, while
//! it still has sandboxes, only once creates pause: a burst of creates (each taking a sandbox,
//! its client then connecting and starting a first command) gets the CPU, and the pool refills
//! behind it. An empty pool refills at once, so that creates an interval apart (an agent's,
//! say) find a sandbox ready again by the next one. A sandbox
//! is only handed out for the environment version it was started from: after a new image
//! version becomes current, the filler replaces the pooled sandboxes of the old one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_runtime::{Backend, Environment, Sandbox, SandboxSpec};
use tokio::sync::Notify;

use crate::Sessions;

/// How often the filler looks for new environment versions without being woken.
const RECHECK: Duration = Duration::from_secs(5);
/// A refill waits until no sandbox was taken for this long (the clients of a burst of creates
/// connect and start their first commands right after it)...
const QUIET: Duration = Duration::from_millis(250);
/// ...but never longer than this, so that steady traffic still gets a pool.
const MAX_DEFER: Duration = Duration::from_secs(1);

/// A ready sandbox and the environment (version) it was started from.
type Ready = (Sandbox, Arc<Environment>);

pub(crate) struct Pool {
    size: usize,
    ready: Mutex<HashMap<String, Vec<Ready>>>,
    wake: Notify,
    /// Told of every sandbox taken, for a filler waiting for a pause (see `until_quiet`).
    taken: Notify,
    /// When a sandbox was last handed out.
    last_take: Mutex<Option<Instant>>,
    draining: AtomicBool,
    /// The refill task, awaited by [`Pool::drain`] so no start in flight outlives the server.
    filler: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Pool {
    pub(crate) fn new(size: usize) -> Pool {
        Pool {
            size,
            ready: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            taken: Notify::new(),
            last_take: Mutex::new(None),
            draining: AtomicBool::new(false),
            filler: Mutex::new(None),
        }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Ready>>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready sandbox of exactly this `environment` (version) whose envd still runs, if the
    /// pool has one. The pidfd the runtime watches says so at no cost; envd answered its first
    /// ping when the sandbox was started, and a sandbox the runtime did not start is pinged.
    pub(crate) async fn take(
        &self,
        environment: &Arc<Environment>,
        backend: &dyn Backend,
    ) -> Option<Sandbox> {
        *self.last_take.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        loop {
            let (sandbox, made_from) = self.ready().get_mut(&environment.name)?.pop()?;
            self.taken.notify_one();
            if !Arc::ptr_eq(&made_from, environment) {
                tracing::info!(sandbox = %sandbox.id, "pooled sandbox is of an older environment version; discarding it");
            } else if match backend.running(&sandbox.id) {
                Some(running) => running,
                None => backend.probe(&sandbox.id).await,
            } {
                return Some(sandbox);
            } else {
                tracing::warn!(sandbox = %sandbox.id, "pooled sandbox died; discarding it");
            }
            let _ = backend.destroy(&sandbox.id).await;
        }
    }

    /// Waits until creates pause (see [`QUIET`]), at most [`MAX_DEFER`], or until the pool of
    /// `environment` is empty.
    async fn until_quiet(&self, environment: &str) {
        let waiting = Instant::now();
        loop {
            if self.count(environment) == 0 {
                return;
            }
            let last = *self.last_take.lock().unwrap_or_else(|e| e.into_inner());
            let Some(since) = last.map(|at| at.elapsed()) else {
                return;
            };
            if since >= QUIET || waiting.elapsed() >= MAX_DEFER {
                return;
            }
            // Woken early by a take, to see whether it emptied the pool.
            tokio::select! {
                _ = tokio::time::sleep(QUIET - since) => {}
                _ = self.taken.notified() => {}
            }
        }
    }

    /// Removes the pooled sandboxes of `environment` that were started from another version.
    fn stale(&self, environment: &Arc<Environment>) -> Vec<Sandbox> {
        let mut ready = self.ready();
        let Some(list) = ready.get_mut(&environment.name) else {
            return Vec::new();
        };
        let (keep, stale) = std::mem::take(list)
            .into_iter()
            .partition(|(_, made_from)| Arc::ptr_eq(made_from, environment));
        *list = keep;
        stale.into_iter().map(|(sandbox, _)| sandbox).collect()
    }

    /// Asks the filler to top the pool up.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Ready sandboxes per environment.
    pub(crate) fn counts(&self) -> Vec<(String, usize)> {
        let mut out: Vec<_> = self
            .ready()
            .iter()
            .map(|(env, v)| (env.clone(), v.len()))
            .collect();
        out.sort();
        out
    }

    fn count(&self, environment: &str) -> usize {
        self.ready().get(environment).map_or(0, Vec::len)
    }

    /// Stops refilling (waiting for a start in flight) and destroys every pooled sandbox.
    pub(crate) async fn drain(&self, backend: &dyn Backend) {
        self.draining.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let filler = self.filler.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(filler) = filler {
            let _ = filler.await;
        }
        let all: Vec<Ready> = self.ready().drain().flat_map(|(_, v)| v).collect();
        for (sandbox, _) in all {
            let _ = backend.destroy(&sandbox.id).await;
        }
    }
}

pub(crate) fn spawn_filler(sessions: Sessions) {
    if sessions.inner.pool.size == 0 {
        return;
    }
    let filler = sessions.clone();
    let handle = tokio::spawn(async move {
        let inner = &filler.inner;
        loop {
            let environments = inner.catalog.list().into_iter().filter(|e| {
                e.availability.is_ok()
                    && inner
                        .config
                        .pool_environments
                        .as_ref()
                        .is_none_or(|names| names.contains(&e.name))
            });
            for env in environments {
                for sandbox in inner.pool.stale(&env) {
                    tracing::info!(sandbox = %sandbox.id, environment = %env.name, "replacing a pooled sandbox of an older environment version");
                    let _ = inner.backend.destroy(&sandbox.id).await;
                }
                while inner.pool.count(&env.name) < inner.pool.size {
                    if inner.pool.draining.load(Ordering::SeqCst) {
                        return;
                    }
                    inner.pool.until_quiet(&env.name).await;
                    if let Err(e) = inner.config.check_memory() {
                        tracing::warn!("not refilling the pool: {e}");
                        break;
                    }
                    let spec = SandboxSpec {
                        environment: env.clone(),
                        limits: inner.config.limits_for(&env.name),
                        ready_shell: true,
                        egress: env.egress.clone(),
                    };
                    match inner.backend.create(&spec).await {
                        Ok(sandbox) if !inner.pool.draining.load(Ordering::SeqCst) => inner
                            .pool
                            .ready()
                            .entry(env.name.clone())
                            .or_default()
                            .push((sandbox, env.clone())),
                        Ok(sandbox) => {
                            let _ = inner.backend.destroy(&sandbox.id).await;
                            return;
                        }
                        Err(e) => {
                            tracing::error!(environment = %env.name, error = %e, "cannot start a sandbox for the pool; retrying in 5 s");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                                _ = inner.pool.wake.notified() => {}
                            }
                        }
                    }
                }
            }
            if inner.pool.draining.load(Ordering::SeqCst) {
                return;
            }
            tokio::select! {
                _ = inner.pool.wake.notified() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    });
    *sessions
        .inner
        .pool
        .filler
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(handle);
}
