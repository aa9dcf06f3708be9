// Fused half-precision kernels (src/models/fused/*.rs): each does in one launch what the op-by-op
// path (src/models/layers.rs) does with a chain of candle ops, with the same roundings in the same
// order. Their CPU twins are in the .rs files; the tests hold the twins to the op-by-op path.
//
// Exactness rules followed here:
// - f32 arithmetic that the op-by-op path does as separate ops (one candle kernel each, so each
//   result rounded to f32) is written with __fadd_rn / __fmul_rn / __fdiv_rn / __fsqrt_rn, which
//   nvcc never contracts into a fused multiply-add.
// - candle's `affine` (t / n, t + eps, t * 1.702) is `x * mul + add`, which nvcc contracts to
//   fma(x, mul, add) in candle's kernel: __fmaf_rn(x, mul, add) here (the same value, signed zeros
//   included).
// - f32 activations are candle's own CUDA expressions (candle-kernels unary.cu), written the same
//   way so that nvcc compiles them the same way.
// - Sums follow candle's CUDA fast_sum order (candle_sum below), so the norms equal candle's
//   op-by-op result on the GPU, not only up to summation order.
#include "../../lens/online_max_sum.cuh"

#ifndef M_2_SQRTPI
#define M_2_SQRTPI 1.12837916709551257390
#endif
#ifndef M_SQRT1_2
#define M_SQRT1_2 0.70710678118654752440
#endif

// Σ f(j) for j < n, in candle's CUDA sum order (candle-kernels reduce.cu): n ≤ 32: fast_sum_small,
// one thread adding left to right; else fast_sum: each of blockDim threads (blockDim = min(1024, n)
// rounded up to a power of two: the launch's) adds j = tid, tid + blockDim, ... starting from 0,
// then a shared-memory tree halves from blockDim / 2. Every thread gets the sum. `shr` holds
// blockDim floats; it is free again when this returns.
template <typename F>
__device__ __forceinline__ float candle_sum(float *shr, long long n, F f) {
  const unsigned tid = threadIdx.x;
  if (n <= 32) {
    if (tid == 0) {
      float s = 0.f;
      for (long long j = 0; j < n; ++j) s = __fadd_rn(s, f(j));
      shr[0] = s;
    }
  } else {
    float acc = 0.f;
    for (long long j = tid; j < n; j += blockDim.x) acc = __fadd_rn(acc, f(j));
    shr[tid] = acc;
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
      __syncthreads();
      if (tid < s) shr[tid] = __fadd_rn(shr[tid], shr[tid + s]);
    }
  }
  __syncthreads();
  const float total = shr[0];
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (LayerNorm::forward): per row of n, in f32: mean = Σx · inv_n + 0; xc = x − mean;
// var = Σxc² · inv_n + 0; y = xc / sqrt(var · 1 + eps) · w + b; rounded once to T. One block per
// row; the row is read three times (mostly from cache) and written once.
template <typename T>
__device__ void layer_norm(const T *x, const float *w, const float *b, T *y, long long n,
                           float inv_n, float eps) {
  __shared__ float shr[1024];
  const T *row = x + (long long)blockIdx.x * n;
  T *out = y + (long long)blockIdx.x * n;
  const float sum = candle_sum(shr, n, [&](long long j) { return as_f32(row[j]); });
  const float mean = __fmaf_rn(sum, inv_n, 0.f);
  const float ss = candle_sum(shr, n, [&](long long j) {
    const float c = __fsub_rn(as_f32(row[j]), mean);
    return __fmul_rn(c, c);
  });
  const float var = __fmaf_rn(ss, inv_n, 0.f);
  const float den = __fsqrt_rn(__fmaf_rn(var, 1.f, eps));
  for (long long j = threadIdx.x; j < n; j += blockDim.x) {
    const float c = __fsub_rn(as_f32(row[j]), mean);
    out[j] = from_f32<T>(__fadd_rn(__fmul_rn(__fdiv_rn(c, den), w[j]), b[j]));
  }
}

