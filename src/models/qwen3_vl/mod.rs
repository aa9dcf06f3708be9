//! Qwen3-VL (Qwen team, 2025, "Qwen3-VL Technical Report"), following transformers'
//! `Qwen3VLForConditionalGeneration`: Qwen2-VL's processor (patch 16, mean = std = 0.5 from the
//! snapshot), prompt, placeholder expansion and 3-D positions (shared through
//! [`QwenVl::load_with`]), a Qwen3 decoder (per-head q/k RMSNorm, explicit `head_dim`) whose
//! M-RoPE frequency slots are interleaved (t h w t h w …), and its own vision tower ([`vision`])
//! with DeepStack.
//!
//! **DeepStack and the lens.** The tower hands the decoder one feature set per
//! `deepstack_visual_indexes` entry; set i is added to the residual stream at the image positions
//! right after decoder block i. The lens reads layer i + 1 *after* that addition: it is the stream
//! block i + 1 reads (transformers' `output_hidden_states` records the block output before it).
//! `GET /models` lists those layers as `deepstack_layers`.

pub mod vision;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::decoder::DecoderConfig;
use crate::models::qwen2_vl::config::Config;
use crate::models::qwen2_vl::{QwenVl, QwenVlSpec};
use crate::models::snapshot::field;
use crate::models::weight_names::Rename;
use crate::models::Family;

pub const FAMILY: Family = Family {
    name: "qwen3_vl",
    architectures: &["Qwen3VLForConditionalGeneration", "qwen3_vl"],
    load: |snapshot, name, device, dtype| {
        Ok(Box::new(QwenVl::load_with(
            snapshot, name, device, dtype, &SPEC,
        )?))
    },
};

const SPEC: QwenVlSpec = QwenVlSpec {
    family: "qwen3_vl",
    weight_names: WEIGHT_NAMES,
    config: config_from_json,
    vision: |w, v| {
        let cfg = vision::VisionConfig::from_json(v)?;
        Ok(Box::new(vision::VisionTower::load(w, &cfg)?))
    },
};

/// transformers' renamings for `Qwen3VLForConditionalGeneration`: none (5.25's
/// `conversion_mapping.py` has no entry). The hub's checkpoints already use the in-memory names
/// (`model.visual.*`, `model.language_model.*`, `lm_head.weight`).
pub const WEIGHT_NAMES: &[Rename] = &[];

/// config.json as the hub ships it (transformers 4.57: `text_config.rope_scaling` with
/// `mrope_section`, `rope_theta` beside it) or as transformers 5 saves it (`rope_parameters`),
/// with `Qwen3VLTextConfig`'s and `Qwen3VLConfig`'s defaults.
pub fn config_from_json(root: &Value) -> Result<Config> {
    let t = root
        .get("text_config")
        .filter(|v| v.is_object())
        .ok_or_else(|| Error::Internal("no `text_config`".into()))?;
    let mut t = t.clone();
    if t.get("model_type").is_none() {
        t["model_type"] = "qwen3_vl_text".into();
    }
    let mut text = DecoderConfig::from_json(&t, "qwen3_vl_text")?;
    let rope: Value = field::<Value>(&t, "rope_parameters")?
        .or(field::<Value>(&t, "rope_scaling")?)
        .unwrap_or(Value::Null);
    // Qwen3VLTextRotaryEmbedding always interleaves (`mrope_interleaved` is not read).
    text.mrope_section = field(&rope, "mrope_section")?.unwrap_or_else(|| vec![24, 20, 20]);
    text.mrope_interleaved = true;
    if text.mrope_section.len() != 3 {
        return Err(Error::Internal(format!(
            "mrope_section {:?}: three entries (t, h, w) expected",
            text.mrope_section
        )));
    }
    // transformers 5 forwards a `true` found in text_config to the top level.
    let tie_word_embeddings =
        field::<bool>(root, "tie_word_embeddings")?.unwrap_or(false) || text.tie_word_embeddings;
    let id = |k: &str, d: u32| -> Result<u32> { Ok(field(root, k)?.unwrap_or(d)) };
    Ok(Config {
        text,
        tie_word_embeddings,
        image_token_id: id("image_token_id", 151655)?,
        vision_start_token_id: id("vision_start_token_id", 151652)?,
        vision_end_token_id: id("vision_end_token_id", 151653)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The hub's Qwen3-VL-2B-Instruct text config and transformers 5's spelling of it read alike.
    #[test]
    fn hub_and_v5_configs_read_alike() {
        let text = json!({"head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144,
            "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "vocab_size": 151936});
        let mut hub = text.clone();
        hub["rope_scaling"] = json!({"mrope_interleaved": true, "mrope_section": [24, 20, 20], "rope_type": "default"});
        hub["rope_theta"] = json!(5000000);
        let mut v5 = text;
        v5["rope_parameters"] = json!({"mrope_interleaved": true, "mrope_section": [24, 20, 20],
            "rope_type": "default", "rope_theta": 5000000});
        let a = config_from_json(&json!({"text_config": hub, "image_token_id": 151655})).unwrap();
        let b = config_from_json(&json!({"text_config": v5, "tie_word_embeddings": true})).unwrap();
        assert_eq!(a.text, b.text);
        assert!(a.tie_word_embeddings && b.tie_word_embeddings);
        let c = &a.text;
        assert!(c.qk_norm && !c.qkv_bias && c.mrope_interleaved);
        assert_eq!(
            (c.head_dim, c.rope_theta, c.num_key_value_heads),
            (128, 5e6, 8)
        );
        // 64 slots: h at 1, 4, …, 58; w at 2, 5, …, 59; t elsewhere.
        let axes = c.rope_axes();
        assert_eq!(axes.len(), 64);
        assert_eq!(&axes[..7], &[0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(axes.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(axes.iter().filter(|&&a| a == 2).count(), 20);
        assert_eq!(&axes[58..], &[1, 2, 0, 0, 0, 0]);
    }

    #[test]
    fn a_config_without_text_config_is_refused() {
        let e = config_from_json(&json!({"hidden_size": 64})).unwrap_err();
        assert!(e.to_string().contains("text_config"), "{e}");
    }
}
