//! Image decoding and the resampling that vision processors use.
//!
//! Decoding follows what transformers does with a PIL image: EXIF orientation applied, alpha
//! composited onto white and grayscale expanded (`transformers.image_transforms.convert_to_rgb`).
//! Resizing is the antialiased convolution resampler of Pillow and torchvision (bicubic a = -0.5,
//! fixed-point coefficients, a horizontal then a vertical pass rounded to 8 bits).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// An RGB image with 8 bits per channel, row-major, `height × width × 3`.
#[derive(Clone, Debug)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn from_rgb_image(img: RgbImage) -> Self {
        let (width, height) = (img.width() as usize, img.height() as usize);
        Rgb8 {
            width,
            height,
            data: img.into_raw(),
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Formats the service reads. Anything else the `image` crate recognises is refused by name.
const SUPPORTED: &[ImageFormat] = &[
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

/// Reads an image's format and size from its header, without decoding the pixels, so that a
/// decompression bomb can be refused before it is expanded.
pub fn peek_dimensions(bytes: &[u8]) -> Result<(ImageFormat, u32, u32)> {
    let reader = reader_for(bytes)?;
    let format = reader.format().ok_or_else(not_an_image)?;
    if format == ImageFormat::Jpeg {
        let (w, h) = crate::preprocess::jpeg::dimensions(bytes)?;
        return Ok((format, w, h));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| decode_error(format, e))?;
    Ok((format, w, h))
}

fn not_an_image() -> Error {
    Error::InvalidImage(
        "the uploaded file is not a recognisable image; send PNG, JPEG, WebP, GIF, BMP or TIFF"
            .into(),
    )
}

fn decode_error(format: ImageFormat, e: image::ImageError) -> Error {
    match e {
        image::ImageError::Unsupported(u) => Error::UnsupportedImage(format!(
            "this {format:?} image uses a feature that cannot be decoded ({u}); re-save it as PNG or JPEG"
        )),
        other => Error::InvalidImage(format!(
            "the {format:?} image could not be decoded ({other}); the file may be truncated or corrupt"
        )),
    }
}

fn reader_for(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>> {
    if bytes.is_empty() {
        return Err(Error::InvalidImage("the image is empty (0 bytes)".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::InvalidImage(format!("could not read the image: {e}")))?;
    match reader.format() {
        None => Err(not_an_image()),
        Some(f) if !SUPPORTED.contains(&f) => Err(Error::UnsupportedImage(format!(
            "{f:?} images are not supported; send PNG, JPEG, WebP, GIF, BMP or TIFF"
        ))),
        Some(_) => Ok(reader),
    }
}

/// Decodes PNG, JPEG, WebP, GIF (first frame), BMP or TIFF into RGB: EXIF orientation applied,
/// transparency composited onto white, grayscale expanded to three channels.
pub fn decode(bytes: &[u8]) -> Result<Rgb8> {
    let reader = reader_for(bytes)?;
    let format = reader.format().ok_or_else(not_an_image)?;
    let (mut img, orientation) = match format {
        // libjpeg reads the whole file, headers included (src/preprocess/jpeg.rs).
        ImageFormat::Jpeg => crate::preprocess::jpeg::decode(bytes)?,
        _ => {
            let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
            let orientation = decoder.orientation().ok();
            let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
            (img, orientation)
        }
    };
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::InvalidImage(
            "the image has zero width or height".into(),
        ));
    }
    Ok(to_rgb(img))
}

fn to_rgb(img: DynamicImage) -> Rgb8 {
    // Pillow reads 16-bit colour PNGs (RGB, RGBA, grey + alpha) as 8-bit by keeping each sample's
    // high byte; the `image` crate would round (v / 257) and differ by one in a quarter of the
    // values. (16-bit grey alone Pillow reads as "I;16" and clips to 255 when converting to RGB,
    // a nearly white image; that one keeps the `image` crate's rounding.)
    let high_byte = |v: u16| (v >> 8) as u8;
    let img = match img {
        DynamicImage::ImageRgb16(i) => {
            DynamicImage::ImageRgb8(RgbImage::from_fn(i.width(), i.height(), |x, y| {
                image::Rgb(i.get_pixel(x, y).0.map(high_byte))
            }))
        }
        DynamicImage::ImageRgba16(i) => {
            DynamicImage::ImageRgba8(image::RgbaImage::from_fn(i.width(), i.height(), |x, y| {
                image::Rgba(i.get_pixel(x, y).0.map(high_byte))
            }))
        }
        DynamicImage::ImageLumaA16(i) => DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(
            i.width(),
            i.height(),
            |x, y| image::LumaA(i.get_pixel(x, y).0.map(high_byte)),
        )),
        other => other,
    };
    if !img.color().has_alpha() {
        return Rgb8::from_rgb_image(img.to_rgb8());
    }
    // transformers' convert_to_rgb: alpha_composite over an opaque white background.
    let rgba = img.to_rgba8();
    let (w, h) = (rgba.width() as usize, rgba.height() as usize);
    let mut data = Vec::with_capacity(w * h * 3);
    for p in rgba.pixels() {
        let a = p[3] as u32;
        for c in 0..3 {
            // Pillow's alpha_composite with an opaque destination: round(src*a + 255*(255-a)) / 255.
            let v = (p[c] as u32 * a + 255 * (255 - a) + 127) / 255;
            data.push(v as u8);
        }
    }
    Rgb8 {
        width: w,
        height: h,
        data,
    }
}

/// Pillow's bicubic kernel (a = -0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input index and the fixed-point weights, plus the number of
/// fractional bits. Weights are Pillow's (`precompute_coeffs`); the fixed-point precision is
/// torchvision's (`_compute_indices_int16_weights_aa`: the most bits that keep every weight in
/// an int16), which is what transformers 5's image processors run.
fn coefficients(in_size: usize, out_size: usize) -> (Vec<(usize, Vec<i32>)>, u32) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let weights: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w)
        })
        .collect();
    let w_max = weights
        .iter()
        .flat_map(|(_, w)| w.iter().copied())
        .fold(0.0, f64::max);
    let mut bits = 0u32;
    while bits < 22 {
        if (0.5 + w_max * (1u64 << (bits + 1)) as f64) as i64 >= 1 << 15 {
            break;
        }
        bits += 1;
    }
    let one = (1u64 << bits) as f64;
    let fixed = weights
        .into_iter()
        .map(|(xmin, w)| {
            let k = w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect();
    (fixed, bits)
}

fn clip8(acc: i32, bits: u32) -> u8 {
    (acc >> bits).clamp(0, 255) as u8
}

/// Antialiased bicubic resize to `out_w × out_h`: a horizontal then a vertical pass, each
/// rounded to 8 bits, as Pillow's `Image.resize(BICUBIC)` and torchvision's uint8 antialiased
/// resize do. Both sum in i32 with int16 weights (torchvision's precision keeps every weight
/// under 2¹⁵, `coefficients`), and so does this: 255 × the weights' absolute sum stays below 2³¹.
pub fn resize_bicubic(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    resize_with(img, out_w, out_h, use_avx2())
}

fn resize_with(img: &Rgb8, out_w: usize, out_h: usize, avx2: bool) -> Rgb8 {
    let (w, h) = (img.width, img.height);
    match (out_w != w, out_h != h) {
        (false, false) => img.clone(),
        (true, false) => horizontal(&img.data, w, h, out_w, avx2),
        (false, true) => vertical(&img.data, w, h, out_h, avx2),
        (true, true) => {
            let wide = horizontal(&img.data, w, h, out_w, avx2);
            vertical(&wide.data, out_w, h, out_h, avx2)
        }
    }
}

/// A pass's weights: every output index gets the same number of taps, the widest window's
/// rounded up to a multiple of [`LANES`], zero weights padding the others, in one flat int16 array.
/// Windows start where Pillow's do and may reach past the input by the padding: the vertical pass
/// skips zero weights, the horizontal one reads zero-padded planes.
struct Taps {
    starts: Vec<usize>,
    weights: Vec<i16>,
    taps: usize,
    bits: u32,
}

/// The horizontal pass's dot products go [`LANES`] taps at a time.
const LANES: usize = 8;

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Self {
        let (coeffs, bits) = coefficients(in_size, out_size);
        let widest = coeffs.iter().map(|(_, k)| k.len()).max().unwrap_or(0);
        let taps = widest.div_ceil(LANES) * LANES;
        let mut starts = Vec::with_capacity(out_size);
        let mut weights = vec![0i16; out_size * taps];
        for ((xmin, k), w) in coeffs.iter().zip(weights.chunks_exact_mut(taps)) {
            for (dst, &v) in w.iter_mut().zip(k) {
                *dst = v as i16; // |v| < 2^15: `coefficients` picks its precision so.
            }
            starts.push(*xmin);
        }
        Taps {
            starts,
            weights,
            taps,
            bits,
        }
    }

    fn half(&self) -> i32 {
        1 << (self.bits - 1)
    }
}

