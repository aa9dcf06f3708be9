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
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error [invalid_option]: --model /nonexistent: no directory"),
        "{err}"
    );
}

/// `probe ... | head -1`: the reader goes away before the body is written; the probe ends as a
/// Unix tool does (SIGPIPE), with nothing on stderr, not with a panic and a backtrace.
#[cfg(unix)]
#[test]
fn a_reader_that_goes_away_ends_the_probe_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let model = fixtures().join("qwen2vl-hub");
    let mut child = Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .args([
            "probe",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hi",
        ])
        .args(["--positions", "all", "--pretty"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{err}");
    assert!(err.is_empty(), "{err}");
}

/// `--model Org/Name` reads the snapshot that `refs/main` names in the local Hugging Face cache,
/// as `serve` does; the response names the model after the id's last part.
#[test]
fn probe_reads_a_hub_id_from_the_local_cache() {
    let cache = std::env::temp_dir().join(format!("logit-lens-hub-{}", std::process::id()));
    let repo = cache.join("models--Org--Tiny");
    let snapshot = repo.join("snapshots/0123abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abc\n").unwrap();
    let model = fixtures().join("qwen2vl-hub");
    for entry in std::fs::read_dir(&model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .args(["probe", "--model", "Org/Tiny", "--prompt", "Hi"])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["model"], "Tiny");
    let direct = probe(&["--model", model.to_str().unwrap(), "--prompt", "Hi"]);
    let direct: serde_json::Value = serde_json::from_slice(&direct.stdout).unwrap();
    assert_eq!(body["layers"], direct["layers"]);
    let missing = probe(&["--model", "/no/such/snapshot", "--prompt", "Hi"]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("no directory /no/such/snapshot"), "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}
