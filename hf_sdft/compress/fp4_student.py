"""FP4 students: the ``fp4`` degradation (NVFP4 / MXFP4 quantization-aware training with
:class:`~hf_sdft.compress.fp4.FP4FakeQuantLinear`), and their saved format.

quanto's format cannot hold FP4, so an FP4 student is saved as what serves it: a compressed-tensors
``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` folder (:mod:`hf_sdft.export.fp4_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

from torch import nn

from hf_sdft.compress.base import Degradation
from hf_sdft.compress.fp4 import (
    FP4_FORMATS,
    GLOBAL_SCALE_MODES,
    MX_SCALE_RULES,
    FP4FakeQuantLinear,
    bits_per_weight,
    fp4_clip_search,
    share_global_scales,
)


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
        from hf_sdft.compress.quantize import calibration_inputs  # lazy: loads optimum-quanto

        inputs = calibration_inputs(model, chosen, calibration)
    for name, layer in layers.items():
        if clip:
            layer.hold_scales(fp4_clip_search(layer, inputs.pop(name)), learnable=learn_scales)
        elif learn_scales:
            layer.hold_scales(learnable=True)
        _set_module(model, name, layer)
    return model


@dataclass
class FP4Options:
    """The options of :class:`FP4Degradation` (see :func:`quantize_fp4_student`)."""

    fmt: str = "nvfp4"
    exclude: tuple[str, ...] = ("lm_head",)
    clip_search: bool = False
    learn_scales: bool = False
    global_scale: str = "pow2"
    mx_rule: str = "compressed-tensors"
    activations: bool = False

    def __post_init__(self):
        self.exclude = tuple(self.exclude)
        if self.fmt not in FP4_FORMATS:
            raise ValueError(f"quant_weights={self.fmt!r}: FP4 formats are {', '.join(FP4_FORMATS)}")
        if self.global_scale not in GLOBAL_SCALE_MODES or self.mx_rule not in MX_SCALE_RULES:
            raise ValueError(f"global_scale one of {GLOBAL_SCALE_MODES}, mx_rule one of {MX_SCALE_RULES}")
        if self.activations and self.fmt != "nvfp4":
            raise ValueError("FP4 activation quantization is NVFP4's (W4A4); MXFP4 is weight-only here")


class FP4Degradation(Degradation):
    """NVFP4 / MXFP4 weight quantization (W4A16; NVFP4 W4A4 with ``activations``)."""

    kind = "fp4"
    Options = FP4Options
    is_quantized = True

    def __init__(self, options: FP4Options | None = None, **fields):
        super().__init__(options, **fields)
        o = self.options
        self.fmt, self.exclude, self.clip_search, self.learn_scales = o.fmt, o.exclude, o.clip_search, o.learn_scales
        self.global_scale, self.mx_rule, self.activations = o.global_scale, o.mx_rule, o.activations
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
