//! Rotate-half rotary embedding in half precision, one thread per rotated pair `(x1_j, x2_j)`
//! (`j < d/2`, `x1` the first half of the head, `x2` the second), `c`, `s` the tables' entry:
//!
//! - [`rope`] (the decoder; [`crate::models::layers::rope`]): half tables, transformers' order
//!   `x·cos + rotate_half(x)·sin`, each product and the sum rounded to the dtype:
//!   `y1 = round(round(x1·c) + round(−x2·s))`, `y2 = round(round(x2·c) + round(x1·s))`.
//! - [`rope_in_f32`] (Qwen2-VL's vision tower; [`crate::models::layers::rope_in_f32`]): f32
//!   tables, in f32 (each product and the sum rounded to f32, no fused multiply-add, as torch and
//!   candle's CPU rope compute it), one rounding to the dtype.
//!
//! On the CPU [`rope_in_f32`] takes f32 `x` too: Qwen2-VL's vision tower in f32, whose q/k heads it
//! reads in place where candle's rope needed a contiguous copy (the same sums, bit for bit).
//!
//! `x`: `[b, h, s, d]` bf16 or f16, any strides with the last dimension's 1 (e.g. a head view of a
//! packed qkv projection: no copy); `cos`/`sin`: contiguous `[s, d/2]` or `[b, s, d/2]`. Output
//! contiguous `[b, h, s, d]`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

use super::{contiguous, Half};
use crate::error::Result;

/// Half-precision rope with half tables (transformers' decoder rounding).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(x, cos, sin, false)
}

/// Half-precision `x` rotated in f32 with f32 tables, rounded once.
pub fn rope_in_f32(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(x, cos, sin, true)
}

/// Whether the fused kernels take `x`, `cos`, `sin` as they are (else the caller goes op by op):
/// `x` rank 4 with an even head size, tables `[s, d/2]` or `[b, s, d/2]` in the dtype the mode
/// wants (`in_f32`: f32; else `x`'s).
pub fn fits(x: &Tensor, cos: &Tensor, sin: &Tensor, in_f32: bool) -> bool {
    let Ok((b, _, s, d)) = x.dims4() else {
        return false;
    };
    let table = if in_f32 { DType::F32 } else { x.dtype() };
    d % 2 == 0
        && cos.dims() == sin.dims()
        && (cos.dims() == [s, d / 2] || cos.dims() == [b, s, d / 2])
        && cos.dtype() == table
        && sin.dtype() == table
}

fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, in_f32: bool) -> Result<Tensor> {
    if !fits(x, cos, sin, in_f32) {
        return Err(crate::Error::Internal(format!(
            "fused rope: x {:?} {:?} with tables {:?} {:?} (f32 tables: {in_f32})",
            x.dims(),
            x.dtype(),
            cos.dims(),
            cos.dtype()
        )));
    }
    // The kernel takes any strides but the last dimension's.
    let x = if x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    Ok(x.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Rope { in_f32 })?)
}

struct Rope {
    in_f32: bool,
}

/// Where things are: `x`'s dims and element strides (its start offset applied by the caller), and
/// the tables' batch stride (0: one table for every batch row).
#[derive(Clone, Copy)]
struct Geometry {
    dims: [usize; 4],
    strides: [usize; 3],
    table_batch_stride: usize,
}

impl Geometry {
    fn new(l: &Layout, table: &Layout) -> candle_core::Result<Self> {
        let (b, h, s, d) = l.shape().dims4()?;
        let st = l.stride();
        if st[3] != 1 || d % 2 != 0 {
            candle_core::bail!("fused rope: the head dimension must be even with stride 1");
        }
        let table_batch_stride = match table.dims() {
            [ts, td] if *ts == s && *td == d / 2 => 0,
            [tb, ts, td] if *tb == b && *ts == s && *td == d / 2 => s * d / 2,
            t => candle_core::bail!("fused rope: tables {t:?} for x {:?}", l.dims()),
        };
        Ok(Geometry {
            dims: [b, h, s, d],
            strides: [st[0], st[1], st[2]],
            table_batch_stride,
        })
    }

