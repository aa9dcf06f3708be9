//! Attention in one kernel that never materialises the `[heads × queries × keys]` scores
//! (`flash.cu`), with eager attention's roundings: the scores rounded to the dtype, scaled as torch
//! scales them (in f32, rounded once), the softmax in f32 rounded once, `probs · v` summed in f32
//! and rounded once. What [`crate::models::layers::attention`] computes op by op, up to the order
//! of the f32 sums. Two passes over the keys (max and sum first, then `p · v`), so the scores GEMM
//! runs twice: cheap next to writing and reading the scores four times, which on an H100 was half
//! of Qwen2-VL's vision tower (bench/gpu/results/h100-run5, 7 images: attention 144 of 265 ms).
//!
//! q, k and v are read in place through (batch, head, token) strides ([`View`]), so the packed
//! q/k/v heads and Qwen2-VL's images of one size (a run of equal segments) need no copies; the
//! output is `[batch, queries, heads, head_dim]`, contiguous, which is the layout the output
//! projection reads. Head dims 64 (CLIP), 80 (Qwen2-VL's ViT) and 128 (the decoders).
//!
//! On the GPU only when `LOGIT_LENS_FUSED` names `flash` (not in `all` until measured on a
//! card: `bench/gpu/run.sh --fused all,flash`). The CPU twin computes the same roundings and is held
//! to the op-by-op path in the tests; on a card `gpu_tests` compares kernel and op by op.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

use super::Half;
use crate::error::Result;

/// Element strides of a `[batch, heads, tokens, head_dim]` operand whose head dimension is
/// contiguous, and the offset of its first element from the tensor's own start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub offset: usize,
    pub batch: usize,
    pub head: usize,
    pub token: usize,
}

impl View {
    /// The view of a `[b, h, t, d]` tensor as it lies (None if its last dimension is strided).
    pub fn of(t: &Tensor) -> Option<View> {
        let s = t.stride();
        (t.rank() == 4 && s[3] == 1).then(|| View {
            offset: 0,
            batch: s[0],
            head: s[1],
            token: s[2],
        })
    }
}

/// The problem: `batch` × `heads` query rows of `queries` tokens against `kv_heads` heads of
/// `keys` tokens (grouped-query attention when `kv_heads < heads`), head dim `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
}

/// Operand `i` of `dims` (0: q, 1 and 2: k and v) read through `view` from a storage of `len`
/// elements: its first element, where every element it reads lies within the storage (else an
/// error naming `what`).
pub(super) fn operand_start(
    what: &str,
    dims: Dims,
    i: usize,
    view: View,
    layout: &Layout,
    len: usize,
) -> candle_core::Result<usize> {
    let (heads, tokens) = if i == 0 {
        (dims.heads, dims.queries)
    } else {
        (dims.kv_heads, dims.keys)
    };
    let start = layout.start_offset() + view.offset;
    if dims.batch == 0 || heads == 0 || tokens == 0 {
        return Ok(start);
    }
    let last = start
        + (dims.batch - 1) * view.batch
        + (heads - 1) * view.head
        + (tokens - 1) * view.token
        + dims.head_dim
        - 1;
    if last >= len {
        candle_core::bail!(
            "{what}: operand {i} reads element {last} of {len} ({dims:?}, {view:?})"
        );
    }
    Ok(start)
}

/// Whether the kernel takes this head dim and dtype.
pub fn fits(head_dim: usize, dtype: DType) -> bool {
    matches!(head_dim, 64 | 80 | 128) && matches!(dtype, DType::BF16 | DType::F16)
}

/// Whether a fused attention (cuDNN's or the flash kernel) would take `q` (`[b, heads, tokens,
/// head_dim]`): a GPU, half precision, the switch naming one that takes the head dim.
pub fn wanted(q: &Tensor) -> Result<bool> {
    let d = q.dim(3)?;
    Ok(cudnn_takes(q, d) || flash_takes(q, d))
}

