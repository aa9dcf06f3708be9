//! Prometheus text exposition, written by hand: request counts by route and status, queue depth,
//! group (batch) sizes and per-stage latency histograms.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::api::Timing;
use crate::engine::worker::{Answers, Dropped};

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// The request stages timed for every answered /lens request.
pub const STAGES: &[&str] = &["decode", "queue", "preprocess", "forward", "lens", "total"];

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    batch_sizes: Histogram,
    stages: Vec<Histogram>,
}

pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                batch_sizes: Histogram::new(BATCH_BUCKETS),
                stages: STAGES
                    .iter()
                    .map(|_| Histogram::new(LATENCY_BUCKETS))
                    .collect(),
            }),
        }
    }
}

impl Metrics {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self, route: &str, status: u16) {
        *self
            .inner()
            .requests
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    pub fn batch(&self, size: usize) {
        self.inner().batch_sizes.observe(size as f64);
    }

    /// Records a /lens request's stage times (milliseconds, as in the body).
    pub fn timing(&self, decode_ms: f64, t: &Timing) {
        let values = [
            Some(decode_ms),
            t.queue,
            Some(t.preprocess),
            Some(t.forward),
            Some(t.lens),
            Some(t.total),
        ];
        let mut inner = self.inner();
        for (h, v) in inner.stages.iter_mut().zip(values) {
            if let Some(v) = v {
                h.observe(v / 1e3);
            }
        }
    }

    pub fn render(
        &self,
        queue_depth: usize,
        pending_pixels: u64,
        dropped: &Dropped,
        answers: &Answers,
    ) -> String {
        let inner = self.inner();
        let mut out = String::new();
        out.push_str(
            "# HELP logit_lens_requests_total HTTP requests, by route and status (499: the client went away before the answer).\n",
        );
        out.push_str("# TYPE logit_lens_requests_total counter\n");
        for ((route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "logit_lens_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP logit_lens_queue_depth Requests queued and not yet started.\n");
        out.push_str("# TYPE logit_lens_queue_depth gauge\n");
        let _ = writeln!(out, "logit_lens_queue_depth {queue_depth}");
        out.push_str(
            "# HELP logit_lens_pending_image_pixels Image pixels held by requests being decoded, queued or run.\n",
        );
        out.push_str("# TYPE logit_lens_pending_image_pixels gauge\n");
        let _ = writeln!(out, "logit_lens_pending_image_pixels {pending_pixels}");
        out.push_str(
            "# HELP logit_lens_jobs_dropped_total Queued jobs not run, or answers stopped while generated: client gone or deadline passed.\n",
        );
        out.push_str("# TYPE logit_lens_jobs_dropped_total counter\n");
        for (reason, n) in [
            ("client_gone", &dropped.client_gone),
            ("deadline", &dropped.deadline),
        ] {
            let _ = writeln!(
                out,
                "logit_lens_jobs_dropped_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        for (name, kind, help, value) in [
            (
                "logit_lens_generate_joined_total",
                "counter",
                "Requests that joined answers already being generated.",
                answers.joined.load(Ordering::Relaxed),
            ),
            (
                "logit_lens_generate_kv_waits_total",
                "counter",
                "Requests that waited for answers to end, their keys and values over --kv-cache-budget beside those going on.",
                answers.waited_for_kv.load(Ordering::Relaxed),
            ),
            (
                "logit_lens_generate_kv_cache_bytes",
                "gauge",
                "Bytes the keys and values of the answers being generated hold.",
                answers.kv_bytes.load(Ordering::Relaxed),
            ),
            (
                "logit_lens_generate_kv_cache_budget_bytes",
                "gauge",
                "The most they may hold together (--kv-cache-budget).",
                answers.kv_budget,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out.push_str(
            "# HELP logit_lens_batch_size Jobs per group the worker took off the queue (those that joined later not counted; an answer sent back to wait for the KV cache budget counts again in the group it starts with).\n",
        );
        out.push_str("# TYPE logit_lens_batch_size histogram\n");
        inner
            .batch_sizes
            .write(&mut out, "logit_lens_batch_size", "");
        out.push_str("# HELP logit_lens_stage_seconds Time per request stage: the body's timing_ms (preprocess includes the image's decoding, as there) and decode alone.\n");
        out.push_str("# TYPE logit_lens_stage_seconds histogram\n");
        for (stage, h) in STAGES.iter().zip(&inner.stages) {
            h.write(
                &mut out,
                "logit_lens_stage_seconds",
                &format!("stage=\"{stage}\""),
            );
        }
        out
    }
}
