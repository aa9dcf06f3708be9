//! The half-precision code paths (what the GPU runs: bf16 / f16 weights, transformers' rounding
//! order in RMSNorm and RoPE, the tensor-operation lens) run on the CPU too, so CI covers them:
//! every family, in bf16 and f16, gives the f32 answer to within half-precision noise.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use logit_lens::api::{LensOptions, Positions};
use logit_lens::engine::{run_lens, LensRequest};
use logit_lens::models::layers::rope;

#[test]
fn half_precision_models_agree_with_f32() {
    for (dir, family) in [
        ("qwen2vl-hub", "qwen2vl"),
        ("llava15-hub", "llava15"),
        ("onevision-hub", "onevision"),
    ] {
        let f32_model = load_model(dir);
        for dtype in [DType::BF16, DType::F16] {
            let model =
                logit_lens::models::load(&fixtures().join(dir), dir, &Device::Cpu, dtype).unwrap();
            assert_eq!(model.info().dtype, format!("{dtype:?}").to_lowercase());
            for case in cases(family) {
                let req = LensRequest {
                    prompt: case.prompt.clone(),
                    image: image(&case),
                    options: LensOptions {
                        top_k: 1,
                        positions: Positions::Keyword("all".into()),
                        ..Default::default()
                    },
                };
                let (a, b) = (
                    run_lens(f32_model.as_ref(), &req).unwrap(),
                    run_lens(model.as_ref(), &req).unwrap(),
                );
                let (mut pairs, mut agree) = (0, 0);
                for (la, lb) in a.layers.iter().zip(&b.layers) {
                    let (ma, mb) = (la.mean_max_prob.unwrap(), lb.mean_max_prob.unwrap());
                    assert!(
                        (ma - mb).abs() < 0.05,
                        "{dir} {dtype:?} {} layer {}: {ma} vs {mb}",
                        case.name,
                        la.layer
                    );
                    for (pa, pb) in la.positions.iter().zip(&lb.positions) {
                        pairs += 1;
                        agree += (pa.top[0].id == pb.top[0].id) as usize;
                    }
                }
                assert!(
                    agree as f64 >= 0.9 * pairs as f64,
                    "{dir} {dtype:?} {}: top-1 agrees on {agree}/{pairs}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn half_precision_rope_follows_transformers_rounding_and_matches_f32() {
    let x = candle_core::Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &Device::Cpu).unwrap();
    let cos = candle_core::Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu).unwrap();
    let sin = candle_core::Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu).unwrap();
    let want = rope(&x, &cos, &sin).unwrap();
    let bf = |t: &candle_core::Tensor| t.to_dtype(DType::BF16).unwrap();
    let got = rope(&bf(&x), &bf(&cos), &bf(&sin))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let d = (got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 0.1, "bf16 rope differs from f32 by {d}");
    // Batched tables [b, s, d/2] give the same as the shared [s, d/2] table.
    let cos_b = cos.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap();
    let sin_b = sin.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap();
    let batched = rope(&bf(&x), &bf(&cos_b), &bf(&sin_b))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let d = (batched
        - rope(&bf(&x), &bf(&cos), &bf(&sin))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert_eq!(d, 0.0);
}

/// Against transformers' own half precision (tools/make_half_references.py: the same checkpoints,
/// inputs and pixels, in each fixture's dtype): at every layer our residual stream is as close to
/// the f32 reference as transformers' is. An extra rounding that transformers does not do (e.g. a
/// Linear's bias added after the matmul's result is rounded, not before) moves ours further away.
#[test]
fn half_precision_streams_are_as_close_to_f32_as_transformers_own() {
    let mut failures = Vec::new();
    for (dir, family, dtype) in [
        ("qwen2vl-hub", "qwen2vl", DType::BF16),
        ("llava15-hub", "llava15", DType::F16),
        ("onevision-hub", "onevision", DType::BF16),
    ] {
        let model =
            logit_lens::models::load(&fixtures().join(dir), dir, &Device::Cpu, dtype).unwrap();
        let (mut ours_total, mut theirs_total) = (0f64, 0f64);
        for case in cases(family) {
            let r = Reference::load(family, &case.name);
            let half = Reference::load(family, &format!("{}.half", case.name));
            let p = prepared_with_python_pixels(model.as_ref(), &case, &r);
            let mut rec = Recorder::default();
            model.forward(&p, &mut rec).unwrap();
            let f32_ref = r.get("hidden_states");
            let l = f32_ref.dim(0).unwrap() - 1;
            let theirs = half.get("hidden_states_half");
            assert_eq!(rec.0.len(), l + 1);
            for (i, h) in rec.0.iter().enumerate() {
                // Layer L: the raw last block output (transformers' last entry is normed).
                let want = if i == l {
                    r.get("last_layer_raw").clone()
                } else {
                    f32_ref.get(i).unwrap()
                };
                let dist = |t: &Tensor| {
                    let t = t.to_dtype(DType::F32).unwrap();
                    let num = (t - &want).unwrap().sqr().unwrap().sum_all().unwrap();
                    let den = want.sqr().unwrap().sum_all().unwrap();
                    (num.to_scalar::<f32>().unwrap() as f64
                        / den.to_scalar::<f32>().unwrap() as f64)
                        .sqrt()
                };
                let (ours, theirs) = (dist(h), dist(&theirs.get(i).unwrap()));
                eprintln!(
                    "{family} {dtype:?} {} layer {i}: distance to f32: ours {ours:.5}, transformers {theirs:.5}",
                    case.name
                );
                ours_total += ours;
                theirs_total += theirs;
            }
        }
        eprintln!("{family} {dtype:?}: sum over cases and layers: ours {ours_total:.5}, transformers {theirs_total:.5}");
        if ours_total > 1.05 * theirs_total {
            failures.push(format!(
                "{family} {dtype:?}: ours {ours_total:.5} against transformers' {theirs_total:.5}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "half-precision streams further from f32 than transformers': {failures:?}"
    );
}
