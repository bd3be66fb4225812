//! The `process` service: commands run as `$SHELL -l -c CMD` with piped stdio, their output as
//! one notification per line, their exit code after all of their output (wire spec §5.2).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::Value;
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};

use crate::child::{self, Clock, Input};
use crate::connection::{Handler, Outcome, Subscriber};
use crate::hub::Topic;
use crate::rpc::{Args, RpcError};
use crate::{State, lock, random_id, reaper};

/// Longest line sent as one notification; longer lines are split (DECISIONS #12).
const MAX_LINE: usize = 1 << 20;
/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 << 10;

/// The running processes by their client-chosen ID. An ID is free again once its process exited.
#[derive(Default)]
pub(crate) struct Processes {
    running: Mutex<HashMap<String, Arc<Running>>>,
}

struct Running {
    /// Also the process group: every process starts its own session.
    pid: Pid,
    stdin: Input,
}

impl Processes {
    fn get(&self, id: &str) -> Option<Arc<Running>> {
        lock(&self.running).get(id).cloned()
    }

    /// Forgets `id` if it still names `process` (and not a newer process that reused the ID).
    fn finish(&self, id: &str, process: &Arc<Running>) {
        let mut running = lock(&self.running);
        if running
            .get(id)
            .is_some_and(|current| Arc::ptr_eq(current, process))
        {
            running.remove(id);
        }
    }
}

pub(crate) fn method(name: &str) -> Option<Handler> {
    Some(match name {
        "start" => start,
        "stdin" => stdin,
        "kill" => kill,
        _ => return None,
    })
}

pub(crate) fn subscription(name: &str) -> Option<Subscriber> {
    Some(match name {
        "onStdout" => |_, args| process_topic(args, Topic::Stdout),
        "onStderr" => |_, args| process_topic(args, Topic::Stderr),
        "onExit" => |_, args| process_topic(args, Topic::ProcessExit),
        _ => return None,
    })
}

/// `["onX", processID]`; the process need not exist yet.
fn process_topic(args: &Args, topic: fn(String) -> Topic) -> Result<Topic, RpcError> {
    Ok(topic(args.at_most(2)?.required(1)?))
}

/// `process_start [id, cmd, envVars, cwd]`.
fn start(state: &Arc<State>, args: &Args) -> Result<Outcome, RpcError> {
    args.at_most(4)?;
    let mut id: String = args.required(0)?;
    let cmd: String = args.required(1)?;
    let env: BTreeMap<String, String> = args.optional(2)?.unwrap_or_default();
    let cwd: String = args.optional(3)?.unwrap_or_default();
    if id.is_empty() {
        id = random_id(20);
    }

    // Held across the spawn, so that two starts of one ID cannot both spawn.
    let mut running = lock(&state.processes.running);
    if running.contains_key(&id) {
        return Ok(Outcome::Ready(Ok(Value::String(id))));
    }
    let fail =
        |detail: String| RpcError::handler(format!("error starting process '{id}': {detail}"));
    let config = &state.config;
    let ahead = if env.is_empty() && cwd.is_empty() {
        state.first_shell.claim(&cmd)
    } else {
        state.first_shell.discard();
        None
    };
    let (mut spawned, exit) = match ahead {
        Some(started) => started,
        None => {
            let cwd = child::working_dir(config, &cwd).map_err(fail)?;
            let mut command = Command::new(&config.shell);
            command
                .args(["-l", "-c", &cmd])
                .env_clear()
                .envs(child::environment(config, &[], &env))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            child::confine(&mut command, config, &cwd, false).map_err(|e| fail(e.to_string()))?;
            reaper::spawn(&mut command).map_err(|error| {
                fail(format!(
                    "fork/exec {}: {}",
                    config.shell.display(),
                    child::os_error_text(&error)
                ))
            })?
        }
    };
    let pid = Pid::from_raw(i32::try_from(spawned.id()).unwrap_or(i32::MAX));
    let (stdin, stdout, stderr) = match pipes(&mut spawned) {
        Ok(pipes) => pipes,
        Err(error) => {
            let _ = killpg(pid, Signal::SIGKILL);
            return Err(fail(error.to_string()));
        }
    };
    let process = Arc::new(Running {
        pid,
        stdin: Input::spawn(stdin),
    });
    running.insert(id.clone(), process.clone());
    drop(running);
    tokio::spawn(supervise(
        state.clone(),
        id.clone(),
        process,
        [stdout, stderr],
        exit,
    ));
    Ok(Outcome::Ready(Ok(Value::String(id))))
}

