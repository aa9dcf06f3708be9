//! f32 GEMMs on Intel AMX (Xeon 4th generation, "Sapphire Rapids", and later), for the CPU path:
//! the lens's vocabulary GEMM, and every `Linear` of the models whose weights are stored in bf16 or
//! f16.
//!
//! AMX multiplies tiles of bf16 and accumulates in f32 (`TDPBF16PS`): 512 multiply-adds a cycle
//! per core, 16 times what AVX-512 does in f32. The arithmetic stays f32 all the same:
//!
//! - every f32 value is the exact sum of three bf16 values (8 + 8 + 8 significant bits), and a
//!   product of two bf16 values is exact in f32;
//! - so the rows `a` are split into `a₁ + a₂ + a₃` per call, and the weight `w` (`[out, in]`) into as
//!   many pieces as its values need, once, at load, from the values as the files store them: one
//!   for weights that are bf16 on disk (most hub checkpoints), two for f16 (LLaVA-1.5's), three for
//!   f32;
//! - `a · w = Σ aᵢ · wⱼ` over the pairs with `i + j ≤ 4`. The pairs left out (only with f32
//!   weights) are below 2⁻²⁴ of the product, f32's own rounding of one product. All sums are f32,
//!   as in an f32 GEMM (in another order, with more terms).
//!
//! So three tile products per block for bf16 weights instead of one, still several times
//! AVX-512's f32 rate. Weights are packed ([`pack`]) only when they need at most two pieces: the
//! packed copy is then no larger than the f32 one (a `Linear` keeps only it), and f32 checkpoints,
//! whose six products a block would gain little, keep candle's f32 GEMM.
//!
//! Used when the CPU has AMX-BF16 and Linux grants the tile state (`arch_prctl`); else, or with
//! `LOGIT_LENS_AMX=0`, everything multiplies in f32 through candle. Tests compare the two.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use super::fastmath::{vectorised, with_cpu};

/// Tile geometry: a tile is 16 rows of 64 bytes (16 f32, or 32 bf16 = 16 pairs).
const T: usize = 16;
/// The inner dimension per tile product (bf16 values per tile row).
const K: usize = 32;
/// Output columns (vocabulary entries, for the lens) per task: its pieces of the weight (32 KB a
/// piece per 32 columns for 512 inputs) stay in L2 while the task's rows go by, one row pair at a
/// time (each pair's split rows, up to 295 KB for a pass of 1536, in L2 too while the task's
/// columns go by). Groups of 2–4 row pairs between the columns, as before, ran 5–11 % slower on
/// every shape measured: the lens's, and every `Linear` of `examples/linear_throughput`.
const TASK_VOCAB: usize = 256;
/// Inner units per pass for a one-piece weight (half that for two pieces, a third for three): a
/// task's weight tiles for one pass (256 columns × 1536 × 2 bytes: 768 KB) stay in L2 beside a
/// row pair. A wider inner size (the vision MLP's 5120, the decoder MLP's 8960, LLaVA's 4096)
/// goes in passes, each adding its sums to the output; before, its rows or its weight came from
/// L3 for every block (decoder down_proj, `examples/linear_throughput`: 770–850 GFLOP/s in passes,
/// 630–675 before).
const PASS_INNER: usize = 1536;

/// Tile steps (of 32 inner units) per pass, for a weight of `pieces` pieces and `kp` inner units.
fn pass_steps(kp: usize, pieces: usize) -> usize {
    (PASS_INNER / K / pieces.max(1)).min(kp / K).max(1)
}

/// Whether the f32 GEMMs with weights run on AMX here: the CPU has AMX-TILE and AMX-BF16, Linux
/// grants the process the tile state, and `LOGIT_LENS_AMX` is not `0` / `off`. Asked once.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| !turned_off() && detect())
}

/// `LOGIT_LENS_AMX=0` or `off`.
fn turned_off() -> bool {
    std::env::var("LOGIT_LENS_AMX").is_ok_and(|v| v == "0" || v == "off")
}

