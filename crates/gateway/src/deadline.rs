//! The deadline on envd's answer to a forwarded request.
//!
//! A frozen or stopped sandbox must not hold its clients forever, but a large upload from a slow
//! client may take minutes before envd can answer, and that time is the client's, not envd's. So
//! the clock runs only while the gateway is waiting on envd: it restarts whenever a piece of the
//! request body is handed on, stops while the gateway waits for the client to send more, and runs
//! out `limit` after the body was sent whole (or after envd stopped taking it in).
//!
//! The client's own pauses have a bound of their own: a body that gets no byte for the idle
//! timeout ends in an error, which aborts the upload towards envd and gets the client a `408`,
//! so a stalled or trickling upload cannot hold its connections and its sandbox's upload forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::{Bytes, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

struct State {
    /// When the body last moved (or the request started).
    since: Instant,
    /// The body is waiting for the client: envd is not the one being waited on.
    client_turn: bool,
    /// The client sent nothing for the idle timeout, and the body ended in an error.
    stalled: bool,
}

#[derive(Clone)]
pub(crate) struct Progress(Arc<Mutex<State>>);

impl Progress {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When envd will have kept the gateway waiting for `limit`, or `None` while the client is
    /// the one being waited on.
    fn deadline(&self, limit: Duration) -> Option<Instant> {
        let state = self.state();
        (!state.client_turn).then(|| state.since + limit)
    }

    /// Whether the body was cut off for making no progress.
    pub(crate) fn stalled(&self) -> bool {
        self.state().stalled
    }

    /// `answer`'s output, or `None` if envd keeps the gateway waiting for `limit` first.
    pub(crate) async fn within<T>(
        &self,
        limit: Duration,
        answer: impl Future<Output = T>,
    ) -> Option<T> {
        let mut answer = std::pin::pin!(answer);
        loop {
            // While the client is sending slowly there is no deadline; look again a `limit` later.
            let wake = self
                .deadline(limit)
                .unwrap_or_else(|| Instant::now() + limit);
            tokio::select! {
                out = answer.as_mut() => return Some(out),
                () = tokio::time::sleep_until(wake) => {
                    if self.deadline(limit).is_some_and(|d| d <= Instant::now()) {
                        return None;
                    }
                }
            }
        }
    }
}

/// A request body that reports its progress to a [`Progress`], and fails once the client has
/// sent nothing for `idle`.
pub(crate) struct Watched {
    body: Body,
    progress: Progress,
    idle: Option<Duration>,
    /// Runs while the body waits for the client; reset by every piece that arrives. Started
    /// only when a wait starts, so time in which nobody asked for the body (envd not reading)
    /// never counts against the client.
    stall: Option<Pin<Box<Sleep>>>,
}

/// The client sent no byte of its request body for this long.
#[derive(Debug, thiserror::Error)]
#[error("the request body made no progress for {0:?}")]
pub(crate) struct Stalled(Duration);

/// Wraps `body`; the clock starts now. `idle`: how long the client may send nothing.
pub(crate) fn watch(body: Body, idle: Option<Duration>) -> (Watched, Progress) {
    let progress = Progress(Arc::new(Mutex::new(State {
        since: Instant::now(),
        client_turn: false,
        stalled: false,
    })));
    let watched = Watched {
        body,
        progress: progress.clone(),
        idle,
        stall: None,
    };
    (watched, progress)
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.body).poll_frame(cx);
        let mut state = this.progress.state();
        state.client_turn = poll.is_pending();
        if poll.is_ready() {
            state.since = Instant::now();
            this.stall = None;
            return poll;
        }
        if let Some(idle) = this.idle {
            let stall = this
                .stall
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
            if stall.as_mut().poll(cx).is_ready() {
                state.stalled = true;
                return Poll::Ready(Some(Err(axum::Error::new(Stalled(idle)))));
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;
    use crate::proxy_tests::Trickle;

    #[tokio::test(start_paused = true)]
    async fn the_clock_runs_only_while_envd_is_waited_on() {
        let limit = Duration::from_secs(10);
        // A client that sends a piece every 30 s: slow, but that is not envd's doing.
        let (tx, rx) = mpsc::channel(1);
        let (mut body, progress) = watch(Body::new(Trickle(rx)), None);
        let envd = tokio::spawn(async move { while body.frame().await.is_some() {} });
        let client = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let start = Instant::now();
        // envd takes the body but never answers: the deadline falls `limit` after its end.
        let answer = progress.within(limit, std::future::pending::<()>()).await;
        assert_eq!(answer, None);
        assert_eq!(start.elapsed(), Duration::from_secs(90) + limit);
        client.await.unwrap();
        envd.await.unwrap();
        // An answer in time is passed on.
        let (_, progress) = watch(Body::empty(), None);
        assert_eq!(progress.within(limit, async { 7 }).await, Some(7));
    }
}

#[cfg(test)]
mod idle_tests {
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;
    use crate::proxy_tests::Trickle;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_after_the_idle_timeout() {
        let idle = Duration::from_secs(30);
        let (tx, rx) = mpsc::channel(1);
        let (mut body, progress) = watch(Body::new(Trickle(rx)), Some(idle));
        let start = Instant::now();
        // Pieces 20 s apart keep it going: each one restarts the clock.
        let client = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
            // Then nothing, with the connection still open.
            std::future::pending::<()>().await;
        });
        for _ in 0..3 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        assert!(!progress.stalled());
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(60) + idle);
        assert!(error.to_string().contains("no progress for 30s"), "{error}");
        assert!(progress.stalled());
        client.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn time_nobody_asked_for_the_body_does_not_count() {
        let idle = Duration::from_secs(30);
        let (tx, rx) = mpsc::channel(1);
        let (mut body, progress) = watch(Body::new(Trickle(rx)), Some(idle));
        // envd does not read for a minute; then the client sends within the timeout.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let client = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            tx.send(Bytes::from_static(b"x")).await.unwrap();
        });
        assert!(body.frame().await.unwrap().is_ok());
        assert!(!progress.stalled());
        client.await.unwrap();
    }
}
