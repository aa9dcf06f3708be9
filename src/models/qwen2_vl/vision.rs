//! Qwen2-VL's vision tower (`Qwen2VisionTransformerPretrainedModel`): a Conv3d patch embedding
//! (a single matmul, since kernel = stride and the input is already one patch per row), 2-D
//! rotary attention restricted to each image, QuickGELU MLPs, and the 2×2 patch merger.

use candle_core::Tensor;

use super::config::VisionConfig;
use crate::error::Result;
use crate::models::fused;
use crate::models::layers::{attention, inv_freq, rope_in_f32, Activation, LayerNorm, Linear};
use crate::models::profile;
use crate::models::snapshot::Prefixed;
use crate::models::ImageFeatures;

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

/// A Qwen-VL vision tower as the model uses it: the patches of several images in (each
/// `[n, C·T·P·P]` with its grid `(t, h, w)`), each image's merged features out, what it gets alone.
pub trait Encoder: Send + Sync {
    fn forward_many(&self, images: &[(&Tensor, [usize; 3])]) -> Result<Vec<ImageFeatures>>;
    /// How many DeepStack feature sets each image brings (Qwen3-VL); 0 for the others.
    fn deepstack_blocks(&self) -> usize {
        0
    }
}

impl Encoder for VisionTower {
    fn forward_many(&self, images: &[(&Tensor, [usize; 3])]) -> Result<Vec<ImageFeatures>> {
        Ok(VisionTower::forward_many(self, images)?
            .into_iter()
            .map(ImageFeatures::from)
            .collect())
    }
}

/// The images' patches as a Qwen-VL tower takes them: each image's number of patch rows, and all
/// of them in one `[Σ rows, C·T·P·P]` tensor on `dev` in `dtype` (transformers concatenates them).
pub fn packed_pixels(
    images: &[(&Tensor, [usize; 3])],
    dev: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<(Vec<usize>, Tensor)> {
    let rows = images
        .iter()
        .map(|(px, _)| px.dim(0))
        .collect::<candle_core::Result<_>>()?;
    let pixels: Vec<Tensor> = images
        .iter()
        .map(|(px, _)| px.to_device(dev)?.to_dtype(dtype))
        .collect::<candle_core::Result<_>>()?;
    Ok((rows, Tensor::cat(&pixels, 0)?))
}

/// Attention segments of the packed patches: one per frame of each image (`cu_seqlens`).
pub fn frame_segments(images: &[(&Tensor, [usize; 3])]) -> Vec<usize> {
    images
        .iter()
        .flat_map(|(_, g)| std::iter::repeat_n(g[1] * g[2], g[0]))
        .collect()
}

/// The merged features of the packed images (`[Σ rows / unit, …]`, `unit` patches merged into
/// one) back into each image's.
pub fn split_per_image(merged: &Tensor, rows: &[usize], unit: usize) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut at = 0;
    for r in rows {
        out.push(merged.narrow(0, at, r / unit)?);
        at += r / unit;
    }
    Ok(out)
}

