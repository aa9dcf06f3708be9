//! The lens's one custom GPU kernel (row_reduce.cu, compiled to PTX by build.rs with the CUDA
//! toolkit's nvcc): per row of a logits block, the max and the sum of exponentials in one read of
//! the half-precision logits, instead of a chain of generic ops that each write a full f32 copy.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/row_reduce.ptx"));

/// `[rows, cols]` logits (f32, bf16 or f16, contiguous) → `[rows, 2]` f32: (max, Σ e^(z − max)).
pub fn row_max_sumexp(logits: &Tensor) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1_no_bwd(&RowMaxSumExp)
}

struct RowMaxSumExp;

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
        let out = dev.alloc_zeros::<f32>(rows * 2)?;
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
