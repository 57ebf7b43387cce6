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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_from_disk
from torch import nn
from transformers import AutoTokenizer, set_seed
from transformers.utils import logging

from hf_sdft.cka.callback import CKACallback
from hf_sdft.compress.reconstruct import reconstruct_blocks
from hf_sdft.data import (
    DEFAULT_SPLITS,
    default_data_file,
    default_model_path,
    load_examples,
    texts_of,
    tokenize_examples,
)
from hf_sdft.distributed import progress_disabled, wait_for_everyone
from hf_sdft.export import exact_formats, read_student
from hf_sdft.jobs.best_state import add_kept, bind_keep_best, drop_kept_states, finish_loaded, keep_best_callbacks
from hf_sdft.jobs.cards import STATS_FILE, push_recovered, write_card
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.jobs.evaluation import measure
from hf_sdft.jobs.export import export_recovered
from hf_sdft.jobs.outputs import (
    FingerprintCallback,
    RunFolder,
    matching_checkpoint,
    prepare_output_dir,
    staged_outputs,
    write_json,
)
from hf_sdft.jobs.recovery_data import RecoveryData, load_recovery_data
from hf_sdft.jobs.rewrite import RewriteArguments, rewrite_file
from hf_sdft.jobs.sft import make_trainer, sft_on_narrow
from hf_sdft.jobs.stats import build_stats, downstream_scores, model_record, portable_paths
from hf_sdft.jobs.student import Student, add_lora, finish_training, own_student, save_student
from hf_sdft.modeling import from_pretrained, model_folder
from hf_sdft.trainer.config import SDFTConfig
from hf_sdft.trainer.teacher_cache import teacher_identity, verify_cache

logger = logging.get_logger(__name__)


@dataclass
class Original:
    """The original model (the frozen teacher), its tokenizer, where it came from, and the data."""

    path: str
    tokenizer: object
    model: torch.nn.Module
    data: RecoveryData
    revision: str | None = None  # the Hub commit the original was loaded at (None: a local folder)


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
    check_model_flags(model_args)
    default_model = model_args.model_name_or_path is None
    path = default_model_path() if default_model else model_args.model_name_or_path
    folder = model_folder(path, "model_name_or_path", revision=model_args.model_revision)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    own = rec.student_name_or_path is not None
    dtype = args.resolve_teacher_dtype(torch.float32) if own else torch.float32
    model = from_pretrained(folder, dtype=dtype, use_kernels=args.use_kernels, **attention_kwargs(model_args))
    template = args.teacher_prompt_template if args.teacher_context == "demonstration" else None
    try:
        data = load_recovery_data(rec, tokenizer, default_model, template)
    except ValueError as err:
        raise name_empty_data_file(rec, err) from None
    revision = None if Path(path).expanduser().is_dir() else folder.name  # a Hub snapshot: snapshots/<commit>
    return Original(path, tokenizer, model, data, revision)


def check_model_flags(model_args) -> None:
    """TRL ``ModelConfig`` fields this job cannot honour, refused before anything loads (the others,
    ``model_revision`` and ``attn_implementation``, reach every ``from_pretrained``)."""
    if getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
        raise ValueError("load_in_4bit / load_in_8bit (bitsandbytes) are not supported: the original is the "
                         "full-precision teacher and the student is degraded from it. Quantize the student with "
                         "--degradation quanto --quant_weights int4 (or int8), or recover your own quantized student "
                         "with --student_name_or_path")
    dtype = getattr(model_args, "dtype", None)
    if dtype not in (None, "float32", torch.float32):
        raise ValueError(f"dtype={dtype!r} is not used by hf-sdft recover: the student keeps float32 weights; set the "
                         "teacher's precision with --teacher_dtype (auto: bfloat16 where supported) and mixed-precision "
                         "training with --bf16 / --fp16")


def attention_kwargs(model_args) -> dict:
    impl = getattr(model_args, "attn_implementation", None)
    return {"attn_implementation": impl} if impl else {}


