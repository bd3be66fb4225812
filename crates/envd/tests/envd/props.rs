//! Property tests of what a client can send envd: arbitrary websocket frames (bytes, JSON,
//! requests with arbitrary methods and arguments) and arbitrary `/file` multipart bodies. envd
//! must not crash, must answer every request that has an id exactly once with that id and
//! either `result` or `error`, must refuse malformed uploads with 400, and must leave no
//! half-written upload behind.
//!
//! Only methods that cannot change the host are generated (these tests run envd outside a
//! sandbox): no `process_start`, `terminal_start` or filesystem writes and removals; upload
//! destinations stay inside the test's own home directory.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{Request, StatusCode, header};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{PATIENCE, Rpc, Sandbox};

/// Methods that only read or address things by client-chosen IDs (nothing exists under the
/// random IDs generated), with arbitrary arguments.
const METHODS: &[&str] = &[
    "filesystem_list",
    "filesystem_read",
    "filesystem_readBase64",
    "filesystem_subscribe",
    "filesystem_unsubscribe",
    "process_stdin",
    "process_kill",
    "process_subscribe",
    "process_unsubscribe",
    "terminal_data",
    "terminal_resize",
    "terminal_destroy",
    "terminal_subscribe",
    "terminal_unsubscribe",
    "codeSnippet_subscribe",
    "codeSnippet_unsubscribe",
];

/// Methods never generated: they run programs or write and remove files.
const UNSAFE: &[&str] = &[
    "process_start",
    "terminal_start",
    "filesystem_write",
    "filesystem_writeBase64",
    "filesystem_makeDir",
    "filesystem_remove",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-100i32..100).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        // Relative names (under the test's home) and a few absolute ones that are safe to read.
        "[a-zA-Z0-9 ._-]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("/"),
            Just("/proc/self/status"),
            Just("/nonexistent/x"),
            Just("onStdout"),
            Just("onExit"),
            Just("onData"),
            Just("watchDir"),
            Just("scanOpenedPorts"),
            Just("0x1")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(2, 16, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{0,5}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(METHODS).prop_map(str::to_owned),
        1 => "[a-zA-Z_]{0,20}".prop_filter("safe", |m| !UNSAFE.contains(&m.as_str())),
    ]
}

#[derive(Debug, Clone)]
enum Frame {
    /// Bytes that are not JSON: a parse error, answered with id `null`.
    NotJson { bytes: Vec<u8>, binary: bool },
    /// JSON that is not an object (batches included): an invalid request, id `null`.
    NotAnObject(Value),
    /// A request without an id: never answered.
    Notification { method: String, params: Value },
    /// A request with a (unique) id: answered exactly once.
    Call {
        method: String,
        params: Option<Value>,
        binary: bool,
    },
    /// An object with an id but no method: an invalid request, answered with that id.
    NoMethod,
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        1 => (prop::collection::vec(any::<u8>(), 0..64), any::<bool>())
            .prop_filter("not JSON", |(bytes, _)| serde_json::from_slice::<Value>(bytes).is_err())
            .prop_map(|(bytes, binary)| Frame::NotJson { bytes, binary }),
        1 => json_value()
            .prop_filter("not an object", |v| !v.is_object())
            .prop_map(Frame::NotAnObject),
        1 => (method(), json_value())
            .prop_map(|(method, params)| Frame::Notification { method, params }),
        4 => (method(), prop::option::of(json_value()), any::<bool>())
            .prop_map(|(method, params, binary)| Frame::Call { method, params, binary }),
        1 => Just(Frame::NoMethod),
    ]
}

/// The i-th unique id, cycling through the JSON types go-ethereum accepts.
fn id(i: usize) -> Value {
    match i % 3 {
        0 => json!(i),
        1 => json!(format!("id-{i}")),
        _ => json!(i as f64 + 0.5),
    }
}

