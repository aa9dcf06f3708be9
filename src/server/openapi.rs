//! The OpenAPI document, generated from the handlers and types by utoipa. openapi/openapi.json
//! is this, committed; `logit-lens openapi > openapi/openapi.json` updates it.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{lens, routes, schema};
use crate::api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "logit-lens",
        description = "The logit lens for vision-language models: every layer's next-token distribution. \
                       The contract: ../shared/docs/API.md.",
        license(name = "Apache-2.0")
    ),
    paths(lens::lens, routes::models, routes::health, routes::ready, routes::metrics),
    components(schemas(
        api::LensOptions, api::Positions, api::Layers, api::LensResponse, api::InputInfo,
        api::TokenInfo, api::LayerOut, api::PositionOut, api::TopToken, api::TargetOut, api::Timing,
        schema::ErrorBody, schema::ErrorDetail, schema::LensForm, schema::LensJsonRequest,
        schema::ModelOut, schema::ModelList, schema::Status,
    )),
    modifiers(&BearerAuth),
    tags((name = "lens"), (name = "service"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as pretty JSON with a trailing newline, exactly as committed.
pub fn spec_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
