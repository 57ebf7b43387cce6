"""The issue's whole path on the embedded model: ``hf-sdft recover --config recipes/gguf-q4_0.yaml
--export_formats gguf,compressed-tensors`` ends with folders that transformers loads without
hf-sdft (the card's own lines, run as printed), with the student's weights bit for bit, and llama.cpp
runs the GGUF at the student's perplexity."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from hf_sdft.cli import _recipe_parser
from hf_sdft.compress.checkpoint import load_model
from hf_sdft.compress.quantize import computed_weight, quantized_modules
from hf_sdft.jobs.cards import build_card
from hf_sdft.jobs.recover import run_recovery
from tests.export.test_export import LLAMA_CPP_REL_TOL

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--learning_rate", "1e-3", "--block_size", "64", "--per_device_train_batch_size", "4",
         "--gradient_accumulation_steps", "1", "--bf16", "false", "--gradient_checkpointing", "false",
         "--warmup_steps", "0", "--save_strategy", "no", "--disable_tqdm", "true", "--max_eval_blocks", "8",
         "--probe_blocks", "4", "--cka_every_n_steps", "1000", "--calibration_blocks", "4", "--max_steps", "3"]
CARD_CHECK = """
import sys, json, torch
sys.modules["hf_sdft"] = None
from transformers import AutoModelForCausalLM
scope = {}
exec(open(sys.argv[1]).read(), scope)
reference = torch.load(sys.argv[2])
model = scope["model"].eval()
state = model.state_dict()
with torch.no_grad():
    logits = model(input_ids=reference["ids"]).logits
print(json.dumps({"max_logits_diff": (logits - reference["logits"]).abs().max().item(),
                  "compared": sum(k in state for k in reference["weights"]),
                  "max_weight_diff": max((state[k] - v).abs().max().item()
                                         for k, v in reference["weights"].items() if k in state)}))
"""


def card_python(card: str, fmt: str) -> str:
    """The Python block under the card's ``**FORMAT** — no hf-sdft needed`` line."""
    block = re.search(rf"\*\*{re.escape(fmt)}\*\* — no hf-sdft needed:\n\n```python\n(.*?)```", card, re.S)
    assert block, f"no loading code for {fmt} in the card"
    return block.group(1)


def test_recover_ends_with_servable_exports(tmp_path):
    out = tmp_path / "run"
    argv = ["--config", str(ROOT / "recipes" / "gguf-q4_0.yaml"), "--export_formats", "gguf,compressed-tensors",
            "--output_dir", str(out), *SMALL]
    stats = run_recovery(*_recipe_parser().parse_args_and_config(argv))
    exports = stats["exports"]
    assert set(exports) == {"gguf", "compressed-tensors"} and all(e["exact"] for e in exports.values())
    assert all(e["grid"] == "int4 symmetric, groups of 32, float16 scales (28 layers)" for e in exports.values())
    recovered = stats["perplexity"]["recovered"]
    for e in exports.values():  # the same weights, the same float32 ops: the same perplexity
        assert abs(e["perplexity_transformers"] - recovered) <= 1e-9 * recovered
    assert abs(exports["gguf"]["perplexity_llama_cpp"] / recovered - 1) < LLAMA_CPP_REL_TOL
    assert json.loads((out / "sdft_stats.json").read_text())["exports"] == exports

    student = load_model(str(out))
    weights = {k: v for k, v in student.state_dict().items() if "._" not in k and not k.endswith("_scale")}
    for name, module in quantized_modules(student).items():
        weights[f"{name}.weight"] = computed_weight(module)
    ids = torch.arange(2, 2 + 2 * 48).reshape(2, 48)
    with torch.no_grad():
        torch.save({"weights": weights, "ids": ids, "logits": student(input_ids=ids).logits}, tmp_path / "reference.pt")
    card = (out / "README.md").read_text()
    assert "## Export and serve" in card and "llama-cli -m" in card and "vllm serve" in card
    for fmt in ("gguf", "compressed-tensors"):
        code = tmp_path / f"card_{fmt.replace('-', '_')}.py"  # not gguf.py: it would shadow the package
        code.write_text(card_python(card, fmt))
        done = subprocess.run([sys.executable, "-c", CARD_CHECK, str(code), str(tmp_path / "reference.pt")],
                              capture_output=True, text=True, cwd=tmp_path, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        # GGUF loads as plain float layers: every weight compares. compressed-tensors' default load keeps
        # the quantized layers packed: the float ones compare, and the logits show the packed ones compute the same
        assert result["compared"] == (len(weights) if fmt == "gguf" else len(weights) - 28), (fmt, result)
        assert result["max_weight_diff"] == 0.0 and result["max_logits_diff"] <= 1e-4, (fmt, result)

    hub = build_card(out, "me/recovered", hub_format="compressed-tensors").text
    assert 'AutoModelForCausalLM.from_pretrained("me/recovered")' in hub  # the root is the servable folder
    assert 'from_pretrained("me/recovered", gguf_file="gguf/model.gguf")' in hub
    assert "pip install hf-sdft" not in hub
