//! The small routes: models, health, readiness, metrics, 404s.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::schema::{ErrorBody, ModelList, ModelOut, Status};
use super::AppState;
use crate::engine::LoadState;

/// The resident models.
#[utoipa::path(get, path = "/models", tag = "service",
    responses(
        (status = 200, body = ModelList),
        (status = 401, body = ErrorBody),
        (status = 503, description = "Models still loading", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let models = state.ready_models()?;
    Ok(Json(ModelList {
        models: models
            .iter()
            .map(|m| ModelOut {
                name: m.info.name.clone(),
                family: m.info.family.to_string(),
                architecture: m.info.architecture.clone(),
                layers: m.info.num_layers,
                hidden_size: m.info.hidden_size,
                vocab: m.info.vocab_size,
                dtype: m.info.dtype.clone(),
                device: m.info.device.clone(),
                parameters: m.info.parameters,
                weight_bytes: m.info.weight_bytes,
                images: m.info.images,
                deepstack_layers: m.info.deepstack_layers.clone(),
            })
            .collect(),
    }))
}

/// The process is alive.
#[utoipa::path(get, path = "/health", tag = "service", responses((status = 200, body = Status)))]
pub async fn health() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
    })
}

/// Every model is loaded and the worker is running.
#[utoipa::path(get, path = "/ready", tag = "service",
    responses((status = 200, body = Status), (status = 503, body = Status))
)]
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Status>) {
    let (code, status) = if state.shutting_down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else {
        match state.engine.load_state() {
            LoadState::Ready(_) => (StatusCode::OK, "ready"),
            LoadState::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
            LoadState::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
        }
    };
    (
        code,
        Json(Status {
            status: status.into(),
        }),
    )
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses(
        (status = 200, content_type = "text/plain; version=0.0.4", body = String),
        (status = 401, body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(
            state.engine.queue_depth(),
            state.pending_pixels(),
            state.engine.dropped(),
            state.engine.answers(),
        ),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /docs for the routes",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /docs",
    )
}
