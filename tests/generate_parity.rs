//! `generate`: greedy decoding with a KV cache, every generated position read through the lens,
//! against transformers' own `generate` (greedy, f32, eager) on the fixtures of every family
//! (tools/make_generate_references.py): the same tokens, and at each step the emitted token's
//! probability and rank and the position's top-5 and entropy at every layer within 1e-4 of the
//! lens computed from transformers' hidden states at that step.

mod common;

use common::*;
use logit_lens::api::{LensOptions, Positions};
use logit_lens::engine::{run_lens, run_lens_batch, LensRequest};

#[derive(serde::Deserialize)]
struct Entry {
    file: String,
    fixture: String,
    image: Option<String>,
    prompt: String,
}

fn entries() -> Vec<Entry> {
    let p = fixtures().join("reference/generate/cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn request(e: &Entry, generate: usize) -> LensRequest {
    let img = e.image.as_ref().map(|p| {
        logit_lens::preprocess::image::decode(&std::fs::read(fixtures().join(p)).unwrap()).unwrap()
    });
    LensRequest {
        prompt: e.prompt.clone(),
        image: img,
        options: LensOptions {
            top_k: 5,
            positions: Positions::Keyword("last".into()),
            generate,
            ..Default::default()
        },
    }
}

#[test]
fn greedy_answers_and_their_lens_equal_transformers_generate() {
    let entries = entries();
    assert!(entries.len() >= 18, "every family, image and text");
    for e in &entries {
        let model = load_model(&e.fixture);
        let r = Reference::load("generate", &e.file);
        let new_ids = r.ids("new_ids");
        let logprobs = r.f32s("step_logprobs");
        let layers = model.info().num_layers + 1;
        let vocab = model.info().vocab_size;
        let resp = run_lens(model.as_ref(), &request(e, new_ids.len())).unwrap();
        let ctx = &e.file;
        assert_eq!(resp.input.num_tokens, r.ids("input_ids").len(), "{ctx}");
        let answer = resp.answer.as_ref().expect("an answer");
        let got: Vec<i64> = answer.tokens.iter().map(|t| t.id as i64).collect();
        assert_eq!(got, new_ids, "{ctx}: tokens");
        let eos = r.ids("stopped_on_eos")[0] == 1;
        assert_eq!(answer.stopped, if eos { "eos" } else { "length" }, "{ctx}");
        let s = resp.input.num_tokens;
        for (i, t) in answer.tokens.iter().enumerate() {
            assert_eq!(t.position, s - 1 + i, "{ctx}");
            assert_eq!((t.probs.len(), t.ranks.len()), (layers, layers));
            for l in 0..layers {
                let row = &logprobs[(i * layers + l) * vocab..(i * layers + l + 1) * vocab];
                let want = row[t.id as usize];
                assert!(
                    (t.probs[l] - want.exp()).abs() < 1e-4,
                    "{ctx} step {i} layer {l}: p {} vs {}",
                    t.probs[l],
                    want.exp()
                );
                // Ties within float noise may order either way.
                let above = row.iter().filter(|&&v| v > want + 1e-5).count();
                let close = row.iter().filter(|&&v| (v - want).abs() <= 1e-5).count();
                assert!(
                    t.ranks[l] > above && t.ranks[l] <= above + close,
                    "{ctx} step {i} layer {l}: rank {} vs {}",
                    t.ranks[l],
                    above + 1
                );
            }
            // Every generated position is in each layer's positions, after the prompt's.
            if i == 0 {
                continue;
            }
            for layer in &resp.layers {
                let p = layer
                    .positions
                    .iter()
                    .find(|p| p.position == s - 1 + i)
                    .unwrap_or_else(|| panic!("{ctx}: position {} missing", s - 1 + i));
                let row = &logprobs
                    [(i * layers + layer.layer) * vocab..(i * layers + layer.layer + 1) * vocab];
                for top in &p.top {
                    let want = row[top.id as usize].exp();
                    assert!((top.prob - want).abs() < 1e-4, "{ctx} step {i}: top prob");
                }
                let entropy: f32 = row.iter().map(|&lp| -lp.exp() * lp).sum();
                assert!(
                    (p.entropy - entropy).abs() < 1e-4 * entropy.max(1.0),
                    "{ctx} step {i} layer {}: entropy {} vs {entropy}",
                    layer.layer,
                    p.entropy
                );
            }
        }
    }
}

/// Without `generate` nothing changes: no answer, the prompt's positions only.
#[test]
fn the_prompt_lens_is_the_same_with_or_without_an_answer() {
    let e = &entries()[0];
    let model = load_model(&e.fixture);
    let plain = run_lens(model.as_ref(), &request(e, 0)).unwrap();
    let gen = run_lens(model.as_ref(), &request(e, 3)).unwrap();
    assert!(plain.answer.is_none());
    assert_eq!(plain.input, gen.input);
    for (a, b) in plain.layers.iter().zip(&gen.layers) {
        assert!((a.mean_max_prob.unwrap() - b.mean_max_prob.unwrap()).abs() < 1e-6);
        assert_eq!(a.positions.len() + 2, b.positions.len());
        assert_eq!(a.positions[0].position, b.positions[0].position);
        assert!((a.positions[0].top[0].prob - b.positions[0].top[0].prob).abs() < 1e-5);
    }
}

/// Requests that generate share each decoder step (batched projections and MLPs, attention per
/// sequence against its own cache) and each step's lens (the answers' rows read together), and
/// each answer is what it is alone: prompts of different lengths, with and without an image
/// (M-RoPE positions that differ per sequence), answers of different lengths, different top-k,
/// targets (repeated, shared, and the answer's own tokens) and `exclude_special`, and a request
/// that does not generate, in one batch.
#[test]
fn answers_are_the_same_alone_or_sharing_decoder_steps() {
    for fixture in ["qwen2vl-hub", "llava15-hub", "qwen3-hub"] {
        let model = load_model(fixture);
        let mine: Vec<Entry> = entries()
            .into_iter()
            .filter(|e| e.fixture == fixture)
            .collect();
        let mut reqs: Vec<LensRequest> = Vec::new();
        for (k, e) in mine.iter().enumerate() {
            // Each answer's own tokens as targets, and ids other answers trace too.
            let own = Reference::load("generate", &e.file).ids("new_ids");
            let mut req = request(e, 5 - k);
            req.options.top_k = 2 + 3 * k;
            req.options.exclude_special = k % 2 == 1;
            req.options.target_ids = [own[0] as u32, 7, own[own.len() - 1] as u32, 7]
                .into_iter()
                .skip(k % 2)
                .collect();
            reqs.push(req);
            reqs.push(request(e, 0));
        }
        reqs.push(LensRequest {
            prompt: "Answer with one word. What is the person doing:".into(),
            image: None,
            options: LensOptions {
                top_k: 5,
                generate: 3,
                ..Default::default()
            },
        });
        let refs: Vec<&LensRequest> = reqs.iter().collect();
        let batched = run_lens_batch(model.as_ref(), &refs, usize::MAX);
        for (req, got) in reqs.iter().zip(batched) {
            let alone = run_lens(model.as_ref(), req).unwrap();
            let got = got.unwrap();
            assert_eq!(alone.answer.is_some(), got.answer.is_some());
            if let (Some(a), Some(b)) = (&alone.answer, &got.answer) {
                let ids =
                    |x: &logit_lens::api::Answer| x.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
                assert_eq!(ids(a), ids(b), "{fixture}: {}", req.prompt);
                for (x, y) in a.tokens.iter().zip(&b.tokens) {
                    assert_eq!(x.probs.len(), y.probs.len());
                    for (p, q) in x.probs.iter().zip(&y.probs) {
                        assert!((p - q).abs() < 1e-5, "{fixture}: {p} vs {q}");
                    }
                    assert_eq!(x.ranks, y.ranks);
                }
            }
            for (la, lb) in alone.layers.iter().zip(&got.layers) {
                assert_eq!(la.positions.len(), lb.positions.len());
                for (pa, pb) in la.positions.iter().zip(&lb.positions) {
                    assert_eq!(pa.position, pb.position);
                    let ids = |p: &logit_lens::api::PositionOut| {
                        p.top.iter().map(|t| t.id).collect::<Vec<_>>()
                    };
                    assert_eq!(ids(pa), ids(pb), "{fixture}: layer {}", la.layer);
                    assert_eq!(pa.top.len(), req.options.top_k);
                    for (a, b) in pa.top.iter().zip(&pb.top) {
                        assert!((a.prob - b.prob).abs() < 1e-5, "{fixture}");
                    }
                    assert_eq!(pa.targets.len(), req.options.target_ids.len());
                    for (a, b) in pa.targets.iter().zip(&pb.targets) {
                        assert_eq!((a.id, a.rank), (b.id, b.rank), "{fixture}");
                        assert!((a.prob - b.prob).abs() < 1e-5, "{fixture}");
                    }
                    assert!((pa.entropy - pb.entropy).abs() < 1e-4, "{fixture}");
                    // KL = lse − (Wᵀp_L)·n − H cancels terms of ~10 nats: batched GEMMs' rounding
                    // (one row alone, several together) shows there at ~1e-4.
                    assert!((pa.kl_to_final - pb.kl_to_final).abs() < 1e-3, "{fixture}");
                }
            }
        }
    }
}

/// The fixture `fixture` with `id` its end token (generation_config.json's `eos_token_id`).
fn with_end_token(fixture: &str, id: i64) -> Box<dyn logit_lens::models::VisionLanguageModel> {
    // Tests run in parallel: each copy its own folder.
    static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let copy = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "logit-lens-eos-{fixture}-{id}-{}-{copy}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join(fixture)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.join("generation_config.json"),
        format!("{{\"eos_token_id\": [{id}], \"bos_token_id\": 1}}"),
    )
    .unwrap();
    let model = logit_lens::models::load(
        &dir,
        "m",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    model
}

/// The text-only Mistral case and its fixture with the case's second answer token as end token
/// (the case's answer then ends after 2 tokens), with that token.
fn ending_after_two() -> (Entry, i64, Box<dyn logit_lens::models::VisionLanguageModel>) {
    let e = entries()
        .into_iter()
        .find(|e| e.fixture == "mistral-hub")
        .unwrap();
    let second = Reference::load("generate", &e.file).ids("new_ids")[1];
    (e, second, with_end_token("mistral-hub", second))
}

/// `got` is the answer `want`: its text, every token's id and ranks, and probabilities within 1e-5.
fn same_tokens(want: &logit_lens::api::Answer, got: &logit_lens::api::Answer) {
    assert_eq!(want.text, got.text);
    for (x, y) in want.tokens.iter().zip(&got.tokens) {
        assert_eq!((x.id, &x.ranks), (y.id, &y.ranks));
        for (p, q) in x.probs.iter().zip(&y.probs) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}

/// Generation stops at the snapshot's end token (generation_config.json's `eos_token_id`),
/// which is the answer's last token; past the bound is a bad option (400).
#[test]
fn an_end_token_stops_and_too_many_tokens_are_refused() {
    let (e, second, model) = ending_after_two();
    let resp = run_lens(model.as_ref(), &request(&e, 6)).unwrap();
    let answer = resp.answer.unwrap();
    assert_eq!(answer.stopped, "eos");
    assert_eq!(answer.tokens.len(), 2);
    assert_eq!(answer.tokens[1].id as i64, second);
    let e2 = run_lens(model.as_ref(), &request(&e, 65)).unwrap_err();
    assert_eq!(e2.code(), "invalid_option");
}

/// Answers generated together leave as they end, shortest first, and one stopped between steps
/// (its client gone, on the service) leaves at once; the others go on to what they are alone.
#[test]
fn answers_leave_as_they_end_and_a_stopped_one_at_once() {
    use logit_lens::engine::generate::{start, Generating};
    let model = load_model("qwen2vl-hub");
    let reqs = [
        generating("Describe the picture.", 6),
        generating("What is it?", 6),
        generating("Color of the main object:", 3),
    ];
    let mut batch = Generating::new(model.as_ref());
    for (i, r) in reqs.iter().enumerate() {
        batch.push(i, start(model.as_ref(), r).unwrap());
    }
    let mut ended = batch.step();
    assert!(ended.is_empty());
    assert_eq!(batch.stop_where(|&i| i == 1), vec![1]);
    assert_eq!(batch.len(), 2);
    let mut steps = 1;
    while !batch.is_empty() {
        ended.extend(batch.step());
        steps += 1;
        if steps == 3 {
            assert_eq!(ended.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![2]);
        }
    }
    assert_eq!(steps, 6);
    assert_eq!(
        ended.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![2, 0]
    );
    for (i, got) in ended {
        let got = logit_lens::engine::generate::respond(model.as_ref(), got.unwrap()).unwrap();
        let want = run_lens(model.as_ref(), &reqs[i]).unwrap();
        same_tokens(&want.answer.unwrap(), &got.answer.unwrap());
    }
}

/// `generate::stream`: at most `width` answers at once, and an answer that ends (here at the end
/// token, after 2 of its 6) makes room for the next request at once, not when the longest answer
/// of its group ends. Every answer is what it is alone.
#[test]
fn a_stream_starts_the_next_request_as_soon_as_an_answer_ends() {
    let (e, _, model) = ending_after_two();
    let reqs = [
        request(&e, 6),
        generating("Describe the picture.", 4),
        generating("What is it?", 4),
    ];
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| run_lens(model.as_ref(), r).unwrap())
        .collect();
    let stopped: Vec<_> = alone
        .iter()
        .map(|r| r.answer.as_ref().unwrap().stopped.as_str())
        .collect();
    assert_eq!(stopped, ["eos", "length", "length"], "the premise");
    let mut next = 0;
    let events = std::cell::RefCell::new(Vec::<String>::new());
    let mut got = vec![None, None, None];
    logit_lens::engine::generate::stream(
        model.as_ref(),
        2,
        usize::MAX,
        |n| {
            let take: Vec<usize> = (next..reqs.len()).take(n).collect();
            next += take.len();
            events.borrow_mut().push(format!("more {n}: {take:?}"));
            take.into_iter().map(|i| (i, Ok(&reqs[i]))).collect()
        },
        |i, result| {
            events.borrow_mut().push(format!("done {i}"));
            got[i] = Some(result?);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(
        events.into_inner(),
        [
            "more 2: [0, 1]",
            "done 0",
            "more 1: [2]",
            "done 1",
            "more 1: []",
            "done 2"
        ]
    );
    for (want, got) in alone.iter().zip(got) {
        let got = got.unwrap();
        let (a, b) = (want.answer.as_ref().unwrap(), got.answer.as_ref().unwrap());
        assert_eq!(a.stopped, b.stopped);
        same_tokens(a, b);
    }
}
