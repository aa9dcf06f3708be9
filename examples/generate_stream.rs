//! `run --generate`'s answers streaming through the batch (`generate::stream`: as answers end, the
//! next requests start in their place) against groups that each run to their longest answer (as
//! `run` did before), on a snapshot, text prompts, alternating in one process.
//!
//! Random weights rarely emit the snapshot's end token, so that all answers would run to the same
//! length and the two would do the same steps. The benchmark first generates the answers without
//! an end token, then takes as the end token the one that makes their lengths the most varied
//! (answers ending wherever it first appears), and loads the snapshot again with it (its files
//! linked into a temporary folder beside a new generation_config.json). Real models end their
//! answers at different lengths by themselves; how much streaming gains depends on how varied.
//!
//! `cargo run --release --example generate_stream MODEL_DIR [WIDTH] [PROMPTS] [ROUNDS]`
//! (defaults 4, 12, 2; 16 tokens at most, summary off).
use std::time::Instant;

use candle_core::{DType, Device};
use logit_lens::api::{LensOptions, LensResponse};
use logit_lens::engine::generate;
use logit_lens::engine::LensRequest;
use logit_lens::models::VisionLanguageModel;

// As the `logit-lens` binary: freed memory is reused, not handed back and faulted in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MAX_NEW: usize = 16;

fn requests(n: usize) -> Vec<LensRequest> {
    (0..n)
        .map(|i| LensRequest {
            prompt: format!("Question {i}: what is the colour of the object number {i}?"),
            image: None,
            options: LensOptions {
                top_k: 3,
                summary: false,
                generate: MAX_NEW,
                ..Default::default()
            },
        })
        .collect()
}

/// Every answer through `generate::stream`, `width` at a time.
fn streamed(model: &dyn VisionLanguageModel, reqs: &[LensRequest], width: usize) -> Vec<Vec<u32>> {
    let mut next = 0;
    let mut out = vec![Vec::new(); reqs.len()];
    generate::stream(
        model,
        width,
        usize::MAX,
        |n| {
            let take: Vec<usize> = (next..reqs.len()).take(n).collect();
            next += take.len();
            take.into_iter().map(|i| (i, Ok(reqs[i].clone()))).collect()
        },
        |i, r: logit_lens::Result<LensResponse>| {
            out[i] = r?.answer.unwrap().tokens.iter().map(|t| t.id).collect();
            Ok(())
        },
    )
    .expect("streamed");
    out
}

/// Groups of `width`, each to its longest answer.
fn grouped(model: &dyn VisionLanguageModel, reqs: &[LensRequest], width: usize) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for group in reqs.chunks(width) {
        let refs: Vec<&LensRequest> = group.iter().collect();
        for r in generate::run_generate_batch(model, &refs, usize::MAX) {
            out.push(
                r.expect("answered")
                    .answer
                    .unwrap()
                    .tokens
                    .iter()
                    .map(|t| t.id)
                    .collect(),
            );
        }
    }
    out
}

fn main() {
    logit_lens::keep_freed_memory();
    logit_lens::flush_subnormals();
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("MODEL_DIR"));
    let mut num = |default: usize| {
        args.next()
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let (width, n, rounds) = (num(4), num(12), num(2));
    let load = |dir: &std::path::Path| {
        logit_lens::models::load(dir, "bench", &Device::Cpu, DType::F32).expect("the model loads")
    };
    let reqs = requests(n);
    // The answers without an end token, and the token that makes their lengths the most varied.
    let answers = streamed(load(&dir).as_ref(), &reqs, width);
    let lengths = |t: u32| -> Vec<usize> {
        answers
            .iter()
            .map(|a| a.iter().position(|&x| x == t).map_or(a.len(), |p| p + 1))
            .collect()
    };
    let spread = |l: &[usize]| {
        let mean = l.iter().sum::<usize>() as f64 / l.len() as f64;
        l.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>()
    };
    let end = answers
        .iter()
        .flatten()
        .copied()
        .max_by(|&a, &b| {
            spread(&lengths(a))
                .total_cmp(&spread(&lengths(b)))
                .then(b.cmp(&a))
        })
        .expect("some answer");
    let want = lengths(end);
    println!("end token {end}: answers of {want:?} tokens");
    let linked = std::env::temp_dir().join(format!("generate-stream-{}", std::process::id()));
    std::fs::create_dir_all(&linked).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap();
        if name != "generation_config.json" {
            std::os::unix::fs::symlink(&p, linked.join(name)).unwrap();
        }
    }
    std::fs::write(
        linked.join("generation_config.json"),
        format!("{{\"eos_token_id\": [{end}]}}"),
    )
    .unwrap();
    let model = load(&linked);
    std::fs::remove_dir_all(&linked).unwrap();
    let steps_grouped: usize = want.chunks(width).map(|g| *g.iter().max().unwrap()).sum();
    println!(
        "{n} prompts, {width} at a time, at most {MAX_NEW} tokens: {} tokens; groups take {steps_grouped} steps",
        want.iter().sum::<usize>()
    );
    for round in 1..=rounds {
        let t = Instant::now();
        let a = grouped(model.as_ref(), &reqs, width);
        let g = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let b = streamed(model.as_ref(), &reqs, width);
        let s = t.elapsed().as_secs_f64();
        assert_eq!(a, b, "the same answers");
        assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), want);
        println!(
            "round {round}: groups {g:6.2} s, streamed {s:6.2} s ({:.2}×)",
            g / s
        );
    }
}
