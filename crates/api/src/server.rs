//! The HTTP/1.1 connection loop: what `axum::serve` does, plus a deadline for request headers.
//!
//! `axum::serve` gives hyper no timer, so hyper cannot enforce any timeout: a client that opens
//! connections and never sends a request (or sends one byte a minute) holds each of them, and
//! its file descriptor, forever, until the server runs out of descriptors and stops accepting.
//! Here every connection must deliver each request's head within [`HEADER_TIMEOUT`], idle
//! keep-alive connections included; after a websocket or tunnel upgrade the connection is no
//! longer HTTP and the deadline no longer applies.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

/// How long a connection may take to send a request's head, or stay idle between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets each
/// connection finish the request it is serving, and returns once every connection is closed.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
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
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
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
