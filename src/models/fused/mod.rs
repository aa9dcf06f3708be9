//! Fused GPU kernels for the half-precision forward pass: each computes in ONE launch what
//! [`super::layers`]' op-by-op path computes with a chain of candle ops (one kernel each), with the same
//! roundings in the same order (transformers' order, ../shared/docs/MODELS.md §6). On a GPU the
//! op-by-op path is bound by per-op host overhead (~3700 launches per Qwen2-VL forward).
//!
//! Each kernel is a candle custom op: `cuda_fwd` launches the PTX kernel (`kernels.cu`,
//! compiled by build.rs; attention's softmax: `softmax.rs` and `attention.cu`), `cpu_fwd` is its CPU twin, the
//! same arithmetic in Rust, which the tests hold bit for bit to the op-by-op path on the CPU.
//!
//! Reductions (LayerNorm's mean and variance, RMSNorm's mean square) are where the twin and the
//! kernel part: a float sum depends on its order, so each follows its own device's candle sum.
//! The twin sums as candle's CPU `sum_keepdim` does (candle's own `VecOps::vec_reduce_sum`); the
//! kernel as candle's CUDA `fast_sum` does (blockDim = min(1024, n) rounded up to a power of two,
//! strided per-thread sums, then a shared-memory tree; n ≤ 32: one thread, left to right). So each
//! equals the op-by-op path on its own device bit for bit (on the GPU: to be confirmed on a card).
//!
//! On by default (measured on an H100, bench/README.md: the Qwen2-VL-2B forward's block groups 114 →
//! 40 ms, within 1–2 ulp of the op-by-op path where they differ at all, and as close to transformers
//! in f32 as transformers' own half path); [`enabled`] reads the switch `LOGIT_LENS_FUSED` once:
//! unset: `all`; `all` (the measured kernels), or a comma list of
//! `softmax,layernorm,rmsnorm,rope,act,flash,warp-softmax,cudnn-attention` (`all,flash` adds flash
//! attention, `all,warp-softmax` the softmax kernel with a warp per row, `all,cudnn-attention`
//! cuDNN's fused attention in a binary built with the `cudnn` feature; none measured faster on a
//! card yet); empty, `0` or `none`: off (the op-by-op path). `LOGIT_LENS_FUSED_SOFTMAX=1` (the older
//! switch) adds `softmax`.

mod act;
pub mod cudnn;
pub mod flash;
mod norm;
mod rope;
pub mod softmax;

use std::sync::OnceLock;

use candle_core::{DType, Layout, Tensor};

pub use act::{activation, activation_mul};
pub use norm::{layer_norm, rms_norm};
pub use rope::{fits as rope_fits, rope, rope_in_f32};

/// The fused kernels the switch names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// attention's `softmax(scores · scale + mask)` (softmax.rs)
    Softmax,
    LayerNorm,
    RmsNorm,
    /// half-precision rotary embedding, with half or f32 tables
    Rope,
    /// activations, and the decoder MLP's `act(gate) · up`
    Act,
    /// attention without materialising the scores (flash.rs); not in `all` until measured
    Flash,
    /// the softmax kernel with one warp per row instead of one block (attention.cu); not in `all`
    /// until measured
    WarpSoftmax,
    /// attention by cuDNN's fused SDPA (cudnn.rs, the `cudnn` feature), where flash attention
    /// would run, before it; not in `all` until measured
    CudnnAttention,
}

impl Kernel {
    /// Every kernel the switch can name.
    pub const ALL: [Kernel; 8] = [
        Kernel::Softmax,
        Kernel::LayerNorm,
        Kernel::RmsNorm,
        Kernel::Rope,
        Kernel::Act,
        Kernel::Flash,
        Kernel::WarpSoftmax,
        Kernel::CudnnAttention,
    ];

    /// `all`, the default: the kernels measured on a card (bench/README.md).
    pub const MEASURED: [Kernel; 5] = [
        Kernel::Softmax,
        Kernel::LayerNorm,
        Kernel::RmsNorm,
        Kernel::Rope,
        Kernel::Act,
    ];

    /// Its name in `LOGIT_LENS_FUSED`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Softmax => "softmax",
            Kernel::LayerNorm => "layernorm",
            Kernel::RmsNorm => "rmsnorm",
            Kernel::Rope => "rope",
            Kernel::Act => "act",
            Kernel::Flash => "flash",
            Kernel::WarpSoftmax => "warp-softmax",
            Kernel::CudnnAttention => "cudnn-attention",
        }
    }
}

