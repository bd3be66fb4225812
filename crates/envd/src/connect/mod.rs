//! The Connect protocol subset the current E2B SDKs speak to envd (e2b v2 wire spec §5): JSON
//! only, no compression, over HTTP/1.1. Unary calls are `application/json` with a bare message
//! each way; streams are `application/connect+json` bodies of envelopes, a server stream ending
//! with one end-of-stream envelope that carries the call's error, if any. Services: `process`,
//! `filesystem` (whose module also serves `/files`, the SDKs' plain-HTTP transfers).

mod envelope;
mod error;
mod filesystem;
mod json;
mod process;
mod user;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::extract::{Path, State as Shared};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{Config, State};
use error::{Code, Error};
pub(crate) use filesystem::{Watchers, files};
pub(crate) use process::Processes;

/// The largest message envd reads (a unary body or one envelope's payload). Stdin arrives in
/// messages; 16 MiB of base64 is far above what an SDK sends at once.
const MAX_MESSAGE: usize = 16 << 20;

/// How often a stream sends a keepalive when the client names no `Keepalive-Ping-Interval`
/// (envd's default).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// Envelopes a stream may have queued for a client that reads slowly.
const QUEUED_FRAMES: usize = 16;

/// A handler's outcome: the response message as JSON, or the call's error.
type Reply = BoxFuture<'static, Result<Vec<u8>, Error>>;
/// A streaming handler's outcome, which the end-of-stream message carries.
type Streamed = BoxFuture<'static, Result<(), Error>>;

/// One method of a service and how it is called.
pub(crate) enum Method {
    /// A message in, a message out.
    Unary(fn(Arc<State>, Call, Bytes) -> Reply),
    /// A message in, messages out through the [`Sink`]; the end of the stream follows the
    /// future's result.
    ServerStream(fn(Arc<State>, Call, Bytes, Sink) -> Streamed),
    /// Messages in, one message out.
    ClientStream(fn(Arc<State>, Call, Messages) -> Reply),
}

/// What every call carries besides its messages.
pub(crate) struct Call {
    /// The configuration children of this call start from: the sandbox's, as the user the
    /// request names (§6.1).
    pub(crate) user: Config,
    /// `Connect-Timeout-Ms`; `None` when absent or 0.
    pub(crate) timeout: Option<Duration>,
    /// How long a stream may stay silent before it sends a keepalive (`Keepalive-Ping-Interval`
    /// in seconds).
    pub(crate) keepalive: Duration,
}

/// `POST /process.Process/{method}`.
pub(crate) async fn process(
    Shared(state): Shared<Arc<State>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(method) = process::method(&method) else {
        return Error::new(
            Code::Unimplemented,
            format!(
                "process.Process/{method} is not implemented; envd serves {}",
                process::NAMES
            ),
        )
        .into_response();
    };
    serve(state, method, headers, body).await
}

/// `POST /filesystem.Filesystem/{method}`.
pub(crate) async fn filesystem(
    Shared(state): Shared<Arc<State>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(method) = filesystem::method(&method) else {
        return Error::new(
            Code::Unimplemented,
            format!(
                "filesystem.Filesystem/{method} is not implemented; envd serves {}",
                filesystem::NAMES
            ),
        )
        .into_response();
    };
    serve(state, method, headers, body).await
}

async fn serve(state: Arc<State>, method: Method, headers: HeaderMap, body: Body) -> Response {
    let streaming = !matches!(method, Method::Unary(_));
    if let Some(rejection) = unsupported_media_type(&headers, streaming) {
        return rejection;
    }
    let call = match parse_headers(&headers, streaming, &state.config) {
        Ok(call) => call,
        Err(error) if streaming => {
            return stream_response(vec![envelope::end_of_stream(&Err(error))]);
        }
        Err(error) => return error.into_response(),
    };
    let timeout = call.timeout;
    let body = body.into_data_stream();
    match method {
        Method::Unary(handler) => {
            let result = async {
                let payload = read_whole(body, MAX_MESSAGE).await?;
                within(timeout, handler(state, call, payload)).await
            }
            .await;
            match result {
                Ok(message) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    message,
                )
                    .into_response(),
                Err(error) => error.into_response(),
            }
        }
        Method::ServerStream(handler) => {
            let (sink, response) = Sink::open();
            tokio::spawn(async move {
                let result = async {
                    let payload = only_message(body).await?;
                    within(timeout, handler(state, call, payload, sink.clone())).await
                }
                .await;
                sink.finish(result).await;
            });
            response
        }
        Method::ClientStream(handler) => {
            let messages = Messages {
                body,
                decoder: envelope::Decoder::new(MAX_MESSAGE),
            };
            let frames = match within(timeout, handler(state, call, messages)).await {
                Ok(message) => vec![
                    envelope::encoded_message(&message),
                    envelope::end_of_stream(&Ok(())),
                ],
                Err(error) => vec![envelope::end_of_stream(&Err(error))],
            };
            stream_response(frames)
        }
    }
}

/// `415` for a body the method cannot read: JSON only (e2b v2 wire spec §5.1), enveloped for
/// streams.
fn unsupported_media_type(headers: &HeaderMap, streaming: bool) -> Option<Response> {
    let expected = if streaming {
        "application/connect+json"
    } else {
        "application/json"
    };
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if given.as_deref() == Some(expected) {
        return None;
    }
    Some(
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [("accept-post", expected)],
            format!("this method takes Content-Type {expected}"),
        )
            .into_response(),
    )
}

