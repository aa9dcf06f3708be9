//! The lens's GPU pieces: its one custom kernel (row_reduce.cu, compiled to PTX by build.rs with
//! the CUDA toolkit's nvcc): per row of a logits block, the max and the sum of exponentials in one
//! read of the logits, instead of a chain of generic ops that each write a full f32 copy; and the
//! unembedding GEMM with half-precision inputs and f32 logits (candle's matmul returns its inputs'
//! dtype).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DevicePtrMut, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/row_reduce.ptx"));

/// `[rows, cols]` logits (f32, bf16 or f16, contiguous) → `[rows, 2]` f32: (max, Σ e^(z − max)).
pub fn row_max_sumexp(logits: &Tensor) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1_no_bwd(&RowMaxSumExp)
}

struct RowMaxSumExp;

/// `acc` `[rows, 2]` f32 (each row's max and Σ e^(z − max) over earlier vocabulary tiles) with the
/// tile `logits` `[rows, cols]` f32 folded in, in place: one launch a tile.
pub fn fold_max_sumexp(acc: &Tensor, logits: &Tensor) -> candle_core::Result<()> {
    acc.inplace_op2(&logits.contiguous()?, &FoldMaxSumExp)
}

struct FoldMaxSumExp;

impl candle_core::InplaceOp2 for FoldMaxSumExp {
    fn name(&self) -> &'static str {
        "row-max-sumexp-fold"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("row-max-sumexp-fold runs on the GPU only (the CPU combines tensors)")
    }

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        acc_l: &Layout,
        z: &CudaStorage,
        z_l: &Layout,
    ) -> candle_core::Result<()> {
        let (rows, cols) = z_l.shape().dims2()?;
        let (a0, _) = acc_l
            .contiguous_offsets()
            .filter(|_| acc_l.shape().dims() == [rows, 2])
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("row-max-sumexp-fold: acc {:?}", acc_l.shape()))
            })?;
        let (z0, _) = z_l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("row-max-sumexp-fold needs contiguous logits".into())
        })?;
        if z.dtype() != DType::F32 || acc.dtype() != DType::F32 {
            candle_core::bail!("row-max-sumexp-fold: f32 logits and sums");
        }
        let dev = z.device().clone();
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = cols as i64;
        let func =
            dev.get_or_load_custom_func("row_max_sumexp_fold_f32", "logit_lens_row_reduce", PTX)?;
        let src = z.as_cuda_slice::<f32>()?.slice(z0..);
        let mut dst = acc.as_cuda_slice_mut::<f32>()?.slice_mut(a0..);
        let mut b = func.builder();
        b.arg(&src);
        b.arg(&mut dst);
        b.arg(&cols);
        // SAFETY: the kernel reads rows·cols elements of `src` and reads and writes rows·2 of `dst`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

impl candle_core::CustomOp1 for RowMaxSumExp {
    fn name(&self) -> &'static str {
        "row-max-sumexp"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "row-max-sumexp runs on the GPU only; the CPU lens has its own fused reduction"
        )
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = layout.shape().dims2()?;
        let (start, _) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("row-max-sumexp needs contiguous logits".into())
        })?;
        let dev = storage.device();
        // SAFETY: the kernel writes both values of every row (one block per row).
        let out = unsafe { dev.alloc::<f32>(rows * 2) }?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = cols as i64;
        macro_rules! launch {
            ($ty:ty, $name:literal) => {{
                let func = dev.get_or_load_custom_func($name, "logit_lens_row_reduce", PTX)?;
                let src = storage.as_cuda_slice::<$ty>()?.slice(start..);
                let mut b = func.builder();
                b.arg(&src);
                b.arg(&out);
                b.arg(&cols);
                // SAFETY: the kernel reads rows·cols elements of `src` and writes rows·2 of `out`.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match storage.dtype() {
            DType::F32 => launch!(f32, "row_max_sumexp_f32"),
            DType::BF16 => launch!(half::bf16, "row_max_sumexp_bf16"),
            DType::F16 => launch!(half::f16, "row_max_sumexp_f16"),
            d => candle_core::bail!("row-max-sumexp: unsupported dtype {d:?}"),
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, 2)),
        ))
    }
}

/// What the detail rows' kernel reads besides the logits ([`detail_tile`]), on the unembedding's
/// device: the spec's target ids and a 0 (so that it is never empty), then, where some ids are
/// excluded from the top-k, one u32 flag per vocabulary entry. None off CUDA, with
/// `LOGIT_LENS_DEVICE_DETAIL=0`, and for a top-k past the kernel's bound (the rows then come to
/// the host, lens/device.rs).
pub fn detail_keys(
    spec: &super::LensSpec,
    unembed: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !unembed.device().is_cuda()
        || !device_detail_enabled()
        || !(1..=DETAIL_MAX_K).contains(&spec.top_k)
    {
        return Ok(None);
    }
    let mut ids = spec.targets.clone();
    ids.push(0);
    let n = ids.len();
    let ids = Tensor::from_vec(ids, n, unembed.device())?;
    if !spec.excluded.iter().any(|&e| e) {
        return Ok(Some(ids));
    }
    Ok(Some(Tensor::cat(&[ids, excluded_mask(spec, unembed)?], 0)?))
}

