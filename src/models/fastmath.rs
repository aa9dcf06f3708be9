//! The CPU path's element-wise kernels: a branch-free `exp` the compiler vectorises (AVX-512, or
//! AVX2 + FMA, where the CPU has them), used by the lens's vocabulary reduction, the attention
//! softmax and the activations, each in one pass over its values.

use rayon::prelude::*;

/// Cody–Waite range reduction plus a degree-6 polynomial; relative error ~2 ulp for x ≤ 0
/// (torch's vectorised exp is ~1 ulp), exact 0 below −87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2²³: adding it rounds x·log₂e to an integer n and leaves n in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT; // round to nearest
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2ⁿ from t's bits (n + 127 in the exponent field): integer ops only, so the loops that call
    // this vectorise (`n as i32` is a saturating conversion, which compiles to scalar code).
    let bits = t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// [`exp`] over the whole range an activation feeds it: +∞ from 88.4 on (f32 overflows at 88.72;
/// `1 / (1 + e^x)` is then below f32's normal range either way, and `x / (1 + e^x)` is 0 as in
/// torch).
#[inline(always)]
fn exp_any(x: f32) -> f32 {
    // 89 · log₂e rounds to 2¹²⁸: the exponent field all ones, +∞.
    exp(x.min(89.0))
}

/// An element-wise f32 function, applied in one vectorised pass ([`map`], [`map_mul`]).
pub trait Unary {
    fn f(x: f32) -> f32;
}

/// `1 / (1 + e^−x)`, as torch's vectorised CPU sigmoid.
pub struct Sigmoid;
impl Unary for Sigmoid {
    #[inline(always)]
    fn f(x: f32) -> f32 {
        1.0 / (1.0 + exp_any(-x))
    }
}

/// `x / (1 + e^−x)`, as torch's vectorised CPU SiLU.
pub struct Silu;
impl Unary for Silu {
    #[inline(always)]
    fn f(x: f32) -> f32 {
        x / (1.0 + exp_any(-x))
    }
}

/// transformers' `QuickGELUActivation`: `x · sigmoid(1.702 x)`, each op rounded in f32.
pub struct QuickGelu;
impl Unary for QuickGelu {
    #[inline(always)]
    fn f(x: f32) -> f32 {
        x * Sigmoid::f(x * 1.702)
    }
}

/// torch's `gelu(approximate="tanh")`: `½x(1 + tanh(u))`, `u = √(2/π)(x + 0.044715x³)`, computed
/// as `x · sigmoid(2u)` (the same function: `1 + tanh(u) = 2 sigmoid(2u)`), which keeps its
/// relative accuracy where `1 + tanh(u)` is small.
pub struct GeluTanh;
impl Unary for GeluTanh {
    #[inline(always)]
    fn f(x: f32) -> f32 {
        const BETA: f32 = 0.797_884_6; // √(2/π)
        let u = BETA * (x + 0.044_715 * (x * x * x));
        x * Sigmoid::f(2.0 * u)
    }
}

/// Runs `body` compiled for the best vector extension this CPU has (AVX-512, AVX2 + FMA, or the
/// baseline): `body` is inlined into each variant.
#[inline(always)]
pub(crate) fn vectorised(body: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(body: impl FnOnce()) {
            body()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(body: impl FnOnce()) {
            body()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected on this CPU.
            return unsafe { avx512(body) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { avx2(body) };
        }
    }
    body()
}

/// Values per parallel task of the element-wise passes.
const CHUNK: usize = 1 << 16;

/// `U` over `x`, in parallel chunks.
pub fn map<U: Unary>(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    x.par_chunks(CHUNK)
        .zip(out.par_chunks_mut(CHUNK))
        .for_each(|(x, out)| {
            vectorised(
                #[inline(always)]
                || {
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = U::f(v);
                    }
                },
            )
        });
    out
}

