// Attention without materialising the scores (src/models/fused/flash.rs), computing what
// transformers' eager attention computes in half precision, rounding for rounding:
//   s  = round_T(q·kᵀ)                      (the scores GEMM, f32 sums, rounded to T)
//   s' = round_T(f32(s) · scale)            (a Python float times a half tensor)
//   v  = f32(s') + mask                     (mask: 0, or −∞ above the diagonal when causal)
//   p  = round_T(exp(v − max) / Σ exp(v − max))   (softmax in f32)
//   o  = round_T(Σ_j p_j · v_j)             (the probs·v GEMM, f32 sums)
// Two passes over the keys per block of queries: the first finds each row's max and sum of
// exponentials (online, in f32), the second recomputes the scores and accumulates p·v. The scores
// GEMM runs twice, which costs far less than writing and reading [heads × queries × keys] scores
// four times. Tensor cores through WMMA (16×16×16 tiles, f32 accumulators).
//
// One block: 4 warps, 64 queries (16 a warp) of one (batch, head); key tiles of 32; shared rows
// padded against bank conflicts (after run 6, where this kernel was correct but slower than the
// fused softmax: bench/README.md, not yet measured since). q, k, v are
// read through (batch, head, token) strides with the head dimension contiguous; grouped-query
// heads share a k/v head (h / rep). The output is [batch, queries, heads, D], contiguous.
#include <mma.h>
#include "../../lens/online_max_sum.cuh"

using namespace nvcuda;

namespace flash {

constexpr int WARPS = 4;
constexpr int BQ = 16 * WARPS; // queries per block
constexpr int BK = 32;         // keys per tile

struct Args {
  long long b, hq, hkv, s, sk;
  long long q_off, q_sb, q_sh, q_st;
  long long k_off, k_sb, k_sh, k_st;
  long long v_off, v_sb, v_sh, v_st;
  float scale;
  int causal;
};

// Rows [0, n) of a tile from `src` (row stride `stride`) into `dst` (row stride LD, in shared
// memory); rows past `valid` are zeros. 16-byte loads where every row starts 16-byte aligned.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_tile(T *dst, const T *src, int n, long long valid,
                                          long long stride, bool vec) {
  if (vec) {
    constexpr int V = 16 / sizeof(T), PER_ROW = D / V;
    for (int e = threadIdx.x; e < n * PER_ROW; e += blockDim.x) {
      const int r = e / PER_ROW, c = (e % PER_ROW) * V;
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < valid) x = *reinterpret_cast<const uint4 *>(src + r * stride + c);
      *reinterpret_cast<uint4 *>(dst + r * LD + c) = x;
    }
  } else {
    const T zero = from_f32<T>(0.f);
    for (int e = threadIdx.x; e < n * D; e += blockDim.x) {
      const int r = e / D, c = e % D;
      dst[r * LD + c] = (r < valid) ? src[r * stride + c] : zero;
    }
  }
}

