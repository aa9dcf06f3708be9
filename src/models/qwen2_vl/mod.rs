//! Qwen2-VL (Wang et al., 2024, "Qwen2-VL: Enhancing Vision-Language Model's Perception of the
//! World at Any Resolution"), following transformers' `Qwen2VLForConditionalGeneration`.
//!
//! Snapshot names are the hub's (`visual.*`, `model.*`, optional `lm_head.weight`);
//! transformers' in-memory names (`model.visual.*`, `model.language_model.*`) load too.

pub mod config;
pub mod processor;
pub mod text;
pub mod vision;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::decoder::Decoder;
use crate::models::snapshot::{Snapshot, Weights};
use crate::models::{
    token_kinds, ImageGrid, LayerObserver, LensHead, ModelInfo, PixelInputs, Prepared,
    VisionLanguageModel,
};
use crate::preprocess::image::Rgb8;
use crate::preprocess::template::ChatTemplate;
use config::Config;
use processor::ImageProcessorConfig;

const IMAGE_PAD: &str = "<|image_pad|>";
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";

pub struct Qwen2Vl {
    info: ModelInfo,
    cfg: Config,
    processor: ImageProcessorConfig,
    template: Option<ChatTemplate>,
    tokenizer: tokenizers::Tokenizer,
    eos_token: String,
    vision: vision::VisionTower,
    text: Decoder,
    head: LensHead,
    device: Device,
}

impl Qwen2Vl {
    pub fn load(snapshot: Snapshot, name: &str, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = Config::from_snapshot(&snapshot)?;
        let processor = ImageProcessorConfig::from_snapshot(&snapshot)?;
        let tokenizer = snapshot.tokenizer()?;
        let template = snapshot
            .chat_template()?
            .map(|t| ChatTemplate::new(&t))
            .transpose()
            .map_err(|e| snapshot.err(e.to_string()))?;
        for (tok, id) in [
            (IMAGE_PAD, cfg.image_token_id),
            (VISION_START, cfg.vision_start_token_id),
            (VISION_END, cfg.vision_end_token_id),
        ] {
            if tokenizer.token_to_id(tok) != Some(id) {
                return Err(snapshot.err(format!(
                    "config.json says {tok} is token {id}, the tokenizer says {:?}",
                    tokenizer.token_to_id(tok)
                )));
            }
        }
        let eos_token = snapshot
            .json("tokenizer_config.json")?
            .and_then(|t| {
                t.get("eos_token")
                    .and_then(|e| e.as_str().map(String::from))
            })
            .unwrap_or_else(|| "<|im_end|>".into());
        let weights = Weights::open(
            &snapshot,
            &[
                ("visual.", "model.visual."),
                ("model.", "model.language_model."),
            ],
            dtype,
            device,
        )?;
        let vision = vision::VisionTower::load(&weights.pp("visual"), &cfg.vision)?;
        let text = Decoder::load(&weights.pp("model"), &cfg.text)?;
        let unembed = if !cfg.tie_word_embeddings && weights.contains("lm_head.weight") {
            weights.get(
                "lm_head.weight",
                (cfg.text.vocab_size, cfg.text.hidden_size),
            )?
        } else {
            text.embed_tokens.clone()
        };
        let head = LensHead {
            norm: text.norm.clone(),
            unembed,
        };
        let info = ModelInfo {
            name: name.to_string(),
            family: "qwen2_vl",
            architecture: snapshot.architecture(),
            num_layers: cfg.text.num_hidden_layers,
            hidden_size: cfg.text.hidden_size,
            vocab_size: cfg.text.vocab_size,
            dtype: format!("{dtype:?}").to_lowercase(),
            device: format!("{device:?}").to_lowercase(),
        };
        Ok(Qwen2Vl {
            info,
            cfg,
            processor,
            template,
            tokenizer,
            eos_token,
            vision,
            text,
            head,
            device: device.clone(),
        })
    }

