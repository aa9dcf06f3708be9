//! Building blocks shared by the model families, written to follow transformers' eager modules
//! operation by operation (see ../shared/docs/MODELS.md §6 for why the op order matters).

use candle_core::{DType, Device, Module, Tensor, D};

use crate::error::{Error, Result};
use crate::models::fastmath::with_cpu;
use crate::models::snapshot::Prefixed;
use crate::models::{amx, profile};

use crate::models::fused::{self, Kernel};

/// `y = x Wᵀ + b` over the last dimension of any-rank input.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// A Linear's weight: a tensor, or (f32 on a CPU with AMX, the values stored in bf16 or f16) only
/// its AMX packing ([`amx`]), no larger than the f32 tensor it replaces.
#[derive(Clone)]
enum Weight {
    Tensor(Tensor),
    Amx(std::sync::Arc<amx::PackedWeight>),
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Weight::Tensor(t) => write!(f, "Tensor({:?}, {:?})", t.dims(), t.dtype()),
            Weight::Amx(p) => write!(
                f,
                "Amx([{}, {}], {} pieces)",
                p.out_dim(),
                p.in_dim(),
                p.pieces()
            ),
        }
    }
}

impl Linear {
    pub fn load(w: &Prefixed, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get_stored("weight", (out_dim, in_dim))?;
        let bias = if bias {
            Some(w.get_stored("bias", out_dim)?)
        } else {
            None
        };
        w.linear(weight, bias)
    }

    /// A Linear of a model computing in `dtype`, from its weight and bias as the checkpoint stores
    /// them: the weight packed for AMX where [`amx::pack`] takes it (straight from the stored
    /// values), else converted to `dtype` as the bias is.
    pub fn new(weight: Tensor, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let weight = match amx::pack(&weight, dtype)? {
            Some(packed) => Weight::Amx(packed),
            None => Weight::Tensor(weight.to_dtype(dtype)?),
        };
        let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
        Ok(Linear { weight, bias })
    }

