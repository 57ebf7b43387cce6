"""What every export folder shares: a safetensors file written one tensor at a time (its header
first, from shapes known in advance, then each tensor's bytes as it comes), the config, and the
tokenizer and generation files copied from the student's folder."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
                      torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16",
                      torch.float8_e4m3fn: "F8_E4M3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


def write_safetensors(path: Path, planned: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in the ``planned`` order of ``(name, dtype, shape)``) to one safetensors
    file without holding more than one of them: the header is made from the plan, then each
    tensor's bytes are appended as it arrives. Raises if a tensor differs from its plan."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in planned:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, dtype, shape), (got, tensor) in zip(planned, tensors, strict=True):
            if got != name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"export planned {name} {dtype} {tuple(shape)} but got {got} {tensor.dtype} "
                                   f"{tuple(tensor.shape)}")
            if tensor.numel():  # the tensor's own bytes, no copy
                f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))


def copy_tokenizer(source: Path | None, target: Path) -> None:
    """The tokenizer, chat template and generation config, as the student's folder has them."""
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def write_config(config, target: Path, quantization_config: dict | None = None) -> None:
    """``config.json``: the student's config (no quantization entry of its own), plus ours."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    (target / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def tied_head(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def kept(names: Iterator[str] | Iterable[str], config) -> list[str]:
    """The tensor names an export writes: a tied output head is the embedding, written once."""
    return [n for n in names if not (tied_head(config) and n == "lm_head.weight")]
