//! Qwen3-VL against transformers: tiny random checkpoints in the hub's layout and as
//! transformers 5 saves them (tests/fixtures/qwen3_vl-{hub,tf5}), and the references that
//! tools/make_qwen3_vl_fixtures.py computed in f32 with eager attention. The hidden state after a
//! DeepStack block is the residual stream with the vision features added (what the next block
//! reads); the learned position table is both up- and down-sampled by the cases' grids.

mod common;

use candle_core::Tensor;
use common::*;

const FIXTURES: [&str; 2] = ["qwen3_vl-hub", "qwen3_vl-tf5"];
const FAMILY: &str = "qwen3_vl";

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

/// DeepStack is really exercised: the two feature sets land after blocks 0 and 1 (lens layers
/// 1 and 2, as GET /models says), only at the image positions, and they change what the lens
/// reads there (the references hold the sums: tools/make_qwen3_vl_fixtures.py checks that they
/// differ from transformers' `hidden_states` at the image positions only).
#[test]
fn deepstack_adds_at_the_image_positions_after_the_first_blocks() {
    let model = load_model("qwen3_vl-hub");
    assert_eq!(model.info().deepstack_layers, vec![1, 2]);
    let case = cases(FAMILY)
        .into_iter()
        .find(|c| c.image.is_some())
        .unwrap();
    let r = Reference::load(FAMILY, &case.name);
    let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
    let input = model.embed(&p).unwrap();
    assert_eq!(input.additions.len(), 2);
    let first = p.image_grid.unwrap().first_position;
    for (i, a) in input.additions.iter().enumerate() {
        assert_eq!((a.after_block, a.first), (i, first));
        assert_eq!(a.rows.dims(), &[case.num_image_tokens, 64]);
    }
    // Without the additions the image rows of layers 1 and 2 come out different, the text rows
    // before the image the same.
    let mut with = Recorder::default();
    model.forward(&p, &mut with).unwrap();
    let mut plain = input;
    plain.additions.clear();
    let mut without = Recorder::default();
    model
        .decoder()
        .forward_batch(vec![plain], &mut [&mut without])
        .unwrap();
    let rows = |t: &Tensor, a: usize, n: usize| -> Vec<f32> {
        t.narrow(0, a, n)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for l in [1, 2] {
        let (w, wo) = (&with.0[l], &without.0[l]);
        assert!(
            max_diff(
                &rows(w, first, case.num_image_tokens),
                &rows(wo, first, case.num_image_tokens)
            ) > 1e-2
        );
        assert_eq!(rows(w, 0, first), rows(wo, 0, first));
    }
    assert_eq!(
        with.0[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        without.0[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

/// Several images of different sizes through the tower together give each its own features.
#[test]
fn a_batch_of_images_gets_what_each_gets_alone() {
    check_image_batch("qwen3_vl-hub", FAMILY, 2);
}
