//! The lens where the rows live on an accelerator (the GPU, half precision; or forced on the CPU,
//! for the tests): each layer's GEMMs and reductions are queued on the device as the layer arrives
//! (layers of few rows together, once they fill a chunk of rows: [`Lens::launch_layers`]), only
//! small results are kept there (per row max and sum-exp; per row that wants detail, its
//! reduction of each vocabulary tile, row.rs's `TilePart`), and the host collects them at the end
//! ([`Lens::collect_pending`]), or once they pass [`PENDING_PART_BYTES`].

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::row::{RowState, TilePart};
use super::{unembed_f32, LayerPlan, Lens};
use crate::error::{Error, Result};
use crate::models::profile;

/// On an accelerator (and the tensor path): rows per unembedding GEMM. `LOGIT_LENS_ROW_CHUNK`
/// overrides it.
pub const DEVICE_ROWS: usize = 512;

/// Tensor path: the detail rows' tile parts that may wait on the device before the queued layers
/// are collected (f32 bytes). A part is `5 + 2k + 2T` floats a row and tile: with `positions: all`
/// on a long input and a large k (a OneVision input of ~7000 tokens × 29 layers × 10 tiles, k =
/// 100: 1.7 GB) they are collected every few layers instead of at the end.
pub(super) const PENDING_PART_BYTES: usize = 64 << 20;

/// Tensor path: vocabulary entries per unembedding GEMM. 512 rows × 16384 entries of f32 logits are
/// 32 MB, inside an H100's 50 MB L2, where the reduction kernel reads them back; 152k-entry rows
/// (311 MB a chunk) went out to memory and back. `LOGIT_LENS_VOCAB_TILE` overrides it (0 or `all`:
/// the whole vocabulary per GEMM, as before; for measuring one against the other).
pub const DEVICE_VOCAB_TILE: usize = 16384;

/// Vocabulary rows per block when the final layer's `Wᵀ p_L` is accumulated in f32 (and, with
/// soft-capping, the KL cross terms). Each block widens its slice of the unembedding to f32 on
/// the device, a transient on top of the weights: 16384 × 1536 × 4 = 100 MB for Qwen2-VL-2B,
/// 16384 × 4096 × 4 = 268 MB for LLaVA-1.5-7B (blocks of 65536 held 400 and 524 MB, a quarter of
/// issue 17's 2 GiB over the weights).
pub(super) const DEVICE_VOCAB_BLOCK: usize = 16384;