/// The excluded ids' flags over the vocabulary, on the unembedding's device: the last few made
/// are kept (one a model, with `exclude_special`), so that a generation step does not send the
/// vocabulary's 600 KB to the card again.
fn excluded_mask(spec: &super::LensSpec, unembed: &Tensor) -> candle_core::Result<Tensor> {
    static MASKS: std::sync::Mutex<Vec<(Vec<bool>, Tensor)>> = std::sync::Mutex::new(Vec::new());
    let mut masks = MASKS.lock().unwrap_or_else(|e| e.into_inner());
    let vocab = unembed.dim(0)?;
    let found = masks.iter().position(|(excluded, mask)| {
        mask.dim(0).is_ok_and(|n| n == vocab)
            && mask.device().same_device(unembed.device())
            && *excluded == spec.excluded
    });
    if let Some(i) = found {
        return Ok(masks[i].1.clone());
    }
    let flags: Vec<u32> = (0..vocab)
        .map(|v| spec.excluded.get(v).copied().unwrap_or(false) as u32)
        .collect();
    let mask = Tensor::from_vec(flags, vocab, unembed.device())?;
    if masks.len() >= 4 {
        masks.remove(0);
    }
    masks.push((spec.excluded.clone(), mask.clone()));
    Ok(mask)
}

/// Each row's argmax of `logits` `[rows, vocab]` (f32, on CUDA), the lowest id among equal
/// maxima (as torch's argmax; NaNs never): the detail rows' kernel with k = 1 over the whole row,
/// so that only the ids come to the host, not the rows (a generation step of 8 Qwen2-VL answers:
/// 4.8 MB). None where the kernel is switched off (`LOGIT_LENS_DEVICE_DETAIL=0`) or the
/// vocabulary is past 2²⁴: the caller reduces on the host.
pub fn argmax_rows(logits: &Tensor) -> candle_core::Result<Option<Vec<u32>>> {
    let (rows, vocab) = logits.dims2()?;
    if !logits.device().is_cuda() || !device_detail_enabled() || vocab >= 1 << 24 || rows == 0 {
        return Ok(None);
    }
    let keys = Tensor::from_vec(vec![0u32], 1, logits.device())?;
    let layout = super::row::TilePart {
        top_k: 1,
        targets: 0,
    };
    let parts = detail_tile(&logits.to_dtype(DType::F32)?, None, &keys, 0, vocab, layout)?
        .to_vec2::<f32>()?;
    parts
        .iter()
        .map(|p| {
            let id = p[super::row::TILE_HEAD];
            if id < 0.0 {
                candle_core::bail!("argmax-rows: a row without a finite logit");
            }
            Ok(id as u32)
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map(Some)
}

/// Whether detail rows are reduced on the card (`LOGIT_LENS_DEVICE_DETAIL=0`: on the host, each
/// tile's rows brought there; to measure one against the other, or to step around the kernel).
fn device_detail_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LOGIT_LENS_DEVICE_DETAIL").map_or(true, |v| v != "0"))
}

/// The detail rows `picked` `[rows, entries]` (f32 logits of the vocabulary entries from `v0`)
/// → `[rows, layout.width()]`: each row's reduction over this tile, as the host's twin lays it out
/// (row.rs, `RowState::tile_part`); one block per row. `cmp`: the rows' logits of the spec's
/// targets `[rows, targets]` (f32; none without targets); `keys`: [`detail_keys`] for a
/// vocabulary of `vocab` entries.
pub fn detail_tile(
    picked: &Tensor,
    cmp: Option<&Tensor>,
    keys: &Tensor,
    v0: usize,
    vocab: usize,
    layout: super::row::TilePart,
) -> candle_core::Result<Tensor> {
    if layout.top_k > DETAIL_MAX_K || layout.top_k == 0 {
        candle_core::bail!("detail-tile: top_k {} (1 to {DETAIL_MAX_K})", layout.top_k);
    }
    let cmp = match cmp {
        Some(c) if layout.targets > 0 => c.contiguous()?,
        None if layout.targets == 0 => keys.clone(),
        _ => candle_core::bail!("detail-tile: target logits without targets, or the reverse"),
    };
    picked.contiguous()?.apply_op3_no_bwd(
        &cmp,
        keys,
        &DetailTile {
            v0,
            vocab,
            top_k: layout.top_k,
            targets: layout.targets,
        },
    )
}

/// The kernel's bound on k (row_reduce.cu's `DETAIL_MAX_K`, the API's `MAX_TOP_K`).
const DETAIL_MAX_K: usize = 100;

struct DetailTile {
    v0: usize,
    /// The vocabulary's size (the excluded flags' count).
    vocab: usize,
    top_k: usize,
    targets: usize,
}

impl candle_core::CustomOp3 for DetailTile {
    fn name(&self) -> &'static str {
        "detail-tile"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("detail-tile runs on the GPU only (the CPU has RowState::tile_part)")
    }

    fn cuda_fwd(
        &self,
        z: &CudaStorage,
        z_l: &Layout,
        cmp: &CudaStorage,
        cmp_l: &Layout,
        keys: &CudaStorage,
        keys_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = z_l.shape().dims2()?;
        let contiguous = |l: &Layout, what: &str| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg(format!("detail-tile needs contiguous {what}"))
            })
        };
        let (z0, _) = contiguous(z_l, "logits")?;
        let (k0, k1) = contiguous(keys_l, "keys")?;
        if z.dtype() != DType::F32 || keys.dtype() != DType::U32 {
            candle_core::bail!("detail-tile: f32 logits and u32 keys");
        }
        let excluded = k1 - k0 > self.targets + 1;
        if excluded && (k1 - k0 != self.targets + 1 + self.vocab || self.v0 + cols > self.vocab) {
            candle_core::bail!(
                "detail-tile: {} keys for {} targets, entries {}..{} of {}",
                k1 - k0,
                self.targets,
                self.v0,
                self.v0 + cols,
                self.vocab
            );
        }
        let width = super::row::TilePart {
            top_k: self.top_k,
            targets: self.targets,
        }
        .width();
        if rows == 0 {
            candle_core::bail!("detail-tile: no rows");
        }
        let dev = z.device().clone();
        // SAFETY: one block per row writes all `width` values of its row.
        let out = unsafe { dev.alloc::<f32>(rows * width) }?;
        // A 16384-entry tile is 16 entries a thread: short dependent chains of loads with few rows
        // (29 blocks for a request's last position on 132 SMs).
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = dev.get_or_load_custom_func("detail_tile_f32", "logit_lens_row_reduce", PTX)?;
        let src = z.as_cuda_slice::<f32>()?.slice(z0..);
        let all_keys = keys.as_cuda_slice::<u32>()?;
        let tids = all_keys.slice(k0..);
        let mask = all_keys.slice(k0 + self.targets + 1..);
        let (cols_arg, targets_arg) = (cols as i64, self.targets as i32);
        let (v0_arg, k_arg) = (self.v0 as i64, self.top_k as i32);
        let no_mask: u64 = 0;
        // Without targets the kernel never reads `cmp` (it is the keys then).
        let cmp_slice = if self.targets > 0 {
            if cmp.dtype() != DType::F32 || cmp_l.shape().dims2()? != (rows, self.targets) {
                candle_core::bail!("detail-tile: target logits {:?}", cmp_l.shape());
            }
            let (c0, _) = contiguous(cmp_l, "target logits")?;
            Some(cmp.as_cuda_slice::<f32>()?.slice(c0..))
        } else {
            None
        };
        let mut b = func.builder();
        b.arg(&src);
        b.arg(&cols_arg);
        match &cmp_slice {
            Some(c) => b.arg(c),
            None => b.arg(&no_mask),
        };
        b.arg(&tids);
        b.arg(&targets_arg);
        if excluded {
            b.arg(&mask);
        } else {
            b.arg(&no_mask);
        }
        b.arg(&v0_arg);
        b.arg(&k_arg);
        b.arg(&out);
        // SAFETY: the kernel reads rows·cols logits, rows·targets target logits, `targets` ids and
        // (with `excluded`) a flag for each of the entries v0..v0 + cols, all inside their
        // buffers; it writes rows·width values of `out`.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((rows, width)),
        ))
    }
}

