//! The E2B session-era REST API: thin axum handlers that authenticate, validate and map
//! `sessions` results to the exact wire shapes. No business logic.
//!
//! One listener serves both the API and the sandboxes: a request whose `Host` is a session
//! hostname (`{port}-{sessionID}-{clientID}.{domain}`) goes to the gateway before any API
//! routing, so uploads and websockets to sandboxes never meet the API's body limits.

mod error;
mod openapi;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use burrow_gateway::Route;
use burrow_sessions::{SessionInfo, Sessions};
use burrow_store::{Principal, Store};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub use error::ApiError;

/// Largest request body the API reads (session creates are tiny).
pub const BODY_LIMIT: usize = 1 << 20;

pub struct AppState {
    pub sessions: Sessions,
    pub store: Arc<Store>,
    /// The session domain: sandboxes are `{port}-{sessionID}-{clientID}.{domain}`.
    pub domain: String,
    /// With auth off every request acts as this principal.
    pub auth_off: Option<Principal>,
}

type Shared = State<Arc<AppState>>;

/// The whole HTTP surface: API routes plus the gateway in front of them.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/sessions", post(create_session).get(list_sessions))
        .route("/sessions/{session_id}", delete(delete_session))
        .route("/sessions/{session_id}/refresh", post(refresh_session))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), by_host))
        .with_state(state)
}

/// Sends session hostnames to the gateway and everything else to the API, in a span that names
/// the request (and its session).
async fn by_host(State(app): Shared, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("")
        .to_owned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match burrow_gateway::route(&host, &app.domain) {
        Route::Api => {
            let span = tracing::info_span!("api", %method, %path);
            async move {
                let resp = next.run(req).await;
                tracing::debug!(status = resp.status().as_u16(), "answered");
                resp
            }
            .instrument(span)
            .await
        }
        Route::Invalid => ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported session host {host:?}: sandboxes are reached at {{port}}-{{sessionID}}-{{clientID}}.{}",
                app.domain
            ),
        )
        .into_response(),
        Route::Session {
            port,
            session_id,
            client_id,
        } => {
            let span = tracing::info_span!("gateway", session = %session_id, port, %method, %path);
            let socket = (client_id == app.sessions.client_id())
                .then(|| app.sessions.socket(session_id))
                .flatten();
            let Some(socket) = socket else {
                return ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("session '{session_id}' was not found on node '{client_id}'"),
                )
                .into_response();
            };
            burrow_gateway::proxy(req, &socket, port)
                .instrument(span)
                .await
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route: see /openapi.json for what this server serves",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route: see /openapi.json",
    )
}

/// The caller's key, from the `api_key` query parameter or the `X-API-Key` header.
struct Key(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Key {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid query string: {e}"),
            )
        })?;
        if let Some(key) = query.0.get("api_key") {
            return Ok(Key(Some(key.clone())));
        }
        match parts.headers.get("x-api-key") {
            Some(v) => v.to_str().map(|k| Key(Some(k.to_owned()))).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "the X-API-Key header is not valid text",
                )
            }),
            None => Ok(Key(None)),
        }
    }
}

impl AppState {
    /// The principal of an optional key: `Ok(None)` without one, 401 for a bad one.
    fn principal(&self, key: Key) -> Result<Option<Principal>, ApiError> {
        if let Some(p) = &self.auth_off {
            return Ok(Some(p.clone()));
        }
        let Some(key) = key.0 else { return Ok(None) };
        match self.store.authenticate(&key)? {
            Some(p) => Ok(Some(p)),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid API key: use a key made by `burrow keys create`, passed as the api_key query parameter",
            )),
        }
    }

    fn require(&self, key: Key) -> Result<Principal, ApiError> {
        self.principal(key)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing API key: pass it as the api_key query parameter or the X-API-Key header",
            )
        })
    }
}

