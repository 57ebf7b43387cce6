"""Quantization-aware training in plain PyTorch: :class:`FakeQuantLinear` computes with its float
weight rounded to the integer grid (:func:`fake_quantize`) and passes gradients straight through to
the float weight. No compiled kernel, no JIT build, no optimum-quanto import: a few elementwise ops
over the weight at every forward, on any device, under autocast (``F.linear`` casts the rounded
weight like any other).

The grid is optimum-quanto 0.2.7's, value for value (tests/test_fake_quant.py checks it against
quanto's ``dequantize()``), so a student trained here and saved in quanto's format
(:mod:`hf_sdft.compress.quantize`) computes what was trained:

- int8: symmetric per output row, ``scale = max|w| / 127``, ``code = clamp(round(w / scale), -128, 127)``,
  ``value = scale * code``;
- int4 / int2: affine per group of ``group_size`` consecutive inputs of a row (per row when
  ``group_size`` is None), ``scale = (max - min) / (2^bits - 1)``, ``shift = -min``,
  ``code = clamp(round((w + shift) / scale), 0, 2^bits - 1)``, ``value = scale * code - shift``.

A constant group (scale 0, e.g. a pruned all-zero group) gets code 0, as quanto's uint8 cast of
NaN does on CPU. The math runs in the weight's own dtype, as quanto's does (float32 for hf-sdft's
students).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = (8, 4, 2)
INT8_QMAX = 127  # quanto's qint8 symmetric range is [-128, 127], scaled by max|w| / 127
AUTO_GROUP_SIZE = 128  # quanto's default group for int4 / int2 (its AWQ/Marlin kernels' group)
AUTO_GROUP_STEP = 32  # quanto tries 128, 96, 64 until one divides the input dim
AUTO_GROUP_MIN = 32  # ... and stops above this (quanto's loop: ``while ... and group_size > 32``)


def default_group_size(in_features: int, bits: int) -> int | None:
    """quanto's automatic group size: 128 (or 96, 64, 32 if 128 does not divide ``in_features``),
    or ``None`` (one scale per output row) for int8, for ``in_features`` ≤ 128 and when none divides."""
    if bits == 8 or in_features <= AUTO_GROUP_SIZE:
        return None
    group_size = AUTO_GROUP_SIZE
    while in_features % group_size and group_size > AUTO_GROUP_MIN:
        group_size -= AUTO_GROUP_STEP
    return group_size if in_features % group_size == 0 else None


def check_quant(bits: int, group_size: int | None, in_features: int, out_features: int, name: str = "layer") -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits}: fake quantization supports {', '.join(map(str, BITS))} bits")
    if bits == 8 and group_size is not None:
        raise ValueError(f"{name}: int8 has one scale per output row, group_size must be None (got {group_size})")
    if group_size is not None and (group_size < 1 or in_features % group_size):
        raise ValueError(f"group_size={group_size} does not divide {name}'s input dim {in_features}")
    if out_features < 2:
        raise ValueError(f"{name} has {out_features} output row: quanto quantizes such a weight per tensor, "
                         "which is not reproduced here; exclude it")


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None):
    """``(codes, scale, shift)`` of a 2-D weight: codes (float, integer-valued) in quanto's grouped
    layout ``(out * in / group_size, group_size)`` (``(out, in)`` without groups), scale and shift
    ``(rows, 1)``; ``shift`` is None for int8."""
    if bits == 8:
        scale = weight.abs().amax(dim=1, keepdim=True) / INT8_QMAX
        codes = torch.clamp(torch.round(weight / scale), -INT8_QMAX - 1, INT8_QMAX)
        return torch.nan_to_num(codes, nan=0.0), scale, None
    grouped = weight.reshape(-1, group_size) if group_size is not None else weight
    low = grouped.amin(dim=1, keepdim=True)
    high = grouped.amax(dim=1, keepdim=True)
    scale = (high - low) / (2**bits - 1)
    shift = -low
    codes = torch.clamp(torch.round((grouped + shift) / scale), 0, 2**bits - 1)
    return torch.nan_to_num(codes, nan=0.0), scale, shift


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                      shape: torch.Size) -> torch.Tensor:
    """The float weight of ``shape`` that :func:`quantize_weight`'s output stands for."""
    values = scale * codes
    if shift is not None:
        values = values - shift
    return values.reshape(shape)


class _StraightThrough(torch.autograd.Function):
    """Forward: the weight rounded to the grid. Backward: the gradient, unchanged (quanto's too)."""

    @staticmethod
    def forward(ctx, weight, bits, group_size):
        return dequantize_weight(*quantize_weight(weight, bits, group_size), weight.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """``weight`` rounded to the ``bits`` grid (quanto's values), with a straight-through gradient."""
    return _StraightThrough.apply(weight, bits, group_size)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` (so PEFT can wrap it) that computes with its float weight fake-quantized to
    ``bits`` with ``group_size`` inputs per scale; the float weight is what trains."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int | None = None, device=None, dtype=None):
        check_quant(bits, group_size, in_features, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits, self.group_size = bits, group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None | str = "auto",
                    name: str = "layer") -> FakeQuantLinear:
        """A fake-quantized layer holding ``linear``'s own weight and bias parameters (not copies).
        ``group_size="auto"`` is quanto's choice (:func:`default_group_size`)."""
        if group_size == "auto":
            group_size = default_group_size(linear.in_features, bits)
        check_quant(bits, group_size, linear.in_features, linear.out_features, name)
        layer = cls(linear.in_features, linear.out_features, bias=False, bits=bits, group_size=group_size,
                    device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits, self.group_size), self.bias)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with (the grid values), without gradient."""
        return fake_quantize(self.weight, self.bits, self.group_size)

    @torch.no_grad()
    def quantized(self):
        """``(codes, scale, shift)`` of the current weight (see :func:`quantize_weight`)."""
        return quantize_weight(self.weight, self.bits, self.group_size)

    def extra_repr(self) -> str:
        groups = f"group_size={self.group_size}" if self.group_size else "per-row scales"
        return f"{super().extra_repr()}, int{self.bits}, {groups}"
