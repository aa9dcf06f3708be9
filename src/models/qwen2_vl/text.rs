//! Qwen2-VL's language model: the Qwen2 decoder (GQA attention with q/k/v biases, SwiGLU MLP,
//! RMSNorm) with multimodal rotary embeddings (M-RoPE), and the 3-D position ids of
//! transformers' `get_rope_index`.

use candle_core::{Device, Tensor};

use super::config::TextConfig;
use crate::error::Result;
use crate::models::layers::{
    attention, causal_mask, embed, inv_freq, rope, Activation, Linear, RmsNorm,
};
use crate::models::snapshot::Prefixed;
use crate::models::LayerObserver;

struct Layer {
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct TextModel {
    cfg: TextConfig,
    pub embed_tokens: Tensor,
    layers: Vec<Layer>,
    pub norm: RmsNorm,
    act: Activation,
}

impl TextModel {
    /// `w` is the LM body prefix (`model.` on the hub).
    pub fn load(w: &Prefixed, cfg: &TextConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let hd = cfg.head_dim();
        let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let eps = cfg.rms_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let b = w.pp(format!("layers.{l}"));
                let a = b.pp("self_attn");
                let m = b.pp("mlp");
                Ok(Layer {
                    input_layernorm: RmsNorm::load(&b.pp("input_layernorm"), h, eps)?,
                    post_attention_layernorm: RmsNorm::load(
                        &b.pp("post_attention_layernorm"),
                        h,
                        eps,
                    )?,
                    q: Linear::load(&a.pp("q_proj"), h, qd, true)?,
                    k: Linear::load(&a.pp("k_proj"), h, kvd, true)?,
                    v: Linear::load(&a.pp("v_proj"), h, kvd, true)?,
                    o: Linear::load(&a.pp("o_proj"), qd, h, false)?,
                    gate: Linear::load(&m.pp("gate_proj"), h, i, false)?,
                    up: Linear::load(&m.pp("up_proj"), h, i, false)?,
                    down: Linear::load(&m.pp("down_proj"), i, h, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TextModel {
            cfg: cfg.clone(),
            embed_tokens: w.pp("embed_tokens").get("weight", (cfg.vocab_size, h))?,
            layers,
            norm: RmsNorm::load(&w.pp("norm"), h, eps)?,
            act: Activation::from_name(&cfg.hidden_act)?,
        })
    }

    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        embed(&self.embed_tokens, ids)
    }

    /// M-RoPE tables `[seq, head_dim/2]`: frequency slot j takes its angle from the temporal,
    /// height or width position according to `mrope_section`. Angles and cos/sin in f32.
    fn mrope(&self, positions: &[[u32; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let freqs = inv_freq(self.cfg.rope_theta, hd);
        let axis: Vec<usize> = self
            .cfg
            .mrope_section
            .iter()
            .enumerate()
            .flat_map(|(a, &n)| std::iter::repeat_n(a, n))
            .collect();
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

    /// Runs the decoder over `embeds` `[seq, hidden]`, handing the residual stream to `observer`
    /// before the first block (lens layer 0) and after every block.
    pub fn forward(
        &self,
        embeds: Tensor,
        positions: &[[u32; 3]],
        observer: &mut dyn LayerObserver,
    ) -> Result<()> {
        let device = embeds.device().clone();
        let s = embeds.dim(0)?;
        let hd = self.cfg.head_dim();
        let (nh, nkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let (cos, sin) = self.mrope(positions, &device)?;
        let mask = causal_mask(s, embeds.dtype(), &device)?;
        let scale = (hd as f64).powf(-0.5);
        let mut h = embeds.unsqueeze(0)?; // [1, s, hidden]
        observer.observe(0, &h.squeeze(0)?)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let x = layer.input_layernorm.forward(&h)?;
            let heads = |lin: &Linear, n: usize| -> Result<Tensor> {
                Ok(lin
                    .forward(&x)?
                    .reshape((1, s, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = rope(&heads(&layer.q, nh)?, &cos, &sin)?;
            let k = rope(&heads(&layer.k, nkv)?, &cos, &sin)?;
            let v = heads(&layer.v, nkv)?;
            let a = attention(&q, &k, &v, Some(&mask), scale)?
                .transpose(1, 2)?
                .reshape((1, s, nh * hd))?;
            h = (h + layer.o.forward(&a)?)?;
            let x = layer.post_attention_layernorm.forward(&h)?;
            let mlp = layer
                .down
                .forward(&(self.act.forward(&layer.gate.forward(&x)?)? * layer.up.forward(&x)?)?)?;
            h = (h + mlp)?;
            observer.observe(l + 1, &h.squeeze(0)?)?;
        }
        Ok(())
    }
}

/// transformers' `get_rope_index` for one sequence: text tokens advance all three axes together;
/// the `rows × cols` merged tokens of an image share the temporal position and spread over
/// height and width; after the image, positions resume at `start + max(rows, cols)`.
pub fn rope_positions(len: usize, image: Option<(usize, usize, usize)>) -> Vec<[u32; 3]> {
    let mut out = Vec::with_capacity(len);
    let mut next = 0u32;
    let mut i = 0;
    while i < len {
        match image {
            Some((first, rows, cols)) if i == first => {
                for r in 0..rows {
                    for c in 0..cols {
                        out.push([next, next + r as u32, next + c as u32]);
                    }
                }
                next += rows.max(cols) as u32;
                i += rows * cols;
            }
            _ => {
                out.push([next; 3]);
                next += 1;
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_models_md_example() {
        // 15 text tokens, a 2×3 merged image, then 2 text tokens.
        let p = rope_positions(15 + 6 + 2, Some((15, 2, 3)));
        assert_eq!(p[14], [14, 14, 14]);
        assert_eq!(p[15], [15, 15, 15]);
        assert_eq!(p[15 + 5], [15, 16, 17]);
        assert_eq!(p[21], [18, 18, 18], "resumes at 15 + max(2, 3)");
        assert_eq!(rope_positions(3, None), vec![[0; 3], [1; 3], [2; 3]]);
    }
}
