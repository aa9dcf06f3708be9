//! LayerNorm and RMSNorm in half precision, one row per CUDA block.
//!
//! LayerNorm, as [`crate::models::layers::LayerNorm::forward`] computes it op by op (transformers'
//! order): `x` to f32; `mean = Σx · (1/n)`; `xc = x − mean`; `var = Σxc² · (1/n)`;
//! `y = xc / sqrt(var + eps) · w + b` in f32 with f32 weight and bias; one rounding to the dtype.
//!
//! RMSNorm, as candle's `rms_norm_slow` (the half-precision [`crate::models::layers::RmsNorm`]):
//! `x` to f32; `ms = Σx² · (1/n)`; `xn = x / sqrt(ms + eps)` rounded to the dtype; then `xn · w`
//! with the half-precision weight, computed in f32 and rounded again.
//!
//! candle's `t / n` and `t + eps` are `affine` ops: `t · f32(1/n) + 0` and `t · 1 + f32(eps)`;
//! the twin and the kernel compute them so (the `+ 0` decides the sign of a zero mean).

use candle_core::backend::BackendStorage;
use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, Layout, Shape, Tensor};

use super::{contiguous, Half};
use crate::error::Result;

/// LayerNorm over the last dimension: `x` bf16 or f16 `[..., n]`, `weight` and `bias` f32 `[n]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    let op = Norm {
        kind: NormKind::Layer,
        n,
        inv_n: (1.0 / n as f64) as f32,
        eps: eps as f32,
    };
    let rows = x.elem_count() / n.max(1);
    let x2 = x.contiguous()?.reshape((rows, n))?;
    let y = x2.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)?;
    Ok(y.reshape(x.shape())?)
}

/// RMSNorm over the last dimension, as `rms_norm_slow`: `x` bf16 or f16 `[..., n]`, `weight` `[n]`
/// in `x`'s dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    let op = Norm {
        kind: NormKind::Rms,
        n,
        inv_n: (1.0 / n as f64) as f32,
        // rms_norm_slow takes eps as f32 and adds it as f64: the same f32 value.
        eps: eps as f32,
    };
    let rows = x.elem_count() / n.max(1);
    let x2 = x.contiguous()?.reshape((rows, n))?;
    // The weight rides as the first and the third operand (CustomOp2 would do; one op type).
    let w = weight.contiguous()?;
    let y = x2.apply_op3_no_bwd(&w, &w, &op)?;
    Ok(y.reshape(x.shape())?)
}

#[derive(Clone, Copy, PartialEq)]
enum NormKind {
    Layer,
    Rms,
}

struct Norm {
    kind: NormKind,
    n: usize,
    inv_n: f32,
    eps: f32,
}

/// Σ `v` as candle's CPU `sum_keepdim` adds a contiguous f32 row (its SIMD order on this CPU).
fn candle_cpu_sum(v: &[f32]) -> f32 {
    let mut s = 0f32;
    // SAFETY: reads v.len() elements of `v`, writes `s`.
    unsafe { f32::vec_reduce_sum(v.as_ptr(), &mut s, v.len()) };
    s
}

impl Norm {
    /// The twin: rows of `x`, `w` and `b` as the op computes them (`b` unused by RMSNorm; for
    /// RMSNorm `w` is in the dtype, for LayerNorm `w` and `b` are f32).
    fn rows<T: Half>(&self, x: &[T], w: &[f32], b: &[f32]) -> Vec<T> {
        let n = self.n;
        let mut out = Vec::with_capacity(x.len());
        let mut xf = vec![0f32; n];
        let mut tmp = vec![0f32; n];
        for row in x.chunks_exact(n) {
            for (f, &v) in xf.iter_mut().zip(row) {
                *f = v.to();
            }
            match self.kind {
                NormKind::Layer => {
                    let mean = candle_cpu_sum(&xf) * self.inv_n + 0.0;
                    for (t, &v) in tmp.iter_mut().zip(&xf) {
                        let c = v - mean;
                        *t = c * c;
                    }
                    let var = candle_cpu_sum(&tmp) * self.inv_n + 0.0;
                    let den = (var * 1.0 + self.eps).sqrt();
                    out.extend(
                        xf.iter()
                            .zip(w)
                            .zip(b)
                            .map(|((&v, &w), &b)| T::from((v - mean) / den * w + b)),
                    );
                }
                NormKind::Rms => {
                    for (t, &v) in tmp.iter_mut().zip(&xf) {
                        *t = v * v;
                    }
                    let ms = candle_cpu_sum(&tmp) * self.inv_n + 0.0;
                    let den = (ms * 1.0 + self.eps).sqrt();
                    out.extend(
                        xf.iter()
                            .zip(w)
                            .map(|(&v, &w)| T::from(T::from(v / den).to() * w)),
                    );
                }
            }
        }
        out
    }
}

