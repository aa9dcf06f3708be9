//! Attention by cuDNN 9's fused SDPA (the `cudnn` feature; `LOGIT_LENS_FUSED=...,cudnn-attention`):
//! NVIDIA's flash-attention kernels for Hopper, from a library the GPU machine already has (torch's
//! wheels install libcudnn.so.9), called through a C shim over the header-only cuDNN frontend
//! (`cudnn_sdpa.cpp`; build.rs compiles it). The same problem as [`super::flash`]: q, k and v read
//! in place through their [`View`]s, grouped-query attention, causal or not, the output
//! `[batch, queries, heads, head_dim]`; any head dim that is a multiple of 8 up to 256 (the vision
//! towers' 64, 72 and 80 and the decoders' 128).
//!
//! Its numbers are cuDNN's, not eager attention's roundings (the probabilities stay in f32 inside
//! the kernel): how far that is from transformers is measured on a card (the GPU test below), not
//! assumed. Where cuDNN fails (no libcudnn, no engine for a shape), the caller falls back to the
//! other attention paths and says so once.

use candle_core::{DType, Layout, Shape, Tensor};

use super::flash::{Dims, View};
use crate::error::Result;

/// Whether cuDNN takes this head dim and dtype (the frontend's rule for half precision).
pub fn fits(head_dim: usize, dtype: DType) -> bool {
    head_dim.is_multiple_of(8)
        && (8..=256).contains(&head_dim)
        && matches!(dtype, DType::BF16 | DType::F16)
}

/// `softmax(q kᵀ · scale + mask) v`, the mask causal (top-left) or none, by cuDNN; returns
/// `[batch, queries, heads, head_dim]`.
pub fn sdpa(
    q: (&Tensor, View),
    k: (&Tensor, View),
    v: (&Tensor, View),
    dims: Dims,
    causal: bool,
    scale: f64,
) -> Result<Tensor> {
    let op = Sdpa {
        views: [q.1, k.1, v.1],
        dims,
        causal,
        scale: scale as f32,
    };
    Ok(q.0.apply_op3_no_bwd(k.0, v.0, &op)?)
}

/// What the shim keeps: plans kept and evicted, and per topology (dtype, heads, head dim, mask)
/// whether its graphs share one compiled kernel (dynamic shapes) or were built statically, and why.
#[cfg(feature = "cudnn")]
pub fn describe() -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: the shim writes at most buf.len() bytes, NUL included.
    unsafe { ffi::logit_lens_cudnn_sdpa_describe(buf.as_mut_ptr().cast(), buf.len()) };
    ffi::message(&buf)
}

#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
struct Sdpa {
    views: [View; 3],
    dims: Dims,
    causal: bool,
    scale: f32,
}

