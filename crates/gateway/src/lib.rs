//! The gateway: routes `{port}-{sessionID}-{clientID}.{domain}` to a session's envd, proxying bytes
//! (HTTP and websocket upgrades). It does not parse JSON-RPC.
//!
//! The current E2B SDKs reach a sandbox (a session) as `{port}-{sandboxID}.{domain}`, or, with
//! `E2B_SANDBOX_URL`, at one URL with the `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers naming
//! it (e2b v2 wire spec §2.4, §4.1); the 502s the gateway makes for them carry E2B's bodies, which
//! the SDKs classify by their text. Connect streams (`application/connect+json` bodies: stdin of a
//! process) are exempt from the body idle timeout, as websockets are.
//!
//! Ports 49982 and 49983 are envd itself; any other port goes through envd's `/tunnel/{port}` upgrade, which
//! splices the connection to that TCP port inside the sandbox. Either way the client's request is
//! then forwarded unchanged over HTTP/1.1, and a `101 Switching Protocols` answer turns the
//! exchange into a byte pipe in both directions.
//!
//! A hostile or broken party on either side must not hold the server: each session gets at most
//! [`Limits::connections_per_session`] connections at once and each team at most
//! [`Limits::connections_per_team`] (so one tenant cannot take the whole server's connection
//! budget), envd must accept a connection and answer a request's head within
//! [`Limits::envd_timeout`] (a frozen or stopped sandbox gets its clients a `504`, not a hang), and
//! a request body must not go [`Limits::body_idle_timeout`] without a byte (`408`, and the upload
//! to envd is aborted). Upgraded connections have no deadline: an idle websocket is never closed.

mod deadline;
mod guarded;
#[cfg(test)]
mod proxy_tests;
mod slots;

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::task::{AbortHandle, JoinHandle};

pub use guarded::Guarded;
use slots::Slots;

/// The port envd serves on in the E2B hostname scheme.
pub const ENVD_PORT: u16 = 49982;
/// envd's port for the current E2B SDKs (Connect, `/health`): the same envd, the same socket.
pub const E2B_ENVD_PORT: u16 = 49983;

/// The headers that name a request's sandbox and port in the `E2B_SANDBOX_URL` mode.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

fn is_envd(port: u16) -> bool {
    port == ENVD_PORT || port == E2B_ENVD_PORT
}

/// Where a request's `Host` sends it.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Not a session hostname: the REST API.
    Api,
    /// `{port}-{session}-{client}.{domain}`.
    Session {
        port: u16,
        session_id: &'a str,
        client_id: &'a str,
    },
    /// `{port}-{sandbox}.{domain}`: a sandbox (session) as the current E2B SDKs name it.
    Sandbox { port: u16, sandbox_id: &'a str },
    /// Under the session domain but not of the session form.
    Invalid,
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Classifies a `Host` header value (with or without `:port`) for the session `domain`.
pub fn route<'a>(host: &'a str, domain: &str) -> Route<'a> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let Some(label) = name
        .len()
        .checked_sub(domain.len() + 1)
        .filter(|&cut| {
            name.is_char_boundary(cut)
                && name[cut..].starts_with('.')
                && name[cut + 1..].eq_ignore_ascii_case(domain)
        })
        .map(|cut| &name[..cut])
    else {
        return Route::Api;
    };
    let mut parts = label.split('-');
    let (Some(port), Some(session_id), client_id, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Invalid;
    };
    let Some(port) = parse_port(port) else {
        return Route::Invalid;
    };
    match client_id {
        Some(client_id) if is_id(session_id) && is_id(client_id) => Route::Session {
            port,
            session_id,
            client_id,
        },
        None if is_id(session_id) => Route::Sandbox {
            port,
            sandbox_id: session_id,
        },
        _ => Route::Invalid,
    }
}

fn parse_port(port: &str) -> Option<u16> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Some(p),
        _ => None,
    }
}

