//! The lens over the model's own answer (`generate`): greedy decoding with a KV cache (the prompt
//! runs once; each step runs one new token), and at every step the new position's residual stream
//! read at every layer as any other position is: top-k, entropy, KL to the final layer, targets,
//! and the emitted token's probability and rank.
//!
//! The prompt's lens (summary included) is what it is without `generate`; the generated
//! positions come after the prompt in each layer's `positions`. Greedy means the argmax of the
//! model's own last-layer logits, with none of the snapshot's sampling or penalty settings.

use std::borrow::Borrow;
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::api::{
    id_ranges, input_info, layers_out, token_text, Answer, AnswerToken, LensResponse, Target,
    Timing,
};
use crate::error::{Error, Result};
use crate::lens::{LayerStats, Lens, LensSpec, PositionStats};
use crate::models::decoder::KvCache;
use crate::models::{LayerObserver, Prepared, VisionLanguageModel};

use super::{groups_under, prepare_all, together_or_alone, LensRequest, Ready};

/// Passes every layer to the lens (when there is one) and keeps each layer's last row.
struct LastRows<'l, 'a> {
    lens: Option<&'l mut Lens<'a>>,
    rows: Vec<Tensor>,
}

impl LastRows<'_, '_> {
    fn keep(&mut self, hidden: &Tensor) -> Result<()> {
        let n = hidden.dim(0)?;
        // A copy: the row is a view of the layer's whole batched residual stream, which it would
        // keep in memory until the next step (every layer's: 1.2 GiB for LLaVA-1.5-7B's 8 prompts).
        self.rows
            .push(hidden.narrow(0, n - 1, 1)?.force_contiguous()?);
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

/// The model's own next token after each of `lasts` (the last layer's rows `[1, hidden]`, one per
/// answer going on): the argmax of its logits over the whole vocabulary, soft-capped where the
/// model caps them (the cap can tie what the raw logits order; ties: the lowest id, as torch's
/// argmax). One GEMM for them all: the unembedding is read once a step, not once an answer
/// (each row's sums are the same as alone on AMX, and equal to float rounding elsewhere).
fn argmax_next(model: &dyn VisionLanguageModel, lasts: &[&Tensor]) -> Result<Vec<u32>> {
    if lasts.is_empty() {
        return Ok(Vec::new());
    }
    let head = model.head();
    let normed = head.norm.forward(&Tensor::cat(lasts, 0)?)?;
    let logits = match &head.packed {
        // The lens's own GEMM on a CPU with AMX (models/amx.rs), f32 as the other.
        Some(packed) if normed.device().is_cpu() && normed.dtype() == DType::F32 => {
            crate::models::amx::linear(&normed, packed)?
        }
        _ => crate::models::gemm::matmul_nt(&normed, &head.unembed)?.to_dtype(DType::F32)?,
    };
    let logits = match head.softcap {
        Some(c) => crate::models::layers::softcap_like_torch(&logits, c)?,
        None => logits,
    };
    if let Some(ids) = crate::lens::argmax_on_device(&logits)? {
        return Ok(ids);
    }
    let argmax = |row: Vec<f32>| {
        let mut best = 0;
        for (i, &z) in row.iter().enumerate() {
            if z > row[best] {
                best = i;
            }
        }
        best as u32
    };
    Ok(logits.to_vec2::<f32>()?.into_iter().map(argmax).collect())
}

/// One generation step's lens for the answers `gens` and their next `tokens`: each answer's new
/// position at every layer, read through the lens as any other position is, tracing its own targets
/// and its token. The answers go through one lens together, each answer's rows one position of it,
/// so that they share each pass over the unembedding (the step's rows of 8 answers are one GEMM's
/// 8 × 29 rows, not 8 GEMMs of 29) and KL's `Wᵀ p_L` (one pass for them all); answers that exclude
/// different ids from top-k (`exclude_special`) go in one lens each. Per answer, its layers.
fn step_stats(
    model: &dyn VisionLanguageModel,
    gens: &[&mut Generation],
    tokens: &[u32],
) -> Result<Vec<Vec<LayerStats>>> {
    let num_layers = model.info().num_layers;
    let mut out: Vec<Vec<LayerStats>> = vec![Vec::new(); gens.len()];
    let mut left: Vec<usize> = (0..gens.len()).collect();
    while let Some(&first) = left.first() {
        let excluded = &gens[first].spec.excluded;
        let (group, rest): (Vec<usize>, Vec<usize>) = left
            .iter()
            .partition(|&&i| gens[i].spec.excluded == *excluded);
        left = rest;
        // The group's targets, each id once; per answer, its own in its order, then its token.
        let mut targets: Vec<u32> = Vec::new();
        let traced = group
            .iter()
            .map(|&i| {
                let ids = gens[i].spec.targets.iter().copied().chain([tokens[i]]);
                ids.map(|id| match targets.iter().position(|&t| t == id) {
                    Some(j) => j,
                    None => {
                        targets.push(id);
                        targets.len() - 1
                    }
                })
                .collect()
            })
            .collect();
        let step = LensSpec {
            positions: (0..group.len()).collect(),
            layers: (0..=num_layers).collect(),
            top_k: group.iter().map(|&i| gens[i].spec.top_k).max().unwrap_or(1),
            targets,
            summary: false,
            excluded: excluded.clone(),
        };
        let mut lens = Lens::new(model.head(), &step, num_layers)?.with_position_targets(traced)?;
        for index in 0..gens[first].rows.len() {
            let rows: Vec<&Tensor> = group.iter().map(|&i| &gens[i].rows[index]).collect();
            lens.observe(index, &Tensor::cat(&rows, 0)?)?;
        }
        let stats = lens.finish()?;
        for (k, &i) in group.iter().enumerate() {
            out[i] = stats
                .iter()
                .map(|layer| {
                    let mut at = layer.positions[k].clone();
                    // Top-k ties keep the lower id first: the first k of a longer top are the top-k.
                    at.top.truncate(gens[i].spec.top_k);
                    LayerStats {
                        layer: layer.layer,
                        mean_max_prob: None,
                        positions: vec![at],
                    }
                })
                .collect();
        }
    }
    Ok(out)
}

/// One request's answer in progress: its prompt has run ([`start_batch`]); [`Generating`] steps it.
pub struct Generation {
    /// How many tokens to generate at most.
    max_new: usize,
    exclude_special: bool,
    inputs: Prepared,
    spec: LensSpec,
    targets: Vec<Target>,
    /// The prompt's lens, then the generated positions appended to each reported layer.
    stats: Vec<LayerStats>,
    cache: KvCache,
    /// The last position's row at every lens layer.
    rows: Vec<Tensor>,
    prompt_len: usize,
    /// Every fed-back token's position on all three axes: one past the prompt's largest
    /// (M-RoPE's `rope_deltas`; plain RoPE: the sequence length), then one more each.
    first_new_position: u32,
    tokens: Vec<AnswerToken>,
    stopped: Option<&'static str>,
    preprocess_ms: f64,
    forward_s: f64,
    lens_s: f64,
    /// What its cache holds from its prompt to its end ([`kv_bytes`]).
    kv_bytes: usize,
}

impl Generation {
    /// The bytes its keys and values hold, the room for its answer included.
    pub fn kv_bytes(&self) -> usize {
        self.kv_bytes
    }
}

/// The memory that answers' keys and values may take together (`--kv-cache-budget`), and what the
/// answers going on hold of it.
#[derive(Clone, Copy, Debug)]
pub struct KvBudget {
    pub limit: usize,
    pub held: usize,
}

/// How a request that generates started ([`start_within`]).
#[allow(clippy::large_enum_variant)] // one per request, moved once
pub enum Start {
    Going(Generation),
    /// Its cache, `kv_bytes`, would pass the budget beside the answers going on (or a request
    /// before it waits): it waits for answers to end, its prompt not run.
    Waits {
        kv_bytes: usize,
    },
}

/// `bytes` for a person: B, KiB, MiB or GiB, one decimal.
fn size(bytes: usize) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1048576 => format!("{:.1} KiB", b / 1024.0),
        1048576..1073741824 => format!("{:.1} MiB", b / 1048576.0),
        _ => format!("{:.1} GiB", b / 1073741824.0),
    }
}

