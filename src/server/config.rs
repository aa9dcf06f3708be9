//! `logit-lens serve` flags. Every flag is also an environment variable.

use std::path::PathBuf;
use std::time::Duration;

/// Limits checked on the async side, before a request is queued.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub max_prompt_tokens: usize,
    /// How long a request may wait in the queue before it gets 504.
    pub queue_timeout: Duration,
    /// The most image pixels the requests being decoded, queued or run may hold together (3 bytes
    /// each); one more image gets 429. An image alone is always admitted (up to
    /// `max_image_pixels`).
    pub max_pending_pixels: u64,
    /// How long a request's head may take to arrive (then the connection closes), and how long
    /// its body may go without a byte (then 408).
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 20 * 1024 * 1024,
            max_image_pixels: 50_000_000,
            max_prompt_tokens: 4096,
            queue_timeout: Duration::from_secs(60),
            max_pending_pixels: 200_000_000,
            read_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A model to serve: NAME=DIR, DIR (named after the directory) or a Hugging Face id such as
    /// Qwen/Qwen2-VL-2B-Instruct (read from the local Hugging Face cache). Repeatable; the
    /// environment variable takes a comma-separated list. Default: the tiny demo model with random
    /// weights from tests/fixtures.
    #[arg(long = "model", env = "LOGIT_LENS_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// auto (the GPU when built with CUDA and one is present), cpu, cuda or cuda:N. Weights stay in
    /// their checkpoint dtype on a GPU and are computed in f32 on the CPU, unless --dtype says.
    #[arg(long, env = "LOGIT_LENS_DEVICE", default_value = "auto")]
    pub device: String,
    /// auto (f32 on the CPU, the checkpoint's dtype on a GPU), f32, bf16 or f16: e.g. bf16 on a CPU
    /// whose memory cannot hold a model's weights in f32 (transformers' bf16 precision, not f32's).
    #[arg(long, env = "LOGIT_LENS_DTYPE", default_value = "auto")]
    pub dtype: String,
    #[arg(long, env = "LOGIT_LENS_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "LOGIT_LENS_PORT", default_value_t = 8000)]
    pub port: u16,
    /// The most queued requests for one model run as one group.
    #[arg(long, env = "LOGIT_LENS_MAX_BATCH_SIZE", default_value_t = 8, value_parser = at_least_one)]
    pub max_batch_size: usize,
    /// The most padded tokens (requests × longest sequence) one batched decoder pass takes.
    #[arg(
        long,
        env = "LOGIT_LENS_MAX_BATCH_TOKENS",
        default_value_t = 16_384,
        value_parser = at_least_one
    )]
    pub max_batch_tokens: usize,
    /// The most memory the keys and values of the answers being generated (`generate`) may hold
    /// together: bytes, or a number with KiB, MiB, GiB or TiB. An answer whose cache would pass it
    /// waits for others to end; one that alone would pass it gets 422. An answer's cache holds its
    /// prompt and its tokens (LLaVA-1.5-7B in fp16: 512 KiB a token; Qwen2-VL-2B in bf16: 28 KiB).
    #[arg(
        long,
        env = "LOGIT_LENS_KV_CACHE_BUDGET",
        default_value = "4GiB",
        value_parser = parse_bytes
    )]
    pub kv_cache_budget: usize,
    /// Requests that may wait; one more gets 429 with Retry-After.
    #[arg(long, env = "LOGIT_LENS_MAX_QUEUE", default_value_t = 64, value_parser = at_least_one)]
    pub max_queue: usize,
    /// How long a request may wait for its turn before it gets 504.
    #[arg(
        long,
        env = "LOGIT_LENS_QUEUE_TIMEOUT_MS",
        default_value_t = 60_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub queue_timeout_ms: u64,
    /// How long a request's head (request line and headers) may take to arrive, after which the
    /// connection is closed, and how long its body may go without a byte, after which it gets
    /// 408: a client that stalls cannot hold a connection and a handler.
    #[arg(
        long,
        env = "LOGIT_LENS_READ_TIMEOUT_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub read_timeout_ms: u64,
    /// The largest request body (413 above it): bytes, or a number with KiB, MiB, GiB or TiB.
    #[arg(
        long,
        env = "LOGIT_LENS_MAX_BODY_BYTES",
        default_value = "20MiB",
        value_parser = parse_bytes
    )]
    pub max_body_bytes: usize,
    /// The most pixels (width × height, read from the header before decoding) an image may have.
    #[arg(
        long,
        env = "LOGIT_LENS_MAX_IMAGE_PIXELS",
        default_value_t = 50_000_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_image_pixels: u64,
    /// The most tokens the prompt text may have (image tokens not counted).
    #[arg(
        long,
        env = "LOGIT_LENS_MAX_PROMPT_TOKENS",
        default_value_t = 4096,
        value_parser = at_least_one
    )]
    pub max_prompt_tokens: usize,
    /// The most image pixels that requests being decoded, queued or run may hold together (3 bytes
    /// each in memory); an image that would pass it gets 429 with Retry-After, before it is
    /// decoded. One image alone is always admitted.
    #[arg(
        long,
        env = "LOGIT_LENS_MAX_PENDING_PIXELS",
        default_value_t = 200_000_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_pending_pixels: u64,
    /// A file of API keys, one per line (`#` comments); a file without a key is an error. With
    /// keys set, /lens, /models and /metrics need `Authorization: Bearer <key>` (/health,
    /// /ready, the viewer and the API docs stay open).
    #[arg(long, env = "LOGIT_LENS_API_KEYS_FILE")]
    pub api_keys: Option<PathBuf>,
    /// API keys, comma-separated (added to those from --api-keys).
    #[arg(
        long,
        env = "LOGIT_LENS_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_key: Vec<String>,
    /// Run one small request through each model after loading, before /ready reports ready, so
    /// that the first real request does not pay the GPU's one-time costs (kernels compiled from
    /// PTX, BLAS handles). `--warm-up false` skips it.
    #[arg(long, env = "LOGIT_LENS_WARM_UP", default_value_t = true, action = clap::ArgAction::Set)]
    pub warm_up: bool,
}

