// One pass over a [rows, cols] block of logits: per row the max and the sum of exp(z - max),
// accumulated online in f32 (the lens's summary and log-sum-exp). One CUDA block per row.
#include "online_max_sum.cuh"

template <typename T>
__device__ void row_max_sumexp(const T *z, float *out, long long cols) {
  const T *row = z + (long long)blockIdx.x * cols;
  float m = -CUDART_INF_F, s = 0.f;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) accumulate(m, s, as_f32(row[j]));
  block_max_sum(m, s);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = m;
    out[2 * blockIdx.x + 1] = s;
  }
}

extern "C" __global__ void row_max_sumexp_f32(const float *z, float *out, long long cols) { row_max_sumexp(z, out, cols); }
extern "C" __global__ void row_max_sumexp_bf16(const __nv_bfloat16 *z, float *out, long long cols) { row_max_sumexp(z, out, cols); }
extern "C" __global__ void row_max_sumexp_f16(const __half *z, float *out, long long cols) { row_max_sumexp(z, out, cols); }

// The vocabulary in tiles: `acc` [rows, 2] holds each row's (max, sum) over the earlier tiles; this
// tile's are folded in (one launch a tile, and no combining pass after the last).
extern "C" __global__ void row_max_sumexp_fold_f32(const float *z, float *acc, long long cols) {
  const float *row = z + (long long)blockIdx.x * cols;
  float m = -CUDART_INF_F, s = 0.f;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) accumulate(m, s, row[j]);
  block_max_sum(m, s);
  if (threadIdx.x == 0) {
    combine(m, s, acc[2 * blockIdx.x], acc[2 * blockIdx.x + 1]);
    acc[2 * blockIdx.x] = m;
    acc[2 * blockIdx.x + 1] = s;
  }
}

// The rows that want detail (top-k, target ranks), one vocabulary tile at a time, so that their
// logits never leave the card: per row of `z` [rows, cols] (f32, the entries v0..v0+cols), one
// block writes `out` [rows, 5 + 2k + 2T] as the host's twin does (lens/row.rs, RowState::tile_part):
//   m, s = sum e^(z-m), t = sum e^(z-m)(z-m) (each summed in f64 across the block and written as
//   two f32, the value and its remainder, so that the host adds the tiles up in f64);
//   the k highest (z desc, id asc; ids whose `excluded` flag is set left out; NaNs never), ids as
//   f32 (-1 past the tile's entries) then their logits (-inf there);
//   per target j (ids `tids`, the row's logits `cmp` [rows, T]): how many of the tile's entries
//   other than the target's own exceed cmp[j], then its own logit where the tile holds it (else
//   cmp[j]).
// `excluded`: null, or one flag per vocabulary entry (u32). 1 <= k <= DETAIL_MAX_K (cuda.rs checks);
// blockDim.x a multiple of 32, at most 1024.
#define DETAIL_HEAD 5
#define DETAIL_MAX_K 100
#define DETAIL_TARGET_GROUP 256

// Whether candidate (za, ia) ranks before (zb, ib): higher logit, then lower id; an empty one
// (id 0xffffffff) never does.
__device__ __forceinline__ bool ranks_before(float za, unsigned ia, float zb, unsigned ib) {
  if (ia == 0xffffffffu) return false;
  if (ib == 0xffffffffu) return true;
  return za > zb || (za == zb && ia < ib);
}