/// The bytes an answer's keys and values take: every block's, for its prompt and the `generate − 1`
/// tokens fed back (the buffers are made that size at once, [`KvCache::with_room`]).
fn kv_bytes(model: &dyn VisionLanguageModel, prompt_tokens: usize, generate: usize) -> usize {
    (prompt_tokens + fed_back(generate)) * model.decoder().kv_bytes_per_token()
}

/// The tokens of an answer of `generate` that go back through the decoder: all but the last.
fn fed_back(generate: usize) -> usize {
    generate.saturating_sub(1)
}

/// Prepares a request that generates (`generate` > 0) and runs its prompt through the decoder
/// with its lens, keeping its keys and values ([`start_batch`] of one).
pub fn start(model: &dyn VisionLanguageModel, req: &LensRequest) -> Result<Generation> {
    start_batch(model, &[req], usize::MAX)
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("no answer was started".into())))
}

/// Prepares requests that generate (`generate` > 0; a bad one fails alone) and runs their prompts
/// through the decoder together with their lenses, in groups under `max_batch_tokens` padded
/// tokens, each prompt's keys and values kept for its answer (a batched prefill: each is what it
/// is alone). A group whose pass fails as a whole runs again request by request. Results in the
/// order of `reqs`.
pub fn start_batch(
    model: &dyn VisionLanguageModel,
    reqs: &[&LensRequest],
    max_batch_tokens: usize,
) -> Vec<Result<Generation>> {
    start_within(model, reqs, max_batch_tokens, None)
        .into_iter()
        .map(|r| match r? {
            Start::Going(g) => Ok(g),
            Start::Waits { .. } => Err(Error::Internal("an answer waits without a budget".into())),
        })
        .collect()
}

