//! Qwen2.5-VL's vision tower (`Qwen2_5_VisionTransformerPretrainedModel`): Qwen2-VL's patch
//! embedding, 2-D rotary attention and 2×2 merger, with RMSNorm, SwiGLU MLPs with biases, and
//! window attention: the patches are permuted so that each window of `window_size` pixels
//! (`window_size / patch / merge` merged tokens a side) is contiguous, every block but the
//! `fullatt_block_indexes` attends within its window, those attend within the whole image, and the
//! merged features are put back in raster order at the end (the inverse permutation).

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::layers::{Activation, Linear, RmsNorm};
use crate::models::profile;
use crate::models::qwen2_vl::vision::{
    attention_block, frame_segments, packed_pixels, rotary_tables, split_per_image, Encoder,
};
use crate::models::snapshot::{field, Prefixed};
use crate::models::ImageFeatures;

const NORM_EPS: f64 = 1e-6;

/// `vision_config`, with `Qwen2_5_VLVisionConfig`'s defaults.
#[derive(Clone, Debug)]
pub struct VisionConfig {
    pub depth: usize,
    /// The tower's width (`hidden_size`).
    pub embed_dim: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub window_size: usize,
    /// The merger's output width: the decoder's hidden size.
    pub out_hidden_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let or = |k: &str, d: usize| -> Result<usize> { Ok(field(v, k)?.unwrap_or(d)) };
        let rope: Value = field(v, "rope_parameters")?.unwrap_or(Value::Null);
        let cfg = VisionConfig {
            depth: or("depth", 32)?,
            embed_dim: or("hidden_size", 3584)?,
            intermediate_size: or("intermediate_size", 3420)?,
            hidden_act: field(v, "hidden_act")?.unwrap_or_else(|| "silu".into()),
            num_heads: or("num_heads", 16)?,
            in_channels: field(v, "in_channels")?
                .or(field(v, "in_chans")?)
                .unwrap_or(3),
            patch_size: or("patch_size", 14)?,
            spatial_merge_size: or("spatial_merge_size", 2)?,
            temporal_patch_size: or("temporal_patch_size", 2)?,
            window_size: or("window_size", 112)?,
            out_hidden_size: or("out_hidden_size", 3584)?,
            fullatt_block_indexes: field(v, "fullatt_block_indexes")?
                .unwrap_or_else(|| vec![7, 15, 23, 31]),
            rope_theta: field(&rope, "rope_theta")?.unwrap_or(10_000.0),
        };
        if cfg.window_merged() == 0 {
            return Err(Error::Internal(format!(
                "vision window_size {} is smaller than one merged patch ({} px)",
                cfg.window_size,
                cfg.patch_size * cfg.spatial_merge_size
            )));
        }
        Ok(cfg)
    }

    fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// A window's side in merged tokens (`vit_merger_window_size`).
    fn window_merged(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }
}

/// transformers' `get_vision_window_index` for one image: the order in which its merged tokens
/// (raster order, `t × h × w` of them, `h`, `w` in merged units) are visited window by window
/// (windows row-major, tokens row-major within a window; the last row and column of windows may be
/// partial), and the size of each non-empty window in merged tokens.
pub fn window_index(grid: [usize; 3], merge: usize, win: usize) -> (Vec<usize>, Vec<usize>) {
    let (t, h, w) = (grid[0], grid[1] / merge, grid[2] / merge);
    let (nwh, nww) = (h.div_ceil(win), w.div_ceil(win));
    let mut order = Vec::with_capacity(t * h * w);
    let mut sizes = Vec::new();
    for f in 0..t {
        for wr in 0..nwh {
            for wc in 0..nww {
                let before = order.len();
                for r in wr * win..((wr + 1) * win).min(h) {
                    for c in wc * win..((wc + 1) * win).min(w) {
                        order.push(f * h * w + r * w + c);
                    }
                }
                if order.len() > before {
                    sizes.push(order.len() - before);
                }
            }
        }
    }
    (order, sizes)
}

