//! Model families. Each implements [`VisionLanguageModel`]: turn (prompt, image) into inputs,
//! and run an instrumented forward pass that hands the residual stream after every block to an
//! observer. Nothing outside this module knows which family it is talking to.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::preprocess::image::Rgb8;

pub mod amx;
pub mod causal_lm;
pub mod cpu_attention;
pub mod decoder;
pub mod fastmath;
pub mod fused;
pub mod gemm;
pub mod layers;
pub mod llava;
pub mod llava_next;
pub mod llava_onevision;
pub mod profile;
pub mod qwen2_5_vl;
pub mod qwen2_vl;
pub mod qwen3_vl;
pub mod snapshot;
pub mod vit;
pub mod weight_names;

pub use layers::RmsNorm;

/// What kind of token sits at a position of the input sequence.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Text,
    Image,
    Special,
}

/// Where an image's tokens sit: a `rows × cols` grid in raster order from `first_position`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct ImageGrid {
    pub rows: usize,
    pub cols: usize,
    pub first_position: usize,
}

/// The pixels of one image as the family's vision tower takes them.
pub struct PixelInputs {
    pub pixel_values: Tensor,
    /// (t, h, w): Qwen2-VL's patch grid; LLaVA-OneVision's tile grid.
    pub grid_thw: [usize; 3],
    /// The image's size before preprocessing, (height, width).
    pub original_size: [usize; 2],
}

/// One image's features as the decoder takes them.
pub struct ImageFeatures {
    /// `[tokens, hidden]`, written over the image's placeholders.
    pub tokens: Tensor,
    /// DeepStack (Qwen3-VL): entry i, `[tokens, hidden]`, is added to the image positions'
    /// residual stream right after decoder block i. Empty for the other families.
    pub deepstack: Vec<Tensor>,
}

impl From<Tensor> for ImageFeatures {
    fn from(tokens: Tensor) -> Self {
        ImageFeatures {
            tokens,
            deepstack: Vec::new(),
        }
    }
}

/// A model-ready request: the token sequence after templating and placeholder expansion.
pub struct Prepared {
    pub input_ids: Vec<u32>,
    pub kinds: Vec<TokenKind>,
    pub image_grid: Option<ImageGrid>,
    pub num_image_tokens: usize,
    pub pixels: Option<PixelInputs>,
}

/// The model's own read-out: final norm, then unembedding (`lm_head`, or the tied embeddings),
/// then (Gemma 2) soft-capping of the logits.
pub struct LensHead {
    pub norm: RmsNorm,
    /// `[vocab, hidden]`
    pub unembed: Tensor,
    /// `final_logit_softcapping`: logits become `c · tanh(z / c)`.
    pub softcap: Option<f64>,
    /// The unembedding packed for the CPU lens's AMX GEMM ([`amx::pack`]: a CPU with AMX, the
    /// unembedding f32 on the CPU, its values bf16 or f16).
    pub packed: Option<std::sync::Arc<amx::PackedWeight>>,
}

impl LensHead {
    /// The decoder's final norm and the unembedding: `lm_head` when the snapshot has one and
    /// the config does not tie it, else the token embeddings (transformers' tying rule).
    pub fn new(
        text: &decoder::Decoder,
        weights: &snapshot::Weights,
        lm_head: &str,
        tied: bool,
    ) -> Result<Self> {
        let unembed = if !tied && weights.contains(lm_head) {
            weights.get(lm_head, text.embed_tokens.dims())?
        } else {
            text.embed_tokens.clone()
        };
        let packed = amx::pack(&unembed, unembed.dtype())?;
        if let Some(p) = &packed {
            // Kept beside the f32 unembedding, which the tensor paths still read.
            weights.note_packed(unembed.elem_count(), p.bytes(), false);
        }
        Ok(LensHead {
            norm: text.norm.clone(),
            unembed,
            softcap: text.config().gemma.as_ref().and_then(|g| g.final_softcap),
            packed,
        })
    }
}