impl Lens<'_> {
    /// The GEMMs of the layers waiting in `device_queue`, as one pass ([`Self::launch_layers`]);
    /// they join `pending`.
    pub(super) fn launch_queued(&mut self) -> Result<()> {
        if self.device_queue.is_empty() {
            return Ok(());
        }
        let mut plans = std::mem::take(&mut self.device_queue);
        self.launch_layers(&mut plans)?;
        self.pending.extend(plans);
        Ok(())
    }

    /// Brings the queued layers to the host and records them, in layer order.
    pub(super) fn collect_pending(&mut self) -> Result<()> {
        self.launch_queued()?;
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

    /// The targets' logits at `rows` `[rows, targets]` (f32, computed in f64), left on the device.
    pub(super) fn target_logits_device(&self, rows: &Tensor) -> Result<Option<Tensor>> {
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

    /// Queues the reduction of `plans` (consecutive layers, their rows taken together) where their
    /// rows live (the GPU): the rows go through the unembedding in blocks of `row_chunk` rows ×
    /// `vocab_tile` vocabulary entries ([`unembed_blocks`]: cache-sized, the tiles outermost);
    /// each block's per-row max and sum of exponentials come from one fused kernel (CUDA) or a few
    /// tensor ops and are combined across tiles, and the rows that want detail (top-k, ranks) are
    /// reduced tile by tile into a few numbers each ([`Self::detail_tile`]); all of it stays on
    /// the device, nothing waits. Each plan then holds its own rows' share of the results.
    pub(super) fn launch_layers(&self, plans: &mut [LayerPlan]) -> Result<()> {
        let mut parts: Vec<Tensor> = plans
            .iter_mut()
            .map(|p| p.normed_rows.take().expect("planned rows"))
            .collect();
        let normed = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        drop(parts);
        let total = normed.dim(0)?;
        // Per plan: its rows and its rows that want detail (top-k, ranks), in row order.
        let counts: Vec<(usize, usize)> = plans
            .iter()
            .map(|p| {
                let wanting = p.states.iter().filter(|st| st.wants_detail()).count();
                (p.states.len(), wanting)
            })
            .collect();
        let detail: Vec<usize> = plans
            .iter()
            .flat_map(|p| p.states.iter())
            .enumerate()
            .filter(|(_, st)| st.wants_detail())
            .map(|(r, _)| r)
            .collect();
        if self.unembed.dim(0)? >= 1 << 24 {
            // A tile part carries ids as f32 (row.rs, `TilePart`).
            return Err(Error::Internal(
                "lens: a vocabulary of 2^24 entries or more on the tensor path".into(),
            ));
        }
        let cmp = detail_targets(plans)?;
        let chunk = self.row_chunk.max(1);
        let chunks = total.div_ceil(chunk);
        // Per chunk: its detail rows' indices within it (none: no index tensor), and their targets'
        // logits.
        let mut idx = Vec::with_capacity(chunks);
        let mut chunk_cmp = Vec::with_capacity(chunks);
        let mut first = 0;
        for c in 0..chunks {
            let (start, end) = (c * chunk, ((c + 1) * chunk).min(total));
            let here: Vec<u32> = detail
                .iter()
                .filter(|&&r| (start..end).contains(&r))
                .map(|&r| (r - start) as u32)
                .collect();
            let n = here.len();
            idx.push(
                (n > 0)
                    .then(|| Tensor::from_slice(&here, n, normed.device()))
                    .transpose()?,
            );
            chunk_cmp.push(
                cmp.as_ref()
                    .filter(|_| n > 0)
                    .map(|t| t.narrow(0, first, n))
                    .transpose()?,
            );
            first += n;
        }
        // Per chunk: its rows' (max, Σ e^(z − max)) over the tiles so far.
        let mut sums: Vec<Option<Tensor>> = vec![None; chunks];
        let mut detail_tiles = vec![Vec::new(); chunks];
        unembed_blocks(
            &normed,
            &self.unembed,
            chunk,
            self.vocab_tile,
            |c, v0, logits| {
                let logits = self.cap(logits)?;
                sums[c] = Some(fold_max_sumexp(sums[c].take(), &logits)?);
                let Some(idx) = &idx[c] else { return Ok(()) };
                // Every row of the chunk (no summary): the block itself, not a copy of it.
                let picked = if idx.dim(0)? == logits.dim(0)? {
                    logits
                } else {
                    logits.index_select(idx, 0)?
                };
                detail_tiles[c].push(self.detail_tile(&picked, chunk_cmp[c].as_ref(), v0)?);
                Ok(())
            },
        )?;
        let sums = sums
            .into_iter()
            .map(|s| s.ok_or_else(|| Error::Internal("lens: a chunk without tiles".into())))
            .collect::<Result<Vec<_>>>()?;
        let detail_parts = detail_tiles
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
        let (sums, detail_parts) = (cat(sums)?, cat(detail_parts)?);
        // Each plan's share: its rows' sums, and its detail rows' parts (in row order, so
        // consecutive).
        let (mut row, mut wanted) = (0, 0);
        for (plan, &(n, w)) in plans.iter_mut().zip(&counts) {
            plan.device_sums = sums.as_ref().map(|t| t.narrow(0, row, n)).transpose()?;
            plan.device_detail = match &detail_parts {
                Some(t) if w > 0 => Some(t.narrow(0, wanted, w)?),
                _ => None,
            };
            row += n;
            wanted += w;
        }
        Ok(())
    }

    /// The detail rows `picked` `[rows, entries]` (f32 logits of the vocabulary entries from
    /// `v0`) reduced, each to its [`TilePart`] for this tile `[rows, width]`, where they live: one
    /// kernel on CUDA (lens/row_reduce.cu), so a row's 152k logits never leave the card; elsewhere
    /// (and with `LOGIT_LENS_DEVICE_DETAIL=0`) the rows are brought to the host and reduced there,
    /// the kernel's twin ([`RowState::tile_part`]). `cmp`: the rows' logits of the spec's targets
    /// `[rows, targets]`.
    fn detail_tile(&self, picked: &Tensor, cmp: Option<&Tensor>, v0: usize) -> Result<Tensor> {
        let layout = self.tile_layout();
        #[cfg(feature = "cuda")]
        if picked.device().is_cuda() {
            let keys = self.device_keys.get_or_init(|| {
                super::cuda::detail_keys(self.spec, &self.unembed).unwrap_or_else(|e| {
                    eprintln!("note: the detail rows go to the host ({e})");
                    None
                })
            });
            if let Some(keys) = keys {
                let vocab = self.unembed.dim(0)?;
                return Ok(super::cuda::detail_tile(
                    picked, cmp, keys, v0, vocab, layout,
                )?);
            }
        }
        let rows = to_host_rows(std::slice::from_ref(picked))?;
        let cmp = match cmp {
            Some(c) => to_host_rows(std::slice::from_ref(c))?,
            None => to_host_rows(&[])?,
        };
        let parts: Vec<Vec<f32>> = rows
            .par_rows()
            .enumerate()
            .map(|(i, z)| {
                let cmp = if layout.targets == 0 {
                    &[][..]
                } else {
                    cmp.row(i)
                };
                RowState::tile_part(z, v0, layout, &self.spec.targets, &self.spec.excluded, cmp)
            })
            .collect();
        let n = parts.len();
        Ok(Tensor::from_vec(
            parts.concat(),
            (n, layout.width()),
            picked.device(),
        )?)
    }

    /// What a detail row's reduction over one tile holds.
    pub(super) fn tile_layout(&self) -> TilePart {
        TilePart {
            top_k: self.spec.top_k,
            targets: self.spec.targets.len(),
        }
    }

    /// The host's side of the queued layers, once at the end: every layer's sums in one
    /// transfer, the detail rows' tile parts in another, then each detail row's parts merged
    /// (entropy, top-k, ranks) in parallel.
    pub(super) fn collect_layers(&self, plans: &mut [LayerPlan]) -> Result<()> {
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
        let block = profile::op(
            "lens collect: detail rows' tile parts to the host",
            dev,
            || to_host_rows(&detail),
        )?;
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
        let (layout, vocab) = (self.tile_layout(), self.unembed.dim(0)?);
        let tile = effective_tile(self.vocab_tile, vocab);
        profile::op(
            "lens collect: detail rows' tiles merged on the host",
            dev,
            || {
                states
                    .into_par_iter()
                    .zip(block.par_rows())
                    .for_each(|(st, row)| {
                        for (t, part) in row.chunks_exact(layout.width()).enumerate() {
                            let v0 = t * tile;
                            st.merge_tile(
                                part,
                                v0,
                                tile.min(vocab - v0),
                                layout,
                                &self.spec.targets,
                            );
                        }
                    });
                Ok(())
            },
        )
    }
}

/// Per detail row of `plans` (row order, the plans' rows taken together), its logits of the spec's
/// targets `[rows, targets]`, still on the device (none: no targets). A row's are those of any of
/// its requests (a position asked twice has one row).
fn detail_targets(plans: &[LayerPlan]) -> Result<Option<Tensor>> {
    let mut parts = Vec::new();
    for plan in plans {
        let Some(targets) = &plan.device_targets else {
            continue;
        };
        let mut request_of = vec![None; plan.states.len()];
        for (k, &r) in plan.requested.iter().enumerate() {
            request_of[r].get_or_insert(k as u32);
        }
        let ks: Vec<u32> = plan
            .states
            .iter()
            .zip(request_of)
            .filter(|(st, _)| st.wants_detail())
            .map(|(_, k)| {
                k.ok_or_else(|| Error::Internal("lens: a detail row nobody requested".into()))
            })
            .collect::<Result<_>>()?;
        if !ks.is_empty() {
            let ks = Tensor::from_slice(&ks, ks.len(), targets.device())?;
            parts.push(targets.index_select(&ks, 0)?);
        }
    }
    Ok(match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(Tensor::cat(&parts, 0)?),
    })
}