/// The child's pipes as non-blocking tokio pipes.
fn pipes(child: &mut Child) -> io::Result<(pipe::Sender, pipe::Receiver, pipe::Receiver)> {
    let missing = || io::Error::other("a standard stream of the child was not piped");
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok((
        pipe::Sender::from_owned_fd(OwnedFd::from(stdin))?,
        pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))?,
        pipe::Receiver::from_owned_fd(OwnedFd::from(stderr))?,
    ))
}

/// `process_stdin [id, data]`: raw bytes, no newline added.
fn stdin(state: &Arc<State>, args: &Args) -> Result<Outcome, RpcError> {
    args.at_most(2)?;
    let id: String = args.required(0)?;
    let data: String = args.required(1)?;
    let process = state
        .processes
        .get(&id)
        .ok_or_else(|| RpcError::handler(format!("error finding process '{id}'")))?;
    let written = process.stdin.write(data.into_bytes());
    Ok(Outcome::Later(Box::pin(async move {
        let fail = |detail: String| {
            RpcError::handler(format!("error writing stdin to process '{id}': {detail}"))
        };
        match written.await {
            Ok(Ok(())) => Ok(Value::Null),
            Ok(Err(error)) => Err(fail(child::os_error_text(&error))),
            Err(_) => Err(fail("the process has exited".to_owned())),
        }
    })))
}

/// `process_kill [id]`: SIGKILL to the whole process group, so nothing the command started
/// survives (DECISIONS #11). Unknown IDs are not an error.
fn kill(state: &Arc<State>, args: &Args) -> Result<Outcome, RpcError> {
    let id: String = args.at_most(1)?.required(0)?;
    if let Some(process) = state.processes.get(&id) {
        // The group may be gone already; that is what the caller wanted.
        let _ = killpg(process.pid, Signal::SIGKILL);
    }
    Ok(Outcome::Ready(Ok(Value::Null)))
}

#[derive(Serialize)]
struct OutputLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    line: &'a str,
    timestamp: u64,
}

/// Streams both outputs, then reports the exit code: the exit notification is published only
/// after every output notification.
async fn supervise(
    state: Arc<State>,
    id: String,
    process: Arc<Running>,
    [stdout, stderr]: [pipe::Receiver; 2],
    exit: oneshot::Receiver<i32>,
) {
    let clock = Clock::default();
    let (exited, exit_seen) = watch::channel(false);
    let status = async move {
        let code = exit.await.unwrap_or(reaper::KILLED_BY_SIGNAL);
        exited.send_replace(true);
        code
    };
    let ((), (), code) = tokio::join!(
        stream_lines(
            &state,
            Topic::Stdout(id.clone()),
            "Stdout",
            stdout,
            &clock,
            exit_seen.clone()
        ),
        stream_lines(
            &state,
            Topic::Stderr(id.clone()),
            "Stderr",
            stderr,
            &clock,
            exit_seen
        ),
        status,
    );
    // Free the ID first: a client reacting to the exit may start the same ID again.
    state.processes.finish(&id, &process);
    state
        .hub
        .publish(&Topic::ProcessExit(id), &code.to_string())
        .await;
}

