//! `GET /files` (download) and `POST /files` (upload: multipart parts named `file`, or one
//! `application/octet-stream` body), e2b v2 wire spec §4.3. The user is the `username` query
//! parameter's (else the sandbox user); paths resolve as in the RPCs. Both stream: the file is
//! read and written through `user_fs`, never held in memory. Errors are `{"message","code"}`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request, State as Shared};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::user::{by_name, expand};
use super::make_dirs;
use crate::child::os_error_text;
use crate::user_fs::{self, denied_hint};
use crate::{Config, State};

/// Mode of uploaded files before the umask (Go's `os.Create`).
const UPLOAD_MODE: u32 = 0o666;
/// Bytes per body chunk of a download.
const CHUNK: usize = 64 << 10;

#[derive(Deserialize)]
pub(crate) struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
}

/// One written file, as the SDK's `WriteInfo` reads it.
#[derive(Serialize)]
struct Written {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// A failed request: its status and what to tell the client.
pub(crate) struct Failure {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "message": self.message, "code": self.status.as_u16() });
        (self.status, Json(body)).into_response()
    }
}

fn error(status: StatusCode, message: String) -> Failure {
    Failure { status, message }
}

/// The user and, if given, the resolved `path` of a request.
fn target(state: &State, query: &FilesQuery) -> Result<(Config, Option<PathBuf>), Failure> {
    let user = by_name(query.username.clone(), &state.config)
        .map_err(|rejected| error(StatusCode::UNAUTHORIZED, rejected.message))?;
    let path = match query.path.as_deref().filter(|path| !path.is_empty()) {
        None => None,
        Some(path) => Some(
            expand(path, &user.home).map_err(|bad| error(StatusCode::BAD_REQUEST, bad.message))?,
        ),
    };
    Ok((user, path))
}

/// `GET /files?path=…[&username=…]`: the file's bytes.
pub(crate) async fn download(
    Shared(state): Shared<Arc<State>>,
    Query(query): Query<FilesQuery>,
) -> Result<Response, Failure> {
    let (user, path) = match target(&state, &query)? {
        (user, Some(path)) => (user, path),
        (_, None) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "path is required".to_owned(),
            ));
        }
    };
    let opening = (user.clone(), path.clone());
    let opened = tokio::task::spawn_blocking(move || user_fs::open_read(&opening.0, &opening.1))
        .await
        .unwrap_or_else(|_| Err(io::Error::other("envd's file operation crashed")));
    let file = match opened {
        Ok(file) => tokio::fs::File::from_std(file),
        Err(failure) => return Err(io_error(&user, "open", &path, &failure)),
    };
    let size = match file.metadata().await {
        Ok(meta) if meta.is_dir() => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "path '{}' is a directory; only files can be downloaded",
                    path.display()
                ),
            ));
        }
        Ok(meta) => meta.len(),
        Err(failure) => return Err(io_error(&user, "stat", &path, &failure)),
    };
    let body = futures_util::stream::unfold(file.take(size), |mut rest| async move {
        let mut chunk = vec![0; CHUNK];
        match rest.read(&mut chunk).await {
            Ok(0) => None,
            Ok(read) => {
                chunk.truncate(read);
                Some((Ok::<_, io::Error>(Bytes::from(chunk)), rest))
            }
            Err(failure) => Some((Err(failure), rest)),
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().replace(['"', '\\'], "_"))
        .unwrap_or_default();
    if let Ok(disposition) = HeaderValue::from_str(&format!("inline; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}

/// `POST /files?[path=…][&username=…]`: writes each file, its parents made first, and answers
/// the list of what it wrote.
pub(crate) async fn upload(
    Shared(state): Shared<Arc<State>>,
    Query(query): Query<FilesQuery>,
    request: Request,
) -> Result<Response, Failure> {
    let (user, path) = target(&state, &query)?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if let Some(encoding) = request.headers().get(header::CONTENT_ENCODING)
        && encoding.as_bytes() != b"identity"
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("Content-Encoding {encoding:?} is not supported; upload without compression"),
        ));
    }
    let written = if content_type.starts_with("application/octet-stream") {
        let Some(path) = path else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "an application/octet-stream upload needs the path query parameter".to_owned(),
            ));
        };
        let body = request.into_body().into_data_stream();
        write(&user, &path, body).await?;
        vec![path]
    } else if content_type.starts_with("multipart/form-data") {
        match Multipart::from_request(request, &()).await {
            Ok(multipart) => write_parts(&user, path, multipart).await?,
            Err(rejection) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("expected a multipart/form-data body: {rejection}"),
                ));
            }
        }
    } else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported Content-Type {content_type:?}: send multipart/form-data or \
                 application/octet-stream"
            ),
        ));
    };
    let written: Vec<Written> = written
        .into_iter()
        .map(|path| Written {
            name: path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_string_lossy().into_owned(),
            kind: "file",
        })
        .collect();
    Ok(Json(written).into_response())
}