/// The sandbox and port the `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers name: `None` when the
/// request has neither (route it by its `Host`), `Err` with what is wrong (a `400`) when one is
/// missing, repeated or not valid.
pub fn route_by_headers(headers: &HeaderMap) -> Option<Result<(u16, String), String>> {
    let missing = |name: &str| {
        format!(
            "missing header {name}: a request to a sandbox names it with both E2b-Sandbox-Id and \
             E2b-Sandbox-Port"
        )
    };
    let (id, port) = match (
        headers.get(SANDBOX_ID_HEADER),
        headers.get(SANDBOX_PORT_HEADER),
    ) {
        (None, None) => return None,
        (Some(id), Some(port)) => (id, port),
        (Some(_), None) => return Some(Err(missing("E2b-Sandbox-Port"))),
        (None, Some(_)) => return Some(Err(missing("E2b-Sandbox-Id"))),
    };
    let Some(id) = id.to_str().ok().filter(|id| is_id(id)) else {
        return Some(Err(
            "invalid sandbox ID in E2b-Sandbox-Id: sandbox IDs are [a-z0-9]+".to_owned(),
        ));
    };
    let Some(port) = port.to_str().ok().and_then(parse_port) else {
        return Some(Err(
            "invalid sandbox port in E2b-Sandbox-Port: use a port number, 1-65535".to_owned(),
        ));
    };
    Some(Ok((port, id.to_owned())))
}

/// E2B's answer for a sandbox that does not exist (or is gone): the SDKs raise their "sandbox
/// not running" error on the text "was not found" (wire spec §4.1).
pub fn sandbox_not_found(sandbox_id: &str) -> Response {
    e2b_bad_gateway(sandbox_id, "The sandbox was not found")
}

/// A `502` in E2B's shape, `{"sandboxId", "message", "code": 502}`.
fn e2b_bad_gateway(sandbox_id: &str, message: &str) -> Response {
    let body = serde_json::json!({"sandboxId": sandbox_id, "message": message, "code": 502});
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// What the gateway allows; `burrow serve` sets them from its flags.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections through the gateway to one session's sandbox at once (websockets, tunnels and
    /// requests in flight); more get `429`.
    pub connections_per_session: usize,
    /// The same, summed over all the sessions of one team.
    pub connections_per_team: usize,
    /// How long a request body may go without a byte from the client; longer gets `408` and the
    /// connection is closed. Never applied to upgraded connections.
    pub body_idle_timeout: Duration,
    /// How long envd may take to accept a connection, and to answer the head of a request once
    /// it has the request; longer gets `504`. Never applied to an upgraded connection.
    pub envd_timeout: Duration,
}

/// Proxies requests to sessions' sandboxes within [`Limits`].
pub struct Gateway {
    limits: Limits,
    /// Connections per session.
    slots: Slots,
    /// Connections per team (by team id).
    team_slots: Slots,
}

#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error(
        "session '{session}' already has {limit} connections open through the gateway, its limit \
         (the operator sets it with --max-connections-per-session): close some (websockets, \
         tunnels) before opening more"
    )]
    TooMany { session: String, limit: usize },
    #[error(
        "your team already has {0} connections open through the gateway to its sessions, its \
         limit (the operator sets it with --max-connections-per-team): close some (websockets, \
         tunnels) before opening more"
    )]
    TeamTooMany(usize),
    #[error(
        "the request body made no progress for {0:?} (the operator sets this with \
         --body-idle-timeout): the upload was aborted; send bodies without long pauses"
    )]
    BodyStalled(Duration),
    #[error("the session's sandbox is not answering: {0}")]
    Connect(std::io::Error),
    #[error(
        "the session's sandbox did not accept a connection within {0:?}: it may be overloaded or stopped"
    )]
    ConnectTimeout(Duration),
    #[error("the session's sandbox did not answer within {0:?}: it may be overloaded or stopped")]
    AnswerTimeout(Duration),
    #[error("the session's sandbox broke the connection: {0}")]
    Http(#[from] hyper::Error),
    /// envd refused to open the tunnel (nothing listens on the port): its answer.
    #[error("envd refused the tunnel to port {port} with {}", .answer.status())]
    Tunnel { port: u16, answer: Response },
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::TooMany { .. } | ProxyError::TeamTooMany(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::BodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ConnectTimeout(_) | ProxyError::AnswerTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Connect(_) | ProxyError::Http(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Tunnel { answer, .. } => answer.status(),
        }
    }
}

