//! The Connect `process.Process` service on envd's socket, framed by hand as the E2B SDKs frame
//! it (e2b v2 wire spec §5-§6.1).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, StatusCode, header};
use serde_json::{Value, json};

use crate::{PATIENCE, Sandbox, eventually};

/// Extra request headers.
type Headers<'a> = &'a [(&'a str, &'a str)];

const MESSAGE: u8 = 0;
const END_STREAM: u8 = 2;

fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![flags];
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn message(value: &Value) -> Vec<u8> {
    envelope(MESSAGE, value.to_string().as_bytes())
}

fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

fn request(
    method: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Request<Full<Bytes>> {
    let mut request = Request::post(format!("/process.Process/{method}"))
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, content_type);
    if !headers
        .iter()
        .any(|(name, _)| *name == "connect-protocol-version")
    {
        request = request.header("connect-protocol-version", "1");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Full::new(Bytes::from(body))).unwrap()
}

/// A unary call: (HTTP status, JSON body).
async fn unary(sandbox: &Sandbox, method: &str, body: Value) -> (StatusCode, Value) {
    unary_raw(sandbox, method, &[], body.to_string().into_bytes()).await
}

async fn unary_raw(
    sandbox: &Sandbox,
    method: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let (response, body) = sandbox
        .http(request(method, "application/json", headers, body))
        .await;
    if response.status() != StatusCode::UNSUPPORTED_MEDIA_TYPE {
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (response.status(), value)
}

/// Asserts a unary error: its status and Connect code.
async fn unary_error(
    sandbox: &Sandbox,
    method: &str,
    body: Value,
    status: u16,
    code: &str,
) -> String {
    let (got, body) = unary(sandbox, method, body).await;
    assert_eq!(
        (got.as_u16(), body["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    body["message"].as_str().unwrap().to_owned()
}

/// The envelopes of a streamed response, read as they arrive.
struct Frames {
    body: Incoming,
    buffer: Vec<u8>,
    connection: tokio::task::JoinHandle<()>,
}

impl Frames {
    async fn next(&mut self) -> (u8, Value) {
        loop {
            if self.buffer.len() >= 5 {
                let length = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
                if self.buffer.len() >= 5 + length {
                    let flags = self.buffer[0];
                    let payload: Vec<u8> = self.buffer.drain(..5 + length).skip(5).collect();
                    return (flags, serde_json::from_slice(&payload).unwrap());
                }
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("envd answered in time")
                .expect("the stream ended without an end-of-stream envelope")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// The next message's event.
    async fn event(&mut self) -> Value {
        let (flags, message) = self.next().await;
        assert_eq!(flags, MESSAGE, "expected a message, got {message}");
        message["event"].clone()
    }

    /// The end-of-stream envelope, which must be the last.
    async fn end_of_stream(&mut self) -> Value {
        let (flags, message) = self.next().await;
        assert_eq!(
            flags, END_STREAM,
            "expected the end of the stream, got {message}"
        );
        assert!(self.buffer.is_empty());
        let rest = tokio::time::timeout(PATIENCE, self.body.frame())
            .await
            .unwrap();
        assert!(rest.is_none(), "nothing follows the end of the stream");
        message
    }

    /// Output until the end event: (stdout, stderr, pty, end).
    async fn run_to_end(&mut self) -> (String, String, String, Value) {
        let (mut stdout, mut stderr, mut pty) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let event = self.event().await;
            if let Some(data) = event.get("data") {
                let (target, text) = match data.as_object().unwrap().iter().next().unwrap() {
                    (kind, text) if kind == "stdout" => (&mut stdout, text),
                    (kind, text) if kind == "stderr" => (&mut stderr, text),
                    (kind, text) if kind == "pty" => (&mut pty, text),
                    other => panic!("unexpected output {other:?}"),
                };
                target.extend(STANDARD.decode(text.as_str().unwrap()).unwrap());
            } else if event.get("keepalive").is_some() {
            } else {
                let end = event.get("end").expect("data, keepalive or end").clone();
                let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
                return (text(stdout), text(stderr), text(pty), end);
            }
        }
    }

    /// Reads output until it contains `needle`.
    async fn output_until(&mut self, needle: &str) -> String {
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let event = self.event().await;
            let data = event
                .get("data")
                .unwrap_or_else(|| panic!("{event} before {needle:?}"));
            let text = data.as_object().unwrap().values().next().unwrap();
            seen.extend(STANDARD.decode(text.as_str().unwrap()).unwrap());
        }
        String::from_utf8(seen).unwrap()
    }

    /// The client goes away: its connection closes.
    fn disconnect(self) {
        self.connection.abort();
    }
}

async fn stream(
    sandbox: &Sandbox,
    method: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Frames {
    let (mut sender, connection) = sandbox.http_connection().await;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender
        .send_request(request(method, "application/connect+json", headers, body))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/connect+json"
    );
    Frames {
        body: response.into_body(),
        buffer: Vec::new(),
        connection,
    }
}

/// Starts a process; returns its stream after the start event, and its pid.
async fn start(sandbox: &Sandbox, request: Value, headers: &[(&str, &str)]) -> (Frames, u64) {
    let mut frames = stream(sandbox, "Start", headers, message(&request)).await;
    let event = frames.event().await;
    let pid = event["start"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("start first: {event}"));
    assert!(pid > 0);
    (frames, pid)
}

fn bash(script: &str) -> Value {
    json!({"cmd": "/bin/bash", "args": ["-l", "-c", script]})
}

#[tokio::test]
async fn start_streams_start_output_end_then_the_end_of_the_stream() {
    let sandbox = Sandbox::start().await;
    let (mut frames, _) = start(
        &sandbox,
        json!({"process": bash("echo hi"), "stdin": false}),
        &[],
    )
    .await;
    let (stdout, stderr, _, end) = frames.run_to_end().await;
    assert_eq!((stdout.as_str(), stderr.as_str()), ("hi\n", ""));
    assert_eq!(end, json!({"exited": true, "status": "exit status 0"}));
    assert_eq!(frames.end_of_stream().await, json!({}));

    let (mut frames, _) = start(
        &sandbox,
        json!({"process": bash("echo oops >&2; echo $GREETING $PWD; exit 3"),
               "stdin": false, "envs": null}),
        &[],
    )
    .await;
    let (stdout, stderr, _, end) = frames.run_to_end().await;
    assert_eq!(stderr, "oops\n");
    // An unset variable is no word; the directory is the sandbox's working directory.
    assert_eq!(stdout, format!("{}\n", sandbox.workdir.display()));
    assert_eq!(
        end,
        json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
    );
    assert_eq!(frames.end_of_stream().await, json!({}));

    // Variables and a directory relative to home.
    std::fs::create_dir(sandbox.home.join("sub")).unwrap();
    let process = json!({"cmd": "/bin/sh", "args": ["-c", "echo $GREETING; pwd"],
                         "envs": {"GREETING": "hello"}, "cwd": "sub"});
    let (mut frames, _) = start(&sandbox, json!({"process": process}), &[]).await;
    let (stdout, ..) = frames.run_to_end().await;
    assert_eq!(
        stdout,
        format!("hello\n{}\n", sandbox.home.join("sub").display())
    );
}

#[tokio::test]
async fn send_input_and_close_stdin() {
    let sandbox = Sandbox::start().await;
    let (mut frames, pid) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/cat"}, "stdin": true}),
        &[],
    )
    .await;
    let (status, body) = unary(
        &sandbox,
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}}),
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    assert_eq!(frames.output_until("hello\n").await, "hello\n");

    // A pipe process takes no terminal input.
    let message = unary_error(
        &sandbox,
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"pty": b64(b"x")}}),
        500,
        "internal",
    )
    .await;
    assert!(message.contains("tty not assigned"), "{message}");

    let (status, _) = unary(&sandbox, "CloseStdin", json!({"process": {"pid": pid}})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, _, end) = frames.run_to_end().await;
    assert_eq!(end["status"], "exit status 0");
    frames.end_of_stream().await;

    // Without stdin, the process reads end of file at once and input is refused.
    let process = json!({"cmd": "/bin/sh", "args": ["-c", "cat; echo eof; sleep 30"]});
    let (mut frames, pid) = start(&sandbox, json!({"process": process, "stdin": false}), &[]).await;
    assert_eq!(frames.output_until("eof\n").await, "eof\n");
    let message = unary_error(
        &sandbox,
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}}),
        500,
        "internal",
    )
    .await;
    assert!(message.contains("stdin not enabled or closed"), "{message}");
    unary(
        &sandbox,
        "SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    frames.run_to_end().await;
}

