//! The web viewer at GET /: a static page (src/server/assets/viewer) that calls POST /lens from
//! the browser and draws the logit-lens grid and the per-layer curves. No build step, no CDN:
//! the files are compiled into the binary and work offline.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("assets/viewer/index.html");
const JS: &str = include_str!("assets/viewer/viewer.js");
const CSS: &str = include_str!("assets/viewer/viewer.css");

/// Only this origin's scripts, styles and API; images from the file the user picked (blob:).
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
                   frame-ancestors 'none'";

pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

pub async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