/// `U(a) · b` (a gated MLP's `act(gate) · up`), the two ops' roundings kept, in one pass.
pub fn map_mul<U: Unary>(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    let mut out = vec![0f32; a.len()];
    a.par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .zip(out.par_chunks_mut(CHUNK))
        .for_each(|((a, b), out)| {
            vectorised(
                #[inline(always)]
                || {
                    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                        *o = U::f(x) * y;
                    }
                },
            )
        });
    out
}

/// LayerNorm over rows of `dim` values (`x.len()` a multiple of it): `(x − mean) / sqrt(var + eps)
/// · weight + bias`, the variance taken over the centred values (two-pass, stable, as the op-by-op
/// path in `layers::LayerNorm` computes it), each row's two sums in f64, every element-wise step in
/// f32 in the order above. One pass per sum and one to write, rows split across threads; the
/// op-by-op path took eight passes and their allocations.
pub fn layer_norm(x: &[f32], dim: usize, weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    assert!(weight.len() == dim && bias.len() == dim && x.len().is_multiple_of(dim.max(1)));
    let mut out = vec![0f32; x.len()];
    if dim == 0 {
        return out;
    }
    let rows_per_chunk = (CHUNK / dim).max(1);
    x.par_chunks(rows_per_chunk * dim)
        .zip(out.par_chunks_mut(rows_per_chunk * dim))
        .for_each(|(x, out)| {
            vectorised(
                #[inline(always)]
                || {
                    for (x, out) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
                        let mean = (sum_f64(x, |v| v) / dim as f64) as f32;
                        let var = (sum_f64(x, |v| (v - mean) * (v - mean)) / dim as f64) as f32;
                        let d = (var + eps).sqrt();
                        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
                            *o = (v - mean) / d * w + b;
                        }
                    }
                },
            )
        });
    out
}

/// `Σ f(x)` with the terms (f32) summed in f64, eight lanes wide.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]) as f64;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&v| f(v) as f64).sum::<f64>()
}

/// One row's softmax in place, as torch's vectorised CPU softmax computes it: the max, then
/// `e^(x − max)` and their sum, then each times `1 / sum`.
#[inline(always)]
fn softmax_row_in_place(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        // A fully masked row: torch gives NaN (0/0); keep it.
        row.fill(f32::NAN);
        return;
    }
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp(c[i] - m);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - m);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `softmax(x · scale + mask)` over rows of `n` values (`x.len()` a multiple of `n`), as
/// transformers' eager attention computes it in f32 (the product rounded, then the sum, then the
/// softmax), rows split across threads. `mask`: `k` rows of `n` (additive, 0 or −∞), row `r` of
/// `x` taking mask row `r mod k`.
pub fn scaled_softmax_rows(x: &[f32], n: usize, scale: f32, mask: Option<&[f32]>) -> Vec<f32> {
    let mut out = x.to_vec();
    if n == 0 {
        return out;
    }
    // Chunks of whole rows, about 64k values each.
    let rows_per_chunk = (CHUNK / n).max(1);
    out.par_chunks_mut(rows_per_chunk * n)
        .enumerate()
        .for_each(|(c, rows)| scaled_softmax_in_place(rows, n, scale, mask, c * rows_per_chunk));
    out
}

/// [`scaled_softmax_rows`] in place on this thread, over rows whose first is row `first` of the
/// whole (for the mask's rows), in one pass over each row while it is in cache.
pub fn scaled_softmax_in_place(
    rows: &mut [f32],
    n: usize,
    scale: f32,
    mask: Option<&[f32]>,
    first: usize,
) {
    if n == 0 {
        return;
    }
    let mask_rows = mask.map_or(1, |m| (m.len() / n).max(1));
    vectorised(
        #[inline(always)]
        || {
            for (i, row) in rows.chunks_exact_mut(n).enumerate() {
                match mask {
                    Some(m) => {
                        let mr = &m[((first + i) % mask_rows) * n..][..n];
                        for (v, &a) in row.iter_mut().zip(mr) {
                            *v = *v * scale + a;
                        }
                    }
                    None => {
                        for v in row.iter_mut() {
                            *v *= scale;
                        }
                    }
                }
                softmax_row_in_place(row);
            }
        },
    )
}

