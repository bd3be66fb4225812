//! `/sandboxes` and `/v2/sandboxes`: the control plane of the current E2B SDKs (e2b v2 wire spec
//! §3), over the same sessions as the session-era API. A sandbox is a session whose lifetime is
//! the client's `timeout` rather than the refresh TTL; its ID is the session's ID and its
//! `clientID` this node's ID. Template `base` is burrow's `Bash` environment (and is reported as
//! `base`); any other `templateID` is an environment name as `codeSnippetID` takes it.
//!
//! What burrow does not serve yet is refused, never silently ignored: `envVars` other than `{}`,
//! and the `startedAfter` filter, get a `400`. Other unknown request fields are ignored, as E2B
//! adds some in most releases.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use burrow_sessions::{Error as SessionError, NewSession, SessionInfo};
use serde::{Deserialize, Serialize};

use crate::{ApiError, JsonBody, Key, PathId, Shared, error};

/// The envd version burrow's envd answers as (wire spec §6.4): the SDKs gate features on it, and
/// at 0.5.7 they use none that burrow's envd lacks (file metadata, `include_entry` on watch
/// events and network mounts come at 0.6.x).
pub(crate) const ENVD_VERSION: &str = "0.5.7";
/// E2B's default template, and the burrow environment that plays it.
const BASE_TEMPLATE: &str = "base";
const BASE_ENVIRONMENT: &str = "Bash";
/// The longest lifetime a client may give a sandbox (E2B's own maximum).
const MAX_TIMEOUT: u64 = 24 * 60 * 60;
/// The shortest lifetime a sandbox is created with: one that ends before its client's next
/// call is of no use, and would be gone before the client could kill it (`set_timeout` may
/// still shorten it to 1 s).
const MIN_CREATE_TIMEOUT: u64 = 10;
/// Sandboxes per page of `GET /v2/sandboxes`, by default and at most.
const PAGE: usize = 100;

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct NewSandbox {
    /// `base` (burrow's `Bash`), or the name of a burrow environment (`Python3`, a custom
    /// environment's ID, ...).
    #[serde(rename = "templateID")]
    #[schema(example = "base")]
    template_id: String,
    /// Seconds the sandbox lives (10-86400); default 15 on `/sandboxes`, 300 on `/v2/sandboxes`.
    #[serde(default, deserialize_with = "optional_seconds")]
    #[schema(minimum = 10, maximum = 86400)]
    timeout: Option<u64>,
    /// Labels of the sandbox, returned by `GET /sandboxes/{id}` and the lists.
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    /// Must be empty: environment variables for the sandbox's processes are not supported yet.
    #[serde(rename = "envVars", default)]
    #[schema(schema_with = no_env_vars)]
    env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct SandboxTimeout {
    /// Seconds from now until the sandbox ends (1-86400).
    #[serde(deserialize_with = "seconds")]
    #[schema(minimum = 1, maximum = 86400)]
    timeout: u64,
}

/// `envVars` as this server takes them: `{}` (or absent) only.
fn no_env_vars() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            utoipa::openapi::schema::Type::Object,
            utoipa::openapi::schema::Type::Null,
        ]))
        .max_properties(Some(0))
        .description(Some(
            "Must be empty: environment variables for the sandbox's processes are not supported yet",
        ))
        .build()
}

/// A number of seconds: an integer, which JSON may also write as `300.0`.
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                .map(|f| f as u64)
        })
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{n} is not a whole, non-negative number of seconds for the timeout"
            ))
        })
}

fn optional_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Seconds(#[serde(deserialize_with = "seconds")] u64);
    Ok(Option::<Seconds>::deserialize(d)?.map(|Seconds(s)| s))
}

/// A created sandbox: what the SDKs need to reach it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Sandbox)]
pub(crate) struct SandboxBody {
    #[serde(rename = "templateID")]
    template_id: String,
    /// The burrow environment it runs.
    alias: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    /// This node's ID.
    #[serde(rename = "clientID")]
    client_id: String,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    /// Always null: clients reach sandboxes at their own E2B_DOMAIN or E2B_SANDBOX_URL.
    domain: Option<String>,
}

