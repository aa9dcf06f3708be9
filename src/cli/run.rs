//! `logit-lens run`: the lens on every image × prompt of a dataset, as the notebook's loops do,
//! through a model loaded here (`--model`) or a running `logit-lens serve` (`--server`).
//!
//! Each finished case is appended to `OUT/results.jsonl` at once, so a killed run loses nothing it
//! finished and the next run skips it; failed cases are recorded as errors and tried again next
//! time. At the end the file is rewritten with one line per case in case order, and the summary and
//! figures are written by [`crate::report::write_report`], the code `plot` runs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::LensArgs;
use crate::api::LensOptions;
use crate::engine::{run_lens_batch, LensRequest};
use crate::error::{Error, Result};
use crate::preprocess::image::{decode, Rgb8};
use crate::report::{self, CaseError, Record, Redraw, Results};
use crate::server::resolve::ModelSpec;

/// Image files `run` takes from `--images`.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"];

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "server"])))]
pub struct RunArgs {
    /// A folder of images (png, jpg, jpeg, webp, gif, bmp, tif, tiff), taken in name order.
    #[arg(long)]
    pub images: PathBuf,
    /// Take images from the folders under --images too.
    #[arg(long)]
    pub recursive: bool,
    /// A text file with one prompt per line; blank lines and lines starting with `#` are skipped.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Where results.jsonl, summary.csv and figures/ go; a folder with results resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Run in this process: a snapshot directory, NAME=DIR, or a hub id in the local cache.
    #[arg(long, conflicts_with = "server")]
    pub model: Option<String>,
    /// Send the cases to a running `logit-lens serve`, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub server: Option<String>,
    /// Bearer key for a server started with API keys.
    #[arg(long, env = "LOGIT_LENS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// With --server: which served model (default: the only one); with --model: the name in the
    /// responses (default: the directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// With --server: requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// With --server: seconds to wait for one response.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    #[command(flatten)]
    pub lens: LensArgs,
    /// With --model: auto (the GPU when built with CUDA and one is present), cpu, cuda or cuda:N.
    #[arg(long, env = "LOGIT_LENS_DEVICE", default_value = "auto")]
    pub device: String,
    /// With --model: auto (f32 on the CPU, the checkpoint's dtype on a GPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// With --model: cases run through the decoder together (one right-padded pass).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// With --model: padded tokens (cases × longest) per decoder pass.
    #[arg(long, default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// Write results.jsonl and summary.csv only.
    #[arg(long)]
    pub no_figures: bool,
}

/// How a run ended: every case has a result, or some failed (recorded; the next run retries them).
pub struct RunOutcome {
    pub failed: usize,
}

/// One case: an image (its path relative to --images, `/`-separated) and a prompt.
#[derive(Clone, Debug)]
struct CaseKey {
    image: String,
    path: PathBuf,
    prompt: String,
}

/// `OUT/run.json`: what the results in the folder were made with, checked when a run resumes.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Manifest {
    model: String,
    options: LensOptions,
}

/// The prompts of a prompts file: one per line, trimmed; blank lines, `#` comments and repeats
/// skipped.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidOption(format!("--prompts {}: cannot read it: {e}", path.display()))
    })?;
    let mut seen = HashSet::new();
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| seen.insert(l.to_string()))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        return Err(Error::InvalidOption(format!(
            "--prompts {}: no prompt in it (one per line; blank lines and lines starting with # are skipped)",
            path.display()
        )));
    }
    Ok(prompts)
}

