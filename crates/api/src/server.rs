//! The HTTP/1.1 connection loop: what `axum::serve` does, plus a deadline for request headers and
//! a cap on open connections.
//!
//! `axum::serve` gives hyper no timer, so hyper cannot enforce any timeout: a client that opens
//! connections and never sends a request (or sends one byte a minute) holds each of them, and
//! its file descriptor, forever, until the server runs out of descriptors and stops accepting.
//! Here every connection must deliver each request's head within [`HEADER_TIMEOUT`], idle
//! keep-alive connections included; after a websocket or tunnel upgrade the connection is no
//! longer HTTP and the deadline no longer applies.
//!
//! Connections that behave still cost a descriptor each (two when proxied to a sandbox), so at
//! most `max_connections` are open at once, upgraded ones included for their whole life. A
//! connection beyond that is answered `503` in the API's error shape and closed, and the ones
//! already open are left alone: the server keeps descriptors for its sandboxes and its database
//! instead of failing with `EMFILE` at random places.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::serve::Listener;
use burrow_gateway::Guarded;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

/// How long a connection may take to send a request's head, or stay idle between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections over the cap being answered `503` at once. Beyond these, a connection over the
/// cap is closed unanswered: a flood must not take descriptors through the refusals themselves.
const REFUSING: usize = 64;
/// How long a connection over the cap has to send its request head before it is closed
/// unanswered (and then a small body). The request is read before the `503` is written so that
/// the client gets the answer rather than a reset.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a refused request's body is read (and dropped) before the `503`.
const REFUSAL_BODY_LIMIT: usize = 64 << 10;
/// The least time between two warnings that connections are being refused.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Serves `app` on `listener`, at most `max_connections` connections at once, until `shutdown`
/// resolves, then stops accepting, lets each connection finish the request it is serving, and
/// returns once every connection is closed.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    // Dropping `stop` tells every connection to shut down; each holds a `done` receiver, so
    // `done.closed()` resolves when the last connection has ended.
    let (stop, stopped) = watch::channel(());
    let (done, running) = watch::channel(());
    let open = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    // Refusals since the last warning, which reports them: one warning a minute at most.
    let mut refused = 0u64;
    let mut warned: Option<Instant> = None;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refused += 1;
            if warned.is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY) {
                tracing::warn!(
                    refused,
                    "{max_connections} connections open (--max-connections): refusing new ones with 503"
                );
                warned = Some(Instant::now());
                refused = 0;
            }
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(io, max_connections).await;
                    drop(refusal);
                });
            }
            continue;
        };
        // The permit lives with the socket, so a websocket or tunnel upgraded from this
        // connection keeps it until it closes.
        let io = Guarded::new(io, permit);
        let service = TowerToHyperService::new(app.clone());
        let mut stopped = stopped.clone();
        let running = running.clone();
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stopped.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(?remote, %error, "connection ended with an error");
            }
            drop(running);
        });
    }
    drop(stop);
    drop(running);
    done.closed().await;
    Ok(())
}

/// Answers one request on `io` with `503` and closes it.
async fn refuse<I>(io: I, max_connections: usize)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| async move {
        // A small body (a session create) is read first: closing a socket with unread data
        // sends a reset, which can destroy the answer before the client reads it.
        let body = axum::body::to_bytes(Body::new(req.into_body()), REFUSAL_BODY_LIMIT);
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, body).await;
        Ok::<_, Infallible>(overloaded(max_connections))
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(error) = result {
        tracing::debug!(%error, "refused connection ended with an error");
    }
}

/// The `503` of a full server, in the API's error shape (built here rather than through
/// `ApiError`, which logs every 5xx: a flood of refusals must not flood the log).
fn overloaded(max_connections: usize) -> Response {
    let body = serde_json::json!({
        "code": 503,
        "message": format!(
            "the server has its maximum of {max_connections} connections open; retry shortly"
        ),
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const REQUEST: &[u8] = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

    /// Sends a request on `conn` and returns the answer (head and body, which is short).
    async fn exchange(conn: &mut TcpStream) -> String {
        conn.write_all(REQUEST).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("}") {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(answer).unwrap()
    }

    #[tokio::test]
    async fn connections_over_the_cap_get_503_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/health", get(|| async { "{}" }));
        tokio::spawn(serve(listener, app, 2, std::future::pending()));
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            assert!(exchange(&mut conn).await.starts_with("HTTP/1.1 200"));
            held.push(conn);
        }
        let mut over = TcpStream::connect(addr).await.unwrap();
        let answer = exchange(&mut over).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], 503);
        assert!(body["message"].as_str().unwrap().contains("2 connections"));
        // The refused connection is closed; the ones already open still work.
        assert_eq!(over.read(&mut [0u8; 16]).await.unwrap(), 0);
        assert!(exchange(&mut held[0]).await.starts_with("HTTP/1.1 200"));
        // Once one closes, a new connection is served.
        drop(held.pop());
        let mut answer = String::new();
        for _ in 0..100 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            answer = exchange(&mut conn).await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