#[tokio::test]
async fn stream_input_feeds_stdin_until_the_client_closes() {
    let sandbox = Sandbox::start().await;
    let (mut frames, pid) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/cat"}, "stdin": true}),
        &[],
    )
    .await;
    let mut body = message(&json!({"start": {"process": {"pid": pid}}}));
    body.extend(message(
        &json!({"data": {"input": {"stdin": b64(b"one ")}}}),
    ));
    body.extend(message(&json!({"keepalive": {}})));
    body.extend(message(
        &json!({"data": {"input": {"stdin": b64(b"two\n")}}}),
    ));
    let mut input = stream(&sandbox, "StreamInput", &[], body).await;
    assert_eq!(input.next().await, (MESSAGE, json!({})));
    assert_eq!(input.end_of_stream().await, json!({}));
    assert_eq!(frames.output_until("two\n").await, "one two\n");

    // Data before the process is named, and an unknown process, end the stream with an error.
    let body = message(&json!({"data": {"input": {"stdin": b64(b"x")}}}));
    let mut input = stream(&sandbox, "StreamInput", &[], body).await;
    assert_eq!(
        input.end_of_stream().await["error"]["code"],
        "invalid_argument"
    );
    let body = message(&json!({"start": {"process": {"pid": 999_999_999u32}}}));
    let mut input = stream(&sandbox, "StreamInput", &[], body).await;
    assert_eq!(input.end_of_stream().await["error"]["code"], "not_found");

    unary(&sandbox, "CloseStdin", json!({"process": {"pid": pid}})).await;
    frames.run_to_end().await;
}

