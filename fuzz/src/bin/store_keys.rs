//! API-key parsing in the store: `authenticate` (every request's key) and `revoke_key` (`burrow
//! keys revoke <id or key>`), on any text, against a real SQLite store holding two keys.
//!
//! Input: text (not UTF-8: replaced lossily, as a key reaches the store only as a `String`), in
//! which `@KEY@` and `@ID@` become the first key and its public ID, so the fuzzer can mutate
//! around real ones. Invariants: a text authenticates exactly when it is one of the keys, as
//! that key's team; revoking by a text revokes exactly the keys it names (the ID, or `e2b_`
//! followed by the ID), after which that key no longer authenticates and the other still does.
//! A revoked key is replaced, so every input starts with two live keys.

use std::panic::AssertUnwindSafe;

use burrow_fuzz::Scratch;
use burrow_store::{NewKey, Store};

/// What a target process keeps between inputs.
struct Keys {
    store: Store,
    keys: [NewKey; 2],
    // Last: removed after the store that uses it is gone.
    _scratch: Scratch,
}

const TEAMS: [(&str, bool); 2] = [("fuzz", false), ("ops", true)];

impl Keys {
    fn start() -> Keys {
        let scratch = Scratch::new("store");
        let store = Store::open(&scratch.path().join("burrow.db")).expect("a store");
        let keys = TEAMS.map(|(team, admin)| store.create_key(team, admin).expect("a key"));
        Keys {
            store,
            keys,
            _scratch: scratch,
        }
    }
}

/// Whether revoking by `text` names the key with this public `id`.
fn names(text: &str, id: &str) -> bool {
    text == id
        || text
            .strip_prefix("e2b_")
            .is_some_and(|rest| rest.starts_with(id))
}

fn check(state: &mut Keys, text: &str) {
    let found = state.store.authenticate(text).expect("the store answers");
    match state.keys.iter().position(|k| k.key == text) {
        Some(i) => assert_eq!(found.as_ref(), Some(&state.keys[i].principal), "{text:?}"),
        None => assert_eq!(found, None, "{text:?} authenticated"),
    }
    let named: Vec<bool> = state.keys.iter().map(|k| names(text, &k.id)).collect();
    let revoked = state.store.revoke_key(text).expect("the store answers");
    assert_eq!(revoked, named.contains(&true), "revoking by {text:?}");
    for (i, named) in named.into_iter().enumerate() {
        let live = state
            .store
            .authenticate(&state.keys[i].key)
            .expect("the store answers")
            .is_some();
        assert_eq!(live, !named, "key {i} after revoking by {text:?}");
        if named {
            let (team, admin) = TEAMS[i];
            state.keys[i] = state.store.create_key(team, admin).expect("a key");
        }
    }
}

fn main() {
    // Built on the first input, in the process AFL forked (not in its fork server). A panic ends
    // the process (the hook aborts), so nothing sees the state after one: asserting unwind
    // safety is sound.
    let mut keys = AssertUnwindSafe(None::<Keys>);
    afl::fuzz(true, move |data: &[u8]| {
        let state = keys.get_or_insert_with(Keys::start);
        let text = String::from_utf8_lossy(data)
            .replace("@KEY@", &state.keys[0].key)
            .replace("@ID@", &state.keys[0].id);
        check(state, &text);
    });
}
