//! The sandbox's first command, started ahead of time. A fresh sandbox's first `process_start`
//! is what a client waits for before anything else happens (time to interactive), and most of
//! its cost is the login shell starting: exec, dynamic linking, the profile scripts. So envd
//! starts that shell once it has answered its first `/ping` (the server's sign that the sandbox
//! is up, so the start does not delay it), as `$SHELL -l -c BOOTSTRAP` with the environment, user,
//! session and working directory a first command without variables or directory would get; the
//! shell runs its profile and then waits to read the command from fd 3. The first such command
//! is handed to it; it runs exactly as under `$SHELL -l -c CMD`, minus the wait.
//!
//! The shell has read the profile when the sandbox started, so it is only used while nothing
//! could have changed what the profile reads: any filesystem change, upload, terminal or other
//! process first discards it (see [`FirstShell::discard`]). A command with variables or a
//! directory of its own, or with a shell other than bash (the bootstrap is bash), starts as
//! usual.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::{Config, child, lock, reaper};

/// Reads the command up to a NUL from fd 3, closes fd 3, and runs the command in this shell.
/// `eval` gets the variable's value before the `unset` runs, so the command never sees it.
const BOOTSTRAP: &str = "IFS= read -r -d '' BURROW_COMMAND <&3 || exit 127; exec 3<&-; eval \"unset BURROW_COMMAND; $BURROW_COMMAND\"";

/// Longest command handed over: it must fit the pipe's buffer, so the write never blocks.
const MAX_COMMAND: usize = 16 << 10;

/// The descriptor the waiting shell reads its command from.
const COMMAND_FD: i32 = 3;

#[derive(Default)]
pub(crate) struct FirstShell {
    slot: Mutex<Slot>,
}

#[derive(Default)]
enum Slot {
    /// Not started yet.
    #[default]
    Waiting,
    Ready(Ready),
    /// Used, discarded, or failed to start: the first command starts as every other does.
    Gone,
}

struct Ready {
    child: Child,
    exit: oneshot::Receiver<i32>,
    command: std::fs::File,
}

impl FirstShell {
    /// Starts the waiting shell, unless it was started, or something already happened that it
    /// would miss; on failure there is simply none.
    pub(crate) fn start(&self, config: &Config) {
        let mut slot = lock(&self.slot);
        if !matches!(*slot, Slot::Waiting) {
            return;
        }
        *slot = match config.shell.file_name().is_some_and(|name| name == "bash") {
            true => match spawn(config) {
                Ok(ready) => Slot::Ready(ready),
                Err(e) => {
                    tracing::debug!("no first shell started ahead: {e}");
                    Slot::Gone
                }
            },
            false => Slot::Gone,
        };
    }

    fn take(&self) -> Option<Ready> {
        match std::mem::replace(&mut *lock(&self.slot), Slot::Gone) {
            Slot::Ready(ready) => Some(ready),
            Slot::Waiting | Slot::Gone => None,
        }
    }

    /// Hands `cmd` to the waiting shell, if there still is one and it is alive; returns it as
    /// the running command, with its exit code to come.
    pub(crate) fn claim(&self, cmd: &str) -> Option<(Child, oneshot::Receiver<i32>)> {
        let mut ready = self.take()?;
        if cmd.len() > MAX_COMMAND
            || cmd.contains('\0')
            || !matches!(
                ready.exit.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            )
        {
            kill(&ready.child);
            return None;
        }
        let mut script = Vec::with_capacity(cmd.len() + 1);
        script.extend_from_slice(cmd.as_bytes());
        script.push(0);
        if ready.command.write_all(&script).is_err() {
            kill(&ready.child);
            return None;
        }
        // Closing the pipe is the shell's end of input, should it read past the NUL.
        drop(ready.command);
        Some((ready.child, ready.exit))
    }

    /// Something changed that the waiting shell's profile may have read: it is not used.
    pub(crate) fn discard(&self) {
        if let Some(ready) = self.take() {
            kill(&ready.child);
        }
    }
}

fn kill(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // Its own session and process group; it may be gone already.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn spawn(config: &Config) -> std::io::Result<Ready> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut command = Command::new(&config.shell);
    command
        .args(["-l", "-c", BOOTSTRAP])
        .env_clear()
        .envs(child::environment(config, &[], &Default::default()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let read_fd = read.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (dup2, fcntl) on a descriptor that is open in the child.
    unsafe {
        command.pre_exec(move || place_command_fd(read_fd));
    }
    child::confine(&mut command, config, &config.workdir, false)?;
    let (child, exit) = reaper::spawn(&mut command)?;
    drop::<OwnedFd>(read);
    Ok(Ready {
        child,
        exit,
        command: std::fs::File::from(write),
    })
}

/// In the child: the pipe's read end as fd 3, open across exec.
fn place_command_fd(read_fd: i32) -> std::io::Result<()> {
    // SAFETY: plain descriptor calls on descriptors open in this process.
    let result = unsafe {
        if read_fd == COMMAND_FD {
            // dup2 onto itself would keep close-on-exec set.
            libc::fcntl(COMMAND_FD, libc::F_SETFD, 0)
        } else {
            libc::dup2(read_fd, COMMAND_FD)
        }
    };
    if result == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
