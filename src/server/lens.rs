//! POST /lens: parse → limits and image decoding (on a blocking thread) → queue → answer.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::Limits;
use super::error::ApiError;
use super::request::{self, LensInput};
use super::AppState;
use crate::api::LensResponse;
use crate::engine::{LensRequest, ModelEntry, SubmitError};
use crate::preprocess::image::{decode, peek_dimensions, Rgb8};
use crate::Error;

/// Runs the logit lens on one image and prompt.
#[utoipa::path(
    post,
    path = "/lens",
    tag = "lens",
    request_body(
        description = "The image, the prompt and the options",
        content(
            (super::schema::LensForm = "multipart/form-data"),
            (super::schema::LensJsonRequest = "application/json"),
        )
    ),
    responses(
        (status = 200, description = "Every layer's distribution", body = LensResponse,
            headers(
                ("x-queue-time" = f64, description = "Milliseconds spent waiting in the queue"),
                ("x-inference-time" = f64, description = "Milliseconds of preprocessing, forward and lens on the worker"),
            )),
        (status = 400, description = "Malformed multipart or JSON, or a bad option value", body = super::schema::ErrorBody),
        (status = 401, description = "API keys are configured and the request has no valid one", body = super::schema::ErrorBody),
        (status = 404, description = "Unknown model", body = super::schema::ErrorBody),
        (status = 408, description = "The body stopped arriving: no byte for the server's read timeout", body = super::schema::ErrorBody),
        (status = 413, description = "Body, image dimensions or prompt length over the limits, or a response that would hold more than 4 000 000 entries (positions × layers × (top_k + targets))", body = super::schema::ErrorBody),
        (status = 415, description = "Not an image, an unsupported image format, or an unsupported content type", body = super::schema::ErrorBody),
        (status = 422, description = "Well-formed but impossible (position out of range, a list of positions longer than the input, image too elongated, an answer whose keys and values alone pass the server's --kv-cache-budget)", body = super::schema::ErrorBody),
        (status = 429, description = "Queue full, or the images being handled hold the pending-pixel budget; Retry-After says when to come back", body = super::schema::ErrorBody,
            headers(("retry-after" = u64, description = "Seconds"))),
        (status = 500, description = "A bug: the computation failed", body = super::schema::ErrorBody),
        (status = 503, description = "Models still loading, or shutting down", body = super::schema::ErrorBody),
        (status = 504, description = "The deadline passed before the request's turn came", body = super::schema::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn lens(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match answer(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn answer(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let models = state.ready_models()?;
    let input = read_body(state, req).await?;
    input.options.check()?;
    let index = pick_model(&models, input.model.as_deref())?;
    input.options.check_for(models[index].info.num_layers)?;
    if state.engine.is_full() {
        // Refused now rather than after decoding its image.
        return Err(ApiError::queue_full(state.engine.retry_after_s()));
    }
    let limits = state.limits.clone();
    let models_for_check = models.clone();
    let LensInput {
        prompt,
        image,
        options,
        ..
    } = input;
    let pixels = state.pixels.clone();
    let retry_after = state.engine.retry_after_s();
    let checked = tokio::task::spawn_blocking(move || {
        check_prompt(&models_for_check[index], &prompt, limits.max_prompt_tokens)?;
        let image = image
            .map(|b| decode_checked(&b, &limits, &pixels, retry_after))
            .transpose()?;
        Ok::<_, ApiError>((prompt, image))
    })
    .await
    .map_err(|e| Error::Internal(format!("the decoding task failed: {e}")))?;
    let (prompt, image) = checked?;
    let (image, held) = match image {
        Some((image, held)) => (Some(image), Some(held)),
        None => (None, None),
    };
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;

    let deadline = Instant::now() + state.limits.queue_timeout;
    let request = LensRequest {
        prompt,
        image,
        options,
    };
    let rx = state
        .engine
        .submit(index, request, deadline, held)
        .map_err(|e| match e {
            SubmitError::QueueFull => ApiError::queue_full(state.engine.retry_after_s()),
            SubmitError::Closed => ApiError::not_ready("the service is shutting down"),
        })?;
    let mut response: LensResponse = rx
        .await
        .map_err(|_| ApiError::not_ready("the service is shutting down"))??;
    let queue_ms = response.timing_ms.queue.unwrap_or(0.0);
    let inference_ms = response.timing_ms.total;
    response.timing_ms.preprocess += decode_ms;
    response.timing_ms.total = t0.elapsed().as_secs_f64() * 1e3;
    state.metrics.timing(decode_ms, &response.timing_ms);

    let mut http = (StatusCode::OK, Json(response)).into_response();
    let headers = http.headers_mut();
    headers.insert("x-queue-time", ms_header(queue_ms));
    headers.insert("x-inference-time", ms_header(inference_ms));
    Ok(http)
}

fn ms_header(ms: f64) -> HeaderValue {
    HeaderValue::from_str(&format!("{ms:.3}")).unwrap_or(HeaderValue::from_static("0"))
}

async fn read_body(state: &AppState, req: Request) -> Result<LensInput, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    // The media type without its parameters (`; boundary=...`, `; charset=utf-8`).
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let limit = state.limits.max_body_bytes;
    if essence == "multipart/form-data" {
        let req = if content_type.contains("boundary=") {
            req
        } else {
            with_sniffed_boundary(req, limit).await?
        };
        let form = Multipart::from_request(req, &()).await.map_err(|e| {
            ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
        })?;
        request::from_multipart(form, limit).await
    } else if essence == "application/json" {
        let body = Bytes::from_request(req, &())
            .await
            .map_err(|e| body_error(e, limit))?;
        request::from_json(&body)
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {content_type:?} is not accepted; send multipart/form-data or application/json"
            ),
        ))
    }
}

