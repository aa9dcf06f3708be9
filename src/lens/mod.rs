//! The logit lens, model-agnostic: every layer's residual stream is read through the model's own
//! final norm and unembedding, `p = softmax(lm_head(final_norm(h)))`, in f32.
//!
//! The vocabulary is large (152k for Qwen2) and the summary needs every position of every layer,
//! so logits are produced a block of rows at a time and reduced at once (max, sum of exponentials,
//! entropy, top-k, targets) in one fused pass; no `[layers × positions × vocab]` tensor exists.
//! KL to the final layer is recovered without keeping any earlier layer's distribution:
//! `KL(p_L ‖ p_l) = lse_l − (Wᵀ p_L)·n_l − H(p_L)`, where `n_l` is the normed hidden state.
//! (Soft-capped logits, Gemma 2's, are not linear in `n_l`: there the cross term `Σ p_L z_l` is
//! recomputed at the end from the requested rows, one more pass over the vocabulary for them.)
//!
//! Two ways to run it, same numbers (a test compares them): on the CPU in f32, the layers' rows as
//! they arrive, gathered until they fill a block (a short input's layers then share one pass over
//! the unembedding), GEMMs over cache-sized vocabulary blocks (on AMX tiles where the CPU has them:
//! models/amx.rs, still f32) feeding one fused pass per row; elsewhere (the
//! GPU, half precision), each layer's work is queued on the device as the layer arrives (layers of
//! few rows together, once they fill a chunk: GEMMs over vocabulary tiles and one kernel, cuda.rs,
//! folding each tile's max and sum-exp into the rows'), only
//! its small results are kept (per row max and sum; the requested normed rows, for KL), and the
//! host collects them once at the end, so that the forward pass never waits on the host and no
//! layer's normed rows outlive it. The rows that want top-k and ranks are reduced there too, tile
//! by tile, to a few numbers each (row.rs's `TilePart`; on CUDA one kernel, so that no row of
//! logits leaves the card; elsewhere, and with `LOGIT_LENS_DEVICE_DETAIL=0`, its host twin).
//!
//! Here: what each layer needs ([`Lens::plan`]) and how it is reported ([`Lens::record`], KL in
//! [`Lens::finish`]); `cpu.rs` and `device.rs`: the two ways; `row.rs`: one row's reduction.

use std::time::Instant;

use candle_core::{DType, Tensor};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod row;

use cpu::{final_cross_amx, final_cross_f32, CROSS_F32_ROWS, ROW_BLOCK, VOCAB_BLOCK};
use device::{row_chunk_from_env, vocab_tile_from_env, DEVICE_VOCAB_BLOCK, PENDING_PART_BYTES};
pub use device::{DEVICE_ROWS, DEVICE_VOCAB_TILE};

/// Each row's argmax of `logits` `[rows, vocab]` where they live, the lowest id among equal maxima:
/// on CUDA one kernel (the detail rows' own, k = 1), so that only the ids come to the host; None
/// elsewhere (the caller reduces on the host).
pub fn argmax_on_device(logits: &Tensor) -> Result<Option<Vec<u32>>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return Ok(cuda::argmax_rows(logits)?);
    }
    let _ = logits;
    Ok(None)
}
use row::RowState;

use crate::error::{Error, Result};
use crate::models::{amx, profile, LayerObserver, LensHead};

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
    /// Ids never reported in top-k (indexed by id; empty = none). Probabilities, entropy, KL
    /// and ranks still cover the whole vocabulary.
    pub excluded: Vec<bool>,
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

