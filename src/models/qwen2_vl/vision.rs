//! Qwen2-VL's vision tower (`Qwen2VisionTransformerPretrainedModel`): a Conv3d patch embedding
//! (a single matmul, since kernel = stride and the input is already one patch per row), 2-D
//! rotary attention restricted to each image, QuickGELU MLPs, and the 2×2 patch merger.

use candle_core::Tensor;

use super::config::VisionConfig;
use crate::error::Result;
use crate::models::layers::{attention, inv_freq, rope_in_f32, Activation, LayerNorm, Linear};
use crate::models::snapshot::Prefixed;

const LN_EPS: f64 = 1e-6;
const ROPE_THETA: f64 = 10_000.0;

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

pub struct VisionTower {
    cfg: VisionConfig,
    patch_embed: Tensor,
    blocks: Vec<Block>,
    act: Activation,
    ln_q: LayerNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
}

impl VisionTower {
    pub fn load(w: &Prefixed, cfg: &VisionConfig) -> Result<Self> {
        let e = cfg.embed_dim;
        let hidden = (e as f64 * cfg.mlp_ratio) as usize;
        let p = cfg.patch_size;
        let patch_embed = w
            .pp("patch_embed.proj")
            .get(
                "weight",
                (e, cfg.in_channels, cfg.temporal_patch_size, p, p),
            )?
            .reshape((e, cfg.patch_dim()))?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let b = w.pp(format!("blocks.{i}"));
                Ok(Block {
                    norm1: LayerNorm::load(&b.pp("norm1"), e, LN_EPS)?,
                    norm2: LayerNorm::load(&b.pp("norm2"), e, LN_EPS)?,
                    qkv: Linear::load(&b.pp("attn.qkv"), e, 3 * e, true)?,
                    proj: Linear::load(&b.pp("attn.proj"), e, e, true)?,
                    fc1: Linear::load(&b.pp("mlp.fc1"), e, hidden, true)?,
                    fc2: Linear::load(&b.pp("mlp.fc2"), hidden, e, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(VisionTower {
            cfg: cfg.clone(),
            patch_embed,
            blocks,
            act: Activation::from_name(&cfg.hidden_act)?,
            ln_q: LayerNorm::load(&w.pp("merger.ln_q"), e, LN_EPS)?,
            merger_fc1: Linear::load(&w.pp("merger.mlp.0"), merged, merged, true)?,
            merger_fc2: Linear::load(&w.pp("merger.mlp.2"), merged, cfg.hidden_size, true)?,
        })
    }

    /// Rotary tables `[n, head_dim/2]` for the patches of one image in pixel-row order
    /// (merge-block-major): angles `[row·f, col·f]`, f32.
    fn rotary(&self, grid: [usize; 3]) -> Result<(Tensor, Tensor)> {
        let m = self.cfg.spatial_merge_size;
        let freqs = inv_freq(ROPE_THETA, self.cfg.head_dim() / 2);
        let [t, gh, gw] = grid;
        let half = self.cfg.head_dim() / 2;
        let mut cos = Vec::with_capacity(t * gh * gw * half);
        let mut sin = Vec::with_capacity(cos.capacity());
        for _ in 0..t {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for i in 0..m {
                        for j in 0..m {
                            let (row, col) = ((bh * m + i) as f32, (bw * m + j) as f32);
                            for pos in [row, col] {
                                for f in &freqs {
                                    let a = pos * f;
                                    cos.push(a.cos());
                                    sin.push(a.sin());
                                }
                            }
                        }
                    }
                }
            }
        }
        let n = t * gh * gw;
        let dev = self.patch_embed.device();
        Ok((
            Tensor::from_vec(cos, (n, half), dev)?,
            Tensor::from_vec(sin, (n, half), dev)?,
        ))
    }

    /// `pixel_values` `[n, C·T·P·P]` for one image with grid `(t, h, w)` → merged features
    /// `[n / merge², hidden_size]`.
    pub fn forward(&self, pixel_values: &Tensor, grid: [usize; 3]) -> Result<Tensor> {
        let dtype = self.patch_embed.dtype();
        let n = pixel_values.dim(0)?;
        let (heads, hd, e) = (self.cfg.num_heads, self.cfg.head_dim(), self.cfg.embed_dim);
        let mut x = pixel_values
            .to_dtype(dtype)?
            .matmul(&self.patch_embed.t()?)?;
        let (cos, sin) = self.rotary(grid)?;
        let frame = grid[1] * grid[2];
        for b in &self.blocks {
            let h = b.norm1.forward(&x)?;
            let qkv = b
                .qkv
                .forward(&h)?
                .reshape((n, 3, heads, hd))?
                .permute((1, 2, 0, 3))?; // [3, heads, n, hd]
            // Rotation in f32 as transformers does, then back to the working dtype.
            let q = rope_in_f32(&qkv.get(0)?.unsqueeze(0)?, &cos, &sin)?;
            let k = rope_in_f32(&qkv.get(1)?.unsqueeze(0)?, &cos, &sin)?;
            let v = qkv.get(2)?.unsqueeze(0)?.contiguous()?;
            // Attention within each temporal frame (cu_seqlens): a still image is one frame.
            let mut outs = Vec::with_capacity(grid[0]);
            for f in 0..grid[0] {
                let part = |t: &Tensor| t.narrow(2, f * frame, frame);
                outs.push(attention(
                    &part(&q)?,
                    &part(&k)?,
                    &part(&v)?,
                    None,
                    (hd as f64).powf(-0.5),
                )?);
            }
            let o = Tensor::cat(&outs, 2)?
                .squeeze(0)?
                .transpose(0, 1)?
                .reshape((n, e))?;
            x = (x + b.proj.forward(&o)?)?;
            let h = b.norm2.forward(&x)?;
            x = (&x + b.fc2.forward(&self.act.forward(&b.fc1.forward(&h)?)?)?)?;
        }
        let m2 = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let x = self.ln_q.forward(&x)?.reshape((n / m2, e * m2))?;
        let x = Activation::Gelu.forward(&self.merger_fc1.forward(&x)?)?;
        self.merger_fc2.forward(&x)
    }
}
