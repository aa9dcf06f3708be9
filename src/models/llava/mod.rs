//! LLaVA-1.5 (Liu et al., 2023, "Improved Baselines with Visual Instruction Tuning") as the
//! llava-hf checkpoints ship it, following transformers' `LlavaForConditionalGeneration`: a CLIP
//! ViT whose second-to-last layer (class token dropped) goes through a two-layer GELU projector
//! into a Llama decoder, in place of the `<image>` placeholders.
//!
//! Hub names: `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
//! `language_model.lm_head.weight`; every layout transformers 5 writes and reads loads too
//! ([`WEIGHT_NAMES`]).

pub mod processor;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::models::decoder::{sequential_positions, Decoder, DecoderConfig, DecoderInput};
use crate::models::layers::{Activation, Linear};
use crate::models::snapshot::{field, Snapshot, Weights};
use crate::models::vit::{layers_for_feature, VisionTransformer, VitConfig};
use crate::models::weight_names::Rename;
use crate::models::{
    check_image_tokens, scatter_image_features, token_kinds, Family, ImageFeatures, ImageGrid,
    LensHead, ModelInfo, PixelInputs, Prepared, VisionLanguageModel,
};
use crate::preprocess::image::Rgb8;
use crate::preprocess::prompt::{tokenize, PromptFormat};
use crate::preprocess::template::ChatTemplate;
use processor::ClipProcessorConfig;

pub const FAMILY: Family = Family {
    name: "llava",
    architectures: &["LlavaForConditionalGeneration", "llava"],
    load: |snapshot, name, device, dtype| Ok(Box::new(Llava::load(snapshot, name, device, dtype)?)),
};

/// transformers' renamings for `LlavaForConditionalGeneration` checkpoints (5.25's
/// `conversion_mapping.py`: "llava", then the "LlavaModel" and "CLIPVisionModel" scopes), carrying
/// every layout to the in-memory names: the hub's `language_model.model.*`,
/// `language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`; what
/// `save_pretrained` writes for a model built from its config (5.x: the tower without its
/// `vision_model.` level); and the in-memory names themselves, with or without that level.
pub const WEIGHT_NAMES: &[Rename] = &[
    Rename::new("language_model.lm_head.", "lm_head."),
    Rename::new("language_model.", "model.language_model."),
    Rename::new("vision_tower.", "model.vision_tower."),
    Rename::new("multi_modal_projector.", "model.multi_modal_projector."),
    // LlavaModel: its language model is the bare decoder.
    Rename::new("model.language_model.model.", "model.language_model."),
    // CLIPVisionModel (and SiglipVisionModel): PrefixChange(prefix_to_remove="vision_model").
    Rename::new("model.vision_tower.vision_model.", "model.vision_tower."),
];

/// The pieces both LLaVA families share: tokenizer and template, the vision tower with its
/// feature selection, the projector, the decoder and the read-out.
pub struct LlavaParts {
    pub info: ModelInfo,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: Option<ChatTemplate>,
    pub bos_token: String,
    pub eos_token: String,
    pub image_token: String,
    pub image_token_id: u32,
    pub vit: VitConfig,
    pub vision: VisionTransformer,
    /// `"default"` drops the first (class) token, `"full"` keeps every token.
    pub drop_first_token: bool,
    pub projector: (Linear, Activation, Linear),
    pub text: Decoder,
    pub head: LensHead,
    pub weights: Weights,
    pub device: Device,
}