/// The values of `t` (of element type `E`, on the CPU), without a copy where it is contiguous.
pub fn with_cpu<E: candle_core::WithDType, R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[E]) -> R,
) -> crate::Result<R> {
    if !t.device().is_cpu() || t.dtype() != E::DTYPE {
        return Err(crate::Error::Internal(format!(
            "a {:?} tensor on {:?}, not {:?} on the CPU",
            t.dtype(),
            t.device(),
            E::DTYPE
        )));
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets())
    else {
        return Err(crate::Error::Internal(
            "a tensor without CPU storage".into(),
        ));
    };
    Ok(f(&cpu.as_slice::<E>()?[a..b]))
}

/// Sets this thread's SSE control register to flush subnormal results to zero (FTZ) and read
/// subnormal inputs as zero (DAZ), as MKL-backed torch effectively runs. No-op off x86-64.
pub fn flush_subnormals_here() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: MXCSR bits 15 (FTZ) and 6 (DAZ) only change how subnormals are handled; every
    // x86-64 CPU has SSE2 and DAZ (the Pentium 4's later steppings onwards).
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | (1 << 15) | (1 << 6));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_the_range_used() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x <= 0.0 {
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), 0.0f32.max(exp(-87.0)));
    }

    /// LayerNorm against its f64 definition on rows whose mean is large against their spread (as
    /// deep in a ViT, where E[x²] − E[x]² would lose the digits), widths off the lanes, and a
    /// constant row (variance 0: `bias` exactly).
    #[test]
    fn layer_norm_matches_its_f64_definition() {
        let mut s = 3u64;
        let mut r = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for dim in [1, 7, 80, 1283] {
            let rows = 300;
            let mut x: Vec<f32> = (0..rows * dim).map(|_| 500.0 + r() * 0.5).collect();
            x[..dim].fill(3.0);
            let w: Vec<f32> = (0..dim).map(|_| 1.0 + r()).collect();
            let b: Vec<f32> = (0..dim).map(|_| r()).collect();
            let eps = 1e-6;
            let y = layer_norm(&x, dim, &w, &b, eps);
            for (row, (x, y)) in x.chunks(dim).zip(y.chunks(dim)).enumerate() {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                for k in 0..dim {
                    let z = (x[k] as f64 - mean) / (var + eps as f64).sqrt();
                    let want = z * w[k] as f64 + b[k] as f64;
                    // The quotient, product and sum each round once; the mean's rounding to f32
                    // (2⁻²⁴ of it) reaches the output divided by σ.
                    let tol = 4e-7 * (z.abs() + 1.0) * (w[k].abs() as f64 + 1.0)
                        + 1.2e-7 * mean.abs() / var.sqrt().max(1e-30) * w[k].abs() as f64;
                    assert!(
                        (y[k] as f64 - want).abs() <= tol,
                        "dim {dim}, row {row}, [{k}]: {} vs {want}",
                        y[k]
                    );
                }
                if row == 0 {
                    assert_eq!(y, &b[..], "a constant row");
                }
            }
        }
    }

    #[test]
    fn softmax_rows_equal_a_direct_softmax() {
        let n = 37;
        let x: Vec<f32> = (0..n * 5)
            .map(|i| ((i * 7919 % 1000) as f32 / 37.0) - 13.0)
            .chain((0..n).map(|j| {
                if j % 3 == 0 {
                    f32::NEG_INFINITY
                } else {
                    j as f32
                }
            }))
            .collect();
        let got = scaled_softmax_rows(&x, n, 1.0, None);
        for (r, row) in x.chunks(n).enumerate() {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = row.iter().map(|v| ((v - m) as f64).exp()).sum();
            for (j, v) in row.iter().enumerate() {
                let want = (((v - m) as f64).exp() / s) as f32;
                let g = got[r * n + j];
                assert!(
                    (g - want).abs() <= 2e-7 * want.max(1e-30) + 1e-12,
                    "{r},{j}: {g} vs {want}"
                );
            }
        }
    }

    /// The scale and the mask as the op-by-op path applies them (`x · scale` rounded, then
    /// `+ mask`), the mask's rows cycling over the rows of `x`; a fully masked row is NaN.
    #[test]
    fn scaled_softmax_rows_apply_the_scale_and_the_mask_rows_in_turn() {
        let (n, k) = (70, 3);
        let x: Vec<f32> = (0..n * 7)
            .map(|i| ((i * 7919 % 997) as f32 / 31.0) - 16.0)
            .collect();
        let mut mask: Vec<f32> = (0..n * k)
            .map(|i| if i % 5 == 1 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        mask[2 * n..].fill(f32::NEG_INFINITY);
        let scale = 0.111_803_4f32;
        let got = scaled_softmax_rows(&x, n, scale, Some(&mask));
        for r in 0..7 {
            let y: Vec<f32> = (0..n)
                .map(|j| x[r * n + j] * scale + mask[(r % k) * n + j])
                .collect();
            let want = scaled_softmax_rows(&y, n, 1.0, None);
            for j in 0..n {
                let (g, w) = (got[r * n + j], want[j]);
                assert!(g == w || (g.is_nan() && w.is_nan()), "{r},{j}: {g} vs {w}");
            }
            assert_eq!(got[r * n].is_nan(), r % k == 2, "row {r}");
        }
    }

    /// Each activation within a few f32 ulps of its f64 definition over the range activations
    /// take (the f32 ops' own roundings included), and finite at the extremes. GELU-tanh's
    /// argument `2u` is rounded in f32 before its exponential, which scales that rounding by
    /// `|2u|` (torch's f32 tanh form has it too): its bound grows with `|2u|`.
    #[test]
    fn activations_match_their_f64_definitions() {
        type Case = (
            &'static str,
            fn(&[f32]) -> Vec<f32>,
            fn(f64) -> f64,
            fn(f64) -> f64,
        );
        let cases: [Case; 4] = [
            (
                "sigmoid",
                map::<Sigmoid>,
                |x| 1.0 / (1.0 + (-x).exp()),
                |_| 0.0,
            ),
            ("silu", map::<Silu>, |x| x / (1.0 + (-x).exp()), |_| 0.0),
            (
                "quick_gelu",
                map::<QuickGelu>,
                |x| x / (1.0 + (-((x as f32 * 1.702) as f64)).exp()),
                |_| 0.0,
            ),
            (
                "gelu_tanh",
                map::<GeluTanh>,
                // ½x(1 + tanh u) without f64's own cancellation where tanh u ≈ −1.
                |x| {
                    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                    x / (1.0 + (-2.0 * u).exp())
                },
                |x| {
                    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                    (2.0 * u).abs()
                },
            ),
        ];
        let xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect();
        for (name, fast, exact, conditioning) in cases {
            let got = fast(&xs);
            for (&x, &g) in xs.iter().zip(&got) {
                let w = exact(x as f64);
                let bound = 4e-7 * (1.0 + conditioning(x as f64));
                // Relative error, or absolute below f32's normal range.
                let err = (g as f64 - w).abs();
                assert!(
                    err <= bound * w.abs() || err < 1e-37,
                    "{name}({x}) = {g}, f64 {w}"
                );
            }
            for x in [-1e30f32, -100.0, -88.5, 88.5, 100.0, 1e30] {
                assert!(fast(&[x])[0].is_finite(), "{name}({x})");
            }
        }
        let up = [2.0f32, -3.0, 0.5];
        let gate = [1.0f32, 0.25, -4.0];
        let fused = map_mul::<Silu>(&gate, &up);
        let apart: Vec<f32> = map::<Silu>(&gate)
            .iter()
            .zip(&up)
            .map(|(a, b)| a * b)
            .collect();
        assert_eq!(fused, apart);
    }
}
