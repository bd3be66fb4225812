//! `GET /tunnel/{port}` with `Upgrade: tcp`: the gateway's way to any TCP port inside the
//! sandbox. After `101` the HTTP connection carries the raw bytes of a connection to
//! `127.0.0.1:{port}`, both ways.

use std::net::Ipv4Addr;

use axum::body::Body;
use axum::extract::{Path, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::child::os_error_text;

pub(crate) async fn open(Path(port): Path<u16>, mut request: Request) -> Response {
    if !wants_tcp(request.headers()) {
        return (
            StatusCode::BAD_REQUEST,
            "a tunnel needs the headers `Connection: Upgrade` and `Upgrade: tcp`",
        )
            .into_response();
    }
    // Connect before answering, so the caller learns of a closed port as an HTTP status.
    let mut target = match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
        Ok(stream) => stream,
        Err(error) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!(
                    "nothing listens on port {port} inside the sandbox ({})",
                    os_error_text(&error)
                ),
            )
                .into_response();
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut target).await {
                    tracing::debug!(%error, port, "tunnel closed with an error");
                }
            }
            Err(error) => tracing::debug!(%error, port, "tunnel upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    response
}

fn wants_tcp(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "tcp")
}
