"""The student of a recovery: degraded here from the original, or your own checkpoint made
elsewhere — a transformers folder (pruned ones detected by their zeros), a quanto folder, or a
PEFT adapter folder — described for the stats and card; LoRA wrapping; saving it in a format
that loads back, and :func:`load_model`, which loads every one of those formats."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_sdft.compress.fp4_student import is_fp4_folder, is_fp4_model, load_fp4, save_fp4
from hf_sdft.compress.prune import SparsityCallback, merge_lora, prunable_layers, sparsity_report
from hf_sdft.compress.quantize import (
    QMAP_FILE,
    freeze_base,
    load_quantized,
    quantization_summary,
    save_quantized,
    thaw_quantized,
)
from hf_sdft.modeling import (
    check_safetensors,
    check_vocabularies,
    from_pretrained,
    is_peft,
    num_layers,
    output_vocab_size,
    unwrap,
)

QUANTIZED_BASE = "quantized_base"
ADAPTER_CONFIG = "adapter_config.json"
MIN_LAYER_SPARSITY = 0.01  # a layer with at least this fraction of exact zeros counts as pruned
NM_PATTERNS = ((2, 4), (4, 8), (1, 4))


@dataclass
class Student:
    """A student and what is known of it. ``description`` is ``sdft_stats.json``'s ``degradation``
    entry (``{"kind": ...}``); ``masks`` (``{module name: keep-mask}``) are kept through training,
    saving and LoRA merges; ``base_folder`` is the saved quantized base of a PEFT student."""

    model: nn.Module
    description: dict
    tags: list[str] = field(default_factory=list)
    masks: dict[str, torch.Tensor] | None = None
    quantized: bool = False
    base_folder: Path | None = None

    def callbacks(self) -> list:
        return [SparsityCallback(self.masks)] if self.masks else []


def model_folder(name_or_path: str, what: str = "model") -> Path:
    """A local folder for ``name_or_path``: itself, or the Hub snapshot of that repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or path.exists()
    if looks_local:
        raise FileNotFoundError(f"{what} {name_or_path}: no such folder. Give an existing model folder or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path))
    except Exception as err:  # offline, unknown repo, gated...
        raise OSError(
            f"{what} {name_or_path!r} is not a local folder and could not be fetched from the Hub ({err}). "
            "Check the path, or the repo id and your network / HF_HUB_OFFLINE setting"
        ) from None


def load_model(name_or_path: str, use_kernels: bool = False) -> nn.Module:
    """A causal LM saved by hf-sdft, transformers or quanto, or a PEFT adapter folder on its
    base, as saved (quantized layers frozen to integer weights, adapters trainable). Hub kernels
    stay off unless ``use_kernels`` (see :func:`~hf_sdft.modeling.from_pretrained`)."""
    folder = model_folder(name_or_path)
    if (folder / ADAPTER_CONFIG).exists():
        from peft import PeftModel

        check_safetensors(folder)  # the adapters' weights
        if (folder / QUANTIZED_BASE / QMAP_FILE).exists():
            base = load_quantized(folder, subfolder=QUANTIZED_BASE)
        else:
            base_name = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            if not base_name:
                raise ValueError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path: cannot load its base")
            base = load_model(base_name, use_kernels)
        return PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    if (folder / QMAP_FILE).exists():
        return load_quantized(folder)
    if is_fp4_folder(folder):  # an FP4 student (compressed-tensors nvfp4 / mxfp4), as FP4 layers
        return load_fp4(folder)
    return from_pretrained(folder, dtype=torch.float32, use_kernels=use_kernels)


def nm_pattern(weight: torch.Tensor) -> str | None:
    """``"N:M"`` when every M consecutive inputs of every row hold at most N non-zeros."""
    for n, m in NM_PATTERNS:
        if weight.shape[-1] % m == 0 and int((weight.reshape(-1, m) != 0).sum(-1).max()) <= n:
            return f"{n}:{m}"
    return None


def detect_sparsity(model: nn.Module) -> dict:
    """Pruned layers of a dense-format checkpoint: ``{"layers": {name: zero fraction}, "total": …,
    "pattern": "2:4" | "unstructured"}``; ``layers`` is empty when nothing looks pruned."""
    report = sparsity_report(model)
    pruned = {k: v for k, v in report["layers"].items() if v >= MIN_LAYER_SPARSITY}
    layers = prunable_layers(model)
    patterns = {nm_pattern(layers[name].weight.detach()) for name in pruned}
    pattern = patterns.pop() if len(patterns) == 1 and None not in patterns else "unstructured"
    return {"layers": pruned, "total": report["total"], "pattern": pattern if pruned else None}


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
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(student_folder).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"the tokenizer saved with the student ({student_folder}) differs from the original's: "
                "SDFT compares next-token distributions over one vocabulary; use the original's tokenizer"
            )


