"""FP4 quantization-aware training in plain PyTorch: NVFP4 and MXFP4 fake quantization with a
straight-through gradient, on the formats' exact grids (no kernel, any device).

Both formats store E2M1 elements, ``±{0, 0.5, 1, 1.5, 2, 3, 4, 6}``, rounded to the nearest value
with ties to the even code (codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6: a tie such as 2.5 goes to
2, 5 to 4, 0.25 to 0), after clamping to ±6. That is compressed-tensors 0.20.1's ``cast_to_fp4``
(its thresholds ``<= 0.25 → 0``, ``< 0.75 → 0.5``, ``<= 1.25 → 1``, ...) and the OCP MX spec's
round-to-nearest-even.

**NVFP4** (compressed-tensors ``nvfp4-pack-quantized``): blocks of 16 consecutive inputs of a row,
one FP8-E4M3 scale ``s`` per block and one FP32 global scale ``g`` per tensor; the value is
``e2m1 * (s / g)`` (the library divides the block scale by the global scale, in float32, then
multiplies). As the library computes them (``generate_gparam``, ``calculate_qparams``):
``g = 448 * 6 / max|W|`` and ``s = e4m3(g * (max|block| / 6))`` (a cast with round-to-nearest-even,
clamped to ±448; a scale that rounds to 0 becomes 0.125, the library's E4M3 eps). The element is
``e2m1(clamp(w / (s / g), -6, 6))``.

``global_scale="pow2"`` (hf-sdft's default) takes ``g`` down to a power of two,
``2^floor(log2(448 * 6 / max|W|))``: a valid NVFP4 global scale that makes ``s / g`` and every
value ``e2m1 * s / g`` exact in bfloat16 and float32 whatever the order of the operations. That is
what makes the export bit-exact: transformers decompresses ``nvfp4-pack-quantized`` in bfloat16
(``bf16(e2m1 * fl32(s / g))``), which would round the library's own ``g = 2688 / max|W|`` values.
``global_scale="minmax"`` is the library's ``g`` exactly (checked against compressed-tensors in
tests/compress/test_fp4.py; its export through transformers is not exact and is refused).

**MXFP4** (OCP MX v1.0; compressed-tensors ``mxfp4-pack-quantized``; GGUF ``MXFP4``): blocks of
32, one E8M0 (power of two) scale ``2^k`` per block, value ``e2m1 * 2^k``, no global scale. The
formats agree on the value and differ in how ``k`` is picked from the block's ``amax``:

- OCP spec and ggml / gguf-py's quantizer: ``k = floor(log2(amax)) - 2`` (elements above 6 clip);
- compressed-tensors (``generate_mx_scales``): ``amax`` first rounded to a power of two, up when its
  mantissa is at least 1.75, then ``floor(log2(.)) - 2`` (less clipping).

``mx_scale_rule="compressed-tensors"`` is the default (its error is never larger on a block that the
OCP rule clips by more than 7/6); ``"ocp"`` is the spec's. Either is stored exactly by both
formats (E8M0 byte ``k + 127``; GGUF's block keeps the same byte, its elements doubled with a
halved scale). An all-zero block gets ``k = -127`` (byte 0), as in both libraries.

Held and learned scales (:meth:`FP4FakeQuantLinear.hold_scales`): the block scales can be held
(from :func:`fp4_clip_search`, a per-block shrink of ``amax``) and trained with the loss; the layer
then computes with them rounded to their format's grid (E4M3, or a power of two), the gradient
passed straight through that rounding. The global scale is held but not learned: with the block
scales recomputed or held on E4M3, a power-of-two ``g`` only moves where they sit in E4M3's range
(scaling by 2 changes no value), so it has nothing to learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_sdft.compress.fake_quant import straight_through

FP4_FORMATS = ("nvfp4", "mxfp4")
BLOCK = {"nvfp4": 16, "mxfp4": 32}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E4M3_EPS = 0.125  # compressed-tensors' replacement of a zero E4M3 scale
E8M0_MIN, E8M0_MAX = -127, 127  # k of 2^k an E8M0 byte holds (byte 255 is NaN)
GLOBAL_SCALE_MODES = ("pow2", "minmax")
MX_SCALE_RULES = ("compressed-tensors", "ocp")
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def check_fp4(fmt: str, in_features: int, name: str = "layer") -> None:
    if fmt not in FP4_FORMATS:
        raise ValueError(f"{name}: FP4 format {fmt!r} unknown: choose one of {', '.join(FP4_FORMATS)}")
    if in_features % BLOCK[fmt]:
        raise ValueError(f"{name}: {fmt} needs input dims that are multiples of {BLOCK[fmt]}, got {in_features}; "
                         "exclude it")


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Magnitude codes 0..7 of ``|x|`` clamped to 6, nearest E2M1 value, ties to the even code."""
    a = x.abs().clamp(max=E2M1_MAX)
    mids = torch.tensor(_MIDPOINTS, dtype=a.dtype, device=a.device)
    idx = torch.bucketize(a, mids)  # a tie (a == mids[i]) lands on the lower code i
    tie = a == mids[idx.clamp(max=len(_MIDPOINTS) - 1)]
    return torch.where(tie & (idx % 2 == 1), idx + 1, idx)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to ±6 and rounded to the nearest E2M1 value (ties to even), in its dtype."""
    values = torch.tensor(E2M1_VALUES, dtype=x.dtype, device=x.device)
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype) * values[e2m1_codes(x)]


class _ValueThrough(torch.autograd.Function):
    """Forward: ``value`` (computed without gradient). Backward: the gradient to ``weight``, unchanged
    (``weight + (value - weight).detach()`` would not return ``value`` bit for bit)."""

    @staticmethod
    def forward(ctx, weight, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the FP8-E4M3 grid, as compressed-tensors rounds a scale: clamp to ±448, cast
    (round-to-nearest-even), back to ``x``'s dtype."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def _e4m3_scale(x: torch.Tensor) -> torch.Tensor:
    """A block scale on the E4M3 grid, never 0 (``E4M3_EPS`` instead)."""
    s = to_e4m3(x)
    return torch.where(s == 0, torch.full_like(s, E4M3_EPS), s)


def _e8m0_scale(x: torch.Tensor) -> torch.Tensor:
    """``2^round(log2 x)`` with ``k`` in E8M0's range."""
    k = torch.round(torch.log2(x.clamp(min=2.0**E8M0_MIN))).clamp(E8M0_MIN, E8M0_MAX)
    return torch.exp2(k).to(x.dtype)