#[tokio::test]
async fn pty_processes_take_terminal_input_and_resize() {
    let sandbox = Sandbox::start().await;
    let process = json!({"cmd": "/bin/bash", "args": ["-c", "stty size; read line; echo got:$line; stty size"],
                         "envs": {"TERM": "xterm-256color"}});
    let (mut frames, pid) = start(
        &sandbox,
        json!({"process": process, "pty": {"size": {"cols": 80, "rows": 24}}}),
        &[],
    )
    .await;
    assert!(frames.output_until("24 80").await.contains("24 80"));

    let (status, _) = unary(
        &sandbox,
        "Update",
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 120, "rows": 40}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let message = unary_error(
        &sandbox,
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}}),
        500,
        "internal",
    )
    .await;
    assert!(message.contains("tty assigned"), "{message}");
    let message = unary_error(
        &sandbox,
        "CloseStdin",
        json!({"process": {"pid": pid}}),
        500,
        "unknown",
    )
    .await;
    assert!(message.contains("Ctrl+D"), "{message}");

    let (status, _) = unary(
        &sandbox,
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"pty": b64(b"abc\n")}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, pty, end) = frames.run_to_end().await;
    assert!(pty.contains("got:abc"), "{pty:?}");
    assert!(pty.contains("40 120"), "resized: {pty:?}");
    assert_eq!(end["status"], "exit status 0");

    // Resizing a process without a terminal fails.
    let (mut frames, pid) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}}),
        &[],
    )
    .await;
    let message = unary_error(
        &sandbox,
        "Update",
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 1, "rows": 1}}}),
        500,
        "internal",
    )
    .await;
    assert!(message.contains("tty not assigned"), "{message}");
    unary(
        &sandbox,
        "SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    frames.run_to_end().await;
}