/// Collects the lens as the forward pass produces layers.
pub struct Lens<'a> {
    head: &'a LensHead,
    unembed: Tensor,
    spec: &'a LensSpec,
    num_layers: usize,
    layers: Vec<LayerStats>,
    /// Per reported layer and position: log-sum-exp and the normed hidden state, for KL.
    kl_parts: Vec<Vec<(f32, Vec<f32>)>>,
    /// From the final layer, per position: `Wᵀ p_L` (empty with soft-capping) and `H(p_L)`.
    final_parts: Option<Vec<(Vec<f32>, f32)>>,
    /// With soft-capping: the final layer's requested normed rows and their log-sum-exps.
    final_rows: Option<(Tensor, Vec<f32>)>,
    pub seconds: f64,
    /// Use the tensor-operation reduction even on the CPU (tests compare the two paths).
    tensor_path: bool,
    /// Tensor path: layers whose reduction is queued on the device, collected in `finish` (no
    /// host round trip per layer while the forward pass is running).
    pending: Vec<LayerPlan>,
    /// Tensor path: layers whose GEMMs wait for the next layers' rows to fill a chunk of
    /// `row_chunk` rows, then run as one pass over the unembedding. A generation step's few rows
    /// a layer (one per answer) would otherwise read the whole unembedding once per layer (29 ×
    /// 467 MB for Qwen2-VL-2B a step), in ~30 launches each.
    device_queue: Vec<LayerPlan>,
    /// Tensor path: vocabulary entries per unembedding GEMM (0: the whole vocabulary at once).
    vocab_tile: usize,
    /// Tensor path: rows per unembedding GEMM.
    row_chunk: usize,
    /// CPU path: layers waiting to be reduced together, so that a short input's layers share one
    /// pass over the unembedding (each pass reads all of it: 311 MB for a 152k × 512 f32 matrix,
    /// which dominates when a layer has tens of rows). Reduced once they hold `ROW_BLOCK` rows,
    /// and in `finish`.
    cpu_pending: Vec<LayerPlan>,
    /// The targets' unembedding rows `[targets, hidden]` in f64 (their logits are exact dot
    /// products), taken once.
    target_w: Option<Tensor>,
    /// CPU path: the unembedding packed for AMX, where the head has it.
    amx: Option<&'a amx::PackedWeight>,
    /// Per requested position, the targets it traces (indices into the spec's `targets`), where
    /// they differ by position ([`Self::with_position_targets`]); else every one everywhere.
    position_targets: Option<Vec<Vec<usize>>>,
    /// Tensor path: collect `pending` once its detail rows' tile parts pass this many bytes.
    pending_part_bytes: usize,
    /// On CUDA, what the detail rows' kernel reads besides the logits (cuda.rs, `detail_keys`),
    /// made when a detail row first reaches it. None inside: the detail rows are reduced on the
    /// host (`LOGIT_LENS_DEVICE_DETAIL=0`, or a top-k past the kernel's bound).
    #[cfg(feature = "cuda")]
    device_keys: std::sync::OnceLock<Option<Tensor>>,
}

/// One lens layer's work: the normed rows to read out and their running reductions.
struct LayerPlan {
    index: usize,
    report: bool,
    is_final: bool,
    summary: bool,
    seq: usize,
    /// Normed residual rows `[rows, hidden]` in the model dtype: every position for the summary,
    /// else the requested ones (dropped once the tensor path has queued their GEMMs).
    normed_rows: Option<Tensor>,
    /// The requested rows of `normed_rows` (for KL and the final layer's parts).
    requested_rows: Tensor,
    /// Tensor path, on the device until `finish`: per row `[max, Σ e^(z − max)]` (`[rows, 2]`
    /// f32), and per row that wants detail (top-k, ranks), in row order, its reduction of each
    /// vocabulary tile in turn (`[rows, tiles × width]`, row.rs's `TilePart`).
    device_sums: Option<Tensor>,
    device_detail: Option<Tensor>,
    /// Tensor path: the targets' logits at the requested rows `[requested, targets]` (f32).
    device_targets: Option<Tensor>,
    /// Per requested position, its row in `normed_rows`.
    requested: Vec<usize>,
    states: Vec<RowState>,
}

