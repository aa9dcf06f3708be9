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
