//! Qwen2.5-VL against transformers: tiny random checkpoints in the hub's layout and as
//! transformers 5 saves them (tests/fixtures/qwen2_5_vl-{hub,tf5}), and the references that
//! tools/make_qwen2_5_vl_fixtures.py computed in f32 with eager attention. The vision tower's
//! window attention (several windows with partial edges, one full-attention block) is covered by
//! the image cases' hidden states.

mod common;

use common::*;
use logit_lens::models::qwen2_5_vl::vision::window_index;

const FIXTURES: [&str; 2] = ["qwen2_5_vl-hub", "qwen2_5_vl-tf5"];
const FAMILY: &str = "qwen2_5_vl";

#[test]
fn input_ids_grids_and_position_ids_equal_transformers() {
    for dir in FIXTURES {
        check_ids_grids_and_positions(dir, FAMILY);
    }
}

#[test]
fn every_hidden_state_equals_transformers() {
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

/// The cases really have several windows, partial ones among them (else the window permutation
/// would be untested).
#[test]
fn the_cases_cover_several_and_partial_windows() {
    let grids: Vec<[usize; 3]> = cases(FAMILY)
        .iter()
        .filter_map(|c| c.image_grid_thw)
        .collect();
    let sizes: Vec<Vec<usize>> = grids.iter().map(|g| window_index(*g, 2, 4).1).collect();
    assert!(
        sizes
            .iter()
            .any(|s| s.len() > 1 && s.iter().any(|&n| n < 16)),
        "{sizes:?}"
    );
    assert!(sizes.iter().any(|s| s.len() == 1), "{sizes:?}");
}

/// Several images of different sizes through the tower together give each its own features.
#[test]
fn a_batch_of_images_gets_what_each_gets_alone() {
    check_image_batch("qwen2_5_vl-hub", FAMILY, 0);
}
