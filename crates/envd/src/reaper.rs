//! Child reaping. envd is PID 1 of its sandbox, so every orphan of the sandbox becomes its child
//! and must be waited for, or zombies pile up. One reaper reacts to SIGCHLD and hands each exit
//! status to the process or terminal that registered the pid.
//!
//! tokio::process is not used: its own reaping would race with a `waitpid(-1)` loop.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;

use crate::lock;

/// Exit code reported for a child killed by a signal (Go's `ExitCode()` convention).
pub(crate) const KILLED_BY_SIGNAL: i32 = -1;

/// A sweep runs this often even without SIGCHLD, in case a signal was coalesced away while no
/// stream was listening (several runtimes in one test process share the signal).
const FALLBACK_SWEEP: Duration = Duration::from_secs(2);

/// How a child ended, for callers that report more than the exit code (the Connect `process`
/// service words it like Go's `ProcessState.String()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal {
        signal: i32,
        core_dumped: bool,
    },
    /// Someone else reaped the child; its status is lost.
    Lost,
}

impl Exit {
    /// The exit code, [`KILLED_BY_SIGNAL`] when there is none.
    pub(crate) fn code(self) -> i32 {
        match self {
            Self::Code(code) => code,
            Self::Signal { .. } | Self::Lost => KILLED_BY_SIGNAL,
        }
    }
}

/// Hands an exit status to whoever waits for it.
type Waiter = Box<dyn FnOnce(Exit) + Send>;

/// Pids spawned through [`spawn`] whose exit status someone waits for. Process-wide, because
/// `waitpid` is.
static WAITING: LazyLock<Mutex<HashMap<Pid, Waiter>>> = LazyLock::new(Default::default);

/// Spawns `command` and registers its pid before the reaper can see it exit: the registry lock is
/// held across the fork.
pub(crate) fn spawn(command: &mut Command) -> io::Result<(Child, oneshot::Receiver<i32>)> {
    let (exited, exit_code) = oneshot::channel();
    let child = spawn_waiting(
        command,
        Box::new(move |exit: Exit| {
            let _ = exited.send(exit.code());
        }),
    )?;
    Ok((child, exit_code))
}

/// [`spawn`], reporting how the child ended rather than only its exit code.
pub(crate) fn spawn_with_status(
    command: &mut Command,
) -> io::Result<(Child, oneshot::Receiver<Exit>)> {
    let (exited, status) = oneshot::channel();
    let child = spawn_waiting(
        command,
        Box::new(move |exit| {
            let _ = exited.send(exit);
        }),
    )?;
    Ok((child, status))
}

fn spawn_waiting(command: &mut Command, waiter: Waiter) -> io::Result<Child> {
    let mut waiting = lock(&WAITING);
    let child = command.spawn()?;
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    waiting.insert(Pid::from_raw(pid), waiter);
    Ok(child)
}

/// Registers the SIGCHLD listener; fails only if signals cannot be set up at all.
pub(crate) fn listen() -> io::Result<Signal> {
    signal(SignalKind::child())
}

/// Reaps children for as long as the runtime lives.
pub(crate) async fn run(mut sigchld: Signal) {
    loop {
        reap();
        tokio::select! {
            _ = sigchld.recv() => {}
            () = tokio::time::sleep(FALLBACK_SWEEP) => {}
        }
    }
}

/// Collects every exited child without blocking.
fn reap() {
    let mut waiting = lock(&WAITING);
    if std::process::id() == 1 {
        // As PID 1 every orphan of the sandbox is ours to wait for, registered or not.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => deliver(&mut waiting, status),
            }
        }
    } else {
        // Elsewhere (tests, a developer's shell) only our own children are touched, so that
        // statuses other code in this process waits for are left alone.
        let pids: Vec<Pid> = waiting.keys().copied().collect();
        for pid in pids {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(status) => deliver(&mut waiting, status),
                Err(Errno::ECHILD) => {
                    // Someone else reaped it; the status is lost, but the waiter must not hang.
                    if let Some(exited) = waiting.remove(&pid) {
                        exited(Exit::Lost);
                    }
                }
                Err(_) => {}
            }
        }
    }
}

fn deliver(waiting: &mut HashMap<Pid, Waiter>, status: WaitStatus) {
    let (pid, exit) = match status {
        WaitStatus::Exited(pid, code) => (pid, Exit::Code(code)),
        WaitStatus::Signaled(pid, signal, core_dumped) => (
            pid,
            Exit::Signal {
                signal: signal as i32,
                core_dumped,
            },
        ),
        // Stops and continues are only reported with flags we never pass.
        _ => return,
    };
    if let Some(exited) = waiting.remove(&pid) {
        exited(exit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_exit_codes_and_signals() {
        tokio::spawn(run(listen().unwrap()));
        let (_, exited) = spawn(Command::new("/bin/sh").args(["-c", "exit 7"])).unwrap();
        assert_eq!(exited.await.unwrap(), 7);
        let (_, exited) = spawn(Command::new("/bin/sh").args(["-c", "kill -9 $$"])).unwrap();
        assert_eq!(exited.await.unwrap(), KILLED_BY_SIGNAL);
        let (_, status) =
            spawn_with_status(Command::new("/bin/sh").args(["-c", "kill -TERM $$"])).unwrap();
        assert_eq!(
            status.await.unwrap(),
            Exit::Signal {
                signal: libc::SIGTERM,
                core_dumped: false
            }
        );
    }
}