/// `rows · wᵀ` (`rows` `[n, hidden]`, `w` `[vocab, hidden]`, both bf16 or both f16) → `[n, vocab]`
/// f32: one cublasGemmEx with f32 accumulation and an f32 result.
pub fn matmul_nt_f32(rows: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    rows.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &MatmulNtF32)
}

struct MatmulNtF32;

impl candle_core::CustomOp2 for MatmulNtF32 {
    fn name(&self) -> &'static str {
        "matmul-nt-f32"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "matmul-nt-f32 runs on the GPU only; the CPU widens to f32 and multiplies"
        )
    }

    fn cuda_fwd(
        &self,
        rows: &CudaStorage,
        rows_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, k) = rows_l.shape().dims2()?;
        let (vocab, k2) = w_l.shape().dims2()?;
        if k != k2 || rows.dtype() != w.dtype() {
            candle_core::bail!(
                "matmul-nt-f32: [{n}, {k}] {:?} by [{vocab}, {k2}] {:?}",
                rows.dtype(),
                w.dtype()
            );
        }
        let contiguous = |l: &Layout| {
            l.contiguous_offsets().map(|(a, _)| a).ok_or_else(|| {
                candle_core::Error::Msg("matmul-nt-f32 needs contiguous inputs".into())
            })
        };
        let (r0, w0) = (contiguous(rows_l)?, contiguous(w_l)?);
        let dev = rows.device();
        let stream = dev.cuda_stream();
        // SAFETY: cublasGemmEx writes every one of the n·vocab elements (beta = 0).
        let mut out = unsafe { dev.alloc::<f32>(n * vocab)? };
        let (alpha, beta) = (1f32, 0f32);
        let blas = dev.cublas_handle();
        macro_rules! gemm {
            ($ty:ty, $cuda_ty:expr) => {{
                let r = rows.as_cuda_slice::<$ty>()?.slice(r0..);
                let wv = w.as_cuda_slice::<$ty>()?.slice(w0..);
                let (r_ptr, _gr) = r.device_ptr(&stream);
                let (w_ptr, _gw) = wv.device_ptr(&stream);
                let (o_ptr, _go) = out.device_ptr_mut(&stream);
                // Column-major, as cuBLAS sees row-major buffers: out [vocab, n] = wᵀ·rows, with
                // w read as [hidden, vocab] (transposed) and rows as [hidden, n].
                // SAFETY: the pointers hold vocab·k, n·k and n·vocab elements, as the dims say.
                unsafe {
                    cublas::gemm_ex(
                        *blas.handle(),
                        cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                        cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                        vocab as i32,
                        n as i32,
                        k as i32,
                        (&alpha) as *const f32 as *const _,
                        w_ptr as *const _,
                        $cuda_ty,
                        k as i32,
                        r_ptr as *const _,
                        $cuda_ty,
                        k as i32,
                        (&beta) as *const f32 as *const _,
                        o_ptr as *mut _,
                        cublas_sys::cudaDataType_t::CUDA_R_32F,
                        vocab as i32,
                        cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                    )
                }
                .w()?;
            }};
        }
        match rows.dtype() {
            DType::BF16 => gemm!(half::bf16, cublas_sys::cudaDataType_t::CUDA_R_16BF),
            DType::F16 => gemm!(half::f16, cublas_sys::cudaDataType_t::CUDA_R_16F),
            d => candle_core::bail!("matmul-nt-f32: unsupported dtype {d:?}"),
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, vocab)),
        ))
    }
}