template <typename T, int D>
__device__ void attend(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                       T *__restrict__ o, const Args a) {
  static_assert(D % 16 == 0, "head dim a multiple of 16");
  // Shared rows padded so that the 16 rows a warp reads together fall in different banks (an
  // unpadded 64- or 128-wide half row puts every row in the same bank: run 6's kernel).
  constexpr int LD = D + 8;  // halves, q_s / k_s / v_s rows
  constexpr int LS = BK + 4; // floats, score rows; the probabilities overwrite them as halves
  constexpr int LP = 2 * LS; // halves, probability rows
  constexpr int LO = D + 4;  // floats, output staging rows
  // q_s, k_s and v_s in one buffer, which the output staging at the end reuses.
  constexpr int QKV_BYTES = (BQ + 2 * BK) * LD * sizeof(T);
  static_assert(QKV_BYTES >= BQ * LO * 4, "staging fits");
  __shared__ __align__(32) unsigned char qkv_s[QKV_BYTES];
  T *q_s = reinterpret_cast<T *>(qkv_s);
  T *k_s = q_s + BQ * LD;
  T *v_s = k_s + BK * LD;
  __shared__ __align__(32) float s_s[WARPS][16 * LS];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long q0 = (long long)blockIdx.x * BQ, h = blockIdx.y, bi = blockIdx.z;
  const long long hk = h / (a.hq / a.hkv);
  const T *qb = q + a.q_off + bi * a.q_sb + h * a.q_sh;
  const T *kb = k + a.k_off + bi * a.k_sb + hk * a.k_sh;
  const T *vb = v + a.v_off + bi * a.v_sb + hk * a.v_sh;
  // 16-byte loads when every row of q, k and v starts 16-byte aligned.
  constexpr long long V = 16 / sizeof(T);
  const bool vec = (a.q_off | a.q_sb | a.q_sh | a.q_st | a.k_off | a.k_sb | a.k_sh | a.k_st |
                    a.v_off | a.v_sb | a.v_sh | a.v_st) % V == 0 &&
                   (reinterpret_cast<unsigned long long>(q) | reinterpret_cast<unsigned long long>(k) |
                    reinterpret_cast<unsigned long long>(v)) % 16 == 0;

  load_tile<T, D, LD>(q_s, qb + q0 * a.q_st, BQ, a.s - q0, a.q_st, vec);
  // Keys past the last query of the block are all masked when causal.
  long long keys = a.sk;
  if (a.causal) keys = min(keys, q0 + BQ);
  const long long tiles = (keys + BK - 1) / BK;

  // Each lane owns half a row of the warp's 16 × BK scores: row lane/2, the columns of its
  // parity (lane%2 + 2i), so that the 32 lanes touch 16 banks at a time, not 2.
  const int row = lane / 2, par = lane % 2;
  const long long qi = q0 + warp * 16 + row; // this lane's query
  float m = -CUDART_INF_F, l = 0.f;
  float *sr = s_s[warp] + row * LS;

  // The warp's scores for key tile `t`, rounded as eager attention rounds them, into s_s[warp];
  // masked (causal, or past the last key) as −∞.
  auto scores = [&](long long t) {
    __syncthreads(); // the previous tile's k_s/v_s/probabilities are no longer read
    load_tile<T, D, LD>(k_s, kb + t * BK * a.k_st, BK, a.sk - t * BK, a.k_st, vec);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    for (int n = 0; n < BK / 16; ++n) {
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::load_matrix_sync(fa, q_s + warp * 16 * LD + kk * 16, LD);
        wmma::load_matrix_sync(fb, k_s + n * 16 * LD + kk * 16, LD);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(s_s[warp] + n * 16, acc, LS, wmma::mem_row_major);
    }
    __syncwarp();
    for (int i = 0; i < BK / 2; ++i) {
      const int c = par + 2 * i;
      const long long j = t * BK + c;
      const float rounded = as_f32(from_f32<T>(sr[c]));
      const float scaled = as_f32(from_f32<T>(rounded * a.scale));
      const bool masked = j >= a.sk || (a.causal && j > qi);
      sr[c] = masked ? -CUDART_INF_F : scaled;
    }
  };

  // Pass 1: each row's max and sum of exponentials.
  for (long long t = 0; t < tiles; ++t) {
    scores(t);
    for (int i = 0; i < BK / 2; ++i) accumulate(m, l, sr[par + 2 * i]);
    __syncwarp();
  }
  combine(m, l, __shfl_xor_sync(0xffffffff, m, 1), __shfl_xor_sync(0xffffffff, l, 1));

  // Pass 2: p = round_T(exp(v − m) / l), o += p · v.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> out[D / 16];
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(out[n], 0.f);
  T *p_w = reinterpret_cast<T *>(s_s[warp]); // the warp's probabilities, rows of LP halves
  for (long long t = 0; t < tiles; ++t) {
    scores(t);
    load_tile<T, D, LD>(v_s, vb + t * BK * a.v_st, BK, a.sk - t * BK, a.v_st, vec);
    // The probabilities overwrite the scores' row in place: every lane reads its scores first.
    float p[BK / 2];
    for (int i = 0; i < BK / 2; ++i) {
      const float x = sr[par + 2 * i];
      p[i] = x == -CUDART_INF_F ? 0.f : expf(x - m) / l;
    }
    __syncwarp();
    for (int i = 0; i < BK / 2; ++i) p_w[row * LP + par + 2 * i] = from_f32<T>(p[i]);
    __syncthreads(); // v_s loaded by every warp, the probabilities by every lane
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fv;
    for (int kk = 0; kk < BK / 16; ++kk) {
      wmma::load_matrix_sync(fp, p_w + kk * 16, LP);
      for (int n = 0; n < D / 16; ++n) {
        wmma::load_matrix_sync(fv, v_s + kk * 16 * LD + n * 16, LD);
        wmma::mma_sync(out[n], fp, fv, out[n]);
      }
    }
  }

  // Stage the warp's 16 × D outputs in f32 (over q_s, k_s, v_s: no warp reads them any more),
  // round once, write [batch, query, head, D].
  __syncthreads();
  float *o_s = reinterpret_cast<float *>(qkv_s) + warp * 16 * LO;
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(o_s + n * 16, out[n], LO, wmma::mem_row_major);
  }
  __syncwarp();
  for (int e = lane; e < 16 * D; e += 32) {
    const int r = e / D, c = e % D;
    const long long i = q0 + warp * 16 + r;
    if (i < a.s) o[((bi * a.s + i) * a.hq + h) * D + c] = from_f32<T>(o_s[r * LO + c]);
  }
}

} // namespace flash

#define FLASH(NAME, T, D)                                                                        \
  extern "C" __global__ void __launch_bounds__(flash::WARPS * 32)                                \
      NAME(const T *q, const T *k, const T *v, T *o, const flash::Args a) {                      \
    flash::attend<T, D>(q, k, v, o, a);                                                          \
  }
FLASH(flash_attention_bf16_d64, __nv_bfloat16, 64)
FLASH(flash_attention_bf16_d80, __nv_bfloat16, 80)
FLASH(flash_attention_bf16_d128, __nv_bfloat16, 128)
FLASH(flash_attention_f16_d64, __half, 64)
FLASH(flash_attention_f16_d80, __half, 80)
FLASH(flash_attention_f16_d128, __half, 128)
