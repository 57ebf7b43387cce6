"""FP4 students saved and exported exactly: compressed-tensors nvfp4- / mxfp4-pack-quantized (checked
against the library's own ModelCompressor and loaded by transformers in an interpreter where
hf_sdft cannot be imported) and GGUF MXFP4 run by llama.cpp, on both models."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sdft.compress.fp4_student import fp4_layers, quantize_fp4_student
from hf_sdft.data import default_model_path
from hf_sdft.export import export_student
from hf_sdft.export.fp4_checkpoint import load_fp4, save_fp4

pytest.importorskip("compressed_tensors")
SECOND = Path(__file__).parents[1] / "assets" / "second_model"
MODELS = {"llama": (Path(default_model_path()), Path(default_model_path()) / ".." / "default_data" / "eval.jsonl"),
          "qwen2": (SECOND / "model", SECOND / "data" / "eval.txt")}


def held_out_ids(tokenizer, path: Path, n: int = 256) -> list[int]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        text = "\n".join(json.loads(line)["text"] for line in text.splitlines()[:20])
    return tokenizer(text)["input_ids"][:n]


def student(name: str, fmt: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = MODELS[name][0]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return quantize_fp4_student(model, fmt).eval(), AutoTokenizer.from_pretrained(folder)


def saved_student(tmp_path, name, fmt):
    model, tok = student(name, fmt)
    out = tmp_path / f"{name}-{fmt}"
    save_fp4(model, out)
    tok.save_pretrained(out)
    return model, tok, out


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_saves_and_reloads_exactly_on_grid(tmp_path, fmt):
    model, tok, out = saved_student(tmp_path, "llama", fmt)
    block = 16 if fmt == "nvfp4" else 32
    for layer in fp4_layers(model).values():  # at most 8 distinct magnitudes in every 16-weight block
        mags = layer.quantized_weight().abs().reshape(-1, 16)
        assert max(len(torch.unique(r)) for r in mags) <= 8
        assert max(len(torch.unique(r)) for r in layer.quantized_weight().abs().reshape(-1, block)) <= 8
    back = load_fp4(out)
    ids = torch.tensor([held_out_ids(tok, MODELS["llama"][1], 64)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    layers, back_layers = fp4_layers(model), fp4_layers(back)
    assert layers.keys() == back_layers.keys()
    for name, layer in layers.items():
        assert torch.equal(layer.quantized_weight(), back_layers[name].quantized_weight())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_matches_model_compressor(tmp_path, fmt):
    """Tensor names, dtypes, bytes and the quantization config equal what compressed-tensors'
    ModelCompressor writes for the same layers, scales and global scales."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, tok, out = saved_student(tmp_path, "llama", fmt)
    ref = AutoModelForCausalLM.from_pretrained(MODELS["llama"][0], dtype=torch.float32)
    ignore = ["lm_head"]
    scheme = preset_name_to_scheme("NVFP4A16" if fmt == "nvfp4" else "MXFP4A16", ["Linear"])
    apply_quantization_config(ref, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    for name, layer in fp4_layers(model).items():
        target = ref.get_submodule(name)
        target.weight.data.copy_(layer.weight.detach())
        _, scale, g = layer.quantized()
        if fmt == "nvfp4":
            target.weight_global_scale.data.copy_(g)
            target.weight_scale.data.copy_(scale.to(target.weight_scale.dtype))
        else:  # the library's observer holds MX scales as the float 2^k
            target.weight_scale.data.copy_(scale.to(target.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(ref, quantization_format=None)
    compressor.compress_model(ref)
    ref_dir = tmp_path / "ref"
    ref.save_pretrained(ref_dir)
    compressor.update_config(ref_dir)
    ours, theirs = load_file(out / "model.safetensors"), load_file(ref_dir / "model.safetensors")
    theirs.pop("lm_head.weight", None)  # tied to the embedding: transformers writes it, we do not
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key].view(torch.uint8), value.view(torch.uint8)), key
    q_ours = json.loads((out / "config.json").read_text())["quantization_config"]
    q_theirs = json.loads((ref_dir / "config.json").read_text())["quantization_config"]
    assert q_ours["format"] == q_theirs["format"] == f"{fmt}-pack-quantized"
    assert q_ours["config_groups"]["group_0"]["weights"] == q_theirs["config_groups"]["group_0"]["weights"]
    assert q_ours["ignore"] == q_theirs["ignore"]


LOAD_WITHOUT_HF_SDFT = r"""
import sys, json, torch
sys.modules["hf_sdft"] = None
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
result = {}
for folder, ref in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    expected = torch.load(ref)
    state = model.state_dict()
    result[folder] = max((state[k] - v).abs().max().item() for k, v in expected.items())
print(json.dumps(result))
"""


def test_transformers_loads_identical_weights_without_hf_sdft(tmp_path):
    pairs = []
    for name in MODELS:
        for fmt in ("nvfp4", "mxfp4"):
            model, _, out = saved_student(tmp_path, name, fmt)
            export = tmp_path / f"{name}-{fmt}-ct"
            report = export_student(out, "compressed-tensors", export)
            assert report.exact
            ref = tmp_path / f"{name}-{fmt}.pt"
            torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("_scale")} |
                       {f"{n}.weight": m.quantized_weight() for n, m in fp4_layers(model).items()}, ref)
            pairs.append((str(export), str(ref)))
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HF_SDFT, json.dumps(pairs)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(diffs) == 4 and all(d == 0.0 for d in diffs.values()), diffs


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits[:-1].double(), -1)
    return math.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())


