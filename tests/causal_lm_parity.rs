//! Text-only causal LMs (family `causal_lm`: Llama 3 with llama3 RoPE scaling, Mistral, Qwen2.5,
//! Qwen3 with q/k norms, Gemma 2 with soft-capping and sandwich norms, Gemma 3 with local and
//! global RoPE) against transformers: tiny random checkpoints in the hub's layout and as
//! transformers 5 saves them (tests/fixtures/<arch>-{hub,tf5}), and the references that
//! tools/make_text_fixtures.py computed in f32 with eager attention.

mod common;

use common::*;
use logit_lens::api::LensOptions;
use logit_lens::engine::{run_lens, LensRequest};

const ARCHS: [&str; 6] = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"];

fn each(f: fn(&str, &str)) {
    for arch in ARCHS {
        for layout in ["hub", "tf5"] {
            f(&format!("{arch}-{layout}"), arch);
        }
    }
}

#[test]
fn inputs_and_hidden_states_equal_transformers() {
    each(check_inputs_and_hidden_states);
}

#[test]
fn lens_equals_transformers() {
    each(check_lens);
}

#[test]
fn last_layer_is_the_models_logits() {
    each(check_last_layer);
}

#[test]
fn end_to_end() {
    each(check_end_to_end);
}

/// `chat_template: false`: the prompt as `tokenizer(prompt)` encodes it (BOS from the
/// tokenizer's post-processor where the model has one).
#[test]
fn verbatim_prompts_are_tokenized_as_transformers_tokenizer_does() {
    #[derive(serde::Deserialize)]
    struct Verbatim {
        prompt: String,
        verbatim_ids: Vec<u32>,
    }
    each(|dir, arch| {
        let model = load_model(dir);
        let p = fixtures().join("reference").join(arch).join("cases.json");
        let cases: Vec<Verbatim> =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        for c in cases {
            let got = model.prepare(&c.prompt, None, false).unwrap();
            assert_eq!(got.input_ids, c.verbatim_ids, "{dir}: {}", c.prompt);
        }
    });
}

#[test]
fn listed_as_text_only_causal_lms() {
    for (dir, arch) in [
        ("llama3-hub", "LlamaForCausalLM"),
        ("mistral-tf5", "MistralForCausalLM"),
        ("qwen2-hub", "Qwen2ForCausalLM"),
        ("qwen3-tf5", "Qwen3ForCausalLM"),
        ("gemma2-hub", "Gemma2ForCausalLM"),
        ("gemma3-tf5", "Gemma3ForCausalLM"),
    ] {
        let m = load_model(dir);
        let info = m.info();
        assert_eq!(
            (info.family, info.architecture.as_str(), info.images),
            ("causal_lm", arch, false)
        );
    }
}

#[test]
fn an_image_is_refused_with_image_not_accepted() {
    for dir in ["qwen3-hub", "gemma2-hub", "gemma3-hub"] {
        let model = load_model(dir);
        let req = LensRequest {
            prompt: "Describe".into(),
            image: image(&Case {
                name: "x".into(),
                image: Some("images/tiny.png".into()),
                prompt: String::new(),
                num_tokens: 0,
                num_image_tokens: 0,
                image_grid_thw: None,
            }),
            options: LensOptions::default(),
        };
        let e = run_lens(model.as_ref(), &req).unwrap_err();
        assert_eq!(e.code(), "image_not_accepted");
        assert!(e.to_string().contains("text only"), "{e}");
    }
}

