"""A plain transformers checkpoint of the student as it computes: quantized layers dequantized
(``scale * code - shift``, bit for bit), pruned zeros kept, in the student's float dtype. Any tool
that loads transformers folders loads it; nothing of hf-sdft, quanto or compressed-tensors is needed."""

from __future__ import annotations

from pathlib import Path

from hf_sdft.export.output_folder import copy_tokenizer, kept, write_config, write_safetensors
from hf_sdft.export.student_weights import StudentWeights


def refusal(weights: StudentWeights) -> str | None:
    return None  # every student has an exact dense form


def write(weights: StudentWeights, output_dir: Path) -> list[Path]:
    names = set(kept((e.name for e in weights.entries), weights.config))
    entries = [e for e in weights.entries if e.name in names]
    write_safetensors(output_dir / "model.safetensors", [(e.name, e.dtype, e.shape) for e in entries],
                      ((e.name, e.float_tensor().to(e.dtype)) for e in entries))
    write_config(weights.config, output_dir)
    copy_tokenizer(weights.folder, output_dir)
    return [output_dir / "model.safetensors", output_dir / "config.json"]
