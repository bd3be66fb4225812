//! The outbound queue of one websocket connection: responses and notifications in the order they
//! must reach the client, bounded in bytes so that a process printing gigabytes to a slow client
//! blocks the process (its pipe fills) instead of growing envd's memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

/// Bytes of encoded messages a connection may have queued before senders wait.
const BUDGET_BYTES: usize = 16 << 20;
/// How long a sender waits for room before the connection is declared dead and dropped, so one
/// stuck client cannot stall a process's output (and every other subscriber) forever.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// The connection is gone (closed by either side, or dropped for not reading).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the websocket connection is closed")]
pub(crate) struct Closed;

/// A sending handle; clones share the queue.
#[derive(Clone)]
pub(crate) struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::UnboundedSender<Queued>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    stall_limit: Duration,
    closed: watch::Sender<bool>,
}

/// One encoded frame; holds its share of the byte budget until the writer has sent it.
pub(crate) struct Queued {
    pub(crate) text: String,
    pub(crate) budget: OwnedSemaphorePermit,
}

impl Outbox {
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<Queued>) {
        Self::with_limits(BUDGET_BYTES, STALL_LIMIT)
    }

    fn with_limits(
        budget_bytes: usize,
        stall_limit: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<Queued>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        let inner = Inner {
            queue,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            stall_limit,
            closed: watch::Sender::new(false),
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            receiver,
        )
    }

    /// Queues one frame, waiting while the connection is over its budget. Fails once the
    /// connection is closed, or after waiting longer than the stall limit (which closes it).
    pub(crate) async fn send(&self, text: String) -> Result<(), Closed> {
        if self.is_closed() {
            return Err(Closed);
        }
        // A frame larger than the whole budget waits for an empty queue instead of forever.
        let cost = text.len().clamp(1, self.inner.budget_bytes);
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let acquire = self.inner.budget.clone().acquire_many_owned(cost);
        let permit = match tokio::time::timeout(self.inner.stall_limit, acquire).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(Closed),
            Err(_) => {
                tracing::warn!("dropping a websocket connection that stopped reading");
                self.close();
                return Err(Closed);
            }
        };
        self.inner
            .queue
            .send(Queued {
                text,
                budget: permit,
            })
            .map_err(|_| Closed)
    }

    /// Ends the connection: pending and future sends fail, and [`Outbox::closed`] resolves.
    pub(crate) fn close(&self) {
        self.inner.budget.close();
        self.inner.closed.send_replace(true);
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.inner.closed.borrow() || self.inner.queue.is_closed()
    }

    /// Resolves once the connection has been closed through any handle.
    pub(crate) async fn closed(&self) {
        let mut closed = self.inner.closed.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_order_and_waits_for_budget() {
        let (outbox, mut queue) = Outbox::with_limits(10, Duration::from_secs(5));
        outbox.send("12345".into()).await.unwrap();
        outbox.send("67890".into()).await.unwrap();
        let blocked = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.send("abc".into()).await })
        };
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "over budget: the sender waits");
        assert_eq!(queue.recv().await.unwrap().text, "12345");
        blocked.await.unwrap().unwrap();
        assert_eq!(queue.recv().await.unwrap().text, "67890");
        assert_eq!(queue.recv().await.unwrap().text, "abc");
    }

    #[tokio::test]
    async fn oversized_frames_pass_alone() {
        let (outbox, mut queue) = Outbox::with_limits(4, Duration::from_secs(5));
        outbox.send("much longer than four".into()).await.unwrap();
        assert_eq!(queue.recv().await.unwrap().text.len(), 21);
    }

    #[tokio::test]
    async fn a_connection_that_stops_reading_is_dropped() {
        let (outbox, _queue) = Outbox::with_limits(4, Duration::from_millis(50));
        outbox.send("full".into()).await.unwrap();
        assert_eq!(outbox.send("more".into()).await, Err(Closed));
        assert!(outbox.is_closed());
        outbox.closed().await;
        assert_eq!(outbox.send("x".into()).await, Err(Closed));
    }

    #[tokio::test]
    async fn closing_wakes_waiting_senders() {
        let (outbox, _queue) = Outbox::with_limits(1, Duration::from_secs(3600));
        outbox.send("x".into()).await.unwrap();
        let blocked = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.send("y".into()).await })
        };
        tokio::task::yield_now().await;
        outbox.close();
        assert_eq!(blocked.await.unwrap(), Err(Closed));
    }
}
