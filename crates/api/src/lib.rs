//! The E2B session-era REST API: thin axum handlers that authenticate, validate and map
//! `sessions` results to the exact wire shapes. No business logic.
//!
//! One listener serves both the API and the sandboxes: a request whose `Host` is a session
//! hostname (`{port}-{sessionID}-{clientID}.{domain}`), a sandbox hostname of the current E2B
//! SDKs (`{port}-{sandboxID}.{domain}`), or that names a sandbox in the `E2b-Sandbox-Id` and
//! `E2b-Sandbox-Port` headers goes to the gateway before any API routing, so uploads and
//! websockets to sandboxes never meet the API's body limits.
//!
//! Beside the session-era API, `sandboxes` serves the current E2B SDKs' `/sandboxes` control
//! plane over the same sessions.

mod envs;
mod error;
mod openapi;
mod sandboxes;
mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use burrow_gateway::{Gateway, Route};
use burrow_sessions::{SessionInfo, Sessions};
use burrow_store::{Principal, Store};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub use error::ApiError;
pub use server::{ConnectionCaps, HEADER_TIMEOUT, serve};

/// Largest request body the API reads (session creates are tiny).
pub const BODY_LIMIT: usize = 1 << 20;
/// How long a client may take to send a request body: a client trickling a body must not hold
/// its connection (and its task) forever.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AppState {
    pub sessions: Sessions,
    pub store: Arc<Store>,
    /// The session domain: sandboxes are `{port}-{sessionID}-{clientID}.{domain}`.
    pub domain: String,
    /// With auth off every request acts as this principal.
    pub auth_off: Option<Principal>,
    /// Proxies session hostnames to their sandboxes, within its per-session limits.
    pub gateway: Gateway,
}

type Shared = State<Arc<AppState>>;

/// The whole HTTP surface: API routes plus the gateway in front of them.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/sessions", post(create_session).get(list_sessions))
        .route("/sessions/{session_id}", delete(delete_session))
        .route("/sessions/{session_id}/refresh", post(refresh_session))
        .route(
            "/sandboxes",
            post(sandboxes::create).get(sandboxes::list_v1),
        )
        .route(
            "/v2/sandboxes",
            post(sandboxes::create_v2).get(sandboxes::list_v2),
        )
        .route(
            "/sandboxes/{sandbox_id}",
            get(sandboxes::get).delete(sandboxes::kill),
        )
        .route(
            "/sandboxes/{sandbox_id}/timeout",
            post(sandboxes::set_timeout),
        )
        .route("/envs", get(envs::list).post(envs::create))
        .route(
            "/envs/{code_snippet_id}",
            post(envs::put).patch(envs::patch).delete(envs::delete),
        )
        .route("/envs/{code_snippet_id}/state", put(envs::set_state))
        .route("/envs/{code_snippet_id}/title", put(envs::set_title))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), by_host))
        .with_state(state)
}

/// Sends requests to sandboxes (by their routing headers or their host) to the gateway and
/// everything else to the API, in a span that names the request (and its session).
async fn by_host(State(app): Shared, req: Request, next: Next) -> Response {
    let by_headers = burrow_gateway::route_by_headers(req.headers());
    match by_headers {
        Some(Ok((port, sandbox_id))) => return to_sandbox(&app, req, &sandbox_id, port).await,
        Some(Err(message)) => {
            return ApiError::new(StatusCode::BAD_REQUEST, message).into_response();
        }
        None => {}
    }
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
                "unsupported session host {host:?}: sandboxes are reached at {{port}}-{{sessionID}}-{{clientID}}.{domain} or {{port}}-{{sandboxID}}.{domain}",
                domain = app.domain
            ),
        )
        .into_response(),
        Route::Sandbox { port, sandbox_id } => {
            let sandbox_id = sandbox_id.to_owned();
            to_sandbox(&app, req, &sandbox_id, port).await
        }
        Route::Session {
            port,
            session_id,
            client_id,
        } => {
            let span = tracing::info_span!("gateway", session = %session_id, port, %method, %path);
            let route = (client_id == app.sessions.client_id())
                .then(|| app.sessions.route(session_id))
                .flatten();
            let Some(route) = route else {
                return ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("session '{session_id}' was not found on node '{client_id}'"),
                )
                .into_response();
            };
            app.gateway
                .proxy(req, session_id, route.team_id, &route.socket, port)
                .instrument(span)
                .await
        }
    }
}