/// [`start_batch`] under a budget for the answers' keys and values: in order, each request's
/// prompt runs while its cache fits beside `budget.held` (and those started before it); from the
/// first that does not, the rest wait ([`Start::Waits`]), so that none overtakes another. A request
/// whose cache alone passes the limit can never run: 422.
pub fn start_within(
    model: &dyn VisionLanguageModel,
    reqs: &[&LensRequest],
    max_batch_tokens: usize,
    budget: Option<KvBudget>,
) -> Vec<Result<Start>> {
    let mut results: Vec<Option<Result<Start>>> = (0..reqs.len()).map(|_| None).collect();
    let mut valid = Vec::new();
    for (i, req) in reqs.iter().enumerate() {
        match req.options.generate {
            0 => {
                results[i] = Some(Err(Error::Internal(
                    "a request that generates nothing was started".into(),
                )))
            }
            // `generate` past its bound is refused by `LensOptions::resolve` in `prepare_all`.
            _ => valid.push(i),
        }
    }
    let mut ready = prepare_all(model, reqs, &valid, &mut results);
    if let Some(KvBudget { limit, mut held }) = budget {
        let mut waiting = false;
        ready.retain(|r| {
            let bytes = kv_bytes(model, r.inputs.input_ids.len(), r.options.generate);
            let verdict = if bytes > limit {
                Some(Err(Error::Unprocessable(format!(
                    "this answer's keys and values would take {} ({} prompt tokens and {} \
                     generated, {} a token); this server holds at most {} of them \
                     (--kv-cache-budget): a shorter prompt, a smaller image or fewer tokens",
                    size(bytes),
                    r.inputs.input_ids.len(),
                    r.options.generate,
                    size(model.decoder().kv_bytes_per_token()),
                    size(limit)
                ))))
            } else if waiting || held + bytes > limit {
                waiting = true;
                Some(Ok(Start::Waits { kv_bytes: bytes }))
            } else {
                held += bytes;
                None
            };
            let keep = verdict.is_none();
            if let Some(v) = verdict {
                results[r.index] = Some(v);
            }
            keep
        });
    }
    for group in groups_under(ready, max_batch_tokens) {
        let prefilled = together_or_alone(&group, |g| prefill(model, g));
        for (r, p) in group.into_iter().zip(prefilled) {
            let kv_bytes = kv_bytes(model, r.inputs.input_ids.len(), r.options.generate);
            results[r.index] = Some(
                p.map(|p| Generation {
                    kv_bytes,
                    max_new: r.options.generate,
                    exclude_special: r.options.exclude_special,
                    inputs: r.inputs,
                    spec: r.spec,
                    targets: r.targets,
                    preprocess_ms: r.preprocess_ms,
                    stats: p.stats,
                    cache: p.cache,
                    rows: p.rows,
                    prompt_len: p.prompt_len,
                    first_new_position: p.first_new_position,
                    tokens: Vec::new(),
                    stopped: None,
                    forward_s: p.forward_s,
                    lens_s: p.lens_s,
                })
                .map(Start::Going),
            );
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(lost())))
        .collect()
}

