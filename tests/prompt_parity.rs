//! Awkward prompts (spaces, tabs, newlines, Unicode in both normal forms, emoji, CJK, template
//! syntax, the models' special tokens typed as text) give transformers' input ids exactly, for each
//! family, with the chat template (with and without an image) and verbatim. References:
//! tools/make_prompt_reference.py.
use candle_core::{DType, Device};
use logit_lens::preprocess::image::decode;

#[test]
fn awkward_prompts_tokenize_as_transformers_does() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read("tests/fixtures/reference/prompts.json").unwrap())
            .unwrap();
    let image_path = format!("tests/fixtures/{}", reference["image"].as_str().unwrap());
    let image = decode(&std::fs::read(image_path).unwrap()).unwrap();
    let models = reference["models"].as_object().unwrap();
    assert_eq!(models.len(), 3);
    let mut checked = 0;
    for (dir, cases) in models {
        let model = logit_lens::models::load(
            format!("tests/fixtures/{dir}").as_ref(),
            dir,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        for case in cases.as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let chat_template = case["chat_template"].as_bool().unwrap();
            let with_image = case["image"].as_bool().unwrap();
            let expected: Vec<u32> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let prepared = model
                .prepare(prompt, with_image.then_some(&image), chat_template)
                .unwrap_or_else(|e| panic!("{dir} {prompt:?}: {e}"));
            assert_eq!(
                prepared.input_ids, expected,
                "{dir}, {prompt:?}, chat template {chat_template}, image {with_image}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 36);
}