async fn stream_lines(
    state: &State,
    topic: Topic,
    kind: &'static str,
    mut source: pipe::Receiver,
    clock: &Clock,
    mut exited: watch::Receiver<bool>,
) {
    let mut buffer = vec![0; READ_CHUNK];
    let mut lines = LineSplitter::default();
    loop {
        let read = match child::read_output(&mut source, &mut buffer, &mut exited).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        for line in lines.push(&buffer[..read]) {
            publish_line(state, &topic, kind, &line, clock).await;
        }
    }
    if let Some(line) = lines.finish() {
        publish_line(state, &topic, kind, &line, clock).await;
    }
}

async fn publish_line(state: &State, topic: &Topic, kind: &'static str, line: &str, clock: &Clock) {
    let event = OutputLine {
        kind,
        line,
        timestamp: clock.next(),
    };
    if let Ok(encoded) = serde_json::to_string(&event) {
        state.hub.publish(topic, &encoded).await;
    }
}

/// Cuts a byte stream into lines the way Go's `bufio.ScanLines` does (`\n` and a preceding `\r`
/// removed, a final unterminated line kept), except that a line longer than [`MAX_LINE`] is
/// split instead of ending the stream.
#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
    /// Leading bytes of `pending` already known to hold no newline.
    scanned: usize,
}

impl LineSplitter {
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(data);
        let mut lines = Vec::new();
        let mut start = 0;
        let mut from = self.scanned;
        loop {
            let window_end = self.pending.len().min(start + MAX_LINE + 1);
            let from_here = from.min(window_end);
            let newline = self.pending[from_here..window_end]
                .iter()
                .position(|&byte| byte == b'\n');
            if let Some(offset) = newline {
                let end = from_here + offset;
                lines.push(text_of(strip_cr(&self.pending[start..end])));
                start = end + 1;
            } else if self.pending.len() - start > MAX_LINE {
                let cut = start + char_boundary(&self.pending[start..], MAX_LINE);
                lines.push(text_of(&self.pending[start..cut]));
                start = cut;
            } else {
                from = window_end;
                break;
            }
            from = start;
        }
        self.pending.drain(..start);
        self.scanned = from - start;
        lines
    }

    fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        self.scanned = 0;
        (!rest.is_empty()).then(|| text_of(strip_cr(&rest)))
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Output is sent as JSON strings; invalid UTF-8 is replaced, as the original did.
fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The largest cut at or below `max` that does not split a UTF-8 character (`bytes` is longer
/// than `max`); `max` itself if the bytes there are not UTF-8 anyway.
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    let is_continuation = |byte: u8| byte & 0b1100_0000 == 0b1000_0000;
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&cut| !is_continuation(bytes[cut]))
        .filter(|&cut| cut > 0)
        .unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut splitter = LineSplitter::default();
        let mut lines: Vec<String> = chunks
            .iter()
            .flat_map(|chunk| splitter.push(chunk))
            .collect();
        lines.extend(splitter.finish());
        lines
    }

    #[test]
    fn splits_lines_like_go_scanner() {
        assert_eq!(split(&[b"a\nb\r\n\nc"]), ["a", "b", "", "c"]);
        assert_eq!(split(&[b"par", b"tial\r", b"\nend\r"]), ["partial", "end"]);
        assert_eq!(split(&[b"\xff\n"]), ["\u{fffd}"]);
        assert!(split(&[b""]).is_empty());
    }

    #[test]
    fn splits_long_lines_at_the_limit() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        let chunks: Vec<&[u8]> = input.chunks(READ_CHUNK).collect();
        let lines = split(&chunks);
        let lengths: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lengths, [MAX_LINE, MAX_LINE, 10, 4]);

        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(
            split(&[&exact]).iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE]
        );
    }

    #[test]
    fn long_lines_are_not_cut_inside_a_character() {
        let mut input = vec![b'x'; MAX_LINE - 1];
        input.extend_from_slice("é".as_bytes());
        input.extend_from_slice(b"tail");
        let lines = split(&[&input]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE - 1);
        assert_eq!(lines[1], "étail");
    }
}
