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
/// a chunk at a time, into pages that a fresh `Vec` first has to fault in; one request's detail
/// rows are 17.6 MB (29 layers × 151936 f32 for Qwen2-VL-2B at the last position), a generation
/// step's 17.6 MB per answer. At most [`PINNED_BUFFERS`] buffers, [`PINNED_KEPT_BYTES`] in all,
/// are kept.
static PINNED: std::sync::Mutex<Vec<PinnedHostSlice<f32>>> = std::sync::Mutex::new(Vec::new());
const PINNED_BUFFERS: usize = 4;
const PINNED_KEPT_BYTES: usize = 512 << 20;
/// Larger transfers go to pageable memory. The lens collects its queued detail rows once they pass
/// 256 MiB (`PENDING_DETAIL_BYTES`), so its transfers are at most about that.
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

    /// One request's detail rows (29 layers × 151936 f32, Qwen2-VL-2B at the last position) and a
    /// batch of 3's, brought to the host through the pool of page-locked buffers: the same values as
    /// candle's copy to pageable memory, and the ms of each (the first pooled call allocates).
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
