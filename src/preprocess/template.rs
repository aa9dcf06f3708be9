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
        // transformers' own global: Llama 3.1 / 3.2 templates write today's date with it.
        env.add_function(
            "strftime_now",
            |format: String| -> std::result::Result<Value, JinjaError> {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                strftime(&format, now)
                    .map(Value::from)
                    .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e))
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
        self.render(
            &json!([{"role": "user", "content": content}]),
            bos_token,
            eos_token,
        )
    }

    /// One user message whose content is the prompt string (what a text-only model's template
    /// expects: `tokenizer.apply_chat_template([{"role": "user", "content": prompt}])`), with the
    /// generation prompt.
    pub fn render_text_turn(
        &self,
        prompt: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        self.render(
            &json!([{"role": "user", "content": prompt}]),
            bos_token,
            eos_token,
        )
    }

    fn render(
        &self,
        messages: &serde_json::Value,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Internal(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => true,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| Error::Internal(format!("rendering the chat template failed: {e:#}")))
    }
}

/// Python's `datetime.strftime` for the directives chat templates use, at `unix_seconds` (UTC:
/// transformers calls `datetime.now()`, the server's local time, which is UTC on the usual server).
pub fn strftime(format: &str, unix_seconds: i64) -> std::result::Result<String, String> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + (leap && month > 2) as i64;
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (m, d) = ((month - 1) as usize, day);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&MONTHS[m][..3]),
            Some('B') => out.push_str(MONTHS[m]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(format!(
                    "strftime_now: directive %{} is not supported",
                    other.map(String::from).unwrap_or_default()
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_writes_dates_as_python_does() {
        // python: datetime.fromtimestamp(t, timezone.utc).strftime(...)
        assert_eq!(strftime("%d %b %Y", 1_721_952_000).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %j %H:%M:%S %y %m %%", 951_825_599).unwrap(),
            "Tuesday February 29 060 11:59:59 00 02 %"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0).unwrap(), "1970-01-01 Thu");
        assert_eq!(strftime("%d %b %Y", 1_767_225_599).unwrap(), "31 Dec 2025");
        assert!(strftime("%Z", 0).is_err());
    }

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
