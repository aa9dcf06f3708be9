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
//! GPU, half precision), each layer's work is queued on the device as the layer arrives (a GEMM
//! over the whole vocabulary per chunk of rows and one kernel, cuda.rs, for max and sum-exp), only
//! its small results are kept (per row max and sum; the requested rows' logits), and the host
//! collects them once at the end, so that the forward pass never waits on the host and no layer's
//! normed rows outlive it. (When many positions want top-k, their whole-vocabulary rows are
//! collected every few layers instead: `PENDING_DETAIL_BYTES`.)

use std::time::Instant;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
mod cuda;

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

/// Rows and vocabulary entries per block of logits on the CPU: `ROW_BLOCK × VOCAB_BLOCK × 4` bytes
/// (32 MB) stays in L3 between the GEMM that writes it and the reduction that reads it. Each block
/// of rows is one pass over the unembedding (467 MB for Qwen2-VL-2B's bf16 pieces), so fewer,
/// larger blocks read it from memory fewer times: the lens of a real-size Qwen2-VL-2B request
/// (29 layers × 418 rows), alternating, took 6565–6849 ms at 512 rows, 6417–6644 at 1024,
/// 6121–6311 at 2048, 6407–6503 at 4096 (bench/README.md, fifteenth session).
const ROW_BLOCK: usize = 2048;
const VOCAB_BLOCK: usize = 4096;
/// On an accelerator (and the tensor path): rows per unembedding GEMM. `LOGIT_LENS_ROW_CHUNK`
/// overrides it.
pub const DEVICE_ROWS: usize = 512;
/// Tensor path: the detail rows (whole-vocabulary logits of the positions that want top-k) that
/// may wait on the device before the queued layers are collected, counted as the f32 host copy:
/// `last` never reaches it; `all` on a long input is collected every layer or two instead of
/// holding every layer's `[positions × vocab]` logits (GiBs, per request of a batch) until the end.
const PENDING_DETAIL_BYTES: usize = 256 << 20;
/// Tensor path: vocabulary entries per unembedding GEMM. 512 rows × 16384 entries of f32 logits are
/// 32 MB, inside an H100's 50 MB L2, where the reduction kernel reads them back; 152k-entry rows
/// (311 MB a chunk) went out to memory and back. `LOGIT_LENS_VOCAB_TILE` overrides it (0 or `all`:
/// the whole vocabulary per GEMM, as before; for measuring one against the other).
pub const DEVICE_VOCAB_TILE: usize = 16384;

fn vocab_tile_from_env() -> usize {
    match std::env::var("LOGIT_LENS_VOCAB_TILE") {
        Ok(v) if v == "all" => 0,
        Ok(v) => v.parse().unwrap_or(DEVICE_VOCAB_TILE),
        Err(_) => DEVICE_VOCAB_TILE,
    }
}