/// cuDNN's attention for `q` with head dim `d`: named by the switch, a head dim it takes, and not
/// failed there before; more than one query. A generation step's one query against its growing
/// cache would build a cuDNN plan for every token (the keys' length and strides are part of a
/// plan's key), and push the prompts' and images' plans out of the shim's cache.
fn cudnn_takes(q: &Tensor, d: usize) -> bool {
    super::applies(q, super::Kernel::CudnnAttention)
        && q.dim(2).is_ok_and(|queries| queries > 1)
        && super::cudnn::fits(d, q.dtype())
        && cudnn_usable((d, q.dtype()))
}

/// The flash kernel for `q` with head dim `d`: named by the switch and a head dim it takes.
fn flash_takes(q: &Tensor, d: usize) -> bool {
    super::applies(q, super::Kernel::Flash) && fits(d, q.dtype())
}

/// cuDNN's attention for a head dim and dtype until it fails once there (no libcudnn, no engine
/// for the shape): then the other paths for them for the rest of the process, said once on stderr.
fn cudnn_usable(key: (usize, DType)) -> bool {
    !CUDNN_FAILED
        .lock()
        .is_ok_and(|failed| failed.contains(&key))
}

static CUDNN_FAILED: std::sync::Mutex<Vec<(usize, DType)>> = std::sync::Mutex::new(Vec::new());

/// The fused attention [`wanted`] picks: cuDNN's where named (and not failed), else the flash
/// kernel where named and it takes the head dim. `None`: neither (the caller goes op by op).
pub fn fused_attention(
    q: (&Tensor, View),
    k: (&Tensor, View),
    v: (&Tensor, View),
    dims: Dims,
    causal: bool,
    scale: f64,
) -> Result<Option<Tensor>> {
    let dtype = q.0.dtype();
    if cudnn_takes(q.0, dims.head_dim) {
        match super::cudnn::sdpa(q, k, v, dims, causal, scale) {
            Ok(out) => return Ok(Some(out)),
            Err(e) => {
                if let Ok(mut failed) = CUDNN_FAILED.lock() {
                    failed.push((dims.head_dim, dtype));
                }
                eprintln!(
                    "warning: cuDNN attention failed for head dim {} {dtype:?} ({e}); those go the \
                     other paths from now on",
                    dims.head_dim
                );
            }
        }
    }
    if flash_takes(q.0, dims.head_dim) {
        return Ok(Some(flash_attention(q, k, v, dims, causal, scale)?));
    }
    Ok(None)
}

/// `softmax(q kᵀ · scale + mask) v` with the mask causal or none; returns `[batch, queries,
/// heads, head_dim]`.
pub fn flash_attention(
    q: (&Tensor, View),
    k: (&Tensor, View),
    v: (&Tensor, View),
    dims: Dims,
    causal: bool,
    scale: f64,
) -> Result<Tensor> {
    let op = Flash {
        views: [q.1, k.1, v.1],
        dims,
        causal,
        scale: scale as f32,
    };
    op.check()?;
    Ok(q.0.apply_op3_no_bwd(k.0, v.0, &op)?)
}

struct Flash {
    views: [View; 3],
    dims: Dims,
    causal: bool,
    scale: f32,
}

