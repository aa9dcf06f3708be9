//! The lens on the CPU in f32: the layers' rows gathered until they fill a block, then one pass over
//! the vocabulary in cache-sized blocks, each block's logits from one GEMM (AMX's where the CPU has
//! it, models/amx.rs; candle's f32 GEMM otherwise) and reduced at once by every row's [`RowState`].

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::row::RowState;
use super::{with_cpu_f32, Lens};
use crate::error::Result;
use crate::models::amx;

/// Rows and vocabulary entries per block of logits on the CPU: `ROW_BLOCK × VOCAB_BLOCK × 4` bytes
/// (32 MB) stays in L3 between the GEMM that writes it and the reduction that reads it. Each block
/// of rows is one pass over the unembedding (467 MB for Qwen2-VL-2B's bf16 pieces), so fewer,
/// larger blocks read it from memory fewer times: the lens of a real-size Qwen2-VL-2B request
/// (29 layers × 418 rows), alternating, took 6565–6849 ms at 512 rows, 6417–6644 at 1024,
/// 6121–6311 at 2048, 6407–6503 at 4096 (bench/README.md, fifteenth session).
pub(super) const ROW_BLOCK: usize = 2048;

pub(super) const VOCAB_BLOCK: usize = 4096;

/// Logits held at once by [`final_cross_amx`] (16 MB): the whole vocabulary for up to 26 rows of
/// Qwen2-VL's 151936 entries, blocks of it for more.
pub(super) const CROSS_BLOCK_VALUES: usize = 4 << 20;

impl Lens<'_> {
    /// Reduces the waiting CPU layers' rows together, in blocks of rows that stay in cache, and
    /// records the layers in order. Equal blocks of at most ROW_BLOCK rows (2508 rows: 2 × 1254,
    /// not 2048 + 460: a thin GEMM runs well below the machine's rate).
    pub(super) fn reduce_cpu_pending(&mut self) -> Result<()> {
        if self.cpu_pending.is_empty() {
            return Ok(());
        }
        let mut plans = std::mem::take(&mut self.cpu_pending);
        let normed: Vec<Tensor> = plans
            .iter_mut()
            .map(|p| p.normed_rows.take().expect("planned rows"))
            .collect();
        let normed = if normed.len() == 1 {
            normed.into_iter().next().expect("one layer")
        } else {
            Tensor::cat(&normed, 0)?
        };
        let lens: Vec<usize> = plans.iter().map(|p| p.states.len()).collect();
        let mut states: Vec<RowState> = plans
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.states))
            .collect();
        let rows = states.len();
        let block_rows = rows.div_ceil(rows.div_ceil(ROW_BLOCK).max(1)).max(1);
        for start in (0..rows).step_by(block_rows) {
            let n = block_rows.min(rows - start);
            let block = normed.narrow(0, start, n)?;
            self.reduce_vocabulary(&block, &mut states[start..start + n])?;
        }
        let mut states = states.into_iter();
        for (mut plan, n) in plans.into_iter().zip(lens) {
            plan.states = states.by_ref().take(n).collect();
            self.record(plan, None)?;
        }
        Ok(())
    }

    /// Target logits per detailed row by direct dot products in f64; the reduction counts the
    /// entries above them.
    pub(super) fn target_logits(&self, n_block: &Tensor, detail: &[bool]) -> Result<Vec<Vec<f32>>> {
        let Some(w) = self.target_w.as_ref().filter(|_| detail.iter().any(|d| *d)) else {
            return Ok(vec![Vec::new(); detail.len()]);
        };
        let z = self
            .cap(
                n_block
                    .to_dtype(DType::F64)?
                    .matmul(&w.t()?)?
                    .to_dtype(DType::F32)?,
            )?
            .to_vec2::<f32>()?;
        Ok(z.into_iter()
            .zip(detail)
            .map(|(row, &d)| if d { row } else { Vec::new() })
            .collect())
    }

    /// One pass over the vocabulary in blocks: a GEMM, then one fused reduction of every row. The
    /// GEMM is AMX's where the head has the unembedding packed for it ([`amx`]), candle's f32
    /// GEMM otherwise ([`crate::models::gemm::matmul_nt`]: a few rows as `(w · xᵀ)ᵀ`).
    pub(super) fn reduce_vocabulary(
        &self,
        n_block: &Tensor,
        states: &mut [RowState],
    ) -> Result<()> {
        let vocab = self.unembed.dim(0)?;
        let reduce = |z: &[f32], v0: usize, vc: usize, states: &mut [RowState]| {
            z.par_chunks(vc)
                .zip(states.par_iter_mut())
                .for_each(|(row, st)| st.update(row, v0, &self.spec.targets, &self.spec.excluded));
        };
        if let (Some(packed), Some(rows)) = (self.amx, self.amx_rows(n_block)?) {
            let n = n_block.dim(0)?;
            let mut z = vec![0f32; n * VOCAB_BLOCK.min(vocab)];
            for v0 in (0..vocab).step_by(VOCAB_BLOCK) {
                let vc = VOCAB_BLOCK.min(vocab - v0);
                let z = &mut z[..n * vc];
                amx::matmul(&rows, packed, v0, vc, z);
                if self.head.softcap.is_some() {
                    let capped = self.cap(Tensor::from_slice(z, (n, vc), n_block.device())?)?;
                    with_cpu_f32(&capped, |z| reduce(z, v0, vc, states))?;
                } else {
                    reduce(z, v0, vc, states);
                }
            }
            return Ok(());
        }
        for v0 in (0..vocab).step_by(VOCAB_BLOCK) {
            let vc = VOCAB_BLOCK.min(vocab - v0);
            let w = self.unembed.narrow(0, v0, vc)?;
            let logits = self.cap(crate::models::gemm::matmul_nt(n_block, &w)?)?;
            with_cpu_f32(&logits, |z| reduce(z, v0, vc, states))?;
        }
        Ok(())
    }
}