fn lost() -> Error {
    Error::Internal("an answer was lost".into())
}

/// What a prompt's pass gives its answer.
struct Prefilled {
    stats: Vec<LayerStats>,
    cache: KvCache,
    rows: Vec<Tensor>,
    prompt_len: usize,
    first_new_position: u32,
    forward_s: f64,
    lens_s: f64,
}

/// The prompts of `group` through the decoder in one padded pass, each with its lens and its
/// cache started ([`crate::models::decoder::Decoder::forward_batch_cached`]). `Err` when the pass
/// failed as a whole (each prompt's own result otherwise: its lens may fail alone).
fn prefill(model: &dyn VisionLanguageModel, group: &[Ready]) -> Result<Vec<Result<Prefilled>>> {
    let num_layers = model.info().num_layers;
    let t = Instant::now();
    let inputs: Vec<&Prepared> = group.iter().map(|r| &r.inputs).collect();
    let embedded = model.embed_batch(&inputs)?;
    // Every fed-back token's position on all three axes: one past the prompt's largest (M-RoPE's
    // `rope_deltas`; plain RoPE: the sequence length), then one more each.
    let starts: Vec<(usize, u32)> = embedded
        .iter()
        .map(|input| {
            let next = input.positions.iter().flat_map(|p| p.iter().copied()).max();
            (input.positions.len(), next.map_or(0, |m| m + 1))
        })
        .collect();
    let mut lenses = group
        .iter()
        .map(|r| Lens::new(model.head(), &r.spec, num_layers))
        .collect::<Result<Vec<Lens>>>()?;
    // Room for every token fed back: the steps write in place.
    let mut caches: Vec<KvCache> = group
        .iter()
        .map(|r| KvCache::with_room(fed_back(r.options.generate)))
        .collect();
    let mut observers: Vec<LastRows> = lenses
        .iter_mut()
        .map(|lens| LastRows {
            lens: Some(lens),
            rows: Vec::new(),
        })
        .collect();
    let device = model.head().unembed.device().clone();
    crate::models::profile::stage(
        &format!("decoder ({} prompt(s), lens per layer)", group.len()),
        &device,
        || {
            let mut obs: Vec<&mut dyn LayerObserver> = observers
                .iter_mut()
                .map(|o| o as &mut dyn LayerObserver)
                .collect();
            model
                .decoder()
                .forward_batch_cached(embedded, &mut caches, &mut obs)
        },
    )?;
    crate::models::profile::report_ops();
    let rows: Vec<Vec<Tensor>> = observers.into_iter().map(|o| o.rows).collect();
    let during: f64 = lenses.iter().map(|l| l.seconds).sum();
    let forward_s = t.elapsed().as_secs_f64() - during;
    let mut out = Vec::with_capacity(group.len());
    for (((lens, cache), rows), (prompt_len, first_new_position)) in
        lenses.into_iter().zip(caches).zip(rows).zip(starts)
    {
        let finishing = Instant::now();
        let lens_s = lens.seconds;
        out.push(lens.finish().map(|stats| Prefilled {
            stats,
            cache,
            rows,
            prompt_len,
            first_new_position,
            forward_s,
            lens_s: lens_s + finishing.elapsed().as_secs_f64(),
        }));
    }
    Ok(out)
}

