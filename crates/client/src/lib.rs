//! A client of burrow's public HTTP API, used by the CLI and the benchmark. It speaks only what
//! every other client speaks: the REST API with an `api_key`, and HTTP to session hostnames.

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub use hyper::{Method, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid server URL {0:?}: use http://HOST:PORT")]
    Url(String),
    #[error("cannot reach burrow at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP error talking to burrow: {0}")]
    Http(#[from] hyper::Error),
    #[error("burrow answered {status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer from burrow: {0}")]
    Decode(String),
}

/// A session as the API returns it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Session {
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "codeSnippetID")]
    pub environment: String,
    #[serde(rename = "editEnabled")]
    pub edit_enabled: bool,
    #[serde(rename = "sessionID")]
    pub session_id: String,
}

pub struct Client {
    /// `host:port` of the server.
    addr: String,
    api_key: Option<String>,
}

impl Client {
    /// `url` is `http://HOST:PORT` (a trailing slash is fine).
    pub fn new(url: &str, api_key: Option<String>) -> Result<Client, Error> {
        let addr = url
            .strip_prefix("http://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| Error::Url(url.to_string()))?;
        Ok(Client {
            addr: addr.to_string(),
            api_key,
        })
    }

    /// A fresh connection to the server; small interactive frames are sent at once (no Nagle).
    async fn connect(&self) -> Result<TcpStream, Error> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| Error::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        stream.set_nodelay(true).ok();
        Ok(stream)
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn path_with_key(&self, path: &str) -> String {
        match &self.api_key {
            Some(k) => format!("{path}?api_key={k}"),
            None => path.to_string(),
        }
    }

    /// One request on a fresh connection; returns the status and body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        host: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), Error> {
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host.unwrap_or(&self.addr))
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Url(e.to_string()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        expect: StatusCode,
    ) -> Result<Bytes, Error> {
        let (status, bytes) = self
            .request(method, &self.path_with_key(path), None, body)
            .await?;
        if status != expect {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(Error::Api { status, message });
        }
        Ok(bytes)
    }

