//! Qwen2.5-VL (Bai et al., 2025, "Qwen2.5-VL Technical Report"), following transformers'
//! `Qwen2_5_VLForConditionalGeneration`: Qwen2-VL's processor, prompt, M-RoPE Qwen2 decoder and
//! read-out (shared through [`QwenVl::load_with`]) around its own vision tower (window attention,
//! RMSNorm, SwiGLU: [`vision`]). For an image the M-RoPE positions are Qwen2-VL's (the temporal
//! index is 0; `tokens_per_second` only spaces video frames).

pub mod vision;

use crate::models::qwen2_vl::{QwenVl, QwenVlSpec};
use crate::models::weight_names::Rename;
use crate::models::Family;

pub const FAMILY: Family = Family {
    name: "qwen2_5_vl",
    architectures: &["Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"],
    load: |snapshot, name, device, dtype| {
        Ok(Box::new(QwenVl::load_with(
            snapshot, name, device, dtype, &SPEC,
        )?))
    },
};

/// Qwen2-VL's config reading, Qwen2.5-VL's tower.
const SPEC: QwenVlSpec = QwenVlSpec {
    family: "qwen2_5_vl",
    weight_names: WEIGHT_NAMES,
    config: crate::models::qwen2_vl::config::Config::from_json,
    vision: |w, v| {
        let cfg = vision::VisionConfig::from_json(v)?;
        Ok(Box::new(vision::VisionTower::load(w, &cfg)?))
    },
};

/// transformers' renamings for `Qwen2_5_VLForConditionalGeneration` (5.25's `conversion_mapping.py`
/// gives it Qwen2-VL's): the hub's `visual.*` and `model.*` to `model.visual.*` and
/// `model.language_model.*`.
pub const WEIGHT_NAMES: &[Rename] = crate::models::qwen2_vl::WEIGHT_NAMES;
