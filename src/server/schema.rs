//! The service's own request and response types (the lens body itself is [`crate::api`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::LensOptions;

/// Every error: a stable code and a sentence a person can act on.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_image", "message": "the uploaded file is not a recognisable image; send PNG, JPEG, WebP, GIF, BMP or TIFF"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// e.g. `invalid_image`, `invalid_option`, `unknown_model`, `queue_full`.
    pub code: String,
    pub message: String,
}

/// POST /lens as `multipart/form-data`. Each field of `options` may also be sent as its own
/// form field (`top_k=3`, `positions=last` or `positions=0,-1`, `targets= red, blue`, ...).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LensForm {
    /// PNG, JPEG, WebP, GIF (first frame), BMP or TIFF. Leave out for a text-only prompt.
    #[schema(value_type = Option<String>, format = Binary)]
    pub image: Option<Vec<u8>>,
    /// The user's text.
    pub prompt: String,
    /// A name from GET /models; default: the only loaded model.
    pub model: Option<String>,
    /// A JSON object with any of the options, e.g. `{"top_k": 3, "positions": "all"}`.
    pub options: Option<String>,
    /// 1 to 100.
    #[schema(minimum = 1, maximum = 100)]
    pub top_k: Option<usize>,
    /// `last`, `all`, `text`, `image`, or comma-separated indices (negative from the end).
    pub positions: Option<String>,
    /// `all` or comma-separated layer numbers.
    pub layers: Option<String>,
    /// Comma-separated strings, or a JSON array of strings (at most 256 with `target_ids`).
    pub targets: Option<String>,
    /// Comma-separated token ids, or a JSON array (at most 256 with `targets`).
    pub target_ids: Option<String>,
    pub summary: Option<bool>,
    pub chat_template: Option<bool>,
    pub exclude_special: Option<bool>,
    /// Greedily generate up to this many tokens (0 to 64) and read them through the lens. The
    /// answer's keys and values (its prompt's and its tokens') share the server's
    /// `--kv-cache-budget` with the answers going on: past what is left it waits, past all of it 422.
    #[schema(maximum = 64)]
    pub generate: Option<usize>,
}

/// POST /lens as `application/json`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "Color of the main object:", "options": {"top_k": 3}}))]
pub struct LensJsonRequest {
    pub prompt: String,
    /// A name from GET /models; default: the only loaded model.
    #[serde(default)]
    pub model: Option<String>,
    /// The image file's bytes, base64: the standard or the URL-safe alphabet, padding optional,
    /// line breaks ignored; a data URL (`data:image/png;base64,...`) too.
    #[serde(default)]
    pub image_base64: Option<String>,
    // Read as the multipart form's `options` is (`crate::server::request`), so that a bad
    // option gets the same `invalid_option` answer either way.
    #[serde(default)]
    #[schema(value_type = Option<LensOptions>)]
    pub options: Option<Box<serde_json::value::RawValue>>,
}

/// A resident model.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelOut {
    pub name: String,
    /// `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `llava`, `llava_next`, `llava_onevision` or
    /// `causal_lm` (text only).
    pub family: String,
    pub architecture: String,
    /// Decoder blocks; the lens has `layers + 1` layers.
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab: usize,
    pub dtype: String,
    pub device: String,
    /// Parameters loaded from the checkpoint (tied embeddings counted once).
    pub parameters: u64,
    /// The bytes the weights hold where they live (`device`): their size in `dtype`, except on a CPU
    /// with AMX running an f32 model, where each linear whose weights the files store in bf16 (or
    /// f16) is held as its bf16 packing only (2 bytes a weight, or 4), and the lens keeps a packed
    /// copy of the unembedding beside it.
    pub weight_bytes: u64,
    /// Whether the model takes an image: false for text-only language models (`causal_lm`),
    /// which refuse one with 422.
    pub images: bool,
    /// The lens layers read after DeepStack added vision features to the image positions'
    /// residual stream (Qwen3-VL: layer i + 1 holds block i's output plus feature set i, the
    /// stream block i + 1 reads). Empty for the other families.
    #[serde(default)]
    pub deepstack_layers: Vec<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelOut>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `ok`, `ready`, `loading` or `shutting_down`.
    pub status: String,
}
