#!/usr/bin/env python3
"""Make the Qwen3-VL test fixtures for logit-lens (tests/qwen3_vl_parity.rs).

The companion of make_fixtures.py (Qwen2-VL): the same tokenizer, images, cases, weight initialisation and
reference tensors, around transformers' ``Qwen3VLForConditionalGeneration``: a patch-16 vision tower with a
learned position table resampled to each image's grid, tanh-GELU MLPs, DeepStack mergers whose features are
added into the first decoder layers' residual stream at the image positions, and a Qwen3 decoder (per-head q/k
RMSNorm, explicit head_dim) with interleaved M-RoPE. What it writes under tests/fixtures/:

* ``qwen3_vl-hub/``  a tiny random Qwen3-VL in the layout Qwen/Qwen3-VL-2B-Instruct ships (transformers 4.57):
  nested ``text_config`` (``model_type`` ``qwen3_vl_text``, ``rope_scaling`` with ``mrope_section`` and
  ``mrope_interleaved``, ``rope_theta`` beside it) and ``vision_config`` (``model_type`` ``qwen3_vl`` as the hub
  spells it, ``deepstack_visual_indexes``, ``num_position_embeddings``), tied embeddings, bf16 weights under the
  in-memory names (``model.visual.*``, ``model.language_model.*``, no ``lm_head``) in two shards, the processor's
  ``preprocessor_config.json`` (``size`` {``shortest_edge``, ``longest_edge``} in pixels, mean = std = 0.5),
  ``chat_template.json``, the tokenizer files.
* ``qwen3_vl-tf5/``  the same weights as transformers 5.24 ``save_pretrained`` writes them for a model built from
  its config (``cls(config)`` + ``load_state_dict``, ``rope_parameters``), and the processor's own save.
* ``reference/qwen3_vl/<case>.safetensors`` + ``cases.json``: make_fixtures.py's ``reference_case`` on the hub
  copy. The hidden state after block i is the residual stream the next block reads: for the DeepStack blocks
  that is the block's output *plus* the added vision features (transformers' ``output_hidden_states`` records
  the block output before the addition; ``reference_case`` records the sum, from the model's own
  ``_deepstack_process``, and checks that they differ at the image positions only).

The chat template is written here to render as Qwen3-VL-Instruct's does for these messages (no default system
turn, unlike Qwen2-VL). Tiny sizes: text 3 layers of width 64 with head_dim 32 (16 rotary slots, mrope_section
[6, 5, 5] interleaved), vision 3 blocks of width 32, DeepStack from vision blocks [0, 1] into decoder layers 0
and 1, a 6 × 6 learned position table (so it is both up- and down-sampled), pixels 64² to 40·32².

With ``--bench DIR`` it writes only a mid-size random checkpoint in the hub layout for bench/cpu.sh (not
committed): text 8 layers of width 512, the real 151936-token vocabulary, a 4-block vision tower of width 256,
the hub's pixel limits.

Run from the repository root (deterministic, a few seconds):

    ~/.venvs/tools/bin/python tools/make_qwen3_vl_fixtures.py
    ~/.venvs/tools/bin/python tools/make_qwen3_vl_fixtures.py --bench bench/checkpoints/qwen3_vl-mid
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets HF_HUB_OFFLINE)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration  # noqa: E402

SEED = 31
TINY = dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5],
            vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, num_position_embeddings=36,
                        deepstack_visual_indexes=[0, 1]),
            min_pixels=64 * 64, max_pixels=40 * 32 * 32)
BENCH = dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, mrope_section=[12, 10, 10],
             vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=8, num_position_embeddings=2304,
                         deepstack_visual_indexes=[1, 2]),
             min_pixels=65536, max_pixels=16777216)

# Renders as Qwen3-VL-Instruct's template does for system / user / assistant turns with text and images: no
# default system turn, images as <|vision_start|><|image_pad|><|vision_end|> in place.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def hub_config(size: dict, ids: dict) -> dict:
    v = size["vision"]
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "dtype": "bfloat16",
        "eos_token_id": ids["<|im_end|>"], "head_dim": size["head_dim"], "hidden_act": "silu",
        "hidden_size": size["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": size["intermediate_size"], "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": size["num_attention_heads"],
        "num_hidden_layers": size["num_hidden_layers"], "num_key_value_heads": size["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": size["mrope_section"], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": size["vocab_size"],
    }
    vision = {
        "deepstack_visual_indexes": v["deepstack_visual_indexes"], "depth": v["depth"],
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": v["hidden_size"], "in_channels": 3,
        "initializer_range": 0.02, "intermediate_size": v["intermediate_size"], "model_type": "qwen3_vl",
        "num_heads": v["num_heads"], "num_position_embeddings": v["num_position_embeddings"],
        "out_hidden_size": size["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl", "text_config": text, "tie_word_embeddings": True,
        "transformers_version": "4.57.0.dev0", "video_token_id": ids["<|video_pad|>"],
        "vision_end_token_id": ids["<|vision_end|>"], "vision_start_token_id": ids["<|vision_start|>"],
        "vision_config": vision,
    }


def preprocessor_config(size: dict) -> dict:
    return {
        "size": {"longest_edge": size["max_pixels"], "shortest_edge": size["min_pixels"]},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
    }


def load_reference_model(path: Path):
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {path}: {bad}"
    return model.eval()


def save_weights(model, out: Path):
    """bf16 shards under the in-memory names (the hub's Qwen3-VL names), tied: no lm_head."""
    orig = mf.hub_name
    mf.hub_name = lambda n: None if n == "lm_head.weight" else n
    try:
        return mf.save_hub_weights(model, out)
    finally:
        mf.hub_name = orig


def write_hub(out: Path, sizes: dict, seed: int, embed_std: float):
    """The hub layout with random weights; returns (config, model, weight names)."""
    tok = mf.train_tokenizer()
    ids = mf.write_tokenizer(out, tok)
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["chat_template"] = CHAT_TEMPLATE
    mf.write_json(out / "tokenizer_config.json", tc)
    size = dict(sizes, vocab_size=sizes.get("vocab_size") or (tok.get_vocab_size() // 64 + 1) * 64)
    mf.write_json(out / "config.json", hub_config(size, ids))
    mf.write_json(out / "preprocessor_config.json", preprocessor_config(size))
    mf.write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    mf.write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "temperature": 0.7, "top_k": 20,
        "top_p": 0.8, "transformers_version": "4.56.0"})
    config = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    mf.randomize(model, seed, embed_std=embed_std)
    return config, model, save_weights(model, out)


def make_bench(out: Path):
    torch.set_grad_enabled(False)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_hub(out, BENCH, SEED + 1, embed_std=0.15)
    print(f"{out}: {mf.dir_size(out) / 2**20:.0f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, help="write a mid-size checkpoint there instead of the fixtures")
    a = ap.parse_args()
    if a.bench:
        make_bench(a.bench)
        return
    torch.set_grad_enabled(False)
    fixtures = mf.REPO / "tests" / "fixtures"
    hub_dir, tf5_dir = fixtures / "qwen3_vl-hub", fixtures / "qwen3_vl-tf5"
    ref_dir = fixtures / "reference" / "qwen3_vl"
    for d in (hub_dir, tf5_dir, ref_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    config, model, hub_names = write_hub(hub_dir, TINY, SEED, embed_std=0.5)
    print("text config read as:", {k: getattr(config.text_config, k, None) for k in (
        "head_dim", "rope_parameters", "tie_word_embeddings")})
    print("vision config read as:", {k: getattr(config.vision_config, k, None) for k in (
        "depth", "hidden_size", "hidden_act", "num_position_embeddings", "deepstack_visual_indexes",
        "rope_parameters")})
    model = load_reference_model(hub_dir)
    processor = AutoProcessor.from_pretrained(str(hub_dir))
    on_disk = {}
    for f in sorted(hub_dir.glob("model-*.safetensors")):
        on_disk.update(load_file(str(f)))
    for name, t in model.state_dict().items():
        src = on_disk[name] if name != "lm_head.weight" else on_disk["model.language_model.embed_tokens.weight"]
        assert torch.equal(t, src.float()), name

    raw_tok = Tokenizer.from_file(str(hub_dir / "tokenizer.json"))
    cases, batches = [], {}
    for name, image_rel, prompt in mf.CASES:
        tensors, meta, case, stats, batch = mf.reference_case(model, processor, name, image_rel, prompt, fixtures)
        text = case["rendered_prompt"]
        assert not text.startswith("<|im_start|>system"), "Qwen3-VL has no default system turn"
        assert processor.tokenizer(text)["input_ids"] == raw_tok.encode(text).ids, name
        mf.save_safetensors(tensors, ref_dir / f"{name}.safetensors", metadata=meta)
        cases.append(case)
        batches[name] = batch
        print(f"case {name}: tokens {case['num_tokens']}, image tokens {case['num_image_tokens']}, "
              f"grid {case['image_grid_thw']}, {json.dumps(stats)}")
    mf.write_json(ref_dir / "cases.json", cases)

    mf.save_tf5_and_check(Qwen3VLForConditionalGeneration, config, model, processor, tf5_dir, hub_names, batches, load_reference_model)
    for d in (hub_dir, tf5_dir, ref_dir):
        print(f"{d}: {mf.dir_size(d) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
