"""Perplexity of a causal LM over fixed batches, exact under several processes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, progress_disabled, shard
from .teacher import unwrap


@torch.no_grad()
def nll_and_count(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) and scored-token count over ``batches``.

    Under torch.distributed the batches are split over processes (:func:`~hf_sdft.distributed.shard`)
    and the sums all-reduced, so every process returns the single-process totals.
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    try:
        for batch, counted in tqdm(shard(batches), desc="perplexity", leave=False, disable=progress_disabled()):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            if counted:
                totals[0] += F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum").double().cpu()
                totals[1] += (target != -100).sum().cpu()
    finally:
        model.train(was_training)
    all_reduce_sum(totals)
    return totals[0].item(), int(totals[1].item())


def perplexity(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """exp(mean next-token NLL) over ``batches``; padding (attention_mask 0) is not scored."""
    nll, count = nll_and_count(model, batches)
    if count == 0:
        raise ValueError("no token to score: the evaluation set is empty")
    return math.exp(nll / count)


def load_model(path: str) -> nn.Module:
    """A causal LM saved by hf-sdft or transformers: folder or Hub id (quanto and
    quanto+LoRA folders are detected)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from .compress.quantize import QMAP_FILE, load_quantized
    from .recover import QUANTIZED_BASE

    folder = Path(path)
    if (folder / "adapter_config.json").exists() and (folder / QUANTIZED_BASE / QMAP_FILE).exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_quantized(folder, subfolder=QUANTIZED_BASE), str(folder))
    if (folder / QMAP_FILE).exists():
        return load_quantized(folder)
    return AutoModelForCausalLM.from_pretrained(path)


def recovery_ratio(ppl_teacher: float, ppl_degraded: float, ppl_recovered: float) -> float | None:
    """R = (ppl_degraded − ppl_recovered) / (ppl_degraded − ppl_teacher); None when nothing was lost."""
    gap = ppl_degraded - ppl_teacher
    if gap <= 1e-9 * max(ppl_teacher, 1.0):
        return None
    return (ppl_degraded - ppl_recovered) / gap
