//! Bad input gets a clear, typed error and never a panic; edge cases transformers accepts are
//! accepted alike.

mod common;

use std::io::Cursor;

use candle_core::Device;
use common::*;
use image::{DynamicImage, ImageFormat, RgbImage};
use logit_lens::api::{LensOptions, Positions};
use logit_lens::engine::{run_lens, LensRequest};
use logit_lens::preprocess::image::decode;

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    }));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn request(prompt: &str, image: Option<logit_lens::preprocess::image::Rgb8>) -> LensRequest {
    LensRequest {
        prompt: prompt.into(),
        image,
        options: LensOptions::default(),
    }
}

#[test]
fn a_corrupt_image_is_invalid_image() {
    let mut bytes = png(64, 64);
    bytes.truncate(bytes.len() - 40);
    bytes[60] ^= 0xff;
    let e = decode(&bytes).unwrap_err();
    assert_eq!(e.code(), "invalid_image", "{e}");
}

#[test]
fn an_unsupported_format_is_named() {
    // A valid PNM file: the image crate knows the format, the service does not take it.
    let e = decode(b"P3\n1 1\n255\n0 0 0\n").unwrap_err();
    assert_eq!(e.code(), "unsupported_image_format", "{e}");
    assert!(e.to_string().contains("Pnm"), "{e}");
}

/// The Qwen-VL generations share the processor: each refuses and upscales alike.
const QWEN_VL: [&str; 3] = ["qwen2vl-hub", "qwen2_5_vl-hub", "qwen3_vl-hub"];

#[test]
fn an_image_over_aspect_200_is_refused_with_the_reason() {
    for dir in QWEN_VL {
        let model = load_model(dir);
        let img = decode(&png(10_000, 1)).unwrap();
        let e = run_lens(model.as_ref(), &request("Color?", Some(img)))
            .err()
            .unwrap();
        assert_eq!(e.code(), "image_not_accepted", "{dir}");
        assert!(e.to_string().contains("aspect ratio"), "{dir}: {e}");
    }
}

#[test]
fn a_one_pixel_image_is_upscaled_as_transformers_does() {
    for dir in QWEN_VL {
        let model = load_model(dir);
        let img = decode(&png(1, 1)).unwrap();
        let resp = run_lens(model.as_ref(), &request("Color?", Some(img))).unwrap();
        // smart_resize(1, 1) = 56×56 (patch 14; Qwen3-VL: 64×64, patch 16) → a 4×4 patch grid
        // → 2×2 merged tokens.
        assert_eq!(resp.input.num_image_tokens, 4, "{dir}");
    }
}

#[test]
fn an_empty_prompt_is_refused() {
    let model = load_model("qwen2vl-hub");
    for p in ["", "   \n"] {
        let e = run_lens(model.as_ref(), &request(p, None)).err().unwrap();
        assert_eq!(e.code(), "invalid_option");
        assert!(e.to_string().contains("prompt is empty"), "{e}");
    }
}

#[test]
fn bad_options_are_refused_with_the_valid_range() {
    let model = load_model("qwen2vl-hub");
    let mut r = request("Hello", None);
    r.options.top_k = 0;
    assert_eq!(
        run_lens(model.as_ref(), &r).err().unwrap().code(),
        "invalid_option"
    );
    r.options.top_k = 101;
    assert_eq!(
        run_lens(model.as_ref(), &r).err().unwrap().code(),
        "invalid_option"
    );
    r.options.top_k = 5;
    r.options.positions = Positions::List(vec![10_000]);
    let e = run_lens(model.as_ref(), &r).err().unwrap();
    assert_eq!(e.code(), "unprocessable");
    assert!(e.to_string().contains("10000"), "{e}");
    r.options.positions = Positions::Keyword("image".into());
    assert_eq!(
        run_lens(model.as_ref(), &r).err().unwrap().code(),
        "unprocessable",
        "no image in the request"
    );
    r.options.positions = Positions::Keyword("middle".into());
    assert_eq!(
        run_lens(model.as_ref(), &r).err().unwrap().code(),
        "invalid_option"
    );
}

#[test]
fn a_prompt_that_spells_the_image_placeholder_is_refused() {
    for dir in QWEN_VL {
        let model = load_model(dir);
        let e = run_lens(model.as_ref(), &request("look: <|image_pad|>", None))
            .err()
            .unwrap();
        assert_eq!(e.code(), "invalid_option", "{dir}: {e}");
    }
}

fn copy_fixture(dir: &str) -> tempdir::Dir {
    let t = tempdir::Dir::new(dir);
    for entry in std::fs::read_dir(fixtures().join(dir)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, t.0.join(p.file_name().unwrap())).unwrap();
    }
    t
}

#[test]
fn a_snapshot_missing_a_file_names_it() {
    for (missing, says) in [
        ("tokenizer.json", "tokenizer.json is missing"),
        ("config.json", "config.json is missing"),
        ("model-00002-of-00002.safetensors", "shard is missing"),
        (
            "preprocessor_config.json",
            "preprocessor_config.json nor processor_config.json",
        ),
    ] {
        let t = copy_fixture("qwen2vl-hub");
        std::fs::remove_file(t.0.join(missing)).unwrap();
        let e = logit_lens::models::load(&t.0, "m", &Device::Cpu, candle_core::DType::F32)
            .err()
            .unwrap();
        assert_eq!(e.code(), "model_snapshot");
        assert!(e.to_string().contains(says), "{missing}: {e}");
    }
}

#[test]
fn a_snapshot_missing_a_weight_names_the_weight() {
    let t = copy_fixture("qwen2vl-tf5");
    let path = t.0.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let victim = tensors
        .keys()
        .find(|k| k.contains("layers.1.mlp.up_proj"))
        .unwrap()
        .clone();
    tensors.remove(&victim);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = logit_lens::models::load(&t.0, "m", &Device::Cpu, candle_core::DType::F32)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("layers.1.mlp.up_proj.weight is missing"),
        "{e}"
    );
}

#[test]
fn an_unsupported_architecture_lists_the_supported_ones() {
    let t = copy_fixture("qwen2vl-hub");
    let cfg = std::fs::read_to_string(t.0.join("config.json")).unwrap();
    std::fs::write(
        t.0.join("config.json"),
        cfg.replace(
            "Qwen2VLForConditionalGeneration",
            "MllamaForConditionalGeneration",
        ),
    )
    .unwrap();
    let e = logit_lens::models::load(&t.0, "m", &Device::Cpu, candle_core::DType::F32)
        .err()
        .unwrap();
    assert_eq!(e.code(), "unsupported_architecture");
    let msg = e.to_string();
    assert!(
        msg.contains("MllamaForConditionalGeneration")
            && msg.contains("Qwen2VLForConditionalGeneration"),
        "{msg}"
    );
}

/// A scratch directory removed on drop (no extra dependency for one helper).
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "logit-lens-test-{}-{tag}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