/// `u = Wᵀ p / Σ p` ([`normalised`]) for each split row (`p = softmax` of its logits, given its log-sum-exp `lse`) on
/// the CPU with the packed unembedding: the logits again by AMX, block by block of the vocabulary,
/// each turned into probabilities in place and multiplied from the left into f64 sums
/// ([`amx::left_matmul_add`], from the packed bf16 pieces). Before, an f32 GEMV over the f32
/// unembedding took ~80 ms of the ~100 ms this took for one row of Qwen2-VL-2B, at every
/// generated token.
pub(super) fn final_cross_amx(
    split: &amx::SplitRows,
    packed: &amx::PackedWeight,
    lse: &[f32],
) -> Vec<Vec<f32>> {
    let (n, vocab, hidden) = (lse.len(), packed.out_dim(), packed.in_dim());
    let block = (CROSS_BLOCK_VALUES / n.max(1))
        .next_multiple_of(32)
        .min(vocab);
    let mut acc = vec![0f64; n * hidden];
    let mut sums = vec![0f64; n];
    let mut z = vec![0f32; n * block];
    for v0 in (0..vocab).step_by(block) {
        let vc = block.min(vocab - v0);
        let z = &mut z[..n * vc];
        amx::matmul(split, packed, v0, vc, z);
        z.par_chunks_mut(vc)
            .zip(lse)
            .zip(sums.par_iter_mut())
            .for_each(|((row, &l), sum)| {
                crate::models::fastmath::vectorised(
                    #[inline(always)]
                    || {
                        row.iter_mut()
                            .for_each(|x| *x = crate::models::fastmath::exp(*x - l))
                    },
                );
                *sum += row.iter().map(|&p| p as f64).sum::<f64>();
            });
        amx::left_matmul_add(z, n, packed, v0, vc, &mut acc);
    }
    normalised(acc, &sums, hidden)
}

/// Rows up to which [`final_cross_f32`] serves the final layer's `Wᵀ p_L` (a request's positions,
/// a generation step's answers); more rows go through candle's GEMMs. Each row's dot product and
/// sums stream through L2 for every vocabulary row, so more rows cost more than the second read of
/// the unembedding they save: llama-wide's lens (16-token prompt, no summary), GEMMs against this,
/// 8 rows 201–225 ms against 171–179, 12 rows 215–220 against 258–284, 16 rows 444–456 against
/// 489–500.
pub(super) const CROSS_F32_ROWS: usize = 8;