/// The next token of `g`, `token` ([`argmax_next`] of its last rows), with its position's lens
/// `per_layer` ([`step_stats`]); the token to feed back, or None when `g` is done (an end token,
/// or `generate` tokens).
fn emit(
    model: &dyn VisionLanguageModel,
    g: &mut Generation,
    token: u32,
    mut per_layer: Vec<LayerStats>,
) -> Result<Option<u32>> {
    let t = Instant::now();
    let step = g.tokens.len();
    // The emitted token's probability and rank at every layer, then the step's rows as a
    // position of each reported layer (after the prompt's).
    let position = g.prompt_len - 1 + step;
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
        for out in &mut g.stats {
            let at = per_layer
                .iter()
                .find(|l| l.layer == out.layer)
                .ok_or_else(|| Error::Internal("a reported layer is missing".into()))?;
            out.positions.push(PositionStats::clone(&at.positions[0]));
        }
    }
    g.tokens.push(AnswerToken {
        position,
        id: token,
        text: token_text(model.tokenizer(), token),
        probs,
        ranks,
    });
    g.lens_s += t.elapsed().as_secs_f64();
    if model.info().stop_ids.contains(&token) {
        g.stopped = Some("eos");
        return Ok(None);
    }
    if g.tokens.len() == g.max_new {
        g.stopped = Some("length");
        return Ok(None);
    }
    Ok(Some(token))
}

/// The response of an answer that [`Generating::step`] ended.
pub fn respond(model: &dyn VisionLanguageModel, g: Generation) -> Result<LensResponse> {
    let info = model.info();
    let tokenizer = model.tokenizer();
    let ids: Vec<u32> = g.tokens.iter().map(|t| t.id).collect();
    let text = tokenizer
        .decode(&ids, true)
        .map_err(|e| Error::Internal(format!("decoding the answer: {e}")))?;
    let (forward, lens) = (g.forward_s * 1e3, g.lens_s * 1e3);
    Ok(LensResponse {
        model: info.name.clone(),
        family: info.family.to_string(),
        num_layers: info.num_layers,
        input: input_info(&g.inputs, tokenizer),
        excluded_ids: g.exclude_special.then(|| id_ranges(&g.spec.excluded)),
        layers: layers_out(g.stats, &g.targets, tokenizer),
        answer: Some(Answer {
            text,
            stopped: g.stopped.unwrap_or("length").into(),
            tokens: g.tokens,
        }),
        timing_ms: Timing {
            queue: None,
            preprocess: g.preprocess_ms,
            forward,
            lens,
            total: g.preprocess_ms + forward + lens,
        },
    })
}

/// The next tokens of the answers `gens` ([`argmax_next`] of their last rows, together) and their
/// positions' lens ([`step_stats`]), the time shared among them as their lens's.
fn next_tokens(
    model: &dyn VisionLanguageModel,
    gens: &mut [&mut Generation],
) -> Result<Vec<(u32, Vec<LayerStats>)>> {
    let t = Instant::now();
    let lasts = gens
        .iter()
        .map(|g| {
            g.rows
                .last()
                .ok_or_else(|| Error::Internal("no layers".into()))
        })
        .collect::<Result<Vec<&Tensor>>>()?;
    let tokens = argmax_next(model, &lasts)?;
    let stats = step_stats(model, gens, &tokens)?;
    let share = t.elapsed().as_secs_f64() / gens.len().max(1) as f64;
    for g in gens.iter_mut() {
        g.lens_s += share;
    }
    Ok(tokens.into_iter().zip(stats).collect())
}

/// Answers generated together. Each starts with its prompt's pass ([`start_batch`]: prompts
/// together, each with its lens, keeping its keys and values); then every [`Self::step`] picks the next tokens of all the answers going, reads
/// their new positions through the lens together ([`next_tokens`]), and feeds the tokens through
/// the decoder as one batch (projections and MLPs batched, attention per sequence against its own
/// cache). Each answer is what it is alone. An answer leaves as soon as it is done, and others
/// may join between steps (the service's worker, and [`stream`], admit more meanwhile). `T`: what
/// the caller knows an answer by.
pub struct Generating<'m, T> {
    model: &'m dyn VisionLanguageModel,
    going: Vec<(T, Generation)>,
}

