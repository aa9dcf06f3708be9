//! The lens's GEMM shape on this machine: `[rows, 512] × [512, vocab block]` over the 151936-token
//! vocabulary, as bench/README.md quotes it. `cargo run --release --example gemm_throughput`
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let d = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (151936, 512), &d).unwrap();
    for rows in [64usize, 418, 512] {
        let x = Tensor::randn(0f32, 1., (rows, 512), &d).unwrap();
        for vc in [2048usize, 4096, 8192, 16384] {
            let n = 151936 / vc;
            let t = Instant::now();
            for c in 0..n {
                let wc = w.narrow(0, c * vc, vc).unwrap();
                let _y = x.matmul(&wc.t().unwrap()).unwrap();
            }
            let g = t.elapsed().as_secs_f64();
            let flops = 2.0 * rows as f64 * 512.0 * (n * vc) as f64;
            println!(
                "rows {rows} vc {vc}: {:.1} ms ({:.0} GFLOP/s)",
                g * 1e3,
                flops / g / 1e9
            );
        }
    }
}
