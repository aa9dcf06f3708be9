//! The logit lens, model-agnostic: every layer's residual stream is read through the model's own
//! final norm and unembedding, `p = softmax(lm_head(final_norm(h)))`, in f32.
//!
//! The vocabulary is large (152k for Qwen2) and the summary needs every position of every layer,
//! so logits are produced a block of rows at a time and reduced at once (max, sum of exponentials,
//! entropy, top-k, targets) in one fused pass; no `[layers × positions × vocab]` tensor exists.
//! KL to the final layer is recovered without keeping any earlier layer's distribution:
//! `KL(p_L ‖ p_l) = lse_l − (Wᵀ p_L)·n_l − H(p_L)`, where `n_l` is the normed hidden state.

use std::time::Instant;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::models::{LayerObserver, LensHead};

/// What to compute, resolved against one input sequence.
#[derive(Clone, Debug)]
pub struct LensSpec {
    /// Positions to report, in the order the caller asked for them.
    pub positions: Vec<usize>,
    /// Lens layers to report (0..=num_layers), ascending.
    pub layers: Vec<usize>,
    pub top_k: usize,
    /// Token ids whose probability and rank are traced.
    pub targets: Vec<u32>,
    /// Mean over all positions of the highest probability, per layer.
    pub summary: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PositionStats {
    pub position: usize,
    /// `(id, prob, logit)`, most probable first.
    pub top: Vec<(u32, f32, f32)>,
    pub entropy: f32,
    pub kl_to_final: f32,
    /// `(prob, rank)` per target, rank 1 = most probable.
    pub targets: Vec<(f32, usize)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    pub mean_max_prob: Option<f32>,
    pub positions: Vec<PositionStats>,
}

/// Rows of logits reduced at a time: enough for the GEMM to run at full speed, small enough that
/// the block (rows × vocab × 4 bytes) stays tens of MB.
const ROW_BLOCK: usize = 64;

/// Collects the lens as the forward pass produces layers.
pub struct Lens<'a> {
    head: &'a LensHead,
    unembed: Tensor,
    spec: &'a LensSpec,
    num_layers: usize,
    layers: Vec<LayerStats>,
    /// Per reported layer and position: log-sum-exp and the normed hidden state, for KL.
    kl_parts: Vec<Vec<(f32, Vec<f32>)>>,
    /// From the final layer, per position: `Wᵀ p_L` and `H(p_L)`.
    final_parts: Option<Vec<(Vec<f32>, f32)>>,
    pub seconds: f64,
}

impl<'a> Lens<'a> {
    pub fn new(head: &'a LensHead, spec: &'a LensSpec, num_layers: usize) -> Result<Self> {
        if spec.top_k == 0 {
            return Err(Error::InvalidOption("top_k must be at least 1".into()));
        }
        Ok(Lens {
            head,
            unembed: head.unembed.to_dtype(DType::F32)?,
            spec,
            num_layers,
            layers: Vec::new(),
            kl_parts: Vec::new(),
            final_parts: None,
            seconds: 0.0,
        })
    }

    /// The finished lens, one entry per requested layer.
    pub fn finish(mut self) -> Result<Vec<LayerStats>> {
        let finals = self
            .final_parts
            .take()
            .ok_or_else(|| Error::Internal("the forward pass stopped before the last layer".into()))?;
        for (layer, parts) in self.layers.iter_mut().zip(&self.kl_parts) {
            if layer.layer == self.num_layers {
                continue; // KL of the final distribution to itself: exactly 0.
            }
            for ((pos, (lse, n)), (u, h_final)) in layer.positions.iter_mut().zip(parts).zip(&finals) {
                let dot: f64 = u.iter().zip(n).map(|(a, b)| *a as f64 * *b as f64).sum();
                pos.kl_to_final = ((*lse as f64 - dot - *h_final as f64) as f32).max(0.0);
            }
        }
        Ok(self.layers)
    }