/// A JSON body read with the API's size limit, every failure in the API's error shape.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {BODY_LIMIT} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
            return Err(too_large());
        }
        let bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
            .await
            .map_err(|_| too_large())?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("Error when parsing request: {e}"),
            )
        })
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewSession {
    /// The environment (template) to start from: `Bash`, `Python3`, `Nodejs`, ... .
    #[serde(rename = "codeSnippetID")]
    code_snippet_id: String,
    /// A shared, persistent edit session of the environment: one per team and environment.
    #[serde(rename = "editEnabled", default)]
    edit_enabled: bool,
}

/// The wire `Session`: exactly these four keys, or the SDK's strict model rejects it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Session)]
struct SessionBody {
    #[serde(rename = "clientID")]
    client_id: String,
    #[serde(rename = "codeSnippetID")]
    code_snippet_id: String,
    #[serde(rename = "editEnabled")]
    edit_enabled: bool,
    #[serde(rename = "sessionID")]
    session_id: String,
}

impl From<SessionInfo> for SessionBody {
    fn from(s: SessionInfo) -> Self {
        SessionBody {
            client_id: s.client_id,
            code_snippet_id: s.environment,
            edit_enabled: s.edit_enabled,
            session_id: s.session_id,
        }
    }
}

/// Create a session: a new sandbox of the environment, running when this answers.
#[utoipa::path(post, path = "/sessions", request_body = NewSession,
    params(("api_key" = String, Query, description = "API key (or the X-API-Key header)")),
    responses(
        (status = 201, description = "Session created", body = SessionBody),
        (status = 400, description = "Bad body or unknown/unavailable environment", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 413, description = "Body too large", body = error::ErrorBody),
        (status = 500, description = "The sandbox could not be started", body = error::ErrorBody)))]
async fn create_session(
    State(app): Shared,
    key: Key,
    JsonBody(body): JsonBody<NewSession>,
) -> Result<(StatusCode, Json<SessionBody>), ApiError> {
    let principal = app.require(key)?;
    let info = app
        .sessions
        .create(&principal, &body.code_snippet_id, body.edit_enabled)
        .await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// The caller's team's live sessions (an admin key: all sessions).
#[utoipa::path(get, path = "/sessions",
    params(("api_key" = String, Query, description = "API key (or the X-API-Key header)")),
    responses(
        (status = 200, description = "Live sessions", body = [SessionBody]),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody)))]
async fn list_sessions(State(app): Shared, key: Key) -> Result<Json<Vec<SessionBody>>, ApiError> {
    let principal = app.require(key)?;
    Ok(Json(
        app.sessions
            .list(&principal)
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

/// Delete a session; answers once its sandbox is gone.
#[utoipa::path(delete, path = "/sessions/{sessionID}",
    params(("sessionID" = String, Path, description = "The session"),
           ("api_key" = String, Query, description = "API key (or the X-API-Key header)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such session of the caller's team", body = error::ErrorBody)))]
async fn delete_session(
    State(app): Shared,
    key: Key,
    Path(session_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let principal = app.require(key)?;
    app.sessions.delete(&session_id, &principal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Keep a session alive for another TTL. The session ID is enough; a key, if given, must be
/// the owner's.
#[utoipa::path(post, path = "/sessions/{sessionID}/refresh",
    params(("sessionID" = String, Path, description = "The session"),
           ("api_key" = Option<String>, Query, description = "Optional API key of the owner")),
    responses(
        (status = 204, description = "Refreshed"),
        (status = 401, description = "Invalid key, or not the owner's", body = error::ErrorBody),
        (status = 404, description = "Unknown or expired session", body = error::ErrorBody)))]
async fn refresh_session(
    State(app): Shared,
    key: Key,
    Path(session_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let principal = app.principal(key)?;
    app.sessions.refresh(&session_id, principal.as_ref())?;
    Ok(StatusCode::NO_CONTENT)
}

/// Liveness.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "Healthy", body = String)))]
async fn health() -> &'static str {
    "Health check successful"
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
async fn metrics(State(app): Shared) -> Response {
    let text = app
        .sessions
        .metrics()
        .render(&app.sessions.live_by_environment());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from(text),
    )
        .into_response()
}