    /// The weight's element count and the bytes its AMX packing holds, where it is held so.
    pub fn packed_size(&self) -> Option<(usize, usize)> {
        match &self.weight {
            Weight::Amx(p) => Some((p.out_dim() * p.in_dim(), p.bytes())),
            Weight::Tensor(_) => None,
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        Ok(match &self.weight {
            Weight::Tensor(t) => t.dim(0)?,
            Weight::Amx(p) => p.out_dim(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims
            .last()
            .ok_or_else(|| Error::Internal("linear on a scalar".into()))?;
        let rows = x.elem_count() / in_dim.max(1);
        let x = x.reshape((rows, in_dim))?;
        let y = match &self.weight {
            // f32 on the CPU: the products exact, the sums f32 (amx.rs); the bias added after, as
            // candle's f32 path does.
            Weight::Amx(w) => amx::linear_bias(&x, w, self.bias.as_ref())?,
            // With a bias, one rounding in half precision, as torch's addmm (gemm.rs).
            Weight::Tensor(w) => match &self.bias {
                Some(b) => super::gemm::linear_bias(&x, w, b)?,
                None => super::gemm::matmul_nt(&x, w)?,
            },
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap_or(&mut 0) = self.out_dim()?;
        Ok(y.reshape(out_dims)?)
    }
}

/// Qwen2/Llama RMSNorm: `w · x / sqrt(mean(x²) + eps)`, statistics in f32.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Prefixed, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get("weight", dim)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?);
        }
        // Half precision, as transformers rounds it: normalise in f32, cast back, then multiply
        // by the weight in the model dtype (two roundings where candle's rms_norm has one; the
        // fused kernel behind the switch keeps both).
        if fused::applies(x, Kernel::RmsNorm) {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        Ok(candle_nn::ops::rms_norm_slow(
            x,
            &self.weight,
            self.eps as f32,
        )?)
    }
}

/// LayerNorm with weight and bias (kept in f32, where torch applies them; converted once at load).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Prefixed, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get("weight", dim)?.to_dtype(DType::F32)?,
            bias: w.get("bias", dim)?.to_dtype(DType::F32)?,
            eps,
        })
    }

    /// As torch computes it: in f32 with a two-pass (stable) variance, weight and bias applied in
    /// f32, one rounding to the model dtype. (candle's fused kernel takes E[x²] − E[x]², which
    /// loses digits when the mean is large against the spread, as it is deep in a ViT.)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::applies(x, Kernel::LayerNorm) {
            return fused::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        let dtype = x.dtype();
        if dtype == DType::F32 && x.device().is_cpu() {
            let dim = self.weight.dim(0)?;
            if x.dim(D::Minus1)? != dim {
                return Err(Error::Internal(format!(
                    "LayerNorm of width {dim} on {:?}",
                    x.dims()
                )));
            }
            let y = with_cpu(x, |x: &[f32]| {
                with_cpu(&self.weight, |w: &[f32]| {
                    with_cpu(&self.bias, |b: &[f32]| {
                        super::fastmath::layer_norm(x, dim, w, b, self.eps as f32)
                    })
                })
            })???;
            return Ok(Tensor::from_vec(y, x.shape().clone(), x.device())?);
        }
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// The activations transformers' `ACT2FN` names, as the configs spell them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)`
    QuickGelu,
    /// exact, erf-based GELU (`"gelu"`)
    Gelu,
    /// tanh approximation (`"gelu_pytorch_tanh"`, `"gelu_new"`)
    GeluTanh,
    Silu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(Error::Internal(format!(
                    "activation `{other}` is not implemented"
                )))
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if dtype != DType::F32 && dtype != DType::F64 {
            // Half precision as torch computes it: each op in f32, rounded once to the model dtype
            // (candle's half kernels for GELU and f16 SiLU compute in half arithmetic).
            if fused::applies(x, Kernel::Act) {
                return fused::activation(x, *self);
            }
            return Ok(match self {
                Activation::QuickGelu => {
                    let a = scale_like_torch(x, 1.702)?.to_dtype(DType::F32)?;
                    (x * candle_nn::ops::sigmoid(&a)?.to_dtype(dtype)?)?
                }
                // candle's f32 kernels, as the GPU's op-by-op path and the fused kernels' CPU
                // twins compute (fused/act.rs holds them to it bit for bit).
                other => other.op_by_op(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?,
            });
        }
        if let Some(y) = self.on_cpu(x, None)? {
            return Ok(y);
        }
        self.op_by_op(x)
    }

    /// f32 or f64 `x` through candle's kernels.
    fn op_by_op(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Silu => candle_nn::Activation::Silu.forward(x)?,
        })
    }

    /// `act(gate) · up` (a gated MLP): in half precision on a GPU one fused kernel when the
    /// switch names `act`, with the same roundings as `self.forward(gate)? * up`.
    pub fn then_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if fused::applies(gate, Kernel::Act)
            && gate.dims() == up.dims()
            && gate.dtype() == up.dtype()
        {
            return fused::activation_mul(gate, up, *self);
        }
        if gate.dims() == up.dims() {
            if let Some(y) = self.on_cpu(gate, Some(up))? {
                return Ok(y);
            }
        }
        Ok((self.forward(gate)? * up)?)
    }

    /// `act(x)` (`· up`, where given) in one vectorised pass on f32 CPU tensors
    /// ([`super::fastmath`]; candle's CPU kernels call libm's exp or tanh one value at a time and
    /// take a pass per op). None elsewhere, and for the erf GELU.
    fn on_cpu(&self, x: &Tensor, up: Option<&Tensor>) -> Result<Option<Tensor>> {
        use super::fastmath::{map, map_mul, GeluTanh, QuickGelu, Silu, Unary};
        // with_cpu makes its tensor contiguous where it is not.
        fn apply<U: Unary>(x: &Tensor, up: Option<&Tensor>) -> Result<Tensor> {
            let y = match up {
                None => with_cpu::<f32, _>(x, map::<U>)?,
                Some(up) => {
                    with_cpu::<f32, _>(x, |a| with_cpu::<f32, _>(up, |b| map_mul::<U>(a, b)))??
                }
            };
            Ok(Tensor::from_vec(y, x.shape().clone(), &Device::Cpu)?)
        }
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !f32_cpu(x) || !up.is_none_or(f32_cpu) {
            return Ok(None);
        }
        Ok(Some(match self {
            Activation::QuickGelu => apply::<QuickGelu>(x, up)?,
            Activation::GeluTanh => apply::<GeluTanh>(x, up)?,
            Activation::Silu => apply::<Silu>(x, up)?,
            Activation::Gelu => return Ok(None),
        }))
    }
}

