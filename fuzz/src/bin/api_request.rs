//! The REST API's whole router (`burrow_api::app`) on any request head and body: `Host` routing
//! to the gateway, the key from the query string or `X-API-Key`, `{sessionID}` and
//! `{codeSnippetID}` path segments, JSON bodies, then the handlers, on a real store, the real
//! sessions logic and catalog, and a backend whose sandboxes are pretend (nothing starts).
//!
//! Input: an HTTP/1.1 request head (parsed by `httparse`, as hyper parses it; an input it refuses
//! is skipped, since hyper would refuse it before the router) and the body after it. `@KEY@` and
//! `@ADMIN@` anywhere in it become a real key of team `fuzz` and of an admin, so the fuzzer can
//! reach past authentication and mutate around a valid key.
//!
//! Invariants: never a `5xx`; every error (any non-2xx but a `HEAD`'s) is exactly
//! `{"code": <status>, "message": "..."}`, JSON; the key the request presents (the last
//! `api_key` of the query string, decoded as a form, else `X-API-Key`) is never refused with
//! `401` when it is a valid key, and nothing but `/health`, `/metrics`, `/openapi.json` and a
//! refresh succeeds without one; a created session and a listing have the wire shapes.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, Uri};
use burrow_api::AppState;
use burrow_environments::Catalog;
use burrow_fuzz::{Scratch, check_error_shape};
use burrow_gateway::{Gateway, Limits as GatewayLimits};
use burrow_runtime::{
    Backend, BoxFuture, Error as RuntimeError, Frozen, RuntimeConfig, Sandbox, SandboxSpec,
};
use burrow_sessions::{Budget, Config as SessionsConfig, Sessions};
use burrow_store::Store;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// The session domain of the target's server.
const DOMAIN: &str = "burrow.test";
/// Headers of a request head at most (hyper's default is 100).
const MAX_HEADERS: usize = 100;

/// A backend whose sandboxes exist only as IDs: the API and sessions logic run for real, and
/// nothing is started on the host.
struct Pretend {
    run_dir: PathBuf,
    next: AtomicU64,
}

impl Backend for Pretend {
    fn create<'a>(&'a self, _: &'a SandboxSpec) -> BoxFuture<'a, Result<Sandbox, RuntimeError>> {
        let id = format!("{:012}", self.next.fetch_add(1, Ordering::Relaxed));
        let socket = self.socket_path(&id);
        Box::pin(async move {
            Ok(Sandbox {
                id,
                socket,
                uid_base: RuntimeConfig::DEFAULT_UID_BASE,
            })
        })
    }

    fn destroy<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }

    fn probe<'a>(&'a self, _: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async { true })
    }

    fn running(&self, _: &str) -> Option<bool> {
        Some(true)
    }

    fn wait_exit<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(std::future::pending())
    }

    fn socket_path(&self, id: &str) -> PathBuf {
        self.run_dir.join(id).join("envd.sock")
    }

    fn freeze<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Frozen, RuntimeError>> {
        Box::pin(async move {
            Err(RuntimeError::Freeze {
                id: id.to_owned(),
                reason: "pretend sandboxes cannot be frozen".to_owned(),
            })
        })
    }

    fn uid_base(&self, _: &str) -> Result<u32, RuntimeError> {
        Ok(RuntimeConfig::DEFAULT_UID_BASE)
    }
}

/// What a target process keeps between inputs.
struct Api {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    node_id: String,
    keys: [String; 2],
    // Last: removed after the store and the catalog that use it are gone.
    _scratch: Scratch,
}

impl Api {
    fn start() -> Api {
        let scratch = Scratch::new("api");
        let data = scratch.path().to_path_buf();
        let store = Arc::new(Store::open(&data.join("burrow.db")).expect("a store"));
        let keys = [
            store.create_key("fuzz", false).expect("a key").key,
            store.create_key("ops", true).expect("an admin key").key,
        ];
        let node_id = store.node_id().expect("a node id");
        let catalog = Arc::new(
            Catalog::load(&data, RuntimeConfig::DEFAULT_UID_BASE).expect("the environments"),
        );
        let backend = Arc::new(Pretend {
            run_dir: data.join("run"),
            next: AtomicU64::new(0),
        });
        let runtime = burrow_fuzz::runtime();
        let config = SessionsConfig {
            ttl: Duration::from_secs(3600),
            pool_size: 0,
            pool_environments: None,
            limits: Default::default(),
            environment_limits: Default::default(),
            max_sessions: 2000,
            max_sessions_per_team: 500,
            min_available_memory: 0,
            client_id: node_id.clone(),
            host_budget: Budget::of_host(8.0, &data, 1.0).expect("the host's budget"),
            team_share: 0.5,
            max_environments_per_team: 100,
            edit_quota_per_team: 10 << 30,
        };
        let router = runtime.block_on(async {
            let sessions = Sessions::start(config, store.clone(), backend, catalog)
                .await
                .expect("the sessions");
            burrow_api::app(Arc::new(AppState {
                sessions,
                store,
                domain: DOMAIN.to_owned(),
                auth_off: None,
                gateway: Gateway::new(GatewayLimits {
                    connections_per_session: 64,
                    connections_per_team: 64,
                    envd_timeout: Duration::from_secs(1),
                    body_idle_timeout: Duration::from_secs(1),
                }),
            }))
        });
        Api {
            runtime,
            router,
            node_id,
            keys,
            _scratch: scratch,
        }
    }
}

