//! A client of burrow's public HTTP API, used by the CLI and the benchmark. It speaks only what
//! every other client speaks: the REST API with an `api_key`, and HTTP to session hostnames.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

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
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| Error::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        stream.set_nodelay(true).ok();
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
