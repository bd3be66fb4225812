//! `GET /file?path=…` (download) and `POST /file` (multipart upload), wire spec §6. Both stream:
//! neither holds a whole file in memory. Both act through `user_fs`: as the sandbox user, else as
//! root on a path without symlinks, so that no link user code plants redirects a download's open
//! or an upload's create, rename or remove; what an upload creates is the user's.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, Query, State as Shared};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::child::{os_error_text, resolve};
use crate::user_fs::{self, denied_hint};
use crate::{Config, State, random_id};

/// How much of a file decides its `Content-Type` (as Go's `http.DetectContentType`).
const SNIFF_LEN: usize = 512;
/// Bytes per body chunk of a download.
const CHUNK: usize = 64 << 10;
/// Mode of uploaded files before the umask (Go's `os.Create`).
const UPLOAD_MODE: u32 = 0o666;

#[derive(Deserialize)]
pub(crate) struct FileQuery {
    path: Option<String>,
}

/// `OPTIONS /file`: the original allowed browsers from any origin.
pub(crate) async fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
    cors(response)
}

/// `GET /file?path=…`: the raw bytes, `200` even when empty (DECISIONS #8).
pub(crate) async fn download(
    Shared(state): Shared<Arc<State>>,
    Query(query): Query<FileQuery>,
) -> Response {
    let Some(path) = query.path.filter(|path| !path.is_empty()) else {
        return text(StatusCode::BAD_REQUEST, "File path is required".to_owned());
    };
    let file_path = resolve(&state.config, &path);
    let opened = file_path.clone();
    let mut file =
        match user_fs::blocking(&state, move |config| user_fs::open_read(config, &opened)).await {
            Ok(file) => File::from_std(file),
            Err(error) => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!(
                        "File not found: open {}: {}{}",
                        file_path.display(),
                        os_error_text(&error),
                        denied_hint(&state.config, &error)
                    ),
                );
            }
        };
    let size = match file.metadata().await {
        Ok(meta) if meta.is_dir() => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("'{path}' is a directory; only files can be downloaded"),
            );
        }
        Ok(meta) => meta.len(),
        Err(error) => return internal_error(&file_path, &error),
    };
    let mut head = vec![0; SNIFF_LEN.min(usize::try_from(size).unwrap_or(SNIFF_LEN))];
    if let Err(error) = file.read_exact(&mut head).await {
        return internal_error(&file_path, &error);
    }
    let content_type = sniff(&head);
    let rest = file.take(size - head.len() as u64);
    let tail = futures_util::stream::unfold(rest, |mut rest| async move {
        let mut chunk = vec![0; CHUNK];
        match rest.read(&mut chunk).await {
            Ok(0) => None,
            Ok(read) => {
                chunk.truncate(read);
                Some((Ok(Bytes::from(chunk)), rest))
            }
            Err(error) => Some((Err(error), rest)),
        }
    });
    let first = futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from(head))]);
    let body = Body::from_stream(futures_util::StreamExt::chain(first, tail));

    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(disposition) = HeaderValue::from_bytes(&attachment(&file_path)) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    cors(response)
}

/// `Content-Disposition: attachment; filename=<basename>`, control characters replaced so that
/// any file name makes a valid header.
fn attachment(path: &Path) -> Vec<u8> {
    let name = path
        .file_name()
        .map(|name| name.as_encoded_bytes().to_vec())
        .unwrap_or_default();
    let mut value = b"attachment; filename=".to_vec();
    value.extend(name.into_iter().map(|byte| {
        if byte < 0x20 || byte == 0x7f {
            b'_'
        } else {
            byte
        }
    }));
    value
}

/// A small stand-in for Go's content sniffing: common binary signatures, else text if UTF-8.
fn sniff(head: &[u8]) -> &'static str {
    const SIGNATURES: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"%PDF-", "application/pdf"),
        (b"PK\x03\x04", "application/zip"),
        (b"\x1f\x8b\x08", "application/x-gzip"),
    ];
    if let Some((_, kind)) = SIGNATURES.iter().find(|(magic, _)| head.starts_with(magic)) {
        return kind;
    }
    match std::str::from_utf8(head) {
        Ok(text) if !text.contains('\0') => "text/plain; charset=utf-8",
        // The sniffed prefix may end inside a character.
        Err(error) if error.error_len().is_none() => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `POST /file`: multipart field `file` (its filename names the file in the home directory),
/// optional field `path` (the destination). Answers `200` with an empty body.
pub(crate) async fn upload(
    Shared(state): Shared<Arc<State>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    state.first_shell.discard();
    let mut multipart = match multipart {
        Ok(multipart) => multipart,
        Err(rejection) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("expected a multipart/form-data body: {rejection}"),
            );
        }
    };
    let config = &state.config;
    let mut destination: Option<PathBuf> = None;
    let mut staged: Option<Staged> = None;
    // A failed write (a full disk, a missing directory) does not end the request at once: the
    // rest of the body is read and dropped first. Answering early and closing would leave the
    // client, or the gateway relaying it, writing into a closed connection, and it would see
    // that error instead of this answer.
    let mut failed: Option<Response> = None;
    let outcome = loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break Ok(()),
            Err(error) => break Err(bad_multipart(&error)),
        };
        if failed.is_some() {
            if let Err(error) = drain(&mut field).await {
                break Err(bad_multipart(&error));
            }
            continue;
        }
        match field.name() {
            Some("path") => match field.text().await {
                Ok(path) if !path.is_empty() => destination = Some(resolve(config, &path)),
                Ok(_) => {}
                Err(error) => break Err(bad_multipart(&error)),
            },
            Some("file") if staged.is_none() => {
                let name = field
                    .file_name()
                    .and_then(|name| Path::new(name).file_name())
                    .map(|name| name.to_os_string());
                // Staged beside the destination when known, so the final rename stays on one
                // filesystem; `path` may still arrive after the file.
                let dir = destination
                    .as_deref()
                    .and_then(Path::parent)
                    .unwrap_or(&config.home);
                let temp = dir.join(format!(".burrow-upload-{}", random_id(12)));
                let creating = temp.clone();
                let file = user_fs::blocking(&state, move |config| {
                    user_fs::create_file(config, &creating, UPLOAD_MODE)
                })
                .await
                .map(File::from_std)
                .map_err(|error| write_failed(config, &temp, &error));
                if file.is_ok() {
                    staged = Some(Staged {
                        temp: temp.clone(),
                        name,
                    });
                }
                match receive(config, &mut field, file, &temp).await {
                    Ok(Ok(())) => {}
                    Ok(Err(response)) => failed = Some(response),
                    Err(error) => break Err(bad_multipart(&error)),
                }
            }
            // Other fields are skipped unread.
            _ => {}
        }
    };
    // A write failure is the answer even if the body then turned out malformed.
    let outcome = match failed {
        Some(response) => Err(response),
        None => outcome,
    };
    let finished = match (outcome, staged.as_ref()) {
        (Err(response), _) => Err(response),
        (Ok(()), None) => Err(text(
            StatusCode::BAD_REQUEST,
            "the multipart body has no field named 'file'".to_owned(),
        )),
        (Ok(()), Some(staged)) => place(&state, staged, destination).await,
    };
    match finished {
        Ok(()) => cors(StatusCode::OK.into_response()),
        Err(response) => {
            if let Some(staged) = staged {
                let _ =
                    user_fs::blocking(&state, move |config| user_fs::remove(config, &staged.temp))
                        .await;
            }
            response
        }
    }
}

