//! `logit-lens run` and `logit-lens plot` as a researcher runs them on a folder of images and a
//! prompts file: one result per case equal to what `run_lens` (and so `probe`) gives, a summary
//! recomputed here from the results, figures that are real PNGs and SVGs with text in them,
//! resuming, failures, a server with several requests in flight, and redrawing.

mod server_common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use logit_lens::api::{LensOptions, Positions};
use serde_json::Value;
use server_common::*;

fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .args(args)
        .env_remove("LOGIT_LENS_API_KEY")
        .env_remove("LOGIT_LENS_DEVICE")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh folder under the system's temporary directory, removed when the test passes.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("logit-lens-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const PROMPTS: &str =
    "# the notebook's questions\nColor of the main object:\n\n   Describe the image.  \n";
const PROMPT_LIST: [&str; 2] = ["Color of the main object:", "Describe the image."];

/// `images/` with the given fixture images, and `prompts.txt`.
fn dataset(name: &str, images: &[&str], prompts: &str) -> Scratch {
    let d = Scratch::new(name);
    std::fs::create_dir_all(d.path("images")).unwrap();
    for img in images {
        std::fs::copy(
            fixtures().join("images").join(img),
            d.path("images").join(img),
        )
        .unwrap();
    }
    std::fs::write(d.path("prompts.txt"), prompts).unwrap();
    d
}

