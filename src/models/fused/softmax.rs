//! Attention's softmax in one pass: `softmax(round(scores · scale) + mask)` in f32, rounded once
//! to the scores' dtype. That is what transformers' eager attention computes in half precision
//! with four full passes over the `[heads × queries × keys]` scores (a Python float times a half
//! tensor is computed in f32 and rounded once; softmax upcasts to f32; the probabilities are cast
//! back), and what [`super::layers::attention`] does op by op. On the GPU one kernel
//! (`attention.cu`, compiled to PTX by build.rs) reads the scores and writes the probabilities
//! once; on the CPU the same arithmetic in Rust is the reference the tests hold both to.
//!
//! Used on the GPU unless `LOGIT_LENS_FUSED` leaves `softmax` out (see [`fused::enabled`];
//! bench/gpu/run.sh compares both on a card). The other fused kernels are its siblings in
//! `models::fused`.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

use crate::error::Result;
use crate::models::fused::{self, Kernel};

/// Whether the switch turns this kernel on (see [`fused::enabled`]).
pub fn enabled() -> bool {
    fused::enabled(Kernel::Softmax)
}

/// `scores` `[..., cols]` (f32, bf16 or f16); `mask` additive, `[mask_rows, cols]` (0 or −∞),
/// row `r` of the flattened scores taking mask row `r % mask_rows` (a `[queries, keys]` mask
/// for `[batch, heads, queries, keys]` scores); `None`: no mask.
pub fn scaled_masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let cols = *dims.last().unwrap_or(&0);
    let rows = scores.elem_count() / cols.max(1);
    let x = scores.contiguous()?.reshape((rows, cols))?;
    let mask = match mask {
        Some(m) => m.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::zeros((1, cols), DType::F32, scores.device())?,
    };
    let (mask_rows, mask_cols) = mask.dims2()?;
    if mask_cols != cols || mask_rows == 0 || !rows.is_multiple_of(mask_rows) {
        return Err(crate::Error::Internal(format!(
            "fused softmax: mask {:?} does not tile scores {dims:?}",
            mask.dims()
        )));
    }
    let op = ScaledMaskedSoftmax {
        scale: scale as f32,
        warp: fused::enabled(Kernel::WarpSoftmax),
    };
    Ok(x.apply_op2_no_bwd(&mask, &op)?.reshape(dims)?)
}

/// [`scaled_masked_softmax`] with the GPU kernel chosen: one block per row, or (`warp`) one warp
/// per row. The CPU twin is the same for both.
#[cfg(all(test, feature = "cuda"))]
pub(crate) fn scaled_masked_softmax_with(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    warp: bool,
) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let cols = *dims.last().unwrap_or(&0);
    let x = scores
        .contiguous()?
        .reshape((scores.elem_count() / cols.max(1), cols))?;
    let mask = match mask {
        Some(m) => m.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::zeros((1, cols), DType::F32, scores.device())?,
    };
    let op = ScaledMaskedSoftmax {
        scale: scale as f32,
        warp,
    };
    Ok(x.apply_op2_no_bwd(&mask, &op)?.reshape(dims)?)
}

struct ScaledMaskedSoftmax {
    scale: f32,
    /// The one-warp-per-row kernel (`warp-softmax`) on a GPU.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    warp: bool,
}

/// The reference arithmetic, row by row: the kernel does the same per CUDA block.
fn rows<T: Copy>(
    x: &[T],
    mask: &[f32],
    cols: usize,
    scale: f32,
    to: impl Fn(T) -> f32,
    from: impl Fn(f32) -> T,
) -> Vec<T> {
    let mask_rows = mask.len() / cols;
    let mut out = Vec::with_capacity(x.len());
    let mut v = vec![0f32; cols];
    for (r, row) in x.chunks_exact(cols).enumerate() {
        let m = &mask[(r % mask_rows) * cols..][..cols];
        for ((vj, &xj), &mj) in v.iter_mut().zip(row).zip(m) {
            *vj = to(from(to(xj) * scale)) + mj;
        }
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = v.iter().map(|&vj| (vj - max).exp()).sum();
        out.extend(v.iter().map(|&vj| from((vj - max).exp() / sum)));
    }
    out
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused softmax: non-contiguous input".into()))?;
    Ok(&v[start..end])
}