extern "C" __global__ void detail_tile_f32(const float *z, long long cols, const float *cmp, const unsigned *tids,
                                           int n_targets, const unsigned *excluded, long long v0, int k, float *out) {
  __shared__ float sh_f[32];
  __shared__ double sh_s[32], sh_t[32];
  __shared__ unsigned sh_id[32];
  __shared__ float sh_cmp[DETAIL_TARGET_GROUP];
  __shared__ long long sh_own[DETAIL_TARGET_GROUP];
  __shared__ unsigned sh_count[DETAIL_TARGET_GROUP];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  const float *row = z + (long long)blockIdx.x * cols;
  const int width = DETAIL_HEAD + 2 * k + 2 * n_targets;
  float *o = out + (long long)blockIdx.x * width;

  // The tile's max (NaNs ignored, as f32::max does).
  float m = -CUDART_INF_F;
  for (long long i = tid; i < cols; i += blockDim.x) m = fmaxf(m, row[i]);
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  if (lane == 0) sh_f[warp] = m;
  __syncthreads();
  m = -CUDART_INF_F;
  for (int w = 0; w < warps; ++w) m = fmaxf(m, sh_f[w]);
  __syncthreads();

  // The sums, and each thread's own top-k of its entries (ascending ids, so a later equal logit
  // goes after the earlier).
  float s = 0.f, t = 0.f;
  float lz[DETAIL_MAX_K];
  unsigned lid[DETAIL_MAX_K];
  int len = 0;
  // The lowest logit kept once the list is full (the entry to beat); −∞ admits any until then.
  float kth = -CUDART_INF_F;
  for (long long i = tid; i < cols; i += blockDim.x) {
    float v = row[i];
    float d = v - m;
    float e = expf(d);
    s += e;
    t += e * d;
    // Most entries fall at the threshold, before the excluded flag is read.
    if (len == k ? !(v > kth) : v != v) continue;
    unsigned id = (unsigned)(v0 + i);
    if (excluded != nullptr && excluded[id]) continue;
    int p = len < k ? len : k - 1;
    while (p > 0 && lz[p - 1] < v) {
      lz[p] = lz[p - 1];
      lid[p] = lid[p - 1];
      --p;
    }
    lz[p] = v;
    lid[p] = id;
    if (len < k) ++len;
    if (len == k) kth = lz[k - 1];
  }
  double ds = s, dt = t;
  for (int off = 16; off > 0; off >>= 1) {
    ds += __shfl_xor_sync(0xffffffff, ds, off);
    dt += __shfl_xor_sync(0xffffffff, dt, off);
  }
  if (lane == 0) {
    sh_s[warp] = ds;
    sh_t[warp] = dt;
  }
  __syncthreads();
  if (tid == 0) {
    double S = 0.0, T = 0.0;
    for (int w = 0; w < warps; ++w) {
      S += sh_s[w];
      T += sh_t[w];
    }
    o[0] = m;
    o[1] = (float)S;
    o[2] = (float)(S - (double)(float)S);
    o[3] = (float)T;
    o[4] = (float)(T - (double)(float)T);
  }

  // The block's top-k: k rounds, each taking the best of the threads' heads.
  int head = 0;
  for (int r = 0; r < k; ++r) {
    float cz = head < len ? lz[head] : -CUDART_INF_F;
    unsigned cid = head < len ? lid[head] : 0xffffffffu;
    for (int off = 16; off > 0; off >>= 1) {
      float oz = __shfl_xor_sync(0xffffffff, cz, off);
      unsigned oid = __shfl_xor_sync(0xffffffff, cid, off);
      if (ranks_before(oz, oid, cz, cid)) {
        cz = oz;
        cid = oid;
      }
    }
    __syncthreads();  // the previous round's readers are done with sh_f / sh_id
    if (lane == 0) {
      sh_f[warp] = cz;
      sh_id[warp] = cid;
    }
    __syncthreads();
    float bz = sh_f[0];
    unsigned bid = sh_id[0];
    for (int w = 1; w < warps; ++w) {
      if (ranks_before(sh_f[w], sh_id[w], bz, bid)) {
        bz = sh_f[w];
        bid = sh_id[w];
      }
    }
    if (tid == 0) {
      o[DETAIL_HEAD + r] = bid == 0xffffffffu ? -1.f : (float)bid;
      o[DETAIL_HEAD + k + r] = bid == 0xffffffffu ? -CUDART_INF_F : bz;
    }
    if (head < len && lid[head] == bid) ++head;
  }

  // The targets, a group at a time: the entries above each, but its own.
  for (int g = 0; g < n_targets; g += DETAIL_TARGET_GROUP) {
    const int n = min(DETAIL_TARGET_GROUP, n_targets - g);
    __syncthreads();
    for (int j = tid; j < n; j += blockDim.x) {
      long long own = (long long)tids[g + j] - v0;
      sh_cmp[j] = cmp[(long long)blockIdx.x * n_targets + g + j];
      sh_own[j] = own;
      sh_count[j] = 0;
      if (own >= 0 && own < cols) {
        o[DETAIL_HEAD + 2 * k + n_targets + g + j] = row[own];
      } else {
        o[DETAIL_HEAD + 2 * k + n_targets + g + j] = sh_cmp[j];
      }
    }
    __syncthreads();
    // Every lane of a warp goes round the same number of times (the ballots need them all).
    for (long long base = 0; base < cols; base += blockDim.x) {
      long long i = base + tid;
      float v = i < cols ? row[i] : 0.f;
      for (int j = 0; j < n; ++j) {
        bool above = i < cols && v > sh_cmp[j] && i != sh_own[j];
        unsigned ballot = __ballot_sync(0xffffffff, above);
        if (lane == 0 && ballot) atomicAdd(&sh_count[j], __popc(ballot));
      }
    }
    __syncthreads();
    for (int j = tid; j < n; j += blockDim.x) o[DETAIL_HEAD + 2 * k + g + j] = (float)sh_count[j];
  }
}
