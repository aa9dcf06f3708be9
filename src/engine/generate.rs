//! The lens over the model's own answer (`generate`): greedy decoding with a KV cache (the prompt
//! runs once; each step runs one new token), and at every step the new position's residual stream
//! read at every layer as any other position is: top-k, entropy, KL to the final layer, targets,
//! and the emitted token's probability and rank.
//!
//! The prompt's lens (summary included) is what it is without `generate`; the generated
//! positions come after the prompt in each layer's `positions`. Greedy means the argmax of the
//! model's own last-layer logits, with none of the snapshot's sampling or penalty settings.

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::api::{
    id_ranges, input_info, layers_out, token_text, Answer, AnswerToken, LensResponse, Target,
    Timing,
};
use crate::error::{Error, Result};
use crate::lens::{LayerStats, Lens, LensSpec, PositionStats};
use crate::models::decoder::KvCache;
use crate::models::{LayerObserver, VisionLanguageModel};

use super::{ms, LensRequest};

/// The most new tokens one request may ask for (`generate` past it: 422).
pub const MAX_NEW_TOKENS: usize = 64;

/// Passes every layer to the lens (when there is one) and keeps each layer's last row.
struct LastRows<'l, 'a> {
    lens: Option<&'l mut Lens<'a>>,
    rows: Vec<Tensor>,
}

impl LastRows<'_, '_> {
    fn keep(&mut self, hidden: &Tensor) -> Result<()> {
        let n = hidden.dim(0)?;
        self.rows.push(hidden.narrow(0, n - 1, 1)?);
        Ok(())
    }
}

impl LayerObserver for LastRows<'_, '_> {
    fn observe(&mut self, index: usize, hidden: &Tensor) -> Result<()> {
        self.keep(hidden)?;
        match self.lens.as_deref_mut() {
            Some(l) => l.observe(index, hidden),
            None => Ok(()),
        }
    }
    fn wants_normed(&self, index: usize) -> bool {
        self.lens.as_deref().is_some_and(|l| l.wants_normed(index))
    }
    fn observe_normed(&mut self, index: usize, hidden: &Tensor, normed: &Tensor) -> Result<()> {
        self.keep(hidden)?;
        match self.lens.as_deref_mut() {
            Some(l) => l.observe_normed(index, hidden, normed),
            None => Ok(()),
        }
    }
}

