//! Persistent state of one burrow node, in two SQLite files (WAL) of its data dir:
//!
//! - `burrow.db`, shared by every process that uses the data dir (the server, `burrow keys …`):
//!   teams, hashed API keys, custom environments. Writes are short transactions on one writer
//!   connection; reads use connections of their own, which in WAL mode never wait for a writer,
//!   so a long write by another process delays other writes but never a key lookup.
//! - `node.db`, the node's own: its ID and its sessions, written by its server alone, so no other
//!   process's transaction can hold up a create, a refresh or a delete.
//!
//! Owns the schemas and their migrations; knows nothing of sandboxes or HTTP. Every call blocks:
//! async code runs it through [`Store::call`], off the async workers.

mod environments;
mod keys;
mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

pub use environments::{CustomEnvironment, EnvironmentState, Put};
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
    /// What the client asked for: a built-in name or the team's custom environment ID.
    pub environment: String,
    /// The built-in environment it runs: `environment` itself, or the custom one's template.
    pub template: String,
    pub edit_enabled: bool,
    pub sandbox_id: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds; the session is gone after this unless refreshed.
    pub expires_at: i64,
    /// The session has left service and is being ended (an edit session: its edits saved): a
    /// restart finishes the end instead of adopting it.
    pub ending: bool,
    /// An edit session of a custom environment: the root it started from, which its save
    /// applies its changes to.
    pub edit_base: Option<EditBase>,
    /// The lifetime the client set (milliseconds), a sandbox of the current E2B API:
    /// `expires_at` is then its end, which a restart keeps, rather than a refresh deadline.
    pub timeout_ms: Option<i64>,
    /// The client's labels of the session.
    pub metadata: BTreeMap<String, String>,
}

/// The root an edit session of a custom environment started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditBase {
    /// The environment's saved version it started from; `None`: its template's root.
    pub snapshot: Option<String>,
    /// The lower layer of its root on the host.
    pub rootfs: PathBuf,
}

/// Read connections of the shared file kept for reuse (each holds two descriptors); more are
/// opened while these are busy, and closed after.
const IDLE_READERS: usize = 2;

pub struct Store {
    shared_path: PathBuf,
    /// The writer of `burrow.db`.
    shared: Mutex<Connection>,
    /// Idle read-only connections of `burrow.db`.
    readers: Mutex<Vec<Connection>>,
    /// `node.db`, this node's own.
    node: Mutex<Connection>,
}

/// A read connection, back to the idle list when dropped.
pub(crate) struct Reader<'a> {
    store: &'a Store,
    conn: Option<Connection>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a reader holds its connection until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        let mut idle = lock(&self.store.readers);
        if idle.len() < IDLE_READERS {
            idle.extend(self.conn.take());
        }
    }
}

/// A poisoned lock is still safe to use: a panic while holding it cannot leave SQLite
/// half-written (transactions roll back on drop).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn open(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, flags).map_err(|source| Error::Open {
        path: path.display().to_string(),
        source,
    })?;
    // Writers wait for another process's write; readers only in WAL's rare recovery cases.
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

