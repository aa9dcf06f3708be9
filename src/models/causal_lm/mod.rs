//! Text-only causal language models: `LlamaForCausalLM` (Llama 2 / 3 / 3.1 / 3.2), `MistralForCausalLM`,
//! `Qwen2ForCausalLM` (Qwen2, Qwen2.5), `Qwen3ForCausalLM`, `Gemma2ForCausalLM` and
//! `Gemma3ForCausalLM` (Gemma 3 1B; the lens reads through Gemma's own `1 + w` final norm and,
//! for Gemma 2, its logit soft-capping): the logit lens as nostalgebraist first ran it, on the
//! decoder the VLM families already share. A request with an image is refused
//! (422, `image_not_accepted`).
//!
//! The prompt goes through the snapshot's chat template as `tokenizer.apply_chat_template(
//! [{"role": "user", "content": prompt}], add_generation_prompt=True)` renders and tokenizes it
//! (the template writes its own BOS, so no special tokens are added), or verbatim as
//! `tokenizer(prompt)` encodes it (the tokenizer's post-processor adds BOS where the model has one).

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::models::decoder::{sequential_positions, Decoder, DecoderConfig, DecoderInput};
use crate::models::snapshot::{Snapshot, Weights};
use crate::models::weight_names::Rename;
use crate::models::{
    token_kinds, Family, ImageFeatures, LensHead, ModelInfo, PixelInputs, Prepared,
    VisionLanguageModel,
};
use crate::preprocess::image::Rgb8;
use crate::preprocess::template::ChatTemplate;

pub const FAMILY: Family = Family {
    name: "causal_lm",
    architectures: &[
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
    ],
    load: |snapshot, name, device, dtype| {
        Ok(Box::new(CausalLm::load(snapshot, name, device, dtype)?))
    },
};

/// The hub's names are transformers' in-memory names (`model.*`, `lm_head.weight`); a bare
/// `*Model` checkpoint (the decoder without its head, as `AutoModel.save_pretrained` writes it)
/// has them without `model.`: transformers' `base_model_prefix` handling.
pub const WEIGHT_NAMES: &[Rename] = &[Rename::unless("", "model.", &["model.", "lm_head."])];

pub struct CausalLm {
    info: ModelInfo,
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    bos_token: String,
    eos_token: String,
    text: Decoder,
    head: LensHead,
}

impl CausalLm {
    pub fn load(snapshot: Snapshot, name: &str, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_err = |e: Error| snapshot.err(format!("config.json: {e}"));
        let root = &snapshot.config;
        let text_cfg = DecoderConfig::from_json(root, "llama").map_err(cfg_err)?;
        let tokenizer = snapshot.tokenizer()?;
        let template = snapshot
            .chat_template()?
            .map(|t| ChatTemplate::new(&t))
            .transpose()
            .map_err(|e| snapshot.err(e.to_string()))?;
        let bos_token = snapshot.special_token("bos_token")?.unwrap_or_default();
        let eos_token = snapshot.special_token("eos_token")?.unwrap_or_default();
        let weights = Weights::open(&snapshot, "causal_lm", WEIGHT_NAMES, dtype, device)?;
        let text = Decoder::load(&weights.pp("model"), &text_cfg)?;
        let head = LensHead::new(
            &text,
            &weights,
            "lm_head.weight",
            text_cfg.tie_word_embeddings,
        )?;
        let info = ModelInfo::new(
            name,
            "causal_lm",
            &snapshot,
            &text_cfg,
            &weights,
            false,
            &tokenizer,
        )?;
        Ok(CausalLm {
            info,
            tokenizer,
            template,
            bos_token,
            eos_token,
            text,
            head,
        })
    }

    fn no_images() -> Error {
        Error::ImageNotAccepted(
            "this model reads text only (a causal language model); send the prompt without an image"
                .into(),
        )
    }
}

impl VisionLanguageModel for CausalLm {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    fn head(&self) -> &LensHead {
        &self.head
    }

    fn decoder(&self) -> &Decoder {
        &self.text
    }

    fn prepare(&self, prompt: &str, image: Option<&Rgb8>, chat_template: bool) -> Result<Prepared> {
        if image.is_some() {
            return Err(Self::no_images());
        }
        if prompt.trim().is_empty() {
            return Err(Error::InvalidOption(
                "the prompt is empty; send the text to run the lens on".into(),
            ));
        }
        let (text, add_special) = if chat_template {
            let t = self.template.as_ref().ok_or_else(|| {
                Error::InvalidOption(
                    "this model's snapshot has no chat template; send chat_template: false".into(),
                )
            })?;
            (
                t.render_text_turn(prompt, &self.bos_token, &self.eos_token)?,
                false,
            )
        } else {
            (prompt.to_string(), true)
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), add_special)
            .map_err(|e| Error::Internal(format!("tokenization failed: {e}")))?;
        let input_ids = enc.get_ids().to_vec();
        if input_ids.is_empty() {
            return Err(Error::InvalidOption("the prompt has no tokens".into()));
        }
        let kinds = token_kinds(&self.tokenizer, &input_ids, u32::MAX);
        Ok(Prepared {
            input_ids,
            kinds,
            image_grid: None,
            num_image_tokens: 0,
            pixels: None,
        })
    }

    fn image_features(&self, _pixels: &[&PixelInputs]) -> Result<Vec<ImageFeatures>> {
        Err(Self::no_images())
    }

    fn embed_with(
        &self,
        inputs: &Prepared,
        features: Option<ImageFeatures>,
    ) -> Result<DecoderInput> {
        if features.is_some() {
            return Err(Self::no_images());
        }
        Ok(DecoderInput::new(
            self.text.embed(&inputs.input_ids)?,
            sequential_positions(inputs.input_ids.len()),
        ))
    }
}