/// Page-locked host buffers that the lens's results come back to, kept for the next request. A
/// copy from the card to ordinary (pageable) memory goes through the driver's own staging buffer,
/// a chunk at a time, into pages that a fresh `Vec` first has to fault in. What comes back: the
/// rows' sums, the detail rows' tile parts, the requested normed rows (for KL), and with
/// `LOGIT_LENS_DEVICE_DETAIL=0` a chunk's detail rows one tile at a time (up to 512 × 16384 f32).
/// At most [`PINNED_BUFFERS`] buffers, [`PINNED_KEPT_BYTES`] in all, are kept.
static PINNED: std::sync::Mutex<Vec<PinnedHostSlice<f32>>> = std::sync::Mutex::new(Vec::new());
const PINNED_BUFFERS: usize = 4;
const PINNED_KEPT_BYTES: usize = 512 << 20;
/// Larger transfers go to pageable memory (none that the lens makes today: its tile parts are
/// collected every 64 MiB, `PENDING_PART_BYTES`).
pub const PINNED_MAX_BYTES: usize = 272 << 20;
/// Buffers are allocated in steps of this many f32 (4 MB), so that transfers of nearby sizes
/// share them.
const PINNED_STEP: usize = 1 << 20;

/// f32 on the host, in a pooled page-locked buffer (back to the pool when dropped).
pub struct PinnedRows {
    /// Always `Some` until dropped.
    buf: Option<PinnedHostSlice<f32>>,
    /// `buf`'s first element.
    ptr: *const f32,
    len: usize,
}

// SAFETY: `ptr` points into `buf`, which this owns (page-locked host memory, like a `Vec`'s).
unsafe impl Send for PinnedRows {}
unsafe impl Sync for PinnedRows {}

impl PinnedRows {
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: the copy into `buf` finished before this was made (`to_pinned` synchronised the
        // stream), `len` ≤ its length, and nothing writes it while this holds it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for PinnedRows {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let mut pool = PINNED.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(buf);
        // The smallest go first.
        while pool.len() > PINNED_BUFFERS
            || pool.iter().map(|b| b.num_bytes()).sum::<usize>() > PINNED_KEPT_BYTES
        {
            let smallest = (0..pool.len()).min_by_key(|&i| pool[i].len()).unwrap_or(0);
            pool.swap_remove(smallest);
        }
    }
}

/// Whether transfers use the pool (`LOGIT_LENS_PINNED=0`: pageable memory, as candle copies; to
/// measure one against the other).
fn pinned_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LOGIT_LENS_PINNED").map_or(true, |v| v != "0"))
}

/// A contiguous f32 CUDA tensor's elements in a pooled page-locked buffer, the stream synchronised;
/// None where the pool does not serve it (not an f32 CUDA tensor, empty, over
/// [`PINNED_MAX_BYTES`], or the pool switched off): the caller copies as before.
pub fn to_pinned(t: &Tensor) -> candle_core::Result<Option<PinnedRows>> {
    if !pinned_enabled() || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cuda(s), Some((o, e))) = (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let n = e - o;
    if n == 0 || n * 4 > PINNED_MAX_BYTES {
        return Ok(None);
    }
    let stream = s.device().cuda_stream();
    let taken = {
        let mut pool = PINNED.lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..pool.len())
            .filter(|&i| pool[i].len() >= n)
            .min_by_key(|&i| pool[i].len());
        best.map(|i| pool.swap_remove(i))
    };
    let mut buf = match taken {
        Some(b) => b,
        None => {
            // SAFETY: the buffer's contents are written by the copy below before anything reads
            // them. Portable: page-locked for every context (the service's devices are separate
            // contexts' handles on one card); not write-combined, which the host reads slowly.
            let fresh = unsafe {
                stream.context().alloc_pinned_with_flags::<f32>(
                    n.div_ceil(PINNED_STEP) * PINNED_STEP,
                    cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE,
                )
            };
            match fresh {
                Ok(b) => b,
                // Page-locked memory is an optimisation: without it, the copy goes as candle's.
                Err(e) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        eprintln!("note: no page-locked host memory ({e:?}); the lens's results come back through pageable memory")
                    });
                    return Ok(None);
                }
            }
        }
    };
    let src = s.as_cuda_slice::<f32>()?.slice(o..e);
    {
        let dst = buf.as_mut_slice().w()?;
        stream.memcpy_dtoh(&src, &mut dst[..n]).w()?;
    }
    // The copy into page-locked memory is asynchronous: wait for it (and what came before it).
    stream.synchronize().w()?;
    let ptr = buf.as_ptr().w()?;
    Ok(Some(PinnedRows {
        buf: Some(buf),
        ptr,
        len: n,
    }))
}

