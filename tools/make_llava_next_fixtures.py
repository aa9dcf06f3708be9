#!/usr/bin/env python3
"""Make the LLaVA-NeXT test fixtures for logit-lens (tests/llava_next_parity.rs).

The companion of make_llava_fixtures.py (its tokenizer, weight initialisation, reference tensors and images): a
tiny random LLaVA-NeXT in the layout of ``llava-hf/llava-v1.6-mistral-7b-hf``, with a Mistral decoder as that
checkpoint has (the most used llava-v1.6), under tests/fixtures/:

* ``llava_next-hub/``: ``config.json`` as the hub's (``image_grid_pinpoints``, a sparse Mistral ``text_config`` with
  ``sliding_window: null``, a CLIP ``vision_config``), ``preprocessor_config.json`` (``LlavaNextImageProcessor``:
  shortest_edge and crop = the tile size), ``processor_config.json``, ``chat_template.json`` (llava-v1.6-mistral's
  ``[INST] <image>\\n... [/INST]``), the Llama-style tokenizer with ``<image>`` and ``<pad>``, float16 weights under
  the hub names (``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.*``, ``image_newline``) in two shards.
* ``llava_next-tf5/``: transformers 5.24's ``save_pretrained`` of a model built from that config
  (``cls(config)`` + ``load_state_dict``: the 5.17+ layout, tower without ``vision_model.``) and the processor's.
* ``reference/llava_next/<case>.safetensors`` + ``cases.json``: make_llava_fixtures.py's ``reference_case``
  (float32, eager attention, CPU) on the hub copy; the tf5 copy must give the same inputs and bit-identical logits.
* ``reference/llava_next/token_counts.json``: the processor's ``<image>`` count at the real scale (336-px tiles,
  llava-v1.6's pinpoints) for a list of (H, W).

The tower takes 28-px tiles (2 × 2 patches of 14: 4 tokens a tile), with the real pinpoints scaled from 336 to 28
(``[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]``), so that the cases cover the 2 × 1, 1 × 2, 2 × 2 and 3 × 1
grids and unpadding along both axes.

Run from the repository root (deterministic, a few seconds):

    ~/.venvs/tools/bin/python tools/make_llava_next_fixtures.py
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets HF_HUB_OFFLINE)
import make_llava_fixtures as mlf  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import (AutoConfig, AutoProcessor, AutoTokenizer, LlavaNextForConditionalGeneration,  # noqa: E402
                          LlavaNextImageProcessor, LlavaNextProcessor)

SEED = 41
TILE = 28
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, image_size=TILE, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
              patch_size=14, projection_dim=16)
# llava-hf/llava-v1.6-mistral-7b-hf's chat template (written from memory offline: the tests prove that logit-lens
# renders a snapshot's own template as transformers does).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text']"
    " + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ ' ' + content['text'] + '</s> '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
)
CASES = [
    ("landscape_color", "landscape.png", "Color of the main object:"),  # 480x640 -> (28, 56): 1 x 2 tiles
    ("portrait_doing", "portrait.png", "Answer with one word. What is the person doing:"),  # 500x300 -> (56, 28)
    ("square_describe", "square.png", "Describe the image."),  # 28x28 -> (56, 56): 2 x 2 tiles
    ("wide_count", "wide.png", "Count the red objects."),  # 32x44
    ("text_only", None, "The capital of France is"),
]


def write_files(out: Path, tok: Tokenizer) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ids = mlf.write_llama_tokenizer(out, tok)
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["processor_class"] = "LlavaNextProcessor"
    mf.write_json(out / "tokenizer_config.json", tc)
    vocab = mlf.vocab_rows(tok.get_vocab_size())
    cfg = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": PINPOINTS,
        "image_token_index": ids["<image>"],
        "model_type": "llava_next",
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
            "architectures": ["MistralForCausalLM"],
            **TEXT,
            "max_position_embeddings": 32768,
            "model_type": "mistral",
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            # The hub's says bfloat16 (the weights are float16). transformers 5.24 then reloads its own save of
            # it (text_config `dtype: bfloat16`) with bf16-rounded decoder weights even with dtype=float32, so the
            # fixture keeps the weights' real dtype here.
            "torch_dtype": "float16",
            "vocab_size": vocab,
        },
        "torch_dtype": "float16",
        "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": {**VISION, "model_type": "clip_vision_model", "vocab_size": 32000},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
    }
    mf.write_json(out / "config.json", cfg)
    mf.write_json(out / "preprocessor_config.json", {
        "aspect_ratio_setting": "anyres",
        "crop_size": {"height": TILE, "width": TILE},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_grid_pinpoints": PINPOINTS,
        "image_mean": mf.CLIP_MEAN,
        "image_processor_type": "LlavaNextImageProcessor",
        "image_std": mf.CLIP_STD,
        "processor_class": "LlavaNextProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": TILE},
    })
    mf.write_json(out / "processor_config.json", {
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": VISION["patch_size"],
        "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"})
    mf.write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    mf.write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"], "transformers_version": "4.39.0.dev0"})
    return cfg


REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
COUNT_SIZES = [(480, 640), (336, 1008), (500, 300), (1000, 1000), (10, 2000), (640, 480), (899, 1024), (1, 1)]


def token_counts(hub: Path) -> dict:
    """The processor's <image> count at the real scale (llava-v1.6: 336-px tiles, its pinpoints), as
    LlavaNextProcessor expands the placeholder: _get_number_of_features less the class token for the
    "default" feature strategy."""
    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=REAL_PINPOINTS)
    p = LlavaNextProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(str(hub)), patch_size=14,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rows = [{"height": h, "width": w, "num_image_tokens": p._get_number_of_features(h, w, 336, 336) - 1}
            for h, w in COUNT_SIZES]
    return {"settings": {"tile": 336, "patch_size": 14, "image_grid_pinpoints": REAL_PINPOINTS}, "rows": rows}


def main():
    torch.set_grad_enabled(False)
    fixtures = mf.REPO / "tests" / "fixtures"
    hub, tf5, ref_dir = fixtures / "llava_next-hub", fixtures / "llava_next-tf5", fixtures / "reference" / "llava_next"
    for d in (hub, tf5, ref_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    tok = mlf.train_llama_tokenizer()
    write_files(hub, tok)
    config = AutoConfig.from_pretrained(str(hub))
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    mlf.randomize(model, SEED, embed_std=0.5)
    saved = mlf.save_hub_weights(model, hub, tied=False, n_shards=2)
    model = mlf.load_reference_model(LlavaNextForConditionalGeneration, hub)
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved[mlf.hub_name(name, False)].float()), name
    print("config read as:", json.dumps(mlf.describe_config(model.config), default=str))
    processor = AutoProcessor.from_pretrained(str(hub))
    print("processor:", json.dumps(mlf.processor_report(processor)))
    raw_tok = Tokenizer.from_file(str(hub / "tokenizer.json"))
    cases, batches = [], {}
    for name, image_rel, prompt in CASES:
        tensors, meta, case, stats = mlf.reference_case("llava_next", model, processor, raw_tok, name, image_rel,
                                                        prompt, fixtures, check_layout=False)
        mf.save_safetensors(tensors, ref_dir / f"{name}.safetensors", metadata=meta)
        cases.append(case)
        batches[name] = tensors
        print(f"case {name}: tokens {case['num_tokens']}, image tokens {case['num_image_tokens']}, "
              f"pixel_values {case.get('pixel_values_shape')}, gap {case['min_top5_gap_nats']}, {json.dumps(stats)}")
    mf.write_json(ref_dir / "cases.json", cases)
    mf.write_json(ref_dir / "token_counts.json", token_counts(hub))

    fresh = LlavaNextForConditionalGeneration(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.to(torch.float16).save_pretrained(str(tf5))
    processor.save_pretrained(str(tf5))
    with safe_open(str(tf5 / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    print(f"save_pretrained wrote {len(names)} tensors; prefixes "
          f"{sorted({'.'.join(n.split('.')[:2]) for n in names})}")
    tf5_model = mlf.load_reference_model(LlavaNextForConditionalGeneration, tf5)
    tf5_processor = AutoProcessor.from_pretrained(str(tf5))
    for name, image_rel, prompt in CASES:
        image_path = fixtures / "images" / image_rel if image_rel else None
        _, b = mf.make_inputs(tf5_processor, image_path, prompt)
        assert torch.equal(b["input_ids"][0], batches[name]["input_ids"]), name
        if image_rel:
            assert torch.equal(b["pixel_values"].float(), batches[name]["pixel_values"]), name
        assert torch.equal(tf5_model(**b).logits, model(**b).logits), f"{name}: tf5 logits differ"
    print("tf5 fixture: same inputs and logits as the hub fixture for every case")
    for d in (hub, tf5, ref_dir):
        print(f"{d}: {mf.dir_size(d) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