/// The gateway's own failures in the API's error shape, `{"code": <status>, "message": "..."}`.
fn error(e: &ProxyError) -> Response {
    let status = e.status();
    let body = serde_json::json!({"code": status.as_u16(), "message": e.to_string()});
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let ProxyError::BodyStalled(_) = e {
        // The rest of the body may still come: the connection is no use for another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

impl Gateway {
    pub fn new(limits: Limits) -> Gateway {
        Gateway {
            limits,
            slots: Slots::default(),
            team_slots: Slots::default(),
        }
    }

    /// Forwards `req` to `port` of `session`'s sandbox, whose envd listens on `socket`; the
    /// connection counts against the session and its `team` for as long as it lives.
    pub async fn proxy(
        &self,
        mut req: Request,
        session: &str,
        team: i64,
        socket: &Path,
        port: u16,
    ) -> Response {
        strip_credentials(&mut req);
        match self.try_proxy(req, session, team, socket, port).await {
            Ok(resp) | Err(ProxyError::Tunnel { answer: resp, .. }) => resp,
            Err(e) => {
                tracing::debug!(error = %e, "gateway refused or failed");
                error(&e)
            }
        }
    }

    /// [`Gateway::proxy`] for a request of the current E2B SDKs to sandbox `sandbox`: a port
    /// nothing listens on gets E2B's `502` ("port is not open").
    pub async fn proxy_sandbox(
        &self,
        mut req: Request,
        sandbox: &str,
        team: i64,
        socket: &Path,
        port: u16,
    ) -> Response {
        strip_credentials(&mut req);
        match self.try_proxy(req, sandbox, team, socket, port).await {
            Ok(resp) => resp,
            Err(ProxyError::Tunnel { answer, .. })
                if answer.status() == StatusCode::BAD_GATEWAY =>
            {
                e2b_bad_gateway(sandbox, "The sandbox is running but port is not open")
            }
            Err(ProxyError::Tunnel { answer, .. }) => answer,
            Err(e) => {
                tracing::debug!(error = %e, "gateway refused or failed");
                error(&e)
            }
        }
    }

    async fn try_proxy(
        &self,
        req: Request,
        session: &str,
        team: i64,
        socket: &Path,
        port: u16,
    ) -> Result<Response, ProxyError> {
        let Limits {
            connections_per_session: limit,
            connections_per_team: team_limit,
            envd_timeout,
            body_idle_timeout,
        } = self.limits;
        let team_slot = self
            .team_slots
            .take(&team.to_string(), team_limit)
            .ok_or(ProxyError::TeamTooMany(team_limit))?;
        let slot = self
            .slots
            .take(session, limit)
            .ok_or_else(|| ProxyError::TooMany {
                session: session.to_owned(),
                limit,
            })?;
        let stream = tokio::time::timeout(envd_timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| ProxyError::ConnectTimeout(envd_timeout))?
            .map_err(ProxyError::Connect)?;
        // The slots live with the socket: through hyper's connection and any upgrade after it.
        let io = TokioIo::new(Guarded::new(stream, (slot, team_slot)));
        // Only a plain request's body is bounded: an upgrade request has none worth the name, and
        // what follows its `101` is not a body; a Connect stream's body is a process's stdin,
        // which may rightly stay silent for hours.
        let idle = (!wants_upgrade(&req) && !is_connect_stream(&req)).then_some(body_idle_timeout);
        if is_envd(port) {
            return forward(io, req, Some(envd_timeout), idle).await;
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        let conn = Unanswered::new(tokio::spawn(conn.with_upgrades()));
        let tunnel = hyper::Request::get(format!("/tunnel/{port}"))
            .header(header::HOST, "envd")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "tcp")
            .body(Body::empty())
            .expect("a static request is valid");
        let mut answer = tokio::time::timeout(envd_timeout, sender.send_request(tunnel))
            .await
            .map_err(|_| ProxyError::AnswerTimeout(envd_timeout))??;
        conn.answered();
        if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProxyError::Tunnel {
                port,
                answer: answer.map(Body::new),
            });
        }
        let upgraded = hyper::upgrade::on(&mut answer).await?;
        // The answer now comes from the program listening in the sandbox, which may take as long
        // as it likes (long polls): no deadline.
        forward(upgraded, req, None, idle).await
    }
}

