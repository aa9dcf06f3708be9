//! `x · Wᵀ + b` in half precision with one rounding, as torch's `nn.Linear` computes it (addmm:
//! the products summed in f32, the bias added in f32, then one rounding to bf16/f16). candle's
//! matmul rounds its result and a following `broadcast_add` rounds again: on a random
//! Qwen2-VL-2B that second rounding alone put our bf16 residual stream ~12 % further from the f32
//! answer than transformers' bf16 (bench/README.md, "the noise floor").
//!
//! On CUDA: the bias copied into the output, then one cuBLAS matmul adding onto it (if that fails,
//! the two-rounding path, with a warning once). Elsewhere: the inputs widened to f32 (the products of
//! half-precision numbers are exact in f32), the bias added, one rounding.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// `a · b` (candle's matmul shapes) with each output rounded once. candle's CPU f16 matmul (the
/// `gemm` crate) rounds its partial sums to f16 between blocks of the inner dimension: with
/// k = 577, 27 % of the outputs differ from the exactly rounded sum (bf16: it widens to f32
/// itself; CUDA: cuBLAS sums in f32). There the inputs are widened to f32 first.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == DType::F16 && a.device().is_cpu() {
        let f = DType::F32;
        return Ok(a
            .to_dtype(f)?
            .matmul(&b.to_dtype(f)?)?
            .to_dtype(DType::F16)?);
    }
    Ok(a.matmul(b)?)
}

/// Up to this many rows, [`matmul_nt`] on the CPU multiplies as `(w · xᵀ)ᵀ`.
const FEW_ROWS: usize = 64;

/// `x · wᵀ` for `x` `[rows, in]` and a weight `w` `[out, in]` (rows contiguous), in f32 on the
/// CPU: for a few rows (2 to 64: a generation step's answers, a short prompt, the lens's rows of
/// a step) as `(w · xᵀ)ᵀ`. The `gemm` crate behind candle's CPU matmul repacks a transposed right
/// operand whole at every call once there are two rows or more: with w `[32064, 4096]`, 2 rows
/// took 243 ms and 1 row 21 ms, and `(w · xᵀ)ᵀ` takes 36 ms for 2 rows and 63 for 32; past ~128
/// rows the repacking pays for itself (`examples/transposed_rows.rs`, bench/README.md). Each
/// output is the same dot product either way, to the bit. Anything else: `x · wᵀ` as candle
/// computes it.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let rows = x.dim(0)?;
    if x.device().is_cpu() && x.dtype() == DType::F32 && (2..=FEW_ROWS).contains(&rows) {
        return Ok(w.matmul(&x.t()?)?.t()?.contiguous()?);
    }
    matmul(x, &w.t()?)
}

