//! Qwen3-VL's vision tower (`Qwen3VLVisionModel`): a Conv3d patch embedding with a bias (one
//! matmul, patch 16), a learned square position table resampled bilinearly (corners aligned) to
//! each image's patch grid and added to the patches, Qwen2-VL's 2-D rotary attention within each
//! image, LayerNorm blocks with tanh-GELU MLPs, the 2×2 merger (LayerNorm per patch, then two
//! linear layers around an exact GELU), and DeepStack: after each block listed in
//! `deepstack_visual_indexes`, a merger of its own (LayerNorm over the merged 4 patches) turns the
//! hidden state into one more feature set, which the decoder adds into its residual stream.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::layers::{Activation, LayerNorm, Linear};
use crate::models::profile;
use crate::models::qwen2_vl::vision::{
    attention_block, frame_segments, packed_pixels, rotary_tables, split_per_image, Encoder,
};
use crate::models::snapshot::{field, Prefixed};
use crate::models::ImageFeatures;

const NORM_EPS: f64 = 1e-6;

/// `vision_config`, with `Qwen3VLVisionConfig`'s defaults.
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
    /// The mergers' output width: the decoder's hidden size.
    pub out_hidden_size: usize,
    /// Rows of the learned position table: a square of `num_grid_per_side²`.
    pub num_position_embeddings: usize,
    pub deepstack_visual_indexes: Vec<usize>,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let or = |k: &str, d: usize| -> Result<usize> { Ok(field(v, k)?.unwrap_or(d)) };
        let rope: Value = field(v, "rope_parameters")?.unwrap_or(Value::Null);
        let cfg = VisionConfig {
            depth: or("depth", 27)?,
            embed_dim: or("hidden_size", 1152)?,
            intermediate_size: or("intermediate_size", 4304)?,
            hidden_act: field(v, "hidden_act")?.unwrap_or_else(|| "gelu_pytorch_tanh".into()),
            num_heads: or("num_heads", 16)?,
            in_channels: or("in_channels", 3)?,
            patch_size: or("patch_size", 16)?,
            spatial_merge_size: or("spatial_merge_size", 2)?,
            temporal_patch_size: or("temporal_patch_size", 2)?,
            out_hidden_size: or("out_hidden_size", 3584)?,
            num_position_embeddings: or("num_position_embeddings", 2304)?,
            deepstack_visual_indexes: field(v, "deepstack_visual_indexes")?
                .unwrap_or_else(|| vec![8, 16, 24]),
            rope_theta: field(&rope, "rope_theta")?.unwrap_or(10_000.0),
        };
        let side = cfg.grid_per_side();
        if side * side != cfg.num_position_embeddings || side < 2 {
            return Err(Error::Internal(format!(
                "vision num_position_embeddings {} is not the square of a side of at least 2",
                cfg.num_position_embeddings
            )));
        }
        if let Some(i) = cfg
            .deepstack_visual_indexes
            .iter()
            .find(|&&i| i >= cfg.depth)
        {
            return Err(Error::Internal(format!(
                "vision deepstack_visual_indexes names block {i} of a {}-block tower",
                cfg.depth
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

    /// `num_grid_per_side`: `int(num_position_embeddings ** 0.5)`.
    fn grid_per_side(&self) -> usize {
        let mut s = (self.num_position_embeddings as f64).sqrt() as usize;
        while (s + 1) * (s + 1) <= self.num_position_embeddings {
            s += 1;
        }
        s
    }
}

/// transformers' `get_vision_interpolation_indices_and_weights` (bilinear, corners aligned) for
/// one image: for each of its `t·h·w` patches in merge-block order, the 4 rows of the
/// `side × side` table it blends and their weights, in the order (top-left, top-right,
/// bottom-left, bottom-right). Weights are computed in f32 as torch does.
pub fn interpolation(grid: [usize; 3], merge: usize, side: usize) -> (Vec<u32>, Vec<f32>) {
    let [t, h, w] = grid;
    // Per axis: the two taps and their weights for target index i of an axis of length n.
    let axis = |i: usize, n: usize| -> ([usize; 2], [f32; 2]) {
        let src = i as f32 * (side - 1) as f32 / (n.max(2) - 1) as f32;
        let floor = src.floor();
        let taps = [floor as usize, (floor as usize + 1).min(side - 1)];
        let weights = [
            (1.0 - (src - floor).abs()).max(0.0),
            (1.0 - (src - floor - 1.0).abs()).max(0.0),
        ];
        (taps, weights)
    };
    let mut idx = Vec::with_capacity(t * h * w * 4);
    let mut wts = Vec::with_capacity(idx.capacity());
    for _ in 0..t {
        for bh in 0..h / merge {
            for bw in 0..w / merge {
                for i in 0..merge {
                    for j in 0..merge {
                        let (ht, hw) = axis(bh * merge + i, h);
                        let (wt, ww) = axis(bw * merge + j, w);
                        for a in 0..2 {
                            for b in 0..2 {
                                idx.push((ht[a] * side + wt[b]) as u32);
                                wts.push(hw[a] * ww[b]);
                            }
                        }
                    }
                }
            }
        }
    }
    (idx, wts)
}

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// `Qwen3VLVisionPatchMerger`: groups of `merge²` patches to one decoder-width feature. The main
/// merger norms each patch (`norm` over the tower's width); DeepStack's norm the merged group.
struct Merger {
    norm: LayerNorm,
    norm_merged: bool,
    fc1: Linear,
    fc2: Linear,
}

impl Merger {
    fn load(w: &Prefixed, cfg: &VisionConfig, norm_merged: bool) -> Result<Self> {
        let e = cfg.embed_dim;
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Merger {
            norm: LayerNorm::load(
                &w.pp("norm"),
                if norm_merged { merged } else { e },
                NORM_EPS,
            )?,
            norm_merged,
            fc1: Linear::load(&w.pp("linear_fc1"), merged, merged, true)?,
            fc2: Linear::load(&w.pp("linear_fc2"), merged, cfg.out_hidden_size, true)?,
        })
    }

    /// `x` `[n, e]` (groups of `unit` consecutive rows) → `[n / unit, out]`.
    fn forward(&self, x: &Tensor, unit: usize) -> Result<Tensor> {
        let (n, e) = x.dims2()?;
        let x = if self.norm_merged {
            self.norm.forward(&x.reshape((n / unit, e * unit))?)?
        } else {
            self.norm.forward(x)?.reshape((n / unit, e * unit))?
        };
        let x = Activation::Gelu.forward(&self.fc1.forward(&x)?)?;
        self.fc2.forward(&x)
    }
}

pub struct VisionTower {
    cfg: VisionConfig,
    /// `[embed, C·T·P·P]`
    patch_embed: Tensor,
    patch_bias: Tensor,
    /// `[side², embed]`, as stored (the blend runs in f32).
    pos_embed: Tensor,
    blocks: Vec<Block>,
    act: Activation,
    merger: Merger,
    deepstack: Vec<Merger>,
}

impl VisionTower {
    pub fn load(w: &Prefixed, cfg: &VisionConfig) -> Result<Self> {
        let (e, i) = (cfg.embed_dim, cfg.intermediate_size);
        let p = cfg.patch_size;
        let pe = w.pp("patch_embed.proj");
        let patch_embed = pe
            .get(
                "weight",
                (e, cfg.in_channels, cfg.temporal_patch_size, p, p),
            )?
            .reshape((e, cfg.patch_dim()))?;
        let blocks = (0..cfg.depth)
            .map(|b| {
                let w = w.pp(format!("blocks.{b}"));
                Ok(Block {
                    norm1: LayerNorm::load(&w.pp("norm1"), e, NORM_EPS)?,
                    norm2: LayerNorm::load(&w.pp("norm2"), e, NORM_EPS)?,
                    qkv: Linear::load(&w.pp("attn.qkv"), e, 3 * e, true)?,
                    proj: Linear::load(&w.pp("attn.proj"), e, e, true)?,
                    fc1: Linear::load(&w.pp("mlp.linear_fc1"), e, i, true)?,
                    fc2: Linear::load(&w.pp("mlp.linear_fc2"), i, e, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let deepstack = (0..cfg.deepstack_visual_indexes.len())
            .map(|j| Merger::load(&w.pp(format!("deepstack_merger_list.{j}")), cfg, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            patch_bias: pe.get("bias", e)?,
            pos_embed: w
                .pp("pos_embed")
                .get("weight", (cfg.num_position_embeddings, e))?,
            patch_embed,
            blocks,
            act: Activation::from_name(&cfg.hidden_act)?,
            merger: Merger::load(&w.pp("merger"), cfg, false)?,
            deepstack,
            cfg: cfg.clone(),
        })
    }

    /// The learned positions of one image's patches, `[t·h·w, embed]` in the working dtype: the 4
    /// table rows of each patch blended in f32, then cast (transformers' order).
    fn positions(&self, grid: [usize; 3], dev: &Device) -> Result<Tensor> {
        let (idx, wts) = interpolation(grid, self.cfg.spatial_merge_size, self.cfg.grid_per_side());
        let n = idx.len() / 4;
        let e = self.cfg.embed_dim;
        let rows = self
            .pos_embed
            .to_dtype(DType::F32)?
            .index_select(&Tensor::from_vec(idx, n * 4, dev)?, 0)?
            .reshape((n, 4, e))?;
        let wts = Tensor::from_vec(wts, (n, 4, 1), dev)?;
        Ok(rows
            .broadcast_mul(&wts)?
            .sum(1)?
            .to_dtype(self.pos_embed.dtype())?)
    }
}

impl Encoder for VisionTower {
    /// Several images in one pass, as transformers batches them: every linear layer, norm and MLP
    /// over all patches at once, attention within each image's frames.
    fn forward_many(&self, images: &[(&Tensor, [usize; 3])]) -> Result<Vec<ImageFeatures>> {
        let dtype = self.patch_embed.dtype();
        let dev = self.patch_embed.device().clone();
        let heads = self.cfg.num_heads;
        let m = self.cfg.spatial_merge_size;
        let unit = m * m;
        let (rows, pixels) = packed_pixels(images, &dev, dtype)?;
        for ((_, g), &r) in images.iter().zip(&rows) {
            if g[0] * g[1] * g[2] != r || g[1] % m != 0 || g[2] % m != 0 {
                return Err(Error::Internal(format!(
                    "{r} patches for a vision grid {g:?} (merge {m})"
                )));
            }
        }
        let segments = frame_segments(images);
        let positions: Vec<Tensor> = images
            .iter()
            .map(|(_, g)| self.positions(*g, &dev))
            .collect::<Result<_>>()?;
        let mut x = profile::op("vision patch embed", &dev, || {
            let x = crate::models::gemm::matmul(&pixels, &self.patch_embed.t()?)?;
            Ok((x.broadcast_add(&self.patch_bias)? + Tensor::cat(&positions, 0)?)?)
        })?;
        let tables: Vec<(Tensor, Tensor)> = images
            .iter()
            .map(|(_, g)| rotary_tables(*g, m, self.cfg.head_dim(), self.cfg.rope_theta, &dev))
            .collect::<Result<_>>()?;
        let (cos, sin): (Vec<Tensor>, Vec<Tensor>) = tables.into_iter().unzip();
        let (cos, sin) = (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?);
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let h = profile::op("vision norm", &dev, || b.norm1.forward(&x))?;
            x = (&x + attention_block(&b.qkv, &b.proj, &h, (&cos, &sin), &segments, heads)?)?;
            let h = profile::op("vision norm", &dev, || b.norm2.forward(&x))?;
            x = profile::op("vision mlp + residual", &dev, || {
                Ok((&x + b.fc2.forward(&self.act.forward(&b.fc1.forward(&h)?)?)?)?)
            })?;
            // In block order, each through the merger at its place in the list (transformers).
            if let Some(j) = self
                .cfg
                .deepstack_visual_indexes
                .iter()
                .position(|&d| d == i)
            {
                deepstack.push(profile::op("vision deepstack merger", &dev, || {
                    self.deepstack[j].forward(&x, unit)
                })?);
            }
        }
        let merged = profile::op("vision merger", &dev, || self.merger.forward(&x, unit))?;
        // Per image: its tokens, and its rows of each DeepStack set.
        let mut sets = deepstack
            .iter()
            .map(|d| Ok(split_per_image(d, &rows, unit)?.into_iter()))
            .collect::<Result<Vec<_>>>()?;
        Ok(split_per_image(&merged, &rows, unit)?
            .into_iter()
            .map(|tokens| ImageFeatures {
                tokens,
                deepstack: sets.iter_mut().filter_map(Iterator::next).collect(),
            })
            .collect())
    }

    fn deepstack_blocks(&self) -> usize {
        self.deepstack.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_aligns_corners_and_weights_sum_to_one() {
        // A 4 × 6 grid (merge 2) from a 3 × 3 table.
        let (idx, wts) = interpolation([1, 4, 6], 2, 3);
        assert_eq!(idx.len(), 24 * 4);
        for p in wts.chunks(4) {
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{p:?}");
        }
        // Patch 0 is the top-left corner: all weight on table row 0.
        assert_eq!(idx[0], 0);
        assert_eq!(wts[0], 1.0);
        // The bottom-right patch is the last of the last merge block: table row 8.
        let last = idx.len() - 4;
        let i = (0..4)
            .max_by(|&a, &b| wts[last + a].total_cmp(&wts[last + b]))
            .unwrap();
        assert_eq!((idx[last + i], wts[last + i]), (8, 1.0));
        // Merge-block order: patch 1 is (row 0, col 1), patch 2 is (row 1, col 0).
        // Row 1 of 4 maps to 2/3 of the way from table row 0 to 1.
        let p2 = &wts[8..12];
        assert!(
            (p2[0] - 1.0 / 3.0).abs() < 1e-6 && (p2[2] - 2.0 / 3.0).abs() < 1e-6,
            "{p2:?}"
        );
    }
}