impl LlavaParts {
    /// Loads what LLaVA and LLaVA-OneVision have in common. `vision_defaults` is the parent
    /// config class's default vision config; `text_model_type` the default text model type;
    /// `weight_names` the family's renamings.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        snapshot: &Snapshot,
        name: &str,
        family: &'static str,
        weight_names: &'static [Rename],
        vision_defaults: Value,
        text_model_type: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let root = &snapshot.config;
        let cfg_err = |e: Error| snapshot.err(format!("config.json: {e}"));
        let mut text_cfg = DecoderConfig::from_json(
            root.get("text_config").unwrap_or(&Value::Null),
            text_model_type,
        )
        .map_err(cfg_err)?;
        text_cfg.tie_word_embeddings |= field::<bool>(root, "tie_word_embeddings")
            .map_err(cfg_err)?
            .unwrap_or(false);
        let vit =
            VitConfig::from_json(root.get("vision_config"), &vision_defaults).map_err(cfg_err)?;
        let feature_layer: Value = root
            .get("vision_feature_layer")
            .cloned()
            .unwrap_or(json!(-2));
        let feature_layer = feature_layer.as_i64().ok_or_else(|| {
            snapshot.err(format!(
                "vision_feature_layer {feature_layer}: only a single layer index is supported"
            ))
        })?;
        let strategy: String = field(root, "vision_feature_select_strategy")
            .map_err(cfg_err)?
            .unwrap_or_else(|| "default".into());
        let drop_first_token = match strategy.as_str() {
            "default" => true,
            "full" => false,
            other => {
                return Err(snapshot.err(format!(
                    "vision_feature_select_strategy `{other}` is not supported"
                )))
            }
        };
        let image_token_id: u32 = field(root, "image_token_index")
            .map_err(cfg_err)?
            .or(field(root, "image_token_id").map_err(cfg_err)?)
            .unwrap_or(32000);
        let tokenizer = snapshot.tokenizer()?;
        let image_token = tokenizer.id_to_token(image_token_id).ok_or_else(|| {
            snapshot.err(format!(
                "the tokenizer has no token {image_token_id} (image_token_index)"
            ))
        })?;
        let template = snapshot
            .chat_template()?
            .map(|t| ChatTemplate::new(&t))
            .transpose()
            .map_err(|e| snapshot.err(e.to_string()))?;
        let weights = Weights::open(snapshot, family, weight_names, dtype, device)?;
        let n_layers = layers_for_feature(feature_layer, vit.num_hidden_layers)
            .map_err(|e| snapshot.err(e.to_string()))?;
        let vision = VisionTransformer::load(&weights.pp("model.vision_tower"), &vit, n_layers)?;
        let act: String = field(root, "projector_hidden_act")
            .map_err(cfg_err)?
            .unwrap_or_else(|| "gelu".into());
        let bias = field::<bool>(root, "multimodal_projector_bias")
            .map_err(cfg_err)?
            .unwrap_or(true);
        let proj = weights.pp("model.multi_modal_projector");
        let h = text_cfg.hidden_size;
        let projector = (
            Linear::load(&proj.pp("linear_1"), vit.hidden_size, h, bias)?,
            Activation::from_name(&act).map_err(|e| snapshot.err(e.to_string()))?,
            Linear::load(&proj.pp("linear_2"), h, h, bias)?,
        );
        let text = Decoder::load(&weights.pp("model.language_model"), &text_cfg)?;
        let head = LensHead::new(
            &text,
            &weights,
            "lm_head.weight",
            text_cfg.tie_word_embeddings,
        )?;
        let info = ModelInfo::new(
            name, family, snapshot, &text_cfg, &weights, true, &tokenizer,
        )?;
        Ok(LlavaParts {
            info,
            tokenizer,
            template,
            bos_token: snapshot.special_token("bos_token")?.unwrap_or_default(),
            eos_token: snapshot.special_token("eos_token")?.unwrap_or_default(),
            image_token,
            image_token_id,
            vit,
            vision,
            drop_first_token,
            projector,
            text,
            head,
            weights,
            device: device.clone(),
        })
    }

    /// Features per image tile from the vision config: patches (+ class token) − the dropped one.
    pub fn tokens_per_tile(&self) -> usize {
        self.vit.num_positions() - self.drop_first_token as usize
    }

    /// `pixels` `[n, 3, S, S]` → projected features `[n, tokens_per_tile, hidden]`.
    pub fn image_features(&self, pixels: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let x = self.vision.forward(&pixels.to_device(&self.device)?)?;
        let x = if self.drop_first_token {
            x.narrow(1, 1, x.dim(1)? - 1)?
        } else {
            x
        };
        let (l1, act, l2) = &self.projector;
        l2.forward(&act.forward(&l1.forward(&x)?)?)
    }

    /// Several images' `[n_i, 3, S, S]` pixels through the tower together → each one's
    /// `[n_i, tokens_per_tile, hidden]` features, what it gets alone.
    pub fn image_features_many(&self, pixels: &[&Tensor]) -> Result<Vec<Tensor>> {
        let all = Tensor::cat(pixels, 0)?;
        let feats = self.image_features(&all)?;
        let mut out = Vec::with_capacity(pixels.len());
        let mut at = 0;
        for px in pixels {
            let n = px.dim(0)?;
            out.push(feats.narrow(0, at, n)?);
            at += n;
        }
        Ok(out)
    }

    pub fn prompt_ids(
        &self,
        prompt: &str,
        with_image: bool,
        chat_template: bool,
        n_image: usize,
    ) -> Result<Vec<u32>> {
        let format = PromptFormat {
            template: self.template.as_ref(),
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
            marker_replacement: &self.image_token,
            image_token: &self.image_token,
        };
        tokenize(
            &self.tokenizer,
            &format.render(prompt, with_image, chat_template, n_image)?,
        )
    }
}

