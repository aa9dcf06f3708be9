//! The service on a real loopback socket, in-process, with the tiny fixture models; and a model
//! wrapper that panics or sleeps on command, to test the worker.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use logit_lens::api::LensOptions;
use logit_lens::engine::{run_lens, LensRequest};
use logit_lens::models::{LensHead, ModelInfo, Prepared, VisionLanguageModel};
use logit_lens::preprocess::image::{decode, Rgb8};
use logit_lens::server::{serve, AppState, Limits, QueueConfig};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const DEMO: &str = "qwen2vl-demo";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn load(dir: &str, name: &str) -> Box<dyn VisionLanguageModel> {
    logit_lens::models::load(&fixtures().join(dir), name, &Device::Cpu, DType::F32).unwrap()
}

pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// What `run_lens` (the `probe` path) answers, as JSON, for comparison with the service.
pub fn expected(
    model: &dyn VisionLanguageModel,
    prompt: &str,
    image: Option<&[u8]>,
    options: LensOptions,
) -> Value {
    let req = LensRequest {
        prompt: prompt.into(),
        image: image.map(|b| decode(b).unwrap()),
        options,
    };
    // Through text, as the client sees it: f32s print as their shortest form.
    let text = serde_json::to_string(&run_lens(model, &req).unwrap()).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Asserts two answers are the same: every id, token and count exactly, probabilities and
/// logits to 1e-5, entropy and KL to 1e-4 (a padded batch sums in another order than a request
/// alone, and KL weighs the last layer's tiny differences by log-probabilities of −30).
pub fn assert_same_answer(got: &Value, want: &Value, what: &str) {
    fn walk(a: &Value, b: &Value, path: &str) {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                let tol = if path.ends_with("kl_to_final") || path.ends_with("entropy") {
                    1e-4
                } else {
                    1e-5
                };
                assert!(
                    (x - y).abs() <= tol * y.abs().max(1.0),
                    "{path}: {x} vs {y}"
                );
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "{path}: length");
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    walk(p, q, &format!("{path}[{i}]"));
                }
            }
            (Value::Object(x), Value::Object(y)) => {
                assert_eq!(
                    x.keys().collect::<Vec<_>>(),
                    y.keys().collect::<Vec<_>>(),
                    "{path}: keys"
                );
                for (k, p) in x {
                    walk(p, &y[k], &format!("{path}.{k}"));
                }
            }
            _ => assert_eq!(a, b, "{path}"),
        }
    }
    let (g, w) = (answer(got), answer(want));
    walk(&g.0, &w.0, &format!("{what}.model"));
    walk(&g.1, &w.1, &format!("{what}.input"));
    walk(&g.2, &w.2, &format!("{what}.layers"));
}

/// The parts of a response that must not depend on how it was served.
pub fn answer(body: &Value) -> (Value, Value, Value) {
    (
        body["model"].clone(),
        body["input"].clone(),
        body["layers"].clone(),
    )
}

/// Wraps a model: prompt `PANIC` panics inside the worker; a prompt starting with `SLOW` sleeps
/// 300 ms in preprocessing.
pub struct Faulty(pub Box<dyn VisionLanguageModel>);

impl VisionLanguageModel for Faulty {
    fn info(&self) -> &ModelInfo {
        self.0.info()
    }
    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.0.tokenizer()
    }
    fn prepare(
        &self,
        prompt: &str,
        image: Option<&Rgb8>,
        chat_template: bool,
    ) -> logit_lens::Result<Prepared> {
        if prompt == "PANIC" {
            panic!("the test model panics on purpose");
        }
        if prompt.starts_with("SLOW") {
            std::thread::sleep(Duration::from_millis(300));
        }
        self.0.prepare(prompt, image, chat_template)
    }
    fn image_features(
        &self,
        pixels: &[&logit_lens::models::PixelInputs],
    ) -> logit_lens::Result<Vec<logit_lens::models::ImageFeatures>> {
        self.0.image_features(pixels)
    }
    fn embed_with(
        &self,
        inputs: &Prepared,
        features: Option<logit_lens::models::ImageFeatures>,
    ) -> logit_lens::Result<logit_lens::models::decoder::DecoderInput> {
        self.0.embed_with(inputs, features)
    }
    fn decoder(&self) -> &logit_lens::models::decoder::Decoder {
        self.0.decoder()
    }
    fn head(&self) -> &LensHead {
        self.0.head()
    }
}

