//! LLaVA-1.5 and LLaVA-OneVision snapshots as transformers 5.x's own `save_pretrained` writes them
//! (tests/fixtures/{llava15,onevision}-tf{5.0,5.17}: 5.0 keeps the vision tower's `vision_model.`
//! level, 5.17 drops it), against the references each of those versions computed
//! (tools/make_saved_fixtures.py; the newest transformers reloads every one with the same numbers).

mod common;

use common::*;

const SAVED: [&str; 4] = [
    "llava15-tf5.0",
    "llava15-tf5.17",
    "onevision-tf5.0",
    "onevision-tf5.17",
];

#[test]
fn saved_snapshots_give_transformers_inputs_and_hidden_states() {
    for dir in SAVED {
        check_inputs_and_hidden_states(dir, dir);
    }
}

#[test]
fn saved_snapshots_give_transformers_lens() {
    for dir in SAVED {
        check_lens(dir, dir);
    }
}

#[test]
fn saved_snapshots_last_layer_is_the_models_logits() {
    for dir in SAVED {
        check_last_layer(dir, dir);
    }
}

#[test]
fn saved_snapshots_end_to_end_with_rust_preprocessing() {
    for dir in SAVED {
        check_end_to_end(dir, dir);
    }
}

#[test]
fn saved_snapshots_are_reported_as_their_family() {
    for (dir, family) in [
        ("llava15-tf5.17", "llava"),
        ("onevision-tf5.17", "llava_onevision"),
    ] {
        let m = load_model(dir);
        assert_eq!(m.info().family, family);
        let hub = load_model(if family == "llava" {
            "llava15-hub"
        } else {
            "onevision-hub"
        });
        // Same weights as the hub fixture, counted the same way.
        assert_eq!(m.info().parameters, hub.info().parameters, "{dir}");
    }
}

/// The names 5.17 wrote are the ones that were refused before: no `vision_model.` level.
#[test]
fn the_5_17_fixture_has_the_layout_that_was_refused() {
    let st = unsafe {
        candle_core::safetensors::MmapedSafetensors::new(
            fixtures().join("llava15-tf5.17/model.safetensors"),
        )
    }
    .unwrap();
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    assert!(names
        .iter()
        .any(|n| n == "vision_tower.embeddings.patch_embedding.weight"));
    assert!(!names.iter().any(|n| n.contains("vision_model")));
}

