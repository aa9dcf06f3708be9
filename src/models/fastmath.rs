//! The CPU's hot exponentials: a branch-free `exp` the compiler vectorises (AVX2 + FMA where the
//! CPU has them), used by the lens's vocabulary reduction and by the attention softmax.

use rayon::prelude::*;

/// Cody–Waite range reduction plus a degree-6 polynomial; relative error ~2 ulp for x ≤ 0
/// (torch's vectorised exp is ~1 ulp), exact 0 below −87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0; // round to nearest
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let bits = ((n as i32 + 127) << 23) as u32;
    p * f32::from_bits(bits)
}

/// One row's softmax into `out`, as torch's vectorised CPU softmax computes it: the max, then
/// `e^(x − max)` and their sum, then each times `1 / sum`.
#[inline(always)]
fn softmax_row_generic(x: &[f32], out: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        // A fully masked row: torch gives NaN (0/0); keep it.
        out.fill(f32::NAN);
        return;
    }
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut oc = out.chunks_exact_mut(LANES);
    for (xs, os) in (&mut xc).zip(&mut oc) {
        for i in 0..LANES {
            let e = exp(xs[i] - m);
            os[i] = e;
            acc[i] += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (v, o) in xc.remainder().iter().zip(oc.into_remainder()) {
        let e = exp(v - m);
        *o = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(x: &[f32], out: &mut [f32], n: usize) {
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        softmax_row_generic(xr, or);
    }
}

fn softmax_rows_one_thread(x: &[f32], out: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected on this CPU.
        return unsafe { softmax_rows_avx2(x, out, n) };
    }
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        softmax_row_generic(xr, or);
    }
}

/// Softmax over rows of `n` values (`x.len()` a multiple of `n`), rows split across threads.
pub fn softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if n == 0 {
        return out;
    }
    // Chunks of whole rows, about 64k values each.
    let rows_per_chunk = (65_536 / n).max(1);
    x.par_chunks(rows_per_chunk * n)
        .zip(out.par_chunks_mut(rows_per_chunk * n))
        .for_each(|(xc, oc)| softmax_rows_one_thread(xc, oc, n));
    out
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
        let got = softmax_rows(&x, n);
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
}