impl<'m, T> Generating<'m, T> {
    pub fn new(model: &'m dyn VisionLanguageModel) -> Self {
        Generating {
            model,
            going: Vec::new(),
        }
    }

    /// Adds an answer whose prompt has run ([`start`]); it takes part from the next step on.
    pub fn push(&mut self, tag: T, answer: Generation) {
        self.going.push((tag, answer));
    }

    /// The answers going on.
    pub fn len(&self) -> usize {
        self.going.len()
    }

    /// The bytes the answers' keys and values hold together.
    pub fn kv_bytes(&self) -> usize {
        self.going.iter().map(|(_, g)| g.kv_bytes).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.going.is_empty()
    }

    /// Stops the answers whose tags `stop` picks (their clients went away, say) and gives their
    /// tags back.
    pub fn stop_where(&mut self, stop: impl Fn(&T) -> bool) -> Vec<T> {
        let (stopped, going) = std::mem::take(&mut self.going)
            .into_iter()
            .partition(|(tag, _)| stop(tag));
        self.going = going;
        stopped.into_iter().map(|(tag, _)| tag).collect()
    }

    /// The tags of the answers going on, which are dropped (after a step panicked: the caller
    /// runs them again alone).
    pub fn into_tags(self) -> Vec<T> {
        self.going.into_iter().map(|(tag, _)| tag).collect()
    }

    /// One token for every answer going on. Returns the answers this step ended: done (an end
    /// token, or `generate` tokens; [`respond`] gives the response), or failed. A step that fails
    /// as a whole fails every answer in it. A panic leaves every answer going on (after the
    /// computation, the answers only move).
    pub fn step(&mut self) -> Vec<(T, Result<Generation>)> {
        let model = self.model;
        let mut gens: Vec<&mut Generation> = self.going.iter_mut().map(|(_, g)| g).collect();
        // Per answer: None while it goes on, else how it ended.
        let mut ended: Vec<Option<Result<()>>> = (0..gens.len()).map(|_| None).collect();
        let mut feed: Vec<(usize, u32)> = Vec::new();
        match next_tokens(model, &mut gens) {
            Ok(next) => {
                for (i, (token, per_layer)) in next.into_iter().enumerate() {
                    match emit(model, gens[i], token, per_layer) {
                        Ok(Some(token)) => feed.push((i, token)),
                        Ok(None) => ended[i] = Some(Ok(())),
                        Err(e) => ended[i] = Some(Err(e)),
                    }
                }
            }
            Err(e) => {
                for end in &mut ended {
                    *end = Some(Err(Error::Internal(format!(
                        "choosing the next token: {e}"
                    ))));
                }
            }
        }
        if !feed.is_empty() {
            // Fed back together: one decoder pass for every answer going on.
            let t = Instant::now();
            let mut caches: Vec<KvCache> = Vec::with_capacity(feed.len());
            let mut positions = Vec::with_capacity(feed.len());
            for &(i, _) in &feed {
                let g = &mut gens[i];
                caches.push(std::mem::take(&mut g.cache));
                positions.push([g.first_new_position + g.tokens.len() as u32 - 1; 3]);
            }
            let ids: Vec<u32> = feed.iter().map(|&(_, t)| t).collect();
            let mut observers: Vec<LastRows> = (0..feed.len())
                .map(|_| LastRows {
                    lens: None,
                    rows: Vec::new(),
                })
                .collect();
            let stepped = model.decoder().embed(&ids).and_then(|embeds| {
                let mut obs: Vec<&mut dyn LayerObserver> = observers
                    .iter_mut()
                    .map(|o| o as &mut dyn LayerObserver)
                    .collect();
                model
                    .decoder()
                    .forward_step_batch(embeds, &positions, &mut caches, &mut obs)
            });
            let share = t.elapsed().as_secs_f64();
            for ((&(i, _), cache), observer) in feed.iter().zip(caches).zip(observers) {
                match &stepped {
                    Ok(()) => {
                        let g = &mut gens[i];
                        g.cache = cache;
                        g.rows = observer.rows;
                        g.forward_s += share;
                    }
                    Err(e) => {
                        ended[i] = Some(Err(Error::Internal(format!(
                            "a generation step failed: {e}"
                        ))))
                    }
                }
            }
        }
        // The answers that ended leave, in order.
        let mut out = Vec::new();
        let mut going = Vec::with_capacity(self.going.len());
        for ((tag, g), end) in std::mem::take(&mut self.going).into_iter().zip(ended) {
            match end {
                None => going.push((tag, g)),
                Some(Ok(())) => out.push((tag, Ok(g))),
                Some(Err(e)) => out.push((tag, Err(e))),
            }
        }
        self.going = going;
        out
    }
}