/// Reads a field to its end, writing it to `file`; after a failed write (or without a file) the
/// rest is read and dropped. The outer error is a malformed body, the inner one the write's.
async fn receive(
    config: &Config,
    field: &mut Field<'_>,
    mut file: Result<File, Response>,
    temp: &Path,
) -> Result<Result<(), Response>, MultipartError> {
    while let Some(chunk) = field.chunk().await? {
        if let Ok(open) = &mut file
            && let Err(error) = open.write_all(&chunk).await
        {
            file = Err(write_failed(config, temp, &error));
        }
    }
    Ok(match file {
        Ok(mut open) => open
            .flush()
            .await
            .map_err(|error| write_failed(config, temp, &error)),
        Err(response) => Err(response),
    })
}

/// Reads a field to its end, dropping it.
async fn drain(field: &mut Field<'_>) -> Result<(), MultipartError> {
    while field.chunk().await?.is_some() {}
    Ok(())
}

/// An upload written to a temporary file, not yet at its destination.
struct Staged {
    temp: PathBuf,
    name: Option<std::ffi::OsString>,
}

/// Moves a staged upload to `destination`, or to `<home>/<filename>` without one.
async fn place(
    state: &Arc<State>,
    staged: &Staged,
    destination: Option<PathBuf>,
) -> Result<(), Response> {
    let config = &state.config;
    let target = match (destination, &staged.name) {
        (Some(path), _) => path,
        (None, Some(name)) => config.home.join(name),
        (None, None) => {
            return Err(text(
                StatusCode::BAD_REQUEST,
                "the 'file' field has no filename; send one, or a 'path' field".to_owned(),
            ));
        }
    };
    let temp = staged.temp.clone();
    let to = target.clone();
    user_fs::blocking(state, move |config| {
        match user_fs::rename(config, &temp, &to) {
            Err(error) if error.raw_os_error() == Some(libc::EXDEV) => {
                let mut from = user_fs::open_read(config, &temp)?;
                io::copy(
                    &mut from,
                    &mut user_fs::create_file(config, &to, UPLOAD_MODE)?,
                )?;
                let _ = user_fs::remove(config, &temp);
                Ok(())
            }
            moved => moved,
        }
    })
    .await
    .map_err(|error| write_failed(config, &target, &error))
}

fn bad_multipart(error: &MultipartError) -> Response {
    text(
        StatusCode::BAD_REQUEST,
        format!("error reading the multipart body: {error}"),
    )
}

/// A write the sandbox user may not do is the client's to fix (403), as is a path no file can
/// have (a NUL byte, a name over 255 bytes: 400); any other failure to create or write (a full
/// disk, a missing directory) is 500, as the original envd answered (wire spec §6).
fn write_failed(config: &Config, path: &Path, error: &io::Error) -> Response {
    let status = match error.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => StatusCode::FORBIDDEN,
        Some(libc::ENAMETOOLONG) => StatusCode::BAD_REQUEST,
        _ if error.kind() == io::ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(
        status,
        format!(
            "error writing file {}: {}{}",
            path.display(),
            os_error_text(error),
            denied_hint(config, error)
        ),
    )
}

fn internal_error(path: &Path, error: &io::Error) -> Response {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!(
            "error reading file {}: {}",
            path.display(),
            os_error_text(error)
        ),
    )
}

fn text(status: StatusCode, message: String) -> Response {
    cors((status, message).into_response())
}

fn cors(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_text_and_binary() {
        assert_eq!(sniff(b"hello"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b""), "text/plain; charset=utf-8");
        assert_eq!(sniff(&"é".as_bytes()[..1]), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\x00\x01\xfe"), "application/octet-stream");
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), "image/png");
    }

    #[test]
    fn attachment_names_are_valid_headers() {
        assert_eq!(
            attachment(Path::new("/a/b c.txt")),
            b"attachment; filename=b c.txt"
        );
        assert_eq!(
            attachment(Path::new("/a/x\ny")),
            b"attachment; filename=x_y"
        );
    }
}
