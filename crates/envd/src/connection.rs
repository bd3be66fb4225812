//! One websocket connection: reads JSON-RPC requests, runs them, and writes responses and
//! subscription notifications through the connection's outbox.
//!
//! Requests are taken in order. Quick ones (spawning, killing, subscribing) complete before the
//! next message is read; slow ones (file I/O, writes to a child that may not read) are started in
//! order and answered whenever they finish, as go-ethereum answered each call independently.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as Shared;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};

use crate::hub::{ConnectionId, Topic};
use crate::outbox::{Closed, Outbox, Queued};
use crate::rpc::{self, Args, CallResult, Incoming, RpcError};
use crate::{State, filesystem, ports, process, terminal};

/// Largest incoming message (go-ethereum v1.13.4's limit).
const MAX_MESSAGE: usize = 32 << 20;
/// Keep-alive ping period (go-ethereum v1.13.4's); idle connections are never closed.
const PING_EVERY: Duration = Duration::from_secs(30);
/// Slow calls a connection may have in flight before envd stops reading its next message.
const MAX_IN_FLIGHT: usize = 64;
/// Frames written before the socket is flushed.
const FLUSH_EVERY: usize = 64;
/// Bytes a connection reads from its socket at a time. The websocket library's default (128 KiB)
/// is allocated and zeroed up front for every connection: a client holding 1000 idle websockets
/// cost envd 140 MB of the sandbox's memory. Larger messages still arrive whole (the buffer grows
/// for them); only idle connections get cheaper.
const READ_BUFFER: usize = 16 << 10;

/// How a call completes: now, or later without holding up the connection's next message.
pub(crate) enum Outcome {
    Ready(CallResult),
    Later(BoxFuture<'static, CallResult>),
}

/// A method of a service: checks its arguments and starts the work.
pub(crate) type Handler = fn(&Arc<State>, &Args) -> Result<Outcome, RpcError>;

/// Subscription names of a service: checks the arguments and says what to listen to.
pub(crate) type Subscriber = fn(&Arc<State>, &Args) -> Result<Topic, RpcError>;

/// `GET /ws`.
pub(crate) async fn upgrade(Shared(state): Shared<Arc<State>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| serve(socket, state))
}

async fn serve(socket: WebSocket, state: Arc<State>) {
    let connection = state.new_connection_id();
    let (outbox, queue) = Outbox::new();
    let (sink, stream) = socket.split();
    tokio::select! {
        () = write(sink, queue) => {}
        () = read(stream, &state, connection, &outbox) => {}
        () = outbox.closed() => {}
    }
    outbox.close();
    state.release(state.hub.remove_connection(connection));
}

async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    let start = tokio::time::Instant::now() + PING_EVERY;
    let mut ping = tokio::time::interval_at(start, PING_EVERY);
    loop {
        let written = tokio::select! {
            next = queue.recv() => match next {
                Some(first) => write_queued(&mut sink, &mut queue, first).await,
                None => return,
            },
            _ = ping.tick() => sink.send(Message::Ping(Bytes::new())).await,
        };
        if written.is_err() {
            return;
        }
    }
}

/// Writes `first` and whatever else is queued, then flushes; frames keep their share of the
/// connection's budget until they are on the socket.
async fn write_queued(
    sink: &mut SplitSink<WebSocket, Message>,
    queue: &mut mpsc::UnboundedReceiver<Queued>,
    first: Queued,
) -> Result<(), axum::Error> {
    let mut written = Vec::with_capacity(FLUSH_EVERY);
    let mut next = Some(first);
    while let Some(Queued { text, budget }) = next.take() {
        sink.feed(Message::Text(text.into())).await?;
        written.push(budget);
        if written.len() < FLUSH_EVERY {
            next = queue.try_recv().ok();
        }
    }
    sink.flush().await
}

async fn read(
    mut stream: SplitStream<WebSocket>,
    state: &Arc<State>,
    connection: ConnectionId,
    outbox: &Outbox,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(Ok(message)) = stream.next().await {
        let incoming = match &message {
            Message::Text(text) => rpc::parse(text.as_bytes()),
            Message::Binary(bytes) => rpc::parse(bytes),
            Message::Close(_) => return,
            // Pongs to the client's pings are sent by the websocket layer.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let call = Call {
            state,
            connection,
            outbox,
        };
        if call.handle(incoming, &in_flight).await.is_err() {
            return;
        }
    }
}

struct Call<'a> {
    state: &'a Arc<State>,
    connection: ConnectionId,
    outbox: &'a Outbox,
}

