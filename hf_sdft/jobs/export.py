"""The export job: ``hf-sdft export STUDENT_DIR --format F`` and ``recover --export_formats``.

Writes the student in a serving format (:mod:`hf_sdft.export`), then loads what was written the
way a user would — plain transformers (``from_pretrained``, ``gguf_file=`` for GGUF) and, where
llama-cpp-python is installed, llama.cpp itself — and measures held-out perplexity through it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from hf_sdft.compress.checkpoint import load_model
from hf_sdft.export import EXPORT_FORMATS, REPORT_FILE, ExportReport, check_format, export_student
from hf_sdft.jobs.evaluation import nll_and_count, perplexity_of

GGUF_FILE = "model.gguf"


@dataclass
class ExportArguments:
    """``hf-sdft export`` options (held-out data for the check: ``EvalDataArguments``' fields)."""

    student_dir: str = field(metadata={"help": "The student's folder: hf-sdft recover's output_dir, or a quanto, "
                                       "transformers or PEFT folder. May be given bare, as the first argument."})
    format: str = field(default="gguf", metadata={"help": f"One of {', '.join(EXPORT_FORMATS)}."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write (default: STUDENT_DIR/FORMAT). "
                                                           "Must not exist unless --overwrite true."})
    allow_rounding: bool = field(
        default=False, metadata={"help": "Re-quantize a student that has no exact form in FORMAT, and report the "
                                 "weight and perplexity error it caused (default: refuse, naming the exact formats)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    measure: bool = field(default=True, metadata={"help": "Load the export with transformers (and llama.cpp for "
                                                  "GGUF, when installed) and compare its held-out perplexity "
                                                  "with the student's."})

    def __post_init__(self):
        check_format(self.format)
        if self.output_dir is None:
            self.output_dir = str(Path(self.student_dir) / self.format)


def load_exported(folder: str | Path, fmt: str) -> torch.nn.Module:
    """The exported model as transformers alone loads it (float32, on CPU). FP4 compressed-tensors
    folders load dequantized: transformers' compressed FP4 layers compute in bfloat16 only."""
    kwargs = {"gguf_file": GGUF_FILE} if fmt == "gguf" else {}
    qconfig = json.loads(Path(folder, "config.json").read_text()).get("quantization_config") or {} \
        if fmt == "compressed-tensors" else {}
    if qconfig.get("format") in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


def llama_cpp_nll(gguf_path: str | Path, batches, n_threads: int | None = None) -> tuple[float, int]:
    """Summed next-token NLL and scored-token count of llama.cpp running ``gguf_path`` over
    ``batches`` (token ids fed as they are; scored as :func:`~hf_sdft.jobs.evaluation.held_out_sums`
    scores them). Needs llama-cpp-python (``pip install hf-sdft[serve]``)."""
    from llama_cpp import Llama

    width = max(b["input_ids"].shape[1] for b in batches)
    llm = Llama(model_path=str(gguf_path), n_ctx=max(width, 32), n_batch=max(width, 32), logits_all=True,
                verbose=False, n_threads=n_threads or min(4, os.cpu_count() or 1), seed=0)
    nll, count = 0.0, 0
    for batch in batches:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        labels = batch.get("labels", batch["input_ids"])
        for ids, m, lab in zip(batch["input_ids"], mask, labels):
            keep = int(m.sum())
            tokens = ids[:keep].tolist()  # left-aligned blocks: padding sits at the end
            llm.reset()
            llm.eval(tokens)
            logits = np.asarray(llm.scores[: keep - 1], dtype=np.float64)
            target = lab[1:keep].numpy()
            scored = target != -100
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            picked = logits[np.arange(keep - 1), np.where(scored, target, 0)]
            nll += float(((logz - picked) * scored).sum())
            count += int(scored.sum())
    llm.close()
    return nll, count


def measure_export(folder: Path, fmt: str, batches) -> dict:
    """Held-out perplexity of an export through transformers (and llama.cpp for GGUF when installed)."""
    figures = {"perplexity_transformers": perplexity_of(*nll_and_count(load_exported(folder, fmt), batches))}
    if fmt == "gguf":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            figures["perplexity_llama_cpp"] = "not measured: llama-cpp-python is not installed (pip install hf-sdft[serve])"
        else:
            figures["perplexity_llama_cpp"] = perplexity_of(*llama_cpp_nll(folder / GGUF_FILE, batches))
    return figures


def export_recovered(output_dir: str | Path, formats: list[str], batches, allow_rounding: bool = False) -> dict:
    """``recover --export_formats``: each format written to ``output_dir/FORMAT`` (replacing an
    earlier export of this run) and measured; returns ``{format: report + figures}``."""
    out = {}
    for fmt in formats:
        report = export_student(output_dir, fmt, Path(output_dir) / fmt, allow_rounding, overwrite=True)
        out[fmt] = _summary(report) | measure_export(Path(report.output_dir), fmt, batches)
    return out


def _summary(report: ExportReport) -> dict:
    return {"path": Path(report.output_dir).name, "exact": report.exact, "grid": report.grid,
            "size_bytes": report.size_bytes, **({"rounding": report.rounding} if report.rounding else {})}


def run_export(a: ExportArguments, data) -> dict:
    """``hf-sdft export``: write, then (``measure``) compare the export's held-out perplexity with the
    student's, on ``data``'s fields (``EvalDataArguments``; the embedded eval text by default)."""
    report = export_student(a.student_dir, a.format, a.output_dir, a.allow_rounding, a.overwrite)
    result = _summary(report) | {"files": report.files}
    if a.measure:
        from hf_sdft.data import data_format, default_data_file, held_out, load_examples  # lazy: only to measure

        tokenizer = AutoTokenizer.from_pretrained(a.student_dir)
        ds = load_examples(data_file=data.eval_file or default_data_file("eval"), txt_sample_by=data.txt_sample_by)
        batches = held_out(tokenizer, ds, data_format(ds, data.dataset_text_field), block_size=data.block_size,
                           max_items=data.max_eval_blocks, probe_items=1, text_field=data.dataset_text_field,
                           batch_size=data.eval_batch_size).batches
        result["perplexity_student"] = perplexity_of(*nll_and_count(load_model(a.student_dir), batches))
        result |= measure_export(Path(a.output_dir), a.format, batches)
        reported = json.loads(Path(a.output_dir, REPORT_FILE).read_text())
        Path(a.output_dir, REPORT_FILE).write_text(json.dumps(reported | {"measured": {
            k: v for k, v in result.items() if k.startswith("perplexity")}}, indent=2) + "\n")
    return result