/// Whether this CPU runs the AVX2 builds of the passes' loops (the passes' `avx2`; false runs the
/// portable ones). The loops are the same code, compiled twice: the default x86-64 target has only
/// SSE2, which lacks a 32-bit integer multiply, so nothing in them vectorises without AVX2.
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The horizontal pass, one rayon task per row.
fn horizontal(src: &[u8], in_w: usize, height: usize, out_w: usize, avx2: bool) -> Rgb8 {
    let t = Taps::new(in_w, out_w);
    let mut data = vec![0u8; height * out_w * 3];
    data.par_chunks_mut(out_w * 3)
        .zip(src.par_chunks(in_w * 3))
        .for_each_init(
            || vec![0u8; (in_w + t.taps) * 3],
            |planes, (out, row)| {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: `use_avx2` detected the feature on this CPU.
                    return unsafe { horizontal_row_avx2(out, row, planes, &t) };
                }
                let _ = avx2;
                horizontal_row(out, row, planes, &t)
            },
        );
    Rgb8 {
        width: out_w,
        height,
        data,
    }
}

/// One row of the horizontal pass. The row is split into its three channel planes first (each
/// followed by `taps` zeros), so that every window is a contiguous dot product, which goes
/// [`LANES`] taps at a time (the compiler vectorises it).
#[inline(always)]
fn horizontal_row(out: &mut [u8], row: &[u8], planes: &mut [u8], t: &Taps) {
    let in_w = row.len() / 3;
    let stride = in_w + t.taps;
    for (i, px) in row.chunks_exact(3).enumerate() {
        planes[i] = px[0];
        planes[stride + i] = px[1];
        planes[2 * stride + i] = px[2];
    }
    for (c, plane) in planes.chunks_exact(stride).enumerate() {
        for (x, (&start, k)) in t
            .starts
            .iter()
            .zip(t.weights.chunks_exact(t.taps))
            .enumerate()
        {
            let window = &plane[start..start + t.taps];
            let mut lanes = [0i32; LANES];
            for (p, w) in window.chunks_exact(LANES).zip(k.chunks_exact(LANES)) {
                for j in 0..LANES {
                    lanes[j] += p[j] as i32 * w[j] as i32;
                }
            }
            out[x * 3 + c] = clip8(t.half() + lanes.iter().sum::<i32>(), t.bits);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_row_avx2(out: &mut [u8], row: &[u8], planes: &mut [u8], t: &Taps) {
    horizontal_row(out, row, planes, t)
}

/// The vertical pass, one rayon task per row.
fn vertical(src: &[u8], width: usize, in_h: usize, out_h: usize, avx2: bool) -> Rgb8 {
    let t = Taps::new(in_h, out_h);
    let stride = width * 3;
    let mut data = vec![0u8; out_h * stride];
    data.par_chunks_mut(stride).enumerate().for_each_init(
        || vec![0i32; stride],
        |acc, (y, out)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `use_avx2` detected the feature on this CPU.
                return unsafe { vertical_row_avx2(out, acc, src, y, &t) };
            }
            let _ = avx2;
            vertical_row(out, acc, src, y, &t)
        },
    );
    Rgb8 {
        width,
        height: out_h,
        data,
    }
}

/// One row of the vertical pass: whole input rows accumulated weight by weight into an i32 row (a
/// loop the compiler vectorises).
#[inline(always)]
fn vertical_row(out: &mut [u8], acc: &mut [i32], src: &[u8], y: usize, t: &Taps) {
    let stride = out.len();
    let start = t.starts[y];
    acc.fill(t.half());
    for (i, &wt) in t.weights[y * t.taps..(y + 1) * t.taps].iter().enumerate() {
        if wt == 0 {
            continue;
        }
        let row = &src[(start + i) * stride..(start + i + 1) * stride];
        for (a, &p) in acc.iter_mut().zip(row) {
            *a += p as i32 * wt as i32;
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = clip8(a, t.bits);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_row_avx2(out: &mut [u8], acc: &mut [i32], src: &[u8], y: usize, t: &Taps) {
    vertical_row(out, acc, src, y, t)
}

/// Per-channel mean and standard deviation.
pub type MeanStd = ([f32; 3], [f32; 3]);

/// The rescale and normalisation settings of an image processor config (`do_rescale`,
/// `rescale_factor`, `do_normalize`, `image_mean`, `image_std`; class defaults: 1/255 and CLIP's).
pub fn normalization(v: &serde_json::Value) -> Result<(Option<f64>, Option<MeanStd>)> {
    use crate::models::snapshot::field;
    let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        Ok(match field::<Vec<f32>>(v, key)? {
            Some(x) if x.len() == 3 => [x[0], x[1], x[2]],
            Some(x) if x.len() == 1 => [x[0]; 3],
            Some(x) => {
                return Err(Error::Internal(format!(
                    "{key} should have 3 values, has {}",
                    x.len()
                )))
            }
            None => default,
        })
    };
    let rescale = match field::<bool>(v, "do_rescale")?.unwrap_or(true) {
        true => Some(field(v, "rescale_factor")?.unwrap_or(1.0 / 255.0)),
        false => None,
    };
    let mean_std = match field::<bool>(v, "do_normalize")?.unwrap_or(true) {
        true => Some((
            triple("image_mean", crate::preprocess::OPENAI_CLIP_MEAN)?,
            triple("image_std", crate::preprocess::OPENAI_CLIP_STD)?,
        )),
        false => None,
    };
    Ok((rescale, mean_std))
}

/// Rescaling and normalisation as transformers 5's torchvision backend does it, fused:
/// `(x − mean/r) / (std/r)` with `r` the rescale factor, computed in f32. The input is 8-bit, so
/// it is a table of 256 values per channel, each computed by that formula.
pub struct Normalize([[f32; 256]; 3]);

impl Normalize {
    pub fn new(rescale: Option<f64>, mean_std: Option<MeanStd>) -> Self {
        let r = rescale.unwrap_or(1.0);
        let (mean, std) = mean_std.unwrap_or(([0.0; 3], [1.0; 3]));
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            let shift = (mean[c] as f64 / r) as f32;
            let scale = (std[c] as f64 / r) as f32;
            for (v, out) in row.iter_mut().enumerate() {
                *out = (v as f32 - shift) / scale;
            }
        }
        Normalize(table)
    }

    /// The normalised value of channel `c`'s 8-bit value `v`.
    #[inline(always)]
    pub fn get(&self, c: usize, v: u8) -> f32 {
        self.0[c][v as usize]
    }
}

/// Channel-first f32 pixels `[3, h, w]`, rescaled and normalised ([`Normalize`]).
pub fn normalize_chw(img: &Rgb8, rescale: Option<f64>, mean_std: Option<MeanStd>) -> Vec<f32> {
    let norm = Normalize::new(rescale, mean_std);
    let n = img.width * img.height;
    let mut out = vec![0f32; 3 * n];
    for (c, plane) in out.chunks_exact_mut(n).enumerate() {
        for (o, px) in plane.iter_mut().zip(img.data.chunks_exact(3)) {
            *o = norm.get(c, px[c]);
        }
    }
    out
}

/// The `(width, height)` window of `img` starting at `(left, top)`; parts outside are black, as
/// torchvision pads before cropping.
pub fn crop(img: &Rgb8, left: i64, top: i64, width: usize, height: usize) -> Rgb8 {
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        let sy = top + y as i64;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..width {
            let sx = left + x as i64;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let (d, s) = (
                (y * width + x) * 3,
                (sy as usize * img.width + sx as usize) * 3,
            );
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Rgb8 {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let img = Rgb8 {
            width: 3,
            height: 2,
            data: (0..18).map(|v| v as u8 * 10).collect(),
        };
        assert_eq!(resize_bicubic(&img, 3, 2).data, img.data);
    }

    #[test]
    fn uniform_image_stays_uniform_under_up_and_downscaling() {
        let img = Rgb8 {
            width: 7,
            height: 5,
            data: [10u8, 200, 77].repeat(35),
        };
        for (w, h) in [(3, 2), (28, 56), (7, 11)] {
            let r = resize_bicubic(&img, w, h);
            assert!(r.data.chunks(3).all(|p| p == [10, 200, 77]), "{w}x{h}");
        }
    }

    /// The AVX2 build of the passes (what x86-64 CPUs run; tests/resize_parity.rs holds it to
    /// torchvision) and the portable one (elsewhere) give the same bytes.
    #[test]
    fn portable_and_avx2_passes_agree() {
        if !use_avx2() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut state = 12345u32;
        let data = (0..61 * 97 * 3)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        let img = Rgb8 {
            width: 61,
            height: 97,
            data,
        };
        for (w, h) in [(300, 200), (5, 3), (64, 97), (61, 33), (1, 1), (60, 98)] {
            let portable = resize_with(&img, w, h, false);
            let avx2 = resize_with(&img, w, h, true);
            assert_eq!(portable.data, avx2.data, "{w}x{h}");
        }
    }

    #[test]
    fn grayscale_and_alpha_become_rgb() {
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 3, image::Luma([90])));
        let rgb = decode(&encode(gray, ImageFormat::Png)).unwrap();
        assert_eq!((rgb.width, rgb.height), (4, 3));
        assert_eq!(rgb.pixel(1, 1), [90, 90, 90]);

        let clear = image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0]));
        let rgb = decode(&encode(DynamicImage::ImageRgba8(clear), ImageFormat::Png)).unwrap();
        assert_eq!(
            rgb.pixel(0, 0),
            [255, 255, 255],
            "transparent pixels composite onto white"
        );
    }

    #[test]
    fn every_supported_format_decodes() {
        let src = DynamicImage::ImageRgb8(RgbImage::from_fn(16, 8, |x, y| {
            image::Rgb([x as u8 * 16, y as u8 * 32, 128])
        }));
        for f in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Gif,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
            ImageFormat::WebP,
        ] {
            let bytes = encode(src.clone(), f);
            let img = decode(&bytes).unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!((img.width, img.height), (16, 8), "{f:?}");
        }
    }

    #[test]
    fn garbage_and_truncated_files_are_clear_errors() {
        let e = decode(b"definitely not an image").unwrap_err();
        assert_eq!(e.code(), "invalid_image");
        let mut png = encode(
            DynamicImage::ImageRgb8(RgbImage::new(32, 32)),
            ImageFormat::Png,
        );
        png.truncate(png.len() / 2);
        assert_eq!(decode(&png).unwrap_err().code(), "invalid_image");
        assert_eq!(decode(&[]).unwrap_err().code(), "invalid_image");
    }

    #[test]
    fn unsupported_formats_are_named() {
        let ico = encode(
            DynamicImage::ImageRgb8(RgbImage::new(16, 16)),
            ImageFormat::Png,
        );
        // A TGA header is recognised by nothing we enable; a QOI magic is recognised by the
        // image crate's format guesser but not enabled here.
        let mut qoi = b"qoif".to_vec();
        qoi.extend_from_slice(&ico);
        let e = decode(&qoi).unwrap_err();
        assert_eq!(e.code(), "unsupported_image_format", "{e}");
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 4x2 JPEG with EXIF orientation 6 (rotate 90° clockwise) must come out 2x4.
        let src = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, image::Rgb([50, 100, 150])));
        let jpeg = encode(src, ImageFormat::Jpeg);
        let with_exif = insert_exif_orientation(&jpeg, 6);
        let img = decode(&with_exif).unwrap();
        assert_eq!((img.width, img.height), (2, 4));
    }

    /// Inserts an APP1 EXIF segment holding only an orientation tag right after the SOI marker.
    fn insert_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"MM\x00\x2a\x00\x00\x00\x08"); // big-endian TIFF header, IFD at 8
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // count
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut payload = b"Exif\x00\x00".to_vec();
        payload.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&jpeg[2..]);
        out
    }
}
