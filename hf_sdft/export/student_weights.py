"""A saved student's weights as the student computes with them, one tensor at a time.

Export never holds the whole model: a folder's tensors are listed from the safetensors headers (the
model's skeleton, built on the meta device, gives each layer's shape), each entry reads its tensor
(plain file reads, no memory map) only when a writer asks, and the writer lets it go before the next. Quantized layers come as
:class:`GridWeight` — integer codes with their scales (and shifts) — so that a writer can store the
grid itself, never a re-rounded copy.

Sources: a quanto folder (``save_quantized``: codes, scales, shifts), a transformers folder (one
file or shards; pruned students are these), and a model in memory (a merged PEFT student).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from hf_sdft.compress.fake_quant import FakeQuantLinear, code_offset, on_fp16_grid, stored_symmetric
from hf_sdft.compress.fp4 import FP4FakeQuantLinear
from hf_sdft.export.output_folder import SAFETENSORS_DTYPES

QMAP_FILE, GROUPS_FILE = "quanto_qmap.json", "quanto_group_sizes.json"  # what save_quantized writes
QUANTO_BITS = {"qint8": 8, "qint4": 4, "qint2": 2}
READ_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()} | {"F64": torch.float64, "BOOL": torch.bool}


@dataclass
class GridWeight:
    """A linear weight ``(out, in)`` on an integer grid: ``value = scale * code - shift`` per group
    of ``group_size`` consecutive inputs of a row (``shift`` None: a symmetric grid, signed codes).
    ``codes`` int16 ``(out, in)``; ``scale`` / ``shift`` ``(out, in // group_size)``."""

    codes: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.shift is None

    def dequantize(self) -> torch.Tensor:
        """The float weight, computed as the student computes it (``scale * code``, then ``- shift``,
        in the scale's dtype, per group): the same values, bit for bit."""
        out, inp = self.codes.shape
        values = self.scale.reshape(-1, 1) * self.codes.reshape(-1, self.group_size).to(self.scale.dtype)
        if self.shift is not None:
            values = values - self.shift.reshape(-1, 1)
        return values.reshape(out, inp)

    def permute_rows(self, order: torch.Tensor) -> GridWeight:
        """The same grid with its output rows in ``order`` (codes and scales move together)."""
        return GridWeight(self.codes[order], self.scale[order], None if self.shift is None else self.shift[order],
                          self.bits, self.group_size)


@dataclass
class GridInfo:
    """What a writer must know of a quantized layer before its codes are read: bits, group size,
    whether the grid is symmetric and whether its scales (and shifts) are float16 values."""

    bits: int
    group_size: int
    symmetric: bool
    fp16_scales: bool

    def describe(self, in_features: int) -> str:
        groups = "per channel" if self.group_size == in_features else f"groups of {self.group_size}"
        return f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'}, {groups}"


@dataclass
class Entry:
    """One tensor of the student: ``name`` (the transformers parameter name), ``shape``, ``dtype``
    (the float dtype the model computes in), ``grid`` (None for a float tensor) and ``load``, which
    reads it (a tensor, or a :class:`GridWeight` for a quantized layer)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    grid: GridInfo | None
    load: Callable[[], torch.Tensor | GridWeight]

    def float_tensor(self) -> torch.Tensor:
        """The tensor in float, as the student computes with it (a grid dequantized)."""
        value = self.load()
        return value.dequantize() if isinstance(value, GridWeight) else value


@dataclass
class StudentWeights:
    """A student's config (transformers ``PretrainedConfig``), its folder (tokenizer and generation
    config are copied from there), its format, and its tensors in order."""

    config: object
    folder: Path | None
    source_format: str
    entries: list[Entry]

    def grids(self) -> list[Entry]:
        return [e for e in self.entries if e.grid is not None]


def _skeleton_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}


def _grid_from_quanto(bits: int, group_size: int, shape, data: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor | None) -> GridWeight:
    """quanto's stored codes (int8, or uint8 packed ``8 // bits`` per byte along the first dim,
    lowest bits first) in its grouped layout → a :class:`GridWeight` (symmetric grids stored with
    offset codes come back signed)."""
    out, inp = shape
    rows = out * inp // group_size
    if bits < 8:
        mask = 2**bits - 1
        data = torch.cat([(data >> (bits * i)) & mask for i in range(8 // bits)])[:rows]
    codes = data.to(torch.int16).reshape(out, inp)
    scale, shift = scale.reshape(out, -1), None if shift is None else shift.reshape(out, -1)
    if bits < 8 and stored_symmetric(bits, scale, shift):
        codes, shift = codes - code_offset(bits), None
    return GridWeight(codes, scale, shift, bits, group_size)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{folder} holds no model.safetensors (nor a sharded index): save the student with "
                            "save_pretrained / hf-sdft recover, or give the folder that holds its weights")


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, read with plain file reads into its own buffer: unlike a
    memory map (``safe_open``), the file's pages never count as this process's memory, so a tensor
    costs its size once."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if key not in header:
            raise KeyError(f"{path} holds no tensor {key}")
        info = header[key]
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=READ_DTYPES[info["dtype"]])
        if end > begin:
            f.seek(8 + length + begin)
            if f.readinto(out.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise OSError(f"{path}: tensor {key} is cut short (the file is truncated)")
    return out


def _lazy(path: Path, key: str) -> Callable[[], torch.Tensor]:
    return lambda: read_tensor(path, key)


def read_quanto_folder(folder: Path, config) -> StudentWeights:
    """A folder written by :func:`~hf_sdft.compress.quantize.save_quantized` (one safetensors file)."""
    qmap = json.loads((folder / QMAP_FILE).read_text())
    groups = json.loads((folder / GROUPS_FILE).read_text()) if (folder / GROUPS_FILE).exists() else {}
    for name, q in qmap.items():
        if q.get("activations", "none") != "none" or q["weights"] not in QUANTO_BITS:
            raise ValueError(f"{folder / QMAP_FILE}: {name} quantizes {q}; export writes weight-only int8 / int4 / int2 "
                             "students (activation quantization has no serving format here)")
    shapes = _skeleton_shapes(config)
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    (path,) = _safetensors_files(folder)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        scales = {m: f.get_tensor(f"{m}.weight._scale") for m in qmap}
        shifts = {m: f.get_tensor(f"{m}.weight._shift") if f"{m}.weight._shift" in keys else None for m in qmap}
    entries = []
    for key in keys:
        module, _, leaf = key.partition(".weight.")
        if leaf and module in qmap:
            if leaf != "_scale":
                continue  # the layer's one entry is made at its scale; _data and _shift are read there
            bits, shape = QUANTO_BITS[qmap[module]["weights"]], shapes[f"{module}.weight"]
            group = groups.get(module) or shape[1]
            scale, shift = scales[module].reshape(shape[0], -1), shifts[module]
            shift = None if shift is None else shift.reshape(shape[0], -1)
            symmetric = stored_symmetric(bits, scale, shift)
            grid = GridInfo(bits, group, symmetric, on_fp16_grid(scale, None if symmetric else shift))
            data_key = f"{module}.weight._data" + ("._data" if bits < 8 else "")

            def load(data_key=data_key, bits=bits, group=group, shape=shape, module=module):
                return _grid_from_quanto(bits, group, shape, read_tensor(path, data_key), scales[module],
                                         shifts[module])

            entries.append(Entry(f"{module}.weight", shape, dtype, grid, load))
        elif key in shapes:
            entries.append(Entry(key, shapes[key], dtype, None, _lazy(path, key)))
        elif not (key.endswith((".input_scale", ".output_scale")) and key.rpartition(".")[0] in qmap):
            raise ValueError(f"{path}: tensor {key} is not a parameter of {type(config).__name__}'s model")
    return StudentWeights(config, folder, "quanto", entries)


def read_dense_folder(folder: Path, config) -> StudentWeights:
    """A transformers folder (``model.safetensors`` or shards): every tensor a float entry."""
    entries = []
    for path in _safetensors_files(folder):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
                    piece.get_dtype(), "float32"))
                entries.append(Entry(key, tuple(piece.get_shape()), dtype, None, _lazy(path, key)))
    return StudentWeights(config, folder, "transformers", entries)


def read_model(model: nn.Module, folder: Path | None = None, source_format: str = "model") -> StudentWeights:
    """A model in memory (e.g. a merged PEFT student): float tensors, and a grid for every
    :class:`~hf_sdft.compress.fake_quant.FakeQuantLinear`."""
    from hf_sdft.export.fp4_weights import entry_from_layer  # lazy: fp4_weights imports this module

    grids = {f"{name}.weight": m for name, m in model.named_modules()
             if isinstance(m, (FakeQuantLinear, FP4FakeQuantLinear))}
    entries = []
    for name, tensor in model.state_dict().items():
        if name.endswith((".weight_scale", ".weight_shift", ".weight_global_scale")) and \
                name.rsplit(".", 1)[0] + ".weight" in grids:
            continue
        layer = grids.get(name)
        if isinstance(layer, FP4FakeQuantLinear):
            entries.append(entry_from_layer(name, layer, tensor.dtype))
            continue
        if layer is None:
            entries.append(Entry(name, tuple(tensor.shape), tensor.dtype, None, lambda t=tensor: t.detach().cpu()))
            continue
        codes, scale, shift = (None if t is None else t.detach().cpu() for t in layer.quantized())
        out, inp = layer.weight.shape
        group = layer.group_size or inp
        weight = GridWeight(codes.reshape(out, inp).to(torch.int16), scale.reshape(out, -1),
                            None if shift is None else shift.reshape(out, -1), layer.bits, group)
        grid = GridInfo(layer.bits, group, weight.symmetric, on_fp16_grid(weight.scale, weight.shift))
        entries.append(Entry(name, (out, inp), tensor.dtype, grid, lambda w=weight: w))
    return StudentWeights(model.config, folder, source_format, entries)


def iter_float(weights: StudentWeights) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, float tensor)`` one at a time, grids dequantized."""
    for entry in weights.entries:
        yield entry.name, entry.float_tensor()


def read_student(folder: str | Path) -> StudentWeights:
    """The student saved in ``folder``: a quanto folder, a PEFT adapter folder (merged into its base
    in memory: adapters on a quantized base give float weights) or a transformers folder."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json nor adapter_config.json): give the "
                                "output_dir of hf-sdft recover or a transformers / quanto / PEFT folder")
    if (folder / "adapter_config.json").exists():
        # lazy: loads quanto and peft, which exports of plain folders never need
        from hf_sdft.compress.checkpoint import load_model

        model = load_model(str(folder))
        merged = model.merge_and_unload()
        return read_model(merged, folder, "peft (merged)")
    config = AutoConfig.from_pretrained(folder)
    if (folder / QMAP_FILE).exists():
        return read_quanto_folder(folder, config)
    qconfig = getattr(config, "quantization_config", None) or {}
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("format") in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):  # an FP4 student (save_fp4)
        from hf_sdft.export.fp4_weights import read_ct_fp4_folder  # lazy: fp4_weights imports this module

        return StudentWeights(config, folder, qconfig["format"], read_ct_fp4_folder(folder, config, qconfig))
    return read_dense_folder(folder, config)
