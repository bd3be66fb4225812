//! The locks an ending edit session holds while it saves (see `Inner::saving`), one per (team,
//! custom environment), kept only while somebody holds or awaits one: teams create and delete
//! environments without bound, and the map must not grow with them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

type Key = (i64, String);
type Locks = Arc<Mutex<HashMap<Key, Arc<AsyncMutex<()>>>>>;

#[derive(Default)]
pub(crate) struct SaveLocks(Locks);

/// A held lock; its entry leaves the map when the last holder or waiter is done with it.
pub(crate) struct SaveGuard {
    key: Key,
    guard: Option<OwnedMutexGuard<()>>,
    locks: Locks,
}

impl SaveLocks {
    pub(crate) async fn lock(&self, team_id: i64, environment: &str) -> SaveGuard {
        let key = (team_id, environment.to_string());
        let mutex = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        SaveGuard {
            key,
            guard: Some(mutex.lock_owned().await),
            locks: self.0.clone(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Drop for SaveGuard {
    fn drop(&mut self) {
        // Clones of an entry's Arc are only made under the map's lock, so a count of one here
        // (the map's own) means nobody holds or waits for it.
        self.guard.take();
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn entries_leave_when_unused() {
        let locks = SaveLocks::default();
        for i in 0..1000 {
            drop(locks.lock(1, &format!("env{i}")).await);
        }
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_keeps_the_entry_and_gets_the_lock() {
        let locks = Arc::new(SaveLocks::default());
        let held = locks.lock(1, "env").await;
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move { drop(locks.lock(1, "env").await) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the lock is held");
        drop(held);
        assert_eq!(locks.len(), 1, "the waiter still needs the entry");
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}