async fn next_json(rpc: &mut Rpc) -> Result<Value, TestCaseError> {
    loop {
        let message = tokio::time::timeout(PATIENCE, rpc.ws.next())
            .await
            .map_err(|_| TestCaseError::fail("envd did not answer in time"))?
            .ok_or_else(|| TestCaseError::fail("envd closed the websocket"))?
            .map_err(|e| TestCaseError::fail(format!("websocket error: {e}")))?;
        match message {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str())
                    .map_err(|e| TestCaseError::fail(format!("envd sent non-JSON {text}: {e}")));
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => return Err(TestCaseError::fail(format!("unexpected frame {other:?}"))),
        }
    }
}

/// Sends `frames` (and a sentinel call) on a fresh connection and checks every answer.
async fn exchange(sandbox: &Sandbox, frames: Vec<Frame>) -> Result<(), TestCaseError> {
    let mut rpc = sandbox.rpc().await;
    let mut expected: HashMap<String, Option<i64>> = HashMap::new();
    let mut null_codes = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let message = match frame {
            Frame::NotJson { bytes, binary } => {
                null_codes.push(-32700);
                match String::from_utf8(bytes.clone()) {
                    Ok(text) if !binary => Message::text(text),
                    _ => Message::binary(bytes.clone()),
                }
            }
            Frame::NotAnObject(value) => {
                null_codes.push(-32600);
                Message::text(value.to_string())
            }
            Frame::Notification { method, params } => {
                // An empty method is no request at all: refused, with the id unknown.
                if method.is_empty() {
                    null_codes.push(-32600);
                }
                Message::text(
                    json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string(),
                )
            }
            Frame::Call {
                method,
                params,
                binary,
            } => {
                let mut request = json!({"jsonrpc": "2.0", "method": method, "id": id(i)});
                if let Some(params) = params {
                    request["params"] = params.clone();
                }
                let refused = method.is_empty().then_some(-32600);
                expected.insert(id(i).to_string(), refused);
                if *binary {
                    Message::binary(request.to_string().into_bytes())
                } else {
                    Message::text(request.to_string())
                }
            }
            Frame::NoMethod => {
                expected.insert(id(i).to_string(), Some(-32600));
                Message::text(json!({"jsonrpc": "2.0", "id": id(i)}).to_string())
            }
        };
        rpc.ws
            .send(message)
            .await
            .map_err(|e| TestCaseError::fail(format!("send: {e}")))?;
    }

    let mut answered: HashMap<String, usize> = HashMap::new();
    let mut nulls = Vec::new();
    // Until every id is answered; then a sentinel call, after whose answer nothing else may
    // have arrived (a second answer to any call would show up here).
    let mut sentinel_sent = false;
    loop {
        if !sentinel_sent && answered.len() == expected.len() && nulls.len() == null_codes.len() {
            let sentinel = json!({"jsonrpc": "2.0", "method": "sentinel", "id": "sentinel"});
            rpc.send_text(&sentinel.to_string()).await;
            sentinel_sent = true;
        }
        let message = next_json(&mut rpc).await?;
        let Some(id) = message.get("id") else {
            prop_assert!(
                message.get("method").is_some(),
                "neither a response nor a notification: {message}"
            );
            continue;
        };
        prop_assert_eq!(&message["jsonrpc"], "2.0");
        prop_assert!(
            message.get("result").is_some() != message.get("error").is_some(),
            "a response needs exactly one of result and error: {message}"
        );
        if let Some(error) = message.get("error") {
            prop_assert!(
                error["code"].is_i64() && error["message"].is_string(),
                "{message}"
            );
        }
        if id == "sentinel" {
            prop_assert!(sentinel_sent);
            break;
        }
        if id.is_null() {
            nulls.push(message["error"]["code"].as_i64().unwrap_or_default());
            continue;
        }
        let key = id.to_string();
        let Some(want_code) = expected.get(&key) else {
            return Err(TestCaseError::fail(format!(
                "a response to an id never sent: {message}"
            )));
        };
        if let Some(code) = want_code {
            prop_assert_eq!(&message["error"]["code"], &json!(code), "{}", message);
        }
        *answered.entry(key).or_default() += 1;
    }
    prop_assert!(
        answered.values().all(|&n| n == 1),
        "answers per id: {answered:?}"
    );
    prop_assert_eq!(answered.len(), expected.len());
    nulls.sort_unstable();
    null_codes.sort_unstable();
    prop_assert_eq!(nulls, null_codes);
    Ok(())
}

