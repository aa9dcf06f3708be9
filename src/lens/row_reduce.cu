// One pass over a [rows, cols] block of logits: per row the max and the sum of exp(z - max),
// accumulated online in f32 (the lens's summary and log-sum-exp). One CUDA block per row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

__device__ __forceinline__ float as_f32(float x) { return x; }
__device__ __forceinline__ float as_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float as_f32(__half x) { return __half2float(x); }

__device__ __forceinline__ void combine(float &m, float &s, float m2, float s2) {
  float mn = fmaxf(m, m2);
  float a = (m == -CUDART_INF_F) ? 0.f : s * expf(m - mn);
  float b = (m2 == -CUDART_INF_F) ? 0.f : s2 * expf(m2 - mn);
  m = mn;
  s = a + b;
}

template <typename T>
__device__ void row_max_sumexp(const T *z, float *out, long long cols) {
  const T *row = z + (long long)blockIdx.x * cols;
  float m = -CUDART_INF_F, s = 0.f;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
    float v = as_f32(row[j]);
    if (v > m) {
      s = (m == -CUDART_INF_F) ? 1.f : s * expf(m - v) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    float m2 = __shfl_down_sync(0xffffffff, m, off);
    float s2 = __shfl_down_sync(0xffffffff, s, off);
    combine(m, s, m2, s2);
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
      float m2 = __shfl_down_sync(0xffffffff, m, off);
      float s2 = __shfl_down_sync(0xffffffff, s, off);
      combine(m, s, m2, s2);
    }
    if (lane == 0) {
      out[2 * blockIdx.x] = m;
      out[2 * blockIdx.x + 1] = s;
    }
  }
}

extern "C" __global__ void row_max_sumexp_f32(const float *z, float *out, long long cols) { row_max_sumexp(z, out, cols); }
extern "C" __global__ void row_max_sumexp_bf16(const __nv_bfloat16 *z, float *out, long long cols) { row_max_sumexp(z, out, cols); }
extern "C" __global__ void row_max_sumexp_f16(const __half *z, float *out, long long cols) { row_max_sumexp(z, out, cols); }
