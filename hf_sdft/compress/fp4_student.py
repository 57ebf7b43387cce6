"""FP4 students: the ``fp4`` degradation (NVFP4 / MXFP4 quantization-aware training with
:class:`~hf_sdft.compress.fp4.FP4FakeQuantLinear`), and their saved format.

quanto's format cannot hold FP4, so an FP4 student is saved as what serves it: a compressed-tensors
``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` folder (written by :mod:`hf_sdft.export`, with
transformers' ``config.json``). :func:`load_fp4` loads it back for evaluation or further training
as FP4 layers holding the saved scales, computing the saved values bit for bit; transformers loads
the same folder natively (its weights identical, see tests/export/test_fp4_export.py).
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from hf_sdft.compress.base import Degradation, register_degradation
from hf_sdft.compress.fp4 import (
    FP4_FORMATS,
    GLOBAL_SCALE_MODES,
    MX_SCALE_RULES,
    FP4FakeQuantLinear,
    bits_per_weight,
    fp4_clip_search,
    share_global_scales,
)

FP4_CT_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def fp4_layers(model: nn.Module) -> dict[str, FP4FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP4FakeQuantLinear)}


def is_fp4_model(model: nn.Module) -> bool:
    return bool(fp4_layers(model))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_fp4_student(model: nn.Module, fmt: str = "nvfp4", exclude: tuple[str, ...] = ("lm_head",),
                         calibration: list[dict] | None = None, clip: bool = False, learn_scales: bool = False,
                         global_scale: str = "pow2", mx_rule: str = "compressed-tensors",
                         activations: bool = False) -> nn.Module:
    """Turn ``model``'s Linear layers (but ``exclude``) into FP4 fake-quantized ones, in place,
    holding the same float parameters. NVFP4 layers that engines fuse (q/k/v, gate/up) share one
    global scale. ``clip``: per-block scales searched on the ``calibration`` batches' inputs
    (:func:`~hf_sdft.compress.fp4.fp4_clip_search`), held; ``learn_scales``: the block scales become
    parameters trained with the loss (kept on their grid)."""
    if fmt not in FP4_FORMATS:
        raise ValueError(f"quant_weights={fmt!r} is not an FP4 format: choose one of {', '.join(FP4_FORMATS)}")
    if clip and not calibration:
        raise ValueError("the FP4 clip search needs calibration batches (the layers' inputs)")
    chosen = {name: m for name, m in model.named_modules()
              if type(m) is nn.Linear and not any(fnmatch(name, p) for p in exclude)}
    if not chosen:
        raise ValueError(f"no linear layer left to quantize after exclude={list(exclude)}")
    layers = {name: FP4FakeQuantLinear.from_linear(m, fmt, name, global_scale, mx_rule, activations)
              for name, m in chosen.items()}
    share_global_scales(layers)
    inputs = {}
    if clip:
        from hf_sdft.compress.quantize import calibration_inputs

        inputs = calibration_inputs(model, chosen, calibration)
    for name, layer in layers.items():
        if clip:
            layer.hold_scales(fp4_clip_search(layer, inputs.pop(name)), learnable=learn_scales)
        elif learn_scales:
            layer.hold_scales(learnable=True)
        _set_module(model, name, layer)
    return model


@register_degradation
class FP4Degradation(Degradation):
    """NVFP4 / MXFP4 weight quantization (W4A16; NVFP4 W4A4 with ``activations``)."""

    kind = "fp4"

    def __init__(self, fmt: str = "nvfp4", exclude: tuple[str, ...] = ("lm_head",), clip_search: bool = False,
                 learn_scales: bool = False, global_scale: str = "pow2", mx_rule: str = "compressed-tensors",
                 activations: bool = False):
        if fmt not in FP4_FORMATS:
            raise ValueError(f"quant_weights={fmt!r}: FP4 formats are {', '.join(FP4_FORMATS)}")
        if global_scale not in GLOBAL_SCALE_MODES or mx_rule not in MX_SCALE_RULES:
            raise ValueError(f"global_scale one of {GLOBAL_SCALE_MODES}, mx_rule one of {MX_SCALE_RULES}")
        if activations and fmt != "nvfp4":
            raise ValueError("FP4 activation quantization is NVFP4's (W4A4); MXFP4 is weight-only here")
        self.fmt, self.exclude, self.clip_search, self.learn_scales = fmt, tuple(exclude), clip_search, learn_scales
        self.global_scale, self.mx_rule, self.activations = global_scale, mx_rule, activations
        self.layers = 0

    def apply(self, model, calibration=None):
        quantize_fp4_student(model, self.fmt, self.exclude, calibration, self.clip_search, self.learn_scales,
                             self.global_scale, self.mx_rule, self.activations)
        self.layers = len(fp4_layers(model))
        return model

    def describe(self) -> dict:
        described = {"kind": self.kind, "weights": self.fmt, "activations": "nvfp4" if self.activations else None,
                     "group_size": 16 if self.fmt == "nvfp4" else 32, "quantized_layers": self.layers,
                     "exclude": list(self.exclude), "bits_per_weight": bits_per_weight(self.fmt)}
        if self.fmt == "nvfp4":
            described["global_scale"] = self.global_scale
        else:
            described["mx_scale_rule"] = self.mx_rule
        if self.clip_search:
            described["clip_search"] = "per-block scale shrink, least block output error on calibration inputs"
        if self.learn_scales:
            described["learned_scales"] = True
        return described

    def tags(self) -> list[str]:
        return [self.fmt, "fp4"]


def fp4_summary(model: nn.Module) -> dict:
    """``{"weights": ["nvfp4"], "activations": [...], "layers": n}`` (``{}`` without FP4 layers)."""
    layers = fp4_layers(model)
    if not layers:
        return {}
    return {"weights": sorted({m.fmt for m in layers.values()}),
            "activations": sorted({"nvfp4" for m in layers.values() if m.quantize_activations}), "layers": len(layers)}


def save_fp4(model: nn.Module, output_dir: str | Path) -> tuple[str, str]:
    """Save an FP4 student as compressed-tensors ``nvfp4-`` / ``mxfp4-pack-quantized`` (config,
    ``model.safetensors``, generation config); returns ``(format, loading code)``."""
    from hf_sdft.export import to_compressed_tensors
    from hf_sdft.export.student_weights import read_model

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
            "  # or hf_sdft.compress.student.load_model for FP4 training")
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
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_sdft.export.fp4_weights import FP4Weight
    from hf_sdft.export.student_weights import read_student

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