/// proptest's defaults, without writing regression files next to the sources (the runner is
/// driven by hand here, so it cannot tell where they would go).
fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[test]
fn every_request_with_an_id_gets_exactly_one_answer() {
    let runtime = runtime();
    let sandbox = runtime.block_on(Sandbox::start());
    let mut runner = TestRunner::new(config());
    runner
        .run(&prop::collection::vec(frame(), 1..24), |frames| {
            runtime.block_on(exchange(&sandbox, frames))
        })
        .unwrap();
    // Still serving after everything it was sent.
    runtime.block_on(async {
        let (response, body) = sandbox.http(get("/ping")).await;
        assert_eq!(
            (response.status(), body),
            (StatusCode::OK, Bytes::from("pong"))
        );
    });
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header(header::HOST, "49982-sid-cid.localhost")
        .body(Full::default())
        .unwrap()
}

/// One part of a multipart body.
#[derive(Debug, Clone)]
struct Part {
    name: String,
    filename: Option<String>,
    content: Vec<u8>,
}

fn part() -> impl Strategy<Value = Part> {
    let name = prop_oneof![
        3 => Just("file".to_owned()),
        // Destinations are single names: they resolve inside the test's home.
        2 => Just("path".to_owned()),
        1 => "[a-z]{0,6}",
    ];
    let filename = prop::option::of(prop_oneof![
        "[a-zA-Z0-9._-]{1,12}",
        // Names that must not escape the home directory or break the header.
        Just("../../escape".to_owned()),
        Just("/etc/escape".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        "[ -~]{0,12}",
        ".{0,8}",
    ]);
    let content = prop::collection::vec(any::<u8>(), 0..300);
    (name, filename, content).prop_map(|(name, filename, content)| Part {
        content: if name == "path" {
            // A single relative name, possibly empty.
            content
                .iter()
                .map(|b| b"abcdefghij"[usize::from(*b) % 10])
                .take(10)
                .collect()
        } else {
            content
        },
        name,
        filename,
    })
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => Just(Damage::None),
        1 => any::<usize>().prop_map(Damage::Truncate),
        1 => (any::<usize>(), 1u8..).prop_map(|(at, bits)| Damage::Flip(at, bits)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Damage::Insert(at, bytes)),
    ]
}

const BOUNDARY: &str = "proptestboundary";

fn encode(parts: &[Part], damage: &Damage) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        body.extend_from_slice(b"Content-Disposition: form-data; name=\"");
        body.extend_from_slice(part.name.as_bytes());
        body.push(b'"');
        if let Some(filename) = &part.filename {
            body.extend_from_slice(b"; filename=\"");
            body.extend_from_slice(filename.as_bytes());
            body.push(b'"');
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(&part.content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    match damage {
        Damage::None => {}
        Damage::Truncate(at) => body.truncate(at % (body.len() + 1)),
        Damage::Flip(at, bits) => {
            let len = body.len();
            body[at % len] ^= bits;
        }
        Damage::Insert(at, bytes) => {
            let at = at % (body.len() + 1);
            body.splice(at..at, bytes.iter().copied());
        }
    }
    body
}

fn upload_leftovers(sandbox: &Sandbox) -> Vec<String> {
    std::fs::read_dir(&sandbox.home)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".burrow-upload"))
        .collect()
}

