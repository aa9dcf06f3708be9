//! JPEG decoding against Pillow (what transformers' processors and the notebook read images with),
//! bit for bit, for the kinds of JPEG researchers send: baseline 4:2:0 (COCO, cameras), 4:2:2,
//! 4:4:4, progressive, optimised Huffman tables, restart markers, grayscale, CMYK; a truncated file is
//! refused, as Pillow refuses it. References: tools/make_jpeg_reference.py.
use std::path::Path;

use logit_lens::preprocess::image::decode;

const DIR: &str = "tests/fixtures/reference/jpeg";

fn read(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(DIR).join(name)).unwrap()
}

#[test]
fn jpeg_pixels_equal_pillows_bit_for_bit() {
    let meta: serde_json::Value = serde_json::from_slice(&read("cases.json")).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let ours = decode(&read(&format!("{name}.jpg"))).unwrap();
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
