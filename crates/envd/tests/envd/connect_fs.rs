//! The Connect `filesystem.Filesystem` service and `/files` on envd's socket, as the E2B SDKs
//! call them (e2b v2 wire spec §4.3, §5, §6.2).

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode, header};
use serde_json::{Value, json};

use crate::Sandbox;

/// A unary call: (HTTP status, JSON body).
async fn call(sandbox: &Sandbox, method: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::post(format!("/filesystem.Filesystem/{method}"))
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, "application/json")
        .header("connect-protocol-version", "1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (response, body) = sandbox.http(request).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    (response.status(), serde_json::from_slice(&body).unwrap())
}

/// Asserts a unary error's status and Connect code.
async fn fails(sandbox: &Sandbox, method: &str, body: Value, status: StatusCode, code: &str) {
    let (got, error) = call(sandbox, method, body).await;
    assert_eq!(
        (got, error["code"].as_str()),
        (status, Some(code)),
        "{error}"
    );
    assert!(!error["message"].as_str().unwrap().is_empty());
}

fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .map_or_else(|| nix::unistd::getuid().to_string(), |user| user.name)
}

fn group_name() -> String {
    nix::unistd::Group::from_gid(nix::unistd::getgid())
        .unwrap()
        .map_or_else(|| nix::unistd::getgid().to_string(), |group| group.name)
}

