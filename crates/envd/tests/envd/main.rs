//! End-to-end tests of envd: a real server on a unix socket in a temporary directory, spoken to
//! over real websocket JSON-RPC and HTTP, as the gateway and the SDK speak to it.

mod connect;
mod connect_fs;
mod filesystem;
mod http;
mod ports;
mod process;
mod props;
mod rpc;
mod symlinks;
mod terminal;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_envd::Config;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for anything a test waits for.
const PATIENCE: Duration = Duration::from_secs(15);

/// One envd serving a fresh home directory.
pub struct Sandbox {
    root: PathBuf,
    pub home: PathBuf,
    /// The default working directory, beside home.
    pub workdir: PathBuf,
    socket: PathBuf,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Sandbox {
    pub async fn start() -> Self {
        Self::start_with_home(|_| ()).await
    }

    /// Starts envd once `prepare` has filled the home directory.
    pub async fn start_with_home(prepare: impl FnOnce(&std::path::Path)) -> Self {
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        Self::start_as(uid.as_raw(), gid.as_raw(), prepare).await
    }

    /// Starts envd for the sandbox user `uid`/`gid` (envd itself runs as this test process),
    /// once `prepare` has filled the home directory, which then is the user's.
    pub async fn start_as(uid: u32, gid: u32, prepare: impl FnOnce(&std::path::Path)) -> Self {
        let root = std::env::temp_dir().join(format!(
            "burrow-envd-test-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let home = root.join("home");
        std::fs::create_dir_all(&home).unwrap();
        prepare(&home);
        if (uid, gid)
            != (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            )
        {
            std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
        }
        let workdir = root.join("work");
        std::fs::create_dir_all(&workdir).unwrap();
        let socket = root.join("envd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let config = Config {
            uid,
            gid,
            user: "user".to_owned(),
            home: home.clone(),
            workdir: workdir.clone(),
            ready_shell: true,
            shell: "/bin/bash".into(),
            env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
        };
        let server = tokio::spawn(burrow_envd::serve(listener, config));
        let sandbox = Self {
            root,
            home,
            workdir,
            socket,
            server,
        };
        // As the server does once it has started a sandbox (which starts envd's first shell).
        let ping = Request::get("/ping")
            .header("host", "envd")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (response, body) = sandbox.http(ping).await;
        assert_eq!((response.status().as_u16(), &body[..]), (200, &b"pong"[..]));
        sandbox
    }

    /// A path inside the home directory, as a string for JSON.
    pub fn path(&self, relative: &str) -> String {
        self.home.join(relative).display().to_string()
    }

    pub async fn rpc(&self) -> Rpc {
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        let (ws, response) = tokio_tungstenite::client_async("ws://localhost/ws", stream)
            .await
            .unwrap();
        assert_eq!(response.status(), 101);
        Rpc {
            ws,
            next_id: 1,
            backlog: VecDeque::new(),
        }
    }

    /// Sends one HTTP/1.1 request over the socket; the response body is read whole.
    pub async fn http(&self, request: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
        let (mut sender, connection) = self.http_connection().await;
        tokio::spawn(connection);
        let response = sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (Response::from_parts(parts, ()), body)
    }

    pub async fn http_connection(
        &self,
    ) -> (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        hyper::client::conn::http1::Connection<hyper_util::rt::TokioIo<UnixStream>, Full<Bytes>>,
    ) {
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A JSON-RPC client over one websocket, keeping notifications that arrive while it waits for
/// a response.
pub struct Rpc {
    ws: WebSocketStream<UnixStream>,
    next_id: i64,
    backlog: VecDeque<Value>,
}

impl Rpc {
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Calls `method` with an integer ID and returns the whole response.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        self.send_text(&request.to_string()).await;
        let response = self.response().await;
        assert_eq!(
            response["id"],
            json!(id),
            "response to another call: {response}"
        );
        response
    }

    /// The result of a call that must succeed.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let response = self.call(method, params).await;
        assert!(
            response.get("error").is_none(),
            "{method} failed: {response}"
        );
        response.get("result").cloned().expect("result key present")
    }

    /// The error of a call that must fail: (code, message).
    pub async fn error(&mut self, method: &str, params: Value) -> (i64, String) {
        let response = self.call(method, params).await;
        let error = &response["error"];
        assert!(error.is_object(), "{method} should fail: {response}");
        (
            error["code"].as_i64().unwrap(),
            error["message"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn subscribe(&mut self, service: &str, params: Value) -> String {
        let id = self.ok(&format!("{service}_subscribe"), params).await;
        id.as_str()
            .expect("subscription IDs are strings")
            .to_owned()
    }

    /// The next message that has an `id` (a response).
    pub async fn response(&mut self) -> Value {
        loop {
            let message = self.next_message().await;
            if message.get("id").is_some() {
                return message;
            }
            self.backlog.push_back(message);
        }
    }

    /// The next notification, in arrival order.
    pub async fn notification(&mut self) -> Value {
        if let Some(message) = self.backlog.pop_front() {
            return message;
        }
        let message = self.next_message().await;
        assert!(message.get("id").is_none(), "unexpected response {message}");
        message
    }

    /// Whether a notification arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> bool {
        if !self.backlog.is_empty() {
            return false;
        }
        tokio::time::timeout(wait, self.next_message())
            .await
            .is_err()
    }

    async fn next_message(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("envd answered in time")
                .expect("websocket open")
                .expect("websocket frame");
            match message {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

/// Notification helpers shared by the service tests.
pub fn subscription_of(notification: &Value) -> &str {
    notification["params"]["subscription"].as_str().unwrap()
}

pub fn result_of(notification: &Value) -> &Value {
    &notification["params"]["result"]
}

/// What one process printed, as the SDK would collect it.
#[derive(Debug, Default)]
pub struct Run {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub timestamps: Vec<u64>,
    pub exit: Option<Value>,
    /// Notifications that came after the exit notification (must stay empty).
    pub late: usize,
}

/// Subscribes to a process's three streams, starts it, and collects everything up to its exit.
pub async fn run(rpc: &mut Rpc, id: &str, cmd: &str, env: Value, cwd: &str) -> Run {
    let (stdout, stderr, exit) = subscribe_process(rpc, id).await;
    let started = rpc.ok("process_start", json!([id, cmd, env, cwd])).await;
    assert_eq!(started, json!(id));
    collect(rpc, &stdout, &stderr, &exit).await
}

pub async fn subscribe_process(rpc: &mut Rpc, id: &str) -> (String, String, String) {
    (
        rpc.subscribe("process", json!(["onStdout", id])).await,
        rpc.subscribe("process", json!(["onStderr", id])).await,
        rpc.subscribe("process", json!(["onExit", id])).await,
    )
}

pub async fn collect(rpc: &mut Rpc, stdout: &str, stderr: &str, exit: &str) -> Run {
    let mut run = Run::default();
    while run.exit.is_none() {
        let notification = rpc.notification().await;
        assert_eq!(notification["method"], "process_subscription");
        let result = result_of(&notification).clone();
        let subscription = subscription_of(&notification);
        if subscription == exit {
            run.exit = Some(result);
            continue;
        }
        let line = result["line"].as_str().unwrap().to_owned();
        run.timestamps.push(result["timestamp"].as_u64().unwrap());
        if subscription == stdout {
            assert_eq!(result["type"], "Stdout");
            run.stdout.push(line);
        } else {
            assert_eq!(subscription, stderr);
            assert_eq!(result["type"], "Stderr");
            run.stderr.push(line);
        }
    }
    while !rpc.quiet_for(Duration::from_millis(100)).await {
        rpc.notification().await;
        run.late += 1;
    }
    run
}

/// Waits until `condition` holds, polling.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) =
            std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
        else {
            continue;
        };
        // Fields after the parenthesised name: state, ppid, pgrp, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            members.push(pid);
        }
    }
    members
}