#[tokio::test]
async fn send_signal_ends_the_process_group() {
    let sandbox = Sandbox::start().await;
    // bash with a child in the background: killing the group takes both.
    let (mut frames, pid) = start(
        &sandbox,
        json!({"process": bash("sleep 100 & echo $!; wait")}),
        &[],
    )
    .await;
    let child: i32 = frames.output_until("\n").await.trim().parse().unwrap();
    let (status, body) = unary(
        &sandbox,
        "SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    let (_, _, _, end) = frames.run_to_end().await;
    assert_eq!(
        end,
        json!({"exitCode": -1, "status": "signal: killed", "error": "signal: killed"})
    );
    frames.end_of_stream().await;
    eventually("the background child to die", || {
        !crate::live_group_members(i32::try_from(pid).unwrap()).contains(&child)
    })
    .await;

    let (mut frames, pid) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/sleep", "args": ["100"]}}),
        &[],
    )
    .await;
    unary_error(
        &sandbox,
        "SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_UNSPECIFIED"}),
        501,
        "unimplemented",
    )
    .await;
    let (status, _) = unary(
        &sandbox,
        "SendSignal",
        json!({"process": {"pid": pid}, "signal": 15}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, _, end) = frames.run_to_end().await;
    assert_eq!(end["status"], "signal: terminated");

    let message = unary_error(
        &sandbox,
        "SendSignal",
        json!({"process": {"pid": 999_999_999u32}, "signal": "SIGNAL_SIGKILL"}),
        404,
        "not_found",
    )
    .await;
    assert_eq!(message, "process with pid 999999999 not found");
}

#[tokio::test]
async fn list_shows_running_processes_with_their_config_and_tag() {
    let sandbox = Sandbox::start().await;
    let (status, body) = unary(&sandbox, "List", json!({})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));

    let process = json!({"cmd": "/bin/sleep", "args": ["100"], "envs": {"A": "1"}, "cwd": "/"});
    let (mut frames, pid) =
        start(&sandbox, json!({"process": process, "tag": "sleeper"}), &[]).await;
    let (_, body) = unary(&sandbox, "List", json!({})).await;
    assert_eq!(
        body,
        json!({"processes": [{"config": process, "pid": pid, "tag": "sleeper"}]})
    );

    // The tag selects the process too.
    unary(
        &sandbox,
        "SendSignal",
        json!({"process": {"tag": "sleeper"}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    frames.run_to_end().await;
    let (_, body) = unary(&sandbox, "List", json!({})).await;
    assert_eq!(body, json!({}));
}

#[tokio::test]
async fn connect_follows_a_running_process_and_replays_a_recent_end() {
    let sandbox = Sandbox::start().await;
    let (mut first, pid) = start(
        &sandbox,
        json!({"process": bash("read line; echo got:$line"), "stdin": true, "tag": "job"}),
        &[],
    )
    .await;
    for selector in [json!({"pid": pid}), json!({"tag": "job"})] {
        let mut second = stream(
            &sandbox,
            "Connect",
            &[],
            message(&json!({"process": selector})),
        )
        .await;
        assert_eq!(second.event().await, json!({"start": {"pid": pid}}));
        if selector.get("tag").is_some() {
            unary(
                &sandbox,
                "SendInput",
                json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x\n")}}),
            )
            .await;
            let (stdout, _, _, end) = second.run_to_end().await;
            assert_eq!(
                (stdout.as_str(), &end["status"]),
                ("got:x\n", &json!("exit status 0"))
            );
            second.end_of_stream().await;
        } else {
            // A follower that leaves does not disturb the others.
            second.disconnect();
        }
    }
    let (stdout, _, _, end) = first.run_to_end().await;
    assert_eq!(
        (stdout.as_str(), &end["status"]),
        ("got:x\n", &json!("exit status 0"))
    );

    // After the exit, Connect replays the start and the end.
    let mut late = stream(
        &sandbox,
        "Connect",
        &[],
        message(&json!({"process": {"pid": pid}})),
    )
    .await;
    assert_eq!(late.event().await, json!({"start": {"pid": pid}}));
    assert_eq!(late.event().await, json!({"end": end}));
    assert_eq!(late.end_of_stream().await, json!({}));

    let mut unknown = stream(
        &sandbox,
        "Connect",
        &[],
        message(&json!({"process": {"pid": 999_999_999u32}})),
    )
    .await;
    assert_eq!(
        unknown.end_of_stream().await,
        json!({"error": {"code": "not_found", "message": "process with pid 999999999 not found"}})
    );
}

#[tokio::test]
async fn a_process_outlives_the_client_that_started_it() {
    let sandbox = Sandbox::start().await;
    let (frames, pid) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/cat"}, "stdin": true}),
        &[],
    )
    .await;
    frames.disconnect();
    // Output nobody follows must not block the process: more than its followers' queues hold.
    let big = vec![b'x'; 4 << 20];
    let sent = unary(
        &sandbox,
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64(&big)}}),
    );
    let (status, _) = tokio::time::timeout(PATIENCE, sent)
        .await
        .expect("cat read its input");
    assert_eq!(status, StatusCode::OK);

    let mut again = stream(
        &sandbox,
        "Connect",
        &[],
        message(&json!({"process": {"pid": pid}})),
    )
    .await;
    assert_eq!(again.event().await, json!({"start": {"pid": pid}}));
    let (status, _) = unary(
        &sandbox,
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64(b"still here\n")}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        again
            .output_until("still here\n")
            .await
            .ends_with("still here\n")
    );
    unary(&sandbox, "CloseStdin", json!({"process": {"pid": pid}})).await;
    let (_, _, _, end) = again.run_to_end().await;
    assert_eq!(end["status"], "exit status 0");
}

