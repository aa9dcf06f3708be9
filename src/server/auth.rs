//! Optional API keys: `Authorization: Bearer <key>`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Lets the request through when no keys are configured or it carries one of them.
pub async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(req).await;
    }
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match key {
        Some(k) if state.api_keys.iter().any(|known| known == k) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}