/// A sandbox as `GET /sandboxes/{id}` and the lists describe it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = SandboxDetail)]
pub(crate) struct SandboxDetail {
    #[serde(rename = "templateID")]
    template_id: String,
    alias: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: String,
    /// RFC 3339.
    #[serde(rename = "startedAt")]
    started_at: String,
    /// RFC 3339: when it ends unless given another timeout.
    #[serde(rename = "endAt")]
    end_at: String,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    /// The host's CPUs, which the sandbox shares with the others by weight.
    #[serde(rename = "cpuCount")]
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    /// Always `running`: burrow does not pause sandboxes yet.
    state: &'static str,
    metadata: BTreeMap<String, String>,
    domain: Option<String>,
}

/// What `environment` is called on this API.
fn template_id(environment: &str) -> String {
    if environment == BASE_ENVIRONMENT {
        BASE_TEMPLATE.to_owned()
    } else {
        environment.to_owned()
    }
}

fn environment(template_id: &str) -> &str {
    if template_id == BASE_TEMPLATE {
        BASE_ENVIRONMENT
    } else {
        template_id
    }
}

impl SandboxDetail {
    fn new(s: SessionInfo) -> SandboxDetail {
        SandboxDetail {
            template_id: template_id(&s.environment),
            alias: s.environment,
            sandbox_id: s.session_id,
            client_id: s.client_id,
            started_at: rfc3339(s.started_at),
            end_at: rfc3339(s.end_at),
            envd_version: ENVD_VERSION,
            cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_mb: s.memory_bytes >> 20,
            disk_size_mb: s.disk_bytes >> 20,
            state: "running",
            metadata: s.metadata,
            domain: None,
        }
    }
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-08-21T10:00:00.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm, proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// A session error in this API's terms: the sandbox, not the session, is not found, and so is
/// an unknown template (E2B answers `404` for one).
fn sandbox_error(e: SessionError) -> ApiError {
    match e {
        SessionError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox '{id}' was not found: it ended, or it is not your team's"),
        ),
        e @ SessionError::UnknownEnvironment { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, format!("template not found: {e}"))
        }
        e => e.into(),
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn checked_timeout(seconds: u64, min: u64) -> Result<Duration, ApiError> {
    if (min..=MAX_TIMEOUT).contains(&seconds) {
        Ok(Duration::from_secs(seconds))
    } else {
        Err(bad_request(format!(
            "timeout {seconds} is out of range: give the sandbox {min} to {MAX_TIMEOUT} seconds"
        )))
    }
}

/// A sandbox ID from the path. SDKs before 1.8 append `-{clientID}` to it; E2B strips that.
pub(crate) struct SandboxId(String);

impl<S: Send + Sync> FromRequestParts<S> for SandboxId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let PathId(id) = PathId::from_request_parts(parts, state).await?;
        let id = id.split_once('-').map_or(id.as_str(), |(id, _)| id);
        Ok(SandboxId(id.to_owned()))
    }
}

async fn create_with(
    app: Shared,
    key: Key,
    body: NewSandbox,
    default_timeout: u64,
) -> Result<(StatusCode, Json<SandboxBody>), ApiError> {
    let principal = app.require(key).await?;
    if body.env_vars.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(bad_request(
            "envVars are not supported by this server yet: send {} (or none) and set variables \
             per command (commands.run(..., envs=...))",
        ));
    }
    let timeout = checked_timeout(body.timeout.unwrap_or(default_timeout), MIN_CREATE_TIMEOUT)?;
    let info = app
        .sessions
        .create(
            &principal,
            environment(&body.template_id),
            NewSession {
                edit_enabled: false,
                timeout: Some(timeout),
                metadata: body.metadata.unwrap_or_default(),
            },
        )
        .await
        .map_err(sandbox_error)?;
    let body = SandboxBody {
        template_id: template_id(&info.environment),
        alias: info.environment,
        sandbox_id: info.session_id,
        client_id: info.client_id,
        envd_version: ENVD_VERSION,
        domain: None,
    };
    Ok((StatusCode::CREATED, Json(body)))
}