pub struct Llava {
    parts: LlavaParts,
    processor: ClipProcessorConfig,
}

impl Llava {
    pub fn load(snapshot: Snapshot, name: &str, device: &Device, dtype: DType) -> Result<Self> {
        // LlavaConfig's default vision tower (CLIP ViT-L/14-336).
        let vision_defaults = json!({"model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024,
            "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16});
        let parts = LlavaParts::load(
            &snapshot,
            name,
            "llava",
            WEIGHT_NAMES,
            vision_defaults,
            "llama",
            device,
            dtype,
        )?;
        let processor = ClipProcessorConfig::from_json(&snapshot.image_processor_config()?)
            .map_err(|e| snapshot.err(format!("image processor config: {e}")))?;
        Ok(Llava { parts, processor })
    }
}

impl VisionLanguageModel for Llava {
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
        let pixels = image
            .map(|img| processor::preprocess(img, &self.processor, &Device::Cpu))
            .transpose()?;
        if let Some(px) = &pixels {
            let side = px.dim(2)?;
            if side != p.vit.image_size || px.dim(3)? != p.vit.image_size {
                return Err(Error::Internal(format!(
                    "the image processor makes {side}×{} images, the vision tower takes {}×{}",
                    px.dim(3)?,
                    p.vit.image_size,
                    p.vit.image_size
                )));
            }
        }
        let n_image = if pixels.is_some() {
            p.tokens_per_tile()
        } else {
            0
        };
        let input_ids = p.prompt_ids(prompt, image.is_some(), chat_template, n_image)?;
        let kinds = token_kinds(&p.tokenizer, &input_ids, p.image_token_id);
        check_image_tokens(&kinds, n_image)?;
        let g = p.vit.patches_per_side();
        let image_grid = (n_image > 0 && n_image == g * g).then(|| ImageGrid {
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
            pixels: pixels.zip(image).map(|(pixel_values, img)| PixelInputs {
                pixel_values,
                grid_thw: [1, g, g],
                original_size: [img.height, img.width],
            }),
        })
    }

    fn decoder(&self) -> &Decoder {
        &self.parts.text
    }

    fn image_features(&self, pixels: &[&PixelInputs]) -> Result<Vec<ImageFeatures>> {
        let px: Vec<&Tensor> = pixels.iter().map(|p| &p.pixel_values).collect();
        self.parts
            .image_features_many(&px)?
            .into_iter()
            .map(|f| Ok(f.squeeze(0)?.into()))
            .collect()
    }

    fn embed_with(
        &self,
        inputs: &Prepared,
        features: Option<ImageFeatures>,
    ) -> Result<DecoderInput> {
        let mut embeds = self.parts.text.embed(&inputs.input_ids)?;
        if let Some(ImageFeatures { tokens: feats, .. }) = features {
            let first = inputs
                .kinds
                .iter()
                .position(|k| *k == crate::models::TokenKind::Image)
                .unwrap_or(0);
            embeds = scatter_image_features(embeds, feats, first)?;
        }
        Ok(DecoderInput::new(
            embeds,
            sequential_positions(inputs.input_ids.len()),
        ))
    }
}
