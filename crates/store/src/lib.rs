//! Persistent state of one burrow node: teams, hashed API keys, sessions and the node identity,
//! in one SQLite file (WAL). Owns the schema and its migrations; knows nothing of sandboxes or HTTP.
//!
//! Several processes use the file at once (the server and `burrow keys …`), so every write is a
//! short transaction and readers wait on a busy timeout instead of failing.

mod environments;
mod keys;
mod schema;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

pub use environments::{CustomEnvironment, EnvironmentState};
pub use keys::{KeyInfo, NewKey, Principal, random_alnum};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "the database was written by a newer burrow (schema {found}, this build knows {known}); upgrade burrow"
    )]
    TooNew { found: i64, known: i64 },
    #[error("team name {0:?} is invalid: use 1-64 characters of [A-Za-z0-9._-]")]
    TeamName(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A session as persisted: enough to adopt its sandbox after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub id: String,
    pub team_id: i64,
    pub environment: String,
    pub edit_enabled: bool,
    pub sandbox_id: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds; the session is gone after this unless refreshed.
    pub expires_at: i64,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Store {
            conn: Mutex::new(conn),
        };
        schema::migrate(&mut store.conn())?;
        Ok(store)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node's ID: 8 `[a-z0-9]` characters, made on first use and stable afterwards. It is
    /// the `clientID` of every session, so a front proxy can route on it.
    pub fn node_id(&self) -> Result<String> {
        let conn = self.conn();
        let existing: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(id) = existing {
            return Ok(id);
        }
        let id = keys::random_alnum(8);
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?1)",
            params![id],
        )?;
        Ok(
            conn.query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                r.get(0)
            })?,
        )
    }

    pub fn insert_session(&self, row: &SessionRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO sessions (id, team_id, environment, edit_enabled, sandbox_id, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                row.id,
                row.team_id,
                row.environment,
                row.edit_enabled,
                row.sandbox_id,
                row.created_at,
                row.expires_at
            ],
        )?;
        Ok(())
    }

    pub fn set_session_expiry(&self, id: &str, expires_at: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE sessions SET expires_at = ?2 WHERE id = ?1",
            params![id, expires_at],
        )?;
        Ok(())
    }

    /// Removes a session; true if it was there.
    pub fn delete_session(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM sessions WHERE id = ?1", params![id])?
            > 0)
    }

    pub fn sessions(&self) -> Result<Vec<SessionRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, team_id, environment, edit_enabled, sandbox_id, created_at, expires_at
             FROM sessions ORDER BY created_at",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SessionRow {
                id: r.get(0)?,
                team_id: r.get(1)?,
                environment: r.get(2)?,
                edit_enabled: r.get(3)?,
                sandbox_id: r.get(4)?,
                created_at: r.get(5)?,
                expires_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when this is dropped.
    pub(crate) struct TempDir(std::path::PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn temp_store() -> (Store, TempDir) {
        let dir = std::env::temp_dir().join(format!("burrow-store-{}", keys::random_alnum(12)));
        std::fs::create_dir_all(&dir).unwrap();
        (Store::open(&dir.join("burrow.db")).unwrap(), TempDir(dir))
    }

    #[test]
    fn node_id_is_stable_across_opens() {
        let (store, dir) = temp_store();
        let id = store.node_id().unwrap();
        assert_eq!(id.len(), 8);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        drop(store);
        let again = Store::open(&dir.join("burrow.db")).unwrap();
        assert_eq!(again.node_id().unwrap(), id);
    }

    /// What a store of 10,000 sessions costs, per operation the server performs on it: the
    /// inserts of creates, the expiry updates of refreshes, the full load of a restart, the
    /// deletes of expiries. Timings are printed (`--nocapture`); the bounds are loose enough for
    /// an unoptimised build on a busy machine and catch only a missing index or a quadratic path.
    #[test]
    fn ten_thousand_sessions() {
        use std::time::Instant;

        const N: usize = 10_000;
        let (store, _dir) = temp_store();
        let team = store.create_key("many", false).unwrap().principal.team_id;
        let ids: Vec<String> = (0..N).map(|_| keys::random_alnum(20)).collect();
        let row = |id: &str, i: usize| SessionRow {
            id: id.to_owned(),
            team_id: team,
            environment: "Bash".into(),
            edit_enabled: false,
            sandbox_id: keys::random_alnum(12),
            created_at: i as i64,
            expires_at: 1_000 + i as i64,
        };

        let t = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            store.insert_session(&row(id, i)).unwrap();
        }
        let insert = t.elapsed();

        let t = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            store.set_session_expiry(id, 5_000 + i as i64).unwrap();
        }
        let refresh = t.elapsed();

        let t = Instant::now();
        let all = store.sessions().unwrap();
        let load = t.elapsed();
        assert_eq!(all.len(), N);
        assert!(all.iter().all(|r| r.expires_at >= 5_000));
        assert!(all.windows(2).all(|w| w[0].created_at <= w[1].created_at));

        let t = Instant::now();
        for id in &ids[..N / 2] {
            assert!(store.delete_session(id).unwrap());
        }
        let delete = t.elapsed();
        assert_eq!(store.sessions().unwrap().len(), N / 2);

        let per = |d: std::time::Duration, n: usize| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "{N} sessions: insert {:.0} µs/row, refresh {:.0} µs/row, load all {:.1} ms, delete {:.0} µs/row",
            per(insert, N),
            per(refresh, N),
            load.as_secs_f64() * 1e3,
            per(delete, N / 2)
        );
        assert!(
            per(insert, N) < 5_000.0 && per(refresh, N) < 5_000.0 && per(delete, N / 2) < 5_000.0
        );
        assert!(load.as_secs() < 5, "loading {N} sessions took {load:?}");
    }

    #[test]
    fn sessions_round_trip() {
        let (store, _dir) = temp_store();
        let key = store.create_key("acme", false).unwrap();
        let row = SessionRow {
            id: "sabc".into(),
            team_id: key.principal.team_id,
            environment: "Bash".into(),
            edit_enabled: true,
            sandbox_id: "box1".into(),
            created_at: 1,
            expires_at: 2,
        };
        store.insert_session(&row).unwrap();
        store.set_session_expiry("sabc", 99).unwrap();
        assert_eq!(
            store.sessions().unwrap(),
            vec![SessionRow {
                expires_at: 99,
                ..row
            }]
        );
        assert!(store.delete_session("sabc").unwrap());
        assert!(!store.delete_session("sabc").unwrap());
        assert!(store.sessions().unwrap().is_empty());
    }
}
