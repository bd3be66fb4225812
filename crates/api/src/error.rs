//! The one error shape of the REST API: `{"code": <http status>, "message": "..."}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use burrow_sessions::Error as SessionError;
use serde::Serialize;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
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
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), message = %self.message, "request failed");
        }
        let body = ErrorBody {
            code: self.status.as_u16(),
            message: self.message,
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
            SessionError::Sandbox(_)
            | SessionError::Store(_)
            | SessionError::Environment(_)
            | SessionError::EditsLost { .. }
            | SessionError::Teardown(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<burrow_store::Error> for ApiError {
    fn from(e: burrow_store::Error) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}
