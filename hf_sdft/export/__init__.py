"""Export a recovered student to the formats engines serve, exactly.

==================  ===========================================  =====================================
format              loads in                                     exact for
==================  ===========================================  =====================================
compressed-tensors  transformers (native), vLLM, SGLang          symmetric int2 / int4 / int8 grids,
                                                                 float students (dense weights)
gguf                llama.cpp, Ollama, transformers (gguf_file)  int4 / int2 (Q4_0 symmetric, Q4_1
                                                                 asymmetric), int8 (Q8_0) in groups of
                                                                 32·k with float16 scales; float
dense               anything that loads transformers folders     every student
==================  ===========================================  =====================================

A request with no exact form is refused before anything is written, naming the formats that
would be exact, unless ``allow_rounding``: then the grid is re-quantized to the nearest exact one
(symmetric for compressed-tensors; float16 scales in blocks of 32 for GGUF) and the weight error
this caused is reported. The export is written to a temporary folder beside ``output_dir`` and
renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hf_sdft.compress.fake_quant import quantize_weight
from hf_sdft.export import to_compressed_tensors, to_dense, to_gguf
from hf_sdft.export.student_weights import Entry, GridInfo, GridWeight, StudentWeights, read_model, read_student

EXPORT_FORMATS = {"compressed-tensors": to_compressed_tensors, "gguf": to_gguf, "dense": to_dense}
REPORT_FILE = "export.json"

__all__ = ["EXPORT_FORMATS", "ExportReport", "export_student", "export_weights", "read_model", "read_student"]


@dataclass
class ExportReport:
    """What an export wrote: ``exact`` (the exported weights equal the student's), the grid, the
    files and their size, and, after ``allow_rounding``, the weight error it caused."""

    format: str
    output_dir: str
    source: str
    source_format: str
    exact: bool
    grid: str
    files: list[str]
    size_bytes: int
    rounding: dict = field(default_factory=dict)

    def save(self) -> None:
        Path(self.output_dir, REPORT_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def check_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")


def exact_formats(weights: StudentWeights) -> list[str]:
    """The formats that hold ``weights`` exactly."""
    exact = []
    for name, module in EXPORT_FORMATS.items():
        try:
            if module.refusal(weights) is None:
                exact.append(name)
        except ValueError:  # a format that cannot hold this model at all
            pass
    return exact


def describe_grids(weights: StudentWeights) -> str:
    """``"int4 symmetric, groups of 32 (28 layers); float: 3 tensors"``-style summary."""
    counts: dict[str, int] = {}
    for entry in weights.grids():
        key = entry.grid.describe(entry.shape[1]) + (", float16 scales" if entry.grid.fp16_scales else "")
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{k} ({n} layers)" for k, n in counts.items()]
    return "; ".join(parts) if parts else "float (no quantized layer)"


class _RoundingMeter:
    """Re-quantizes grids onto an exact form and keeps the largest and total weight error."""

    def __init__(self):
        self.max_abs, self.err2, self.ref2, self.layers = 0.0, 0.0, 0.0, 0

    def requantize(self, entry: Entry, symmetric: bool, group_size: int) -> GridWeight:
        before = entry.float_tensor().float()
        codes, scale, shift = quantize_weight(before, entry.grid.bits, group_size, symmetric=symmetric,
                                              fp16_scales=True)
        out, inp = before.shape
        grid = GridWeight(codes.reshape(out, inp).to(torch.int16), scale.reshape(out, -1),
                          None if shift is None else shift.reshape(out, -1), entry.grid.bits, group_size)
        after = grid.dequantize()
        self.max_abs = max(self.max_abs, (after - before).abs().max().item())
        self.err2 += (after - before).pow(2).sum().item()
        self.ref2 += before.pow(2).sum().item()
        self.layers += 1
        return grid

    def report(self) -> dict:
        return {"requantized_layers": self.layers, "max_abs_weight_error": self.max_abs,
                "relative_weight_error": (self.err2 / self.ref2) ** 0.5 if self.ref2 else 0.0}


def _rounded(weights: StudentWeights, fmt: str, meter: _RoundingMeter) -> StudentWeights:
    """``weights`` with every grid re-quantized onto ``fmt``'s nearest exact form."""
    entries = []
    for entry in weights.entries:
        if entry.grid is None:
            entries.append(entry)
            continue
        symmetric = True if fmt == "compressed-tensors" else entry.grid.symmetric
        group = entry.grid.group_size
        if fmt == "gguf" and group % to_gguf.BLOCK:
            group = to_gguf.BLOCK
        grid = GridInfo(entry.grid.bits, group, symmetric or entry.grid.bits == 8, True)
        entries.append(replace(entry, grid=grid, load=lambda e=entry, s=symmetric, g=group: meter.requantize(e, s, g)))
    return replace(weights, entries=entries)


def export_weights(weights: StudentWeights, fmt: str, output_dir: str | Path, allow_rounding: bool = False,
                   overwrite: bool = False, source: str = "") -> ExportReport:
    """Write ``weights`` (from :func:`read_student` or :func:`read_model`) in ``fmt`` to
    ``output_dir``; every check runs before anything is written."""
    check_format(fmt)
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists: choose another output_dir, or pass --overwrite true to replace it")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file: give a folder path for the export")
    module = EXPORT_FORMATS[fmt]
    why = module.refusal(weights)  # raises for what no rounding can fix (e.g. an architecture GGUF lacks)
    if why is not None and any(to_gguf.fp4_weights.is_fp4(e) for e in weights.grids()):  # FP4: never re-rounded
        raise ValueError(f"no exact {fmt} form for this student: {why}. Exact formats for it: "
                         f"{', '.join(exact_formats(weights))}")
    meter = None
    if why is not None:
        if not allow_rounding:
            exact = ", ".join(exact_formats(weights))
            raise ValueError(f"no exact {fmt} form for this student: {why}. Exact formats for it: {exact}. "
                             "--allow_rounding true re-quantizes it and reports the error")
        meter = _RoundingMeter()
        weights = _rounded(weights, fmt, meter)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
    try:
        files = module.write(weights, staging)
        size = sum(f.stat().st_size for f in files)
        report = ExportReport(fmt, str(output_dir), source, weights.source_format, meter is None,
                              describe_grids(weights), [f.name for f in files], size,
                              meter.report() if meter else {})
        report.output_dir = str(staging)
        report.save()
        report.output_dir = str(output_dir)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.save()
    return report


def export_student(student_dir: str | Path, fmt: str, output_dir: str | Path, allow_rounding: bool = False,
                   overwrite: bool = False) -> ExportReport:
    """Export the student saved in ``student_dir`` (hf-sdft recover's output, a quanto, transformers
    or PEFT folder) to ``fmt`` in ``output_dir``."""
    check_format(fmt)
    if Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists: choose another output_dir, or pass --overwrite true to replace it")
    weights = read_student(student_dir)
    return export_weights(weights, fmt, output_dir, allow_rounding, overwrite, source=str(student_dir))
