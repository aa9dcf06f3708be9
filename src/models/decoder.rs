//! The decoder-only language model shared by the families: Llama (LLaVA-1.5, Llama 3), Qwen2
//! (Qwen2-VL, LLaVA-OneVision, Qwen2.5), Qwen3 (per-head q/k RMSNorm), Mistral, and Gemma 2 / 3
//! ([`Gemma`]: scaled embeddings, `1 + w` norms, sandwich norms, soft-capping, local RoPE).
//! Pre-norm blocks, grouped-query attention with rotate-half RoPE (plain, linear or Llama 3
//! frequency scaling), gated MLP, RMSNorm. Positions are 3-D `(t, h, w)` so that Qwen2-VL's M-RoPE is the general case; plain
//! RoPE is M-RoPE with every frequency on the first axis and `t = h = w`.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::layers::{
    attention_capped, causal_attention, causal_mask, embed, inv_freq, rope, Activation, Linear,
    RmsNorm, ATTENTION_SCORES_BUDGET,
};
use crate::models::profile;
use crate::models::snapshot::{field, Prefixed};
use crate::models::LayerObserver;

#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Frequency slots per position axis (t, h, w); sums to head_dim / 2.
    pub mrope_section: Vec<usize>,
    /// How the slots are laid out: in three runs (t…, h…, w…: Qwen2-VL) or interleaved
    /// (t h w t h w …, the rest t: Qwen3-VL's `mrope_interleaved`).
    pub mrope_interleaved: bool,
    /// Biases on q/k/v (Qwen2: yes; Llama: `attention_bias`).
    pub qkv_bias: bool,
    pub tie_word_embeddings: bool,
    /// Qwen3: RMSNorm over each head's q and k (weights `[head_dim]`) before RoPE.
    pub qk_norm: bool,
    /// RoPE frequency scaling (`rope_parameters.rope_type`).
    pub rope_scaling: RopeScaling,
    /// Mistral's sliding window (every layer), Gemma's or Qwen2/3's with `use_sliding_window`
    /// (their sliding layers): a position attends to at most this many keys, itself included
    /// (transformers: `q − kv < window`).
    pub sliding_window: Option<usize>,
    /// Per block, whether it is a sliding layer (`layer_types`, or the class's default: Gemma's
    /// pattern, Qwen's blocks from `max_window_layers` on); none: every block (Mistral).
    pub sliding_layers: Option<Vec<bool>>,
    /// Gemma 2 / 3's differences from the Llama block.
    pub gemma: Option<Gemma>,
}

/// What Gemma 2 and Gemma 3 do differently (transformers' `Gemma2Model`, `Gemma3TextModel`):
/// token embeddings scaled by `sqrt(hidden_size)`; every RMSNorm scales by `1 + weight` (loaded as
/// such); sandwich norms (`post_attention_layernorm` on the attention output,
/// `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the MLP); attention scaled by
/// `query_pre_attn_scalar^-½`; optional soft-capping of attention scores and of the logits (which
/// the lens applies too); Gemma 3's sliding layers rotate with their own RoPE.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma {
    pub embed_scale: f64,
    pub query_pre_attn_scalar: f64,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Gemma 3: the sliding layers' RoPE (`rope_parameters.sliding_attention`): theta and scaling.
    pub local_rope: Option<(f64, RopeScaling)>,
}