/// Rotate-half rotary embedding. `x`: `[batch, heads, seq, head_dim]`; `cos`/`sin`:
/// `[seq, head_dim/2]` or `[batch, seq, head_dim/2]` (the first half of transformers' duplicated
/// `cat(freqs, freqs)` table). In f32 one fused kernel; in half precision transformers' own
/// order, `x·cos + rotate_half(x)·sin`, each product and the sum rounded to the model dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    // Fused: one kernel with the same roundings; reads a strided view of x in place.
    if fused::applies(x, Kernel::Rope) && fused::rope_fits(x, cos, sin, false) {
        return fused::rope(x, cos, sin);
    }
    let full = |t: &Tensor| -> Result<Tensor> {
        let t = Tensor::cat(&[t, t], t.rank() - 1)?;
        Ok(if t.rank() == 2 {
            t.unsqueeze(0)?.unsqueeze(0)?
        } else {
            t.unsqueeze(1)?
        })
    };
    let d = x.dim(3)?;
    let (x1, x2) = (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    Ok((x.broadcast_mul(&full(cos)?)? + rotated.broadcast_mul(&full(sin)?)?)?)
}

/// Rotate-half RoPE computed in f32 and rounded once to `x`'s dtype (Qwen2-VL's vision tower:
/// transformers upcasts q and k, rotates with f32 tables, casts back). `x`: `[batch, heads, seq,
/// head_dim]` in any dtype; `cos`/`sin`: f32 `[seq, head_dim/2]`.
pub fn rope_in_f32(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // Fused: one kernel, reading a strided head view (e.g. a `narrow` of packed q/k/v heads) in
    // place, without the f32 copies. On the CPU in f32 too: the same sums as candle's rope, which
    // needed a contiguous copy of the heads first (the real-size vision tower's rope: 0.32 s).
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    if (cpu_f32 || fused::applies(x, Kernel::Rope)) && fused::rope_fits(x, cos, sin, true) {
        return fused::rope_in_f32(x, cos, sin);
    }
    Ok(rope(&x.to_dtype(DType::F32)?, cos, sin)?.to_dtype(x.dtype())?)
}

/// The most attention scores (`groups × queries × keys` elements) one pass of [`attention`] holds:
/// 2^26. The op-by-op softmax keeps about 12 bytes per score in half precision (the scores, their
/// f32 copy, the f32 softmax, the probabilities: ~800 MiB at this size), the fused one 4; a batch
/// of requests, or a long sequence, goes through attention in slices of this size instead of
/// multiplying the transient memory (issue 5's bar: peak ≤ weights + 2 GiB at batch 8).
pub const ATTENTION_SCORES_BUDGET: usize = 1 << 26;

/// Scaled dot-product attention as transformers' eager path computes it: `softmax(q kᵀ · scale +
/// mask) v`, softmax in f32. `q`: `[b, hq, s, d]`, `k`/`v`: `[b, hkv, sk, d]` with `hq` a multiple
/// of `hkv` (grouped-query attention); `mask`: additive `[s, sk]` (the same for every batch entry
/// and head). Returns `[b, hq, s, d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    attention_within(q, k, v, mask, scale, ATTENTION_SCORES_BUDGET)
}