/// The image files under `dir` (with `recursive`, in its sub-folders too, hidden ones and
/// `skip` excepted), as (relative `/`-separated name, path), sorted by name.
pub fn list_images(dir: &Path, recursive: bool, skip: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(
        dir: &Path,
        rel: &str,
        recursive: bool,
        skip: &Path,
        out: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::InvalidOption(format!("--images {}: cannot list it: {e}", dir.display()))
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                Error::InvalidOption(format!("--images {}: cannot list it: {e}", dir.display()))
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let key = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if path.is_dir() {
                let hidden = name.starts_with('.');
                let is_out = std::fs::canonicalize(&path).ok() == std::fs::canonicalize(skip).ok();
                if recursive && !hidden && !is_out {
                    walk(&path, &key, recursive, skip, out)?;
                }
                continue;
            }
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                out.push((key, path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", recursive, skip, &mut out)?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if out.is_empty() {
        return Err(Error::InvalidOption(format!(
            "--images {}: no image files in it ({}){}",
            dir.display(),
            IMAGE_EXTENSIONS.join(", "),
            if recursive {
                ""
            } else {
                "; --recursive takes sub-folders too"
            }
        )));
    }
    Ok(out)
}

fn progress(total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} cases · {per_sec} · ETA {eta} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs every pending case and writes the report.
pub fn run(args: RunArgs) -> Result<RunOutcome> {
    let started = Instant::now();
    if args.concurrency == 0 || args.batch_size == 0 {
        return Err(Error::InvalidOption(
            "--concurrency and --batch-size must be at least 1".into(),
        ));
    }
    let options = args.lens.options(true)?;
    let prompts = read_prompts(&args.prompts)?;
    let images = list_images(&args.images, args.recursive, &args.out)?;

    let cases: Vec<CaseKey> = images
        .iter()
        .flat_map(|(image, path)| {
            prompts.iter().map(|p| CaseKey {
                image: image.clone(),
                path: path.clone(),
                prompt: p.clone(),
            })
        })
        .collect();
    // The server is asked first: a run refused there (down, a wrong key or model name) leaves no
    // empty --out folder behind.
    let source = Source::open(&args)?;
    std::fs::create_dir_all(&args.out).map_err(|e| {
        Error::InvalidOption(format!(
            "--out {}: cannot create it: {e}",
            args.out.display()
        ))
    })?;
    check_manifest(
        &args.out,
        &Manifest {
            model: source.name().to_string(),
            options: options.clone(),
        },
    )?;
    let results_path = args.out.join("results.jsonl");
    let existing = Results::read(&results_path)?;
    existing.warn();
    let done: HashSet<(String, String)> = existing
        .latest()
        .into_iter()
        .filter(|r| r.response.is_some())
        .map(|r| (r.image.clone(), r.prompt.clone()))
        .collect();
    let pending: Vec<CaseKey> = cases
        .iter()
        .filter(|c| !done.contains(&(c.image.clone(), c.prompt.clone())))
        .cloned()
        .collect();
    say!(
        "{} cases ({} images × {} prompts): {} done already, {} to run",
        cases.len(),
        images.len(),
        prompts.len(),
        cases.len() - pending.len(),
        pending.len()
    );

    let mut fresh: HashSet<(String, String)> = HashSet::new();
    if !pending.is_empty() {
        let mut log = existing.append()?;
        let mut on_done = |record: Record, bar: &ProgressBar| -> Result<()> {
            log.append(&record)?;
            if let Some(e) = &record.error {
                bar.suspend(|| {
                    say!(
                        "failed: {} × {:?}: [{}] {}",
                        record.image,
                        record.prompt,
                        e.code,
                        e.message
                    )
                });
            } else {
                fresh.insert((record.image, record.prompt));
            }
            bar.inc(1);
            Ok(())
        };
        match &source {
            Source::Local { spec, name } => {
                run_local(&args, spec, name, &options, &pending, &mut on_done)?
            }
            Source::Server(server) => run_server(&args, server, &options, &pending, &mut on_done)?,
        }
    }

    let cases_s = started.elapsed().as_secs_f64();
    let report_started = Instant::now();
    // One line per case, in case order; then the report over everything the folder holds.
    let order: Vec<(String, String)> = cases
        .iter()
        .map(|c| (c.image.clone(), c.prompt.clone()))
        .collect();
    let results = Results::read(&results_path)?;
    report::compact(&results, &order)?;
    let results = Results::read(&results_path)?;
    let finished = report::cases(&results)?;
    let redraw = if args.no_figures {
        Redraw::Nothing
    } else {
        Redraw::Only(&fresh)
    };
    let written = report::write_report(&finished, &prompts, &args.out, redraw)?;

    let wanted: HashSet<(&str, &str)> = cases
        .iter()
        .map(|c| (c.image.as_str(), c.prompt.as_str()))
        .collect();
    let failed: Vec<&Record> = results
        .latest()
        .into_iter()
        .filter(|r| r.error.is_some() && wanted.contains(&r.key()))
        .collect();
    say!(
        "{} new results, {} failed, in {:.2} s (+ {:.2} s for the summary and figures); {} ({} cases), {}, {} case figures drawn, {} prompt figures",
        fresh.len(),
        failed.len(),
        cases_s,
        report_started.elapsed().as_secs_f64(),
        results_path.display(),
        finished.len(),
        written.summary.display(),
        written.case_figures,
        written.prompt_figures
    );
    if !failed.is_empty() {
        say!(
            "{} cases failed (error records in results.jsonl; run the same command again to retry them):",
            failed.len()
        );
        for r in failed.iter().take(20) {
            if let Some(e) = &r.error {
                say!("  {} × {:?}: [{}] {}", r.image, r.prompt, e.code, e.message);
            }
        }
        if failed.len() > 20 {
            say!("  ... and {} more", failed.len() - 20);
        }
    }
    Ok(RunOutcome {
        failed: failed.len(),
    })
}

/// Checks the folder's run.json against this run (or writes it): results made with other
/// options or another model must not be mixed into one summary.
fn check_manifest(out: &Path, manifest: &Manifest) -> Result<()> {
    let path = out.join("run.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let old: Manifest = serde_json::from_str(&text).map_err(|e| {
                Error::InvalidOption(format!("{}: not a run manifest ({e})", path.display()))
            })?;
            if &old != manifest {
                let show = |m: &Manifest| serde_json::to_string(m).unwrap_or_default();
                return Err(Error::InvalidOption(format!(
                    "--out {} holds results made with {}, and this run asks for {}; use another --out, or the same model and options to resume",
                    out.display(),
                    show(&old),
                    show(manifest)
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_string_pretty(manifest)
                .map_err(|e| Error::Internal(e.to_string()))?;
            report::write_atomically(&path, text.as_bytes())
        }
        Err(e) => Err(Error::Internal(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn case_error(e: &Error) -> CaseError {
    CaseError {
        code: e.code().to_string(),
        message: e.to_string(),
    }
}

fn body(response: &impl Serialize) -> Result<Box<RawValue>> {
    serde_json::to_string(response)
        .and_then(RawValue::from_string)
        .map_err(|e| Error::Internal(format!("cannot encode a response: {e}")))
}

fn read_image(path: &Path) -> Result<Rgb8> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::InvalidImage(format!("cannot read {}: {e}", path.display())))?;
    decode(&bytes)
}

/// In this process: the model loaded once, cases run in groups through one padded decoder pass.
fn run_local(
    args: &RunArgs,
    spec: &ModelSpec,
    name: &str,
    options: &LensOptions,
    pending: &[CaseKey],
    on_done: &mut dyn FnMut(Record, &ProgressBar) -> Result<()>,
) -> Result<()> {
    let device = crate::models::parse_device(&args.device)?;
    let dtype = crate::models::parse_dtype(&args.dtype, &spec.dir, &device)?;
    let t0 = Instant::now();
    let model = crate::models::load(&spec.dir, name, &device, dtype)?;
    say!(
        "loaded {} ({}) from {} on {} in {:.1} s",
        name,
        model.info().family,
        spec.dir.display(),
        model.info().device,
        t0.elapsed().as_secs_f64()
    );
    let bar = progress(pending.len());
    let record = |case: &CaseKey, result: Result<crate::api::LensResponse>| match result
        .and_then(|r| body(&r))
    {
        Ok(b) => Record::ok(&case.image, &case.prompt, b),
        Err(e) => Record::failed(&case.image, &case.prompt, case_error(&e)),
    };
    if options.generate > 0 {
        // Up to --batch-size answers go on together; as answers end, the next cases start in
        // their place (their prompts in one pass), so that no slot waits for a group's longest.
        let mut cases = pending.iter();
        crate::engine::generate::stream(
            model.as_ref(),
            args.batch_size,
            args.max_batch_tokens,
            |n| requests(cases.by_ref().take(n).collect(), options),
            |case, result| on_done(record(case, result), &bar),
        )?;
    } else {
        for group in pending.chunks(args.batch_size) {
            let mut reqs = Vec::new();
            let mut runs = Vec::new();
            for (case, req) in requests(group.iter().collect(), options) {
                match req {
                    Ok(req) => {
                        reqs.push(req);
                        runs.push(case);
                    }
                    Err(e) => on_done(record(case, Err(e)), &bar)?,
                }
            }
            let refs: Vec<&LensRequest> = reqs.iter().collect();
            let results = run_lens_batch(model.as_ref(), &refs, args.max_batch_tokens);
            for (case, result) in runs.into_iter().zip(results) {
                on_done(record(case, result), &bar)?;
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The requests of `cases`, or why one could not be made (its image unreadable). Each image is
/// read and decoded once, in parallel.
fn requests<'c>(
    cases: Vec<&'c CaseKey>,
    options: &LensOptions,
) -> Vec<(&'c CaseKey, Result<LensRequest>)> {
    let mut paths: Vec<&Path> = cases.iter().map(|c| c.path.as_path()).collect();
    paths.sort();
    paths.dedup();
    let decoded: Vec<(&Path, Result<Rgb8>)> =
        paths.par_iter().map(|p| (*p, read_image(p))).collect();
    cases
        .into_iter()
        .map(|case| {
            let image = match decoded.iter().find(|(p, _)| *p == case.path.as_path()) {
                Some((_, Ok(img))) => Ok(img.clone()),
                Some((_, Err(e))) => Err(again(e)),
                None => Err(Error::Internal("the image was not read".into())),
            };
            let req = image.map(|img| LensRequest {
                prompt: case.prompt.clone(),
                image: Some(img),
                options: options.clone(),
            });
            (case, req)
        })
        .collect()
}

/// `e` again, for the next case that names an image that could not be read.
fn again(e: &Error) -> Error {
    let message = e.to_string();
    match e {
        Error::InvalidImage(_) => Error::InvalidImage(message),
        Error::UnsupportedImage(_) => Error::UnsupportedImage(message),
        Error::ImageNotAccepted(_) => Error::ImageNotAccepted(message),
        Error::TooLarge(_) => Error::TooLarge(message),
        _ => Error::Internal(message),
    }
}

/// The server's answer to GET /models, the part used here.
#[derive(Deserialize)]
struct ModelList {
    models: Vec<ModelName>,
}

#[derive(Deserialize)]
struct ModelName {
    name: String,
}

/// Where the cases run, and the model name the results carry.
enum Source {
    Local { spec: ModelSpec, name: String },
    Server(Server),
}

/// A checked server: it answers GET /models, the key works, the model exists.
struct Server {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
    name: String,
}

impl Source {
    fn open(args: &RunArgs) -> Result<Source> {
        match (&args.model, &args.server) {
            (Some(model), _) => {
                let spec = crate::server::resolve::resolve(model).map_err(Error::InvalidOption)?;
                let name = args.model_name.clone().unwrap_or_else(|| spec.name.clone());
                Ok(Source::Local { spec, name })
            }
            (None, Some(server)) if server.to_ascii_lowercase().starts_with("https://") => {
                Err(Error::InvalidOption(format!(
                    "--server {server}: this build speaks plain http only (no TLS); use the \
                     server's http:// address, or a tunnel to it"
                )))
            }
            (None, Some(server)) => {
                let base = server.trim_end_matches('/').to_string();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Internal(format!("cannot start the HTTP client: {e}")))?;
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(args.timeout_s))
                    .build()
                    .map_err(|e| Error::Internal(format!("cannot start the HTTP client: {e}")))?;
                let name = rt.block_on(preflight(&client, &base, args))?;
                Ok(Source::Server(Server {
                    rt,
                    client,
                    base,
                    name,
                }))
            }
            (None, None) => Err(Error::InvalidOption(
                "give --model DIR (run here) or --server URL".into(),
            )),
        }
    }

    fn name(&self) -> &str {
        match self {
            Source::Local { name, .. } => name,
            Source::Server(s) => &s.name,
        }
    }
}

/// Against a running service: `--concurrency` requests in flight, each case one multipart POST
/// /lens; 429, 503, 504 and dropped connections are retried with back-off.
fn run_server(
    args: &RunArgs,
    server: &Server,
    options: &LensOptions,
    pending: &[CaseKey],
    on_done: &mut dyn FnMut(Record, &ProgressBar) -> Result<()>,
) -> Result<()> {
    let options_json =
        serde_json::to_string(options).map_err(|e| Error::Internal(e.to_string()))?;
    let request = std::sync::Arc::new(Request {
        client: server.client.clone(),
        url: format!("{}/lens", server.base),
        key: args.api_key.clone(),
        model: server.name.clone(),
        options: options_json,
    });
    server.rt.block_on(async {
        let bar = progress(pending.len());
        let mut queue = pending.iter();
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            while in_flight.len() < args.concurrency {
                let Some(case) = queue.next() else { break };
                in_flight.spawn(request.clone().case(case.clone()));
            }
            match in_flight.join_next().await {
                Some(Ok(record)) => on_done(record, &bar)?,
                Some(Err(e)) => return Err(Error::Internal(format!("a request task failed: {e}"))),
                None => break,
            }
        }
        bar.finish_and_clear();
        Ok(())
    })
}

/// GET /models: the server answers, the key works, and the model to use exists.
async fn preflight(client: &reqwest::Client, base: &str, args: &RunArgs) -> Result<String> {
    let url = format!("{base}/models");
    let mut req = client.get(&url);
    if let Some(k) = &args.api_key {
        req = req.bearer_auth(k);
    }
    let unreachable = |e: String| {
        Error::InvalidOption(format!(
            "--server {base}: GET /models failed ({e}); is `logit-lens serve` running there?"
        ))
    };
    let r = req.send().await.map_err(|e| unreachable(e.to_string()))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| unreachable(e.to_string()))?;
    if !status.is_success() {
        let (code, message) = api_error(&text, status.as_u16());
        let hint = if status.as_u16() == 401 {
            "; pass --api-key or set LOGIT_LENS_API_KEY"
        } else {
            ""
        };
        return Err(Error::InvalidOption(format!(
            "--server {base}: GET /models answered {status} [{code}] {message}{hint}"
        )));
    }
    let list: ModelList =
        serde_json::from_str(&text).map_err(|e| unreachable(format!("not a model list: {e}")))?;
    let names: Vec<String> = list.models.into_iter().map(|m| m.name).collect();
    match &args.model_name {
        Some(n) if names.contains(n) => Ok(n.clone()),
        Some(n) => Err(Error::InvalidOption(format!(
            "--model-name {n}: the server has no such model; it serves {}",
            names.join(", ")
        ))),
        None if names.len() == 1 => Ok(names[0].clone()),
        None => Err(Error::InvalidOption(format!(
            "the server serves several models ({}); pick one with --model-name",
            names.join(", ")
        ))),
    }
}

/// `{"error": {"code", "message"}}` from an error body, or the status when it is not one.
fn api_error(text: &str, status: u16) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let e = &v["error"];
    match (e["code"].as_str(), e["message"].as_str()) {
        (Some(c), Some(m)) => (c.to_string(), m.to_string()),
        _ => (
            format!("http_{status}"),
            format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ),
        ),
    }
}

/// What every request of a server run shares.
struct Request {
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    model: String,
    options: String,
}

/// Tries per case for the retryable failures.
const ATTEMPTS: u32 = 6;

impl Request {
    async fn case(self: std::sync::Arc<Self>, case: CaseKey) -> Record {
        let fail = |code: &str, message: String| {
            Record::failed(
                &case.image,
                &case.prompt,
                CaseError {
                    code: code.into(),
                    message,
                },
            )
        };
        let bytes = match tokio::fs::read(&case.path).await {
            Ok(b) => b,
            Err(e) => {
                return fail(
                    "invalid_image",
                    format!("cannot read {}: {e}", case.path.display()),
                )
            }
        };
        let file_name = case
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let form = reqwest::multipart::Form::new()
                .text("prompt", case.prompt.clone())
                .text("model", self.model.clone())
                .text("options", self.options.clone())
                .part(
                    "image",
                    reqwest::multipart::Part::bytes(bytes.clone()).file_name(file_name.clone()),
                );
            let mut req = self.client.post(&self.url).multipart(form);
            if let Some(k) = &self.key {
                req = req.bearer_auth(k);
            }
            let backoff = Duration::from_millis(500 << attempt.min(5));
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = match r.text().await {
                        Ok(t) => t,
                        Err(e) => {
                            last = format!("reading the response failed: {e}");
                            tokio::time::sleep(backoff).await;
                            continue;
                        }
                    };
                    if status == 200 {
                        return match raw(text) {
                            Ok(b) => Record::ok(&case.image, &case.prompt, b),
                            Err(e) => fail("bad_response", e),
                        };
                    }
                    let (code, message) = api_error(&text, status);
                    if matches!(status, 429 | 503 | 504) {
                        last = format!("[{code}] {message}");
                        tokio::time::sleep(retry_after.unwrap_or(backoff)).await;
                        continue;
                    }
                    return fail(&code, message);
                }
                Err(e) => {
                    last = format!("request failed: {e}");
                    if e.is_timeout() {
                        return fail("timeout", last);
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
        }
        fail(
            "unavailable",
            format!("gave up after {ATTEMPTS} tries; last: {last}"),
        )
    }
}

/// A 200 body as one JSON line.
fn raw(text: String) -> std::result::Result<Box<RawValue>, String> {
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("the 200 body is not JSON: {e}"))?;
    if v.get("layers").is_none() {
        return Err("the 200 body is not a /lens response (no `layers`)".into());
    }
    if text.contains('\n') {
        return serde_json::to_string(&v)
            .and_then(RawValue::from_string)
            .map_err(|e| e.to_string());
    }
    RawValue::from_string(text).map_err(|e| e.to_string())
}