/// Code in the sandbox is untrusted: it never sees the caller's burrow API key, whether the
/// client sent it as the `X-API-Key` header (any case: header names are case-insensitive, and
/// every copy goes) or as the `api_key` query parameter, however its name is spelled: the API
/// decodes parameter names before it looks for `api_key`, so `api%5Fkey` is a key too.
fn strip_credentials(req: &mut Request) {
    req.headers_mut().remove("x-api-key");
    let Some(query) = req.uri().query() else {
        return;
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !names_the_key(pair.split('=').next().unwrap_or("")))
        .collect();
    if kept.len() == query.split('&').count() {
        return;
    }
    let path = req.uri().path();
    let rebuilt = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    if let Ok(uri) = rebuilt.parse() {
        *req.uri_mut() = uri;
    }
}

/// Whether a raw query parameter name is `api_key` once decoded as a form field name
/// (percent-escapes, `+` for a space), in any case.
fn names_the_key(raw: &str) -> bool {
    let raw = raw.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = (raw[i] == b'%')
            .then(|| raw.get(i + 1..i + 3))
            .flatten()
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], escaped) {
            (_, Some(v)) => {
                decoded.push(v);
                i += 3;
            }
            (b'+', None) => {
                decoded.push(b' ');
                i += 1;
            }
            (b, None) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    decoded.eq_ignore_ascii_case(b"api_key")
}

/// A connection to envd whose answer has not come yet. If the wait is given up (deadline
/// passed, client gone), dropping this ends the connection: hyper would otherwise keep it, and
/// its descriptor and slot, for as long as it stays blocked writing to an envd that does not
/// read.
struct Unanswered(Option<AbortHandle>);

impl Unanswered {
    fn new<T>(conn: JoinHandle<T>) -> Unanswered {
        Unanswered(Some(conn.abort_handle()))
    }

    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            conn.abort();
        }
    }
}

/// A Connect streaming call (`application/connect+json`, `+proto`): its body is a stream of
/// messages the client sends when it has them.
fn is_connect_stream(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let prefix = "application/connect+";
            v.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        })
}