    pub async fn create_session(&self, environment: &str) -> Result<Session, Error> {
        let body = serde_json::json!({"codeSnippetID": environment, "editEnabled": false});
        let bytes = self
            .api(
                Method::POST,
                "/sessions",
                Some(body.to_string().into_bytes()),
                StatusCode::CREATED,
            )
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    pub async fn list_sessions(&self) -> Result<Vec<Session>, Error> {
        let bytes = self
            .api(Method::GET, "/sessions", None, StatusCode::OK)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    pub async fn delete_session(&self, id: &str) -> Result<(), Error> {
        self.api(
            Method::DELETE,
            &format!("/sessions/{id}"),
            None,
            StatusCode::NO_CONTENT,
        )
        .await
        .map(drop)
    }

    pub async fn refresh_session(&self, id: &str) -> Result<(), Error> {
        self.api(
            Method::POST,
            &format!("/sessions/{id}/refresh"),
            None,
            StatusCode::NO_CONTENT,
        )
        .await
        .map(drop)
    }
}

/// A JSON-RPC connection to a session's envd, through the server's gateway, as the SDK makes it.
pub struct Envd {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    /// Notifications that arrived while waiting for a response.
    pending: VecDeque<Value>,
}

impl Client {
    /// Opens envd's websocket of `session`, reached as `49982-{sessionID}-{clientID}.{domain}`.
    pub async fn envd(&self, session: &Session, domain: &str) -> Result<Envd, Error> {
        let stream = self.connect().await?;
        let host = format!(
            "49982-{}-{}.{domain}",
            session.session_id, session.client_id
        );
        let mut req = format!("ws://{}/ws", self.addr)
            .into_client_request()
            .map_err(|e| Error::Decode(e.to_string()))?;
        req.headers_mut().insert(
            hyper::header::HOST,
            host.parse().map_err(|_| Error::Url(host.clone()))?,
        );
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(|e| Error::Decode(format!("websocket: {e}")))?;
        Ok(Envd {
            ws,
            next_id: 1,
            pending: VecDeque::new(),
        })
    }
}

impl Envd {
    async fn next_message(&mut self) -> Result<Value, Error> {
        loop {
            let msg = self
                .ws
                .next()
                .await
                .ok_or_else(|| Error::Decode("envd closed the websocket".into()))?
                .map_err(|e| Error::Decode(format!("websocket: {e}")))?;
            if let Message::Text(text) = msg {
                return serde_json::from_str(&text).map_err(|e| Error::Decode(e.to_string()));
            }
        }
    }

    /// One JSON-RPC call; notifications arriving meanwhile are kept for [`Envd::notification`].
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .map_err(|e| Error::Decode(format!("websocket: {e}")))?;
        loop {
            let msg = self.next_message().await?;
            if msg.get("id") == Some(&json!(id)) {
                if let Some(err) = msg.get("error") {
                    return Err(Error::Decode(format!("{method}: {err}")));
                }
                return Ok(msg.get("result").cloned().unwrap_or(Value::Null));
            }
            self.pending.push_back(msg);
        }
    }

    /// The next notification of subscription `sub`, dropping those of other subscriptions.
    pub async fn notification(&mut self, sub: &str) -> Result<Value, Error> {
        loop {
            let msg = match self.pending.pop_front() {
                Some(m) => m,
                None => self.next_message().await?,
            };
            let params = &msg["params"];
            if params["subscription"] == json!(sub) {
                return Ok(params["result"].clone());
            }
        }
    }

    /// Runs `cmd` as the SDK does (subscribe to its exit, start it) and returns its exit code
    /// once the exit notification arrives, with the subscription to close with
    /// [`Envd::unsubscribe`].
    pub async fn exec(&mut self, process_id: &str, cmd: &str) -> Result<(i64, String), Error> {
        let sub = self
            .call("process_subscribe", json!(["onExit", process_id]))
            .await?;
        let sub = sub
            .as_str()
            .ok_or_else(|| Error::Decode(format!("subscription id {sub}")))?
            .to_string();
        self.call("process_start", json!([process_id, cmd, {}, ""]))
            .await?;
        let code = self.notification(&sub).await?;
        let code = code
            .as_i64()
            .ok_or_else(|| Error::Decode(format!("exit code {code}")))?;
        Ok((code, sub))
    }

    pub async fn unsubscribe(&mut self, sub: &str) -> Result<(), Error> {
        self.call("process_unsubscribe", json!([sub]))
            .await
            .map(drop)
    }

    /// Runs `cmd` as the SDK's `process.start()` with an stdout handler followed by `wait()`:
    /// subscribes to its exit and stdout, starts it, collects stdout lines until the exit
    /// notification (envd publishes it after the last line), then closes both subscriptions.
    /// Returns the exit code and the stdout lines.
    pub async fn exec_stdout(
        &mut self,
        process_id: &str,
        cmd: &str,
    ) -> Result<(i64, Vec<String>), Error> {
        let mut subscribe = async |topic: &str| {
            let sub = self
                .call("process_subscribe", json!([topic, process_id]))
                .await?;
            sub.as_str()
                .map(String::from)
                .ok_or_else(|| Error::Decode(format!("subscription id {sub}")))
        };
        let exit = subscribe("onExit").await?;
        let stdout = subscribe("onStdout").await?;
        self.call("process_start", json!([process_id, cmd, {}, ""]))
            .await?;
        let mut lines = Vec::new();
        let code = loop {
            let msg = match self.pending.pop_front() {
                Some(m) => m,
                None => self.next_message().await?,
            };
            let params = &msg["params"];
            if params["subscription"] == json!(stdout) {
                let line = params["result"]["line"]
                    .as_str()
                    .ok_or_else(|| Error::Decode(format!("output line {params}")))?;
                lines.push(line.to_string());
            } else if params["subscription"] == json!(exit) {
                break params["result"]
                    .as_i64()
                    .ok_or_else(|| Error::Decode(format!("exit code {params}")))?;
            }
        };
        self.unsubscribe(&exit).await?;
        self.unsubscribe(&stdout).await?;
        Ok((code, lines))
    }

    /// `filesystem_write`: creates or truncates `path` with `content`.
    pub async fn filesystem_write(&mut self, path: &str, content: &str) -> Result<(), Error> {
        self.call("filesystem_write", json!([path, content]))
            .await
            .map(drop)
    }

    /// `filesystem_read`: the content of `path` as text.
    pub async fn filesystem_read(&mut self, path: &str) -> Result<String, Error> {
        let content = self.call("filesystem_read", json!([path])).await?;
        content
            .as_str()
            .map(String::from)
            .ok_or_else(|| Error::Decode(format!("file content {content}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_plain_http_base_urls() {
        assert!(Client::new("http://127.0.0.1:3000", None).is_ok());
        assert!(Client::new("http://127.0.0.1:3000/", None).is_ok());
        for bad in ["https://x", "127.0.0.1:3000", "http://", "http://a/b"] {
            assert!(Client::new(bad, None).is_err(), "{bad}");
        }
    }
}
