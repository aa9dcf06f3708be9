//! A request's result is the same alone or in a padded batch with others of different image
//! sizes and prompt lengths, for every family.

mod common;

use common::*;
use logit_lens::api::{LensOptions, Positions};
use logit_lens::engine::{run_lens, run_lens_batch, LensRequest};

fn requests(family: &str) -> Vec<LensRequest> {
    let cases = cases(family);
    let mut out: Vec<LensRequest> = cases
        .iter()
        .map(|c| LensRequest {
            prompt: c.prompt.clone(),
            image: image(c),
            options: LensOptions {
                top_k: 3,
                positions: Positions::List(vec![0, -1]),
                targets: vec!["red".into()],
                ..Default::default()
            },
        })
        .collect();
    // The same image again with another prompt: the vision tower then takes runs of equal-size
    // images through attention together.
    // (A text-only model has no image case: an image request must then fail alone.)
    let again = cases
        .iter()
        .find(|c| c.image.is_some())
        .cloned()
        .unwrap_or(Case {
            name: "image for a text-only model".into(),
            image: Some("images/tiny.png".into()),
            prompt: String::new(),
            num_tokens: 0,
            num_image_tokens: 0,
            image_grid_thw: None,
        });
    for prompt in ["Describe the picture.", "What is it?"] {
        out.push(LensRequest {
            prompt: prompt.into(),
            image: image(&again),
            options: out[0].options.clone(),
        });
    }
    // One that fails alone must not disturb the others.
    out.insert(
        1,
        LensRequest {
            prompt: "   ".into(),
            image: None,
            options: LensOptions::default(),
        },
    );
    out
}

fn check(dir: &str, family: &str) {
    let model = load_model(dir);
    let reqs = requests(family);
    let refs: Vec<&LensRequest> = reqs.iter().collect();
    let batched = run_lens_batch(model.as_ref(), &refs, usize::MAX);
    assert_eq!(batched.len(), reqs.len());
    for (req, got) in reqs.iter().zip(batched) {
        match run_lens(model.as_ref(), req) {
            Err(e) => assert_eq!(got.unwrap_err().code(), e.code()),
            Ok(alone) => {
                let got = got.unwrap();
                assert_eq!(got.input, alone.input);
                for (a, b) in alone.layers.iter().zip(&got.layers) {
                    assert!(
                        (a.mean_max_prob.unwrap() - b.mean_max_prob.unwrap()).abs() < 1e-5,
                        "{dir} layer {}",
                        a.layer
                    );
                    for (pa, pb) in a.positions.iter().zip(&b.positions) {
                        assert_eq!(
                            pa.top.iter().map(|t| t.id).collect::<Vec<_>>(),
                            pb.top.iter().map(|t| t.id).collect::<Vec<_>>()
                        );
                        for (x, y) in pa.top.iter().zip(&pb.top) {
                            assert!(
                                (x.prob - y.prob).abs() < 1e-5,
                                "{dir}: {} vs {}",
                                x.prob,
                                y.prob
                            );
                        }
                        assert!((pa.entropy - pb.entropy).abs() < 1e-4);
                        assert!((pa.kl_to_final - pb.kl_to_final).abs() < 1e-4);
                        assert_eq!(pa.targets[0].rank, pb.targets[0].rank);
                    }
                }
            }
        }
    }
}

#[test]
fn qwen2_vl_batch_equals_alone() {
    check("qwen2vl-hub", "qwen2vl");
}

#[test]
fn llava_batch_equals_alone() {
    check("llava15-hub", "llava15");
}

#[test]
fn onevision_batch_equals_alone() {
    check("onevision-hub", "onevision");
}

#[test]
fn qwen2_5_vl_batch_equals_alone() {
    check("qwen2_5_vl-hub", "qwen2_5_vl");
}

#[test]
fn qwen3_vl_batch_equals_alone() {
    check("qwen3_vl-hub", "qwen3_vl");
}

#[test]
fn llava_next_batch_equals_alone() {
    check("llava_next-hub", "llava_next");
}

/// Text only: prompts of different lengths together, and the image requests fail alone
/// (`image_not_accepted`) without disturbing the others.
#[test]
fn causal_lm_batch_equals_alone() {
    check("qwen3-hub", "qwen3");
    check("llama3-tf5", "llama3");
}