/// On a card (run by bench/gpu/device.sh): the unembedding GEMM's f32 logits equal the exact sums
/// of the half-precision products to f32 accumulation error, and are not rounded to the half dtype.
#[cfg(test)]
mod gpu_tests {
    use super::*;
    use crate::models::profile::on_a_card::{gpu, per_call};
    use candle_core::Device;

    /// The row reduction against the host's, in every dtype, on rows longer and shorter than a block
    /// and a view that starts inside its buffer.
    #[test]
    fn row_max_sumexp_matches_the_host_on_the_gpu() {
        let Some(gpu) = gpu() else { return };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (rows, cols) in [(3, 151936), (5, 300), (2, 7)] {
                let z = Tensor::randn(0f32, 3.0, (rows + 1, cols), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .narrow(0, 1, rows)
                    .unwrap();
                let got = row_max_sumexp(&z.to_device(&gpu).unwrap().narrow(0, 0, rows).unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let host = z.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
                for (g, row) in got.iter().zip(&host) {
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
                    assert_eq!(g[0] as f64, m, "{dtype:?} [{rows}, {cols}]: max");
                    assert!(
                        ((g[1] as f64 - s) / s).abs() < 1e-5,
                        "{dtype:?} [{rows}, {cols}]: sum {} against {s}",
                        g[1]
                    );
                }
            }
        }
    }

    /// The detail rows' kernel against its host twin (`RowState::tile_part`) on logits with many
    /// ties: the top-k (k 1, 5, 12, 100), excluded ids, targets inside and outside the tile (with
    /// the comparison at the target's own logit, so leaving it out counts), more targets than a
    /// group, a partial last tile; ids, logits, ranks exactly, the sums to f32 rounding. Then its
    /// time against bringing the same rows to the host, which it replaces.
    #[test]
    fn detail_tiles_on_the_gpu_equal_their_host_twin_and_their_speed() {
        use super::super::row::{RowState, TilePart};
        let Some(gpu) = gpu() else { return };
        let vocab = 151936;
        let unembed = Tensor::zeros((vocab, 1), DType::F32, &gpu).unwrap();
        // (rows, entries, v0, k, targets, excluded)
        for (rows, cols, v0, k, n_targets, excluded) in [
            (29, 16384, 3 * 16384, 5, 3, false),
            (7, vocab - 9 * 16384, 9 * 16384, 100, 2, true),
            (3, 100, 0, 12, 0, true),
            (40, 16384, 0, 1, 300, false),
            (2, vocab, 0, 5, 4, true),
        ] {
            // Logits on a grid of 1/8: ties everywhere.
            let z: Vec<f32> = Tensor::randn(0f32, 3.0, (rows, cols), &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(|v| (v * 8.0).round() / 8.0)
                .collect();
            let targets: Vec<u32> = (0..n_targets)
                .map(|j| ((j * 7919 + v0 + cols / 3) % vocab) as u32)
                .collect();
            // Per row and target: the target's own logit where the tile holds it (as the lens's
            // comparisons are), else a grid value.
            let cmp: Vec<f32> = (0..rows)
                .flat_map(|r| {
                    let z = &z;
                    targets.iter().enumerate().map(move |(j, &t)| {
                        let t = t as usize;
                        if (v0..v0 + cols).contains(&t) {
                            z[r * cols + t - v0]
                        } else {
                            ((r + j) % 9) as f32 / 8.0
                        }
                    })
                })
                .collect();
            let spec = super::super::LensSpec {
                positions: vec![0],
                layers: vec![0],
                top_k: k,
                targets: targets.clone(),
                summary: false,
                excluded: if excluded {
                    (0..vocab).map(|v| v % 13 == 5).collect()
                } else {
                    vec![]
                },
            };
            let keys = detail_keys(&spec, &unembed).unwrap().unwrap();
            let layout = TilePart {
                top_k: k,
                targets: n_targets,
            };
            let z_gpu = Tensor::from_slice(&z, (rows, cols), &gpu).unwrap();
            let cmp_gpu =
                (n_targets > 0).then(|| Tensor::from_slice(&cmp, (rows, n_targets), &gpu).unwrap());
            let got = detail_tile(&z_gpu, cmp_gpu.as_ref(), &keys, v0, vocab, layout)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let case = format!("[{rows}, {cols}] from {v0}, k {k}, {n_targets} targets");
            for (r, g) in got.iter().enumerate() {
                let want = RowState::tile_part(
                    &z[r * cols..(r + 1) * cols],
                    v0,
                    layout,
                    &targets,
                    &spec.excluded,
                    &cmp[r * n_targets..(r + 1) * n_targets],
                );
                assert_eq!(g.len(), want.len(), "{case}");
                assert_eq!(g[0], want[0], "{case}: max");
                for i in [1, 3] {
                    let joined = |p: &[f32]| p[i] as f64 + p[i + 1] as f64;
                    let (g, w) = (joined(g), joined(&want));
                    let tol = 1e-5 * w.abs().max(1.0);
                    assert!((g - w).abs() <= tol, "{case}: sum {i}: {g} against {w}");
                }
                assert_eq!(g[5..], want[5..], "{case}: top-k, ranks, targets' logits");
            }
            eprintln!("detail tile {case}: equal to the host's");
        }
        // What it costs against what it replaces (printed): one Qwen2-VL-2B request's detail rows
        // at the last position (29 layers) and a generation step of 8 answers (232 rows, 16
        // targets), a 16384-entry tile each call.
        for (rows, n_targets) in [(29, 2), (232, 16)] {
            let z = Tensor::randn(0f32, 3.0, (rows, 16384), &gpu).unwrap();
            let cmp = Tensor::randn(0f32, 3.0, (rows, n_targets), &gpu).unwrap();
            let spec = super::super::LensSpec {
                positions: vec![0],
                layers: vec![0],
                top_k: 5,
                targets: (0..n_targets as u32).map(|j| j * 997).collect(),
                summary: false,
                excluded: (0..vocab).map(|v| v % 50 == 0).collect(),
            };
            let keys = detail_keys(&spec, &unembed).unwrap().unwrap();
            let layout = TilePart {
                top_k: 5,
                targets: n_targets,
            };
            let (issue, kernel) = per_call(&gpu, 200, &|| {
                detail_tile(&z, Some(&cmp), &keys, 16384, vocab, layout).unwrap()
            });
            let (_, to_host) = per_call(&gpu, 50, &|| {
                let host = z.to_device(&Device::Cpu).unwrap();
                drop(host);
                cmp.clone()
            });
            eprintln!(
                "detail tile on the gpu, [{rows}, 16384], k 5, {n_targets} targets: {kernel:.1} µs a call \
                 ({issue:.1} µs to issue); the same rows to the host: {to_host:.1} µs"
            );
        }
    }

    /// The argmax on the card equals the host's (`z > best`, so the lowest id among equal maxima),
    /// on bf16-rounded logits where the top is often tied, and on a row whose maximum is its last
    /// entry.
    #[test]
    fn argmax_rows_on_the_gpu_equal_the_host_s() {
        let Some(gpu) = gpu() else { return };
        let (rows, vocab) = (9, 151936);
        let mut z: Vec<f32> = Tensor::randn(0f32, 2.0, (rows, vocab), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        z[vocab - 1] = 100.0;
        // Ties at the top: the second row's maximum twice.
        let (a, b) = (vocab + 5, vocab + 70000);
        z[a] = 50.0;
        z[b] = 50.0;
        let want: Vec<u32> = z
            .chunks_exact(vocab)
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect();
        assert_eq!(want[0], (vocab - 1) as u32);
        assert_eq!(want[1], 5);
        let t = Tensor::from_vec(z, (rows, vocab), &gpu).unwrap();
        assert_eq!(argmax_rows(&t).unwrap().unwrap(), want);
        eprintln!("argmax rows on the gpu: equal to the host's");
    }

    #[test]
    fn unembedding_gemm_gives_f32_logits_on_the_gpu() {
        let Some(gpu) = gpu() else { return };
        for dtype in [DType::BF16, DType::F16] {
            let (n, vocab, k) = (300, 5000, 1536);
            let rows = Tensor::randn(0f32, 1.0, (n + 3, k), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::randn(0f32, 0.05, (vocab, k), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // Offsets into both buffers, as the lens's chunks of rows and vocabulary have.
            let (rows, w) = (rows.narrow(0, 3, n).unwrap(), w);
            let z =
                matmul_nt_f32(&rows.to_device(&gpu).unwrap(), &w.to_device(&gpu).unwrap()).unwrap();
            assert_eq!((z.dtype(), z.dims()), (DType::F32, &[n, vocab][..]));
            let z = z.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let want = rows
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let (mut worst, mut unrounded) = (0f64, 0usize);
            for (zr, wr) in z.iter().zip(&want) {
                for (&a, &b) in zr.iter().zip(wr) {
                    worst = worst.max((a as f64 - b).abs());
                    let half = match dtype {
                        DType::BF16 => half::bf16::from_f32(a).to_f32(),
                        _ => half::f16::from_f32(a).to_f32(),
                    };
                    unrounded += (half != a) as usize;
                }
            }
            eprintln!("unembedding {dtype:?} [{n}, {k}]·[{vocab}, {k}]ᵀ: max |z − exact| {worst:.2e}, {unrounded}/{} not in {dtype:?}", n * vocab);
            assert!(worst < 1e-4, "{dtype:?}: {worst}");
            assert!(unrounded > n * vocab / 2, "{dtype:?}: rounded logits");
        }
        // What the f32 logits cost (printed, not asserted): one lens chunk of Qwen2-VL-2B, by the
        // 151936-row vocabulary, with f32 logits and their max/sum-exp, against bf16 logits; and the
        // chunk's height (DEVICE_ROWS in lens/mod.rs): each chunk reads the whole 467 MB unembedding
        // and writes rows × 608 KB of f32 logits, so short chunks are bound by the weights' reads.
        let w = Tensor::randn(0f32, 0.02, (151936, 1536), &gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        // ms per call.
        let time = |f: &dyn Fn() -> Tensor| per_call(&gpu, 20, f).1 / 1e3;
        for n in [256, 512, 1024, 2048] {
            let rows = Tensor::randn(0f32, 1.0, (n, 1536), &gpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let f32_logits = time(&|| row_max_sumexp(&matmul_nt_f32(&rows, &w).unwrap()).unwrap());
            let bf16_logits =
                time(&|| row_max_sumexp(&rows.matmul(&w.t().unwrap()).unwrap()).unwrap());
            let tflops = |ms: f64| 2.0 * n as f64 * 151936.0 * 1536.0 / (ms * 1e-3) / 1e12;
            eprintln!(
                "lens chunk [{n}, 1536]·[151936, 1536]ᵀ + max/sum-exp: f32 logits {f32_logits:.3} ms \
                 ({:.3} ms per 100 rows, {:.0} TFLOP/s), bf16 logits {bf16_logits:.3} ms ({:.0} TFLOP/s)",
                f32_logits * 100.0 / n as f64,
                tflops(f32_logits),
                tflops(bf16_logits)
            );
        }
    }

    /// The lens's pass over the unembedding in blocks (what `Lens::launch_layers` does:
    /// [`super::super::device::unembed_blocks`], the vocabulary tiles outermost, each tile's sums folded in
    /// place by `row_max_sumexp_fold_f32`) against one GEMM over the
    /// whole vocabulary: the same max and sum-exp; and the time of one layer of Qwen2-VL-2B rows
    /// (one 640×480 request: 418 rows; a batch of 7: 2926) by tile and rows per GEMM, as TFLOP/s
    /// and a share of the H100's dense bf16 peak (989), to choose `DEVICE_VOCAB_TILE` and
    /// `DEVICE_ROWS` (`LOGIT_LENS_VOCAB_TILE` / `LOGIT_LENS_ROW_CHUNK` set them without a rebuild).
    #[test]
    fn vocabulary_tiles_give_the_whole_rows_sums_and_their_speed() {
        let Some(gpu) = gpu() else { return };
        let (vocab, k) = (151936, 1536);
        let w = Tensor::randn(0f32, 0.02, (vocab, k), &gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let blocks = |rows: &Tensor, chunk: usize, tile: usize| -> Tensor {
            // As `Lens::launch_layers`: each tile folded into its chunk's sums in place.
            let chunks = rows.dim(0).unwrap().div_ceil(chunk);
            let mut sums: Vec<Option<Tensor>> = vec![None; chunks];
            super::super::device::unembed_blocks(rows, &w, chunk, tile, |c, _, z| {
                sums[c] = Some(super::super::device::fold_max_sumexp(sums[c].take(), &z)?);
                Ok(())
            })
            .unwrap();
            let sums: Vec<Tensor> = sums.into_iter().map(Option::unwrap).collect();
            Tensor::cat(&sums, 0).unwrap()
        };
        let whole = |rows: &Tensor| row_max_sumexp(&matmul_nt_f32(rows, &w).unwrap()).unwrap();
        let rows = Tensor::randn(0f32, 1.0, (100, k), &gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let (a, b) = (
            whole(&rows).to_vec2::<f32>().unwrap(),
            blocks(&rows, 48, super::super::device::DEVICE_VOCAB_TILE)
                .to_vec2::<f32>()
                .unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x[0], y[0], "max");
            assert!(
                ((x[1] - y[1]) / x[1]).abs() < 1e-5,
                "sum {} vs {}",
                x[1],
                y[1]
            );
        }
        let time = |f: &dyn Fn() -> Tensor| per_call(&gpu, 5, f).1 / 1e3;
        for n in [418, 2926] {
            let rows = Tensor::randn(0f32, 1.0, (n, k), &gpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let tflops = |ms: f64| 2.0 * n as f64 * vocab as f64 * k as f64 / (ms * 1e-3) / 1e12;
            let say = |what: &str, ms: f64| {
                eprintln!(
                    "lens layer [{n}, {k}]·[{vocab}, {k}]ᵀ + max/sum-exp, {what}: {ms:.3} ms \
                     ({:.0} TFLOP/s, {:.0} % of 989)",
                    tflops(ms),
                    tflops(ms) / 9.89
                )
            };
            say(
                "the whole vocabulary and rows in one GEMM",
                time(&|| whole(&rows)),
            );
            for chunk in [512, 1024, 2048] {
                if chunk > n.next_power_of_two() {
                    continue;
                }
                for tile in [0, 4096, 8192, 16384, 32768] {
                    let ms = time(&|| blocks(&rows, chunk, tile));
                    let tile = if tile == 0 {
                        "all".to_string()
                    } else {
                        tile.to_string()
                    };
                    say(&format!("rows per GEMM {chunk}, tile {tile}"), ms);
                }
            }
        }
    }

    /// 29 and 87 rows of 151936 f32 (what one Qwen2-VL-2B request's detail rows at the last
    /// position, and a batch of 3's, were before they were reduced on the card), brought to the
    /// host through the pool of page-locked buffers: the same values as candle's copy to pageable
    /// memory, and the ms of each (the first pooled call allocates).
    #[test]
    fn pinned_transfers_equal_candle_s_copy_and_their_speed() {
        let Some(gpu) = gpu() else { return };
        for rows in [29usize, 87] {
            let t = Tensor::randn(0f32, 1.0, (rows, 151936), &gpu).unwrap();
            let ms = |f: &dyn Fn()| {
                let t0 = std::time::Instant::now();
                f();
                t0.elapsed().as_secs_f64() * 1e3
            };
            let first = ms(&|| drop(to_pinned(&t).unwrap()));
            let want = super::super::device::host_f32(&t).unwrap();
            let got = to_pinned(&t).unwrap().expect("a pooled transfer");
            assert_eq!(got.as_slice(), &want[..], "[{rows}, 151936]");
            drop(got);
            let median = |f: &dyn Fn()| {
                let mut v: Vec<f64> = (0..15).map(|_| ms(f)).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let pageable = median(&|| drop(super::super::device::host_f32(&t).unwrap()));
            let pinned = median(&|| drop(to_pinned(&t).unwrap()));
            let mb = (rows * 151936 * 4) as f64 / 1e6;
            eprintln!(
                "to the host, [{rows}, 151936] f32 ({mb:.1} MB), median of 15: pageable (candle) \
                 {pageable:.3} ms ({:.1} GB/s), pinned pool {pinned:.3} ms ({:.1} GB/s); the pool's \
                 first call {first:.3} ms",
                mb / pageable,
                mb / pinned
            );
        }
    }

    /// Issue 17's goals against what the card's GEMMs alone allow: every GEMM of one request at
    /// concurrency 8 (a batch of 8 requests, at the shapes the service runs them), each timed alone
    /// at its shape, summed per request. No attention kernel, fusion or host overhead can take a
    /// request below this floor. The goals are 0.6 (Qwen2-VL-2B) and 0.7 (LLaVA-1.5-7B) of batched
    /// torch in run 5 (47.0 and 36.9 ms): 28.2 and 25.8 ms a request. Token counts: Qwen2-VL's
    /// 640×480 request is 1196 patches and 418 tokens (run 5); LLaVA's is 577 patches through
    /// 23 of CLIP's 24 layers (the feature layer is the penultimate) and 595 tokens (run 5's seed
    /// baseline). The lens runs per request (29 and 33 lens
    /// layers) in f32 logits, as [`matmul_nt_f32`]; the rest are candle's matmuls in the
    /// checkpoint's dtype.
    #[test]
    fn gemm_floor_of_a_request_at_concurrency_8() {
        let Some(gpu) = gpu() else { return };
        // (part, rows, in, out, GEMMs of this shape per pass, requests per pass, f32 logits)
        type Gemm = (&'static str, usize, usize, usize, usize, usize, bool);
        let (q_img, q_tok, l_img, l_tok) = (1196, 418, 577, 595);
        let qwen: Vec<Gemm> = vec![
            ("vision", 8 * q_img, 1280, 3840, 32, 8, false),
            ("vision", 8 * q_img, 1280, 1280, 32, 8, false),
            ("vision", 8 * q_img, 1280, 5120, 32, 8, false),
            ("vision", 8 * q_img, 5120, 1280, 32, 8, false),
            ("vision", 8 * q_img / 4, 5120, 5120, 1, 8, false),
            ("vision", 8 * q_img / 4, 5120, 1536, 1, 8, false),
            ("decoder", 8 * q_tok, 1536, 2048, 28, 8, false),
            ("decoder", 8 * q_tok, 1536, 1536, 28, 8, false),
            ("decoder", 8 * q_tok, 1536, 8960, 2 * 28, 8, false),
            ("decoder", 8 * q_tok, 8960, 1536, 28, 8, false),
            ("lens", q_tok, 1536, 151936, 29, 1, true),
        ];
        let llava: Vec<Gemm> = vec![
            ("vision", 8 * l_img, 1024, 3072, 23, 8, false),
            ("vision", 8 * l_img, 1024, 1024, 23, 8, false),
            ("vision", 8 * l_img, 1024, 4096, 23, 8, false),
            ("vision", 8 * l_img, 4096, 1024, 23, 8, false),
            ("vision", 8 * 576, 1024, 4096, 1, 8, false),
            ("vision", 8 * 576, 4096, 4096, 1, 8, false),
            ("decoder", 8 * l_tok, 4096, 3 * 4096, 32, 8, false),
            ("decoder", 8 * l_tok, 4096, 4096, 32, 8, false),
            ("decoder", 8 * l_tok, 4096, 11008, 2 * 32, 8, false),
            ("decoder", 8 * l_tok, 11008, 4096, 32, 8, false),
            ("lens", l_tok, 4096, 32064, 33, 1, true),
        ];
        for (name, dtype, goal, gemms) in [
            ("Qwen2-VL-2B 640×480", DType::BF16, 28.2, qwen),
            ("LLaVA-1.5-7B 640×480", DType::F16, 25.8, llava),
        ] {
            let mut parts: Vec<(&str, f64)> = Vec::new();
            for (part, rows, k, out, count, requests, f32_logits) in gemms {
                let t = |shape: (usize, usize)| {
                    Tensor::randn(0f32, 0.05, shape, &gpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (x, w) = (t((rows, k)), t((out, k)));
                let wt = w.t().unwrap();
                let us = if f32_logits {
                    per_call(&gpu, 20, &|| matmul_nt_f32(&x, &w).unwrap()).1
                } else {
                    per_call(&gpu, 20, &|| x.matmul(&wt).unwrap()).1
                };
                let tflops = 2.0 * (rows * k * out) as f64 / (us * 1e-6) / 1e12;
                let ms = us * count as f64 / requests as f64 / 1e3;
                eprintln!(
                    "gemm floor {name}: {part} [{rows}, {k}]·[{out}, {k}]ᵀ × {count}: {us:.0} µs \
                     ({tflops:.0} TFLOP/s), {ms:.2} ms a request"
                );
                match parts.iter_mut().find(|(p, _)| *p == part) {
                    Some((_, total)) => *total += ms,
                    None => parts.push((part, ms)),
                }
            }
            let total: f64 = parts.iter().map(|(_, ms)| ms).sum();
            let split: Vec<String> = parts.iter().map(|(p, ms)| format!("{p} {ms:.1}")).collect();
            eprintln!(
                "gemm floor {name} at concurrency 8: {total:.1} ms a request ({}); issue 17's goal \
                 {goal} ms",
                split.join(", ")
            );
        }
    }
}