impl<'a> Lens<'a> {
    pub fn new(head: &'a LensHead, spec: &'a LensSpec, num_layers: usize) -> Result<Self> {
        if spec.top_k == 0 {
            return Err(Error::InvalidOption("top_k must be at least 1".into()));
        }
        let target_w = if spec.targets.is_empty() {
            None
        } else {
            let ids = Tensor::from_slice(&spec.targets, spec.targets.len(), head.unembed.device())?;
            Some(head.unembed.index_select(&ids, 0)?.to_dtype(DType::F64)?)
        };
        Ok(Lens {
            head,
            unembed: head.unembed.clone(),
            target_w,
            spec,
            num_layers,
            layers: Vec::new(),
            kl_parts: Vec::new(),
            final_parts: None,
            final_rows: None,
            seconds: 0.0,
            tensor_path: false,
            pending: Vec::new(),
            device_queue: Vec::new(),
            vocab_tile: vocab_tile_from_env(),
            row_chunk: row_chunk_from_env(),
            cpu_pending: Vec::new(),
            amx: head.packed.as_deref(),
            position_targets: None,
            pending_part_bytes: PENDING_PART_BYTES,
            #[cfg(feature = "cuda")]
            device_keys: std::sync::OnceLock::new(),
        })
    }

    /// Requested position `k` traces only the targets `per_position[k]` (indices into the
    /// spec's `targets`, in the order its report lists them): several sequences' rows read as the
    /// positions of one, each with its own targets (a generation step's answers, generate.rs),
    /// every row still counted against its own targets only. A position requested twice has one
    /// row: it traces what its first request lists.
    pub fn with_position_targets(mut self, per_position: Vec<Vec<usize>>) -> Result<Self> {
        let n = self.spec.targets.len();
        if per_position.len() != self.spec.positions.len()
            || per_position.iter().flatten().any(|&j| j >= n)
        {
            return Err(Error::Internal(format!(
                "lens: targets for {} positions (of {} targets) where {} positions are requested",
                per_position.len(),
                n,
                self.spec.positions.len()
            )));
        }
        self.position_targets = Some(per_position);
        Ok(self)
    }

    /// The targets requested position `k` traces (indices into the spec's `targets`).
    fn targets_of(&self, k: usize) -> Vec<usize> {
        match &self.position_targets {
            Some(per) => per[k].clone(),
            None => (0..self.spec.targets.len()).collect(),
        }
    }

    /// Reduces with tensor operations, as on an accelerator, even on the CPU.
    pub fn with_tensor_path(mut self) -> Self {
        self.tensor_path = true;
        // Its sums come from the tensor GEMM; so must everything recomputed from them.
        self.amx = None;
        self
    }

    /// The CPU path multiplies with candle's f32 GEMM even where the head is packed for AMX (tests
    /// compare the two).
    pub fn without_amx(mut self) -> Self {
        self.amx = None;
        self
    }

    /// Tensor path: collect the queued layers whenever their detail rows' tile parts pass `bytes`
    /// rather than [`PENDING_PART_BYTES`] (tests: `1` collects after every pass).
    pub fn with_pending_part_bytes(mut self, bytes: usize) -> Self {
        self.pending_part_bytes = bytes;
        self
    }

    /// Tensor path: `n` vocabulary entries per unembedding GEMM (0: the whole vocabulary), rather
    /// than `LOGIT_LENS_VOCAB_TILE` or [`DEVICE_VOCAB_TILE`].
    pub fn with_vocab_tile(mut self, n: usize) -> Self {
        self.vocab_tile = n;
        self
    }

    /// Tensor path: `n` rows per unembedding GEMM, rather than `LOGIT_LENS_ROW_CHUNK` or
    /// [`DEVICE_ROWS`].
    pub fn with_row_chunk(mut self, n: usize) -> Self {
        self.row_chunk = n.max(1);
        self
    }

    /// Whether `hidden` goes the tensor path (the GPU, half precision, or forced): reductions
    /// queued on its device and collected in `finish`; else the fused CPU reduction, layer by layer.
    fn on_device(&self, hidden: &Tensor) -> bool {
        !(hidden.device().is_cpu() && hidden.dtype() == DType::F32) || self.tensor_path
    }

