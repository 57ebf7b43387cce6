"""``CKACallback``: an observer that measures per-layer student↔teacher CKA during training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .cka import MinibatchCKA
from .data import model_inputs, tokenize_probe
from .distributed import progress_disabled, shard
from .teacher import capture_layers, forward_until_captured, resolve_layers, teacher_context, unwrap

CKA_PREFIX = "cka/"


def cka_history(log_history: Sequence[dict]) -> list[dict]:
    """CKA measurements recorded in a ``TrainerState.log_history``, in step order.

    Returns ``[{"step": int, "mean": float, "layers": {layer_index: cka}}]``.
    """
    out = []
    for entry in log_history:
        if f"{CKA_PREFIX}mean" not in entry:
            continue
        layers = {int(k[len(CKA_PREFIX + "layer_"):]): v for k, v in entry.items() if k.startswith(CKA_PREFIX + "layer_")}
        out.append({"step": int(entry.get("step", 0)), "mean": entry[f"{CKA_PREFIX}mean"], "layers": dict(sorted(layers.items()))})
    return sorted(out, key=lambda e: e["step"])


def per_layer(layers: Sequence[int], values: torch.Tensor) -> dict[str, float]:
    """``{"<layer index>": value}``: the JSON-friendly form of per-layer CKA."""
    return {str(i): float(v) for i, v in zip(layers, values, strict=True)}


@torch.no_grad()
def measure_cka(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Sequence[dict[str, torch.Tensor]],
    layers="all",
    *,
    debiased: bool = False,
    full: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """Per-layer CKA (or the layer×layer matrix with ``full=True``) over fixed probe batches.

    Tokens are the rows (padding excluded); each batch is one minibatch of
    :class:`~hf_sdft.cka.MinibatchCKA`. Under torch.distributed the batches are split over
    processes (:func:`~hf_sdft.distributed.shard`) and the HSIC sums all-reduced, so the value
    equals the single-process one. ``teacher=None``: the PEFT student's base (adapters disabled).
    """
    student = unwrap(student)
    teacher_module = unwrap(teacher) if teacher is not None else student
    layers = resolve_layers(layers, student, teacher_module, what="layers")
    devices = next(student.parameters()).device, next(teacher_module.parameters()).device
    modes = student.training, teacher_module.training
    student.eval(), teacher_module.eval()
    acc = MinibatchCKA(len(layers), len(layers), debiased=debiased, cross_layers=full)
    try:
        for batch, counted in tqdm(shard(batches), desc="CKA", leave=False, disable=progress_disabled()):
            rows = batch["attention_mask"].bool()
            student_rows, teacher_rows = rows.to(devices[0]), rows.to(devices[1])
            with capture_layers(student, layers, stop=True) as hs:  # layers after the last one never run
                forward_until_captured(student, **{k: v.to(devices[0]) for k, v in model_inputs(batch).items()},
                                       use_cache=False)
            with teacher_context(student, teacher) as t, capture_layers(t, layers, stop=True) as ht:
                forward_until_captured(t, **{k: v.to(devices[1]) for k, v in model_inputs(batch).items()},
                                       use_cache=False)
            if counted:
                acc.update([hs[i][student_rows] for i in layers], [ht[i][teacher_rows].to(devices[0]) for i in layers])
    finally:
        student.train(modes[0])
        teacher_module.train(modes[1])
    acc.all_reduce()
    return layers, acc.matrix() if full else acc.compute()


class CKACallback(TrainerCallback):
    """Logs per-layer student↔teacher CKA on a fixed probe set: ``cka/layer_{i}`` and ``cka/mean``.

    Measures at train begin, every ``every_n_steps`` steps (or at each evaluation when it
    is None) and at train end. The values go into ``TrainerState.log_history``, so they are
    saved in ``trainer_state.json`` with every checkpoint and continue after resume; read
    them back with :func:`cka_history`.

    Works with any ``Trainer``: pass ``teacher_model=`` (``SDFTTrainer`` / ``SDFTSFTTrainer``
    supply their own teacher and bind the callback, so its values also reach ``report_to``).
    For another trainer call :meth:`bind` to log through it.

    Args:
        probe_dataset: texts, or examples with ``input_ids`` (and optionally ``attention_mask``).
        max_tokens: cap on probe tokens (rows of the CKA); the same tokens every time.
        debiased: unbiased HSIC per minibatch (Nguyen et al. 2021); needs ≥ 4 tokens a batch.
    """

    def __init__(
        self,
        probe_dataset,
        teacher_model: nn.Module | None = None,
        *,
        layers="all",
        every_n_steps: int | None = None,
        max_tokens: int = 4096,
        debiased: bool = False,
        batch_size: int = 8,
        tokenizer=None,
    ):
        if probe_dataset is None or len(probe_dataset) == 0:
            raise ValueError("CKACallback needs a non-empty probe_dataset (texts or tokenized examples)")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be a positive number of steps or None")
        if max_tokens < 4:
            raise ValueError(f"max_tokens={max_tokens} is too small to measure CKA (need at least 4 tokens)")
        from .config import parse_layers

        self.probe_dataset = probe_dataset
        self.teacher_model = teacher_model
        self.layers = parse_layers(layers)
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self.debiased = debiased
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.trainer = None
        self._batches = None

    def bind(self, trainer) -> None:
        """Log through ``trainer.log`` and, if no teacher was given, use ``trainer.teacher_model``."""
        self.trainer = trainer

    def _teacher(self) -> tuple[bool, nn.Module | None]:
        if self.teacher_model is not None:
            return True, self.teacher_model
        if self.trainer is not None and hasattr(self.trainer, "teacher_model"):
            return True, self.trainer.teacher_model
        return False, None

    def measure(self, model: nn.Module, tokenizer=None) -> dict[str, float]:
        found, teacher = self._teacher()
        if not found:
            raise ValueError("CKACallback has no teacher: pass teacher_model= or use it with an SDFT trainer")
        if self._batches is None:
            self._batches = tokenize_probe(self.probe_dataset, self.tokenizer or tokenizer, self.max_tokens, self.batch_size)
        layers, values = measure_cka(model, teacher, self._batches, self.layers, debiased=self.debiased)
        logs = {f"{CKA_PREFIX}layer_{i}": v for i, v in per_layer(layers, values).items()}
        logs[f"{CKA_PREFIX}mean"] = float(values.mean())
        return logs

    def _record(self, state, control, model, tokenizer) -> None:
        if any(e.get("step") == state.global_step and f"{CKA_PREFIX}mean" in e for e in state.log_history):
            return  # already measured at this step (e.g. resumed from a checkpoint taken here)
        logs = self.measure(model, tokenizer)
        if self.trainer is not None:
            pending = control.should_log
            self.trainer.log(logs)  # on_log clears should_log: keep the Trainer's own pending log
            control.should_log = self.trainer.control.should_log = pending
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._record(state, control, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._record(state, control, model, processing_class)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_n_steps is None:
            self._record(state, control, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._record(state, control, model, processing_class)