/// The model's own next token after `last` (the last layer's row `[1, hidden]`): the argmax of
/// its logits over the whole vocabulary (ties: the lowest id, as torch's argmax).
fn argmax_next(model: &dyn VisionLanguageModel, last: &Tensor) -> Result<u32> {
    let head = model.head();
    let logits = head
        .norm
        .forward(last)?
        .matmul(&head.unembed.t()?)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// One generation step's lens: the rows of one position at every layer, through a lens that
/// traces the caller's targets and the emitted token too.
fn step_stats(
    model: &dyn VisionLanguageModel,
    spec: &LensSpec,
    rows: &[Tensor],
    token: u32,
) -> Result<Vec<LayerStats>> {
    let num_layers = model.info().num_layers;
    let step = LensSpec {
        positions: vec![0],
        layers: (0..=num_layers).collect(),
        top_k: spec.top_k,
        targets: spec.targets.iter().copied().chain([token]).collect(),
        summary: false,
        excluded: spec.excluded.clone(),
    };
    let mut lens = Lens::new(model.head(), &step, num_layers)?;
    for (index, row) in rows.iter().enumerate() {
        lens.observe(index, row)?;
    }
    lens.finish()
}

/// A request with `generate` > 0: the prompt's lens, then up to `generate` greedy tokens, each
/// position read at every layer.
pub fn run_generate(model: &dyn VisionLanguageModel, req: &LensRequest) -> Result<LensResponse> {
    let info = model.info();
    let n_new = req.options.generate;
    if n_new > MAX_NEW_TOKENS {
        return Err(Error::Unprocessable(format!(
            "generate is {n_new}; this server generates at most {MAX_NEW_TOKENS} tokens"
        )));
    }
    let t0 = Instant::now();
    let inputs = model.prepare(&req.prompt, req.image.as_ref(), req.options.chat_template)?;
    let (spec, targets) =
        req.options
            .resolve(&inputs, model.tokenizer(), info.num_layers, info.vocab_size)?;
    let preprocess_ms = ms(t0.elapsed());

    let t1 = Instant::now();
    let (embeds, positions) = model.embed(&inputs)?;
    let prompt_len = positions.len();
    // Every later token's position on all three axes: one past the prompt's largest (M-RoPE's
    // `rope_deltas`; plain RoPE: the sequence length).
    let first_new_position = positions
        .iter()
        .flat_map(|p| p.iter().copied())
        .max()
        .map_or(0, |m| m + 1);
    let mut cache = KvCache::default();
    let mut lens = Lens::new(model.head(), &spec, info.num_layers)?;
    let mut observer = LastRows {
        lens: Some(&mut lens),
        rows: Vec::new(),
    };
    model
        .decoder()
        .forward_cached(embeds, &positions, &mut cache, &mut observer)?;
    let mut rows = observer.rows;
    let mut lens_seconds = lens.seconds;
    let finishing = Instant::now();
    let mut stats = lens.finish()?;
    lens_seconds += finishing.elapsed().as_secs_f64();

    let tokenizer = model.tokenizer();
    let stop = &info.stop_ids;
    let mut tokens = Vec::new();
    let mut stopped = "length";
    for step in 0..n_new {
        let last = rows
            .last()
            .ok_or_else(|| Error::Internal("no layers".into()))?;
        let token = argmax_next(model, last)?;
        let lens_t = Instant::now();
        let mut per_layer = step_stats(model, &spec, &rows, token)?;
        // The emitted token's probability and rank at every layer, then the step's rows as a
        // position of each reported layer (after the prompt's).
        let position = prompt_len - 1 + step;
        let (mut probs, mut ranks) = (Vec::new(), Vec::new());
        for layer in &mut per_layer {
            let p = &mut layer.positions[0];
            let (prob, rank) = p
                .targets
                .pop()
                .ok_or_else(|| Error::Internal("the emitted token was not traced".into()))?;
            probs.push(prob);
            ranks.push(rank);
            p.position = position;
        }
        if step > 0 {
            for out in &mut stats {
                let at = per_layer
                    .iter()
                    .find(|l| l.layer == out.layer)
                    .ok_or_else(|| Error::Internal("a reported layer is missing".into()))?;
                out.positions.push(PositionStats::clone(&at.positions[0]));
            }
        }
        lens_seconds += lens_t.elapsed().as_secs_f64();
        tokens.push(AnswerToken {
            position,
            id: token,
            text: token_text(tokenizer, token),
            probs,
            ranks,
        });
        if stop.contains(&token) {
            stopped = "eos";
            break;
        }
        if step + 1 == n_new {
            break;
        }
        // Feed it back: one new position through the cached decoder.
        let embed = model.decoder().embed(&[token])?;
        let mut observer = LastRows {
            lens: None,
            rows: Vec::new(),
        };
        model.decoder().forward_cached(
            embed,
            &[[first_new_position + step as u32; 3]],
            &mut cache,
            &mut observer,
        )?;
        rows = observer.rows;
    }
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let text = tokenizer
        .decode(&ids, true)
        .map_err(|e| Error::Internal(format!("decoding the answer: {e}")))?;
    let total_ms = ms(t1.elapsed());
    let lens_ms = lens_seconds * 1e3;
    Ok(LensResponse {
        model: info.name.clone(),
        family: info.family.to_string(),
        num_layers: info.num_layers,
        input: input_info(&inputs, tokenizer),
        excluded_ids: req
            .options
            .exclude_special
            .then(|| id_ranges(&spec.excluded)),
        layers: layers_out(stats, &targets as &[Target], tokenizer),
        answer: Some(Answer {
            text,
            stopped: stopped.into(),
            tokens,
        }),
        timing_ms: Timing {
            queue: None,
            preprocess: preprocess_ms,
            forward: total_ms - lens_ms,
            lens: lens_ms,
            total: preprocess_ms + total_ms,
        },
    })
}
