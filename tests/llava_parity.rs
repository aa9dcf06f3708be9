//! LLaVA-1.5 and LLaVA-OneVision against transformers: tiny random checkpoints in the hub's
//! layout (tests/fixtures/{llava15,onevision}-hub) and the references that
//! tools/make_llava_fixtures.py computed with transformers in f32 with eager attention.

mod common;

use common::*;
use logit_lens::models::llava::processor::{center_crop_offset, shortest_edge_size};
use logit_lens::models::llava_onevision::processor::{
    num_image_tokens, patch_output_size, select_best_resolution, AnyResConfig,
};

#[test]
fn llava15_inputs_and_hidden_states_equal_transformers() {
    check_inputs_and_hidden_states("llava15-hub", "llava15");
}

#[test]
fn llava15_lens_equals_transformers() {
    check_lens("llava15-hub", "llava15");
}

#[test]
fn llava15_last_layer_is_the_models_logits() {
    check_last_layer("llava15-hub", "llava15");
}

#[test]
fn llava15_end_to_end_with_rust_preprocessing() {
    check_end_to_end("llava15-hub", "llava15");
}

#[test]
fn onevision_inputs_and_hidden_states_equal_transformers() {
    check_inputs_and_hidden_states("onevision-hub", "onevision");
}

#[test]
fn onevision_lens_equals_transformers() {
    check_lens("onevision-hub", "onevision");
}

#[test]
fn onevision_last_layer_is_the_models_logits() {
    check_last_layer("onevision-hub", "onevision");
}

#[test]
fn onevision_end_to_end_with_rust_preprocessing() {
    check_end_to_end("onevision-hub", "onevision");
}

#[test]
fn clip_short_side_resize_and_crop_match_transformers() {
    let p = fixtures().join("reference/llava15/resize.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let size = v["settings"]["shortest_edge"].as_u64().unwrap() as usize;
    let crop = v["settings"]["crop_size"][0].as_u64().unwrap() as usize;
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= 4);
    for r in rows {
        let g = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}")) as usize;
        let (h, w) = shortest_edge_size(g("height"), g("width"), size);
        assert_eq!((h, w), (g("resized_height"), g("resized_width")), "{r}");
        assert_eq!(
            (center_crop_offset(h, crop), center_crop_offset(w, crop)),
            (g("crop_top") as i64, g("crop_left") as i64),
            "{r}"
        );
    }
}

#[test]
fn onevision_image_token_counts_match_the_processor_at_real_scale() {
    let p = fixtures().join("reference/onevision/token_counts.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let real = &v["real"];
    let pinpoints: Vec<(usize, usize)> = real["settings"]["image_grid_pinpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(pinpoints.len(), 36);
    let cfg = AnyResConfig {
        size: (384, 384),
        pinpoints,
        rescale: None,
        mean_std: None,
        max_num_patches: Some(9),
    };
    let pair = |x: &serde_json::Value| {
        (
            x[0].as_u64().unwrap() as usize,
            x[1].as_u64().unwrap() as usize,
        )
    };
    let mut saw_6551 = false;
    for r in real["rows"].as_array().unwrap() {
        let (h, w) = (
            r["height"].as_u64().unwrap() as usize,
            r["width"].as_u64().unwrap() as usize,
        );
        let best = select_best_resolution(h, w, &cfg.pinpoints);
        assert_eq!(best, pair(&r["best_resolution"]), "{h}×{w}");
        assert_eq!(
            patch_output_size(h, w, best),
            pair(&r["resized_for_patching"]),
            "{h}×{w}"
        );
        let n = num_image_tokens(h, w, &cfg, 27);
        assert_eq!(
            n,
            r["num_image_tokens"].as_u64().unwrap() as usize,
            "{h}×{w}"
        );
        assert_eq!(
            n,
            r["model_packed_length"].as_u64().unwrap() as usize,
            "{h}×{w}: the model packs as many"
        );
        saw_6551 |= (h, w, n) == (899, 1024, 6551);
    }
    assert!(
        saw_6551,
        "MODELS.md's 899×1024 → 6551 check must be among the cases"
    );
}

#[test]
fn families_are_reported() {
    for (dir, family) in [
        ("llava15-hub", "llava"),
        ("onevision-hub", "llava_onevision"),
        ("qwen2vl-hub", "qwen2_vl"),
    ] {
        assert_eq!(load_model(dir).info().family, family);
    }
}

/// SigLIP's 384-px tiles with 14-px patches leave 6 px over (27 patches a side); a tower whose
/// image size is not a multiple of its patch size must still run. The fixture, switched to 30-px
/// tiles (2 patches a side and 2 px over), exercises that path.
#[test]
fn a_tile_size_that_is_not_a_multiple_of_the_patch_size_runs() {
    let dir = std::env::temp_dir().join(format!("logit-lens-ov30-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("onevision-hub")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        let text = std::fs::read(&p).unwrap();
        let text = match name.to_str().unwrap() {
            "config.json" | "preprocessor_config.json" => String::from_utf8(text)
                .unwrap()
                .replace("\"image_size\": 28", "\"image_size\": 30")
                .replace("\"height\": 28", "\"height\": 30")
                .replace("\"width\": 28", "\"width\": 30")
                .into_bytes(),
            _ => text,
        };
        std::fs::write(dir.join(name), text).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(
        cfg.contains("\"image_size\": 30"),
        "the fixture's config changed shape: {cfg}"
    );
    let model = logit_lens::models::load(
        &dir,
        "ov30",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let img = image(&cases("onevision")[0]);
    let req = logit_lens::engine::LensRequest {
        prompt: "Color?".into(),
        image: img,
        options: Default::default(),
    };
    let resp = logit_lens::engine::run_lens(model.as_ref(), &req).unwrap();
    assert!(resp.input.num_image_tokens > 4);
    std::fs::remove_dir_all(&dir).ok();
}