impl Flash {
    fn check(&self) -> candle_core::Result<()> {
        let d = self.dims;
        if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) || !fits(d.head_dim, DType::BF16)
        {
            candle_core::bail!("flash attention: {d:?}");
        }
        if self.causal && d.queries != d.keys {
            candle_core::bail!("flash attention: causal needs as many queries as keys ({d:?})");
        }
        Ok(())
    }

    /// Operand `i`'s first element (from its storage's start), its reads checked against the
    /// storage's length ([`operand_start`]).
    fn check_bounds(&self, i: usize, layout: &Layout, len: usize) -> candle_core::Result<usize> {
        operand_start("flash attention", self.dims, i, self.views[i], layout, len)
    }

    /// The CPU twin: the kernel's arithmetic, row by row.
    fn twin<T: Half>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (d, [qv, kv, vv]) = (self.dims, self.views);
        let hd = d.head_dim;
        let rep = d.heads / d.kv_heads;
        let mut out = vec![T::from(0.0); d.batch * d.queries * d.heads * hd];
        let mut vals = vec![0f32; d.keys];
        let mut acc = vec![0f32; hd];
        for b in 0..d.batch {
            for h in 0..d.heads {
                let hk = h / rep;
                for i in 0..d.queries {
                    let qr = &q[qv.offset + b * qv.batch + h * qv.head + i * qv.token..][..hd];
                    for (j, val) in vals.iter_mut().enumerate() {
                        if self.causal && j > i {
                            *val = f32::NEG_INFINITY;
                            continue;
                        }
                        let kr = &k[kv.offset + b * kv.batch + hk * kv.head + j * kv.token..][..hd];
                        let dot: f32 = qr.iter().zip(kr).map(|(a, b)| a.to() * b.to()).sum();
                        let rounded = T::from(dot).to();
                        *val = T::from(rounded * self.scale).to();
                    }
                    let m = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let l: f32 = vals.iter().map(|x| (x - m).exp()).sum();
                    acc.fill(0.0);
                    for (j, val) in vals.iter().enumerate() {
                        if *val == f32::NEG_INFINITY {
                            continue;
                        }
                        let p = T::from((val - m).exp() / l).to();
                        let vr = &v[vv.offset + b * vv.batch + hk * vv.head + j * vv.token..][..hd];
                        for (a, x) in acc.iter_mut().zip(vr) {
                            *a += p * x.to();
                        }
                    }
                    let o = ((b * d.queries + i) * d.heads + h) * hd;
                    for (dst, a) in out[o..o + hd].iter_mut().zip(&acc) {
                        *dst = T::from(*a);
                    }
                }
            }
        }
        out
    }

    fn out_shape(&self) -> Shape {
        let d = self.dims;
        Shape::from((d.batch, d.queries, d.heads, d.head_dim))
    }
}

