//! Qwen2-VL against transformers: the tiny random checkpoints in tests/fixtures (one in the hub's
//! layout with bf16 shards, one as transformers 5 saves it) and the references that
//! tools/make_fixtures.py computed with transformers in f32 with eager attention.

mod common;

use candle_core::Device;
use common::*;
use logit_lens::api::{Layers, LensOptions, Positions};
use logit_lens::engine::{run_lens, LensRequest};
use logit_lens::lens::{Lens, LensSpec};
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
            let want = r.ids("position_ids");
            let n = ids.len();
            for (i, got) in pos.iter().enumerate() {
                let exp = [want[i], want[n + i], want[2 * n + i]];
                assert_eq!(
                    got.map(|v| v as i64),
                    exp,
                    "{dir}/{}: position {i}",
                    case.name
                );
            }
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

/// Runs the model on transformers' own pixel_values, so the model is tested apart from the
/// image preprocessing.
fn prepared_with_python_pixels(
    model: &dyn logit_lens::models::VisionLanguageModel,
    case: &Case,
    r: &Reference,
) -> logit_lens::models::Prepared {
    let mut p = model
        .prepare(&case.prompt, image(case).as_ref(), true)
        .unwrap();
    if let Some(px) = p.pixels.as_mut() {
        px.pixel_values = r.get("pixel_values").clone();
    }
    p
}

