//! The processes started over Connect: how they start (user, directory, environment, pipes or a
//! terminal), how their output fans out to every stream following them, and what is kept once
//! they have ended. A process never depends on a client: it outlives the stream that started it.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncRead;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};

use super::messages::{End, Event, Output, ProcessConfig, ProcessInfo, Selector, StartRequest};
use crate::connect::error::Error;
use crate::connect::json::Base64;
use crate::connect::user;
use crate::reaper::{self, Exit};
use crate::terminal::{self, Pty};
use crate::{Config, State, child, lock};

/// How long the end of an exited process is kept for a late `Connect` (envd's
/// `terminatedRetentionTTL`).
const RETAIN_ENDED: Duration = Duration::from_secs(30);
/// Bytes read from a pipe at once: a data event carries at most this much (envd's chunk sizes).
const PIPE_CHUNK: usize = 32 << 10;
const PTY_CHUNK: usize = 16 << 10;
/// Events queued for one follower. A follower that falls this far behind slows the process's
/// output down (the process blocks writing), as in envd; none is dropped.
const QUEUED_EVENTS: usize = 64;

/// The live processes by pid, and the ends of recently exited ones.
#[derive(Default)]
pub(crate) struct Processes {
    live: Mutex<HashMap<u32, Arc<Process>>>,
    ended: Mutex<HashMap<u32, Ended>>,
}

struct Ended {
    tag: Option<String>,
    end: End,
    until: Instant,
}

pub(crate) struct Process {
    pub(crate) pid: u32,
    /// The process group: every process leads a session of its own.
    group: Pid,
    tag: Option<String>,
    config: ProcessConfig,
    io: Io,
    followers: Mutex<Followers>,
}

enum Io {
    /// `stdin` is `None` when it was never enabled or has been closed.
    Pipes { stdin: Mutex<Option<child::Input>> },
    Terminal {
        master: Arc<AsyncFd<OwnedFd>>,
        input: child::Input,
    },
}

#[derive(Default)]
struct Followers {
    live: Vec<mpsc::Sender<Event>>,
    /// Set once the process has ended; later followers get it at once.
    end: Option<End>,
}

/// What a stream following a process gets.
pub(crate) enum Following {
    /// Events from now on, ending with the end event.
    Live(mpsc::Receiver<Event>),
    /// The process has already ended.
    Ended(End),
}

impl Processes {
    pub(crate) fn find(&self, selector: &Selector) -> Option<Arc<Process>> {
        let live = lock(&self.live);
        match selector {
            Selector::Pid(pid) => live.get(pid).cloned(),
            Selector::Tag(tag) => live
                .values()
                .find(|process| process.tag.as_deref() == Some(tag))
                .cloned(),
        }
    }

    /// The pid and end of a process that exited less than [`RETAIN_ENDED`] ago.
    pub(crate) fn find_ended(&self, selector: &Selector) -> Option<(u32, End)> {
        let mut ended = lock(&self.ended);
        let now = Instant::now();
        ended.retain(|_, entry| entry.until > now);
        match selector {
            Selector::Pid(pid) => ended.get(pid).map(|entry| (*pid, entry.end.clone())),
            Selector::Tag(tag) => ended
                .iter()
                .find(|(_, entry)| entry.tag.as_deref() == Some(tag))
                .map(|(pid, entry)| (*pid, entry.end.clone())),
        }
    }

    pub(crate) fn list(&self) -> Vec<ProcessInfo> {
        let mut processes: Vec<ProcessInfo> = lock(&self.live)
            .values()
            .map(|process| ProcessInfo {
                config: process.config.clone(),
                pid: process.pid,
                tag: process.tag.clone(),
            })
            .collect();
        processes.sort_by_key(|process| process.pid);
        processes
    }

    fn insert(&self, process: Arc<Process>) {
        // A retained end of an earlier process with this pid or tag must not answer for it.
        lock(&self.ended).retain(|pid, entry| {
            *pid != process.pid && (process.tag.is_none() || entry.tag != process.tag)
        });
        lock(&self.live).insert(process.pid, process);
    }

    /// Moves an ended process from the live ones to the retained ends.
    fn retire(&self, process: &Arc<Process>, end: End) {
        let mut live = lock(&self.live);
        if live
            .get(&process.pid)
            .is_some_and(|current| Arc::ptr_eq(current, process))
        {
            live.remove(&process.pid);
        }
        drop(live);
        let mut ended = lock(&self.ended);
        let now = Instant::now();
        ended.retain(|_, entry| entry.until > now);
        ended.insert(
            process.pid,
            Ended {
                tag: process.tag.clone(),
                end,
                until: now + RETAIN_ENDED,
            },
        );
    }
}

