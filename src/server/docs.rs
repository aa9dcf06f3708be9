//! Interactive docs at /docs: Swagger UI, vendored (src/server/assets, swagger-ui-dist 5.35.0),
//! so that they work with no network.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

const BUNDLE: &[u8] = include_bytes!("assets/swagger-ui-bundle.js");
const CSS: &[u8] = include_bytes!("assets/swagger-ui.css");

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>logit-lens API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });
  </script>
</body>
</html>
"##;

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

pub async fn bundle() -> Response {
    asset("application/javascript", BUNDLE)
}

pub async fn css() -> Response {
    asset("text/css", CSS)
}

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::spec_json(),
    )
        .into_response()
}
