//! JPEG decoded as Pillow decodes it. Pillow (what transformers' processors and the notebook read
//! images with) uses libjpeg-turbo with its defaults: the accurate integer IDCT and "fancy"
//! (triangle-filter) chroma upsampling. The `image` crate's pure-Rust decoder computes both its own
//! way: in 4:2:0 JPEGs, the format of COCO and of most cameras, 2–3 % of pixel values came out up
//! to 3/255 away from Pillow's. This decodes with libjpeg-turbo's own code (mozjpeg's copy, compiled
//! from C by the `mozjpeg-sys` build script; its SIMD code too with the `jpeg-simd` feature, which
//! needs nasm: libjpeg-turbo keeps both bitwise identical), so pixel values equal Pillow's bit for bit
//! (tests/decode_parity.rs).

use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use image::metadata::Orientation;
use image::{DynamicImage, RgbImage};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, JWRN_JPEG_EOF, J_COLOR_SPACE};

use crate::error::{Error, Result};

/// Decodes a JPEG to RGB as Pillow's `Image.open(..).convert("RGB")` does, with the orientation its
/// EXIF block gives, if any (applied by the caller).
pub fn decode(bytes: &[u8]) -> Result<(DynamicImage, Option<Orientation>)> {
    guarded(|| decode_rgb(bytes))
}

/// Width and height from the headers alone (libjpeg reads them: every JPEG Pillow opens,
/// arithmetic-coded ones too), to refuse a decompression bomb before decoding it.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32)> {
    guarded(|| {
        let dec = mozjpeg::Decompress::with_err(error_manager()).from_mem(bytes)?;
        Ok((dec.width() as u32, dec.height() as u32))
    })
}

/// Runs libjpeg, turning its errors (an `io::Error`, or a fatal error unwinding) into ours.
fn guarded<T>(f: impl FnOnce() -> std::io::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(corrupt(&e.to_string())),
        // libjpeg's fatal errors (and a truncated file, below) unwind with their message.
        Err(p) => Err(corrupt(
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg error"),
        )),
    }
}

fn corrupt(why: &str) -> Error {
    Error::InvalidImage(format!(
        "the Jpeg image could not be decoded ({why}); the file may be truncated or corrupt"
    ))
}

fn decode_rgb(bytes: &[u8]) -> std::io::Result<(DynamicImage, Option<Orientation>)> {
    let dec = mozjpeg::Decompress::with_err(error_manager())
        .with_markers(&[mozjpeg::Marker::APP(1)])
        .from_mem(bytes)?;
    // The EXIF block is the APP1 segment that starts "Exif\0\0" (XMP uses APP1 too).
    let orientation = dec
        .markers()
        .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
        .and_then(Orientation::from_exif_chunk);
    let four_channels = matches!(
        dec.color_space(),
        J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK
    );
    let mut started = match four_channels {
        // libjpeg turns YCCK into CMYK itself; Pillow asks for CMYK too.
        true => dec.to_colorspace(J_COLOR_SPACE::JCS_CMYK)?,
        false => dec.rgb()?,
    };
    let (w, h) = (started.width() as u32, started.height() as u32);
    let mut pixels: Vec<u8> = started.read_scanlines()?;
    started.finish()?;
    if four_channels {
        pixels = pixels.chunks_exact(4).flat_map(cmyk_to_rgb).collect();
    }
    let img = RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| std::io::Error::other("the decoder returned too few pixels"))?;
    Ok((DynamicImage::ImageRgb8(img), orientation))
}

/// Pillow's CMYK JPEG to RGB: it reads every CMYK JPEG as inverted ("CMYK;I", Adobe's convention),
/// then converts with `cmyk2rgb` (Convert.c): `nk − nk·c/255` per channel, with `nk = 255 − k` and
/// its rounded division by 255.
fn cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let inv = |v: u8| 255 - v as i32;
    let nk = 255 - inv(px[3]);
    [0, 1, 2].map(|c| (nk - muldiv255(inv(px[c]), nk)).clamp(0, 255) as u8)
}

/// libjpeg's error manager with its fatal errors unwinding (mozjpeg's way: the caller catches
/// them) and one warning fatal too: data ending early. libjpeg would pad the image with grey and
/// go on; Pillow refuses a truncated file ("image file is truncated"), and so does this. Other
/// warnings (corrupt entropy data that libjpeg recovers from) are ignored, as Pillow ignores them.
fn error_manager() -> jpeg_error_mgr {
    // SAFETY: a zeroed jpeg_error_mgr is what libjpeg's jpeg_std_error expects to fill in.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: jpeg_std_error only writes the struct's fields.
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(fatal);
    err.emit_message = Some(message);
    err
}

unsafe extern "C-unwind" fn fatal(cinfo: &mut jpeg_common_struct) {
    // libjpeg's text for the error, e.g. "Bogus marker length" (JMSG_LENGTH_MAX bytes at most).
    let mut text = [0u8; 200];
    // SAFETY: libjpeg passes its own cinfo, whose `err` is the manager above, filled in by
    // jpeg_std_error. Its format_message is C's `void (*)(j_common_ptr, char *)`, writing at most
    // JMSG_LENGTH_MAX bytes, NUL included; the binding declares the buffer as `&[u8; 80]`, so it is
    // called through a pointer type with the same ABI and a buffer of the real size.
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            type Format = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8);
            let format: Format = std::mem::transmute(format);
            format(cinfo, text.as_mut_ptr());
        }
    }
    let len = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let message = String::from_utf8_lossy(&text[..len]).into_owned();
    std::panic::resume_unwind(Box::new(message));
}

unsafe extern "C-unwind" fn message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: as above.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == JWRN_JPEG_EOF as c_int {
        std::panic::resume_unwind(Box::new("the data ends before the image does".to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn libjpeg_errors_come_back_with_libjpegs_words() {
        // Start of image, then a quantisation table whose length field is impossible.
        let e = decode(b"\xFF\xD8\xFF\xDB\x00\x01\x00\x00").unwrap_err();
        assert_eq!(e.code(), "invalid_image");
        assert!(e.to_string().contains("Bogus marker length"), "{e}");
        // Not a JPEG at all.
        let e = decode(b"\x00\x01\x02\x03").unwrap_err();
        assert!(e.to_string().contains("Not a JPEG file"), "{e}");
    }
}
