//! The prompts of answers started together (`generate::start_batch`: one padded pass through the
//! decoder that keeps each prompt's keys and values) against one at a time (`generate::start`, as
//! the service ran them before the eighteenth session), alternating in one process, on a snapshot:
//! 8 text prompts, then (where the model takes images) 8 prompts with the 640×480 image.
//! Text with the summary on (the service's default: every position through the lens) and off (the
//! last position only: mostly the decoder's time); the image with the summary off (on, the lens of
//! 418 positions takes most of a minute a prompt on a CPU, the same either way).
//!
//! `cargo run --release --example prefill_batch MODEL_DIR [ROUNDS]` (default 3 rounds; medians).
use std::time::Instant;

use candle_core::{DType, Device};
use logit_lens::api::LensOptions;
use logit_lens::engine::generate;
use logit_lens::engine::LensRequest;
use logit_lens::preprocess::image::Rgb8;

// As the `logit-lens` binary: freed memory is reused, not handed back and faulted in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    logit_lens::keep_freed_memory();
    logit_lens::flush_subnormals();
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("MODEL_DIR");
    let rounds: usize = args.next().map_or(3, |r| r.parse().expect("ROUNDS"));
    let model = logit_lens::models::load(dir.as_ref(), "bench", &Device::Cpu, DType::F32)
        .expect("the model loads");
    let image = model.info().images.then(|| {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/bench/images/coco_640x480.png"
        ))
        .expect("bench/images/coco_640x480.png");
        logit_lens::preprocess::image::decode(&bytes).expect("a PNG")
    });
    let mut inputs: Vec<(&str, Option<&Rgb8>)> = vec![("text", None)];
    if let Some(img) = &image {
        inputs.push(("640x480 image", Some(img)));
    }
    for (what, img) in inputs {
        let summaries: &[bool] = if img.is_some() {
            &[false]
        } else {
            &[true, false]
        };
        for &summary in summaries {
            let reqs: Vec<LensRequest> = (0..8)
                .map(|i| LensRequest {
                    prompt: format!(
                        "Question {i}: describe the colour of the sky at noon in a few words."
                    ),
                    image: img.cloned(),
                    options: LensOptions {
                        top_k: 3,
                        summary,
                        generate: 1,
                        ..Default::default()
                    },
                })
                .collect();
            let refs: Vec<&LensRequest> = reqs.iter().collect();
            let (mut together, mut alone) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t = Instant::now();
                for g in generate::start_batch(model.as_ref(), &refs, 16_384) {
                    g.expect("started");
                }
                together.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                for r in &refs {
                    generate::start(model.as_ref(), r).expect("started");
                }
                alone.push(t.elapsed().as_secs_f64());
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (a, b) = (median(&mut alone), median(&mut together));
            println!(
                "8 prompts, {what}, summary {}: one at a time {a:6.2} s, together {b:6.2} s ({:.2}×)",
                if summary { "on " } else { "off" },
                a / b
            );
        }
    }
}