/// Create a sandbox (the SDKs before 2.46); running, its envd answering, when this answers.
#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes", request_body = NewSandbox,
    security(("x_api_key" = []), ("api_key" = [])),
    responses(
        (status = 201, description = "Created", body = SandboxBody),
        (status = 400, description = "Bad body, timeout out of range, non-empty envVars, or an environment that is not available", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "Unknown template", body = error::ErrorBody),
        (status = 429, description = "The server, or the caller's team, runs as many sandboxes as it may, or the team has used its share of the host (--team-share)", body = error::ErrorBody),
        (status = 503, description = "The host is low on memory or has promised all it has; retry later", body = error::ErrorBody)))]
pub(crate) async fn create(
    app: Shared,
    key: Key,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<(StatusCode, Json<SandboxBody>), ApiError> {
    create_with(app, key, body, 15).await
}

/// Create a sandbox (the SDKs since 2.46); the same as `POST /sandboxes`, with a default
/// timeout of 300 s.
#[utoipa::path(post, path = "/v2/sandboxes", tag = "sandboxes", request_body = NewSandbox,
    security(("x_api_key" = []), ("api_key" = [])),
    responses(
        (status = 201, description = "Created", body = SandboxBody),
        (status = 400, description = "Bad body, timeout out of range, non-empty envVars, or an environment that is not available", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "Unknown template", body = error::ErrorBody),
        (status = 429, description = "The server, or the caller's team, runs as many sandboxes as it may, or the team has used its share of the host (--team-share)", body = error::ErrorBody),
        (status = 503, description = "The host is low on memory or has promised all it has; retry later", body = error::ErrorBody)))]
pub(crate) async fn create_v2(
    app: Shared,
    key: Key,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<(StatusCode, Json<SandboxBody>), ApiError> {
    create_with(app, key, body, 300).await
}

/// One of the caller's team's sandboxes.
#[utoipa::path(get, path = "/sandboxes/{sandboxID}", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "The sandbox")),
    security(("x_api_key" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The sandbox", body = SandboxDetail),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such sandbox of the caller's team", body = error::ErrorBody)))]
pub(crate) async fn get(
    State(app): Shared,
    key: Key,
    SandboxId(id): SandboxId,
) -> Result<Json<SandboxDetail>, ApiError> {
    let principal = app.require(key).await?;
    let info = app.sessions.get(&id, &principal).map_err(sandbox_error)?;
    Ok(Json(SandboxDetail::new(info)))
}

/// Kill a sandbox; answers once it is gone.
#[utoipa::path(delete, path = "/sandboxes/{sandboxID}", tag = "sandboxes",
    params(("sandboxID" = String, Path, description = "The sandbox")),
    security(("x_api_key" = []), ("api_key" = [])),
    responses(
        (status = 204, description = "Killed"),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such sandbox of the caller's team", body = error::ErrorBody),
        (status = 500, description = "It ended, but its sandbox could not be removed yet (retried in the background)", body = error::ErrorBody)))]