/// A body that could not be read whole: over the limit (413), stalled (408), or cut off (400).
fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::body_too_large(limit)
    } else {
        let other = ApiError::bad_request(format!("could not read the body: {}", e.body_text()));
        ApiError::unless_timed_out(&e, other)
    }
}

/// `multipart/form-data` without its `boundary` parameter (some generated clients, e.g.
/// openapi-python-client's for a body with two content types, set the bare type and let the
/// HTTP library write the body): the body's first line, `--BOUNDARY`, names it.
async fn with_sniffed_boundary(req: Request, limit: usize) -> Result<Request, ApiError> {
    let (mut parts, body) = req.into_parts();
    // Read through the extractor so that the body limit (kept in the extensions) applies.
    let mut whole = Request::new(body);
    *whole.headers_mut() = parts.headers.clone();
    *whole.extensions_mut() = parts.extensions.clone();
    let bytes = Bytes::from_request(whole, &())
        .await
        .map_err(|e| body_error(e, limit))?;
    let first = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let boundary = std::str::from_utf8(first)
        .ok()
        .and_then(|l| l.trim_end().strip_prefix("--"))
        .filter(|b| !b.is_empty() && b.len() <= 70 && b.bytes().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "multipart/form-data without a boundary parameter, and the body does not start with \
                 one; send `Content-Type: multipart/form-data; boundary=...`",
            )
        })?;
    let value = HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
        .map_err(|_| ApiError::bad_request("the multipart boundary is not a valid header value"))?;
    parts.headers.insert(header::CONTENT_TYPE, value);
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// The index of the named model, or of the only one.
fn pick_model(models: &[ModelEntry], name: Option<&str>) -> Result<usize, ApiError> {
    let names = || {
        models
            .iter()
            .map(|m| m.info.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        None if models.len() == 1 => Ok(0),
        None => Err(ApiError::bad_request(format!(
            "several models are loaded; name one in `model`: {}",
            names()
        ))),
        Some(n) => models.iter().position(|m| m.info.name == n).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_model",
                format!("no model named {n:?} is loaded; loaded: {}", names()),
            )
        }),
    }
}

fn check_prompt(model: &ModelEntry, prompt: &str, max: usize) -> Result<(), Error> {
    let count = |text: &str| -> Result<usize, Error> {
        Ok(model
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::InvalidOption(format!("the prompt cannot be tokenized: {e}")))?
            .len())
    };
    // A prompt of megabytes would take seconds to tokenize only to be refused: its beginning
    // (8 bytes a token allowed, where text has ~4) says so first. Cutting can split the last word
    // into a few more tokens than the whole prompt has there, hence the margin; below it, the
    // whole prompt is counted.
    let prefix = max.saturating_mul(8).saturating_add(64);
    if prompt.len() > prefix {
        let mut cut = prefix;
        while !prompt.is_char_boundary(cut) {
            cut -= 1;
        }
        let m = count(&prompt[..cut])?;
        if m > max.saturating_add(16) {
            return Err(Error::TooLarge(format!(
                "the prompt has more than {max} tokens, the limit (its first {cut} bytes alone \
                 have {m}); shorten it"
            )));
        }
        // A sparse beginning (a run of spaces) says little: no token stands for more bytes
        // than its longest entry's text has, ×4 for what normalisation can join (NFC joins at
        // most 3 code points into one of no fewer bytes).
        let longest = model
            .tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        let most = max.saturating_mul(longest).saturating_mul(4);
        if prompt.len() > most {
            return Err(Error::TooLarge(format!(
                "the prompt is {} bytes: more than {max} tokens, the limit, can hold (none of this \
                 model's tokens stands for more than {longest} bytes); shorten it",
                prompt.len()
            )));
        }
    }
    let n = count(prompt)?;
    if n > max {
        return Err(Error::TooLarge(format!(
            "the prompt has {n} tokens, over the limit of {max}; shorten it"
        )));
    }
    Ok(())
}

/// Refuses an image over the pixel limit from its header, before the pixels are expanded, and
/// one the pending-pixel budget cannot take now (429); then decodes it. The permit travels with
/// the job and is released once the answer is sent.
fn decode_checked(
    bytes: &[u8],
    limits: &Limits,
    budget: &Arc<Semaphore>,
    retry_after: u64,
) -> Result<(Rgb8, OwnedSemaphorePermit), ApiError> {
    let (format, w, h) = peek_dimensions(bytes)?;
    let pixels = w as u64 * h as u64;
    let max_pixels = limits.max_image_pixels;
    if pixels > max_pixels {
        return Err(Error::TooLarge(format!(
            "the {format:?} image is {w}×{h} = {pixels} pixels, over the limit of {max_pixels}; downscale it"
        ))
        .into());
    }
    // An image alone always fits: it asks for at most the whole budget.
    let need = pixels
        .clamp(1, limits.max_pending_pixels.max(1))
        .min(u32::MAX as u64) as u32;
    let held = budget.clone().try_acquire_many_owned(need).map_err(|_| {
        ApiError::busy(
            format!(
                "the service holds as many image pixels as it may ({} pending); retry in {retry_after} s",
                limits.max_pending_pixels
            ),
            retry_after,
        )
    })?;
    Ok((decode(bytes)?, held))
}