/// Which kernels are on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Switch(u8);

impl Switch {
    /// The measured kernels (`all`, and the default).
    pub fn all() -> Self {
        Kernel::MEASURED.into_iter().fold(Switch(0), Switch::with)
    }

    pub fn with(self, k: Kernel) -> Self {
        Switch(self.0 | 1 << k as u8)
    }

    pub fn has(self, k: Kernel) -> bool {
        self.0 & (1 << k as u8) != 0
    }

    /// `fused`: `LOGIT_LENS_FUSED`'s value (unset: every kernel); `softmax_alias`:
    /// `LOGIT_LENS_FUSED_SOFTMAX`'s. Returns the switch and the names it did not know (ignored).
    /// Names are case-insensitive; blanks around them and empty list items are ignored.
    pub fn parse(fused: Option<&str>, softmax_alias: Option<&str>) -> (Self, Vec<String>) {
        let Some(fused) = fused else {
            return (Switch::all(), Vec::new());
        };
        let mut on = Switch(0);
        let mut unknown = Vec::new();
        for item in fused.split(',') {
            let item = item.trim().to_ascii_lowercase();
            match item.as_str() {
                "" | "0" | "none" => {}
                "all" => on = Switch::all(),
                name => match Kernel::ALL.into_iter().find(|k| k.name() == name) {
                    Some(k) => on = on.with(k),
                    None => unknown.push(item),
                },
            }
        }
        if softmax_alias.is_some_and(|v| !v.is_empty() && v != "0") {
            on = on.with(Kernel::Softmax);
        }
        (on, unknown)
    }
}

/// Whether `LOGIT_LENS_FUSED` (or the `LOGIT_LENS_FUSED_SOFTMAX` alias) turns kernel `k` on. Read
/// once; unknown names are reported once on stderr and ignored.
pub fn enabled(k: Kernel) -> bool {
    static ON: OnceLock<Switch> = OnceLock::new();
    ON.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok();
        let (on, unknown) = Switch::parse(
            var("LOGIT_LENS_FUSED").as_deref(),
            var("LOGIT_LENS_FUSED_SOFTMAX").as_deref(),
        );
        if !unknown.is_empty() {
            let known: Vec<_> = Kernel::ALL.iter().map(|k| k.name()).collect();
            eprintln!(
                "warning: LOGIT_LENS_FUSED: unknown kernel name(s) {} ignored (known: all, none, {})",
                unknown.join(", "),
                known.join(", ")
            );
        }
        on
    })
    .has(k)
}

/// The kernels the switch turns on, for a log line: `softmax, layernorm, …` or `none (op by op)`.
pub fn describe() -> String {
    let on: Vec<_> = Kernel::ALL
        .into_iter()
        .filter(|&k| enabled(k))
        .map(Kernel::name)
        .collect();
    if on.is_empty() {
        "none (op by op)".into()
    } else {
        on.join(", ")
    }
}

/// Whether a half-precision op on `x` goes to fused kernel `k`: `x` on a GPU, bf16 or f16, and the
/// switch names `k`. (The CPU and f32 paths never change.)
pub fn applies(x: &Tensor, k: Kernel) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16) && enabled(k)
}

/// A contiguous layout's elements of `v`.
fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("fused {what}: non-contiguous input")))?;
    Ok(&v[start..end])
}

