//! The schema, as an ordered list of migrations applied at open. `PRAGMA user_version` records
//! how many have run; a migration is never edited once released, only appended to.

use rusqlite::Connection;

use crate::{Error, Result};

const MIGRATIONS: &[&str] = &[
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
];

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if done > known {
        return Err(Error::TooNew { found: done, known });
    }
    for sql in &MIGRATIONS[done as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}