impl Process {
    /// Follows the process from now on.
    pub(crate) fn follow(&self) -> Following {
        let mut followers = lock(&self.followers);
        if let Some(end) = &followers.end {
            return Following::Ended(end.clone());
        }
        let (sender, events) = mpsc::channel(QUEUED_EVENTS);
        followers.live.push(sender);
        Following::Live(events)
    }

    /// Hands `event` to every follower, waiting for slow ones; followers that left are dropped.
    async fn publish(&self, event: Event) {
        let followers = lock(&self.followers).live.clone();
        if followers.is_empty() {
            return;
        }
        for follower in &followers {
            // A follower that left is dropped below.
            let _ = follower.send(event.clone()).await;
        }
        lock(&self.followers)
            .live
            .retain(|follower| !follower.is_closed());
    }

    /// Records the end and hands it to every follower; nobody follows afterwards.
    async fn end(&self, end: End) {
        let followers = {
            let mut followers = lock(&self.followers);
            followers.end = Some(end.clone());
            std::mem::take(&mut followers.live)
        };
        for follower in followers {
            let _ = follower.send(Event::End(end.clone())).await;
        }
    }

    /// Signals the whole process group, so that what `bash -c` started goes too.
    pub(crate) fn signal(&self, signal: Signal) -> nix::Result<()> {
        killpg(self.group, signal)
    }

    pub(crate) async fn write_stdin(&self, data: Vec<u8>) -> Result<(), String> {
        let written = match &self.io {
            Io::Terminal { .. } => {
                return Err(
                    "tty assigned to process — input should be written to the pty, \
                            not the stdin"
                        .to_owned(),
                );
            }
            Io::Pipes { stdin } => match lock(stdin).as_ref() {
                Some(input) => input.write(data),
                None => return Err("stdin not enabled or closed".to_owned()),
            },
        };
        self.written(written).await
    }

    pub(crate) async fn write_pty(&self, data: Vec<u8>) -> Result<(), String> {
        match &self.io {
            Io::Pipes { .. } => Err("tty not assigned to process — input should be written to \
                                     the stdin, not the tty"
                .to_owned()),
            Io::Terminal { input, .. } => self.written(input.write(data)).await,
        }
    }

    async fn written(&self, written: oneshot::Receiver<io::Result<()>>) -> Result<(), String> {
        let pid = self.pid;
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!(
                "error writing to process '{pid}': {}",
                child::os_error_text(&error)
            )),
            Err(_) => Err(format!(
                "error writing to process '{pid}': its input is closed"
            )),
        }
    }

    /// Closes stdin (the process reads end of file once queued input is written).
    pub(crate) fn close_stdin(&self) -> Result<(), String> {
        match &self.io {
            Io::Terminal { .. } => {
                Err("cannot close stdin for PTY process — send Ctrl+D (0x04) instead".to_owned())
            }
            Io::Pipes { stdin } => {
                lock(stdin).take();
                Ok(())
            }
        }
    }

    pub(crate) fn resize(&self, cols: u16, rows: u16) -> Result<(), String> {
        match &self.io {
            Io::Pipes { .. } => Err("tty not assigned to process".to_owned()),
            Io::Terminal { master, .. } => terminal::set_size(master.get_ref(), cols, rows)
                .map_err(|error| error.desc().to_owned()),
        }
    }
}

/// The output side of a child, read by its supervisor.
enum Outputs {
    Pipes(pipe::Receiver, pipe::Receiver),
    Terminal(Pty),
}