struct Block {
    norm1: RmsNorm,
    norm2: RmsNorm,
    qkv: Linear,
    proj: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct VisionTower {
    cfg: VisionConfig,
    patch_embed: Tensor,
    blocks: Vec<Block>,
    act: Activation,
    ln_q: RmsNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
}

impl VisionTower {
    pub fn load(w: &Prefixed, cfg: &VisionConfig) -> Result<Self> {
        let (e, i, p) = (cfg.embed_dim, cfg.intermediate_size, cfg.patch_size);
        let patch_embed = w
            .pp("patch_embed.proj")
            .get(
                "weight",
                (e, cfg.in_channels, cfg.temporal_patch_size, p, p),
            )?
            .reshape((e, cfg.patch_dim()))?;
        let blocks = (0..cfg.depth)
            .map(|l| {
                let b = w.pp(format!("blocks.{l}"));
                Ok(Block {
                    norm1: RmsNorm::load(&b.pp("norm1"), e, NORM_EPS)?,
                    norm2: RmsNorm::load(&b.pp("norm2"), e, NORM_EPS)?,
                    qkv: Linear::load(&b.pp("attn.qkv"), e, 3 * e, true)?,
                    proj: Linear::load(&b.pp("attn.proj"), e, e, true)?,
                    gate: Linear::load(&b.pp("mlp.gate_proj"), e, i, true)?,
                    up: Linear::load(&b.pp("mlp.up_proj"), e, i, true)?,
                    down: Linear::load(&b.pp("mlp.down_proj"), i, e, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(VisionTower {
            cfg: cfg.clone(),
            patch_embed,
            blocks,
            act: Activation::from_name(&cfg.hidden_act)?,
            ln_q: RmsNorm::load(&w.pp("merger.ln_q"), e, NORM_EPS)?,
            merger_fc1: Linear::load(&w.pp("merger.mlp.0"), merged, merged, true)?,
            merger_fc2: Linear::load(&w.pp("merger.mlp.2"), merged, cfg.out_hidden_size, true)?,
        })
    }
}

/// Rows of `x` (`[groups·unit, d]`, consecutive `unit` rows per group) taken group by group in
/// `order`.
fn permute_groups(x: &Tensor, order: &[u32], unit: usize, device: &Device) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let idx = Tensor::from_slice(order, order.len(), device)?;
    Ok(x.reshape((n / unit, unit * d))?
        .index_select(&idx, 0)?
        .reshape((n, d))?)
}

impl Encoder for VisionTower {
    /// Several images in one pass, as transformers batches them (window order across images,
    /// attention within each window or image), each image's merged features in raster order.
    fn forward_many(&self, images: &[(&Tensor, [usize; 3])]) -> Result<Vec<ImageFeatures>> {
        let dtype = self.patch_embed.dtype();
        let dev = self.patch_embed.device().clone();
        let (heads, hd, e) = (self.cfg.num_heads, self.cfg.head_dim(), self.cfg.embed_dim);
        let m = self.cfg.spatial_merge_size;
        let unit = m * m;
        let (rows, pixels) = packed_pixels(images, &dev, dtype)?;
        let n: usize = rows.iter().sum();
        // The window permutation over all images (in merged tokens) and the two segmentations.
        let (mut order, mut windows, full) = (Vec::new(), Vec::new(), frame_segments(images));
        let mut offset = 0;
        for (_, g) in images {
            let (o, sizes) = window_index(*g, m, self.cfg.window_merged());
            order.extend(o.iter().map(|&i| (i + offset) as u32));
            windows.extend(sizes.iter().map(|s| s * unit));
            offset += g[0] * (g[1] / m) * (g[2] / m);
        }
        let mut inverse = vec![0u32; order.len()];
        for (k, &i) in order.iter().enumerate() {
            inverse[i as usize] = k as u32;
        }
        let x = profile::op("vision patch embed", &dev, || {
            crate::models::gemm::matmul(&pixels, &self.patch_embed.t()?)
        })?;
        let mut x = permute_groups(&x, &order, unit, &dev)?;
        let tables: Vec<(Tensor, Tensor)> = images
            .iter()
            .map(|(_, g)| rotary_tables(*g, m, hd, self.cfg.rope_theta, &dev))
            .collect::<Result<_>>()?;
        let (cos, sin): (Vec<Tensor>, Vec<Tensor>) = tables.into_iter().unzip();
        let cos = permute_groups(&Tensor::cat(&cos, 0)?, &order, unit, &dev)?;
        let sin = permute_groups(&Tensor::cat(&sin, 0)?, &order, unit, &dev)?;
        for (l, b) in self.blocks.iter().enumerate() {
            let segments = if self.cfg.fullatt_block_indexes.contains(&l) {
                &full
            } else {
                &windows
            };
            let h = profile::op("vision norm", &dev, || b.norm1.forward(&x))?;
            x = (&x + attention_block(&b.qkv, &b.proj, &h, (&cos, &sin), segments, heads)?)?;
            let h = profile::op("vision norm", &dev, || b.norm2.forward(&x))?;
            x = profile::op("vision mlp + residual", &dev, || {
                let a = self
                    .act
                    .then_mul(&b.gate.forward(&h)?, &b.up.forward(&h)?)?;
                Ok((&x + b.down.forward(&a)?)?)
            })?;
        }
        let merged = profile::op("vision merger", &dev, || {
            let x = self.ln_q.forward(&x)?.reshape((n / unit, e * unit))?;
            let x = Activation::Gelu.forward(&self.merger_fc1.forward(&x)?)?;
            self.merger_fc2.forward(&x)
        })?;
        // Back to raster order, image by image.
        let merged = merged.index_select(&Tensor::from_slice(&inverse, inverse.len(), &dev)?, 0)?;
        Ok(split_per_image(&merged, &rows, unit)?
            .into_iter()
            .map(ImageFeatures::from)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_index_visits_windows_row_major_with_partial_edges() {
        // 5 × 7 merged tokens, windows of 4: 2 × 2 windows of 4×4, 4×3, 1×4, 1×3.
        let (order, sizes) = window_index([1, 10, 14], 2, 4);
        assert_eq!(sizes, vec![16, 12, 4, 3]);
        assert_eq!(&order[..5], &[0, 1, 2, 3, 7]);
        assert_eq!(&order[16..19], &[4, 5, 6]);
        assert_eq!(&order[28..], &[28, 29, 30, 31, 32, 33, 34]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..35).collect::<Vec<_>>());
        // A side that is a multiple of the window gives no empty window.
        let (_, sizes) = window_index([1, 8, 8], 2, 4);
        assert_eq!(sizes, vec![16]);
    }
}