/// `u = Wᵀ p / Σ p` for each of a few `rows` (f32 on the CPU, `w` the f32 unembedding; `p =
/// softmax` of the row's logits, given its log-sum-exp `lse`; [`normalised`]), in one pass over
/// the unembedding: each vocabulary row `w_v` is read from memory once, for the rows' logits
/// `z = x·w_v` and, still in L1, for `u += e^(z − lse)·w_v`. Before, the logits came from a GEMM
/// over blocks of the vocabulary and `p · W` from another, which repacked each block: two reads
/// of the unembedding from memory, 46 ms of a generation step's ~105 ms lens for llama-wide
/// (32064 × 4096 f32, 525 MB).
pub(super) fn final_cross_f32(rows: &Tensor, w: &Tensor, lse: &[f32]) -> Result<Vec<Vec<f32>>> {
    let (n, hidden) = rows.dims2()?;
    let vocab = w.dim(0)?;
    if vocab == 0 || w.dim(1)? != hidden || lse.len() != n {
        return Err(crate::error::Error::Internal(format!(
            "lens: Wᵀ p for {n} rows of {hidden} with {} log-sum-exps over {:?}",
            lse.len(),
            w.dims()
        )));
    }
    let x: Vec<f32> = rows.flatten_all()?.to_vec1()?;
    // Vocabulary rows per task: its sums in f32, then added into the task's f64 ones.
    const BLOCK: usize = 256;
    let zeros = || (vec![0f64; n * hidden], vec![0f64; n]);
    let (acc, sums) = with_cpu_f32(w, |w| {
        (0..vocab.div_ceil(BLOCK))
            .into_par_iter()
            .fold(
                || (zeros(), vec![0f32; n * hidden]),
                |((mut acc, mut sums), mut part), b| {
                    part.fill(0.0);
                    crate::models::fastmath::vectorised(
                        #[inline(always)]
                        || {
                            for v in b * BLOCK..((b + 1) * BLOCK).min(vocab) {
                                let wv = &w[v * hidden..(v + 1) * hidden];
                                for r in 0..n {
                                    let z = dot(&x[r * hidden..(r + 1) * hidden], wv);
                                    let p = (z - lse[r]).exp();
                                    sums[r] += p as f64;
                                    let u = &mut part[r * hidden..(r + 1) * hidden];
                                    for (a, &y) in u.iter_mut().zip(wv) {
                                        *a += p * y;
                                    }
                                }
                            }
                        },
                    );
                    for (a, &y) in acc.iter_mut().zip(&part) {
                        *a += y as f64;
                    }
                    ((acc, sums), part)
                },
            )
            .map(|(acc_and_sums, _)| acc_and_sums)
            .reduce(zeros, |(mut a, mut s), (b, t)| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                s.iter_mut().zip(t).for_each(|(x, y)| *x += y);
                (a, s)
            })
    })?;
    Ok(normalised(acc, &sums, hidden))
}

/// `a · b` in 16 f32 lanes (vectorised where the caller is, [`crate::models::fastmath::vectorised`];
/// 64 lanes, four AVX-512 accumulators, measured slower: 8 rows' lens on llama-wide 152–156 ms with
/// the GEMMs, 171–179 with 16 lanes, 196–211 with 64).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut s = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            s[i] += x[i] * y[i];
        }
    }
    s.iter().sum::<f32>() + tail
}

/// Each row's `Σ p_v w_v` divided by its `Σ p_v`: `p = e^(z − lse)` sums to 1 only to the
/// rounding of the f32 log-sum-exp (an ulp of a logit of 500 is 3e-5, and `p` is off by that
/// factor), and KL's cross term `(Wᵀ p_L)·n` carries that error times the logits' size (1e-2 on
/// llama-wide's peaked rows). Dividing by the sum takes the common factor out.
fn normalised(acc: Vec<f64>, sums: &[f64], hidden: usize) -> Vec<Vec<f32>> {
    acc.chunks_exact(hidden)
        .zip(sums)
        .map(|(u, &s)| u.iter().map(|&x| (x / s) as f32).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `Wᵀ p / Σ p` in one pass equals the expectation of the unembedding's rows under the rows'
    /// softmax, computed in f64, and does so even when the log-sum-exp it is given is off (as the
    /// f32 one is, by an ulp of the logits): the sum it divides by takes the error out.
    #[test]
    fn the_final_cross_term_is_the_expectation_under_the_softmax() {
        let (vocab, hidden, n) = (1000, 40, 3);
        let w = Tensor::randn(0f32, 0.5, (vocab, hidden), &Device::Cpu).unwrap();
        let rows = Tensor::randn(0f32, 1.0, (n, hidden), &Device::Cpu).unwrap();
        let (w64, x64) = (
            w.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
            rows.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
        );
        let mut lse = Vec::new();
        let mut want = Vec::new();
        for x in &x64 {
            let z: Vec<f64> = w64
                .iter()
                .map(|wv| wv.iter().zip(x).map(|(a, b)| a * b).sum())
                .collect();
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
            lse.push(m + s.ln());
            let mut u = vec![0f64; hidden];
            for (wv, zv) in w64.iter().zip(&z) {
                let p = (zv - m).exp() / s;
                u.iter_mut().zip(wv).for_each(|(a, b)| *a += p * b);
            }
            want.push(u);
        }
        for off in [0.0, 0.01] {
            let lse: Vec<f32> = lse.iter().map(|&l| (l + off) as f32).collect();
            let got = final_cross_f32(&rows, &w, &lse).unwrap();
            for (g, u) in got.iter().zip(&want) {
                for (a, b) in g.iter().zip(u) {
                    assert!((*a as f64 - b).abs() < 1e-5, "lse off by {off}: {a} vs {b}");
                }
            }
        }
    }
}