pub(crate) async fn kill(
    State(app): Shared,
    key: Key,
    SandboxId(id): SandboxId,
) -> Result<StatusCode, ApiError> {
    let principal = app.require(key).await?;
    app.sessions
        .delete(&id, &principal)
        .await
        .map_err(sandbox_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Make a sandbox end `timeout` seconds from now (sooner or later than it would have).
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/timeout", tag = "sandboxes", request_body = SandboxTimeout,
    params(("sandboxID" = String, Path, description = "The sandbox")),
    security(("x_api_key" = []), ("api_key" = [])),
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "Bad body or timeout out of range", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such sandbox of the caller's team", body = error::ErrorBody)))]
pub(crate) async fn set_timeout(
    State(app): Shared,
    key: Key,
    SandboxId(id): SandboxId,
    JsonBody(body): JsonBody<SandboxTimeout>,
) -> Result<StatusCode, ApiError> {
    let principal = app.require(key).await?;
    let timeout = checked_timeout(body.timeout, 1)?;
    app.sessions
        .set_timeout(&id, &principal, timeout)
        .await
        .map_err(sandbox_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The filters of the lists (documented per operation: `/sandboxes` takes `metadata` only).
#[derive(Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    metadata: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    order: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(rename = "nextToken", default)]
    next_token: Option<String>,
    /// Not supported yet: refused with a 400.
    #[serde(rename = "startedAfter", default)]
    started_after: Option<String>,
}

/// A page's end as a token, `{startedAt in unix ms}.{sandboxID}`: the next page starts after
/// it in the list's order, even if that sandbox has ended since.
fn page_token(s: &SessionInfo) -> String {
    let ms = s
        .started_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{ms}.{}", s.session_id)
}

fn parse_page_token(token: &str) -> Option<(SystemTime, &str)> {
    let (ms, id) = token.split_once('.')?;
    let ms: u64 = ms.parse().ok()?;
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    ok.then(|| (UNIX_EPOCH + Duration::from_millis(ms), id))
}

/// The list query, rejected in the API's error shape.
pub(crate) struct ListParams(ListQuery);

impl<S: Send + Sync> FromRequestParts<S> for ListParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::<ListQuery>::try_from_uri(&parts.uri)
            .map(|Query(q)| ListParams(q))
            .map_err(|e| bad_request(format!("invalid query string: {}", e.body_text())))
    }
}

/// The labels a `metadata` filter asks for.
fn metadata_filter(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    serde_urlencoded::from_str(raw).map_err(|e| {
        bad_request(format!(
            "invalid metadata filter {raw:?} ({e}): use k=v&k2=v2, percent-encoded"
        ))
    })
}

/// The caller's team's sandboxes that match the filters both list versions share, by start
/// time (then ID), newest first unless `ascending`.
fn matching(
    app: &crate::AppState,
    principal: &burrow_store::Principal,
    query: &ListQuery,
    ascending: bool,
) -> Result<Vec<SessionInfo>, ApiError> {
    let labels = metadata_filter(query.metadata.as_deref())?;
    let mut sessions: Vec<SessionInfo> = app
        .sessions
        .list(principal)
        .into_iter()
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.metadata.get(k).is_some_and(|have| have == v))
        })
        .filter(|s| {
            query
                .template
                .as_deref()
                .is_none_or(|t| environment(t) == s.environment)
        })
        .collect();
    sessions.sort_by(|a, b| (a.started_at, &a.session_id).cmp(&(b.started_at, &b.session_id)));
    if !ascending {
        sessions.reverse();
    }
    Ok(sessions)
}

/// The caller's team's running sandboxes (the SDKs before 2.0).
#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes",
    params(("metadata" = Option<String>, Query, description = "Only sandboxes with all these labels: `k=v&k2=v2`, each key and value percent-encoded, the whole percent-encoded again as the value")),
    security(("x_api_key" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Running sandboxes", body = [SandboxDetail]),
        (status = 400, description = "A bad filter", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody)))]
pub(crate) async fn list_v1(
    State(app): Shared,
    key: Key,
    ListParams(query): ListParams,
) -> Result<Json<Vec<SandboxDetail>>, ApiError> {
    let principal = app.require(key).await?;
    let all = matching(&app, &principal, &query, false)?;
    Ok(Json(all.into_iter().map(SandboxDetail::new).collect()))
}

/// The caller's team's sandboxes, a page at a time: a response with more after it carries the
/// next page's token in `X-Next-Token`.
#[utoipa::path(get, path = "/v2/sandboxes", tag = "sandboxes",
    params(
        ("metadata" = Option<String>, Query, description = "Only sandboxes with all these labels: `k=v&k2=v2`, each key and value percent-encoded, the whole percent-encoded again as the value"),
        ("state" = Option<String>, Query, description = "Comma-separated `running`, `paused` (default both; none is ever paused)", pattern = "^(running|paused)(,(running|paused))*$"),
        ("template" = Option<String>, Query, description = "Only sandboxes of this template"),
        ("order" = Option<String>, Query, description = "`asc` or `desc` (default) by start time", pattern = "^(asc|desc)$"),
        ("limit" = Option<u32>, Query, description = "Sandboxes per page", minimum = 1, maximum = 100),
        ("nextToken" = Option<String>, Query, description = "The `X-Next-Token` of the previous page", pattern = "^[0-9]{1,15}\\.[a-z0-9]+$")),
    security(("x_api_key" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "A page of sandboxes", body = [SandboxDetail],
            headers(("X-Next-Token" = String, description = "The next page's token, when there is one"))),
        (status = 400, description = "A bad filter, order, limit or token, or startedAfter (not supported yet)", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody)))]
