//! `/openapi.json`, generated from the handlers' and models' annotations, so the document cannot
//! drift from what the server serves.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "burrow",
        description = "E2B session-era API (Devbook API 1.0.0 compatible). Authenticate with the `api_key` query parameter or the `X-API-Key` header. Every error is JSON `{\"code\", \"message\"}`. Sandboxes are reached at `{port}-{sessionID}-{clientID}.{domain}`: port 49982 is envd (`/ws` JSON-RPC websocket, `/file`), any other port is tunnelled to that TCP port inside the sandbox.",
        version = "1.0.0"
    ),
    paths(
        super::create_session,
        super::list_sessions,
        super::delete_session,
        super::refresh_session,
        super::envs::list,
        super::envs::create,
        super::envs::put,
        super::envs::patch,
        super::envs::set_state,
        super::envs::set_title,
        super::envs::delete,
        super::health,
        super::metrics
    ),
    components(schemas(
        super::NewSession,
        super::SessionBody,
        super::error::ErrorBody,
        super::envs::NewEnvironment,
        super::envs::EnvironmentPatch,
        super::envs::EnvironmentStateBody,
        super::envs::StateName,
        super::envs::EnvironmentTitle,
        super::envs::EnvironmentBody
    )),
    modifiers(&KeySchemes)
)]
pub(crate) struct Doc;

/// The two ways to pass a key, as security schemes rather than operation parameters: a client
/// (or a fuzzer) then knows that the key is a credential, not data, and that either way works.
struct KeySchemes;

impl Modify for KeySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "api_key",
                "A key made by `burrow keys create` (what the E2B SDK sends)",
            ))),
        );
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "The same key as a header; the query parameter wins when both are given",
            ))),
        );
    }
}

/// The document, with `codeSnippetID` narrowed to the environments this server can start: any
/// other name is a `400`, so a document that allowed any string would promise what the server
/// refuses. The list is fixed at start (the catalog is loaded once), so it is filled in here
/// rather than in the static annotations.
pub(crate) async fn document(State(app): State<Arc<AppState>>) -> Json<Value> {
    let available: Vec<Value> = app
        .sessions
        .catalog()
        .list()
        .iter()
        .filter(|env| env.availability.is_ok())
        .map(|env| Value::String(env.name.clone()))
        .collect();
    let mut doc = serde_json::to_value(Doc::openapi()).unwrap_or_default();
    for pointer in [
        "/components/schemas/NewSession/properties/codeSnippetID",
        "/components/schemas/NewEnvironment/properties/template",
        "/components/schemas/EnvironmentPatch/properties/template",
    ] {
        if let Some(property) = doc.pointer_mut(pointer).and_then(Value::as_object_mut) {
            property.insert("enum".to_owned(), Value::Array(available.clone()));
        }
    }
    Json(doc)
}