/// What [`available`] decided, in words, for the service's start-up log.
pub fn describe() -> &'static str {
    if available() {
        "AMX tiles (bf16 or f16 weights as exact bf16 pieces, f32 sums)"
    } else if turned_off() {
        "candle's (AMX turned off)"
    } else {
        "candle's (no AMX-BF16 on this CPU)"
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let c = core::arch::x86_64::__cpuid_count(7, 0);
    let (bf16, tile) = ((c.edx >> 22) & 1 == 1, (c.edx >> 24) & 1 == 1);
    // Linux hands out the 8 KB tile state per process on request (ARCH_REQ_XCOMP_PERM for
    // XFEATURE_XTILEDATA); without it the first tile instruction faults.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    bf16 && tile
        && unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `w` (`[out, in]` on the CPU, in the dtype the checkpoint stores it) packed for the AMX GEMM of
/// a model that computes in `dtype`: when `dtype` is f32, [`available`], and the values need at
/// most two bf16 pieces (stored in bf16: one piece, copied; in f16: two; in f32: as their values
/// need). Packing from the stored values skips widening them to an f32 copy first.
pub fn pack(
    w: &candle_core::Tensor,
    dtype: candle_core::DType,
) -> crate::Result<Option<Arc<PackedWeight>>> {
    use candle_core::DType;
    if !(dtype == DType::F32 && w.device().is_cpu() && available()) {
        return Ok(None);
    }
    let (out, inner) = w.dims2()?;
    let packed = match w.dtype() {
        DType::BF16 => with_cpu(w, |v: &[half::bf16]| {
            Some(PackedWeight::with_pieces(v, out, inner, 1, |x| {
                [x.to_bits(), 0, 0]
            }))
        })?,
        // An f16 value has 11 significant bits: its bf16 rounding leaves at most 3, one more piece.
        DType::F16 => with_cpu(w, |v: &[half::f16]| {
            Some(PackedWeight::with_pieces(v, out, inner, 2, |x| {
                split3(x.to_f32())
            }))
        })?,
        DType::F32 => with_cpu(w, |v: &[f32]| {
            let pieces = pieces_needed(v);
            (pieces <= 2).then(|| PackedWeight::of_f32(v, out, inner, pieces))
        })?,
        _ => None,
    };
    Ok(packed.map(Arc::new))
}

/// `x · wᵀ` (`x` `[rows, in]` f32 on the CPU) with a packed weight: `[rows, out]`.
pub fn linear(x: &candle_core::Tensor, w: &PackedWeight) -> crate::Result<candle_core::Tensor> {
    linear_bias(x, w, None)
}

/// `x · wᵀ + b`: the bias (`[out]`, f32 on the CPU) added in f32 after the products' sums, as
/// candle's f32 path adds it, in place in the output.
pub fn linear_bias(
    x: &candle_core::Tensor,
    w: &PackedWeight,
    bias: Option<&candle_core::Tensor>,
) -> crate::Result<candle_core::Tensor> {
    let split = SplitRows::of(x)?;
    if split.kp != w.kp || bias.is_some_and(|b| b.dims() != [w.out]) {
        return Err(crate::Error::Internal(format!(
            "AMX linear: input {:?}, bias {:?} for a packed [{}, {}] weight",
            x.dims(),
            bias.map(|b| b.dims().to_vec()),
            w.out,
            w.inner
        )));
    }
    let len = split.n * w.out;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    matmul_uninit(&split, w, 0, w.out, &mut y.spare_capacity_mut()[..len]);
    // SAFETY: matmul_uninit wrote every element of `..len`.
    unsafe { y.set_len(len) };
    if let Some(b) = bias {
        with_cpu(b, |b: &[f32]| {
            y.par_chunks_mut(w.out.max(1)).for_each(|row| {
                for (v, &c) in row.iter_mut().zip(b) {
                    *v += c;
                }
            })
        })?;
    }
    Ok(candle_core::Tensor::from_vec(
        y,
        (split.n, w.out),
        x.device(),
    )?)
}

/// bf16 pieces the values need: 1 (all are bf16), 2 (f16, or bf16 + bf16) or 3.
fn pieces_needed(w: &[f32]) -> usize {
    // A bf16 value is an f32 whose low 16 bits are zero; most weights are, so that is checked first.
    let bf16 = |x: f32| x.to_bits() & 0xffff == 0;
    if w.par_iter().all(|&x| bf16(x)) {
        return 1;
    }
    if w.par_iter().all(|&x| bf16(x - bf16_value(bf16_bits(x)))) {
        return 2;
    }
    3
}

/// bf16 bits of `x`, rounded to nearest even.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` as three bf16 values whose sum is `x` (exactly, for every finite f32 whose pieces are
/// normal numbers).
#[inline(always)]
fn split3(x: f32) -> [u16; 3] {
    let p1 = bf16_bits(x);
    let r1 = x - bf16_value(p1);
    let p2 = bf16_bits(r1);
    let r2 = r1 - bf16_value(p2);
    [p1, p2, bf16_bits(r2)]
}

/// One tile row: 64 bytes on a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; K]);

/// bf16 tiles in memory that starts on a cache line. A tile row is 64 bytes: from a line-aligned
/// address `TILELOADD` reads one cache line per row, from anywhere else two. A `Vec<u16>` is only
/// sure of 2 bytes: glibc's allocator returns large blocks 16 bytes into a page, where the lens's
/// GEMM ran 25–33 % slower (`examples/gemm_throughput`); mimalloc, the binary's allocator, happened
/// to align them.
struct Tiles(Vec<Line>);

impl Tiles {
    /// `len` zeros (`len` a multiple of a tile row, as every tile buffer is).
    fn zeroed(len: usize) -> Self {
        assert!(len.is_multiple_of(K));
        let lines = len / K;
        if lines == 0 {
            return Tiles(Vec::new());
        }
        let layout = std::alloc::Layout::array::<Line>(lines).expect("tile buffer size");
        // SAFETY: allocated by the global allocator with `Vec<Line>`'s own layout for `lines`
        // elements, and all-zero bytes are a valid `Line`; zeroed pages come from the OS untouched,
        // as `vec![0u16; len]` had them.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout) as *mut Line;
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Tiles(Vec::from_raw_parts(p, lines, lines))
        }
    }

    /// `len` values written by `fill`.
    ///
    /// # Safety
    /// `fill` must write every one of the `len` elements it is given.
    unsafe fn filled(len: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<u16>])) -> Self {
        assert!(len.is_multiple_of(K));
        let mut v: Vec<Line> = Vec::with_capacity(len / K);
        let spare = v.spare_capacity_mut();
        // SAFETY: `Line` is `repr(C)` over `[u16; K]`: `len / K` uninitialised lines are `len`
        // uninitialised u16s.
        fill(std::slice::from_raw_parts_mut(
            spare.as_mut_ptr().cast(),
            len,
        ));
        v.set_len(len / K);
        Tiles(v)
    }

    fn as_slice(&self) -> &[u16] {
        // SAFETY: as in `filled`, the lines are their u16s.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * K) }
    }

    fn as_mut_slice(&mut self) -> &mut [u16] {
        // SAFETY: as in `as_slice`, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * K) }
    }
}

