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
//!
//! Within that cap, connections that have not yet sent a complete request head are capped on
//! their own (`max_pending_heads`, below `max_connections`): anyone can open a connection and
//! send half a head, no key needed, and without this cap such connections alone could take every
//! slot for [`HEADER_TIMEOUT`] at a time. Over it, a new connection is on probation: a client
//! that sends its whole head at once, as every real client does, is served as usual; one that
//! has not sent it within [`HEAD_GRACE`] gets `503` and is closed.

use std::convert::Infallible;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::serve::Listener;
use burrow_gateway::Guarded;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
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
/// How long a connection that arrives while `max_pending_heads` connections wait for their
/// heads has to send its own whole head.
pub const HEAD_GRACE: Duration = Duration::from_secs(1);
/// Connections on probation at once; beyond these, a connection that arrives while the pending
/// heads are at their cap is closed unanswered.
const PROBATION: usize = 64;
/// The largest head a connection on probation may send.
const PROBATION_HEAD_LIMIT: usize = 64 << 10;

/// The connection caps of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectionCaps {
    /// Connections open at once, upgraded ones included.
    pub max_connections: usize,
    /// Connections that have not yet sent their first complete request head.
    pub max_pending_heads: usize,
}

/// Rate-limited warnings about refused connections: one a minute at most, with the count.
struct Refusals {
    refused: u64,
    warned: Option<Instant>,
}

impl Refusals {
    fn count(&mut self, why: impl FnOnce() -> String) {
        self.refused += 1;
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY)
        {
            tracing::warn!(refused = self.refused, "{}", why());
            self.warned = Some(Instant::now());
            self.refused = 0;
        }
    }
}

/// Serves `app` on `listener` within `caps` until `shutdown` resolves, then stops accepting,
/// lets each connection finish the request it is serving, and returns once every connection is
/// closed.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    caps: ConnectionCaps,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    let ConnectionCaps {
        max_connections,
        max_pending_heads,
    } = caps;
    // Dropping `stop` tells every connection to shut down; each holds a `done` receiver, so
    // `done.closed()` resolves when the last connection has ended.
    let (stop, stopped) = watch::channel(());
    let (done, running) = watch::channel(());
    let open = Arc::new(Semaphore::new(max_connections));
    let pending = Arc::new(Semaphore::new(max_pending_heads));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let probation = Arc::new(Semaphore::new(PROBATION));
    let mut over_connections = Refusals {
        refused: 0,
        warned: None,
    };
    let mut over_heads = Refusals {
        refused: 0,
        warned: None,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            over_connections.count(|| {
                format!(
                    "{max_connections} connections open (--max-connections): refusing new ones with 503"
                )
            });
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
        let connection = Connection {
            app: app.clone(),
            stopped: stopped.clone(),
            running: running.clone(),
        };
        match pending.clone().try_acquire_owned() {
            Ok(head) => {
                tokio::spawn(connection.serve(io, Some(head), remote));
            }
            Err(_) => {
                over_heads.count(|| {
                    format!(
                        "{max_pending_heads} connections wait for their request heads \
                         (--max-pending-heads): new ones must send theirs at once"
                    )
                });
                let Ok(slot) = probation.clone().try_acquire_owned() else {
                    continue;
                };
                tokio::spawn(async move {
                    connection.on_probation(io, remote, max_pending_heads).await;
                    drop(slot);
                });
            }
        }
    }
    drop(stop);
    drop(running);
    done.closed().await;
    Ok(())
}

/// What every served connection needs.
struct Connection {
    app: Router,
    stopped: watch::Receiver<()>,
    /// Held while the connection lives; see `serve`.
    running: watch::Receiver<()>,
}

