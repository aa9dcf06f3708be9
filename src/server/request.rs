//! Reads POST /lens bodies, multipart or JSON, into one [`LensInput`]. Only parsing happens
//! here: the image stays bytes, limits and decoding come next.

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartError};
use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::schema::LensJsonRequest;
use crate::api::{Layers, LensOptions, Positions};
use crate::Error;

pub struct LensInput {
    pub model: Option<String>,
    pub prompt: String,
    pub image: Option<Bytes>,
    pub options: LensOptions,
}

const OPTION_FIELDS: &[&str] = &[
    "top_k",
    "positions",
    "layers",
    "targets",
    "target_ids",
    "summary",
    "chat_template",
    "exclude_special",
    "generate",
];

pub async fn from_multipart(mut form: Multipart, body_limit: usize) -> Result<LensInput, ApiError> {
    let mut model = None;
    let mut prompt = None;
    let mut image = None;
    let mut options = Map::new();
    let mut fields = Map::new();
    let mut seen = std::collections::HashSet::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| multipart_error(e, body_limit))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let no_file_chosen = field.file_name().is_none_or(str::is_empty);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| multipart_error(e, body_limit))?;
        if name == "image" {
            // A browser form with no file chosen sends an empty, unnamed part: no image.
            if bytes.is_empty() && no_file_chosen {
                continue;
            }
            if image.is_some() {
                return Err(ApiError::bad_request("send one `image` field, not several"));
            }
            image = Some(bytes);
            continue;
        }
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| ApiError::bad_request(format!("form field `{name}` is not UTF-8 text")))?;
        // A field sent twice is a mistake whichever of the two was meant (curl's `-F` repeated,
        // a form built in a loop): refused, as a second image is and as JSON refuses a key twice.
        if !seen.insert(name.clone()) {
            return Err(ApiError::bad_request(format!(
                "send one `{name}` field, not several"
            )));
        }
        match name.as_str() {
            "prompt" => prompt = Some(text),
            "model" => model = Some(text),
            "options" => {
                options = match serde_json::from_str(&text) {
                    Ok(Value::Object(m)) => m,
                    _ => {
                        return Err(Error::InvalidOption(format!(
                            "`options` must be a JSON object such as {{\"top_k\": 3}}, got {text:?}"
                        ))
                        .into())
                    }
                }
            }
            n if OPTION_FIELDS.contains(&n) => {
                fields.insert(name.clone(), option_field(&name, &text)?);
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                "unknown form field `{name}`; send image, prompt, model, options or an option ({})",
                OPTION_FIELDS.join(", ")
            )))
            }
        }
    }
    // A field sent on its own overrides the same field inside `options`.
    options.extend(fields);
    Ok(LensInput {
        model,
        prompt: prompt.ok_or_else(|| ApiError::bad_request("the form has no `prompt` field"))?,
        image,
        options: serde_json::from_value(Value::Object(options)).map_err(option_error)?,
    })
}

pub fn from_json(body: &[u8]) -> Result<LensInput, ApiError> {
    let req: LensJsonRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the JSON body is not a valid request: {e}")))?;
    let image = match req.image_base64 {
        Some(s) => Some(Bytes::from(decode_base64(&s)?)),
        None => None,
    };
    let options = match req.options {
        Some(raw) => serde_json::from_str(raw.get()).map_err(option_error)?,
        None => LensOptions::default(),
    };
    Ok(LensInput {
        model: req.model,
        prompt: req.prompt,
        image,
        options,
    })
}

fn decode_base64(s: &str) -> Result<Vec<u8>, ApiError> {
    // Accept data URLs (`data:image/png;base64,...`), missing padding, line breaks (MIME's, as
    // Python's `base64.encodebytes` writes) and the URL-safe alphabet (`-`, `_`).
    let s = s.split_once(";base64,").map_or(s, |(_, b)| b);
    let s: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = if s.contains(['-', '_']) {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
    } else {
        base64::engine::general_purpose::STANDARD_NO_PAD
    };
    engine
        .decode(s.trim_end_matches('='))
        .map_err(|e| ApiError::bad_request(format!("`image_base64` is not valid base64: {e}")))
}

fn multipart_error(e: MultipartError, body_limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::body_too_large(body_limit)
    } else {
        let other = ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()));
        ApiError::unless_timed_out(&e, other)
    }
}

/// An option serde refused, said without Rust's type names (`expected usize`), and with the
/// fields listed unless serde's message already lists them (an unknown field).
fn option_error(e: serde_json::Error) -> ApiError {
    let said = e
        .to_string()
        .replace("expected usize", "expected a non-negative integer")
        .replace(
            "expected u32",
            "expected a non-negative integer (a token id)",
        )
        .replace("expected i64", "expected an integer")
        .replace(
            "expected struct LensOptions",
            "expected a JSON object of options",
        );
    let said = match said.find(" at line ") {
        Some(i) => &said[..i],
        None => &said,
    };
    let fields = if said.contains("expected one of") {
        String::new()
    } else {
        format!("; the fields are {}", OPTION_FIELDS.join(", "))
    };
    Error::InvalidOption(format!("bad options: {said}{fields}")).into()
}

/// One option sent as its own form field: the command-line forms (`0,-1`, ` red,Red`, `true`)
/// or JSON.
fn option_field(name: &str, text: &str) -> Result<Value, ApiError> {
    let bad = |what: &str| -> ApiError {
        Error::InvalidOption(format!("form field `{name}`: {what}, got {text:?}")).into()
    };
    let json = || serde_json::from_str::<Value>(text).ok();
    Ok(match name {
        "top_k" => Value::from(
            text.trim()
                .parse::<u64>()
                .map_err(|_| bad("expected an integer between 1 and 100"))?,
        ),
        "generate" => Value::from(
            text.trim()
                .parse::<u64>()
                .map_err(|_| bad("expected an integer between 0 and 64"))?,
        ),
        "positions" => match json() {
            Some(v @ Value::Array(_)) => v,
            _ => serde_json::to_value(Positions::parse(text.trim())?)
                .map_err(|_| bad("bad positions"))?,
        },
        "layers" => match json() {
            Some(v @ Value::Array(_)) => v,
            _ => {
                serde_json::to_value(Layers::parse(text.trim())?).map_err(|_| bad("bad layers"))?
            }
        },
        "targets" => match json() {
            Some(v @ Value::Array(_)) => v,
            _ => Value::from(text.split(',').collect::<Vec<_>>()),
        },
        "target_ids" => match json() {
            Some(v @ Value::Array(_)) => v,
            _ => Value::from(
                text.split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| bad("expected comma-separated token ids"))?,
            ),
        },
        _ => match text.trim() {
            "true" | "1" | "on" => Value::Bool(true),
            "false" | "0" | "off" => Value::Bool(false),
            _ => return Err(bad("expected true or false")),
        },
    })
}
