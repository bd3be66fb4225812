//! A team's custom environments (the `/envs` API): its own IDs for a built-in template, usable as
//! `codeSnippetID` by that team only. What their edit sessions save (see `Sessions::save_edits`)
//! belongs to the environment: replacing it, changing its template or deleting it forgets it.

use burrow_store::{CustomEnvironment, EnvironmentState, Principal, Put};

use crate::{Error, Sessions};

/// What may change in an existing custom environment.
#[derive(Debug, Default)]
pub struct EnvironmentUpdate {
    pub template: Option<String>,
    pub title: Option<String>,
    pub state: Option<EnvironmentState>,
}

/// Custom IDs live in the same namespace as built-in names and DNS-safe session hostnames do
/// not carry them, but clients do put them in URLs: keep them short and plain.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Sessions {
    pub async fn custom_environments(
        &self,
        principal: &Principal,
    ) -> Result<Vec<CustomEnvironment>, Error> {
        let team_id = principal.team_id;
        self.store(move |s| s.environments(team_id)).await
    }

    /// Creates a custom environment from a built-in `template`, with the given ID or a new one;
    /// an existing one of the team's with that ID is replaced, saved edits included.
    pub async fn put_custom_environment(
        &self,
        principal: &Principal,
        id: Option<&str>,
        template: &str,
        title: Option<&str>,
    ) -> Result<CustomEnvironment, Error> {
        self.builtin(template)?;
        let given = id.is_some();
        let id = match id {
            Some(id) if !valid_id(id) => {
                return Err(Error::InvalidEnvironmentId(id.to_string()));
            }
            Some(id) if self.inner.catalog.get(id).is_some() => {
                return Err(Error::EnvironmentIdTaken(id.to_string()));
            }
            Some(id) => id.to_string(),
            None => burrow_store::random_alnum(12),
        };
        let env = CustomEnvironment {
            team_id: principal.team_id,
            template: template.to_string(),
            title: title.unwrap_or(template).to_string(),
            state: EnvironmentState::Done,
            id,
        };
        let limit = self.inner.config.max_environments_per_team;
        let put = env.clone();
        match self.store(move |s| s.put_environment(&put, limit)).await? {
            Put::Done => {}
            Put::Taken => return Err(Error::EnvironmentIdTaken(env.id)),
            Put::Full => return Err(Error::TooManyEnvironments(limit)),
        }
        if given {
            self.forget_edits(principal.team_id, &env.id).await?;
        }
        Ok(env)
    }

    pub async fn update_custom_environment(
        &self,
        principal: &Principal,
        id: &str,
        update: EnvironmentUpdate,
    ) -> Result<(), Error> {
        let (team_id, name) = (principal.team_id, id.to_string());
        let mut env = self
            .store(move |s| s.environment(team_id, &name))
            .await?
            .ok_or_else(|| Error::EnvironmentNotFound(id.to_string()))?;
        let mut forget = false;
        if let Some(template) = update.template {
            self.builtin(&template)?;
            forget = template != env.template;
            env.template = template;
        }
        if let Some(title) = update.title {
            env.title = title;
        }
        if let Some(state) = update.state {
            env.state = state;
        }
        // The environment exists: replacing it never meets the limit.
        self.store(move |s| s.put_environment(&env, usize::MAX))
            .await?;
        if forget {
            // Saved edits were made on the old template's root.
            self.forget_edits(principal.team_id, id).await?;
        }
        Ok(())
    }

    /// Deletes a custom environment and what its edit sessions saved; sessions already running
    /// from it keep running.
    pub async fn delete_custom_environment(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<(), Error> {
        let (team_id, name) = (principal.team_id, id.to_string());
        if !self
            .store(move |s| s.delete_environment(team_id, &name))
            .await?
        {
            return Err(Error::EnvironmentNotFound(id.to_string()));
        }
        self.forget_edits(principal.team_id, id).await
    }

    /// Drops the saved edits of a team's environment, after any save in progress.
    async fn forget_edits(&self, team_id: i64, id: &str) -> Result<(), Error> {
        let _saving = self.inner.saving.lock(team_id, id).await;
        let snapshots = self.inner.catalog.snapshots(team_id);
        let id = id.to_string();
        tokio::task::spawn_blocking(move || snapshots.reset(&id))
            .await
            .expect("dropping snapshots does not panic")?;
        Ok(())
    }
}
