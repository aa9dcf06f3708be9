//! LLaVA-OneVision (Li et al., 2024, "LLaVA-OneVision: Easy Visual Task Transfer") as the
//! llava-hf checkpoints ship it, following transformers' `LlavaOnevisionForConditionalGeneration`:
//! a SigLIP tower (raw output of its last layer) over the anyres tiles, a two-layer GELU
//! projector, features packed as [base tile; unpadded tile grid with an `image_newline` per row],
//! and a Qwen2 decoder with tied embeddings.

pub mod processor;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::models::decoder::{sequential_positions, Decoder, DecoderInput};
use crate::models::llava::LlavaParts;
use crate::models::snapshot::{field, Snapshot};
use crate::models::weight_names::Rename;
use crate::models::{
    check_image_tokens, scatter_image_features, token_kinds, Family, ImageFeatures, ImageGrid,
    LensHead, ModelInfo, PixelInputs, Prepared, TokenKind, VisionLanguageModel,
};
use crate::preprocess::image::Rgb8;
use processor::AnyResConfig;

pub const FAMILY: Family = Family {
    name: "llava_onevision",
    architectures: &["LlavaOnevisionForConditionalGeneration", "llava_onevision"],
    load: |snapshot, name, device, dtype| {
        Ok(Box::new(LlavaOnevision::load(
            snapshot, name, device, dtype,
        )?))
    },
};

/// transformers' renamings for `LlavaOnevisionForConditionalGeneration` checkpoints (5.25's
/// `conversion_mapping.py`: "llava_onevision" is "llava_next", then the "LlavaModel" scope and
/// SiglipVisionModel's, which is CLIPVisionModel's): the hub's names, what `save_pretrained`
/// writes, and the in-memory names, all to the in-memory names.
pub const WEIGHT_NAMES: &[Rename] = &[
    Rename::new("language_model.lm_head.", "lm_head."),
    Rename::new("language_model.", "model.language_model."),
    Rename::new("vision_tower.", "model.vision_tower."),
    Rename::new("multi_modal_projector.", "model.multi_modal_projector."),
    Rename::new("image_newline", "model.image_newline"),
    Rename::new("model.language_model.model.", "model.language_model."),
    Rename::new("model.vision_tower.vision_model.", "model.vision_tower."),
];

pub struct LlavaOnevision {
    parts: LlavaParts,
    processor: AnyResConfig,
    image_newline: Option<Tensor>,
}

