//! The `process.Process` service (e2b v2 wire spec §6.1), with envd's semantics: `Start` runs
//! `cmd args` directly as the call's user and streams `start`, `data`*, `end`; `Connect`
//! follows a running process (or replays the end of one that exited within 30 s); input,
//! signals, resizing and listing address processes by pid or tag.

mod messages;
mod running;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use nix::sys::signal::Signal;

use super::error::{Code, Error};
use super::json::parse;
use super::{Call, Messages, Method, Sink};
use crate::State;
use messages::{
    Empty, Event, EventResponse, ListResponse, ProcessInput, ProcessRequest, SIGNAL_SIGKILL,
    SIGNAL_SIGTERM, Selector, SendInputRequest, SendSignalRequest, StartRequest,
    StreamInputRequest, UpdateRequest, empty, signal_name,
};
pub(crate) use running::Processes;
use running::{Following, Process};

/// The methods, for the error that names an unknown one.
pub(crate) const NAMES: &str =
    "Start, Connect, List, SendInput, StreamInput, SendSignal, Update, CloseStdin";

pub(crate) fn method(name: &str) -> Option<Method> {
    Some(match name {
        "Start" => Method::ServerStream(|state, call, payload, sink| {
            start(state, call, payload, sink).boxed()
        }),
        "Connect" => Method::ServerStream(|state, call, payload, sink| {
            connect(state, call, payload, sink).boxed()
        }),
        "List" => Method::Unary(|state, _, payload| async move { list(&state, &payload) }.boxed()),
        "SendInput" => Method::Unary(|state, _, payload| send_input(state, payload).boxed()),
        "StreamInput" => {
            Method::ClientStream(|state, _, messages| stream_input(state, messages).boxed())
        }
        "SendSignal" => {
            Method::Unary(|state, _, payload| async move { send_signal(&state, &payload) }.boxed())
        }
        "Update" => {
            Method::Unary(|state, _, payload| async move { update(&state, &payload) }.boxed())
        }
        "CloseStdin" => {
            Method::Unary(|state, _, payload| async move { close_stdin(&state, &payload) }.boxed())
        }
        _ => return None,
    })
}

fn find(state: &State, selector: &Selector) -> Result<Arc<Process>, Error> {
    state
        .connect_processes
        .find(selector)
        .ok_or_else(|| selector.not_found())
}

async fn start(
    state: Arc<State>,
    call: Call,
    payload: bytes::Bytes,
    sink: Sink,
) -> Result<(), Error> {
    let request: StartRequest = parse(&payload)?;
    let (process, events) = running::start(&state, &call.user, request, call.timeout)?;
    follow(&sink, process.pid, Following::Live(events), call.keepalive).await
}

async fn connect(
    state: Arc<State>,
    call: Call,
    payload: bytes::Bytes,
    sink: Sink,
) -> Result<(), Error> {
    let request: ProcessRequest = parse(&payload)?;
    let selector = Selector::of(request.process)?;
    let (pid, following) = match state.connect_processes.find(&selector) {
        Some(process) => (process.pid, process.follow()),
        None => {
            let (pid, end) = state
                .connect_processes
                .find_ended(&selector)
                .ok_or_else(|| selector.not_found())?;
            (pid, Following::Ended(end))
        }
    };
    follow(&sink, pid, following, call.keepalive).await
}

/// Sends `start`, then the process's events up to its end, with a keepalive whenever nothing
/// was sent for `keepalive`. Returns early, leaving the process running, if the client goes.
async fn follow(
    sink: &Sink,
    pid: u32,
    following: Following,
    keepalive: Duration,
) -> Result<(), Error> {
    let send = |event: Event| async move {
        // A client that has gone reads no error either; the stream just stops.
        sink.send(&EventResponse { event: &event }).await.is_ok()
    };
    if !send(Event::Start { pid }).await {
        return Ok(());
    }
    let mut events = match following {
        Following::Ended(end) => {
            send(Event::End(end)).await;
            return Ok(());
        }
        Following::Live(events) => events,
    };
    let silence = tokio::time::sleep(keepalive);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(Error::new(
                        Code::Unknown,
                        "the process's events ended before its end event",
                    ));
                };
                let last = matches!(event, Event::End(_));
                if !send(event).await || last {
                    return Ok(());
                }
            }
            () = &mut silence => {
                if !send(Event::Keepalive {}).await {
                    return Ok(());
                }
            }
            () = sink.closed() => return Ok(()),
        }
        silence
            .as_mut()
            .reset(tokio::time::Instant::now() + keepalive);
    }
}

