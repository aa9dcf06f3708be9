//! LLaVA-NeXT (llava-v1.6, Mistral decoder) against transformers: tiny random checkpoints in the
//! hub's layout and as transformers 5 saves them (tests/fixtures/llava_next-{hub,tf5}), and the
//! references that tools/make_llava_next_fixtures.py computed in f32 with eager attention. The
//! image cases cover the 1×2, 2×1 and 2×2 tile grids and unpadding along both axes.

mod common;

use common::*;
use logit_lens::models::llava_onevision::processor::{num_image_tokens, AnyResConfig};

const FIXTURES: [&str; 2] = ["llava_next-hub", "llava_next-tf5"];
const FAMILY: &str = "llava_next";

#[test]
fn inputs_and_hidden_states_equal_transformers() {
    for dir in FIXTURES {
        check_inputs_and_hidden_states(dir, FAMILY);
    }
}

#[test]
fn lens_equals_transformers() {
    for dir in FIXTURES {
        check_lens(dir, FAMILY);
    }
}

#[test]
fn last_layer_is_the_models_logits() {
    for dir in FIXTURES {
        check_last_layer(dir, FAMILY);
    }
}

#[test]
fn end_to_end_with_rust_preprocessing() {
    for dir in FIXTURES {
        check_end_to_end(dir, FAMILY);
    }
}

#[test]
fn reported_as_llava_next() {
    for dir in FIXTURES {
        let m = load_model(dir);
        assert_eq!(m.info().family, FAMILY);
        assert_eq!(m.info().architecture, "LlavaNextForConditionalGeneration");
        assert!(m.info().images);
    }
}

/// LLaVA-NeXT has no tile budget: its token count is OneVision's without the downscale, at the
/// real scale (336-px tiles, 24 × 24 tokens each, llava-v1.6's pinpoints) and the fixture's.
#[test]
fn image_token_counts_at_the_real_scale() {
    let cfg = AnyResConfig {
        size: (336, 336),
        pinpoints: vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
        rescale: None,
        mean_std: None,
        max_num_patches: None,
    };
    // LlavaNextProcessor's counts (tools/make_llava_next_fixtures.py, token_counts.json).
    let p = fixtures().join("reference/llava_next/token_counts.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= 5);
    for r in rows {
        let g = |k: &str| r[k].as_u64().unwrap() as usize;
        let (h, w) = (g("height"), g("width"));
        assert_eq!(
            num_image_tokens(h, w, &cfg, 24),
            g("num_image_tokens"),
            "{h}x{w}"
        );
    }
    // The fixture's cases, counted by transformers' processor at the fixture scale.
    let tiny = AnyResConfig {
        size: (28, 28),
        pinpoints: vec![(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)],
        rescale: None,
        mean_std: None,
        max_num_patches: None,
    };
    for case in cases(FAMILY).iter().filter(|c| c.image.is_some()) {
        let img = image(case).unwrap();
        assert_eq!(
            num_image_tokens(img.height, img.width, &tiny, 2),
            case.num_image_tokens,
            "{}",
            case.name
        );
    }
}