def name_empty_data_file(rec: RecoveryArguments, err: ValueError) -> ValueError:
    """A "holds no text" error with the data file it comes from named (the data is read by field,
    not by file)."""
    if "holds no text" not in str(err):
        return err

    for name in ("train_file", "eval_file", "narrow_train_file", "narrow_eval_file"):
        path = getattr(rec, name)
        if path is None:
            continue
        try:
            texts_of(load_examples(data_file=path, txt_sample_by=rec.txt_sample_by), rec.dataset_text_field)
        except ValueError:
            return ValueError(f"{name}={path}: the field {rec.dataset_text_field!r} is empty in every row: give text "
                              "there, or set dataset_text_field to the column that holds it")
    return err


def make_student(original: Original, rec: RecoveryArguments, args: SDFTConfig, model_args) -> Student:
    """Step 2: your own student (``student_name_or_path``) or a degraded copy of the original."""
    if rec.quant_learn_scales and model_args.use_peft:
        raise ValueError("quant_learn_scales trains the quantization scales in full quantization-aware training; "
                         "with use_peft the quantized base is frozen under the adapters: drop one of the two")
    if model_args.use_peft and rec.quant_weights in ("nvfp4", "mxfp4") and rec.degradation == "quanto":
        raise ValueError(f"quant_weights {rec.quant_weights} trains in full quantization-aware training (the FP4 "
                         "grid has no frozen LoRA base here): drop use_peft")
    if rec.student_name_or_path is not None:
        student = own_student(rec.student_name_or_path, original.model, original.tokenizer,
                              use_peft=bool(model_args.use_peft), keep_sparsity=rec.keep_sparsity,
                              learn_scales=rec.quant_learn_scales, use_kernels=args.use_kernels)
        if attention_kwargs(model_args):  # loaded by its format's own loader: set as the original's
            base = student.model.get_base_model() if hasattr(student.model, "get_base_model") else student.model
            base.set_attn_implementation(model_args.attn_implementation)
        return student
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
                 FingerprintCallback(args.output_dir),
                 *keep_best_callbacks(rec, args, data.eval.batches)]  # last: measures the masked student
    train_data = load_teacher_cache(rec, original) if rec.teacher_cache else data.train
    # the recovered student (with its card) is pushed once at the end, never the checkpoints; the
    # trainer's args have no token: each checkpoint pickles them (training_args.bin)
    trainer = make_trainer(student.model, dataclasses.replace(args, push_to_hub=False, hub_token=None),
                           None if rec.teacher_cache else teacher, train_data, original.tokenizer, data.fmt, callbacks)
    bind_keep_best(trainer)
    train_or_load(trainer, resume_checkpoint(args), args)
    trainer.save_state()  # trainer_state.json next to the model: loss curves for the card
    finish_training(student, lora_added)
    return trainer


def load_teacher_cache(rec: RecoveryArguments, original: Original):
    """The teacher cache, once checked against this run (teacher config and weights, tokenizer,
    block size, training data, intact shards: :func:`~hf_sdft.trainer.teacher_cache.verify_cache`)."""
    verify_cache(rec.teacher_cache, teacher_identity(original.model, original.tokenizer, original.data.train,
                                                     rec.block_size))
    return load_from_disk(rec.teacher_cache)


def cache_record(rec: RecoveryArguments) -> dict | None:
    """What the teacher cache holds, for the stats (the data trained on is the cache's)."""
    if not rec.teacher_cache:
        return None
    meta = json.loads(Path(rec.teacher_cache, "sdft_cache.json").read_text())
    keep = ("teacher", "top_k", "temperature", "tokens", "block_size", "data", "teacher_weights", "tokenizer")
    return {"path": Path(rec.teacher_cache).name, **{k: meta[k] for k in keep if k in meta}}


def train_or_load(trainer, resume: str | None, args: SDFTConfig) -> None:
    """``trainer.train``, resuming from ``resume``; a checkpoint already at ``max_steps`` (a run that
    crashed after training, while saving) is loaded as it is: resuming it would train a step more."""
    state_file = Path(resume, "trainer_state.json") if resume else None
    if state_file is not None and state_file.is_file():
        from transformers import TrainerState

        state = TrainerState.load_from_json(str(state_file))
        if state.global_step >= args.max_steps:
            logger.warning(f"{resume} is at step {state.global_step} of {args.max_steps}: training is complete, "
                           "its weights are loaded and saved")
            trainer._load_from_checkpoint(resume)
            trainer.state = state
            finish_loaded(trainer)
            return
    trainer.train(resume_from_checkpoint=resume)