/// What sets an anyres LLaVA family apart: LLaVA-OneVision here, LLaVA-NeXT in `llava_next`.
pub struct AnyResSpec {
    pub family: &'static str,
    pub weight_names: &'static [Rename],
    /// The config class's default vision tower.
    pub vision_defaults: serde_json::Value,
    /// The config class's defaults for `vision_feature_layer` and `vision_feature_select_strategy`.
    pub feature_defaults: [(&'static str, serde_json::Value); 2],
    pub text_model_type: &'static str,
    pub default_pinpoints: Vec<(usize, usize)>,
    /// The tile budget (OneVision's `vision_aspect_ratio` anyres_max_N), read from the config.
    pub budget: fn(&Snapshot) -> Result<Option<usize>>,
}

impl LlavaOnevision {
    pub fn load(snapshot: Snapshot, name: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(
            snapshot,
            name,
            device,
            dtype,
            AnyResSpec {
                family: "llava_onevision",
                weight_names: WEIGHT_NAMES,
                // LlavaOnevisionConfig's default vision tower (SigLIP so400m without its last layer).
                vision_defaults: json!({"model_type": "siglip_vision_model", "hidden_size": 1152,
                    "intermediate_size": 4304, "patch_size": 14, "image_size": 384,
                    "num_hidden_layers": 26, "num_attention_heads": 16}),
                feature_defaults: [
                    ("vision_feature_layer", json!(-1)),
                    ("vision_feature_select_strategy", json!("full")),
                ],
                text_model_type: "qwen2",
                default_pinpoints: (1..=6)
                    .flat_map(|a| (1..=6).map(move |b| (a * 384, b * 384)))
                    .collect(),
                budget: |snapshot| {
                    let aspect: String = field(&snapshot.config, "vision_aspect_ratio")
                        .map_err(|e| snapshot.err(format!("config.json: {e}")))?
                        .unwrap_or_else(|| "anyres_max_9".into());
                    processor::max_num_patches(&aspect)
                        .map(Some)
                        .map_err(|e| snapshot.err(format!("config.json: {e}")))
                },
            },
        )
    }

    /// An anyres LLaVA: tiles of the best pinpoint resolution through the tower, features packed
    /// as [base tile; unpadded grid with a newline per row] (and, with a budget, downscaled).
    pub fn load_with(
        snapshot: Snapshot,
        name: &str,
        device: &Device,
        dtype: DType,
        spec: AnyResSpec,
    ) -> Result<Self> {
        let mut config = snapshot.config.clone();
        for (key, default) in spec.feature_defaults {
            if config.get(key).is_none() {
                config[key] = default;
            }
        }
        let snapshot = Snapshot {
            dir: snapshot.dir,
            config,
        };
        let parts = LlavaParts::load(
            &snapshot,
            name,
            spec.family,
            spec.weight_names,
            spec.vision_defaults,
            spec.text_model_type,
            device,
            dtype,
        )?;
        let cfg_err = |e: Error| snapshot.err(format!("config.json: {e}"));
        let budget = (spec.budget)(&snapshot)?;
        let pinpoints = processor::parse_pinpoints(snapshot.config.get("image_grid_pinpoints"))
            .map_err(cfg_err)?
            .unwrap_or(spec.default_pinpoints);
        let processor =
            AnyResConfig::from_json(&snapshot.image_processor_config()?, &pinpoints, budget)
                .map_err(|e| snapshot.err(format!("image processor config: {e}")))?;
        if processor.size != (parts.vit.image_size, parts.vit.image_size) {
            return Err(snapshot.err(format!(
                "the image processor makes {:?} tiles, the vision tower takes {}",
                processor.size, parts.vit.image_size
            )));
        }
        let use_newline = field::<bool>(&snapshot.config, "use_image_newline_parameter")
            .map_err(cfg_err)?
            .unwrap_or(true);
        let image_newline = if use_newline || parts.weights.contains("model.image_newline") {
            Some(
                parts
                    .weights
                    .get("model.image_newline", parts.info.hidden_size)?,
            )
        } else {
            None
        };
        let mut parts = parts;
        (parts.info.parameters, parts.info.weight_bytes) = parts.weights.loaded();
        Ok(LlavaOnevision {
            parts,
            processor,
            image_newline,
        })
    }

    fn per_side(&self) -> usize {
        self.parts.vit.patches_per_side()
    }

    /// transformers' `pack_image_features` for one image: `feats` `[1 + tiles, p², hidden]`.
    fn pack(&self, feats: &Tensor, orig: (usize, usize), tiles: (usize, usize)) -> Result<Tensor> {
        let p = self.per_side();
        let hidden = feats.dim(2)?;
        let base = feats.get(0)?;
        let (sh, sw) = tiles;
        // [sh·sw, p², C] → [sh, sw, p, p, C] → [C, sh, p, sw, p] → [C, sh·p, sw·p]
        let grid = feats
            .narrow(0, 1, sh * sw)?
            .reshape((sh, sw, p, p, hidden))?
            .permute((4, 0, 2, 1, 3))?
            .reshape((hidden, sh * p, sw * p))?;
        let (rows, cols, pad, along_rows) = processor::unpadded_grid(orig, (sh * p, sw * p));
        let grid = if along_rows {
            grid.narrow(1, pad, rows)?
        } else {
            grid.narrow(2, pad, cols)?
        };
        let (r2, c2, downscale) =
            processor::budget_grid(rows, cols, p, self.processor.max_num_patches);
        let grid = if downscale {
            grid.unsqueeze(0)?
                .contiguous()?
                .upsample_bilinear2d(r2, c2, false)?
                .squeeze(0)?
        } else {
            grid
        };
        let grid = match &self.image_newline {
            Some(nl) => {
                let nl = nl.reshape((hidden, 1, 1))?.broadcast_as((hidden, r2, 1))?;
                Tensor::cat(&[grid, nl.contiguous()?], 2)?
            }
            None => grid,
        };
        let width = grid.dim(2)?;
        let grid = grid.reshape((hidden, r2 * width))?.t()?;
        Ok(Tensor::cat(&[base, grid], 0)?)
    }
}

impl VisionLanguageModel for LlavaOnevision {
    fn info(&self) -> &ModelInfo {
        &self.parts.info
    }

    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.parts.tokenizer
    }

    fn head(&self) -> &LensHead {
        &self.parts.head
    }

    fn prepare(&self, prompt: &str, image: Option<&Rgb8>, chat_template: bool) -> Result<Prepared> {
        let p = &self.parts;
        let processed = image
            .map(|img| processor::preprocess(img, &self.processor, &Device::Cpu))
            .transpose()?;
        let n_image = image.map_or(0, |img| {
            processor::num_image_tokens(img.height, img.width, &self.processor, self.per_side())
        });
        let input_ids = p.prompt_ids(prompt, image.is_some(), chat_template, n_image)?;
        let kinds = token_kinds(&p.tokenizer, &input_ids, p.image_token_id);
        check_image_tokens(&kinds, n_image)?;
        let g = self.per_side();
        // The base tile is a g × g grid; the tiles that follow carry newline tokens.
        let image_grid = image.map(|_| ImageGrid {
            rows: g,
            cols: g,
            first_position: input_ids
                .iter()
                .position(|&id| id == p.image_token_id)
                .unwrap_or(0),
        });
        Ok(Prepared {
            input_ids,
            kinds,
            image_grid,
            num_image_tokens: n_image,
            pixels: processed
                .zip(image)
                .map(|((pixel_values, (rows, cols)), img)| PixelInputs {
                    pixel_values,
                    grid_thw: [1, rows, cols],
                    original_size: [img.height, img.width],
                }),
        })
    }

    fn decoder(&self) -> &Decoder {
        &self.parts.text
    }

    fn image_features(&self, pixels: &[&PixelInputs]) -> Result<Vec<ImageFeatures>> {
        let px: Vec<&Tensor> = pixels.iter().map(|p| &p.pixel_values).collect();
        let feats = self.parts.image_features_many(&px)?;
        pixels
            .iter()
            .zip(feats)
            .map(|(px, feats)| {
                let [_, rows, cols] = px.grid_thw;
                Ok(self
                    .pack(
                        &feats,
                        (px.original_size[0], px.original_size[1]),
                        (rows, cols),
                    )?
                    .into())
            })
            .collect()
    }

    fn embed_with(
        &self,
        inputs: &Prepared,
        features: Option<ImageFeatures>,
    ) -> Result<DecoderInput> {
        let mut embeds = self.parts.text.embed(&inputs.input_ids)?;
        if let Some(ImageFeatures { tokens: packed, .. }) = features {
            let first = inputs
                .kinds
                .iter()
                .position(|k| *k == TokenKind::Image)
                .unwrap_or(0);
            if packed.dim(0)? != inputs.num_image_tokens {
                return Err(Error::Internal(format!(
                    "packing gave {} image features for {} image tokens",
                    packed.dim(0)?,
                    inputs.num_image_tokens
                )));
            }
            embeds = scatter_image_features(embeds, packed, first)?;
        }
        Ok(DecoderInput::new(
            embeds,
            sequential_positions(inputs.input_ids.len()),
        ))
    }
}
