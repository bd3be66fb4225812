//! `/envs`: a team's custom environments, each a named, titled use of a built-in template whose
//! ID the team can pass as `codeSnippetID`. Semantics where the original API was silent:
//! `POST /envs` makes a new ID, `POST /envs/{id}` creates or replaces one with the caller's ID,
//! `PATCH` changes template and/or title, `PUT …/state` gates new sessions (only `Done` starts
//! them), `DELETE` leaves running sessions alone.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use burrow_sessions::EnvironmentUpdate;
use burrow_store::{CustomEnvironment, EnvironmentState};
use serde::{Deserialize, Serialize};

use crate::{ApiError, JsonBody, Key, PathId, Shared, error};

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct NewEnvironment {
    /// The built-in environment it starts from (`Python3`, `Nodejs`, ...).
    template: String,
    /// A name for people; defaults to the template's.
    #[serde(default)]
    title: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct EnvironmentPatch {
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    title: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct EnvironmentStateBody {
    /// Sessions start only from `Done` environments.
    state: StateName,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) enum StateName {
    Building,
    Failed,
    Done,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct EnvironmentTitle {
    title: String,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Environment)]
pub(crate) struct EnvironmentBody {
    /// Usable as `codeSnippetID` by the owning team.
    id: String,
    template: String,
    title: String,
}

impl From<CustomEnvironment> for EnvironmentBody {
    fn from(e: CustomEnvironment) -> Self {
        EnvironmentBody {
            id: e.id,
            template: e.template,
            title: e.title,
        }
    }
}

/// The caller's team's custom environments.
#[utoipa::path(get, path = "/envs", tag = "environments",
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 200, description = "The team's environments", body = [EnvironmentBody]),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody)))]
pub(crate) async fn list(
    State(app): Shared,
    key: Key,
) -> Result<Json<Vec<EnvironmentBody>>, ApiError> {
    let principal = app.require(key).await?;
    let envs = app.sessions.custom_environments(&principal).await?;
    Ok(Json(envs.into_iter().map(Into::into).collect()))
}

/// Create a custom environment with a new ID.
#[utoipa::path(post, path = "/envs", tag = "environments", request_body = NewEnvironment,
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 200, description = "Created", body = EnvironmentBody),
        (status = 400, description = "Bad body or unknown template", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 429, description = "The team has as many custom environments as it may (--max-environments-per-team)", body = error::ErrorBody)))]
pub(crate) async fn create(
    State(app): Shared,
    key: Key,
    JsonBody(body): JsonBody<NewEnvironment>,
) -> Result<Json<EnvironmentBody>, ApiError> {
    let principal = app.require(key).await?;
    let env = app
        .sessions
        .put_custom_environment(&principal, None, &body.template, body.title.as_deref())
        .await?;
    Ok(Json(env.into()))
}

/// Create, or replace, the custom environment with this ID.
#[utoipa::path(post, path = "/envs/{codeSnippetID}", tag = "environments", request_body = NewEnvironment,
    params(("codeSnippetID" = String, Path, description = "The environment's ID", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 204, description = "Created or replaced"),
        (status = 400, description = "Bad body, ID or template", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 409, description = "The ID is a built-in name or another team's", body = error::ErrorBody),
        (status = 429, description = "The team has as many custom environments as it may (--max-environments-per-team)", body = error::ErrorBody)))]
pub(crate) async fn put(
    State(app): Shared,
    key: Key,
    PathId(id): PathId,
    JsonBody(body): JsonBody<NewEnvironment>,
) -> Result<StatusCode, ApiError> {
    let principal = app.require(key).await?;
    app.sessions
        .put_custom_environment(&principal, Some(&id), &body.template, body.title.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn update(
    app: Shared,
    key: Key,
    id: String,
    update: EnvironmentUpdate,
) -> Result<StatusCode, ApiError> {
    let principal = app.require(key).await?;
    app.sessions
        .update_custom_environment(&principal, &id, update)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change a custom environment's template and/or title.
#[utoipa::path(patch, path = "/envs/{codeSnippetID}", tag = "environments", request_body = EnvironmentPatch,
    params(("codeSnippetID" = String, Path, description = "The environment's ID")),
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 204, description = "Changed"),
        (status = 400, description = "Bad body or unknown template", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such environment of the team", body = error::ErrorBody)))]
pub(crate) async fn patch(
    app: Shared,
    key: Key,
    PathId(id): PathId,
    JsonBody(body): JsonBody<EnvironmentPatch>,
) -> Result<StatusCode, ApiError> {
    let change = EnvironmentUpdate {
        template: body.template,
        title: body.title,
        state: None,
    };
    update(app, key, id, change).await
}

/// Set a custom environment's state; only `Done` environments start sessions.
#[utoipa::path(put, path = "/envs/{codeSnippetID}/state", tag = "environments", request_body = EnvironmentStateBody,
    params(("codeSnippetID" = String, Path, description = "The environment's ID")),
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 204, description = "Changed"),
        (status = 400, description = "Bad body", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such environment of the team", body = error::ErrorBody)))]
pub(crate) async fn set_state(
    app: Shared,
    key: Key,
    PathId(id): PathId,
    JsonBody(body): JsonBody<EnvironmentStateBody>,
) -> Result<StatusCode, ApiError> {
    let state = match body.state {
        StateName::Building => EnvironmentState::Building,
        StateName::Failed => EnvironmentState::Failed,
        StateName::Done => EnvironmentState::Done,
    };
    let change = EnvironmentUpdate {
        state: Some(state),
        ..EnvironmentUpdate::default()
    };
    update(app, key, id, change).await
}

/// Rename a custom environment.
#[utoipa::path(put, path = "/envs/{codeSnippetID}/title", tag = "environments", request_body = EnvironmentTitle,
    params(("codeSnippetID" = String, Path, description = "The environment's ID")),
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 204, description = "Changed"),
        (status = 400, description = "Bad body", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such environment of the team", body = error::ErrorBody)))]
pub(crate) async fn set_title(
    app: Shared,
    key: Key,
    PathId(id): PathId,
    JsonBody(body): JsonBody<EnvironmentTitle>,
) -> Result<StatusCode, ApiError> {
    let change = EnvironmentUpdate {
        title: Some(body.title),
        ..EnvironmentUpdate::default()
    };
    update(app, key, id, change).await
}

/// Delete a custom environment; sessions running from it keep running.
#[utoipa::path(delete, path = "/envs/{codeSnippetID}", tag = "environments",
    params(("codeSnippetID" = String, Path, description = "The environment's ID")),
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such environment of the team", body = error::ErrorBody)))]
pub(crate) async fn delete(
    State(app): Shared,
    key: Key,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    let principal = app.require(key).await?;
    app.sessions
        .delete_custom_environment(&principal, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