/// A weight `[out, in]` (the unembedding: `[vocab, hidden]`) in bf16 pieces, laid out as AMX's B
/// operand: for each 16 output columns, each piece and each 32 inputs, one 1 KB tile whose row `r`
/// holds, for each of the 16 columns, the pair of inputs `2r, 2r + 1` ("VNNI" order). Padded with
/// zeros to 32 columns and 32 inputs.
pub struct PackedWeight {
    out: usize,
    inner: usize,
    /// `inner` rounded up to K.
    kp: usize,
    /// bf16 pieces per weight: 1, 2 or 3.
    pieces: usize,
    /// Tiles `[out / 16][pieces][kp / 32]`, 512 bf16 each.
    tiles: Tiles,
}

impl PackedWeight {
    /// Packs `w` (`[out, inner]` f32, row-major) with as few pieces as its values need.
    pub fn new(w: &[f32], out: usize, inner: usize) -> Self {
        Self::of_f32(w, out, inner, pieces_needed(w))
    }

    /// `w` in `pieces` pieces (as many as [`pieces_needed`] says, or more).
    fn of_f32(w: &[f32], out: usize, inner: usize, pieces: usize) -> Self {
        if pieces == 1 {
            // Exactly bf16: its high half.
            return Self::with_pieces(w, out, inner, 1, |x| [(x.to_bits() >> 16) as u16, 0, 0]);
        }
        Self::with_pieces(w, out, inner, pieces, split3)
    }

    /// `w` (`[out, inner]`, row-major, any element type) packed with the first `pieces` of
    /// `split(x)`, the bf16 pieces that sum to each value.
    fn with_pieces<E: Copy + Sync>(
        w: &[E],
        out: usize,
        inner: usize,
        pieces: usize,
        split: impl Fn(E) -> [u16; 3] + Sync,
    ) -> Self {
        assert_eq!(w.len(), out * inner);
        let kp = inner.next_multiple_of(K);
        let vp = out.next_multiple_of(2 * T);
        let nkb = kp / K;
        let mut tiles = Tiles::zeroed(vp * kp * pieces);
        tiles
            .as_mut_slice()
            .par_chunks_mut(pieces * nkb * T * K)
            .enumerate()
            .for_each(|(vb, block)| {
                for n in 0..T.min(out.saturating_sub(vb * T)) {
                    let v = vb * T + n;
                    for (k, &x) in w[v * inner..(v + 1) * inner].iter().enumerate() {
                        let at = (k / K) * T * K + (k % K / 2) * K + n * 2 + k % 2;
                        for (piece, bits) in split(x).into_iter().take(pieces).enumerate() {
                            block[piece * nkb * T * K + at] = bits;
                        }
                    }
                }
            });
        PackedWeight {
            out,
            inner,
            kp,
            pieces,
            tiles,
        }
    }

    /// Output columns (rows of the weight).
    pub fn out_dim(&self) -> usize {
        self.out
    }

    pub fn in_dim(&self) -> usize {
        self.inner
    }

    /// bf16 pieces per weight: 1 (bf16 weights), 2 (f16) or 3 (f32).
    pub fn pieces(&self) -> usize {
        self.pieces
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tiles.as_slice().len() * 2
    }

    /// The tile of piece `piece` for output columns `16 vb ..` and inputs `32 kb ..`.
    fn tile(&self, vb: usize, piece: usize, kb: usize) -> *const u16 {
        let nkb = self.kp / K;
        self.tiles.as_slice()[((vb * self.pieces + piece) * nkb + kb) * T * K..].as_ptr()
    }
}

/// Rows `[n, hidden]` split into three bf16 pieces, laid out as AMX's A operand: for each 16 rows
/// and 32 hidden units, the three pieces' 1 KB tiles (row-major) one after the other, zero-padded
/// to 32 rows and 32 units.
pub struct SplitRows {
    n: usize,
    kp: usize,
    /// Tiles `[rows / 16][kp / 32][3]`, 512 bf16 each.
    tiles: Tiles,
}

