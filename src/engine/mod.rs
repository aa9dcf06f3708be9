//! Runs one lens request on a resident model: prepare → instrumented forward with the lens as
//! observer → response. [`worker`] holds the service's queue and the thread that owns the models.

pub mod generate;
pub mod worker;

pub use worker::{Engine, EngineConfig, JobError, JobResult, LoadState, ModelEntry, SubmitError};

use std::time::Instant;

use rayon::prelude::*;

use crate::api::{id_ranges, input_info, layers_out, LensOptions, LensResponse, Target, Timing};
use crate::error::Result;
use crate::lens::{Lens, LensSpec};
use crate::models::{LayerObserver, Prepared, VisionLanguageModel};
use crate::preprocess::image::Rgb8;

/// A request after decoding: the prompt, the decoded image, the options.
#[derive(Clone)]
pub struct LensRequest {
    pub prompt: String,
    pub image: Option<Rgb8>,
    pub options: LensOptions,
}

/// One small request (a mid-grey 224 × 224 image where the model takes one, a short prompt) through `model`, so that the
/// first real request finds the device warm: on a GPU the kernels are compiled from PTX and the
/// BLAS handles set up on first use, which costs the first request seconds. Returns its time in ms.
pub fn warm_up(model: &dyn VisionLanguageModel) -> Result<f64> {
    let t = Instant::now();
    let grey = image::RgbImage::from_pixel(224, 224, image::Rgb([128, 128, 128]));
    let req = LensRequest {
        prompt: "What is in the picture?".into(),
        image: model.info().images.then(|| Rgb8::from_rgb_image(grey)),
        options: LensOptions {
            top_k: 1,
            ..Default::default()
        },
    };
    run_lens(model, &req)?;
    Ok(ms(t.elapsed()))
}

pub fn run_lens(model: &dyn VisionLanguageModel, req: &LensRequest) -> Result<LensResponse> {
    run_lens_batch(model, &[req], usize::MAX)
        .pop()
        .unwrap_or_else(|| Err(crate::Error::Internal("no result".into())))
}

/// A request that passed preparation: its inputs and its lens specification.
pub(crate) struct Ready<'r> {
    /// Its place among the requests it came with.
    pub index: usize,
    pub inputs: Prepared,
    pub spec: LensSpec,
    pub targets: Vec<Target>,
    pub options: &'r LensOptions,
    pub preprocess_ms: f64,
}

/// Prepares `reqs[i]` for every i of `which` ([`VisionLanguageModel::prepare`], then its
/// options resolved against the prompt): CPU work (image processing, templating, tokenization),
/// independent per request, so in parallel, off the device. A bad request fails alone: its error
/// goes to `results[i]`.
pub(crate) fn prepare_all<'r, T>(
    model: &dyn VisionLanguageModel,
    reqs: &[&'r LensRequest],
    which: &[usize],
    results: &mut [Option<Result<T>>],
) -> Vec<Ready<'r>> {
    let info = model.info();
    let prepared: Vec<(usize, Result<Ready<'r>>)> = which
        .par_iter()
        .map(|&index| {
            let req = reqs[index];
            let t0 = Instant::now();
            let r = model
                .prepare(&req.prompt, req.image.as_ref(), req.options.chat_template)
                .and_then(|inputs| {
                    let (spec, targets) = req.options.resolve(
                        &inputs,
                        model.tokenizer(),
                        info.num_layers,
                        info.vocab_size,
                    )?;
                    Ok(Ready {
                        index,
                        inputs,
                        spec,
                        targets,
                        options: &req.options,
                        preprocess_ms: ms(t0.elapsed()),
                    })
                });
            (index, r)
        })
        .collect();
    let mut ready = Vec::with_capacity(prepared.len());
    for (index, r) in prepared {
        match r {
            Ok(r) => ready.push(r),
            Err(e) => results[index] = Some(Err(e)),
        }
    }
    ready
}

/// Greedy groups of `ready`, in order, each under `max_batch_tokens` padded tokens (requests ×
/// longest sequence); a request longer than the budget goes alone.
pub(crate) fn groups_under(ready: Vec<Ready>, max_batch_tokens: usize) -> Vec<Vec<Ready>> {
    let mut groups: Vec<Vec<Ready>> = Vec::new();
    for r in ready {
        let len = r.inputs.input_ids.len();
        let fits = groups.last().is_some_and(|g| {
            let longest = g
                .iter()
                .map(|x| x.inputs.input_ids.len())
                .max()
                .unwrap_or(0)
                .max(len);
            (g.len() + 1) * longest <= max_batch_tokens
        });
        match groups.last_mut() {
            Some(g) if fits => g.push(r),
            _ => groups.push(vec![r]),
        }
    }
    groups
}

