#!/usr/bin/env python3
"""References for ``generate`` (tests/generate_parity.rs): transformers' own greedy ``generate`` on the committed
fixtures of every family, float32, eager attention, CPU.

For each fixture below, its family's first image case (VLMs) and its text-only case (same prompts as that family's
``cases.json``), ``model.generate(..., max_new_tokens=6, do_sample=False)`` with a plain greedy generation config (the
snapshot's ``eos_token_id``, none of its sampling or penalty settings) and ``output_hidden_states=True``; written to
``tests/fixtures/reference/generate/<fixture>__<case>.safetensors``:

* ``input_ids`` [S], ``new_ids`` [n] (int64): the prompt and the generated tokens (an end token included, as
  transformers returns it);
* ``step_logprobs`` [n, L+1, V]: at step i, the position that emitted token i (the prompt's last position, then each
  generated token's) read through the lens from transformers' hidden states at that step:
  ``log_softmax(lm_head(norm(h_l)))`` for l < L and ``log_softmax(lm_head(h_L))`` for the last (already normed),
  the logits soft-capped first where the model caps them (Gemma 2's ``final_logit_softcapping``);
* ``stopped_on_eos`` (int64 [1]).

and ``cases.json``, one entry per file. Run from the repository root (deterministic, ~20 s):

    ~/.venvs/tools/bin/python tools/make_generate_references.py
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets HF_HUB_OFFLINE)

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, AutoTokenizer, GenerationConfig  # noqa: E402

MAX_NEW = 6
# fixture -> the reference family whose cases.json holds its prompts
FIXTURES = {
    "qwen2vl-hub": "qwen2vl",
    "qwen2_5_vl-hub": "qwen2_5_vl",
    "qwen3_vl-hub": "qwen3_vl",
    "llava15-hub": "llava15",
    "llava_next-hub": "llava_next",
    "onevision-hub": "onevision",
    "llama3-hub": "llama3",
    "mistral-hub": "mistral",
    "qwen2-hub": "qwen2",
    "qwen3-hub": "qwen3",
    "gemma2-hub": "gemma2",
    "gemma3-hub": "gemma3",
}


def inputs_for(path: Path, case: dict):
    """The prompt through the snapshot's processor (VLMs) or tokenizer chat template (text-only)."""
    config = json.loads((path / "config.json").read_text())
    if "vision_config" in config:
        processor = AutoProcessor.from_pretrained(str(path))
        image = Image.open(mf.REPO / "tests" / "fixtures" / case["image"]).convert("RGB") if case["image"] else None
        _, batch = mf.make_inputs(processor, mf.REPO / "tests" / "fixtures" / case["image"] if case["image"] else None,
                                  case["prompt"])
        del image
        return batch, processor.tokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    batch = tok.apply_chat_template([{"role": "user", "content": case["prompt"]}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    return batch, tok


@torch.no_grad()
def reference(path: Path, case: dict):
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    batch, tok = inputs_for(path, case)
    eos = model.generation_config.eos_token_id
    # Replaced, not passed beside it: transformers fills a passed config's unset fields from the snapshot's
    # (Qwen2.5-VL's repetition_penalty 1.05 would otherwise apply).
    model.generation_config = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                                               pad_token_id=eos[0] if isinstance(eos, list) else eos,
                                               output_hidden_states=True, return_dict_in_generate=True)
    out = model.generate(**batch)
    prompt_len = batch["input_ids"].shape[1]
    new_ids = out.sequences[0, prompt_len:]
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    steps = []
    for step_hidden in out.hidden_states:  # per step: L+1 tensors [1, s, H], the last normed
        hs = torch.stack([h[0, -1] for h in step_hidden])  # [L+1, H]
        L = hs.shape[0] - 1
        logits = torch.cat([model.lm_head(lm.norm(hs[:L])), model.lm_head(hs[L:])])
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is not None:  # the model's read-out caps its logits (Gemma 2): so does the lens
            logits = torch.tanh(logits / cap) * cap
        steps.append(torch.log_softmax(logits.float(), dim=-1))
    step_logprobs = torch.stack(steps)  # [n, L+1, V]
    assert step_logprobs.shape[0] == new_ids.shape[0]
    # greedy: the last layer's argmax is the emitted token
    assert torch.equal(step_logprobs[:, -1].argmax(-1), new_ids), "not greedy"
    stop = set(eos if isinstance(eos, list) else [eos])
    stopped = int(new_ids[-1].item() in stop)
    tensors = {"input_ids": batch["input_ids"][0].to(torch.int64), "new_ids": new_ids.to(torch.int64),
               "step_logprobs": step_logprobs.contiguous(),
               "stopped_on_eos": torch.tensor([stopped], dtype=torch.int64)}
    text = tok.decode(new_ids, skip_special_tokens=True)
    return tensors, text


def main():
    torch.set_grad_enabled(False)
    fixtures = mf.REPO / "tests" / "fixtures"
    out_dir = fixtures / "reference" / "generate"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    entries = []
    for fixture, family in FIXTURES.items():
        cases = json.loads((fixtures / "reference" / family / "cases.json").read_text())
        chosen = [c for c in cases if c.get("image")][:1] + [c for c in cases if not c.get("image")][:1]
        for case in chosen:
            tensors, text = reference(fixtures / fixture, case)
            name = f"{fixture}__{case['name']}"
            mf.save_safetensors(tensors, out_dir / f"{name}.safetensors",
                                metadata={"prompt": case["prompt"], "image": case["image"] or "", **mf.versions()})
            entries.append({"file": name, "fixture": fixture, "image": case["image"], "prompt": case["prompt"],
                            "new_ids": tensors["new_ids"].tolist(), "text": text,
                            "stopped_on_eos": bool(tensors["stopped_on_eos"].item())})
            print(f"{name}: {tensors['new_ids'].tolist()} {text!r} eos={bool(tensors['stopped_on_eos'].item())}")
    mf.write_json(out_dir / "cases.json", entries)
    print(f"{out_dir}: {mf.dir_size(out_dir) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