/// Rotary tables `[n, head_dim/2]` for the patches of one image in pixel-row order
/// (merge-block-major): angles `[row·f, col·f]` with `f` the `head_dim/2` frequencies, f32.
pub fn rotary_tables(
    grid: [usize; 3],
    merge: usize,
    head_dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let m = merge;
    let freqs = inv_freq(theta, head_dim / 2);
    let [t, gh, gw] = grid;
    let half = head_dim / 2;
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
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
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

    fn rotary(&self, grid: [usize; 3]) -> Result<(Tensor, Tensor)> {
        rotary_tables(
            grid,
            self.cfg.spatial_merge_size,
            self.cfg.head_dim(),
            ROPE_THETA,
            self.patch_embed.device(),
        )
    }

    /// `pixel_values` `[n, C·T·P·P]` for one image with grid `(t, h, w)` → merged features
    /// `[n / merge², hidden_size]`.
    pub fn forward(&self, pixel_values: &Tensor, grid: [usize; 3]) -> Result<Tensor> {
        let mut out = self.forward_many(&[(pixel_values, grid)])?;
        Ok(out.remove(0))
    }

    /// Several images in one pass, as transformers batches them: their patches concatenated, every
    /// linear layer, norm and MLP over all rows at once, attention within each image's frames
    /// (`cu_seqlens`). Entry i: image i's merged features `[n_i / merge², hidden_size]`, the same
    /// as it gets alone.
    pub fn forward_many(&self, images: &[(&Tensor, [usize; 3])]) -> Result<Vec<Tensor>> {
        let dtype = self.patch_embed.dtype();
        let dev = self.patch_embed.device().clone();
        let (heads, e) = (self.cfg.num_heads, self.cfg.embed_dim);
        let (rows, pixels) = packed_pixels(images, &dev, dtype)?;
        let n: usize = rows.iter().sum();
        let segments = frame_segments(images);
        let mut x = profile::op("vision patch embed", &dev, || {
            crate::models::gemm::matmul(&pixels, &self.patch_embed.t()?)
        })?;
        let tables: Vec<(Tensor, Tensor)> = images
            .iter()
            .map(|(_, g)| self.rotary(*g))
            .collect::<Result<_>>()?;
        let (cos, sin): (Vec<Tensor>, Vec<Tensor>) = tables.into_iter().unzip();
        let (cos, sin) = (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?);
        for b in &self.blocks {
            let h = profile::op("vision norm", &dev, || b.norm1.forward(&x))?;
            x = (&x + attention_block(&b.qkv, &b.proj, &h, (&cos, &sin), &segments, heads)?)?;
            let h = profile::op("vision norm", &dev, || b.norm2.forward(&x))?;
            x = profile::op("vision mlp + residual", &dev, || {
                Ok((&x + b.fc2.forward(&self.act.forward(&b.fc1.forward(&h)?)?)?)?)
            })?;
        }
        let m2 = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        // Merge groups are 4 consecutive rows of one image (each image's rows are a multiple of 4).
        let merged = profile::op("vision merger", &dev, || {
            let x = self.ln_q.forward(&x)?.reshape((n / m2, e * m2))?;
            let x = Activation::Gelu.forward(&self.merger_fc1.forward(&x)?)?;
            self.merger_fc2.forward(&x)
        })?;
        split_per_image(&merged, &rows, m2)
    }
}

/// A Qwen-VL vision block's attention over `h` (`[n, embed]`, normed): the q/k/v projection, 2-D
/// RoPE in f32 (q and k rotated together, as transformers does, then back to the working dtype),
/// attention within each of `segments` (consecutive rows), the output projection.
pub fn attention_block(
    qkv: &Linear,
    proj: &Linear,
    h: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    segments: &[usize],
    heads: usize,
) -> Result<Tensor> {
    let dev = h.device().clone();
    let (n, e) = h.dims2()?;
    let hd = e / heads;
    let qkv = profile::op("vision qkv", &dev, || {
        Ok(qkv
            .forward(h)?
            .reshape((n, 3, heads, hd))?
            .permute((1, 2, 0, 3))?) // [3, heads, n, hd]
    })?;
    let qk = profile::op("vision rope", &dev, || {
        rope_in_f32(&qkv.narrow(0, 0, 2)?, cos, sin)
    })?;
    let (q, k) = (qk.get(0)?.unsqueeze(0)?, qk.get(1)?.unsqueeze(0)?);
    let v = qkv.get(2)?.unsqueeze(0)?;
    let o = profile::op("vision attention", &dev, || {
        segmented_attention(&q, &k, &v, segments, (hd as f64).powf(-0.5))
    })?;
    profile::op("vision proj", &dev, || proj.forward(&o))
}

/// Attention restricted to consecutive segments of the sequence (transformers' `cu_seqlens`).
/// `q`, `k`, `v`: `[1, heads, n, hd]`; returns `[n, heads·hd]`. Runs of equal-length segments
/// (the same image size from several requests) go through attention together, as a batch
/// ([`attention`] slices it within its memory budget).
pub fn segmented_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[usize],
    scale: f64,
) -> Result<Tensor> {
    let flash = fused::flash::wanted(q)?;
    segmented_attention_with(q, k, v, segments, scale, flash)
}

