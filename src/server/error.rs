//! Errors → HTTP status codes, in one place. Every error body is
//! `{"error": {"code": ..., "message": ...}}` (../shared/docs/API.md).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::schema::{ErrorBody, ErrorDetail};
use crate::engine::JobError;
use crate::Error;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    /// A body that stopped arriving for the read timeout (`--read-timeout-ms`), or `other`.
    pub fn unless_timed_out(e: &(dyn std::error::Error + 'static), other: Self) -> Self {
        let mut source = Some(e);
        while let Some(err) = source {
            if err.is::<tower_http::timeout::TimeoutError>() {
                return Self::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body stopped arriving (no byte for the server's read timeout, \
                     --read-timeout-ms); send it again",
                );
            }
            source = err.source();
        }
        other
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is over the limit of {limit} bytes; send a smaller image"),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this service needs an API key: send `Authorization: Bearer <key>`",
        )
    }

    pub fn queue_full(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("the queue is full; retry in {retry_after} s"),
        );
        e.retry_after = Some(retry_after);
        e
    }

    /// 429 for a request refused by another capacity limit than the queue's length, with the same
    /// code, so that clients retry it the same way.
    pub fn busy(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message);
        e.retry_after = Some(retry_after);
        e
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
        e.retry_after = Some(1);
        e
    }
}

/// The one mapping from the crate's error codes to statuses. Bad input is 4xx; only genuine
/// failures of the computation (tensor errors, internal bugs, panics) are 500.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidImage(_) | Error::UnsupportedImage(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Error::ImageNotAccepted(_) | Error::Unprocessable(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::InvalidOption(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Snapshot { .. }
            | Error::UnsupportedArchitecture(_)
            | Error::Tensor(_)
            | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Lens(e) => e.into(),
            JobError::DeadlineExceeded => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                "the request waited in the queue past its deadline; retry later or when the service is less busy",
            ),
            JobError::Panicked(m) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the computation failed unexpectedly ({m}); this is a bug, please report it with the request"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
