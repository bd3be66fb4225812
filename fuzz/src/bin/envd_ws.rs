//! envd's JSON-RPC websocket, the whole way a client's frames take: HTTP upgrade, websocket
//! framing, `rpc::parse`, dispatch to the services, handlers, responses and notifications.
//!
//! Each input is a sequence of messages, one per line (a line that is not UTF-8 goes as a binary
//! frame), sent over one fresh websocket to envd's real router, in memory. envd runs in a
//! [`Jail`], so file RPCs may name any path. Calls that start programs (`process_start`,
//! `terminal_start`) are not sent: a fuzzer must not run what it finds.
//!
//! Invariants: the connection stays open; every frame is valid JSON-RPC 2.0 text; each message
//! that needs an answer (by envd's own classification: a call with an `id`, or a refused
//! message) gets exactly one, carrying its id (floats: see `as_read_back`), with exactly one of `result` or `error`, an error
//! being `{code, message}` (the refusal's own code for refused messages); a notification names a
//! subscription this connection was given; everything is answered within five seconds.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use burrow_envd::fuzzing::{Parsed, parse};
use burrow_fuzz::JailedEnvd;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;

/// Messages sent per input at most.
const MAX_MESSAGES: usize = 64;
/// How long envd may take to answer everything (all in memory, on small files).
const PATIENCE: Duration = Duration::from_secs(5);
/// Methods that run programs.
const NOT_SENT: &[&str] = &["process_start", "terminal_start"];

/// The answer a message must get.
#[derive(Clone)]
struct Expected {
    id: Value,
    /// The error code of a refused message.
    code: Option<i64>,
    /// A `<service>_subscribe` call, whose result is a subscription ID.
    subscribe: bool,
}

/// One message to send, and its answer if it gets one.
struct Outgoing {
    frame: Message,
    answer: Option<Expected>,
}

/// The id as a client reads it back from envd's answer. envd keeps an id as a parsed JSON value
/// and writes it out again, and serde_json's default float parsing is not correctly rounded:
/// `9.666666666666667e+32` comes back as `9.666666666666668e+32` (and integers past `u64` come
/// back as floats). Known and reported (go-ethereum echoes an id's bytes); modelled here so
/// that the target keeps looking for other faults. Integers and strings are unaffected.
fn as_read_back(id: Value) -> Value {
    if id.is_f64() {
        serde_json::from_str(&id.to_string()).unwrap_or(id)
    } else {
        id
    }
}

fn outgoing(line: &[u8]) -> Option<Outgoing> {
    let answer = match parse(line) {
        Parsed::Call { method, .. } if NOT_SENT.contains(&method.as_str()) => return None,
        Parsed::Call { id, method, .. } => id.map(|id| Expected {
            id: as_read_back(id),
            code: None,
            subscribe: method
                .split_once('_')
                .is_some_and(|(_, name)| name == "subscribe"),
        }),
        Parsed::Refused { id, code, .. } => Some(Expected {
            id: as_read_back(id),
            code: Some(code),
            subscribe: false,
        }),
    };
    let frame = match std::str::from_utf8(line) {
        Ok(text) => Message::text(text),
        Err(_) => Message::binary(line.to_vec()),
    };
    Some(Outgoing { frame, answer })
}

fn check_error(error: &Value, want_code: Option<i64>, context: &Value) {
    let Some(object) = error.as_object() else {
        panic!("an error that is not an object: {context}");
    };
    let code = object.get("code").and_then(Value::as_i64);
    assert!(
        object.len() == 2 && code.is_some() && object.get("message").is_some_and(Value::is_string),
        "an error not in the {{code, message}} shape: {context}"
    );
    if let Some(want) = want_code {
        assert_eq!(
            code,
            Some(want),
            "a refusal answered with another code: {context}"
        );
    }
}