/// Proxies a request of the current E2B SDKs to `port` of sandbox `sandbox_id`; an unknown one
/// gets E2B's `502` "not found", which the SDKs turn into their "sandbox not running" error.
async fn to_sandbox(app: &AppState, req: Request, sandbox_id: &str, port: u16) -> Response {
    let span = tracing::info_span!("gateway", session = %sandbox_id, port, method = %req.method(), path = %req.uri().path());
    let Some(route) = app.sessions.route(sandbox_id) else {
        return burrow_gateway::sandbox_not_found(sandbox_id);
    };
    app.gateway
        .proxy_sandbox(req, sandbox_id, route.team_id, &route.socket, port)
        .instrument(span)
        .await
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
    async fn principal(&self, key: Key) -> Result<Option<Principal>, ApiError> {
        if let Some(p) = &self.auth_off {
            return Ok(Some(p.clone()));
        }
        let Some(key) = key.0 else { return Ok(None) };
        match authenticate(&self.store, key).await? {
            Some(p) => Ok(Some(p)),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid API key: use a key made by `burrow keys create`, passed as the api_key query parameter",
            )),
        }
    }

    async fn require(&self, key: Key) -> Result<Principal, ApiError> {
        self.principal(key).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing API key: pass it as the api_key query parameter or the X-API-Key header",
            )
        })
    }
}

/// Looks `key` up in the store on the blocking pool: the query is synchronous SQLite, and on a
/// runtime worker it would stall every other connection that worker serves while SQLite waits
/// (on its lock, on the disk).
async fn authenticate(store: &Arc<Store>, key: String) -> Result<Option<Principal>, ApiError> {
    Ok(store.call(move |s| s.authenticate(&key)).await?)
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
        let bytes = tokio::time::timeout(
            BODY_TIMEOUT,
            axum::body::to_bytes(req.into_body(), BODY_LIMIT),
        )
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            if is_over_limit(&e) {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the request body could not be read ({e}): it is malformed (e.g. bad \
                         chunked framing) or the connection ended before all of it arrived"
                    ),
                )
            }
        })?;
        let bad = |e: String| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("Error when parsing request: {e}"),
            )
        };
        // Every body of the API is an object; serde would also read a struct from an array.
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if !value.is_object() {
            return Err(bad("the body must be a JSON object".into()));
        }
        serde_json::from_value(value)
            .map(JsonBody)
            .map_err(|e| bad(e.to_string()))
    }
}

/// Whether reading a body failed because it passed the limit, rather than because the client
/// broke it off or framed it wrongly.
fn is_over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// An ID path segment (`{sessionID}`, `{codeSnippetID}`), rejected in the API's error shape
/// (axum's own rejection is plain text), e.g. when its percent-decoding is not UTF-8.
struct PathId(String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid ID in the path: {}", rejection.body_text()),
            )),
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewSession {
    /// The environment (template) to start from: `Bash`, `Python3`, `Nodejs`, ... .
    #[serde(rename = "codeSnippetID")]
    #[schema(example = "Bash")]
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
#[utoipa::path(post, path = "/sessions", tag = "sessions", request_body = NewSession,
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 201, description = "Session created", body = SessionBody),
        (status = 400, description = "Bad body (malformed, cut off) or unknown/unavailable environment, or an X-API-Key header that is not text", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = error::ErrorBody),
        (status = 413, description = "Body too large", body = error::ErrorBody),
        (status = 429, description = "The server, or the caller's team, already runs as many sessions as it may, or the team has used its share of the host's memory or processes (--team-share)", body = error::ErrorBody),
        (status = 500, description = "The sandbox could not be started; the message names an error id in the server log", body = error::ErrorBody),
        (status = 503, description = "The host is low on memory (--min-available-memory), or has promised all the memory and processes it has (--memory-overcommit), or the server has as many connections open, or waiting for their request heads, as it takes (--max-connections, --max-pending-heads); retry later", body = error::ErrorBody)))]
async fn create_session(
    State(app): Shared,
    key: Key,
    JsonBody(body): JsonBody<NewSession>,
) -> Result<(StatusCode, Json<SessionBody>), ApiError> {
    let principal = app.require(key).await?;
    let info = app
        .sessions
        .create(
            &principal,
            &body.code_snippet_id,
            burrow_sessions::NewSession {
                edit_enabled: body.edit_enabled,
                ..burrow_sessions::NewSession::default()
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// The caller's team's live sessions (an admin key: all sessions).
#[utoipa::path(get, path = "/sessions", tag = "sessions",
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 200, description = "Live sessions", body = [SessionBody]),
        (status = 400, description = "An X-API-Key header that is not text", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody)))]
