//! What processes and terminals share: how a child is started (user, session, environment,
//! working directory), how input is fed to it in order, and how its output is read until the end.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Config;

/// After a child has exited, its output is still read until the pipe stays silent this long. A
/// background job that inherited the pipe would otherwise hold the exit notification back for
/// as long as it runs.
const QUIET_AFTER_EXIT: Duration = Duration::from_secs(1);

/// The environment of every child: the configured base, the user's identity, then the request's
/// own variables (later entries win).
pub(crate) fn environment(
    config: &Config,
    extra: &[(&str, &str)],
    request: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = config.env.clone();
    env.push(("HOME".into(), config.home.display().to_string()));
    env.push(("USER".into(), config.user.clone()));
    env.push(("LOGNAME".into(), config.user.clone()));
    env.push(("SHELL".into(), config.shell.display().to_string()));
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Resolves a request path: absolute as given, relative against the user's home.
pub(crate) fn resolve(config: &Config, path: &str) -> PathBuf {
    config.home.join(path)
}

/// The working directory for a child: `""` means the environment's working directory, relative
/// paths start at home. Checked here because a failing `chdir` in the child only comes back as
/// a bare errno.
pub(crate) fn working_dir(config: &Config, cwd: &str) -> Result<PathBuf, String> {
    let dir = if cwd.is_empty() {
        config.workdir.clone()
    } else {
        resolve(config, cwd)
    };
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(dir),
        Ok(_) => Err(format!("chdir {}: not a directory", dir.display())),
        Err(error) => Err(format!(
            "chdir {}: {}",
            dir.display(),
            os_error_text(&error)
        )),
    }
}

/// An OS error in Go's wording ("no such file or directory"), which the SDK users' code may
/// match on; other errors keep Rust's text.
pub(crate) fn os_error_text(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => {
            let text = nix::errno::Errno::from_raw(code).desc();
            let mut chars = text.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_lowercase().chain(chars).collect()
            })
        }
        None => error.to_string(),
    }
}

/// Makes the child the leader of a new session (so its pid is its process group and a kill can
/// take the whole group), optionally with `stdin` as controlling terminal, running as the
/// sandbox user in `cwd` without the ability to gain privileges, and first in line for the OOM
/// killer: when the sandbox runs out of memory the kernel must take the user's process, never
/// envd, whose death would end the session. Lowering envd's own score would take
/// CAP_SYS_RESOURCE, which hosts may not grant even to root (this one's bounding set lacks it),
/// so every child raises its own to the maximum instead, which any process may do; code that
/// lowers its score back (to no less than envd's 0) can only put its own session at risk.
pub(crate) fn confine(
    command: &mut Command,
    config: &Config,
    cwd: &Path,
    controlling_tty: bool,
) -> io::Result<()> {
    let cwd = CString::new(cwd.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let (uid, gid) = (config.uid, config.gid);
    // Only root can (and, in a sandbox, must) shed envd's supplementary groups; an unprivileged
    // envd started by a developer runs children with its own.
    let privileged = nix::unistd::geteuid().is_root();
    let pre_exec = move || -> io::Result<()> {
        // SAFETY: only async-signal-safe libc calls on values prepared before the fork; nothing
        // here allocates or takes a lock.
        unsafe {
            let adj = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            check(adj)?;
            let written = libc::write(adj, b"1000".as_ptr().cast(), 4);
            libc::close(adj);
            check(written as libc::c_int)?;
            check(libc::setsid())?;
            if controlling_tty {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if privileged {
                let groups = [gid];
                check(libc::setgroups(1, groups.as_ptr()))?;
            }
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            // After dropping privileges, so that the user must be able to enter the directory.
            check(libc::chdir(cwd.as_ptr()))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe {
        command.pre_exec(pre_exec);
    }
    Ok(())
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

type InputRequest = (Vec<u8>, oneshot::Sender<io::Result<()>>);

/// Feeds a child's stdin (or a terminal) in the order the requests arrived, without making the
/// websocket reader wait for a child that does not read.
pub(crate) struct Input {
    requests: mpsc::UnboundedSender<InputRequest>,
}

impl Input {
    /// Starts the writer task; it ends (closing `sink`) when the `Input` is dropped.
    pub(crate) fn spawn<W>(mut sink: W) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (requests, mut queue) = mpsc::unbounded_channel::<InputRequest>();
        tokio::spawn(async move {
            while let Some((data, done)) = queue.recv().await {
                let written = async {
                    sink.write_all(&data).await?;
                    sink.flush().await
                }
                .await;
                let _ = done.send(written);
            }
        });
        Self { requests }
    }

    /// Queues `data`; the receiver reports the write's outcome.
    pub(crate) fn write(&self, data: Vec<u8>) -> oneshot::Receiver<io::Result<()>> {
        let (done, outcome) = oneshot::channel();
        // If the writer task is gone, `done` is dropped and the receiver reports it.
        let _ = self.requests.send((data, done));
        outcome
    }
}

/// Reads a child's output; after the child has exited (`exited` turns true) a read that stays
/// silent for [`QUIET_AFTER_EXIT`] counts as the end.
pub(crate) async fn read_output<R>(
    source: &mut R,
    buffer: &mut [u8],
    exited: &mut watch::Receiver<bool>,
) -> io::Result<usize>
where
    R: AsyncRead + Unpin,
{
    loop {
        if *exited.borrow() {
            return tokio::time::timeout(QUIET_AFTER_EXIT, source.read(buffer))
                .await
                .unwrap_or(Ok(0));
        }
        tokio::select! {
            read = source.read(buffer) => return read,
            changed = exited.changed() => {
                if changed.is_err() {
                    // Nobody will report the exit any more; read without the idle limit.
                    return source.read(buffer).await;
                }
            }
        }
    }
}

/// Output timestamps in Unix nanoseconds, strictly increasing per child: the SDK orders a
/// process's stdout and stderr lines by them.
#[derive(Default)]
pub(crate) struct Clock {
    last: AtomicU64,
}

impl Clock {
    pub(crate) fn next(&self) -> u64 {
        let now = now_ns();
        let previous = self
            .last
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or_else(|last| last);
        now.max(previous + 1)
    }
}

/// Unix nanoseconds now.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_strictly_increasing() {
        let clock = Clock::default();
        let mut last = 0;
        for _ in 0..10_000 {
            let now = clock.next();
            assert!(now > last);
            last = now;
        }
    }

    #[test]
    fn errors_read_like_go() {
        let error = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_error_text(&error), "no such file or directory");
    }

    #[test]
    fn relative_paths_resolve_against_home() {
        let config = Config {
            uid: 0,
            gid: 0,
            user: "user".into(),
            home: "/home/user".into(),
            workdir: "/home/user".into(),
            ready_shell: false,
            shell: "/bin/bash".into(),
            env: vec![("PATH".into(), "/bin".into())],
        };
        assert_eq!(resolve(&config, "a/b"), Path::new("/home/user/a/b"));
        assert_eq!(resolve(&config, "/etc"), Path::new("/etc"));
        assert_eq!(resolve(&config, ""), Path::new("/home/user"));
        let env = environment(
            &config,
            &[("TERM", "xterm")],
            &BTreeMap::from([("HOME".into(), "/x".into())]),
        );
        let last_home = env.iter().rev().find(|(k, _)| k == "HOME").unwrap();
        assert_eq!(last_home.1, "/x", "request variables win");
        assert!(env.iter().any(|(k, v)| k == "TERM" && v == "xterm"));
    }
}