def resume_checkpoint(args: SDFTConfig):
    """The checkpoint training resumes from: ``resume_from_checkpoint``, else the newest one in
    ``output_dir`` saved by this run (same fingerprint; None when there is none)."""
    resume = args.resume_from_checkpoint
    if resume is None and Path(args.output_dir).is_dir():
        resume = matching_checkpoint(args.output_dir)
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
    run = prepare_output_dir(rec, args, model_args, write=args.should_save)  # before any model is loaded
    wait_for_everyone()
    if run.complete_stats is not None:
        return run.complete_stats
    started = time.time()
    set_seed(args.seed)
    original = load(rec, args, model_args)
    teacher_dtypes = {"measured": str(next(original.model.parameters()).dtype).removeprefix("torch.")}
    teacher_figures = measure(original.model, None, original.data)
    student = make_student(original, rec, args, model_args)
    original.model.requires_grad_(False).eval()
    before = measure(student.model, original.model, original.data)
    scores = downstream_scores(rec, original.tokenizer, {"teacher": original.model, "degraded": student.model})
    blocks = reconstruct(student, original, rec, args)
    after_blocks = measure(student.model, original.model, original.data) if blocks and blocks["ran"] else None
    trainer = train(student, original, rec, args, model_args)
    teacher_dtypes["after_training"] = str(next(original.model.parameters()).dtype).removeprefix("torch.")
    after = measure(student.model, original.model, original.data)
    scores |= downstream_scores(rec, original.tokenizer, {"recovered": student.model})
    stats = build_stats(rec, args, model_args, original.path, student, teacher_figures, before, after, trainer,
                        scores, time.time() - started)
    stats["model"] = model_record(original.revision, model_args, args, teacher_dtypes)
    if rec.teacher_cache:
        stats["teacher_cache"] = cache_record(rec)
    add_kept(stats, trainer)
    portable_paths(stats, original.path)
    if blocks is not None:
        stats["block_reconstruction"] = blocks
        if after_blocks is not None:
            stats["perplexity"]["after_blocks"] = after_blocks["ppl"]
            stats["cka"]["mean_after_blocks"] = after_blocks["cka_mean"]
    if args.should_save:
        hub_format = save_outputs(student, original, rec, args, stats, run)
        if args.push_to_hub:
            push_recovered(args.output_dir, args.hub_model_id or Path(args.output_dir).name,
                           private=bool(args.hub_private_repo), token=args.hub_token, hub_format=hub_format)
    return stats


def save_outputs(student: Student, original: Original, rec: RecoveryArguments, args: SDFTConfig, stats: dict,
                 run: RunFolder) -> str | None:
    """Step 6: the recovered student, its exports, the stats and (unless pushed) the card, written
    to a staging folder and moved into place as a whole, replacing every file of the previous output
    (checkpoints stay); then the run is marked complete. Returns the resolved ``hub_format``."""
    out = Path(args.output_dir)
    with staged_outputs(out) as staging:
        stats["format"], stats["loading_code"] = save_student(student, original.tokenizer, str(staging))
        hub_format = resolve_hub_format(rec, str(staging)) if args.push_to_hub else None
        formats = list(dict.fromkeys(rec.export_list + ([hub_format] if hub_format not in (None, "native") else [])))
        if formats:
            stats["exports"] = export_recovered(staging, formats, original.data.eval.batches,
                                                rec.export_allow_rounding)
        write_json(staging / STATS_FILE, stats)
        if (out / "trainer_state.json").is_file():  # the loss curves of the card
            shutil.copy2(out / "trainer_state.json", staging / "trainer_state.json")
        if not args.push_to_hub:
            write_card(staging, shown_as=out)
    run.record(complete=True)
    drop_kept_states(out)
    return hub_format


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
