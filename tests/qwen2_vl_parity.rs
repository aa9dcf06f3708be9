//! Qwen2-VL against transformers: the tiny random checkpoints in tests/fixtures (one in the hub's
//! layout with bf16 shards, one as transformers 5 saves it) and the references that
//! tools/make_fixtures.py computed with transformers in f32 with eager attention.

mod common;

use candle_core::Device;
use common::*;
use logit_lens::api::{Layers, LensOptions, Positions};
use logit_lens::engine::{run_lens, LensRequest};
use logit_lens::lens::LensSpec;
use logit_lens::models::qwen2_vl::processor::{preprocess, smart_resize, ImageProcessorConfig};
use logit_lens::models::qwen2_vl::text::rope_positions;
use logit_lens::models::snapshot::Snapshot;

const FIXTURES: [&str; 2] = ["qwen2vl-hub", "qwen2vl-tf5"];

#[test]
fn input_ids_and_position_ids_equal_transformers() {
    for dir in FIXTURES {
        let model = load_model(dir);
        for case in cases("qwen2vl") {
            let r = Reference::load("qwen2vl", &case.name);
            let p = model
                .prepare(&case.prompt, image(&case).as_ref(), true)
                .unwrap();
            let ids: Vec<i64> = p.input_ids.iter().map(|&i| i as i64).collect();
            assert_eq!(ids, r.ids("input_ids"), "{dir}/{}: input_ids", case.name);
            assert_eq!(
                p.num_image_tokens, case.num_image_tokens,
                "{dir}/{}",
                case.name
            );
            let pos = rope_positions(
                ids.len(),
                p.image_grid.map(|g| (g.first_position, g.rows, g.cols)),
            );
            check_positions(
                &pos,
                &r.ids("position_ids"),
                &format!("{dir}/{}", case.name),
            );
            if let Some(g) = case.image_grid_thw {
                assert_eq!(
                    p.pixels.as_ref().unwrap().grid_thw,
                    g,
                    "{dir}/{}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn rust_preprocessing_matches_transformers_pixel_values() {
    for dir in FIXTURES {
        let cfg =
            ImageProcessorConfig::from_snapshot(&Snapshot::open(fixtures().join(dir)).unwrap())
                .unwrap();
        for case in cases("qwen2vl").iter().filter(|c| c.image.is_some()) {
            let r = Reference::load("qwen2vl", &case.name);
            let got = preprocess(&image(case).unwrap(), &cfg, &Device::Cpu).unwrap();
            assert_eq!(
                got.pixel_values.dims(),
                r.get("pixel_values").dims(),
                "{dir}/{}",
                case.name
            );
            let a = got
                .pixel_values
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = r.f32s("pixel_values");
            // The resize reproduces torchvision's fixed-point arithmetic, so the 8-bit pixels are
            // identical and only the f32 normalisation can differ (one grey level would be 0.015).
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{dir}/{}: pixel values differ by up to {worst}",
                case.name
            );
        }
    }
}

#[test]
fn smart_resize_agrees_with_transformers_including_its_errors() {
    let p = fixtures().join("reference/qwen2vl/smart_resize.json");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    assert!(rows.len() >= 10);
    for r in rows {
        let g = |k: &str| r[k].as_u64().unwrap() as usize;
        let got = smart_resize(
            g("height"),
            g("width"),
            28,
            g("min_pixels"),
            g("max_pixels"),
        );
        match r.get("error") {
            Some(_) => assert!(got.is_err(), "{r}: transformers refuses, we gave {got:?}"),
            None => assert_eq!(
                got.unwrap(),
                (g("resized_height"), g("resized_width")),
                "{r}"
            ),
        }
    }
}

/// Published logit-lens code often feeds transformers' `hidden_states[-1]` (already normed)
/// through the final norm again. With the fixture's random norm weights that changes the answer;
/// this test proves the fixtures can tell, and that our last layer is not normed twice.
#[test]
fn applying_the_final_norm_twice_would_be_caught() {
    let model = load_model("qwen2vl-hub");
    let case = &cases("qwen2vl")[0];
    let r = Reference::load("qwen2vl", &case.name);
    let l = r.get("hidden_states").dim(0).unwrap() - 1;
    let hf_last = r.get("hidden_states").get(l).unwrap();
    let head = model.head();
    let twice = head
        .norm
        .forward(&hf_last)
        .unwrap()
        .matmul(&head.unembed.t().unwrap())
        .unwrap();
    let twice = candle_nn::ops::log_softmax(&twice, 1).unwrap();
    let positions = r
        .get("lens_positions")
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let twice = twice
        .index_select(&positions, 0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let vocab = model.info().vocab_size;
    let want = &r.f32s("lens_logprobs")[l * positions.dim(0).unwrap() * vocab..];
    let worst = twice
        .iter()
        .zip(want)
        .map(|(a, b)| (a.exp() - b.exp()).abs())
        .fold(0f32, f32::max);
    assert!(
        worst > 1e-2,
        "double norm only moves probabilities by {worst}: the fixture cannot detect it"
    );

    let p = prepared_with_python_pixels(model.as_ref(), case, &r);
    let spec = LensSpec {
        positions: vec![p.input_ids.len() - 1],
        layers: vec![l],
        top_k: 1,
        targets: vec![],
        summary: false,
        excluded: vec![],
    };
    let out = lens_on(model.as_ref(), &p, &spec);
    let (id, prob, _) = out[0].positions[0].top[0];
    let last = r.ids("lens_positions").len() - 1;
    assert!((prob - want[last * vocab + id as usize].exp()).abs() < 1e-4);
}

#[test]
fn every_hidden_state_equals_transformers() {
    for dir in FIXTURES {
        check_inputs_and_hidden_states(dir, "qwen2vl");
    }
}

#[test]
fn lens_probabilities_entropy_kl_and_summary_equal_transformers() {
    for dir in FIXTURES {
        check_lens(dir, "qwen2vl");
    }
}

#[test]
fn last_lens_layer_is_the_models_own_next_token_distribution() {
    check_last_layer("qwen2vl-hub", "qwen2vl");
}

#[test]
fn probe_pipeline_end_to_end_agrees_with_transformers() {
    // The whole path, Rust image decoding and preprocessing included.
    check_end_to_end("qwen2vl-hub", "qwen2vl");
}

#[test]
fn options_select_positions_layers_and_targets() {
    let model = load_model("qwen2vl-hub");
    let case = &cases("qwen2vl")[0];
    let options = LensOptions {
        top_k: 3,
        positions: Positions::List(vec![0, -1]),
        layers: Layers::List(vec![1, -1]),
        // transformers' tokenizer: "red" → "re" + "d"; " Red" → " " + "R" + ... in this small
        // vocabulary. The first token is traced, and the response says which it is.
        targets: vec!["red".into(), " Red".into()],
        summary: false,
        ..Default::default()
    };
    let req = LensRequest {
        prompt: case.prompt.clone(),
        image: image(case),
        options,
    };
    let resp = run_lens(model.as_ref(), &req).unwrap();
    let n = resp.input.num_tokens;
    assert_eq!(
        resp.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
        vec![1, resp.num_layers]
    );
    for l in &resp.layers {
        assert!(l.mean_max_prob.is_none());
        assert_eq!(
            l.positions.iter().map(|p| p.position).collect::<Vec<_>>(),
            vec![0, n - 1]
        );
        assert_eq!(l.positions[0].top.len(), 3);
        let t = &l.positions[1].targets[0];
        assert_eq!(
            (t.target.as_str(), t.id, t.token.as_str()),
            ("red", 261, "re")
        );
        assert!(t.rank >= 1 && t.prob > 0.0);
        let t = &l.positions[1].targets[1];
        assert_eq!(
            (t.target.as_str(), t.id, t.token.as_str()),
            (" Red", 220, " ")
        );
    }
    // An image grid is reported where the image tokens are.
    let g = resp.input.image_grid.unwrap();
    assert_eq!(g.rows * g.cols, resp.input.num_image_tokens);
    assert!(resp.input.tokens[g.first_position..][..g.rows * g.cols]
        .iter()
        .all(|t| t.kind == logit_lens::models::TokenKind::Image));
}

#[test]
fn exclude_special_keeps_added_and_padding_rows_out_of_top_k() {
    let model = load_model("qwen2vl-hub");
    let case = &cases("qwen2vl")[0];
    let run = |exclude_special: bool| {
        let options = LensOptions {
            top_k: 10,
            positions: Positions::Keyword("all".into()),
            exclude_special,
            ..Default::default()
        };
        run_lens(
            model.as_ref(),
            &LensRequest {
                prompt: case.prompt.clone(),
                image: image(case),
                options,
            },
        )
        .unwrap()
    };
    let plain = run(false);
    let tokenizer_size = model.tokenizer().get_vocab_size(true) as u32;
    // Off by default: the numbers are transformers' own, padding rows included.
    assert!(plain.excluded_ids.is_none());
    let hits = plain
        .layers
        .iter()
        .flat_map(|l| &l.positions)
        .flat_map(|p| &p.top)
        .filter(|t| t.id >= tokenizer_size)
        .count();
    assert!(
        hits > 0,
        "the fixture should put padding rows into some top-10"
    );
    let filtered = run(true);
    // 14 special tokens then the rows past the tokenizer, up to the 768-row embedding.
    assert_eq!(
        filtered.excluded_ids,
        Some(vec![[tokenizer_size - 14, 767]])
    );
    for (a, b) in plain.layers.iter().zip(&filtered.layers) {
        assert_eq!(a.mean_max_prob, b.mean_max_prob);
        for (pa, pb) in a.positions.iter().zip(&b.positions) {
            assert!(pb.top.iter().all(|t| t.id < tokenizer_size - 14));
            assert_eq!(pa.entropy, pb.entropy);
            // The allowed ids keep their order and probabilities.
            let kept: Vec<_> = pa
                .top
                .iter()
                .filter(|t| t.id < tokenizer_size - 14)
                .collect();
            assert!(kept
                .iter()
                .zip(&pb.top)
                .all(|(x, y)| x.id == y.id && x.prob == y.prob));
        }
    }
}

/// The accelerator's reduction (tensor operations; each detail row reduced tile by tile where it
/// lives, as the GPU's kernel does, here by its host twin) gives the CPU path's numbers; run here
/// on the CPU so CI covers the GPU's logic.
#[test]
fn tensor_reduction_path_equals_the_fused_cpu_path() {
    let model = load_model("qwen2vl-hub");
    for case in cases("qwen2vl") {
        let p = model
            .prepare(&case.prompt, image(&case).as_ref(), true)
            .unwrap();
        let n = model.info().num_layers;
        let vocab = model.info().vocab_size;
        let positions = vec![0, p.input_ids.len() / 2, p.input_ids.len() - 1];
        // Every layer; or all but the final one (summary plans beside the final layer's, which is
        // read for KL but not reported), a position asked twice, and ids kept out of top-k.
        let mut twice = positions.clone();
        twice.push(positions[1]);
        for spec in [
            LensSpec {
                positions,
                layers: (0..=n).collect(),
                top_k: 5,
                targets: vec![3, 700],
                summary: true,
                excluded: vec![],
            },
            LensSpec {
                positions: twice,
                layers: (0..n).collect(),
                top_k: 4,
                targets: vec![700, 3, 12],
                summary: true,
                excluded: (0..vocab).map(|v| v % 7 == 2).collect(),
            },
        ] {
            tensor_path_against_fused(model.as_ref(), &p, &spec);
        }
    }
}

/// `tensor_reduction_path_equals_the_fused_cpu_path` for one spec.
fn tensor_path_against_fused(
    model: &dyn logit_lens::models::VisionLanguageModel,
    p: &logit_lens::models::Prepared,
    spec: &LensSpec,
) {
    let n = model.info().num_layers;
    {
        // `tile`: vocabulary entries per unembedding GEMM (0: all at once); `chunk`: rows per GEMM;
        // `collect_every`: the detail rows' tile parts that may wait on the device (1 byte: the
        // host collects after every pass over the unembedding).
        let run_blocks = |tensor_path: bool, tile: usize, chunk, collect_every: Option<usize>| {
            let lens = logit_lens::lens::Lens::new(model.head(), spec, n)
                .unwrap()
                .with_vocab_tile(tile)
                .with_row_chunk(chunk);
            let mut lens = if tensor_path {
                lens.with_tensor_path()
            } else {
                lens
            };
            if let Some(bytes) = collect_every {
                lens = lens.with_pending_part_bytes(bytes);
            }
            model.forward(p, &mut lens).unwrap();
            lens.finish().unwrap()
        };
        let run = |tensor_path: bool, tile: usize| {
            run_blocks(tensor_path, tile, logit_lens::lens::DEVICE_ROWS, None)
        };
        let (fused, tensors) = (run(false, 0), run(true, 0));
        assert_eq!(fused.len(), spec.layers.len());
        assert_eq!(
            run_blocks(true, 100, 7, Some(1)),
            run_blocks(true, 100, 7, None),
            "collected after every pass or at the end"
        );
        // The vocabulary in tiles (the last one partial): each tile's max and sum-exp combined,
        // each detail row reduced tile by tile and the tiles' parts merged on the host; and the
        // rows in chunks of 7 (the last one partial; the tiles the outer loop, so each chunk sees
        // its tiles in turn among the others').
        assert!(!model.info().vocab_size.is_multiple_of(100));
        assert!(p.input_ids.len() > 14 && !p.input_ids.len().is_multiple_of(7));
        for (what, tiled) in [
            ("tiles of 100", run(true, 100)),
            ("tiles of 100, chunks of 7", run_blocks(true, 100, 7, None)),
        ] {
            for (a, b) in tiled.iter().zip(&tensors) {
                assert!((a.mean_max_prob.unwrap() - b.mean_max_prob.unwrap()).abs() < 1e-5);
                for (pa, pb) in a.positions.iter().zip(&b.positions) {
                    // Chunks of other sizes are other GEMMs: logits differ in the last bit.
                    assert_eq!(
                        pa.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                        pb.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                        "{what}"
                    );
                    for (x, y) in pa.top.iter().zip(&pb.top) {
                        assert!(
                            (x.1 - y.1).abs() < 1e-5 && (x.2 - y.2).abs() < 1e-4,
                            "{what}"
                        );
                    }
                    assert!((pa.entropy - pb.entropy).abs() < 1e-4);
                    assert!((pa.kl_to_final - pb.kl_to_final).abs() < 1e-4);
                    assert_eq!(
                        pa.targets.iter().map(|t| t.1).collect::<Vec<_>>(),
                        pb.targets.iter().map(|t| t.1).collect::<Vec<_>>()
                    );
                }
            }
        }
        for (a, b) in fused.iter().zip(&tensors) {
            assert!((a.mean_max_prob.unwrap() - b.mean_max_prob.unwrap()).abs() < 1e-5);
            for (pa, pb) in a.positions.iter().zip(&b.positions) {
                assert_eq!(
                    pa.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                    pb.top.iter().map(|t| t.0).collect::<Vec<_>>()
                );
                for (x, y) in pa.top.iter().zip(&pb.top) {
                    assert!((x.1 - y.1).abs() < 1e-5);
                }
                assert!(
                    (pa.entropy - pb.entropy).abs() < 1e-4,
                    "{} vs {}",
                    pa.entropy,
                    pb.entropy
                );
                assert!((pa.kl_to_final - pb.kl_to_final).abs() < 1e-4);
                assert_eq!(
                    pa.targets.iter().map(|t| t.1).collect::<Vec<_>>(),
                    pb.targets.iter().map(|t| t.1).collect::<Vec<_>>()
                );
                for (x, y) in pa.targets.iter().zip(&pb.targets) {
                    assert!(
                        (x.0 - y.0).abs() < 1e-5,
                        "target probability {} vs {}",
                        x.0,
                        y.0
                    );
                }
            }
        }
    }
}

/// Positions that trace different targets (a generation step's answers read as one lens): each
/// position's targets are, on both reduction paths, exactly those entries of a lens that traces
/// every target everywhere, in the order it lists them; the rest of the report is unchanged.
#[test]
fn per_position_targets_are_the_entries_of_all_targets() {
    let model = load_model("qwen2vl-hub");
    let case = &cases("qwen2vl")[0];
    let p = model
        .prepare(&case.prompt, image(case).as_ref(), true)
        .unwrap();
    let n = model.info().num_layers;
    let spec = LensSpec {
        positions: vec![0, p.input_ids.len() / 2, p.input_ids.len() - 1],
        layers: (0..=n).collect(),
        top_k: 3,
        targets: vec![3, 700, 12],
        summary: false,
        excluded: vec![],
    };
    let per_position = vec![vec![1], vec![], vec![2, 0, 1, 2]];
    for tensor_path in [false, true] {
        let run = |per: Option<Vec<Vec<usize>>>| {
            let mut lens = logit_lens::lens::Lens::new(model.head(), &spec, n).unwrap();
            if let Some(per) = per {
                lens = lens.with_position_targets(per).unwrap();
            }
            if tensor_path {
                lens = lens.with_tensor_path();
            }
            model.forward(&p, &mut lens).unwrap();
            lens.finish().unwrap()
        };
        let (all, some) = (run(None), run(Some(per_position.clone())));
        assert_eq!(all.len(), some.len());
        for (a, s) in all.iter().zip(&some) {
            for ((pa, ps), picked) in a.positions.iter().zip(&s.positions).zip(&per_position) {
                let want: Vec<(f32, usize)> = picked.iter().map(|&j| pa.targets[j]).collect();
                assert_eq!(ps.targets, want, "tensor path {tensor_path}");
                assert_eq!(
                    (&ps.top, ps.entropy, ps.kl_to_final),
                    (&pa.top, pa.entropy, pa.kl_to_final)
                );
            }
        }
    }
    let lens = logit_lens::lens::Lens::new(model.head(), &spec, n).unwrap();
    assert!(lens
        .with_position_targets(vec![vec![3], vec![], vec![]])
        .is_err());
    let lens = logit_lens::lens::Lens::new(model.head(), &spec, n).unwrap();
    assert!(lens.with_position_targets(vec![vec![0]]).is_err());
}