impl Call<'_> {
    async fn handle(&self, incoming: Incoming, in_flight: &Arc<Semaphore>) -> Result<(), Closed> {
        let (id, method, params) = match incoming {
            Incoming::Invalid { id, error } => return reply(self.outbox, &id, Err(error)).await,
            Incoming::Request { id, method, params } => (id, method, params),
        };
        let (service, name) = method.split_once('_').unwrap_or((method.as_str(), ""));
        match name {
            "subscribe" => self.subscribe(service, params, id).await,
            "unsubscribe" => {
                let result = self.unsubscribe(params);
                respond(self.outbox, id, result).await
            }
            _ => {
                let started = guard(|| dispatch(self.state, service, name, &method, params));
                match started {
                    Ok(Outcome::Later(work)) => {
                        let Ok(slot) = in_flight.clone().acquire_owned().await else {
                            return Err(Closed);
                        };
                        let outbox = self.outbox.clone();
                        tokio::spawn(async move {
                            let result = guard_async(work).await;
                            let _ = respond(&outbox, id, result).await;
                            drop(slot);
                        });
                        Ok(())
                    }
                    Ok(Outcome::Ready(result)) => respond(self.outbox, id, result).await,
                    Err(error) => respond(self.outbox, id, Err(error)).await,
                }
            }
        }
    }

    /// `<service>_subscribe [name, ...]`. The response is queued before the subscription is
    /// registered, so no notification can overtake it (the SDK would drop it).
    async fn subscribe(
        &self,
        service: &str,
        params: Option<Value>,
        id: Option<Value>,
    ) -> Result<(), Closed> {
        // A subscription without a request ID could never be named by its client.
        let Some(id) = id else {
            return Ok(());
        };
        let topic = match guard(|| subscription_topic(self.state, service, params)) {
            Ok(topic) => topic,
            Err(error) => return reply(self.outbox, &id, Err(error)).await,
        };
        let subscription = rpc::subscription_id();
        if let Err(closed) = reply(self.outbox, &id, Ok(Value::String(subscription.clone()))).await
        {
            self.state.release([topic]);
            return Err(closed);
        }
        let scans_ports = topic == Topic::OpenPorts;
        self.state.hub.insert(
            subscription.clone(),
            self.connection,
            topic,
            self.outbox.clone(),
        );
        if scans_ports {
            ports::spawn_scanner(self.state.clone(), subscription);
        }
        Ok(())
    }

    /// `<service>_unsubscribe [id]`: only the connection's own subscriptions.
    fn unsubscribe(&self, params: Option<Value>) -> CallResult {
        let args = Args::new(params)?;
        let subscription: String = args.at_most(1)?.required(0)?;
        let topic = self
            .state
            .hub
            .remove(self.connection, &subscription)
            .ok_or_else(|| RpcError::handler("subscription not found"))?;
        self.state.release([topic]);
        Ok(Value::Bool(true))
    }
}

fn dispatch(
    state: &Arc<State>,
    service: &str,
    name: &str,
    method: &str,
    params: Option<Value>,
) -> Result<Outcome, RpcError> {
    // Reads leave the sandbox as it was; anything else may change what a login shell's profile
    // reads. process_start decides for itself.
    if !matches!(
        (service, name),
        ("filesystem", "list" | "read" | "readBase64") | ("process", "start" | "stdin" | "kill")
    ) {
        state.first_shell.discard();
    }
    let handler = match service {
        "filesystem" => filesystem::method(name),
        "process" => process::method(name),
        "terminal" => terminal::method(name),
        _ => None,
    }
    .ok_or_else(|| RpcError::method_not_found(method))?;
    handler(state, &Args::new(params)?)
}

fn subscription_topic(
    state: &Arc<State>,
    service: &str,
    params: Option<Value>,
) -> Result<Topic, RpcError> {
    let name = match &params {
        Some(Value::Array(items)) => match items.first() {
            Some(Value::String(name)) => name.clone(),
            _ => {
                return Err(RpcError::invalid_params(
                    "expected subscription name as first argument",
                ));
            }
        },
        _ => return Err(RpcError::invalid_params("non-array args")),
    };
    let subscriber = match service {
        "filesystem" => filesystem::subscription(&name),
        "process" => process::subscription(&name),
        "terminal" => terminal::subscription(&name),
        "codeSnippet" => ports::subscription(&name),
        _ => None,
    }
    .ok_or_else(|| RpcError::subscription_not_found(service, &name))?;
    subscriber(state, &Args::new(params)?)
}

/// Runs a handler; a panic in it becomes an error response instead of taking envd down.
fn guard<T>(handler: impl FnOnce() -> Result<T, RpcError>) -> Result<T, RpcError> {
    catch_unwind(AssertUnwindSafe(handler)).unwrap_or_else(|_| Err(RpcError::crashed()))
}

/// [`guard`] for the part of a call that completes later.
async fn guard_async(work: BoxFuture<'static, CallResult>) -> CallResult {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(RpcError::crashed()))
}

/// Answers a call; notifications (no `id`) get no answer.
async fn respond(outbox: &Outbox, id: Option<Value>, result: CallResult) -> Result<(), Closed> {
    match id {
        Some(id) => reply(outbox, &id, result).await,
        None => Ok(()),
    }
}

async fn reply(outbox: &Outbox, id: &Value, result: CallResult) -> Result<(), Closed> {
    outbox.send(rpc::response(id, &result)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_handler_becomes_an_internal_error() {
        let crashed: Result<(), RpcError> = guard(|| panic!("handler bug"));
        assert_eq!(crashed, Err(RpcError::crashed()));
        assert_eq!(crashed.unwrap_err().code, rpc::INTERNAL_ERROR);
        assert_eq!(guard(|| Ok(1)), Ok(1));
    }

    #[tokio::test]
    async fn a_panicking_slow_call_becomes_an_internal_error() {
        let crashed = guard_async(Box::pin(async { panic!("handler bug") })).await;
        assert_eq!(crashed, Err(RpcError::crashed()));
        let fine = guard_async(Box::pin(async { Ok(Value::Null) })).await;
        assert_eq!(fine, Ok(Value::Null));
    }
}
