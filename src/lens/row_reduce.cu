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
