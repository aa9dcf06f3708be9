//! The CPU path's element-wise passes at a real-size vision tower's shapes (Qwen2-VL-2B, the
//! 640×480 image: 1564 patches, 16 heads, MLP 5120 wide): the attention softmax with its scale and
//! the activations, candle's op-by-op kernels against `src/models/fastmath.rs`, as bench/README.md
//! quotes them. `cargo run --release --example cpu_kernels [patches]` (default 1564).
use candle_core::{Device, Tensor};
use logit_lens::models::layers::{attention_softmax_with, Activation};
use std::time::Instant;

// As the `logit-lens` binary: freed memory is reused, not handed back and faulted in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    logit_lens::keep_freed_memory();
    logit_lens::flush_subnormals();
    let s: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("patches"))
        .unwrap_or(1564);
    let d = Device::Cpu;
    let scores = (Tensor::randn(0f32, 1., (1, 16, s, s), &d).unwrap() * 8.0).unwrap();
    let x = Tensor::randn(0f32, 1., (s, 5120), &d).unwrap();
    let up = Tensor::randn(0f32, 1., (s, 5120), &d).unwrap();
    let scale = 80f64.powf(-0.5);
    let time = |name: &str, values: usize, f: &dyn Fn() -> Tensor| {
        f();
        let t = Instant::now();
        let n = 5;
        for _ in 0..n {
            f();
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!(
            "{name:<44} {ms:8.1} ms  {:6.2} ns a value",
            ms * 1e6 / values as f64
        );
    };
    let n = scores.elem_count();
    time("softmax(scores · scale), candle", n, &|| {
        candle_nn::ops::softmax_last_dim(&(&scores * scale).unwrap()).unwrap()
    });
    time("softmax(scores · scale), fastmath", n, &|| {
        attention_softmax_with(&scores, None, scale, true).unwrap()
    });
    for (name, act) in [
        ("quick_gelu", Activation::QuickGelu),
        ("silu", Activation::Silu),
        ("gelu_tanh", Activation::GeluTanh),
    ] {
        let v = x.elem_count();
        time(&format!("{name}(x), candle"), v, &|| match act {
            Activation::QuickGelu => {
                (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap()
            }
            Activation::Silu => candle_nn::ops::silu(&x).unwrap(),
            _ => x.gelu().unwrap(),
        });
        time(&format!("{name}(x), fastmath"), v, &|| {
            act.forward(&x).unwrap()
        });
        time(&format!("{name}(x) · up, fastmath"), v, &|| {
            act.then_mul(&x, &up).unwrap()
        });
    }
}