/// Every part named `file`, to `path` if given, else to its filename taken as a path.
async fn write_parts(
    user: &Config,
    path: Option<PathBuf>,
    mut multipart: Multipart,
) -> Result<Vec<PathBuf>, Failure> {
    let bad = |failure: axum::extract::multipart::MultipartError| {
        error(
            StatusCode::BAD_REQUEST,
            format!("error reading the multipart body: {failure}"),
        )
    };
    let mut written: Vec<PathBuf> = Vec::new();
    while let Some(mut field) = multipart.next_field().await.map_err(bad)? {
        if field.name() != Some("file") {
            continue;
        }
        let destination = match (&path, field.file_name()) {
            (Some(path), _) => path.clone(),
            (None, Some(name)) if !name.is_empty() => expand(name, &user.home)
                .map_err(|failure| error(StatusCode::BAD_REQUEST, failure.message))?,
            (None, _) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "a 'file' part has no filename; send one, or the path query parameter"
                        .to_owned(),
                ));
            }
        };
        if written.contains(&destination) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the request writes {} more than once",
                    destination.display()
                ),
            ));
        }
        write(user, &destination, &mut field).await?;
        written.push(destination);
    }
    if written.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the multipart body has no part named 'file'".to_owned(),
        ));
    }
    Ok(written)
}

/// Writes `chunks` to `path` (made, or truncated), its parents made first, all as `user`.
async fn write<E: std::fmt::Display>(
    user: &Config,
    path: &Path,
    chunks: impl futures_util::Stream<Item = Result<Bytes, E>>,
) -> Result<(), Failure> {
    let creating = (user.clone(), path.to_owned());
    let created = tokio::task::spawn_blocking(move || {
        let (user, path) = creating;
        if let Some(parent) = path.parent() {
            make_dirs(&user, parent)?;
        }
        user_fs::create_file(&user, &path, UPLOAD_MODE)
    })
    .await
    .unwrap_or_else(|_| Err(io::Error::other("envd's file operation crashed")));
    let mut file = match created {
        Ok(file) => tokio::fs::File::from_std(file),
        Err(failure) => return Err(io_error(user, "create", path, &failure)),
    };
    let mut chunks = std::pin::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|failure| {
            error(
                StatusCode::BAD_REQUEST,
                format!("reading the upload failed: {failure}"),
            )
        })?;
        file.write_all(&chunk)
            .await
            .map_err(|failure| io_error(user, "write", path, &failure))?;
    }
    file.flush()
        .await
        .map_err(|failure| io_error(user, "write", path, &failure))
}

/// `404` missing, `403` refused to the user, `400` not a file's path, `507` a full disk, else
/// `500`.
fn io_error(user: &Config, what: &str, path: &Path, failure: &io::Error) -> Failure {
    let status = match failure.raw_os_error() {
        Some(libc::ENOENT) => StatusCode::NOT_FOUND,
        Some(libc::EACCES | libc::EPERM) => StatusCode::FORBIDDEN,
        Some(libc::EISDIR | libc::ENOTDIR | libc::ENAMETOOLONG) => StatusCode::BAD_REQUEST,
        Some(libc::ENOSPC | libc::EDQUOT) => StatusCode::INSUFFICIENT_STORAGE,
        _ if failure.kind() == io::ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(
        status,
        format!(
            "{what} {}: {}{}",
            path.display(),
            os_error_text(failure),
            denied_hint(user, failure)
        ),
    )
}