#[test]
fn the_token_budget_splits_a_batch_without_changing_results() {
    let model = load_model("qwen2vl-hub");
    let reqs = requests("qwen2vl");
    let refs: Vec<&LensRequest> = reqs.iter().collect();
    let whole = run_lens_batch(model.as_ref(), &refs, usize::MAX);
    let split = run_lens_batch(model.as_ref(), &refs, 100); // at most one or two requests a pass
    for (a, b) in whole.into_iter().zip(split) {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(
                a.layers
                    .iter()
                    .map(|l| l.positions[1].top[0].id)
                    .collect::<Vec<_>>(),
                b.layers
                    .iter()
                    .map(|l| l.positions[1].top[0].id)
                    .collect::<Vec<_>>()
            ),
            (Err(a), Err(b)) => assert_eq!(a.code(), b.code()),
            _ => panic!("one failed, the other did not"),
        }
    }
}

/// The demo model, altered for a test: with `no_batches` a pass of several requests through it
/// always fails (as a batch that does not fit the device's memory would; alone, it is the demo
/// model), lens or prompts of answers; with
/// `slow_steps` every use of its lens head (each generation step uses it) waits 2 ms, so that a
/// 60-token answer takes a while.
struct Altered {
    model: Box<dyn logit_lens::models::VisionLanguageModel>,
    no_batches: bool,
    slow_steps: bool,
    /// The number of requests in each pass through the decoder (prompts included).
    passes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Altered {
    fn new(no_batches: bool, slow_steps: bool) -> Self {
        Altered {
            model: load_model("qwen2vl-hub"),
            no_batches,
            slow_steps,
            passes: Default::default(),
        }
    }
}

impl logit_lens::models::VisionLanguageModel for Altered {
    fn info(&self) -> &logit_lens::models::ModelInfo {
        self.model.info()
    }
    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.model.tokenizer()
    }
    fn prepare(
        &self,
        prompt: &str,
        image: Option<&logit_lens::preprocess::image::Rgb8>,
        chat_template: bool,
    ) -> logit_lens::Result<logit_lens::models::Prepared> {
        self.model.prepare(prompt, image, chat_template)
    }
    fn image_features(
        &self,
        pixels: &[&logit_lens::models::PixelInputs],
    ) -> logit_lens::Result<Vec<logit_lens::models::ImageFeatures>> {
        self.model.image_features(pixels)
    }
    fn embed_with(
        &self,
        inputs: &logit_lens::models::Prepared,
        features: Option<logit_lens::models::ImageFeatures>,
    ) -> logit_lens::Result<logit_lens::models::decoder::DecoderInput> {
        self.model.embed_with(inputs, features)
    }
    fn decoder(&self) -> &logit_lens::models::decoder::Decoder {
        self.model.decoder()
    }
    fn head(&self) -> &logit_lens::models::LensHead {
        if self.slow_steps {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.model.head()
    }
    /// Every pass through the decoder embeds its requests first, with or without a lens only
    /// ([`logit_lens::models::VisionLanguageModel::forward_batch`]) or starting answers.
    fn embed_batch(
        &self,
        inputs: &[&logit_lens::models::Prepared],
    ) -> logit_lens::Result<Vec<logit_lens::models::decoder::DecoderInput>> {
        self.passes.lock().unwrap().push(inputs.len());
        if self.no_batches && inputs.len() > 1 {
            return Err(logit_lens::Error::Internal(
                "out of memory (simulated)".into(),
            ));
        }
        self.model.embed_batch(inputs)
    }
}

#[test]
fn a_batch_that_fails_as_a_whole_is_retried_request_by_request() {
    let model = Altered::new(true, false);
    let mut reqs = requests("qwen2vl");
    // Answers: their prompts also go through the decoder together first.
    reqs.push(generating("Describe the picture.", 4));
    reqs.push(generating("What is it?", 2));
    // One request that fails only in the forward pass (a position past its end).
    reqs.push(LensRequest {
        prompt: "Hi".into(),
        image: None,
        options: LensOptions {
            positions: Positions::List(vec![500]),
            ..Default::default()
        },
    });
    let refs: Vec<&LensRequest> = reqs.iter().collect();
    let batched = run_lens_batch(&model, &refs, usize::MAX);
    let alone = load_model("qwen2vl-hub");
    for (req, got) in reqs.iter().zip(batched) {
        match (run_lens(alone.as_ref(), req), got) {
            // Answers share each step's lens with the other answers (KL's sums in another order).
            (Ok(a), Ok(b)) if a.answer.is_some() => same_answer(&a, &b),
            (Ok(a), Ok(b)) => assert_eq!(
                serde_json::to_value(&a.layers).unwrap(),
                serde_json::to_value(&b.layers).unwrap()
            ),
            (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "{a} / {b}"),
            (a, b) => panic!("alone {:?}, in the batch {:?}", a.is_ok(), b.is_ok()),
        }
    }
}

/// The replies still to come from a worker: filled by its group hook.
type Replies = std::sync::Arc<
    std::sync::Mutex<Vec<tokio::sync::oneshot::Receiver<logit_lens::engine::JobResult>>>,
>;

/// Submits `first` to a worker serving `loader`'s models (the first of them is used), its answers'
/// caches under `kv_cache_budget`, with `behind` queued after it as the worker starts `first`'s
/// group (from the group hook: before its first step). Returns the engine, `first`'s reply, and
/// `behind`'s replies in order (there once `first`'s group has started).
fn queue_behind(
    loader: logit_lens::engine::worker::Loader,
    kv_cache_budget: usize,
    first: LensRequest,
    behind: Vec<LensRequest>,
) -> (
    std::sync::Arc<std::sync::OnceLock<logit_lens::engine::Engine>>,
    tokio::sync::oneshot::Receiver<logit_lens::engine::JobResult>,
    Replies,
) {
    use logit_lens::engine::Engine;
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    let engine: Arc<OnceLock<Engine>> = Arc::new(OnceLock::new());
    let behind = Arc::new(Mutex::new(Some(behind)));
    let late: Replies = Arc::default();
    let deadline = || Instant::now() + Duration::from_secs(600);
    let hook = {
        let (engine, late) = (engine.clone(), late.clone());
        move |_: usize| {
            for req in behind.lock().unwrap().take().into_iter().flatten() {
                let engine = engine.get().expect("started");
                late.lock()
                    .unwrap()
                    .push(engine.submit(0, req, deadline(), None).unwrap());
            }
        }
    };
    let started = engine_under(loader, kv_cache_budget, Some(Arc::new(hook)));
    let first = engine
        .get_or_init(|| started)
        .submit(0, first, deadline(), None)
        .unwrap();
    (engine, first, late)
}

/// Runs `first` on a worker serving `model`, with `behind` queued after it as the worker starts
/// `first`'s group ([`queue_behind`]). Returns the engine, `first`'s result and those of `behind`
/// as they stood when `first`'s arrived (None: not answered yet; the worker answers in order, so
/// Some means it was answered first).
fn behind_first(
    model: Box<dyn logit_lens::models::VisionLanguageModel>,
    first: LensRequest,
    behind: Vec<LensRequest>,
) -> (
    std::sync::Arc<std::sync::OnceLock<logit_lens::engine::Engine>>,
    logit_lens::api::LensResponse,
    Vec<Option<logit_lens::api::LensResponse>>,
) {
    let (engine, first, late) =
        queue_behind(Box::new(move || Ok(vec![model])), usize::MAX, first, behind);
    let got_first = first.blocking_recv().unwrap().unwrap();
    let got_behind = std::mem::take(&mut *late.lock().unwrap())
        .into_iter()
        .map(|mut rx| rx.try_recv().ok().map(|r| r.unwrap()))
        .collect();
    (engine, got_first, got_behind)
}

/// The tokens of `r`'s answer.
fn tokens(r: &logit_lens::api::LensResponse) -> Vec<u32> {
    let a = r.answer.as_ref().expect("an answer");
    a.tokens.iter().map(|t| t.id).collect()
}

/// `got` is `want`: the same answer, and the same lens at the prompt's positions and the answer's.
fn same_answer(want: &logit_lens::api::LensResponse, got: &logit_lens::api::LensResponse) {
    assert_eq!(tokens(want), tokens(got));
    let (a, b) = (want.answer.as_ref().unwrap(), got.answer.as_ref().unwrap());
    for (x, y) in a.tokens.iter().zip(&b.tokens) {
        assert_eq!(x.ranks, y.ranks);
        for (p, q) in x.probs.iter().zip(&y.probs) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
    assert_eq!(want.layers.len(), got.layers.len());
    for (la, lb) in want.layers.iter().zip(&got.layers) {
        assert_eq!(la.positions.len(), lb.positions.len());
        for (pa, pb) in la.positions.iter().zip(&lb.positions) {
            assert_eq!(
                pa.top.iter().map(|t| t.id).collect::<Vec<_>>(),
                pb.top.iter().map(|t| t.id).collect::<Vec<_>>()
            );
            assert!((pa.entropy - pb.entropy).abs() < 1e-4);
        }
    }
}

/// On the service's worker, a request that generates and arrives while other answers are being
/// generated joins them between two steps, rather than waiting for the longest to end, and is
/// answered as soon as its own answer ends: before a longer one that began first. Both answers
/// are what they are alone.
#[test]
fn a_request_joins_answers_being_generated_and_is_answered_when_its_own_ends() {
    let (long, short) = ("Describe the picture.", "What is it?");
    let alone = load_model("qwen2vl-hub");
    let want_long = run_lens(alone.as_ref(), &generating(long, 40)).unwrap();
    let want_short = run_lens(alone.as_ref(), &generating(short, 2)).unwrap();
    assert_eq!(
        tokens(&want_long).len(),
        40,
        "the long answer runs to its length"
    );

    let (engine, got_long, got_short) = behind_first(
        load_model("qwen2vl-hub"),
        generating(long, 40),
        vec![generating(short, 2)],
    );
    assert_eq!(
        engine.get().unwrap().joined(),
        1,
        "the short request joined the long one's steps"
    );
    let got_short = got_short[0]
        .clone()
        .expect("the short answer came before the long one");
    same_answer(&want_long, &got_long);
    same_answer(&want_short, &got_short);
    // The short one waited in the queue for the long one's first step, not for its 40.
    let queued = |r: &logit_lens::api::LensResponse| r.timing_ms.queue.expect("queue time");
    assert!(
        queued(&got_short) < got_long.timing_ms.total,
        "{} ms",
        queued(&got_short)
    );
}

/// On the service's worker, an answer whose client went away stops at the next step (its place
/// and its steps are freed), counted as `client_gone`; the others go on.
/// (Two models: a request that generates with the other one waits for the answers to end.)
#[test]
fn an_answer_whose_client_went_away_stops() {
    use logit_lens::engine::{Engine, EngineConfig};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    let engine = Engine::start(
        Box::new(|| {
            let slow = || Box::new(Altered::new(false, true)) as _;
            Ok(vec![slow(), slow()])
        }),
        EngineConfig {
            max_queue: 8,
            max_batch_size: 8,
            max_batch_tokens: 16_384,
            kv_cache_budget: usize::MAX,
            on_batch: None,
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    let gone = engine
        .submit(0, generating("Describe the picture.", 60), deadline, None)
        .unwrap();
    let short = engine
        .submit(0, generating("What is it?", 2), deadline, None)
        .unwrap();
    // The short answer ends at the third step, and its client lets go of the long one (60
    // steps of at least 2 ms each are left).
    let got = short
        .blocking_recv()
        .unwrap_or_else(|e| {
            panic!(
                "{e:?} {:?}",
                match engine.load_state() {
                    logit_lens::engine::LoadState::Failed(m) => m,
                    _ => "not failed".into(),
                }
            )
        })
        .unwrap();
    assert_eq!(got.answer.unwrap().tokens.len(), 2);
    drop(gone);
    // Next in line, generating with the other model: it runs once the generation has ended.
    let after = engine
        .submit(1, generating("Color?", 1), deadline, None)
        .unwrap();
    let started = Instant::now();
    after.blocking_recv().unwrap().unwrap();
    assert_eq!(engine.dropped().client_gone.load(Ordering::Relaxed), 1);
    // Far less than the 58 steps the long answer had left.
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
}

/// On the service's worker, a request that does not generate, queued while answers are being
/// generated, runs between two of their steps instead of waiting for them to end; it and the
/// answer are what they are alone.
#[test]
fn a_lens_request_runs_between_the_steps_of_answers_being_generated() {
    let (long, lens) = ("Describe the picture.", "What is it?");
    let alone = load_model("qwen2vl-hub");
    let want_long = run_lens(alone.as_ref(), &generating(long, 40)).unwrap();
    let want_lens = run_lens(alone.as_ref(), &generating(lens, 0)).unwrap();
    let (engine, got_long, got_lens) = behind_first(
        load_model("qwen2vl-hub"),
        generating(long, 40),
        vec![generating(lens, 0)],
    );
    let got_lens = got_lens[0]
        .clone()
        .expect("the lens request was answered before the long answer");
    assert_eq!(engine.get().unwrap().joined(), 0);
    assert!(got_lens.answer.is_none());
    let (a, b) = (want_long.answer.unwrap(), got_long.answer.unwrap());
    assert_eq!(a.text, b.text);
    assert_eq!(
        serde_json::to_value(&want_lens.layers).unwrap(),
        serde_json::to_value(&got_lens.layers).unwrap()
    );
}

/// On the service's worker, requests that join answers being generated run their prompts through
/// the decoder together, in one padded pass (a batched prefill), and each answer is what it is
/// alone.
#[test]
fn requests_that_join_run_their_prompts_together() {
    let long = generating("Describe the picture.", 12);
    let joining = vec![
        generating("What is it?", 2),
        generating("Color of the main object in the picture:", 3),
    ];
    let alone = load_model("qwen2vl-hub");
    let want: Vec<_> = joining
        .iter()
        .map(|r| run_lens(alone.as_ref(), r).unwrap())
        .collect();
    let want_long = run_lens(alone.as_ref(), &long).unwrap();
    let model = Altered::new(false, false);
    let passes = model.passes.clone();
    let (engine, got_long, got) = behind_first(Box::new(model), long, joining);
    assert_eq!(engine.get().unwrap().joined(), 2);
    assert_eq!(
        *passes.lock().unwrap(),
        vec![1, 2],
        "the long answer's prompt, then the two that joined, together"
    );
    same_answer(&want_long, &got_long);
    for (want, got) in want.iter().zip(&got) {
        same_answer(want, got.as_ref().expect("answered before the long answer"));
    }
}

/// The bytes of keys and values the demo model's answer to `prompt` (`n` tokens) holds.
fn kv_bytes(prompt: &str, n: usize) -> usize {
    let model = load_model("qwen2vl-hub");
    logit_lens::engine::generate::start(model.as_ref(), &generating(prompt, n))
        .unwrap()
        .kv_bytes()
}

/// A worker for `loader`'s models (groups of 8), its answers' caches under `kv_cache_budget`.
fn engine_under(
    loader: logit_lens::engine::worker::Loader,
    kv_cache_budget: usize,
    on_batch: Option<logit_lens::engine::worker::BatchHook>,
) -> logit_lens::engine::Engine {
    logit_lens::engine::Engine::start(
        loader,
        logit_lens::engine::EngineConfig {
            max_queue: 8,
            max_batch_size: 8,
            max_batch_tokens: 16_384,
            kv_cache_budget,
            on_batch,
        },
    )
    .unwrap()
}

/// On the service's worker, under `--kv-cache-budget`: an answer whose keys and values would
/// pass the budget beside those going on waits for them to end (counted once), and what is queued
/// behind it waits too, a lens request included (nothing overtakes it); an answer whose cache
/// alone passes the budget gets 422. Every answer is what it is alone, and once they end the
/// answers hold nothing.
#[test]
fn answers_wait_for_room_in_the_kv_budget_and_nothing_overtakes_them() {
    use logit_lens::engine::JobError;
    use std::sync::atomic::Ordering;

    let (long, short) = ("Describe the picture.", "What is it?");
    let huge = "Describe the picture. ".repeat(100);
    let alone = load_model("qwen2vl-hub");
    let budget = kv_bytes(long, 30) + kv_bytes(short, 2) - 1;
    assert!(kv_bytes(&huge, 2) > budget);
    let want_long = run_lens(alone.as_ref(), &generating(long, 30)).unwrap();
    let want_short = run_lens(alone.as_ref(), &generating(short, 2)).unwrap();
    let want_lens = run_lens(alone.as_ref(), &generating(short, 0)).unwrap();

    // Queued behind the long answer as its group starts: an answer that does not fit beside it,
    // a lens request, an answer that never fits.
    let (engine, first, late) = queue_behind(
        Box::new(|| Ok(vec![Box::new(Altered::new(false, true)) as _])),
        budget,
        generating(long, 30),
        vec![
            generating(short, 2),
            generating(short, 0),
            generating(&huge, 2),
        ],
    );
    let engine = engine.get().unwrap();
    let got_long = first.blocking_recv().unwrap().unwrap();
    let mut late = std::mem::take(&mut *late.lock().unwrap()).into_iter();
    let mut next = || late.next().unwrap().blocking_recv().unwrap();
    let (got_short, got_lens) = (next().unwrap(), next().unwrap());
    match next() {
        Err(JobError::Lens(e)) => {
            assert_eq!(e.code(), "unprocessable", "{e}");
            assert!(e.to_string().contains("--kv-cache-budget"), "{e}");
        }
        other => panic!("{:?}", other.map(|r| r.answer.is_some())),
    }
    same_answer(&want_long, &got_long);
    same_answer(&want_short, &got_short);
    assert_eq!(
        serde_json::to_value(&want_lens.layers).unwrap(),
        serde_json::to_value(&got_lens.layers).unwrap()
    );
    // The short answer and the lens request behind it waited for the long answer's 30 steps (2 ms
    // each at least), not for its first.
    let queued = |r: &logit_lens::api::LensResponse| r.timing_ms.queue.expect("queue time");
    for (what, got) in [("the answer", &got_short), ("the lens request", &got_lens)] {
        assert!(
            queued(got) > 0.5 * got_long.timing_ms.total,
            "{what} waited {} ms, the long answer took {} ms",
            queued(got),
            got_long.timing_ms.total
        );
    }
    let answers = engine.answers();
    assert_eq!(answers.waited_for_kv.load(Ordering::Relaxed), 1);
    assert_eq!(
        answers.joined.load(Ordering::Relaxed),
        1,
        "the short answer (the one refused at once did not join)"
    );
    assert_eq!(answers.kv_budget, budget as u64);
    assert_eq!(answers.kv_bytes.load(Ordering::Relaxed), 0);
}

/// On the service's worker, an answer that waits for room in the KV budget keeps its place in the
/// queue: a lens request for another model that arrived before it (though after the answer going
/// on, whose group took the waiting one past it) runs between the steps, not after the answer.
#[test]
fn an_answer_waiting_for_the_kv_budget_does_not_hold_back_earlier_requests() {
    use std::time::{Duration, Instant};

    let (long, short) = ("Describe the picture.", "What is it?");
    let budget = kv_bytes(long, 40) + kv_bytes(short, 2) - 1;
    // The models load for a while, so that the three requests are queued before the worker takes
    // its first group: the long answer and the short one (model 0), past the lens request
    // (model 1) between them.
    let engine = engine_under(
        Box::new(|| {
            std::thread::sleep(Duration::from_millis(300));
            let slow = || Box::new(Altered::new(false, true)) as _;
            Ok(vec![slow(), slow()])
        }),
        budget,
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let first = engine
        .submit(0, generating(long, 40), deadline, None)
        .unwrap();
    let lens = engine
        .submit(1, generating(short, 0), deadline, None)
        .unwrap();
    let waits = engine
        .submit(0, generating(short, 2), deadline, None)
        .unwrap();
    let got_long = first.blocking_recv().unwrap().unwrap();
    let got_lens = lens.blocking_recv().unwrap().unwrap();
    let got_short = waits.blocking_recv().unwrap().unwrap();
    // Queue times count from before the models loaded: each against the long answer's.
    let queued = |r: &logit_lens::api::LensResponse| r.timing_ms.queue.expect("queue time");
    let after_first = |r| queued(r) - queued(&got_long);
    assert!(
        after_first(&got_lens) < 0.5 * got_long.timing_ms.total,
        "the lens request waited {} ms longer than the long answer, which took {} ms",
        after_first(&got_lens),
        got_long.timing_ms.total
    );
    assert!(
        after_first(&got_short) > 0.5 * got_long.timing_ms.total,
        "the short answer waited {} ms longer than the long answer, which took {} ms",
        after_first(&got_short),
        got_long.timing_ms.total
    );
    assert_eq!(
        engine
            .answers()
            .waited_for_kv
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// On the service's worker, an answer waiting for room in the KV budget whose client goes away
/// leaves the line: the request queued behind it runs between the steps of the answer going on.
#[test]
fn a_waiting_answer_whose_client_went_away_does_not_hold_the_line() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    let (long, short) = ("Describe the picture.", "What is it?");
    let budget = kv_bytes(long, 60) + kv_bytes(short, 2) - 1;
    let engine = engine_under(
        Box::new(|| Ok(vec![Box::new(Altered::new(false, true)) as _])),
        budget,
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = engine
        .submit(0, generating(long, 60), deadline, None)
        .unwrap();
    let gone = engine
        .submit(0, generating(short, 2), deadline, None)
        .unwrap();
    let t0 = Instant::now();
    while engine.answers().waited_for_kv.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "nothing waited");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(gone);
    let behind = engine
        .submit(0, generating(short, 0), deadline, None)
        .unwrap();
    behind.blocking_recv().unwrap().unwrap();
    assert!(
        first.try_recv().is_err(),
        "the request behind the waiting answer came after the long answer's 60 steps"
    );
    first.blocking_recv().unwrap().unwrap();
    assert_eq!(engine.dropped().client_gone.load(Ordering::Relaxed), 1);
}
