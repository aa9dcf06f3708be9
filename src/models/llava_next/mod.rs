//! LLaVA-NeXT (Liu et al., 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge"), as
//! the llava-hf `llava-v1.6-*-hf` checkpoints ship it, following transformers'
//! `LlavaNextForConditionalGeneration`: a CLIP ViT-L/14-336 (second-to-last layer, class token
//! dropped) over the anyres tiles of `image_grid_pinpoints` and the whole image, a two-layer GELU
//! projector, features packed as [base tile; unpadded tile grid with an `image_newline` per row]
//! (LLaVA-OneVision's packing without its tile budget: the shared code is
//! [`LlavaOnevision::load_with`]), into a Mistral, Vicuna (Llama) or Llama 3 decoder.

use serde_json::json;

use crate::models::llava_onevision::{AnyResSpec, LlavaOnevision};
use crate::models::weight_names::Rename;
use crate::models::Family;

pub const FAMILY: Family = Family {
    name: "llava_next",
    architectures: &["LlavaNextForConditionalGeneration", "llava_next"],
    load: |snapshot, name, device, dtype| {
        Ok(Box::new(LlavaOnevision::load_with(
            snapshot,
            name,
            device,
            dtype,
            AnyResSpec {
                family: "llava_next",
                weight_names: WEIGHT_NAMES,
                // LlavaNextConfig's default vision tower (CLIP ViT-L/14-336).
                vision_defaults: json!({"model_type": "clip_vision_model", "intermediate_size": 4096,
                    "hidden_size": 1024, "patch_size": 14, "image_size": 336,
                    "num_hidden_layers": 24, "num_attention_heads": 16}),
                feature_defaults: [
                    ("vision_feature_layer", json!(-2)),
                    ("vision_feature_select_strategy", json!("default")),
                ],
                text_model_type: "llama",
                // LlavaNextConfig's default image_grid_pinpoints.
                default_pinpoints: vec![
                    (336, 672),
                    (672, 336),
                    (672, 672),
                    (1008, 336),
                    (336, 1008),
                ],
                budget: |_| Ok(None),
            },
        )?))
    },
};

/// transformers' renamings for `LlavaNextForConditionalGeneration` (5.25's `conversion_mapping.py`:
/// "llava_next", then the "LlavaModel" and CLIPVisionModel scopes), as for LLaVA-OneVision.
pub const WEIGHT_NAMES: &[Rename] = crate::models::llava_onevision::WEIGHT_NAMES;
