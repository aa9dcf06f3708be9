//! Shared helpers for the integration tests: fixture paths, reference files made by
//! tools/make_fixtures.py with transformers, and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use logit_lens::models::{LayerObserver, VisionLanguageModel};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize, Debug, Clone)]
pub struct Case {
    pub name: String,
    pub image: Option<String>,
    pub prompt: String,
    pub num_tokens: usize,
    pub num_image_tokens: usize,
    pub image_grid_thw: Option<[usize; 3]>,
}

pub fn cases(family: &str) -> Vec<Case> {
    let p = fixtures().join("reference").join(family).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub struct Reference(pub HashMap<String, Tensor>);

impl Reference {
    pub fn load(family: &str, case: &str) -> Self {
        let p = fixtures()
            .join("reference")
            .join(family)
            .join(format!("{case}.safetensors"));
        Reference(candle_core::safetensors::load(&p, &Device::Cpu).unwrap())
    }
    pub fn get(&self, k: &str) -> &Tensor {
        self.0
            .get(k)
            .unwrap_or_else(|| panic!("reference has no {k}"))
    }
    pub fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
    pub fn ids(&self, k: &str) -> Vec<i64> {
        self.get(k).flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }
    pub fn f32s(&self, k: &str) -> Vec<f32> {
        self.get(k).flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
}

pub fn image(case: &Case) -> Option<logit_lens::preprocess::image::Rgb8> {
    case.image.as_ref().map(|p| {
        let bytes = std::fs::read(fixtures().join(p)).unwrap();
        logit_lens::preprocess::image::decode(&bytes).unwrap()
    })
}

pub fn load_model(dir: &str) -> Box<dyn VisionLanguageModel> {
    logit_lens::models::load(
        &fixtures().join(dir),
        dir,
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap()
}

/// Records every lens layer's residual stream.
#[derive(Default)]
pub struct Recorder(pub Vec<Tensor>);

impl LayerObserver for Recorder {
    fn observe(&mut self, index: usize, hidden: &Tensor) -> logit_lens::Result<()> {
        assert_eq!(index, self.0.len(), "layers must arrive in order");
        self.0.push(hidden.clone());
        Ok(())
    }
}

/// max |a − b| / (|b| + 1): absolute near zero, relative for large values.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + 1.0))
        .fold(0.0, f32::max)
}

use logit_lens::api::LensOptions;
use logit_lens::engine::{run_lens, LensRequest};
use logit_lens::lens::{LayerStats, Lens, LensSpec};
use logit_lens::models::Prepared;

/// A text-only request, top-3, that generates `generate` tokens (0: none).
pub fn generating(prompt: &str, generate: usize) -> LensRequest {
    LensRequest {
        prompt: prompt.into(),
        image: None,
        options: LensOptions {
            top_k: 3,
            generate,
            ..Default::default()
        },
    }
}

/// The model fed transformers' own pixel_values, so the model is tested apart from the image
/// preprocessing.
pub fn prepared_with_python_pixels(
    model: &dyn VisionLanguageModel,
    case: &Case,
    r: &Reference,
) -> Prepared {
    let mut p = model
        .prepare(&case.prompt, image(case).as_ref(), true)
        .unwrap();
    if let Some(px) = p.pixels.as_mut() {
        px.pixel_values = r
            .get("pixel_values")
            .reshape(px.pixel_values.shape())
            .unwrap();
    }
    p
}

pub fn lens_on(model: &dyn VisionLanguageModel, p: &Prepared, spec: &LensSpec) -> Vec<LayerStats> {
    lens_with(model, p, spec, Gemm::Default)
}

/// The CPU lens's vocabulary GEMM: the one the model's head picked (AMX where the CPU has it), or
/// candle's f32 GEMM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gemm {
    Default,
    CandleF32,
}

/// The GEMMs a CPU lens can take on this machine: candle's f32 one, and AMX's where the head is
/// packed for it.
pub fn gemms(model: &dyn VisionLanguageModel) -> Vec<Gemm> {
    let amx = model.head().packed.is_some();
    // On a CPU with AMX every f32 CPU head is packed, so the parity tests hold both GEMMs.
    assert_eq!(amx, logit_lens::models::amx::available());
    if amx {
        vec![Gemm::Default, Gemm::CandleF32]
    } else {
        vec![Gemm::Default]
    }
}

pub fn lens_with(
    model: &dyn VisionLanguageModel,
    p: &Prepared,
    spec: &LensSpec,
    gemm: Gemm,
) -> Vec<LayerStats> {
    let mut lens = Lens::new(model.head(), spec, model.info().num_layers).unwrap();
    if gemm == Gemm::CandleF32 {
        lens = lens.without_amx();
    }
    model.forward(p, &mut lens).unwrap();
    lens.finish().unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Input ids exactly, and every residual stream within 1e-4 of transformers' `hidden_states`
/// (whose last entry is already normed; ours is the raw stream, compared to `last_layer_raw`).
pub fn check_inputs_and_hidden_states(dir: &str, family: &str) {
    let model = load_model(dir);
    for case in cases(family) {
        let r = Reference::load(family, &case.name);
        let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
        let ids: Vec<i64> = p.input_ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, r.ids("input_ids"), "{dir}/{}: input_ids", case.name);
        assert_eq!(
            p.num_image_tokens, case.num_image_tokens,
            "{dir}/{}: image tokens",
            case.name
        );
        let mut rec = Recorder::default();
        model.forward(&p, &mut rec).unwrap();
        let want = r.get("hidden_states");
        let l = want.dim(0).unwrap() - 1;
        assert_eq!(rec.0.len(), l + 1);
        for (i, h) in rec.0.iter().enumerate() {
            let got = if i == l {
                let d = max_diff(&flat(h), &r.f32s("last_layer_raw"));
                assert!(
                    d < 1e-4,
                    "{dir}/{}: raw last layer differs by {d}",
                    case.name
                );
                model.head().norm.forward(h).unwrap()
            } else {
                h.clone()
            };
            let d = max_diff(&flat(&got), &flat(&want.get(i).unwrap()));
            assert!(
                d < 1e-4,
                "{dir}/{}: hidden state {i} differs by {d}",
                case.name
            );
        }
    }
}

/// Per layer and position: top-5 ids and probabilities, target probabilities and ranks,
/// entropy, KL to the final layer, and the mean-max-prob summary, against transformers; with each
/// GEMM the CPU lens can take here ([`gemms`]).
pub fn check_lens(dir: &str, family: &str) {
    let model = load_model(dir);
    for gemm in gemms(model.as_ref()) {
        check_lens_with(model.as_ref(), dir, family, gemm);
    }
}

fn check_lens_with(model: &dyn VisionLanguageModel, dir: &str, family: &str, gemm: Gemm) {
    for case in cases(family) {
        let r = Reference::load(family, &case.name);
        let p = prepared_with_python_pixels(model, &case, &r);
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
        let out = lens_with(model, &p, &spec, gemm);
        let (logprobs, top5) = (r.f32s("lens_logprobs"), r.ids("top5_ids"));
        let (entropy, kl, mmp) = (
            r.f32s("lens_entropy"),
            r.f32s("lens_kl_to_final"),
            r.f32s("mean_max_prob"),
        );
        let seq = p.input_ids.len();
        let np = positions.len();
        assert_eq!(out.len(), n_layers + 1);
        for (l, layer) in out.iter().enumerate() {
            assert_eq!(layer.layer, l);
            let m = layer.mean_max_prob.unwrap();
            assert!(
                (m - mmp[l]).abs() < 1e-4,
                "{dir}/{} ({gemm:?}): layer {l} mean_max_prob {m} vs {}",
                case.name,
                mmp[l]
            );
            for (k, pos) in layer.positions.iter().enumerate() {
                let row = &logprobs[(l * np + k) * vocab..(l * np + k + 1) * vocab];
                let ctx = format!(
                    "{dir}/{} ({gemm:?}) layer {l} position {}",
                    case.name, pos.position
                );
                for (rank, &(id, prob, _)) in pos.top.iter().enumerate() {
                    let want = row[id as usize].exp();
                    assert!(
                        (prob - want).abs() < 1e-4,
                        "{ctx}: p({id}) {prob} vs {want}"
                    );
                    let want_id = top5[(l * np + k) * 5 + rank] as u32;
                    // The same ids, unless two logits tie to within float noise.
                    assert!(
                        id == want_id || (row[id as usize] - row[want_id as usize]).abs() < 1e-5,
                        "{ctx}: top-5 {:?} vs transformers' {:?}",
                        pos.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                        &top5[(l * np + k) * 5..][..5]
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

/// The last lens layer is the model's own next-token distribution (its logits).
pub fn check_last_layer(dir: &str, family: &str) {
    let model = load_model(dir);
    for case in cases(family) {
        let r = Reference::load(family, &case.name);
        let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
        let positions: Vec<usize> = r
            .ids("lens_positions")
            .iter()
            .map(|&v| v as usize)
            .collect();
        let n_layers = model.info().num_layers;
        let vocab = model.info().vocab_size;
        let spec = LensSpec {
            positions,
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
                let want = row[id as usize];
                assert!(
                    (logit - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{}: logit of {id}",
                    case.name
                );
                assert!(
                    (prob - (want - lse).exp()).abs() < 1e-5,
                    "{}: prob of {id}",
                    case.name
                );
            }
            assert_eq!(pos.kl_to_final, 0.0);
        }
    }
}

/// The whole path, Rust image decoding and preprocessing included: the pixel values equal
/// transformers' to 1e-5, and the response's last-position top-1 and summary match.
pub fn check_end_to_end(dir: &str, family: &str) {
    let model = load_model(dir);
    for case in cases(family) {
        let r = Reference::load(family, &case.name);
        let p = model
            .prepare(&case.prompt, image(&case).as_ref(), true)
            .unwrap();
        if let Some(px) = &p.pixels {
            let want = r.f32s("pixel_values");
            let got = flat(&px.pixel_values);
            assert_eq!(
                got.len(),
                want.len(),
                "{dir}/{}: pixel_values size",
                case.name
            );
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{dir}/{}: pixel values differ by up to {worst}",
                case.name
            );
        }
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
                layer.positions[0].top[0].id as i64, want,
                "{} layer {}",
                case.name, layer.layer
            );
            let m = layer.mean_max_prob.unwrap();
            assert!(
                (m - mmp[layer.layer]).abs() < 1e-4,
                "{} layer {}: {m} vs {}",
                case.name,
                layer.layer,
                mmp[layer.layer]
            );
        }
    }
}

/// `logit-lens serve` as an operator starts it (the binary, a free port, `args`), ready to
/// answer; killed when dropped, however the test ends.
pub struct Serving {
    child: std::process::Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serving {
    pub async fn start(args: &[String]) -> Serving {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_logit-lens"))
            .arg("serve")
            .args(["--port", &port.to_string()])
            .args(args)
            .env_remove("LOGIT_LENS_DEVICE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let serving = Serving {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let t0 = std::time::Instant::now();
        while !serving
            .client
            .get(format!("{}/ready", serving.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(t0.elapsed().as_secs() < 60, "not ready in 60 s");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        serving
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A Qwen-VL family's inputs against transformers': input ids and the image grid exactly, and
/// every token's 3-D M-RoPE position.
pub fn check_ids_grids_and_positions(dir: &str, family: &str) {
    let model = load_model(dir);
    assert_eq!(model.info().family, family);
    for case in cases(family) {
        let r = Reference::load(family, &case.name);
        let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
        let ids: Vec<i64> = p.input_ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, r.ids("input_ids"), "{dir}/{}", case.name);
        if let Some(g) = case.image_grid_thw {
            assert_eq!(
                p.pixels.as_ref().unwrap().grid_thw,
                g,
                "{dir}/{}",
                case.name
            );
        }
        let pos = model.embed(&p).unwrap().positions;
        check_positions(
            &pos,
            &r.ids("position_ids"),
            &format!("{dir}/{}", case.name),
        );
    }
}

/// 3-D (t, h, w) rope positions against transformers' `position_ids` (`[3, 1, n]`, flattened).
pub fn check_positions(got: &[[u32; 3]], want: &[i64], label: &str) {
    let n = got.len();
    assert_eq!(want.len(), 3 * n, "{label}: position_ids");
    for (i, got) in got.iter().enumerate() {
        let exp = [want[i], want[n + i], want[2 * n + i]];
        assert_eq!(got.map(|v| v as i64), exp, "{label}: position {i}");
    }
}

/// The family's image cases through the vision tower together give each image what it gets
/// alone: its tokens, and its `deepstack_sets` DeepStack feature sets (Qwen3-VL; 0 elsewhere).
pub fn check_image_batch(dir: &str, family: &str, deepstack_sets: usize) {
    let model = load_model(dir);
    let prepared: Vec<_> = cases(family)
        .iter()
        .filter(|c| c.image.is_some())
        .map(|c| model.prepare(&c.prompt, image(c).as_ref(), true).unwrap())
        .collect();
    let pixels: Vec<_> = prepared
        .iter()
        .map(|p| p.pixels.as_ref().unwrap())
        .collect();
    let together = model.image_features(&pixels).unwrap();
    for (px, t) in pixels.iter().zip(&together) {
        let alone = model.image_features(&[px]).unwrap().remove(0);
        assert!(max_diff(&flat(&t.tokens), &flat(&alone.tokens)) < 1e-5);
        assert_eq!(t.deepstack.len(), deepstack_sets);
        for (a, b) in alone.deepstack.iter().zip(&t.deepstack) {
            assert!(max_diff(&flat(b), &flat(a)) < 1e-5);
        }
    }
}
