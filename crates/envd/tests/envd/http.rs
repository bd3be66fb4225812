//! Plain HTTP on envd's socket: `/ping`, `/health`, `/file` (wire spec §6) and `/tunnel/{port}`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Sandbox;

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header(header::HOST, "49982-sid-cid.localhost")
        .body(Full::default())
        .unwrap()
}

/// A multipart body with the given (name, filename, content) parts.
pub(crate) fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Request<Full<Bytes>> {
    let boundary = "burrowtestboundary";
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = match filename {
            Some(filename) => format!("form-data; name=\"{name}\"; filename=\"{filename}\""),
            None => format!("form-data; name=\"{name}\""),
        };
        body.extend_from_slice(format!("Content-Disposition: {disposition}\r\n\r\n").as_bytes());
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post("/file")
        .header(header::HOST, "49982-sid-cid.localhost")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[tokio::test]
async fn ping_answers_pong() {
    let sandbox = Sandbox::start().await;
    let (response, body) = sandbox.http(get("/ping")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body, "pong");
}

/// The current E2B SDKs' `is_running()` wants a 2xx, and E2B's envd answers 204.
#[tokio::test]
async fn health_answers_204() {
    let sandbox = Sandbox::start().await;
    let (response, body) = sandbox.http(get("/health")).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(body.is_empty());
}

#[tokio::test]
async fn upload_then_download() {
    let sandbox = Sandbox::start().await;
    let (response, body) = sandbox
        .http(multipart(&[("file", Some("up.txt"), b"uploaded\ncontent")]))
        .await;
    assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    assert!(body.is_empty());
    assert_eq!(
        std::fs::read(sandbox.home.join("up.txt")).unwrap(),
        b"uploaded\ncontent"
    );

    let uri = format!("/file?path={}", sandbox.path("up.txt"));
    let (response, body) = sandbox.http(get(&uri)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body, "uploaded\ncontent");
    let headers = response.headers();
    assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    assert_eq!(headers[header::CONTENT_LENGTH], "16");
    assert_eq!(
        headers[header::CONTENT_DISPOSITION],
        "attachment; filename=up.txt"
    );

    // A destination `path` field, even after the file, and a name with a space.
    let binary: Vec<u8> = (0..=255).cycle().take(300_000).collect();
    let destination = sandbox.path("dir/my file.bin");
    std::fs::create_dir(sandbox.home.join("dir")).unwrap();
    let (response, _) = sandbox
        .http(multipart(&[
            ("file", Some("ignored.bin"), &binary),
            ("path", None, destination.as_bytes()),
        ]))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let uri = format!("/file?path={}", destination.replace(' ', "%20"));
    let (response, body) = sandbox.http(get(&uri)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/octet-stream"
    );
    assert_eq!(body, binary);
    assert!(!sandbox.home.join("ignored.bin").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&sandbox.home)
        .unwrap()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(".burrow-upload")
        })
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test]
async fn download_edge_cases() {
    let sandbox = Sandbox::start().await;
    std::fs::write(sandbox.home.join("empty"), b"").unwrap();
    let (response, body) = sandbox
        .http(get(&format!("/file?path={}", sandbox.path("empty"))))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(body.is_empty());

    let (response, body) = sandbox.http(get("/file")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body, "File path is required");

    let (response, body) = sandbox
        .http(get(&format!("/file?path={}", sandbox.path("missing"))))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(
        String::from_utf8_lossy(&body).starts_with("File not found"),
        "{body:?}"
    );

    let (response, _) = sandbox.http(multipart(&[("other", None, b"x")])).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let bad = Request::post("/file")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let (response, _) = sandbox.http(bad).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (response, _) = sandbox
        .http(multipart(&[
            ("file", Some("x"), b"x"),
            ("path", None, b"/nonexistent/dir/x"),
        ]))
        .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

fn tunnel_request(port: u16) -> Request<Full<Bytes>> {
    Request::get(format!("/tunnel/{port}"))
        .header(header::HOST, "8080-sid-cid.localhost")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "tcp")
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn tunnel_splices_to_a_tcp_port() {
    let sandbox = Sandbox::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = [0; 64];
        let read = stream.read(&mut buffer).await.unwrap();
        stream.write_all(b"echo:").await.unwrap();
        stream.write_all(&buffer[..read]).await.unwrap();
    });

    let (mut sender, connection) = sandbox.http_connection().await;
    tokio::spawn(connection.with_upgrades());
    let response = sender.send_request(tunnel_request(port)).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()[header::UPGRADE], "tcp");
    let mut tunnel = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    tunnel.write_all(b"ping").await.unwrap();
    let mut reply = Vec::new();
    tunnel.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"echo:ping");
}

#[tokio::test]
async fn tunnel_to_a_closed_port_is_a_bad_gateway() {
    let sandbox = Sandbox::start().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (response, body) = sandbox.http(tunnel_request(port)).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body).contains("nothing listens on port"),
        "{body:?}"
    );

    let (response, _) = sandbox.http(get(&format!("/tunnel/{port}"))).await;
    assert_eq!(
        response.status(),
        StatusCode::BAD_REQUEST,
        "no upgrade headers"
    );
}