/// Starts the process `request` describes as `user` (the call's user), followed from the start
/// by the returned receiver. With a `lifetime`, the process is killed once it has run that long.
pub(crate) fn start(
    state: &Arc<State>,
    user: &Config,
    request: StartRequest,
    lifetime: Option<Duration>,
) -> Result<(Arc<Process>, mpsc::Receiver<Event>), Error> {
    // Anything the process does may change what the waiting first shell read at start.
    state.first_shell.discard();
    let config = request.process;
    let command_line = config.command_line();
    let cwd = user::working_dir(user, config.cwd.as_deref())?;
    let mut command = Command::new(&config.cmd);
    command
        .args(&config.args)
        .env_clear()
        .envs(child::environment(user, &[], &config.envs));
    let terminal = match &request.pty {
        Some(pty) => {
            let (cols, rows) = pty.size.dimensions();
            let (master, slave) = terminal::open_pty(cols, rows).map_err(|error| {
                Error::invalid_argument(format!(
                    "error starting pty with command '{command_line}' in dir '{}' with '{cols}' \
                     cols and '{rows}' rows: {}",
                    cwd.display(),
                    error.desc()
                ))
            })?;
            let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
            let internal =
                |error: io::Error| Error::internal(format!("error preparing the pty: {error}"));
            command
                .stdin(stdio(&slave).map_err(internal)?)
                .stdout(stdio(&slave).map_err(internal)?)
                .stderr(Stdio::from(slave));
            Some(master)
        }
        None => {
            // Stdin is a pipe unless the client turned it off (older clients never say).
            let stdin = if request.stdin.unwrap_or(true) {
                Stdio::piped()
            } else {
                Stdio::null()
            };
            command
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    let failed = |error: io::Error| {
        Error::invalid_argument(format!(
            "error starting process '{command_line}': fork/exec {}: {}",
            config.cmd,
            child::os_error_text(&error)
        ))
    };
    child::confine(&mut command, user, &cwd, terminal.is_some()).map_err(failed)?;
    let (mut spawned, exit) = reaper::spawn_with_status(&mut command).map_err(failed)?;
    // Our copies of the terminal's slave must close, or the master never sees the end.
    drop(command);
    let group = Pid::from_raw(i32::try_from(spawned.id()).unwrap_or(i32::MAX));
    let setup = match terminal {
        Some(master) => terminal_io(master),
        None => pipes_io(&mut spawned),
    };
    let (io, outputs) = match setup {
        Ok(setup) => setup,
        Err(error) => {
            // Nobody could follow or stop it; it must not run on unobserved.
            let _ = killpg(group, Signal::SIGKILL);
            return Err(Error::internal(format!(
                "error starting process '{command_line}': {error}"
            )));
        }
    };
    let (sender, events) = mpsc::channel(QUEUED_EVENTS);
    let process = Arc::new(Process {
        pid: spawned.id(),
        group,
        tag: request.tag,
        config,
        io,
        followers: Mutex::new(Followers {
            live: vec![sender],
            end: None,
        }),
    });
    state.connect_processes.insert(process.clone());
    tokio::spawn(supervise(
        state.clone(),
        process.clone(),
        outputs,
        exit,
        lifetime,
    ));
    Ok((process, events))
}

fn terminal_io(master: OwnedFd) -> io::Result<(Io, Outputs)> {
    // SAFETY: the `OwnedFd` is moved in, so the descriptor stays open and the same until the
    // `AsyncFd` drops it.
    let master = Arc::new(unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?);
    Ok((
        Io::Terminal {
            input: child::Input::spawn(Pty(master.clone())),
            master: master.clone(),
        },
        Outputs::Terminal(Pty(master)),
    ))
}

fn pipes_io(child: &mut Child) -> io::Result<(Io, Outputs)> {
    let missing = || io::Error::other("a standard stream of the child was not piped");
    let stdin = child
        .stdin
        .take()
        .map(|stdin| pipe::Sender::from_owned_fd(OwnedFd::from(stdin)))
        .transpose()?
        .map(child::Input::spawn);
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok((
        Io::Pipes {
            stdin: Mutex::new(stdin),
        },
        Outputs::Pipes(
            pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))?,
            pipe::Receiver::from_owned_fd(OwnedFd::from(stderr))?,
        ),
    ))
}

/// Streams the output until it ends, waits for the exit, then ends the process for its
/// followers. Kills the process group once `lifetime` has passed.
async fn supervise(
    state: Arc<State>,
    process: Arc<Process>,
    outputs: Outputs,
    exit: oneshot::Receiver<Exit>,
    lifetime: Option<Duration>,
) {
    let (exited, exit_seen) = watch::channel(false);
    let status = async {
        let mut exit = exit;
        let status = match lifetime {
            None => (&mut exit).await,
            Some(lifetime) => match tokio::time::timeout(lifetime, &mut exit).await {
                Ok(status) => status,
                Err(_) => {
                    // Already gone is what the deadline wanted.
                    let _ = process.signal(Signal::SIGKILL);
                    (&mut exit).await
                }
            },
        };
        exited.send_replace(true);
        status.unwrap_or(Exit::Lost)
    };
    let output = async {
        match outputs {
            Outputs::Pipes(stdout, stderr) => {
                tokio::join!(
                    pump(
                        &process,
                        stdout,
                        Output::Stdout,
                        PIPE_CHUNK,
                        exit_seen.clone()
                    ),
                    pump(
                        &process,
                        stderr,
                        Output::Stderr,
                        PIPE_CHUNK,
                        exit_seen.clone()
                    ),
                );
            }
            Outputs::Terminal(reader) => {
                pump(&process, reader, Output::Pty, PTY_CHUNK, exit_seen.clone()).await;
            }
        }
    };
    let (status, ()) = tokio::join!(status, output);
    let end = End::of(status);
    state.connect_processes.retire(&process, end.clone());
    process.end(end).await;
}

async fn pump<R: AsyncRead + Unpin>(
    process: &Process,
    mut source: R,
    kind: fn(Base64) -> Output,
    chunk: usize,
    mut exited: watch::Receiver<bool>,
) {
    let mut buffer = vec![0; chunk];
    loop {
        match child::read_output(&mut source, &mut buffer, &mut exited).await {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                process
                    .publish(Event::Data(kind(Base64(buffer[..read].to_vec()))))
                    .await;
            }
        }
    }
}