/// Receives the residual stream `[seq, hidden]` at lens layer `index` (0 = input of block 1,
/// i = output of block i), as the forward pass produces it.
pub trait LayerObserver {
    fn observe(&mut self, index: usize, hidden: &Tensor) -> Result<()>;
    /// Whether the observer reads layer `index` through the model's final norm: the decoder then
    /// norms the whole batch's residual stream at once (one operation where each request would
    /// take one) and calls [`Self::observe_normed`] instead.
    fn wants_normed(&self, _index: usize) -> bool {
        false
    }
    /// [`Self::observe`] with `normed` = the final norm of `hidden` (`[seq, hidden]` both).
    fn observe_normed(&mut self, index: usize, hidden: &Tensor, _normed: &Tensor) -> Result<()> {
        self.observe(index, hidden)
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub family: &'static str,
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub dtype: String,
    pub device: String,
    /// Parameters loaded from the checkpoint (tied embeddings counted once).
    pub parameters: u64,
    /// The bytes they hold where they live ([`snapshot::Weights::loaded`]): their size in `dtype`,
    /// less on a CPU with AMX, where a linear stored in bf16 or f16 is held as its packing.
    pub weight_bytes: u64,
    /// Whether the model takes an image (a text-only language model does not).
    pub images: bool,
    /// The tokens that end an answer (`generate`): generation_config.json's `eos_token_id`, else
    /// config.json's, else the tokenizer's `eos_token`.
    pub stop_ids: Vec<u32>,
    /// The lens layers that read the residual stream after DeepStack added vision features at
    /// the image positions (Qwen3-VL: layer i + 1 for the features added after block i); empty
    /// for the other families.
    pub deepstack_layers: Vec<usize>,
}

impl ModelInfo {
    /// What a family's loader reports, from its decoder's config and the weights it loaded.
    pub fn new(
        name: &str,
        family: &'static str,
        snapshot: &snapshot::Snapshot,
        text: &decoder::DecoderConfig,
        weights: &snapshot::Weights,
        images: bool,
        tokenizer: &tokenizers::Tokenizer,
    ) -> Result<Self> {
        let (parameters, weight_bytes) = weights.loaded();
        Ok(ModelInfo {
            name: name.to_string(),
            family,
            architecture: snapshot.architecture(),
            num_layers: text.num_hidden_layers,
            hidden_size: text.hidden_size,
            vocab_size: text.vocab_size,
            dtype: format!("{:?}", weights.dtype).to_lowercase(),
            device: format!("{:?}", weights.device).to_lowercase(),
            parameters,
            weight_bytes,
            images,
            stop_ids: snapshot.stop_ids(tokenizer)?,
            deepstack_layers: Vec::new(),
        })
    }
}

pub trait VisionLanguageModel: Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn tokenizer(&self) -> &tokenizers::Tokenizer;
    /// Templating, image processing, placeholder expansion and tokenization.
    fn prepare(&self, prompt: &str, image: Option<&Rgb8>, chat_template: bool) -> Result<Prepared>;
    /// The features of several requests' images, in as few passes through the vision tower as
    /// the family allows (one, with attention kept within each image): entry i is image i's,
    /// ready to be written over its placeholders, what it gets alone.
    fn image_features(&self, pixels: &[&PixelInputs]) -> Result<Vec<ImageFeatures>>;
    /// The decoder's input: token embeddings with the image's features (from
    /// [`Self::image_features`]) in place, each token's `(t, h, w)` position, and any
    /// DeepStack additions.
    fn embed_with(
        &self,
        inputs: &Prepared,
        features: Option<ImageFeatures>,
    ) -> Result<decoder::DecoderInput>;
    /// [`Self::embed_with`] the request's own image features.
    fn embed(&self, inputs: &Prepared) -> Result<decoder::DecoderInput> {
        let features = match &inputs.pixels {
            Some(px) => self.image_features(&[px])?.pop(),
            None => None,
        };
        self.embed_with(inputs, features)
    }
    fn decoder(&self) -> &decoder::Decoder;
    fn head(&self) -> &LensHead;

    /// The instrumented forward: calls `observer` for lens layers `0..=num_layers`, in order.
    fn forward(&self, inputs: &Prepared, observer: &mut dyn LayerObserver) -> Result<()> {
        self.forward_batch(&[inputs], &mut [observer])
    }

    /// Several requests in one decoder pass (right-padded, so each request's numbers are what it
    /// gets alone); `observers[i]` sees request i's layers.
    fn forward_batch(
        &self,
        inputs: &[&Prepared],
        observers: &mut [&mut dyn LayerObserver],
    ) -> Result<()> {
        let embedded = self.embed_batch(inputs)?;
        let device = self.head().unembed.device().clone();
        profile::stage(
            &format!("decoder ({} sequence(s), lens per layer)", inputs.len()),
            &device,
            || self.decoder().forward_batch(embedded, observers),
        )?;
        profile::report_ops();
        Ok(())
    }

