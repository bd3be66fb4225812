//! Custom environments: a team's own names for a built-in template (the `/envs` API). A custom
//! environment's ID is a `codeSnippetID` for its team only; other teams never learn it exists.

use rusqlite::{OptionalExtension, params};

use crate::{Result, Store};

/// Where a custom environment's image stands; sessions start only from `Done` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvironmentState {
    Building,
    Failed,
    Done,
}

impl EnvironmentState {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvironmentState::Building => "Building",
            EnvironmentState::Failed => "Failed",
            EnvironmentState::Done => "Done",
        }
    }

    pub fn parse(s: &str) -> Option<EnvironmentState> {
        match s {
            "Building" => Some(EnvironmentState::Building),
            "Failed" => Some(EnvironmentState::Failed),
            "Done" => Some(EnvironmentState::Done),
            _ => None,
        }
    }
}

/// What [`Store::put_environment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Done,
    /// The ID is another team's.
    Taken,
    /// The team has as many environments as it may.
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomEnvironment {
    pub id: String,
    pub team_id: i64,
    /// The built-in environment it starts from.
    pub template: String,
    pub title: String,
    pub state: EnvironmentState,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CustomEnvironment> {
    let state: String = r.get(4)?;
    Ok(CustomEnvironment {
        id: r.get(0)?,
        team_id: r.get(1)?,
        template: r.get(2)?,
        title: r.get(3)?,
        state: EnvironmentState::parse(&state).unwrap_or(EnvironmentState::Failed),
    })
}

const COLUMNS: &str = "id, team_id, template, title, state";

impl Store {
    /// Creates the environment, or replaces the template and title of the team's own one with
    /// that ID. A new one is refused while the team has `limit` already; in one transaction, so
    /// concurrent creates cannot overshoot.
    pub fn put_environment(&self, env: &CustomEnvironment, limit: usize) -> Result<Put> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let owner: Option<i64> = tx
            .query_row(
                "SELECT team_id FROM environments WHERE id = ?1",
                params![env.id],
                |r| r.get(0),
            )
            .optional()?;
        match owner {
            Some(team) if team != env.team_id => return Ok(Put::Taken),
            Some(_) => {}
            None => {
                let count: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM environments WHERE team_id = ?1",
                    params![env.team_id],
                    |r| r.get(0),
                )?;
                if count as usize >= limit {
                    return Ok(Put::Full);
                }
            }
        }
        tx.execute(
            "INSERT INTO environments (id, team_id, template, title, state, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, strftime('%s','now') * 1000)
             ON CONFLICT (id) DO UPDATE SET template = ?3, title = ?4, state = ?5",
            params![
                env.id,
                env.team_id,
                env.template,
                env.title,
                env.state.as_str()
            ],
        )?;
        tx.commit()?;
        Ok(Put::Done)
    }

    /// The team's environment with this ID.
    pub fn environment(&self, team_id: i64, id: &str) -> Result<Option<CustomEnvironment>> {
        Ok(self
            .reader()?
            .query_row(
                &format!("SELECT {COLUMNS} FROM environments WHERE id = ?1 AND team_id = ?2"),
                params![id, team_id],
                row,
            )
            .optional()?)
    }

    pub fn environments(&self, team_id: i64) -> Result<Vec<CustomEnvironment>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM environments WHERE team_id = ?1 ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map(params![team_id], row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes the team's environment; false if it has none with this ID.
    pub fn delete_environment(&self, team_id: i64, id: &str) -> Result<bool> {
        Ok(self.writer().execute(
            "DELETE FROM environments WHERE id = ?1 AND team_id = ?2",
            params![id, team_id],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::temp_store;

    #[test]
    fn environments_belong_to_their_team() {
        let (store, _dir) = temp_store();
        let a = store.create_key("a", false).unwrap().principal.team_id;
        let b = store.create_key("b", false).unwrap().principal.team_id;
        let mut env = CustomEnvironment {
            id: "myenv".into(),
            team_id: a,
            template: "Python3".into(),
            title: "Mine".into(),
            state: EnvironmentState::Done,
        };
        assert_eq!(store.put_environment(&env, 1).unwrap(), Put::Done);
        env.title = "Renamed".into();
        // Replacing is not adding: the limit of one still holds it.
        assert_eq!(store.put_environment(&env, 1).unwrap(), Put::Done);
        let second = CustomEnvironment {
            id: "another".into(),
            ..env.clone()
        };
        assert_eq!(store.put_environment(&second, 1).unwrap(), Put::Full);
        assert_eq!(store.environment(a, "myenv").unwrap(), Some(env.clone()));
        // Another team can neither see, overwrite nor delete it.
        assert_eq!(store.environment(b, "myenv").unwrap(), None);
        assert!(store.environments(b).unwrap().is_empty());
        assert_eq!(
            store
                .put_environment(
                    &CustomEnvironment {
                        team_id: b,
                        ..env.clone()
                    },
                    10
                )
                .unwrap(),
            Put::Taken
        );
        assert!(!store.delete_environment(b, "myenv").unwrap());
        assert_eq!(store.environments(a).unwrap(), vec![env]);
        assert!(store.delete_environment(a, "myenv").unwrap());
        assert_eq!(store.environment(a, "myenv").unwrap(), None);
    }
}
