//! Attention in f32 on the CPU, a block of query rows at a time: the block's scores `q·kᵀ`, their
//! softmax (the scale and the mask applied as transformers' eager attention applies them, see
//! [`fastmath::scaled_softmax_in_place`]) and their product with `v`, while the block's scores are
//! in cache. Done over the whole sequence at once, the scores go to memory and back twice
//! (Qwen2-VL-2B's vision tower on a 640×480 image: 16 × 1564² scores, 156 MB a layer).
//!
//! The same arithmetic as the op-by-op path ([`super::layers::attention`]): every score is one f32
//! dot product, rounded, then scaled; each probability is the row's softmax; each output is one f32
//! dot product of probabilities and values (the GEMMs may sum in another order than candle's
//! batched call, as any two GEMMs may).

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::fastmath::{self, with_cpu};
use crate::error::Result;

/// Scores per block (rows × keys): ~512 KB, within a core's L2.
const BLOCK_SCORES: usize = 1 << 17;

/// `softmax(q kᵀ · scale + mask) v` for f32 CPU tensors: `q` `[b, hq, s, d]`, `k`/`v`
/// `[b, hkv, sk, d]` (`hq` a multiple of `hkv`, the `hq / hkv` query heads of a group consecutive),
/// `mask` additive `[s, sk]`. Returns `[b, hq, s, d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, hq, s, d) = q.dims4()?;
    let (hkv, sk) = (k.dim(1)?, k.dim(2)?);
    let (rep, groups) = (hq / hkv.max(1), b * hkv);
    let mask = mask
        .map(|m| with_cpu(&m.to_dtype(DType::F32)?, |m: &[f32]| m.to_vec()))
        .transpose()?;
    let out = with_cpu(q, |q: &[f32]| {
        with_groups(k, |k, k_stride| {
            with_groups(v, |v, v_stride| {
                let shape = Shape {
                    groups,
                    rows: rep * s,
                    keys: sk,
                    head_dim: d,
                    k_stride,
                    v_stride,
                };
                blocks(q, k, v, mask.as_deref(), shape, scale as f32)
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (b, hq, s, d), &Device::Cpu)?)
}

/// Keys or values `[b, hkv, sk, d]` (f32, CPU) as a slice of `b·hkv` groups of `sk` contiguous
/// rows and the distance between groups. One sequence with contiguous rows (a generation step's
/// view of its cache, whose head stride is the cache's capacity) is read in place; anything else
/// is made contiguous first.
fn with_groups<R>(t: &Tensor, f: impl FnOnce(&[f32], usize) -> R) -> Result<R> {
    let (b, hkv, sk, d) = t.dims4()?;
    let st = t.stride();
    if b == 1 && hkv > 0 && sk > 0 && st[3] == 1 && st[2] == d && t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let all = cpu.as_slice::<f32>()?;
            let (start, end) = (
                layout.start_offset(),
                layout.start_offset() + (hkv - 1) * st[1] + sk * d,
            );
            if end <= all.len() {
                return Ok(f(&all[start..end], st[1]));
            }
        }
    }
    with_cpu(t, |all: &[f32]| f(all, sk * d))
}

/// The sizes of one call: `groups` of `rows` query rows (a group's query heads one after the
/// other) against `keys` keys, `head_dim` values each; group g's keys start at `g · k_stride`,
/// its values at `g · v_stride`.
#[derive(Clone, Copy)]
struct Shape {
    groups: usize,
    rows: usize,
    keys: usize,
    head_dim: usize,
    k_stride: usize,
    v_stride: usize,
}

/// The attention of `q` `[groups, rows, d]` over `k`, `v` `[groups, keys, d]`: `[groups, rows, d]`.
/// Tasks of (group, block of rows) across threads.
fn blocks(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    shape: Shape,
    scale: f32,
) -> Vec<f32> {
    let Shape {
        groups,
        rows,
        keys: sk,
        head_dim: d,
        k_stride,
        v_stride,
    } = shape;
    let mut out = vec![0f32; groups * rows * d];
    if d == 0 || sk == 0 || rows == 0 {
        return out;
    }
    let block = (BLOCK_SCORES / sk).clamp(8, 256);
    out.par_chunks_mut(rows * d)
        .enumerate()
        .for_each(|(g, out)| {
            let (qg, kg, vg) = (
                &q[g * rows * d..(g + 1) * rows * d],
                &k[g * k_stride..g * k_stride + sk * d],
                &v[g * v_stride..g * v_stride + sk * d],
            );
            out.par_chunks_mut(block * d)
                .enumerate()
                .for_each(|(i, out)| {
                    let r0 = i * block;
                    let n = out.len() / d;
                    let mut scores = vec![0f32; n * sk];
                    // SAFETY: each operand's extent, from its pointer and strides, lies in its
                    // slice: q's rows r0..r0+n of d values, k's and v's sk rows of d, the scores
                    // n × sk, out n × d.
                    unsafe {
                        gemm(
                            (n, sk, d),
                            (scores.as_mut_ptr(), sk),
                            (qg[r0 * d..].as_ptr(), d as isize, 1),
                            // kᵀ: its element (c, j) is k[j][c].
                            (kg.as_ptr(), 1, d as isize),
                        );
                    }
                    // Row r of a group is query position r mod s: its mask row.
                    fastmath::scaled_softmax_in_place(&mut scores, sk, scale, mask, r0);
                    // SAFETY: as above.
                    unsafe {
                        gemm(
                            (n, d, sk),
                            (out.as_mut_ptr(), d),
                            (scores.as_ptr(), sk as isize, 1),
                            (vg.as_ptr(), d as isize, 1),
                        );
                    }
                });
        });
    out
}

/// `dst = lhs · rhs` (`m × n` from `m × k` and `k × n`) on this thread: `dst` row-major with row
/// stride `dst.1`; `lhs` and `rhs` as (pointer, row stride, column stride).
unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1 as isize,
        false,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}
