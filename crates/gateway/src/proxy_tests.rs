//! The gateway's limits against fake envds on unix sockets: one that never answers, one that
//! stops reading, one that answers only once it has a slowly sent body.

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::*;

const LIMIT: Duration = Duration::from_millis(300);

/// A socket path of its own for each test, in a directory removed with it.
struct Socket {
    dir: PathBuf,
    path: PathBuf,
}

impl std::ops::Deref for Socket {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn socket(name: &str) -> Socket {
    let dir = std::env::temp_dir().join(format!("burrow-gateway-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Socket {
        path: dir.join("envd.sock"),
        dir,
    }
}

/// How long a test's upload may pause.
const IDLE: Duration = Duration::from_millis(1500);

fn gateway(connections_per_session: usize) -> Gateway {
    team_gateway(connections_per_session, 1000)
}

fn team_gateway(connections_per_session: usize, connections_per_team: usize) -> Gateway {
    Gateway::new(Limits {
        connections_per_session,
        connections_per_team,
        envd_timeout: LIMIT,
        body_idle_timeout: IDLE,
    })
}

fn get(path: &str) -> Request {
    Request::get(path).body(Body::empty()).unwrap()
}

/// An envd that accepts connections and then neither reads nor writes, like a stopped one.
fn silent_envd(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
}

async fn status_and_message(resp: Response) -> (StatusCode, String) {
    let status = resp.status();
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], status.as_u16());
    (status, body["message"].as_str().unwrap().to_owned())
}

/// Waits (up to a second) for `session`'s connections to be given back.
async fn all_closed(gateway: &Gateway, session: &str) {
    for _ in 0..100 {
        if gateway.slots.open(session) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} connections of {session} still counted",
        gateway.slots.open(session)
    );
}

#[tokio::test]
async fn a_silent_envd_gets_504_in_time() {
    let path = socket("silent");
    silent_envd(&path);
    let gateway = gateway(8);
    for port in [ENVD_PORT, 8080] {
        let start = Instant::now();
        let resp = gateway.proxy(get("/ws"), "s1", 1, &path, port).await;
        let took = start.elapsed();
        let (status, message) = status_and_message(resp).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{message}");
        assert!(message.contains("did not answer within 300ms"), "{message}");
        assert!(took >= LIMIT && took < LIMIT * 3, "port {port}: {took:?}");
    }
    all_closed(&gateway, "s1").await;
}

#[tokio::test]
async fn a_missing_envd_gets_502() {
    let gateway = gateway(8);
    let resp = gateway
        .proxy(get("/ws"), "s1", 1, &socket("missing"), ENVD_PORT)
        .await;
    let (status, message) = status_and_message(resp).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{message}");
    all_closed(&gateway, "s1").await;
}

#[tokio::test]
async fn a_session_over_its_cap_gets_429_and_others_do_not() {
    let path = socket("cap");
    silent_envd(&path);
    let gateway = Arc::new(gateway(2));
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let (gateway, path) = (gateway.clone(), path.to_path_buf());
            tokio::spawn(async move { gateway.proxy(get("/ws"), "s1", 1, &path, ENVD_PORT).await })
        })
        .collect();
    while gateway.slots.open("s1") < 2 {
        tokio::task::yield_now().await;
    }
    let (status, message) =
        status_and_message(gateway.proxy(get("/ws"), "s1", 1, &path, ENVD_PORT).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{message}");
    assert!(message.contains("2 connections"), "{message}");
    // Another session is not affected (its envd is silent too, hence the 504).
    let (status, _) =
        status_and_message(gateway.proxy(get("/ws"), "s2", 1, &path, ENVD_PORT).await).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    for w in waiting {
        assert_eq!(w.await.unwrap().status(), StatusCode::GATEWAY_TIMEOUT);
    }
    all_closed(&gateway, "s1").await;
}

/// A client's request body: whatever arrives on the channel, until it is closed.
pub(crate) struct Trickle(pub(crate) mpsc::Receiver<Bytes>);

impl hyper::body::Body for Trickle {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

fn upload(pieces: mpsc::Receiver<Bytes>) -> Request {
    Request::post("/file")
        .body(Body::new(Trickle(pieces)))
        .unwrap()
}

#[tokio::test]
async fn a_slow_upload_is_not_cut_off() {
    let path = socket("slow");
    // An envd that answers with the body's length once it has all of it.
    let listener = UnixListener::bind(&*path).unwrap();
    tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let service =
            hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(hyper::Response::new(Body::from(body.len().to_string())))
            });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(conn), service)
            .await
            .unwrap();
    });
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for _ in 0..3 {
            tokio::time::sleep(LIMIT * 2).await;
            tx.send(Bytes::from_static(b"abc")).await.unwrap();
        }
    });
    let gateway = gateway(8);
    let resp = gateway.proxy(upload(rx), "s1", 1, &path, ENVD_PORT).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"9");
    all_closed(&gateway, "s1").await;
}

#[tokio::test]
async fn an_envd_that_stops_reading_an_upload_gets_504() {
    let path = socket("stuck");
    // An envd that reads the request head and a little more, then nothing.
    let listener = UnixListener::bind(&*path).unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        conn.read_exact(&mut buf).await.unwrap();
        std::future::pending::<()>().await;
    });
    // A client with far more to send than the sockets buffer.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let piece = Bytes::from(vec![b'x'; 1 << 20]);
        for _ in 0..64 {
            if tx.send(piece.clone()).await.is_err() {
                return;
            }
        }
    });
    let gateway = gateway(8);
    let start = Instant::now();
    let resp = gateway.proxy(upload(rx), "s1", 1, &path, ENVD_PORT).await;
    let (status, message) = status_and_message(resp).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{message}");
    assert!(start.elapsed() < LIMIT * 3, "{:?}", start.elapsed());
    all_closed(&gateway, "s1").await;
}

