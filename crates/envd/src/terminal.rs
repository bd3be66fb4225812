//! The `terminal` service: interactive login shells on a real pseudo-terminal, their output as
//! string chunks (wire spec §5.3).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::signal::{Signal, killpg};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};

use crate::child::{self, Input};
use crate::connection::{Handler, Outcome, Subscriber};
use crate::hub::Topic;
use crate::rpc::{Args, RpcError};
use crate::{State, lock, random_id, reaper};

/// Bytes read from the terminal at once.
const READ_CHUNK: usize = 32 << 10;

/// The open terminals by their client-chosen ID.
#[derive(Default)]
pub(crate) struct Terminals {
    running: Mutex<HashMap<String, Arc<Terminal>>>,
}

struct Terminal {
    /// The shell; also its process group and session.
    pid: Pid,
    input: Input,
    master: Arc<AsyncFd<OwnedFd>>,
    destroyed: Notify,
}

impl Terminals {
    fn get(&self, id: &str) -> Option<Arc<Terminal>> {
        lock(&self.running).get(id).cloned()
    }

    fn finish(&self, id: &str, terminal: &Arc<Terminal>) {
        let mut running = lock(&self.running);
        if running
            .get(id)
            .is_some_and(|current| Arc::ptr_eq(current, terminal))
        {
            running.remove(id);
        }
    }
}

pub(crate) fn method(name: &str) -> Option<Handler> {
    Some(match name {
        "start" => start,
        "data" => data,
        "resize" => resize,
        "destroy" => destroy,
        _ => return None,
    })
}

pub(crate) fn subscription(name: &str) -> Option<Subscriber> {
    Some(match name {
        "onData" => |_, args| Ok(Topic::TerminalData(args.at_most(2)?.required(1)?)),
        "onExit" => |_, args| Ok(Topic::TerminalExit(args.at_most(2)?.required(1)?)),
        _ => return None,
    })
}

/// `terminal_start [id, cols, rows, envVars?, cmd?, cwd?]`.
fn start(state: &Arc<State>, args: &Args) -> Result<Outcome, RpcError> {
    args.at_most(6)?;
    let mut id: String = args.required(0)?;
    let cols: u16 = args.required(1)?;
    let rows: u16 = args.required(2)?;
    let env: BTreeMap<String, String> = args.optional(3)?.unwrap_or_default();
    let cmd: Option<String> = args.optional(4)?;
    // `""` and `null` both mean home (DECISIONS #7).
    let cwd: String = args.optional(5)?.unwrap_or_default();
    if id.is_empty() {
        id = random_id(20);
    }

    let mut running = lock(&state.terminals.running);
    if running.contains_key(&id) {
        return Ok(Outcome::Ready(Ok(Value::String(id))));
    }
    let fail =
        |detail: String| RpcError::handler(format!("error starting terminal '{id}': {detail}"));
    let config = &state.config;
    let cwd = child::working_dir(config, &cwd).map_err(fail)?;
    let (master, slave) = open_pty(cols, rows).map_err(|e| fail(format!("open pty: {e}")))?;

    let mut command = Command::new(&config.shell);
    command.args(["-i", "-l"]);
    if let Some(cmd) = &cmd {
        command.args(["-c", cmd]);
    }
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    command
        .env_clear()
        .envs(child::environment(config, &[("TERM", "xterm")], &env))
        .stdin(stdio(&slave).map_err(|e| fail(e.to_string()))?)
        .stdout(stdio(&slave).map_err(|e| fail(e.to_string()))?)
        .stderr(Stdio::from(slave));
    child::confine(&mut command, config, &cwd, true).map_err(|e| fail(e.to_string()))?;
    let (spawned, exit) = reaper::spawn(&mut command).map_err(|error| {
        fail(format!(
            "fork/exec {}: {}",
            config.shell.display(),
            child::os_error_text(&error)
        ))
    })?;
    // Our copies of the slave must close, or the master never sees the shell hang up.
    drop(command);
    let pid = Pid::from_raw(i32::try_from(spawned.id()).unwrap_or(i32::MAX));
    // SAFETY: the `OwnedFd` is moved in, so the descriptor stays open and the same until the
    // `AsyncFd` drops it.
    let master = match unsafe { AsyncFd::register(master) } {
        Ok(master) => Arc::new(master),
        Err(error) => {
            let _ = killpg(pid, Signal::SIGKILL);
            return Err(fail(error.to_string()));
        }
    };
    let terminal = Arc::new(Terminal {
        pid,
        input: Input::spawn(Pty(master.clone())),
        master,
        destroyed: Notify::new(),
    });
    running.insert(id.clone(), terminal.clone());
    drop(running);
    tokio::spawn(supervise(state.clone(), id.clone(), terminal, exit));
    Ok(Outcome::Ready(Ok(Value::String(id))))
}

/// A pseudo-terminal pair of `cols`×`rows`: the master non-blocking for envd, the slave for the
/// shell. Both close on exec so that no other child inherits them.
pub(crate) fn open_pty(cols: u16, rows: u16) -> nix::Result<(OwnedFd, OwnedFd)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = ptsname_r(&master)?;
    let slave = nix::fcntl::open(
        slave_path.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let master = OwnedFd::from(master);
    set_size(&master, cols, rows)?;
    let flags = OFlag::from_bits_retain(fcntl(&master, FcntlArg::F_GETFL)?);
    fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok((master, slave))
}

pub(crate) fn set_size(master: &impl AsFd, cols: u16, rows: u16) -> nix::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which is valid for the call.
    let result = unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) };
    Errno::result(result).map(drop)
}