impl ServeArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_image_pixels: self.max_image_pixels,
            max_prompt_tokens: self.max_prompt_tokens,
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            max_pending_pixels: self.max_pending_pixels,
            read_timeout: Duration::from_millis(self.read_timeout_ms),
        }
    }

    /// The configured keys; empty means no authentication. Keys asked for (a key file, or
    /// `--api-key` / `LOGIT_LENS_API_KEYS` given at all) that come to none are an error, not a
    /// service open to all: a blank or mis-mounted secret must not turn authentication off.
    pub fn keys(&self) -> Result<Vec<String>, String> {
        let mut keys: Vec<String> = self.api_key.iter().map(|k| k.trim().to_string()).collect();
        keys.retain(|k| !k.is_empty());
        if !self.api_key.is_empty() && keys.is_empty() {
            return Err(
                "--api-key (LOGIT_LENS_API_KEYS) is given but holds no key: name at least \
                 one, or leave it unset to serve without authentication"
                    .into(),
            );
        }
        if let Some(p) = &self.api_keys {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read the API key file {}: {e}", p.display()))?;
            let before = keys.len();
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
            if keys.len() == before {
                return Err(format!(
                    "the API key file {} holds no key (one a line, `#` comments): add one, or \
                     leave --api-keys (LOGIT_LENS_API_KEYS_FILE) unset to serve without authentication",
                    p.display()
                ));
            }
        }
        Ok(keys)
    }
}

/// A count of at least one: a queue, a group or a pass of none would refuse or stall everything.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A size: bytes, or a number (decimals allowed) followed by KiB, MiB, GiB or TiB (any case; a
/// space between is allowed). At least one byte.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}`: a size is bytes, or a number with KiB, MiB, GiB or TiB"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: a size is bytes, or a number with KiB, MiB, GiB or TiB"))?;
    let bytes = value * scale as f64;
    if !(bytes >= 1.0 && bytes < usize::MAX as f64) {
        return Err(format!("`{text}`: a size of at least one byte"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("1.5 gib"), Ok(3 << 29));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes(" 2 KiB "), Ok(2048));
        for bad in ["", "0", "GiB", "4GB", "-1MiB", "1.2.3", "0.1"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
