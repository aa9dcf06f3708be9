//! A `Linear` on AMX (src/models/amx.rs, bf16-stored weights: one piece) at the shapes of a
//! real-size Qwen2-VL-2B request on the 640×480 image: its vision tower (1564 patches: q/k/v, the
//! MLP's two layers) and its decoder's MLP (418 tokens), with bias where the model has one, beside
//! candle's f32 GEMM on the same values. GFLOP/s count 2 · rows · in · out, as bench/README.md
//! quotes them. `cargo run --release --example linear_throughput`
use candle_core::{DType, Device, Tensor};
use logit_lens::models::amx;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    logit_lens::keep_freed_memory();
    logit_lens::flush_subnormals();
    if !amx::available() {
        println!("no AMX here: {}", amx::describe());
        return;
    }
    let d = Device::Cpu;
    for (name, rows, inner, out, bias) in [
        ("vision q/k/v", 1564, 1280, 3840, true),
        ("vision fc1", 1564, 1280, 5120, true),
        ("vision fc2", 1564, 5120, 1280, true),
        ("decoder gate", 418, 1536, 8960, false),
        ("decoder down", 418, 8960, 1536, false),
    ] {
        let x = Tensor::randn(0f32, 1., (rows, inner), &d).unwrap();
        let w = Tensor::randn(0f32, 0.05, (out, inner), &d)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let b = bias.then(|| Tensor::randn(0f32, 1., out, &d).unwrap());
        let packed = amx::pack(&w, DType::F32).unwrap().expect("packed");
        let w32 = w.to_dtype(DType::F32).unwrap();
        let time = |f: &dyn Fn() -> Tensor| {
            f();
            let t = Instant::now();
            for _ in 0..5 {
                f();
            }
            t.elapsed().as_secs_f64() / 5.0
        };
        let flop = 2.0 * (rows * inner * out) as f64;
        let amx_s = time(&|| amx::linear_bias(&x, &packed, b.as_ref()).unwrap());
        let candle_s = time(&|| {
            let y = x.matmul(&w32.t().unwrap()).unwrap();
            match &b {
                Some(b) => y.broadcast_add(b).unwrap(),
                None => y,
            }
        });
        println!(
            "{name:<13} [{rows} × {inner}] · [{inner} × {out}]: AMX {:6.1} ms ({:4.0} GFLOP/s), candle f32 {:6.1} ms ({:4.0})",
            amx_s * 1e3,
            flop / amx_s / 1e9,
            candle_s * 1e3,
            flop / candle_s / 1e9
        );
    }
}
