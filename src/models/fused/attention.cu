// Attention's softmax in one pass (src/models/fused/softmax.rs): for each row of [rows, cols]
// half-precision scores, v = round_T(x · scale) + mask (as transformers' eager attention: a Python
// float times a half tensor is computed in f32 and rounded once; the mask is added in f32), then
// softmax in f32, rounded once to T. One CUDA block per row; the row is read twice (max and sum,
// then the output) and written once, instead of four full f32 passes.
#include "../../lens/online_max_sum.cuh"

template <typename T>
__device__ void scaled_masked_softmax(const T *x, const float *mask, long long mask_rows, T *y,
                                      long long cols, float scale) {
  const long long r = blockIdx.x;
  const T *row = x + r * cols;
  const float *mrow = mask + (r % mask_rows) * cols;
  T *out = y + r * cols;
  auto value = [&](long long j) { return as_f32(from_f32<T>(as_f32(row[j]) * scale)) + mrow[j]; };
  float m = -CUDART_INF_F, s = 0.f;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) accumulate(m, s, value(j));
  block_max_sum(m, s);
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) out[j] = from_f32<T>(expf(value(j) - m) / s);
}

// The same arithmetic with one warp per row, 8 rows a block, the row's max and sum merged by warp
// shuffles alone (no shared memory, no block barrier): for the short rows of attention (hundreds
// to a few thousand keys) the block-per-row kernel above spends more time in its block reduction
// and in launching one block per row than in the row (h100-run5: 0.55 ms for 53M scores, ~8× the
// time to read and write them). Opt-in (`warp-softmax`) until measured on a card.
template <typename T>
__device__ void scaled_masked_softmax_warp(const T *x, const float *mask, long long mask_rows, T *y,
                                           long long rows, long long cols, float scale) {
  const long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return; // the whole warp: r is the same for its lanes
  const int lane = threadIdx.x % 32;
  const T *row = x + r * cols;
  const float *mrow = mask + (r % mask_rows) * cols;
  T *out = y + r * cols;
  auto value = [&](long long j) { return as_f32(from_f32<T>(as_f32(row[j]) * scale)) + mrow[j]; };
  float m = -CUDART_INF_F, s = 0.f;
  for (long long j = lane; j < cols; j += 32) accumulate(m, s, value(j));
  for (int off = 16; off > 0; off >>= 1) {
    combine(m, s, __shfl_xor_sync(0xffffffff, m, off), __shfl_xor_sync(0xffffffff, s, off));
  }
  for (long long j = lane; j < cols; j += 32) out[j] = from_f32<T>(expf(value(j) - m) / s);
}

extern "C" __global__ void scaled_masked_softmax_warp_f32(const float *x, const float *mask, long long mask_rows, float *y, long long rows, long long cols, float scale) { scaled_masked_softmax_warp(x, mask, mask_rows, y, rows, cols, scale); }
extern "C" __global__ void scaled_masked_softmax_warp_bf16(const __nv_bfloat16 *x, const float *mask, long long mask_rows, __nv_bfloat16 *y, long long rows, long long cols, float scale) { scaled_masked_softmax_warp(x, mask, mask_rows, y, rows, cols, scale); }
extern "C" __global__ void scaled_masked_softmax_warp_f16(const __half *x, const float *mask, long long mask_rows, __half *y, long long rows, long long cols, float scale) { scaled_masked_softmax_warp(x, mask, mask_rows, y, rows, cols, scale); }

extern "C" __global__ void scaled_masked_softmax_f32(const float *x, const float *mask, long long mask_rows, float *y, long long cols, float scale) { scaled_masked_softmax(x, mask, mask_rows, y, cols, scale); }
extern "C" __global__ void scaled_masked_softmax_bf16(const __nv_bfloat16 *x, const float *mask, long long mask_rows, __nv_bfloat16 *y, long long cols, float scale) { scaled_masked_softmax(x, mask, mask_rows, y, cols, scale); }
extern "C" __global__ void scaled_masked_softmax_f16(const __half *x, const float *mask, long long mask_rows, __half *y, long long cols, float scale) { scaled_masked_softmax(x, mask, mask_rows, y, cols, scale); }
