//! The /lens contract (../shared/docs/API.md): request options and the response body. `probe`
//! prints exactly what the service returns.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::lens::{LayerStats, LensSpec};
use crate::models::{ImageGrid, Prepared, TokenKind};

pub const MAX_TOP_K: usize = 100;
/// The most tokens an answer may generate (`generate`).
pub const MAX_GENERATE: usize = 64;
/// The most traced targets, `targets` and `target_ids` together.
pub const MAX_TARGETS: usize = 256;
/// The most entries (top-k tokens and targets) a response may hold over its positions and
/// layers, the answer's included: ~4 million entries are ~250 MB of JSON. A request past it gets
/// 413 saying what to ask for less of; each lens row costs a pass over the vocabulary too.
pub const MAX_RESPONSE_ENTRIES: usize = 4_000_000;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(
    untagged,
    expecting = "positions must be \"last\", \"all\", \"text\", \"image\" or a list of integer indices"
)]
pub enum Positions {
    /// `"last"`, `"all"`, `"text"` or `"image"`
    Keyword(String),
    /// Indices; negative ones count from the end.
    List(Vec<i64>),
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(
    untagged,
    expecting = "layers must be \"all\" or a list of integer layer numbers"
)]
pub enum Layers {
    /// `"all"`
    Keyword(String),
    List(Vec<i64>),
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LensOptions {
    #[schema(minimum = 1, maximum = 100)]
    pub top_k: usize,
    pub positions: Positions,
    pub layers: Layers,
    /// Strings whose first token is traced (at most 256 with `target_ids`).
    #[schema(max_items = 256)]
    pub targets: Vec<String>,
    #[schema(max_items = 256)]
    pub target_ids: Vec<u32>,
    pub summary: bool,
    pub chat_template: bool,
    /// Leave special tokens, added tokens and vocabulary rows no token maps to out of top-k
    /// (only there: probabilities, ranks, entropy, KL and the summary stay over the whole
    /// vocabulary).
    pub exclude_special: bool,
    /// Greedily generate up to this many tokens (0: none; at most 64) and read every generated
    /// position through the lens too (`answer`).
    #[schema(maximum = 64)]
    pub generate: usize,
}

impl Default for LensOptions {
    fn default() -> Self {
        LensOptions {
            top_k: 5,
            positions: Positions::Keyword("last".into()),
            layers: Layers::Keyword("all".into()),
            targets: Vec::new(),
            target_ids: Vec::new(),
            summary: true,
            chat_template: true,
            exclude_special: false,
            generate: 0,
        }
    }
}

impl Positions {
    /// Parses the command-line form: a keyword or comma-separated indices.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "last" | "all" | "text" | "image" => Ok(Positions::Keyword(s.into())),
            _ => parse_list(s, "positions").map(Positions::List),
        }
    }
}

impl Layers {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Layers::Keyword(s.into())),
            _ => parse_list(s, "layers").map(Layers::List),
        }
    }
}

fn parse_list(s: &str, what: &str) -> Result<Vec<i64>> {
    s.split(',')
        .map(|p| {
            p.trim().parse::<i64>().map_err(|_| {
                Error::InvalidOption(format!(
                    "{what}: `{p}` is not an index; use a keyword or comma-separated integers"
                ))
            })
        })
        .collect()
}

/// A target traced through the layers: the string the caller gave, its token id and that token's
/// text.
#[derive(Clone, Debug)]
pub struct Target {
    pub label: String,
    pub id: u32,
    pub token: String,
}