async fn upload(
    sandbox: &Sandbox,
    parts: Vec<Part>,
    damage: Damage,
    content_type: Option<String>,
) -> Result<(), TestCaseError> {
    let body = encode(&parts, &damage);
    let mut request = Request::post("/file").header(header::HOST, "49982-sid-cid.localhost");
    if let Some(content_type) = &content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let (response, answer) = sandbox.http(request).await;
    let status = response.status();
    let well_formed = matches!(damage, Damage::None)
        && content_type.as_deref() == Some(&format!("multipart/form-data; boundary={BOUNDARY}"));
    let has_file = parts.iter().any(|p| p.name == "file");
    // A damaged body can name a path inside a directory that does not exist: creating it fails,
    // which the original envd answered 500 (wire spec §6); nothing else may be a 500.
    let missing_dir = status == StatusCode::INTERNAL_SERVER_ERROR
        && answer.ends_with(b"no such file or directory");
    prop_assert!(
        status == StatusCode::OK || status == StatusCode::BAD_REQUEST || missing_dir,
        "upload answered {status}: {answer:?}"
    );
    if well_formed && !has_file {
        prop_assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "no file field: {:?}",
            answer
        );
    }
    if status == StatusCode::OK {
        prop_assert!(has_file, "accepted without a file field");
    }
    prop_assert!(
        upload_leftovers(sandbox).is_empty(),
        "a staged upload was left behind"
    );
    // Nothing may land outside the home directory, whatever the client's file name says.
    let outside = sandbox.home.parent().unwrap();
    for entry in std::fs::read_dir(outside).unwrap().flatten() {
        let name = entry.file_name();
        prop_assert!(
            name == "home" || name == "work" || name == "envd.sock",
            "an upload escaped the home directory: {:?}",
            entry.path()
        );
    }
    Ok(())
}

#[test]
fn any_upload_body_is_stored_or_refused_with_400() {
    let runtime = runtime();
    let sandbox = runtime.block_on(Sandbox::start());
    let content_type = prop_oneof![
        4 => Just(Some(format!("multipart/form-data; boundary={BOUNDARY}"))),
        1 => Just(Some("multipart/form-data".to_owned())),
        1 => Just(Some("multipart/form-data; boundary=other".to_owned())),
        1 => Just(Some("application/json".to_owned())),
        1 => Just(None),
        1 => "[ -~]{0,40}".prop_map(Some),
    ];
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(prop::collection::vec(part(), 0..4), damage(), content_type),
            |(parts, damage, content_type)| {
                runtime.block_on(upload(&sandbox, parts, damage, content_type))
            },
        )
        .unwrap();
    runtime.block_on(async {
        let (response, _) = sandbox.http(get("/ping")).await;
        assert_eq!(response.status(), StatusCode::OK);
    });
}

#[test]
fn any_download_query_is_answered() {
    let runtime = runtime();
    let sandbox = runtime.block_on(Sandbox::start());
    std::fs::write(sandbox.home.join("present"), b"here").unwrap();
    // Raw query strings: percent-escapes (valid and broken, UTF-8 or not), separators, names.
    let query = prop::collection::vec(
        prop_oneof![
            Just("path=".to_owned()),
            Just("path=present".to_owned()),
            Just("&".to_owned()),
            Just("=".to_owned()),
            Just("%".to_owned()),
            "%[0-9A-Fa-f]{2}",
            "%[g-z]{2}",
            "[a-z0-9._]{1,6}",
            Just("+".to_owned()),
        ],
        0..8,
    )
    .prop_map(|pieces| pieces.concat());
    let mut runner = TestRunner::new(config());
    runner
        .run(&query, |query| {
            runtime.block_on(async {
                let Ok(request) = Request::get(format!("/file?{query}"))
                    .header(header::HOST, "49982-sid-cid.localhost")
                    .body(Full::default())
                else {
                    return Ok(());
                };
                let (response, _) = sandbox.http(request).await;
                let status = response.status();
                prop_assert!(
                    [
                        StatusCode::OK,
                        StatusCode::BAD_REQUEST,
                        StatusCode::NOT_FOUND
                    ]
                    .contains(&status),
                    "GET /file?{} answered {}",
                    query,
                    status
                );
                Ok(())
            })
        })
        .unwrap();
}