fn wants_upgrade(req: &Request) -> bool {
    req.headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Sends the client's request over `io` and relays the answer, whose head must come within
/// `deadline` (see [`deadline`]) if there is one, while the request body gets no more than
/// `idle` between two pieces; on `101` pipes the two upgraded connections into each other until
/// either side closes, however long they stay idle.
async fn forward<I>(
    io: I,
    mut req: Request,
    deadline: Option<Duration>,
    idle: Option<Duration>,
) -> Result<Response, ProxyError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "proxied connection ended");
        }
    });
    let conn = Unanswered::new(conn);
    let client_side = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let (body, progress) = deadline::watch(body, idle);
    let answer = sender.send_request(Request::from_parts(parts, body));
    let answer = match deadline {
        Some(limit) => progress
            .within(limit, answer)
            .await
            .ok_or(ProxyError::AnswerTimeout(limit))?,
        None => answer.await,
    };
    let mut resp = match (answer, idle) {
        (Ok(resp), _) => resp,
        (Err(_), Some(idle)) if progress.stalled() => return Err(ProxyError::BodyStalled(idle)),
        (Err(e), _) => return Err(e.into()),
    };
    conn.answered();
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_side
    {
        let sandbox_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_side, sandbox_side) {
                Ok((client, sandbox)) => {
                    let mut client = TokioIo::new(client);
                    let mut sandbox = TokioIo::new(sandbox);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut sandbox).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    Ok(resp.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(port: u16, s: &'static str, c: &'static str) -> Route<'static> {
        Route::Session {
            port,
            session_id: s,
            client_id: c,
        }
    }

    #[test]
    fn credentials_never_reach_the_sandbox() {
        for (uri, want) in [
            ("/ws?api_key=e2b_secret", "/ws"),
            ("/file?path=/a&api_key=k&x=1", "/file?path=/a&x=1"),
            ("/file?path=/a", "/file?path=/a"),
            ("/file?api_keyx=1", "/file?api_keyx=1"),
            ("/", "/"),
            // The API decodes names, so these are keys as well.
            ("/file?api%5Fkey=k&path=/a", "/file?path=/a"),
            ("/file?%61pi_key=k", "/file"),
            ("/file?%61%70%69%5f%6b%65%79=k&x=1", "/file?x=1"),
            ("/file?API_Key=k&x=1", "/file?x=1"),
            // Every copy goes, not only the first.
            ("/ws?api_key=a&x=1&api_key=b&api%5Fkey=c", "/ws?x=1"),
            ("/ws?api_key&x=1", "/ws?x=1"),
            // Not the key: kept as sent.
            (
                "/file?api_key2=1&%zz=2&api%5=3&api%+5Fkey=4",
                "/file?api_key2=1&%zz=2&api%5=3&api%+5Fkey=4",
            ),
        ] {
            let mut req = Request::builder()
                .uri(uri)
                .header("x-api-key", "e2b_secret")
                .header("X-API-KEY", "e2b_second")
                .header("X-Api-Key", "e2b_third")
                .body(Body::empty())
                .unwrap();
            strip_credentials(&mut req);
            assert_eq!(req.uri().to_string(), want);
            assert!(req.headers().get("x-api-key").is_none());
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn routes_by_e2b_headers() {
        assert_eq!(
            route_by_headers(&headers(&[("host", "127.0.0.1:3000")])),
            None
        );
        assert_eq!(
            route_by_headers(&headers(&[
                ("E2b-Sandbox-Id", "abc123"),
                ("E2b-Sandbox-Port", "49983")
            ])),
            Some(Ok((49983, "abc123".to_owned())))
        );
        for (pairs, needle) in [
            (
                &[("e2b-sandbox-id", "abc")][..],
                "missing header E2b-Sandbox-Port",
            ),
            (
                &[("e2b-sandbox-port", "49983")][..],
                "missing header E2b-Sandbox-Id",
            ),
            (
                &[("e2b-sandbox-id", "ABC"), ("e2b-sandbox-port", "1")][..],
                "invalid sandbox ID",
            ),
            (
                &[("e2b-sandbox-id", ""), ("e2b-sandbox-port", "1")][..],
                "invalid sandbox ID",
            ),
            (
                &[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "0")][..],
                "invalid sandbox port",
            ),
            (
                &[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "+80")][..],
                "invalid sandbox port",
            ),
            (
                &[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "65536")][..],
                "invalid sandbox port",
            ),
        ] {
            match route_by_headers(&headers(pairs)) {
                Some(Err(message)) => assert!(message.contains(needle), "{pairs:?}: {message}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn routes_hosts() {
        let d = "localhost";
        for (host, want) in [
            (
                "49982-abc123-node0001.localhost",
                session(49982, "abc123", "node0001"),
            ),
            (
                "49982-abc123-node0001.localhost:3000",
                session(49982, "abc123", "node0001"),
            ),
            ("8080-abc-def.LOCALHOST.", session(8080, "abc", "def")),
            ("localhost:3000", Route::Api),
            ("127.0.0.1:3000", Route::Api),
            ("[::1]:3000", Route::Api),
            ("", Route::Api),
            ("example.com", Route::Api),
            ("xlocalhost", Route::Api),
            ("a-b-c.notlocalhost", Route::Api),
            (
                "49983-abc123.localhost:3000",
                Route::Sandbox {
                    port: 49983,
                    sandbox_id: "abc123",
                },
            ),
            ("foo.localhost", Route::Invalid),
            ("80-ABC.localhost", Route::Invalid),
            ("80-.localhost", Route::Invalid),
            ("0-abc-def.localhost", Route::Invalid),
            ("65536-abc-def.localhost", Route::Invalid),
            ("+80-abc-def.localhost", Route::Invalid),
            ("80-ABC-def.localhost", Route::Invalid),
            ("80-abc-def-x.localhost", Route::Invalid),
            ("80-abc-.localhost", Route::Invalid),
            ("80-a.b-c.localhost", Route::Invalid),
            ("ü80-abc-def.localhost", Route::Invalid),
        ] {
            assert_eq!(route(host, d), want, "{host:?}");
        }
    }
}
