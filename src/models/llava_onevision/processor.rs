//! LLaVA-OneVision's image processor (`LlavaOnevisionImageProcessor`, anyres_max_9) and
//! LLaVA-NeXT's (`LlavaNextImageProcessor`, anyres: the same without the tile budget) for one image
//! per prompt: the best grid resolution from `image_grid_pinpoints`, an aspect-keeping resize and
//! black centred padding to it, tiles of the tower's input size in row-major order, and the whole
//! image resized to one tile in front. Also the processor's count of image tokens.

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::snapshot::field;
use crate::preprocess::image::{crop, normalization, normalize_chw, resize_bicubic, Rgb8};

#[derive(Clone, Debug, PartialEq)]
pub struct AnyResConfig {
    /// Tile size (height, width): the vision tower's input.
    pub size: (usize, usize),
    /// Candidate (height, width) resolutions.
    pub pinpoints: Vec<(usize, usize)>,
    pub rescale: Option<f64>,
    pub mean_std: Option<([f32; 3], [f32; 3])>,
    /// N of `anyres_max_N`: the tile budget for unpadded features (OneVision); None: no budget
    /// (LLaVA-NeXT).
    pub max_num_patches: Option<usize>,
}

pub fn parse_pinpoints(v: Option<&Value>) -> Result<Option<Vec<(usize, usize)>>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let list: Vec<Vec<usize>> = serde_json::from_value(v.clone())
                .map_err(|e| Error::Internal(format!("image_grid_pinpoints: {e}")))?;
            list.into_iter()
                .map(|p| match p.as_slice() {
                    [h, w] if *h > 0 && *w > 0 => Ok((*h, *w)),
                    _ => Err(Error::Internal(format!(
                        "image_grid_pinpoints entry {p:?} is not [height, width]"
                    ))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        }
    }
}

/// anyres_max_N → N.
pub fn max_num_patches(aspect: &str) -> Result<usize> {
    aspect
        .strip_prefix("anyres_max_")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::Internal(format!(
                "vision_aspect_ratio `{aspect}` is not supported (anyres_max_N is)"
            ))
        })
}

impl AnyResConfig {
    pub fn from_json(
        v: &Value,
        model_pinpoints: &[(usize, usize)],
        max_num_patches: Option<usize>,
    ) -> Result<Self> {
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        let h = field(&size, "height")?
            .or(field(&size, "shortest_edge")?)
            .unwrap_or(384);
        let w = field(&size, "width")?
            .or(field(&size, "shortest_edge")?)
            .unwrap_or(384);
        let pinpoints = parse_pinpoints(v.get("image_grid_pinpoints"))?
            .unwrap_or_else(|| model_pinpoints.to_vec());
        if pinpoints != model_pinpoints {
            return Err(Error::Internal(
                "the image processor's image_grid_pinpoints differ from the model config's".into(),
            ));
        }
        let (rescale, mean_std) = normalization(v)?;
        Ok(AnyResConfig {
            size: (h, w),
            pinpoints,
            rescale,
            mean_std,
            max_num_patches,
        })
    }
}

/// transformers' `select_best_resolution`: the candidate keeping the most of the image's pixels
/// after an aspect-preserving downscale, ties broken by the least waste (first wins).
pub fn select_best_resolution(
    height: usize,
    width: usize,
    candidates: &[(usize, usize)],
) -> (usize, usize) {
    let (oh, ow) = (height as f64, width as f64);
    let mut best = candidates[0];
    let (mut max_eff, mut min_waste) = (0i64, i64::MAX);
    for &(h, w) in candidates {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        let (dw, dh) = ((ow * scale) as i64, (oh * scale) as i64);
        let eff = (dw * dh).min((width * height) as i64);
        let waste = (w * h) as i64 - eff;
        if eff > max_eff || (eff == max_eff && waste < min_waste) {
            max_eff = eff;
            min_waste = waste;
            best = (h, w);
        }
    }
    best
}

/// `get_patch_output_size`: the aspect-keeping size that fits `target`.
pub fn patch_output_size(height: usize, width: usize, target: (usize, usize)) -> (usize, usize) {
    let (th, tw) = target;
    let (sw, sh) = (tw as f64 / width as f64, th as f64 / height as f64);
    if sw < sh {
        (((height as f64 * sw).ceil() as usize).min(th), tw)
    } else {
        (th, ((width as f64 * sh).ceil() as usize).min(tw))
    }
}

