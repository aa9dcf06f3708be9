//! Turning a request's raw inputs into what a model consumes: decoded and resized images, the
//! rendered prompt and its tokens. Family-specific image processors live with their models
//! (`models::*::processor`).

pub mod image;
pub mod jpeg;
pub mod prompt;
pub mod template;

/// transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`, digit for digit.
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
