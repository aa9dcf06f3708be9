//! `logit-lens probe` as a user runs it: the JSON body of API.md on stdout, errors on stderr
//! with a non-zero exit status.

mod common;

use std::process::Command;

use common::fixtures;

fn probe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .arg("probe")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn probe_prints_the_api_body() {
    let model = fixtures().join("qwen2vl-hub");
    let image = fixtures().join("images/landscape.png");
    let out = probe(&[
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "Color of the main object:",
        "--top-k",
        "3",
        "--positions",
        "-1,-2",
        "--targets",
        "red,blue",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "qwen2vl-hub");
    assert_eq!(v["family"], "qwen2_vl");
    let l = v["num_layers"].as_u64().unwrap() as usize;
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), l + 1);
    let n = v["input"]["num_tokens"].as_u64().unwrap();
    assert_eq!(v["input"]["tokens"].as_array().unwrap().len() as u64, n);
    assert_eq!(v["input"]["num_image_tokens"], 35);
    assert_eq!(v["input"]["image_grid"]["rows"], 5);
    for layer in layers {
        assert!(layer["mean_max_prob"].as_f64().unwrap() > 0.0);
        let pos = layer["positions"].as_array().unwrap();
        assert_eq!(
            pos.iter()
                .map(|p| p["position"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            vec![n - 1, n - 2]
        );
        assert_eq!(pos[0]["top"].as_array().unwrap().len(), 3);
        assert_eq!(pos[0]["targets"].as_array().unwrap().len(), 2);
        assert!(pos[0]["entropy"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(layers[l]["positions"][0]["kl_to_final"], 0.0);
    for k in ["preprocess", "forward", "lens", "total"] {
        assert!(v["timing_ms"][k].as_f64().unwrap() >= 0.0, "{k}");
    }
}

#[test]
fn probe_without_image_and_without_summary() {
    let model = fixtures().join("qwen2vl-tf5");
    let out = probe(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--no-summary",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["input"].get("image_grid").is_none());
    assert!(v["layers"][0].get("mean_max_prob").is_none());
}

#[test]
fn probe_errors_are_one_clear_line_and_exit_status_2() {
    let model = fixtures().join("qwen2vl-hub");
    let cargo_toml = fixtures().join("../../Cargo.toml");
    let out = probe(&[
        "--model",
        model.to_str().unwrap(),
        "--image",
        cargo_toml.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error [invalid_image]"), "{err}");
    let out = probe(&["--model", "/nonexistent", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
}
