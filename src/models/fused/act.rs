//! Activations in half precision, as [`crate::models::layers::Activation::forward`] computes them
//! op by op (transformers' order): QuickGELU `x · round(sigmoid(round(x · 1.702)))` rounded
//! (three roundings: the scale as torch multiplies by a Python float, the sigmoid, the product);
//! GELU (erf), GELU (tanh), SiLU in f32, rounded once. And the decoder MLP's
//! `round(act(gate)) · up`, rounded (a product of two half tensors: in f32, rounded once).
//!
//! The f32 functions are candle's own: the twin calls candle's CPU scalar functions, the kernel
//! spells out candle's CUDA expressions (candle-kernels' `unary.cu`, `sigmoid` of candle-nn), so
//! each equals the op-by-op path on its own device (exp, erf and tanh are not the same functions
//! on both; the op-by-op path differs between them too).

use candle_core::backend::BackendStorage;
use candle_core::op::UnaryOpT;
use candle_core::{CpuStorage, Layout, Shape, Tensor};

use super::{contiguous, Half};
use crate::error::{Error, Result};
use crate::models::layers::Activation;

/// `act(x)`, `x` bf16 or f16.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1_no_bwd(&Act { act })?)
}

/// `act(gate) · up` with the roundings of the op-by-op `act.forward(gate) * up`; `gate` and `up`
/// bf16 or f16, of one shape and dtype.
pub fn activation_mul(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return Err(Error::Internal(format!(
            "fused act·mul: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        )));
    }
    Ok(gate
        .contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &Act { act })?)
}

struct Act {
    act: Activation,
}

/// `Activation`'s number in kernels.cu.
#[cfg(feature = "cuda")]
fn code(act: Activation) -> i32 {
    match act {
        Activation::QuickGelu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Silu => 3,
    }
}

/// QuickGELU's 1.702 as candle's `affine` takes it (f64, then f32).
const QUICK_GELU_SCALE: f32 = 1.702f64 as f32;

/// The twin of one element: `act(x)` rounded as the op-by-op path rounds it.
fn act_one<T: Half>(act: Activation, x: T) -> T {
    let v = x.to();
    match act {
        Activation::QuickGelu => {
            let a = T::from(v * QUICK_GELU_SCALE + 0.0).to();
            // candle-nn's sigmoid: (e^(−a) + 1)⁻¹
            let s = T::from(((-a).exp() + 1.0).recip()).to();
            T::from(v * s)
        }
        Activation::Gelu => T::from(candle_core::op::GeluErf::f32(v)),
        Activation::GeluTanh => T::from(candle_core::op::Gelu::f32(v)),
        Activation::Silu => T::from(candle_core::op::Silu::f32(v)),
    }
}

impl Act {
    fn map<T: Half>(&self, x: &[T]) -> Vec<T> {
        x.iter().map(|&v| act_one(self.act, v)).collect()
    }

    fn map_mul<T: Half>(&self, g: &[T], u: &[T]) -> Vec<T> {
        g.iter()
            .zip(u)
            .map(|(&g, &u)| T::from(act_one(self.act, g).to() * u.to()))
            .collect()
    }
}

#[cfg(feature = "cuda")]
impl Act {
    /// Launches `act_<dtype>` (one operand) or `act_mul_<dtype>` (two).
    fn launch(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::DType;

        let off = |l: &Layout| -> candle_core::Result<usize> {
            l.contiguous_offsets()
                .map(|(start, _)| start)
                .ok_or_else(|| candle_core::Error::Msg("fused act: non-contiguous input".into()))
        };
        let n = l1.shape().elem_count();
        let o1 = off(l1)?;
        let o2 = match s2 {
            Some((_, l2)) => off(l2)?,
            None => 0,
        };
        let dev = s1.device();
        let (n_i, act, scale) = (n as i64, code(self.act), QUICK_GELU_SCALE);
        let cfg = super::gpu::per_element(n);
        macro_rules! launch {
            ($ty:ty, $one:literal, $two:literal) => {{
                let x = s1.as_cuda_slice::<$ty>()?.slice(o1..);
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<$ty>(n) }?;
                if n > 0 {
                    match s2 {
                        None => {
                            let func = dev.get_or_load_custom_func(
                                $one,
                                super::gpu::MODULE,
                                super::gpu::PTX,
                            )?;
                            let mut b = func.builder();
                            b.arg(&x);
                            b.arg(&out);
                            b.arg(&n_i);
                            b.arg(&act);
                            b.arg(&scale);
                            // SAFETY: reads n of x, writes n of out.
                            unsafe { b.launch(cfg) }.w()?;
                        }
                        Some((s2, _)) => {
                            let up = s2.as_cuda_slice::<$ty>()?.slice(o2..);
                            let func = dev.get_or_load_custom_func(
                                $two,
                                super::gpu::MODULE,
                                super::gpu::PTX,
                            )?;
                            let mut b = func.builder();
                            b.arg(&x);
                            b.arg(&up);
                            b.arg(&out);
                            b.arg(&n_i);
                            b.arg(&act);
                            b.arg(&scale);
                            // SAFETY: reads n of x and up, writes n of out.
                            unsafe { b.launch(cfg) }.w()?;
                        }
                    }
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match s1.dtype() {
            DType::BF16 => launch!(half::bf16, "act_bf16", "act_mul_bf16"),
            DType::F16 => launch!(half::f16, "act_f16", "act_mul_f16"),
            d => candle_core::bail!("fused act: bf16 or f16 only, not {d:?}"),
        })
    }
}

impl candle_core::CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "fused-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::BF16(x) => CpuStorage::BF16(self.map(contiguous(x, l, "act")?)),
            CpuStorage::F16(x) => CpuStorage::F16(self.map(contiguous(x, l, "act")?)),
            _ => candle_core::bail!("fused act: bf16 or f16 only, not {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.launch(s, l, None)?, l.shape().clone()))
    }
}

impl candle_core::CustomOp2 for Act {
    fn name(&self) -> &'static str {
        "fused-act-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("fused act·mul: shapes differ");
        }
        let w = "act-mul";
        let out = match (s1, s2) {
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => {
                CpuStorage::BF16(self.map_mul(contiguous(g, l1, w)?, contiguous(u, l2, w)?))
            }
            (CpuStorage::F16(g), CpuStorage::F16(u)) => {
                CpuStorage::F16(self.map_mul(contiguous(g, l1, w)?, contiguous(u, l2, w)?))
            }
            _ => candle_core::bail!("fused act·mul: bf16 or f16 operands of one dtype only"),
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
        if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
            candle_core::bail!("fused act·mul: operands differ in shape or dtype");
        }
        Ok((self.launch(s1, l1, Some((s2, l2)))?, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{bits_differ, randn};
    use super::*;
    use candle_core::DType;

    const ALL: [Activation; 4] = [
        Activation::QuickGelu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
    ];

    /// Inputs across the activations' range: near zero, the bend, the tails (f16 overflows to
    /// ±inf past 65504; bf16 keeps going).
    fn inputs(dtype: DType) -> Vec<Tensor> {
        vec![
            randn(&[4, 1000], 0.0, 1.0, dtype),
            randn(&[3, 333], 0.0, 6.0, dtype),
            randn(&[7, 77], 0.0, 0.01, dtype),
            randn(&[2, 4, 50], -2.0, 30.0, dtype),
        ]
    }

    #[test]
    fn fused_activations_equal_the_op_by_op_path_bit_for_bit() {
        for dtype in [DType::BF16, DType::F16] {
            for act in ALL {
                for x in inputs(dtype) {
                    let want = act.forward(&x).unwrap();
                    let got = activation(&x, act).unwrap();
                    assert_eq!(got.dims(), x.dims());
                    assert_eq!(bits_differ(&got, &want), 0, "{dtype:?} {act:?}");
                }
            }
        }
    }

    #[test]
    fn fused_act_mul_equals_act_then_multiply_bit_for_bit() {
        for dtype in [DType::BF16, DType::F16] {
            for act in ALL {
                for gate in inputs(dtype) {
                    let up = randn(gate.dims(), 0.0, 3.0, dtype);
                    let want = (act.forward(&gate).unwrap() * &up).unwrap();
                    let got = activation_mul(&gate, &up, act).unwrap();
                    assert_eq!(bits_differ(&got, &want), 0, "{dtype:?} {act:?}");
                }
            }
        }
        let (g, u) = (
            randn(&[2, 3], 0.0, 1.0, DType::BF16),
            randn(&[3, 2], 0.0, 1.0, DType::BF16),
        );
        assert!(activation_mul(&g, &u, Activation::Silu).is_err());
    }
}