/// Answers to a stream of requests, at most `width` going on together, as the service's worker
/// keeps its answers going: `more(n)` gives up to n more requests (an empty list ends the stream;
/// a request that could not be made, as `Err`, is handed straight to `done`); whenever answers
/// end and leave room, the next requests start, their prompts in one pass ([`start_batch`]), and
/// each answer goes to `done` as soon as it ends, rather than a group waiting for its longest
/// answer. `T`: what the caller knows a request by. Stops at the first error `done` returns.
pub fn stream<T, R: Borrow<LensRequest>>(
    model: &dyn VisionLanguageModel,
    width: usize,
    max_batch_tokens: usize,
    mut more: impl FnMut(usize) -> Vec<(T, Result<R>)>,
    mut done: impl FnMut(T, Result<LensResponse>) -> Result<()>,
) -> Result<()> {
    let mut going = Generating::new(model);
    let mut over = false;
    loop {
        let room = width.max(1).saturating_sub(going.len());
        if room > 0 && !over {
            let next = more(room);
            over = next.is_empty();
            let (mut tags, mut reqs) = (Vec::new(), Vec::new());
            for (tag, req) in next {
                match req {
                    Ok(req) => {
                        tags.push(tag);
                        reqs.push(req);
                    }
                    Err(e) => done(tag, Err(e))?,
                }
            }
            let refs: Vec<&LensRequest> = reqs.iter().map(|r| r.borrow()).collect();
            for (tag, started) in tags
                .into_iter()
                .zip(start_batch(model, &refs, max_batch_tokens))
            {
                match started {
                    Ok(g) => going.push(tag, g),
                    Err(e) => done(tag, Err(e))?,
                }
            }
        }
        if going.is_empty() {
            if over {
                return Ok(());
            }
            continue;
        }
        for (tag, ended) in going.step() {
            done(tag, ended.and_then(|g| respond(model, g)))?;
        }
    }
}