impl LensOptions {
    /// The bounds that hold whatever the input: checked by the service before a request is
    /// decoded or queued, and again by [`LensOptions::resolve`].
    pub fn check(&self) -> Result<()> {
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(Error::InvalidOption(format!(
                "top_k must be between 1 and {MAX_TOP_K}, got {}",
                self.top_k
            )));
        }
        if self.generate > MAX_GENERATE {
            return Err(Error::InvalidOption(format!(
                "generate must be between 0 and {MAX_GENERATE}, got {}",
                self.generate
            )));
        }
        let targets = self.num_targets();
        if targets > MAX_TARGETS {
            return Err(Error::InvalidOption(format!(
                "at most {MAX_TARGETS} targets (targets and target_ids together), got {targets}"
            )));
        }
        Ok(())
    }

    /// `targets` and `target_ids` together.
    fn num_targets(&self) -> usize {
        self.targets.len() + self.target_ids.len()
    }

    /// What a model's depth decides before any input (after [`LensOptions::check`]): the layers,
    /// and the response's size where the positions do not depend on the input (`"last"`, a
    /// list). The service checks this before it decodes or queues a request.
    pub fn check_for(&self, num_layers: usize) -> Result<()> {
        let layers = self.layer_list(num_layers)?;
        let positions = match &self.positions {
            Positions::Keyword(k) if k == "last" => Some(1),
            Positions::List(l) => Some(l.len()),
            Positions::Keyword(_) => None,
        };
        match positions {
            Some(p) => self.check_entries(p, layers.len()),
            None => Ok(()),
        }
    }

    /// The reported layers, ascending, each once.
    fn layer_list(&self, num_layers: usize) -> Result<Vec<usize>> {
        let mut layers: Vec<usize> = match &self.layers {
            Layers::Keyword(k) if k == "all" => (0..=num_layers).collect(),
            Layers::Keyword(k) => {
                return Err(Error::InvalidOption(format!(
                    "layers must be \"all\" or a list of layer numbers, got \"{k}\""
                )))
            }
            Layers::List(l) if l.is_empty() => {
                return Err(Error::InvalidOption("layers is an empty list".into()))
            }
            Layers::List(l) => l
                .iter()
                .map(|&i| index(i, "layer", num_layers + 1))
                .collect::<Result<_>>()?,
        };
        layers.sort_unstable();
        layers.dedup();
        Ok(layers)
    }

    /// Refuses a response of more than [`MAX_RESPONSE_ENTRIES`] top-k and target entries: the
    /// input's positions and the answer's (each generated token but the last is fed back and
    /// read as a position) at every reported layer.
    fn check_entries(&self, positions: usize, layers: usize) -> Result<()> {
        let per_row = self.top_k + self.num_targets();
        let answer = self.generate.saturating_sub(1);
        let rows = (positions + answer) * layers;
        let entries = rows.saturating_mul(per_row);
        if entries > MAX_RESPONSE_ENTRIES {
            let answer = if answer > 0 {
                format!(" and {answer} of the answer")
            } else {
                String::new()
            };
            return Err(Error::TooLarge(format!(
                "the response would hold {entries} entries ({positions} positions{answer} × \
                 {layers} layers × (top_k {} + {} targets)); at most {MAX_RESPONSE_ENTRIES}: ask \
                 for fewer positions, layers, top_k or targets",
                self.top_k,
                per_row - self.top_k
            )));
        }
        Ok(())
    }

    /// Checks the options against one prepared input and turns them into a [`LensSpec`].
    pub fn resolve(
        &self,
        inputs: &Prepared,
        tokenizer: &tokenizers::Tokenizer,
        num_layers: usize,
        vocab: usize,
    ) -> Result<(LensSpec, Vec<Target>)> {
        self.check()?;
        let n = inputs.input_ids.len();
        let positions: Vec<usize> = match &self.positions {
            Positions::Keyword(k) => match k.as_str() {
                "last" => vec![n - 1],
                "all" => (0..n).collect(),
                "text" => (0..n).filter(|&i| inputs.kinds[i] != TokenKind::Image).collect(),
                "image" => {
                    let v: Vec<usize> = (0..n).filter(|&i| inputs.kinds[i] == TokenKind::Image).collect();
                    if v.is_empty() {
                        return Err(Error::Unprocessable("positions \"image\" asked for, but the request has no image".into()));
                    }
                    v
                }
                other => {
                    return Err(Error::InvalidOption(format!(
                        "positions must be \"last\", \"all\", \"text\", \"image\" or a list of indices, got \"{other}\""
                    )))
                }
            },
            Positions::List(l) if l.is_empty() => return Err(Error::InvalidOption("positions is an empty list".into())),
            Positions::List(l) if l.len() > n => {
                return Err(Error::Unprocessable(format!(
                    "positions lists {} indices, and the input has {n} positions: ask for each once (or \"all\")",
                    l.len()
                )))
            }
            Positions::List(l) => l.iter().map(|&i| index(i, "position", n)).collect::<Result<_>>()?,
        };
        let layers = self.layer_list(num_layers)?;
        self.check_entries(positions.len(), layers.len())?;
        let mut targets = Vec::new();
        for t in &self.targets {
            let enc = tokenizer.encode(t.as_str(), false).map_err(|e| {
                Error::InvalidOption(format!("target {t:?} cannot be tokenized: {e}"))
            })?;
            let id = *enc.get_ids().first().ok_or_else(|| {
                Error::InvalidOption(format!(
                    "target {t:?} tokenizes to nothing; send a non-empty string"
                ))
            })?;
            targets.push(Target {
                label: t.clone(),
                id,
                token: token_text(tokenizer, id),
            });
        }
        for &id in &self.target_ids {
            if id as usize >= vocab {
                return Err(Error::InvalidOption(format!(
                    "target id {id} is outside the vocabulary (size {vocab})"
                )));
            }
            targets.push(Target {
                label: tokenizer.id_to_token(id).unwrap_or_default(),
                id,
                token: token_text(tokenizer, id),
            });
        }
        let spec = LensSpec {
            positions,
            layers,
            top_k: self.top_k,
            targets: targets.iter().map(|t| t.id).collect(),
            summary: self.summary,
            excluded: if self.exclude_special {
                excluded_ids(tokenizer, vocab)
            } else {
                Vec::new()
            },
        };
        Ok((spec, targets))
    }
}

