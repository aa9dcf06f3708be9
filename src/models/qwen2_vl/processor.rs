//! Qwen2-VL's image processor (`Qwen2VLImageProcessor`): smart_resize to a multiple of
//! patch·merge pixels within [min_pixels, max_pixels], antialiased bicubic resize, CLIP
//! normalisation, and the merge-block-major patch layout the vision tower expects.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::snapshot::{field, Snapshot};
use crate::preprocess::image::{normalization, resize_bicubic, MeanStd, Normalize, Rgb8};

#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub rescale: Option<f64>,
    pub mean_std: Option<MeanStd>,
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json` (hub) or the `image_processor` entry of
    /// `processor_config.json` (transformers 5), where the pixel counts live under `size`
    /// (`shortest_edge` = min_pixels, `longest_edge` = max_pixels, despite the names).
    pub fn from_snapshot(s: &Snapshot) -> Result<Self> {
        let v = s.image_processor_config()?;
        Self::from_json(&v).map_err(|e| s.err(format!("image processor config: {e}")))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        let min_pixels = field(v, "min_pixels")?
            .or(field(&size, "shortest_edge")?)
            .or(field(&size, "min_pixels")?)
            .unwrap_or(56 * 56);
        let max_pixels = field(v, "max_pixels")?
            .or(field(&size, "longest_edge")?)
            .or(field(&size, "max_pixels")?)
            .unwrap_or(28 * 28 * 1280);
        let (rescale, mean_std) = normalization(v)?;
        Ok(ImageProcessorConfig {
            min_pixels,
            max_pixels,
            patch_size: field(v, "patch_size")?.unwrap_or(14),
            temporal_patch_size: field(v, "temporal_patch_size")?.unwrap_or(2),
            merge_size: field(v, "merge_size")?.unwrap_or(2),
            rescale,
            mean_std,
        })
    }

    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// transformers' `smart_resize`: the (height, width) closest to the input's, both multiples of
/// `factor`, with the pixel count in `[min_pixels, max_pixels]`. Python's `round` rounds half to
/// even, hence `round_ties_even`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::ImageNotAccepted(format!(
            "the image is {width}×{height}: its aspect ratio {:.0} is over the model's limit of 200; crop or pad it",
            h.max(w) / h.min(w)
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// The processed image: `pixel_values` `[grid_t·grid_h·grid_w, C·T·P·P]` (f32) and its grid in
/// patch units (before merging).
pub struct ProcessedImage {
    pub pixel_values: Tensor,
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    /// Tokens the image occupies in the sequence after the merger.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.grid_thw.iter().product::<usize>() / (merge_size * merge_size)
    }
}

pub fn preprocess(
    img: &Rgb8,
    cfg: &ImageProcessorConfig,
    device: &Device,
) -> Result<ProcessedImage> {
    let (rh, rw) = smart_resize(
        img.height,
        img.width,
        cfg.factor(),
        cfg.min_pixels,
        cfg.max_pixels,
    )?;
    let resized = resize_bicubic(img, rw, rh);
    let norm = Normalize::new(cfg.rescale, cfg.mean_std);
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (rh / p, rw / p);
    let row_len = 3 * t * p * p;
    let mut data = vec![0f32; gh * gw * row_len];
    // One row per patch, merge-block-major: (block row, block column, row in block, column in
    // block). Each row is `[channel, temporal, py, px]`; a still image is repeated over the
    // temporal patch axis.
    data.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, out)| {
            let (block, j) = (row / m, row % m);
            let (block, i) = (block / m, block % m);
            let (bh, bw) = (block / (gw / m), block % (gw / m));
            let (py0, px0) = ((bh * m + i) * p, (bw * m + j) * p);
            for (c, channel) in out.chunks_exact_mut(t * p * p).enumerate() {
                let (first, rest) = channel.split_at_mut(p * p);
                for (py, line) in first.chunks_exact_mut(p).enumerate() {
                    let start = ((py0 + py) * rw + px0) * 3;
                    let pixels = &resized.data[start..start + p * 3];
                    for (o, px) in line.iter_mut().zip(pixels.chunks_exact(3)) {
                        *o = norm.get(c, px[c]);
                    }
                }
                for copy in rest.chunks_exact_mut(p * p) {
                    copy.copy_from_slice(first);
                }
            }
        });
    Ok(ProcessedImage {
        pixel_values: Tensor::from_vec(data, (gh * gw, row_len), device)?,
        grid_thw: [1, gh, gw],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_models_md_worked_examples() {
        let (min, max) = (3136, 12_845_056);
        assert_eq!(smart_resize(480, 640, 28, min, max).unwrap(), (476, 644));
        assert_eq!(smart_resize(448, 448, 28, min, max).unwrap(), (448, 448));
        // 406/28 = 14.5 rounds half to even: 14 · 28 = 392, not 420.
        assert_eq!(smart_resize(406, 406, 28, min, max).unwrap(), (392, 392));
    }

    #[test]
    fn tiny_images_are_upscaled_to_min_pixels() {
        assert_eq!(smart_resize(1, 1, 28, 3136, 12_845_056).unwrap(), (56, 56));
    }

    #[test]
    fn elongated_images_are_refused_with_the_ratio() {
        let e = smart_resize(1, 10_000, 28, 3136, 12_845_056).unwrap_err();
        assert_eq!(e.code(), "image_not_accepted");
        assert!(e.to_string().contains("200"), "{e}");
    }

    #[test]
    fn v5_size_keys_are_pixel_counts() {
        let c = ImageProcessorConfig::from_json(&serde_json::json!({
            "size": {"shortest_edge": 3136, "longest_edge": 31360}, "patch_size": 14, "merge_size": 2
        }))
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 31360));
    }
}