/// Vocabulary entries per GEMM: `tile`, or the whole vocabulary for 0.
pub(super) fn effective_tile(tile: usize, vocab: usize) -> usize {
    if tile == 0 {
        vocab
    } else {
        tile.min(vocab)
    }
}

pub(super) fn vocab_tile_from_env() -> usize {
    match std::env::var("LOGIT_LENS_VOCAB_TILE") {
        Ok(v) if v == "all" => 0,
        Ok(v) => v.parse().unwrap_or(DEVICE_VOCAB_TILE),
        Err(_) => DEVICE_VOCAB_TILE,
    }
}

pub(super) fn row_chunk_from_env() -> usize {
    std::env::var("LOGIT_LENS_ROW_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEVICE_ROWS)
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
pub(super) fn unembed_blocks(
    rows: &Tensor,
    unembed: &Tensor,
    row_chunk: usize,
    tile: usize,
    mut each: impl FnMut(usize, usize, Tensor) -> Result<()>,
) -> Result<()> {
    let (total, vocab) = (rows.dim(0)?, unembed.dim(0)?);
    let tile = effective_tile(tile, vocab);
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
pub(super) fn take_targets(plans: &mut [LayerPlan]) -> Result<()> {
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
pub(super) fn row_max_sumexp(logits: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return Ok(super::cuda::row_max_sumexp(logits)?);
    }
    let z = logits.to_dtype(DType::F32)?;
    let m = z.max_keepdim(1)?;
    let s = z.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?;
    Ok(Tensor::cat(&[m, s], 1)?)
}

/// The per-row (max, Σ e^(z − max)) of the vocabulary tiles so far (`acc`; none before the first)
/// with the tile `logits` folded in: on CUDA one kernel updating `acc` in place, elsewhere the
/// tile's own reduction combined with `acc` ([`combine_max_sumexp`]).
pub(super) fn fold_max_sumexp(acc: Option<Tensor>, logits: &Tensor) -> Result<Tensor> {
    let Some(acc) = acc else {
        return row_max_sumexp(logits);
    };
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && logits.dtype() == DType::F32 {
        super::cuda::fold_max_sumexp(&acc, logits)?;
        return Ok(acc);
    }
    combine_max_sumexp(vec![acc, row_max_sumexp(logits)?])
}

/// Per-tile `[rows, 2]` (max, Σ e^(z − max)) of consecutive vocabulary tiles → the whole rows':
/// `m = max m_t`, `s = Σ s_t · e^(m_t − m)` (a few small ops on the device; one tile: itself).
pub(super) fn combine_max_sumexp(mut parts: Vec<Tensor>) -> Result<Tensor> {
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
/// copy every row once more and allocate each (a chunk's detail rows for one tile, on the host's
/// way, are up to 512 × 16384 f32). From CUDA, a page-locked buffer kept for the next request
/// where it fits (cuda.rs, [`super::cuda::to_pinned`]).
pub(super) struct HostRows {
    data: HostData,
    width: usize,
}

enum HostData {
    Owned(Vec<f32>),
    #[cfg(feature = "cuda")]
    Pinned(super::cuda::PinnedRows),
}

impl HostRows {
    fn data(&self) -> &[f32] {
        match &self.data {
            HostData::Owned(v) => v,
            #[cfg(feature = "cuda")]
            HostData::Pinned(p) => p.as_slice(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.data().len() / self.width.max(1)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.data().is_empty()
    }

    pub(super) fn rows(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data().chunks_exact(self.width.max(1))
    }

    pub(super) fn row(&self, i: usize) -> &[f32] {
        &self.data()[i * self.width..(i + 1) * self.width]
    }

    pub(super) fn par_rows(&self) -> rayon::slice::ChunksExact<'_, f32> {
        self.data().par_chunks_exact(self.width.max(1))
    }
}

/// `tensors` (rows of one width) stacked and brought to the host as f32 rows in one transfer;
/// none: no rows.
pub(super) fn to_host_rows(tensors: &[Tensor]) -> Result<HostRows> {
    if tensors.is_empty() {
        return Ok(HostRows {
            data: HostData::Owned(Vec::new()),
            width: 0,
        });
    }
    let all = Tensor::cat(tensors, 0)?.to_dtype(DType::F32)?;
    let width = all.dim(1)?;
    #[cfg(feature = "cuda")]
    if let Some(pinned) = super::cuda::to_pinned(&all)? {
        return Ok(HostRows {
            data: HostData::Pinned(pinned),
            width,
        });
    }
    Ok(HostRows {
        data: HostData::Owned(host_f32(&all)?),
        width,
    })
}

/// An f32 tensor's elements on the host, in order. From a CUDA buffer that holds exactly them (a
/// fresh `cat`), the copy the transfer makes is the result (candle's `to_vec1` copies it again).
pub(super) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
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