/// The PTX of src/models/fused/kernels.cu and how to launch it.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    /// kernels.cu, loaded once per device as module `MODULE` (`dev.get_or_load_custom_func(kernel,
    /// MODULE, PTX)`).
    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    pub const MODULE: &str = "logit_lens_fused";

    /// One block per row, as many threads as candle's CUDA `fast_sum` uses for a row of `n`
    /// (the kernel sums in its order): min(1024, n) rounded up to a power of two, at least 32.
    pub fn per_row(rows: usize, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (n.clamp(32, 1024).next_power_of_two() as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One thread per element of `n`.
    pub fn per_element(n: usize) -> LaunchConfig {
        const THREADS: usize = 256;
        LaunchConfig {
            grid_dim: (n.div_ceil(THREADS).max(1) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Half-precision conversions of the twins: `to` exact, `from` round-to-nearest-even (as
/// `__float2bfloat16` / `__float2half` in the kernels).
trait Half: Copy {
    fn to(self) -> f32;
    fn from(v: f32) -> Self;
}

impl Half for half::bf16 {
    fn to(self) -> f32 {
        self.to_f32()
    }
    fn from(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// f32 itself: the CPU rope with f32 tables ([`rope::rope_in_f32`]) takes f32 too.
impl Half for f32 {
    fn to(self) -> f32 {
        self
    }
    fn from(v: f32) -> Self {
        v
    }
}

impl Half for half::f16 {
    fn to(self) -> f32 {
        self.to_f32()
    }
    fn from(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_names_kernels_or_all() {
        let p = |f: Option<&str>, s: Option<&str>| Switch::parse(f, s);
        // Unset: every kernel (the default on a GPU); set to nothing, 0 or none: off.
        assert_eq!(p(None, None), (Switch::all(), vec![]));
        assert_eq!(p(None, Some("0")), (Switch::all(), vec![]));
        for off in [Some(""), Some("0"), Some("none"), Some(" , ")] {
            assert_eq!(p(off, None), (Switch(0), vec![]), "{off:?}");
        }
        let (all, unknown) = p(Some("all"), None);
        assert!(unknown.is_empty());
        assert!(Kernel::MEASURED.iter().all(|&k| all.has(k)));
        // Flash attention, the warp softmax and cuDNN's attention only by name, until measured.
        assert!(
            !all.has(Kernel::Flash)
                && !all.has(Kernel::WarpSoftmax)
                && !all.has(Kernel::CudnnAttention)
        );
        assert!(p(Some("all, flash"), None).0.has(Kernel::Flash));
        assert!(p(Some("all,warp-softmax"), None).0.has(Kernel::WarpSoftmax));
        let cudnn = p(Some("all,cudnn-attention"), None).0;
        assert!(cudnn.has(Kernel::CudnnAttention) && !cudnn.has(Kernel::Flash));
        let (s, unknown) = p(Some(" LayerNorm, rope,,bogus "), None);
        assert_eq!(unknown, vec!["bogus".to_string()]);
        for k in Kernel::ALL {
            assert_eq!(
                s.has(k),
                matches!(k, Kernel::LayerNorm | Kernel::Rope),
                "{k:?}"
            );
        }
        // Every name parses to its kernel alone.
        for k in Kernel::ALL {
            assert_eq!(p(Some(k.name()), None), (Switch(0).with(k), vec![]));
        }
        // The older switch still turns the softmax on, alone or with others.
        assert_eq!(
            p(Some("none"), Some("1")).0,
            Switch(0).with(Kernel::Softmax)
        );
        assert_eq!(p(Some("none"), Some("0")).0, Switch(0));
        assert_eq!(p(Some("none"), Some("")).0, Switch(0));
        assert_eq!(
            p(Some("act"), Some("1")).0,
            Switch(0).with(Kernel::Act).with(Kernel::Softmax)
        );
        assert_eq!(p(Some("all,none"), None).0, Switch::all());
    }
}

/// Shared by the twins' tests: random half-precision data and bitwise comparison.
#[cfg(test)]
mod test_util {
    use candle_core::{DType, Device, Tensor};

    /// `shape` values `mean + spread · N(0, 1)`, rounded to `dtype`.
    pub fn randn(shape: &[usize], mean: f32, spread: f32, dtype: DType) -> Tensor {
        Tensor::randn(mean, spread, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The number of elements whose bits differ (−0 and +0 differ; the shapes must agree).
    pub fn bits_differ(a: &Tensor, b: &Tensor) -> usize {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.dtype(), b.dtype());
        let v = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        v(a).iter().zip(v(b)).filter(|(x, y)| **x != *y).count()
    }

    /// `t`'s values in f32, on the CPU, flattened.
    pub fn f32s(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// How many elements differ and the largest difference, in f32 (any device, one shape).
    pub fn differ_and_max(a: &Tensor, b: &Tensor) -> (usize, f32) {
        assert_eq!(a.dims(), b.dims());
        f32s(a)
            .iter()
            .zip(f32s(b))
            .filter(|(x, y)| **x != *y)
            .fold((0, 0f32), |(n, m), (x, y)| (n + 1, m.max((x - y).abs())))
    }

    /// The attention problems of the models, for the GPU tests of the fused attentions: name,
    /// batch, heads, kv heads, tokens, head dim, causal.
    #[cfg(feature = "cuda")]
    pub const ATTENTION_CASES: [(&str, usize, usize, usize, usize, usize, bool); 7] = [
        ("qwen2-vl vision 640x480", 1, 16, 16, 1196, 80, false),
        ("qwen2-vl vision, 7 images", 7, 16, 16, 1196, 80, false),
        ("clip vit-l/14-336", 1, 16, 16, 577, 64, false),
        ("siglip so400m (onevision)", 5, 16, 16, 729, 72, false),
        ("qwen2-vl decoder", 1, 12, 2, 418, 128, true),
        ("llava decoder, batch 2", 2, 32, 32, 595, 128, true),
        ("ragged", 1, 2, 1, 37, 64, true),
    ];

    /// One attention problem on `device`: q, k and v as strided per-head views of a packed q/k/v
    /// projection (`[b, s, hq + 2·hkv, d]`, as the models leave it), and eager attention's output
    /// `[b, hq, s, d]` op by op (the reference; run with LOGIT_LENS_FUSED=none).
    #[cfg(feature = "cuda")]
    pub struct AttentionCase {
        pub q: Tensor,
        pub k: Tensor,
        pub v: Tensor,
        pub mask: Option<Tensor>,
        pub scale: f64,
    }

    #[cfg(feature = "cuda")]
    impl AttentionCase {
        pub fn new(
            device: &Device,
            dtype: DType,
            (b, hq, hkv, s, d, causal): (usize, usize, usize, usize, usize, bool),
        ) -> Self {
            let packed = Tensor::randn(0f32, 1.0, (b, s, hq + 2 * hkv, d), device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let heads = packed.transpose(1, 2).unwrap();
            AttentionCase {
                q: heads.narrow(1, 0, hq).unwrap(),
                k: heads.narrow(1, hq, hkv).unwrap(),
                v: heads.narrow(1, hq + hkv, hkv).unwrap(),
                mask: causal.then(|| crate::models::layers::causal_mask(s, dtype, device).unwrap()),
                scale: (d as f64).powf(-0.5),
            }
        }

        pub fn op_by_op(&self) -> Tensor {
            crate::models::layers::attention_within(
                &self.q,
                &self.k,
                &self.v,
                self.mask.as_ref(),
                self.scale,
                crate::models::layers::ATTENTION_SCORES_BUDGET,
            )
            .unwrap()
        }

        /// The problem's shape and the operands' views, as the fused attentions take them.
        pub fn dims_and_views(&self) -> (super::flash::Dims, [super::flash::View; 3]) {
            let (b, hq, s, d) = self.q.dims4().unwrap();
            let dims = super::flash::Dims {
                batch: b,
                heads: hq,
                kv_heads: self.k.dim(1).unwrap(),
                queries: s,
                keys: self.k.dim(2).unwrap(),
                head_dim: d,
            };
            let view = |t: &Tensor| super::flash::View::of(t).unwrap();
            (dims, [view(&self.q), view(&self.k), view(&self.v)])
        }

        /// The largest |value| of `t`, the scale the differences are judged at.
        pub fn top(t: &Tensor) -> f32 {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        }
    }
}

/// On a GPU (`LOGIT_LENS_FUSED=none cargo test --release --features cuda --lib fused --
/// --nocapture`; bench/gpu/device.sh runs it): every kernel against candle's op-by-op path on the
/// same GPU, and against its CPU twin. Skipped (passes) where no CUDA device opens.
///
/// The bounds (`check` below) are in ulps at the data's scale: the norms differ from candle's CUDA
/// reductions by the order of f32 sums; `rope_in_f32` is held to its CPU twin, since candle's CUDA
/// f32 rope lets nvcc fuse `x1·c − x2·s` into a multiply-add where torch rounds each product; the
/// activations' twins are not compared (CUDA's exp/erf/tanh against Rust's).
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::test_util::f32s;
    use super::*;
    use crate::models::layers::{self, Activation, LayerNorm, RmsNorm};
    use candle_core::Device;

    /// Half-precision bits as ordered integers (adjacent values differ by 1).
    fn ordered(v: f32, dtype: DType) -> i32 {
        let bits = match dtype {
            DType::BF16 => half::bf16::from_f32(v).to_bits(),
            _ => half::f16::from_f32(v).to_bits(),
        } as i32;
        if bits & 0x8000 != 0 {
            -(bits & 0x7fff)
        } else {
            bits
        }
    }

    /// (elements that differ, largest difference in ulps of the values, largest difference in
    /// ulps at the scale of the data: of `max(|b|, 1)`). Near zero a value's own ulp is tiny, so a
    /// difference of a few ulps of 1 after a cancellation (LayerNorm of large means, rotary
    /// x·cos − y·sin) reads as dozens of its own ulps; the second measure is the one to bound.
    fn compare(a: &Tensor, b: &Tensor) -> (usize, i32, i32) {
        assert_eq!(a.dims(), b.dims());
        let dtype = a.dtype();
        let eps = match dtype {
            DType::BF16 => f32::powi(2.0, -7),
            _ => f32::powi(2.0, -10),
        };
        let (mut differ, mut ulps, mut scaled) = (0, 0, 0);
        for (x, y) in f32s(a).into_iter().zip(f32s(b)) {
            let d = (ordered(x, dtype) - ordered(y, dtype)).abs();
            differ += usize::from(d != 0);
            ulps = ulps.max(d);
            let unit = eps * f32::powi(2.0, y.abs().max(1.0).log2().floor() as i32);
            scaled = scaled.max(((x - y).abs() / unit).ceil() as i32);
        }
        (differ, ulps, scaled)
    }

    fn rand(shape: &[usize], mean: f32, spread: f32, dtype: DType, dev: &Device) -> Tensor {
        Tensor::randn(mean, spread, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(dev)
            .unwrap()
    }

    #[test]
    fn fused_kernels_equal_the_op_by_op_path_on_the_gpu() {
        let Some(gpu) = crate::models::profile::on_a_card::gpu() else {
            return;
        };
        assert!(
            Kernel::ALL.iter().all(|&k| !enabled(k)),
            "run with LOGIT_LENS_FUSED=none: the op-by-op reference would be fused too"
        );
        let cpu = Device::Cpu;
        let mut failures = Vec::new();
        // name, GPU fused, GPU op by op, CPU twin, ulps allowed against the GPU op by op and
        // against the CPU twin (None: not compared), in ulps at the data's scale (`compare`).
        // Measured on an H100 (h100-run4 to 6): the norms differ from candle's GPU reductions on
        // under 0.01 % of outputs (the order of f32 sums; up to 8 ulps of the value itself where
        // it is near zero); the op-by-op f32 rotary is candle's kernel, whose multiply-adds nvcc
        // fuses (torch and the twin round each product), so there the twin is the reference;
        // GELU's erf differs between candle's CPU and CUDA builds: its twin is not compared.
        let mut check = |name: String,
                         fused: Tensor,
                         op: Tensor,
                         twin: Tensor,
                         allowed: i32,
                         allowed_twin: Option<i32>| {
            let (n_op, u_op, s_op) = compare(&fused, &op);
            let (n_twin, u_twin, s_twin) = compare(&fused, &twin);
            let total = fused.elem_count();
            eprintln!(
                "{name:44} vs op-by-op: {n_op:>8}/{total} differ (max {u_op} ulp, {s_op} at scale); \
                 vs CPU twin: {n_twin:>8} differ (max {u_twin} ulp, {s_twin} at scale)"
            );
            if s_op > allowed {
                failures.push(format!("{name}: {n_op} differ, max {s_op} ulp at scale"));
            }
            if allowed_twin.is_some_and(|a| s_twin > a) {
                failures.push(format!(
                    "{name}: {n_twin} differ from the twin, max {s_twin} ulp at scale"
                ));
            }
        };
        let on = |t: &Tensor, d: &Device| t.to_device(d).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            // LayerNorm: ViT widths, large means.
            for (rows, n, mean) in [(4096, 1280, 0.0), (577, 1024, 30.0), (729, 1152, -200.0)] {
                let x = rand(&[rows, n], mean, 2.0, dtype, &gpu);
                let ln = LayerNorm {
                    weight: rand(&[n], 1.0, 0.3, DType::F32, &gpu),
                    bias: rand(&[n], 0.0, 0.5, DType::F32, &gpu),
                    eps: 1e-6,
                };
                let fused = layer_norm(&x, &ln.weight, &ln.bias, ln.eps).unwrap();
                let op = ln.forward(&x).unwrap();
                let twin = layer_norm(
                    &on(&x, &cpu),
                    &on(&ln.weight, &cpu),
                    &on(&ln.bias, &cpu),
                    1e-6,
                )
                .unwrap();
                check(
                    format!("layernorm {dtype:?} [{rows}, {n}]"),
                    fused,
                    op,
                    twin,
                    2,
                    None,
                );
            }
            // RMSNorm: decoder widths.
            for (rows, n) in [(1000, 1536), (300, 896), (64, 4096), (50, 20)] {
                let x = rand(&[1, rows, n], 0.0, 1.5, dtype, &gpu);
                let norm = RmsNorm {
                    weight: rand(&[n], 1.0, 0.5, dtype, &gpu),
                    eps: 1e-6,
                };
                let fused = rms_norm(&x, &norm.weight, norm.eps).unwrap();
                let op = norm.forward(&x).unwrap();
                let twin = rms_norm(&on(&x, &cpu), &on(&norm.weight, &cpu), 1e-6).unwrap();
                check(
                    format!("rmsnorm {dtype:?} [{rows}, {n}]"),
                    fused,
                    op,
                    twin,
                    2,
                    None,
                );
            }
            // Activations and act·mul.
            for act in [
                Activation::QuickGelu,
                Activation::Gelu,
                Activation::GeluTanh,
                Activation::Silu,
            ] {
                let x = rand(&[1000, 5120], 0.0, 3.0, dtype, &gpu);
                let fused = activation(&x, act).unwrap();
                let op = act.forward(&x).unwrap();
                let twin = activation(&on(&x, &cpu), act).unwrap();
                check(format!("act {act:?} {dtype:?}"), fused, op, twin, 0, None);
                let up = rand(&[1000, 5120], 0.0, 1.0, dtype, &gpu);
                let fused = activation_mul(&x, &up, act).unwrap();
                let op = (act.forward(&x).unwrap() * &up).unwrap();
                let twin = activation_mul(&on(&x, &cpu), &on(&up, &cpu), act).unwrap();
                check(
                    format!("act·mul {act:?} {dtype:?}"),
                    fused,
                    op,
                    twin,
                    0,
                    None,
                );
            }
            // Rope with half tables: the decoder's q and k heads, a view of the qkv heads.
            let (b, nh, nkv, s, hd) = (1, 12, 2, 1000, 128);
            let heads = rand(&[b, nh + 2 * nkv, s, hd], 0.0, 2.0, dtype, &gpu);
            let x = heads.narrow(1, 0, nh + nkv).unwrap();
            let inv = layers::inv_freq(1e6, hd);
            let angles: Vec<f32> = (0..s)
                .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
                .collect();
            let a = Tensor::from_vec(angles, (s, hd / 2), &gpu).unwrap();
            let (c, sn) = (a.cos().unwrap(), a.sin().unwrap());
            let (ch, sh) = (c.to_dtype(dtype).unwrap(), sn.to_dtype(dtype).unwrap());
            let fused = rope(&x, &ch, &sh).unwrap();
            let op = layers::rope(&x, &ch, &sh).unwrap();
            let twin = rope(&on(&x, &cpu), &on(&ch, &cpu), &on(&sh, &cpu)).unwrap();
            check(
                format!("rope {dtype:?} {:?}", x.dims()),
                fused,
                op,
                twin,
                0,
                Some(0),
            );
            // Rope with f32 tables: Qwen2-VL's vision q, a view of the packed qkv.
            let (n, vh, vd) = (4096, 16, 80);
            let qkv = rand(&[n, 3 * vh * vd], 0.0, 3.0, dtype, &gpu)
                .reshape((n, 3, vh, vd))
                .unwrap()
                .permute((1, 2, 0, 3))
                .unwrap();
            let x = qkv.narrow(0, 0, 1).unwrap();
            let inv = layers::inv_freq(10000.0, vd);
            let angles: Vec<f32> = (0..n)
                .flat_map(|p| inv.iter().map(move |f| (p % 64) as f32 * f))
                .collect();
            let a = Tensor::from_vec(angles, (n, vd / 2), &gpu).unwrap();
            let (c, sn) = (a.cos().unwrap(), a.sin().unwrap());
            let fused = rope_in_f32(&x, &c, &sn).unwrap();
            let op = layers::rope_in_f32(&x, &c, &sn).unwrap();
            let twin = rope_in_f32(&on(&x, &cpu), &on(&c, &cpu), &on(&sn, &cpu)).unwrap();
            check(
                format!("rope_in_f32 {dtype:?} {:?}", x.dims()),
                fused,
                op,
                twin,
                2,
                Some(0),
            );
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