    fn process(&mut self, index: usize, hidden: &Tensor) -> Result<()> {
        let report = self.spec.layers.binary_search(&index).is_ok();
        let is_final = index == self.num_layers;
        if !report && !is_final {
            return Ok(());
        }
        let seq = hidden.dim(0)?;
        if let Some(&p) = self.spec.positions.iter().find(|&&p| p >= seq) {
            return Err(Error::Unprocessable(format!("position {p} is past the end of the {seq}-token input")));
        }
        let normed = self.head.norm.forward(hidden)?.to_dtype(DType::F32)?;
        // Which rows to run through the unembedding: all of them for the summary, else only the
        // requested positions.
        let summary = report && self.spec.summary;
        let rows: Vec<usize> = if summary { (0..seq).collect() } else { self.spec.positions.clone() };
        // For each computed row, the index of the requested position it serves (if any).
        let mut wanted: Vec<Vec<usize>> = vec![Vec::new(); rows.len()];
        for (k, &p) in self.spec.positions.iter().enumerate() {
            let r = if summary { p } else { k };
            wanted[r].push(k);
        }
        let mut max_prob_sum = 0f64;
        let mut per_pos: Vec<Option<(RowStats, Vec<f32>)>> = vec![None; self.spec.positions.len()];
        let mut finals: Vec<Option<(Vec<f32>, f32)>> = vec![None; self.spec.positions.len()];
        for start in (0..rows.len()).step_by(ROW_BLOCK) {
            let block = &rows[start..(start + ROW_BLOCK).min(rows.len())];
            let idx = Tensor::from_vec(block.iter().map(|&r| r as u32).collect::<Vec<_>>(), block.len(), normed.device())?;
            let n_block = normed.index_select(&idx, 0)?;
            let logits = n_block.matmul(&self.unembed.t()?)?.to_device(&candle_core::Device::Cpu)?;
            let logits = logits.flatten_all()?.to_vec1::<f32>()?;
            let vocab = self.unembed.dim(0)?;
            let detail: Vec<bool> = (0..block.len()).map(|i| !wanted[start + i].is_empty()).collect();
            let stats: Vec<RowStats> = logits
                .par_chunks(vocab)
                .zip(detail.par_iter())
                .map(|(z, &d)| row_stats(z, if d { self.spec.top_k } else { 0 }, if d { &self.spec.targets } else { &[] }))
                .collect();
            let n_rows = if detail.iter().any(|d| *d) { Some(n_block.to_vec2::<f32>()?) } else { None };
            for (i, st) in stats.into_iter().enumerate() {
                max_prob_sum += (st.max - st.lse).exp() as f64;
                if is_final && detail[i] {
                    // u = Wᵀ p_L for this row, H(p_L).
                    let z = &logits[i * vocab..(i + 1) * vocab];
                    let p: Vec<f32> = z.iter().map(|v| (v - st.lse).exp()).collect();
                    let p = Tensor::from_vec(p, (1, vocab), &candle_core::Device::Cpu)?;
                    let u = p.matmul(&self.unembed.to_device(&candle_core::Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>()?;
                    for &k in &wanted[start + i] {
                        finals[k] = Some((u.clone(), st.entropy));
                    }
                }
                if let Some(n_rows) = &n_rows {
                    for &k in &wanted[start + i] {
                        per_pos[k] = Some((st.clone(), n_rows[i].clone()));
                    }
                }
            }
        }
        if is_final {
            self.final_parts = Some(finals.into_iter().map(|f| f.unwrap_or_default()).collect());
        }
        if report {
            let mut positions = Vec::with_capacity(per_pos.len());
            let mut parts = Vec::with_capacity(per_pos.len());
            for (k, entry) in per_pos.into_iter().enumerate() {
                let (st, n) = entry.ok_or_else(|| Error::Internal("a requested position was not computed".into()))?;
                positions.push(PositionStats {
                    position: self.spec.positions[k],
                    top: st.top,
                    entropy: st.entropy,
                    kl_to_final: 0.0,
                    targets: st.targets,
                });
                parts.push((st.lse, n));
            }
            self.layers.push(LayerStats {
                layer: index,
                mean_max_prob: summary.then(|| (max_prob_sum / seq as f64) as f32),
                positions,
            });
            self.kl_parts.push(parts);
        }
        Ok(())
    }
}

impl LayerObserver for Lens<'_> {
    fn observe(&mut self, index: usize, hidden: &Tensor) -> Result<()> {
        let t = Instant::now();
        let r = self.process(index, hidden);
        self.seconds += t.elapsed().as_secs_f64();
        r
    }
}

#[derive(Clone, Debug, Default)]
struct RowStats {
    max: f32,
    lse: f32,
    entropy: f32,
    top: Vec<(u32, f32, f32)>,
    targets: Vec<(f32, usize)>,
}

/// One fused reduction of a row of logits: max, log-sum-exp, entropy, top-k and target ranks.
fn row_stats(z: &[f32], top_k: usize, targets: &[u32]) -> RowStats {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (s, t) = kernels::sum_exp(z, max);
    let lse = max + (s.ln() as f32);
    // H = lse − Σ p z = lse − max − t/s, where t = Σ e^(z−max)(z−max).
    let entropy = ((s.ln()) - t / s) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_k + 1);
    if top_k > 0 {
        for (i, &v) in z.iter().enumerate() {
            if top.len() < top_k || v > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, w)| w >= v);
                top.insert(at, (i as u32, v));
                top.truncate(top_k);
            }
        }
    }
    let targets = targets
        .iter()
        .map(|&id| {
            let v = z.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
            let rank = 1 + z.iter().filter(|&&w| w > v).count();
            ((v - lse).exp(), rank)
        })
        .collect();
    RowStats {
        max,
        lse,
        entropy: entropy.max(0.0),
        top: top.into_iter().map(|(id, v)| (id, (v - lse).exp(), v)).collect(),
        targets,
    }
}

