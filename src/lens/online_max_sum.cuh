// Shared by the lens's row reduction (row_reduce.cu) and attention's fused softmax
// (../models/fused/attention.cu): a row's max and sum of exp(v - max), accumulated online in f32, one
// CUDA block per row. Also the half <-> f32 conversions of every kernel (../models/fused/kernels.cu too).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

__device__ __forceinline__ float as_f32(float x) { return x; }
__device__ __forceinline__ float as_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float as_f32(__half x) { return __half2float(x); }

// f32 to T, rounded to nearest even (as the half crate's from_f32).
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

// Merges (m2, s2) into (m, s).
__device__ __forceinline__ void combine(float &m, float &s, float m2, float s2) {
  float mn = fmaxf(m, m2);
  float a = (m == -CUDART_INF_F) ? 0.f : s * expf(m - mn);
  float b = (m2 == -CUDART_INF_F) ? 0.f : s2 * expf(m2 - mn);
  m = mn;
  s = a + b;
}

// Adds one value to a thread's running (max, sum); −∞ (a masked value) adds nothing.
__device__ __forceinline__ void accumulate(float &m, float &s, float v) {
  if (v == -CUDART_INF_F) return;
  if (v > m) {
    s = (m == -CUDART_INF_F) ? 1.f : s * expf(m - v) + 1.f;
    m = v;
  } else {
    s += expf(v - m);
  }
}

// Merges every thread's (m, s) across the block; every thread gets the row's (max, sum).
__device__ __forceinline__ void block_max_sum(float &m, float &s) {
  for (int off = 16; off > 0; off >>= 1) {
    combine(m, s, __shfl_down_sync(0xffffffff, m, off), __shfl_down_sync(0xffffffff, s, off));
  }
  __shared__ float sm[32], ss[32];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sm[warp] = m; ss[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    int warps = (blockDim.x + 31) >> 5;
    m = lane < warps ? sm[lane] : -CUDART_INF_F;
    s = lane < warps ? ss[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      combine(m, s, __shfl_down_sync(0xffffffff, m, off), __shfl_down_sync(0xffffffff, s, off));
    }
    if (lane == 0) { sm[0] = m; ss[0] = s; }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
}
