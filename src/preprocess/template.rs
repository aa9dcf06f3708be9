//! Chat templates: the snapshot's own Jinja template rendered with minijinja for one user turn
//! (the image, then the text) with the generation prompt, as
//! `processor.apply_chat_template(..., add_generation_prompt=True)` renders it.

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde_json::json;

use crate::error::{Error, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Python string methods (`.strip()`, `.startswith()`, ...) that HF templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // transformers' `{% generation %}…{% endgeneration %}` marks assistant text for training
        // masks; it renders its body unchanged, so the markers can be dropped.
        let source = source
            .replace("{% generation %}", "")
            .replace("{%- generation %}", "")
            .replace("{% generation -%}", "")
            .replace("{% endgeneration %}", "")
            .replace("{%- endgeneration %}", "")
            .replace("{% endgeneration -%}", "");
        env.add_template_owned("chat", source)
            .map_err(|e| Error::Internal(format!("the chat template does not parse: {e:#}")))?;
        Ok(ChatTemplate { env })
    }

    /// One user message, `[image?, text]`, with the generation prompt.
    pub fn render_user_turn(
        &self,
        prompt: &str,
        with_image: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let mut content = Vec::new();
        if with_image {
            content.push(json!({"type": "image"}));
        }
        content.push(json!({"type": "text", "text": prompt}));
        let messages = json!([{"role": "user", "content": content}]);
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Internal(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(&messages),
            add_generation_prompt => true,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| Error::Internal(format!("rendering the chat template failed: {e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN2_VL_INSTRUCT: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn qwen2_vl_instruct_template_renders_models_md_example() {
        let t = ChatTemplate::new(QWEN2_VL_INSTRUCT).unwrap();
        let s = t.render_user_turn("T", true, "", "<|im_end|>").unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>T<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t.render_user_turn("T", false, "", "<|im_end|>").unwrap();
        assert!(!s.contains("vision_start"));
    }

    #[test]
    fn generation_block_tags_are_accepted() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% generation %}{{ m['role'] }}{% endgeneration %}{% endfor %}",
        )
        .unwrap();
        assert_eq!(t.render_user_turn("x", false, "", "").unwrap(), "user");
    }

    #[test]
    fn raise_exception_surfaces_as_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no images here') }}").unwrap();
        let e = t.render_user_turn("x", true, "", "").unwrap_err();
        assert!(e.to_string().contains("no images here"), "{e}");
    }
}