/// The value of an unlabelled metric in a `/metrics` scrape (`name value` on its own line), if
/// it is there.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// What the worker holds, from `/metrics`.
pub struct Gauges {
    /// Jobs the worker has taken (the sum of its groups' sizes).
    pub taken: u64,
    /// Jobs waiting in the queue.
    pub queued: u64,
    /// Image pixels held by requests being decoded, queued or run.
    pub pixels: u64,
}

pub struct Setup {
    pub queue: QueueConfig,
    pub limits: Limits,
    pub keys: Vec<String>,
    /// Serve the demo model wrapped in [`Faulty`].
    pub faulty: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            queue: QueueConfig {
                max_queue: 128,
                max_batch_size: 8,
                max_batch_tokens: 16_384,
                kv_cache_budget: usize::MAX,
            },
            limits: Limits::default(),
            keys: Vec::new(),
            faulty: false,
        }
    }
}

pub struct Server {
    pub base: String,
    pub state: Arc<AppState>,
    pub client: reqwest::Client,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

impl Server {
    /// Serves `qwen2vl-demo` (the hub fixture) and `qwen2vl-tf5` on 127.0.0.1:0 and waits
    /// until they are loaded.
    pub async fn start(setup: Setup) -> Server {
        let faulty = setup.faulty;
        let loader: logit_lens::engine::worker::Loader = Box::new(move || {
            let demo = load("qwen2vl-hub", DEMO);
            let demo: Box<dyn VisionLanguageModel> =
                if faulty { Box::new(Faulty(demo)) } else { demo };
            Ok(vec![demo, load("qwen2vl-tf5", "qwen2vl-tf5")])
        });
        let state = AppState::start(loader, setup.queue, setup.limits, setup.keys).unwrap();
        state.engine.wait_loaded().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Server {
            base,
            state,
            client: reqwest::Client::new(),
            stop: Mutex::new(Some(stop)),
            task: Mutex::new(Some(task)),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST /lens as multipart with the given text fields and an optional PNG.
    pub async fn lens_form(
        &self,
        fields: &[(&str, &str)],
        image: Option<Vec<u8>>,
    ) -> reqwest::Response {
        let mut form = reqwest::multipart::Form::new();
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        if let Some(bytes) = image {
            form = form.part(
                "image",
                reqwest::multipart::Part::bytes(bytes).file_name("image.png"),
            );
        }
        self.client
            .post(self.url("/lens"))
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    pub async fn lens_json(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/lens"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The Prometheus text of `GET /metrics` (no API keys set).
    pub async fn metrics_text(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// Waits until the worker's gauges in `/metrics` are what a test needs before its next
    /// step, polling: a fixed sleep was a race on a loaded machine. Panics with the metrics after
    /// 30 s.
    pub async fn wait_until(&self, what: &str, ready: impl Fn(&Gauges) -> bool) {
        let t0 = std::time::Instant::now();
        loop {
            // One scrape for all three, so that they describe the same moment.
            let text = self.metrics_text().await;
            let metric = |name: &str| metric_value(&text, name).unwrap_or(0.0) as u64;
            let g = Gauges {
                taken: metric("logit_lens_batch_size_sum"),
                queued: metric("logit_lens_queue_depth"),
                pixels: metric("logit_lens_pending_image_pixels"),
            };
            if ready(&g) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "waited 30 s for {what}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Graceful shutdown; returns once the server and the worker have stopped.
    pub async fn stop(&self) {
        if let Some(s) = self.stop.lock().unwrap().take() {
            let _ = s.send(());
        }
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            t.await.unwrap().unwrap();
        }
    }
}

/// The error code of a JSON error response, after checking its status.
pub async fn error_code(r: reqwest::Response, status: u16) -> String {
    error_code_and_message(r, status).await.0
}

/// The error code and message of a JSON error response, after checking its status.
pub async fn error_code_and_message(r: reqwest::Response, status: u16) -> (String, String) {
    let got = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "an error needs a message: {body}");
    let code = body["error"]["code"].as_str().unwrap().to_string();
    (code, message.to_string())
}
