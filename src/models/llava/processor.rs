//! The CLIP image processor as the llava-hf checkpoints configure it (`CLIPImageProcessor`,
//! run by transformers 5's torchvision backend): resize the short side, centre crop, normalise.
//! No pad-to-square (the original LLaVA repository pads; the HF checkpoints do not).

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::Result;
use crate::models::snapshot::field;
use crate::preprocess::image::{crop, normalization, normalize_chw, resize_bicubic, Rgb8};

#[derive(Clone, Debug, PartialEq)]
pub enum Resize {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipProcessorConfig {
    pub resize: Option<Resize>,
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    pub mean_std: Option<([f32; 3], [f32; 3])>,
}

impl ClipProcessorConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        let resize = if !field::<bool>(v, "do_resize")?.unwrap_or(true) {
            None
        } else if let Some(s) = field::<usize>(&size, "shortest_edge")? {
            Some(Resize::ShortestEdge(s))
        } else if let (Some(height), Some(width)) =
            (field(&size, "height")?, field(&size, "width")?)
        {
            Some(Resize::Exact { height, width })
        } else if let Some(s) = size.as_u64() {
            Some(Resize::ShortestEdge(s as usize))
        } else {
            Some(Resize::ShortestEdge(224))
        };
        let crop_size = v.get("crop_size").cloned().unwrap_or(Value::Null);
        let crop = if field::<bool>(v, "do_center_crop")?.unwrap_or(true) {
            // `{"height": h, "width": w}`, or one number for both.
            let both = crop_size.as_u64().map(|c| c as usize);
            let h = field(&crop_size, "height")?.or(both).unwrap_or(224);
            let w = field(&crop_size, "width")?.or(both).unwrap_or(224);
            Some((h, w))
        } else {
            None
        };
        let (rescale, mean_std) = normalization(v)?;
        Ok(ClipProcessorConfig {
            resize,
            crop,
            rescale,
            mean_std,
        })
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes
/// `size`, the long side `int(size · long / short)` (truncated).
pub fn shortest_edge_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// transformers 5's `center_crop`: a side shorter than the crop is padded with black (the
/// smaller half first), a longer one is cut at `int((size − crop) / 2)`.
pub fn center_crop_offset(size: usize, crop: usize) -> i64 {
    if crop > size {
        -(((crop - size) / 2) as i64)
    } else {
        ((size - crop) / 2) as i64
    }
}

/// `[1, 3, h, w]` f32 pixel values.
pub fn preprocess(img: &Rgb8, cfg: &ClipProcessorConfig, device: &Device) -> Result<Tensor> {
    let mut img = match cfg.resize {
        Some(Resize::ShortestEdge(s)) => {
            let (h, w) = shortest_edge_size(img.height, img.width, s);
            resize_bicubic(img, w, h)
        }
        Some(Resize::Exact { height, width }) => resize_bicubic(img, width, height),
        None => img.clone(),
    };
    if let Some((ch, cw)) = cfg.crop {
        let (top, left) = (
            center_crop_offset(img.height, ch),
            center_crop_offset(img.width, cw),
        );
        img = crop(&img, left, top, cw, ch);
    }
    let chw = normalize_chw(&img, cfg.rescale, cfg.mean_std);
    Ok(Tensor::from_vec(
        chw,
        (1, 3, img.height, img.width),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_side_resize_truncates_the_long_side() {
        assert_eq!(shortest_edge_size(480, 640, 336), (336, 448));
        assert_eq!(shortest_edge_size(500, 333, 336), (504, 336));
        assert_eq!(shortest_edge_size(1, 1000, 336), (336, 336_000));
    }
}
