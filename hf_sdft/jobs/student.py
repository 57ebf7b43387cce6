"""The recovery job's student: your own checkpoint made elsewhere (a transformers folder, pruned
ones detected by their zeros, a quanto folder, or a PEFT adapter folder) checked against the
original and described (:func:`own_student`), LoRA wrapping (:func:`add_lora`), merging and saving
it in a format that :func:`~hf_sdft.compress.checkpoint.load_model` loads back."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoTokenizer
from trl import get_peft_config

from hf_sdft.compress.base import Degradation
from hf_sdft.compress.checkpoint import QUANTIZED_BASE, detect_sparsity, load_model
from hf_sdft.compress.fp4_student import is_fp4_model
from hf_sdft.compress.prune import PruneDegradation, masks_from_zeros, merge_lora
from hf_sdft.compress.quantize import quantization_summary, save_quantized, thaw_quantized, to_quanto
from hf_sdft.export.fp4_checkpoint import is_fp4_folder, load_fp4, save_fp4
from hf_sdft.jobs.outputs import MODEL_OUTPUTS, remove_entries
from hf_sdft.modeling import check_vocabularies, is_peft, model_folder, num_layers, output_vocab_size, unwrap


@dataclass
class Student:
    """A student and what is known of it. ``description`` is ``sdft_stats.json``'s ``degradation``
    entry (``{"kind": ...}``); ``degradation`` the :class:`~hf_sdft.compress.base.Degradation`
    whose invariants training keeps (its masks, through training, saving and LoRA merges; its
    quantized layers); ``base_folder`` is the saved quantized base of a PEFT student."""

    model: nn.Module
    description: dict
    tags: list[str] = field(default_factory=list)
    degradation: Degradation | None = None
    base_folder: Path | None = None

    @property
    def masks(self) -> dict[str, torch.Tensor] | None:
        return None if self.degradation is None else self.degradation.masks

    @property
    def quantized(self) -> bool:
        return self.degradation is not None and self.degradation.is_quantized

    def callbacks(self) -> list:
        return [] if self.degradation is None else self.degradation.callbacks(self.model)


class OwnQuantized(Degradation):
    """An own student quantized elsewhere (a quanto checkpoint): nothing to apply, its layers are quantized."""

    kind = "own-quantized"
    is_quantized = True


def check_compatible(student: nn.Module, teacher: nn.Module, student_folder: Path, tokenizer) -> None:
    """Raise when the student cannot be distilled from the teacher: another architecture, depth,
    output vocabulary, or a tokenizer shipped with the student that differs from the original's."""
    s_cfg, t_cfg = unwrap(student).config, unwrap(teacher).config
    if getattr(s_cfg, "model_type", None) != getattr(t_cfg, "model_type", None):
        raise ValueError(
            f"the student is a {s_cfg.model_type} model and the original a {t_cfg.model_type} one: "
            "recover a student derived from the same model (model_name_or_path)"
        )
    check_vocabularies(output_vocab_size(student), output_vocab_size(teacher), teacher_name="original")
    if num_layers(student) != num_layers(teacher):
        raise ValueError(
            f"the student has {num_layers(student)} decoder layers and the original {num_layers(teacher)}: "
            "depth-pruned students are not supported"
        )
    if any((student_folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        if AutoTokenizer.from_pretrained(student_folder).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"the tokenizer saved with the student ({student_folder}) differs from the original's: "
                "SDFT compares next-token distributions over one vocabulary; use the original's tokenizer"
            )


def own_student(name_or_path: str, teacher: nn.Module, tokenizer, *, use_peft: bool, keep_sparsity: bool = True,
                learn_scales: bool = False, use_kernels: bool = False) -> Student:
    """Your student from ``name_or_path``, checked against the teacher and described: quantization
    (full training thaws the integer weights for quantization-aware training, with their scales
    learned when ``learn_scales``; with ``use_peft`` they stay frozen under new adapters), sparsity
    (masks kept unless ``keep_sparsity`` is false) and adapters (trained as adapters on their base)."""
    folder = model_folder(name_or_path, "student_name_or_path")
    model = load_fp4(folder) if is_fp4_folder(folder) else load_model(str(folder), use_kernels)
    if use_peft and is_fp4_model(model):
        raise ValueError(f"{name_or_path} is an FP4 student: it trains in full quantization-aware training (no "
                         "frozen FP4 base under LoRA here): drop --use_peft")
    check_compatible(model, teacher, folder, tokenizer)
    described: dict = {"kind": "own", "student": name_or_path}
    tags = []
    student = Student(model, described, tags)
    if is_peft(model):
        if use_peft:
            raise ValueError(f"{name_or_path} is a PEFT adapter folder: drop --use_peft, its adapters are trained")
        cfg = next(iter(model.peft_config.values()))
        described["adapters"] = {"type": str(cfg.peft_type.value), "r": getattr(cfg, "r", None),
                                 "target_modules": sorted(cfg.target_modules or [])}
        tags.append("lora")
        if (folder / QUANTIZED_BASE).exists():
            student.base_folder = folder / QUANTIZED_BASE
    base = model.get_base_model() if is_peft(model) else model
    quant = quantization_summary(base)
    if quant:
        described["quantization"] = quant
        tags += ["quanto", *quant["weights"]]
        student.degradation = OwnQuantized()
        if not use_peft and not is_peft(model):
            thaw_quantized(model, hold_scales=learn_scales, learn_scales=learn_scales)
            if learn_scales:
                described["learned_scales"] = True
    else:
        sparsity = detect_sparsity(base)
        if sparsity["layers"]:
            described["sparsity"] = sparsity | {"kept": keep_sparsity}
            tags += ["pruned", sparsity["pattern"]]
            if keep_sparsity:
                student.degradation = PruneDegradation.keeping(masks_from_zeros(base, include=list(sparsity["layers"])))
    if not is_peft(model):
        model.requires_grad_(True)
    return student


def add_lora(student: Student, model_args, output_dir: str, should_save: bool) -> None:
    """Wrap the student in LoRA adapters (TRL ``ModelConfig`` fields). A quantized base is frozen to
    integer weights first (the memory-light path) and, as it never changes afterwards, saved right
    away to ``output_dir/quantized_base``."""
    if student.quantized:
        to_quanto(student.model)  # the memory-light base: integer weights, frozen
        student.base_folder = Path(output_dir) / QUANTIZED_BASE
        if should_save:
            save_quantized(student.model, student.base_folder)
    student.model = get_peft_model(student.model, get_peft_config(model_args))


def finish_training(student: Student, lora_added: bool) -> None:
    """After training, merge adapters that the job added (keeping the masks) — unless they sit on a
    quantized base, where they stay adapters."""
    if lora_added and not student.quantized:
        student.model = merge_lora(student.model, student.masks) if student.masks else student.model.merge_and_unload()


def clear_saved_model(folder: Path, keep: Path | None = None) -> None:
    """Delete the model files of any format (:data:`~hf_sdft.jobs.outputs.MODEL_OUTPUTS`) from
    ``folder``, but ``keep`` (a quantized base being saved there)."""
    if folder.is_dir():
        remove_entries(folder, MODEL_OUTPUTS, keep=keep)


def save_student(student: Student, tokenizer, output_dir: str) -> tuple[str, str]:
    """Save the recovered student; returns (format, Python that loads it from ``{path}``). The model
    files of an earlier save in ``output_dir`` (any format: a stale ``quanto_qmap.json`` or
    ``adapter_config.json`` would make the new model load wrongly) are deleted first."""
    out = Path(output_dir)
    clear_saved_model(out, keep=student.base_folder)
    if is_peft(student.model):
        student.model.save_pretrained(out)
        if student.base_folder is not None and student.base_folder.resolve() != (out / QUANTIZED_BASE).resolve():
            shutil.copytree(student.base_folder, out / QUANTIZED_BASE, dirs_exist_ok=True)
        fmt = "quanto+lora" if student.base_folder is not None else "peft"
        code = "from hf_sdft.compress.checkpoint import load_model\n\nmodel = load_model(\"{path}\")"
    elif student.quantized and is_fp4_model(student.model):  # FP4: saved in its servable format
        fmt, code = save_fp4(student.model, out)
    elif student.quantized:
        save_quantized(student.model, out)
        fmt, code = "quanto", 'from hf_sdft.compress.quantize import load_quantized\n\nmodel = load_quantized("{path}")'
    else:
        student.model.save_pretrained(out)
        fmt = "transformers"
        code = 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{path}")'
    tokenizer.save_pretrained(out)
    return fmt, code
