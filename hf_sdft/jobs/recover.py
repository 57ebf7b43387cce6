"""The recovery job, ``hf-sdft recover``: a pipeline of named steps.

    load → student → measure → [block reconstruction → measure] → train → measure → save → card

Each step's pieces live in their own module: arguments in :mod:`hf_sdft.jobs.config`, data in
:mod:`hf_sdft.jobs.recovery_data`, the student (your own, LoRA, saving) in
:mod:`hf_sdft.jobs.student`, degradations in :mod:`hf_sdft.compress`, trainers in :mod:`hf_sdft.jobs.sft`, measurements in
:mod:`hf_sdft.jobs.evaluation`, the stats in :mod:`hf_sdft.jobs.stats`, the card in :mod:`hf_sdft.jobs.cards`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_from_disk
from torch import nn
from transformers import AutoTokenizer, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from hf_sdft.cka.callback import CKACallback
from hf_sdft.compress.reconstruct import reconstruct_blocks
from hf_sdft.data import DEFAULT_SPLITS, default_data_file, default_model_path, load_examples, tokenize_examples
from hf_sdft.distributed import progress_disabled, wait_for_everyone
from hf_sdft.export import exact_formats, read_student
from hf_sdft.jobs.best_state import add_kept, bind_keep_best, keep_best_callbacks
from hf_sdft.jobs.cards import STATS_FILE, push_recovered, write_card
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.jobs.evaluation import measure
from hf_sdft.jobs.export import export_recovered
from hf_sdft.jobs.recovery_data import RecoveryData, load_recovery_data
from hf_sdft.jobs.rewrite import RewriteArguments, rewrite_file
from hf_sdft.jobs.sft import make_trainer, sft_on_narrow
from hf_sdft.jobs.stats import build_stats, downstream_scores
from hf_sdft.jobs.student import Student, add_lora, finish_training, own_student, save_student
from hf_sdft.modeling import from_pretrained, model_folder
from hf_sdft.trainer.config import SDFTConfig

logger = logging.get_logger(__name__)


@dataclass
class Original:
    """The original model (the frozen teacher), its tokenizer, where it came from, and the data."""

    path: str
    tokenizer: object
    model: torch.nn.Module
    data: RecoveryData


def check_launch(args: SDFTConfig) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but training is not distributed (world size {args.world_size}): "
            "each would train alone and overwrite the others' output. On CPU pass --use_cpu true"
        )


def load(rec: RecoveryArguments, args: SDFTConfig, model_args) -> Original:
    """Step 1: the original and its tokenizer; the data, tokenized by that tokenizer. The original
    loads in float32 when the student is degraded from it here, else directly in the teacher's
    dtype (``teacher_dtype``). Unset ``model_name_or_path`` means the embedded default model."""
    default_model = model_args.model_name_or_path is None
    path = default_model_path() if default_model else model_args.model_name_or_path
    folder = model_folder(path, "model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    own = rec.student_name_or_path is not None
    dtype = args.resolve_teacher_dtype(torch.float32) if own else torch.float32
    model = from_pretrained(folder, dtype=dtype, use_kernels=args.use_kernels)
    template = args.teacher_prompt_template if args.teacher_context == "demonstration" else None
    return Original(path, tokenizer, model, load_recovery_data(rec, tokenizer, default_model, template))


def make_student(original: Original, rec: RecoveryArguments, args: SDFTConfig, model_args) -> Student:
    """Step 2: your own student (``student_name_or_path``) or a degraded copy of the original."""
    if rec.quant_learn_scales and model_args.use_peft:
        raise ValueError("quant_learn_scales trains the quantization scales in full quantization-aware training; "
                         "with use_peft the quantized base is frozen under the adapters: drop one of the two")
    if rec.student_name_or_path is not None:
        return own_student(rec.student_name_or_path, original.model, original.tokenizer,
                           use_peft=bool(model_args.use_peft), keep_sparsity=rec.keep_sparsity,
                           learn_scales=rec.quant_learn_scales, use_kernels=args.use_kernels)
    return degraded_student(original.model, original.tokenizer, original.data, rec, args)


def train(student: Student, original: Original, rec: RecoveryArguments, args: SDFTConfig, model_args):
    """Step 4: self-distillation from the frozen original (resuming from the last checkpoint in
    ``output_dir``); returns the trainer (None in ``prevent`` mode, which trains in one run from
    the original)."""
    teacher, data = original.model, original.data
    mode = rec.forgetting_mode if rec.student_name_or_path is None and rec.degradation == "forgetting" else "recover"
    if mode == "prevent":
        student.model = copy.deepcopy(teacher).requires_grad_(True)  # narrow CE + KD to the original in one run
        sft_on_narrow(student.model, original.tokenizer, data, args, rec, kd_teacher=teacher)
        return None
    if mode == "rewrite":  # plain SFT from the original, on the original's own rewrites of the narrow task
        student.model = copy.deepcopy(teacher).requires_grad_(True)
        narrow = rewritten_narrow_task(original, rec, args)
        sft_on_narrow(student.model, original.tokenizer, dataclasses.replace(data, narrow_train=narrow), args, rec)
        return None
    lora_added = bool(model_args.use_peft)
    if lora_added:
        add_lora(student, model_args, args.output_dir, args.should_save)
    measured_against = teacher if rec.teacher_cache or args.teacher_model_kind == "ema" else None  # else the trainer's
    callbacks = [CKACallback(data.eval.probe, teacher_model=measured_against, every_n_steps=rec.cka_every_n_steps,
                             max_tokens=len(data.eval.probe) * rec.block_size), *student.callbacks(),
                 *keep_best_callbacks(rec, args, data.eval.batches)]  # last: measures the masked student
    train_data = load_from_disk(rec.teacher_cache) if rec.teacher_cache else data.train
    # the recovered student (with its card) is pushed once at the end, never the checkpoints
    trainer = make_trainer(student.model, dataclasses.replace(args, push_to_hub=False),
                           None if rec.teacher_cache else teacher, train_data, original.tokenizer, data.fmt, callbacks)
    bind_keep_best(trainer)
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    trainer.save_state()  # trainer_state.json next to the model: loss curves for the card
    finish_training(student, lora_added)
    return trainer


def resume_checkpoint(args: SDFTConfig):
    """The checkpoint training resumes from: ``resume_from_checkpoint``, else the last one in
    ``output_dir`` (None when there is none)."""
    resume = args.resume_from_checkpoint
    if resume is None and Path(args.output_dir).is_dir():
        resume = get_last_checkpoint(args.output_dir)
    return resume


def reconstruct(student: Student, original: Original, rec: RecoveryArguments, args: SDFTConfig) -> dict | None:
    """Step 3b (``block_reconstruction``): each decoder block of the student trained alone on the
    teacher's block output over the calibration blocks
    (:func:`~hf_sdft.compress.reconstruct.reconstruct_blocks`); None when off. Skipped when
    training resumes from a checkpoint, whose weights already went past this phase."""
    if not rec.block_reconstruction:
        return None
    resume = resume_checkpoint(args)
    if resume:
        logger.warning(f"block reconstruction skipped: training resumes from {resume}, past this phase")
        return {"ran": False, "skipped": f"resumed from {Path(str(resume)).name}"}
    report = reconstruct_blocks(student.model, original.model, original.data.calibration(rec.calibration_blocks),
                                steps=rec.block_reconstruction_steps, lr=rec.block_reconstruction_lr,
                                masks=student.masks, scales_lr_ratio=args.quant_scales_lr_ratio,
                                progress=False if args.disable_tqdm or progress_disabled() else None)
    return {"ran": True, "calibration_blocks": rec.calibration_blocks, **report}


def rewritten_narrow_task(original: Original, rec: RecoveryArguments, args: SDFTConfig):
    """``forgetting_mode: rewrite``: the narrow training file rewritten by the original
    (``output_dir/narrow_rewritten.jsonl``, resumed when present), tokenized for training."""
    source = rec.narrow_train_file
    if source is None and rec.narrow_dataset_name is None and original.path == default_model_path():
        source = default_data_file(DEFAULT_SPLITS[rec.default_data][2])
    if source is None or not str(source).endswith(".jsonl"):
        raise ValueError("forgetting_mode rewrite rewrites a local chat / prompt-completion .jsonl: set "
                         "narrow_train_file (or run hf-sdft rewrite and pass its output as narrow_train_file "
                         "with forgetting_mode recover)")
    target = Path(args.output_dir) / "narrow_rewritten.jsonl"
    if args.process_index == 0:  # one process writes; the others wait and read
        rewrite_file(original.model, original.tokenizer, RewriteArguments(
            train_file=str(source), output_file=str(target), answer_regex=rec.rewrite_answer_regex,
            batch_size=rec.eval_batch_size))
    wait_for_everyone()
    examples = load_examples(data_file=str(target))
    if original.data.fmt != "chat":
        raise ValueError("forgetting_mode rewrite needs chat or prompt/completion data (default_data chat)")
    return tokenize_examples(original.tokenizer, examples, rec.block_size)


def run_recovery(rec: RecoveryArguments, args: SDFTConfig, model_args) -> dict:
    """The whole job; returns the stats dict (also written to ``output_dir/sdft_stats.json``)."""
    check_launch(args)
    started = time.time()
    set_seed(args.seed)
    original = load(rec, args, model_args)
    teacher_figures = measure(original.model, None, original.data)
    student = make_student(original, rec, args, model_args)
    original.model.requires_grad_(False).eval()
    before = measure(student.model, original.model, original.data)
    scores = downstream_scores(rec, original.tokenizer, {"teacher": original.model, "degraded": student.model})
    blocks = reconstruct(student, original, rec, args)
    after_blocks = measure(student.model, original.model, original.data) if blocks and blocks["ran"] else None
    trainer = train(student, original, rec, args, model_args)
    after = measure(student.model, original.model, original.data)
    scores |= downstream_scores(rec, original.tokenizer, {"recovered": student.model})
    stats = build_stats(rec, args, model_args, original.path, student, teacher_figures, before, after, trainer,
                        scores, time.time() - started)
    add_kept(stats, trainer)
    if blocks is not None:
        stats["block_reconstruction"] = blocks
        if after_blocks is not None:
            stats["perplexity"]["after_blocks"] = after_blocks["ppl"]
            stats["cka"]["mean_after_blocks"] = after_blocks["cka_mean"]
    if args.should_save:
        stats["format"], stats["loading_code"] = save_student(student, original.tokenizer, args.output_dir)
        hub_format = resolve_hub_format(rec, args.output_dir) if args.push_to_hub else None
        formats = list(dict.fromkeys(rec.export_list + ([hub_format] if hub_format not in (None, "native") else [])))
        if formats:
            stats["exports"] = export_recovered(args.output_dir, formats, original.data.eval.batches,
                                                rec.export_allow_rounding)
        Path(args.output_dir, STATS_FILE).write_text(json.dumps(stats, indent=2))
        if args.push_to_hub:
            push_recovered(args.output_dir, args.hub_model_id or Path(args.output_dir).name,
                           private=bool(args.hub_private_repo), token=args.hub_token, hub_format=hub_format)
        else:
            write_card(args.output_dir)
    return stats


def resolve_hub_format(rec: RecoveryArguments, output_dir: str) -> str:
    """``hub_format`` with ``auto`` resolved: compressed-tensors for a quantized student that has an
    exact form there, else dense."""
    if rec.hub_format != "auto":
        return rec.hub_format
    weights = read_student(output_dir)
    return "compressed-tensors" if weights.grids() and "compressed-tensors" in exact_formats(weights) else "dense"


def degraded_student(teacher: nn.Module, tokenizer, data, rec, args) -> Student:
    """A trainable copy of ``teacher`` degraded as ``rec`` says: quantized, pruned, or fine-tuned
    on the narrow task (forgetting)."""
    model = copy.deepcopy(teacher).requires_grad_(True)
    if rec.degradation == "forgetting":
        sft_on_narrow(model, tokenizer, data, args, rec)
        described = {"kind": "forgetting", "mode": rec.forgetting_mode, "sft_steps": rec.forgetting_steps,
                     "sft_learning_rate": rec.forgetting_learning_rate}
        return Student(model, described, ["forgetting"])
    degradation = rec.build_degradation()
    if degradation is None:
        return Student(model, {"kind": "none"})
    degradation.apply(model, calibration=data.calibration(rec.calibration_blocks))
    return Student(model, degradation.describe(), degradation.tags(), degradation=degradation)
