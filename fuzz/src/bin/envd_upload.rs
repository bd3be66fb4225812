//! envd's `POST /file` (wire spec §6): the multipart parsing and the upload handler, through
//! envd's real router, on any `Content-Type` and body.
//!
//! Input: the first byte sets the size of the chunks the body arrives in (1 to 256 bytes, so
//! boundaries fall across chunks), the first line after it is the `Content-Type` value, the rest
//! is the body. envd runs in a [`Jail`], so the upload may name any path.
//!
//! The same body parsed whole by `multer` (what axum's extractor uses) is the reference for what
//! the handler must do: take the first field named `file`; place it at the last non-empty `path`
//! field (relative to home), else at home under the file name's last component. Invariants:
//! `200` only for a body that parses, has a `file` field and a destination, and then the
//! destination holds exactly that field's bytes; a body that does not parse, or has no `file`
//! field, or no destination, is refused with `400`; otherwise a failure is a `500` that says
//! which write failed; every answer carries `Access-Control-Allow-Origin: *`; no staging file
//! (`.burrow-upload-*`) is ever left behind.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use burrow_fuzz::{JAIL_HOME, JailedEnvd, files_under};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// What the handler must make of a body, from the reference parse.
enum Reference {
    /// Refused with `400`; or with a `500` when `after_file` (the body broke after a `file` field,
    /// whose write may have failed first, and a failed write is the answer).
    Refused { why: String, after_file: bool },
    /// Stored at `destination`, or failed with a `500`.
    Stored {
        destination: PathBuf,
        content: Bytes,
    },
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Refused { why, after_file } => {
                write!(f, "refused: {why} (after a file field: {after_file})")
            }
            Reference::Stored {
                destination,
                content,
            } => write!(f, "{} bytes at {}", content.len(), destination.display()),
        }
    }
}

fn refused(why: String) -> Reference {
    Reference::Refused {
        why,
        after_file: false,
    }
}

async fn reference(content_type: &str, body: Bytes) -> Reference {
    let boundary = match multer::parse_boundary(content_type) {
        Ok(boundary) => boundary,
        Err(e) => return refused(format!("no boundary: {e}")),
    };
    let stream = futures_util::stream::once(async { Ok::<_, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut file: Option<(Option<String>, Bytes)> = None;
    let mut path: Option<String> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return Reference::Refused {
                    why: format!("malformed: {e}"),
                    after_file: file.is_some(),
                };
            }
        };
        let name = field.name().map(str::to_owned);
        let file_name = field.file_name().map(str::to_owned);
        let read = match name.as_deref() {
            Some("path") => field.text().await.map(|text| {
                if !text.is_empty() {
                    path = Some(text);
                }
            }),
            Some("file") if file.is_none() => field.bytes().await.map(|bytes| {
                file = Some((file_name, bytes));
            }),
            // The handler skips other fields unread; the parser still reads past them.
            _ => field.bytes().await.map(drop),
        };
        if let Err(e) = read {
            return Reference::Refused {
                why: format!("malformed field: {e}"),
                // Also when the field that broke is the file itself.
                after_file: file.is_some() || name.as_deref() == Some("file"),
            };
        }
    }
    let Some((file_name, content)) = file else {
        return refused("no file field".to_owned());
    };
    let home = Path::new(JAIL_HOME);
    let destination = match (path, file_name) {
        (Some(path), _) => home.join(path),
        (None, Some(name)) => match Path::new(&name).file_name() {
            Some(last) => home.join(last),
            None => return refused("no usable file name".to_owned()),
        },
        (None, None) => return refused("no destination".to_owned()),
    };
    Reference::Stored {
        destination,
        content,
    }
}

async fn upload(router: axum::Router, content_type: HeaderValue, chunk: usize, body: Bytes) {
    let chunks: Vec<Result<Bytes, Infallible>> = body
        .chunks(chunk)
        .map(|piece| Ok(body.slice_ref(piece)))
        .collect();
    let request = Request::post("/file")
        .header(header::CONTENT_TYPE, content_type.clone())
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("a request");
    let response = router.oneshot(request).await.expect("infallible");
    let status = response.status();
    let cors = response
        .headers()
        .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .cloned();
    let answer = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(
        cors.as_ref().map(HeaderValue::as_bytes),
        Some(&b"*"[..]),
        "{status} {answer}"
    );

    // `to_str` cannot fail: the header was made from a `&str`.
    let reference = reference(content_type.to_str().unwrap_or_default(), body).await;
    let leftovers: Vec<PathBuf> = files_under(Path::new("/"))
        .into_iter()
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b".burrow-upload-"))
        })
        .filter(
            |f| !matches!(&reference, Reference::Stored { destination, .. } if destination == f),
        )
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging files left: {leftovers:?} ({status} {answer})"
    );

    let write_failed = answer.starts_with("error writing file ");
    match (&reference, status) {
        (Reference::Refused { .. }, StatusCode::BAD_REQUEST) => {}
        (
            Reference::Refused {
                after_file: true, ..
            },
            StatusCode::INTERNAL_SERVER_ERROR,
        ) if write_failed => {}
        (
            Reference::Stored {
                destination,
                content,
            },
            StatusCode::OK,
        ) => {
            let stored = std::fs::read(destination)
                .unwrap_or_else(|e| panic!("200, but {}: {e}", destination.display()));
            assert!(
                stored == *content,
                "{} holds other bytes",
                destination.display()
            );
        }
        (Reference::Stored { .. }, StatusCode::INTERNAL_SERVER_ERROR) if write_failed => {}
        _ => panic!("answered {status} ({answer}), but the reference says {reference}"),
    }
}

fn main() {
    // Built on the first input, in the process AFL forked (not in its fork server). A panic ends
    // the process (the hook aborts), so nothing sees the state after one: asserting unwind
    // safety is sound.
    let mut envd = AssertUnwindSafe(None::<JailedEnvd>);
    afl::fuzz(true, move |data: &[u8]| {
        let Some((&size, rest)) = data.split_first() else {
            return;
        };
        let (content_type, body) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&rest[..end], &rest[end + 1..]),
            None => (rest, &[][..]),
        };
        let content_type = content_type.strip_suffix(b"\r").unwrap_or(content_type);
        // Only what a client can send as a header value, and what axum reads as text.
        let Some(content_type) = std::str::from_utf8(content_type)
            .ok()
            .and_then(|text| HeaderValue::from_str(text).ok())
        else {
            return;
        };
        let envd = envd.get_or_insert_with(|| JailedEnvd::start("envd-upload"));
        let body = Bytes::copy_from_slice(body);
        envd.runtime.block_on(upload(
            envd.router.clone(),
            content_type,
            usize::from(size) + 1,
            body,
        ));
        envd.jail.reset().expect("the jail emptied");
    });
}