    /// The finished lens, one entry per requested layer.
    pub fn finish(mut self) -> Result<Vec<LayerStats>> {
        let t = Instant::now();
        self.reduce_cpu_pending()?;
        self.collect_pending()?;
        self.seconds += t.elapsed().as_secs_f64();
        let finals = self.final_parts.take().ok_or_else(|| {
            Error::Internal("the forward pass stopped before the last layer".into())
        })?;
        if let Some((rows, lse)) = self.final_rows.take() {
            return self.finish_capped(&finals, &rows, &lse);
        }
        for (layer, parts) in self.layers.iter_mut().zip(&self.kl_parts) {
            if layer.layer == self.num_layers {
                continue; // KL of the final distribution to itself: exactly 0.
            }
            for ((pos, (lse, n)), (u, h_final)) in
                layer.positions.iter_mut().zip(parts).zip(&finals)
            {
                let dot: f64 = u.iter().zip(n).map(|(a, b)| *a as f64 * *b as f64).sum();
                pos.kl_to_final = ((*lse as f64 - dot - *h_final as f64) as f32).max(0.0);
            }
        }
        Ok(self.layers)
    }

    /// [`Self::finish`] with soft-capped logits: `KL = lse_l − Σ_v p_L(v) z_l(v) − H(p_L)` with
    /// the cross term from the requested rows' capped logits, recomputed block by block of the
    /// vocabulary against the final layer's `p_L` (what the lens reported, computed again).
    fn finish_capped(
        mut self,
        finals: &[(Vec<f32>, f32)],
        final_rows: &Tensor,
        final_lse: &[f32],
    ) -> Result<Vec<LayerStats>> {
        let t = Instant::now();
        let (dev, dtype) = (final_rows.device().clone(), final_rows.dtype());
        let hidden = final_rows.dim(1)?;
        // Every (earlier reported layer, position) pair: its normed row and its position's index.
        let mut flat = Vec::new();
        let mut at = Vec::new();
        for (layer, parts) in self.layers.iter().zip(&self.kl_parts) {
            if layer.layer == self.num_layers {
                continue;
            }
            for (k, (_, n)) in parts.iter().enumerate() {
                flat.extend_from_slice(n);
                at.push(k as u32);
            }
        }
        if !at.is_empty() {
            let r = at.len();
            let n = Tensor::from_vec(flat, (r, hidden), &dev)?.to_dtype(dtype)?;
            let idx = Tensor::from_slice(&at, r, &dev)?;
            let lse_t = Tensor::from_slice(final_lse, (final_lse.len(), 1), &dev)?;
            let vocab = self.unembed.dim(0)?;
            let step = if dev.is_cpu() {
                VOCAB_BLOCK
            } else {
                DEVICE_VOCAB_BLOCK
            };
            let mut cross = vec![0f64; r];
            // Each final row's `Σ p_L`, to divide by (cpu.rs, `normalised`), where the rows live.
            let mut sums: Option<Tensor> = None;
            let (n_split, final_split) = (self.amx_rows(&n)?, self.amx_rows(final_rows)?);
            for v0 in (0..vocab).step_by(step) {
                let vc = step.min(vocab - v0);
                let z = self.cap(self.block_logits(&n, n_split.as_ref(), v0, vc)?)?;
                let p_final = self
                    .cap(self.block_logits(final_rows, final_split.as_ref(), v0, vc)?)?
                    .broadcast_sub(&lse_t)?
                    .exp()?;
                let sum = p_final.sum(1)?.to_dtype(DType::F64)?;
                sums = Some(match sums {
                    Some(acc) => (acc + sum)?,
                    None => sum,
                });
                let p = p_final.index_select(&idx, 0)?;
                let part = (z * p)?.sum(1)?.to_device(&candle_core::Device::Cpu)?;
                for (c, x) in cross.iter_mut().zip(part.to_vec1::<f32>()?) {
                    *c += x as f64;
                }
            }
            let sums = match sums {
                Some(t) => t.to_vec1::<f64>()?,
                None => return Err(Error::Internal("empty vocabulary".into())),
            };
            for (c, &k) in cross.iter_mut().zip(&at) {
                *c /= sums[k as usize];
            }
            let mut cross = cross.into_iter();
            for (layer, parts) in self.layers.iter_mut().zip(&self.kl_parts) {
                if layer.layer == self.num_layers {
                    continue;
                }
                for ((pos, (lse, _)), (_, h_final)) in
                    layer.positions.iter_mut().zip(parts).zip(finals)
                {
                    let dot = cross.next().unwrap_or(0.0);
                    pos.kl_to_final = ((*lse as f64 - dot - *h_final as f64) as f32).max(0.0);
                }
            }
        }
        self.seconds += t.elapsed().as_secs_f64();
        Ok(self.layers)
    }