/// A snapshot whose names match no layout is refused with what was looked for and what was found.
#[test]
fn a_snapshot_in_no_known_layout_is_refused_with_what_was_looked_for_and_found() {
    let dir =
        std::env::temp_dir().join(format!("logit-lens-unknown-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("llava15-tf5.17");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(n, t)| (format!("backbone.{n}"), t))
        .collect();
    candle_core::safetensors::save(&renamed, dir.join("model.safetensors")).unwrap();
    let e = match logit_lens::models::load(
        &dir,
        "x",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    ) {
        Ok(_) => panic!("a snapshot in no known layout loaded"),
        Err(e) => e,
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(e.code(), "model_snapshot");
    let m = e.to_string();
    for want in [
        "model.vision_tower.embeddings.patch_embedding.weight is missing",
        "`vision_tower.vision_model.embeddings.patch_embedding.weight`",
        "`vision_tower.embeddings.patch_embedding.weight`",
        "`model.vision_tower.vision_model.embeddings.patch_embedding.weight`",
        "the files hold 89 tensors",
        "`backbone.language_model.lm_head.weight`",
    ] {
        assert!(m.contains(want), "{want} not in: {m}");
    }
}

// ---- The binary: probe, run and serve on the saved snapshots, against transformers' numbers ----

fn bin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .args(args)
        .env_remove("LOGIT_LENS_DEVICE")
        .output()
        .unwrap()
}

/// The image case of a saved fixture's references.
fn image_case(dir: &str) -> Case {
    cases(dir).into_iter().find(|c| c.image.is_some()).unwrap()
}

/// A response body (last position, every layer) against the references transformers computed:
/// the top-1 token at each layer and the summary curve.
fn assert_body_is_transformers(body: &serde_json::Value, dir: &str, what: &str) {
    let case = image_case(dir);
    let r = Reference::load(dir, &case.name);
    let top5 = r.ids("top5_ids");
    let np = r.ids("lens_positions").len();
    let mmp = r.f32s("mean_max_prob");
    let layers = body["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {body}"));
    assert_eq!(layers.len(), mmp.len(), "{what}");
    assert_eq!(body["input"]["num_tokens"], case.num_tokens, "{what}");
    for (l, layer) in layers.iter().enumerate() {
        let pos = &layer["positions"][0];
        assert_eq!(pos["position"], case.num_tokens - 1, "{what}");
        assert_eq!(
            pos["top"][0]["id"].as_i64().unwrap(),
            top5[(l * np + np - 1) * 5],
            "{what}: layer {l} top-1"
        );
        let m = layer["mean_max_prob"].as_f64().unwrap() as f32;
        assert!(
            (m - mmp[l]).abs() < 1e-4,
            "{what}: layer {l} {m} vs {}",
            mmp[l]
        );
    }
}

#[test]
fn probe_loads_every_saved_snapshot() {
    for dir in SAVED {
        let case = image_case(dir);
        let out = bin(&[
            "probe",
            "--model",
            fixtures().join(dir).to_str().unwrap(),
            "--image",
            fixtures()
                .join(case.image.as_ref().unwrap())
                .to_str()
                .unwrap(),
            "--prompt",
            &case.prompt,
        ]);
        assert!(
            out.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_body_is_transformers(&body, dir, &format!("probe {dir}"));
    }
}

#[test]
fn run_loads_a_saved_snapshot() {
    let dir = "onevision-tf5.17";
    let case = image_case(dir);
    let scratch = std::env::temp_dir().join(format!("logit-lens-run-saved-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("images")).unwrap();
    let image = fixtures().join(case.image.as_ref().unwrap());
    std::fs::copy(
        &image,
        scratch.join("images").join(image.file_name().unwrap()),
    )
    .unwrap();
    std::fs::write(scratch.join("prompts.txt"), format!("{}\n", case.prompt)).unwrap();
    let s = |p: &str| scratch.join(p).to_str().unwrap().to_string();
    let out = bin(&[
        "run",
        "--images",
        &s("images"),
        "--prompts",
        &s("prompts.txt"),
        "--model",
        fixtures().join(dir).to_str().unwrap(),
        "--out",
        &s("out"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(scratch.join("out/results.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1);
    assert_body_is_transformers(&records[0]["response"], dir, "run");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `serve` with two saved snapshots, over a real socket.
#[tokio::test]
async fn serve_loads_saved_snapshots() {
    let models = [("llava", "llava15-tf5.17"), ("ov", "onevision-tf5.0")];
    let mut args = Vec::new();
    for (name, dir) in models {
        args.push("--model".to_string());
        args.push(format!("{name}={}", fixtures().join(dir).display()));
    }
    let server = Serving::start(&args).await;
    let (base, client) = (&server.base, &server.client);
    let listed = server.get_json("/models").await;
    let families: Vec<(&str, &str)> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["family"].as_str().unwrap()))
        .collect();
    assert_eq!(families, [("llava", "llava"), ("ov", "llava_onevision")]);
    for (name, dir) in models {
        let case = image_case(dir);
        let bytes = std::fs::read(fixtures().join(case.image.as_ref().unwrap())).unwrap();
        let form = reqwest::multipart::Form::new()
            .text("prompt", case.prompt.clone())
            .text("model", name)
            .part(
                "image",
                reqwest::multipart::Part::bytes(bytes).file_name("image.png"),
            );
        let r = client
            .post(format!("{base}/lens"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_body_is_transformers(&body, dir, &format!("serve {name}"));
    }
}