    /// The decoder inputs of several requests ([`Self::embed_with`]), every image of them through
    /// the vision tower together.
    fn embed_batch(&self, inputs: &[&Prepared]) -> Result<Vec<decoder::DecoderInput>> {
        let device = self.head().unembed.device().clone();
        // Every image of the batch through the vision tower together.
        let pixels: Vec<&PixelInputs> = inputs.iter().filter_map(|p| p.pixels.as_ref()).collect();
        let features = if pixels.is_empty() {
            Vec::new()
        } else {
            profile::stage(
                &format!("vision tower + projector ({} image(s))", pixels.len()),
                &device,
                || self.image_features(&pixels),
            )?
        };
        if features.len() != pixels.len() {
            return Err(Error::Internal(format!(
                "{} image features for {} images",
                features.len(),
                pixels.len()
            )));
        }
        let mut features = features.into_iter();
        let mut embedded = Vec::with_capacity(inputs.len());
        for p in inputs {
            let f = if p.pixels.is_some() {
                features.next()
            } else {
                None
            };
            embedded.push(self.embed_with(p, f)?);
        }
        Ok(embedded)
    }
}

/// One model family: the `architectures[0]` (or `model_type`) values its checkpoints carry, and
/// its loader. Adding a family is its folder and one line of [`FAMILIES`].
pub struct Family {
    pub name: &'static str,
    pub architectures: &'static [&'static str],
    pub load: Loader,
}

/// A family's loader: the opened snapshot, the model's name, where and in which dtype.
pub type Loader =
    fn(snapshot::Snapshot, &str, &Device, DType) -> Result<Box<dyn VisionLanguageModel>>;

/// Every family this crate implements.
pub const FAMILIES: &[Family] = &[
    qwen2_vl::FAMILY,        // Qwen2-VL
    qwen2_5_vl::FAMILY,      // Qwen2.5-VL
    qwen3_vl::FAMILY,        // Qwen3-VL (DeepStack)
    llava::FAMILY,           // LLaVA-1.5
    llava_next::FAMILY,      // LLaVA-NeXT (v1.6)
    llava_onevision::FAMILY, // LLaVA-OneVision
    causal_lm::FAMILY,       // text-only: Llama, Mistral, Qwen2, Qwen3
];

/// Every architecture some family takes, for messages.
pub fn supported_architectures() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.architectures.iter().copied())
        .filter(|a| a.contains("For"))
        .collect()
}

/// Loads a snapshot directory, choosing the family from its config.
pub fn load(
    dir: &Path,
    name: &str,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn VisionLanguageModel>> {
    let snapshot = snapshot::Snapshot::open(dir)?;
    let arch = snapshot.architecture();
    match FAMILIES
        .iter()
        .find(|f| f.architectures.contains(&arch.as_str()))
    {
        Some(family) => (family.load)(snapshot, name, device, dtype),
        None => Err(Error::UnsupportedArchitecture(format!(
            "{}: architecture `{arch}` is not supported; supported: {}",
            dir.display(),
            supported_architectures().join(", ")
        ))),
    }
}

/// The dtype the weights are stored in, from config.json (`torch_dtype`, or transformers 5's
/// `dtype`), top level or in `text_config`; f32 when none is given.
pub fn checkpoint_dtype(dir: &Path) -> Result<DType> {
    let snapshot = snapshot::Snapshot::open(dir)?;
    let c = &snapshot.config;
    let name = ["torch_dtype", "dtype"]
        .iter()
        .find_map(|k| {
            c.get(*k)
                .or_else(|| c.get("text_config").and_then(|t| t.get(*k)))
                .and_then(|v| v.as_str())
        })
        .unwrap_or("float32");
    Ok(match name {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        _ => DType::F32,
    })
}

/// `auto` (the first GPU when built with CUDA and one is present, else the CPU), `cpu`, `cuda`
/// or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let device = parse_device_spec(spec)?;
    #[cfg(feature = "cuda")]
    {
        keep_freed_device_memory(&device);
        no_event_tracking(&device);
    }
    Ok(device)
}