    /// The model's soft-capping of logits (`[rows, vocab]` f32), where it has one.
    fn cap(&self, logits: Tensor) -> Result<Tensor> {
        match self.head.softcap {
            Some(c) => crate::models::layers::softcap_like_torch(&logits, c),
            None => Ok(logits),
        }
    }

    fn process(&mut self, index: usize, hidden: &Tensor, normed: Option<&Tensor>) -> Result<()> {
        let Some(plan) = self.plan(index, hidden, normed)? else {
            return Ok(());
        };
        if !self.on_device(hidden) {
            // The fused CPU reduction, several layers' rows at a time once they fill a block.
            self.cpu_pending.push(plan);
            let rows: usize = self.cpu_pending.iter().map(|p| p.states.len()).sum();
            if rows >= ROW_BLOCK {
                self.reduce_cpu_pending()?;
            }
            Ok(())
        } else {
            self.device_queue.push(plan);
            let rows: usize = self.device_queue.iter().map(|p| p.states.len()).sum();
            if rows < self.row_chunk.max(1) {
                return Ok(());
            }
            self.launch_queued()?;
            let part_bytes: usize = self
                .pending
                .iter()
                .filter_map(|p| p.device_detail.as_ref())
                .map(|d| d.elem_count() * 4)
                .sum();
            if part_bytes > self.pending_part_bytes {
                self.collect_pending()?;
            }
            Ok(())
        }
    }

    /// What layer `index` needs: nothing unless it is reported or the final one (KL needs it).
    /// `normed`: the final norm of `hidden`, when the caller computed it (see `wants_normed`).
    fn plan(
        &self,
        index: usize,
        hidden: &Tensor,
        normed: Option<&Tensor>,
    ) -> Result<Option<LayerPlan>> {
        if !self.reads(index) {
            return Ok(None);
        }
        let seq = hidden.dim(0)?;
        if let Some(&p) = self.spec.positions.iter().find(|&&p| p >= seq) {
            return Err(Error::Unprocessable(format!(
                "position {p} is past the end of the {seq}-token input"
            )));
        }
        // In the model's dtype for the GEMM (f32 on the CPU); logits are reduced in f32.
        let report = self.spec.layers.binary_search(&index).is_ok();
        let is_final = index == self.num_layers;
        let normed = match normed {
            Some(n) => n.clone(),
            None => self.head.norm.forward(hidden)?,
        };
        let summary = report && self.spec.summary;
        let (normed_rows, requested) = if summary {
            (normed, self.spec.positions.clone())
        } else {
            (
                gather_rows(&normed, &self.spec.positions)?,
                (0..self.spec.positions.len()).collect(),
            )
        };
        let n_rows = normed_rows.dim(0)?;
        let mut detail = vec![false; n_rows];
        // Per detail row, the targets it traces (its first request's).
        let mut traced: Vec<Vec<usize>> = vec![Vec::new(); n_rows];
        for (k, &r) in requested.iter().enumerate().rev() {
            detail[r] = true;
            traced[r] = self.targets_of(k);
        }
        let requested_rows = gather_rows(&normed_rows, &requested)?;
        // Target logits: on the device path they stay there until `finish` (reading them now
        // would wait for the GPU at every layer); the rows get them before they are reduced.
        let (target_logits, device_targets) = if self.on_device(hidden) {
            let n = self.spec.targets.len();
            let placeholder = detail
                .iter()
                .map(|&d| if d { vec![0.0; n] } else { Vec::new() })
                .collect();
            (placeholder, self.target_logits_device(&requested_rows)?)
        } else {
            (self.target_logits(&normed_rows, &detail)?, None)
        };
        let states = detail
            .iter()
            .zip(target_logits)
            .zip(traced)
            .map(|((&d, tz), traced)| {
                let top_k = if d { self.spec.top_k } else { 0 };
                let cmp = traced.iter().filter_map(|&j| tz.get(j).copied()).collect();
                RowState::new(top_k, traced, cmp)
            })
            .collect();
        Ok(Some(LayerPlan {
            index,
            report,
            is_final,
            summary,
            seq,
            normed_rows: Some(normed_rows),
            requested_rows,
            device_sums: None,
            device_detail: None,
            device_targets,
            requested,
            states,
        }))
    }