/// `x` `[rows, in]`, `w` `[out, in]`, `b` `[out]`, one dtype → `[rows, out]`.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::BF16 | DType::F16) {
        return Ok(matmul_nt(x, w)?.broadcast_add(b)?);
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::linear_bias(x, w, b);
    }
    let f = DType::F32;
    Ok(x.to_dtype(f)?
        .matmul(&w.to_dtype(f)?.t()?)?
        .broadcast_add(&b.to_dtype(f)?)?
        .to_dtype(x.dtype())?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicBool, Ordering};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Tensor};

    use crate::error::Result;

    /// The bias broadcast over the rows into a fresh output, then cuBLAS `y = x·wᵀ + 1·y` in
    /// place: the products summed in f32, the bias added in f32, one rounding (torch's addmm when
    /// it copies the bias into its output). cuBLASLt's bias epilogue would save the copy, but the
    /// H100's cuBLASLt 13 refused it (CUBLAS_STATUS_NOT_SUPPORTED, bench/gpu/results/h100-run4).
    pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        static WARNED: AtomicBool = AtomicBool::new(false);
        let fused = (|| {
            let (rows, _) = x.dims2()?;
            let out = w.dim(0)?;
            // force_contiguous: always a new buffer (never the bias's own, even for one row).
            let y = b.broadcast_as((rows, out))?.force_contiguous()?;
            y.inplace_op3(&x.contiguous()?, &w.contiguous()?, &AddMatmul)?;
            candle_core::Result::Ok(y)
        })();
        match fused {
            Ok(y) => Ok(y),
            Err(e) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "warning: cuBLAS matmul onto the bias failed ({e}); using matmul + add \
                         (two roundings) instead"
                    );
                }
                Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
            }
        }
    }

    /// `y += x · wᵀ` in place, one rounding: `y` `[rows, out]`, `x` `[rows, in]`, `w` `[out, in]`.
    struct AddMatmul;

    impl candle_core::InplaceOp3 for AddMatmul {
        fn name(&self) -> &'static str {
            "linear-bias"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<()> {
            candle_core::bail!("linear-bias runs on the GPU only (the CPU widens to f32)")
        }

        fn cuda_fwd(
            &self,
            y: &mut CudaStorage,
            y_l: &Layout,
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
        ) -> candle_core::Result<()> {
            let (rows, out) = y_l.shape().dims2()?;
            let (rows2, k) = x_l.shape().dims2()?;
            let (out2, k2) = w_l.shape().dims2()?;
            if rows != rows2
                || out != out2
                || k != k2
                || x.dtype() != w.dtype()
                || x.dtype() != y.dtype()
            {
                candle_core::bail!(
                    "linear-bias: y [{rows}, {out}] {:?}, x [{rows2}, {k}] {:?}, weight [{out2}, {k2}] {:?}",
                    y.dtype(),
                    x.dtype(),
                    w.dtype()
                );
            }
            let start = |l: &Layout| {
                l.contiguous_offsets().map(|(a, _)| a).ok_or_else(|| {
                    candle_core::Error::Msg("linear-bias needs contiguous inputs".into())
                })
            };
            let (y0, x0, w0) = (start(y_l)?, start(x_l)?, start(w_l)?);
            let blas = x.device().cublas_handle();
            // Column-major, as cuBLAS sees row-major buffers: y [out, rows] = wᵀ·x + y, with w
            // read as [in, out] (transposed) and x as [in, rows].
            macro_rules! run {
                ($ty:ty) => {{
                    let cfg = GemmConfig {
                        transa: cublasOperation_t::CUBLAS_OP_T,
                        transb: cublasOperation_t::CUBLAS_OP_N,
                        m: out as i32,
                        n: rows as i32,
                        k: k as i32,
                        alpha: <$ty>::ONE,
                        lda: k as i32,
                        ldb: k as i32,
                        beta: <$ty>::ONE,
                        ldc: out as i32,
                    };
                    let xv = x.as_cuda_slice::<$ty>()?.slice(x0..);
                    let wv = w.as_cuda_slice::<$ty>()?.slice(w0..);
                    let mut yv = y.as_cuda_slice_mut::<$ty>()?.slice_mut(y0..);
                    // SAFETY: the views hold rows·k, out·k and rows·out elements, as the dims say.
                    unsafe { blas.gemm(cfg, &wv, &xv, &mut yv) }
                        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))?;
                }};
            }
            match x.dtype() {
                DType::BF16 => run!(half::bf16),
                DType::F16 => run!(half::f16),
                d => candle_core::bail!("linear-bias: unsupported dtype {d:?}"),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `exact` (f64) rounded once to `dtype`, and how many elements of `y` (any device) differ
    /// from it.
    pub(super) fn rounded_once(exact: &Tensor, dtype: DType) -> Tensor {
        exact.to_dtype(DType::F32).unwrap().to_dtype(dtype).unwrap()
    }

    /// A few rows times a transposed weight, on the CPU in f32, as `(w · xᵀ)ᵀ`: every output the
    /// same dot product as candle's `x · wᵀ`, to the bit (K 1000, more than one of the gemm
    /// crate's depth blocks), for each count of rows either side of the switch.
    #[test]
    fn few_rows_times_a_transposed_weight_equal_candle_s_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 1000), &dev).unwrap();
        for rows in [1, 2, 7, FEW_ROWS, FEW_ROWS + 1] {
            let x = Tensor::randn(0f32, 1.0, (rows, 1000), &dev).unwrap();
            let got = matmul_nt(&x, &w).unwrap();
            assert!(got.is_contiguous());
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(crate::models::max_diff(&got, &want), 0.0, "{rows} rows");
        }
    }

    pub(super) fn misses(y: &Tensor, want: &Tensor) -> usize {
        let as64 = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        as64(y)
            .ne(&as64(want))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as usize
    }

    /// f16 on the CPU: each output of a long inner product (k = 577, a ViT-L sequence) is the
    /// exact sum rounded once; candle's own f16 matmul misses about a quarter of them.
    #[test]
    fn cpu_f16_matmul_rounds_once() {
        let dev = Device::Cpu;
        let r = |shape: (usize, usize, usize), s: f32| {
            Tensor::randn(0f32, s, shape, &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        let (a, b) = (r((2, 32, 577), 1.0), r((2, 577, 48), 0.1));
        let as64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let want = rounded_once(&as64(&a).matmul(&as64(&b)).unwrap(), DType::F16);
        let (ours, candle) = (
            misses(&matmul(&a, &b).unwrap(), &want),
            misses(&a.matmul(&b).unwrap(), &want),
        );
        eprintln!("f16 k=577: rounded once: {ours}/3072 misses; candle's matmul: {candle}");
        assert!(ours * 100 < 2 * 32 * 48, "{ours} misses");
        assert!(
            candle > 10 * ours.max(1),
            "candle's f16 matmul is exact now? {candle}"
        );
    }

    /// One rounding: each output is the exact `Σ x·w + b` rounded once to the half dtype (f32
    /// sums can land on the other side of a rounding boundary now and then, so "almost all");
    /// matmul-then-add, which rounds twice, misses far more often.
    #[test]
    fn half_precision_linear_with_bias_rounds_once() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            let r = |shape: (usize, usize), s: f32| {
                Tensor::randn(0f32, s, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (x, w) = (r((64, 128), 1.0), r((96, 128), 0.1));
            let b = r((1, 96), 1.0).squeeze(0).unwrap();
            let as64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let exact = as64(&x)
                .matmul(&as64(&w).t().unwrap())
                .unwrap()
                .broadcast_add(&as64(&b))
                .unwrap();
            // f64 → f32 is exact at these magnitudes' needs; f32 → half is the one rounding.
            let want = rounded_once(&exact, dtype);
            let once = misses(&linear_bias(&x, &w, &b).unwrap(), &want);
            let twice = misses(
                &x.matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap(),
                &want,
            );
            let n = 64 * 96;
            eprintln!("{dtype:?}: rounded once: {once}/{n} misses; matmul + add: {twice}");
            assert!(
                once * 200 < n,
                "{dtype:?}: {once}/{n} outputs not rounded once"
            );
            assert!(
                twice > 4 * once.max(1),
                "{dtype:?}: two roundings missed {twice}, one {once}"
            );
        }
    }
}

/// On a card (run by bench/gpu/device.sh): the matmul onto the bias rounds once, like the CPU path.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::tests::{misses, rounded_once};
    use super::*;
    use crate::models::profile::on_a_card::{gpu, per_call};
    use candle_core::Device;

    #[test]
    fn linear_with_bias_rounds_once_on_the_gpu() {
        let Some(gpu) = gpu() else { return };
        for dtype in [DType::BF16, DType::F16] {
            let r = |shape: (usize, usize), s: f32| {
                Tensor::randn(0f32, s, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // Decoder q/k/v-like shapes; x a view 3 elements into its buffer (copied to alignment).
            let w = r((2048, 1536), 0.03);
            let x = r((1, 418 * 1536 + 3), 1.0)
                .flatten_all()
                .unwrap()
                .narrow(0, 3, 418 * 1536)
                .unwrap()
                .reshape((418, 1536))
                .unwrap();
            let b = r((1, 2048), 1.0).squeeze(0).unwrap();
            let as64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let exact = as64(&x)
                .matmul(&as64(&w).t().unwrap())
                .unwrap()
                .broadcast_add(&as64(&b))
                .unwrap();
            let want = rounded_once(&exact, dtype);
            let on = |t: &Tensor| t.to_device(&gpu).unwrap();
            let once = misses(&linear_bias(&on(&x), &on(&w), &on(&b)).unwrap(), &want);
            let twice = misses(
                &on(&x)
                    .matmul(&on(&w).t().unwrap())
                    .unwrap()
                    .broadcast_add(&on(&b))
                    .unwrap(),
                &want,
            );
            let n = 418 * 2048;
            eprintln!("linear-bias {dtype:?} on the GPU: rounded once: {once}/{n} misses; matmul + add: {twice}");
            assert!(once * 100 < n, "{dtype:?}: {once}/{n}");
            assert!(
                twice > 4 * once.max(1),
                "{dtype:?}: two roundings {twice}, one {once}"
            );
        }
        // What one call costs (printed, not asserted): the bias copy + matmul onto it against
        // matmul + a bias add (both two launches), and its TFLOP/s against the H100's dense bf16
        // 989: Qwen2-VL-2B's decoder q/k/v alone and for 8 requests, its vision tower's q/k/v for
        // one image and its MLP for 7 images (8372 patches), where the big GEMMs should run
        // near the card's peak (run 5's profile had the 7-image vision MLP at ~175 TFLOP/s).
        for (rows, k, out) in [
            (418, 1536, 2048),
            (1196, 1280, 3840),
            (8 * 418, 1536, 2048),
            (8372, 1280, 5120),
            (8372, 5120, 1280),
        ] {
            let t = |shape: (usize, usize)| {
                Tensor::randn(0f32, 0.05, shape, &gpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            };
            let (x, w) = (t((rows, k)), t((out, k)));
            let b = t((1, out)).squeeze(0).unwrap();
            let time = |f: &dyn Fn() -> Tensor| per_call(&gpu, 50, f);
            let lt = time(&|| linear_bias(&x, &w, &b).unwrap());
            let two = time(&|| {
                x.matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap()
            });
            let tflops = |us: f64| 2.0 * (rows * k * out) as f64 / (us * 1e-6) / 1e12;
            eprintln!(
                "linear-bias bf16 [{rows}, {k}]·[{out}, {k}]ᵀ µs per call (host issue, total): \
                 bias copy + matmul onto it {:.0}, {:.0} ({:.0} TFLOP/s); matmul + add {:.0}, {:.0} \
                 ({:.0} TFLOP/s)",
                lt.0,
                lt.1,
                tflops(lt.1),
                two.0,
                two.1,
                tflops(two.1)
            );
        }
    }
}