fn open_writer(path: &Path) -> Result<Connection> {
    let conn = open(path, OpenFlags::default())?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) `burrow.db` at `path` and `node.db` beside it, and brings their
    /// schemas up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let mut shared = open_writer(path)?;
        let mut node = open_writer(&path.with_file_name("node.db"))?;
        schema::migrate(&mut shared, &mut node)?;
        Ok(Store {
            shared_path: path.to_path_buf(),
            shared: Mutex::new(shared),
            readers: Mutex::new(Vec::new()),
            node: Mutex::new(node),
        })
    }

    /// Runs `f` on the blocking pool: every call of the store may wait on SQLite.
    pub async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        lock(&self.shared)
    }

    fn reader(&self) -> Result<Reader<'_>> {
        let idle = lock(&self.readers).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open(
                &self.shared_path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
        };
        Ok(Reader {
            store: self,
            conn: Some(conn),
        })
    }

    fn node(&self) -> MutexGuard<'_, Connection> {
        lock(&self.node)
    }

    /// This node's ID: 8 `[a-z0-9]` characters, made on first use and stable afterwards. It is
    /// the `clientID` of every session, so a front proxy can route on it.
    pub fn node_id(&self) -> Result<String> {
        let conn = self.node();
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
        let base = row.edit_base.as_ref();
        self.node().execute(
            "INSERT INTO sessions (id, team_id, environment, template, edit_enabled, sandbox_id,
                 created_at, expires_at, ending, edit_snapshot, edit_rootfs, timeout_ms, metadata)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                row.id,
                row.team_id,
                row.environment,
                row.template,
                row.edit_enabled,
                row.sandbox_id,
                row.created_at,
                row.expires_at,
                row.ending,
                base.and_then(|b| b.snapshot.as_deref()),
                base.map(|b| b.rootfs.to_string_lossy().into_owned()),
                row.timeout_ms,
                metadata_json(&row.metadata),
            ],
        )?;
        Ok(())
    }

    pub fn set_session_expiry(&self, id: &str, expires_at: i64) -> Result<()> {
        self.node().execute(
            "UPDATE sessions SET expires_at = ?2 WHERE id = ?1",
            params![id, expires_at],
        )?;
        Ok(())
    }

    /// Sets the lifetime the client chose and the end it makes (see [`SessionRow::timeout_ms`]).
    pub fn set_session_timeout(&self, id: &str, timeout_ms: i64, expires_at: i64) -> Result<()> {
        self.node().execute(
            "UPDATE sessions SET timeout_ms = ?2, expires_at = ?3 WHERE id = ?1",
            params![id, timeout_ms, expires_at],
        )?;
        Ok(())
    }

    /// Records that a session is being ended (see [`SessionRow::ending`]).
    pub fn set_session_ending(&self, id: &str) -> Result<()> {
        self.node()
            .execute("UPDATE sessions SET ending = 1 WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Removes a session; true if it was there.
    pub fn delete_session(&self, id: &str) -> Result<bool> {
        Ok(self
            .node()
            .execute("DELETE FROM sessions WHERE id = ?1", params![id])?
            > 0)
    }

    pub fn sessions(&self) -> Result<Vec<SessionRow>> {
        let conn = self.node();
        let mut stmt = conn.prepare(
            "SELECT id, team_id, environment, template, edit_enabled, sandbox_id, created_at,
                 expires_at, ending, edit_snapshot, edit_rootfs, timeout_ms, metadata
             FROM sessions ORDER BY created_at",
        )?;
        let rows = stmt.query_map([], |r| {
            let snapshot: Option<String> = r.get(9)?;
            let rootfs: Option<String> = r.get(10)?;
            let metadata: String = r.get(12)?;
            Ok(SessionRow {
                id: r.get(0)?,
                team_id: r.get(1)?,
                environment: r.get(2)?,
                template: r.get(3)?,
                edit_enabled: r.get(4)?,
                sandbox_id: r.get(5)?,
                created_at: r.get(6)?,
                expires_at: r.get(7)?,
                ending: r.get(8)?,
                edit_base: rootfs.map(|rootfs| EditBase {
                    snapshot,
                    rootfs: rootfs.into(),
                }),
                timeout_ms: r.get(11)?,
                metadata: serde_json::from_str(&metadata).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        12,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// A session's metadata as stored: a JSON object of strings.
fn metadata_json(metadata: &BTreeMap<String, String>) -> String {
    serde_json::to_string(metadata).expect("a map of strings always serializes")
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
            template: "Bash".into(),
            edit_enabled: false,
            sandbox_id: keys::random_alnum(12),
            created_at: i as i64,
            expires_at: 1_000 + i as i64,
            ending: false,
            edit_base: None,
            timeout_ms: None,
            metadata: BTreeMap::new(),
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
            environment: "mine".into(),
            template: "Bash".into(),
            edit_enabled: true,
            sandbox_id: "box1".into(),
            created_at: 1,
            expires_at: 2,
            ending: false,
            edit_base: Some(EditBase {
                snapshot: Some("v1".into()),
                rootfs: "/data/environments/snapshots/1/mine/v1/rootfs".into(),
            }),
            timeout_ms: None,
            metadata: BTreeMap::from([
                ("owner".into(), "ana \"a\" ü".into()),
                ("empty".into(), String::new()),
            ]),
        };
        store.insert_session(&row).unwrap();
        store.set_session_expiry("sabc", 99).unwrap();
        store.set_session_ending("sabc").unwrap();
        assert_eq!(
            store.sessions().unwrap(),
            vec![SessionRow {
                expires_at: 99,
                ending: true,
                ..row.clone()
            }]
        );
        store.set_session_timeout("sabc", 300_000, 1234).unwrap();
        assert_eq!(
            store.sessions().unwrap(),
            vec![SessionRow {
                expires_at: 1234,
                ending: true,
                timeout_ms: Some(300_000),
                ..row
            }]
        );
        assert!(store.delete_session("sabc").unwrap());
        assert!(!store.delete_session("sabc").unwrap());
        assert!(store.sessions().unwrap().is_empty());
    }

    /// A data dir from before node.db: its sessions and node ID move there, once.
    #[test]
    fn sessions_and_node_id_move_to_node_db() {
        let dir = std::env::temp_dir().join(format!("burrow-store-{}", keys::random_alnum(12)));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = TempDir(dir);
        let path = dir.join("burrow.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &schema::SHARED[..schema::MOVED_TO_NODE] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 2;
                 INSERT INTO meta VALUES ('node_id', 'oldnode1');
                 INSERT INTO teams VALUES (1, 'acme', 0);
                 INSERT INTO sessions VALUES ('s1', 1, 'Bash', 0, 'box000000001', 5, 10);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.node_id().unwrap(), "oldnode1");
        let moved = store.sessions().unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(
            (
                moved[0].id.as_str(),
                moved[0].template.as_str(),
                moved[0].expires_at
            ),
            ("s1", "Bash", 10)
        );
        drop(store);
        let again = Store::open(&path).unwrap();
        assert_eq!(again.sessions().unwrap(), moved);
        assert_eq!(again.node_id().unwrap(), "oldnode1");
    }

    /// Another process holding burrow.db's write lock (as `burrow keys create` does, briefly)
    /// holds up neither key lookups nor session writes.
    #[test]
    fn a_long_write_elsewhere_stalls_no_lookup_and_no_session_write() {
        use std::time::Instant;

        let (store, dir) = temp_store();
        let key = store.create_key("acme", false).unwrap();
        let other = Connection::open(dir.join("burrow.db")).unwrap();
        other
            .execute_batch(
                "BEGIN IMMEDIATE; INSERT INTO teams (name, created_at) VALUES ('held', 0);",
            )
            .unwrap();
        let t = Instant::now();
        assert!(store.authenticate(&key.key).unwrap().is_some());
        assert!(
            store
                .environments(key.principal.team_id)
                .unwrap()
                .is_empty()
        );
        store
            .insert_session(&SessionRow {
                id: "s1".into(),
                team_id: key.principal.team_id,
                environment: "Bash".into(),
                template: "Bash".into(),
                edit_enabled: false,
                sandbox_id: "box000000001".into(),
                created_at: 0,
                expires_at: 1,
                ending: false,
                edit_base: None,
                timeout_ms: None,
                metadata: BTreeMap::new(),
            })
            .unwrap();
        store.set_session_expiry("s1", 2).unwrap();
        assert!(store.delete_session("s1").unwrap());
        // The busy timeout is 10 s: anything that waited for the lock would take that long.
        assert!(t.elapsed().as_secs() < 2, "took {:?}", t.elapsed());
        other.execute_batch("COMMIT").unwrap();
    }
}