#[tokio::test]
async fn the_timeout_of_start_is_the_lifetime_of_the_process() {
    let sandbox = Sandbox::start().await;
    let (mut frames, pid) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/sleep", "args": ["100"]}}),
        &[("connect-timeout-ms", "300")],
    )
    .await;
    let eos = frames.end_of_stream().await;
    assert_eq!(eos["error"]["code"], "deadline_exceeded", "{eos}");
    // The process was killed; its end is kept for a late Connect.
    let mut late = stream(
        &sandbox,
        "Connect",
        &[],
        message(&json!({"process": {"pid": pid}})),
    )
    .await;
    late.event().await;
    let (_, _, _, end) = late.run_to_end().await;
    assert_eq!(end["status"], "signal: killed");

    // Even when the client has gone.
    let (frames, pid) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/sleep", "args": ["100"]}}),
        &[("connect-timeout-ms", "300")],
    )
    .await;
    frames.disconnect();
    let mut follower = stream(
        &sandbox,
        "Connect",
        &[],
        message(&json!({"process": {"pid": pid}})),
    )
    .await;
    follower.event().await;
    let (_, _, _, end) = follower.run_to_end().await;
    assert_eq!(end["status"], "signal: killed");

    // 0 means no limit.
    let (mut frames, _) = start(
        &sandbox,
        json!({"process": bash("sleep 0.5; echo done")}),
        &[("connect-timeout-ms", "0")],
    )
    .await;
    assert_eq!(frames.run_to_end().await.0, "done\n");
}

#[tokio::test]
async fn silent_streams_send_keepalives() {
    let sandbox = Sandbox::start().await;
    let (mut frames, _) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/sleep", "args": ["2.5"]}}),
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    assert_eq!(frames.event().await, json!({"keepalive": {}}));
    assert_eq!(frames.event().await, json!({"keepalive": {}}));
    let (_, _, _, end) = frames.run_to_end().await;
    assert_eq!(end["status"], "exit status 0");
}