    /// The CPU kernel (the GPU kernel's twin, and f32 Qwen2-VL vision on the CPU): every pair,
    /// each `(batch, head)` on its own rayon task.
    fn rows<T: Half + Send + Sync, C: Copy + Sync>(
        &self,
        x: &[T],
        cos: &[C],
        sin: &[C],
        pair: impl Fn(T, T, C, C) -> (T, T) + Sync,
    ) -> Vec<T> {
        use rayon::prelude::*;
        let [b, h, s, d] = self.dims;
        let half = d / 2;
        let mut out = vec![T::from(0.0); b * h * s * d];
        if out.is_empty() {
            return out;
        }
        out.par_chunks_mut(s * d).enumerate().for_each(|(bh, out)| {
            let (bi, hi) = (bh / h, bh % h);
            for (si, out) in out.chunks_exact_mut(d).enumerate() {
                let row =
                    &x[bi * self.strides[0] + hi * self.strides[1] + si * self.strides[2]..][..d];
                let t = bi * self.table_batch_stride + si * half;
                let (first, second) = out.split_at_mut(half);
                for j in 0..half {
                    (first[j], second[j]) = pair(row[j], row[j + half], cos[t + j], sin[t + j]);
                }
            }
        });
        out
    }
}

/// Half tables: every product and the sum rounded (−x2·s rounds to −round(x2·s) exactly).
fn pair_half<T: Half>(x1: T, x2: T, c: T, s: T) -> (T, T) {
    let r = |a: f32, b: f32| T::from(a * b).to();
    let (x1f, x2f, cf, sf) = (x1.to(), x2.to(), c.to(), s.to());
    (
        T::from(r(x1f, cf) + r(-x2f, sf)),
        T::from(r(x2f, cf) + r(x1f, sf)),
    )
}

/// f32 tables: in f32, one rounding (candle's CPU rope: `x1·c − x2·s`, `x1·s + x2·c`).
fn pair_f32<T: Half>(x1: T, x2: T, c: f32, s: f32) -> (T, T) {
    let (x1f, x2f) = (x1.to(), x2.to());
    (T::from(x1f * c - x2f * s), T::from(x1f * s + x2f * c))
}