mod kernels {
    //! The one hot loop of the lens: `Σ e^(z−m)` and `Σ e^(z−m)(z−m)` over a vocabulary row,
    //! with a branch-free exp the compiler vectorises (AVX2+FMA when the CPU has them).

    /// Cody–Waite range reduction plus a degree-6 polynomial; relative error ~2 ulp for the
    /// inputs here (x ≤ 0), exact 0 below −87.
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = x.max(-87.0);
        let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0; // round to nearest
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.0 + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
        let bits = ((n as i32 + 127) << 23) as u32;
        p * f32::from_bits(bits)
    }

    #[inline(always)]
    fn sum_exp_generic(z: &[f32], m: f32) -> (f64, f64) {
        const LANES: usize = 16;
        let mut s = [0f32; LANES];
        let mut t = [0f32; LANES];
        let chunks = z.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                let d = c[i] - m;
                let e = exp(d);
                s[i] += e;
                t[i] += e * d;
            }
        }
        let mut s_tot: f64 = s.iter().map(|&v| v as f64).sum();
        let mut t_tot: f64 = t.iter().map(|&v| v as f64).sum();
        for &v in rest {
            let d = v - m;
            let e = exp(d);
            s_tot += e as f64;
            t_tot += (e * d) as f64;
        }
        (s_tot, t_tot)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_exp_avx2(z: &[f32], m: f32) -> (f64, f64) {
        sum_exp_generic(z, m)
    }

    pub fn sum_exp(z: &[f32], m: f32) -> (f64, f64) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected on this CPU.
            return unsafe { sum_exp_avx2(z, m) };
        }
        sum_exp_generic(z, m)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn fast_exp_is_accurate_over_the_range_used() {
            let mut worst = 0f32;
            let mut x = -80.0f32;
            while x <= 0.0 {
                let rel = ((super::exp(x) - x.exp()) / x.exp()).abs();
                worst = worst.max(rel);
                x += 0.001;
            }
            assert!(worst < 5e-7, "worst relative error {worst}");
            assert_eq!(super::exp(-1000.0), 0.0f32.max(super::exp(-87.0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_stats_match_a_direct_softmax() {
        let z: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let m = z.iter().copied().fold(f32::MIN, f32::max);
        let s: f64 = z.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let p: Vec<f64> = z.iter().map(|&v| ((v - m) as f64).exp() / s).collect();
        let h: f64 = -p.iter().map(|&q| if q > 0.0 { q * q.ln() } else { 0.0 }).sum::<f64>();
        let st = row_stats(&z, 3, &[5, 999]);
        assert!((st.entropy as f64 - h).abs() < 1e-5, "{} vs {h}", st.entropy);
        assert!((st.lse as f64 - (m as f64 + s.ln())).abs() < 1e-5);
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
        assert_eq!(st.top.iter().map(|t| t.0 as usize).collect::<Vec<_>>(), order[..3].to_vec());
        for (k, &id) in [5usize, 999].iter().enumerate() {
            let rank = 1 + z.iter().filter(|&&w| w > z[id]).count();
            assert_eq!(st.targets[k].1, rank);
            assert!((st.targets[k].0 as f64 - p[id]).abs() < 1e-6);
        }
    }
}
