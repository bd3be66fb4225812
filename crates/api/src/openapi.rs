//! `/openapi.json`, generated from the handlers' and models' annotations, so the document cannot
//! drift from what the server serves.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::Value;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "burrow",
        description = "E2B session-era API (Devbook API 1.0.0 compatible). Authenticate with the `api_key` query parameter or the `X-API-Key` header. Every error is JSON `{\"code\", \"message\"}`. Sandboxes are reached at `{port}-{sessionID}-{clientID}.{domain}`: port 49982 is envd (`/ws` JSON-RPC websocket, `/file`), any other port is tunnelled to that TCP port inside the sandbox. The current E2B SDKs' control plane is served too (`/sandboxes`, `/v2/sandboxes`; template `base` is the `Bash` environment), and their sandboxes are reached at `{port}-{sandboxID}.{domain}` or at this server's own address with the `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers (port 49983: envd's Connect services and `/health`).",
        version = "1.0.0"
    ),
    paths(
        super::create_session,
        super::list_sessions,
        super::delete_session,
        super::refresh_session,
        super::sandboxes::create,
        super::sandboxes::create_v2,
        super::sandboxes::list_v1,
        super::sandboxes::list_v2,
        super::sandboxes::get,
        super::sandboxes::kill,
        super::sandboxes::set_timeout,
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
        super::envs::EnvironmentBody,
        super::sandboxes::NewSandbox,
        super::sandboxes::SandboxTimeout,
        super::sandboxes::SandboxBody,
        super::sandboxes::SandboxDetail
    )),
    modifiers(&KeySchemes, &CommonAnswers)
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

/// Answers that do not come from one handler's logic but from what every request goes through,
/// added to each operation that lacks them: the connection caps (`503`, any route), the key
/// lookup (`400` for a header that is not text, `500` if the store fails), and the body reader
/// (`400` malformed or cut off, `408` too slow, `413` too large).
struct CommonAnswers;

impl CommonAnswers {
    fn add(operation: &mut Operation, status: u16, description: &str) {
        let error = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Error")))
            .build();
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| {
                ResponseBuilder::new()
                    .description(description)
                    .content("application/json", error)
                    .build()
                    .into()
            });
    }
}

impl Modify for CommonAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                Self::add(
                    operation,
                    503,
                    "The server has as many connections open, or waiting for their request \
                     heads, as it takes (--max-connections, --max-pending-heads); retry shortly",
                );
                if operation.security.is_some() {
                    Self::add(operation, 400, "An X-API-Key header that is not text");
                    Self::add(
                        operation,
                        500,
                        "The server failed; the message names an error id in the server log",
                    );
                }
                if operation.request_body.is_some() {
                    Self::add(operation, 408, "The body did not arrive in time");
                    Self::add(operation, 413, "Body too large");
                }
            }
        }
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