/// `i` as an index into `len` things (negative counts from the end), or 422 saying the range.
fn index(i: i64, what: &str, len: usize) -> Result<usize> {
    let j = if i < 0 { len as i64 + i } else { i };
    if j < 0 || j >= len as i64 {
        return Err(Error::Unprocessable(format!(
            "{what} {i} is out of range: there are {len} (valid: 0..{len} or -{len}..-1)"
        )));
    }
    Ok(j as usize)
}

/// Special tokens, added tokens (e.g. `<image>`, `<pad>`) and the vocabulary rows past the
/// tokenizer (padding rows sampled at conversion), as a mask over ids.
pub fn excluded_ids(tokenizer: &tokenizers::Tokenizer, vocab: usize) -> Vec<bool> {
    let mut mask = vec![false; vocab];
    let known = tokenizer.get_vocab_size(true).min(vocab);
    mask[known..].iter_mut().for_each(|m| *m = true);
    for id in tokenizer.get_added_tokens_decoder().keys() {
        if let Some(m) = mask.get_mut(*id as usize) {
            *m = true;
        }
    }
    mask
}

/// Compresses a sorted id list into inclusive `[start, end]` ranges.
pub fn id_ranges(mask: &[bool]) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for (id, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let id = id as u32;
        match out.last_mut() {
            Some(r) if r[1] + 1 == id => r[1] = id,
            _ => out.push([id, id]),
        }
    }
    out
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TokenInfo {
    pub position: usize,
    pub id: u32,
    pub text: String,
    pub kind: TokenKind,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct InputInfo {
    pub num_tokens: usize,
    pub num_image_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_grid: Option<ImageGrid>,
    pub tokens: Vec<TokenInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TopToken {
    pub id: u32,
    pub token: String,
    pub prob: f32,
    pub logit: f32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TargetOut {
    /// The string as sent (or, for `target_ids`, the vocabulary's name for the id).
    pub target: String,
    pub id: u32,
    /// The token traced, decoded: the target string's first token. Where it is only whitespace
    /// (a Llama tokenizer turns `" Red"` into `"▁"` + `"Red"`, say), the string starts with a
    /// space the tokenizer splits off: send the word without it, or its id in `target_ids`.
    /// (Empty in results written before this field existed.)
    #[serde(default)]
    pub token: String,
    pub prob: f32,
    pub rank: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PositionOut {
    pub position: usize,
    pub top: Vec<TopToken>,
    pub entropy: f32,
    pub kl_to_final: f32,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub targets: Vec<TargetOut>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct LayerOut {
    pub layer: usize,
    /// With `summary`: the mean over every input position of its highest probability (the
    /// notebook's confidence curve). A generated answer's positions are not part of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_max_prob: Option<f32>,
    /// The requested input positions, then, with `generate`, the positions where the answer's
    /// tokens were fed back (each predicting the next answer token).
    pub positions: Vec<PositionOut>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Timing {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<f64>,
    pub preprocess: f64,
    pub forward: f64,
    pub lens: f64,
    pub total: f64,
}

/// The model's own greedy answer (`generate`), each token read through the lens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Answer {
    /// The generated tokens decoded, special tokens left out.
    pub text: String,
    /// `eos`: the model emitted a stop token (end of turn or of text; it is the last token), or
    /// `length`: `generate` tokens were emitted.
    pub stopped: String,
    pub tokens: Vec<AnswerToken>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AnswerToken {
    /// The position whose next-token distribution emitted it (the prompt's last position for the
    /// first token; each later one is the previous token's position, reported in `layers` after
    /// the prompt's positions).
    pub position: usize,
    pub id: u32,
    pub text: String,
    /// Its probability at every lens layer, 0 to `num_layers` (the last is the model's own).
    pub probs: Vec<f32>,
    /// Its rank at every lens layer (1: the most probable).
    pub ranks: Vec<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct LensResponse {
    pub model: String,
    /// `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `llava`, `llava_next`, `llava_onevision` or
    /// `causal_lm` (text only).
    pub family: String,
    pub num_layers: usize,
    pub input: InputInfo,
    /// With `exclude_special`: the ids kept out of top-k, as inclusive `[first, last]` ranges.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub excluded_ids: Option<Vec<[u32; 2]>>,
    pub layers: Vec<LayerOut>,
    /// With `generate`: the greedy answer, read through the lens.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub answer: Option<Answer>,
    pub timing_ms: Timing,
}

/// Decodes one token id as the raw piece it stands for (byte-level pieces become text).
pub fn token_text(tokenizer: &tokenizers::Tokenizer, id: u32) -> String {
    tokenizer
        .decode(&[id], false)
        .unwrap_or_else(|_| tokenizer.id_to_token(id).unwrap_or_default())
}

pub fn input_info(inputs: &Prepared, tokenizer: &tokenizers::Tokenizer) -> InputInfo {
    InputInfo {
        num_tokens: inputs.input_ids.len(),
        num_image_tokens: inputs.num_image_tokens,
        image_grid: inputs.image_grid,
        tokens: inputs
            .input_ids
            .iter()
            .zip(&inputs.kinds)
            .enumerate()
            .map(|(position, (&id, &kind))| TokenInfo {
                position,
                id,
                text: token_text(tokenizer, id),
                kind,
            })
            .collect(),
    }
}

pub fn layers_out(
    stats: Vec<LayerStats>,
    targets: &[Target],
    tokenizer: &tokenizers::Tokenizer,
) -> Vec<LayerOut> {
    stats
        .into_iter()
        .map(|l| LayerOut {
            layer: l.layer,
            mean_max_prob: l.mean_max_prob,
            positions: l
                .positions
                .into_iter()
                .map(|p| PositionOut {
                    position: p.position,
                    top: p
                        .top
                        .into_iter()
                        .map(|(id, prob, logit)| TopToken {
                            id,
                            token: token_text(tokenizer, id),
                            prob,
                            logit,
                        })
                        .collect(),
                    entropy: p.entropy,
                    kl_to_final: p.kl_to_final,
                    targets: p
                        .targets
                        .into_iter()
                        .zip(targets)
                        .map(|((prob, rank), t)| TargetOut {
                            target: t.label.clone(),
                            id: t.id,
                            token: t.token.clone(),
                            prob,
                            rank,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> tokenizers::Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/qwen2vl-hub/tokenizer.json"
        );
        tokenizers::Tokenizer::from_file(path).unwrap()
    }

    fn text_input(n: usize) -> Prepared {
        Prepared {
            input_ids: vec![0; n],
            kinds: vec![TokenKind::Text; n],
            image_grid: None,
            num_image_tokens: 0,
            pixels: None,
        }
    }

    /// What a request may ask for is bounded before any work: top_k, generate and the targets by
    /// themselves (400), a list of positions by the input (422), and the response's entries by
    /// positions × layers × (top_k + targets) (413), so that a small request cannot ask for a
    /// response of gigabytes.
    #[test]
    fn the_options_bound_the_response() {
        let tok = tokenizer();
        let resolve = |o: &LensOptions, n: usize| o.resolve(&text_input(n), &tok, 28, 768);
        let all = LensOptions {
            positions: Positions::Keyword("all".into()),
            ..LensOptions::default()
        };
        // 2000 positions × 29 layers × 5 = 290 000 entries: served.
        assert!(resolve(&all, 2000).is_ok());
        // × 100 = 5.8 million: refused, saying what to ask for less of.
        let wide = LensOptions {
            top_k: 100,
            ..all.clone()
        };
        match resolve(&wide, 2000) {
            Err(Error::TooLarge(m)) => {
                assert!(m.contains("5800000 entries"), "{m}");
                assert!(m.contains("fewer positions"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // The answer's tokens count as positions, all but the last (never fed back): 2000 + 63
        // positions × 29 layers × 66 = 3 948 582 entries, and one more target passes the bound.
        let answer = LensOptions {
            top_k: 66,
            generate: 64,
            ..all.clone()
        };
        assert!(resolve(&answer, 2000).is_ok());
        let more = LensOptions {
            target_ids: vec![1],
            ..answer.clone()
        };
        match resolve(&more, 2000) {
            Err(Error::TooLarge(m)) => {
                assert!(m.contains("2000 positions and 63 of the answer"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // Before any input, where the positions do not depend on it: a list, or "last".
        let listed = LensOptions {
            positions: Positions::List(vec![0; 2000]),
            ..wide.clone()
        };
        assert!(matches!(listed.check_for(28), Err(Error::TooLarge(_))));
        assert!(wide.check_for(28).is_ok(), "\"all\" waits for the input");
        let last = LensOptions {
            positions: Positions::Keyword("last".into()),
            layers: Layers::List(vec![29]),
            ..LensOptions::default()
        };
        assert!(matches!(last.check_for(28), Err(Error::Unprocessable(_))));
        let few_layers = LensOptions {
            layers: Layers::List(vec![0, -1]),
            ..wide.clone()
        };
        assert!(resolve(&few_layers, 2000).is_ok());
        // A list longer than the input.
        let long = LensOptions {
            positions: Positions::List(vec![0; 11]),
            ..LensOptions::default()
        };
        assert!(matches!(resolve(&long, 10), Err(Error::Unprocessable(_))));
        assert!(resolve(&long, 11).is_ok());
        // Bounds that hold whatever the input.
        let bad = [
            LensOptions {
                top_k: 0,
                ..LensOptions::default()
            },
            LensOptions {
                top_k: MAX_TOP_K + 1,
                ..LensOptions::default()
            },
            LensOptions {
                generate: MAX_GENERATE + 1,
                ..LensOptions::default()
            },
            LensOptions {
                targets: vec!["a".into(); 200],
                target_ids: vec![1; 57],
                ..LensOptions::default()
            },
        ];
        for o in &bad {
            assert!(matches!(o.check(), Err(Error::InvalidOption(_))), "{o:?}");
            assert!(
                matches!(resolve(o, 10), Err(Error::InvalidOption(_))),
                "{o:?}"
            );
        }
        let most = LensOptions {
            targets: vec!["a".into(); 200],
            target_ids: vec![1; 56],
            top_k: MAX_TOP_K,
            generate: MAX_GENERATE,
            ..LensOptions::default()
        };
        assert!(most.check().is_ok());
    }
}
