// Attention's softmax in one pass (src/models/fused_softmax.rs): for each row of [rows, cols]
// half-precision scores, v = round_T(x · scale) + mask (as transformers' eager attention: a Python
// float times a half tensor is computed in f32 and rounded once; the mask is added in f32), then
// softmax in f32, rounded once to T. One CUDA block per row; the row is read twice (max and sum,
// then the output) and written once, instead of four full f32 passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ void combine(float &m, float &s, float m2, float s2) {
  float mn = fmaxf(m, m2);
  float a = (m == -CUDART_INF_F) ? 0.f : s * expf(m - mn);
  float b = (m2 == -CUDART_INF_F) ? 0.f : s2 * expf(m2 - mn);
  m = mn;
  s = a + b;
}

template <typename T>
__device__ void scaled_masked_softmax(const T *x, const float *mask, long long mask_rows, T *y,
                                      long long cols, float scale) {
  const long long r = blockIdx.x;
  const T *row = x + r * cols;
  const float *mrow = mask + (r % mask_rows) * cols;
  T *out = y + r * cols;
  float m = -CUDART_INF_F, s = 0.f;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
    float v = to_f32(from_f32<T>(to_f32(row[j]) * scale)) + mrow[j];
    if (v == -CUDART_INF_F) continue;
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
  __shared__ float row_max, row_sum;
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
    if (lane == 0) { row_max = m; row_sum = s; }
  }
  __syncthreads();
  m = row_max;
  s = row_sum;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
    float v = to_f32(from_f32<T>(to_f32(row[j]) * scale)) + mrow[j];
    out[j] = from_f32<T>(expf(v - m) / s);
  }
}

extern "C" __global__ void scaled_masked_softmax_f32(const float *x, const float *mask, long long mask_rows, float *y, long long cols, float scale) { scaled_masked_softmax(x, mask, mask_rows, y, cols, scale); }
extern "C" __global__ void scaled_masked_softmax_bf16(const __nv_bfloat16 *x, const float *mask, long long mask_rows, __nv_bfloat16 *y, long long cols, float scale) { scaled_masked_softmax(x, mask, mask_rows, y, cols, scale); }
extern "C" __global__ void scaled_masked_softmax_f16(const __half *x, const float *mask, long long mask_rows, __half *y, long long cols, float scale) { scaled_masked_softmax(x, mask, mask_rows, y, cols, scale); }