impl SplitRows {
    pub fn new(a: &[f32], n: usize, hidden: usize) -> Self {
        assert_eq!(a.len(), n * hidden);
        let kp = hidden.next_multiple_of(K);
        let np = n.next_multiple_of(2 * T).max(2 * T);
        let nkb = kp / K;
        let len = 3 * np * kp;
        // Every element is written below, padding included (as zeros): no zeroing first.
        let fill = |tiles: &mut [std::mem::MaybeUninit<u16>]| {
            tiles
                .par_chunks_mut(nkb * 3 * T * K)
                .enumerate()
                // Split in AVX-512 where the CPU has it (every CPU with AMX does).
                .for_each(|(rt, block)| {
                    vectorised(
                        #[inline(always)]
                        || split_row_tile(a, n, hidden, rt, block),
                    )
                })
        };
        // SAFETY: the chunks above cover `..len` and write every element.
        let tiles = unsafe { Tiles::filled(len, fill) };
        SplitRows { n, kp, tiles }
    }

    /// The rows of `x` (`[n, in]`, f32 on the CPU).
    pub fn of(x: &candle_core::Tensor) -> crate::Result<Self> {
        let (n, inner) = x.dims2()?;
        with_cpu(x, |a: &[f32]| SplitRows::new(a, n, inner))
    }

    /// The tile of piece `piece` for rows `16 rt ..` and hidden units `32 kb ..`.
    fn tile(&self, piece: usize, rt: usize, kb: usize) -> *const u16 {
        self.tiles.as_slice()[((rt * (self.kp / K) + kb) * 3 + piece) * T * K..].as_ptr()
    }
}

/// Row tile `rt` of `a` (`[n, hidden]`, its rows `16 rt ..`) into `block`, its tiles: for each 32
/// units, 16 rows of 32 values read and written whole (cache lines), each value as its three bf16
/// pieces in the three pieces' tiles; rows past `n` and units past `hidden` as zeros.
#[inline(always)]
fn split_row_tile(
    a: &[f32],
    n: usize,
    hidden: usize,
    rt: usize,
    block: &mut [std::mem::MaybeUninit<u16>],
) {
    for (kb, tiles) in block.chunks_exact_mut(3 * T * K).enumerate() {
        let (k0, width) = (kb * K, K.min(hidden - kb * K));
        let (t1, rest) = tiles.split_at_mut(T * K);
        let (t2, t3) = rest.split_at_mut(T * K);
        for rr in 0..T {
            let mut x = [0f32; K];
            let r = rt * T + rr;
            if r < n {
                x[..width].copy_from_slice(&a[r * hidden + k0..][..width]);
            }
            let (mut p1, mut p2, mut p3) = ([0u16; K], [0u16; K], [0u16; K]);
            for k in 0..K {
                [p1[k], p2[k], p3[k]] = split3(x[k]);
            }
            let at = rr * K..(rr + 1) * K;
            for (t, p) in [(&mut *t1, p1), (&mut *t2, p2), (&mut *t3, p3)] {
                for (o, v) in t[at.clone()].iter_mut().zip(p) {
                    o.write(v);
                }
            }
        }
    }
}

/// `out[r][j] = a[r] · w[v0 + j]` for the `n` split rows and the `vc` output columns from `v0`
/// (a multiple of 32), `out` `[n, vc]` row-major. Needs [`available`].
pub fn matmul(a: &SplitRows, w: &PackedWeight, v0: usize, vc: usize, out: &mut [f32]) {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and only f32 values are written through it.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    matmul_uninit(a, w, v0, vc, out)
}

/// [`matmul`] into memory that need not be initialised: every element of `out` is written (the
/// outputs of a `Linear` are not zeroed first, a pass over them saved).
pub fn matmul_uninit(
    a: &SplitRows,
    w: &PackedWeight,
    v0: usize,
    vc: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(available(), "AMX is not available");
    assert_eq!(a.kp, w.kp, "rows and weight differ in their inner size");
    assert!(v0.is_multiple_of(2 * T) && v0 + vc <= w.out);
    assert_eq!(out.len(), a.n * vc);
    if a.n == 0 || vc == 0 {
        return;
    }
    let out_ptr = SendPtr(out.as_mut_ptr().cast());
    let col_pairs = vc.div_ceil(2 * T);
    let per_task = TASK_VOCAB / (2 * T);
    let col_tasks = col_pairs.div_ceil(per_task);
    // A narrow weight (a `Linear` with a few hundred outputs) has few column tasks: its rows are
    // split too, so that every core has work.
    let row_pairs = a.n.div_ceil(2 * T);
    let row_tasks = (4 * rayon::current_num_threads())
        .div_ceil(col_tasks)
        .clamp(1, row_pairs);
    let pairs_per_task = row_pairs.div_ceil(row_tasks);
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (rt, ct) = (task / col_tasks, task % col_tasks);
        let cbs = ct * per_task..((ct + 1) * per_task).min(col_pairs);
        let rbs = (rt * pairs_per_task).min(row_pairs)..((rt + 1) * pairs_per_task).min(row_pairs);
        // Each task writes its own block of `out`, no two tasks the same element.
        unsafe { x86::task(a, w, v0, vc, rbs, cbs, out_ptr) };
    });
}