fn list(state: &State, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let Empty {} = parse(payload)?;
    let response = ListResponse {
        processes: state.connect_processes.list(),
    };
    serde_json::to_vec(&response)
        .map_err(|error| Error::internal(format!("encoding the process list failed: {error}")))
}

async fn send_input(state: Arc<State>, payload: bytes::Bytes) -> Result<Vec<u8>, Error> {
    let request: SendInputRequest = parse(&payload)?;
    let process = find(&state, &Selector::of(request.process)?)?;
    write_input(&process, request.input).await?;
    Ok(empty())
}

async fn write_input(process: &Process, input: Option<ProcessInput>) -> Result<(), Error> {
    let input = input.unwrap_or_default();
    match (input.stdin, input.pty) {
        (Some(data), None) => process
            .write_stdin(data.0)
            .await
            .map_err(|error| Error::internal(format!("error writing to stdin: {error}"))),
        (None, Some(data)) => process
            .write_pty(data.0)
            .await
            .map_err(|error| Error::internal(format!("error writing to tty: {error}"))),
        (Some(_), Some(_)) => Err(Error::invalid_argument(
            "the input sets both stdin and pty; set one",
        )),
        (None, None) => Err(Error::new(
            Code::Unimplemented,
            "the input holds no data: set input.stdin or input.pty",
        )),
    }
}

/// A `start` naming the process, then `data` events; ends when the client closes the request.
async fn stream_input(state: Arc<State>, mut messages: Messages) -> Result<Vec<u8>, Error> {
    let mut process = None;
    while let Some(payload) = messages.next().await? {
        let request: StreamInputRequest = parse(&payload)?;
        match (request.start, request.data, request.keepalive) {
            (Some(start), None, None) => {
                process = Some(find(&state, &Selector::of(start.process)?)?);
            }
            (None, Some(data), None) => {
                let process = process.as_ref().ok_or_else(|| {
                    Error::invalid_argument(
                        "a data event came before the start event that names the process",
                    )
                })?;
                write_input(process, data.input).await?;
            }
            (None, None, Some(_)) => {}
            _ => {
                return Err(Error::new(
                    Code::Unimplemented,
                    "each message must set exactly one of start, data or keepalive",
                ));
            }
        }
    }
    Ok(empty())
}

fn send_signal(state: &State, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let request: SendSignalRequest = parse(payload)?;
    let process = find(state, &Selector::of(request.process)?)?;
    let signal = match request.signal {
        SIGNAL_SIGKILL => Signal::SIGKILL,
        SIGNAL_SIGTERM => Signal::SIGTERM,
        other => {
            return Err(Error::new(
                Code::Unimplemented,
                format!(
                    "invalid signal: {}; send SIGNAL_SIGKILL or SIGNAL_SIGTERM",
                    signal_name(other)
                ),
            ));
        }
    };
    process
        .signal(signal)
        .map_err(|error| Error::internal(format!("error sending signal: {}", error.desc())))?;
    Ok(empty())
}

fn update(state: &State, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let request: UpdateRequest = parse(payload)?;
    let process = find(state, &Selector::of(request.process)?)?;
    if let Some(pty) = request.pty {
        let (cols, rows) = pty.size.dimensions();
        process
            .resize(cols, rows)
            .map_err(|error| Error::internal(format!("error resizing tty: {error}")))?;
    }
    Ok(empty())
}

fn close_stdin(state: &State, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let request: ProcessRequest = parse(payload)?;
    let process = find(state, &Selector::of(request.process)?)?;
    process
        .close_stdin()
        .map_err(|error| Error::new(Code::Unknown, format!("error closing stdin: {error}")))?;
    Ok(empty())
}