async fn list_sessions(State(app): Shared, key: Key) -> Result<Json<Vec<SessionBody>>, ApiError> {
    let principal = app.require(key).await?;
    Ok(Json(
        app.sessions
            .list(&principal)
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

/// Delete a session; answers once its sandbox is gone.
#[utoipa::path(delete, path = "/sessions/{sessionID}", tag = "sessions",
    params(("sessionID" = String, Path, description = "The session")),
    security(("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A session ID or X-API-Key header that is not text", body = error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = error::ErrorBody),
        (status = 404, description = "No such session of the caller's team", body = error::ErrorBody),
        (status = 409, description = "An edit session ended, but its changes were not saved: its environment was replaced, re-templated or deleted meanwhile", body = error::ErrorBody),
        (status = 500, description = "The session ended, but its sandbox could not be removed yet (retried in the background), or an edit session's changes could not be saved", body = error::ErrorBody),
        (status = 507, description = "An edit session ended, but its changes were not saved: the team's saved edits would pass --edit-quota-per-team", body = error::ErrorBody)))]
async fn delete_session(
    State(app): Shared,
    key: Key,
    PathId(session_id): PathId,
) -> Result<StatusCode, ApiError> {
    let principal = app.require(key).await?;
    app.sessions.delete(&session_id, &principal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Keep a session alive for another TTL. The session ID is enough; a key, if given, must be
/// the owner's.
#[utoipa::path(post, path = "/sessions/{sessionID}/refresh", tag = "sessions",
    params(("sessionID" = String, Path, description = "The session")),
    security((), ("api_key" = []), ("x_api_key" = [])),
    responses(
        (status = 204, description = "Refreshed"),
        (status = 400, description = "A session ID or X-API-Key header that is not text", body = error::ErrorBody),
        (status = 401, description = "Invalid key", body = error::ErrorBody),
        (status = 404, description = "Unknown or expired session, or another team's", body = error::ErrorBody)))]
async fn refresh_session(
    State(app): Shared,
    key: Key,
    PathId(session_id): PathId,
) -> Result<StatusCode, ApiError> {
    let principal = app.principal(key).await?;
    app.sessions
        .refresh(&session_id, principal.as_ref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Liveness.
#[utoipa::path(get, path = "/health", tag = "service", responses((status = 200, description = "Healthy", body = String)))]
async fn health() -> &'static str {
    "Health check successful"
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, description = "Prometheus text format", body = String)))]
async fn metrics(State(app): Shared) -> Response {
    let text = app.sessions.render_metrics();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from(text),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    //! Property tests of the parsers a client reaches before any handler logic: the key (query
    //! string or header), the `{sessionID}` path segment and the JSON body, through a router that
    //! uses the real extractors and echoes what they produced.

    use axum::body::to_bytes;
    use axum::http::HeaderValue;
    use hyper::service::Service;
    use hyper_util::service::TowerToHyperService;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    async fn echo(
        key: Key,
        PathId(id): PathId,
        JsonBody(body): JsonBody<NewSession>,
    ) -> Json<Value> {
        Json(
            json!({"key": key.0, "id": id, "env": body.code_snippet_id, "edit": body.edit_enabled}),
        )
    }

    fn router() -> TowerToHyperService<Router> {
        TowerToHyperService::new(Router::new().route("/sessions/{session_id}", post(echo)))
    }

    /// Percent-encodes every byte but ASCII letters and digits.
    fn encode(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn call(request: Request) -> (StatusCode, Value) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let response = router().call(request).await.expect("infallible");
            let status = response.status();
            let body = to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("a body");
            let value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("a {status} answer that is not JSON ({e}): {body:?}"));
            (status, value)
        })
    }

    /// Raw query strings: pieces that matter to the decoder, valid or broken.
    fn raw_query() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just("api_key=".to_owned()),
                Just("&".to_owned()),
                Just("=".to_owned()),
                Just("%".to_owned()),
                Just("+".to_owned()),
                "%[0-9A-Fa-f]{2}",
                "%[g-z]{2}",
                "[a-z0-9_]{1,6}",
            ],
            0..10,
        )
        .prop_map(|pieces| pieces.concat())
    }

    /// A key lookup that waits (here: on the store, busy with a write that itself waits a
    /// second for another connection's transaction) must leave the runtime's thread free for
    /// other connections.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_key_lookup_does_not_stall_the_runtime() {
        let dir = std::env::temp_dir().join(format!(
            "burrow-api-auth-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("burrow.db");
        let store = Arc::new(Store::open(&path).unwrap());
        let key = store.create_key("team", false).unwrap().key;
        let blocker = rusqlite::Connection::open(&path).unwrap();
        blocker
            .execute_batch("BEGIN IMMEDIATE; UPDATE teams SET name = name;")
            .unwrap();
        let writer = std::thread::spawn({
            let store = store.clone();
            move || store.create_key("other", false).map(drop)
        });
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            blocker.execute_batch("COMMIT").unwrap();
        });
        // Let the writer start waiting before the lookup.
        std::thread::sleep(Duration::from_millis(200));
        let gaps = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let ticker = tokio::spawn({
            let (gaps, mut last) = (gaps.clone(), std::time::Instant::now());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let gap = last.elapsed();
                    last = std::time::Instant::now();
                    let mut longest = gaps.lock().unwrap();
                    *longest = (*longest).max(gap);
                }
            }
        });
        let principal = authenticate(&store, key).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        ticker.abort();
        let longest = *gaps.lock().unwrap();
        writer.join().unwrap().unwrap();
        release.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(principal.map(|p| p.team), Some("team".to_owned()));
        assert!(
            longest < Duration::from_millis(300),
            "the runtime's thread was blocked for {longest:?} during a key lookup"
        );
    }

    proptest! {
        #[test]
        fn well_formed_requests_round_trip(
            key in prop::option::of(any::<String>()),
            key_in_header in any::<bool>(),
            other in "[a-z]{1,5}",
            id in prop::collection::vec(any::<u8>(), 1..40)
                .prop_filter("UTF-8", |b| std::str::from_utf8(b).is_ok()),
            env in any::<String>(),
            edit in prop::option::of(any::<bool>()),
        ) {
            let id = String::from_utf8(id).unwrap();
            // A header must be visible ASCII to count as text.
            let key_in_header = key_in_header
                && key.as_ref().is_some_and(|k| k.bytes().all(|b| (0x21..0x7f).contains(&b)));
            let mut uri = format!("/sessions/{}?{other}=1", encode(id.as_bytes()));
            if let (Some(k), false) = (&key, key_in_header) {
                uri.push_str(&format!("&api_key={}", encode(k.as_bytes())));
            }
            let mut body = json!({"codeSnippetID": env});
            if let Some(edit) = edit {
                body["editEnabled"] = json!(edit);
            }
            let mut request = Request::post(uri);
            if let (Some(k), true) = (&key, key_in_header) {
                request = request.header("x-api-key", k.as_str());
            }
            let request = request.body(Body::from(body.to_string())).unwrap();
            let (status, echoed) = call(request);
            prop_assert_eq!(status, StatusCode::OK, "{}", echoed);
            prop_assert_eq!(&echoed["key"], &json!(key));
            prop_assert_eq!(&echoed["id"], &json!(id));
            prop_assert_eq!(&echoed["env"], &json!(env));
            prop_assert_eq!(&echoed["edit"], &json!(edit.unwrap_or(false)));
        }

        #[test]
        fn any_request_is_accepted_or_refused_in_the_error_shape(
            segment in prop::collection::vec(any::<u8>(), 1..24),
            query in raw_query(),
            header in prop::option::of(prop::collection::vec(any::<u8>(), 0..24)),
            body in prop_oneof![
                4 => prop::collection::vec(any::<u8>(), 0..64),
                2 => Just(br#"{"codeSnippetID":"Bash"}"#.to_vec()),
                1 => Just(vec![b' '; BODY_LIMIT + 1]),
            ],
            declared_length in prop::option::of(any::<u64>()),
        ) {
            let uri = format!("/sessions/{}?{query}", encode(&segment));
            let mut request = Request::post(uri);
            if let Some(value) = header.as_ref().and_then(|h| HeaderValue::from_bytes(h).ok()) {
                request = request.header("x-api-key", value);
            }
            let mut request = request.body(Body::from(body.clone())).unwrap();
            if let Some(length) = declared_length {
                // A lying Content-Length reaches the extractor as a header, not as framing.
                request.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            }
            let (status, answer) = call(request);
            if status == StatusCode::OK {
                prop_assert!(std::str::from_utf8(&segment).is_ok(), "a non-UTF-8 session ID accepted");
                prop_assert!(body.len() <= BODY_LIMIT);
            } else {
                prop_assert!(
                    [StatusCode::BAD_REQUEST, StatusCode::PAYLOAD_TOO_LARGE].contains(&status),
                    "answered {}: {}", status, answer
                );
                prop_assert_eq!(answer.as_object().map(|o| o.len()), Some(2), "{}", answer);
                prop_assert_eq!(&answer["code"], &json!(status.as_u16()));
                prop_assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
            }
            if body.len() > BODY_LIMIT {
                prop_assert_ne!(status, StatusCode::OK);
            }
        }
    }
}