/// Output columns (16-column blocks) per task of [`left_matmul_add`]: each task sums its products
/// in f32 lanes (64 terms a lane), then adds them to the f64 totals.
const LEFT_TASK_BLOCKS: usize = 64;
/// Rows of `p` per task of [`left_matmul_add`]: its f32 lanes (`rows × in × 16`, 98 KB a row for
/// 1536 inputs) stay in L2 while the task's weight goes by.
const LEFT_TASK_ROWS: usize = 4;

/// `acc[r] += Σ_j p[r][j] · w[v0 + j]` for the `rows` rows of `p` (`[rows, vc]` f32, row-major)
/// and the `vc` weight rows (output columns) from `v0`; `acc` `[rows, in]` in f64. This is the
/// weight's transpose applied from the left, `Wᵀ p`: the lens's KL cross term `Wᵀ p_L`.
///
/// It reads the packed bf16 pieces (the weight's exact values, half the bytes of an f32 copy)
/// once, with AVX-512 products and sums in f32 over 64 blocks of 16 columns, then in f64. Memory
/// bound: for Qwen2-VL-2B's unembedding (151936 × 1536) it replaces a 1-row f32 GEMM over the
/// 933 MB f32 copy. It needs no AMX, only the packed layout (so only where [`available`]).
pub fn left_matmul_add(
    p: &[f32],
    rows: usize,
    w: &PackedWeight,
    v0: usize,
    vc: usize,
    acc: &mut [f64],
) {
    left_matmul_add_on(p, rows, w, v0, vc, acc, has_avx512())
}

