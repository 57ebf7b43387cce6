"""FP4 students' saved format: quanto's cannot hold FP4, so an FP4 student (the ``fp4``
degradation, :mod:`hf_sdft.compress.fp4_student`) is saved as what serves it, a compressed-tensors
``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` folder with transformers' ``config.json``.
:func:`load_fp4` loads it back for evaluation or further training as FP4 layers holding the saved
scales, computing the saved values bit for bit; transformers loads the same folder natively (its
weights identical, see tests/export/test_fp4_export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hf_sdft.compress.fp4 import FP4FakeQuantLinear
from hf_sdft.compress.fp4_student import _set_module, fp4_layers
from hf_sdft.export import to_compressed_tensors
from hf_sdft.export.fp4_weights import FP4Weight
from hf_sdft.export.student_weights import read_model, read_student

FP4_CT_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def save_fp4(model: nn.Module, output_dir: str | Path) -> tuple[str, str]:
    """Save an FP4 student as compressed-tensors ``nvfp4-`` / ``mxfp4-pack-quantized`` (config,
    ``model.safetensors``, generation config); returns ``(format, loading code)``."""
    if any(m.quantize_activations for m in fp4_layers(model).values()):
        raise ValueError("an NVFP4 W4A4 student (activations quantized) has no saved format here: train W4A16 "
                         "(the default) to save and export it")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = read_model(model, None, "fp4")
    why = to_compressed_tensors.refusal(weights)
    if why:
        raise ValueError(f"this FP4 student cannot be saved exactly: {why}")
    to_compressed_tensors.write(weights, out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    fmt = json.loads((out / "config.json").read_text())["quantization_config"]["format"]
    code = ('from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{path}")'
            "  # or hf_sdft.export.fp4_checkpoint.load_fp4 for FP4 training")
    return fmt, code


def is_fp4_folder(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    qconfig = json.loads(path.read_text()).get("quantization_config") or {}
    return qconfig.get("format") in FP4_CT_FORMATS


@torch.no_grad()
def load_fp4(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """An FP4 student saved by :func:`save_fp4` (or any compressed-tensors NVFP4 / MXFP4 folder of a
    dense model): FP4 layers holding the saved block and global scales, their weights the saved
    values, so that it computes them bit for bit; float32."""
    weights = read_student(folder)
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for entry in weights.entries:
        value = entry.load()
        if isinstance(value, FP4Weight):
            module = entry.name.removesuffix(".weight")
            linear = model.get_submodule(module)
            layer = FP4FakeQuantLinear.from_linear(linear, value.fmt, module)
            linear.weight.copy_(value.dequantize())
            if value.global_scale is not None:
                layer.weight_global_scale = value.global_scale.clone()
            layer.hold_scales(value.scale.reshape(-1, 1))
            _set_module(model, module, layer)
        else:
            state[entry.name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".weight_global_scale", ".weight_scale"))
               and k not in {f"{e.name}" for e in weights.grids()}]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{folder} does not match {type(model).__name__}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model.to(device).eval()
