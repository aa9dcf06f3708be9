//! Times the CPU work of a request before the model runs, per image: decoding the file, and the
//! model's `prepare` (resize, normalisation, patch layout, chat template, tokenization), median of N.
//! `cargo run --release --example prepare_timing -- MODEL_DIR N IMAGE...`; an IMAGE written `WxH`
//! is a synthetic photo of that size (gradients and noise), encoded as a JPEG at quality 90.
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

/// A deterministic `w × h` picture with smooth gradients and noise, as a quality-90 JPEG.
fn synthetic_jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut state = 1u32;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let mut px = [0u8; 3];
        for (c, v) in px.iter_mut().enumerate() {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (state >> 27) as f32 - 16.0;
            let wave = ((x as f32 / 97.0 + c as f32).sin() * (y as f32 / 61.0).cos()) * 110.0;
            *v = (128.0 + wave + noise).clamp(0.0, 255.0) as u8;
        }
        image::Rgb(px)
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("jpeg");
    out
}

fn main() -> logit_lens::Result<()> {
    logit_lens::keep_freed_memory();
    let a: Vec<String> = std::env::args().collect();
    let model = logit_lens::models::load(a[1].as_ref(), "m", &Device::Cpu, DType::BF16)?;
    let n: usize = a[2].parse().expect("N");
    for path in &a[3..] {
        let bytes = match path.split_once('x').map(|(w, h)| (w.parse(), h.parse())) {
            Some((Ok(w), Ok(h))) => synthetic_jpeg(w, h),
            _ => std::fs::read(path).expect("image"),
        };
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