/// The request an HTTP/1.1 head and body make, if hyper would pass it to the router.
fn request(input: &[u8]) -> Option<Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(length) = head.parse(input).ok()? else {
        return None;
    };
    let mut request = Request::builder()
        .method(Method::from_bytes(head.method?.as_bytes()).ok()?)
        .uri(Uri::try_from(head.path?).ok()?);
    for header in head.headers.iter() {
        request = request.header(
            HeaderName::from_bytes(header.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(header.value).ok()?,
        );
    }
    request.body(Body::from(input[length..].to_vec())).ok()
}

/// The key a request presents: the last `api_key` of its query string, else `X-API-Key` if it
/// is text.
fn presented_key(request: &Request<Body>) -> Option<String> {
    let query = request.uri().query().unwrap_or_default();
    let from_query = form_urlencoded::parse(query.as_bytes())
        .filter(|(name, _)| name == "api_key")
        .last()
        .map(|(_, value)| value.into_owned());
    from_query.or_else(|| {
        let header = request.headers().get("x-api-key")?;
        header.to_str().ok().map(str::to_owned)
    })
}

/// Routes that answer `2xx` without a key.
fn public(method: &Method, path: &str) -> bool {
    let read = *method == Method::GET || *method == Method::HEAD;
    (read && ["/health", "/metrics", "/openapi.json"].contains(&path))
        || (*method == Method::POST && path.starts_with("/sessions/") && path.ends_with("/refresh"))
}

fn check_session(session: &Value, node_id: &str, context: &str) {
    let shape = session.as_object().is_some_and(|object| {
        object.len() == 4
            && object["clientID"] == node_id
            && object["codeSnippetID"].is_string()
            && object["editEnabled"].is_boolean()
            && object["sessionID"].is_string()
    });
    assert!(shape, "not a session: {session} ({context})");
}

async fn check(api: &Api, request: Request<Body>) {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let key = presented_key(&request);
    let authorized = key.as_ref().is_some_and(|key| api.keys.contains(key));
    let context = format!("{method} {} key {key:?}", request.uri());
    let response = api
        .router
        .clone()
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    let context = format!("{context}: {status} {}", String::from_utf8_lossy(&body));

    assert!(!status.is_server_error(), "{context}");
    if authorized {
        assert_ne!(status.as_u16(), 401, "a valid key refused: {context}");
    }
    if !status.is_success() {
        if method != Method::HEAD {
            check_error_shape(status.as_u16(), &body).unwrap_or_else(|e| panic!("{e} ({context})"));
        }
        return;
    }
    assert!(
        authorized || public(&method, &path),
        "no valid key, yet {context}"
    );
    match (method.as_str(), path.as_str()) {
        ("POST", "/sessions") => {
            assert_eq!(status.as_u16(), 201, "{context}");
            let session: Value = serde_json::from_slice(&body).expect("JSON");
            check_session(&session, &api.node_id, &context);
        }
        ("GET", "/sessions") => {
            let sessions: Value = serde_json::from_slice(&body).expect("JSON");
            let list = sessions.as_array().unwrap_or_else(|| panic!("{context}"));
            for session in list {
                check_session(session, &api.node_id, &context);
            }
        }
        _ => {}
    }
}

fn main() {
    // Built on the first input, in the process AFL forked (not in its fork server). A panic ends
    // the process (the hook aborts), so nothing sees the state after one: asserting unwind
    // safety is sound.
    let mut api = AssertUnwindSafe(None::<Api>);
    afl::fuzz(true, move |data: &[u8]| {
        let api = api.get_or_insert_with(Api::start);
        let mut input = data.to_vec();
        for (token, key) in [
            (&b"@KEY@"[..], &api.keys[0]),
            (&b"@ADMIN@"[..], &api.keys[1]),
        ] {
            input = replace(&input, token, key.as_bytes());
        }
        let Some(request) = request(&input) else {
            return;
        };
        api.runtime.block_on(check(api, request));
    });
}

/// `haystack` with every `token` replaced by `with`.
fn replace(haystack: &[u8], token: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(token.len()).position(|w| w == token) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + token.len()..];
    }
    out.extend_from_slice(rest);
    out
}