fn parse_device_spec(spec: &str) -> Result<Device> {
    let cuda = |n: usize| {
        Device::new_cuda(n).map_err(|e| {
            Error::InvalidOption(format!(
                "device `{spec}` is not available ({e}); this binary needs the `cuda` feature and a visible GPU"
            ))
        })
    };
    match spec {
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => Err(Error::InvalidOption(format!(
                "device `{spec}`: use auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// CUDA's stream-ordered allocator (which candle uses where the card supports it) returns every
/// freed byte to the driver at each synchronisation by default, i.e. after every request, so the
/// next request maps its memory afresh. Keep it instead, as torch's caching allocator does: the
/// process holds its peak (as on the CPU with mimalloc). `LOGIT_LENS_GPU_RELEASE_MEMORY=1` keeps
/// the driver's default. A card without memory pools, or a failure here, changes nothing.
#[cfg(feature = "cuda")]
fn keep_freed_device_memory(device: &Device) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return;
    };
    if std::env::var("LOGIT_LENS_GPU_RELEASE_MEMORY").is_ok_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    let stream = cuda.cuda_stream();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut keep: u64 = u64::MAX;
    // SAFETY: plain driver calls on a valid device handle; `keep` outlives the call, which copies it.
    let r = unsafe {
        sys::cuDeviceGetMemPool(&mut pool, stream.context().cu_device())
            .result()
            .and_then(|_| {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                )
                .result()
            })
    };
    if let Err(e) = r {
        eprintln!("note: freed GPU memory will be returned to the driver ({e:?})");
    }
}

/// cudarc gives every device buffer two CUDA events (created at allocation, destroyed when it is
/// freed: four driver calls per candle operation's output), which it records and waits on only
/// once a second stream exists in the context. candle's device is one stream (its per-thread
/// default stream; cuBLAS and the cuDNN attention run on it too) and this program makes no other,
/// so the events are never used: buffers are made without them. `LOGIT_LENS_CUDA_EVENTS=1` keeps
/// cudarc's default (to measure one against the other; `gpu_tests` in profile.rs prints both).
#[cfg(feature = "cuda")]
fn no_event_tracking(device: &Device) {
    let Device::Cuda(cuda) = device else {
        return;
    };
    if std::env::var("LOGIT_LENS_CUDA_EVENTS").is_ok_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    // SAFETY: cudarc's events order a buffer's uses across streams; with one stream (above) the
    // stream's own order is the only one there is, and cudarc does not record them anyway.
    unsafe { cuda.disable_event_tracking() };
}

/// The f32 elements a CPU tensor's storage holds: more than its own where it is a view of a larger
/// tensor (which it keeps in memory).
#[cfg(test)]
pub(crate) fn stored_elements(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => s.as_slice::<f32>().map_or(0, <[f32]>::len),
        _ => unreachable!("a CPU tensor"),
    }
}

/// The largest absolute difference between two tensors of one shape (any dtype, any device), in
/// f64.
#[cfg(test)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `--dtype`: `auto` (None), f32, bf16 or f16.
pub fn dtype_choice(spec: &str) -> Result<Option<DType>> {
    match spec {
        "auto" => Ok(None),
        "f32" => Ok(Some(DType::F32)),
        "bf16" => Ok(Some(DType::BF16)),
        "f16" => Ok(Some(DType::F16)),
        other => Err(Error::InvalidOption(format!(
            "--dtype {other}: use auto, f32, bf16 or f16"
        ))),
    }
}

/// The dtype a model is loaded in: the one `--dtype` names, or for `auto` [`working_dtype`].
pub fn parse_dtype(spec: &str, dir: &Path, device: &Device) -> Result<DType> {
    match dtype_choice(spec)? {
        Some(dtype) => Ok(dtype),
        None => working_dtype(dir, device),
    }
}

/// Half precision only on an accelerator: on the CPU every model computes in f32.
pub fn working_dtype(dir: &Path, device: &Device) -> Result<DType> {
    if device.is_cpu() {
        Ok(DType::F32)
    } else {
        checkpoint_dtype(dir)
    }
}

/// Token kinds from the tokenizer's special tokens and the family's image placeholder id.
pub fn token_kinds(
    tokenizer: &tokenizers::Tokenizer,
    ids: &[u32],
    image_token_id: u32,
) -> Vec<TokenKind> {
    let special: std::collections::HashSet<u32> = tokenizer
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    ids.iter()
        .map(|id| {
            if *id == image_token_id {
                TokenKind::Image
            } else if special.contains(id) {
                TokenKind::Special
            } else {
                TokenKind::Text
            }
        })
        .collect()
}

/// The tokenizer must have produced exactly one placeholder per image feature.
pub fn check_image_tokens(kinds: &[TokenKind], expected: usize) -> Result<()> {
    let found = kinds.iter().filter(|k| **k == TokenKind::Image).count();
    if found != expected {
        return Err(Error::Internal(format!(
            "expected {expected} image tokens after expansion, the tokenizer produced {found}"
        )));
    }
    Ok(())
}

/// Writes `features` `[n, hidden]` over the `n` placeholder embeddings starting at `first`
/// (transformers' `masked_scatter` for one contiguous image).
pub fn scatter_image_features(embeds: Tensor, features: Tensor, first: usize) -> Result<Tensor> {
    let (s, n) = (embeds.dim(0)?, features.dim(0)?);
    if first + n > s {
        return Err(Error::Internal(format!(
            "{n} image features at {first} overflow a {s}-token sequence"
        )));
    }
    let features = features.to_dtype(embeds.dtype())?;
    Ok(Tensor::cat(
        &[
            embeds.narrow(0, 0, first)?,
            features,
            embeds.narrow(0, first + n, s - first - n)?,
        ],
        0,
    )?)
}