/// Mistral's, Gemma 3's and Qwen3's (`use_sliding_window`, from `max_window_layers` on) sliding
/// windows (16 in these fixtures): a case longer than the window is in each fixture (the parity
/// tests above hold it to transformers, which attends within the window), and the window is not a
/// no-op: without it (the same snapshot with a window of 4096) the last layer of that case comes
/// out different.
#[test]
fn inputs_longer_than_the_sliding_window_attend_within_it() {
    for fixture in ["mistral-hub", "gemma3-hub", "qwen3-hub", "qwen3-tf5"] {
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(fixture).join("config.json")).unwrap(),
        )
        .unwrap();
        let window = cfg["sliding_window"].as_u64().unwrap() as usize;
        let arch = fixture.split('-').next().unwrap();
        let case = cases(arch)
            .into_iter()
            .find(|c| c.num_tokens > window)
            .unwrap_or_else(|| panic!("{fixture}: no case longer than the window {window}"));
        let dir = std::env::temp_dir().join(format!(
            "logit-lens-window-{}-{fixture}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixtures().join(fixture)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        let mut wide = cfg.clone();
        wide["sliding_window"] = 4096.into();
        std::fs::write(dir.join("config.json"), wide.to_string()).unwrap();
        let last = |model: &dyn logit_lens::models::VisionLanguageModel| {
            let p = model.prepare(&case.prompt, None, true).unwrap();
            let mut rec = Recorder::default();
            model.forward(&p, &mut rec).unwrap();
            rec.0
                .last()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let windowed = last(load_model(fixture).as_ref());
        let full = last(
            logit_lens::models::load(
                &dir,
                "m",
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )
            .unwrap()
            .as_ref(),
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            max_diff(&windowed, &full) > 1e-3,
            "{fixture}: the window of {window} changed nothing over {} tokens",
            case.num_tokens
        );
    }
}

/// `serve` with a text-only model: text requests answer as `run_lens` does, an image gets 422.
#[tokio::test]
async fn serve_answers_text_and_refuses_an_image_with_422() {
    let server = Serving::start(&[
        "--model".to_string(),
        format!("llama={}", fixtures().join("llama3-tf5").display()),
    ])
    .await;
    let (base, client) = (&server.base, &server.client);
    let listed = server.get_json("/models").await;
    assert_eq!(listed["models"][0]["family"], "causal_lm");
    assert_eq!(listed["models"][0]["images"], false);

    let case = &cases("llama3")[0];
    let r = client
        .post(format!("{base}/lens"))
        .json(&serde_json::json!({"prompt": case.prompt, "options": {"top_k": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let r = Reference::load("llama3", &case.name);
    let (top5, np, mmp) = (
        r.ids("top5_ids"),
        r.ids("lens_positions").len(),
        r.f32s("mean_max_prob"),
    );
    assert_eq!(body["input"]["num_tokens"], case.num_tokens);
    for (l, layer) in body["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            layer["positions"][0]["top"][0]["id"].as_i64().unwrap(),
            top5[(l * np + np - 1) * 5],
            "layer {l}"
        );
        let m = layer["mean_max_prob"].as_f64().unwrap() as f32;
        assert!((m - mmp[l]).abs() < 1e-4, "layer {l}");
    }

    let png = std::fs::read(fixtures().join("images/tiny.png")).unwrap();
    let form = reqwest::multipart::Form::new()
        .text("prompt", "Describe")
        .part(
            "image",
            reqwest::multipart::Part::bytes(png).file_name("tiny.png"),
        );
    let r = client
        .post(format!("{base}/lens"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "image_not_accepted", "{body}");
}

/// Soft-capped logits (Gemma 2) on the GPU's reduction path (its CPU twin here): the same top-5,
/// probabilities, entropy, KL (recomputed from the capped logits) and target ranks as the fused
/// CPU path, which the references above check against transformers.
#[test]
fn soft_capped_lens_on_the_tensor_path_equals_the_cpu_path() {
    use logit_lens::lens::{Lens, LensSpec};
    let model = load_model("gemma2-hub");
    assert_eq!(model.head().softcap, Some(10.0));
    let p = model
        .prepare("The capital of France is", None, true)
        .unwrap();
    let n = model.info().num_layers;
    let spec = LensSpec {
        positions: vec![0, p.input_ids.len() / 2, p.input_ids.len() - 1],
        layers: (0..=n).collect(),
        top_k: 5,
        targets: vec![3, 300],
        summary: true,
        excluded: vec![],
    };
    let run = |tensor_path: bool| {
        let lens = Lens::new(model.head(), &spec, n).unwrap();
        let mut lens = if tensor_path {
            lens.with_tensor_path()
        } else {
            lens
        };
        model.forward(&p, &mut lens).unwrap();
        lens.finish().unwrap()
    };
    let (cpu, tensors) = (run(false), run(true));
    for (a, b) in cpu.iter().zip(&tensors) {
        assert!((a.mean_max_prob.unwrap() - b.mean_max_prob.unwrap()).abs() < 1e-5);
        for (pa, pb) in a.positions.iter().zip(&b.positions) {
            let ids =
                |p: &logit_lens::lens::PositionStats| p.top.iter().map(|t| t.0).collect::<Vec<_>>();
            assert_eq!(ids(pa), ids(pb));
            for (x, y) in pa.top.iter().zip(&pb.top) {
                assert!((x.1 - y.1).abs() < 1e-5 && (x.2 - y.2).abs() < 1e-4);
            }
            assert!((pa.entropy - pb.entropy).abs() < 1e-4);
            assert!((pa.kl_to_final - pb.kl_to_final).abs() < 1e-4);
            if a.layer < n {
                assert!(
                    pa.kl_to_final > 1e-3,
                    "layer {}: KL {}",
                    a.layer,
                    pa.kl_to_final
                );
            }
            for (x, y) in pa.targets.iter().zip(&pb.targets) {
                assert!((x.0 - y.0).abs() < 1e-5);
                assert_eq!(x.1, y.1);
            }
        }
    }
}