    /// Turns a reduced layer into its report (and, for the final layer, the parts KL needs).
    /// `host_rows`: the requested rows already on the host (f32), when the caller fetched them.
    fn record(&mut self, plan: LayerPlan, host_rows: Option<Vec<Vec<f32>>>) -> Result<()> {
        let LayerPlan {
            index,
            report,
            is_final,
            summary,
            seq,
            requested_rows: n_requested,
            requested,
            states,
            ..
        } = plan;
        // max prob = e^(max − lse) = 1 / s.
        let mean_max_prob =
            summary.then(|| (states.iter().map(|st| 1.0 / st.s).sum::<f64>() / seq as f64) as f32);
        if is_final {
            let finals: Vec<&RowState> = requested.iter().map(|&r| &states[r]).collect();
            let dev = self.unembed.device();
            self.final_parts = Some(profile::op(
                "lens collect: final layer's Wᵀ p_L",
                dev,
                || self.final_parts(&n_requested, &finals),
            )?);
            if self.head.softcap.is_some() {
                let lse = finals.iter().map(|s| s.lse()).collect();
                self.final_rows = Some((n_requested.clone(), lse));
            }
        }
        if report {
            let mut positions = Vec::with_capacity(requested.len());
            let mut parts = Vec::with_capacity(requested.len());
            let rows = match host_rows {
                Some(rows) => rows,
                None => n_requested.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            };
            if rows.len() != requested.len() {
                return Err(Error::Internal(format!(
                    "lens: {} rows for {} requested positions",
                    rows.len(),
                    requested.len()
                )));
            }
            for (k, (&r, n)) in requested.iter().zip(rows).enumerate() {
                let st = &states[r];
                let lse = st.lse();
                positions.push(PositionStats {
                    position: self.spec.positions[k],
                    top: st
                        .top
                        .iter()
                        .map(|&(id, z)| (id, (z - lse).exp(), z))
                        .collect(),
                    entropy: st.entropy(),
                    kl_to_final: 0.0,
                    targets: st
                        .target_z
                        .iter()
                        .zip(&st.target_above)
                        .map(|(&z, &above)| ((z - lse).exp(), above + 1))
                        .collect(),
                });
                parts.push((lse, n));
            }
            self.layers.push(LayerStats {
                layer: index,
                mean_max_prob,
                positions,
            });
            self.kl_parts.push(parts);
        }
        Ok(())
    }

    /// `rows` split for the AMX GEMM, when this lens multiplies there (CPU, f32, packed head).
    fn amx_rows(&self, rows: &Tensor) -> Result<Option<amx::SplitRows>> {
        if self.amx.is_none() || !rows.device().is_cpu() || rows.dtype() != DType::F32 {
            return Ok(None);
        }
        Ok(Some(amx::SplitRows::of(rows)?))
    }

    /// `rows · wᵀ` (f32) for the `vc` vocabulary entries from `v0`, through the same GEMM as the
    /// reduction (AMX where `split`, from [`Self::amx_rows`], is given), so that the sums
    /// recomputed from these logits (`Wᵀ p_L`, the capped cross terms) are those of the reduction's
    /// distribution; what is left of the difference (and of the f32 log-sum-exp's rounding) is a
    /// common factor of `p_L`, which dividing by `Σ p_L` takes out (cpu.rs, `normalised`).
    fn block_logits(
        &self,
        rows: &Tensor,
        split: Option<&amx::SplitRows>,
        v0: usize,
        vc: usize,
    ) -> Result<Tensor> {
        match (split, self.amx) {
            (Some(split), Some(packed)) => {
                let n = rows.dim(0)?;
                let mut z = vec![0f32; n * vc];
                amx::matmul(split, packed, v0, vc, &mut z);
                Ok(Tensor::from_vec(z, (n, vc), rows.device())?)
            }
            _ => unembed_f32(rows, &self.unembed.narrow(0, v0, vc)?),
        }
    }