/// [`attention`] in slices of at most `budget` scores (at least one group per slice).
pub fn attention_within(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    attention_capped(q, k, v, mask, scale, None, budget)
}

/// [`attention`] with the scaled scores soft-capped before the mask, `c · tanh(s / c)` (Gemma 2's
/// `attn_logit_softcapping`), where `softcap` is given; op by op (no flash, no fused softmax).
pub fn attention_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
    budget: usize,
) -> Result<Tensor> {
    let (b, hq, s, d) = q.dims4()?;
    let (hkv, sk) = (k.dim(1)?, k.dim(2)?);
    if hkv == 0 || hq % hkv != 0 || k.dims()[0] != b || v.dims() != k.dims() {
        return Err(Error::Internal(format!(
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if let Some(m) = mask {
        if m.dims() != [s, sk] {
            return Err(Error::Internal(format!(
                "attention: mask {:?} for {s} queries and {sk} keys",
                m.dims()
            )));
        }
    }
    if mask.is_none() && softcap.is_none() {
        if let Some(out) = flash(q, k, v, false, scale)? {
            return Ok(out);
        }
    }
    if q.device().is_cpu() && q.dtype() == DType::F32 && softcap.is_none() {
        return profile::op("  attention: blocks of rows (CPU)", q.device(), || {
            super::cpu_attention::attention(q, k, v, mask, scale)
        });
    }
    // Grouped-query attention without copying k and v per query head: the `rep` query heads of a
    // group are consecutive, so `[b, hq, s, d]` is `[b·hkv, rep·s, d]` as it lies in memory, and
    // each group's queries meet its keys in one GEMM. Every score is the same dot product.
    let (rep, groups) = (hq / hkv, b * hkv);
    // LOGIT_LENS_PROFILE=2: attention's parts as groups of their own (nested in the caller's
    // "vision attention" / "decoder attention", summed over both).
    let dev = q.device().clone();
    let op = |name: &'static str, f: &mut dyn FnMut() -> Result<Tensor>| profile::op(name, &dev, f);
    let (q, k, v) = (
        op("  attention: q, k, v contiguous", &mut || {
            Ok(q.contiguous()?.reshape((groups, rep * s, d))?)
        })?,
        op("  attention: q, k, v contiguous", &mut || as_groups(k))?,
        op("  attention: q, k, v contiguous", &mut || as_groups(v))?,
    );
    let per = (budget / (rep * s * sk).max(1)).clamp(1, groups.max(1));
    let fused = q.device().is_cuda()
        && q.dtype() != DType::F32
        && softcap.is_none()
        && fused::enabled(Kernel::Softmax);
    let mut outs = Vec::with_capacity(groups.div_ceil(per));
    for g0 in (0..groups).step_by(per) {
        let g = per.min(groups - g0);
        // kᵀ as a transposed view: the GEMM reads it in place.
        let scores = op("  attention: q·kᵀ", &mut || {
            Ok(
                super::gemm::matmul(&q.narrow(0, g0, g)?, &k.narrow(0, g0, g)?.t()?)?
                    .reshape((g, rep, s, sk))?,
            )
        })?;
        // One kernel instead of four passes (see fused::softmax).
        let probs = op("  attention: softmax", &mut || {
            if fused {
                fused::softmax::scaled_masked_softmax(&scores, mask, scale)
            } else {
                attention_softmax_capped(&scores, mask, scale, softcap, scores.device().is_cpu())
            }
        })?;
        outs.push(op("  attention: probs·v", &mut || {
            super::gemm::matmul(&probs.reshape((g, rep * s, sk))?, &v.narrow(0, g0, g)?)
        })?);
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0).reshape((b, hq, s, d))?);
    }
    op("  attention: slices joined", &mut || {
        Ok(Tensor::cat(&outs, 0)?.reshape((b, hq, s, d))?)
    })
}

/// Keys or values `[b, hkv, sk, d]` as `[b·hkv, sk, d]` for batched GEMMs. One sequence whose
/// rows are contiguous (a generation step's view of its cache, whose head stride is the cache's
/// capacity) is read in place: the GEMMs take a batch stride. Anything else is made contiguous,
/// and so is any view in half precision on the CPU, where candle's matmul widens its operands'
/// whole storage to f32 at every call (a view of a pass's packed q/k/v projection: every head).
fn as_groups(t: &Tensor) -> Result<Tensor> {
    let (b, hkv, sk, d) = t.dims4()?;
    let s = t.stride();
    let widened_whole = t.device().is_cpu() && !matches!(t.dtype(), DType::F32 | DType::F64);
    if b == 1 && !widened_whole && (s[3] == 1 || d == 1) && (s[2] == d || sk == 1) {
        return Ok(t.squeeze(0)?);
    }
    Ok(t.contiguous()?.reshape((b * hkv, sk, d))?)
}

/// [`attention`] with `mask` the causal mask ([`causal_mask`]): flash attention takes it as a flag.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if let Some(out) = flash(q, k, v, true, scale)? {
        return Ok(out);
    }
    attention(q, k, v, Some(mask), scale)
}