PPL_RTOL = 0.01  # llama.cpp's CPU matmul quantizes activations to 8 bits: close, not bit for bit


@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_runs_mxfp4_gguf(tmp_path, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    model, tok, out = saved_student(tmp_path, name, "mxfp4")
    report = export_student(out, "gguf", tmp_path / "gguf")
    assert report.exact
    import gguf

    reader = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "MXFP4" and kinds["blk.0.ffn_down.weight"] == "MXFP4"
    ids = held_out_ids(tok, MODELS[name][1], 200)
    with torch.no_grad():
        ours = perplexity(model(torch.tensor([ids])).logits[0], ids)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "model.gguf"), logits_all=True, n_ctx=256,
                          verbose=False)
    llm.eval(ids)
    theirs = perplexity(torch.from_numpy(np.array(llm.scores[:len(ids)])), ids)
    print(f"{name} MXFP4: student perplexity {ours:.4f}, llama.cpp {theirs:.4f}")
    assert abs(theirs - ours) / ours < PPL_RTOL


def test_gguf_refuses_nvfp4_naming_exact_formats(tmp_path):
    _, _, out = saved_student(tmp_path, "llama", "nvfp4")
    with pytest.raises(ValueError, match="global scale.*Exact formats for it: compressed-tensors, dense"):
        export_student(out, "gguf", tmp_path / "gguf")


def test_minmax_global_scale_is_refused_for_compressed_tensors(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODELS["llama"][0], dtype=torch.float32)
    quantize_fp4_student(model, "nvfp4", global_scale="minmax")
    with pytest.raises(ValueError, match="bfloat16"):
        save_fp4(model, tmp_path / "s")


def test_recover_job_nvfp4_cka_recipe_saves_servable_student(tmp_path):
    """``hf-sdft recover --config recipes/nvfp4-cka.yaml`` on the embedded model: the student is saved as
    nvfp4-pack-quantized, loads back as FP4 layers (load_fp4) on the NVFP4 grid, and exports exactly
    (--export_formats compressed-tensors, measured as transformers loads it)."""
    from hf_sdft.cli import _recipe_parser
    from hf_sdft.jobs.recover import run_recovery

    recipe = Path(__file__).parents[2] / "recipes" / "nvfp4-cka.yaml"
    argv = ["--config", str(recipe), "--max_steps", "2", "--per_device_train_batch_size", "2", "--block_size", "64",
            "--bf16", "false", "--gradient_checkpointing", "false", "--learning_rate", "1e-3", "--max_eval_blocks",
            "4", "--probe_blocks", "4", "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none",
            "--use_cpu", "true", "--output_dir", str(tmp_path / "run"), "--export_formats", "compressed-tensors"]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    assert args.cka_weight > 0 and rec.quant_weights == "nvfp4"
    stats = run_recovery(rec, args, model_args)
    assert stats["format"] == "nvfp4-pack-quantized" and stats["degradation"]["kind"] == "fp4"
    exported = stats["exports"]["compressed-tensors"]
    assert exported["exact"] and exported["perplexity_transformers"] == pytest.approx(stats["perplexity"]["recovered"],
                                                                                      rel=1e-6)
    back = load_fp4(tmp_path / "run")
    layers = fp4_layers(back)
    assert layers and all(m.fmt == "nvfp4" for m in layers.values())
    for layer in layers.values():
        assert max(len(torch.unique(r)) for r in layer.quantized_weight().abs().reshape(-1, 16)) <= 8
    report = export_student(tmp_path / "run", "compressed-tensors", tmp_path / "ct")
    assert report.exact
