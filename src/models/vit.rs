//! The ViT encoders of the LLaVA families, as transformers' `CLIPVisionModel` and
//! `SiglipVisionModel` compute them: patch embedding (a convolution with kernel = stride, done as
//! one matmul over flattened patches), learned position embeddings, pre-LN encoder layers with
//! biased multi-head attention and a two-layer MLP. CLIP adds a class token and `pre_layrnorm`.
//! Neither `post_layernorm` is used: LLaVA reads hidden states of the encoder directly.

use candle_core::Tensor;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::layers::{attention, Activation, LayerNorm, Linear};
use crate::models::profile;
use crate::models::snapshot::{field, Prefixed};

#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// CLIP: class token, bias-free patch embedding, `pre_layrnorm`. SigLIP: none of these.
    pub clip: bool,
}

impl VitConfig {
    /// Reads a `clip_vision_model` or `siglip_vision_model` config; `defaults` is the JSON the
    /// parent config class starts from when the file has no vision_config at all.
    pub fn from_json(v: Option<&Value>, defaults: &Value) -> Result<Self> {
        let v = v.filter(|v| v.is_object()).unwrap_or(defaults);
        let model_type: String = field(v, "model_type")?
            .or(field(defaults, "model_type")?)
            .unwrap_or_default();
        let clip = match model_type.as_str() {
            "clip_vision_model" => true,
            "siglip_vision_model" => false,
            other => return Err(Error::Internal(format!("vision model type `{other}` is not supported (clip_vision_model and siglip_vision_model are)"))),
        };
        // CLIPVisionConfig / SiglipVisionConfig class defaults.
        let (hidden, inter, layers, heads, image, patch, act, eps) = if clip {
            (768, 3072, 12, 12, 224, 32, "quick_gelu", 1e-5)
        } else {
            (768, 3072, 12, 12, 224, 16, "gelu_pytorch_tanh", 1e-6)
        };
        Ok(VitConfig {
            hidden_size: field(v, "hidden_size")?.unwrap_or(hidden),
            intermediate_size: field(v, "intermediate_size")?.unwrap_or(inter),
            num_hidden_layers: field(v, "num_hidden_layers")?.unwrap_or(layers),
            num_attention_heads: field(v, "num_attention_heads")?.unwrap_or(heads),
            num_channels: field(v, "num_channels")?.unwrap_or(3),
            image_size: field(v, "image_size")?.unwrap_or(image),
            patch_size: field(v, "patch_size")?.unwrap_or(patch),
            hidden_act: field(v, "hidden_act")?.unwrap_or_else(|| act.into()),
            layer_norm_eps: field(v, "layer_norm_eps")?.unwrap_or(eps),
            clip,
        })
    }

    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens the encoder produces per image: patches, plus the class token for CLIP.
    pub fn num_positions(&self) -> usize {
        self.patches_per_side().pow(2) + self.clip as usize
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    ln2: LayerNorm,
    /// q, k and v projections stacked: one GEMM (rows `[q | k | v]`).
    qkv: Linear,
    out: Linear,
    fc1: Linear,
    fc2: Linear,
}

pub struct VisionTransformer {
    cfg: VitConfig,
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_layernorm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    act: Activation,
}

impl VisionTransformer {
    /// `w` is the `vision_model` prefix. Only the first `num_layers` encoder layers are loaded.
    pub fn load(w: &Prefixed, cfg: &VitConfig, num_layers: usize) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let emb = w.pp("embeddings");
        let patch = emb.pp("patch_embedding");
        let patch_weight = patch.get("weight", (d, c, p, p))?.reshape((d, c * p * p))?;
        let patch_bias = if cfg.clip {
            None
        } else {
            Some(patch.get("bias", d)?)
        };
        let class_embedding = if cfg.clip {
            Some(emb.get("class_embedding", d)?)
        } else {
            None
        };
        let position_embedding = emb
            .pp("position_embedding")
            .get("weight", (cfg.num_positions(), d))?;
        let eps = cfg.layer_norm_eps;
        let pre_layernorm = if cfg.clip {
            Some(LayerNorm::load(&w.pp("pre_layrnorm"), d, eps)?)
        } else {
            None
        };
        let layers = (0..num_layers)
            .map(|i| {
                let l = w.pp(format!("encoder.layers.{i}"));
                let a = l.pp("self_attn");
                Ok(EncoderLayer {
                    ln1: LayerNorm::load(&l.pp("layer_norm1"), d, eps)?,
                    ln2: LayerNorm::load(&l.pp("layer_norm2"), d, eps)?,
                    qkv: {
                        let subs = [("q_proj", d), ("k_proj", d), ("v_proj", d)];
                        a.linear(
                            a.stacked(&subs, "weight", &[d])?,
                            Some(a.stacked(&subs, "bias", &[])?),
                        )?
                    },
                    out: Linear::load(&a.pp("out_proj"), d, d, true)?,
                    fc1: Linear::load(&l.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
                    fc2: Linear::load(&l.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_weight,
            patch_bias,
            class_embedding,
            position_embedding,
            pre_layernorm,
            layers,
            act: Activation::from_name(&cfg.hidden_act)?,
        })
    }

    /// `pixels` `[n, C, S, S]` (S = image_size) → the hidden state after the loaded layers,
    /// `[n, tokens, hidden]` (transformers' `hidden_states[num_layers]`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, s, _) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let g = s / p;
        let d = self.cfg.hidden_size;
        // [n, C, g, p, g, p] → [n, g, g, C, p, p]: one row per patch in (c, ky, kx) order.
        // A stride-p convolution ignores the last `s mod p` rows and columns (384 px, 14-px
        // patches: 27 patches, 6 px unused).
        let patches = pixels
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .to_dtype(self.patch_weight.dtype())?
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * g * g, c * p * p))?;
        let x = match &self.patch_bias {
            Some(b) => crate::models::gemm::linear_bias(&patches, &self.patch_weight, b)?,
            None => crate::models::gemm::matmul(&patches, &self.patch_weight.t()?)?,
        };
        let mut x = x.reshape((n, g * g, d))?;
        if let Some(cls) = &self.class_embedding {
            let cls = cls.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
            x = Tensor::cat(&[cls, x], 1)?;
        }
        x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        if let Some(ln) = &self.pre_layernorm {
            x = ln.forward(&x)?;
        }
        let t = x.dim(1)?;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;
        let scale = (hd as f64).powf(-0.5);
        let dev = x.device().clone();
        for l in &self.layers {
            let h = profile::op("vision norm", &dev, || l.ln1.forward(&x))?;
            // [n, t, 3·d] → [3, n, heads, t, hd]
            let qkv = profile::op("vision qkv", &dev, || {
                Ok(l.qkv
                    .forward(&h)?
                    .reshape((n, t, 3, heads, hd))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?)
            })?;
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            // Every image (tile) of the batch in one call; attention slices it within its budget.
            let a = profile::op("vision attention", &dev, || {
                Ok(attention(&q, &k, &v, None, scale)?
                    .transpose(1, 2)?
                    .reshape((n, t, d))?)
            })?;
            x = profile::op("vision proj + residual", &dev, || {
                Ok((&x + l.out.forward(&a)?)?)
            })?;
            let h = profile::op("vision norm", &dev, || l.ln2.forward(&x))?;
            x = profile::op("vision mlp + residual", &dev, || {
                Ok((&x + l.fc2.forward(&self.act.forward(&l.fc1.forward(&h)?)?)?)?)
            })?;
        }
        Ok(x)
    }
}

/// How many encoder layers produce transformers' `hidden_states[feature_layer]` (entry 0 is the
/// embeddings, entry i the output of layer i; negative indices count from the end).
pub fn layers_for_feature(feature_layer: i64, num_layers: usize) -> Result<usize> {
    let n = num_layers as i64 + 1;
    let idx = if feature_layer < 0 {
        n + feature_layer
    } else {
        feature_layer
    };
    if !(0..n).contains(&idx) {
        return Err(Error::Internal(format!(
            "vision_feature_layer {feature_layer} is outside the {num_layers}-layer tower"
        )));
    }
    Ok(idx as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_takes_the_second_to_last_layer_output() {
        // hidden_states has 25 entries for a 24-layer CLIP; -2 is the output of layer index 22,
        // i.e. 23 layers run (candle-transformers' llava takes 24: MODELS.md §5).
        assert_eq!(layers_for_feature(-2, 24).unwrap(), 23);
        assert_eq!(layers_for_feature(-1, 26).unwrap(), 26);
        assert_eq!(layers_for_feature(0, 4).unwrap(), 0);
        assert!(layers_for_feature(-30, 24).is_err());
    }
}