#[tokio::test]
async fn stat_answers_proto3_json_entries() {
    let sandbox = Sandbox::start_with_home(|home| {
        std::fs::write(home.join("a.txt"), "twelve bytes").unwrap();
        std::fs::set_permissions(home.join("a.txt"), PermissionsExt::from_mode(0o640)).unwrap();
        std::fs::create_dir(home.join("dir")).unwrap();
        std::fs::set_permissions(home.join("dir"), PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(home.join("empty"), "").unwrap();
        std::fs::set_permissions(home.join("empty"), PermissionsExt::from_mode(0o644)).unwrap();
        symlink("dir", home.join("link")).unwrap();
    })
    .await;

    let (status, body) = call(&sandbox, "Stat", json!({"path": "a.txt"})).await;
    assert_eq!(status, StatusCode::OK);
    let entry = &body["entry"];
    let modified = entry["modifiedTime"].as_str().unwrap().to_owned();
    let mtime = std::fs::metadata(sandbox.home.join("a.txt"))
        .unwrap()
        .mtime();
    assert!(
        modified.ends_with('Z') && modified.len() >= 20,
        "{modified}"
    );
    let expected_second = chrono_free_second(mtime);
    assert!(
        modified.starts_with(&expected_second),
        "{modified} vs {expected_second}"
    );
    assert_eq!(
        entry,
        &json!({
            "name": "a.txt",
            "type": "FILE_TYPE_FILE",
            "path": sandbox.path("a.txt"),
            "size": "12",
            "mode": 0o640,
            "permissions": "-rw-r-----",
            "owner": user_name(),
            "group": group_name(),
            "modifiedTime": modified,
        })
    );

    let (_, body) = call(&sandbox, "Stat", json!({"path": "~/dir"})).await;
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(body["entry"]["permissions"], "drwxr-xr-x");
    assert_eq!(body["entry"]["mode"], 0o755);

    // A default-valued size is omitted, as proto3 JSON omits every default.
    let (_, body) = call(&sandbox, "Stat", json!({"path": sandbox.path("empty")})).await;
    assert!(body["entry"].get("size").is_none(), "{body}");

    // A symlink: its target's type and mode, its own permissions string, and its target.
    let (_, body) = call(&sandbox, "Stat", json!({"path": "link"})).await;
    let link = &body["entry"];
    assert_eq!(link["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(link["symlinkTarget"], "dir");
    assert_eq!(link["permissions"], "Lrwxrwxrwx");
    assert_eq!(link["mode"], 0o755);

    fails(
        &sandbox,
        "Stat",
        json!({"path": "missing"}),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    fails(
        &sandbox,
        "Stat",
        json!({"path": ""}),
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    )
    .await;
    fails(
        &sandbox,
        "Watch",
        json!({}),
        StatusCode::NOT_IMPLEMENTED,
        "unimplemented",
    )
    .await;
}

/// `YYYY-MM-DDTHH:MM:SS` of a unix time, computed with `date` so that the test does not
/// repeat envd's own arithmetic.
fn chrono_free_second(unix: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn make_dir_move_and_remove() {
    let sandbox = Sandbox::start_with_home(|home| {
        std::fs::write(home.join("file"), "x").unwrap();
    })
    .await;

    let (status, body) = call(&sandbox, "MakeDir", json!({"path": "a/b/c"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["entry"]["path"], sandbox.path("a/b/c"));
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert!(sandbox.home.join("a/b/c").is_dir());
    fails(
        &sandbox,
        "MakeDir",
        json!({"path": "a/b"}),
        StatusCode::CONFLICT,
        "already_exists",
    )
    .await;
    fails(
        &sandbox,
        "MakeDir",
        json!({"path": "file"}),
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    )
    .await;

    let (status, body) = call(
        &sandbox,
        "Move",
        json!({"source": "file", "destination": "x/y/moved"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entry"]["name"], "moved");
    assert_eq!(body["entry"]["path"], sandbox.path("x/y/moved"));
    assert_eq!(
        std::fs::read_to_string(sandbox.home.join("x/y/moved")).unwrap(),
        "x"
    );
    assert!(!sandbox.home.join("file").exists());
    fails(
        &sandbox,
        "Move",
        json!({"source": "file", "destination": "z"}),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    let (status, body) = call(&sandbox, "Remove", json!({"path": "a"})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    assert!(!sandbox.home.join("a").exists());
    // `rm -rf`: what is not there is removed already.
    let (status, _) = call(&sandbox, "Remove", json!({"path": "a"})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn list_dir_walks_to_the_depth_asked_without_entering_symlinks() {
    let outside = std::env::temp_dir().join(format!(
        "burrow-envd-listdir-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("hidden"), "").unwrap();
    let target = outside.clone();
    let sandbox = Sandbox::start_with_home(move |home| {
        std::fs::create_dir_all(home.join("d/sub/deeper")).unwrap();
        std::fs::write(home.join("d/b.txt"), "b").unwrap();
        std::fs::write(home.join("d/sub/c.txt"), "c").unwrap();
        std::fs::write(home.join("d/sub/deeper/e.txt"), "e").unwrap();
        symlink(&target, home.join("d/outside")).unwrap();
    })
    .await;

    let paths = |body: &Value| -> Vec<String> {
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["path"].as_str().unwrap().to_owned())
            .collect()
    };
    // Depth 0 is 1.
    for depth in [json!(0), json!(1), json!("1"), Value::Null] {
        let (status, body) = call(&sandbox, "ListDir", json!({"path": "d", "depth": depth})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            paths(&body),
            ["d/b.txt", "d/outside", "d/sub"].map(|p| sandbox.path(p))
        );
    }
    let (_, body) = call(&sandbox, "ListDir", json!({"path": "d", "depth": 2})).await;
    assert_eq!(
        paths(&body),
        [
            "d/b.txt",
            "d/outside",
            "d/sub",
            "d/sub/c.txt",
            "d/sub/deeper"
        ]
        .map(|p| sandbox.path(p))
    );
    let (_, body) = call(&sandbox, "ListDir", json!({"path": "d", "depth": 5})).await;
    assert_eq!(
        paths(&body),
        [
            "d/b.txt",
            "d/outside",
            "d/sub",
            "d/sub/c.txt",
            "d/sub/deeper",
            "d/sub/deeper/e.txt"
        ]
        .map(|p| sandbox.path(p))
    );
    let (_, body) = call(&sandbox, "ListDir", json!({"path": "d/sub/deeper"})).await;
    assert_eq!(body["entries"][0]["name"], "e.txt");
    assert_eq!(body["entries"][0]["size"], "1");

    // An empty directory has no entries: the field is omitted.
    std::fs::create_dir(sandbox.home.join("empty")).unwrap();
    let (status, body) = call(&sandbox, "ListDir", json!({"path": "empty"})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));

    fails(
        &sandbox,
        "ListDir",
        json!({"path": "d/b.txt"}),
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    )
    .await;
    fails(
        &sandbox,
        "ListDir",
        json!({"path": "nope"}),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    std::fs::remove_dir_all(outside).unwrap();
}

fn files_request(query: &str, content_type: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::post(format!("/files?{query}"))
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// A multipart body of `file` parts, each (filename, content).
fn multipart(query: &str, parts: &[(&str, &[u8])]) -> Request<Full<Bytes>> {
    let boundary = "burrowfilesboundary";
    let mut body = Vec::new();
    for (filename, content) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"{filename}\"\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    files_request(
        query,
        &format!("multipart/form-data; boundary={boundary}"),
        body,
    )
}

async fn download(sandbox: &Sandbox, query: &str) -> (StatusCode, Bytes) {
    let request = Request::get(format!("/files?{query}"))
        .header(header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (response, body) = sandbox.http(request).await;
    (response.status(), body)
}

#[tokio::test]
async fn files_upload_and_download() {
    let sandbox = Sandbox::start().await;

    // Multipart without `path`: each filename is the path, verbatim, relative to home.
    let (response, body) = sandbox
        .http(multipart(
            "",
            &[("one.txt", b"1"), ("nested/dir/two.bin", b"\x00\x02")],
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let written: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        written,
        json!([
            {"path": sandbox.path("one.txt"), "name": "one.txt", "type": "file"},
            {"path": sandbox.path("nested/dir/two.bin"), "name": "two.bin", "type": "file"},
        ])
    );
    assert_eq!(
        std::fs::read(sandbox.home.join("nested/dir/two.bin")).unwrap(),
        b"\x00\x02"
    );

    // With `path`, the part's filename is ignored; an existing file is replaced.
    let (response, _) = sandbox
        .http(multipart("path=one.txt", &[("ignored", b"replaced")]))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        std::fs::read_to_string(sandbox.home.join("one.txt")).unwrap(),
        "replaced"
    );

    // An octet-stream body is one file at `path`.
    let (response, body) = sandbox
        .http(files_request(
            "path=%7E%2Fraw%2Fdata",
            "application/octet-stream",
            b"raw bytes".to_vec(),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let written: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(written[0]["path"], sandbox.path("raw/data"));

    let (status, body) = download(&sandbox, "path=raw/data").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"raw bytes"[..]));
    let (status, body) = download(&sandbox, &format!("path={}", sandbox.path("one.txt"))).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"replaced"[..]));
}

#[tokio::test]
async fn files_errors_are_json_with_the_status_the_sdk_maps() {
    let sandbox = Sandbox::start().await;
    std::fs::create_dir(sandbox.home.join("dir")).unwrap();

    let error = |body: &Bytes| -> Value { serde_json::from_slice(body).unwrap() };
    let (status, body) = download(&sandbox, "path=missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error(&body)["code"], 404);
    assert!(
        error(&body)["message"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    let (status, _) = download(&sandbox, "path=dir").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = download(&sandbox, "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = download(&sandbox, "path=dir&username=no-such-user-here").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error(&body)["code"], 401);

    // The same path twice in one upload.
    let (response, _) = sandbox
        .http(multipart("", &[("same", b"1"), ("same", b"2")]))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // An octet-stream body needs `path`.
    let (response, _) = sandbox
        .http(files_request("", "application/octet-stream", b"x".to_vec()))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (response, _) = sandbox
        .http(files_request("path=x", "text/plain", b"x".to_vec()))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // A file where a parent directory should be.
    std::fs::write(sandbox.home.join("plain"), "").unwrap();
    let (response, body) = sandbox
        .http(multipart("path=plain/below", &[("f", b"x")]))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body:?}");
}

/// As the sandbox user (uid 1000, envd root): a symlink the user plants gets no client call
/// through it to what the user may not reach, while root-only places without links still work,
/// and what envd makes there is the user's (`user_fs`).
#[tokio::test]
async fn calls_act_as_the_user_and_never_follow_its_symlinks_as_root() {
    const USER: u32 = 1000;
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root (to serve another user than itself)"
        );
        return;
    }
    let outside = std::env::temp_dir().join(format!(
        "burrow-envd-fs-outside-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let private = outside.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(&outside, PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&private, PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(private.join("secret"), "root only").unwrap();
    let planted = private.clone();
    let sandbox = Sandbox::start_as(USER, USER, move |home| {
        symlink(&planted, home.join("link")).unwrap();
    })
    .await;

    let (response, _) = sandbox.http(multipart("path=link/x", &[("f", b"x")])).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(!private.join("x").exists());
    let (status, _) = download(&sandbox, "path=link/secret").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for (method, body) in [
        ("MakeDir", json!({"path": "link/new"})),
        ("Remove", json!({"path": "link/secret"})),
        (
            "Move",
            json!({"source": "link/secret", "destination": "stolen"}),
        ),
        ("ListDir", json!({"path": "link"})),
    ] {
        let (status, error) = call(&sandbox, method, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method}: {error}");
        assert_eq!(error["code"], "permission_denied", "{method}: {error}");
    }
    assert!(private.join("secret").exists() && !private.join("new").exists());

    // A root-owned directory, no symlink on the way: allowed, and the results are the user's.
    let made = outside.join("made/deeper");
    let (status, body) = call(&sandbox, "MakeDir", json!({"path": made})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(std::fs::metadata(&made).unwrap().uid(), USER);
    assert_eq!(std::fs::metadata(outside.join("made")).unwrap().uid(), USER);
    let uploaded = outside.join("up/file");
    let (response, _) = sandbox
        .http(multipart(
            &format!("path={}", uploaded.display()),
            &[("f", b"x")],
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(std::fs::metadata(&uploaded).unwrap().uid(), USER);
    assert_eq!(std::fs::metadata(outside.join("up")).unwrap().uid(), USER);
    std::fs::remove_dir_all(outside).unwrap();
}

/// A `WatchDir` call: its response body, read envelope by envelope.
struct WatchStream {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl WatchStream {
    async fn open(sandbox: &Sandbox, request: Value, keepalive: &str) -> Self {
        let mut payload = vec![0];
        let message = request.to_string();
        payload.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        payload.extend_from_slice(message.as_bytes());
        let (mut sender, connection) = sandbox.http_connection().await;
        tokio::spawn(connection);
        let response = sender
            .send_request(
                Request::post("/filesystem.Filesystem/WatchDir")
                    .header(header::HOST, "localhost")
                    .header(header::CONTENT_TYPE, "application/connect+json")
                    .header("keepalive-ping-interval", keepalive)
                    .body(Full::new(Bytes::from(payload)))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            body: response.into_body(),
            buffer: Vec::new(),
        }
    }

    /// (flags, message) of the next envelope.
    async fn next(&mut self) -> (u8, Value) {
        use http_body_util::BodyExt;
        loop {
            if self.buffer.len() >= 5 {
                let length = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
                if self.buffer.len() >= 5 + length {
                    let flags = self.buffer[0];
                    let payload: Vec<u8> = self.buffer.drain(..5 + length).skip(5).collect();
                    return (flags, serde_json::from_slice(&payload).unwrap());
                }
            }
            let frame = tokio::time::timeout(crate::PATIENCE, self.body.frame())
                .await
                .expect("envd answered in time")
                .expect("the stream ended without an end-of-stream envelope")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// Filesystem events, skipping keepalives, until `last` (name, type) has been seen.
    async fn events_until(&mut self, last: (&str, &str)) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let (flags, message) = self.next().await;
            assert_eq!(flags, 0, "{message}");
            if message.get("keepalive").is_some() {
                continue;
            }
            let event = message["filesystem"].clone();
            let done = event["name"] == last.0 && event["type"] == last.1;
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

#[tokio::test]
async fn watch_dir_streams_start_then_events_and_keepalives() {
    let sandbox = Sandbox::start_with_home(|home| {
        std::fs::create_dir_all(home.join("w/sub")).unwrap();
    })
    .await;

    let mut watch = WatchStream::open(&sandbox, json!({"path": "w", "recursive": true}), "1").await;
    assert_eq!(watch.next().await, (0, json!({"start": {}})));
    std::fs::write(sandbox.home.join("w/a.txt"), "a").unwrap();
    std::fs::create_dir(sandbox.home.join("w/later")).unwrap();
    let events = watch.events_until(("later", "EVENT_TYPE_CREATE")).await;
    assert_eq!(
        events[0],
        json!({"name": "a.txt", "type": "EVENT_TYPE_CREATE"})
    );
    assert!(events.contains(&json!({"name": "a.txt", "type": "EVENT_TYPE_WRITE"})));
    // Below the watched directory, including in a directory made after the watch started.
    std::fs::write(sandbox.home.join("w/sub/b"), "").unwrap();
    watch.events_until(("sub/b", "EVENT_TYPE_CREATE")).await;
    // Watched already: envd watches a new directory before it reports its creation.
    std::fs::write(sandbox.home.join("w/later/c"), "").unwrap();
    watch.events_until(("later/c", "EVENT_TYPE_CREATE")).await;
    std::fs::rename(sandbox.home.join("w/a.txt"), sandbox.home.join("w/z")).unwrap();
    watch.events_until(("a.txt", "EVENT_TYPE_RENAME")).await;
    std::fs::remove_file(sandbox.home.join("w/z")).unwrap();
    watch.events_until(("z", "EVENT_TYPE_REMOVE")).await;
    // Quiet: a keepalive each second.
    assert_eq!(watch.next().await, (0, json!({"keepalive": {}})));

    // Errors end the stream, HTTP staying 200.
    let mut missing = WatchStream::open(&sandbox, json!({"path": "nope"}), "1").await;
    let (flags, end) = missing.next().await;
    assert_eq!((flags, &end["error"]["code"]), (2, &json!("not_found")));
    std::fs::write(sandbox.home.join("file"), "").unwrap();
    let mut file = WatchStream::open(&sandbox, json!({"path": "file"}), "1").await;
    let (flags, end) = file.next().await;
    assert_eq!(
        (flags, &end["error"]["code"]),
        (2, &json!("invalid_argument"))
    );
}

#[tokio::test]
async fn polled_watchers_buffer_events_until_asked() {
    let sandbox = Sandbox::start_with_home(|home| {
        std::fs::create_dir(home.join("w")).unwrap();
    })
    .await;

    let (status, body) = call(&sandbox, "CreateWatcher", json!({"path": "w"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["watcherId"].as_str().unwrap().to_owned();
    std::fs::write(sandbox.home.join("w/f"), "x").unwrap();
    let mut events = Vec::new();
    for _ in 0..100 {
        let (status, body) = call(&sandbox, "GetWatcherEvents", json!({"watcherId": id})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        events.extend(body["events"].as_array().cloned().unwrap_or_default());
        if events.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        events,
        [
            json!({"name": "f", "type": "EVENT_TYPE_CREATE"}),
            json!({"name": "f", "type": "EVENT_TYPE_WRITE"})
        ]
    );
    // Drained: nothing new since.
    let (_, body) = call(&sandbox, "GetWatcherEvents", json!({"watcher_id": id})).await;
    assert_eq!(body, json!({}));

    let (status, body) = call(&sandbox, "RemoveWatcher", json!({"watcherId": id})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    for method in ["GetWatcherEvents", "RemoveWatcher"] {
        fails(
            &sandbox,
            method,
            json!({"watcherId": id}),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    fails(
        &sandbox,
        "CreateWatcher",
        json!({"path": "nope"}),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}