/// `terminal_data [id, data]`.
fn data(state: &Arc<State>, args: &Args) -> Result<Outcome, RpcError> {
    args.at_most(2)?;
    let id: String = args.required(0)?;
    let data: String = args.required(1)?;
    let terminal = state.terminals.get(&id).ok_or_else(|| not_found(&id))?;
    let written = terminal.input.write(data.into_bytes());
    Ok(Outcome::Later(Box::pin(async move {
        let fail = |detail: String| {
            RpcError::handler(format!("error writing to terminal '{id}': {detail}"))
        };
        match written.await {
            Ok(Ok(())) => Ok(Value::Null),
            Ok(Err(error)) => Err(fail(child::os_error_text(&error))),
            Err(_) => Err(fail("the terminal has exited".to_owned())),
        }
    })))
}

/// `terminal_resize [id, cols, rows]`.
fn resize(state: &Arc<State>, args: &Args) -> Result<Outcome, RpcError> {
    args.at_most(3)?;
    let id: String = args.required(0)?;
    let cols: u16 = args.required(1)?;
    let rows: u16 = args.required(2)?;
    let terminal = state.terminals.get(&id).ok_or_else(|| not_found(&id))?;
    set_size(terminal.master.get_ref(), cols, rows).map_err(|error| {
        RpcError::handler(format!("error resizing terminal '{id}': {}", error.desc()))
    })?;
    Ok(Outcome::Ready(Ok(Value::Null)))
}

/// `terminal_destroy [id]`: kills everything in the terminal's session and closes it. Unknown
/// IDs are not an error.
fn destroy(state: &Arc<State>, args: &Args) -> Result<Outcome, RpcError> {
    let id: String = args.at_most(1)?.required(0)?;
    if let Some(terminal) = state.terminals.get(&id) {
        let _ = killpg(terminal.pid, Signal::SIGKILL);
        terminal.destroyed.notify_one();
    }
    Ok(Outcome::Ready(Ok(Value::Null)))
}

fn not_found(id: &str) -> RpcError {
    RpcError::handler(format!("error finding terminal '{id}'"))
}

/// Streams the terminal's output until its read side ends (the shell and everything holding the
/// terminal exited) or it is destroyed, then closes it and reports the exit.
async fn supervise(
    state: Arc<State>,
    id: String,
    terminal: Arc<Terminal>,
    exit: tokio::sync::oneshot::Receiver<i32>,
) {
    let mut reader = Pty(terminal.master.clone());
    let (exited, mut exit_seen) = watch::channel(false);
    let mut exit = exit;
    let mut waiting_for_exit = true;
    let mut buffer = vec![0; READ_CHUNK];
    let mut text = Utf8Chunks::default();
    let topic = Topic::TerminalData(id.clone());
    loop {
        tokio::select! {
            read = child::read_output(&mut reader, &mut buffer, &mut exit_seen) => match read {
                Ok(0) | Err(_) => break,
                Ok(read) => publish_chunk(&state, &topic, &text.push(&buffer[..read])).await,
            },
            () = terminal.destroyed.notified() => break,
            _ = &mut exit, if waiting_for_exit => {
                waiting_for_exit = false;
                exited.send_replace(true);
            }
        }
    }
    if let Some(rest) = text.finish() {
        publish_chunk(&state, &topic, &rest).await;
    }
    state.terminals.finish(&id, &terminal);
    // The last handles on the master: closing it hangs up whatever still holds the terminal.
    drop(reader);
    drop(terminal);
    state.hub.publish(&Topic::TerminalExit(id), "{}").await;
}

async fn publish_chunk(state: &State, topic: &Topic, chunk: &str) {
    if chunk.is_empty() {
        return;
    }
    if let Ok(encoded) = serde_json::to_string(chunk) {
        state.hub.publish(topic, &encoded).await;
    }
}

/// The master side of a terminal as an async byte stream. Linux reports a hung-up terminal as
/// EIO on read, which is its end of file.
pub(crate) struct Pty(pub(crate) Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(read)) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if error.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(written) => return Poll::Ready(written),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Turns terminal output into strings without splitting a multi-byte character across two
/// chunks: an incomplete character at the end waits for the next read.
#[derive(Default)]
struct Utf8Chunks {
    tail: Vec<u8>,
}

impl Utf8Chunks {
    fn push(&mut self, data: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.tail);
        bytes.extend_from_slice(data);
        let complete = complete_prefix(&bytes);
        self.tail = bytes.split_off(complete);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.tail);
        (!rest.is_empty()).then(|| String::from_utf8_lossy(&rest).into_owned())
    }
}

/// The length of `bytes` without a trailing, still incomplete UTF-8 character.
fn complete_prefix(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for start in (len.saturating_sub(3)..len).rev() {
        let byte = bytes[start];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue;
        }
        let needed = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if len - start < needed { start } else { len };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_incomplete_characters_for_the_next_chunk() {
        let mut chunks = Utf8Chunks::default();
        let euro = "€".as_bytes();
        assert_eq!(chunks.push(&[b'a', euro[0]]), "a");
        assert_eq!(chunks.push(&euro[1..2]), "");
        assert_eq!(chunks.push(&[euro[2], b'b']), "€b");
        assert_eq!(chunks.push(b"\xff"), "\u{fffd}");
        assert_eq!(chunks.push(&euro[..2]), "");
        assert_eq!(chunks.finish().as_deref(), Some("\u{fffd}"));
        assert_eq!(chunks.finish(), None);
    }
}
