//! `logit-lens serve` as an operator starts it: the binary, its flags, a real socket.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures;

fn serve(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_logit-lens"));
    c.arg("serve").args(args);
    c
}

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_bad_dtype_stops_serve_at_once_with_the_choices() {
    let out = serve(&["--dtype", "f8"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--dtype f8: use auto, f32, bf16 or f16"),
        "{err}"
    );
    assert!(!err.contains("loading"), "{err}");
}

/// A budget of no pixels would refuse every image forever: refused at start instead.
#[test]
fn a_pending_pixel_budget_of_zero_stops_serve_at_once() {
    let out = serve(&["--max-pending-pixels", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-pending-pixels"), "{err}");
    assert!(!err.contains("loading"), "{err}");
}

/// Counts of none (a queue, a group, a pass) are refused at start, as are key sources that hold
/// no key: a blank or mis-mounted secret must not leave the service open to all.
#[test]
fn zero_counts_and_keys_that_name_no_key_stop_serve_at_once() {
    let dir = std::env::temp_dir().join(format!("logit-lens-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let blank = dir.join("blank.txt");
    std::fs::write(&blank, "# the keys\n\n   \n").unwrap();
    let blank = blank.display().to_string();
    let cases: [(&[&str], &str); 9] = [
        (&["--max-queue", "0"], "--max-queue"),
        (&["--max-prompt-tokens", "0"], "--max-prompt-tokens"),
        (&["--max-image-pixels", "0"], "--max-image-pixels"),
        (&["--queue-timeout-ms", "0"], "--queue-timeout-ms"),
        (&["--max-batch-size", "0"], "--max-batch-size"),
        (&["--max-batch-tokens", "0"], "--max-batch-tokens"),
        (&["--max-body-bytes", "20 GB"], "--max-body-bytes"),
        (&["--api-keys", &blank], "holds no key"),
        (&["--api-key", " , "], "holds no key"),
    ];
    for (flags, said) in cases {
        let out = serve(flags).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(said), "{flags:?}: {err}");
        assert!(!err.contains("loading"), "{flags:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `serve` with the demo model and `flags`, on a free port, once /ready says ready: the running
/// server and its base URL.
async fn ready_server(flags: &[&str], client: &reqwest::Client) -> (Running, String) {
    let port = free_port();
    let model = format!("demo={}", fixtures().join("qwen2vl-hub").display());
    let port_text = port.to_string();
    let mut args = vec!["--model", &model, "--port", &port_text];
    args.extend_from_slice(flags);
    let server = Running(
        serve(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while !client
        .get(format!("{base}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "not ready in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, base)
}

#[tokio::test]
async fn serve_loads_its_models_in_the_dtype_asked_for() {
    let client = reqwest::Client::new();
    let (server, base) = ready_server(&["--dtype", "bf16"], &client).await;
    let models: serde_json::Value = client
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &models["models"][0];
    assert_eq!(
        (m["name"].as_str(), m["dtype"].as_str()),
        (Some("demo"), Some("bf16"))
    );
    // Half the bytes of the f32 weights.
    assert_eq!(
        m["weight_bytes"].as_u64().unwrap(),
        2 * m["parameters"].as_u64().unwrap()
    );
    let r = client
        .post(format!("{base}/lens"))
        .json(&serde_json::json!({"prompt": "Describe", "options": {"layers": [-1]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(server);
}

/// A size the flag cannot read stops serve at once, naming the units it takes.
#[test]
fn a_kv_cache_budget_it_cannot_read_stops_serve_at_once() {
    for bad in ["4GB", "0"] {
        let out = serve(&["--kv-cache-budget", bad]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--kv-cache-budget"), "{err}");
        assert!(!err.contains("loading"), "{err}");
    }
}

/// Over a real socket, an answer whose keys and values alone pass `--kv-cache-budget` gets 422
/// saying so; a request that does not generate is not held to it; `/metrics` shows the budget.
#[tokio::test]
async fn an_answer_past_the_kv_cache_budget_gets_422() {
    let client = reqwest::Client::new();
    let (server, base) = ready_server(&["--kv-cache-budget", "2KiB"], &client).await;
    let post = |options: serde_json::Value| {
        client
            .post(format!("{base}/lens"))
            .json(&serde_json::json!({"prompt": "Describe", "options": options}))
            .send()
    };
    let r = post(serde_json::json!({"generate": 4})).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--kv-cache-budget"), "{body}");
    assert!(message.contains("at most 2.0 KiB of them"), "{body}");
    let r = post(serde_json::json!({"layers": [-1]})).await.unwrap();
    assert_eq!(r.status(), 200);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("logit_lens_generate_kv_cache_budget_bytes 2048"),
        "{metrics}"
    );
    drop(server);
}