/// Checks the protocol headers and reads what the call needs from them.
fn parse_headers(headers: &HeaderMap, streaming: bool, config: &Config) -> Result<Call, Error> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|value| value.to_str().unwrap_or("\u{fffd}").trim().to_owned())
    };
    if let Some(version) = text("connect-protocol-version")
        && version != "1"
    {
        return Err(Error::invalid_argument(format!(
            "Connect-Protocol-Version must be \"1\": got {version:?}"
        )));
    }
    let encoding = if streaming {
        "connect-content-encoding"
    } else {
        "content-encoding"
    };
    if let Some(encoding) = text(encoding)
        && !encoding.eq_ignore_ascii_case("identity")
    {
        return Err(Error::new(
            Code::Unimplemented,
            format!("unknown compression {encoding:?}: envd accepts identity only"),
        ));
    }
    let timeout = match text("connect-timeout-ms") {
        None => None,
        Some(ms) => {
            let valid = !ms.is_empty() && ms.len() <= 10 && ms.bytes().all(|b| b.is_ascii_digit());
            let ms: u64 = ms.parse().ok().filter(|_| valid).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "Connect-Timeout-Ms must be at most 10 digits: got {ms:?}"
                ))
            })?;
            (ms > 0).then(|| Duration::from_millis(ms))
        }
    };
    let keepalive = text("keepalive-ping-interval")
        .and_then(|seconds| seconds.parse::<u64>().ok())
        .filter(|&seconds| seconds > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs);
    Ok(Call {
        user: user::resolve(headers, config)?,
        timeout,
        keepalive,
    })
}

/// Runs `call`, failing with `deadline_exceeded` once `timeout` has passed.
async fn within<T>(
    timeout: Option<Duration>,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match timeout {
        None => call.await,
        Some(limit) => tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(Error::new(
                Code::DeadlineExceeded,
                format!("the call's deadline of {} ms has passed", limit.as_millis()),
            ))
        }),
    }
}

/// The whole body, refusing one longer than `limit`.
async fn read_whole(mut body: BodyDataStream, limit: usize) -> Result<Bytes, Error> {
    let mut whole = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|error| {
            Error::new(
                Code::Unknown,
                format!("reading the request failed: {error}"),
            )
        })?;
        if whole.len() + chunk.len() > limit {
            return Err(Error::new(
                Code::ResourceExhausted,
                format!("the request is larger than the maximum of {limit} bytes"),
            ));
        }
        whole.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(whole))
}

/// The one message of a server stream's request.
async fn only_message(body: BodyDataStream) -> Result<Bytes, Error> {
    let mut messages = Messages {
        body,
        decoder: envelope::Decoder::new(MAX_MESSAGE),
    };
    let message = messages.next().await?.ok_or_else(|| {
        Error::invalid_argument("protocol error: the request holds no message envelope")
    })?;
    if messages.next().await?.is_some() {
        return Err(Error::invalid_argument(
            "protocol error: the request holds more than one message envelope",
        ));
    }
    Ok(message)
}

/// The messages of a streamed request, as they arrive.
pub(crate) struct Messages {
    body: BodyDataStream,
    decoder: envelope::Decoder,
}

impl Messages {
    /// The next message's payload; `None` once the client has closed the request.
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some(payload) = self.decoder.next()? {
                return Ok(Some(payload));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.decoder.push(&chunk),
                Some(Err(error)) => {
                    return Err(Error::new(
                        Code::Unknown,
                        format!("reading the request failed: {error}"),
                    ));
                }
                None => return self.decoder.finish().map(|()| None),
            }
        }
    }
}

/// Where a server stream's messages go: the response body, in order, with backpressure.
#[derive(Clone)]
pub(crate) struct Sink {
    frames: mpsc::Sender<Bytes>,
}

/// The client stopped reading (it disconnected).
#[derive(Debug)]
pub(crate) struct Gone;

impl Sink {
    /// A sink and the `200` response its frames are the body of. The head goes out at once.
    fn open() -> (Self, Response) {
        let (frames, queue) = mpsc::channel(QUEUED_FRAMES);
        (Self { frames }, frames_response(queue))
    }

    pub(crate) async fn send<M: Serialize>(&self, message: &M) -> Result<(), Gone> {
        self.frames
            .send(envelope::message(message))
            .await
            .map_err(|_| Gone)
    }

    /// Resolves once the client has gone.
    pub(crate) async fn closed(&self) {
        self.frames.closed().await;
    }

    async fn finish(self, result: Result<(), Error>) {
        // A client that has gone does not need the end.
        let _ = self.frames.send(envelope::end_of_stream(&result)).await;
    }
}

fn stream_response(frames: Vec<Bytes>) -> Response {
    let (sender, queue) = mpsc::channel(frames.len().max(1));
    for frame in frames {
        // Capacity was made for every frame.
        let _ = sender.try_send(frame);
    }
    frames_response(queue)
}

fn frames_response(queue: mpsc::Receiver<Bytes>) -> Response {
    let body = futures_util::stream::unfold(queue, |mut queue| async move {
        queue
            .recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), queue))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/connect+json")],
        Body::from_stream(body),
    )
        .into_response()
}
