#!/usr/bin/env python3
"""Make the Qwen2.5-VL test fixtures for logit-lens (tests/qwen2_5_vl_parity.rs).

The companion of make_fixtures.py (Qwen2-VL): the same tokenizer, chat template (Qwen2.5-VL-Instruct ships
Qwen2-VL's), images, cases, weight initialisation and reference tensors. What it writes under tests/fixtures/:

* ``qwen2_5_vl-hub/``  a tiny random Qwen2.5-VL in the hub's layout, as Qwen/Qwen2.5-VL-7B-Instruct ships it:
  a flat ``config.json`` (text fields at the top level, ``rope_scaling {"type": "mrope"}``) whose
  ``vision_config`` has Qwen2.5-VL's fields (``hidden_size`` = the tower's width, ``intermediate_size``,
  ``out_hidden_size``, ``window_size``, ``fullatt_block_indexes``, ``tokens_per_second``), bf16 weights under the
  hub names (``visual.*``, ``model.*``, tied: no ``lm_head``) in two shards, ``preprocessor_config.json``,
  ``chat_template.json``, the tokenizer files.
* ``qwen2_5_vl-tf5/``  the same weights as transformers 5.24 ``save_pretrained`` writes them for a model built
  from its config (``cls(config)`` + ``load_state_dict``), and the processor's ``save_pretrained``: nothing
  rewritten.
* ``reference/qwen2_5_vl/<case>.safetensors`` + ``cases.json``: make_fixtures.py's ``reference_case`` on the hub
  copy (input ids, pixel values, M-RoPE position ids, every hidden state, the lens); the tf5 copy must give the
  same inputs and bit-identical logits.

The tower is 3 blocks, the middle one with full attention (``fullatt_block_indexes [1]``), window 112 px = 4
merged tokens a side, so that the cases cover several windows with partial edges (landscape: 5 × 7 merged
tokens → windows of 16, 12, 4 and 3), windows of one size (portrait: 8 × 4 → 16, 16) and one window holding the
whole image (tiny: 3 × 2).

With ``--bench DIR`` it writes only a mid-size random checkpoint in the hub layout for bench/cpu.sh (not
committed): make_fixtures.py's ``BENCH`` sizes (text 8 layers, width 512, the real 151936-token vocabulary, the
hub's real pixel limits), a vision tower of 4 blocks of width 256 with window attention (full attention in block 3).

Run from the repository root (deterministic, a few seconds):

    ~/.venvs/tools/bin/python tools/make_qwen2_5_vl_fixtures.py
    ~/.venvs/tools/bin/python tools/make_qwen2_5_vl_fixtures.py --bench bench/checkpoints/qwen2_5_vl-mid
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
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: E402

SEED = 25
BENCH = dict(mf.BENCH, vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=8, window_size=112,
                                   fullatt_block_indexes=[3]))
TINY = dict(mf.TINY, vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, window_size=112,
                                 fullatt_block_indexes=[1]))


def hub_config(size: dict, ids: dict) -> dict:
    v = size["vision"]
    cfg = mf.hub_config(dict(size, vision=dict(v, embed_dim=v["hidden_size"])), ids)
    cfg.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
               transformers_version="4.49.0.dev0")
    cfg["vision_config"] = {
        "depth": v["depth"], "hidden_act": "silu", "hidden_size": v["hidden_size"],
        "intermediate_size": v["intermediate_size"], "num_heads": v["num_heads"], "in_chans": 3,
        "out_hidden_size": size["hidden_size"], "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": v["window_size"], "fullatt_block_indexes": v["fullatt_block_indexes"],
        "tokens_per_second": 2, "temporal_patch_size": 2,
    }
    return dict(sorted(cfg.items()))


def load_reference_model(path: Path):
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {path}: {bad}"
    return model.eval()


def write_hub(out: Path, sizes: dict, seed: int, embed_std: float):
    """The hub layout with random weights; returns the model."""
    tok = mf.train_tokenizer()
    ids = mf.write_tokenizer(out, tok)
    size = dict(sizes, vocab_size=sizes.get("vocab_size") or (tok.get_vocab_size() // 64 + 1) * 64)
    mf.write_json(out / "config.json", hub_config(size, ids))
    mf.write_json(out / "preprocessor_config.json",
                  dict(mf.preprocessor_config(size), processor_class="Qwen2_5_VLProcessor"))
    mf.write_json(out / "chat_template.json", {"chat_template": mf.CHAT_TEMPLATE})
    mf.write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "repetition_penalty": 1.05,
        "temperature": 0.1, "top_p": 0.001, "top_k": 1, "transformers_version": "4.49.0.dev0"})
    config = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    mf.randomize(model, seed, embed_std=embed_std)
    return config, model, mf.save_hub_weights(model, out)


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
    hub_dir, tf5_dir = fixtures / "qwen2_5_vl-hub", fixtures / "qwen2_5_vl-tf5"
    ref_dir = fixtures / "reference" / "qwen2_5_vl"
    for d in (hub_dir, tf5_dir, ref_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    config, model, hub_names = write_hub(hub_dir, TINY, SEED, embed_std=0.5)
    v = config.vision_config
    print("vision config read as:", {k: getattr(v, k, None) for k in (
        "depth", "hidden_size", "intermediate_size", "out_hidden_size", "num_heads", "window_size",
        "fullatt_block_indexes", "hidden_act", "rope_parameters")})
    model = load_reference_model(hub_dir)
    processor = AutoProcessor.from_pretrained(str(hub_dir))
    on_disk = {}
    for f in sorted(hub_dir.glob("model-*.safetensors")):
        on_disk.update(load_file(str(f)))
    for name, t in model.state_dict().items():
        hn = mf.hub_name(name)
        assert torch.equal(t, (on_disk[hn] if hn else on_disk["model.embed_tokens.weight"]).float()), name

    raw_tok = Tokenizer.from_file(str(hub_dir / "tokenizer.json"))
    cases, batches = [], {}
    for name, image_rel, prompt in mf.CASES:
        tensors, meta, case, stats, batch = mf.reference_case(model, processor, name, image_rel, prompt, fixtures)
        text = case["rendered_prompt"]
        assert processor.tokenizer(text)["input_ids"] == raw_tok.encode(text).ids, name
        mf.save_safetensors(tensors, ref_dir / f"{name}.safetensors", metadata=meta)
        cases.append(case)
        batches[name] = batch
        print(f"case {name}: tokens {case['num_tokens']}, image tokens {case['num_image_tokens']}, "
              f"grid {case['image_grid_thw']}, {json.dumps(stats)}")
    mf.write_json(ref_dir / "cases.json", cases)

    mf.save_tf5_and_check(Qwen2_5_VLForConditionalGeneration, config, model, processor, tf5_dir, hub_names, batches, load_reference_model)
    for d in (hub_dir, tf5_dir, ref_dir):
        print(f"{d}: {mf.dir_size(d) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
