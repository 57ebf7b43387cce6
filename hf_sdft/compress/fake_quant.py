"""Quantization-aware training in plain PyTorch: :class:`FakeQuantLinear` computes with its float
weight rounded to the integer grid (:func:`fake_quantize`) and passes gradients straight through to
the float weight. No optimum-quanto import and no JIT build that needs nvcc: by default (and always
on CPU) a few elementwise ops over the weight at every forward in plain PyTorch, on any device,
under autocast (``F.linear`` casts the rounded weight like any other). On CUDA the min/max grid can
run as one fused kernel instead (:attr:`FakeQuantLinear.compile_grid`, the trainers'
``quant_compile``): ``torch.compile`` of the same function, whose inductor backend generates Triton
there (Triton ships its own compiler), with the same values bit for bit
(:func:`compiled_fake_quant_available`, :func:`fake_quantize`'s ``compiled``; checked on CPU through
inductor's C++ backend by tests/compress/test_compiled_fake_quant.py, which repeats it on CUDA).

The grid is optimum-quanto 0.2.7's, value for value (tests/compress/test_fake_quant.py checks it against
quanto's ``dequantize()``), so a student trained here and saved in quanto's format
(:mod:`hf_sdft.compress.quantize`) computes what was trained:

- int8: symmetric per output row, ``scale = max|w| / 127``, ``code = clamp(round(w / scale), -128, 127)``,
  ``value = scale * code``;
- int4 / int2: affine per group of ``group_size`` consecutive inputs of a row (per row when
  ``group_size`` is None), ``scale = (max - min) / (2^bits - 1)``, ``shift = -min``,
  ``code = clamp(round((w + shift) / scale), 0, 2^bits - 1)``, ``value = scale * code - shift``.

Two more grids for deployment (:mod:`hf_sdft.export` writes them exactly):

- ``symmetric`` int4 / int2: ``scale = max|w| / ((2^bits - 1) / 2)``, ``q = clamp(round(w / scale),
  -2^(bits-1), 2^(bits-1) - 1)``, ``value = scale * q``: compressed-tensors' symmetric ``pack-quantized``
  and GGUF's Q4_0 (quanto stores it too, as codes ``q + 2^(bits-1)`` with ``shift = 2^(bits-1) * scale``);
- ``fp16_scales`` (either grid): scale and shift rounded to float16 values, as GGUF stores them.

A constant group (scale 0, e.g. a pruned all-zero group) gets code 0, as quanto's uint8 cast of
NaN does on CPU. The math runs in the weight's own dtype, as quanto's does (float32 for hf-sdft's
students).

Beyond quanto's min/max grid, a layer can hold its scale and shift (:meth:`FakeQuantLinear.hold_scales`):
the per-group clipping range found by :func:`clip_search`, and/or scales and shifts trained with
the loss (LSQ-style straight-through gradients). quanto's tensors take any float scale and shift
(``value = scale * code - shift``), so the saved model still computes exactly what was trained.
"""

from __future__ import annotations

import functools
import importlib.util
import types

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


SCALE_NAMES = ("weight_scale", "weight_shift")  # a FakeQuantLinear's held grid (parameters when learned)


def is_scale_parameter(name: str) -> bool:
    """Whether the parameter named ``name`` (e.g. ``model.layers.0.mlp.up_proj.weight_scale``) is a
    held quantization scale or shift, which the trainers put in an optimizer group of its own."""
    return name.rsplit(".", 1)[-1] in SCALE_NAMES


SCALES_LR_RATIO = 0.1  # learned scales' learning rate ÷ the weights' (the one default of quant_scales_lr_ratio)