fn row_chunk_from_env() -> usize {
    std::env::var("LOGIT_LENS_ROW_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEVICE_ROWS)
}

/// Vocabulary rows per block when the final layer's `Wᵀ p_L` is accumulated in f32 (and, with
/// soft-capping, the KL cross terms). Each block widens its slice of the unembedding to f32 on
/// the device, a transient on top of the weights: 16384 × 1536 × 4 = 100 MB for Qwen2-VL-2B,
/// 16384 × 4096 × 4 = 268 MB for LLaVA-1.5-7B (blocks of 65536 held 400 and 524 MB, a quarter of
/// issue 17's 2 GiB over the weights).
const DEVICE_VOCAB_BLOCK: usize = 16384;

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
    /// Collect `pending` once its detail rows exceed this many bytes (f32).
    pending_detail_bytes: usize,
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
    /// f32), and the logits of the rows that want detail (top-k, ranks), in row order.
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
            pending_detail_bytes: PENDING_DETAIL_BYTES,
            vocab_tile: vocab_tile_from_env(),
            row_chunk: row_chunk_from_env(),
            cpu_pending: Vec::new(),
            amx: head.packed.as_deref(),
            position_targets: None,
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

    /// Tensor path: collect the queued layers whenever their detail rows exceed `bytes` (f32)
    /// rather than [`PENDING_DETAIL_BYTES`] (tests: `1` collects after every layer).
    pub fn with_pending_detail_bytes(mut self, bytes: usize) -> Self {
        self.pending_detail_bytes = bytes;
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
            let idx = Tensor::from_vec(at, r, &dev)?;
            let lse_t = Tensor::from_slice(final_lse, (final_lse.len(), 1), &dev)?;
            let vocab = self.unembed.dim(0)?;
            let step = if dev.is_cpu() {
                VOCAB_BLOCK
            } else {
                DEVICE_VOCAB_BLOCK
            };
            let mut cross = vec![0f64; r];
            let (n_split, final_split) = (self.amx_rows(&n)?, self.amx_rows(final_rows)?);
            for v0 in (0..vocab).step_by(step) {
                let vc = step.min(vocab - v0);
                let z = self.cap(self.block_logits(&n, n_split.as_ref(), v0, vc)?)?;
                let p = self
                    .cap(self.block_logits(final_rows, final_split.as_ref(), v0, vc)?)?
                    .broadcast_sub(&lse_t)?
                    .exp()?
                    .index_select(&idx, 0)?;
                let part = (z * p)?.sum(1)?.to_device(&candle_core::Device::Cpu)?;
                for (c, x) in cross.iter_mut().zip(part.to_vec1::<f32>()?) {
                    *c += x as f64;
                }
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
        let Some(mut plan) = self.plan(index, hidden, normed)? else {
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
            self.launch_layer(&mut plan)?;
            self.pending.push(plan);
            // Detail rows hold the whole vocabulary: with many positions asked for (`all` is
            // 418 × 152k logits per layer for Qwen2-VL at 640×480), collect before they pile up.
            let detail_bytes: usize = self
                .pending
                .iter()
                .filter_map(|p| p.device_detail.as_ref())
                .map(|d| d.elem_count() * 4)
                .sum();
            if detail_bytes > self.pending_detail_bytes {
                self.collect_pending()?;
            }
            Ok(())
        }
    }

    /// Reduces the waiting CPU layers' rows together, in blocks of rows that stay in cache, and
    /// records the layers in order. Equal blocks of at most ROW_BLOCK rows (2508 rows: 2 × 1254,
    /// not 2048 + 460: a thin GEMM runs well below the machine's rate).
    fn reduce_cpu_pending(&mut self) -> Result<()> {
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

    /// Brings the queued layers to the host and records them, in layer order.
    fn collect_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut plans = std::mem::take(&mut self.pending);
        self.collect_layers(&mut plans)?;
        // The reported layers' requested rows (for KL) in one transfer, not one per layer.
        let reported: Vec<Tensor> = plans
            .iter()
            .filter(|p| p.report)
            .map(|p| p.requested_rows.clone())
            .collect();
        let host = profile::op(
            "lens collect: requested rows to the host",
            self.unembed.device(),
            || to_host_rows(&reported),
        )?;
        let mut host_rows = host.rows();
        for plan in plans {
            let rows = plan.report.then(|| {
                host_rows
                    .by_ref()
                    .take(plan.requested.len())
                    .map(<[f32]>::to_vec)
                    .collect()
            });
            self.record(plan, rows)?;
        }
        Ok(())
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

    /// Target logits per detailed row by direct dot products in f64; the reduction counts the
    /// entries above them.
    fn target_logits(&self, n_block: &Tensor, detail: &[bool]) -> Result<Vec<Vec<f32>>> {
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

    /// The targets' logits at `rows` `[rows, targets]` (f32, computed in f64), left on the device.
    fn target_logits_device(&self, rows: &Tensor) -> Result<Option<Tensor>> {
        let Some(w) = &self.target_w else {
            return Ok(None);
        };
        Ok(Some(
            self.cap(
                rows.to_dtype(DType::F64)?
                    .matmul(&w.t()?)?
                    .to_dtype(DType::F32)?,
            )?,
        ))
    }

    /// One pass over the vocabulary in blocks: a GEMM, then one fused reduction of every row. The
    /// GEMM is AMX's where the head has the unembedding packed for it ([`amx`]), candle's f32
    /// GEMM otherwise.
    fn reduce_vocabulary(&self, n_block: &Tensor, states: &mut [RowState]) -> Result<()> {
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
            let logits = self.cap(n_block.matmul(&w.t()?)?)?;
            with_cpu_f32(&logits, |z| reduce(z, v0, vc, states))?;
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
    /// reduction (AMX where `split`, from [`Self::amx_rows`], is given): the sums recomputed from
    /// these logits (`Wᵀ p_L`, the capped cross terms) must agree with the reduction's log-sum-exps,
    /// or `p_L` no longer sums to 1 and KL is off by that much times the cross term.
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

    /// Queues one layer's reduction where its rows live (the GPU): the rows go through the
    /// unembedding in blocks of `row_chunk` rows × `vocab_tile` vocabulary entries
    /// ([`unembed_blocks`]: cache-sized, the tiles outermost); each block's per-row max and sum of
    /// exponentials come from one fused kernel (CUDA) or a few tensor ops and are combined across
    /// tiles, and the rows that want detail are gathered tile by tile; all of it stays on the
    /// device, nothing waits.
    ///
    /// A layer whose detail rows alone pass the budget (many positions × a large vocabulary:
    /// `all` on a OneVision input is ~7000 × 152k) has each block's detail rows reduced on the host
    /// as they come instead, so the device holds one block of them, not the layer's.
    fn launch_layer(&self, plan: &mut LayerPlan) -> Result<()> {
        let normed = plan.normed_rows.take().expect("planned rows");
        let total = normed.dim(0)?;
        let detail: Vec<u32> = (0..total as u32)
            .filter(|&r| plan.states[r as usize].wants_detail())
            .collect();
        let immediate = detail.len() * self.unembed.dim(0)? * 4 > self.pending_detail_bytes;
        if immediate {
            // The rows need their target logits before they are reduced.
            take_targets(std::slice::from_mut(plan))?;
        }
        let chunk = self.row_chunk.max(1);
        let chunks = total.div_ceil(chunk);
        // Per chunk: its detail rows' indices within it (none: no index tensor).
        let idx = (0..chunks)
            .map(|c| {
                let (start, end) = (c * chunk, ((c + 1) * chunk).min(total));
                let here: Vec<u32> = detail
                    .iter()
                    .filter(|&&r| (start..end).contains(&(r as usize)))
                    .map(|&r| r - start as u32)
                    .collect();
                (!here.is_empty())
                    .then(|| Tensor::from_slice(&here, here.len(), normed.device()))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Per chunk: its rows' (max, Σ e^(z − max)) over the tiles so far.
        let mut sums: Vec<Option<Tensor>> = vec![None; chunks];
        let mut detail_tiles = vec![Vec::new(); chunks];
        let states = &mut plan.states;
        unembed_blocks(
            &normed,
            &self.unembed,
            chunk,
            self.vocab_tile,
            |c, v0, logits| {
                let logits = self.cap(logits)?;
                sums[c] = Some(fold_max_sumexp(sums[c].take(), &logits)?);
                let Some(idx) = &idx[c] else { return Ok(()) };
                let picked = logits.index_select(idx, 0)?;
                if immediate {
                    let block = to_host_rows(&[picked])?;
                    let start = c * chunk;
                    let n = logits.dim(0)?;
                    let wanting: Vec<&mut RowState> = states[start..start + n]
                        .iter_mut()
                        .filter(|st| st.wants_detail())
                        .collect();
                    wanting
                        .into_par_iter()
                        .zip(block.par_rows())
                        .for_each(|(st, row)| {
                            st.update(row, v0, &self.spec.targets, &self.spec.excluded)
                        });
                } else {
                    detail_tiles[c].push(picked);
                }
                Ok(())
            },
        )?;
        let sums = sums
            .into_iter()
            .map(|s| s.ok_or_else(|| Error::Internal("lens: a chunk without tiles".into())))
            .collect::<Result<Vec<_>>>()?;
        let detail_rows = detail_tiles
            .into_iter()
            .filter(|tiles| !tiles.is_empty())
            .map(|mut tiles| {
                if tiles.len() == 1 {
                    Ok(tiles.remove(0))
                } else {
                    Ok(Tensor::cat(&tiles, 1)?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let cat = |v: Vec<Tensor>| (!v.is_empty()).then(|| Tensor::cat(&v, 0)).transpose();
        plan.device_sums = cat(sums)?;
        plan.device_detail = cat(detail_rows)?;
        Ok(())
    }

    /// The host's side of the queued layers, once at the end: every layer's sums in one
    /// transfer, the detail rows in another, then each detail row reduced (entropy, top-k, ranks)
    /// in parallel.
    fn collect_layers(&self, plans: &mut [LayerPlan]) -> Result<()> {
        let dev = self.unembed.device();
        take_targets(plans)?;
        let sums: Vec<Tensor> = plans.iter().filter_map(|p| p.device_sums.clone()).collect();
        let sums = profile::op("lens collect: sums to the host", dev, || {
            to_host_rows(&sums)
        })?;
        let mut rows = sums.rows();
        for plan in plans.iter_mut() {
            if plan.device_sums.take().is_none() {
                continue;
            }
            for st in plan.states.iter_mut() {
                let ms = rows
                    .next()
                    .ok_or_else(|| Error::Internal("lens: fewer sums than rows".into()))?;
                if !st.wants_detail() {
                    st.m = ms[0];
                    st.s = ms[1] as f64;
                }
            }
        }
        let detail: Vec<Tensor> = plans
            .iter()
            .filter_map(|p| p.device_detail.clone())
            .collect();
        let block = profile::op("lens collect: detail rows to the host", dev, || {
            to_host_rows(&detail)
        })?;
        if block.is_empty() {
            return Ok(());
        }
        // Each plan's detail rows, in row order, with their states.
        let mut states: Vec<&mut RowState> = Vec::with_capacity(block.len());
        for plan in plans.iter_mut() {
            if plan.device_detail.take().is_none() {
                continue;
            }
            states.extend(plan.states.iter_mut().filter(|st| st.wants_detail()));
        }
        if states.len() != block.len() {
            return Err(Error::Internal(format!(
                "lens: {} detail rows for {} states",
                block.len(),
                states.len()
            )));
        }
        profile::op("lens collect: detail rows reduced on the host", dev, || {
            states
                .into_par_iter()
                .zip(block.par_rows())
                .for_each(|(st, row)| {
                    st.update(row, 0, &self.spec.targets, &self.spec.excluded);
                });
            Ok(())
        })
    }

    /// For the final layer's requested rows: `u = Wᵀ p_L` (a second pass over the vocabulary,
    /// now that each row's log-sum-exp is known) and the entropy `H(p_L)`.
    fn final_parts(&self, n_rows: &Tensor, states: &[&RowState]) -> Result<Vec<(Vec<f32>, f32)>> {
        if self.head.softcap.is_some() {
            // `Wᵀ p_L` does not give the cross term of capped logits (see `finish_capped`).
            return Ok(states.iter().map(|s| (Vec::new(), s.entropy())).collect());
        }
        let vocab = self.unembed.dim(0)?;
        let lse: Vec<f32> = states.iter().map(|s| s.lse()).collect();
        let lse_t = Tensor::from_slice(&lse, (lse.len(), 1), n_rows.device())?;
        let mut u: Option<Tensor> = None;
        let step = if n_rows.device().is_cpu() {
            VOCAB_BLOCK
        } else {
            DEVICE_VOCAB_BLOCK
        };
        let split = self.amx_rows(n_rows)?;
        if let (Some(packed), Some(split)) = (self.amx, split.as_ref()) {
            let u = final_cross_amx(split, packed, &lse);
            return Ok(u
                .into_iter()
                .zip(states)
                .map(|(u, s)| (u, s.entropy()))
                .collect());
        }
        for v0 in (0..vocab).step_by(step) {
            let vc = step.min(vocab - v0);
            let w = self.unembed.narrow(0, v0, vc)?;
            let p = self
                .block_logits(n_rows, split.as_ref(), v0, vc)?
                .broadcast_sub(&lse_t)?
                .exp()?;
            let part = p.matmul(&w.to_dtype(DType::F32)?)?;
            u = Some(match u {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        let u = u
            .ok_or_else(|| Error::Internal("empty vocabulary".into()))?
            .to_vec2::<f32>()?;
        Ok(u.into_iter()
            .zip(states)
            .map(|(u, s)| (u, s.entropy()))
            .collect())
    }
}

/// Logits held at once by [`final_cross_amx`] (16 MB): the whole vocabulary for up to 26 rows of
/// Qwen2-VL's 151936 entries, blocks of it for more.
const CROSS_BLOCK_VALUES: usize = 4 << 20;

/// `u = Wᵀ p` for each split row (`p = softmax` of its logits, given its log-sum-exp `lse`) on
/// the CPU with the packed unembedding: the logits again by AMX, block by block of the vocabulary,
/// each turned into probabilities in place and multiplied from the left into f64 sums
/// ([`amx::left_matmul_add`], from the packed bf16 pieces). Before, an f32 GEMV over the f32
/// unembedding took ~80 ms of the ~100 ms this took for one row of Qwen2-VL-2B, at every
/// generated token.
fn final_cross_amx(
    split: &amx::SplitRows,
    packed: &amx::PackedWeight,
    lse: &[f32],
) -> Vec<Vec<f32>> {
    let (n, vocab, hidden) = (lse.len(), packed.out_dim(), packed.in_dim());
    let block = (CROSS_BLOCK_VALUES / n.max(1))
        .next_multiple_of(32)
        .min(vocab);
    let mut acc = vec![0f64; n * hidden];
    let mut z = vec![0f32; n * block];
    for v0 in (0..vocab).step_by(block) {
        let vc = block.min(vocab - v0);
        let z = &mut z[..n * vc];
        amx::matmul(split, packed, v0, vc, z);
        z.par_chunks_mut(vc).zip(lse).for_each(|(row, &l)| {
            crate::models::fastmath::vectorised(
                #[inline(always)]
                || {
                    row.iter_mut()
                        .for_each(|x| *x = crate::models::fastmath::exp(*x - l))
                },
            )
        });
        amx::left_matmul_add(z, n, packed, v0, vc, &mut acc);
    }
    acc.chunks_exact(hidden)
        .map(|u| u.iter().map(|&x| x as f32).collect())
        .collect()
}

/// The lens's logits `rows · wᵀ` in f32 (`rows` `[n, hidden]`, `w` `[vocab, hidden]`, one dtype).
/// In half precision the products and sums are f32 (as in cuBLAS) and so is the result: logits
/// rounded to bf16 (8 significant bits) tie exactly at the top in about 3 % of the rows of a random
/// Qwen2-VL-2B, and every probability would carry their rounding. One cuBLAS call on CUDA
/// (bf16/f16 in, f32 out); elsewhere the inputs are widened to f32 first, which gives the same
/// products (a half-precision product is exact in f32).
fn unembed_f32(rows: &Tensor, w: &Tensor) -> Result<Tensor> {
    if rows.dtype() == DType::F32 {
        return Ok(rows.matmul(&w.t()?)?);
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

/// The tensor path's pass over the unembedding for one layer's `rows`: `rows · unembedᵀ` in f32
/// ([`unembed_f32`]) in blocks of `row_chunk` rows × `tile` vocabulary entries (0: the whole
/// vocabulary), calling `each(chunk, v0, logits)` for every block: `chunk` the rows
/// `chunk · row_chunk ..`, `v0` the tile's first entry, in increasing `v0` for each chunk.
///
/// The tiles are the outer loop: a tile of the unembedding (16384 × 1536 bf16 is 50 MB for
/// Qwen2-VL-2B) is read from memory once and serves every chunk of rows while it is in the GPU's
/// L2; with the chunks outermost, every 512-row chunk read the whole 467 MB unembedding again (a
/// batch of 7 Qwen2-VL requests, 2926 rows a layer: 2.8 GB a layer).
fn unembed_blocks(
    rows: &Tensor,
    unembed: &Tensor,
    row_chunk: usize,
    tile: usize,
    mut each: impl FnMut(usize, usize, Tensor) -> Result<()>,
) -> Result<()> {
    let (total, vocab) = (rows.dim(0)?, unembed.dim(0)?);
    let tile = if tile == 0 { vocab } else { tile.min(vocab) };
    let chunks: Vec<Tensor> = (0..total)
        .step_by(row_chunk.max(1))
        .map(|start| rows.narrow(0, start, row_chunk.min(total - start)))
        .collect::<candle_core::Result<_>>()?;
    for v0 in (0..vocab).step_by(tile) {
        let w = unembed.narrow(0, v0, tile.min(vocab - v0))?;
        for (c, chunk) in chunks.iter().enumerate() {
            each(c, v0, unembed_f32(chunk, &w)?)?;
        }
    }
    Ok(())
}

/// The plans' target logits, still on the device, to their rows' states (in one transfer).
fn take_targets(plans: &mut [LayerPlan]) -> Result<()> {
    let targets: Vec<Tensor> = plans
        .iter()
        .filter_map(|p| p.device_targets.clone())
        .collect();
    let host = to_host_rows(&targets)?;
    let mut rows = host.rows();
    for plan in plans.iter_mut() {
        if plan.device_targets.take().is_none() {
            continue;
        }
        for &r in &plan.requested {
            let z = rows
                .next()
                .ok_or_else(|| Error::Internal("lens: fewer target rows".into()))?;
            let st = &mut plan.states[r];
            st.target_z = st.target_index.iter().map(|&j| z[j]).collect();
            st.target_cmp = st.target_z.clone();
        }
    }
    Ok(())
}

/// Per row of a logits block `[rows, vocab]`: `[rows, 2]` f32 (max, Σ e^(z − max)). One fused
/// kernel on CUDA; generic tensor operations elsewhere.
fn row_max_sumexp(logits: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return Ok(cuda::row_max_sumexp(logits)?);
    }
    let z = logits.to_dtype(DType::F32)?;
    let m = z.max_keepdim(1)?;
    let s = z.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?;
    Ok(Tensor::cat(&[m, s], 1)?)
}

/// The per-row (max, Σ e^(z − max)) of the vocabulary tiles so far (`acc`; none before the first)
/// with the tile `logits` folded in: on CUDA one kernel updating `acc` in place, elsewhere the
/// tile's own reduction combined with `acc` ([`combine_max_sumexp`]).
fn fold_max_sumexp(acc: Option<Tensor>, logits: &Tensor) -> Result<Tensor> {
    let Some(acc) = acc else {
        return row_max_sumexp(logits);
    };
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && logits.dtype() == DType::F32 {
        cuda::fold_max_sumexp(&acc, logits)?;
        return Ok(acc);
    }
    combine_max_sumexp(vec![acc, row_max_sumexp(logits)?])
}

/// Per-tile `[rows, 2]` (max, Σ e^(z − max)) of consecutive vocabulary tiles → the whole rows':
/// `m = max m_t`, `s = Σ s_t · e^(m_t − m)` (a few small ops on the device; one tile: itself).
fn combine_max_sumexp(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let p = Tensor::stack(&parts, 1)?; // [rows, tiles, 2]
    let (m_t, s_t) = (p.narrow(2, 0, 1)?, p.narrow(2, 1, 1)?);
    let m = m_t.max_keepdim(1)?; // [rows, 1, 1]
    let s = (s_t * m_t.broadcast_sub(&m)?.exp()?)?.sum_keepdim(1)?;
    Ok(Tensor::cat(&[m, s], 2)?.squeeze(1)?)
}

/// Rows of one width on the host, in one flat buffer: a `Vec` per row (candle's `to_vec2`) would
/// copy every row once more and allocate each (the detail rows are 29 × 152k f32 for one Qwen2-VL
/// request at the last position, 17.6 MB).
struct HostRows {
    data: Vec<f32>,
    width: usize,
}

impl HostRows {
    fn len(&self) -> usize {
        self.data.len() / self.width.max(1)
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn rows(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.width.max(1))
    }

    fn par_rows(&self) -> rayon::slice::ChunksExact<'_, f32> {
        self.data.par_chunks_exact(self.width.max(1))
    }
}

/// `tensors` (rows of one width) stacked and brought to the host as f32 rows in one transfer;
/// none: no rows.
fn to_host_rows(tensors: &[Tensor]) -> Result<HostRows> {
    if tensors.is_empty() {
        return Ok(HostRows {
            data: Vec::new(),
            width: 0,
        });
    }
    let all = Tensor::cat(tensors, 0)?.to_dtype(DType::F32)?;
    let width = all.dim(1)?;
    Ok(HostRows {
        data: host_f32(&all)?,
        width,
    })
}

/// An f32 tensor's elements on the host, in order. From a CUDA buffer that holds exactly them (a
/// fresh `cat`), the copy the transfer makes is the result (candle's `to_vec1` copies it again).
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        use candle_core::backend::BackendStorage;
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cuda(s), Some((0, n))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let candle_core::CpuStorage::F32(v) = s.to_cpu_storage()? {
                if v.len() == n {
                    return Ok(v);
                }
            }
        }
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
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

/// The running reduction of one row of logits over vocabulary blocks (online softmax):
/// `s = Σ e^(z−m)` and `t = Σ e^(z−m)(z−m)` relative to the running max `m`.
#[derive(Clone, Debug)]
struct RowState {
    m: f32,
    s: f64,
    t: f64,
    top_k: usize,
    /// `(id, logit)`, highest first; ties keep the lower id first.
    top: Vec<(u32, f32)>,
    /// Per traced target: its index in the spec's `targets`, the logit comparisons use, how many
    /// other entries exceed it, and the logit as the GEMM computed it (for the probability).
    target_index: Vec<usize>,
    target_cmp: Vec<f32>,
    target_above: Vec<usize>,
    target_z: Vec<f32>,
}

impl RowState {
    fn new(top_k: usize, target_index: Vec<usize>, target_cmp: Vec<f32>) -> Self {
        let n = target_cmp.len();
        RowState {
            target_index,
            m: f32::NEG_INFINITY,
            s: 0.0,
            t: 0.0,
            top_k,
            top: Vec::with_capacity(top_k + 1),
            target_z: target_cmp.clone(),
            target_cmp,
            target_above: vec![0; n],
        }
    }

    fn update(&mut self, z: &[f32], v0: usize, targets: &[u32], excluded: &[bool]) {
        self.update_softmax(z);
        self.update_ranked(z, v0, targets, excluded);
    }

    /// The running max and the two sums.
    fn update_softmax(&mut self, z: &[f32]) {
        let cmax = kernels::max(z);
        if cmax > self.m {
            if self.s > 0.0 {
                // Re-base on the new max: e^(z−m') = e^(z−m)·e^(m−m').
                let d = (self.m - cmax) as f64;
                let f = d.exp();
                self.t = f * (self.t + d * self.s);
                self.s *= f;
            }
            self.m = cmax;
        }
        let (s, t) = kernels::sum_exp(z, self.m);
        self.s += s;
        self.t += t;
    }

    /// Top-k and target ranks (rows whose position was asked for).
    fn update_ranked(&mut self, z: &[f32], v0: usize, targets: &[u32], excluded: &[bool]) {
        if self.top_k > 0 {
            for (i, &v) in z.iter().enumerate() {
                if (self.top.len() < self.top_k || v > self.top[self.top.len() - 1].1)
                    && !excluded.get(v0 + i).copied().unwrap_or(false)
                {
                    let at = self.top.partition_point(|&(_, w)| w >= v);
                    self.top.insert(at, ((v0 + i) as u32, v));
                    self.top.truncate(self.top_k);
                }
            }
        }
        for (j, &t) in self.target_index.iter().enumerate() {
            let cmp = self.target_cmp[j];
            let mut above = z.iter().filter(|&&w| w > cmp).count();
            let id = targets[t] as usize;
            if (v0..v0 + z.len()).contains(&id) {
                let own = z[id - v0];
                self.target_z[j] = own;
                above -= (own > cmp) as usize;
            }
            self.target_above[j] += above;
        }
    }

    fn wants_detail(&self) -> bool {
        self.top_k > 0 || !self.target_cmp.is_empty()
    }

    fn lse(&self) -> f32 {
        (self.m as f64 + self.s.ln()) as f32
    }

    /// `H = log s − t/s` (nats).
    fn entropy(&self) -> f32 {
        ((self.s.ln() - self.t / self.s) as f32).max(0.0)
    }
}

mod kernels {
    //! The one hot loop of the lens: `Σ e^(z−m)` and `Σ e^(z−m)(z−m)` over a vocabulary row,
    //! with a branch-free exp the compiler vectorises (AVX-512, or AVX2+FMA, when the CPU has
    //! them).

    use crate::models::fastmath::{exp, vectorised};

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

    /// The row's largest value (NaNs ignored, as `f32::max` does), compiled for AVX-512 or AVX2
    /// where the CPU has them: the baseline build's SSE2 fold took as long as the sum of
    /// exponentials.
    pub fn max(z: &[f32]) -> f32 {
        let mut m = f32::NEG_INFINITY;
        vectorised(
            #[inline(always)]
            || m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        );
        m
    }

    /// Compiled for AVX-512 or AVX2 + FMA where the CPU has them ([`vectorised`]).
    pub fn sum_exp(z: &[f32], m: f32) -> (f64, f64) {
        let mut r = (0.0, 0.0);
        vectorised(
            #[inline(always)]
            || r = sum_exp_generic(z, m),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked online reduction equals a direct softmax over the whole row.
    #[test]
    fn blocked_row_reduction_matches_a_direct_softmax() {
        let z: Vec<f32> = (0..10_000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + (i as f32) * 1e-3)
            .collect();
        let m = z.iter().copied().fold(f32::MIN, f32::max);
        let s: f64 = z.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let p: Vec<f64> = z.iter().map(|&v| ((v - m) as f64).exp() / s).collect();
        let h: f64 = -p
            .iter()
            .map(|&q| if q > 0.0 { q * q.ln() } else { 0.0 })
            .sum::<f64>();
        let targets = [5u32, 9_999];
        let mut st = RowState::new(
            3,
            vec![0, 1],
            targets.iter().map(|&t| z[t as usize]).collect(),
        );
        for (b, chunk) in z.chunks(777).enumerate() {
            st.update(chunk, b * 777, &targets, &[]);
        }
        assert!(
            (st.entropy() as f64 - h).abs() < 1e-5,
            "{} vs {h}",
            st.entropy()
        );
        assert!((st.lse() as f64 - (m as f64 + s.ln())).abs() < 1e-5);
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
        assert_eq!(
            st.top.iter().map(|t| t.0 as usize).collect::<Vec<_>>(),
            order[..3].to_vec()
        );
        for (k, &id) in targets.iter().enumerate() {
            let rank = 1 + z.iter().filter(|&&w| w > z[id as usize]).count();
            assert_eq!(st.target_above[k] + 1, rank);
            assert!(((st.target_z[k] - st.lse()).exp() as f64 - p[id as usize]).abs() < 1e-6);
        }
    }

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

    #[test]
    fn excluded_ids_never_enter_the_top_k() {
        let z: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let mut excluded = vec![false; 100];
        excluded[99] = true;
        excluded[97] = true;
        let mut st = RowState::new(2, vec![], vec![]);
        st.update(&z, 0, &[], &excluded);
        assert_eq!(st.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![98, 96]);
    }
}
