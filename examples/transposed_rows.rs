//! A few rows times a transposed weight on the CPU in f32, as bench/README.md quotes it: candle's
//! `x · wᵀ` against `(w · xᵀ)ᵀ` (what `models::gemm::matmul_nt` runs for 2 to 64 rows), for the
//! weights a generation step multiplies (LLaVA-1.5-7B's unembedding and MLP, Qwen2-VL-2B's
//! unembedding), and whether they agree to the bit. Mean of 3 calls after one warm-up.
//! `cargo run --release --example transposed_rows`
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() {
    let dev = Device::Cpu;
    for (out, inp) in [(32064usize, 4096usize), (11008, 4096), (151936, 1536)] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        for rows in [1usize, 2, 8, 32, 64, 128, 512] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let plain = || x.matmul(&w.t().unwrap()).unwrap();
            let turned = || {
                w.matmul(&x.t().unwrap())
                    .unwrap()
                    .t()
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let time = |f: &dyn Fn() -> Tensor| {
                let _ = f();
                let t = Instant::now();
                for _ in 0..3 {
                    let _ = f();
                }
                t.elapsed().as_secs_f64() / 3.0 * 1e3
            };
            let (a, b) = (time(&plain), time(&turned));
            let same = (plain() - turned())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                == 0.0;
            println!(
                "w [{out}, {inp}], {rows:>3} rows: x·wᵀ {a:7.1} ms, (w·xᵀ)ᵀ {b:7.1} ms ({:.1}×), same bits: {same}",
                a / b
            );
        }
    }
}