#[tokio::test]
async fn a_team_over_its_cap_gets_429_and_other_teams_do_not() {
    let path = socket("team-cap");
    silent_envd(&path);
    let gateway = Arc::new(team_gateway(8, 3));
    // Team 1 holds three connections, spread over two of its sessions.
    let waiting: Vec<_> = ["s1", "s1", "s2"]
        .into_iter()
        .map(|session| {
            let (gateway, path) = (gateway.clone(), path.to_path_buf());
            tokio::spawn(async move { gateway.proxy(get("/ws"), session, 1, &path, 8080).await })
        })
        .collect();
    while gateway.team_slots.open("1") < 3 {
        tokio::task::yield_now().await;
    }
    let (status, message) =
        status_and_message(gateway.proxy(get("/ws"), "s3", 1, &path, ENVD_PORT).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{message}");
    assert!(
        message.contains("your team already has 3 connections")
            && message.contains("--max-connections-per-team"),
        "{message}"
    );
    // Team 2 is not affected (its envd is silent too, hence the 504).
    let (status, _) =
        status_and_message(gateway.proxy(get("/ws"), "s4", 2, &path, ENVD_PORT).await).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    for w in waiting {
        assert_eq!(w.await.unwrap().status(), StatusCode::GATEWAY_TIMEOUT);
    }
    for _ in 0..100 {
        if gateway.team_slots.open("1") == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("team 1's connections are still counted");
}

#[tokio::test]
async fn a_stalled_upload_gets_408_and_envd_sees_it_aborted() {
    let path = socket("stalled");
    // An envd that reads the body and reports how its reading ended.
    let listener = UnixListener::bind(&*path).unwrap();
    let (ended, mut envd_saw) = mpsc::channel(1);
    tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let ended = ended.clone();
                async move {
                    let read = req.into_body().collect().await.map(|b| b.to_bytes().len());
                    ended.send(read.map_err(|e| e.to_string())).await.unwrap();
                    Ok::<_, hyper::Error>(hyper::Response::new(Body::empty()))
                }
            });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(conn), service)
            .await;
    });
    // A client that sends a piece, then nothing while keeping its connection open.
    let (tx, rx) = mpsc::channel(1);
    tx.send(Bytes::from_static(b"abc")).await.unwrap();
    let gateway = gateway(8);
    let start = Instant::now();
    let resp = gateway.proxy(upload(rx), "s1", 1, &path, ENVD_PORT).await;
    let took = start.elapsed();
    assert_eq!(resp.headers()[header::CONNECTION], "close");
    let (status, message) = status_and_message(resp).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{message}");
    assert!(message.contains("--body-idle-timeout"), "{message}");
    assert!(took >= IDLE && took < IDLE * 2, "{took:?}");
    let saw = envd_saw.recv().await.unwrap();
    assert!(saw.is_err(), "envd read a whole body: {saw:?}");
    drop(tx);
    all_closed(&gateway, "s1").await;
}

/// An envd that reads each request's body whole and answers with the number of bytes it read,
/// or `502 nothing listens` to a tunnel request.
fn reading_envd(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    if req.uri().path().starts_with("/tunnel/") {
                        let mut resp = hyper::Response::new(Body::from("nothing listens"));
                        *resp.status_mut() = StatusCode::BAD_GATEWAY;
                        return Ok::<_, hyper::Error>(resp);
                    }
                    let read = req.into_body().collect().await?.to_bytes().len();
                    Ok(hyper::Response::new(Body::from(read.to_string())))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), service),
            );
        }
    });
}

/// A Connect client stream (`StreamInput`: a process's stdin) may pause for longer than the
/// body idle timeout: it is not an upload that stalled.
#[tokio::test]
async fn a_connect_stream_may_pause_longer_than_the_idle_timeout() {
    let path = socket("connect-stream");
    reading_envd(&path);
    let (tx, rx) = mpsc::channel(1);
    let client = tokio::spawn(async move {
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        tokio::time::sleep(IDLE + IDLE / 2).await;
        tx.send(Bytes::from_static(b"de")).await.unwrap();
    });
    let request = Request::post("/process.Process/StreamInput")
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::new(Trickle(rx)))
        .unwrap();
    let gateway = gateway(8);
    let resp = gateway
        .proxy_sandbox(request, "s1", 1, &path, E2B_ENVD_PORT)
        .await;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(body, "5");
    client.await.unwrap();
    all_closed(&gateway, "s1").await;
}

/// A port nothing listens on: E2B's 502, whose text the SDKs classify, for the current SDKs;
/// envd's own answer, as before, for the session-era clients.
#[tokio::test]
async fn a_closed_port_gets_e2b_s_502_on_the_sandbox_route() {
    let path = socket("closed-port");
    reading_envd(&path);
    let gateway = gateway(8);
    let resp = gateway
        .proxy_sandbox(get("/"), "sbx1", 1, &path, 8080)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"sandboxId": "sbx1", "message": "The sandbox is running but port is not open", "code": 502})
    );
    let resp = gateway.proxy(get("/"), "sbx1", 1, &path, 8080).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "nothing listens");
    all_closed(&gateway, "sbx1").await;
}