/// [`segmented_attention`], with flash attention or op by op (`flash`; the tests run its CPU twin).
fn segmented_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[usize],
    scale: f64,
    flash: bool,
) -> Result<Tensor> {
    let (_, heads, n, hd) = q.dims4()?;
    // Flash attention reads each run of equal segments in place (an offset and a batch stride).
    let mut outs = Vec::new();
    let (mut at, mut i) = (0, 0);
    while i < segments.len() {
        let len = segments[i];
        let r = segments[i..].iter().take_while(|&&l| l == len).count();
        let views = [q, k, v].map(fused::flash::View::of);
        if let (true, [Some(qv), Some(kv), Some(vv)]) = (flash, views) {
            let run = |w: fused::flash::View| fused::flash::View {
                offset: at * w.token,
                batch: len * w.token,
                ..w
            };
            let dims = fused::flash::Dims {
                batch: r,
                heads,
                kv_heads: heads,
                queries: len,
                keys: len,
                head_dim: hd,
            };
            let a = profile::op("  attention: flash", q.device(), || {
                let (qa, ka, va) = ((q, run(qv)), (k, run(kv)), (v, run(vv)));
                Ok(if q.device().is_cpu() {
                    // The CPU twin of the flash kernel (the tests).
                    Some(fused::flash::flash_attention(
                        qa, ka, va, dims, false, scale,
                    )?)
                } else {
                    fused::flash::fused_attention(qa, ka, va, dims, false, scale)?
                })
            })?; // [r, len, heads, hd]
            if let Some(a) = a {
                outs.push(a.reshape((r * len, heads * hd))?);
                at += r * len;
                i += r;
                continue;
            }
        }
        // [1, heads, r·len, hd] → [r, heads, len, hd]
        let part = |t: &Tensor| -> Result<Tensor> {
            let t = t.narrow(2, at, r * len)?;
            Ok(if r == 1 {
                t
            } else {
                t.squeeze(0)?
                    .reshape((heads, r, len, hd))?
                    .transpose(0, 1)?
            })
        };
        let a = attention(&part(q)?, &part(k)?, &part(v)?, None, scale)?; // [r, heads, len, hd]
        outs.push(a.transpose(1, 2)?.reshape((r * len, heads * hd))?);
        at += r * len;
        i += r;
    }
    if at != n {
        return Err(crate::Error::Internal(format!(
            "vision attention: segments cover {at} of {n} patches"
        )));
    }
    Ok(Tensor::cat(&outs, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Each segment alone through attention, as transformers' loop over `cu_seqlens` does.
    fn one_by_one(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[usize]) -> Tensor {
        let (_, heads, _, hd) = q.dims4().unwrap();
        let mut outs = Vec::new();
        let mut at = 0;
        for &len in segments {
            let part = |t: &Tensor| t.narrow(2, at, len).unwrap();
            let a = attention(&part(q), &part(k), &part(v), None, 0.25).unwrap();
            outs.push(
                a.squeeze(0)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .reshape((len, heads * hd))
                    .unwrap(),
            );
            at += len;
        }
        Tensor::cat(&outs, 0).unwrap()
    }

    #[test]
    fn segments_batched_in_runs_equal_segments_one_by_one() {
        let dev = Device::Cpu;
        let segments = [12, 12, 12, 7, 12, 12, 5];
        let n: usize = segments.iter().sum();
        let r = |_| Tensor::randn(0f32, 1.0, (1, 3, n, 8), &dev).unwrap();
        let (q, k, v) = (r(0), r(1), r(2));
        let want = one_by_one(&q, &k, &v, &segments);
        let got = segmented_attention(&q, &k, &v, &segments, 0.25).unwrap();
        assert_eq!(got.dims(), &[n, 24]);
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        // Segments that do not cover the sequence are refused.
        assert!(segmented_attention(&q, &k, &v, &[12, 12], 0.25).is_err());
    }

    /// Flash attention's path (its CPU twin here): each run of equal segments read in place
    /// through an offset and a batch stride, from q and k rotated together and v a view of the
    /// packed q/k/v heads, as the tower passes them; the same answer as op by op.
    #[test]
    fn segments_through_flash_attention_equal_op_by_op() {
        let dev = Device::Cpu;
        let segments = [12, 12, 7, 12, 12, 12, 5];
        let n: usize = segments.iter().sum();
        let (heads, hd) = (2, 64);
        let dtype = candle_core::DType::BF16;
        let packed = Tensor::randn(0f32, 1.0, (n, 3, heads, hd), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .permute((1, 2, 0, 3))
            .unwrap(); // [3, heads, n, hd], strided
        let qk = packed.narrow(0, 0, 2).unwrap().contiguous().unwrap();
        let (q, k) = (
            qk.get(0).unwrap().unsqueeze(0).unwrap(),
            qk.get(1).unwrap().unsqueeze(0).unwrap(),
        );
        let v = packed.get(2).unwrap().unsqueeze(0).unwrap();
        let want = segmented_attention_with(&q, &k, &v, &segments, 0.125, false).unwrap();
        let got = segmented_attention_with(&q, &k, &v, &segments, 0.125, true).unwrap();
        assert_eq!(got.dims(), want.dims());
        let f = |t: &Tensor| {
            t.to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (g, w) = (f(&got), f(&want));
        let differ = g.iter().zip(&w).filter(|(a, b)| a != b).count();
        let max = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // The same roundings; only the order of f32 sums differs.
        assert!(differ * 20 <= g.len(), "{differ}/{} differ", g.len());
        assert!(max < 0.02, "{max}");
    }
}
