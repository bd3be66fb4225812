//! Per-session connection counts, so one session's clients cannot take the server's whole
//! connection budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How many gateway connections each session has open. Only sessions with at least one open
/// connection have an entry, so the map is bounded by the live sessions being used.
#[derive(Clone, Default)]
pub(crate) struct Slots(Arc<Mutex<HashMap<Box<str>, usize>>>);

impl Slots {
    fn counts(&self) -> MutexGuard<'_, HashMap<Box<str>, usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One more connection for `session`, or `None` if it already has `limit`.
    pub(crate) fn take(&self, session: &str, limit: usize) -> Option<Slot> {
        let mut counts = self.counts();
        match counts.get_mut(session) {
            Some(count) if *count < limit => *count += 1,
            None if limit > 0 => {
                counts.insert(session.into(), 1);
            }
            _ => return None,
        }
        Some(Slot {
            slots: self.clone(),
            session: session.into(),
        })
    }

    #[cfg(test)]
    pub(crate) fn open(&self, session: &str) -> usize {
        self.counts().get(session).copied().unwrap_or(0)
    }
}

/// One open connection of a session; dropping it gives the slot back.
pub(crate) struct Slot {
    slots: Slots,
    session: Box<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts();
        if let Some(count) = counts.get_mut(&self.session) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_gets_at_most_its_limit() {
        let slots = Slots::default();
        let mut held: Vec<Slot> = (0..3).map(|_| slots.take("a", 3).unwrap()).collect();
        assert!(slots.take("a", 3).is_none());
        let other = slots.take("b", 3).expect("another session is unaffected");
        assert_eq!((slots.open("a"), slots.open("b")), (3, 1));
        held.pop();
        let again = slots
            .take("a", 3)
            .expect("a closed connection frees its slot");
        drop((again, other));
        assert_eq!((slots.open("a"), slots.open("b")), (2, 0));
    }

    #[test]
    fn idle_sessions_leave_no_entry() {
        let slots = Slots::default();
        drop(slots.take("a", 1));
        assert!(slots.counts().is_empty());
        assert!(slots.take("a", 0).is_none());
    }
}
