//! The deadline on envd's answer to a forwarded request.
//!
//! A frozen or stopped sandbox must not hold its clients forever, but a large upload from a slow
//! client may take minutes before envd can answer, and that time is the client's, not envd's. So
//! the clock runs only while the gateway is waiting on envd: it restarts whenever a piece of the
//! request body is handed on, stops while the gateway waits for the client to send more, and runs
//! out `limit` after the body was sent whole (or after envd stopped taking it in).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::{Bytes, Frame, SizeHint};
use tokio::time::Instant;

struct State {
    /// When the body last moved (or the request started).
    since: Instant,
    /// The body is waiting for the client: envd is not the one being waited on.
    client_turn: bool,
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

/// A request body that reports its progress to a [`Progress`].
pub(crate) struct Watched {
    body: Body,
    progress: Progress,
}

/// Wraps `body`; the clock starts now.
pub(crate) fn watch(body: Body) -> (Watched, Progress) {
    let progress = Progress(Arc::new(Mutex::new(State {
        since: Instant::now(),
        client_turn: false,
    })));
    let watched = Watched {
        body,
        progress: progress.clone(),
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
        let (mut body, progress) = watch(Body::new(Trickle(rx)));
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
        let (_, progress) = watch(Body::empty());
        assert_eq!(progress.within(limit, async { 7 }).await, Some(7));
    }
}