/// Flash attention ([`fused::flash`]) where the switch names it and it applies (a GPU, half
/// precision, a head dim it takes, the head dimension contiguous): `[b, hq, s, d]`, a transposed
/// view of its `[b, s, hq, d]` output (so `.transpose(1, 2)` and a reshape give the rows the
/// output projection reads without a copy). None where it does not apply.
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<Option<Tensor>> {
    let (b, hq, s, d) = q.dims4()?;
    if !fused::flash::wanted(q)? {
        return Ok(None);
    }
    let view = |t| fused::flash::View::of(t);
    let (Some(qv), Some(kv), Some(vv)) = (view(q), view(k), view(v)) else {
        return Ok(None);
    };
    let dims = fused::flash::Dims {
        batch: b,
        heads: hq,
        kv_heads: k.dim(1)?,
        queries: s,
        keys: k.dim(2)?,
        head_dim: d,
    };
    let out = profile::op("  attention: flash", q.device(), || {
        fused::flash::fused_attention((q, qv), (k, kv), (v, vv), dims, causal, scale)
    })?;
    Ok(match out {
        Some(out) => Some(out.transpose(1, 2)?),
        None => None,
    })
}

/// `softmax(scores · scale + mask)` op by op, as transformers' eager attention: the scale as torch
/// rounds it, the mask and the softmax in f32, the result cast back to the scores' dtype.
pub fn attention_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    attention_softmax_with(scores, mask, scale, scores.device().is_cpu())
}

/// [`attention_softmax`] with the final softmax by candle's kernel (what a GPU runs op by op), or
/// (`fast_cpu`) by [`super::fastmath::scaled_softmax_rows`].
pub fn attention_softmax_with(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    fast_cpu: bool,
) -> Result<Tensor> {
    attention_softmax_capped(scores, mask, scale, None, fast_cpu)
}

/// [`attention_softmax_with`], the scaled scores soft-capped first where `softcap` is given (in
/// their dtype, as transformers: divide, tanh, multiply).
fn attention_softmax_capped(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
    fast_cpu: bool,
) -> Result<Tensor> {
    let dtype = scores.dtype();
    if fast_cpu && scores.device().is_cpu() && dtype == DType::F32 && softcap.is_none() {
        // The scale, the mask and the softmax in one pass over each row (the same f32 roundings
        // as op by op): the scores are read once and the probabilities written once.
        let mask = mask.map(|m| m.to_dtype(DType::F32)).transpose()?;
        return cpu_softmax(scores, scale as f32, mask.as_ref());
    }
    let scores = scale_like_torch(scores, scale)?;
    let scores = match softcap {
        Some(c) => softcap_like_torch(&scores, c)?,
        None => scores,
    };
    let scores = scores.to_dtype(DType::F32)?;
    // The mask is 0 or −∞: adding it in f32 gives what transformers' half-precision add gives.
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    if fast_cpu && scores.device().is_cpu() {
        return Ok(cpu_softmax(&scores, 1.0, None)?.to_dtype(dtype)?);
    }
    Ok(candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?)
}

