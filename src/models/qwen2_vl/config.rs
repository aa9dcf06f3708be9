//! Qwen2-VL configuration, read from either layout: the hub's flat `config.json` (text fields at
//! the top level, `rope_scaling` with `mrope_section`) or transformers 5's nested `text_config` /
//! `vision_config` with `rope_parameters`. A field the file leaves out takes the default of
//! transformers' config class (`Qwen2VLTextConfig`, `Qwen2VLVisionConfig`, `Qwen2VLConfig`).

use serde_json::Value;

use crate::error::Result;
use crate::models::decoder::DecoderConfig;
use crate::models::snapshot::{field, Snapshot};

#[derive(Clone, Debug)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub hidden_size: usize,
    pub hidden_act: String,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
}

impl VisionConfig {
    /// `vision_config` of config.json (either layout), with `Qwen2VLVisionConfig`'s defaults.
    pub fn from_json(v: &Value) -> Result<Self> {
        Ok(VisionConfig {
            depth: or(field(v, "depth")?, 32),
            embed_dim: or(field(v, "embed_dim")?, 1280),
            hidden_size: or(field(v, "hidden_size")?, 3584),
            hidden_act: or(field(v, "hidden_act")?, "quick_gelu".to_string()),
            mlp_ratio: or(field(v, "mlp_ratio")?, 4.0),
            num_heads: or(field(v, "num_heads")?, 16),
            in_channels: field(v, "in_channels")?
                .or(field(v, "in_chans")?)
                .unwrap_or(3),
            patch_size: or(field(v, "patch_size")?, 14),
            spatial_merge_size: or(field(v, "spatial_merge_size")?, 2),
            temporal_patch_size: or(field(v, "temporal_patch_size")?, 2),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    /// Width of one flattened patch row of `pixel_values`: C · T · P · P.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub text: DecoderConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

fn or<T>(v: Option<T>, default: T) -> T {
    v.unwrap_or(default)
}

impl Config {
    pub fn from_snapshot(s: &Snapshot) -> Result<Self> {
        Self::from_json(&s.config).map_err(|e| s.err(format!("config.json: {e}")))
    }

    pub fn from_json(root: &Value) -> Result<Self> {
        // Flat hub configs keep the text fields at the top level.
        let t = root
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(root);
        let rope: Value = field::<Value>(t, "rope_parameters")?
            .or(field::<Value>(t, "rope_scaling")?)
            .or(field::<Value>(root, "rope_scaling")?)
            .unwrap_or(Value::Null);
        let rope_theta = field::<f64>(&rope, "rope_theta")?
            .or(field(t, "rope_theta")?)
            .or(field(root, "rope_theta")?)
            .unwrap_or(1_000_000.0);
        let hidden_size = or(field(t, "hidden_size")?, 8192);
        let num_attention_heads: usize = or(field(t, "num_attention_heads")?, 64);
        let head_dim = hidden_size / num_attention_heads.max(1);
        let mrope_section: Vec<usize> = match field(&rope, "mrope_section")? {
            Some(s) => s,
            // No M-RoPE sections: plain 1-D RoPE, all slots on the temporal axis.
            None => vec![head_dim / 2, 0, 0],
        };
        let num_hidden_layers: usize = or(field(t, "num_hidden_layers")?, 80);
        // As Qwen2 (class default max_window_layers 80): the hub's configs have it off.
        let (sliding_window, default_layers) =
            crate::models::decoder::qwen_window(t, num_hidden_layers, 80)?;
        let sliding_layers = crate::models::decoder::sliding_layers(
            t,
            num_hidden_layers,
            sliding_window,
            default_layers,
        )?;
        // transformers 5 forwards a `true` found in text_config to the top level.
        let tie_word_embeddings = field::<bool>(root, "tie_word_embeddings")?.unwrap_or(false)
            || field::<bool>(t, "tie_word_embeddings")?.unwrap_or(false);
        let text = DecoderConfig {
            vocab_size: or(field(t, "vocab_size")?, 152064),
            hidden_size,
            intermediate_size: or(field(t, "intermediate_size")?, 29568),
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: field(t, "num_key_value_heads")?.unwrap_or(
                if t.get("num_key_value_heads").is_none() {
                    8
                } else {
                    num_attention_heads
                },
            ),
            hidden_act: or(field(t, "hidden_act")?, "silu".to_string()),
            rms_norm_eps: or(field(t, "rms_norm_eps")?, 1e-5),
            rope_theta,
            mrope_section,
            mrope_interleaved: false,
            head_dim,
            qkv_bias: true,
            tie_word_embeddings,
            qk_norm: false,
            rope_scaling: crate::models::decoder::RopeScaling::Default,
            sliding_window,
            sliding_layers,
            gemma: None,
        };
        if text.mrope_section.iter().sum::<usize>() != head_dim / 2 {
            return Err(crate::error::Error::Internal(format!(
                "mrope_section {:?} does not sum to head_dim/2 = {}",
                text.mrope_section,
                head_dim / 2
            )));
        }
        Ok(Config {
            text,
            tie_word_embeddings,
            image_token_id: or(field(root, "image_token_id")?, 151655),
            vision_start_token_id: or(field(root, "vision_start_token_id")?, 151652),
            vision_end_token_id: or(field(root, "vision_end_token_id")?, 151653),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flat_hub_config_and_nested_v5_config_read_alike() {
        let flat = json!({
            "architectures": ["Qwen2VLForConditionalGeneration"], "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                              "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        });
        let nested = json!({
            "tie_word_embeddings": true,
            "text_config": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
                              "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        });
        for c in [
            Config::from_json(&flat).unwrap(),
            Config::from_json(&nested).unwrap(),
        ] {
            assert_eq!(c.text.head_dim, 128);
            assert_eq!(c.text.mrope_section, vec![16, 24, 24]);
            assert_eq!(c.text.rope_theta, 1e6);
            assert_eq!(c.text.rms_norm_eps, 1e-6);
            assert!(c.tie_word_embeddings);
            let v = VisionConfig::from_json(&flat["vision_config"]).unwrap();
            assert_eq!(v.hidden_act, "quick_gelu", "class default when absent");
            assert_eq!(v.patch_dim(), 1176);
            let v = VisionConfig::from_json(&nested["vision_config"]).unwrap();
            assert_eq!(v.patch_dim(), 1176);
            assert_eq!(c.image_token_id, 151655, "class default when absent");
        }
    }

    /// The decoder's window as Qwen2VLTextConfig reads it: off unless `use_sliding_window`, then
    /// on the blocks from `max_window_layers` (class default 80) on; the hub's configs have it off.
    #[test]
    fn sliding_window_only_with_use_sliding_window() {
        let read = |extra: Value| {
            let mut t = json!({"num_hidden_layers": 4, "sliding_window": 32,
                               "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}});
            t.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let c = Config::from_json(&t).unwrap();
            (c.text.sliding_window, c.text.sliding_layers)
        };
        assert_eq!(read(json!({"max_window_layers": 2})), (None, None));
        assert_eq!(
            read(json!({"use_sliding_window": true, "max_window_layers": 2})),
            (Some(32), Some(vec![false, false, true, true]))
        );
        assert_eq!(
            read(json!({"use_sliding_window": true})),
            (Some(32), Some(vec![false; 4]))
        );
    }

    #[test]
    fn missing_fields_take_transformers_class_defaults() {
        let c = Config::from_json(
            &json!({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}),
        )
        .unwrap();
        assert_eq!(
            (
                c.text.vocab_size,
                c.text.hidden_size,
                c.text.num_hidden_layers
            ),
            (152064, 8192, 80)
        );
        assert_eq!(
            (c.text.num_attention_heads, c.text.num_key_value_heads),
            (64, 8)
        );
        assert_eq!(c.text.rms_norm_eps, 1e-5);
        assert!(!c.tie_word_embeddings);
        assert_eq!(
            VisionConfig::from_json(&Value::Null).unwrap().embed_dim,
            1280
        );
    }

    #[test]
    fn explicit_null_kv_heads_means_multi_head_attention() {
        let c = Config::from_json(
            &json!({"num_attention_heads": 4, "hidden_size": 64, "num_key_value_heads": null,
            "rope_scaling": {"mrope_section": [2, 3, 3]}}),
        )
        .unwrap();
        assert_eq!(c.text.num_key_value_heads, 4);
    }

    #[test]
    fn mrope_sections_must_cover_half_the_head() {
        let e = Config::from_json(&json!({"hidden_size": 64, "num_attention_heads": 4,
            "rope_scaling": {"mrope_section": [2, 2, 2]}}))
        .unwrap_err();
        assert!(e.to_string().contains("mrope_section"), "{e}");
    }
}
