//! From the user's prompt to token ids: the chat template (or the verbatim prompt with an
//! `<image>` marker), image-placeholder expansion, tokenization. Shared by every family; each
//! says how its image placeholder is spelled.

use crate::error::{Error, Result};
use crate::preprocess::template::ChatTemplate;

/// How one family writes images into its prompts.
pub struct PromptFormat<'a> {
    pub template: Option<&'a ChatTemplate>,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    /// What the user's `<image>` marker becomes when the chat template is off.
    pub marker_replacement: &'a str,
    /// The placeholder token that is repeated once per image feature.
    pub image_token: &'a str,
}

/// The user's marker for the image position when `chat_template` is false.
pub const IMAGE_MARKER: &str = "<image>";

impl PromptFormat<'_> {
    /// The full prompt text with the image placeholder repeated `num_image_tokens` times.
    pub fn render(
        &self,
        prompt: &str,
        with_image: bool,
        chat_template: bool,
        num_image_tokens: usize,
    ) -> Result<String> {
        if prompt.trim().is_empty() {
            return Err(Error::InvalidOption(
                "the prompt is empty; send the text to ask about the image".into(),
            ));
        }
        let text = if chat_template {
            let t = self.template.ok_or_else(|| {
                Error::InvalidOption(
                    "this model's snapshot has no chat template; send chat_template: false".into(),
                )
            })?;
            // A user who types the placeholder token itself would shift every image position.
            if prompt.contains(self.image_token) {
                return Err(Error::InvalidOption(format!(
                    "the prompt contains the model's image placeholder {}; remove it (the image is placed by the chat template)",
                    self.image_token
                )));
            }
            t.render_user_turn(prompt, with_image, self.bos_token, self.eos_token)?
        } else {
            match (with_image, prompt.matches(IMAGE_MARKER).count()) {
                (false, 0) => prompt.to_string(),
                (true, 1) => prompt.replacen(IMAGE_MARKER, self.marker_replacement, 1),
                (true, 0) => {
                    return Err(Error::InvalidOption(
                        "with chat_template false the prompt must contain `<image>` where the image goes".into(),
                    ))
                }
                (false, _) => return Err(Error::InvalidOption("the prompt contains `<image>` but no image was sent".into())),
                (true, n) => {
                    return Err(Error::InvalidOption(format!("the prompt contains `<image>` {n} times; one image was sent")))
                }
            }
        };
        let found = text.matches(self.image_token).count();
        if found != with_image as usize {
            return Err(Error::InvalidOption(format!(
                "the prompt holds {found} image placeholders ({}) but {} image(s) were sent",
                self.image_token, with_image as usize
            )));
        }
        Ok(if with_image {
            text.replacen(
                self.image_token,
                &self.image_token.repeat(num_image_tokens),
                1,
            )
        } else {
            text
        })
    }
}

/// Tokenizes as transformers' processors do (`add_special_tokens=True`: the tokenizer's own
/// post-processor decides about BOS).
pub fn tokenize(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| Error::Internal(format!("tokenization failed: {e}")))?;
    Ok(enc.get_ids().to_vec())
}
