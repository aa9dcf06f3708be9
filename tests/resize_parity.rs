//! The image resize against torchvision's uint8 antialiased bicubic resize (what transformers 5's
//! image processors run), bit for bit, at sizes that stress the resampler: upscaling, near-identity,
//! one axis only, and downscaling by up to ×140. References: tools/make_resize_reference.py.
use std::path::Path;

use logit_lens::preprocess::image::{decode, resize_bicubic};

const DIR: &str = "tests/fixtures/reference/resize";

#[test]
fn resize_equals_torchvision_bit_for_bit() {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(DIR).join("cases.json")).unwrap()).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let read = |suffix: &str| {
            decode(&std::fs::read(Path::new(DIR).join(format!("{name}.{suffix}.png"))).unwrap())
                .unwrap()
        };
        let (input, expected) = (read("in"), read("out"));
        let size = |key: &str| {
            let v = case[key].as_array().unwrap();
            (
                v[0].as_u64().unwrap() as usize,
                v[1].as_u64().unwrap() as usize,
            )
        };
        assert_eq!((input.width, input.height), size("in"), "{name}");
        let (w, h) = size("out");
        let ours = resize_bicubic(&input, w, h);
        assert_eq!((ours.width, ours.height), (w, h), "{name}");
        let differ = ours
            .data
            .iter()
            .zip(&expected.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} values differ from torchvision",
            ours.data.len()
        );
    }
}
