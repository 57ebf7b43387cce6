"""Measuring per-layer student↔teacher CKA on probe batches, and reading it back from a log history."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_sdft.cka.metric import MinibatchCKA
from hf_sdft.data import model_inputs
from hf_sdft.distributed import progress_disabled, shard
from hf_sdft.modeling import capture_layers, evaluating, forward_until_captured, resolve_layers, teacher_context, unwrap

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
    :class:`~hf_sdft.cka.metric.MinibatchCKA`. Under torch.distributed the batches are split over
    processes (:func:`~hf_sdft.distributed.shard`) and the HSIC sums all-reduced, so the value
    equals the single-process one. ``teacher=None``: the PEFT student's base (adapters disabled).
    """
    student = unwrap(student)
    teacher_module = unwrap(teacher) if teacher is not None else student
    layers = resolve_layers(layers, student, teacher_module, what="layers")
    devices = next(student.parameters()).device, next(teacher_module.parameters()).device
    acc = MinibatchCKA(len(layers), len(layers), debiased=debiased, cross_layers=full)
    with evaluating(student, teacher_module):
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
    acc.all_reduce()
    return layers, acc.matrix() if full else acc.compute()