def split_scale_parameters(named) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(others, scales)``: the parameters of ``named`` (``(name, parameter)`` pairs) that require a
    gradient, the held quantization scales and shifts (:func:`is_scale_parameter`) apart."""
    others, scales = [], []
    for name, p in named:
        if p.requires_grad:
            (scales if is_scale_parameter(name) else others).append(p)
    return others, scales


def scale_group(params, lr: float, ratio: float = SCALES_LR_RATIO) -> dict:
    """The optimizer group of learned scales and shifts: learning rate ``lr × ratio``, no weight decay
    (the trainers' :meth:`create_optimizer` and block reconstruction both build it here)."""
    return {"params": list(params), "lr": lr * ratio, "weight_decay": 0.0}


def code_range(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """The integer codes of ``bits``: ``(-128, 127)`` for int8; for int4 / int2 ``(0, 2^bits - 1)``
    on quanto's asymmetric grid, ``(-2^(bits-1), 2^(bits-1) - 1)`` on the symmetric one."""
    if bits == 8:
        return -INT8_QMAX - 1, INT8_QMAX
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def symmetric_divisor(bits: int) -> float:
    """``scale = max|w| / divisor`` on a symmetric min/max grid: 127 for int8 (quanto's), else half the
    code span, ``(2^bits - 1) / 2`` (7.5 for int4, 1.5 for int2: llm-compressor's round-to-nearest
    start, so that ``±max|w|`` fall on the two extreme codes' rounding edges)."""
    return INT8_QMAX if bits == 8 else (2**bits - 1) / 2


def to_fp16_grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 value, in its own dtype: GGUF stores block scales as
    float16, so a scale kept on this grid exports exactly."""
    return x.to(torch.float16).to(x.dtype)


class _Through(torch.autograd.Function):
    """Forward: ``fn(x)``. Backward: the gradient, unchanged (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` forward (a rounding onto some grid), identity backward: how every grid here rounds
    a weight or a learned scale (``torch.round`` for integer codes, :func:`to_fp16_grid` for float16
    scales, the FP4 grids of :mod:`hf_sdft.compress.fp4`)."""
    return _Through.apply(x, fn)


def code_offset(bits: int) -> int:
    """What a symmetric int4 / int2 code gains when stored unsigned (quanto's codes, GGUF's nibbles,
    compressed-tensors' packed values): ``2^(bits-1)``."""
    return 2 ** (bits - 1)


def stored_symmetric(bits: int, scale: torch.Tensor, shift: torch.Tensor | None) -> bool:
    """Whether an unsigned-code grid ``scale * code - shift`` (quanto's storage) is a symmetric one
    stored with offset codes: int8 (no shift), or ``shift == 2^(bits-1) * scale`` in every group."""
    return shift is None or (bits < 8 and torch.equal(shift, code_offset(bits) * scale))


def on_fp16_grid(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor holds float16 values only (:func:`to_fp16_grid` leaves it unchanged)."""
    return all(t is None or torch.equal(to_fp16_grid(t), t) for t in tensors)


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    return weight.reshape(-1, group_size) if group_size is not None else weight


def _bounds(grouped: torch.Tensor, bits: int, symmetric: bool):
    """``(low, high)`` ``(rows, 1)`` of grouped weights: ``(None, max|w|)`` for a symmetric grid
    (int8 always), else ``(min, max)``."""
    if bits == 8 or symmetric:
        return None, grouped.abs().amax(dim=1, keepdim=True)
    return grouped.amin(dim=1, keepdim=True), grouped.amax(dim=1, keepdim=True)


def grid_divisor(bits: int, symmetric: bool) -> float:
    """What a min/max grid divides its range by: :func:`symmetric_divisor` (int8 always), else
    ``2^bits - 1`` (quanto's asymmetric ``(max - min) / (2^bits - 1)``)."""
    return symmetric_divisor(bits) if bits == 8 or symmetric else 2**bits - 1


def _scales_from(low, high, bits: int, ratio, fp16_scales: bool, divisor=None):
    """``(scale, shift)`` of the range ``[ratio·low, ratio·high]`` (see :func:`minmax_scales`);
    ``divisor`` (default :func:`grid_divisor`) may be given as a tensor (see :func:`_compiled_rounder`)."""
    if divisor is None:
        divisor = grid_divisor(bits, low is None)
    if low is None:
        scale, shift = ratio * high / divisor, None
    else:
        low, high = ratio * low, ratio * high
        scale, shift = (high - low) / divisor, -low
    if fp16_scales:
        scale, shift = to_fp16_grid(scale), None if shift is None else to_fp16_grid(shift)
    return scale, shift


def minmax_scales(weight: torch.Tensor, bits: int, group_size: int | None = None, ratio=1.0,
                  symmetric: bool = False, fp16_scales: bool = False):
    """The min/max grid's ``(scale, shift)`` ``(rows, 1)`` of a 2-D weight, the range shrunk by
    ``ratio`` (a float or a ``(rows, 1)`` tensor): int8 ``scale = ratio * max|w| / 127`` (shift
    None); int4 / int2 asymmetric ``min' = ratio * min``, ``max' = ratio * max``,
    ``scale = (max' - min') / (2^bits - 1)``, ``shift = -min'``; symmetric
    ``scale = ratio * max|w| / symmetric_divisor(bits)`` (shift None). ``ratio=1``, asymmetric,
    without ``fp16_scales`` is quanto's own choice, bit for bit; ``fp16_scales`` rounds scale and
    shift to float16 values (:func:`to_fp16_grid`)."""
    return _scales_from(*_bounds(_grouped(weight, group_size), bits, symmetric), bits, ratio, fp16_scales)


def codes_with(weight: torch.Tensor, bits: int, group_size: int | None, scale: torch.Tensor,
               shift: torch.Tensor | None) -> torch.Tensor:
    """Codes of ``weight`` on a given grid, in the grouped layout: ``clamp(round((w + shift) / scale),
    lo, hi)`` (no shift for int8), differentiable in ``weight``, ``scale`` and ``shift`` with
    straight-through rounding (LSQ): inside the range ``d code / d w = 1 / scale``, outside 0. A
    zero scale (a constant group) divides by 1 instead: its values are ``-shift`` whatever the code.
    A grid without shift is symmetric (signed codes, see :func:`code_range`)."""
    lo, hi = code_range(bits, symmetric=shift is None)
    return torch.clamp(straight_through(torch.round, _in_steps(_grouped(weight, group_size), scale, shift)), lo, hi)


def _in_steps(grouped: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``(w + shift) / scale`` (grouped), the value a code rounds; a zero scale divides by 1."""
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (grouped if shift is None else grouped + shift) / divisor


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                    symmetric: bool = False, fp16_scales: bool = False):
    """``(codes, scale, shift)`` of a 2-D weight: codes (float, integer-valued) in quanto's grouped
    layout ``(out * in / group_size, group_size)`` (``(out, in)`` without groups), scale and shift
    ``(rows, 1)``; ``shift`` is None for int8 and symmetric grids. Without ``scale`` the grid is the
    min/max one (:func:`minmax_scales`); with ``scale`` (and ``shift`` for an asymmetric grid) the
    codes are :func:`codes_with` that grid's (``fp16_scales``: the given scale and shift rounded to
    float16 values first, as the layer computes with them)."""
    if scale is not None:
        if fp16_scales:
            scale, shift = to_fp16_grid(scale), None if shift is None else to_fp16_grid(shift)
        return codes_with(weight, bits, group_size, scale, shift), scale, shift
    scale, shift = minmax_scales(weight, bits, group_size, symmetric=symmetric, fp16_scales=fp16_scales)
    return _minmax_codes(_grouped(weight, group_size), scale, shift, bits, symmetric), scale, shift


def _minmax_codes(grouped: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, bits: int,
                  symmetric: bool) -> torch.Tensor:
    """The min/max grid's codes of grouped weights (float, integer-valued)."""
    codes = torch.clamp(torch.round((grouped if shift is None else grouped + shift) / scale),
                        *code_range(bits, symmetric))
    return torch.nan_to_num(codes, nan=0.0)  # a constant group's 0 / 0: code 0, as quanto's


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                      shape: torch.Size) -> torch.Tensor:
    """The float weight of ``shape`` that :func:`quantize_weight`'s output stands for (quanto's
    ``scale * code - shift``, in that order)."""
    values = scale * codes
    if shift is not None:
        values = values - shift
    return values.reshape(shape)


def _minmax_rounded(weight: torch.Tensor, divisor, bits: int, group_size: int | None, symmetric: bool,
                    fp16_scales: bool) -> torch.Tensor:
    """``weight`` rounded to its min/max grid (:func:`quantize_weight` then :func:`dequantize_weight`),
    ``divisor`` the grid's (:func:`grid_divisor`): the function that eager and compiled forwards share."""
    grouped = _grouped(weight, group_size)
    scale, shift = _scales_from(*_bounds(grouped, bits, symmetric), bits, 1.0, fp16_scales, divisor)
    return dequantize_weight(_minmax_codes(grouped, scale, shift, bits, symmetric), scale, shift, weight.shape)


# inductor options that keep eager's float32 arithmetic op for op, so that the grid stays quanto's
# bit for bit: no elided float16 round trip (fp16_scales) and no fused multiply-add in Triton
# (emulate_precision_casts), IEEE division in Triton instead of its approximate one, no flushed
# subnormals (eager_numerics). emulate_precision_casts also points Triton at the CUDA toolkit's
# libdevice where there is one (else a warning, Triton's own: only pow and the like differ)
EXACT_INDUCTOR = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                  "eager_numerics.disable_ftz": True}


@functools.cache
def _compiled_rounder(bits: int, group_size: int | None, symmetric: bool, fp16_scales: bool, shape: torch.Size,
                      dtype: torch.dtype, device: torch.device):
    """:func:`_minmax_rounded` compiled for one layer kind, as ``weight -> rounded weight``.

    Each key compiles a fresh copy of the function's code: dynamo keeps its graphs, and counts its
    recompilations (8 at most, a hard error under ``fullgraph``), per code object, so one copy per
    static shape and grid compiles exactly once. The divisor is a tensor input, not a constant:
    inductor turns a division by a constant into a multiplication by its reciprocal on GPUs, which
    is not the same float."""
    fresh = types.FunctionType(_minmax_rounded.__code__.replace(), _minmax_rounded.__globals__, "_minmax_rounded")
    compiled = torch.compile(fresh, fullgraph=True, dynamic=False, options=EXACT_INDUCTOR)
    divisor = torch.tensor(grid_divisor(bits, symmetric), dtype=dtype, device=device)
    return lambda weight: compiled(weight, divisor, bits, group_size, symmetric, fp16_scales)


TRITON_MIN_CAPABILITY = 7  # Triton's oldest supported GPU generation (Volta, sm_70)


def compiled_fake_quant_available(device) -> bool:
    """Whether the compiled min/max grid (:func:`fake_quantize`'s ``compiled``) runs by default on
    ``device``: a CUDA GPU that Triton supports (compute capability 7.0+) with Triton importable,
    where inductor generates a Triton kernel (no nvcc, no C++ build). False on CPU, which keeps the
    pure-PyTorch path (inductor's CPU backend would build C++ with the system compiler)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= TRITON_MIN_CAPABILITY


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
                  scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                  symmetric: bool = False, fp16_scales: bool = False, compiled: bool = False) -> torch.Tensor:
    """``weight`` rounded to the ``bits`` grid. Without ``scale``: the min/max grid recomputed from
    ``weight`` (:func:`minmax_scales`; quanto's values when asymmetric without ``fp16_scales``), the
    gradient passed straight through unchanged. With a held ``scale`` / ``shift``:
    ``scale * clamp(round((w + shift) / scale), lo, hi) - shift`` (no shift: symmetric), gradients
    by autograd with straight-through rounding (LSQ): to ``w`` inside the range only, to ``scale``
    ``code - (w + shift) / scale`` inside and ``code`` outside, to ``shift`` 0 inside and -1 outside
    (summed over each group). ``fp16_scales`` computes with the held scale and shift rounded to
    float16 values, the gradient passed straight through that rounding.

    ``compiled`` (min/max grid only; a held grid stays eager): the forward as one fused kernel
    (``torch.compile`` of the same function, compiled once per weight shape, dtype, device and grid),
    the same values bit for bit; on any device (CPU too, for the tests), though only where
    :func:`compiled_fake_quant_available` do the trainers ask for it."""
    if scale is None:
        if compiled:
            rounder = _compiled_rounder(bits, group_size, symmetric, fp16_scales, weight.shape, weight.dtype,
                                        weight.device)
        else:
            rounder = functools.partial(_minmax_rounded, divisor=grid_divisor(bits, symmetric), bits=bits,
                                        group_size=group_size, symmetric=symmetric, fp16_scales=fp16_scales)
        return straight_through(rounder, weight)
    if fp16_scales:
        scale = straight_through(to_fp16_grid, scale)
        shift = None if shift is None else straight_through(to_fp16_grid, shift)
    return dequantize_weight(codes_with(weight, bits, group_size, scale, shift), scale, shift, weight.shape)


def forget_grids(model: nn.Module) -> None:
    """Drop the fake-quantized weights that ``reuse_grid`` layers keep: call after every weight
    update (hf-sdft's trainers do, from the optimizer's step hook). A layer also recomputes when its
    weight's or grid's version counter moves, but optimizers do not always move it."""
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            module._reused = None


class _Reused(torch.autograd.Function):
    """Forward: a fake-quantized weight computed earlier for this very weight. Backward: the weight's
    gradient as :func:`fake_quantize` gives it: unchanged (min/max grid), or only inside the held
    grid's range (``inside``, a boolean mask of the weight's shape)."""

    @staticmethod
    def forward(ctx, weight, quantized, inside):
        ctx.inside = inside
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.inside is None else grad * ctx.inside), None, None


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` (so PEFT can wrap it) that computes with its float weight fake-quantized to
    ``bits`` with ``group_size`` inputs per scale; the float weight is what trains.

    By default the grid (scale, shift) is quanto's min/max one, recomputed from the weight at every
    forward. :meth:`hold_scales` makes the layer hold its grid instead: ``weight_scale`` and
    ``weight_shift`` ``(rows, 1)`` (rows: groups, or output rows), as buffers (fixed, e.g. from
    :func:`clip_search`) or as parameters trained with the loss (``learnable``, LSQ / OmniQuant
    style, see :func:`fake_quantize`), named ``weight_scale`` / ``weight_shift``: hf-sdft's trainers
    give them a group of their own (:func:`scale_group`: learning rate × ``quant_scales_lr_ratio``, no
    weight decay); a plain optimizer treats them as any parameter. Saving writes the codes on
    the held grid and the held scale and shift themselves, so the saved model computes what was
    trained.

    ``symmetric`` (int4 / int2) puts the layer on the deployment grid of compressed-tensors and GGUF
    (``scale * q``, q signed, no zero point) instead of quanto's asymmetric one; ``fp16_scales``
    keeps every scale and shift it computes with on float16 values, so that formats storing float16
    scales (GGUF) export it exactly.

    ``reuse_grid`` (off by default) computes the fake-quantized weight once per weight update and
    reuses it until the weight (or its held grid) changes: across gradient-accumulation micro-batches
    and the recompute of gradient checkpointing, one fake-quantization per optimizer step instead of
    one per forward, at the cost of keeping that weight (and, on a held grid, a boolean in-range
    mask) between forwards; :func:`forget_grids` after every weight update (hf-sdft's trainers call
    it). Values and gradients are those of :func:`fake_quantize`; learned scales never reuse (their
    gradient needs the whole computation).

    ``compile_grid`` (off by default; the trainers turn it on where
    :func:`compiled_fake_quant_available`) computes the min/max grid as one fused kernel
    (:func:`fake_quantize`'s ``compiled``), the same values and gradients; a held grid stays eager."""

    reuse_grid: bool = False
    compile_grid: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int | None = None, device=None, dtype=None, symmetric: bool = False,
                 fp16_scales: bool = False):
        check_quant(bits, group_size, in_features, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits, self.group_size = bits, group_size
        self.symmetric, self.fp16_scales = symmetric or bits == 8, fp16_scales
        self.weight_scale: torch.Tensor | None = None
        self.weight_shift: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None | str = "auto",
                    name: str = "layer", symmetric: bool = False, fp16_scales: bool = False) -> FakeQuantLinear:
        """A fake-quantized layer holding ``linear``'s own weight and bias parameters (not copies).
        ``group_size="auto"`` is quanto's choice (:func:`default_group_size`)."""
        if group_size == "auto":
            group_size = default_group_size(linear.in_features, bits)
        check_quant(bits, group_size, linear.in_features, linear.out_features, name)
        layer = cls(linear.in_features, linear.out_features, bias=False, bits=bits, group_size=group_size,
                    device="meta", symmetric=symmetric, fp16_scales=fp16_scales)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @property
    def holds_scales(self) -> bool:
        return self.weight_scale is not None

    @property
    def learns_scales(self) -> bool:
        return isinstance(self.weight_scale, nn.Parameter)

    @torch.no_grad()
    def hold_scales(self, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                    learnable: bool = False) -> FakeQuantLinear:
        """Hold the grid from now on: ``scale`` / ``shift`` ``(rows, 1)`` (default: the min/max
        grid of the current weight), as parameters when ``learnable``, else as buffers."""
        if scale is None:
            scale, shift = minmax_scales(self.weight.detach(), self.bits, self.group_size, symmetric=self.symmetric,
                                         fp16_scales=self.fp16_scales)
        rows = self.out_features * (self.in_features // self.group_size if self.group_size else 1)
        if scale.shape != (rows, 1) or (shift is None) != self.symmetric or (
                shift is not None and shift.shape != (rows, 1)):
            raise ValueError(f"int{self.bits} scale / shift of shape ({rows}, 1) expected (shift None for int8 and "
                             f"symmetric grids), got {tuple(scale.shape)} / "
                             f"{None if shift is None else tuple(shift.shape)}")
        like = self.weight
        for name, value in zip(SCALE_NAMES, (scale, shift)):
            if name in self._parameters:
                del self._parameters[name]
            if name in self._buffers:
                del self._buffers[name]
            if hasattr(self, name):
                delattr(self, name)
            if value is None:
                setattr(self, name, None)
            elif learnable:
                self.register_parameter(name, nn.Parameter(value.detach().to(like.device, like.dtype).clone()))
            else:
                self.register_buffer(name, value.detach().to(like.device, like.dtype).clone())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._fake_quantized(), self.bias)

    def _fake_quantized(self) -> torch.Tensor:
        if not self.reuse_grid or self.learns_scales:  # the grid from the weight, every forward
            return self._fake_quantized_now()
        held = [t for t in (self.weight, self.weight_scale, self.weight_shift) if t is not None]
        key = tuple((t.data_ptr(), t._version) for t in held)  # an optimizer step or a new grid changes it
        cached = getattr(self, "_reused", None)
        if cached is None or cached[0] != key:
            cached = (key, *self._grid_and_range())
            self._reused = cached
        return _Reused.apply(self.weight, cached[1], cached[2])

    @torch.no_grad()
    def _grid_and_range(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fake-quantized weight and where :func:`fake_quantize` passes the weight's gradient:
        everywhere on the min/max grid (None), inside the range on a held grid (a nonzero scale)."""
        quantized = self._fake_quantized_now()  # the values are fake_quantize's own, by construction
        if not self.holds_scales:
            return quantized, None
        scale, shift = self.weight_scale, self.weight_shift
        if self.fp16_scales:  # as fake_quantize computes with them
            scale, shift = to_fp16_grid(scale), None if shift is None else to_fp16_grid(shift)
        rounded = torch.round(_in_steps(_grouped(self.weight, self.group_size), scale, shift))
        lo, hi = code_range(self.bits, symmetric=shift is None)
        inside = (rounded >= lo) & (rounded <= hi) & (scale != 0)
        return quantized, inside.reshape(self.weight.shape)

    def _fake_quantized_now(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.bits, self.group_size, self.weight_scale, self.weight_shift,
                             symmetric=self.symmetric, fp16_scales=self.fp16_scales, compiled=self.compile_grid)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with (the grid values), without gradient."""
        return self._fake_quantized()

    @torch.no_grad()
    def quantized(self):
        """``(codes, scale, shift)`` of the current weight (see :func:`quantize_weight`): the codes
        and the very scale and shift the layer computes with."""
        return quantize_weight(self.weight, self.bits, self.group_size, self.weight_scale, self.weight_shift,
                               symmetric=self.symmetric, fp16_scales=self.fp16_scales)

    def extra_repr(self) -> str:
        groups = f"group_size={self.group_size}" if self.group_size else "per-row scales"
        held = ", learned scales" if self.learns_scales else ", held scales" if self.holds_scales else ""
        grid = ", symmetric" if self.symmetric and self.bits != 8 else ""
        fp16 = ", float16 scales" if self.fp16_scales else ""
        return f"{super().extra_repr()}, int{self.bits}{grid}, {groups}{held}{fp16}"


CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5
CLIP_SWEEPS = 2  # coordinate-descent sweeps over a row's groups (the exact error, cross terms included)
CLIP_TOKENS = 512  # calibration tokens per layer kept for the search (AWQ's auto_clip uses 512 too)


def _group_errors(inputs: torch.Tensor, delta: torch.Tensor, group_size: int | None,
                  gram: torch.Tensor | None) -> torch.Tensor:
    """Per (output row, group) error ``‖X_g δ_{o,g}‖²`` flat in quanto's grouped row order
    ``(out * groups,)``: through the groups' Gram matrices ``X_gᵀX_g`` when given (cheaper when the
    group is smaller than the token count), else through the inputs."""
    out, inp = delta.shape
    size = group_size or inp
    groups = inp // size
    d = delta.reshape(out, groups, size).transpose(0, 1)  # (groups, out, size)
    if gram is not None:
        return (torch.bmm(d, gram) * d).sum(-1).transpose(0, 1).reshape(-1)  # gram (groups, size, size)
    x = inputs.reshape(-1, groups, size).transpose(0, 1)  # (groups, tokens, size)
    return torch.bmm(x, d.transpose(1, 2)).pow(2).sum(1).transpose(0, 1).reshape(-1)


def _grid_error(grouped: torch.Tensor, bits: int, low: torch.Tensor | None, high: torch.Tensor, r: float,
                fp16_scales: bool = False):
    """``w - ŵ`` (grouped) on the grid of ratio ``r`` (:func:`minmax_scales` from the groups' ``low``
    / ``high``; ``low`` None and ``high`` = max|w| for a symmetric grid), ŵ as :func:`fake_quantize`
    computes it, in place."""
    scale, shift = _scales_from(low, high, bits, r, fp16_scales)
    lo, hi = code_range(bits, symmetric=shift is None)
    v = _in_steps(grouped, scale, shift).round_().clamp_(lo, hi).mul_(scale)
    if shift is not None:
        v.sub_(shift)
    return torch.sub(grouped, v, out=v)


def _coordinate_descent(x: torch.Tensor, grouped: torch.Tensor, bits: int, low, high, ratio: torch.Tensor,
                        ratios: tuple[float, ...], group_size: int, sweeps: int,
                        gram: torch.Tensor | None = None, fp16_scales: bool = False) -> torch.Tensor:
    """Refine per-group ratios ``(rows, 1)`` on the exact row error ``‖X (w_o − ŵ_o)‖²``, cross
    terms included: group by group (all rows at once), the grid's ratio least for the row given the
    other groups' current ones; a change only where it lowers the error, so the error never rises.
    Sweeps until none changes (then every group's ratio is the grid's best given the others) or
    ``sweeps`` are done. With ``R = X (w_o − ŵ_o)`` minus group g's share, the candidates' errors
    differ by ``2 (X_gᵀR)·δ + δᵀ (X_gᵀX_g) δ``: per group one product with the tokens and one
    with the group's Gram matrix per ratio."""
    tokens, inp = x.shape
    groups = inp // group_size
    out = grouped.shape[0] // groups
    grid = torch.tensor(ratios, device=x.device, dtype=torch.float32)
    idx = (ratio.reshape(out, groups, 1) == grid).float().argmax(-1)  # (out, groups) indices into the grid
    wg = grouped.reshape(out, groups, group_size)
    lowg, highg = (None if low is None else low.reshape(out, groups, 1)), high.reshape(out, groups, 1)
    xg = x.reshape(tokens, groups, group_size)
    if gram is None:
        xt = xg.transpose(0, 1)
        gram = torch.bmm(xt.transpose(1, 2), xt)  # (groups, size, size)
    rows = torch.arange(out, device=x.device)
    for _ in range(sweeps):
        delta = _grid_error(grouped, bits, low, high, grid[idx].reshape(-1, 1), fp16_scales).reshape(out, inp)
        residual = x @ delta.T  # (tokens, out): X (w_o - ŵ_o) for every row
        changed = False
        for g in range(groups):
            d = _grid_error(wg[None, :, g], bits, None if lowg is None else lowg[None, :, g], highg[None, :, g],
                            grid[:, None, None], fp16_scales)  # (ratios, out, size)
            pick = idx[:, g]
            current = d[pick, rows]  # (out, size)
            rest = residual - xg[:, g] @ current.T  # the row's error without group g's share
            q = rest.T @ xg[:, g]  # (out, size)
            err = (d * (2 * q + torch.matmul(d, gram[g]))).sum(-1)  # (ratios, out), up to ‖rest‖²
            best_err, best = err.min(0)
            switch = best_err < err[pick, rows]
            if switch.any():
                pick = torch.where(switch, best, pick)
                idx[:, g] = pick
                changed = True
            residual = rest + xg[:, g] @ d[pick, rows].T
        if not changed:
            break
    return grid[idx].reshape(-1, 1)


@torch.no_grad()
def clip_search(weight: torch.Tensor, bits: int, group_size: int | None, inputs: torch.Tensor,
                ratios: tuple[float, ...] = CLIP_RATIOS, sweeps: int = CLIP_SWEEPS, symmetric: bool = False,
                fp16_scales: bool = False):
    """Per-group clipping (AWQ's auto_clip, BitDistiller's asymmetric clipping) on quanto's grid:
    for each group (or output row without groups) a shrink ratio ``r`` of ``ratios``, the grid
    :func:`minmax_scales` (``min' = r·min``, ``max' = r·max``; int8 ``r·max|w|``), chosen for the
    least layer-output error ``‖X (W − Ŵ)ᵀ‖²`` on the calibration inputs ``X`` ``(tokens, in)``.

    That error is a sum over output rows; without groups each row's ratio is the grid's best
    (exact). With groups, the groups of a row interact (``‖Σ_g X_g δ_g‖²`` has cross terms): first
    each group takes the ratio least for its own share ``‖X_g δ_g‖²`` (AWQ's auto_clip, through
    the groups' Gram matrices ``X_gᵀX_g``), a row whose full error came out larger than with the
    plain grid goes back to it, then up to ``sweeps`` sweeps of coordinate descent over the groups
    on the exact row error (:func:`_coordinate_descent`). The error never exceeds the plain grid's.
    ``ratios`` must start with 1.0 (the plain grid). ``symmetric`` / ``fp16_scales``: the search
    runs on that grid (a symmetric grid shrinks ``max|w|``), every candidate's scales as the layer
    would compute with them.

    Returns ``(scale, shift, ratio)``, each ``(rows, 1)`` (``shift`` None for int8).

    Its cost per layer and its effect before training on the embedded model are measured in
    ``benchmarks/costs.md``."""
    if not ratios or ratios[0] != 1.0:
        raise ValueError(f"ratios must start with 1.0 (quanto's plain grid), got {ratios}")
    w = weight.detach().float()
    x = inputs.detach().to(w.device, torch.float32).reshape(-1, w.shape[1])
    size = group_size or w.shape[1]
    gram = None
    if size <= x.shape[0]:
        xg = x.reshape(-1, w.shape[1] // size, size).transpose(0, 1)  # (groups, tokens, size)
        gram = torch.bmm(xg.transpose(1, 2), xg)
    grouped = _grouped(w, group_size)
    low, high = _bounds(grouped, bits, symmetric)
    best_err = best_ratio = None
    for r in ratios:
        err = _group_errors(x, _grid_error(grouped, bits, low, high, r, fp16_scales).reshape(w.shape), group_size,
                            gram)
        if best_err is None:
            best_err, best_ratio = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, r, best_ratio)
    ratio = best_ratio[:, None]
    chosen = ratio.reshape(w.shape[0], -1)
    if group_size is not None and w.shape[1] > group_size:
        if (chosen != 1.0).any():  # rows the cross terms made worse go back to the plain grid
            def row_error(r):
                return (x @ _grid_error(grouped, bits, low, high, r, fp16_scales).reshape(w.shape).T).pow(2).sum(0)

            worse = row_error(ratio) > row_error(1.0)
            ratio = torch.where(worse[:, None], 1.0, chosen).reshape(-1, 1)
        if sweeps:
            ratio = _coordinate_descent(x, grouped, bits, low, high, ratio, ratios, group_size, sweeps, gram,
                                        fp16_scales)
    scale, shift = minmax_scales(w, bits, group_size, ratio, symmetric, fp16_scales)
    dtype = weight.dtype
    return scale.to(dtype), None if shift is None else shift.to(dtype), ratio
