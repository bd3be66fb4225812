//! The schemas of the two files, each an ordered list of migrations applied at open. `PRAGMA
//! user_version` records how many have run; a migration is never edited once released, only
//! appended to.

use rusqlite::{Connection, params};

use crate::{Error, Result};

/// `burrow.db`: what every process of the data dir shares (teams, keys, custom environments).
pub(crate) const SHARED: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE teams (
         id INTEGER PRIMARY KEY,
         name TEXT NOT NULL UNIQUE,
         created_at INTEGER NOT NULL
     );
     CREATE TABLE api_keys (
         id TEXT PRIMARY KEY,
         team_id INTEGER NOT NULL REFERENCES teams(id),
         secret_sha256 BLOB NOT NULL,
         admin INTEGER NOT NULL,
         created_at INTEGER NOT NULL,
         revoked_at INTEGER
     );
     CREATE TABLE sessions (
         id TEXT PRIMARY KEY,
         team_id INTEGER NOT NULL REFERENCES teams(id),
         environment TEXT NOT NULL,
         edit_enabled INTEGER NOT NULL,
         sandbox_id TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         expires_at INTEGER NOT NULL
     );",
    // 2: custom environments of a team, derived from a built-in template.
    "CREATE TABLE environments (
         id TEXT PRIMARY KEY,
         team_id INTEGER NOT NULL REFERENCES teams(id),
         template TEXT NOT NULL,
         title TEXT NOT NULL,
         state TEXT NOT NULL,
         created_at INTEGER NOT NULL
     );",
    // 3: sessions and the node ID moved to node.db (see `move_to_node`).
    "DROP TABLE sessions;
     DELETE FROM meta WHERE key = 'node_id';",
];

/// The migration of [`SHARED`] that drops what [`move_to_node`] copies first.
pub(crate) const MOVED_TO_NODE: usize = 2;

/// `node.db`: this node's own state, written by its server alone.
const NODE: &[&str] = &[
    // 1: the node ID and its sessions.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE sessions (
         id TEXT PRIMARY KEY,
         team_id INTEGER NOT NULL,
         environment TEXT NOT NULL,
         template TEXT NOT NULL,
         edit_enabled INTEGER NOT NULL,
         sandbox_id TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         expires_at INTEGER NOT NULL,
         ending INTEGER NOT NULL DEFAULT 0,
         edit_snapshot TEXT,
         edit_rootfs TEXT
     );
     CREATE INDEX sessions_by_creation ON sessions (created_at);",
    // 2: sandboxes of the current E2B API: a lifetime set by the client instead of the refresh
    // TTL, and the client's metadata (a JSON object of strings).
    "ALTER TABLE sessions ADD COLUMN timeout_ms INTEGER;
     ALTER TABLE sessions ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';",
];

/// Runs the migrations `conn` has not seen, in one transaction; `before(tx, i)` runs ahead of
/// migration `i`, inside it.
fn apply(
    conn: &mut Connection,
    migrations: &[&str],
    mut before: impl FnMut(&Connection, usize) -> Result<()>,
) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = migrations.len() as i64;
    if done > known {
        return Err(Error::TooNew { found: done, known });
    }
    for (i, sql) in migrations.iter().enumerate().skip(done as usize) {
        before(&tx, i)?;
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

pub(crate) fn migrate(shared: &mut Connection, node: &mut Connection) -> Result<()> {
    apply(node, NODE, |_, _| Ok(()))?;
    apply(shared, SHARED, |tx, i| match i {
        MOVED_TO_NODE => move_to_node(tx, node),
        _ => Ok(()),
    })
}

/// Copies the sessions and the node ID of a data dir made before node.db existed into it, in
/// one transaction of node.db committed before the shared file drops them: a crash in between
/// copies them again, which changes nothing.
fn move_to_node(old: &Connection, node: &mut Connection) -> Result<()> {
    let tx = node.transaction()?;
    {
        let mut rows = old.prepare(
            "SELECT id, team_id, environment, edit_enabled, sandbox_id, created_at, expires_at
             FROM sessions",
        )?;
        let mut insert = tx.prepare(
            "INSERT OR IGNORE INTO sessions
             (id, team_id, environment, template, edit_enabled, sandbox_id, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut rows = rows.query([])?;
        while let Some(r) = rows.next()? {
            insert.execute(params![
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?
            ])?;
        }
        let node_id: Option<String> = old
            .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                r.get(0)
            })
            .ok();
        if let Some(id) = node_id {
            tx.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?1)",
                params![id],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}