// RMSNorm as candle's rms_norm_slow (the half-precision RmsNorm::forward): per row of n, in f32:
// ms = Σx² · inv_n + 0; xn = round_T(x / sqrt(ms · 1 + eps)); y = round_T(xn · w), w in T. (`b`
// is unused: the launch passes the weight twice.)
template <typename T>
__device__ void rms_norm(const T *x, const T *w, const T *, T *y, long long n, float inv_n,
                         float eps) {
  __shared__ float shr[1024];
  const T *row = x + (long long)blockIdx.x * n;
  T *out = y + (long long)blockIdx.x * n;
  const float ss = candle_sum(shr, n, [&](long long j) {
    const float v = as_f32(row[j]);
    return __fmul_rn(v, v);
  });
  const float ms = __fmaf_rn(ss, inv_n, 0.f);
  const float den = __fsqrt_rn(__fmaf_rn(ms, 1.f, eps));
  for (long long j = threadIdx.x; j < n; j += blockDim.x) {
    const float xn = as_f32(from_f32<T>(__fdiv_rn(as_f32(row[j]), den)));
    out[j] = from_f32<T>(__fmul_rn(xn, as_f32(w[j])));
  }
}

extern "C" __global__ void layer_norm_bf16(const __nv_bfloat16 *x, const float *w, const float *b, __nv_bfloat16 *y, long long n, float inv_n, float eps) { layer_norm(x, w, b, y, n, inv_n, eps); }
extern "C" __global__ void layer_norm_f16(const __half *x, const float *w, const float *b, __half *y, long long n, float inv_n, float eps) { layer_norm(x, w, b, y, n, inv_n, eps); }
extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *w, const __nv_bfloat16 *b, __nv_bfloat16 *y, long long n, float inv_n, float eps) { rms_norm(x, w, b, y, n, inv_n, eps); }
extern "C" __global__ void rms_norm_f16(const __half *x, const __half *w, const __half *b, __half *y, long long n, float inv_n, float eps) { rms_norm(x, w, b, y, n, inv_n, eps); }

// ---------------------------------------------------------------------------------------------
// Activations (Activation::forward in half precision). act: 0 QuickGELU, 1 GELU (erf), 2 GELU
// (tanh), 3 SiLU. The f32 bodies are candle's CUDA ones (unary.cu: gelu_erf_fwd, gelu_fwd,
// silu_fwd, sigmoid_fwd; recipg(float) there divides 1.0 (a double) by the float: the same
// correctly rounded value as 1.0f / a).

__device__ __forceinline__ float gelu_erf_like_candle(float x) { return x * normcdff(x); }

__device__ __forceinline__ float gelu_tanh_like_candle(float x) {
  float x_sq = x * x;
  float x_cube = x_sq * x;
  float alpha = x + static_cast<float>(0.044715) * x_cube;
  return static_cast<float>(0.5) * x *
         (static_cast<float>(1.0) + tanhf(static_cast<float>(M_2_SQRTPI * M_SQRT1_2) * alpha));
}

__device__ __forceinline__ float silu_like_candle(float x) { return x / (static_cast<float>(1) + expf(-x)); }

__device__ __forceinline__ float sigmoid_like_candle(float x) { return 1.0f / (static_cast<float>(1) + expf(-x)); }

// act(x) rounded to T as the op-by-op path rounds it. QuickGELU: a = round_T(x · scale) (torch's
// Python-float multiply: candle's affine in f32), s = round_T(sigmoid(a)), round_T(x · s).
template <typename T>
__device__ __forceinline__ T act_one(T x, int act, float scale) {
  const float v = as_f32(x);
  switch (act) {
  case 0: {
    const float a = as_f32(from_f32<T>(__fmaf_rn(v, scale, 0.f)));
    const float s = as_f32(from_f32<T>(sigmoid_like_candle(a)));
    return from_f32<T>(__fmul_rn(v, s));
  }
  case 1: return from_f32<T>(gelu_erf_like_candle(v));
  case 2: return from_f32<T>(gelu_tanh_like_candle(v));
  default: return from_f32<T>(silu_like_candle(v));
  }
}

template <typename T>
__device__ void act(const T *x, T *y, long long n, int act, float scale) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = act_one(x[i], act, scale);
}