/// Python's `int(round(x, 7))` for the non-negative values here.
fn int_round7(x: f64) -> usize {
    ((x * 1e7).round_ties_even() / 1e7) as usize
}

/// The unpadded feature grid `(rows, cols)` and the crop applied: `(rows, cols, pad, along_rows)`
/// (transformers' `unpad_image` / `_get_unpadded_features`).
pub fn unpadded_grid(orig: (usize, usize), current: (usize, usize)) -> (usize, usize, usize, bool) {
    let (oh, ow) = (orig.0 as f64, orig.1 as f64);
    let (ch, cw) = current;
    if ow / oh > cw as f64 / ch as f64 {
        let new_h = int_round7(oh * (cw as f64 / ow));
        let pad = (ch.saturating_sub(new_h)) / 2;
        (ch - 2 * pad, cw, pad, true)
    } else {
        let new_w = int_round7(ow * (ch as f64 / oh));
        let pad = (cw.saturating_sub(new_w)) / 2;
        (ch, cw - 2 * pad, pad, false)
    }
}

/// The size after the anyres budget: `(rows, cols)` and whether a bilinear downscale is needed.
pub fn budget_grid(
    rows: usize,
    cols: usize,
    per_side: usize,
    max_num_patches: Option<usize>,
) -> (usize, usize, bool) {
    let Some(max_num_patches) = max_num_patches else {
        return (rows, cols, false);
    };
    let ratio = ((rows * cols) as f64 / (max_num_patches * per_side * per_side) as f64).sqrt();
    if ratio > 1.1 {
        (
            (rows as f64 / ratio).floor() as usize,
            (cols as f64 / ratio).floor() as usize,
            true,
        )
    } else {
        (rows, cols, false)
    }
}

/// Image tokens for an image of `(height, width)`: the base tile, the unpadded (and possibly
/// downscaled) tile grid, and one newline per grid row.
pub fn num_image_tokens(height: usize, width: usize, cfg: &AnyResConfig, per_side: usize) -> usize {
    let best = select_best_resolution(height, width, &cfg.pinpoints);
    let (sh, sw) = (best.0 / cfg.size.0, best.1 / cfg.size.1);
    let (rows, cols, _, _) = unpadded_grid((height, width), (per_side * sh, per_side * sw));
    let (rows, cols, _) = budget_grid(rows, cols, per_side, cfg.max_num_patches);
    per_side * per_side + rows * cols + rows
}

/// `[1 + tiles, 3, S, S]` f32 pixel values and the tile grid `(rows, cols)`.
pub fn preprocess(
    img: &Rgb8,
    cfg: &AnyResConfig,
    device: &Device,
) -> Result<(Tensor, (usize, usize))> {
    let (th, tw) = cfg.size;
    let best = select_best_resolution(img.height, img.width, &cfg.pinpoints);
    let (nh, nw) = patch_output_size(img.height, img.width, best);
    let resized = resize_bicubic(img, nw, nh);
    // Centred black padding (before normalisation): left/top get the smaller half.
    let (left, top) = ((best.1 - nw) / 2, (best.0 - nh) / 2);
    let padded = crop(&resized, -(left as i64), -(top as i64), best.1, best.0);
    let (rows, cols) = (best.0 / th, best.1 / tw);
    let mut tiles = vec![resize_bicubic(img, tw, th)];
    for r in 0..rows {
        for c in 0..cols {
            tiles.push(crop(&padded, (c * tw) as i64, (r * th) as i64, tw, th));
        }
    }
    let mut data = Vec::with_capacity(tiles.len() * 3 * th * tw);
    for t in &tiles {
        data.extend(normalize_chw(t, cfg.rescale, cfg.mean_std));
    }
    Ok((
        Tensor::from_vec(data, (tiles.len(), 3, th, tw), device)?,
        (rows, cols),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> AnyResConfig {
        let pinpoints: Vec<(usize, usize)> = (1..=6)
            .flat_map(|a| (1..=6).map(move |b| (a * 384, b * 384)))
            .collect();
        AnyResConfig {
            size: (384, 384),
            pinpoints,
            rescale: None,
            mean_std: None,
            max_num_patches: Some(9),
        }
    }

    #[test]
    fn token_counts_match_models_md_checks() {
        let c = real();
        assert_eq!(
            select_best_resolution(899, 1024, &c.pinpoints),
            (1152, 1152)
        );
        assert_eq!(num_image_tokens(899, 1024, &c, 27), 6551);
        assert_eq!(num_image_tokens(384, 384, &c, 27), 1485);
    }
}