def own_student(rec, teacher: nn.Module, tokenizer, use_peft: bool, use_kernels: bool = False) -> Student:
    """Your student from ``rec.student_name_or_path``, checked against the teacher and described:
    quantization (full training thaws the integer weights for quantization-aware training; with
    ``use_peft`` they stay frozen under new adapters), sparsity (masks kept unless
    ``rec.keep_sparsity`` is false) and adapters (trained as adapters on their base)."""
    folder = model_folder(rec.student_name_or_path, "student_name_or_path")
    model = load_model(str(folder), use_kernels)
    check_compatible(model, teacher, folder, tokenizer)
    described: dict = {"kind": "own", "student": rec.student_name_or_path}
    tags = []
    student = Student(model, described, tags)
    if is_peft(model):
        if use_peft:
            raise ValueError(f"{rec.student_name_or_path} is a PEFT adapter folder: drop --use_peft, its adapters are trained")
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
        student.quantized = True
        if not use_peft and not is_peft(model):
            learn = getattr(rec, "quant_learn_scales", False)
            thaw_quantized(model, hold_scales=learn, learn_scales=learn)
            if learn:
                described["learned_scales"] = True
    else:
        sparsity = detect_sparsity(base)
        if sparsity["layers"]:
            described["sparsity"] = sparsity | {"kept": rec.keep_sparsity}
            tags += ["pruned", sparsity["pattern"]]
            if rec.keep_sparsity:
                layers = prunable_layers(base)
                student.masks = {name: layers[name].weight.detach() != 0 for name in sparsity["layers"]}
    if not is_peft(model):
        model.requires_grad_(True)
    return student


def add_lora(student: Student, model_args, output_dir: str, should_save: bool) -> None:
    """Wrap the student in LoRA adapters (TRL ``ModelConfig`` fields). A quantized base is frozen to
    integer weights first (the memory-light path) and, as it never changes afterwards, saved right
    away to ``output_dir/quantized_base``."""
    from peft import get_peft_model
    from trl import get_peft_config

    if student.quantized:
        freeze_base(student.model)
        student.base_folder = Path(output_dir) / QUANTIZED_BASE
        if should_save:
            save_quantized(student.model, student.base_folder)
    student.model = get_peft_model(student.model, get_peft_config(model_args))


def finish_training(student: Student, lora_added: bool) -> None:
    """After training, merge adapters that the job added (keeping the masks) — unless they sit on a
    quantized base, where they stay adapters."""
    if lora_added and not student.quantized:
        student.model = merge_lora(student.model, student.masks) if student.masks else student.model.merge_and_unload()


def save_student(student: Student, tokenizer, output_dir: str) -> tuple[str, str]:
    """Save the recovered student; returns (format, Python that loads it from ``{path}``)."""
    out = Path(output_dir)
    if is_peft(student.model):
        student.model.save_pretrained(out)
        if student.base_folder is not None and student.base_folder.resolve() != (out / QUANTIZED_BASE).resolve():
            shutil.copytree(student.base_folder, out / QUANTIZED_BASE, dirs_exist_ok=True)
        fmt = "quanto+lora" if student.base_folder is not None else "peft"
        code = "from hf_sdft.compress.student import load_model\n\nmodel = load_model(\"{path}\")"
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
