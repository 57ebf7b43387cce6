"""Perplexity of a causal LM over fixed batches, exact under several processes; ``hf-sdft eval``'s arguments."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import get_type_hints

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hf_sdft.cka.measure import measure_cka, per_layer
from hf_sdft.distributed import all_reduce_sum, progress_disabled, shard
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.modeling import evaluating, unwrap
from hf_sdft.trainer.losses import distillation_loss


@dataclass
class EvalArguments:
    """``hf-sdft eval``'s two models (its data fields: :class:`EvalDataArguments`)."""

    student: str = field(metadata={"help": "Folder or Hub id (transformers, quanto, PEFT adapters)."})
    teacher: str = field(metadata={"help": "The original model: folder or Hub id."})


def _check_data(self):
    RecoveryArguments(**asdict(self))  # RecoveryArguments' own checks (txt_sample_by, eval_file exists)


# hf-sdft eval's data and lm-eval fields: RecoveryArguments' own (help, defaults, --tasks / --limit), none other
EVAL_DATA_FIELDS = ("eval_file", "dataset_text_field", "txt_sample_by", "block_size", "max_eval_blocks",
                    "probe_blocks", "eval_batch_size", "eval_tasks", "eval_limit")
EvalDataArguments = make_dataclass(
    "EvalDataArguments",
    [(f.name, get_type_hints(RecoveryArguments)[f.name], field(default=f.default, metadata=f.metadata))
     for f in fields(RecoveryArguments) if f.name in EVAL_DATA_FIELDS],
    namespace={"__post_init__": _check_data, "__module__": __name__},
)


@torch.no_grad()
def held_out_sums(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], teacher: nn.Module | None = None
) -> torch.Tensor:
    """float64 ``[summed next-token NLL (nats), scored-token count, summed KL(teacher ‖ model)]``
    over ``batches`` (the KL is 0 without ``teacher``). Scored: every token of ``attention_mask``
    (padding excluded), or those of ``labels`` ≠ −100 when given.

    Under torch.distributed the batches are split over processes (:func:`~hf_sdft.distributed.shard`)
    and the sums all-reduced, so every process returns the single-process totals.
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64)
    with evaluating(model):
        for batch, counted in tqdm(shard(batches), desc="perplexity", leave=False, disable=progress_disabled()):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            labels = batch["labels"].to(device) if "labels" in batch else ids
            target = labels[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            if not counted:
                continue
            totals[0] += F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum").double().cpu()
            totals[1] += (target != -100).sum().cpu()
            if teacher is not None:
                t_device = next(teacher.parameters()).device
                t_logits = teacher(input_ids=ids.to(t_device), attention_mask=mask.to(t_device), use_cache=False).logits
                totals[2] += distillation_loss(logits, t_logits[:, :-1].float().to(device), target != -100,
                                               num_items_in_batch=1).double().cpu()
    all_reduce_sum(totals)
    return totals


def nll_and_count(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) and scored-token count over ``batches``
    (see :func:`held_out_sums`)."""
    totals = held_out_sums(model, batches)
    return totals[0].item(), int(totals[1].item())


def perplexity(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """exp(mean next-token NLL) over ``batches``; padding (attention_mask 0) is not scored."""
    return perplexity_of(*nll_and_count(model, batches))


def perplexity_of(nll: float, count: float) -> float:
    """exp(nll / count) of a summed NLL (nats) over ``count`` scored tokens."""
    if count == 0:
        raise ValueError("no token to score: the evaluation set is empty")
    return math.exp(nll / count)


def recovery_ratio(ppl_teacher: float, ppl_degraded: float, ppl_recovered: float) -> float | None:
    """R = (ppl_degraded − ppl_recovered) / (ppl_degraded − ppl_teacher); None when nothing was lost."""
    gap = ppl_degraded - ppl_teacher
    if gap <= 1e-9 * max(ppl_teacher, 1.0):
        return None
    return (ppl_degraded - ppl_recovered) / gap


def measure(model: nn.Module, teacher: nn.Module | None, data) -> dict:
    """Held-out perplexity (and the narrow task's) of ``model`` and its per-layer CKA to ``teacher``
    on the probe set (skipped when ``teacher`` is None: the teacher's own figures).
    ``data``: a :class:`~hf_sdft.data.RecoveryData`."""
    out = {"ppl": perplexity(model, data.eval.batches)}
    if teacher is not None:
        layers, cka = measure_cka(model, teacher, data.eval.probe_batches)
        out |= {"cka": per_layer(layers, cka), "cka_mean": float(cka.mean())}
    if data.narrow_eval is not None:
        out["narrow_ppl"] = perplexity(model, data.narrow_eval.batches)
    return out