/// Requests with `generate` > 0, together, to the end ([`stream`] as wide as they are many).
/// Results in the order of `reqs`; a request that fails alone fails alone (a step that fails as a
/// whole fails the answers in it).
pub fn run_generate_batch(
    model: &dyn VisionLanguageModel,
    reqs: &[&LensRequest],
    max_batch_tokens: usize,
) -> Vec<Result<LensResponse>> {
    let mut results: Vec<Option<Result<LensResponse>>> = (0..reqs.len()).map(|_| None).collect();
    // All of them at once, then no more.
    let mut all = Some(reqs);
    let more = |_| {
        let all = all.take().into_iter().flatten().copied().enumerate();
        all.map(|(i, r)| (i, Ok(r))).collect()
    };
    // `done` keeps every result and never fails, so neither does the stream.
    let _ = stream(model, reqs.len(), max_batch_tokens, more, |i, r| {
        results[i] = Some(r);
        Ok(())
    });
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(lost())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::stored_elements;

    /// The last row kept of each layer is a copy of its own, not a view that keeps the layer's
    /// whole batched residual stream in memory until the next step.
    #[test]
    fn the_kept_rows_do_not_hold_the_layers_they_come_from() {
        let batch = Tensor::arange(0f32, 24., &candle_core::Device::Cpu)
            .unwrap()
            .reshape((6, 4))
            .unwrap();
        let mut rows = LastRows {
            lens: None,
            rows: Vec::new(),
        };
        // A sequence of 3 tokens in a pass padded to 6.
        rows.keep(&batch.narrow(0, 0, 3).unwrap()).unwrap();
        let kept = &rows.rows[0];
        assert_eq!(
            kept.to_vec2::<f32>().unwrap(),
            vec![vec![8f32, 9., 10., 11.]]
        );
        assert_eq!(stored_elements(kept), 4);
    }

    fn text_model() -> Box<dyn VisionLanguageModel> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2-hub");
        crate::models::load(&dir, "qwen2", &candle_core::Device::Cpu, DType::F32).unwrap()
    }

    fn generating(prompt: &str, generate: usize) -> LensRequest {
        LensRequest {
            prompt: prompt.into(),
            image: None,
            options: crate::api::LensOptions {
                generate,
                ..Default::default()
            },
        }
    }

    /// An answer's cache is made once, the size it reserves (its prompt and every token fed
    /// back), and never grows while it is generated.
    #[test]
    fn an_answer_s_cache_is_what_it_reserves_to_its_end() {
        let model = text_model();
        let req = generating("The colour of the sky is", 6);
        let g = start(model.as_ref(), &req).unwrap();
        let per_token = model.decoder().kv_bytes_per_token();
        assert_eq!(
            per_token,
            2 * 3 * 2 * 16 * 4,
            "3 blocks × 2 KV heads × head dim 16, f32"
        );
        assert_eq!(g.kv_bytes(), (g.prompt_len + 5) * per_token);
        assert_eq!(g.cache.bytes(), g.kv_bytes());
        let mut going = Generating::new(model.as_ref());
        going.push((), g);
        let mut steps = 0;
        while !going.is_empty() {
            assert_eq!(
                going.going[0].1.cache.bytes(),
                going.kv_bytes(),
                "step {steps}"
            );
            for (_, ended) in going.step() {
                let g = ended.unwrap();
                assert_eq!(g.cache.bytes(), g.kv_bytes(), "at its end");
                assert_eq!(g.tokens.len(), 6);
            }
            steps += 1;
        }
    }

    /// Under a budget, requests start in order while their caches fit; from the first that does
    /// not, the rest wait; one that could never fit is refused.
    #[test]
    fn answers_start_in_order_while_their_caches_fit_the_budget() {
        let model = text_model();
        let (short, long) = (
            generating("Hi", 4),
            generating("The colour of the sky is", 4),
        );
        let bytes = |r| match start_within(model.as_ref(), &[r], usize::MAX, None).remove(0) {
            Ok(Start::Going(g)) => g.kv_bytes(),
            _ => panic!("started without a budget"),
        };
        let (s, l) = (bytes(&short), bytes(&long));
        assert!(s < l);
        let run = |reqs: &[&LensRequest], limit, held| {
            start_within(
                model.as_ref(),
                reqs,
                usize::MAX,
                Some(KvBudget { limit, held }),
            )
            .into_iter()
            .map(|r| match r {
                Ok(Start::Going(g)) => format!("going {}", g.kv_bytes()),
                Ok(Start::Waits { kv_bytes }) => format!("waits {kv_bytes}"),
                Err(e) => e.code().to_string(),
            })
            .collect::<Vec<_>>()
        };
        // Room for the long one and the short one, not two long ones: the second long one waits,
        // and the short one after it waits too, though it would fit.
        assert_eq!(
            run(&[&long, &long, &short], l + s, 0),
            [
                format!("going {l}"),
                format!("waits {l}"),
                format!("waits {s}")
            ]
        );
        assert_eq!(
            run(&[&long, &short], l + s, 0),
            [format!("going {l}"), format!("going {s}")]
        );
        // What the answers going on hold counts.
        assert_eq!(run(&[&short], l + s, l + 1), [format!("waits {s}")]);
        // Never fits: refused, and the next one is not held back by it.
        assert_eq!(
            run(&[&long, &short], l - 1, 0),
            ["unprocessable".to_string(), format!("going {s}")]
        );
    }
}
