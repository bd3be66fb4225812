//! Teams and API keys. A key is `e2b_<id><secret>`: the 8-character id is public (it names the
//! key in listings and revocations), the 32-character secret is stored only as its SHA-256 and
//! compared in constant time. The secret has ~165 random bits, so a fast hash is enough: there
//! is nothing to brute-force that a slow hash would protect.

use rand::Rng;
use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Error, Result, Store};

const PREFIX: &str = "e2b_";
const ID_LEN: usize = 8;
const SECRET_LEN: usize = 32;

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub team_id: i64,
    pub team: String,
    pub admin: bool,
}

/// A key just made: the only time its full text exists.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key: String,
    pub id: String,
    pub principal: Principal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub team: String,
    pub admin: bool,
    /// Unix milliseconds.
    pub created_at: i64,
    pub revoked: bool,
}

/// `n` random characters of `[a-z0-9]`: safe in DNS labels and URLs.
pub fn random_alnum(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn valid_team_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Store {
    /// Makes a key for `team`, creating the team if it is new.
    pub fn create_key(&self, team: &str, admin: bool) -> Result<NewKey> {
        if !valid_team_name(team) {
            return Err(Error::TeamName(team.to_string()));
        }
        let id = random_alnum(ID_LEN);
        let secret = random_alnum(SECRET_LEN);
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO teams (name, created_at) VALUES (?1, ?2)",
            params![team, now_ms()],
        )?;
        let team_id: i64 =
            tx.query_row("SELECT id FROM teams WHERE name = ?1", params![team], |r| {
                r.get(0)
            })?;
        tx.execute(
            "INSERT INTO api_keys (id, team_id, secret_sha256, admin, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, team_id, Sha256::digest(secret.as_bytes()).as_slice(), admin, now_ms()],
        )?;
        tx.commit()?;
        Ok(NewKey {
            key: format!("{PREFIX}{id}{secret}"),
            id,
            principal: Principal {
                team_id,
                team: team.to_string(),
                admin,
            },
        })
    }

    /// The principal of a valid, unrevoked key; `None` for anything else.
    pub fn authenticate(&self, key: &str) -> Result<Option<Principal>> {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            return Ok(None);
        };
        if rest.len() != ID_LEN + SECRET_LEN || !rest.is_ascii() {
            return Ok(None);
        }
        let (id, secret) = rest.split_at(ID_LEN);
        let found: Option<(Vec<u8>, i64, String, bool)> = self
            .reader()?
            .query_row(
                "SELECT k.secret_sha256, t.id, t.name, k.admin FROM api_keys k JOIN teams t ON t.id = k.team_id
                 WHERE k.id = ?1 AND k.revoked_at IS NULL",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((stored, team_id, team, admin)) = found else {
            return Ok(None);
        };
        let given = Sha256::digest(secret.as_bytes());
        if bool::from(given.as_slice().ct_eq(&stored)) {
            Ok(Some(Principal {
                team_id,
                team,
                admin,
            }))
        } else {
            Ok(None)
        }
    }

    pub fn keys(&self) -> Result<Vec<KeyInfo>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(
            "SELECT k.id, t.name, k.admin, k.created_at, k.revoked_at IS NOT NULL
             FROM api_keys k JOIN teams t ON t.id = k.team_id ORDER BY k.created_at, k.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(KeyInfo {
                id: r.get(0)?,
                team: r.get(1)?,
                admin: r.get(2)?,
                created_at: r.get(3)?,
                revoked: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Revokes a key named by its id or its full text; true if a live key was revoked.
    pub fn revoke_key(&self, id_or_key: &str) -> Result<bool> {
        // `get` rather than slicing: a non-ASCII argument may have no character boundary at
        // ID_LEN, and it cannot name a key anyway (ids are ASCII).
        let id = id_or_key
            .strip_prefix(PREFIX)
            .map_or(id_or_key, |rest| rest.get(..ID_LEN).unwrap_or(rest));
        Ok(self.writer().execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now_ms()],
        )? > 0)
    }

    /// Whether any key, revoked or not, was ever made: the first start makes the admin key.
    pub fn has_keys(&self) -> Result<bool> {
        Ok(self
            .reader()?
            .query_row("SELECT EXISTS (SELECT 1 FROM api_keys)", [], |r| r.get(0))?)
    }

    /// The principal used for every request when auth is off: the admin of team `default`.
    pub fn default_principal(&self) -> Result<Principal> {
        let conn = self.writer();
        conn.execute(
            "INSERT OR IGNORE INTO teams (name, created_at) VALUES ('default', ?1)",
            params![now_ms()],
        )?;
        let team_id = conn.query_row("SELECT id FROM teams WHERE name = 'default'", [], |r| {
            r.get(0)
        })?;
        Ok(Principal {
            team_id,
            team: "default".into(),
            admin: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::temp_store;

    #[test]
    fn a_key_authenticates_its_team_until_revoked() {
        let (store, _dir) = temp_store();
        assert!(!store.has_keys().unwrap());
        let k = store.create_key("acme", false).unwrap();
        assert!(k.key.starts_with("e2b_") && k.key.len() == 44);
        let p = store.authenticate(&k.key).unwrap().unwrap();
        assert_eq!((p.team.as_str(), p.admin), ("acme", false));
        assert!(store.has_keys().unwrap());
        assert!(store.revoke_key(&k.key).unwrap());
        assert_eq!(store.authenticate(&k.key).unwrap(), None);
        assert!(!store.revoke_key(&k.id).unwrap());
        assert!(store.keys().unwrap()[0].revoked);
    }

    #[test]
    fn wrong_secrets_and_garbage_do_not_authenticate() {
        let (store, _dir) = temp_store();
        let k = store.create_key("acme", true).unwrap();
        let mut wrong = k.key.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'a' { 'b' } else { 'a' });
        for bad in [
            wrong.as_str(),
            "",
            "e2b_",
            "nope",
            &k.key[..20],
            "e2b_ééééééééééééééééééééé",
        ] {
            assert_eq!(store.authenticate(bad).unwrap(), None, "{bad:?}");
        }
    }

    #[test]
    fn any_text_authenticates_only_as_the_exact_key_and_revokes_only_its_id() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        let (store, _dir) = temp_store();
        let key = store.create_key("acme", false).unwrap();
        let text = prop_oneof![
            any::<String>(),
            any::<String>().prop_map(|s| format!("e2b_{s}")),
            // The key with one character replaced, cut short or extended.
            (0..key.key.len(), any::<char>()).prop_map({
                let key = key.key.clone();
                move |(at, c)| {
                    let mut chars: Vec<char> = key.chars().collect();
                    chars[at] = c;
                    chars.into_iter().collect()
                }
            }),
            (0..key.key.len()).prop_map({
                let key = key.key.clone();
                move |n| key[..n].to_owned()
            }),
            any::<String>().prop_map({
                let key = key.key.clone();
                move |s| format!("{key}{s}")
            }),
        ];
        let config = Config {
            failure_persistence: None,
            ..Config::default()
        };
        TestRunner::new(config)
            .run(&text, |text| {
                let found = store.authenticate(&text).unwrap();
                prop_assert_eq!(found.is_some(), text == key.key, "{:?}", text);
                // Revoking by any text revokes this key only if the text names its id.
                let names_it = text == key.id
                    || text.strip_prefix("e2b_").and_then(|r| r.get(..8)) == Some(&key.id);
                if !names_it {
                    prop_assert!(
                        !store.revoke_key(&text).unwrap(),
                        "{:?} revoked a key",
                        text
                    );
                    prop_assert!(store.authenticate(&key.key).unwrap().is_some());
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn teams_are_shared_by_their_keys() {
        let (store, _dir) = temp_store();
        let a = store.create_key("acme", false).unwrap();
        let b = store.create_key("acme", true).unwrap();
        let c = store.create_key("other", false).unwrap();
        assert_eq!(a.principal.team_id, b.principal.team_id);
        assert_ne!(a.principal.team_id, c.principal.team_id);
        assert!(store.create_key("bad name!", false).is_err());
    }
}