/// Checks one frame from envd, crossing off the answer it is.
fn receive(
    object: &Map<String, Value>,
    frame: &Value,
    pending: &mut Vec<Expected>,
    subscriptions: &mut Vec<String>,
) {
    assert_eq!(object.get("jsonrpc"), Some(&Value::from("2.0")), "{frame}");
    if let Some(method) = object.get("method") {
        // A notification: `<service>_subscription` for a subscription of this connection.
        let named = method
            .as_str()
            .is_some_and(|m| m.ends_with("_subscription"));
        let subscription = frame["params"]["subscription"].as_str();
        assert!(
            named && subscription.is_some_and(|s| subscriptions.iter().any(|t| t == s)),
            "a notification of no subscription of this connection: {frame}"
        );
        assert!(
            object.get("id").is_none(),
            "a notification with an id: {frame}"
        );
        return;
    }
    let id = object
        .get("id")
        .unwrap_or_else(|| panic!("an answer without an id: {frame}"));
    // Several messages may share an id (`null` for every refusal of a non-object): an error
    // crosses off a refusal with its code first (calls never fail with a refusal's code), then
    // a call.
    let code = frame["error"]["code"].as_i64();
    let position = pending
        .iter()
        .position(|want| &want.id == id && want.code.is_some() && want.code == code)
        .or_else(|| {
            pending
                .iter()
                .position(|want| &want.id == id && want.code.is_none())
        })
        .unwrap_or_else(|| panic!("an answer to nothing sent, or a second one: {frame}"));
    let expected = pending.remove(position);
    match (object.get("result"), object.get("error")) {
        (Some(result), None) => {
            assert!(
                expected.code.is_none(),
                "a refused message got a result: {frame}"
            );
            if expected.subscribe {
                // go-ethereum's format: `0x` and lowercase hex digits without leading zeros.
                let id = result
                    .as_str()
                    .and_then(|r| r.strip_prefix("0x"))
                    .filter(|hex| {
                        (1..=32).contains(&hex.len())
                            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                            && (*hex == "0" || !hex.starts_with('0'))
                    })
                    .unwrap_or_else(|| panic!("a subscription ID of the wrong shape: {frame}"));
                subscriptions.push(format!("0x{id}"));
            }
        }
        (None, Some(error)) => check_error(error, expected.code, frame),
        _ => panic!("not exactly one of result and error: {frame}"),
    }
    assert_eq!(object.len(), 3, "extra keys in an answer: {frame}");
}

async fn exchange(router: axum::Router, messages: Vec<Outgoing>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), TowerToHyperService::new(router))
            .with_upgrades(),
    );
    let (socket, _) = tokio_tungstenite::client_async("ws://localhost/ws", client)
        .await
        .expect("the websocket upgrade");
    let (mut sink, mut stream) = socket.split();
    let mut pending: Vec<Expected> = messages.iter().filter_map(|m| m.answer.clone()).collect();
    let frames: Vec<Message> = messages.into_iter().map(|m| m.frame).collect();
    let send = async move {
        for frame in frames {
            sink.send(frame).await.expect("envd took a frame");
        }
        sink
    };
    let read = async {
        let mut subscriptions = Vec::new();
        while !pending.is_empty() {
            let frame = match stream.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("envd sent {other:?} with {} answers missing", pending.len()),
            };
            let value: Value = serde_json::from_str(frame.as_str())
                .unwrap_or_else(|e| panic!("envd sent non-JSON ({e}): {frame}"));
            let object = value
                .as_object()
                .unwrap_or_else(|| panic!("envd sent a non-object: {value}"));
            receive(object, &value, &mut pending, &mut subscriptions);
        }
    };
    let (sink, ()) = tokio::time::timeout(PATIENCE, async { tokio::join!(send, read) })
        .await
        .unwrap_or_else(|_| panic!("envd did not answer everything within {PATIENCE:?}"));
    let mut socket = sink.reunite(stream).expect("the two halves of one socket");
    // Closing ends the connection's subscriptions (and its directory watches) in envd.
    let _ = socket.close(None).await;
}

fn main() {
    // Built on the first input, in the process AFL forked (not in its fork server). A panic ends
    // the process (the hook aborts), so nothing sees the state after one: asserting unwind
    // safety is sound.
    let mut envd = AssertUnwindSafe(None::<JailedEnvd>);
    afl::fuzz(true, move |data: &[u8]| {
        let envd = envd.get_or_insert_with(|| JailedEnvd::start("envd-ws"));
        let messages: Vec<Outgoing> = data
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .take(MAX_MESSAGES)
            .filter_map(outgoing)
            .collect();
        envd.runtime
            .block_on(exchange(envd.router.clone(), messages));
        envd.jail.reset().expect("the jail emptied");
    });
}