impl candle_core::CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "flash-attention"
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
        macro_rules! run {
            ($q:expr, $k:expr, $v:expr, $wrap:path) => {{
                let starts = [
                    self.check_bounds(0, l1, $q.len())?,
                    self.check_bounds(1, l2, $k.len())?,
                    self.check_bounds(2, l3, $v.len())?,
                ];
                let mut op = Flash {
                    views: self.views,
                    ..*self
                };
                for (view, start) in op.views.iter_mut().zip(starts) {
                    view.offset = start;
                }
                $wrap(op.twin($q, $k, $v))
            }};
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                run!(q, k, v, CpuStorage::BF16)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                run!(q, k, v, CpuStorage::F16)
            }
            _ => candle_core::bail!("flash attention: q, k, v all bf16 or all f16"),
        };
        Ok((out, self.out_shape()))
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
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
        const BQ: usize = 64; // queries per block (flash.cu)

        let d = self.dims;
        let dev = s1.device();
        let cfg = LaunchConfig {
            grid_dim: (
                d.queries.div_ceil(BQ) as u32,
                d.heads as u32,
                d.batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($ty:ty, $dname:literal) => {{
                let (q, k, v) = (
                    s1.as_cuda_slice::<$ty>()?,
                    s2.as_cuda_slice::<$ty>()?,
                    s3.as_cuda_slice::<$ty>()?,
                );
                let starts = [
                    self.check_bounds(0, l1, q.len())?,
                    self.check_bounds(1, l2, k.len())?,
                    self.check_bounds(2, l3, v.len())?,
                ];
                let args = Args::new(self, starts);
                let name = match d.head_dim {
                    64 => concat!("flash_attention_", $dname, "_d64"),
                    80 => concat!("flash_attention_", $dname, "_d80"),
                    _ => concat!("flash_attention_", $dname, "_d128"),
                };
                let func = dev.get_or_load_custom_func(name, "logit_lens_flash", PTX)?;
                let n = d.batch * d.queries * d.heads * d.head_dim;
                // SAFETY: every element is written by the kernel (each query row of each head).
                let out = unsafe { dev.alloc::<$ty>(n) }?;
                if n > 0 && d.keys > 0 {
                    let mut b = func.builder();
                    b.arg(q);
                    b.arg(k);
                    b.arg(v);
                    b.arg(&out);
                    b.arg(&args);
                    // SAFETY: check_bounds holds every element the views read inside its slice;
                    // the output holds batch·queries·heads·head_dim elements.
                    unsafe { b.launch(cfg) }.w()?;
                } else if n > 0 {
                    candle_core::bail!("flash attention: no keys");
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        self.check()?;
        let out = match (s1.dtype(), s2.dtype(), s3.dtype()) {
            (DType::BF16, DType::BF16, DType::BF16) => launch!(half::bf16, "bf16"),
            (DType::F16, DType::F16, DType::F16) => launch!(half::f16, "f16"),
            _ => candle_core::bail!("flash attention: q, k, v all bf16 or all f16"),
        };
        Ok((out, self.out_shape()))
    }
}

/// flash.cu's `flash::Args`, field for field.
#[cfg(feature = "cuda")]
#[repr(C)]
#[derive(Clone, Copy)]
struct Args {
    b: i64,
    hq: i64,
    hkv: i64,
    s: i64,
    sk: i64,
    q: [i64; 4],
    k: [i64; 4],
    v: [i64; 4],
    scale: f32,
    causal: i32,
}

#[cfg(feature = "cuda")]
impl Args {
    /// `starts`: each operand's first element (its layout's start plus its view's offset).
    fn new(op: &Flash, starts: [usize; 3]) -> Self {
        let d = op.dims;
        let v = |i: usize| {
            let w = op.views[i];
            [starts[i], w.batch, w.head, w.token].map(|x| x as i64)
        };
        Args {
            b: d.batch as i64,
            hq: d.heads as i64,
            hkv: d.kv_heads as i64,
            s: d.queries as i64,
            sk: d.keys as i64,
            q: v(0),
            k: v(1),
            v: v(2),
            scale: op.scale,
            causal: op.causal as i32,
        }
    }
}

// SAFETY: plain old data laid out as the C struct the kernel takes by value.
#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Args {}

#[cfg(test)]
mod tests {
    use super::super::test_util::{differ_and_max, randn};
    use super::*;
    use crate::models::layers::{attention_within, causal_mask};
    use candle_core::Device;

    /// A view whose last read lies past its storage is refused before any kernel (the flash
    /// kernel's and cuDNN's): one element short fails, an exact fit passes.
    #[test]
    fn views_that_read_past_their_storage_are_refused() {
        let dims = Dims {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            queries: 5,
            keys: 7,
            head_dim: 8,
        };
        // k: [2, 2, 7, 8] contiguous after 3 elements of something else.
        let layout = Layout::contiguous_with_offset((2, 2, 7, 8), 3);
        let view = View {
            offset: 0,
            batch: 2 * 7 * 8,
            head: 7 * 8,
            token: 8,
        };
        let len = 3 + 2 * 2 * 7 * 8;
        assert_eq!(operand_start("k", dims, 1, view, &layout, len).unwrap(), 3);
        let err = operand_start("k", dims, 1, view, &layout, len - 1).unwrap_err();
        assert!(err.to_string().contains("reads element"), "{err}");
        // The same view as q (4 heads of 5 tokens) reads further: past this storage.
        assert!(operand_start("q", dims, 0, view, &layout, len).is_err());
    }

    /// The twin against the op-by-op attention, through strided views of packed q/k/v heads,
    /// with grouped-query heads, causal or not: the same roundings, so all but a few outputs
    /// agree exactly (the f32 sums run in another order).
    #[test]
    fn the_twin_computes_eager_attention_from_strided_views() {
        for dtype in [DType::BF16, DType::F16] {
            for (b, hq, hkv, s, d, causal) in [
                (2, 4, 4, 37, 64, false),
                (1, 6, 2, 50, 128, true),
                (3, 2, 1, 9, 80, true),
            ] {
                // Packed as a QKV projection leaves them: [b, s, hq + 2·hkv, d], viewed per head.
                let packed = randn(&[b, s, hq + 2 * hkv, d], 0.0, 1.0, dtype);
                let heads = packed.transpose(1, 2).unwrap(); // [b, heads, s, d], strided
                let q = heads.narrow(1, 0, hq).unwrap();
                let k = heads.narrow(1, hq, hkv).unwrap();
                let v = heads.narrow(1, hq + hkv, hkv).unwrap();
                let scale = (d as f64).powf(-0.5);
                let mask = causal.then(|| causal_mask(s, dtype, &Device::Cpu).unwrap());
                let want = attention_within(&q, &k, &v, mask.as_ref(), scale, 1 << 26).unwrap();
                let dims = Dims {
                    batch: b,
                    heads: hq,
                    kv_heads: hkv,
                    queries: s,
                    keys: s,
                    head_dim: d,
                };
                fn view(t: &Tensor) -> (&Tensor, View) {
                    (t, View::of(t).unwrap())
                }
                let got = flash_attention(view(&q), view(&k), view(&v), dims, causal, scale)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap();
                let (n, max) = differ_and_max(&got, &want);
                let total = want.elem_count();
                let top = want.abs().unwrap().max_all().unwrap();
                let top = top
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                eprintln!(
                    "{dtype:?} {:?} causal {causal}: {n}/{total} differ, max {max:e} (of {top})",
                    dims
                );
                assert!(n * 20 <= total, "{dtype:?} {dims:?}: {n}/{total} differ");
                assert!(
                    max <= top / 64.0,
                    "{dtype:?} {dims:?}: max diff {max} of {top}"
                );
            }
        }
    }

    /// An offset and a batch stride that pick equal segments out of one sequence (Qwen2-VL's
    /// images of one size) give each segment's attention alone.
    #[test]
    fn views_pick_segments_out_of_one_sequence() {
        let dtype = DType::BF16;
        let (heads, len, d, at, r) = (2, 11, 64, 5, 3);
        let n = at + r * len + 4;
        let x = randn(&[1, heads, n, d], 0.0, 1.0, dtype);
        let (q, k, v) = (x.clone(), (&x * 0.5).unwrap(), (&x * -1.0).unwrap());
        let st = x.stride()[2];
        let seg = |t| View {
            offset: at * st,
            batch: len * st,
            head: heads_stride(t),
            token: st,
        };
        fn heads_stride(t: &Tensor) -> usize {
            t.stride()[1]
        }
        let dims = Dims {
            batch: r,
            heads,
            kv_heads: heads,
            queries: len,
            keys: len,
            head_dim: d,
        };
        let got = flash_attention(
            (&q, seg(&q)),
            (&k, seg(&k)),
            (&v, seg(&v)),
            dims,
            false,
            0.125,
        )
        .unwrap();
        for i in 0..r {
            let part = |t: &Tensor| t.narrow(2, at + i * len, len).unwrap();
            let alone = Dims { batch: 1, ..dims };
            let one = |t: &Tensor| {
                let p = part(t);
                let view = View::of(&p).unwrap();
                (p, view)
            };
            let (qa, ka, va) = (one(&q), one(&k), one(&v));
            let want = flash_attention(
                (&qa.0, qa.1),
                (&ka.0, ka.1),
                (&va.0, va.1),
                alone,
                false,
                0.125,
            )
            .unwrap();
            let (n, _) = differ_and_max(&got.narrow(0, i, 1).unwrap(), &want);
            assert_eq!(n, 0, "segment {i}");
        }
    }

    #[test]
    fn views_past_the_storage_are_refused() {
        let x = randn(&[1, 2, 8, 64], 0.0, 1.0, DType::BF16);
        let dims = Dims {
            batch: 1,
            heads: 2,
            kv_heads: 2,
            queries: 9, // one token more than there is
            keys: 8,
            head_dim: 64,
        };
        let view = (&x, View::of(&x).unwrap());
        assert!(flash_attention(view, view, view, dims, false, 1.0).is_err());
        let bad_dim = Dims {
            head_dim: 32,
            queries: 8,
            ..dims
        };
        assert!(flash_attention(view, view, view, bad_dim, false, 1.0).is_err());
    }
}

/// On a card (run by bench/gpu/device.sh with LOGIT_LENS_FUSED=none, so that the reference is op
/// by op): the kernel against op-by-op attention at the models' shapes, and what each costs.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::super::test_util::{differ_and_max, AttentionCase, ATTENTION_CASES};
    use super::*;
    use crate::models::fused::{self, Kernel};
    use crate::models::profile::on_a_card::{gpu, per_call};

    #[test]
    fn flash_attention_equals_op_by_op_on_the_gpu() {
        let Some(gpu) = gpu() else { return };
        assert!(
            !fused::enabled(Kernel::Flash),
            "run with LOGIT_LENS_FUSED=none: the op-by-op reference would be flash too"
        );
        let mut failures = Vec::new();
        for dtype in [DType::BF16, DType::F16] {
            // The kernel's head dims only (SigLIP's 72 is cuDNN's).
            for (name, b, hq, hkv, s, d, causal) in
                ATTENTION_CASES.into_iter().filter(|c| fits(c.5, dtype))
            {
                let case = AttentionCase::new(&gpu, dtype, (b, hq, hkv, s, d, causal));
                let (q, k, v, mask, scale) = (&case.q, &case.k, &case.v, &case.mask, case.scale);
                let op_by_op = || case.op_by_op();
                let (dims, views) = case.dims_and_views();
                let flash = || {
                    flash_attention(
                        (q, views[0]),
                        (k, views[1]),
                        (v, views[2]),
                        dims,
                        causal,
                        scale,
                    )
                    .unwrap()
                };
                let want = op_by_op();
                let got = flash().transpose(1, 2).unwrap();
                let (differ, max) = differ_and_max(&got, &want);
                let top = AttentionCase::top(&want);
                let total = want.elem_count();
                // The path served before flash: the scores GEMM, the fused softmax, probs·v.
                let rep = hq / hkv;
                let fused_softmax = || {
                    let g = b * hkv;
                    let q = q.contiguous().unwrap().reshape((g, rep * s, d)).unwrap();
                    let k = k.contiguous().unwrap().reshape((g, s, d)).unwrap();
                    let v = v.contiguous().unwrap().reshape((g, s, d)).unwrap();
                    let scores = q
                        .matmul(&k.t().unwrap())
                        .unwrap()
                        .reshape((g, rep, s, s))
                        .unwrap();
                    let p = fused::softmax::scaled_masked_softmax(&scores, mask.as_ref(), scale)
                        .unwrap();
                    p.reshape((g, rep * s, s)).unwrap().matmul(&v).unwrap()
                };
                let (t_op, t_soft, t_flash) = (
                    per_call(&gpu, 20, &op_by_op).1,
                    per_call(&gpu, 20, &fused_softmax).1,
                    per_call(&gpu, 20, &flash).1,
                );
                eprintln!(
                    "flash {dtype:?} {name:28} {differ:>8}/{total} differ, max {max:.2e} (of {top:.2}); \
                     µs per call: op by op {t_op:.0}, fused softmax {t_soft:.0}, flash {t_flash:.0}"
                );
                if differ * 20 > total || max > top / 64.0 {
                    failures.push(format!(
                        "{dtype:?} {name}: {differ}/{total} differ, max {max}"
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