#[test]
fn every_hidden_state_equals_transformers() {
    for dir in FIXTURES {
        let model = load_model(dir);
        for case in cases("qwen2vl") {
            let r = Reference::load("qwen2vl", &case.name);
            let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
            let mut rec = Recorder::default();
            model.forward(&p, &mut rec).unwrap();
            let want = r.get("hidden_states");
            let l = want.dim(0).unwrap() - 1;
            assert_eq!(rec.0.len(), l + 1);
            for (i, h) in rec.0.iter().enumerate() {
                let got = if i == l {
                    // transformers' last entry is already normed; ours is the raw stream.
                    let raw = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let d = max_diff(&raw, &r.f32s("last_layer_raw"));
                    assert!(
                        d < 1e-4,
                        "{dir}/{}: raw last layer differs by {d}",
                        case.name
                    );
                    model.head().norm.forward(h).unwrap()
                } else {
                    h.clone()
                };
                let d = max_diff(
                    &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    &want
                        .get(i)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
                assert!(
                    d < 1e-4,
                    "{dir}/{}: hidden state {i} differs by {d}",
                    case.name
                );
            }
        }
    }
}

fn lens_on(
    model: &dyn logit_lens::models::VisionLanguageModel,
    p: &logit_lens::models::Prepared,
    spec: &LensSpec,
) -> Vec<logit_lens::lens::LayerStats> {
    let mut lens = Lens::new(model.head(), spec, model.info().num_layers).unwrap();
    model.forward(p, &mut lens).unwrap();
    lens.finish().unwrap()
}

#[test]
fn lens_probabilities_entropy_kl_and_summary_equal_transformers() {
    for dir in FIXTURES {
        let model = load_model(dir);
        for case in cases("qwen2vl") {
            let r = Reference::load("qwen2vl", &case.name);
            let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
            let positions: Vec<usize> = r
                .ids("lens_positions")
                .iter()
                .map(|&v| v as usize)
                .collect();
            let n_layers = model.info().num_layers;
            let vocab = model.info().vocab_size;
            let spec = LensSpec {
                positions: positions.clone(),
                layers: (0..=n_layers).collect(),
                top_k: 5,
                targets: vec![3, 100, (vocab - 1) as u32],
                summary: true,
                excluded: vec![],
            };
            let out = lens_on(model.as_ref(), &p, &spec);
            let logprobs = r.f32s("lens_logprobs");
            let top5 = r.ids("top5_ids");
            let entropy = r.f32s("lens_entropy");
            let kl = r.f32s("lens_kl_to_final");
            let mmp = r.f32s("mean_max_prob");
            let seq = p.input_ids.len();
            assert_eq!(out.len(), n_layers + 1);
            for (l, layer) in out.iter().enumerate() {
                assert_eq!(layer.layer, l);
                let m = layer.mean_max_prob.unwrap();
                assert!(
                    (m - mmp[l]).abs() < 1e-4,
                    "{dir}/{}: layer {l} mean_max_prob {m} vs {}",
                    case.name,
                    mmp[l]
                );
                for (k, pos) in layer.positions.iter().enumerate() {
                    let row = &logprobs
                        [(l * positions.len() + k) * vocab..(l * positions.len() + k + 1) * vocab];
                    let ctx = format!("{dir}/{} layer {l} position {}", case.name, pos.position);
                    for (rank, &(id, prob, _)) in pos.top.iter().enumerate() {
                        let want = row[id as usize].exp();
                        assert!(
                            (prob - want).abs() < 1e-4,
                            "{ctx}: p({id}) {prob} vs {want}"
                        );
                        let want_id = top5[(l * positions.len() + k) * 5 + rank] as u32;
                        // The same ids, unless two logits tie to within float noise.
                        assert!(
                            id == want_id
                                || (row[id as usize] - row[want_id as usize]).abs() < 1e-5,
                            "{ctx}: top-5 {:?} vs transformers' {:?}",
                            pos.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                            &top5[(l * positions.len() + k) * 5..][..5]
                        );
                    }
                    for (t, &(prob, rank)) in spec.targets.iter().zip(&pos.targets) {
                        let want = row[*t as usize];
                        assert!((prob - want.exp()).abs() < 1e-4, "{ctx}: target {t}");
                        assert_eq!(
                            rank,
                            1 + row.iter().filter(|&&v| v > want).count(),
                            "{ctx}: rank of {t}"
                        );
                    }
                    let e = entropy[l * seq + pos.position];
                    assert!(
                        (pos.entropy - e).abs() < 1e-4 * e.max(1.0),
                        "{ctx}: entropy {} vs {e}",
                        pos.entropy
                    );
                    let want_kl = kl[l * seq + pos.position];
                    assert!(
                        (pos.kl_to_final - want_kl).abs() < 1e-4 * want_kl.max(1.0),
                        "{ctx}: kl {} vs {want_kl}",
                        pos.kl_to_final
                    );
                }
            }
        }
    }
}

#[test]
fn last_lens_layer_is_the_models_own_next_token_distribution() {
    let model = load_model("qwen2vl-hub");
    for case in cases("qwen2vl") {
        let r = Reference::load("qwen2vl", &case.name);
        let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
        let positions: Vec<usize> = r
            .ids("lens_positions")
            .iter()
            .map(|&v| v as usize)
            .collect();
        let n_layers = model.info().num_layers;
        let vocab = model.info().vocab_size;
        let spec = LensSpec {
            positions: positions.clone(),
            layers: vec![n_layers],
            top_k: 20,
            targets: vec![],
            summary: false,
            excluded: vec![],
        };
        let out = lens_on(model.as_ref(), &p, &spec);
        let logits = r.f32s("logits");
        for (k, pos) in out[0].positions.iter().enumerate() {
            let row = &logits[k * vocab..(k + 1) * vocab];
            let m = row.iter().copied().fold(f32::MIN, f32::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
            for &(id, prob, logit) in &pos.top {
                assert!(
                    (logit - row[id as usize]).abs() < 1e-4 * row[id as usize].abs().max(1.0),
                    "{}: logit of {id}",
                    case.name
                );
                assert!(
                    (prob - (row[id as usize] - lse).exp()).abs() < 1e-5,
                    "{}: prob of {id}",
                    case.name
                );
            }
            assert!(
                pos.kl_to_final.abs() < 1e-5,
                "KL of the final layer to itself is {}",
                pos.kl_to_final
            );
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
fn probe_pipeline_end_to_end_agrees_with_transformers_top1() {
    // The whole path, Rust image decoding and preprocessing included.
    let model = load_model("qwen2vl-hub");
    for case in cases("qwen2vl") {
        let r = Reference::load("qwen2vl", &case.name);
        let req = LensRequest {
            prompt: case.prompt.clone(),
            image: image(&case),
            options: LensOptions {
                top_k: 1,
                ..Default::default()
            },
        };
        let resp = run_lens(model.as_ref(), &req).unwrap();
        assert_eq!(resp.num_layers + 1, resp.layers.len());
        assert_eq!(resp.input.num_tokens, case.num_tokens);
        let top5 = r.ids("top5_ids");
        let np = r.ids("lens_positions").len();
        let mmp = r.f32s("mean_max_prob");
        for layer in &resp.layers {
            let want = top5[(layer.layer * np + np - 1) * 5];
            assert_eq!(
                layer.positions[0].top[0].id as i64,
                want,
                "{} layer {}: {:?} mmp {:?} vs {}",
                case.name,
                layer.layer,
                layer.positions[0].top,
                layer.mean_max_prob,
                mmp[layer.layer]
            );
            assert!(
                (layer.mean_max_prob.unwrap() - mmp[layer.layer]).abs() < 1e-4,
                "{} layer {}: {:?} vs {}",
                case.name,
                layer.layer,
                layer.mean_max_prob,
                mmp[layer.layer]
            );
        }
    }
}

#[test]
fn options_select_positions_layers_and_targets() {
    let model = load_model("qwen2vl-hub");
    let case = &cases("qwen2vl")[0];
    let options = LensOptions {
        top_k: 3,
        positions: Positions::List(vec![0, -1]),
        layers: Layers::List(vec![1, -1]),
        targets: vec!["red".into()],
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
        assert_eq!(t.target, "red");
        assert!(t.rank >= 1 && t.prob > 0.0);
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
