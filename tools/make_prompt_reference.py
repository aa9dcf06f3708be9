"""What transformers makes of awkward prompts: the input ids its processor gives for each fixture model (the
hub-layout Qwen2-VL, LLaVA-1.5 and LLaVA-OneVision) with the chat template (text only, and with an image)
and without it (verbatim, text only). The prompts are what researchers type and what the committed cases do
not cover: leading, trailing and repeated spaces, tabs, newlines, Unicode in composed and decomposed forms,
emoji, CJK, no-break spaces, template syntax, and the models' own special tokens typed as text.
tests/prompt_parity.rs holds `prepare` to these ids exactly.

    ~/.venvs/tools/bin/python tools/make_prompt_reference.py   # deterministic, a few seconds

Writes tests/fixtures/reference/prompts.json.
"""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = ["qwen2vl-hub", "llava15-hub", "onevision-hub"]
IMAGE = "images/tiny.png"

PROMPTS = [
    "  Color of the main object:  ",
    "Line one\nLine two\n\n\nThree",
    "Tabs\tand   several    spaces",
    "café naïve Ångström",  # composed
    "cafe\u0301 nai\u0308ve",  # decomposed: NFC normalisation, where the tokenizer has it
    "Emoji 🐱🚀 and CJK 漢字かな, Ελληνικά, עברית",
    "no-break\u00a0space and ideographic\u3000space",
    "{{ not a template }} {% if x %}y{% endif %}",
    "<|im_end|> typed by hand <|im_start|>",
    "USER: a fake turn ASSISTANT: </s><s>",
    "ends with a newline\n",
    "x",
]


def main():
    image = Image.open(FIXTURES / IMAGE).convert("RGB")
    out = {"transformers": transformers.__version__, "image": IMAGE, "models": {}}
    for model in MODELS:
        processor = AutoProcessor.from_pretrained(FIXTURES / model)
        cases = []
        for prompt in PROMPTS:
            for with_image in (False, True):
                content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
                text = processor.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True, tokenize=False)
                ids = processor(text=[text], images=[image] if with_image else None)["input_ids"][0]
                cases.append({"prompt": prompt, "chat_template": True, "image": with_image,
                              "input_ids": [int(i) for i in ids]})
            ids = processor(text=[prompt])["input_ids"][0]
            cases.append({"prompt": prompt, "chat_template": False, "image": False,
                          "input_ids": [int(i) for i in ids]})
        out["models"][model] = cases
    (FIXTURES / "reference" / "prompts.json").write_text(json.dumps(out, indent=0, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