def nvfp4_global_scale(weight: torch.Tensor, mode: str = "pow2") -> torch.Tensor:
    """The per-tensor FP32 global scale ``(1,)``: compressed-tensors' ``448 * 6 / max|W|`` (``minmax``)
    or that taken down to a power of two (``pow2``)."""
    if mode not in GLOBAL_SCALE_MODES:
        raise ValueError(f"fp4_global_scale={mode!r}: choose one of {', '.join(GLOBAL_SCALE_MODES)}")
    amax = weight.detach().abs().amax().float()
    amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny)
    g = torch.nan_to_num(E4M3_MAX * E2M1_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)
    if mode == "pow2":
        g = torch.exp2(torch.floor(torch.log2(g)))
    return g.reshape(1)


def block_amax(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``max|w|`` per block ``(rows * blocks, 1)``, in float32."""
    return weight.float().reshape(-1, block).abs().amax(-1, keepdim=True)


def nvfp4_block_scales(weight: torch.Tensor, global_scale: torch.Tensor, ratio=1.0) -> torch.Tensor:
    """E4M3 block scales ``(rows * blocks, 1)`` in float32: ``e4m3(g * (ratio * amax / 6))``, 0 → 0.125."""
    s = to_e4m3(global_scale.float() * (ratio * block_amax(weight, BLOCK["nvfp4"]) / E2M1_MAX))
    return torch.where(s == 0, torch.full_like(s, E4M3_EPS), s)


def mxfp4_exponents(weight: torch.Tensor, rule: str = "compressed-tensors", offset=0) -> torch.Tensor:
    """E8M0 exponents ``k`` ``(rows * blocks, 1)`` (float, integer-valued) by ``rule`` (see the
    module doc), plus ``offset`` (a clip search's -1 shrinks the block's range)."""
    if rule not in MX_SCALE_RULES:
        raise ValueError(f"fp4_mx_scale_rule={rule!r}: choose one of {', '.join(MX_SCALE_RULES)}")
    amax = block_amax(weight, BLOCK["mxfp4"])
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    k = (exponent - 1).float()  # floor(log2(amax))
    if rule == "compressed-tensors":
        k = k + (mantissa >= 0.875).float()  # the mantissa 1.f >= 1.75 rounds up to the next power of two
    k = k - 2 + offset  # floor(log2(6)) = 2
    return torch.where(amax == 0, torch.full_like(k, E8M0_MIN), k.clamp(E8M0_MIN, E8M0_MAX))


def fp4_quantize(weight: torch.Tensor, fmt: str, block_scale: torch.Tensor,
                 global_scale: torch.Tensor | None = None):
    """``(elements, step)``: the E2M1 values ``(rows * blocks, block)`` of ``weight`` (clamped to ±6,
    rounded straight through) and the per-block multiplier ``step`` ``(rows * blocks, 1)``:
    ``fl32(s / g)`` for NVFP4 (block scale ``s``, global scale ``g``), ``2^k`` for MXFP4 (given as
    ``block_scale``); both float32. The value is ``elements * step``."""
    step = block_scale.float() / global_scale.float() if fmt == "nvfp4" else block_scale.float()
    x = weight.float().reshape(-1, BLOCK[fmt]) / step
    return straight_through(round_e2m1, x.clamp(-E2M1_MAX, E2M1_MAX)), step


def fp4_fake_quantize(weight: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None,
                      block_scale: torch.Tensor | None = None, mx_rule: str = "compressed-tensors",
                      held_rounding: bool = False) -> torch.Tensor:
    """``weight`` on the FP4 grid, in its dtype, differentiable straight through the rounding.

    Without ``block_scale`` the block scales are computed from the weight (NVFP4 from the
    ``global_scale``; MXFP4 by ``mx_rule``) and the gradient reaches ``weight`` unchanged (as the
    integer grids' and quanto's). A held ``block_scale`` (NVFP4: E4M3 values; MXFP4: the scale ``2^k``)
    gets LSQ-style gradients; ``held_rounding`` rounds it to its grid first (straight through)."""
    if block_scale is None:
        with torch.no_grad():
            if fmt == "nvfp4":
                block_scale = nvfp4_block_scales(weight, global_scale)
            else:
                block_scale = torch.exp2(mxfp4_exponents(weight, mx_rule))
            elements, step = fp4_quantize(weight, fmt, block_scale, global_scale)
            value = (elements * step).reshape(weight.shape).to(weight.dtype)
        return _ValueThrough.apply(weight, value)  # the grid's values; the gradient straight through, unchanged
    if held_rounding:
        block_scale = straight_through(_e4m3_scale if fmt == "nvfp4" else _e8m0_scale, block_scale)
    elements, step = fp4_quantize(weight, fmt, block_scale, global_scale)
    return (elements * step).reshape(weight.shape).to(weight.dtype)


def fp4_activation_fake_quantize(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 activations (W4A4), dynamic: blocks of 16 along the last dim, the global scale from
    ``x`` itself unless given (``pow2``), straight through."""
    g = nvfp4_global_scale(x) if global_scale is None else global_scale
    flat = x.reshape(-1, x.shape[-1])
    return fp4_fake_quantize(flat, "nvfp4", g.to(x.device)).reshape(x.shape)


FP4_SCALE_NAMES = ("weight_scale",)


class FP4FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` (so PEFT can wrap it) computing with its float weight fake-quantized to
    ``fmt`` (``nvfp4`` | ``mxfp4``), weight-only (W4A16) unless ``quantize_activations`` (NVFP4
    W4A4, dynamic activation blocks, off by default). The float weight is what trains.

    Buffers: ``weight_global_scale`` ``(1,)`` (NVFP4; held from the weight it was made from, see
    :func:`nvfp4_global_scale`). By default the block scales are recomputed from the weight at
    every forward; :meth:`hold_scales` holds them as ``weight_scale`` ``(rows * blocks, 1)`` (a
    buffer, or a parameter trained with the loss: its own optimizer group in hf-sdft's trainers)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "nvfp4",
                 device=None, dtype=None, global_scale: str = "pow2", mx_rule: str = "compressed-tensors",
                 quantize_activations: bool = False):
        check_fp4(fmt, in_features)
        if quantize_activations and fmt != "nvfp4":
            raise ValueError("FP4 activation fake quantization is NVFP4's (W4A4); MXFP4 is weight-only here")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fmt, self.block = fmt, BLOCK[fmt]
        self.global_scale_mode, self.mx_rule, self.quantize_activations = global_scale, mx_rule, quantize_activations
        self.register_buffer("weight_global_scale", torch.ones(1, device=None if device == "meta" else device)
                             if fmt == "nvfp4" else None)
        self.weight_scale: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, name: str = "layer", global_scale: str = "pow2",
                    mx_rule: str = "compressed-tensors", quantize_activations: bool = False) -> FP4FakeQuantLinear:
        """A layer holding ``linear``'s own weight and bias parameters (not copies), its NVFP4 global
        scale computed from that weight."""
        check_fp4(fmt, linear.in_features, name)
        layer = cls(linear.in_features, linear.out_features, bias=False, fmt=fmt, device="meta",
                    global_scale=global_scale, mx_rule=mx_rule, quantize_activations=quantize_activations)
        layer.weight, layer.bias = linear.weight, linear.bias
        if fmt == "nvfp4":
            layer.weight_global_scale = nvfp4_global_scale(linear.weight, global_scale).to(linear.weight.device)
        return layer

    @property
    def learns_scales(self) -> bool:
        return isinstance(self.weight_scale, nn.Parameter)

    @torch.no_grad()
    def hold_scales(self, scale: torch.Tensor | None = None, learnable: bool = False) -> FP4FakeQuantLinear:
        """Hold the block scales ``(rows * blocks, 1)`` from now on (default: the current weight's)."""
        rows = self.out_features * self.in_features // self.block
        if scale is None:
            scale = self.block_scales()
        if scale.shape != (rows, 1):
            raise ValueError(f"{self.fmt} block scales of shape ({rows}, 1) expected, got {tuple(scale.shape)}")
        self._parameters.pop("weight_scale", None)
        self._buffers.pop("weight_scale", None)
        if "weight_scale" in self.__dict__:
            del self.__dict__["weight_scale"]
        value = scale.detach().float().to(self.weight.device).clone()
        if learnable:
            self.register_parameter("weight_scale", nn.Parameter(value))
        else:
            self.register_buffer("weight_scale", value)
        return self

    @torch.no_grad()
    def block_scales(self) -> torch.Tensor:
        """The block scales this layer computes with now, on their grid: NVFP4 E4M3 values, MXFP4
        ``2^k`` (float32, ``(rows * blocks, 1)``)."""
        if self.weight_scale is not None:
            s = self.weight_scale.float()
            return straight_through(_e4m3_scale if self.fmt == "nvfp4" else _e8m0_scale, s)
        if self.fmt == "nvfp4":
            return nvfp4_block_scales(self.weight, self.weight_global_scale)
        return torch.exp2(mxfp4_exponents(self.weight, self.mx_rule))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations:
            x = fp4_activation_fake_quantize(x)
        return F.linear(x, self._fake_quantized(), self.bias)

    def _fake_quantized(self) -> torch.Tensor:
        return fp4_fake_quantize(self.weight, self.fmt, self.weight_global_scale, self.weight_scale, self.mx_rule,
                                 held_rounding=True)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with (grid values), without gradient."""
        return self._fake_quantized()

    @torch.no_grad()
    def quantized(self):
        """``(elements, block_scale, global_scale)``: E2M1 values ``(out, in)`` float32, the block
        scales ``(out, in / block)`` on their grid, the global scale ``(1,)`` (None for MXFP4)."""
        scale = self.block_scales()
        elements, _ = fp4_quantize(self.weight, self.fmt, scale, self.weight_global_scale)
        out, inp = self.weight.shape
        g = None if self.weight_global_scale is None else self.weight_global_scale.detach().float().cpu().clone()
        return elements.reshape(out, inp), scale.reshape(out, -1), g

    def extra_repr(self) -> str:
        held = ", learned scales" if self.learns_scales else ", held scales" if self.weight_scale is not None else ""
        extra = f", global scale {self.global_scale_mode}" if self.fmt == "nvfp4" else f", {self.mx_rule} exponents"
        acts = ", W4A4" if self.quantize_activations else ", W4A16"
        return f"{super().extra_repr()}, {self.fmt}{extra}{acts}{held}"


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@torch.no_grad()
def share_global_scales(layers: dict[str, FP4FakeQuantLinear]) -> None:
    """Give the NVFP4 layers that serving engines fuse (q/k/v, gate/up of one block) one global
    scale, the smallest of theirs (llm-compressor's rule: vLLM keeps one per fused matrix)."""
    for names in FUSED_GROUPS:
        parents: dict[str, list[FP4FakeQuantLinear]] = {}
        for name, layer in layers.items():
            parent, _, leaf = name.rpartition(".")
            if leaf in names and layer.fmt == "nvfp4":
                parents.setdefault(parent, []).append(layer)
        for group in parents.values():
            g = torch.stack([layer.weight_global_scale for layer in group]).amin(0)
            for layer in group:
                layer.weight_global_scale = g.clone()


CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(7))  # 1.0 .. 0.7 of the block's amax
MX_OFFSETS = (0, -1)  # MXFP4: the rule's exponent, or one lower (half the range, finer steps)


@torch.no_grad()
def fp4_clip_search(layer: FP4FakeQuantLinear, inputs: torch.Tensor) -> torch.Tensor:
    """Per-block scales for the least block output error ``‖X_b (w_b − ŵ_b)‖²`` on calibration
    inputs ``X`` ``(tokens, in)`` (AWQ's auto_clip per block, without cross-block terms): NVFP4
    ``s = e4m3(g * r * amax / 6)`` over ``r`` in :data:`CLIP_RATIOS`; MXFP4 the rule's exponent or one
    lower. The candidates start with the plain grid, so no block gets worse. Returns the scales
    ``(rows * blocks, 1)`` for :meth:`FP4FakeQuantLinear.hold_scales`."""
    w = layer.weight.detach().float()
    out, inp = w.shape
    b = layer.block
    x = inputs.detach().to(w.device, torch.float32).reshape(-1, inp)
    xb = x.reshape(-1, inp // b, b).transpose(0, 1)  # (blocks, tokens, b)
    gram = torch.bmm(xb.transpose(1, 2), xb)  # (blocks, b, b)
    if layer.fmt == "nvfp4":
        candidates = [nvfp4_block_scales(w, layer.weight_global_scale, r) for r in CLIP_RATIOS]
    else:
        candidates = [torch.exp2(mxfp4_exponents(w, layer.mx_rule, o)) for o in MX_OFFSETS]
    best_err = best = None
    for scale in candidates:
        elements, step = fp4_quantize(w, layer.fmt, scale, layer.weight_global_scale)
        d = (w.reshape(-1, b) - elements * step).reshape(out, inp // b, b).transpose(0, 1)  # (blocks, out, b)
        err = (torch.bmm(d, gram) * d).sum(-1).transpose(0, 1).reshape(-1, 1)  # (out * blocks, 1)
        if best_err is None:
            best_err, best = err, scale.clone()
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def bits_per_weight(fmt: str) -> float:
    """Storage per weight: 4 bits plus the 8-bit block scale over the block (NVFP4 4.5, MXFP4 4.25)."""
    return 4 + 8 / BLOCK[fmt]
