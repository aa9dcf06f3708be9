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
        .and_then(bearer_token);
    match key {
        Some(k) if state.api_keys.iter().any(|known| known == k) => next.run(req).await,
        _ => {
            let mut response = ApiError::unauthorized().into_response();
            // RFC 6750 § 3: a 401 names the scheme it wants.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"logit-lens\""),
            );
            response
        }
    }
}

/// The token of `Bearer <token>`; the scheme's name is case-insensitive (RFC 7235 § 2.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_trimmed() {
        assert_eq!(bearer_token("Bearer k3"), Some("k3"));
        assert_eq!(bearer_token("bearer k3"), Some("k3"));
        assert_eq!(bearer_token("BEARER   k3 "), Some("k3"));
        assert_eq!(bearer_token("Basic k3"), None);
        assert_eq!(bearer_token("Bearerk3"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("k3"), None);
    }
}
