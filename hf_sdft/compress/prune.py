"""Pruning as a degradation: unstructured or N:M sparsity scored by magnitude or Wanda, kept
exact through recovery training (:class:`SparsityCallback`) and LoRA merges (:func:`merge_lora`).

Masks are ``{module name: BoolTensor}``, each shaped like the layer's weight ``(out, in)``;
``True`` = weight kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from functools import partial

import torch
from torch import nn
from transformers import TrainerCallback

from .base import Degradation, register_degradation

METHODS = ("magnitude", "wanda")
_PRUNABLE = (nn.Linear, nn.Embedding)


def _parse(sparsity: float, pattern: str, method: str) -> tuple[int, int] | None:
    """Check the options; return ``(N, M)`` for an N:M pattern, ``None`` for ``"unstructured"``."""
    if method not in METHODS:
        raise ValueError(f"unsupported method {method!r}: choose one of {', '.join(METHODS)}")
    if pattern == "unstructured":
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}")
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(
            f"unsupported pattern {pattern!r}: choose 'unstructured' or 'N:M' with 0 < N < M "
            "(N weights kept in every M consecutive inputs), e.g. '2:4' or '4:8'"
        )
    return int(match[1]), int(match[2])


def _adapters(model: nn.Module) -> set[int]:
    """ids of PEFT adapter sub-layers (``lora_A``, ``lora_B``...): never pruned nor masked."""
    return {
        id(sub)
        for m in model.modules()
        for attr in getattr(m, "adapter_layer_names", ())
        if isinstance(getattr(m, attr, None), nn.Module)
        for sub in getattr(m, attr).modules()
    }


def prunable_layers(model: nn.Module, include: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The layers to prune, by module name.

    By default every ``nn.Linear`` but the output embeddings (``lm_head``); with ``include``
    (fnmatch patterns over module names), the ``nn.Linear`` / ``nn.Embedding`` layers matching
    one of them, e.g. ``["model.layers.*", "lm_head"]``. PEFT adapter layers are skipped.
    """
    include = [include] if isinstance(include, str) else include
    adapters = _adapters(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def chosen(name: str, module: nn.Module) -> bool:
        if not isinstance(module, _PRUNABLE) or id(module) in adapters:
            return False
        if include is None:
            return isinstance(module, nn.Linear) and module is not head
        return any(fnmatchcase(name, p) for p in include)

    layers = {name: module for name, module in model.named_modules() if chosen(name, module)}
    if not layers:
        where = f"matching include={list(include)}" if include is not None else "outside the embeddings and lm_head"
        raise ValueError(
            f"no linear layer to prune {where} in {type(model).__name__}: "
            "name the layers with include= (fnmatch patterns over model.named_modules() names)"
        )
    return layers


def _input_norms(
    model: nn.Module, layers: dict[str, nn.Module], calibration: Sequence[dict]
) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ ``(in,)`` of each layer's inputs over the calibration tokens, padding excluded."""
    sums = {name: torch.zeros(m.in_features, device=m.weight.device) for name, m in layers.items()}
    keep: dict[str, torch.Tensor | None] = {"tokens": None}

    def accumulate(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if keep["tokens"] is not None and x.shape[:-1] == keep["tokens"].shape:
            x = x[keep["tokens"]]
        sums[name] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).to(sums[name].device)

    handles = [m.register_forward_pre_hook(partial(accumulate, name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                mask = batch.get("attention_mask")
                mask = None if mask is None else torch.as_tensor(mask, device=device)
                keep["tokens"] = None if mask is None else mask.bool()
                model(input_ids=torch.as_tensor(batch["input_ids"], device=device), attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: s.sqrt() for name, s in sums.items()}


def _keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Keep-mask ``(out, in)`` from scores ``(out, in)``: top N of every M along ``in``, else drop the
    ``round(sparsity·n)`` lowest of each row (``per_row``) or of the whole matrix."""
    if nm is not None:
        n, m = nm
        groups = score.reshape(*score.shape[:-1], -1, m)
        top = groups.topk(n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(score.shape)
    flat = score if per_row else score.reshape(1, -1)
    low = flat.topk(round(sparsity * flat.shape[-1]), dim=-1, largest=False).indices
    return torch.ones_like(flat, dtype=torch.bool).scatter_(-1, low, False).reshape(score.shape)


def prune(
    model: nn.Module,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    method: str = "magnitude",
    calibration: Sequence[dict] | None = None,
    include: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Zero weights of ``model``'s :func:`prunable_layers` in place; return their keep-masks.

    Args:
        sparsity: fraction of weights zeroed, in [0, 1); ignored for N:M (sparsity 1 − N/M).
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``...): N weights kept in every
            M consecutive weights along the input dimension (the weight's last dim).
        method: ``"magnitude"`` scores ``|W|``; unstructured, each layer loses exactly
            ``round(sparsity·numel)`` weights. ``"wanda"`` scores ``|W_ij|·‖X_j‖₂`` (Sun et al. 2023),
            ``X_j`` the layer's j-th input over ``calibration`` in one pass of the dense model;
            unstructured, each output row loses ``round(sparsity·in)`` weights.
        calibration: tokenized batches for Wanda: dicts of ``input_ids`` ``(B, T)`` and optional
            ``attention_mask`` ``(B, T)`` (padded tokens are not counted).
        include: fnmatch patterns over module names choosing the layers (see :func:`prunable_layers`).

    Returns:
        ``{module name: BoolTensor}`` shaped like each weight, on its device; ``True`` = kept.
    """
    nm = _parse(sparsity, pattern, method)
    layers = prunable_layers(model, include)
    if nm is not None:
        for name, m in layers.items():
            if m.weight.shape[-1] % nm[1]:
                raise ValueError(
                    f"pattern {pattern!r} needs input sizes divisible by {nm[1]}, but {name} has "
                    f"{m.weight.shape[-1]} inputs: leave it out with include= or choose another M"
                )
    norms: dict[str, torch.Tensor] = {}
    if method == "wanda":
        if not calibration:
            raise ValueError(
                "method='wanda' needs calibration=: a list of tokenized batches "
                "(dicts with input_ids and optional attention_mask)"
            )
        embeddings = [name for name, m in layers.items() if isinstance(m, nn.Embedding)]
        if embeddings:
            raise ValueError(
                f"wanda scores linear-layer inputs; prune the embeddings {embeddings} with method='magnitude'"
            )
        norms = _input_norms(model, layers, calibration)
    masks = {}
    with torch.no_grad():
        for name, m in layers.items():
            score = m.weight.abs().float()
            if method == "wanda":
                score = score * norms[name]
            masks[name] = _keep_mask(score, sparsity, nm, per_row=method == "wanda")
            m.weight.masked_fill_(~masks[name], 0)
    return masks


def resolve_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` re-keyed by the module names of ``model``, which may wrap the pruned model.

    A mask goes to every linear / embedding layer of its shape whose name contains the original
    name between dots (PEFT ``base_model.model.<name>.base_layer``, DDP ``module.<name>``), PEFT
    adapters excluded, and is moved to that layer's device.
    """
    adapters = _adapters(model)
    layers = [
        (f".{name}.", name, m)
        for name, m in model.named_modules()
        if isinstance(m, _PRUNABLE) and id(m) not in adapters
    ]
    resolved = {}
    for key, mask in masks.items():
        found = {
            name: mask.to(m.weight.device)
            for dotted, name, m in layers
            if f".{key}." in dotted and m.weight.shape == mask.shape
        }
        if not found:
            raise ValueError(
                f"no layer of {type(model).__name__} matches the mask of {key!r} (shape {tuple(mask.shape)}): "
                "were the masks made for another model?"
            )
        resolved.update(found)
    return resolved


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights of ``model`` (plain or wrapped, see :func:`resolve_masks`) in place."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in resolve_masks(model, masks).items():
            modules[name].weight.masked_fill_(~mask, 0)
    return model


def masks_from_zeros(model: nn.Module, include: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks ``W != 0`` of the :func:`prunable_layers`, e.g. after reloading a pruned model."""
    return {name: m.weight.detach() != 0 for name, m in prunable_layers(model, include).items()}


def sparsity_report(model: nn.Module, include: Sequence[str] | None = None) -> dict:
    """Fraction of zero weights: ``{"layers": {name: fraction}, "total": fraction}`` over the
    :func:`prunable_layers`."""
    layers = prunable_layers(model, include)
    zeros = {name: int((m.weight == 0).sum()) for name, m in layers.items()}
    total = sum(m.weight.numel() for m in layers.values())
    return {
        "layers": {name: zeros[name] / m.weight.numel() for name, m in layers.items()},
        "total": sum(zeros.values()) / total,
    }


def merge_lora(peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """``merge_and_unload()``, then re-apply ``masks``: the merged LoRA delta ``B @ A`` is dense
    and would otherwise fill the pruned weights. Returns the merged plain model."""
    return apply_masks(peft_model.merge_and_unload(), masks)


class SparsityCallback(TrainerCallback):
    """Keeps pruned weights at zero during training: re-applies ``masks`` (from :func:`prune`) at
    train begin and after every optimizer step. The trained model may be PEFT/DDP-wrapped."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks
        self._pruned: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _bind(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        self._pruned = [(modules[name].weight, ~mask) for name, mask in resolve_masks(model, self.masks).items()]

    def _apply(self) -> None:
        with torch.no_grad():
            for weight, pruned in self._pruned:
                weight.masked_fill_(pruned, 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._bind(model)
        self._apply()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._pruned:
            self._bind(model)
        self._apply()


@register_degradation
class PruneDegradation(Degradation):
    """Pruning (see :func:`prune`); the masks are kept through recovery by :class:`SparsityCallback`."""

    kind = "prune"

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured", method: str = "magnitude"):
        nm = _parse(sparsity, pattern, method)
        self.sparsity = sparsity if nm is None else 1 - nm[0] / nm[1]
        self.pattern, self.method = pattern, method
        self.masks: dict[str, torch.Tensor] | None = None
        self.measured: float | None = None

    def apply(self, model: nn.Module, calibration: list[dict] | None = None) -> nn.Module:
        self.masks = prune(model, self.sparsity, self.pattern, self.method, calibration)
        self.measured = sparsity_report(model)["total"]
        return model

    def describe(self) -> dict:
        return {
            "kind": self.kind, "sparsity": self.sparsity, "pattern": self.pattern, "method": self.method,
            "measured_sparsity": self.measured,
        }

    def tags(self) -> list[str]:
        return ["pruned", self.pattern, self.method]

    def callbacks(self, model: nn.Module) -> list[TrainerCallback]:
        if self.masks is None:
            raise ValueError("no masks yet: call apply(model) before callbacks()")
        return [SparsityCallback(self.masks)]
