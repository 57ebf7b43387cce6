"""Quantized students with optimum-quanto. Every quanto call of the project lives here
(quanto is in maintenance mode upstream: one small module to replace if it goes).

The student is quantized but left *unfrozen*: quanto re-quantizes the float weights at
every forward and gradients pass straight through, so recovery training is
quantization-aware. :func:`save_quantized` freezes and writes the integer weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from optimum.quanto import Calibration, QModuleMixin, freeze, qfloat8, qint2, qint4, qint8, quantization_map, quantize
from safetensors.torch import load_file, save_file
from torch import nn

from .base import Degradation, register_degradation

WEIGHT_TYPES = {"int8": qint8, "int4": qint4, "int2": qint2}
ACTIVATION_TYPES = {"int8": qint8, "fp8": qfloat8}
QMAP_FILE = "quanto_qmap.json"
GROUPS_FILE = "quanto_group_sizes.json"
WEIGHTS_FILE = "model.safetensors"


def _check_types(weights: str, activations: str | None) -> None:
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"unsupported weight bit width {weights!r}: quanto supports {', '.join(WEIGHT_TYPES)}")
    if activations is not None and activations not in ACTIVATION_TYPES:
        raise ValueError(
            f"unsupported activation type {activations!r}: choose one of {', '.join(ACTIVATION_TYPES)} or None"
        )


def quantized_modules(model: nn.Module) -> dict[str, QModuleMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QModuleMixin)}


def quantize_student(
    model: nn.Module,
    weights: str = "int4",
    activations: str | None = None,
    exclude: tuple[str, ...] = ("lm_head",),
    group_size: int | None | str = "auto",
    calibration: list[dict] | None = None,
) -> nn.Module:
    """Quantize ``model``'s linear layers in place for quantization-aware training.

    Args:
        weights: ``int8`` | ``int4`` | ``int2``.
        activations: ``None`` | ``int8`` | ``fp8``; needs ``calibration`` batches.
        exclude: fnmatch patterns of module names kept in float.
        group_size: int4/int2 only. ``"auto"`` keeps quanto's choice (128, or one scale per
            output channel when the input dim is ≤ 128); ``None`` forces one scale per output
            channel; an int sets the group size (it must divide the input dim).
    """
    _check_types(weights, activations)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    if activations is not None and not calibration:
        raise ValueError("activation quantization needs calibration batches to set the activation scales")
    quantize(model, weights=WEIGHT_TYPES[weights], activations=ACTIVATION_TYPES.get(activations), exclude=list(exclude))
    modules = quantized_modules(model)
    if not modules:
        raise ValueError(f"no linear layer left to quantize after exclude={list(exclude)}")
    if group_size != "auto" and weights != "int8":
        for name, m in modules.items():
            if group_size is not None and m.in_features % group_size:
                raise ValueError(f"group_size={group_size} does not divide {name}'s input dim {m.in_features}")
            m.weight_group_size = group_size
    if activations is not None:
        with torch.no_grad(), Calibration(streamline=False):  # streamlining is not recorded in the quantization map
            for batch in calibration:
                model(**batch)
    return model


def _group_sizes(model: nn.Module) -> dict[str, int | None]:
    return {name: m.weight_group_size for name, m in quantized_modules(model).items()}


def save_quantized(model: nn.Module, output_dir: str | Path) -> None:
    """Freeze ``model`` (integer weights) and write config, safetensors, the quantization map
    and the group sizes."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    freeze(model)
    seen: dict[int, str] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        state[key] = tensor.clone() if ptr in seen else tensor.contiguous()  # tied weights: safetensors needs copies
        seen.setdefault(ptr, key)
    save_file(state, str(output_dir / WEIGHTS_FILE), metadata={"format": "pt", "quantizer": "optimum-quanto"})
    (output_dir / QMAP_FILE).write_text(json.dumps(quantization_map(model), indent=2))
    (output_dir / GROUPS_FILE).write_text(json.dumps(_group_sizes(model), indent=2))
    model.config.save_pretrained(output_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(output_dir)


def load_quantized(path: str | Path, device: str | torch.device = "cpu", subfolder: str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (same logits) from a folder or Hub id.

    The model is built on CPU from its config, not on the meta device: meta builds leave
    rotary buffers uninitialised.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(path).exists():
        from huggingface_hub import snapshot_download

        path = snapshot_download(str(path), allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    path = Path(path) / (subfolder or "")
    missing = [f for f in (WEIGHTS_FILE, QMAP_FILE, "config.json") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a quanto checkpoint saved by save_quantized: missing {missing}")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    qmap = json.loads((path / QMAP_FILE).read_text())
    groups = json.loads((path / GROUPS_FILE).read_text()) if (path / GROUPS_FILE).exists() else {}
    for name, q in qmap.items():
        weights = None if q["weights"] == "none" else q["weights"]
        activations = None if q["activations"] == "none" else q["activations"]
        quantize(model, weights=weights, activations=activations, include=[name])
        if name in groups:
            model.get_submodule(name).weight_group_size = groups[name]
    result = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match {type(model).__name__} built from its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval()


def freeze_base(model: nn.Module) -> nn.Module:
    """Freeze quantized layers to integer weights (the memory-light base for LoRA adapters)."""
    freeze(model)
    return model


def thaw_quantized(model: nn.Module) -> nn.Module:
    """Turn frozen integer weights (e.g. from :func:`load_quantized`) back into float parameters
    holding their dequantized values: the layers quantize them again at every forward, so
    training is quantization-aware and the logits are those of the frozen model."""
    for m in quantized_modules(model).values():
        if not isinstance(m.weight, torch.nn.Parameter) or type(m.weight.data) is not torch.Tensor:
            m.weight = nn.Parameter(m.weight.dequantize().contiguous())
    return model


def computed_weight(module: nn.Module) -> torch.Tensor | None:
    """The float weight a quanto layer computes with (its quantized weight, dequantized), or
    ``None`` for a layer that quanto does not quantize. Raises for quantized activations, which
    no float weight reproduces."""
    if not isinstance(module, QModuleMixin) or module.weight_qtype is None:
        return None
    if module.activation_qtype is not None:
        raise ValueError("this layer quantizes its activations, which no float weight reproduces: sample with "
                         "model.generate (use_vllm false) or quantize the weights only")
    return module.qweight.dequantize()


def quantization_summary(model: nn.Module) -> dict:
    """``{"weights": ["int4"], "activations": [...], "layers": n}`` of a model's quanto layers
    (``{}`` when it has none)."""
    modules = quantized_modules(model)
    if not modules:
        return {}
    names = {qtype.name: key for key, qtype in {**WEIGHT_TYPES, **ACTIVATION_TYPES}.items()}
    weights = sorted({names.get(m.weight_qtype.name, m.weight_qtype.name) for m in modules.values() if m.weight_qtype})
    acts = sorted({names.get(m.activation_qtype.name, m.activation_qtype.name)
                   for m in modules.values() if m.activation_qtype is not None})
    return {"weights": weights, "activations": acts, "layers": len(modules)}


@register_degradation
class QuantoDegradation(Degradation):
    """Weight (and optionally activation) quantization with optimum-quanto."""

    kind = "quanto"

    def __init__(self, weights: str = "int4", activations: str | None = None, group_size="auto",
                 exclude: tuple[str, ...] = ("lm_head",)):
        _check_types(weights, activations)
        self.weights, self.activations, self.group_size, self.exclude = weights, activations, group_size, tuple(exclude)
        self.effective_group_sizes: dict[str, int | None] = {}

    def apply(self, model, calibration=None):
        quantize_student(model, self.weights, self.activations, self.exclude, self.group_size, calibration)
        self.effective_group_sizes = _group_sizes(model)
        return model

    def describe(self) -> dict:
        sizes = sorted({str(g) if g is not None else "per-channel" for g in self.effective_group_sizes.values()})
        return {
            "kind": self.kind, "weights": self.weights, "activations": self.activations,
            "group_size": ", ".join(sizes) if sizes else str(self.group_size),
            "quantized_layers": len(self.effective_group_sizes), "exclude": list(self.exclude),
        }

    def tags(self) -> list[str]:
        return ["quanto", self.weights] + ([f"a{self.activations}"] if self.activations else [])