#[tokio::test]
async fn the_user_comes_from_basic_authorization() {
    let sandbox = Sandbox::start().await;
    let script = json!({"process": bash("echo $USER $HOME")});
    let (mut frames, _) = start(&sandbox, script.clone(), &[]).await;
    assert_eq!(
        frames.run_to_end().await.0,
        format!("user {}\n", sandbox.home.display())
    );

    // `root:` in base64.
    let (mut frames, _) = start(
        &sandbox,
        script.clone(),
        &[("authorization", "Basic cm9vdDo=")],
    )
    .await;
    assert_eq!(frames.run_to_end().await.0, "root /root\n");

    // `nosuchuser:`
    let mut refused = stream(
        &sandbox,
        "Start",
        &[("authorization", "Basic bm9zdWNodXNlcjo=")],
        message(&script),
    )
    .await;
    assert_eq!(
        refused.end_of_stream().await["error"]["code"],
        "unauthenticated"
    );
    let (status, body) = unary_raw(
        &sandbox,
        "List",
        &[("authorization", "Basic bm9zdWNodXNlcjo=")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), &body["code"]),
        (401, &json!("unauthenticated"))
    );
}

#[tokio::test]
async fn bad_requests_get_connect_errors_and_envd_keeps_serving() {
    let sandbox = Sandbox::start().await;
    unary_error(&sandbox, "Bogus", json!({}), 501, "unimplemented").await;
    let (status, body) = unary_raw(&sandbox, "List", &[], b"{not json".to_vec()).await;
    assert_eq!(
        (status.as_u16(), &body["code"]),
        (400, &json!("invalid_argument"))
    );
    let (status, body) = unary_raw(
        &sandbox,
        "SendSignal",
        &[],
        br#"{"signal":"SIGHUP"}"#.to_vec(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), &body["code"]),
        (400, &json!("invalid_argument"))
    );
    let (status, body) = unary_raw(
        &sandbox,
        "List",
        &[("connect-protocol-version", "2")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), &body["code"]),
        (400, &json!("invalid_argument"))
    );
    let (status, body) = unary_raw(
        &sandbox,
        "List",
        &[("content-encoding", "gzip")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), &body["code"]),
        (501, &json!("unimplemented"))
    );

    // A unary body to a stream method, and a stream to a unary one.
    let (response, _) = sandbox
        .http(request("Start", "application/json", &[], b"{}".to_vec()))
        .await;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (response, _) = sandbox
        .http(request(
            "List",
            "application/connect+json",
            &[],
            message(&json!({})),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let bad_streams: [(Vec<u8>, Headers, &str); 7] = [
        (envelope(MESSAGE, b"{\"process\":"), &[], "invalid_argument"),
        (
            message(&json!({"process": {"cmd": "/bin/true"}}))[..7].to_vec(),
            &[],
            "invalid_argument",
        ),
        (vec![0, 0xff, 0xff, 0xff, 0xff], &[], "resource_exhausted"),
        (envelope(1, b"x"), &[], "internal"),
        (Vec::new(), &[], "invalid_argument"),
        (
            message(&json!({"process": {"cmd": "/bin/true"}})),
            &[("connect-timeout-ms", "12345678901")],
            "invalid_argument",
        ),
        (
            message(&json!({"process": {"cmd": "/nonexistent"}})),
            &[],
            "invalid_argument",
        ),
    ];
    for (body, headers, code) in bad_streams {
        let mut frames = stream(&sandbox, "Start", headers, body).await;
        let eos = frames.end_of_stream().await;
        assert_eq!(eos["error"]["code"], code, "{eos}");
    }
    let mut frames = stream(
        &sandbox,
        "Start",
        &[],
        message(&json!({"process": {"cmd": "/bin/true", "cwd": "/no/such/dir"}})),
    )
    .await;
    let eos = frames.end_of_stream().await;
    assert_eq!(
        eos,
        json!({"error": {"code": "invalid_argument", "message": "cwd '/no/such/dir' does not exist"}})
    );

    let (status, _) = unary(&sandbox, "List", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (mut frames, _) = start(
        &sandbox,
        json!({"process": {"cmd": "/bin/echo", "args": ["alive"]}}),
        &[],
    )
    .await;
    assert_eq!(frames.run_to_end().await.0, "alive\n");
}