fn run_local(d: &Scratch, extra: &[&str]) -> Output {
    let model = fixtures().join("qwen2vl-hub");
    let mut args = vec![
        "run".to_string(),
        "--images".into(),
        d.s("images"),
        "--prompts".into(),
        d.s("prompts.txt"),
        "--model".into(),
        model.to_str().unwrap().into(),
        "--out".into(),
        d.s("out"),
        "--top-k".into(),
        "3".into(),
        "--targets".into(),
        " red,Red".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bin(&args)
}

fn options() -> LensOptions {
    LensOptions {
        top_k: 3,
        positions: Positions::Keyword("last".into()),
        targets: vec![" red".into(), "Red".into()],
        ..LensOptions::default()
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every response in results.jsonl against `run_lens` on the same case.
fn assert_responses_are_run_lens(records: &[Value], model_dir: &str, name: &str) {
    let model = load(model_dir, name);
    for r in records {
        let (image, prompt) = (r["image"].as_str().unwrap(), r["prompt"].as_str().unwrap());
        let want = expected(model.as_ref(), prompt, Some(&image_bytes(image)), options());
        assert_same_answer(&r["response"], &want, &format!("{image} × {prompt}"));
    }
}

fn keys(records: &[Value]) -> HashSet<(String, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["image"].as_str().unwrap().to_string(),
                r["prompt"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn all_cases(images: &[&str]) -> HashSet<(String, String)> {
    images
        .iter()
        .flat_map(|i| PROMPT_LIST.iter().map(|p| (i.to_string(), p.to_string())))
        .collect()
}

/// summary.csv recomputed here, independently, from the responses in results.jsonl.
fn assert_summary_matches(out: &Path) {
    let records = lines(&out.join("results.jsonl"));
    // (prompt, layer) -> per-image values
    let mut want: BTreeMap<(String, u64), Vec<[f64; 5]>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.get("response").is_some()) {
        let resp = &r["response"];
        let final_layer = resp["num_layers"].as_u64().unwrap();
        let layers = resp["layers"].as_array().unwrap();
        // The probed position: the last input position reported (an answer's come after it).
        let n_input = resp["input"]["num_tokens"].as_u64().unwrap();
        let last = |l: &Value| {
            l["positions"]
                .as_array()
                .unwrap()
                .iter()
                .rfind(|p| p["position"].as_u64().unwrap() < n_input)
                .unwrap()
                .clone()
        };
        let final_top = last(layers.iter().find(|l| l["layer"] == final_layer).unwrap())["top"][0]
            ["id"]
            .clone();
        for l in layers {
            let p = last(l);
            want.entry((
                r["prompt"].as_str().unwrap().to_string(),
                l["layer"].as_u64().unwrap(),
            ))
            .or_default()
            .push([
                l["mean_max_prob"].as_f64().unwrap(),
                p["top"][0]["prob"].as_f64().unwrap(),
                (p["top"][0]["id"] == final_top) as u8 as f64,
                p["entropy"].as_f64().unwrap(),
                p["kl_to_final"].as_f64().unwrap(),
            ]);
        }
    }
    let mut reader = csv::Reader::from_path(out.join("summary.csv")).unwrap();
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "prompt",
            "layer",
            "n_images",
            "mean_max_prob",
            "last_top1_prob",
            "top1_agreement",
            "mean_entropy",
            "mean_kl_to_final",
            "answer_first_top1_layer"
        ]
    );
    let mut seen = 0;
    for row in reader.records() {
        let row = row.unwrap();
        let key = (row[0].to_string(), row[1].parse::<u64>().unwrap());
        let values = &want[&key];
        assert_eq!(row[2].parse::<usize>().unwrap(), values.len(), "{key:?}");
        for (col, k) in (3..8).zip(0..5) {
            let mean = values.iter().map(|v| v[k]).sum::<f64>() / values.len() as f64;
            let got: f64 = row[col].parse().unwrap();
            assert!(
                (got - mean).abs() <= 1e-9 * mean.abs().max(1.0),
                "{key:?} column {col}: {got} vs {mean}"
            );
        }
        // The answer's first token: the first layer where it is the top-1, over the images.
        let firsts: Vec<f64> = records
            .iter()
            .filter(|r| r["prompt"] == key.0.as_str())
            .filter_map(|r| {
                let ranks = r["response"]["answer"]["tokens"][0]["ranks"].as_array()?;
                ranks.iter().position(|x| x == 1).map(|l| l as f64)
            })
            .collect();
        if firsts.is_empty() {
            assert_eq!(&row[8], "", "{key:?}: no answers");
        } else {
            let mean = firsts.iter().sum::<f64>() / firsts.len() as f64;
            assert!(
                (row[8].parse::<f64>().unwrap() - mean).abs() < 1e-9,
                "{key:?}"
            );
        }
        seen += 1;
    }
    assert_eq!(seen, want.len(), "one row per prompt and layer");
}

/// The figures index.csv lists: every file there, PNGs that decode and have dark pixels (text)
/// in their title band, SVGs that are whole documents with the case's name in a text element.
fn assert_figures(out: &Path, cases: usize, prompts: usize) {
    let mut index = csv::Reader::from_path(out.join("figures/index.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = index.records().map(Result::unwrap).collect();
    assert_eq!(rows.iter().filter(|r| &r[0] == "case").count(), cases);
    assert_eq!(rows.iter().filter(|r| &r[0] == "prompt").count(), prompts);
    for r in &rows {
        let png = std::fs::read(out.join(&r[3])).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{}", &r[3]);
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert!(img.width() > 1000 && img.height() > 400, "{}", &r[3]);
        let ink = (8..34)
            .flat_map(|y| (0..400).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count();
        assert!(
            ink > 100,
            "{}: no title text drawn ({ink} dark pixels)",
            &r[3]
        );
        let svg = std::fs::read_to_string(out.join(&r[4])).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &r[4]);
        assert!(svg.trim_end().ends_with("</svg>"), "{}", &r[4]);
        assert!(svg.contains("<text"), "{}", &r[4]);
        let named = if &r[0] == "case" { &r[1] } else { &r[2] };
        assert!(svg.contains(named), "{} does not name {named}", &r[4]);
    }
}

#[test]
fn run_writes_one_result_per_case_equal_to_run_lens_a_summary_and_figures() {
    let images = ["landscape.png", "portrait.png"];
    let d = dataset("run-local", &images, PROMPTS);
    let out = run_local(&d, &["--batch-size", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let records = lines(&d.path("out/results.jsonl"));
    assert_eq!(records.len(), 4);
    assert_eq!(keys(&records), all_cases(&images));
    // In case order: image by image, prompts in file order.
    assert_eq!(records[0]["image"], "landscape.png");
    assert_eq!(records[1]["prompt"], "Describe the image.");
    assert_responses_are_run_lens(&records, "qwen2vl-hub", "qwen2vl-hub");

    // And what `probe` prints for one of the cases.
    let probe = bin(&[
        "probe",
        "--model",
        fixtures().join("qwen2vl-hub").to_str().unwrap(),
        "--image",
        d.s("images/portrait.png").as_str(),
        "--prompt",
        "Describe the image.",
        "--top-k",
        "3",
        "--targets",
        " red,Red",
    ]);
    assert!(probe.status.success(), "{}", stderr(&probe));
    let probed: Value = serde_json::from_slice(&probe.stdout).unwrap();
    let record = records
        .iter()
        .find(|r| r["image"] == "portrait.png" && r["prompt"] == "Describe the image.")
        .unwrap();
    assert_same_answer(&record["response"], &probed, "probe");

    assert_summary_matches(&d.path("out"));
    assert_figures(&d.path("out"), 4, 2);
}

/// `run --generate`: each result holds the answer (as `probe --generate` gives it), and
/// summary.csv the first layer at which the answer's first token is the top-1.
#[test]
fn run_with_generate_writes_answers_and_their_first_top1_layer() {
    let images = ["landscape.png", "portrait.png"];
    let d = dataset("run-generate", &images, PROMPTS);
    // One case at a time, so that each result is bit for bit what `run_lens` gives alone (batched,
    // the answers share decoder steps: tests/generate_parity.rs compares those).
    let out = run_local(&d, &["--generate", "3", "--batch-size", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let records = lines(&d.path("out/results.jsonl"));
    assert_eq!(records.len(), 4);
    for r in &records {
        let tokens = r["response"]["answer"]["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 3, "{}", r["image"]);
    }
    let model = load("qwen2vl-hub", "qwen2vl-hub");
    let opts = LensOptions {
        generate: 3,
        ..options()
    };
    let r = &records[0];
    let want = expected(
        model.as_ref(),
        r["prompt"].as_str().unwrap(),
        Some(&image_bytes(r["image"].as_str().unwrap())),
        opts,
    );
    assert_same_answer(&r["response"], &want, "run --generate");
    assert_summary_matches(&d.path("out"));
    // Three answers at a time, the fourth case starting as soon as they leave room: the same
    // answers (tests/generate_parity.rs holds `generate::stream` to the answers alone).
    let d3 = dataset("run-generate-3", &images, PROMPTS);
    let out = run_local(&d3, &["--generate", "3", "--batch-size", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let answers = |records: &[Value]| {
        records
            .iter()
            .map(|r| {
                let ids = r["response"]["answer"]["tokens"].as_array().unwrap();
                let ids: Vec<i64> = ids.iter().map(|t| t["id"].as_i64().unwrap()).collect();
                (r["image"].clone(), r["prompt"].clone(), ids)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        answers(&lines(&d3.path("out/results.jsonl"))),
        answers(&records)
    );
}

#[test]
fn a_second_run_does_no_work_a_torn_last_line_is_run_again_and_other_options_are_refused() {
    let images = ["landscape.png", "portrait.png"];
    let d = dataset("run-resume", &images, PROMPTS);
    let first = run_local(&d, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let results = d.path("out/results.jsonl");
    let before = std::fs::read(&results).unwrap();
    let index = std::fs::read_to_string(d.path("out/figures/index.csv")).unwrap();
    let a_figure = d
        .path("out")
        .join(index.lines().nth(1).unwrap().split(',').nth(3).unwrap());
    let drawn_at = std::fs::metadata(&a_figure).unwrap().modified().unwrap();

    let again = run_local(&d, &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("4 done already, 0 to run"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read(&results).unwrap(),
        before,
        "nothing rewritten"
    );
    assert_eq!(
        std::fs::metadata(&a_figure).unwrap().modified().unwrap(),
        drawn_at,
        "a finished case's figure is not redrawn"
    );

    // A run killed mid-write leaves a cut line; the next run drops it and runs that case again.
    std::fs::write(&results, &before[..before.len() - 40]).unwrap();
    let resumed = run_local(&d, &[]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let err = stderr(&resumed);
    assert!(err.contains("3 done already, 1 to run"), "{err}");
    assert!(err.contains("cut off mid-write"), "{err}");
    let records = lines(&results);
    assert_eq!(records.len(), 4);
    assert_eq!(keys(&records), all_cases(&images));
    let old: Vec<Value> = std::str::from_utf8(&before)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[3]["image"], old[3]["image"]);
    assert_eq!(answer(&records[3]["response"]), answer(&old[3]["response"]));

    // Results made with other options are not mixed with these.
    let other = run_local(&d, &["--layers", "0,-1"]);
    assert_eq!(other.status.code(), Some(2), "{}", stderr(&other));
    assert!(
        stderr(&other).contains("holds results made with"),
        "{}",
        stderr(&other)
    );
}

#[test]
fn a_corrupt_image_is_an_error_record_and_exit_1_and_is_retried_by_the_next_run() {
    let images = ["landscape.png", "portrait.png"];
    let d = dataset("run-corrupt", &images, PROMPTS);
    std::fs::write(d.path("images/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(d.path("images/notes.txt"), b"not an image file").unwrap();
    let out = run_local(&d, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("broken.png"), "{err}");
    assert!(err.contains("2 cases failed"), "{err}");
    let records = lines(&d.path("out/results.jsonl"));
    assert_eq!(records.len(), 6, "notes.txt is not an image file");
    let failed: Vec<&Value> = records
        .iter()
        .filter(|r| r.get("error").is_some())
        .collect();
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert_eq!(f["image"], "broken.png");
        assert_eq!(f["error"]["code"], "invalid_image");
        assert!(!f["error"]["message"].as_str().unwrap().is_empty());
        assert!(f.get("response").is_none());
    }
    let good: Vec<Value> = records
        .iter()
        .filter(|r| r.get("response").is_some())
        .cloned()
        .collect();
    assert_eq!(keys(&good), all_cases(&images));
    assert_responses_are_run_lens(&good, "qwen2vl-hub", "qwen2vl-hub");
    assert_summary_matches(&d.path("out"));
    assert_figures(&d.path("out"), 4, 2);

    // The failed cases are tried again, and replaced once the image is fixed.
    let again = run_local(&d, &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("4 done already, 2 to run"));
    assert_eq!(
        lines(&d.path("out/results.jsonl")).len(),
        6,
        "one line per case"
    );
    std::fs::copy(
        fixtures().join("images/square.png"),
        d.path("images/broken.png"),
    )
    .unwrap();
    let fixed = run_local(&d, &[]);
    assert!(fixed.status.success(), "{}", stderr(&fixed));
    let records = lines(&d.path("out/results.jsonl"));
    assert_eq!(records.len(), 6);
    assert!(records.iter().all(|r| r.get("response").is_some()));
    assert_summary_matches(&d.path("out"));
}

#[test]
fn plot_redraws_the_same_files_from_results_jsonl() {
    let images = ["landscape.png", "portrait.png", "wide.png"];
    let d = dataset("plot", &images, PROMPTS);
    let out = run_local(&d, &["--batch-size", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plot = bin(&[
        "plot",
        d.s("out/results.jsonl").as_str(),
        "--out",
        d.s("redrawn").as_str(),
        "--prompts",
        d.s("prompts.txt").as_str(),
    ]);
    assert!(plot.status.success(), "{}", stderr(&plot));
    let index = std::fs::read_to_string(d.path("out/figures/index.csv")).unwrap();
    assert_eq!(
        std::fs::read_to_string(d.path("redrawn/figures/index.csv")).unwrap(),
        index
    );
    assert_eq!(
        std::fs::read(d.path("redrawn/summary.csv")).unwrap(),
        std::fs::read(d.path("out/summary.csv")).unwrap()
    );
    let mut files = 0;
    for line in index.lines().skip(1) {
        let row: Vec<&str> = line.rsplitn(3, ',').collect();
        for rel in &row[..2] {
            assert_eq!(
                std::fs::read(d.path("redrawn").join(rel)).unwrap(),
                std::fs::read(d.path("out").join(rel)).unwrap(),
                "{rel}"
            );
            files += 1;
        }
    }
    assert_eq!(files, 2 * (6 + 2));
    assert_figures(&d.path("redrawn"), 6, 2);

    let missing = bin(&[
        "plot",
        d.s("nothing.jsonl").as_str(),
        "--out",
        d.s("x").as_str(),
    ]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn prompts_files_and_image_folders_are_read_as_documented() {
    let d = Scratch::new("listing");
    std::fs::create_dir_all(d.path("imgs/sub")).unwrap();
    std::fs::create_dir_all(d.path("imgs/.hidden")).unwrap();
    for f in ["b.PNG", "a.jpg", "c.txt", "sub/d.webp", ".hidden/e.png"] {
        std::fs::write(d.path("imgs").join(f), b"x").unwrap();
    }
    let names = |recursive| {
        logit_lens::cli::run::list_images(&d.path("imgs"), recursive, &d.path("out"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(false), ["a.jpg", "b.PNG"]);
    assert_eq!(names(true), ["a.jpg", "b.PNG", "sub/d.webp"]);
    std::fs::write(d.path("p.txt"), "# c\n\n one \ntwo\none\n#x\n").unwrap();
    assert_eq!(
        logit_lens::cli::run::read_prompts(&d.path("p.txt")).unwrap(),
        ["one", "two"]
    );
    std::fs::write(d.path("empty.txt"), "# only a comment\n\n").unwrap();
    assert!(logit_lens::cli::run::read_prompts(&d.path("empty.txt")).is_err());
}

/// Where the cases go must be said, and said in a form this build speaks: neither `--model` nor
/// `--server` names both choices; an https server is refused saying why, before anything runs.
#[test]
fn a_run_without_a_source_or_with_an_https_server_is_refused_saying_why() {
    let d = dataset("source", &["landscape.png"], "Hi\n");
    let images = d.path("images").display().to_string();
    let prompts = d.path("prompts.txt").display().to_string();
    let out = d.path("out").display().to_string();
    let common = [
        "run",
        "--images",
        &images,
        "--prompts",
        &prompts,
        "--out",
        &out,
    ];
    let o = bin(&common);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--model <MODEL>|--server <SERVER>"),
        "{}",
        stderr(&o)
    );
    let o = bin(&[&common[..], &["--server", "https://lens.example:8443"]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("plain http only"), "{}", stderr(&o));
}

/// A run whose stderr reader goes away (`run ... 2>&1 | head -1`) finishes its work: every case
/// written, the summary too, exit 0, where `eprintln!` would have panicked at the next line.
#[test]
fn a_run_whose_stderr_reader_goes_away_finishes_its_work() {
    use std::process::Stdio;
    let d = dataset(
        "stderr-gone",
        &["landscape.png", "portrait.png"],
        "Hi\nColor?\n",
    );
    let model = fixtures().join("qwen2vl-hub");
    let mut child = Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .args([
            "run",
            "--images",
            &d.s("images"),
            "--prompts",
            &d.s("prompts.txt"),
        ])
        .args([
            "--model",
            model.to_str().unwrap(),
            "--out",
            &d.s("out"),
            "--no-figures",
        ])
        .env_remove("LOGIT_LENS_DEVICE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(lines(&d.path("out/results.jsonl")).len(), 4);
    assert!(d.path("out/summary.csv").is_file());
}

/// Lines of the worker's batch-size histogram: (groups run, groups of one).
async fn batches(server: &Server) -> (u64, u64) {
    let text = server.metrics_text().await;
    let value = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        value("logit_lens_batch_size_count"),
        value("logit_lens_batch_size_bucket{le=\"1\"}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_against_a_server_with_requests_in_flight_gets_the_same_answers() {
    // Prompts starting with SLOW take 300 ms to prepare in the test server, so that requests
    // sent together meet in its queue.
    let server = Server::start(Setup {
        faulty: true,
        ..Setup::default()
    })
    .await;
    let images = ["landscape.png", "portrait.png", "wide.png"];
    let d = dataset(
        "run-server",
        &images,
        "SLOW Color of the main object:\nSLOW Describe the image.\n",
    );
    let base = server.base.clone();
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "run",
            "--images",
            &d.s("images"),
            "--prompts",
            &d.s("prompts.txt"),
            "--server",
            &base,
            "--out",
            &d.s("out"),
            "--top-k",
            "3",
            "--targets",
            " red,Red",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let spawn = |a: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            bin(&a)
        })
    };

    // Two models are served: the run must say which.
    let unnamed = spawn(args(&[])).await.unwrap();
    assert_eq!(unnamed.status.code(), Some(2));
    assert!(
        stderr(&unnamed).contains("--model-name"),
        "{}",
        stderr(&unnamed)
    );

    let before = batches(&server).await;
    let out = spawn(args(&["--model-name", DEMO, "--concurrency", "3"]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let after = batches(&server).await;
    let (groups, singles) = (after.0 - before.0, after.1 - before.1);
    assert!(
        groups < 6 && singles < groups,
        "6 cases with 3 in flight should meet in the queue: {groups} groups, {singles} of one"
    );

    let records = lines(&d.path("out/results.jsonl"));
    assert_eq!(records.len(), 6);
    let want: HashSet<(String, String)> = images
        .iter()
        .flat_map(|i| {
            ["SLOW Color of the main object:", "SLOW Describe the image."]
                .iter()
                .map(move |p| (i.to_string(), p.to_string()))
        })
        .collect();
    assert_eq!(keys(&records), want);
    assert_responses_are_run_lens(&records, "qwen2vl-hub", DEMO);
    for r in &records {
        assert!(r["response"]["timing_ms"]["queue"].as_f64().is_some());
    }

    // Resuming against the server sends nothing.
    let again = spawn(args(&["--model-name", DEMO])).await.unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("6 done already, 0 to run"));
    assert_eq!(batches(&server).await.0, after.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_against_a_server_with_api_keys_needs_the_key() {
    let server = Server::start(Setup {
        keys: vec!["sesame".into()],
        ..Setup::default()
    })
    .await;
    let d = dataset("run-auth", &["square.png"], "Color of the main object:\n");
    let args = |key: Option<&str>| {
        let mut a: Vec<String> = [
            "run",
            "--images",
            &d.s("images"),
            "--prompts",
            &d.s("prompts.txt"),
            "--server",
            &server.base,
            "--model-name",
            DEMO,
            "--out",
            &d.s("out"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(k) = key {
            a.extend(["--api-key".to_string(), k.to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            bin(&a)
        })
    };
    let refused = run(args(None)).await.unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("LOGIT_LENS_API_KEY"),
        "{}",
        stderr(&refused)
    );
    assert!(
        !d.path("out").exists(),
        "a refused run leaves no --out folder"
    );
    let ok = run(args(Some("sesame"))).await.unwrap();
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(lines(&d.path("out/results.jsonl")).len(), 1);
    server.stop().await;
}