impl candle_core::CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, cols) = l1.shape().dims2()?;
        let mask = match s2 {
            CpuStorage::F32(m) => contiguous(m, l2)?,
            _ => candle_core::bail!("fused softmax: the mask must be f32"),
        };
        let s = self.scale;
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(rows(contiguous(x, l1)?, mask, cols, s, |a| a, |a| a))
            }
            CpuStorage::BF16(x) => CpuStorage::BF16(rows(
                contiguous(x, l1)?,
                mask,
                cols,
                s,
                |a| a.to_f32(),
                half::bf16::from_f32,
            )),
            CpuStorage::F16(x) => CpuStorage::F16(rows(
                contiguous(x, l1)?,
                mask,
                cols,
                s,
                |a| a.to_f32(),
                half::f16::from_f32,
            )),
            _ => candle_core::bail!("fused softmax: f32, bf16 or f16 scores only"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

        let (rows, cols) = l1.shape().dims2()?;
        let (mask_rows, _) = l2.shape().dims2()?;
        let (start, _) = l1.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused softmax: non-contiguous scores".into())
        })?;
        let (mstart, _) = l2
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fused softmax: non-contiguous mask".into()))?;
        let dev = s1.device();
        let mask = s2.as_cuda_slice::<f32>()?.slice(mstart..);
        // One block per row, or (warp-softmax) one warp per row, 8 rows a block.
        let warp = self.warp;
        const WARPS: usize = 8;
        let cfg = LaunchConfig {
            grid_dim: (if warp { rows.div_ceil(WARPS) } else { rows } as u32, 1, 1),
            block_dim: (if warp { 32 * WARPS as u32 } else { 256 }, 1, 1),
            shared_mem_bytes: 0,
        };
        let (mask_rows, rows_i, cols_i) = (mask_rows as i64, rows as i64, cols as i64);
        let scale = self.scale;
        macro_rules! launch {
            ($ty:ty, $name:literal, $warp_name:literal) => {{
                let name = if warp { $warp_name } else { $name };
                let func = dev.get_or_load_custom_func(name, "logit_lens_attention", PTX)?;
                let src = s1.as_cuda_slice::<$ty>()?.slice(start..);
                let out = dev.alloc_zeros::<$ty>(rows * cols)?;
                if rows > 0 {
                    let mut b = func.builder();
                    b.arg(&src);
                    b.arg(&mask);
                    b.arg(&mask_rows);
                    b.arg(&out);
                    if warp {
                        b.arg(&rows_i);
                    }
                    b.arg(&cols_i);
                    b.arg(&scale);
                    // SAFETY: the kernel reads rows·cols scores and mask_rows·cols mask values,
                    // and writes rows·cols outputs.
                    unsafe { b.launch(cfg) }.w()?;
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => launch!(
                f32,
                "scaled_masked_softmax_f32",
                "scaled_masked_softmax_warp_f32"
            ),
            DType::BF16 => launch!(
                half::bf16,
                "scaled_masked_softmax_bf16",
                "scaled_masked_softmax_warp_bf16"
            ),
            DType::F16 => launch!(
                half::f16,
                "scaled_masked_softmax_f16",
                "scaled_masked_softmax_warp_f16"
            ),
            d => candle_core::bail!("fused softmax: unsupported dtype {d:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::{attention_softmax_with, causal_mask};
    use candle_core::Device;

    /// The op-by-op path as a GPU runs it (candle's softmax kernel).
    fn attention_softmax(x: &Tensor, m: Option<&Tensor>, scale: f64) -> crate::Result<Tensor> {
        attention_softmax_with(x, m, scale, false)
    }

    #[test]
    fn one_pass_equals_the_op_by_op_path_in_every_dtype() {
        let dev = Device::Cpu;
        let (b, h, q, k) = (2, 3, 7, 7);
        let scores = Tensor::randn(0f32, 3.0, (b, h, q, k), &dev).unwrap();
        let scale = 64f64.powf(-0.5) * 1.37;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = scores.to_dtype(dtype).unwrap();
            let mask = causal_mask(q, dtype, &dev).unwrap();
            for m in [None, Some(&mask)] {
                let got = scaled_masked_softmax(&x, m, scale)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let want = attention_softmax(&x, m, scale)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let diff = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // The same arithmetic in the same order (candle's CPU softmax also sums the
                // exponentials left to right): bit for bit. A missed rounding of the scaled
                // scores shows here.
                assert_eq!(diff, 0.0, "{dtype:?} masked={}", m.is_some());
                if m.is_some() {
                    // Above the diagonal: exactly zero.
                    let row0 = want.get(0).unwrap().get(0).unwrap().get(0).unwrap();
                    assert_eq!(row0.to_vec1::<f32>().unwrap()[1..], [0.0; 6]);
                }
            }
        }
    }

    #[test]
    fn a_mask_that_does_not_tile_the_scores_is_refused() {
        let dev = Device::Cpu;
        let scores = Tensor::zeros((2, 5, 4), DType::F32, &dev).unwrap();
        let mask = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        assert!(scaled_masked_softmax(&scores, Some(&mask), 1.0).is_err());
    }
}

/// On a card (bench/gpu/device.sh): both softmax kernels against the op-by-op softmax at the
/// models' attention shapes, and what each costs.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::super::test_util::differ_and_max;
    use super::*;
    use crate::models::layers::{attention_softmax, causal_mask};
    use crate::models::profile::on_a_card::{gpu, per_call};

    #[test]
    fn softmax_kernels_equal_op_by_op_on_the_gpu() {
        let Some(gpu) = gpu() else { return };
        let mut failures = Vec::new();
        // name, heads (rows of scores per query), queries = keys, causal
        let cases = [
            ("qwen2-vl vision 640x480", 16, 1196, false),
            ("clip vit-l/14-336", 16, 577, false),
            ("llava decoder", 32, 595, true),
            ("qwen2-vl decoder", 12, 418, true),
            ("ragged", 3, 7, true),
        ];
        for dtype in [DType::BF16, DType::F16] {
            let eps = if dtype == DType::BF16 {
                2f32.powi(-8)
            } else {
                2f32.powi(-11)
            };
            for (name, h, s, causal) in cases {
                let scores = Tensor::randn(0f32, 3.0, (1, h, s, s), &gpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let mask = causal.then(|| causal_mask(s, dtype, &gpu).unwrap());
                let scale = 0.125;
                let op = || attention_softmax(&scores, mask.as_ref(), scale).unwrap();
                let block =
                    || scaled_masked_softmax_with(&scores, mask.as_ref(), scale, false).unwrap();
                let warp =
                    || scaled_masked_softmax_with(&scores, mask.as_ref(), scale, true).unwrap();
                let want = op();
                let mut line = format!("softmax {dtype:?} {name:24}");
                for (kernel, got) in [("block", block()), ("warp", warp())] {
                    let (differ, max) = differ_and_max(&got, &want);
                    line += &format!(
                        " {kernel}: {differ}/{} differ, max {max:.1e};",
                        want.elem_count()
                    );
                    // Probabilities are at most 1: half an ulp of 1 is the rounding of one sum order.
                    if differ * 100 > want.elem_count() || max > 2.0 * eps {
                        failures.push(format!(
                            "{dtype:?} {name} {kernel}: {differ} differ, max {max}"
                        ));
                    }
                }
                let t = |f: &dyn Fn() -> Tensor| per_call(&gpu, 50, f).1;
                let (t_op, t_block, t_warp) = (t(&op), t(&block), t(&warp));
                eprintln!(
                    "{line} µs per call: op by op {t_op:.0}, block {t_block:.0}, warp {t_warp:.0}"
                );
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
