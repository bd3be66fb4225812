//! `/openapi.json`, generated from the handlers' and models' annotations, so the document cannot
//! drift from what the server serves.

use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "burrow",
        description = "E2B session-era API (Devbook API 1.0.0 compatible). Authenticate with the `api_key` query parameter or the `X-API-Key` header. Sandboxes are reached at `{port}-{sessionID}-{clientID}.{domain}`: port 49982 is envd (`/ws` JSON-RPC websocket, `/file`), any other port is tunnelled to that TCP port inside the sandbox.",
        version = "1.0.0"
    ),
    paths(
        super::create_session,
        super::list_sessions,
        super::delete_session,
        super::refresh_session,
        super::health,
        super::metrics
    ),
    components(schemas(super::NewSession, super::SessionBody, super::error::ErrorBody))
)]
pub(crate) struct Doc;

pub(crate) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(Doc::openapi())
}
