//! `summary.csv`: for each prompt and layer, numbers averaged over the images, and the per-case
//! view of a response that the figures draw from.
//!
//! Columns:
//! - `n_images`: images with a result for this prompt that report this layer;
//! - `mean_max_prob`: the notebook's confidence, each image's mean over all input positions of the
//!   highest probability (the response's `mean_max_prob`), averaged over the images;
//! - `last_top1_prob`: the highest probability at the probed position (the last position the
//!   response reports: the last input token with the default `--positions last`), averaged;
//! - `top1_agreement`: the fraction of images whose top-1 token at the probed position equals the
//!   final layer's top-1 there (1 at the final layer; empty when the final layer is not reported);
//! - `mean_entropy`, `mean_kl_to_final`: at the probed position, in nats, averaged;
//! - `answer_first_top1_layer` (with `--generate`; the same on every row of a prompt): the first
//!   layer at which the answer's first token (the one the probed position emitted) is the top-1,
//!   averaged over the images with an answer.

use std::path::Path;

use crate::api::{LayerOut, LensResponse, PositionOut};
use crate::error::{Error, Result};

use super::Case;

/// One layer of one case, at the probed position.
pub struct LayerPoint<'a> {
    pub layer: usize,
    pub mean_max_prob: Option<f32>,
    pub at: &'a PositionOut,
    /// Whether the top-1 token equals the final layer's there; `None` without the final layer.
    pub agrees: Option<bool>,
}

/// The probed position: the highest input position the response reports (a generated
/// answer's positions come after the input and are not probed).
pub fn probed_position(r: &LensResponse) -> Option<usize> {
    r.layers
        .iter()
        .flat_map(|l| l.positions.iter().map(|p| p.position))
        .filter(|&p| p < r.input.num_tokens)
        .max()
}

/// The first layer at which the answer's first token is the top-1 (rank 1), if it has an answer.
pub fn answer_first_top1_layer(r: &LensResponse) -> Option<usize> {
    r.answer
        .as_ref()?
        .tokens
        .first()?
        .ranks
        .iter()
        .position(|&rank| rank == 1)
}

fn at(layer: &LayerOut, position: usize) -> Option<&PositionOut> {
    layer.positions.iter().find(|p| p.position == position)
}

/// The case's layers, in layer order, read at the probed position.
pub fn layer_points(r: &LensResponse) -> Vec<LayerPoint<'_>> {
    let Some(position) = probed_position(r) else {
        return Vec::new();
    };
    let final_top = r
        .layers
        .iter()
        .find(|l| l.layer == r.num_layers)
        .and_then(|l| at(l, position))
        .and_then(|p| p.top.first())
        .map(|t| t.id);
    let mut points: Vec<LayerPoint> = r
        .layers
        .iter()
        .filter_map(|l| {
            at(l, position).map(|p| LayerPoint {
                layer: l.layer,
                mean_max_prob: l.mean_max_prob,
                at: p,
                agrees: final_top.map(|f| p.top.first().is_some_and(|t| t.id == f)),
            })
        })
        .collect();
    points.sort_by_key(|p| p.layer);
    points
}

pub struct Row {
    pub prompt: String,
    pub layer: usize,
    pub n_images: usize,
    pub mean_max_prob: Option<f64>,
    pub last_top1_prob: Option<f64>,
    pub top1_agreement: Option<f64>,
    pub mean_entropy: Option<f64>,
    pub mean_kl_to_final: Option<f64>,
    pub answer_first_top1_layer: Option<f64>,
}

/// An f32 of a response as the decimal results.jsonl writes for it (its shortest round-trip
/// form), so that the summary is the mean of the numbers a reader of the file sees.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Rows in `prompts` order, layers ascending.
pub fn summarize(cases: &[&Case], prompts: &[String]) -> Vec<Row> {
    let mut rows = Vec::new();
    for prompt in prompts {
        let views: Vec<Vec<LayerPoint>> = cases
            .iter()
            .filter(|c| &c.prompt == prompt)
            .map(|c| layer_points(&c.response))
            .collect();
        let first_top1 = mean(
            cases
                .iter()
                .filter(|c| &c.prompt == prompt)
                .filter_map(|c| answer_first_top1_layer(&c.response))
                .map(|l| l as f64),
        );
        let mut layers: Vec<usize> = views.iter().flatten().map(|p| p.layer).collect();
        layers.sort_unstable();
        layers.dedup();
        for layer in layers {
            let points: Vec<&LayerPoint> = views
                .iter()
                .flatten()
                .filter(|p| p.layer == layer)
                .collect();
            let over =
                |f: &dyn Fn(&LayerPoint) -> Option<f64>| mean(points.iter().filter_map(|p| f(p)));
            rows.push(Row {
                prompt: prompt.clone(),
                layer,
                n_images: points.len(),
                mean_max_prob: over(&|p| p.mean_max_prob.map(decimal)),
                last_top1_prob: over(&|p| p.at.top.first().map(|t| decimal(t.prob))),
                top1_agreement: over(&|p| p.agrees.map(|a| if a { 1.0 } else { 0.0 })),
                mean_entropy: over(&|p| Some(decimal(p.at.entropy))),
                mean_kl_to_final: over(&|p| Some(decimal(p.at.kl_to_final))),
                answer_first_top1_layer: first_top1,
            });
        }
    }
    rows
}

pub const HEADER: [&str; 9] = [
    "prompt",
    "layer",
    "n_images",
    "mean_max_prob",
    "last_top1_prob",
    "top1_agreement",
    "mean_entropy",
    "mean_kl_to_final",
    "answer_first_top1_layer",
];

pub fn write_csv(rows: &[Row], path: &Path) -> Result<()> {
    let err = |e: csv::Error| Error::Internal(format!("cannot write {}: {e}", path.display()));
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(HEADER).map_err(err)?;
    let num = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in rows {
        w.write_record([
            r.prompt.clone(),
            r.layer.to_string(),
            r.n_images.to_string(),
            num(r.mean_max_prob),
            num(r.last_top1_prob),
            num(r.top1_agreement),
            num(r.mean_entropy),
            num(r.mean_kl_to_final),
            num(r.answer_first_top1_layer),
        ])
        .map_err(err)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", path.display())))?;
    super::write_atomically(path, &bytes)
}