/// Whether the CPU has AVX-512F (every CPU with AMX does).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`left_matmul_add`] in AVX-512 (`avx512`: the caller checked that the CPU has it) or in scalar
/// code.
fn left_matmul_add_on(
    p: &[f32],
    rows: usize,
    w: &PackedWeight,
    v0: usize,
    vc: usize,
    acc: &mut [f64],
    avx512: bool,
) {
    assert!(v0.is_multiple_of(T) && v0 + vc <= w.out);
    assert_eq!(p.len(), rows * vc);
    assert_eq!(acc.len(), rows * w.inner);
    if rows == 0 || vc == 0 {
        return;
    }
    let blocks = vc.div_ceil(T);
    let col_tasks = blocks.div_ceil(LEFT_TASK_BLOCKS);
    let row_tasks = rows.div_ceil(LEFT_TASK_ROWS);
    let kp = w.kp;
    let totals = (0..row_tasks * col_tasks)
        .into_par_iter()
        .fold(
            || (vec![0f64; rows * kp], Vec::new()),
            |(mut totals, mut lanes): (Vec<f64>, Vec<f32>), task| {
                let (rt, ct) = (task / col_tasks, task % col_tasks);
                let rs = rt * LEFT_TASK_ROWS..((rt + 1) * LEFT_TASK_ROWS).min(rows);
                let bs = ct * LEFT_TASK_BLOCKS..((ct + 1) * LEFT_TASK_BLOCKS).min(blocks);
                lanes.clear();
                lanes.resize(rs.len() * kp * T, 0.0);
                left_task(p, vc, w, v0, rs.clone(), bs, &mut lanes, avx512);
                for (r, lanes) in rs.zip(lanes.chunks_exact(kp * T)) {
                    for (t, l) in totals[r * kp..(r + 1) * kp]
                        .iter_mut()
                        .zip(lanes.chunks_exact(T))
                    {
                        *t += l.iter().map(|&x| x as f64).sum::<f64>();
                    }
                }
                (totals, lanes)
            },
        )
        .map(|(totals, _)| totals)
        .reduce(
            || vec![0f64; rows * kp],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    for (r, t) in totals.chunks_exact(kp).enumerate() {
        for (a, &t) in acc[r * w.inner..(r + 1) * w.inner].iter_mut().zip(t) {
            *a += t;
        }
    }
}

/// One task of [`left_matmul_add`]: rows `rs` of `p` (`vc` columns a row) against the 16-column
/// blocks `bs` (relative to `v0`), into `lanes` `[rs.len()][kp][16]`: input `k`'s partial sums,
/// one per column of a block. `avx512`: in AVX-512 (every CPU with AMX has it), else the same
/// sums in scalar code.
#[allow(clippy::too_many_arguments)]
fn left_task(
    p: &[f32],
    vc: usize,
    w: &PackedWeight,
    v0: usize,
    rs: std::ops::Range<usize>,
    bs: std::ops::Range<usize>,
    lanes: &mut [f32],
    avx512: bool,
) {
    let nkb = w.kp / K;
    let r0 = rs.start;
    for b in bs {
        // The block's 16 columns in the weight (a multiple of 16 from `v0`).
        let vb = v0 / T + b;
        for r in rs.clone() {
            let mut pv = [0f32; T];
            let (c0, width) = (b * T, T.min(vc - b * T));
            pv[..width].copy_from_slice(&p[r * vc + c0..][..width]);
            let lanes = &mut lanes[(r - r0) * w.kp * T..][..w.kp * T];
            for piece in 0..w.pieces {
                for kb in 0..nkb {
                    // SAFETY: a tile is 512 bf16 (1 KB) on a cache line (`Tiles`): 256 aligned u32,
                    // each the pair of inputs `2i, 2i + 1` of one column, the first in the low half.
                    let tile: &[u32; T * T] = unsafe { &*w.tile(vb, piece, kb).cast() };
                    let out: &mut [f32; K * T] = (&mut lanes[kb * K * T..][..K * T])
                        .try_into()
                        .expect("a tile's sums");
                    #[cfg(target_arch = "x86_64")]
                    if avx512 {
                        // SAFETY: the caller checked that the CPU has AVX-512F.
                        unsafe { x86::left_tile(&pv, tile, out) };
                        continue;
                    }
                    for i in 0..T {
                        for c in 0..T {
                            // bf16 → f32: the bits in the high half.
                            let x = tile[i * T + c];
                            out[2 * i * T + c] += pv[c] * f32::from_bits(x << 16);
                            out[(2 * i + 1) * T + c] += pv[c] * f32::from_bits(x & 0xFFFF_0000);
                        }
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// One packed tile of [`super::left_matmul_add`]: `out[2i][c] += pv[c] · w(2i)` and
    /// `out[2i + 1][c] += pv[c] · w(2i + 1)` for its 16 rows `i` of 16 column pairs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn left_tile(pv: &[f32; 16], tile: &[u32; 256], out: &mut [f32; 512]) {
        use std::arch::x86_64::*;
        let p = _mm512_loadu_ps(pv.as_ptr());
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        for i in 0..16 {
            let x = _mm512_load_si512(tile.as_ptr().add(16 * i).cast());
            let (e, o) = (
                out.as_mut_ptr().add(32 * i),
                out.as_mut_ptr().add(32 * i + 16),
            );
            let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(x, high));
            _mm512_storeu_ps(e, _mm512_fmadd_ps(p, even, _mm512_loadu_ps(e)));
            _mm512_storeu_ps(o, _mm512_fmadd_ps(p, odd, _mm512_loadu_ps(o)));
        }
    }

    use super::{pass_steps, PackedWeight, SendPtr, SplitRows, K, T};
    use std::arch::asm;
    use std::ops::Range;

    /// LDTILECFG's 64-byte operand: palette 1, every tile 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// One task: the row pairs `rbs` (32 rows each) × the column pairs `cbs` (32 output columns
    /// each, from `v0`).
    /// Tiles: tmm0–3 the 2 × 2 accumulators, tmm4–5 two row tiles of a piece of `a`, tmm6–7 two
    /// column tiles of a piece of `w`.
    pub(super) unsafe fn task(
        a: &SplitRows,
        w: &PackedWeight,
        v0: usize,
        vc: usize,
        rbs: Range<usize>,
        cbs: Range<usize>,
        out: SendPtr,
    ) {
        let steps = pass_steps(a.kp, w.pieces);
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = T as u8;
        }
        asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        let nkb = w.kp / K;
        let mut scratch = [0f32; 4 * T * T];
        for k0 in (0..nkb).step_by(steps) {
            let k1 = (k0 + steps).min(nkb);
            for rb in rbs.clone() {
                for cb in cbs.clone() {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    accumulate(a, w, rb, (v0 / T) + 2 * cb, k0..k1);
                    store(&mut scratch, rb, cb, a.n, vc, out, k0 > 0);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// Adds to the accumulators tmm0–3 the products of row pair `rb` (rows `32 rb ..`) and the
    /// weight's column tiles `vb`, `vb + 1` over the tile steps `kbs`.
    #[inline(always)]
    unsafe fn accumulate(a: &SplitRows, w: &PackedWeight, rb: usize, vb: usize, kbs: Range<usize>) {
        // The last row pair may hold 16 rows or fewer: its second tile is all padding, and only
        // the first is multiplied (the lens's 418 rows a layer for a 640×480 Qwen2-VL request:
        // 13.5 row pairs' work, not 14).
        let half = (2 * rb + 1) * T >= a.n;
        for kb in kbs.clone() {
            // The next step's weight tiles to L1 while this step multiplies (5–8 % on the lens's
            // and the vision MLP's shapes; the row tiles' prefetch cost more than it saved).
            if kb + 1 < kbs.end {
                for v in [vb, vb + 1] {
                    for j in 0..w.pieces {
                        prefetch_tile(w.tile(v, j, kb + 1));
                    }
                }
            }
            for j in 0..w.pieces {
                let (b0, b1) = (w.tile(vb, j, kb), w.tile(vb + 1, j, kb));
                asm!(
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) 64usize,
                    options(nostack, readonly)
                );
                // Pieces of `a` with i + j ≤ 4 (1-based): 3 with w's first piece, 2 with its
                // second, 1 with its third.
                for i in 0..3 - j {
                    let (r0, r1) = (a.tile(i, 2 * rb, kb), a.tile(i, 2 * rb + 1, kb));
                    if half {
                        asm!(
                            "tileloadd tmm4, [{r0} + {s}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            r0 = in(reg) r0, s = in(reg) 64usize,
                            options(nostack, readonly)
                        );
                        continue;
                    }
                    asm!(
                        "tileloadd tmm4, [{r0} + {s}*1]",
                        "tileloadd tmm5, [{r1} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        r0 = in(reg) r0, r1 = in(reg) r1, s = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
            }
        }
    }

    /// A tile's 16 cache lines to L1.
    #[inline(always)]
    unsafe fn prefetch_tile(tile: *const u16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for line in 0..T {
            _mm_prefetch::<_MM_HINT_T0>((tile as *const i8).add(line * 64));
        }
    }

    /// The four accumulators of row pair `rb`, column pair `cb` to `out` (`[n, vc]`), or added to
    /// it (`add`: a later pass over the inner dimension): straight there when the block is inside
    /// it and nothing is added, else through `scratch`, keeping what is inside.
    unsafe fn store(
        scratch: &mut [f32; 4 * T * T],
        rb: usize,
        cb: usize,
        n: usize,
        vc: usize,
        out: SendPtr,
        add: bool,
    ) {
        let (r0, c0) = (rb * 2 * T, cb * 2 * T);
        if r0 + 2 * T <= n && c0 + 2 * T <= vc && !add {
            let base = out.0.add(r0 * vc + c0);
            asm!(
                "tilestored [{p0} + {s}*1], tmm0",
                "tilestored [{p1} + {s}*1], tmm1",
                "tilestored [{p2} + {s}*1], tmm2",
                "tilestored [{p3} + {s}*1], tmm3",
                p0 = in(reg) base, p1 = in(reg) base.add(T), p2 = in(reg) base.add(T * vc),
                p3 = in(reg) base.add(T * vc + T), s = in(reg) vc * 4,
                options(nostack)
            );
            return;
        }
        // scratch: [32 rows][32 columns].
        let base = scratch.as_mut_ptr();
        asm!(
            "tilestored [{p0} + {s}*1], tmm0",
            "tilestored [{p1} + {s}*1], tmm1",
            "tilestored [{p2} + {s}*1], tmm2",
            "tilestored [{p3} + {s}*1], tmm3",
            p0 = in(reg) base, p1 = in(reg) base.add(T), p2 = in(reg) base.add(2 * T * T),
            p3 = in(reg) base.add(2 * T * T + T), s = in(reg) 2 * T * 4,
            options(nostack)
        );
        let cols = (2 * T).min(vc - c0);
        for r in 0..(2 * T).min(n.saturating_sub(r0)) {
            let to = out.0.add((r0 + r) * vc + c0);
            let from = &scratch[r * 2 * T..][..cols];
            if add {
                // Written by the first pass.
                for (o, &v) in std::slice::from_raw_parts_mut(to, cols)
                    .iter_mut()
                    .zip(from)
                {
                    *o += v;
                }
            } else {
                // `out` may not be initialised yet ([`super::matmul_uninit`]).
                std::ptr::copy_nonoverlapping(from.as_ptr(), to, cols);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) unsafe fn task(
        _: &super::SplitRows,
        _: &super::PackedWeight,
        _: usize,
        _: usize,
        _: std::ops::Range<usize>,
        _: std::ops::Range<usize>,
        _: super::SendPtr,
    ) {
        unreachable!("AMX exists on x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn three_bf16_pieces_sum_to_the_f32_value() {
        let mut s = 7;
        for _ in 0..100_000 {
            let x = lcg(&mut s) * 10f32.powi((lcg(&mut s) * 8.0) as i32);
            let [a, b, c] = split3(x);
            assert_eq!(bf16_value(a) + bf16_value(b) + bf16_value(c), x, "{x}");
        }
    }

    /// Tiles start on cache lines whatever the allocator does with a `Vec<u16>` (the test
    /// harness runs on glibc's, which puts blocks above 128 KB 16 bytes into a page), small and
    /// large, zeroed (weights) and written in place (rows).
    #[test]
    fn tiles_start_on_cache_lines() {
        let mut s = 3;
        for (rows, hidden) in [(1, 8), (33, 100), (300, 1536), (2000, 96)] {
            let a: Vec<f32> = (0..rows * hidden).map(|_| lcg(&mut s)).collect();
            let split = SplitRows::new(&a, rows, hidden);
            let packed = PackedWeight::new(&a, rows, hidden);
            for kb in 0..split.kp / K {
                for rt in 0..rows.div_ceil(T) {
                    for piece in 0..3 {
                        assert_eq!(split.tile(piece, rt, kb) as usize % 64, 0);
                    }
                    for piece in 0..packed.pieces() {
                        assert_eq!(packed.tile(rt, piece, kb) as usize % 64, 0);
                    }
                }
            }
            // What was packed is still there, through the aligned buffer: row 0's first value.
            let first = packed.tile(0, 0, 0);
            assert_eq!(unsafe { *first }, bf16_bits(a[0]));
        }
    }

    /// How a test weight's values are rounded: to bf16, to f16, or not at all.
    type Rounding = fn(f32) -> f32;

    /// Weights that need one, two and three bf16 pieces, and the rounding that makes them so.
    fn weight_kinds() -> [(usize, Rounding); 3] {
        [
            (1, |x| bf16_value(bf16_bits(x))),
            (2, |x| half::f16::from_f32(x).to_f32()),
            (3, |x| x),
        ]
    }

    /// A random `[vocab, hidden]` weight rounded by `round`, and its packing, checked to have
    /// `pieces` pieces.
    fn random_packed(
        (pieces, round): (usize, Rounding),
        vocab: usize,
        hidden: usize,
        s: &mut u64,
    ) -> (Vec<f32>, PackedWeight) {
        let w: Vec<f32> = (0..vocab * hidden).map(|_| round(lcg(s) * 0.05)).collect();
        let packed = PackedWeight::new(&w, vocab, hidden);
        assert_eq!(packed.pieces(), pieces);
        (w, packed)
    }

    /// `Wᵀ p` from the packed pieces, against f64 sums, for weights of one, two and three pieces
    /// and every shape edge (rows across tasks, a vocabulary range that starts inside it and ends
    /// off a block, hidden not a multiple of 32): each sum within 2⁻¹⁷ of its terms' magnitude
    /// `Σ |pⱼ wⱼₖ|` (f32 products and 64-term f32 sums are within ~2⁻¹⁸; a missing piece of `w`
    /// or a column off by one is far outside). What `acc` held is added to. No AMX needed.
    #[test]
    fn transposed_products_equal_f64_sums() {
        let mut s = 5;
        for kind in weight_kinds() {
            let pieces = kind.0;
            for (rows, hidden, vocab, v0, vc) in [
                (1, 80, 100, 0, 100),
                (3, 80, 100, 0, 0),
                (6, 70, 3000, 48, 2900),
                (9, 96, 1100, 1024, 76),
                (1, 1536, 4100, 0, 4100),
            ] {
                let (w, packed) = random_packed(kind, vocab, hidden, &mut s);
                let p: Vec<f32> = (0..rows * vc).map(|_| lcg(&mut s).abs()).collect();
                for avx512 in [false, has_avx512()] {
                    let mut acc = vec![0.5f64; rows * hidden];
                    left_matmul_add_on(&p, rows, &packed, v0, vc, &mut acc, avx512);
                    for r in 0..rows {
                        for k in 0..hidden {
                            let terms = (0..vc)
                                .map(|j| p[r * vc + j] as f64 * w[(v0 + j) * hidden + k] as f64);
                            let exact = 0.5 + terms.clone().sum::<f64>();
                            let scale = terms.map(f64::abs).sum::<f64>();
                            let got = acc[r * hidden + k];
                            let ctx = format!("{pieces} pieces, {rows}×{vc}, avx512 {avx512}");
                            assert!(
                                (got - exact).abs() <= scale * 2f64.powi(-17) + 1e-12,
                                "{ctx} [{r}, {k}]: {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every shape edge (rows, hidden and vocabulary not multiples of the tiles, a block that
    /// starts inside the vocabulary), for weights of one, two and three pieces: each logit within
    /// 2⁻²⁰ of its terms' magnitude `Σ |aₖ wₖ|` of the f64 dot product (an f32 GEMM of this length
    /// is within ~2⁻²²; a missing piece of `a` is off by ~2⁻⁹, one of `w` by ~2⁻¹⁷).
    #[test]
    fn amx_products_equal_f64_dot_products() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX-BF16 (or Linux refused the tile state)");
            return;
        }
        let mut s = 1;
        for kind in weight_kinds() {
            let pieces = kind.0;
            for (n, hidden, vocab, v0, vc) in [
                (0, 80, 100, 0, 100),
                (37, 80, 100, 0, 0),
                (37, 80, 100, 0, 100),
                (37, 80, 100, 32, 50),
                (64, 64, 96, 64, 32),
                (5, 300, 70, 0, 70),
                (130, 96, 600, 256, 300),
                // An inner size that goes in passes (pass_steps), the last one short.
                (70, 5200, 40, 0, 40),
            ] {
                let a: Vec<f32> = (0..n * hidden).map(|_| lcg(&mut s) * 3.0).collect();
                let (w, packed) = random_packed(kind, vocab, hidden, &mut s);
                let mut out = vec![f32::NAN; n * vc];
                matmul(&SplitRows::new(&a, n, hidden), &packed, v0, vc, &mut out);
                for r in 0..n {
                    for j in 0..vc {
                        let (ar, wr) = (
                            &a[r * hidden..(r + 1) * hidden],
                            &w[(v0 + j) * hidden..(v0 + j + 1) * hidden],
                        );
                        let exact: f64 =
                            ar.iter().zip(wr).map(|(&x, &y)| x as f64 * y as f64).sum();
                        let size: f64 = ar
                            .iter()
                            .zip(wr)
                            .map(|(&x, &y)| (x as f64 * y as f64).abs())
                            .sum();
                        let got = out[r * vc + j] as f64;
                        assert!(
                            (got - exact).abs() <= size * 2f64.powi(-20),
                            "pieces {pieces}, shape {n}×{hidden}·{vocab} from {v0}: [{r}][{j}] {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
