"""FP4 (NVFP4 / MXFP4) layers for export and for saving FP4 students: their grid, their packed
compressed-tensors tensors and their GGUF MXFP4 blocks. Written without compressed-tensors or
hf-sdft's trainer side; tests/export/test_fp4_export.py checks names, dtypes, config and values
against the library's own ``ModelCompressor`` and transformers.

compressed-tensors 0.20.1 per quantized Linear ``M``:

- ``nvfp4-pack-quantized``: ``M.weight_packed`` uint8 ``(out, in / 2)`` (element ``2j`` in the low
  nibble of byte ``j``, a nibble = sign bit 8 | E2M1 magnitude index 0..7), ``M.weight_scale``
  float8_e4m3fn ``(out, in / 16)``, ``M.weight_global_scale`` float32 ``(1,)``; value
  ``e2m1 * (scale / global_scale)``; weights args ``tensor_group``, group 16, ``scale_dtype``
  ``torch.float8_e4m3fn``.
- ``mxfp4-pack-quantized``: the same ``weight_packed``, ``M.weight_scale`` uint8 ``(out, in / 32)``
  holding the E8M0 byte ``k + 127``, no global scale; value ``e2m1 * 2^k``; args ``group``, group 32,
  ``scale_dtype`` ``torch.uint8``.

GGUF ``MXFP4`` (ggml ``block_mxfp4``, 17 bytes per 32 inputs): the E8M0 byte ``e``, then 16 bytes,
input ``j`` in the low nibble of byte ``j`` and input ``j + 16`` in its high nibble, each nibble
an index into ``{0, 1, 2, 3, 4, 6, 8, 12, -0, -1, ...}`` (E2M1 doubled) scaled by ``2^(e - 127) / 2``:
the same value. GGUF ``NVFP4`` blocks carry unsigned-E4M3 scales without a per-tensor global scale,
so an NVFP4 student (``s / g`` far below E4M3's range) has no exact GGUF form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from hf_sdft.export.student_weights import Entry, _lazy, _safetensors_files, _skeleton_shapes, read_tensor

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
BLOCK = {"nvfp4": 16, "mxfp4": 32}
CT_FORMAT = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
FMT_OF_CT = {v: k for k, v in CT_FORMAT.items()}


@dataclass
class FP4Grid:
    """What a writer needs of an FP4 layer before reading it (``bits`` / ``group_size`` /
    ``symmetric`` / ``fp16_scales`` as the integer grids' :class:`GridInfo` has them)."""

    fmt: str
    pow2_global: bool = True  # NVFP4: the global scale is a power of two (every value exact in bfloat16)
    bits: int = 4
    symmetric: bool = True
    fp16_scales: bool = False

    @property
    def group_size(self) -> int:
        return BLOCK[self.fmt]

    def describe(self, in_features: int) -> str:
        extra = "" if self.fmt == "mxfp4" else (", power-of-two global scale" if self.pow2_global
                                                 else ", min/max global scale")
        return f"{self.fmt} (E2M1, blocks of {self.group_size}{extra})"


def is_fp4(entry) -> bool:
    return isinstance(entry.grid, FP4Grid)


@dataclass
class FP4Weight:
    """An FP4 linear weight: ``elements`` float32 ``(out, in)`` E2M1 values (signed), ``scale`` float32
    ``(out, in / block)`` (E4M3 values, or ``2^k``), ``global_scale`` float32 ``(1,)`` (NVFP4) or None."""

    fmt: str
    elements: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None

    def step(self) -> torch.Tensor:
        """The per-block multiplier ``(out, in / block)`` the student computes with: ``fl32(s / g)`` or ``2^k``."""
        return self.scale / self.global_scale if self.global_scale is not None else self.scale

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, as the student computes it (``elements * step`` per block), bit for bit."""
        out, inp = self.elements.shape
        b = BLOCK[self.fmt]
        return (self.elements.reshape(-1, b) * self.step().reshape(-1, 1)).reshape(out, inp)

    def permute_rows(self, order: torch.Tensor) -> FP4Weight:
        return FP4Weight(self.fmt, self.elements[order], self.scale[order], self.global_scale)


def nibbles(elements: torch.Tensor) -> torch.Tensor:
    """E2M1 values → 4-bit codes (sign bit 8 | magnitude index), uint8, same shape."""
    mags = elements.abs()
    idx = torch.bucketize(mags, E2M1.to(mags.device))
    if not torch.equal(E2M1.to(mags.device)[idx.clamp(max=7)], mags):
        raise ValueError("FP4 elements off the E2M1 grid")
    return (idx | (torch.signbit(elements).to(torch.int64) << 3)).to(torch.uint8)


def from_nibbles(codes: torch.Tensor) -> torch.Tensor:
    values = E2M1.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -values, values)


def pack_uint8(elements: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` E2M1 values → compressed-tensors' ``weight_packed`` uint8 ``(out, in / 2)``."""
    codes = nibbles(elements)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_uint8(packed: torch.Tensor) -> torch.Tensor:
    out, half = packed.shape
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(out, 2 * half)
    return from_nibbles(codes)


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """``2^k`` → the E8M0 byte ``k + 127``; raises when a scale is not a power of two in range."""
    k = torch.log2(scale)
    if not torch.equal(k, k.round()) or k.min() < -127 or k.max() > 127:
        raise ValueError("MXFP4 scales must be powers of two 2^k with -127 <= k <= 127")
    return (k.round() + 127).to(torch.uint8)


def from_e8m0(byte: torch.Tensor) -> torch.Tensor:
    return torch.exp2(byte.to(torch.float32) - 127)


def ct_tensors(name: str, weight: FP4Weight):
    """``(name, tensor)`` of one layer in compressed-tensors' layout, ``name`` the weight's."""
    module = name.removesuffix(".weight")
    yield f"{module}.weight_packed", pack_uint8(weight.elements)
    if weight.fmt == "nvfp4":
        yield f"{module}.weight_scale", weight.scale.to(torch.float8_e4m3fn)
        yield f"{module}.weight_global_scale", weight.global_scale.to(torch.float32).reshape(1)
    else:
        yield f"{module}.weight_scale", e8m0_bytes(weight.scale)


def ct_planned(name: str, shape, fmt: str):
    module, (out, inp) = name.removesuffix(".weight"), shape
    planned = [(f"{module}.weight_packed", torch.uint8, (out, inp // 2))]
    if fmt == "nvfp4":
        planned += [(f"{module}.weight_scale", torch.float8_e4m3fn, (out, inp // 16)),
                    (f"{module}.weight_global_scale", torch.float32, (1,))]
    else:
        planned.append((f"{module}.weight_scale", torch.uint8, (out, inp // 32)))
    return planned


def ct_weights_args(fmt: str) -> dict:
    """The ``weights`` entry of the config group, as ``ModelCompressor`` 0.20.1 writes it."""
    if fmt == "nvfp4":
        return {"dynamic": False, "group_size": 16, "num_bits": 4, "scale_dtype": "torch.float8_e4m3fn",
                "strategy": "tensor_group", "symmetric": True, "type": "float"}
    return {"dynamic": False, "group_size": 32, "num_bits": 4, "scale_dtype": "torch.uint8", "strategy": "group",
            "symmetric": True, "type": "float"}


def ct_quantization_config(weights, version: str) -> dict:
    """``config.json``'s ``quantization_config`` of an FP4 student: one config group naming its
    quantized layers, the other Linear layers in ``ignore``."""
    fmts = {e.grid.fmt for e in weights.grids()}
    (fmt,) = fmts
    quantized = sorted(e.name.removesuffix(".weight") for e in weights.grids())
    ignore = sorted(e.name.removesuffix(".weight") for e in weights.entries if len(e.shape) == 2 and e.grid is None
                    and not e.name.endswith("embed_tokens.weight"))
    group = {"format": CT_FORMAT[fmt], "input_activations": None, "output_activations": None,
             "targets": quantized, "weights": ct_weights_args(fmt)}
    return {"config_groups": {"group_0": group}, "format": CT_FORMAT[fmt], "global_compression_ratio": None,
            "ignore": ignore, "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {}, "version": version}


def ct_refusal(weights) -> str | None:
    """Why an FP4 student has no exact compressed-tensors form (None when it has one)."""
    fmts = {e.grid.fmt for e in weights.grids() if is_fp4(e)}
    if len(fmts) > 1 or (fmts and len(fmts) != len({type(e.grid) for e in weights.grids()}) and
                         any(not is_fp4(e) for e in weights.grids())):
        return "the student mixes FP4 formats or FP4 with integer grids; compressed-tensors export writes one"
    for entry in weights.grids():
        if entry.grid.fmt == "nvfp4" and not entry.grid.pow2_global:
            return (f"{entry.name}'s NVFP4 global scale is not a power of two: transformers decompresses "
                    "nvfp4-pack-quantized in bfloat16 (bf16(e2m1 * fl32(s / g))), which rounds this student's values. "
                    "Train with the power-of-two global scale (fp4 global_scale pow2, the default)")
    return None


def gguf_refusal(entry) -> str | None:
    if entry.grid.fmt == "nvfp4":
        return (f"{entry.name} is NVFP4: GGUF's NVFP4 blocks hold unsigned-E4M3 scales without a per-tensor global "
                "scale, which cannot hold s / g. Exact formats for it: compressed-tensors (nvfp4-pack-quantized), "
                "dense; MXFP4 students export to GGUF MXFP4")
    return None


def gguf_mxfp4_blocks(weight: FP4Weight):
    """``(out, in / 32 * 17)`` uint8: ggml's ``block_mxfp4`` rows."""
    import numpy as np

    out, inp = weight.elements.shape
    e = e8m0_bytes(weight.scale).numpy().reshape(out, inp // 32, 1)
    codes = nibbles(weight.elements).numpy().reshape(out, inp // 32, 32)
    qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
    return np.concatenate([e, qs], axis=-1).reshape(out, -1)


def entry_from_layer(name: str, layer, dtype):
    """An export :class:`~hf_sdft.export.student_weights.Entry` for an in-memory FP4 layer."""
    elements, scale, g = layer.quantized()
    weight = FP4Weight(layer.fmt, elements.detach().cpu().float(), scale.detach().cpu().float(),
                       None if g is None else g.detach().cpu().float().reshape(1))
    grid = FP4Grid(layer.fmt, pow2_global=g is None or bool(torch.equal(torch.exp2(torch.log2(g).round()), g)))
    return Entry(name, tuple(layer.weight.shape), dtype, grid, lambda w=weight: w)


def read_ct_fp4_folder(folder, config, qconfig: dict):
    """A compressed-tensors ``nvfp4-`` / ``mxfp4-pack-quantized`` folder (one safetensors file),
    FP4 layers as :class:`FP4Weight` entries, the rest as float entries."""
    fmt = FMT_OF_CT[qconfig["format"]]
    shapes = _skeleton_shapes(config)
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    (path,) = _safetensors_files(folder)
    entries = []
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    for key in keys:
        if key.endswith((".weight_scale", ".weight_global_scale")):
            continue
        if key.endswith(".weight_packed"):
            module = key.removesuffix(".weight_packed")

            def load(module=module):
                elements = unpack_uint8(read_tensor(path, f"{module}.weight_packed"))
                scale = read_tensor(path, f"{module}.weight_scale")
                g = read_tensor(path, f"{module}.weight_global_scale").float() if fmt == "nvfp4" else None
                scale = scale.float() if fmt == "nvfp4" else from_e8m0(scale)
                return FP4Weight(fmt, elements, scale, g)

            g = None
            if fmt == "nvfp4":
                with safe_open(str(path), "pt") as f:
                    g = f.get_tensor(f"{module}.weight_global_scale").float()
            pow2 = g is None or bool(torch.equal(torch.exp2(torch.log2(g).round()), g))
            entries.append(Entry(f"{module}.weight", shapes[f"{module}.weight"], dtype, FP4Grid(fmt, pow2), load))
        elif key in shapes:
            entries.append(Entry(key, shapes[key], dtype, None, _lazy(path, key)))
        else:
            raise ValueError(f"{path}: tensor {key} is not a parameter of {type(config).__name__}'s model")
    return entries
