//! What the AFL++ targets in `src/bin/` share: where they keep state, and the one check every
//! HTTP answer of the API must pass.
//!
//! Each target runs in AFL++'s persistent mode: one process handles many inputs, so state that
//! is expensive to build (a runtime, a router, a store) is built on the first input and kept.
//! A target process is a child of AFL's fork server; it is started again after a crash or a
//! hang, and then builds its state anew.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Prefix of every directory a target makes under `/tmp`; `run.sh` removes them afterwards
/// (a target killed on a hang or a crash cannot).
pub const SCRATCH_PREFIX: &str = "burrow-fuzz-";

/// The current-thread runtime envd itself runs on: the targets see its scheduling.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A fresh, empty directory `/tmp/burrow-fuzz-<name>-<pid>`, removed when dropped.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let path =
            std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{name}-{}", std::process::id()));
        // A previous process with the same pid may have left it.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("a scratch directory");
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The home directory of the envd targets, inside their jail.
pub const JAIL_HOME: &str = "/home/user";

/// What an envd target keeps between inputs: envd's router, on envd's kind of runtime, in a
/// [`Jail`] named `name`.
pub struct JailedEnvd {
    pub runtime: tokio::runtime::Runtime,
    pub router: axum::Router,
    pub jail: Jail,
}

impl JailedEnvd {
    pub fn start(name: &str) -> JailedEnvd {
        let jail = Jail::enter(name).expect("the envd targets chroot themselves: run as root");
        // The jail has no programs, and the targets start none (no ready shell either).
        let config = burrow_envd::Config {
            uid: 1000,
            gid: 1000,
            user: "user".to_owned(),
            home: JAIL_HOME.into(),
            workdir: JAIL_HOME.into(),
            ready_shell: false,
            shell: "/bin/sh".into(),
            env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
        };
        let runtime = runtime();
        // The router spawns nothing until it serves, but its parts expect a runtime around.
        let router = runtime.block_on(async { burrow_envd::fuzzing::router(config) });
        JailedEnvd {
            runtime,
            router,
            jail,
        }
    }
}

/// A process confined with `chroot` to a fresh scratch directory: see [`Jail::enter`].
pub struct Jail(());

impl Jail {
    /// Confines this process to a fresh scratch directory (so it must run as root) holding only
    /// an empty [`JAIL_HOME`].
    ///
    /// envd resolves client paths against its home, and an absolute path goes anywhere: it runs
    /// as a sandbox's root inside the sandbox, but here it would run as the host's. In the jail,
    /// any path a mutated input names (`/etc/passwd`, `/dev/zero`, `../../x`) lands in an empty
    /// directory of our own, so uploads and file RPCs can be fuzzed with every path there is.
    /// The directory stays behind when the process ends (it cannot see it any more): it is
    /// named after the parent (AFL's fork server), so the processes of one fuzzing run reuse
    /// one, and `run.sh` removes it.
    pub fn enter(name: &str) -> io::Result<Jail> {
        let dir = std::env::temp_dir().join(format!(
            "{SCRATCH_PREFIX}{name}-jail-{}",
            std::os::unix::process::parent_id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chroot(&dir)?;
        std::env::set_current_dir("/")?;
        let jail = Jail(());
        jail.reset()?;
        Ok(jail)
    }

    /// Empties the jail and makes the home directory again, so each input starts from the same
    /// filesystem. A method of the jail, because outside one it would empty the host's `/`.
    pub fn reset(&self) -> io::Result<()> {
        for entry in std::fs::read_dir("/")? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        std::fs::create_dir_all(JAIL_HOME)
    }
}

/// Every file under `dir` (not following links), for checks on what a request left behind.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                _ => found.push(path),
            }
        }
    }
    found
}

/// Checks the API's one error shape, `{"code": <status>, "message": "<text>"}` and nothing
/// else, and says what is wrong if it is not that.
pub fn check_error_shape(status: u16, body: &[u8]) -> Result<(), String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("a {status} answer that is not JSON ({e}): {body:?}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| format!("a {status} answer that is not an object: {value}"))?;
    let message_ok = object
        .get("message")
        .and_then(Value::as_str)
        .is_some_and(|m| !m.is_empty());
    if object.len() != 2 || object.get("code") != Some(&Value::from(status)) || !message_ok {
        return Err(format!("a {status} answer not in the error shape: {value}"));
    }
    Ok(())
}
