//! The warm pool: sandboxes started ahead of demand, per available environment, so that
//! `POST /sessions` only has to hand one out. One background task refills it, one sandbox at a
//! time, so the pool never competes with requests for more than one start at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use burrow_runtime::{Backend, Sandbox, SandboxSpec};
use tokio::sync::Notify;

use crate::Sessions;

pub(crate) struct Pool {
    size: usize,
    ready: Mutex<HashMap<String, Vec<Sandbox>>>,
    wake: Notify,
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
            draining: AtomicBool::new(false),
            filler: Mutex::new(None),
        }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Sandbox>>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready sandbox of `environment` whose envd still answers, if the pool has one.
    pub(crate) async fn take(&self, environment: &str, backend: &dyn Backend) -> Option<Sandbox> {
        loop {
            let sandbox = self.ready().get_mut(environment)?.pop()?;
            if backend.probe(&sandbox.id).await {
                return Some(sandbox);
            }
            tracing::warn!(sandbox = %sandbox.id, "pooled sandbox died; discarding it");
            let _ = backend.destroy(&sandbox.id).await;
        }
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
        let all: Vec<Sandbox> = self.ready().drain().flat_map(|(_, v)| v).collect();
        for sandbox in all {
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
        let environments: Vec<_> = inner
            .catalog
            .list()
            .iter()
            .filter(|e| e.availability.is_ok())
            .filter(|e| {
                inner
                    .config
                    .pool_environments
                    .as_ref()
                    .is_none_or(|names| names.contains(&e.name))
            })
            .cloned()
            .collect();
        loop {
            for env in &environments {
                while inner.pool.count(&env.name) < inner.pool.size {
                    if inner.pool.draining.load(Ordering::SeqCst) {
                        return;
                    }
                    let spec = SandboxSpec {
                        environment: env.clone(),
                        limits: inner.config.limits_for(&env.name),
                    };
                    match inner.backend.create(&spec).await {
                        Ok(sandbox) if !inner.pool.draining.load(Ordering::SeqCst) => inner
                            .pool
                            .ready()
                            .entry(env.name.clone())
                            .or_default()
                            .push(sandbox),
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
            inner.pool.wake.notified().await;
        }
    });
    *sessions
        .inner
        .pool
        .filler
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(handle);
}
