//! Times the CPU work of a request before the model runs, per image: decoding the file, and the
//! model's `prepare` (resize, normalisation, patch layout, chat template, tokenization), median of N.
//! `cargo run --release --example prepare_timing -- MODEL_DIR N IMAGE...`
//! (`RAYON_NUM_THREADS=1` for one core; the service runs `prepare` on the rayon pool.)
use std::time::Instant;

use candle_core::{DType, Device};

// The allocator and its settings of the `logit-lens` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median_ms(n: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[n / 2]
}

fn main() -> logit_lens::Result<()> {
    logit_lens::keep_freed_memory();
    let a: Vec<String> = std::env::args().collect();
    let model = logit_lens::models::load(a[1].as_ref(), "m", &Device::Cpu, DType::BF16)?;
    let n: usize = a[2].parse().expect("N");
    for path in &a[3..] {
        let bytes = std::fs::read(path).expect("image");
        let image = logit_lens::preprocess::image::decode(&bytes)?;
        let decode = median_ms(n.min(5), || {
            logit_lens::preprocess::image::decode(&bytes).unwrap();
        });
        model.prepare("Color of the main object:", Some(&image), true)?;
        let prepare = median_ms(n, || {
            model
                .prepare("Color of the main object:", Some(&image), true)
                .unwrap();
        });
        let tokens = model.prepare("Color of the main object:", Some(&image), true)?;
        println!(
            "{path} ({}x{}): decode {decode:.2} ms, prepare {prepare:.2} ms ({} tokens)",
            image.width,
            image.height,
            tokens.input_ids.len()
        );
    }
    Ok(())
}
