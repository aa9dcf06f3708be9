//! The lens's GEMM shape on this machine: `[rows, hidden] × [hidden, vocab block]` over the
//! 151936-token vocabulary, as bench/README.md quotes it: candle's f32 GEMM, and where the CPU has
//! AMX the lens's split-bf16 GEMM (src/models/amx.rs) with bf16-exact weights (1 piece, as hub
//! checkpoints) and with f32 weights (3 pieces). GFLOP/s count the f32 GEMM's 2 · rows · hidden ·
//! vocab. `cargo run --release --example gemm_throughput [hidden ...]` (default 512)
use candle_core::{Device, Tensor};
use logit_lens::models::amx;
use std::time::Instant;

const VOCAB: usize = 151936;

fn main() {
    let hiddens: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("hidden size"))
        .collect();
    for hidden in if hiddens.is_empty() {
        vec![512]
    } else {
        hiddens
    } {
        run(hidden);
    }
}

fn run(hidden: usize) {
    let d = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (VOCAB, hidden), &d).unwrap();
    // The same weights rounded to bf16, as a checkpoint stored in bf16 gives them.
    let w_bf16 = w.to_dtype(candle_core::DType::BF16).unwrap();
    let w_bf16 = w_bf16.to_dtype(candle_core::DType::F32).unwrap();
    let packed = amx::available().then(|| {
        let one: Vec<f32> = w_bf16.flatten_all().unwrap().to_vec1().unwrap();
        let t = Instant::now();
        let one = amx::PackedWeight::new(&one, VOCAB, hidden);
        println!(
            "hidden {hidden}: packed the bf16 weights in {:.0} ms ({} piece, {} MB)",
            t.elapsed().as_secs_f64() * 1e3,
            one.pieces(),
            one.bytes() >> 20
        );
        let three: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let three = amx::PackedWeight::new(&three, VOCAB, hidden);
        (one, three)
    });
    for rows in [9usize, 64, 418, 588] {
        let x = Tensor::randn(0f32, 1., (rows, hidden), &d).unwrap();
        let flops = 2.0 * rows as f64 * hidden as f64 * VOCAB as f64;
        for vc in [2048usize, 4096, 8192] {
            let n = VOCAB.div_ceil(vc);
            let t = Instant::now();
            for c in 0..n {
                let wc = w.narrow(0, c * vc, vc.min(VOCAB - c * vc)).unwrap();
                let _y = x.matmul(&wc.t().unwrap()).unwrap();
            }
            let g = t.elapsed().as_secs_f64();
            print!(
                "hidden {hidden} rows {rows} vc {vc}: candle f32 {:.1} ms ({:.0} GFLOP/s)",
                g * 1e3,
                flops / g / 1e9
            );
            if let Some((one, three)) = &packed {
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                for (name, p) in [("1 piece", one), ("3 pieces", three)] {
                    let t = Instant::now();
                    let split = amx::SplitRows::new(&xs, rows, hidden);
                    let mut out = vec![0f32; rows * vc];
                    for c in 0..n {
                        let len = vc.min(VOCAB - c * vc);
                        amx::matmul(&split, p, c * vc, len, &mut out[..rows * len]);
                    }
                    let g = t.elapsed().as_secs_f64();
                    print!("; amx {name} {:.1} ms ({:.0})", g * 1e3, flops / g / 1e9);
                }
            }
            println!();
        }
    }
}
