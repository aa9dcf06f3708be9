//! Image decoding against Pillow (what transformers' processors and the notebook read images
//! with), bit for bit: the kinds of JPEG researchers send (baseline 4:2:0 as COCO and cameras write
//! them, 4:2:2, 4:4:4, progressive, optimised Huffman tables, restart markers, grayscale, CMYK,
//! arithmetic-coded, an EXIF orientation applied as transformers' `load_image` applies it),
//! lossy and lossless WebP, GIF, LZW TIFF; PNGs with transparency composited onto white as
//! transformers' `convert_to_rgb` does, and 16-bit colour PNGs read as Pillow reads them (high
//! byte); a truncated JPEG is refused, as Pillow refuses it.
//! References: tools/make_decode_reference.py.
use std::path::Path;

use logit_lens::preprocess::image::decode;

const DIR: &str = "tests/fixtures/reference/decode";

fn read(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(DIR).join(name)).unwrap()
}

#[test]
fn decoded_pixels_equal_pillows_bit_for_bit() {
    let meta: serde_json::Value = serde_json::from_slice(&read("cases.json")).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 21);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let ours = decode(&read(case["file"].as_str().unwrap())).unwrap();
        // Pillow's pixels, stored losslessly.
        let pil = decode(&read(&format!("{name}.pil.png"))).unwrap();
        assert_eq!((ours.width, ours.height), (pil.width, pil.height), "{name}");
        let differ = ours
            .data
            .iter()
            .zip(&pil.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} values differ from Pillow's",
            ours.data.len()
        );
    }
}

#[test]
fn a_truncated_jpeg_is_refused_as_pillow_refuses_it() {
    let e = decode(&read("truncated.jpg")).unwrap_err();
    assert_eq!(e.code(), "invalid_image");
    assert!(e.to_string().contains("truncated"), "{e}");
}