impl candle_core::CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "cudnn-sdpa"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("cuDNN attention runs on the GPU only")
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        ffi::run(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(feature = "cudnn")]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, DType, Layout, Shape};

    use super::super::flash::operand_start;
    use super::Sdpa;

    extern "C" {
        fn logit_lens_cudnn_sdpa_workspace(
            dtype: c_int,
            dims: *const i64,
            strides: *const i64,
            causal: c_int,
            scale: f32,
            err: *mut c_char,
            err_len: usize,
        ) -> i64;
        fn logit_lens_cudnn_sdpa_run(
            dtype: c_int,
            dims: *const i64,
            strides: *const i64,
            causal: c_int,
            scale: f32,
            stream: *mut c_void,
            q: *const c_void,
            k: *const c_void,
            v: *const c_void,
            o: *mut c_void,
            workspace: *mut c_void,
            workspace_bytes: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub(super) fn logit_lens_cudnn_sdpa_describe(out: *mut c_char, len: usize);
        #[cfg(test)]
        pub(super) fn logit_lens_cudnn_sdpa_set_dynamic(on: c_int);
    }

    pub(super) fn message(buf: &[u8]) -> String {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }

    /// Operand `i` from its layout's start plus its view's offset, every element its view reads
    /// within its storage.
    fn operand<'a, T: CudaDType>(
        op: &Sdpa,
        i: usize,
        s: &'a CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let all = s.as_cuda_slice::<T>()?;
        let start = operand_start("cuDNN attention", op.dims, i, op.views[i], l, all.len())?;
        Ok(all.slice(start..))
    }

    pub(super) fn run(
        op: &Sdpa,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = op.dims;
        if op.causal && d.queries != d.keys {
            candle_core::bail!("cuDNN attention: causal needs as many queries as keys ({d:?})");
        }
        // What the frontend would divide by or read past: refused here, not a crash there.
        if [d.batch, d.heads, d.kv_heads, d.queries, d.keys, d.head_dim].contains(&0)
            || !d.heads.is_multiple_of(d.kv_heads)
        {
            candle_core::bail!("cuDNN attention: {d:?}");
        }
        let dtype = match (s1.dtype(), s2.dtype(), s3.dtype()) {
            (DType::BF16, DType::BF16, DType::BF16) => 0,
            (DType::F16, DType::F16, DType::F16) => 1,
            _ => candle_core::bail!("cuDNN attention: q, k, v all bf16 or all f16"),
        };
        let dims = [d.batch, d.heads, d.kv_heads, d.queries, d.keys, d.head_dim].map(|x| x as i64);
        let [qv, kv, vv] = op.views;
        let strides = [
            qv.batch, qv.head, qv.token, kv.batch, kv.head, kv.token, vv.batch, vv.head, vv.token,
        ]
        .map(|x| x as i64);
        let mut err = vec![0u8; 1024];
        // SAFETY: plain values and a buffer the shim writes at most err.len() bytes into.
        let ws = unsafe {
            logit_lens_cudnn_sdpa_workspace(
                dtype,
                dims.as_ptr(),
                strides.as_ptr(),
                op.causal as c_int,
                op.scale,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if ws < 0 {
            candle_core::bail!("{}", message(&err));
        }
        let dev = s1.device();
        let stream = dev.cuda_stream();
        let n = d.batch * d.queries * d.heads * d.head_dim;
        // None when the plan needs no workspace (the frontend takes a null pointer then).
        let mut workspace = (ws > 0)
            .then(|| dev.alloc_zeros::<u8>(ws as usize))
            .transpose()?;
        macro_rules! go {
            ($ty:ty) => {{
                let (q, k, v) = (
                    operand::<$ty>(op, 0, s1, l1)?,
                    operand::<$ty>(op, 1, s2, l2)?,
                    operand::<$ty>(op, 2, s3, l3)?,
                );
                // SAFETY: cuDNN writes every element of the output.
                let mut out = unsafe { dev.alloc::<$ty>(n) }?;
                {
                    let (qp, _g1) = q.device_ptr(&stream);
                    let (kp, _g2) = k.device_ptr(&stream);
                    let (vp, _g3) = v.device_ptr(&stream);
                    let (op_, _g4) = out.device_ptr_mut(&stream);
                    let (wp, _g5) = match workspace.as_mut() {
                        Some(w) => {
                            let (p, g) = w.device_ptr_mut(&stream);
                            (p as *mut c_void, Some(g))
                        }
                        None => (std::ptr::null_mut(), None),
                    };
                    // SAFETY: device pointers valid for the call on `stream`, which the shim sets
                    // as the handle's stream; the views stay within the operands (as for flash).
                    let rc = unsafe {
                        logit_lens_cudnn_sdpa_run(
                            dtype,
                            dims.as_ptr(),
                            strides.as_ptr(),
                            op.causal as c_int,
                            op.scale,
                            stream.cu_stream() as *mut c_void,
                            qp as *const c_void,
                            kp as *const c_void,
                            vp as *const c_void,
                            op_ as *mut c_void,
                            wp,
                            ws,
                            err.as_mut_ptr().cast(),
                            err.len(),
                        )
                    };
                    if rc != 0 {
                        candle_core::bail!("{}", message(&err));
                    }
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = if dtype == 0 {
            go!(half::bf16)
        } else {
            go!(half::f16)
        };
        Ok((out, Shape::from((d.batch, d.queries, d.heads, d.head_dim))))
    }
}

/// On a card (bench/gpu/device.sh runs `gpu_tests` with LOGIT_LENS_FUSED=none, so that the
/// reference is op by op; needs the `cudnn` feature and libcudnn.so.9): cuDNN's attention against
/// eager attention at the models' shapes (head dims 80, 64, 72 and 128, causal and not, grouped
/// queries, q/k/v strided views of a packed projection), how far apart they are, and what each
/// costs. cuDNN keeps the probabilities in f32 (eager rounds them to the dtype before `· v`), so
/// they differ in the last bits: reported, and held to the same bound as the flash kernel.
#[cfg(all(test, feature = "cudnn"))]
mod gpu_tests {
    use super::*;
    use crate::models::fused::test_util::{differ_and_max, AttentionCase, ATTENTION_CASES};
    use crate::models::profile::on_a_card::{gpu, per_call};

    #[test]
    fn cudnn_attention_equals_op_by_op_on_the_gpu() {
        let Some(gpu) = gpu() else { return };
        let mut failures = Vec::new();
        let sdpa_of = |case: &AttentionCase, causal| {
            let (dims, views) = case.dims_and_views();
            sdpa(
                (&case.q, views[0]),
                (&case.k, views[1]),
                (&case.v, views[2]),
                dims,
                causal,
                case.scale,
            )
        };
        // One call and its wall time (ms) to the end of its work on the card: a new shape's
        // first call is its plan's build.
        let timed = |f: &dyn Fn() -> Result<Tensor>| {
            let t = std::time::Instant::now();
            let out = f();
            gpu.synchronize().unwrap();
            (out, t.elapsed().as_secs_f64() * 1e3)
        };
        for dtype in [DType::BF16, DType::F16] {
            for (name, b, hq, hkv, s, d, causal) in ATTENTION_CASES {
                let case = AttentionCase::new(&gpu, dtype, (b, hq, hkv, s, d, causal));
                let op_by_op = || case.op_by_op();
                let run = || sdpa_of(&case, causal);
                let (first, build_ms) = timed(&run);
                let got = match first {
                    Ok(t) => t.transpose(1, 2).unwrap(),
                    Err(e) => {
                        failures.push(format!("{dtype:?} {name}: {e}"));
                        eprintln!("cudnn {dtype:?} {name:28} failed: {e}");
                        continue;
                    }
                };
                // A new length of the same topology: a plan, and with dynamic shapes no compilation.
                let other = AttentionCase::new(&gpu, dtype, (b, hq, hkv, s + 8, d, causal));
                let (second, rebuild_ms) = timed(&|| sdpa_of(&other, causal));
                if let Err(e) = second {
                    failures.push(format!("{dtype:?} {name}, {} tokens: {e}", s + 8));
                }
                let want = op_by_op();
                let (differ, max) = differ_and_max(&got, &want);
                let top = AttentionCase::top(&want);
                let total = want.elem_count();
                let (t_op, t_cudnn) = (
                    per_call(&gpu, 20, &op_by_op).1,
                    per_call(&gpu, 20, &|| run().unwrap()).1,
                );
                // The same shape built statically (no kernel cache): its plan and its speed. In
                // bf16 only: each static plan compiles its kernel, and the GPU tests share a 150 s
                // budget (device.sh).
                if dtype == DType::BF16 {
                    // SAFETY: sets a flag the shim reads when it builds a new plan.
                    unsafe { ffi::logit_lens_cudnn_sdpa_set_dynamic(0) };
                    let (fixed, static_ms) = timed(&run);
                    let t_static = match fixed {
                        Ok(_) => per_call(&gpu, 20, &|| run().unwrap()).1,
                        Err(e) => {
                            eprintln!("cudnn {dtype:?} {name:28} static build failed: {e}");
                            f64::NAN
                        }
                    };
                    // SAFETY: as above.
                    unsafe { ffi::logit_lens_cudnn_sdpa_set_dynamic(1) };
                    eprintln!(
                        "cudnn {dtype:?} {name:28} built statically: first call (plan) \
                         {static_ms:.0} ms, µs per call {t_static:.0}"
                    );
                }
                eprintln!(
                    "cudnn {dtype:?} {name:28} {differ:>8}/{total} differ, max {max:.2e} (of {top:.2}); \
                     µs per call: op by op {t_op:.0}, cudnn {t_cudnn:.0}; first call (plan) {build_ms:.0} ms, \
                     then {} tokens {rebuild_ms:.0} ms",
                    s + 8
                );
                if max > top / 64.0 {
                    failures.push(format!(
                        "{dtype:?} {name}: {differ}/{total} differ, max {max}"
                    ));
                }
            }
        }
        eprintln!("cudnn plans: {}", describe());
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// Qwen2-VL's vision tower sends its images of one size as one batch read in place
    /// (qwen2_vl/vision.rs): q, k and v `[1, heads, patches, d]` views of the packed projection, a
    /// run of equal images as a batch whose stride is one image's patches (less than the head
    /// stride) from an offset past the images before it. Here an image of 600 patches, then two of
    /// 598 read as one batch of 2, against eager attention over each image alone.
    #[test]
    fn cudnn_attention_reads_a_run_of_equal_images_in_place() {
        let Some(gpu) = gpu() else { return };
        let (heads, d, first, len, r) = (16, 80, 600, 598, 2);
        let n = first + r * len;
        for dtype in [DType::BF16, DType::F16] {
            let packed = Tensor::randn(0f32, 1.0, (1, n, 3 * heads, d), &gpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .transpose(1, 2)
                .unwrap(); // [1, 3·heads, n, d], strided
            let part = |i: usize| packed.narrow(1, i * heads, heads).unwrap();
            let (q, k, v) = (part(0), part(1), part(2));
            let run = |t: &Tensor| {
                let w = View::of(t).unwrap();
                View {
                    offset: first * w.token,
                    batch: len * w.token,
                    ..w
                }
            };
            let dims = Dims {
                batch: r,
                heads,
                kv_heads: heads,
                queries: len,
                keys: len,
                head_dim: d,
            };
            let scale = (d as f64).powf(-0.5);
            let got = match sdpa(
                (&q, run(&q)),
                (&k, run(&k)),
                (&v, run(&v)),
                dims,
                false,
                scale,
            ) {
                Ok(t) => t, // [r, len, heads, d]
                Err(e) => panic!("cudnn {dtype:?} a run of {r} images: {e}"),
            };
            for j in 0..r {
                let image = |t: &Tensor| t.narrow(2, first + j * len, len).unwrap();
                let want = crate::models::layers::attention_within(
                    &image(&q),
                    &image(&k),
                    &image(&v),
                    None,
                    scale,
                    crate::models::layers::ATTENTION_SCORES_BUDGET,
                )
                .unwrap(); // [1, heads, len, d]
                let mine = got.narrow(0, j, 1).unwrap().transpose(1, 2).unwrap();
                let (differ, max) = differ_and_max(&mine, &want);
                let top = AttentionCase::top(&want);
                eprintln!(
                    "cudnn {dtype:?} qwen2-vl image {} of a run of {r} at patch {}: {differ}/{} differ, \
                     max {max:.2e} (of {top:.2})",
                    j + 1,
                    first + j * len,
                    want.elem_count()
                );
                assert!(max <= top / 64.0, "{dtype:?} image {j}: max {max} of {top}");
            }
        }
    }
}
