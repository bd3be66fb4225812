//! The one error shape of the REST API: `{"code": <http status>, "message": "..."}`.
//!
//! A `500` is the server's own failure, and its full reason names host paths and quotes the
//! sandbox's init log: that goes to the server log only, under a short random error id, and the
//! client gets a short reason and the id to quote to the operator.

use std::fmt::Display;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use burrow_sessions::Error as SessionError;
use serde::Serialize;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// The full reason of an internal error, for the server log only.
    detail: Option<String>,
}

/// Every non-2xx answer of the API.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody {
    /// The HTTP status, repeated.
    code: u16,
    /// What went wrong and what to do about it.
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            detail: None,
        }
    }

    /// A `500`: the client sees `reason` (which must name no host path) and an error id; the
    /// server log gets `detail` under the same id.
    pub fn internal(reason: impl Into<String>, detail: impl Display) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: reason.into(),
            detail: Some(detail.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match self.detail {
            Some(detail) => {
                let id = format!("{:08x}", rand::random::<u32>());
                tracing::error!(error_id = %id, status = self.status.as_u16(), reason = %detail, "request failed");
                format!("{}; error id {id} in the server log", self.message)
            }
            None => {
                if self.status.is_server_error() {
                    tracing::error!(status = self.status.as_u16(), message = %self.message, "request failed");
                }
                self.message
            }
        };
        let body = ErrorBody {
            code: self.status.as_u16(),
            message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> ApiError {
        let status = match &e {
            SessionError::UnknownEnvironment { .. } | SessionError::Unavailable { .. } => {
                StatusCode::BAD_REQUEST
            }
            SessionError::NotFound(_) | SessionError::EnvironmentNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            SessionError::InvalidEnvironmentId(_) => StatusCode::BAD_REQUEST,
            SessionError::EnvironmentIdTaken(_) | SessionError::EditsDropped { .. } => {
                StatusCode::CONFLICT
            }
            SessionError::TooMany { .. }
            | SessionError::TeamShare(_)
            | SessionError::TooManyEnvironments(_) => StatusCode::TOO_MANY_REQUESTS,
            SessionError::EditQuota { .. } => StatusCode::INSUFFICIENT_STORAGE,
            SessionError::LowMemory { .. } | SessionError::HostFull(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            SessionError::Sandbox(_) => {
                return ApiError::internal("the session's sandbox could not be started", e);
            }
            SessionError::Store(_) => {
                return ApiError::internal("the server's database failed", e);
            }
            SessionError::Environment(_) => {
                return ApiError::internal("the environment could not be prepared", e);
            }
            SessionError::EditsLost { session, .. } => {
                let reason =
                    format!("session '{session}' ended, but what it changed could not be saved");
                return ApiError::internal(reason, e);
            }
            // Its message names no host path; the reason is in the log with the session's ID.
            SessionError::Teardown(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<burrow_store::Error> for ApiError {
    fn from(e: burrow_store::Error) -> ApiError {
        ApiError::internal("the server's database failed", e)
    }
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;

    async fn answer(e: ApiError) -> (StatusCode, String) {
        let resp = e.into_response();
        let status = resp.status();
        let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], status.as_u16());
        (status, body["message"].as_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn a_500_names_an_error_id_but_no_host_path_or_log() {
        let leaky = "sandbox did not start: /var/lib/burrow/run/abc123/init.log ends with: \
                     mount /srv/secret/rootfs: permission denied";
        let (status, message) = answer(SessionError::Sandbox(leaky.into()).into()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!message.contains('/'), "{message}");
        assert!(!message.contains("init.log"), "{message}");
        let id = message
            .strip_prefix("the session's sandbox could not be started; error id ")
            .and_then(|rest| rest.strip_suffix(" in the server log"))
            .unwrap_or_else(|| panic!("{message}"));
        assert!(
            id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{message}"
        );
        // Each failure gets its own id, so the operator finds the right log line.
        let (_, again) = answer(SessionError::Sandbox(leaky.into()).into()).await;
        assert_ne!(message, again);
    }

    #[tokio::test]
    async fn client_errors_keep_their_message() {
        let e = SessionError::NotFound("abc".into());
        let (status, message) = answer(e.into()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(message, "session 'abc' was not found");
    }
}