impl candle_core::CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.in_f32 {
            "fused-rope-f32-tables"
        } else {
            "fused-rope"
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
        let g = Geometry::new(l1, l2)?;
        if l2.dims() != l3.dims() {
            candle_core::bail!("fused rope: cos and sin differ in shape");
        }
        let w = "rope";
        // Each dtype's arm: `x` from its start offset, the contiguous tables, the pair's rounding.
        macro_rules! rows {
            ($dtype:ident, $x:expr, $c:expr, $s:expr, $pair:expr) => {
                CpuStorage::$dtype(g.rows(
                    &$x[l1.start_offset()..],
                    contiguous($c, l2, w)?,
                    contiguous($s, l3, w)?,
                    $pair,
                ))
            };
        }
        let out = match (s1, s2, s3, self.in_f32) {
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(s), false) => {
                rows!(BF16, x, c, s, pair_half)
            }
            (CpuStorage::F16(x), CpuStorage::F16(c), CpuStorage::F16(s), false) => {
                rows!(F16, x, c, s, pair_half)
            }
            (CpuStorage::BF16(x), CpuStorage::F32(c), CpuStorage::F32(s), true) => {
                rows!(BF16, x, c, s, pair_f32)
            }
            (CpuStorage::F16(x), CpuStorage::F32(c), CpuStorage::F32(s), true) => {
                rows!(F16, x, c, s, pair_f32)
            }
            // The f32 CPU path of Qwen2-VL's vision tower: reads the strided q/k heads in place.
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s), true) => {
                rows!(F32, x, c, s, pair_f32)
            }
            _ => candle_core::bail!(
                "{}: unsupported dtypes ({:?}, {:?}, {:?})",
                self.name(),
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok((out, Shape::from(g.dims.to_vec())))
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

        let g = Geometry::new(l1, l2)?;
        if l2.dims() != l3.dims() {
            candle_core::bail!("fused rope: cos and sin differ in shape");
        }
        let table_at = |l: &Layout| -> candle_core::Result<usize> {
            l.contiguous_offsets()
                .map(|(start, _)| start)
                .ok_or_else(|| candle_core::Error::Msg("fused rope: non-contiguous table".into()))
        };
        let (o1, o2, o3) = (l1.start_offset(), table_at(l2)?, table_at(l3)?);
        let [b, h, s, d] = g.dims;
        let pairs = b * h * s * (d / 2);
        let dev = s1.device();
        let cfg = super::gpu::per_element(pairs);
        let args: [i64; 8] = [
            b as i64,
            h as i64,
            s as i64,
            d as i64,
            g.strides[0] as i64,
            g.strides[1] as i64,
            g.strides[2] as i64,
            g.table_batch_stride as i64,
        ];
        macro_rules! launch {
            ($ty:ty, $tty:ty, $name:literal) => {{
                let func =
                    dev.get_or_load_custom_func($name, super::gpu::MODULE, super::gpu::PTX)?;
                let x = s1.as_cuda_slice::<$ty>()?.slice(o1..);
                let cos = s2.as_cuda_slice::<$tty>()?.slice(o2..);
                let sin = s3.as_cuda_slice::<$tty>()?.slice(o3..);
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<$ty>(pairs * 2) }?;
                if pairs > 0 {
                    let mut builder = func.builder();
                    builder.arg(&x);
                    builder.arg(&cos);
                    builder.arg(&sin);
                    builder.arg(&out);
                    for a in &args {
                        builder.arg(a);
                    }
                    // SAFETY: the kernel reads x within its strides, the tables within
                    // b·s·d/2 (or s·d/2) entries, and writes b·h·s·d outputs.
                    unsafe { builder.launch(cfg) }.w()?;
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match (s1.dtype(), s2.dtype(), s3.dtype(), self.in_f32) {
            (DType::BF16, DType::BF16, DType::BF16, false) => {
                launch!(half::bf16, half::bf16, "rope_half_bf16")
            }
            (DType::F16, DType::F16, DType::F16, false) => {
                launch!(half::f16, half::f16, "rope_half_f16")
            }
            (DType::BF16, DType::F32, DType::F32, true) => {
                launch!(half::bf16, f32, "rope_f32_bf16")
            }
            (DType::F16, DType::F32, DType::F32, true) => launch!(half::f16, f32, "rope_f32_f16"),
            (a, b, c, _) => {
                candle_core::bail!("{}: unsupported dtypes ({a:?}, {b:?}, {c:?})", self.name())
            }
        };
        Ok((out, Shape::from(g.dims.to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{bits_differ, randn};
    use super::*;
    use crate::models::layers;
    use candle_core::Device;

    /// cos/sin `[rows, half]` of real rope angles (positions × inverse frequencies), in f32.
    fn tables(rows: usize, half: usize, offset: usize) -> (Tensor, Tensor) {
        let inv = layers::inv_freq(10000.0, 2 * half);
        let angles: Vec<f32> = (0..rows)
            .flat_map(|p| inv.iter().map(move |f| (p + offset) as f32 * f))
            .collect();
        let a = Tensor::from_vec(angles, (rows, half), &Device::Cpu).unwrap();
        (a.cos().unwrap(), a.sin().unwrap())
    }

    #[test]
    fn fused_half_rope_equals_the_op_by_op_path_bit_for_bit() {
        for dtype in [DType::BF16, DType::F16] {
            for (b, h, s, d) in [(1, 12, 37, 128), (2, 2, 9, 64), (1, 3, 5, 80), (1, 1, 1, 2)] {
                let x = randn(&[b, h, s, d], 0.0, 2.0, dtype);
                let (c, sn) = tables(s, d / 2, 3);
                let (c, sn) = (c.to_dtype(dtype).unwrap(), sn.to_dtype(dtype).unwrap());
                let want = layers::rope(&x, &c, &sn).unwrap();
                let got = rope(&x, &c, &sn).unwrap();
                assert_eq!(bits_differ(&got, &want), 0, "{dtype:?} {:?}", x.dims());
                // Per-batch tables [b, s, d/2] (left padding shifts each row's positions).
                let (cb, sb) = tables(b * s, d / 2, 0);
                let cb = cb.reshape((b, s, d / 2)).unwrap().to_dtype(dtype).unwrap();
                let sb = sb.reshape((b, s, d / 2)).unwrap().to_dtype(dtype).unwrap();
                let want = layers::rope(&x, &cb, &sb).unwrap();
                let got = rope(&x, &cb, &sb).unwrap();
                assert_eq!(bits_differ(&got, &want), 0, "{dtype:?} batched");
            }
        }
    }

    #[test]
    fn fused_ropes_equal_the_op_by_op_path_on_strided_head_views() {
        for dtype in [DType::BF16, DType::F16] {
            // Qwen2-VL's vision attention: q and k are views of the packed qkv projection.
            let (n, heads, hd) = (64, 16, 80);
            let qkv = randn(&[n, 3 * heads * hd], 0.0, 3.0, dtype)
                .reshape((n, 3, heads, hd))
                .unwrap()
                .permute((1, 2, 0, 3))
                .unwrap();
            let (c, s) = tables(n, hd / 2, 0);
            for i in 0..2 {
                // `[1, heads, n, hd]`, a view (candle's `get(i)` would copy it: its reshape).
                let x = qkv.narrow(0, i, 1).unwrap();
                assert!(!x.is_contiguous());
                let want = layers::rope_in_f32(&x, &c, &s).unwrap();
                let got = rope_in_f32(&x, &c, &s).unwrap();
                assert!(got.is_contiguous());
                assert_eq!(bits_differ(&got, &want), 0, "{dtype:?} view {i}");
                // The same views through the half-table rope.
                let (ch, sh) = (c.to_dtype(dtype).unwrap(), s.to_dtype(dtype).unwrap());
                let want = layers::rope(&x, &ch, &sh).unwrap();
                assert_eq!(bits_differ(&rope(&x, &ch, &sh).unwrap(), &want), 0);
            }
            // The decoder's q and k heads together: a narrow of the `[b, heads, s, hd]` qkv heads.
            let (b, nh, nkv, s, hd) = (2, 6, 2, 11, 64);
            let heads = randn(&[b, nh + 2 * nkv, s, hd], 0.0, 2.0, dtype);
            let x = heads.narrow(1, 0, nh + nkv).unwrap();
            assert!(!x.is_contiguous());
            let (c, sn) = tables(s, hd / 2, 5);
            let (c, sn) = (c.to_dtype(dtype).unwrap(), sn.to_dtype(dtype).unwrap());
            let want = layers::rope(&x, &c, &sn).unwrap();
            assert_eq!(bits_differ(&rope(&x, &c, &sn).unwrap(), &want), 0);
            // A view whose last dimension is strided is copied first.
            let x = randn(&[1, 2, 8, 6], 0.0, 1.0, dtype)
                .transpose(2, 3)
                .unwrap();
            let (c, s) = tables(6, 4, 1);
            let want = layers::rope_in_f32(&x, &c, &s).unwrap();
            assert_eq!(bits_differ(&rope_in_f32(&x, &c, &s).unwrap(), &want), 0);
        }
    }

    /// In f32 on the CPU (Qwen2-VL's vision tower there), [`layers::rope_in_f32`] now reads the
    /// strided q/k heads in place: bit for bit what candle's rope gives on a contiguous copy.
    #[test]
    fn f32_rope_on_strided_heads_equals_candles_rope() {
        let (n, heads, hd) = (37, 16, 80);
        let qkv = randn(&[n, 3 * heads * hd], 0.0, 3.0, DType::F32)
            .reshape((n, 3, heads, hd))
            .unwrap()
            .permute((1, 2, 0, 3))
            .unwrap();
        let (c, s) = tables(n, hd / 2, 0);
        // q and k together, as the vision block rotates them: `[2, heads, n, hd]`, a view.
        let x = qkv.narrow(0, 0, 2).unwrap();
        assert!(!x.is_contiguous());
        let want = candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), &c, &s).unwrap();
        let got = layers::rope_in_f32(&x, &c, &s).unwrap();
        assert!(got.is_contiguous());
        assert_eq!(bits_differ(&got, &want), 0);
        // Per-batch tables too.
        let (cb, sb) = tables(2 * n, hd / 2, 0);
        let (cb, sb) = (
            cb.reshape((2, n, hd / 2)).unwrap(),
            sb.reshape((2, n, hd / 2)).unwrap(),
        );
        let want = candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), &cb, &sb).unwrap();
        assert_eq!(bits_differ(&rope_in_f32(&x, &cb, &sb).unwrap(), &want), 0);
    }

    #[test]
    fn tables_of_the_wrong_shape_or_dtype_do_not_fit() {
        let x = randn(&[1, 2, 4, 8], 0.0, 1.0, DType::BF16);
        let (c, s) = tables(4, 4, 0);
        assert!(fits(&x, &c, &s, true));
        assert!(!fits(&x, &c, &s, false));
        let (c5, s5) = tables(5, 4, 0);
        assert!(!fits(&x, &c5, &s5, true));
        assert!(rope_in_f32(&x, &c5, &s5).is_err());
    }
}