    /// For the final layer's requested rows: `u = Wᵀ p_L / Σ p_L` (a second pass over the
    /// vocabulary, now that each row's log-sum-exp is known; divided by the sum of `p_L`, cpu.rs's
    /// `normalised`) and the entropy `H(p_L)`.
    fn final_parts(&self, n_rows: &Tensor, states: &[&RowState]) -> Result<Vec<(Vec<f32>, f32)>> {
        if self.head.softcap.is_some() {
            // `Wᵀ p_L` does not give the cross term of capped logits (see `finish_capped`).
            return Ok(states.iter().map(|s| (Vec::new(), s.entropy())).collect());
        }
        let lse: Vec<f32> = states.iter().map(|s| s.lse()).collect();
        let u = match (self.amx, self.amx_rows(n_rows)?) {
            (Some(packed), Some(split)) => final_cross_amx(&split, packed, &lse),
            _ if !self.tensor_path
                && n_rows.device().is_cpu()
                && n_rows.dtype() == DType::F32
                && self.unembed.dtype() == DType::F32
                && states.len() <= CROSS_F32_ROWS =>
            {
                final_cross_f32(n_rows, &self.unembed, &lse)?
            }
            _ => self.final_cross_tensors(n_rows, &lse)?,
        };
        Ok(u.into_iter()
            .zip(states)
            .map(|(u, s)| (u, s.entropy()))
            .collect())
    }

    /// [`Self::final_parts`]'s `Wᵀ p / Σ p` with tensor operations where the rows live (the GPU, CPU
    /// half precision, more rows than `final_cross_f32` takes): blocks of the vocabulary, each
    /// block's logits again, its `p · W` and `Σ p` added up.
    fn final_cross_tensors(&self, n_rows: &Tensor, lse: &[f32]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.unembed.dim(0)?;
        let lse_t = Tensor::from_slice(lse, (lse.len(), 1), n_rows.device())?;
        let step = if n_rows.device().is_cpu() {
            VOCAB_BLOCK
        } else {
            DEVICE_VOCAB_BLOCK
        };
        let add = |acc: Option<Tensor>, x: Tensor| match acc {
            Some(acc) => acc + x,
            None => Ok(x),
        };
        // `Σ p` beside `Wᵀ p`, to divide by (cpu.rs, `normalised`).
        let (mut u, mut sums) = (None, None);
        for v0 in (0..vocab).step_by(step) {
            let vc = step.min(vocab - v0);
            let w = self.unembed.narrow(0, v0, vc)?;
            // No AMX split here: where the head has one, `final_parts` took it.
            let p = self
                .block_logits(n_rows, None, v0, vc)?
                .broadcast_sub(&lse_t)?
                .exp()?;
            u = Some(add(u, p.matmul(&w.to_dtype(DType::F32)?)?)?);
            sums = Some(add(sums, p.sum_keepdim(1)?)?);
        }
        let (u, sums) = u
            .zip(sums)
            .ok_or_else(|| Error::Internal("empty vocabulary".into()))?;
        Ok(u.broadcast_div(&sums)?.to_vec2::<f32>()?)
    }
}

/// The lens's logits `rows · wᵀ` in f32 (`rows` `[n, hidden]`, `w` `[vocab, hidden]`, one dtype).
/// In half precision the products and sums are f32 (as in cuBLAS) and so is the result: logits
/// rounded to bf16 (8 significant bits) tie exactly at the top in about 3 % of the rows of a random
/// Qwen2-VL-2B, and every probability would carry their rounding. One cuBLAS call on CUDA
/// (bf16/f16 in, f32 out); elsewhere the inputs are widened to f32 first, which gives the same
/// products (a half-precision product is exact in f32).
fn unembed_f32(rows: &Tensor, w: &Tensor) -> Result<Tensor> {
    if rows.dtype() == DType::F32 {
        return crate::models::gemm::matmul_nt(rows, w);
    }
    #[cfg(feature = "cuda")]
    if rows.device().is_cuda() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static WARNED: AtomicBool = AtomicBool::new(false);
        match cuda::matmul_nt_f32(rows, w) {
            Ok(z) => return Ok(z),
            // Not expected; if the card refuses it, the widened f32 GEMM below (slower, same sums).
            Err(e) if !WARNED.swap(true, Ordering::Relaxed) => {
                eprintln!("warning: the lens's bf16/f16 → f32 GEMM failed ({e}); widening to f32")
            }
            Err(_) => {}
        }
    }
    Ok(rows
        .to_dtype(DType::F32)?
        .matmul(&w.to_dtype(DType::F32)?.t()?)?)
}