/// Runs several requests for one model: each is prepared alone (a bad one fails alone), then
/// they go through the decoder together in groups of at most `max_batch_tokens` padded tokens.
/// Results come back in the order of `reqs`.
pub fn run_lens_batch(
    model: &dyn VisionLanguageModel,
    reqs: &[&LensRequest],
    max_batch_tokens: usize,
) -> Vec<Result<LensResponse>> {
    let mut results: Vec<Option<Result<LensResponse>>> = (0..reqs.len()).map(|_| None).collect();
    // The requests that generate go together through the cached decoder, sharing each step
    // (generate.rs); the others go through the decoder together.
    let generating: Vec<usize> = (0..reqs.len())
        .filter(|&i| reqs[i].options.generate > 0)
        .collect();
    if !generating.is_empty() {
        let group: Vec<&LensRequest> = generating.iter().map(|&i| reqs[i]).collect();
        for (&i, r) in generating.iter().zip(generate::run_generate_batch(
            model,
            &group,
            max_batch_tokens,
        )) {
            results[i] = Some(r);
        }
    }
    let reqs_left: Vec<usize> = (0..reqs.len()).filter(|&i| results[i].is_none()).collect();
    let ready = prepare_all(model, reqs, &reqs_left, &mut results);
    for group in groups_under(ready, max_batch_tokens) {
        for (r, result) in group
            .iter()
            .zip(together_or_alone(&group, |g| run_group(model, g)))
        {
            results[r.index] = Some(result);
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(crate::Error::Internal("request lost".into()))))
        .collect()
}

/// `run(group)`: one result per request of `group`, in its order, or `Err` when the pass itself
/// failed. A group whose pass fails as a whole (out of device memory at this size, or one request
/// that breaks it) runs again request by request: only what fails alone is reported as failed.
pub(crate) fn together_or_alone<T>(
    group: &[Ready],
    run: impl Fn(&[Ready]) -> Result<Vec<Result<T>>>,
) -> Vec<Result<T>> {
    let alone = |one: &[Ready]| -> Result<T> {
        run(one)?
            .pop()
            .unwrap_or_else(|| Err(crate::Error::Internal("a request's result was lost".into())))
    };
    match run(group) {
        Ok(results) => results,
        Err(_) if group.len() > 1 => group.chunks(1).map(alone).collect(),
        Err(e) => vec![Err(e)],
    }
}

/// One forward pass for `group`: each request's own result, in its order; `Err` when the pass
/// itself failed.
fn run_group(
    model: &dyn VisionLanguageModel,
    group: &[Ready],
) -> Result<Vec<Result<LensResponse>>> {
    let info = model.info();
    let t1 = Instant::now();
    let lenses: Result<Vec<Lens>> = group
        .iter()
        .map(|r| Lens::new(model.head(), &r.spec, info.num_layers))
        .collect();
    let forward = lenses.and_then(|mut lenses| {
        let inputs: Vec<&Prepared> = group.iter().map(|r| &r.inputs).collect();
        let mut observers: Vec<&mut dyn LayerObserver> = lenses
            .iter_mut()
            .map(|l| l as &mut dyn LayerObserver)
            .collect();
        model.forward_batch(&inputs, &mut observers)?;
        Ok(lenses)
    });
    let lenses = forward?;
    let forward_ms = ms(t1.elapsed()) - lenses.iter().map(|l| l.seconds * 1e3).sum::<f64>();
    let tokenizer = model.tokenizer();
    let responses = group
        .iter()
        .zip(lenses)
        .map(|(r, lens)| {
            // The lens's work during the forward pass, plus what it defers to `finish`.
            let finishing = Instant::now();
            let during_ms = lens.seconds * 1e3;
            let device = model.head().unembed.device();
            let stats =
                crate::models::profile::stage("lens (deferred part)", device, || lens.finish());
            let lens_ms = during_ms + ms(finishing.elapsed());
            stats.map(|stats| LensResponse {
                model: info.name.clone(),
                family: info.family.to_string(),
                num_layers: info.num_layers,
                input: input_info(&r.inputs, tokenizer),
                excluded_ids: r
                    .options
                    .exclude_special
                    .then(|| id_ranges(&r.spec.excluded)),
                layers: layers_out(stats, &r.targets, tokenizer),
                answer: None,
                timing_ms: Timing {
                    queue: None,
                    preprocess: r.preprocess_ms,
                    forward: forward_ms,
                    lens: lens_ms,
                    total: r.preprocess_ms + forward_ms + lens_ms,
                },
            })
        })
        .collect::<Vec<_>>();
    // LOGIT_LENS_PROFILE=2: the lens's deferred part by group of operations, summed over the group.
    crate::models::profile::report_ops();
    Ok(responses)
}

pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
