//! Writes every lens layer's residual stream (f32) of one request to a safetensors file, for
//! comparing precision paths against transformers by hand:
//! `cargo run --release --example dump_layers -- MODEL_DIR IMAGE|- PROMPT DTYPE(f32|bf16|f16) OUT.safetensors`
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use logit_lens::models::LayerObserver;

struct Dump(HashMap<String, Tensor>);

impl LayerObserver for Dump {
    fn observe(&mut self, index: usize, hidden: &Tensor) -> logit_lens::Result<()> {
        self.0
            .insert(format!("layer.{index}"), hidden.to_dtype(DType::F32)?);
        Ok(())
    }
}

fn main() -> logit_lens::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dtype = match a[4].as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let model = logit_lens::models::load(a[1].as_ref(), "m", &Device::Cpu, dtype)?;
    // IMAGE `-`: a text-only prompt.
    let image = match a[2].as_str() {
        "-" => None,
        path => Some(logit_lens::preprocess::image::decode(
            &std::fs::read(path).expect("image"),
        )?),
    };
    let inputs = model.prepare(&a[3], image.as_ref(), true)?;
    let mut dump = Dump(HashMap::new());
    model.forward(&inputs, &mut dump)?;
    candle_core::safetensors::save(&dump.0, &a[5])?;
    Ok(())
}