// The decoder MLP's act(gate) · up: round_T(round_T(act(gate)) · up), the product in f32.
template <typename T>
__device__ void act_mul(const T *gate, const T *up, T *y, long long n, int act, float scale) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = from_f32<T>(__fmul_rn(as_f32(act_one(gate[i], act, scale)), as_f32(up[i])));
}

extern "C" __global__ void act_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, long long n, int a, float scale) { act(x, y, n, a, scale); }
extern "C" __global__ void act_f16(const __half *x, __half *y, long long n, int a, float scale) { act(x, y, n, a, scale); }
extern "C" __global__ void act_mul_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *u, __nv_bfloat16 *y, long long n, int a, float scale) { act_mul(g, u, y, n, a, scale); }
extern "C" __global__ void act_mul_f16(const __half *g, const __half *u, __half *y, long long n, int a, float scale) { act_mul(g, u, y, n, a, scale); }

// ---------------------------------------------------------------------------------------------
// Rotate-half RoPE. x: [b, h, s, d] with element strides (sb, sh, ss, 1) from its (already
// offset) start; cos/sin: [s, d/2] (tsb = 0) or [b, s, d/2] (tsb = s·d/2), contiguous. Output
// contiguous [b, h, s, d]. One thread per pair (j, j + d/2).
//   half tables (rope):        y1 = rT(rT(x1·c) + rT(−x2·s)), y2 = rT(rT(x2·c) + rT(x1·s))
//   f32 tables (rope_in_f32):  y1 = rT(x1·c − x2·s),          y2 = rT(x1·s + x2·c), in f32
// (rT: round to T; the products and sums of two T values are computed in f32, as torch and candle
// do; no fused multiply-add: torch's f32 ops round each product.)

template <typename T>
__device__ __forceinline__ void pair_rot(T x1, T x2, T c, T s, T &y1, T &y2) {
  const float x1f = as_f32(x1), x2f = as_f32(x2), cf = as_f32(c), sf = as_f32(s);
  auto r = [](float a, float b) { return as_f32(from_f32<T>(__fmul_rn(a, b))); };
  y1 = from_f32<T>(__fadd_rn(r(x1f, cf), r(-x2f, sf)));
  y2 = from_f32<T>(__fadd_rn(r(x2f, cf), r(x1f, sf)));
}

template <typename T>
__device__ __forceinline__ void pair_rot(T x1, T x2, float c, float s, T &y1, T &y2) {
  const float x1f = as_f32(x1), x2f = as_f32(x2);
  y1 = from_f32<T>(__fsub_rn(__fmul_rn(x1f, c), __fmul_rn(x2f, s)));
  y2 = from_f32<T>(__fadd_rn(__fmul_rn(x1f, s), __fmul_rn(x2f, c)));
}

template <typename T, typename C>
__device__ void rope(const T *x, const C *cos, const C *sin, T *y, long long b, long long h,
                     long long s, long long d, long long sb, long long sh, long long ss,
                     long long tsb) {
  const long long half = d / 2;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= b * h * s * half) return;
  const long long j = i % half;
  long long r = i / half; // the (bi, hi, si) row, in output order
  const long long si = r % s;
  const long long hi = (r / s) % h;
  const long long bi = r / (s * h);
  const T *xr = x + bi * sb + hi * sh + si * ss;
  const long long t = bi * tsb + si * half + j;
  T y1, y2;
  pair_rot(xr[j], xr[j + half], cos[t], sin[t], y1, y2);
  T *yr = y + r * d;
  yr[j] = y1;
  yr[j + half] = y2;
}

#define ROPE(NAME, T, C)                                                                         \
  extern "C" __global__ void NAME(const T *x, const C *cos, const C *sin, T *y, long long b,      \
                                  long long h, long long s, long long d, long long sb,           \
                                  long long sh, long long ss, long long tsb) {                   \
    rope(x, cos, sin, y, b, h, s, d, sb, sh, ss, tsb);                                           \
  }
ROPE(rope_half_bf16, __nv_bfloat16, __nv_bfloat16)
ROPE(rope_half_f16, __half, __half)
ROPE(rope_f32_bf16, __nv_bfloat16, float)
ROPE(rope_f32_f16, __half, float)
