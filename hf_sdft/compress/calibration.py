"""The calibration forward the one-shot degradations share (Wanda's and SparseGPT's input
statistics, the clipping search's layer inputs, block reconstruction's block inputs): hooks on
layers see every calibration batch once, padding tokens dropped."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a calibration forward early (what follows is not needed)."""


def run_calibration(model: nn.Module, calibration: Sequence[dict], batch_state: dict,
                    pre_hooks: Sequence[tuple[nn.Module, Callable]]) -> None:
    """Forward every calibration batch (``input_ids`` and optional ``attention_mask``) through
    ``model`` in eval mode without gradients, with the forward pre-hooks ``(module, hook)``
    registered for the walk only. ``batch_state`` is emptied before each batch, then holds
    ``"mask"``: the batch's non-padding tokens ``(B, T)`` (or None); hooks keep their per-batch
    state in it too. A hook may end a forward with :class:`StopForward`."""
    device = next(model.parameters()).device
    was_training = model.training
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                mask = batch.get("attention_mask")
                mask = None if mask is None else torch.as_tensor(mask, device=device)
                batch_state.clear()
                batch_state["mask"] = None if mask is None else mask.bool()
                try:
                    model(input_ids=torch.as_tensor(batch["input_ids"], device=device), attention_mask=mask)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def layer_tokens(x: torch.Tensor, batch_state: dict) -> torch.Tensor:
    """A layer's input ``(..., in)`` as ``(tokens, in)``, the batch's padding dropped."""
    x = x.detach()
    if batch_state.get("mask") is not None and x.shape[:-1] == batch_state["mask"].shape:
        x = x[batch_state["mask"]]
    return x.reshape(-1, x.shape[-1])
