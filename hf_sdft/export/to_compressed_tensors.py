"""compressed-tensors ``pack-quantized``: what transformers loads natively and vLLM / SGLang serve.

Per quantized Linear ``M``: ``M.weight_packed`` int32 ``(out, ceil(in·bits/32))`` holding the
unsigned values ``q + 2^(bits-1)``, ``32 / bits`` to a word, least-significant bits first;
``M.weight_scale`` ``(out, in / group)`` in the student's float dtype; ``M.weight_shape`` int64
``[out, in]``. The value is ``scale * q``: only symmetric grids have this form exactly (the format's
zero points are integers, quanto's shifts are not). ``config.json`` gets a ``quantization_config``
with one config group per distinct (bits, group size), the layers left in float in ``ignore``, and
``"sparsity_config": {}`` (vLLM rejects non-empty sparsity configs). A float student (pruned, or
recovered from forgetting) is written as dense weights under ``"format": "dense"`` with no config
group: its zeros are kept as zeros.

Written without the compressed-tensors library; tests/export checks tensors and config against the
library's own ``ModelCompressor``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_sdft.export import fp4_weights
from hf_sdft.export.output_folder import copy_tokenizer, kept, write_config, write_safetensors
from hf_sdft.export.student_weights import Entry, GridWeight, StudentWeights

COMPRESSED_TENSORS_VERSION = "0.20.1"  # the library version whose format this writes (checked in tests)
FORMAT = "pack-quantized"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``(rows, cols)`` → compressed-tensors' packed int32 ``(rows, ceil(cols·bits/32))``
    (bits 2, 4 or 8: whole values per word)."""
    per_word = 32 // bits
    values = codes.to(torch.int64) + 2 ** (bits - 1)
    rows, cols = values.shape
    values = torch.nn.functional.pad(values, (0, -cols % per_word)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (values << shifts).sum(-1)  # < 2^32: each value sits in its own bits
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def weights_args(bits: int, group_size: int | None) -> dict:
    """The ``weights`` entry of a config group: the ``QuantizationArgs`` fields compressed-tensors
    itself writes (the rest take the library's defaults when read; ``group_size`` None: one scale per
    output channel)."""
    channel = group_size is None
    return {"dynamic": False, "group_size": None if channel else group_size, "num_bits": bits,
            "strategy": "channel" if channel else "group", "symmetric": True, "type": "int"}


def quantization_config(weights: StudentWeights) -> dict:
    """``config.json``'s ``quantization_config`` for the student's grids."""
    grids = weights.grids()
    per_row = all(e.grid.group_size == e.shape[1] for e in grids)  # else a row-wide group is one group
    groups: dict[tuple, list[str]] = {}
    for entry in grids:
        key = (entry.grid.bits, "channel" if per_row else entry.grid.group_size)
        groups.setdefault(key, []).append(entry.name.removesuffix(".weight"))
    linear = {e.name.removesuffix(".weight") for e in weights.entries if len(e.shape) == 2 and e.grid is None
              and not e.name.endswith("embed_tokens.weight")}
    several = len(groups) > 1
    config_groups = {}
    for i, ((bits, size), modules) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        config_groups[f"group_{i}"] = {
            "format": FORMAT, "input_activations": None, "output_activations": None,
            "targets": [f"re:^{m.replace('.', '[.]')}$" for m in modules] if several else ["Linear"],
            "weights": weights_args(bits, None if size == "channel" else size),
        }
    return {"config_groups": config_groups, "format": FORMAT if config_groups else "dense",
            "global_compression_ratio": None,
            "ignore": sorted(linear) if config_groups else [], "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": COMPRESSED_TENSORS_VERSION}


def refusal(weights: StudentWeights) -> str | None:
    """Why the student has no exact compressed-tensors form (None when it has one)."""
    if any(fp4_weights.is_fp4(e) for e in weights.grids()):  # NVFP4 / MXFP4 (see fp4_weights)
        return fp4_weights.ct_refusal(weights)
    for entry in weights.grids():
        if not entry.grid.symmetric:
            return (f"{entry.name} is on an asymmetric grid ({entry.grid.describe(entry.shape[1])}); "
                    "compressed-tensors stores scale·(q − integer zero point), which cannot hold quanto's float "
                    "shifts. Exact formats for it: gguf (Q4_1), dense. Train with quant_scheme symmetric for "
                    "compressed-tensors")
    return None


def _planned(entry: Entry) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    if entry.grid is None:
        return [(entry.name, entry.dtype, entry.shape)]
    if fp4_weights.is_fp4(entry):
        return fp4_weights.ct_planned(entry.name, entry.shape, entry.grid.fmt)
    module, (out, inp), bits = entry.name.removesuffix(".weight"), entry.shape, entry.grid.bits
    return [(f"{module}.weight_packed", torch.int32, (out, -(-inp * bits // 32))),
            (f"{module}.weight_scale", entry.dtype, (out, inp // entry.grid.group_size)),
            (f"{module}.weight_shape", torch.int64, (2,))]


def _tensors(entry: Entry):
    value = entry.load()
    if isinstance(value, fp4_weights.FP4Weight):
        yield from fp4_weights.ct_tensors(entry.name, value)
        return
    if not isinstance(value, GridWeight):
        yield entry.name, value
        return
    module = entry.name.removesuffix(".weight")
    yield f"{module}.weight_packed", pack_int32(value.codes, value.bits)
    yield f"{module}.weight_scale", value.scale.to(entry.dtype)
    yield f"{module}.weight_shape", torch.tensor(entry.shape, dtype=torch.int64)


def write(weights: StudentWeights, output_dir: Path) -> list[Path]:
    """Write the compressed-tensors folder; returns the files written."""
    names = set(kept((e.name for e in weights.entries), weights.config))
    entries = [e for e in weights.entries if e.name in names]
    planned = [p for e in entries for p in _planned(e)]
    write_safetensors(output_dir / "model.safetensors", planned, (t for e in entries for t in _tensors(e)))
    fp4 = any(fp4_weights.is_fp4(e) for e in weights.grids())
    qconfig = fp4_weights.ct_quantization_config(weights, COMPRESSED_TENSORS_VERSION) if fp4 else quantization_config(weights)
    write_config(weights.config, output_dir, qconfig)
    copy_tokenizer(weights.folder, output_dir)
    return [output_dir / "model.safetensors", output_dir / "config.json"]