/// `softmax(scores · scale + mask)` over the last dimension of f32 CPU scores by
/// [`super::fastmath::scaled_softmax_rows`] (candle's CPU softmax calls libm's exp one value at a
/// time: ~5 ns a value, which made it the vision towers' largest cost). `mask`: `[s, sk]` f32, for
/// scores `[…, s, sk]`.
fn cpu_softmax(scores: &Tensor, scale: f32, mask: Option<&Tensor>) -> Result<Tensor> {
    let n = scores.dim(D::Minus1)?;
    if let Some(m) = mask {
        if scores.rank() < 2 || m.dims() != [scores.dim(D::Minus2)?, n] {
            return Err(Error::Internal(format!(
                "attention softmax: mask {:?} for scores {:?}",
                m.dims(),
                scores.dims()
            )));
        }
    }
    let probs = with_cpu::<f32, _>(scores, |x| match mask {
        Some(m) => with_cpu::<f32, _>(m, |m| {
            super::fastmath::scaled_softmax_rows(x, n, scale, Some(m))
        }),
        None => Ok(super::fastmath::scaled_softmax_rows(x, n, scale, None)),
    })??;
    Ok(Tensor::from_vec(
        probs,
        scores.shape().clone(),
        &Device::Cpu,
    )?)
}

/// `x · c` as torch computes a Python float times a half-precision tensor: in f32, rounded once.
/// (candle's scalar multiply rounds `c` itself to the tensor's dtype first: 1.702 becomes
/// 1.703125 in bf16, 128^-0.5 loses its fourth digit; over dozens of layers that shows.)
pub fn scale_like_torch(x: &Tensor, c: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 || x.dtype() == DType::F64 {
        return Ok((x * c)?);
    }
    Ok((x.to_dtype(DType::F32)? * c)?.to_dtype(x.dtype())?)
}

/// `c · tanh(x / c)` as torch computes it on a tensor of the model dtype: each step rounded to
/// that dtype (Gemma 2's soft-capping of attention scores and logits).
pub fn softcap_like_torch(x: &Tensor, c: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let divisor = Tensor::new(c as f32, x.device())?;
    let y = x
        .to_dtype(DType::F32)?
        .broadcast_div(&divisor)?
        .to_dtype(dtype)?
        .tanh()?;
    scale_like_torch(&y, c)
}

/// Additive causal mask `[s, s]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(s: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (s, s), device)?.to_dtype(dtype)?)
}

/// `1 / base^(2j/dim)` for `j < dim/2`, in f32 as torch computes it.
pub fn inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| 1.0f32 / (base as f32).powf((2 * j) as f32 / dim as f32))
        .collect()
}