impl candle_core::CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        match self.kind {
            NormKind::Layer => "fused-layer-norm",
            NormKind::Rms => "fused-rms-norm",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = self.name();
        if l2.shape().elem_count() != self.n || l3.shape().elem_count() != self.n {
            candle_core::bail!("{what}: weight/bias must have {} elements", self.n);
        }
        let out = match (self.kind, s1, s2, s3) {
            (NormKind::Layer, _, CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let (w, b) = (contiguous(w, l2, what)?, contiguous(b, l3, what)?);
                match s1 {
                    CpuStorage::BF16(x) => {
                        CpuStorage::BF16(self.rows(contiguous(x, l1, what)?, w, b))
                    }
                    CpuStorage::F16(x) => {
                        CpuStorage::F16(self.rows(contiguous(x, l1, what)?, w, b))
                    }
                    _ => candle_core::bail!("{what}: bf16 or f16 input only"),
                }
            }
            (NormKind::Rms, CpuStorage::BF16(x), CpuStorage::BF16(w), _) => {
                let w: Vec<f32> = contiguous(w, l2, what)?
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                CpuStorage::BF16(self.rows(contiguous(x, l1, what)?, &w, &[]))
            }
            (NormKind::Rms, CpuStorage::F16(x), CpuStorage::F16(w), _) => {
                let w: Vec<f32> = contiguous(w, l2, what)?
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                CpuStorage::F16(self.rows(contiguous(x, l1, what)?, &w, &[]))
            }
            _ => candle_core::bail!(
                "{what}: unsupported dtypes ({:?}, {:?})",
                s1.dtype(),
                s2.dtype()
            ),
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::DType;

        let what = self.name();
        let (rows, n) = l1.shape().dims2()?;
        if n != self.n || l2.shape().elem_count() != n || l3.shape().elem_count() != n {
            candle_core::bail!("{what}: shapes do not agree");
        }
        let off = |l: &Layout| -> candle_core::Result<usize> {
            l.contiguous_offsets()
                .map(|(start, _)| start)
                .ok_or_else(|| candle_core::Error::Msg(format!("{what}: non-contiguous input")))
        };
        let (o1, o2, o3) = (off(l1)?, off(l2)?, off(l3)?);
        let dev = s1.device();
        let cfg = super::gpu::per_row(rows, n);
        let (n_i, inv_n, eps) = (n as i64, self.inv_n, self.eps);
        macro_rules! launch {
            ($ty:ty, $wty:ty, $name:literal) => {{
                let func =
                    dev.get_or_load_custom_func($name, super::gpu::MODULE, super::gpu::PTX)?;
                let x = s1.as_cuda_slice::<$ty>()?.slice(o1..);
                let w = s2.as_cuda_slice::<$wty>()?.slice(o2..);
                let b = s3.as_cuda_slice::<$wty>()?.slice(o3..);
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<$ty>(rows * n) }?;
                if rows > 0 {
                    let mut builder = func.builder();
                    builder.arg(&x);
                    builder.arg(&w);
                    builder.arg(&b);
                    builder.arg(&out);
                    builder.arg(&n_i);
                    builder.arg(&inv_n);
                    builder.arg(&eps);
                    // SAFETY: the kernel reads rows·n of x, n of w and b, writes rows·n of out.
                    unsafe { builder.launch(cfg) }.w()?;
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match (self.kind, s1.dtype(), s2.dtype(), s3.dtype()) {
            (NormKind::Layer, DType::BF16, DType::F32, DType::F32) => {
                launch!(half::bf16, f32, "layer_norm_bf16")
            }
            (NormKind::Layer, DType::F16, DType::F32, DType::F32) => {
                launch!(half::f16, f32, "layer_norm_f16")
            }
            (NormKind::Rms, DType::BF16, DType::BF16, _) => {
                launch!(half::bf16, half::bf16, "rms_norm_bf16")
            }
            (NormKind::Rms, DType::F16, DType::F16, _) => {
                launch!(half::f16, half::f16, "rms_norm_f16")
            }
            (_, a, b, c) => candle_core::bail!("{what}: unsupported dtypes ({a:?}, {b:?}, {c:?})"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{bits_differ, randn};
    use super::*;
    use crate::models::layers::{LayerNorm, RmsNorm};
    use candle_core::DType;

    // Row widths: tiny, below and above a warp, not multiples of 32, and the models' own (CLIP
    // 1024, SigLIP 1152, Qwen2-VL ViT 1280, Qwen2-VL-2B 1536, OneVision 896, Llama 4096).
    const WIDTHS: [usize; 12] = [1, 7, 31, 32, 33, 100, 896, 1024, 1152, 1280, 1536, 4096];

    #[test]
    fn fused_layer_norm_equals_the_op_by_op_path_bit_for_bit() {
        for dtype in [DType::BF16, DType::F16] {
            for n in WIDTHS {
                // Large means against the spread (deep in a ViT) and plain rows.
                for (mean, spread) in [(0.0, 1.0), (3.0, 0.5), (200.0, 2.0), (-1000.0, 30.0)] {
                    let x = randn(&[2, 3, n], mean, spread, dtype);
                    let ln = LayerNorm {
                        weight: randn(&[n], 1.0, 0.3, DType::F32),
                        bias: randn(&[n], 0.0, 0.5, DType::F32),
                        eps: 1e-6,
                    };
                    let want = ln.forward(&x).unwrap();
                    let got = layer_norm(&x, &ln.weight, &ln.bias, ln.eps).unwrap();
                    assert_eq!(got.dims(), x.dims());
                    assert_eq!(
                        bits_differ(&got, &want),
                        0,
                        "{dtype:?} n={n} mean={mean} spread={spread}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_rms_norm_equals_rms_norm_slow_bit_for_bit() {
        for dtype in [DType::BF16, DType::F16] {
            for n in WIDTHS {
                for spread in [0.02f32, 1.0, 40.0] {
                    let x = randn(&[3, 5, n], 0.1, spread, dtype);
                    let norm = RmsNorm {
                        weight: randn(&[n], 1.0, 0.5, dtype),
                        eps: 1e-6,
                    };
                    let want = norm.forward(&x).unwrap();
                    let got = rms_norm(&x, &norm.weight, norm.eps).unwrap();
                    assert_eq!(got.dims(), x.dims());
                    assert_eq!(
                        bits_differ(&got, &want),
                        0,
                        "{dtype:?} n={n} spread={spread}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_non_contiguous_input_is_normalised_as_its_contiguous_copy() {
        let x = randn(&[6, 40], 2.0, 1.0, DType::BF16).t().unwrap(); // [40, 6], strided
        let ln = LayerNorm {
            weight: randn(&[6], 1.0, 0.3, DType::F32),
            bias: randn(&[6], 0.0, 0.5, DType::F32),
            eps: 1e-5,
        };
        let got = layer_norm(&x, &ln.weight, &ln.bias, ln.eps).unwrap();
        assert_eq!(bits_differ(&got, &ln.forward(&x).unwrap()), 0);
    }
}
