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
        assert_eq!((center_crop_offset(h, crop), center_crop_offset(w, crop)), (g("crop_top") as i64, g("crop_left") as i64), "{r}");
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
        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize))
        .collect();
    assert_eq!(pinpoints.len(), 36);
    let cfg = AnyResConfig { size: (384, 384), pinpoints, rescale: None, mean_std: None, max_num_patches: 9 };
    let pair = |x: &serde_json::Value| (x[0].as_u64().unwrap() as usize, x[1].as_u64().unwrap() as usize);
    let mut saw_6551 = false;
    for r in real["rows"].as_array().unwrap() {
        let (h, w) = (r["height"].as_u64().unwrap() as usize, r["width"].as_u64().unwrap() as usize);
        let best = select_best_resolution(h, w, &cfg.pinpoints);
        assert_eq!(best, pair(&r["best_resolution"]), "{h}×{w}");
        assert_eq!(patch_output_size(h, w, best), pair(&r["resized_for_patching"]), "{h}×{w}");
        let n = num_image_tokens(h, w, &cfg, 27);
        assert_eq!(n, r["num_image_tokens"].as_u64().unwrap() as usize, "{h}×{w}");
        assert_eq!(n, r["model_packed_length"].as_u64().unwrap() as usize, "{h}×{w}: the model packs as many");
        saw_6551 |= (h, w, n) == (899, 1024, 6551);
    }
    assert!(saw_6551, "MODELS.md's 899×1024 → 6551 check must be among the cases");
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