impl Connection {
    /// Serves HTTP/1.1 (and upgrades) on `io`; `head`, a pending-heads permit, is given back
    /// when the first request head has arrived.
    async fn serve<I>(
        mut self,
        io: I,
        head: Option<OwnedSemaphorePermit>,
        remote: impl std::fmt::Debug,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = TowerToHyperService::new(self.app.clone());
        let head = Mutex::new(head);
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            drop(head.lock().unwrap_or_else(PoisonError::into_inner).take());
            app.call(req)
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = self.stopped.changed() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            tracing::debug!(?remote, %error, "connection ended with an error");
        }
        drop(self.running);
    }

    /// Serves `io` if its whole first head arrives within [`HEAD_GRACE`]; otherwise answers
    /// `503` and closes it.
    async fn on_probation<I>(
        self,
        mut io: I,
        remote: impl std::fmt::Debug,
        max_pending_heads: usize,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut head = Vec::new();
        let complete = tokio::time::timeout(HEAD_GRACE, async {
            let mut buf = [0u8; 4096];
            while head.len() < PROBATION_HEAD_LIMIT {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
                if head_is_complete(&head) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if complete {
            self.serve(Prefixed { head, read: 0, io }, None, remote)
                .await;
            return;
        }
        let answer = too_many_heads(max_pending_heads);
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
            io.write_all(&answer).await?;
            io.shutdown().await
        })
        .await;
    }
}

/// Whether `buf` holds a whole request head: its blank line, past any blank lines before the
/// request line (which HTTP/1.1 servers skip).
fn head_is_complete(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let rest = &buf[start..];
    rest.windows(4).any(|w| w == b"\r\n\r\n") || rest.windows(2).any(|w| w == b"\n\n")
}

/// The raw `503` for a connection on probation that did not send its head in time.
fn too_many_heads(max_pending_heads: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "code": 503,
        "message": format!(
            "the server has its maximum of {max_pending_heads} connections waiting for a request \
             head (--max-pending-heads), and this one did not send its head within {} s: send \
             each request whole, or retry shortly",
            HEAD_GRACE.as_secs()
        ),
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A stream whose first bytes, already read from it, are given again.
struct Prefixed<I> {
    head: Vec<u8>,
    read: usize,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.read);
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            if this.read == this.head.len() {
                this.head = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
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
        let caps = ConnectionCaps {
            max_connections: 2,
            max_pending_heads: 2,
        };
        tokio::spawn(serve(listener, app, caps, std::future::pending()));
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

#[cfg(test)]
mod pending_tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn answer(conn: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn half_sent_heads_cannot_take_the_connections_of_whole_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/health", get(|| async { "{}" }));
        let caps = ConnectionCaps {
            max_connections: 8,
            max_pending_heads: 2,
        };
        tokio::spawn(serve(listener, app, caps, std::future::pending()));
        // Six connections send half a head and stop: two wait as pending heads, the other four
        // are on probation.
        let mut halves = Vec::new();
        for _ in 0..6 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            halves.push(conn);
        }
        // A whole request is served even now, on probation and without waiting out the grace.
        let start = Instant::now();
        let mut whole = TcpStream::connect(addr).await.unwrap();
        whole
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let served = answer(&mut whole).await;
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        assert!(start.elapsed() < HEAD_GRACE, "{:?}", start.elapsed());
        // The four on probation get 503 once the grace is over, and are closed.
        let mut refused = 0;
        for conn in &mut halves[2..] {
            let got = answer(conn).await;
            assert!(got.starts_with("HTTP/1.1 503"), "{got}");
            assert!(got.contains("--max-pending-heads"), "{got}");
            refused += 1;
        }
        assert_eq!(refused, 4);
        // The two pending ones may still finish their heads.
        for conn in &mut halves[..2] {
            conn.write_all(b"Connection: close\r\n\r\n").await.unwrap();
            let got = answer(conn).await;
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        }
    }

    #[test]
    fn heads_are_complete_at_their_blank_line() {
        assert!(head_is_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(head_is_complete(b"\r\nGET / HTTP/1.1\nHost: x\n\n"));
        assert!(!head_is_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(!head_is_complete(b"\r\n\r\n\r\nGET / HT"));
    }
}