fn gather_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    if rows.len() == t.dim(0)? && rows.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(t.clone());
    }
    let idx = Tensor::from_vec(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        rows.len(),
        t.device(),
    )?;
    Ok(t.index_select(&idx, 0)?)
}

/// Runs `f` on a contiguous f32 tensor's data, without a copy when it lives on the CPU.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&cpu.as_slice::<f32>()?[a..b]));
        }
    }
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&v))
}

impl Lens<'_> {
    /// [`Self::process`], its time added to the lens's.
    fn timed_process(
        &mut self,
        index: usize,
        hidden: &Tensor,
        normed: Option<&Tensor>,
    ) -> Result<()> {
        let t = Instant::now();
        let r = self.process(index, hidden, normed);
        self.seconds += t.elapsed().as_secs_f64();
        r
    }

    /// Whether layer `index` is read: reported, or the final one (KL needs it).
    fn reads(&self, index: usize) -> bool {
        index == self.num_layers || self.spec.layers.binary_search(&index).is_ok()
    }
}

impl LayerObserver for Lens<'_> {
    fn observe(&mut self, index: usize, hidden: &Tensor) -> Result<()> {
        self.timed_process(index, hidden, None)
    }

    /// The lens reads every layer it reports through the final norm, which is the decoder's own
    /// (`LensHead::new` takes it from the decoder): a batch's rows are normed together.
    fn wants_normed(&self, index: usize) -> bool {
        self.reads(index)
    }

    fn observe_normed(&mut self, index: usize, hidden: &Tensor, normed: &Tensor) -> Result<()> {
        self.timed_process(index, hidden, Some(normed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half-precision rows and unembedding give f32 logits: sums of the exact products, not
    /// rounded back to the half dtype (where the top of a row often ties exactly).
    #[test]
    fn half_precision_unembedding_gives_unrounded_f32_logits() {
        let dev = candle_core::Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            let rows = Tensor::randn(0f32, 1.0, (7, 96), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::randn(0f32, 0.5, (300, 96), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let z = unembed_f32(
                &rows.narrow(0, 2, 5).unwrap(),
                &w.narrow(0, 10, 250).unwrap(),
            )
            .unwrap();
            assert_eq!((z.dtype(), z.dims()), (DType::F32, &[5, 250][..]));
            let z = z.to_vec2::<f32>().unwrap();
            let as64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            let (r, w) = (as64(&rows), as64(&w));
            let mut unrounded = 0;
            for (i, zi) in z.iter().enumerate() {
                for (j, &zij) in zi.iter().enumerate() {
                    let products = r[i + 2].iter().zip(&w[j + 10]).map(|(a, b)| a * b);
                    let want: f64 = products.clone().sum();
                    // The standard bound for f32 sums of exact products, counting the up to
                    // three bf16 pieces a half-precision value may be split into on AMX (the
                    // inputs are random, so no fixed absolute tolerance holds every draw).
                    let magnitude: f64 = products.map(f64::abs).sum();
                    let bound = (3 * 96) as f64 * f32::EPSILON as f64 * magnitude;
                    assert!(
                        (zij as f64 - want).abs() <= bound,
                        "{dtype:?} [{i}, {j}]: {zij} vs {want} (bound {bound})"
                    );
                    let half = match dtype {
                        DType::BF16 => half::bf16::from_f32(zij).to_f32(),
                        _ => half::f16::from_f32(zij).to_f32(),
                    };
                    unrounded += (half != zij) as usize;
                }
            }
            assert!(
                unrounded > 5 * 250 / 2,
                "{dtype:?}: logits rounded to the half dtype"
            );
        }
    }
}