/// The RoPE frequency variants transformers' `ROPE_INIT_FUNCTIONS` has that keep the attention
/// scale at 1: `default`, `linear` and `llama3` (Llama 3.1 / 3.2).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// From `rope_parameters` (transformers 5) or `rope_scaling` (the hub's older configs).
    pub fn from_json(rope: &Value) -> Result<Self> {
        let rope_type: Option<String> = field(rope, "rope_type")?.or(field(rope, "type")?);
        let need = |k: &str| -> Result<f64> {
            field(rope, k)?
                .ok_or_else(|| Error::Internal(format!("rope scaling `{rope_type:?}` needs `{k}`")))
        };
        Ok(match rope_type.as_deref() {
            None | Some("default") | Some("mrope") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: need("factor")?,
            },
            Some("llama3") => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            },
            Some(rt) => {
                return Err(Error::Internal(format!(
                    "rope type `{rt}` is not implemented (default, linear and llama3 are)"
                )))
            }
        })
    }

    /// transformers' inverse frequencies for this variant (`_compute_*_parameters`, in f32).
    pub fn inv_freq(&self, base: f64, dim: usize) -> Vec<f32> {
        let f = inv_freq(base, dim);
        match *self {
            RopeScaling::Default => f,
            RopeScaling::Linear { factor } => f.into_iter().map(|x| x / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                f.into_iter()
                    .map(|x| {
                        let wavelen = 2.0 * std::f32::consts::PI / x;
                        let scaled = if wavelen > low_wavelen { x / factor } else { x };
                        let smooth = (old / wavelen - low) / (high - low);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            smoothed
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

impl DecoderConfig {
    /// Reads a Llama, Mistral, Qwen2 or Qwen3 text config (`model_type` picks the class defaults
    /// for fields the file leaves out, as transformers' config classes would).
    pub fn from_json(t: &Value, default_model_type: &str) -> Result<Self> {
        let model_type: String =
            field(t, "model_type")?.unwrap_or_else(|| default_model_type.to_string());
        // transformers' class defaults: (vocab, intermediate, kv heads when absent, head_dim)
        struct Defaults {
            vocab: usize,
            intermediate: usize,
            kv: Option<usize>,
            head_dim: Option<usize>,
        }
        let d = match model_type.as_str() {
            "llama" => Defaults {
                vocab: 32000,
                intermediate: 11008,
                kv: None,
                head_dim: None,
            },
            "mistral" => Defaults {
                vocab: 32000,
                intermediate: 14336,
                kv: Some(8),
                head_dim: None,
            },
            "qwen2" => Defaults {
                vocab: 151936,
                intermediate: 22016,
                kv: Some(32),
                head_dim: None,
            },
            "gemma2" => Defaults {
                vocab: 256000,
                intermediate: 9216,
                kv: Some(4),
                head_dim: Some(256),
            },
            "gemma3_text" => Defaults {
                vocab: 262208,
                intermediate: 9216,
                kv: Some(4),
                head_dim: Some(256),
            },
            // Qwen3-VL's decoder is Qwen3's (its M-RoPE is set by the family).
            "qwen3" | "qwen3_vl_text" => Defaults {
                vocab: 151936,
                intermediate: 22016,
                kv: Some(32),
                head_dim: Some(128),
            },
            other => {
                return Err(Error::Internal(format!(
                "text model type `{other}` is not supported (llama, mistral, qwen2, qwen3, qwen3_vl_text, gemma2 and gemma3_text are)"
            )))
            }
        };
        let (qwen2, qwen3) = (
            model_type == "qwen2",
            model_type == "qwen3" || model_type == "qwen3_vl_text",
        );
        let (gemma2, gemma3) = (model_type == "gemma2", model_type == "gemma3_text");
        let gemma_like = gemma2 || gemma3;
        let hidden_size = field(t, "hidden_size")?.unwrap_or(if gemma_like { 2304 } else { 4096 });
        let num_attention_heads =
            field(t, "num_attention_heads")?.unwrap_or(if gemma_like { 8 } else { 32 });
        let kv = match (t.get("num_key_value_heads"), d.kv) {
            (None, Some(kv)) => kv,
            _ => field(t, "num_key_value_heads")?.unwrap_or(num_attention_heads),
        };
        let head_dim = field(t, "head_dim")?
            .or(d.head_dim)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let mut rope: Value = field::<Value>(t, "rope_parameters")?
            .or(field::<Value>(t, "rope_scaling")?)
            .unwrap_or(Value::Null);
        // Gemma 3 (transformers 5): one entry per layer type.
        let local_rope_params = rope.get("sliding_attention").cloned();
        if let Some(full) = rope.get("full_attention").cloned() {
            rope = full;
        }
        let rope_scaling = RopeScaling::from_json(&rope)?;
        if field::<bool>(t, "mlp_bias")?.unwrap_or(false) {
            return Err(Error::Internal(
                "MLP biases (`mlp_bias`) are not implemented".into(),
            ));
        }
        let num_hidden_layers: usize =
            field(t, "num_hidden_layers")?.unwrap_or(if gemma_like { 26 } else { 32 });
        // Qwen2/3 use their window only with `use_sliding_window`, on the blocks from
        // `max_window_layers` on; Mistral whenever it is set, on every block; Gemma on its sliding
        // layers (every `sliding_window_pattern`-th block global). transformers 5 writes the
        // blocks' kinds out as `layer_types`, which then decide.
        let (sliding_window, default_layers) = if gemma_like {
            let pattern: usize =
                field(t, "sliding_window_pattern")?.unwrap_or(if gemma3 { 6 } else { 2 });
            let layers = (0..num_hidden_layers)
                .map(|i| (i + 1) % pattern.max(1) != 0)
                .collect();
            (Some(window_or(t, 4096)?.unwrap_or(4096)), Some(layers))
        } else if qwen2 || model_type == "qwen3" {
            // (Qwen3-VL's decoder has no window in transformers.)
            qwen_window(t, num_hidden_layers, 28)?
        } else if model_type == "mistral" {
            (window_or(t, 4096)?, None)
        } else {
            (None, None)
        };
        let sliding_layers = sliding_layers(t, num_hidden_layers, sliding_window, default_layers)?;
        Ok(DecoderConfig {
            vocab_size: field(t, "vocab_size")?.unwrap_or(d.vocab),
            hidden_size,
            intermediate_size: field(t, "intermediate_size")?.unwrap_or(d.intermediate),
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            hidden_act: if gemma_like {
                // Gemma names it `hidden_activation` (older configs: `hidden_act`).
                field(t, "hidden_activation")?
                    .or(field(t, "hidden_act")?)
                    .unwrap_or_else(|| "gelu_pytorch_tanh".into())
            } else {
                field(t, "hidden_act")?.unwrap_or_else(|| "silu".into())
            },
            rms_norm_eps: field(t, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: field(&rope, "rope_theta")?
                .or(field(t, "rope_theta")?)
                .unwrap_or(match model_type.as_str() {
                    "qwen3_vl_text" => 500_000.0,
                    "gemma3_text" => 1_000_000.0,
                    _ => 10_000.0,
                }),
            mrope_section: vec![head_dim / 2, 0, 0],
            mrope_interleaved: false,
            qkv_bias: qwen2 || field(t, "attention_bias")?.unwrap_or(false),
            tie_word_embeddings: field(t, "tie_word_embeddings")?.unwrap_or(gemma_like),
            qk_norm: qwen3 || gemma3,
            rope_scaling,
            sliding_window,
            sliding_layers,
            gemma: if gemma_like {
                Some(Gemma::from_json(t, gemma3, hidden_size, local_rope_params)?)
            } else {
                None
            },
        })
    }
}

impl Gemma {
    /// Gemma2Config / Gemma3TextConfig's fields (and defaults) beyond the Llama ones.
    fn from_json(
        t: &Value,
        gemma3: bool,
        hidden_size: usize,
        local_rope: Option<Value>,
    ) -> Result<Self> {
        let local_rope = if gemma3 {
            // transformers 5: rope_parameters.sliding_attention; the hub: rope_local_base_freq.
            let p = local_rope.unwrap_or(Value::Null);
            let theta = field(&p, "rope_theta")?
                .or(field(t, "rope_local_base_freq")?)
                .unwrap_or(10_000.0);
            Some((theta, RopeScaling::from_json(&p)?))
        } else {
            None
        };
        let cap = |k: &str, d: Option<f64>| -> Result<Option<f64>> {
            Ok(match t.get(k) {
                None => d,
                Some(_) => field(t, k)?,
            })
        };
        Ok(Gemma {
            embed_scale: (hidden_size as f64).sqrt(),
            query_pre_attn_scalar: field(t, "query_pre_attn_scalar")?.unwrap_or(256.0),
            attn_softcap: cap("attn_logit_softcapping", (!gemma3).then_some(50.0))?,
            final_softcap: cap("final_logit_softcapping", (!gemma3).then_some(30.0))?,
            local_rope,
        })
    }
}

/// `sliding_window`, or `default` where the config leaves it out (null: no window).
fn window_or(t: &Value, default: usize) -> Result<Option<usize>> {
    Ok(match t.get("sliding_window") {
        None => Some(default),
        Some(_) => field(t, "sliding_window")?,
    })
}

/// Qwen2, Qwen2-VL and Qwen3's window as their transformers config classes read it: only with
/// `use_sliding_window`, on the blocks from `max_window_layers` (class default `from`) on. The
/// window and the default sliding blocks (see [`sliding_layers`]).
pub(crate) fn qwen_window(
    t: &Value,
    layers: usize,
    from: usize,
) -> Result<(Option<usize>, Option<Vec<bool>>)> {
    if !field::<bool>(t, "use_sliding_window")?.unwrap_or(false) {
        return Ok((None, None));
    }
    let from: usize = field(t, "max_window_layers")?.unwrap_or(from);
    Ok((
        window_or(t, 4096)?,
        Some((0..layers).map(|i| i >= from).collect()),
    ))
}

/// Which blocks use the window: as `layer_types` says where transformers 5 wrote them out (and
/// there is a window), else the class's `default` (none: every block).
pub(crate) fn sliding_layers(
    t: &Value,
    layers: usize,
    window: Option<usize>,
    default: Option<Vec<bool>>,
) -> Result<Option<Vec<bool>>> {
    if window.is_none() {
        return Ok(default);
    }
    Ok(layer_types(t, layers)?.or(default))
}

/// A config's `layer_types` (transformers 5) as "is a sliding layer" per block; none without it.
fn layer_types(t: &Value, layers: usize) -> Result<Option<Vec<bool>>> {
    let Some(types) = field::<Vec<String>>(t, "layer_types")? else {
        return Ok(None);
    };
    if types.len() != layers {
        return Err(Error::Internal(format!(
            "{} layer_types for {layers} layers",
            types.len()
        )));
    }
    types
        .iter()
        .map(|ty| match ty.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => Err(Error::Internal(format!(
                "layer type `{other}` is not known"
            ))),
        })
        .collect::<Result<_>>()
        .map(Some)
}

impl DecoderConfig {
    /// Whether block `layer` is a sliding layer (the window, where there is one, applies to it).
    pub fn is_sliding_layer(&self, layer: usize) -> bool {
        match &self.sliding_layers {
            Some(layers) => layers.get(layer).copied().unwrap_or(false),
            None => true,
        }
    }

    /// The position axis (0 = t, 1 = h, 2 = w) of each of the `head_dim / 2` frequency slots.
    /// Runs: `mrope_section[0]` slots of t, then h, then w (transformers' `apply_multimodal_rotary_pos_emb`).
    /// Interleaved: slot j is h where `j % 3 == 1` and `j < 3·section[1]`, w where `j % 3 == 2` and
    /// `j < 3·section[2]`, else t (Qwen3-VL's `recomposition_frequencies`).
    pub fn rope_axes(&self) -> Vec<usize> {
        let s = &self.mrope_section;
        if self.mrope_interleaved {
            let sec = |a: usize| s.get(a).copied().unwrap_or(0);
            (0..self.head_dim / 2)
                .map(|j| match j % 3 {
                    1 if j < 3 * sec(1) => 1,
                    2 if j < 3 * sec(2) => 2,
                    _ => 0,
                })
                .collect()
        } else {
            s.iter()
                .enumerate()
                .flat_map(|(a, &n)| std::iter::repeat_n(a, n))
                .collect()
        }
    }
}

/// What the decoder takes for one sequence.
pub struct DecoderInput {
    /// Token embeddings with any image features in place, `[seq, hidden]`.
    pub embeds: Tensor,
    /// Each token's `(t, h, w)` position.
    pub positions: Vec<[u32; 3]>,
    /// Rows added to the residual stream between blocks (DeepStack).
    pub additions: Vec<Addition>,
}

impl DecoderInput {
    pub fn new(embeds: Tensor, positions: Vec<[u32; 3]>) -> Self {
        DecoderInput {
            embeds,
            positions,
            additions: Vec::new(),
        }
    }
}

/// DeepStack (Qwen3-VL): `rows` (`[n, hidden]`) added to the residual stream of positions
/// `first..first + n` right after block `after_block` (0-based), before the next block reads it
/// and before the lens reads it (lens layer `after_block + 1` is the sum).
pub struct Addition {
    pub after_block: usize,
    pub first: usize,
    pub rows: Tensor,
}

/// `h` (`[b, s, hidden]`) with sequence i's additions for block `block` added: one dense add of a
/// tensor that is zero elsewhere (`x + 0 = x` exactly), or `h` itself when none applies.
fn add_rows(h: Tensor, block: usize, additions: &[&[Addition]]) -> Result<Tensor> {
    if !additions
        .iter()
        .any(|a| a.iter().any(|a| a.after_block == block))
    {
        return Ok(h);
    }
    let (b, s, hidden) = h.dims3()?;
    let (dtype, device) = (h.dtype(), h.device().clone());
    let mut rows = Vec::with_capacity(b);
    for adds in additions {
        let mut delta = Tensor::zeros((s, hidden), dtype, &device)?;
        for a in adds.iter().filter(|a| a.after_block == block) {
            let n = a.rows.dim(0)?;
            if a.first + n > s {
                return Err(Error::Internal(format!(
                    "{n} added rows at {} overflow a {s}-token sequence",
                    a.first
                )));
            }
            delta = delta.slice_assign(
                &[a.first..a.first + n, 0..hidden],
                &a.rows.to_dtype(dtype)?.to_device(&device)?,
            )?;
        }
        rows.push(delta);
    }
    Ok((h + Tensor::stack(&rows, 0)?)?)
}

struct Layer {
    /// Before attention (`input_layernorm`).
    attn_norm: RmsNorm,
    /// Gemma: on the attention output, before the residual add (`post_attention_layernorm`).
    attn_out_norm: Option<RmsNorm>,
    /// Before the MLP (Llama: `post_attention_layernorm`; Gemma: `pre_feedforward_layernorm`).
    mlp_norm: RmsNorm,
    /// Gemma: on the MLP output (`post_feedforward_layernorm`).
    mlp_out_norm: Option<RmsNorm>,
    /// Gemma 3's sliding layers: the local RoPE table.
    local_rope: bool,
    /// The layer's sliding window (Mistral: every layer; Gemma: its sliding layers).
    window: Option<usize>,
    /// q, k and v projections stacked: one GEMM (rows `[q | k | v]`).
    qkv: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Qwen3's per-head q and k norms.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

pub struct Decoder {
    cfg: DecoderConfig,
    pub embed_tokens: Tensor,
    layers: Vec<Layer>,
    pub norm: RmsNorm,
    act: Activation,
}

impl Decoder {
    /// The bytes one token's keys and values take in a [`KvCache`]: every block's, in the
    /// weights' dtype.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_hidden_layers
            * self.cfg.num_key_value_heads
            * self.cfg.head_dim
            * self.embed_tokens.dtype().size_in_bytes()
    }

    /// `w` is the LM body prefix (`model.` for Qwen2-VL on the hub, `language_model.model.` for LLaVA).
    pub fn load(w: &Prefixed, cfg: &DecoderConfig) -> Result<Self> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let eps = cfg.rms_norm_eps;
        let gemma = cfg.gemma.as_ref();
        // Gemma's norms scale by `1 + weight`: the sum taken once here, in f32.
        let norm = |w: &Prefixed, dim: usize| -> Result<RmsNorm> {
            let n = RmsNorm::load(w, dim, eps)?;
            if gemma.is_none() {
                return Ok(n);
            }
            let dtype = n.weight.dtype();
            Ok(RmsNorm {
                weight: (n.weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(dtype)?,
                eps,
            })
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let b = w.pp(format!("layers.{l}"));
                let a = b.pp("self_attn");
                let m = b.pp("mlp");
                let sandwich = |name: &str| gemma.map(|_| norm(&b.pp(name), h)).transpose();
                Ok(Layer {
                    attn_norm: norm(&b.pp("input_layernorm"), h)?,
                    attn_out_norm: sandwich("post_attention_layernorm")?,
                    mlp_norm: norm(
                        &b.pp(if gemma.is_some() {
                            "pre_feedforward_layernorm"
                        } else {
                            "post_attention_layernorm"
                        }),
                        h,
                    )?,
                    mlp_out_norm: sandwich("post_feedforward_layernorm")?,
                    local_rope: gemma.is_some_and(|g| g.local_rope.is_some())
                        && cfg.is_sliding_layer(l),
                    window: cfg.sliding_window.filter(|_| cfg.is_sliding_layer(l)),
                    qkv: {
                        let subs = [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)];
                        a.linear(
                            a.stacked(&subs, "weight", &[h])?,
                            cfg.qkv_bias
                                .then(|| a.stacked(&subs, "bias", &[]))
                                .transpose()?,
                        )?
                    },
                    o: Linear::load(&a.pp("o_proj"), qd, h, false)?,
                    gate: Linear::load(&m.pp("gate_proj"), h, i, false)?,
                    up: Linear::load(&m.pp("up_proj"), h, i, false)?,
                    down: Linear::load(&m.pp("down_proj"), i, h, false)?,
                    qk_norm: cfg
                        .qk_norm
                        .then(|| -> Result<_> {
                            Ok((norm(&a.pp("q_norm"), hd)?, norm(&a.pp("k_norm"), hd)?))
                        })
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            cfg: cfg.clone(),
            embed_tokens: w.pp("embed_tokens").get("weight", (cfg.vocab_size, h))?,
            layers,
            norm: norm(&w.pp("norm"), h)?,
            act: Activation::from_name(&cfg.hidden_act)?,
        })
    }

    /// Token embeddings as the first block reads them (Gemma: times `sqrt(hidden_size)`, the
    /// factor rounded to the model dtype first, as transformers).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let e = embed(&self.embed_tokens, ids)?;
        match &self.cfg.gemma {
            Some(g) => {
                let scale = Tensor::new(g.embed_scale as f32, e.device())?.to_dtype(e.dtype())?;
                Ok(e.broadcast_mul(&scale)?)
            }
            None => Ok(e),
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The additive mask `[s, past + s]` of `s` new rows after `past` cached ones: row i sees the
    /// keys up to itself (`past + i`) and, with a sliding `window`, none `window` or more behind.
    /// None where it hides nothing (a single new row with no window in reach).
    fn mask(
        s: usize,
        past: usize,
        window: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let hidden = |i: usize, j: usize| j > past + i || window.is_some_and(|w| past + i >= j + w);
        if (0..s).all(|i| (0..past + s).all(|j| !hidden(i, j))) {
            return Ok(None);
        }
        let data: Vec<f32> = (0..s)
            .flat_map(|i| {
                (0..past + s).map(move |j| if hidden(i, j) { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(data, (s, past + s), device)?.to_dtype(dtype)?,
        ))
    }

    /// The window masks a pass of `s` new rows after `past` cached ones needs, one per distinct
    /// window of its layers, where the window hides something.
    fn window_masks(
        &self,
        s: usize,
        past: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<(usize, Tensor)>> {
        let mut windows: Vec<usize> = self.layers.iter().filter_map(|l| l.window).collect();
        windows.sort_unstable();
        windows.dedup();
        let mut out = Vec::new();
        for w in windows {
            if past + s > w {
                if let Some(m) = Self::mask(s, past, Some(w), dtype, device)? {
                    out.push((w, m));
                }
            }
        }
        Ok(out)
    }

    /// RoPE tables `[seq, head_dim/2]`: frequency slot j takes its angle from the position axis
    /// [`DecoderConfig::rope_axes`] assigns it. Angles and cos/sin in f32, then cast
    /// (transformers' order).
    fn rope_tables(&self, positions: &[[u32; 3]], device: &Device) -> Result<RopeTables> {
        let global = self.rope_table(
            positions,
            device,
            self.cfg.rope_theta,
            &self.cfg.rope_scaling,
        )?;
        let local = match self.cfg.gemma.as_ref().and_then(|g| g.local_rope.as_ref()) {
            Some((theta, scaling)) => Some(self.rope_table(positions, device, *theta, scaling)?),
            None => None,
        };
        Ok(RopeTables { global, local })
    }

    /// One RoPE table pair for `theta` and `scaling`.
    fn rope_table(
        &self,
        positions: &[[u32; 3]],
        device: &Device,
        theta: f64,
        scaling: &RopeScaling,
    ) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim;
        let freqs = scaling.inv_freq(theta, hd);
        let axis = self.cfg.rope_axes();
        let mut cos = Vec::with_capacity(positions.len() * hd / 2);
        let mut sin = Vec::with_capacity(cos.capacity());
        for p in positions {
            for (j, f) in freqs.iter().enumerate() {
                let a = p[axis[j]] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let s = positions.len();
        let dtype = self.embed_tokens.dtype();
        Ok((
            Tensor::from_vec(cos, (s, hd / 2), device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (s, hd / 2), device)?.to_dtype(dtype)?,
        ))
    }

    /// One decoder block over `h` (`[b, s, hidden]`); `kv` says what it does with the keys and
    /// values ([`Kv`]). `mask`: the causal mask of a pass over whole sequences (`[s, s]`), or none
    /// for new rows after a cache. `windows`: [`Self::window_masks`] for every sequence (one entry)
    /// or per sequence (one each).
    fn block(
        &self,
        layer: &Layer,
        h: &Tensor,
        tables: &RopeTables,
        mask: Option<&Tensor>,
        kv: Kv,
        windows: &[Vec<(usize, Tensor)>],
    ) -> Result<Tensor> {
        // A sliding layer whose window hides keys of this pass: its own mask, not the causal one
        // (and not flash attention, which knows only causal).
        let window_mask = |i: usize| {
            let w = layer.window?;
            let masks = windows.get(i).or(windows.first())?;
            masks.iter().find(|(x, _)| *x == w).map(|(_, m)| m)
        };
        let device = h.device().clone();
        let (b, s, _) = h.dims3()?;
        let hd = self.cfg.head_dim;
        let (nh, nkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let gemma = self.cfg.gemma.as_ref();
        let scale = gemma
            .map_or(hd as f64, |g| g.query_pre_attn_scalar)
            .powf(-0.5);
        let softcap = gemma.and_then(|g| g.attn_softcap);
        let (cos, sin) = match (&tables.local, layer.local_rope) {
            (Some((c, s)), true) => (c, s),
            _ => (&tables.global.0, &tables.global.1),
        };
        let mut h = h.clone();
        let x = profile::op("decoder norm", &device, || layer.attn_norm.forward(&h))?;
        // [b, s, (nh + 2·nkv)·hd] → [b, nh + 2·nkv, s, hd]: q heads, then k, then v.
        let qkv = profile::op("decoder qkv", &device, || {
            Ok(layer
                .qkv
                .forward(&x)?
                .reshape((b, s, nh + 2 * nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        })?;
        // q and k rotated together (the tables do not depend on the head); Qwen3 norms each
        // head's q and k first.
        let qk = match &layer.qk_norm {
            None => qkv.narrow(1, 0, nh + nkv)?,
            Some((qn, kn)) => profile::op("decoder q/k norm", &device, || {
                Ok(Tensor::cat(
                    &[
                        qn.forward(&qkv.narrow(1, 0, nh)?)?,
                        kn.forward(&qkv.narrow(1, nh, nkv)?)?,
                    ],
                    1,
                )?)
            })?,
        };
        let qk = profile::op("decoder rope", &device, || rope(&qk, cos, sin))?;
        let (q, k) = (qk.narrow(1, 0, nh)?, qk.narrow(1, nh, nkv)?);
        let v = qkv.narrow(1, nh + nkv, nkv)?;
        let caches = match kv {
            Kv::Pass => None,
            Kv::Keep(keep) => {
                // Sequence i's own keys and values, without its padding, start its cache.
                for (i, (c, n)) in keep.into_iter().enumerate() {
                    let own = |t: &Tensor| t.narrow(0, i, 1)?.narrow(2, 0, n);
                    c.append(&own(&k)?, &own(&v)?)?;
                }
                None
            }
            Kv::Cached(caches) => Some(caches),
        };
        let a = profile::op("decoder attention", &device, || {
            let a = match (caches, mask) {
                (None, Some(mask)) if softcap.is_some() || window_mask(0).is_some() => {
                    attention_capped(
                        &q,
                        &k,
                        &v,
                        Some(window_mask(0).unwrap_or(mask)),
                        scale,
                        softcap,
                        ATTENTION_SCORES_BUDGET,
                    )?
                }
                (None, Some(mask)) => causal_attention(&q, &k, &v, mask, scale)?,
                (None, None) => {
                    return Err(Error::Internal("a block without mask or cache".into()))
                }
                // Each sequence against its own keys: the GEMMs above and below run batched.
                (Some(caches), mask) => {
                    let outs = caches
                        .into_iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let one = |t: &Tensor| t.narrow(0, i, 1);
                            let (k, v) = c.append(&one(&k)?, &one(&v)?)?;
                            attention_capped(
                                &one(&q)?,
                                &k,
                                &v,
                                window_mask(i).or(mask),
                                scale,
                                softcap,
                                ATTENTION_SCORES_BUDGET,
                            )
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&outs, 0)?
                }
            };
            Ok(a.transpose(1, 2)?.reshape((b, s, nh * hd))?)
        })?;
        h = profile::op("decoder o_proj + residual", &device, || {
            let o = layer.o.forward(&a)?;
            let o = match &layer.attn_out_norm {
                Some(n) => n.forward(&o)?,
                None => o,
            };
            Ok((&h + o)?)
        })?;
        let x = profile::op("decoder norm", &device, || layer.mlp_norm.forward(&h))?;
        let mlp = profile::op("decoder mlp", &device, || {
            let y = layer.down.forward(
                &self
                    .act
                    .then_mul(&layer.gate.forward(&x)?, &layer.up.forward(&x)?)?,
            )?;
            match &layer.mlp_out_norm {
                Some(n) => n.forward(&y),
                None => Ok(y),
            }
        })?;
        h = profile::op("decoder residual", &device, || Ok((&h + mlp)?))?;
        Ok(h)
    }

    /// Hands sequence i's rows of `h` (`[b, s, hidden]`) to `observers[i]` at lens layer
    /// `index`, normed where the observer wants them so.
    fn observe_each(
        &self,
        index: usize,
        h: &Tensor,
        observers: &mut [&mut dyn LayerObserver],
    ) -> Result<()> {
        for (i, obs) in observers.iter_mut().enumerate() {
            let rows = h.get(i)?;
            if obs.wants_normed(index) {
                obs.observe_normed(index, &rows, &self.norm.forward(&rows)?)?;
            } else {
                obs.observe(index, &rows)?;
            }
        }
        Ok(())
    }

    /// One new token for each of several sequences at once (`embeds` `[b, hidden]`, one position
    /// each), each after what its own `caches[i]` holds (prefilled by [`Self::forward_batch_cached`]):
    /// the projections and MLPs run over the batch, attention per sequence. `observers[i]` sees
    /// sequence i's new row `[1, hidden]` at every lens layer. Each row equals what
    /// a full forward over the sequence gives at its position.
    pub fn forward_step_batch(
        &self,
        embeds: Tensor,
        positions: &[[u32; 3]],
        caches: &mut [KvCache],
        observers: &mut [&mut dyn LayerObserver],
    ) -> Result<()> {
        let b = embeds.dim(0)?;
        if positions.len() != b || caches.len() != b || observers.len() != b {
            return Err(Error::Internal(
                "forward_step_batch: tokens, positions, caches and observers differ in number"
                    .into(),
            ));
        }
        for c in caches.iter() {
            if c.layers.len() != self.layers.len() {
                return Err(Error::Internal(
                    "forward_step_batch: a cache was not prefilled".into(),
                ));
            }
        }
        let device = embeds.device().clone();
        let tables = self.rope_tables(positions, &device)?.batched(b, 1)?;
        // Each sequence's window masks for its new row (its own length), once for every layer.
        let windows = caches
            .iter()
            .map(|c| self.window_masks(1, c.len, embeds.dtype(), &device))
            .collect::<Result<Vec<_>>>()?;
        let mut h = embeds.unsqueeze(1)?; // [b, 1, hidden]
        self.observe_each(0, &h, observers)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let per_seq: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            h = self.block(layer, &h, &tables, None, Kv::Cached(per_seq), &windows)?;
            self.observe_each(l + 1, &h, observers)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        Ok(())
    }

    /// Runs the blocks over a batch of sequences (`embeds[i]`: `[len_i, hidden]`), right-padded to
    /// the longest, and hands request i's residual stream `[len_i, hidden]` to `observers[i]`
    /// before the first block (lens layer 0) and after every block. Right padding keeps every
    /// request's numbers what they are alone: the causal mask already hides later positions.
    pub fn forward_batch(
        &self,
        inputs: Vec<DecoderInput>,
        observers: &mut [&mut dyn LayerObserver],
    ) -> Result<()> {
        self.forward_padded(inputs, None, observers)
    }

    /// [`Self::forward_batch`] that also starts each sequence's cache (`caches[i]`, empty): its
    /// keys and values at every block, without the padding, so that its answer can go on one
    /// token at a time ([`Self::forward_step_batch`]). A batched prefill.
    pub fn forward_batch_cached(
        &self,
        inputs: Vec<DecoderInput>,
        caches: &mut [KvCache],
        observers: &mut [&mut dyn LayerObserver],
    ) -> Result<()> {
        if caches.len() != inputs.len() || caches.iter().any(|c| c.len > 0) {
            return Err(Error::Internal(
                "forward_batch_cached: one empty cache per sequence".into(),
            ));
        }
        self.forward_padded(inputs, Some(caches), observers)
    }

    fn forward_padded(
        &self,
        inputs: Vec<DecoderInput>,
        mut caches: Option<&mut [KvCache]>,
        observers: &mut [&mut dyn LayerObserver],
    ) -> Result<()> {
        let b = inputs.len();
        if b == 0 || observers.len() != b {
            return Err(Error::Internal(
                "forward_batch: inputs and observers differ in number".into(),
            ));
        }
        let mut embeds = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        let mut additions = Vec::with_capacity(b);
        for i in inputs {
            if i.positions.len() != i.embeds.dim(0)? {
                return Err(Error::Internal(format!(
                    "{} tokens and {} positions",
                    i.embeds.dim(0)?,
                    i.positions.len()
                )));
            }
            embeds.push(i.embeds);
            positions.push(i.positions);
            additions.push(i.additions);
        }
        let additions: Vec<&[Addition]> = additions.iter().map(|a| &a[..]).collect();
        let lens: Vec<usize> = embeds
            .iter()
            .map(|e| e.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let s = *lens.iter().max().unwrap_or(&0);
        let device = embeds[0].device().clone();
        let dtype = embeds[0].dtype();
        let hidden = self.cfg.hidden_size;
        let padded: Vec<Tensor> = embeds
            .into_iter()
            .zip(&lens)
            .map(|(e, &n)| {
                if n == s {
                    Ok(e)
                } else {
                    Ok(Tensor::cat(
                        &[e, Tensor::zeros((s - n, hidden), dtype, &device)?],
                        0,
                    )?)
                }
            })
            .collect::<Result<_>>()?;
        let mut all_pos = Vec::with_capacity(b * s);
        for (p, &n) in positions.iter().zip(&lens) {
            all_pos.extend_from_slice(&p[..n]);
            all_pos.extend(std::iter::repeat_n([0u32; 3], s - n));
        }
        let tables = self.rope_tables(&all_pos, &device)?.batched(b, s)?;
        let mask = causal_mask(s, dtype, &device)?;
        // Right padding keeps the windows too: a valid row's window holds only earlier valid rows.
        let windows = self.window_masks(s, 0, dtype, &device)?;
        let mut h = Tensor::stack(&padded, 0)?; // [b, s, hidden]
        let observe =
            |index: usize, h: &Tensor, observers: &mut [&mut dyn LayerObserver]| -> Result<()> {
                // The final norm for every request of the batch in one operation, where wanted.
                let normed = if observers.iter().any(|o| o.wants_normed(index)) {
                    Some(self.norm.forward(h)?)
                } else {
                    None
                };
                for (i, (obs, &n)) in observers.iter_mut().zip(&lens).enumerate() {
                    let rows = |t: &Tensor| -> Result<Tensor> { Ok(t.get(i)?.narrow(0, 0, n)?) };
                    match &normed {
                        Some(normed) if obs.wants_normed(index) => {
                            obs.observe_normed(index, &rows(h)?, &rows(normed)?)?
                        }
                        _ => obs.observe(index, &rows(h)?)?,
                    }
                }
                Ok(())
            };
        if let Some(caches) = caches.as_deref_mut() {
            for c in caches.iter_mut() {
                c.layers = (0..self.layers.len())
                    .map(|_| LayerCache::with_room(c.room))
                    .collect();
            }
        }
        observe(0, &h, observers)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let kv = match caches.as_deref_mut() {
                Some(caches) => Kv::Keep(
                    caches
                        .iter_mut()
                        .zip(&lens)
                        .map(|(c, &n)| (&mut c.layers[l], n))
                        .collect(),
                ),
                None => Kv::Pass,
            };
            h = self.block(
                layer,
                &h,
                &tables,
                Some(&mask),
                kv,
                std::slice::from_ref(&windows),
            )?;
            h = add_rows(h, l, &additions)?;
            profile::op("lens (per layer)", &device, || {
                observe(l + 1, &h, observers)
            })?;
        }
        if let Some(caches) = caches {
            for (c, &n) in caches.iter_mut().zip(&lens) {
                c.len = n;
            }
        }
        Ok(())
    }
}

/// What a block does with the keys and values it computes.
enum Kv<'c> {
    /// Attends over whole sequences (the causal mask); keeps nothing.
    Pass,
    /// As `Pass`, and sequence i's first `n` keys and values start its cache (a prefill of
    /// right-padded sequences: `n` is its length without the padding).
    Keep(Vec<(&'c mut LayerCache, usize)>),
    /// New rows after each sequence's cache: each attends to its own cache and new keys, which
    /// are appended to it.
    Cached(Vec<&'c mut LayerCache>),
}

/// RoPE cos/sin tables `[seq, head_dim/2]` (or `[b, seq, head_dim/2]`): the model's, and Gemma 3's
/// local one for its sliding layers.
struct RopeTables {
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

impl RopeTables {
    /// Tables of `b · s` rows as `[b, s, head_dim/2]` (unchanged for one sequence).
    fn batched(self, b: usize, s: usize) -> Result<Self> {
        if b == 1 {
            return Ok(self);
        }
        let shape = |(c, sn): (Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
            Ok((c.reshape((b, s, ()))?, sn.reshape((b, s, ()))?))
        };
        Ok(RopeTables {
            global: shape(self.global)?,
            local: self.local.map(shape).transpose()?,
        })
    }
}

/// The keys and values of one sequence's tokens so far, per block (after RoPE): started by
/// [`Decoder::forward_batch_cached`], extended by [`Decoder::forward_step_batch`].
///
/// Each block's keys and values live in one buffer with room for `room` tokens after the prompt
/// (an answer's `generate − 1` fed-back tokens): a step writes its token's keys in place and
/// attention reads the filled part as a view, where growing by concatenation copied the whole
/// cache at every step (LLaVA-1.5-7B's 8 answers after 595-token prompts: 2.4 GB a step). Past
/// its room a buffer doubles.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Tokens held.
    pub len: usize,
    /// Tokens to make room for after the prompt.
    room: usize,
}

impl KvCache {
    /// An empty cache whose buffers, once the prompt starts them, have room for `tokens` more.
    pub fn with_room(tokens: usize) -> Self {
        KvCache {
            room: tokens,
            ..Default::default()
        }
    }

    /// Bytes the buffers hold (filled or not).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
}

#[derive(Default)]
struct LayerCache {
    /// Keys and values `[1, kv heads, capacity, head_dim]`, filled up to `len`.
    kv: Option<(Tensor, Tensor)>,
    len: usize,
    room: usize,
}

impl LayerCache {
    fn with_room(room: usize) -> Self {
        LayerCache {
            room,
            ..Default::default()
        }
    }

    fn bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, v)| {
            (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
        })
    }

    /// Appends the new keys and values (`[1, kv heads, s, head_dim]`) in place; returns all of
    /// them, views of the buffers (the head stride is the capacity's).
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, heads, s, d) = k.dims4()?;
        if b != 1 || v.dims() != k.dims() {
            return Err(Error::Internal(format!(
                "kv cache: keys {:?} and values {:?} for one sequence",
                k.dims(),
                v.dims()
            )));
        }
        let needed = self.len + s;
        let capacity = self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        if needed > capacity {
            // The first append takes the room asked for; a full buffer doubles. The filled part
            // moves over (the prompt's keys and values, being views of the pass's packed q/k/v
            // projection, are copied into buffers of their own, never kept as those views).
            let grown = if self.kv.is_none() {
                needed + self.room
            } else {
                needed.max(2 * capacity)
            };
            let fresh = |old: Option<&Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((1, heads, grown, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    t.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(t)
            };
            let old = self.kv.take();
            self.kv = Some((
                fresh(old.as_ref().map(|o| &o.0))?,
                fresh(old.as_ref().map(|o| &o.1))?,
            ));
        }
        let (ck, cv) = self.kv.as_ref().expect("a buffer was made above");
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((ck.narrow(2, 0, needed)?, cv.narrow(2, 0, needed)?))
    }
}

/// Plain 1-D positions `0..len` on all three axes.
pub fn sequential_positions(len: usize) -> Vec<[u32; 3]> {
    (0..len as u32).map(|p| [p; 3]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::stored_elements;
    use candle_core::IndexOp;
    use serde_json::json;

    /// A prompt's keys and values start its cache as a copy of their own, not as views that keep
    /// the pass's whole q/k/v projection (here 6 heads, of which k and v are 2 each) in memory.
    #[test]
    fn a_cache_holds_its_keys_not_the_projection_they_came_from() {
        let qkv = Tensor::arange(0f32, 120., &Device::Cpu)
            .unwrap()
            .reshape((1, 6, 5, 4))
            .unwrap();
        let (k, v) = (qkv.narrow(1, 2, 2).unwrap(), qkv.narrow(1, 4, 2).unwrap());
        let mut cache = LayerCache::default();
        let (ck, cv) = cache.append(&k, &v).unwrap();
        for (kept, view) in [(&ck, &k), (&cv, &v)] {
            assert_eq!(
                stored_elements(kept),
                kept.elem_count(),
                "the cache holds only its own elements"
            );
            assert_eq!(
                kept.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                view.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let (ck, _) = cache.append(&k, &v).unwrap();
        assert_eq!(ck.dims(), &[1, 2, 10, 4]);
        assert_eq!(stored_elements(&ck), ck.elem_count());
    }

    /// A cache with room takes each step's keys in place, in one buffer per block, until the room
    /// is used; past it the buffer doubles. What it returns is every token so far, in order.
    #[test]
    fn a_cache_writes_steps_in_place_and_doubles_past_its_room() {
        let dev = Device::Cpu;
        let token = |t: f32| Tensor::full(t, (1, 2, 1, 3), &dev).unwrap();
        let prompt = Tensor::cat(&[token(0.), token(1.)], 2).unwrap();
        let mut cache = LayerCache::with_room(2);
        let (k, _) = cache.append(&prompt, &prompt).unwrap();
        assert_eq!(stored_elements(&k), 2 * 4 * 3, "the prompt and room for 2");
        let mut buffer = cache.kv.as_ref().unwrap().0.clone();
        for t in 2..7 {
            let (k, v) = cache.append(&token(t as f32), &token(-(t as f32))).unwrap();
            assert_eq!(k.dims(), &[1, 2, t + 1, 3]);
            let keys: Vec<f32> = k
                .get(0)
                .unwrap()
                .get(1)
                .unwrap()
                .i((.., 0))
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(keys, (0..=t).map(|i| i as f32).collect::<Vec<_>>());
            assert_eq!(
                v.get(0)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .i((t, 2))
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                -(t as f32)
            );
            let capacity = cache.kv.as_ref().unwrap().0.dim(2).unwrap();
            if t == 4 {
                // Full: a buffer twice as large, the tokens so far moved over.
                assert_eq!(capacity, 8, "doubled at step {t}");
                buffer = cache.kv.as_ref().unwrap().0.clone();
            } else {
                assert_eq!(capacity, if t < 4 { 4 } else { 8 }, "step {t}");
            }
            // Written into the buffer held since the last growth: the step went in place.
            let written = buffer
                .get(0)
                .unwrap()
                .get(1)
                .unwrap()
                .i((t, 0))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(written, t as f32, "step {t} in place");
        }
        assert_eq!(cache.bytes(), 2 * 2 * 8 * 3 * 4);
    }

    #[test]
    fn llama_defaults_fill_a_sparse_llava_text_config() {
        // llava-1.5-7b-hf's text_config lists only a few fields.
        let c = DecoderConfig::from_json(
            &json!({"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 32064}),
            "llama",
        )
        .unwrap();
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (4096, 11008, 32)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (32, 32, 128)
        );
        assert_eq!(
            (c.rope_theta, c.rms_norm_eps, c.vocab_size),
            (10_000.0, 1e-5, 32064)
        );
        assert!(!c.qkv_bias);
    }

    #[test]
    fn qwen2_has_qkv_biases_and_its_own_defaults() {
        let c = DecoderConfig::from_json(
            &json!({"model_type": "qwen2", "rope_theta": 1e6, "num_key_value_heads": 2}),
            "llama",
        )
        .unwrap();
        assert!(c.qkv_bias);
        assert_eq!(
            (
                c.vocab_size,
                c.intermediate_size,
                c.num_key_value_heads,
                c.rope_theta
            ),
            (151936, 22016, 2, 1e6)
        );
    }

    /// transformers' class defaults where a Gemma config leaves fields out: Gemma 2 caps at 50 and
    /// 30 and alternates sliding / full layers; Gemma 3 has no caps, every 6th layer global, and
    /// reads its local RoPE from the hub's `rope_local_base_freq` or transformers 5's per-type
    /// `rope_parameters`.
    #[test]
    fn gemma_defaults_follow_transformers() {
        let g2 = DecoderConfig::from_json(
            &json!({"model_type": "gemma2", "num_hidden_layers": 4}),
            "llama",
        )
        .unwrap();
        let g = g2.gemma.as_ref().unwrap();
        assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(g2.sliding_layers, Some(vec![true, false, true, false]));
        assert_eq!((g.embed_scale, g.query_pre_attn_scalar), (48.0, 256.0));
        assert!(g.local_rope.is_none() && !g2.qk_norm && g2.tie_word_embeddings);
        assert_eq!(
            (g2.hidden_act.as_str(), g2.head_dim, g2.sliding_window),
            ("gelu_pytorch_tanh", 256, Some(4096))
        );
        let hub = DecoderConfig::from_json(
            &json!({"model_type": "gemma3_text", "num_hidden_layers": 12, "rope_theta": 1e6,
                    "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                    "sliding_window": 512}),
            "llama",
        )
        .unwrap();
        let v5 = DecoderConfig::from_json(
            &json!({"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 512,
                    "layer_types": (0..12).map(|i| if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>(),
                    "rope_parameters": {
                        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
            "llama",
        )
        .unwrap();
        assert_eq!(hub, v5);
        let g = hub.gemma.as_ref().unwrap();
        assert_eq!((g.attn_softcap, g.final_softcap), (None, None));
        let sliding = hub.sliding_layers.as_ref().unwrap();
        assert_eq!(sliding.iter().filter(|s| !**s).count(), 2);
        assert!(!sliding[5] && !sliding[11] && sliding[0]);
        assert_eq!(g.local_rope, Some((1e4, RopeScaling::Default)));
        assert_eq!(hub.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert!(hub.qk_norm);
    }

    /// Qwen2 / Qwen3's window as transformers' config classes read it: only with
    /// `use_sliding_window`, on the blocks from `max_window_layers` on (or as `layer_types` says);
    /// a null window is none.
    #[test]
    fn qwen_windows_follow_transformers() {
        let read = |extra: serde_json::Value| {
            let mut t = json!({"model_type": "qwen3", "num_hidden_layers": 4});
            t.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let c = DecoderConfig::from_json(&t, "llama").unwrap();
            (c.sliding_window, c.sliding_layers)
        };
        assert_eq!(read(json!({"sliding_window": 16})), (None, None));
        assert_eq!(
            read(json!({"use_sliding_window": true, "sliding_window": 16, "max_window_layers": 2})),
            (Some(16), Some(vec![false, false, true, true]))
        );
        assert_eq!(
            read(json!({"use_sliding_window": true, "max_window_layers": 3,
                        "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]})),
            (Some(4096), Some(vec![true, false, false, true]))
        );
        assert_eq!(
            read(json!({"use_sliding_window": true, "sliding_window": null})).0,
            None
        );
        // Mistral: every block.
        let m = DecoderConfig::from_json(
            &json!({"model_type": "mistral", "sliding_window": 8}),
            "llama",
        )
        .unwrap();
        assert!((m.sliding_window, m.sliding_layers.is_none()) == (Some(8), true));
        assert!(m.is_sliding_layer(31));
    }

    /// The masks: causal, and a window of `w` keeps the `w` latest keys, itself included
    /// (transformers: `q − kv < w`); nothing hidden gives no mask at all.
    #[test]
    fn masks_are_causal_and_windowed() {
        let dev = Device::Cpu;
        let rows = |m: Option<Tensor>| -> Vec<Vec<bool>> {
            m.unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(|x| x == 0.0).collect())
                .collect()
        };
        // 3 new rows after 2 cached, window 2: row i (position 2 + i) sees positions 1 + i and 2 + i.
        let m = rows(Decoder::mask(3, 2, Some(2), DType::F32, &dev).unwrap());
        assert_eq!(
            m,
            vec![
                vec![false, true, true, false, false],
                vec![false, false, true, true, false],
                vec![false, false, false, true, true],
            ]
        );
        // Causal only.
        let m = rows(Decoder::mask(2, 1, None, DType::F32, &dev).unwrap());
        assert_eq!(m, vec![vec![true, true, false], vec![true, true, true]]);
        // One new row, no window or one that reaches the start: nothing to hide.
        assert!(Decoder::mask(1, 5, None, DType::F32, &dev)
            .unwrap()
            .is_none());
        assert!(Decoder::mask(1, 5, Some(6), DType::F32, &dev)
            .unwrap()
            .is_none());
        let m = rows(Decoder::mask(1, 5, Some(4), DType::F32, &dev).unwrap());
        assert_eq!(m, vec![vec![false, false, true, true, true, true]]);
    }

    #[test]
    fn scaled_rope_is_refused_not_silently_ignored() {
        let e = DecoderConfig::from_json(
            &json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
            "llama",
        )
        .unwrap_err();
        assert!(e.to_string().contains("llama3"), "{e}");
    }
}

/// On a card (run by bench/gpu/device.sh): an answer's cache on the device, written in place by
/// `slice_set` and read by attention as views (cuBLAS at a batch stride), against the keys and
/// values concatenated as before.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use crate::models::profile::on_a_card::gpu;

    #[test]
    fn a_cache_on_the_gpu_reads_in_place_as_its_concatenation() {
        let Some(gpu) = gpu() else { return };
        let (hq, hkv, d, prompt) = (8, 2, 128, 37);
        for dtype in [DType::BF16, DType::F16] {
            let r = |h: usize, s: usize| {
                Tensor::randn(0f32, 1.0, (1, h, s, d), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&gpu)
                    .unwrap()
            };
            let mut cache = LayerCache::with_room(5);
            let (k0, v0) = (r(hkv, prompt), r(hkv, prompt));
            cache.append(&k0, &v0).unwrap();
            let (mut ks, mut vs) = (k0, v0);
            for step in 0..5 {
                let (k1, v1) = (r(hkv, 1), r(hkv, 1));
                let (k, v) = cache.append(&k1, &v1).unwrap();
                ks = Tensor::cat(&[&ks, &k1], 2).unwrap();
                vs = Tensor::cat(&[&vs, &v1], 2).unwrap();
                let q = r(hq, 1);
                let got = attention_capped(&q, &k, &v, None, 0.088, None, usize::MAX).unwrap();
                let want = attention_capped(&q, &ks, &vs, None, 0.088, None, usize::MAX).unwrap();
                let diff = crate::models::max_diff(&got, &want);
                eprintln!(
                    "kv cache in place on the gpu, {dtype:?}, step {step}: max difference {diff:e}"
                );
                assert!(diff <= 1e-2, "{dtype:?} step {step}: {diff}");
            }
            assert_eq!(cache.kv.as_ref().unwrap().0.dim(2).unwrap(), prompt + 5);
        }
    }
}
