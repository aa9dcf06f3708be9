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

use crate::error::Result;
use crate::models::decoder::{Addition, Decoder, DecoderInput};
use crate::models::snapshot::{Prefixed, Snapshot, Weights};
use crate::models::weight_names::Rename;
use crate::models::{
    check_image_tokens, scatter_image_features, token_kinds, Family, ImageFeatures, ImageGrid,
    LensHead, ModelInfo, PixelInputs, Prepared, VisionLanguageModel,
};
use crate::preprocess::image::Rgb8;
use crate::preprocess::prompt::{tokenize, PromptFormat};
use crate::preprocess::template::ChatTemplate;
use config::Config;
use processor::ImageProcessorConfig;

const IMAGE_PAD: &str = "<|image_pad|>";
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";

pub const FAMILY: Family = Family {
    name: "qwen2_vl",
    architectures: &["Qwen2VLForConditionalGeneration", "qwen2_vl"],
    load: |snapshot, name, device, dtype| {
        Ok(Box::new(QwenVl::load(snapshot, name, device, dtype)?))
    },
};

/// transformers' renamings for `Qwen2VLForConditionalGeneration` checkpoints (5.25's
/// `conversion_mapping.py`, "Qwen2VLForConditionalGeneration"): the hub's `visual.*` and `model.*`
/// (the decoder) to the in-memory `model.visual.*` and `model.language_model.*`.
pub const WEIGHT_NAMES: &[Rename] = &[
    Rename::new("visual.", "model.visual."),
    Rename::unless(
        "model.",
        "model.language_model.",
        &["language_model.", "visual."],
    ),
];

/// A Qwen-VL model (Qwen2-VL, and through [`QwenVlSpec`] Qwen2.5-VL and Qwen3-VL): the shared
/// processor, prompt, M-RoPE decoder and read-out around a generation's own vision tower.
pub struct QwenVl {
    info: ModelInfo,
    cfg: Config,
    processor: ImageProcessorConfig,
    template: Option<ChatTemplate>,
    tokenizer: tokenizers::Tokenizer,
    eos_token: String,
    vision: Box<dyn vision::Encoder>,
    text: Decoder,
    head: LensHead,
}

/// What one Qwen-VL generation brings to the shared model: its name, weight renamings, how its
/// config.json reads, and its vision tower, loaded from its weights (`model.visual.`) and
/// `vision_config`.
pub struct QwenVlSpec {
    pub family: &'static str,
    pub weight_names: &'static [Rename],
    pub config: fn(&serde_json::Value) -> Result<Config>,
    pub vision: fn(&Prefixed, &serde_json::Value) -> Result<Box<dyn vision::Encoder>>,
}

/// Qwen2-VL's own.
pub const SPEC: QwenVlSpec = QwenVlSpec {
    family: "qwen2_vl",
    weight_names: WEIGHT_NAMES,
    config: Config::from_json,
    vision: |w, v| {
        let cfg = config::VisionConfig::from_json(v)?;
        Ok(Box::new(vision::VisionTower::load(w, &cfg)?))
    },
};

impl QwenVl {
    pub fn load(snapshot: Snapshot, name: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(snapshot, name, device, dtype, &SPEC)
    }

    /// The Qwen-VL model around a generation's own config and vision tower: the same processor,
    /// prompt, M-RoPE decoder and read-out (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
    pub fn load_with(
        snapshot: Snapshot,
        name: &str,
        device: &Device,
        dtype: DType,
        spec: &QwenVlSpec,
    ) -> Result<Self> {
        let family = spec.family;
        let cfg = (spec.config)(&snapshot.config)
            .map_err(|e| snapshot.err(format!("config.json: {e}")))?;
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
            .special_token("eos_token")?
            .unwrap_or_else(|| "<|im_end|>".into());
        let weights = Weights::open(&snapshot, family, spec.weight_names, dtype, device)?;
        let vision_cfg = snapshot
            .config
            .get("vision_config")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let vision =
            (spec.vision)(&weights.pp("model.visual"), &vision_cfg).map_err(|e| match e {
                crate::Error::Internal(m) => snapshot.err(format!("config.json: {m}")),
                e => e,
            })?;
        let text = Decoder::load(&weights.pp("model.language_model"), &cfg.text)?;
        let head = LensHead::new(&text, &weights, "lm_head.weight", cfg.tie_word_embeddings)?;
        let mut info = ModelInfo::new(
            name, family, &snapshot, &cfg.text, &weights, true, &tokenizer,
        )?;
        let deepstack = vision.deepstack_blocks();
        if deepstack > cfg.text.num_hidden_layers {
            return Err(snapshot.err(format!(
                "config.json: {deepstack} DeepStack feature sets for {} decoder blocks",
                cfg.text.num_hidden_layers
            )));
        }
        info.deepstack_layers = (1..=deepstack).collect();
        Ok(QwenVl {
            info,
            cfg,
            processor,
            template,
            tokenizer,
            eos_token,
            vision,
            text,
            head,
        })
    }
}

impl VisionLanguageModel for QwenVl {
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
        let processed = image
            .map(|img| processor::preprocess(img, &self.processor, &Device::Cpu))
            .transpose()?;
        let num_image_tokens = processed
            .as_ref()
            .map_or(0, |p| p.num_tokens(self.processor.merge_size));
        let format = PromptFormat {
            template: self.template.as_ref(),
            bos_token: "",
            eos_token: &self.eos_token,
            marker_replacement: &format!("{VISION_START}{IMAGE_PAD}{VISION_END}"),
            image_token: IMAGE_PAD,
        };
        let text = format.render(prompt, image.is_some(), chat_template, num_image_tokens)?;
        let input_ids = tokenize(&self.tokenizer, &text)?;
        let kinds = token_kinds(&self.tokenizer, &input_ids, self.cfg.image_token_id);
        check_image_tokens(&kinds, num_image_tokens)?;
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
            pixels: processed.zip(image).map(|(p, img)| PixelInputs {
                pixel_values: p.pixel_values,
                grid_thw: p.grid_thw,
                original_size: [img.height, img.width],
            }),
        })
    }

    fn decoder(&self) -> &Decoder {
        &self.text
    }

    fn image_features(&self, pixels: &[&PixelInputs]) -> Result<Vec<ImageFeatures>> {
        let images: Vec<(&Tensor, [usize; 3])> = pixels
            .iter()
            .map(|p| (&p.pixel_values, p.grid_thw))
            .collect();
        self.vision.forward_many(&images)
    }

    fn embed_with(
        &self,
        inputs: &Prepared,
        features: Option<ImageFeatures>,
    ) -> Result<DecoderInput> {
        let mut embeds = self.text.embed(&inputs.input_ids)?;
        let mut additions = Vec::new();
        match (features, inputs.image_grid) {
            (Some(feats), Some(grid)) => {
                let first = grid.first_position;
                embeds = scatter_image_features(embeds, feats.tokens, first)?;
                // DeepStack: set i goes into the image positions' residual after block i.
                additions = feats
                    .deepstack
                    .into_iter()
                    .enumerate()
                    .map(|(after_block, rows)| Addition {
                        after_block,
                        first,
                        rows,
                    })
                    .collect();
            }
            (None, None) => {}
            _ => {
                return Err(crate::Error::Internal(
                    "image features and image placeholders do not match".into(),
                ))
            }
        }
        Ok(DecoderInput {
            embeds,
            positions: self.positions(inputs),
            additions,
        })
    }
}

impl QwenVl {
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
