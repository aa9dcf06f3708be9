#!/usr/bin/env python3
"""LLaVA-1.5 and LLaVA-OneVision snapshots as transformers 5.x's own ``save_pretrained`` writes them, with the
references each of those versions computes (tests/saved_layouts.rs).

For every version in SAVE_VERSIONS, in a virtual environment of its own (``~/.venvs/tf-<version>``, made from
``tools/requirements-tf<version>.txt`` on first use; torch, Pillow and the rest come from the tools venv through a
``.pth`` file), and for each family:

1. load the hub-layout fixture (``tests/fixtures/{llava15,onevision}-hub``) with ``from_pretrained``;
2. build a new model from its config (``cls(config)``, as a fine-tuning script that starts from a config does) and
   give it those weights with ``load_state_dict(strict=True)``; cast to float16 (the hub fixture's dtype);
3. ``save_pretrained`` it, and the processor (``AutoProcessor.save_pretrained``), to
   ``tests/fixtures/<family>-tf<major.minor>/``: config, weights, tokenizer, chat template and processor files
   exactly as that version writes them, nothing rewritten afterwards;
4. reload the directory with that version's ``from_pretrained`` (every tensor equal to what was saved) and compute
   the references of make_llava_fixtures.py's ``reference_case`` (float32, eager attention, CPU) for one image
   case and the text-only case into ``tests/fixtures/reference/<family>-tf<major.minor>/``; they must equal the
   hub fixture's references (same weights, same inputs: hidden states to 5e-5, relative above 1).

Then the newest transformers on PyPI (CHECK_VERSION) reloads every saved fixture and recomputes its references:
input ids and pixels equal, hidden states and lens log-probs within 5e-5 of the saving version's.

What the versions write (printed as it runs): 5.0 keeps the CLIP/SigLIP tower's ``vision_model.`` level
(``vision_tower.vision_model.*``); from 5.17 (CLIPVisionModel's ``PrefixChange(prefix_to_remove="vision_model")``)
a model built from its config saves ``vision_tower.embeddings.*``, which logit-lens refused before issue 16.
A model loaded from a hub snapshot is saved back under the hub's names by every 5.x (transformers reverses the
renamings it applied when loading), so those snapshots are the hub fixtures' layout already.

transformers 5.0.0's LlavaOnevisionConfig ignores ``text_config.tie_word_embeddings`` (fixed by 5.17: the
config takes the text config's value when its own is false), so 5.0 builds OneVision with an untied, randomly
initialised ``lm_head``; the script gives that head the embedding matrix (what the tied checkpoint means) before
saving, so that every version computes the same numbers.

Run from the repository root (deterministic; ~1 min once the environments exist, a few minutes to make them):

    ~/.venvs/tools/bin/python tools/make_saved_fixtures.py
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SAVE_VERSIONS = ["5.0.0", "5.17.0"]
CHECK_VERSION = "5.25.0"
# family -> (hub fixture, class name, cases of make_llava_fixtures.py kept for the saved copies)
# Two transformers versions on the same weights and inputs differ by float rounding (their kernels and reduction
# orders change): ~1e-5 seen between 5.0 and 5.24. Bounded here at half the tests' 1e-4.
CROSS_VERSION_TOL = 5e-5
FAMILIES = {
    "llava15": ("llava15-hub", "LlavaForConditionalGeneration", ["landscape_color", "text_only"]),
    "onevision": ("onevision-hub", "LlavaOnevisionForConditionalGeneration", ["wide_count", "text_only"]),
}


def short(version: str) -> str:
    return ".".join(version.split(".")[:2])


def fixture_name(family: str, version: str) -> str:
    return f"{family}-tf{short(version)}"


# --------------------------------------------------------------------------------------------------------------
# Parent: one environment per transformers version
# --------------------------------------------------------------------------------------------------------------

def venv_python(version: str) -> Path:
    """``~/.venvs/tf-<version>/bin/python``, made on first use from tools/requirements-tf<version>.txt."""
    env = Path.home() / ".venvs" / f"tf-{version}"
    py = env / "bin" / "python"
    marker = env / ".logit-lens-ready"
    if not marker.exists():
        req = REPO / "tools" / f"requirements-tf{version}.txt"
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(req)], check=True)
        # torch, torchvision, Pillow, numpy: the tools venv's (after this venv's own packages on sys.path)
        import site
        tools_site = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
        own_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                                  capture_output=True, text=True).stdout.strip()
        Path(own_site, "zz-logit-lens-tools.pth").write_text(tools_site + "\n")
        marker.write_text(version + "\n")
    return py


def run_child(version: str, *args: str):
    py = venv_python(version)
    subprocess.run([str(py), __file__, *args], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------------------------
# Child: runs inside one version's environment
# --------------------------------------------------------------------------------------------------------------

def child_imports():
    sys.path.insert(0, str(REPO / "tools"))
    import torch
    import transformers
    import make_fixtures as mf
    import make_llava_fixtures as mlf
    from tokenizers import Tokenizer
    torch.set_grad_enabled(False)
    return torch, transformers, mf, mlf, Tokenizer


def case_defs(mlf, family: str):
    table = mlf.LLAVA_CASES if family == "llava15" else mlf.ONEVISION_CASES
    keep = FAMILIES[family][2]
    return [c for c in table if c[0] in keep]


def load_reference(path: Path):
    from safetensors.torch import load_file
    return load_file(str(path))


def weight_names(out: Path) -> list:
    from safetensors import safe_open
    names = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            names += list(s.keys())
    return sorted(names)


def layout_summary(names: list) -> list:
    """The distinct name prefixes up to the first layer index: what tells one layout from another."""
    out = set()
    for n in names:
        parts = n.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), min(len(parts), 3))
        out.add(".".join(parts[:cut]))
    return sorted(out)


def compare_references(torch, got: dict, want: dict, what: str, atol: float):
    for k in ("input_ids", "lens_positions", "top5_ids"):
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs"
    if "pixel_values" in want:
        d = (got["pixel_values"] - want["pixel_values"]).abs().max().item()
        assert d <= 1e-6, f"{what}: pixel_values differ by {d}"
    for k in ("hidden_states", "last_layer_raw", "lens_logprobs", "logits", "mean_max_prob"):
        # |a - b| / (|b| + 1), as tests/common's max_diff: absolute near zero, relative for large values
        d = ((got[k] - want[k]).abs() / (want[k].abs() + 1)).max().item()
        assert d <= atol, f"{what}: {k} differs by {d}"


def child_save(version: str):
    torch, transformers, mf, mlf, Tokenizer = child_imports()
    assert transformers.__version__ == version, (transformers.__version__, version)
    for family, (hub_dir, cls_name, _) in FAMILIES.items():
        cls = getattr(transformers, cls_name)
        hub = FIXTURES / hub_dir
        name = fixture_name(family, version)
        out = FIXTURES / name
        ref_dir = FIXTURES / "reference" / name
        for d in (out, ref_dir):
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)

        loaded = cls.from_pretrained(str(hub), dtype=torch.float32)
        config = loaded.config
        model = cls(config)  # a model built from its config, as training scripts do
        model.load_state_dict(loaded.state_dict(), strict=True)
        if family == "onevision" and config.text_config.tie_word_embeddings and not config.tie_word_embeddings:
            # transformers 5.0.0 ignores the text config's tie flag for OneVision (see the docstring)
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
            print(f"[{name}] config.tie_word_embeddings is false but text_config's is true: lm_head := embeddings")
        model = model.to(torch.float16)
        model.save_pretrained(str(out))
        mf_proc = transformers.AutoProcessor.from_pretrained(str(hub))
        mf_proc.save_pretrained(str(out))
        names = weight_names(out)
        print(f"[{name}] transformers {version} wrote {sorted(p.name for p in out.iterdir())}")
        print(f"[{name}] {len(names)} tensors; prefixes: {layout_summary(names)}")

        # Reload with this version: every saved tensor comes back.
        reloaded = cls.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
        reloaded.eval()
        saved = model.float().state_dict()
        for k, v in reloaded.state_dict().items():
            assert torch.equal(v, saved[k]), f"{name}: {k} does not reload as saved"
        processor = transformers.AutoProcessor.from_pretrained(str(out))
        raw_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        cases = []
        for case_name, image_rel, prompt in case_defs(mlf, family):
            tensors, meta, case, stats = mlf.reference_case(family, reloaded, processor, raw_tok, case_name,
                                                            image_rel, prompt, FIXTURES, check_layout=False)
            hub_ref = load_reference(FIXTURES / "reference" / family / f"{case_name}.safetensors")
            compare_references(torch, tensors, hub_ref, f"{name}/{case_name} vs the hub fixture's",
                               atol=CROSS_VERSION_TOL)
            meta["snapshot"] = name
            mf.save_safetensors(tensors, ref_dir / f"{case_name}.safetensors", metadata=meta)
            cases.append(case)
            print(f"[{name}] {case_name}: {case['num_tokens']} tokens, {case['num_image_tokens']} image tokens, "
                  f"{json.dumps(stats)}")
        mf.write_json(ref_dir / "cases.json", cases)


def child_check(version: str):
    torch, transformers, mf, mlf, Tokenizer = child_imports()
    assert transformers.__version__ == version, (transformers.__version__, version)
    for saver in SAVE_VERSIONS:
        for family, (_, cls_name, _) in FAMILIES.items():
            name = fixture_name(family, saver)
            out = FIXTURES / name
            model = getattr(transformers, cls_name).from_pretrained(str(out), dtype=torch.float32,
                                                                    attn_implementation="eager")
            model.eval()
            processor = transformers.AutoProcessor.from_pretrained(str(out))
            raw_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
            for case_name, image_rel, prompt in case_defs(mlf, family):
                tensors, *_ = mlf.reference_case(family, model, processor, raw_tok, case_name, image_rel, prompt,
                                                 FIXTURES, check_layout=False)
                want = load_reference(FIXTURES / "reference" / name / f"{case_name}.safetensors")
                compare_references(torch, tensors, want, f"{name}/{case_name} in transformers {version}",
                                   CROSS_VERSION_TOL)
            print(f"[{name}] reloads in transformers {version} with the same numbers")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", choices=["save", "check"], help=argparse.SUPPRESS)
    ap.add_argument("--version", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "save":
        child_save(args.version)
    elif args.child == "check":
        child_check(args.version)
    else:
        for v in SAVE_VERSIONS:
            run_child(v, "--child", "save", "--version", v)
        run_child(CHECK_VERSION, "--child", "check", "--version", CHECK_VERSION)
        print("done")


if __name__ == "__main__":
    main()