    fn render(&self, prompt: &str, with_image: bool, chat_template: bool) -> Result<String> {
        if chat_template {
            let t = self.template.as_ref().ok_or_else(|| {
                Error::InvalidOption(
                    "this model's snapshot has no chat template; send chat_template: false".into(),
                )
            })?;
            return t.render_user_turn(prompt, with_image, "", &self.eos_token);
        }
        let marker = "<image>";
        match (with_image, prompt.matches(marker).count()) {
            (false, 0) => Ok(prompt.to_string()),
            (true, 1) => {
                Ok(prompt.replacen(marker, &format!("{VISION_START}{IMAGE_PAD}{VISION_END}"), 1))
            }
            (true, 0) => Err(Error::InvalidOption(
                "with chat_template false the prompt must contain `<image>` where the image goes"
                    .into(),
            )),
            (false, _) => Err(Error::InvalidOption(
                "the prompt contains `<image>` but no image was sent".into(),
            )),
            (true, n) => Err(Error::InvalidOption(format!(
                "the prompt contains `<image>` {n} times; one image was sent"
            ))),
        }
    }
}

impl VisionLanguageModel for Qwen2Vl {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    fn head(&self) -> &LensHead {
        &self.head
    }

    fn prepare(&self, prompt: &str, image: Option<&Rgb8>, chat_template: bool) -> Result<Prepared> {
        if prompt.trim().is_empty() {
            return Err(Error::InvalidOption(
                "the prompt is empty; send the text to ask about the image".into(),
            ));
        }
        let processed = image
            .map(|img| processor::preprocess(img, &self.processor, &self.device))
            .transpose()?;
        let mut text = self.render(prompt, image.is_some(), chat_template)?;
        let pads = text.matches(IMAGE_PAD).count();
        let num_image_tokens = processed
            .as_ref()
            .map_or(0, |p| p.num_tokens(self.processor.merge_size));
        match (&processed, pads) {
            (None, 0) | (Some(_), 1) => {}
            _ => {
                return Err(Error::InvalidOption(format!(
                    "the prompt holds {pads} image placeholders but {} image(s) were sent; do not write {IMAGE_PAD} in a prompt",
                    image.is_some() as usize
                )))
            }
        }
        if processed.is_some() {
            text = text.replacen(IMAGE_PAD, &IMAGE_PAD.repeat(num_image_tokens), 1);
        }
        let enc = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| Error::Internal(format!("tokenization failed: {e}")))?;
        let input_ids = enc.get_ids().to_vec();
        let kinds = token_kinds(&self.tokenizer, &input_ids, self.cfg.image_token_id);
        let found = kinds
            .iter()
            .filter(|k| **k == crate::models::TokenKind::Image)
            .count();
        if found != num_image_tokens {
            return Err(Error::Internal(format!(
                "expected {num_image_tokens} image tokens after expansion, the tokenizer produced {found}"
            )));
        }
        let image_grid = processed.as_ref().map(|p| {
            let m = self.processor.merge_size;
            ImageGrid {
                rows: p.grid_thw[1] / m,
                cols: p.grid_thw[2] / m,
                first_position: input_ids
                    .iter()
                    .position(|&id| id == self.cfg.image_token_id)
                    .unwrap_or(0),
            }
        });
        Ok(Prepared {
            input_ids,
            kinds,
            image_grid,
            num_image_tokens,
            pixels: processed.map(|p| PixelInputs {
                pixel_values: p.pixel_values,
                grid_thw: p.grid_thw,
            }),
        })
    }

    fn forward(&self, inputs: &Prepared, observer: &mut dyn LayerObserver) -> Result<()> {
        let mut embeds = self.text.embed(&inputs.input_ids)?;
        if let (Some(px), Some(grid)) = (&inputs.pixels, inputs.image_grid) {
            let feats = self
                .vision
                .forward(&px.pixel_values.to_device(&self.device)?, px.grid_thw)?;
            let feats = feats.to_dtype(embeds.dtype())?;
            let (first, n) = (grid.first_position, inputs.num_image_tokens);
            if feats.dim(0)? != n {
                return Err(Error::Internal(format!(
                    "vision tower gave {} features for {n} image tokens",
                    feats.dim(0)?
                )));
            }
            let s = embeds.dim(0)?;
            embeds = Tensor::cat(
                &[
                    embeds.narrow(0, 0, first)?,
                    feats,
                    embeds.narrow(0, first + n, s - first - n)?,
                ],
                0,
            )?;
        }
        let positions = self.positions(inputs);
        self.text.forward(embeds, &positions, observer)
    }
}

impl Qwen2Vl {
    /// 3-D M-RoPE position ids `(t, h, w)` per token.
    pub fn positions(&self, inputs: &Prepared) -> Vec<[u32; 3]> {
        text::rope_positions(
            inputs.input_ids.len(),
            inputs
                .image_grid
                .map(|g| (g.first_position, g.rows, g.cols)),
        )
    }
}
