//! The service over a real loopback socket: same answers as `run_lens` (what `probe` prints),
//! concurrency without mix-ups, overload, every error row of API.md, auth, shutdown, metrics,
//! docs and the OpenAPI drift check.

mod server_common;

use std::time::Duration;

use base64::Engine as _;
use logit_lens::api::{LensOptions, Positions};
use logit_lens::server::{Limits, QueueConfig};
use serde_json::{json, Value};
use server_common::*;

fn options(top_k: usize, positions: Positions, targets: &[&str]) -> LensOptions {
    LensOptions {
        top_k,
        positions,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        ..LensOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_request_gets_the_same_lens_as_run_lens() {
    let server = Server::start(Setup::default()).await;
    let model = load("qwen2vl-hub", DEMO);
    let img = image_bytes("landscape.png");
    let opts = options(3, Positions::List(vec![0, -1]), &[" red", "Red"]);
    let want = expected(
        model.as_ref(),
        "Color of the main object:",
        Some(&img),
        opts.clone(),
    );

    // Multipart, options as separate fields.
    let r = server
        .lens_form(
            &[
                ("prompt", "Color of the main object:"),
                ("model", DEMO),
                ("top_k", "3"),
                ("positions", "0,-1"),
                ("targets", " red,Red"),
            ],
            Some(img.clone()),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-queue-time"));
    assert!(r.headers().contains_key("x-inference-time"));
    let body: Value = r.json().await.unwrap();
    assert!(answer(&body) == answer(&want), "multipart fields");
    assert!(
        body["timing_ms"]["queue"].as_f64().is_some(),
        "{}",
        body["timing_ms"]
    );

    // Multipart, options as one JSON field.
    let r = server
        .lens_form(
            &[
                ("prompt", "Color of the main object:"),
                ("model", DEMO),
                ("options", &serde_json::to_string(&opts).unwrap()),
            ],
            Some(img.clone()),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        answer(&r.json().await.unwrap()) == answer(&want),
        "options field"
    );

    // JSON with base64.
    let r = server
        .lens_json(&json!({
            "prompt": "Color of the main object:",
            "model": DEMO,
            "image_base64": base64::engine::general_purpose::STANDARD.encode(&img),
            "options": opts,
        }))
        .await;
    assert_eq!(r.status(), 200);
    assert!(answer(&r.json().await.unwrap()) == answer(&want), "JSON");
    // The same bytes with MIME's line breaks (Python's base64.encodebytes), and URL-safe.
    let standard = base64::engine::general_purpose::STANDARD.encode(&img);
    let mime: String = standard
        .as_bytes()
        .chunks(76)
        .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
        .collect();
    let url_safe = base64::engine::general_purpose::URL_SAFE.encode(&img);
    assert!(
        url_safe.contains(['-', '_']),
        "the test image's encoding should differ"
    );
    for (what, encoded) in [("MIME", mime), ("URL-safe", url_safe)] {
        let r = server
            .lens_json(&json!({
                "prompt": "Color of the main object:",
                "model": DEMO,
                "image_base64": encoded,
                "options": opts,
            }))
            .await;
        assert_eq!(r.status(), 200, "{what}");
        assert!(answer(&r.json().await.unwrap()) == answer(&want), "{what}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_mixed_requests_each_get_their_own_answer() {
    let server = Server::start(Setup::default()).await;
    let models = [
        load("qwen2vl-hub", DEMO),
        load("qwen2vl-tf5", "qwen2vl-tf5"),
    ];
    let images = [
        None,
        Some("landscape.png"),
        Some("portrait.png"),
        Some("tiny.png"),
    ];
    let prompts = [
        "Color?",
        "What is this a picture of?",
        "Describe",
        "Count the shapes now",
    ];
    let mut cases = Vec::new();
    for i in 0..64 {
        let model = i % 2;
        let image = images[i % 4].map(image_bytes);
        let prompt = prompts[(i / 4) % 4];
        let opts = options(1 + i % 5, Positions::Keyword("all".into()), &[]);
        let want = expected(
            models[model].as_ref(),
            prompt,
            image.as_deref(),
            opts.clone(),
        );
        cases.push((model, image, prompt, opts, want));
    }
    let names = [DEMO, "qwen2vl-tf5"];
    let server = std::sync::Arc::new(server);
    let tasks: Vec<_> = cases
        .into_iter()
        .enumerate()
        .map(|(i, (model, image, prompt, opts, want))| {
            let server = server.clone();
            tokio::spawn(async move {
                let r = if i % 3 == 0 {
                    let mut body =
                        json!({"prompt": prompt, "model": names[model], "options": opts});
                    if let Some(b) = &image {
                        body["image_base64"] =
                            base64::engine::general_purpose::STANDARD.encode(b).into();
                    }
                    server.lens_json(&body).await
                } else {
                    let opts = serde_json::to_string(&opts).unwrap();
                    server
                        .lens_form(
                            &[
                                ("prompt", prompt),
                                ("model", names[model]),
                                ("options", &opts),
                            ],
                            image,
                        )
                        .await
                };
                assert_eq!(r.status(), 200, "request {i}");
                let body: Value = r.json().await.unwrap();
                assert_same_answer(&body, &want, &format!("request {i}"));
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let text = server.metrics_text().await;
    assert!(
        text.contains("logit_lens_requests_total{route=\"/lens\",status=\"200\"} 64"),
        "{text}"
    );
    assert!(text.contains("logit_lens_batch_size_count"), "{text}");
    // None of them generates: none joined answers being generated.
    assert!(
        text.contains("logit_lens_generate_joined_total 0"),
        "{text}"
    );
    for line in [
        "logit_lens_generate_kv_waits_total 0",
        "logit_lens_generate_kv_cache_bytes 0",
        &format!("logit_lens_generate_kv_cache_budget_bytes {}", usize::MAX),
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert!(
        text.contains("logit_lens_stage_seconds_count{stage=\"forward\"} 64"),
        "{text}"
    );
    assert!(text.contains("logit_lens_queue_depth 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_yields_only_200s_and_429s_and_loses_nothing() {
    let server = std::sync::Arc::new(
        Server::start(Setup {
            queue: QueueConfig {
                max_queue: 2,
                max_batch_size: 1,
                max_batch_tokens: 16_384,
                kv_cache_budget: usize::MAX,
            },
            faulty: true,
            ..Setup::default()
        })
        .await,
    );
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                let prompt = format!("SLOW {i}");
                let r = server
                    .lens_form(&[("prompt", &prompt), ("model", DEMO)], None)
                    .await;
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").is_some();
                let body: Value = r.json().await.unwrap();
                (status, retry, body, prompt)
            })
        })
        .collect();
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        let (status, retry, body, prompt) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                // Its own prompt, not another's: the user turn's text comes back in the tokens.
                let text: String = body["input"]["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["text"].as_str().unwrap())
                    .collect();
                assert!(text.contains(&prompt), "{prompt} got {text}");
            }
            429 => {
                full += 1;
                assert!(retry, "429 without Retry-After");
                assert_eq!(body["error"]["code"], "queue_full");
            }
            s => panic!("status {s}: {body}"),
        }
    }
    assert_eq!(ok + full, 24);
    assert!(ok >= 1 && full >= 1, "{ok} ok, {full} refused");
}

/// Decoded images are memory the service holds until each answer is sent. With a budget of two
/// 200×150 images and two slow image requests waiting or running, a third image is refused at once
/// with 429 and Retry-After (before it is decoded), while a text-only request still goes through;
/// once the answers are sent the whole budget is free again, and an image larger than the whole
/// budget is served when it is alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_pixel_budget_refuses_images_with_429_and_loses_nothing() {
    let budget = 2 * 200 * 150;
    let server = std::sync::Arc::new(
        Server::start(Setup {
            queue: QueueConfig {
                max_queue: 64,
                max_batch_size: 1,
                max_batch_tokens: 16_384,
                kv_cache_budget: usize::MAX,
            },
            limits: Limits {
                max_pending_pixels: budget,
                ..Limits::default()
            },
            faulty: true,
            ..Setup::default()
        })
        .await,
    );
    let send = |prompt: &'static str, image: Option<Vec<u8>>| {
        let server = server.clone();
        tokio::spawn(async move {
            let r = server
                .lens_form(&[("prompt", prompt), ("model", DEMO)], image)
                .await;
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            (status, retry, r.json::<Value>().await.unwrap())
        })
    };
    // Two slow image requests (0.3 s each, one at a time) take the whole budget.
    let slow = [
        send("SLOW a", Some(png(200, 150))),
        send("SLOW b", Some(png(200, 150))),
    ];
    // One runs (its 300 ms sleep), one waits, both hold their pixels.
    server
        .wait_until("both slow images in", |g| {
            g.taken + g.queued == 2 && g.pixels == budget
        })
        .await;
    let (status, retry, body) = send("Color?", Some(png(200, 150))).await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(retry, "429 without Retry-After");
    assert_eq!(body["error"]["code"], "queue_full");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("image pixels"), "{message}");
    let text = server.metrics_text().await;
    assert!(
        text.contains(&format!("logit_lens_pending_image_pixels {budget}")),
        "{text}"
    );
    // No image, no pixels: it waits its turn and is answered.
    let (status, _, body) = send("Color?", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    for t in slow {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body["input"]["num_image_tokens"].as_u64().unwrap() > 0);
    }
    // Every answer sent: every permit back (the worker drops each job just after sending its
    // answer, so allow it a moment).
    let all_back = || server.state.pixels.available_permits() == budget as usize;
    for _ in 0..100 {
        if all_back() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        all_back(),
        "{} of {budget} free",
        server.state.pixels.available_permits()
    );
    let text = server.metrics_text().await;
    assert!(text.contains("logit_lens_pending_image_pixels 0"), "{text}");
    // Alone, an image over the whole budget still runs (it asks for the budget, not more).
    let (status, _, body) = send("Color?", Some(png(300, 250))).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// Retry-After follows the worker's pace: with requests that take ≥ 0.3 s and 8 waiting, a
/// refused client is told to come back in ≥ 3 s, not the 1 s given before anything has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_follows_the_queue_and_the_pace() {
    let server = std::sync::Arc::new(
        Server::start(Setup {
            queue: QueueConfig {
                max_queue: 8,
                max_batch_size: 1,
                max_batch_tokens: 16_384,
                kv_cache_budget: usize::MAX,
            },
            faulty: true,
            ..Setup::default()
        })
        .await,
    );
    // Two slow requests alone set the pace (≥ 300 ms each).
    for _ in 0..2 {
        let r = server
            .lens_form(&[("prompt", "SLOW"), ("model", DEMO)], None)
            .await;
        assert_eq!(r.status(), 200);
    }
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                let prompt = format!("SLOW {i}");
                let r = server
                    .lens_form(&[("prompt", &prompt), ("model", DEMO)], None)
                    .await;
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                (r.status().as_u16(), retry)
            })
        })
        .collect();
    let mut hints = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (200, None) => {}
            (429, Some(s)) => hints.push(s),
            other => panic!("{other:?}"),
        }
    }
    assert!(!hints.is_empty(), "nothing was refused");
    // A refused request saw a full queue (8 waiting, or 7 if one had just been taken).
    assert!(hints.iter().all(|&s| (3..=120).contains(&s)), "{hints:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_deadline_passes_in_the_queue_gets_504() {
    let server = std::sync::Arc::new(
        Server::start(Setup {
            limits: Limits {
                queue_timeout: Duration::from_millis(100),
                ..Limits::default()
            },
            faulty: true,
            ..Setup::default()
        })
        .await,
    );
    let slow = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .lens_form(&[("prompt", "SLOW"), ("model", DEMO)], None)
                .await
                .status()
        })
    };
    // The slow one is running (300 ms): the next waits longer than its 100 ms.
    server
        .wait_until("the slow one taken", |g| g.taken == 1)
        .await;
    let r = server
        .lens_form(&[("prompt", "Color?"), ("model", DEMO)], None)
        .await;
    assert_eq!(error_code(r, 504).await, "deadline_exceeded");
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_place_without_running() {
    let server = std::sync::Arc::new(
        Server::start(Setup {
            faulty: true,
            ..Setup::default()
        })
        .await,
    );
    let slow = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .lens_form(&[("prompt", "SLOW"), ("model", DEMO)], None)
                .await
                .status()
        })
    };
    // The slow one is running: the impatient client's request waits behind it.
    server
        .wait_until("the slow one taken", |g| g.taken == 1)
        .await;
    let impatient = server
        .client
        .post(server.url("/lens"))
        .timeout(Duration::from_millis(100))
        .json(&json!({"prompt": "Color?", "model": DEMO}))
        .send()
        .await;
    assert!(impatient.is_err(), "the client should have timed out");
    assert_eq!(slow.await.unwrap(), 200);
    let text = server.metrics_text().await;
    assert!(
        text.contains("logit_lens_jobs_dropped_total{reason=\"client_gone\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("logit_lens_requests_total{route=\"/lens\",status=\"200\"} 1"),
        "{text}"
    );
    // The request that was never answered is counted too, as 499 (client closed request).
    assert!(
        text.contains("logit_lens_requests_total{route=\"/lens\",status=\"499\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_one_request_is_500_and_the_worker_goes_on() {
    let server = Server::start(Setup {
        faulty: true,
        ..Setup::default()
    })
    .await;
    let r = server
        .lens_form(&[("prompt", "PANIC"), ("model", DEMO)], None)
        .await;
    assert_eq!(error_code(r, 500).await, "internal");
    let r = server
        .lens_form(&[("prompt", "Color?"), ("model", DEMO)], None)
        .await;
    assert_eq!(r.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_bad_options_are_400() {
    let server = Server::start(Setup::default()).await;
    let c = &server.client;
    let r = c
        .post(server.url("/lens"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "malformed_request");
    let r = c
        .post(server.url("/lens"))
        .header("content-type", "application/json")
        .body("{\"prompt\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "malformed_request");
    let r = server.lens_form(&[("model", DEMO)], None).await;
    assert_eq!(error_code(r, 400).await, "malformed_request");
    let r = server
        .lens_form(
            &[("prompt", "Hi"), ("model", DEMO), ("colour", "red")],
            None,
        )
        .await;
    assert_eq!(error_code(r, 400).await, "malformed_request");
    for (field, value) in [
        ("top_k", "0"),
        ("top_k", "101"),
        ("top_k", "many"),
        ("positions", "middle"),
        ("layers", "some"),
        ("summary", "perhaps"),
        ("options", "{\"top_k\": 3, \"colour\": 1}"),
        ("options", "[1]"),
    ] {
        let r = server
            .lens_form(&[("prompt", "Hi"), ("model", DEMO), (field, value)], None)
            .await;
        assert_eq!(
            error_code(r, 400).await,
            "invalid_option",
            "{field}={value}"
        );
    }
    let r = server
        .lens_json(&json!({"prompt": "Hi", "model": DEMO, "options": {"top_k": 0}}))
        .await;
    assert_eq!(error_code(r, 400).await, "invalid_option");
    let r = server
        .lens_json(&json!({"prompt": "Hi", "model": DEMO, "image_base64": "@@@"}))
        .await;
    assert_eq!(error_code(r, 400).await, "malformed_request");
    // Two models are loaded: one must be named.
    let r = server.lens_json(&json!({"prompt": "Hi"})).await;
    assert_eq!(error_code(r, 400).await, "malformed_request");
    // A field sent twice: refused whichever was meant.
    for field in ["prompt", "model", "top_k", "options"] {
        let value = if field == "options" { "{}" } else { "1" };
        let mut fields = vec![("prompt", "Hi"), ("model", DEMO)];
        fields.retain(|(k, _)| *k != field);
        fields.extend([(field, value), (field, value)]);
        let r = server.lens_form(&fields, None).await;
        let (code, message) = error_code_and_message(r, 400).await;
        assert_eq!(code, "malformed_request", "{field}: {message}");
        assert!(
            message.contains(&format!("send one `{field}`")),
            "{message}"
        );
    }
    // A bad option in a JSON body is `invalid_option`, as in a form, said without Rust's types.
    for (options, said) in [
        (json!({"top_k": "3"}), "expected a non-negative integer"),
        (json!({"positions": -1}), "positions must be \"last\""),
        (json!({"layers": "some", "top_k": 3}), "layers must be"),
        (json!({"colour": 1}), "expected one of"),
        (json!({"targets": vec!["a"; 257]}), "at most 256 targets"),
        (json!({"generate": 65}), "generate must be between 0 and 64"),
    ] {
        let r = server
            .lens_json(&json!({"prompt": "Hi", "model": DEMO, "options": options}))
            .await;
        let (code, message) = error_code_and_message(r, 400).await;
        assert_eq!(code, "invalid_option", "{options}: {message}");
        assert!(message.contains(said), "{options}: {message}");
        assert!(
            !message.contains("usize") && !message.contains("untagged"),
            "{message}"
        );
        assert!(message.matches("top_k").count() <= 1, "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_404() {
    let server = Server::start(Setup::default()).await;
    let r = server
        .lens_form(&[("prompt", "Hi"), ("model", "gpt-17")], None)
        .await;
    assert_eq!(error_code(r, 404).await, "unknown_model");
}

/// A PNG whose header claims `w × h` and that holds no pixel data (an empty IDAT): it can only be refused from
/// its header, since decoding it would fail.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(13u32.to_be_bytes());
    out.extend(&ihdr);
    out.extend(crc32(&ihdr).to_be_bytes());
    // An empty IDAT: the header reader stops at the first one.
    out.extend(0u32.to_be_bytes());
    out.extend(b"IDAT");
    out.extend(crc32(b"IDAT").to_be_bytes());
    out
}

/// `Content-Type: multipart/form-data` with no boundary (what openapi-python-client sends): the
/// boundary is read off the body's first line and the answer is the one a well-formed request
/// gets; a body that does not start with one is a clear 400, and the body limit still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_without_a_boundary_parameter_is_read_from_the_body() {
    let server = Server::start(Setup {
        limits: Limits {
            max_body_bytes: 64 * 1024,
            ..Limits::default()
        },
        ..Setup::default()
    })
    .await;
    let image = image_bytes("tiny.png");
    let mut body = Vec::new();
    let boundary = "a1b2c3d4e5f6";
    for (name, value) in [("prompt", "Color of the main object:"), ("top_k", "3")] {
        body.extend(
            format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        )
            .bytes(),
        );
    }
    body.extend(
        format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"tiny.png\"\r\n\
         Content-Type: image/png\r\n\r\n"
    )
        .bytes(),
    );
    body.extend(&image);
    body.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let send = |content_type: &'static str, body: Vec<u8>| {
        server
            .client
            .post(server.url("/lens"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let bare: Value = send("multipart/form-data", body.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let proper: Value = server
        .lens_form(
            &[("prompt", "Color of the main object:"), ("top_k", "3")],
            Some(image.clone()),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bare["layers"], proper["layers"], "{bare}");
    assert_eq!(bare["input"], proper["input"]);

    let r = send("multipart/form-data", b"prompt=hello".to_vec())
        .await
        .unwrap();
    let code = error_code(r, 400).await;
    assert_eq!(code, "malformed_request");
    let mut big = format!("--{boundary}\r\n").into_bytes();
    big.extend(vec![b'a'; 80 * 1024]);
    let r = send("multipart/form-data", big).await.unwrap();
    assert_eq!(error_code(r, 413).await, "too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limits_is_413() {
    let server = Server::start(Setup {
        limits: Limits {
            max_body_bytes: 64 * 1024,
            max_image_pixels: 1_000_000,
            max_prompt_tokens: 50,
            ..Limits::default()
        },
        ..Setup::default()
    })
    .await;
    // Just over the limit: a body far larger can be cut off mid-send when the server answers
    // early (a connection reset rather than a response), which says nothing about the service.
    let big = vec![b'a'; 80 * 1024];
    let r = server
        .lens_form(&[("prompt", "Hi"), ("model", DEMO)], Some(big.clone()))
        .await;
    assert_eq!(error_code(r, 413).await, "too_large");
    let r = server
        .lens_json(&json!({"prompt": String::from_utf8(big).unwrap(), "model": DEMO}))
        .await;
    assert_eq!(error_code(r, 413).await, "too_large");
    // A decompression bomb's header: refused before decoding.
    let r = server
        .lens_form(
            &[("prompt", "Hi"), ("model", DEMO)],
            Some(png_header_only(50_000, 50_000)),
        )
        .await;
    assert_eq!(error_code(r, 413).await, "too_large");
    let long = "word ".repeat(200);
    let r = server
        .lens_form(&[("prompt", &long), ("model", DEMO)], None)
        .await;
    let (code, message) = error_code_and_message(r, 413).await;
    assert_eq!(code, "too_large");
    // Refused from its beginning: 464 bytes (8 a token allowed, and 64) already hold 94 tokens.
    assert!(message.contains("more than 50 tokens"), "{message}");
    assert!(
        message.contains("first 464 bytes alone have 94"),
        "{message}"
    );
    // Counted whole where the beginning does not tell.
    let r = server
        .lens_form(&[("prompt", &"word ".repeat(60)), ("model", DEMO)], None)
        .await;
    let (code, message) = error_code_and_message(r, 413).await;
    assert_eq!(code, "too_large");
    assert!(
        message.contains("the prompt has 62 tokens, over"),
        "{message}"
    );
    // Three-byte characters: the cut (464) falls inside one and goes back to its start.
    let r = server
        .lens_form(&[("prompt", &"€".repeat(400)), ("model", DEMO)], None)
        .await;
    let (code, message) = error_code_and_message(r, 413).await;
    assert_eq!(code, "too_large");
    assert!(message.contains("first 462 bytes"), "{message}");
    // A beginning that says little (each 20 bytes one added token): refused by its length, past
    // what 50 tokens of at most 20 bytes each can hold (×4 for normalisation), untokenized.
    let sparse = "<|object_ref_start|>".repeat(300);
    let r = server
        .lens_form(&[("prompt", &sparse), ("model", DEMO)], None)
        .await;
    let (code, message) = error_code_and_message(r, 413).await;
    assert_eq!(code, "too_large");
    assert!(
        message.contains("the prompt is 6000 bytes: more than 50 tokens"),
        "{message}"
    );
    assert!(message.contains("more than 20 bytes"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_an_image_or_an_unsupported_one_is_415() {
    let server = Server::start(Setup::default()).await;
    let r = server
        .lens_form(
            &[("prompt", "Hi"), ("model", DEMO)],
            Some(b"hello, not an image".to_vec()),
        )
        .await;
    assert_eq!(error_code(r, 415).await, "invalid_image");
    let r = server
        .lens_form(
            &[("prompt", "Hi"), ("model", DEMO)],
            Some(b"P3\n1 1\n255\n0 0 0\n".to_vec()),
        )
        .await;
    assert_eq!(error_code(r, 415).await, "unsupported_image_format");
    let r = server
        .client
        .post(server.url("/lens"))
        .header("content-type", "text/plain")
        .body("Hi")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 415).await, "unsupported_media_type");
    // The media type is compared whole, its parameters aside.
    for (content_type, status) in [
        ("application/jsonfoo", 415),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
    ] {
        let r = server
            .client
            .post(server.url("/lens"))
            .header("content-type", content_type)
            .body(json!({"prompt": "Hi", "model": DEMO}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{content_type}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_requests_are_422() {
    let server = Server::start(Setup::default()).await;
    let r = server
        .lens_form(
            &[("prompt", "Hi"), ("model", DEMO), ("positions", "5000")],
            None,
        )
        .await;
    assert_eq!(error_code(r, 422).await, "unprocessable");
    let r = server
        .lens_form(&[("prompt", "Hi"), ("model", DEMO)], Some(png(1, 10_000)))
        .await;
    assert_eq!(error_code(r, 422).await, "image_not_accepted");
    let r = server
        .lens_form(
            &[("prompt", "Hi"), ("model", DEMO), ("positions", "image")],
            None,
        )
        .await;
    assert_eq!(error_code(r, 422).await, "unprocessable");
}

/// `generate` over the socket: the answer equals `run_lens`'s (what `probe --generate` prints),
/// as a JSON option and as its own form field; past the bound it is 400 (a bad option value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_answers_over_the_socket_and_past_the_bound_is_400() {
    let server = Server::start(Setup::default()).await;
    let model = load("qwen2vl-hub", DEMO);
    let img = image_bytes("landscape.png");
    let opts = LensOptions {
        generate: 3,
        ..options(2, Positions::Keyword("last".into()), &[])
    };
    let want = expected(
        model.as_ref(),
        "Color of the main object:",
        Some(&img),
        opts.clone(),
    );
    let r = server
        .lens_form(
            &[
                ("prompt", "Color of the main object:"),
                ("model", DEMO),
                ("top_k", "2"),
                ("generate", "3"),
            ],
            Some(img.clone()),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["answer"]["tokens"].as_array().unwrap().len(), 3);
    assert_same_answer(&body["answer"], &want["answer"], "answer");
    assert!(answer(&body) == answer(&want), "the lens with an answer");
    let r = server
        .lens_json(&json!({
            "prompt": "Color of the main object:",
            "model": DEMO,
            "image_base64": base64::engine::general_purpose::STANDARD.encode(&img),
            "options": opts,
        }))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_same_answer(&body["answer"], &want["answer"], "answer (JSON)");
    let r = server
        .lens_json(&json!({"prompt": "Hi", "model": DEMO, "options": {"generate": 65}}))
        .await;
    assert_eq!(error_code(r, 400).await, "invalid_option");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_only_a_valid_bearer_key_passes_and_health_stays_open() {
    let server = Server::start(Setup {
        keys: vec!["k1".into(), "k2".into()],
        ..Setup::default()
    })
    .await;
    let c = &server.client;
    for path in ["/models", "/metrics"] {
        let r = c.get(server.url(path)).send().await.unwrap();
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"logit-lens\"",
            "{path}"
        );
        assert_eq!(error_code(r, 401).await, "unauthorized");
        // The scheme's name is case-insensitive.
        let r = c
            .get(server.url(path))
            .header("authorization", "bearer k1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let r = c
            .get(server.url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r, 401).await, "unauthorized");
        let r = c
            .get(server.url(path))
            .bearer_auth("k2")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = server
        .lens_form(&[("prompt", "Hi"), ("model", DEMO)], None)
        .await;
    assert_eq!(error_code(r, 401).await, "unauthorized");
    let r = c
        .post(server.url("/lens"))
        .bearer_auth("k1")
        .json(&json!({"prompt": "Hi", "model": DEMO}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in ["/health", "/ready"] {
        assert_eq!(
            c.get(server.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_the_resident_models() {
    let server = Server::start(Setup::default()).await;
    let body: Value = server
        .client
        .get(server.url("/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &body["models"][0];
    assert_eq!(m["name"], DEMO);
    assert_eq!(m["family"], "qwen2_vl");
    assert_eq!(m["layers"], 3);
    assert_eq!(m["vocab"], 768);
    assert_eq!(m["dtype"], "f32");
    assert_eq!(m["device"], "cpu");
    // Every tensor of the checkpoint is used (its embeddings are tied: no lm_head in the files),
    // held in f32 on the CPU, or its linears as their AMX packing on a CPU with AMX. The reference
    // is the safetensors headers, read here directly.
    let params = checkpoint_elements("tests/fixtures/qwen2vl-hub");
    assert!(params > 100_000, "{params}");
    assert_eq!(m["parameters"], params);
    let amx = logit_lens::models::amx::available();
    let held = checkpoint_held_bytes("tests/fixtures/qwen2vl-hub", amx);
    assert_eq!(m["weight_bytes"], held, "AMX: {amx}");
    if amx {
        // Less than in f32 (the tiny fixture's embeddings and vision input layer, in f32 and with
        // a packed copy, weigh more than in a real checkpoint: 3.1 bytes a weight here).
        assert!(held < 4 * params, "{held} bytes for {params} weights");
    } else {
        assert_eq!(held, 4 * params);
    }
    assert_eq!(body["models"][1]["name"], "qwen2vl-tf5");
    let r = server
        .client
        .get(server.url("/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_queued_requests() {
    let server = std::sync::Arc::new(
        Server::start(Setup {
            queue: QueueConfig {
                max_queue: 8,
                max_batch_size: 1,
                max_batch_tokens: 16_384,
                kv_cache_budget: usize::MAX,
            },
            faulty: true,
            ..Setup::default()
        })
        .await,
    );
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move {
                server
                    .lens_form(&[("prompt", "SLOW"), ("model", DEMO)], None)
                    .await
                    .status()
            })
        })
        .collect();
    // One runs, the others wait in the queue (one at a time); shutting down must still answer
    // all three.
    server
        .wait_until("all three in", |g| g.taken + g.queued == 3)
        .await;
    server.stop().await;
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_work_offline() {
    let server = Server::start(Setup::default()).await;
    let c = &server.client;
    let page = c
        .get(server.url("/docs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("/docs/swagger-ui-bundle.js") && !page.contains("https://"),
        "{page}"
    );
    for asset in ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"] {
        let r = c.get(server.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.unwrap().len() > 10_000, "{asset}");
    }
    let spec: Value = c
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/lens"]["post"].is_object());
}

/// The viewer (GET /) is served by the binary with its script and stylesheet, refers to nothing
/// outside the service, and is open without an API key (its API calls carry the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_is_served_offline_and_without_a_key() {
    let server = Server::start(Setup {
        keys: vec!["k1".into()],
        ..Setup::default()
    })
    .await;
    let c = &server.client;
    let r = c.get(server.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let page = r.text().await.unwrap();
    assert!(
        page.contains("/viewer/viewer.js") && page.contains("/viewer/viewer.css"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    for (asset, kind) in [
        ("/viewer/viewer.js", "text/javascript"),
        ("/viewer/viewer.css", "text/css"),
    ] {
        let r = c.get(server.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
        let body = r.text().await.unwrap();
        assert!(body.len() > 1000, "{asset}");
        assert!(
            !body.contains("https://") && !body.contains("import "),
            "{asset}"
        );
    }
    // The API behind it still wants the key.
    let r = c.get(server.url("/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

/// openapi/openapi.json must be what the code generates. To update it:
/// `UPDATE_OPENAPI=1 cargo test --release --test server openapi` or
/// `logit-lens openapi > openapi/openapi.json`.
#[test]
fn the_committed_openapi_spec_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let generated = logit_lens::server::openapi::spec_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    // The spec's words for the bounds are written out in attributes: they must say the code's.
    let spaced = |n: usize| {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(' ');
            }
            out.push(c);
        }
        out
    };
    let entries = spaced(logit_lens::api::MAX_RESPONSE_ENTRIES);
    assert!(
        generated.contains(&format!("more than {entries} entries")),
        "the 413 of /lens should name {entries} entries"
    );
    for bound in [
        format!("at most {} with", logit_lens::api::MAX_TARGETS),
        format!("\"maximum\": {}", logit_lens::api::MAX_GENERATE),
        format!("\"maximum\": {}", logit_lens::api::MAX_TOP_K),
    ] {
        assert!(generated.contains(&bound), "the spec should say {bound}");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test --release --test server openapi` and commit it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_field_from_a_browser_form_means_no_image() {
    let server = Server::start(Setup::default()).await;
    let form = reqwest::multipart::Form::new()
        .text("prompt", "Hi")
        .text("model", DEMO)
        .part("image", reqwest::multipart::Part::bytes(Vec::new()));
    let r = server
        .client
        .post(server.url("/lens"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["input"]["num_image_tokens"], 0);
}

/// The number of elements in every tensor of a snapshot's safetensors files, from their headers.
/// The bytes an f32 model of the checkpoint in `dir` holds on this CPU, from the safetensors
/// headers: 4 a value; with `amx`, every 2-D bf16 tensor but the embeddings (this fixture's others
/// are all linears) as its packing instead (2 bytes a value, rows and columns padded to 32), and
/// the lens's packed copy of the (tied) embeddings on top.
fn checkpoint_held_bytes(dir: &str, amx: bool) -> u64 {
    let mut total = 0u64;
    for (name, dtype, shape) in checkpoint_tensors(dir) {
        let n: u64 = shape.iter().product();
        let packed = || {
            shape
                .iter()
                .map(|&d| d.next_multiple_of(32))
                .product::<u64>()
                * 2
        };
        total += match (
            amx && dtype == "BF16" && shape.len() == 2,
            name.ends_with("embed_tokens.weight"),
        ) {
            (false, _) => 4 * n,
            (true, false) => packed(),
            (true, true) => 4 * n + packed(),
        };
    }
    total
}

/// Every tensor of the safetensors files in `dir`: name, dtype, shape.
fn checkpoint_tensors(dir: &str) -> Vec<(String, String, Vec<u64>)> {
    let mut tensors = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        for (name, t) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            let shape = t["shape"].as_array().unwrap().iter();
            tensors.push((
                name.clone(),
                t["dtype"].as_str().unwrap().to_string(),
                shape.map(|d| d.as_u64().unwrap()).collect(),
            ));
        }
    }
    tensors
}

fn checkpoint_elements(dir: &str) -> u64 {
    checkpoint_tensors(dir)
        .iter()
        .map(|(_, _, shape)| shape.iter().product::<u64>())
        .sum()
}

/// `serve` warms each model up with one small request before reporting ready; it must work for
/// every family (a failure there stops the server with a clear error).
#[test]
fn the_warm_up_request_runs_on_every_family() {
    for dir in [
        "qwen2vl-hub",
        "qwen2_5_vl-hub",
        "qwen3_vl-hub",
        "llava15-hub",
        "llava_next-hub",
        "onevision-hub",
        "qwen3-hub",
        "gemma2-hub",
        "gemma3-hub",
    ] {
        let model = load(dir, dir);
        let ms = logit_lens::engine::warm_up(model.as_ref())
            .unwrap_or_else(|e| panic!("{dir}: the warm-up request failed: {e}"));
        assert!(ms > 0.0);
    }
}

/// A client that stalls cannot hold a connection: a request's head that does not arrive within
/// the read timeout closes the connection, and a body that stops arriving gets 408; the server
/// goes on answering others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_is_cut_off_after_the_read_timeout() {
    use std::io::{Read, Write};
    let server = Server::start(Setup {
        limits: Limits {
            read_timeout: Duration::from_millis(400),
            ..Limits::default()
        },
        ..Setup::default()
    })
    .await;
    let addr = server.base.trim_start_matches("http://").to_string();
    // Sends `first`, then nothing; reads what the server sends until it closes the connection
    // (10 s at most), on a thread of its own.
    let stall = |first: String| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(first.as_bytes()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let t0 = std::time::Instant::now();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).expect("still open after 10 s");
            (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
        })
    };
    // Half a head.
    let head = stall("POST /lens HTTP/1.1\r\nHost: x\r\n".into());
    // A head, then 10 of the 1000 bytes it announces; as JSON and as a form.
    let stalled: Vec<_> = ["application/json", "multipart/form-data; boundary=XYZ"]
        .iter()
        .map(|content_type| {
            stall(format!(
                "POST /lens HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n\
                 Content-Length: 1000\r\n\r\n--XYZ\r\nabc"
            ))
        })
        .collect();
    // Meanwhile the server answers.
    let r = server
        .lens_form(&[("prompt", "Hi"), ("model", DEMO)], None)
        .await;
    assert_eq!(r.status(), 200);
    let (said, after) = head.join().unwrap();
    assert!(after >= Duration::from_millis(300), "{after:?}");
    assert!(!said.contains(" 200 "), "{said}");
    for s in stalled {
        let (said, after) = s.join().unwrap();
        assert!(after >= Duration::from_millis(300), "{after:?}");
        assert!(said.starts_with("HTTP/1.1 408"), "{said}");
        assert!(said.contains("\"request_timeout\""), "{said}");
    }
    server.stop().await;
}
