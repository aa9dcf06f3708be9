//! Runs one lens request on a resident model: prepare → instrumented forward with the lens as
//! observer → response. [`worker`] holds the service's queue and the thread that owns the models.

pub mod worker;

pub use worker::{Engine, EngineConfig, JobError, JobResult, LoadState, ModelEntry, SubmitError};

use std::time::Instant;

use crate::api::{id_ranges, input_info, layers_out, LensOptions, LensResponse, Timing};
use crate::error::Result;
use crate::lens::Lens;
use crate::models::VisionLanguageModel;
use crate::preprocess::image::Rgb8;

/// A request after decoding: the prompt, the decoded image, the options.
pub struct LensRequest {
    pub prompt: String,
    pub image: Option<Rgb8>,
    pub options: LensOptions,
}

pub fn run_lens(model: &dyn VisionLanguageModel, req: &LensRequest) -> Result<LensResponse> {
    let t0 = Instant::now();
    let inputs = model.prepare(&req.prompt, req.image.as_ref(), req.options.chat_template)?;
    let info = model.info();
    let (spec, targets) =
        req.options
            .resolve(&inputs, model.tokenizer(), info.num_layers, info.vocab_size)?;
    let t1 = Instant::now();
    let mut lens = Lens::new(model.head(), &spec, info.num_layers)?;
    model.forward(&inputs, &mut lens)?;
    let lens_s = lens.seconds;
    let stats = lens.finish()?;
    let t2 = Instant::now();
    let tokenizer = model.tokenizer();
    let response = LensResponse {
        model: info.name.clone(),
        family: info.family.to_string(),
        num_layers: info.num_layers,
        input: input_info(&inputs, tokenizer),
        excluded_ids: req
            .options
            .exclude_special
            .then(|| id_ranges(&spec.excluded)),
        layers: layers_out(stats, &targets, tokenizer),
        timing_ms: Timing {
            queue: None,
            preprocess: ms(t1 - t0),
            forward: ms(t2 - t1) - lens_s * 1e3,
            lens: lens_s * 1e3,
            total: 0.0,
        },
    };
    let mut response = response;
    response.timing_ms.total = ms(t0.elapsed());
    Ok(response)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