/// Gathers rows of `table` (`[n, h]`) for `ids`.
pub fn embed(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_slice(ids, ids.len(), table.device())?;
    Ok(table.index_select(&idx, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::max_diff;

    /// A Linear whose weights were stored in bf16 or f16 keeps only its AMX packing on a CPU with
    /// AMX, and gives, on a batch of any rank, within f32 rounding of the f64 product plus bias;
    /// an f32 weight (three pieces) stays a tensor. Packed from the stored values or from their
    /// f32 widening, the outputs are the same bits; a bf16 model packs nothing.
    #[test]
    fn half_precision_weights_multiply_on_amx_in_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2., (3, 37, 200), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 70, &dev).unwrap();
        let w32 = Tensor::randn(0f32, 0.1, (70, 200), &dev).unwrap();
        for stored in [DType::BF16, DType::F16, DType::F32] {
            let ws = w32.to_dtype(stored).unwrap();
            let w = ws.to_dtype(DType::F32).unwrap();
            let lin =
                Linear::new(ws.clone(), Some(b.to_dtype(stored).unwrap()), DType::F32).unwrap();
            let packed = matches!(lin.weight, Weight::Amx(_));
            assert_eq!(
                packed,
                amx::available() && stored != DType::F32,
                "{stored:?}"
            );
            let b = b.to_dtype(stored).unwrap().to_dtype(DType::F32).unwrap();
            let y = lin.forward(&x).unwrap();
            let widened = Linear::new(w.clone(), Some(b.clone()), DType::F32).unwrap();
            assert_eq!(matches!(widened.weight, Weight::Amx(_)), packed);
            let bits = |t: Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect::<Vec<_>>()
            };
            assert!(
                bits(widened.forward(&x).unwrap()) == bits(y.clone()),
                "{stored:?}: packed from the stored values and from f32 differ"
            );
            let half = Linear::new(ws.clone(), None, DType::BF16).unwrap();
            assert!(matches!(half.weight, Weight::Tensor(ref t) if t.dtype() == DType::BF16));
            assert_eq!(y.dims(), &[3, 37, 70]);
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = f64s(&x)
                .reshape((111, 200))
                .unwrap()
                .matmul(&f64s(&w).t().unwrap())
                .unwrap()
                .broadcast_add(&f64s(&b))
                .unwrap();
            let size = f64s(&x)
                .reshape((111, 200))
                .unwrap()
                .abs()
                .unwrap()
                .matmul(&f64s(&w).abs().unwrap().t().unwrap())
                .unwrap();
            let err = (f64s(&y).reshape((111, 70)).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .broadcast_div(&(size + 1.0).unwrap())
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(err < 2f64.powi(-20), "{stored:?} (packed: {packed}): {err}");
        }
    }

    /// Attention written out head by head, as transformers' eager path: k and v repeated per
    /// query head, scores, mask, softmax, weighted sum.
    fn head_by_head(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (b, hq, _, _) = q.dims4().unwrap();
        let rep = hq / k.dim(1).unwrap();
        let mut rows = Vec::new();
        for bi in 0..b {
            let mut heads = Vec::new();
            for h in 0..hq {
                let qh = q.get(bi).unwrap().get(h).unwrap();
                let kh = k.get(bi).unwrap().get(h / rep).unwrap();
                let vh = v.get(bi).unwrap().get(h / rep).unwrap();
                let scores = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
                let p = candle_nn::ops::softmax_last_dim(&(scores + mask).unwrap()).unwrap();
                heads.push(p.matmul(&vh).unwrap());
            }
            rows.push(Tensor::stack(&heads, 0).unwrap());
        }
        Tensor::stack(&rows, 0).unwrap()
    }

    /// f32 on the CPU: the row blocks of cpu_attention.rs, several a group, the causal mask's rows
    /// following each block's first row, and without a mask.
    #[test]
    fn cpu_attention_in_row_blocks_equals_attention_head_by_head() {
        let dev = Device::Cpu;
        let (b, hq, hkv, s, d) = (2, 4, 2, 300, 16);
        let r = |h| Tensor::randn(0f32, 1.0, (b, h, s, d), &dev).unwrap();
        let (q, k, v) = (r(hq), r(hkv), r(hkv));
        let mask = causal_mask(s, DType::F32, &dev).unwrap();
        let got = attention(&q, &k, &v, Some(&mask), 0.25).unwrap();
        let want = head_by_head(&q, &k, &v, &mask, 0.25);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        let zero = mask.zeros_like().unwrap();
        let got = attention(&q, &k, &v, None, 0.25).unwrap();
        let want = head_by_head(&q, &k, &v, &zero, 0.25);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // No queries, or no keys (a softmax over nothing, times nothing: zeros, as torch).
        let empty = |h, s| Tensor::zeros((b, h, s, d), DType::F32, &dev).unwrap();
        let got = attention(&empty(hq, 0), &k, &v, None, 0.25).unwrap();
        assert_eq!(got.dims(), &[b, hq, 0, d]);
        let got = attention(&q, &empty(hkv, 0), &empty(hkv, 0), None, 0.25).unwrap();
        assert_eq!(got.dims(), &[b, hq, s, d]);
        assert_eq!(
            got.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    /// The op-by-op path, in slices of the scores (f64 here: f32 on the CPU takes the row blocks
    /// above; half precision and the GPU take this path).
    #[test]
    fn attention_in_slices_equals_attention_head_by_head() {
        let dev = Device::Cpu;
        let (b, hq, hkv, s, d) = (3, 6, 2, 5, 8);
        let r = |h| Tensor::randn(0f64, 1.0, (b, h, s, d), &dev).unwrap();
        let (q, k, v) = (r(hq), r(hkv), r(hkv));
        let mask = causal_mask(s, DType::F64, &dev).unwrap();
        let want = head_by_head(&q, &k, &v, &mask, 0.3);
        // One slice; a group (3 query heads × 5 × 5 scores) at a time; two groups; less than one.
        for budget in [usize::MAX, 75, 150, 1] {
            let got = attention_within(&q, &k, &v, Some(&mask), 0.3, budget).unwrap();
            assert_eq!(got.dims(), &[b, hq, s, d]);
            assert_eq!(got.dtype(), DType::F64);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "budget {budget}: {diff}");
        }
        // A mask of another shape is refused, not broadcast in some other way, on both paths.
        let bad = causal_mask(s + 1, DType::F64, &dev).unwrap();
        assert!(attention(&q, &k, &v, Some(&bad), 0.3).is_err());
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let bad = f32s(&bad);
        assert!(attention(&f32s(&q), &f32s(&k), &f32s(&v), Some(&bad), 0.3).is_err());
    }

    /// A generation step's keys and values are views of its cache (`[1, hkv, capacity, d]`
    /// filled up to `sk`), read in place: the same numbers as their contiguous copy on both paths
    /// (f32 row blocks; f64 and bf16 op by op), the buffer's unfilled tail never read.
    #[test]
    fn keys_read_in_place_from_a_cache_equal_their_copy() {
        let dev = Device::Cpu;
        let (hq, hkv, sk, cap, d) = (4, 2, 7, 12, 8);
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let r = |h, s| {
                Tensor::randn(0f32, 1.0, (1, h, s, d), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // The tail past `sk` holds garbage that must not count.
            let (kb, vb) = ((r(hkv, cap) * 1e3).unwrap(), (r(hkv, cap) * 1e3).unwrap());
            kb.slice_set(&r(hkv, sk), 2, 0).unwrap();
            vb.slice_set(&r(hkv, sk), 2, 0).unwrap();
            let (k, v) = (kb.narrow(2, 0, sk).unwrap(), vb.narrow(2, 0, sk).unwrap());
            assert!(!k.is_contiguous());
            let (kc, vc) = (k.contiguous().unwrap(), v.contiguous().unwrap());
            for s in [1, 3] {
                let q = r(hq, s);
                let mask = Tensor::zeros((s, sk), dtype, &dev).unwrap();
                let got = attention(&q, &k, &v, Some(&mask), 0.3).unwrap();
                let want = attention(&q, &kc, &vc, Some(&mask), 0.3).unwrap();
                assert_eq!(max_diff(&got, &want), 0.0, "{dtype:?}, {s} queries");
                let got = attention_capped(&q, &k, &v, None, 0.3, Some(30.0), usize::MAX).unwrap();
                let want =
                    attention_capped(&q, &kc, &vc, None, 0.3, Some(30.0), usize::MAX).unwrap();
                assert_eq!(max_diff(&got, &want), 0.0, "{dtype:?}, {s} queries, capped");
            }
        }
    }
}