pub(crate) async fn list_v2(
    State(app): Shared,
    key: Key,
    ListParams(query): ListParams,
) -> Result<Response, ApiError> {
    let principal = app.require(key).await?;
    if query.started_after.is_some() {
        return Err(bad_request(
            "the startedAfter filter is not supported by this server yet: list without it",
        ));
    }
    let ascending = match query.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(bad_request(format!(
                "invalid order {other:?}: use asc or desc"
            )));
        }
    };
    let limit = query.limit.unwrap_or(PAGE);
    if !(1..=PAGE).contains(&limit) {
        return Err(bad_request(format!(
            "invalid limit {limit}: use 1 to {PAGE}"
        )));
    }
    let mut running = true;
    if let Some(states) = &query.state {
        running = false;
        for state in states.split(',') {
            match state {
                "running" => running = true,
                "paused" => {}
                other => {
                    return Err(bad_request(format!(
                        "invalid state {other:?}: use running and/or paused, comma-separated"
                    )));
                }
            }
        }
    }
    let mut all = if running {
        matching(&app, &principal, &query, ascending)?
    } else {
        Vec::new()
    };
    if let Some(token) = &query.next_token {
        let (at, id) = parse_page_token(token).ok_or_else(|| {
            bad_request(format!(
                "invalid nextToken {token:?}: pass the X-Next-Token of the previous page"
            ))
        })?;
        all.retain(|s| {
            let key = (s.started_at, s.session_id.as_str());
            if ascending {
                key > (at, id)
            } else {
                key < (at, id)
            }
        });
    }
    let more = all.len() > limit;
    all.truncate(limit);
    let mut headers = HeaderMap::new();
    if more && let Some(last) = all.last() {
        let token = HeaderValue::from_str(&page_token(last))
            .map_err(|e| ApiError::internal("a page token is not a header value", e))?;
        headers.insert("x-next-token", token);
    }
    let page: Vec<SandboxDetail> = all.into_iter().map(SandboxDetail::new).collect();
    Ok((headers, Json(page)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        for (secs, millis, want) in [
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.005Z"),
            (1_709_251_199, 999, "2024-02-29T23:59:59.999Z"),
            (4_102_444_800, 0, "2100-01-01T00:00:00.000Z"),
            (1_787_306_400, 123, "2026-08-21T10:00:00.123Z"),
        ] {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
            assert_eq!(rfc3339(t), want);
        }
    }

    #[test]
    fn metadata_filters_decode_each_key_and_value() {
        assert_eq!(
            metadata_filter(Some("user%3Dx=a%26b&k=v%20w")).unwrap(),
            vec![
                ("user=x".to_owned(), "a&b".to_owned()),
                ("k".to_owned(), "v w".to_owned())
            ]
        );
        assert!(metadata_filter(None).unwrap().is_empty());
    }

    #[test]
    fn timeouts_are_whole_seconds_however_written() {
        let parse = |body: &str| serde_json::from_str::<SandboxTimeout>(body).map(|t| t.timeout);
        assert_eq!(parse(r#"{"timeout": 300}"#).unwrap(), 300);
        assert_eq!(parse(r#"{"timeout": 12461.0}"#).unwrap(), 12461);
        for bad in [
            r#"{"timeout": 1.5}"#,
            r#"{"timeout": -1}"#,
            r#"{"timeout": "1"}"#,
            "{}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let new = |body: &str| serde_json::from_str::<NewSandbox>(body).map(|n| n.timeout);
        assert_eq!(new(r#"{"templateID": "base"}"#).unwrap(), None);
        assert_eq!(
            new(r#"{"templateID": "base", "timeout": null}"#).unwrap(),
            None
        );
        assert_eq!(
            new(r#"{"templateID": "base", "timeout": 60.0}"#).unwrap(),
            Some(60)
        );
    }

    #[test]
    fn page_tokens() {
        assert_eq!(
            parse_page_token("1700000000123.abc9"),
            Some((
                UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
                "abc9"
            ))
        );
        for bad in ["", "1.", ".abc", "x.abc", "1.ABC", "1-abc", "1.a.b"] {
            assert_eq!(parse_page_token(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn base_is_bash_both_ways() {
        assert_eq!(environment("base"), "Bash");
        assert_eq!(environment("Python3"), "Python3");
        assert_eq!(template_id("Bash"), "base");
        assert_eq!(template_id("Nodejs"), "Nodejs");
    }
}
