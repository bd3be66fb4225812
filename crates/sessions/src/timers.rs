//! The expiry timer queue: deadlines in a min-heap, one task sleeping until the earliest. A
//! refresh pushes a new entry instead of moving the old one; the stale entry pops later and is
//! ignored because the session's deadline has moved past it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct Timers {
    heap: Mutex<BinaryHeap<Reverse<(Instant, String)>>>,
    changed: Notify,
}

impl Timers {
    pub(crate) fn push(&self, deadline: Instant, id: String) {
        let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = heap.peek().is_none_or(|Reverse((d, _))| deadline < *d);
        heap.push(Reverse((deadline, id)));
        drop(heap);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Waits for the earliest deadline to pass and returns its ID.
    pub(crate) async fn next_due(&self) -> String {
        loop {
            let next = {
                let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
                match heap.peek() {
                    Some(Reverse((deadline, _))) if *deadline <= Instant::now() => {
                        let Reverse((_, id)) = heap.pop().expect("peeked");
                        return id;
                    }
                    Some(Reverse((deadline, _))) => Some(*deadline),
                    None => None,
                }
            };
            match next {
                Some(deadline) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                        _ = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pops_in_deadline_order_and_wakes_for_earlier_pushes() {
        let timers = std::sync::Arc::new(Timers::default());
        let now = Instant::now();
        timers.push(now + Duration::from_secs(3600), "late".into());
        let t = timers.clone();
        let waiter = tokio::spawn(async move { t.next_due().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        timers.push(now + Duration::from_millis(30), "soon".into());
        timers.push(now + Duration::from_millis(10), "sooner".into());
        let first = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken for the earlier deadline")
            .unwrap();
        assert_eq!(first, "sooner");
        assert_eq!(timers.next_due().await, "soon");
        assert!(Instant::now() >= now + Duration::from_millis(30));
    }
}
