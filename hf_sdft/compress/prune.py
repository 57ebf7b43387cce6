"""Pruning as a degradation: unstructured or N:M sparsity by magnitude, Wanda or SparseGPT, kept
exact through recovery training (:class:`SparsityCallback`) and LoRA merges (:func:`merge_lora`).

Masks are ``{module name: BoolTensor}``, each shaped like the layer's weight ``(out, in)``;
``True`` = weight kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import partial

import torch
from torch import nn
from transformers import TrainerCallback

from hf_sdft.compress.base import Degradation
from hf_sdft.compress.calibration import StopForward, layer_tokens, run_calibration

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSEGPT_BLOCK = 128  # columns per lazy-update block
SPARSEGPT_DAMP = 0.01  # dampening λ, a fraction of mean(diag H)
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
    tokens: dict = {}

    def accumulate(name: str, module: nn.Module, args: tuple) -> None:
        sums[name] += layer_tokens(args[0], tokens).float().pow(2).sum(0).to(sums[name].device)

    run_calibration(model, calibration, tokens, [(m, partial(accumulate, name)) for name, m in layers.items()])
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


def sparsegpt_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    blocksize: int = SPARSEGPT_BLOCK,
    damp: float = SPARSEGPT_DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023) on one layer: prune ``weight`` ``(out, in)`` and update
    its kept weights to reconstruct the layer's outputs on the inputs whose Hessian is ``hessian``
    ``(in, in)`` (``2·XᵀX/tokens``; only its shape up to a factor matters).

    ``H + λ·mean(diag H)·I`` (λ = ``damp``; an input never active gets ``H_jj = 1``) gives the upper
    Cholesky factor ``U`` of its inverse, ``H⁻¹ = UᵀU`` (one Cholesky, one triangular solve); the
    columns are processed left to right in blocks of ``blocksize``. The saliency of weight ``w_ij`` is ``w_ij²/U_jj²``
    (``U_jj² = [H_F⁻¹]_jj``, ``F`` the columns not processed yet). Unstructured: at each block's start
    the lowest-saliency weights of the block (all rows together) are chosen, so that columns
    ``[0, i2)`` have lost exactly ``round(sparsity·out·i2)`` weights (the layer: ``round(sparsity·numel)``).
    N:M: at the first column of every group of M, the ``M − N`` lowest of each row's group.
    Column ``j`` then gets its pruned weights zeroed, ``err = (w_j − q_j)/U_jj`` and the block's later
    columns ``−= err·U_j,j+1:`` (the OBS update); the later blocks get the block's errors at
    once (``W[:, i2:] −= Err·U[i1:i2, i2:]``).

    Returns ``(weight, keep)``: the pruned and updated weight in float32 on ``weight``'s device
    (exact zeros where ``keep`` is False) and the keep-mask. Cost: a Cholesky factorization and a
    triangular solve, O(in³), plus O(out·in²) for the updates; memory: the ``(in, in)`` Hessian and ``U`` in float32.
    """
    wt = weight.detach().float().T.contiguous()  # (in, out): the columns of W are contiguous rows here
    h = hessian.detach().to(wt.device, torch.float32, copy=True)
    cols, rows = wt.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1  # inputs never active; their weights are kept, not zeroed: the sparsity stays exact
    h.diagonal().add_(damp * h.diagonal().mean())
    # H = V·Vᵀ, V upper (the lower Cholesky factor of H with rows and columns reversed), so
    # H⁻¹ = UᵀU with U = V⁻¹: the upper Cholesky factor of H⁻¹ without forming H⁻¹.
    v = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    del h
    u = torch.linalg.solve_triangular(v, torch.eye(cols, device=v.device), upper=True)
    del v
    keep = torch.ones_like(wt, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        blocksize = max(m, blocksize // m * m)  # an N:M group never straddles two blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1, keep1 = wt[i1:i2], u[i1:i2, i1:i2], keep[i1:i2]  # views: updated in place
        d = u1.diagonal().unsqueeze(1)
        if nm is None:
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            if k:
                low = (w1 / d).square().flatten().topk(k, largest=False).indices
                keep1.view(-1)[low] = False
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                low = (w1[i : i + m] / d[i : i + m]).square().topk(m - n, dim=0, largest=False).indices
                keep1[i : i + m].scatter_(0, low, False)
            q = w1[i] * keep1[i]
            err1[i] = (w1[i] - q) / d[i]
            w1[i + 1 :].addr_(u1[i, i + 1 :], err1[i], alpha=-1)
            w1[i] = q
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1)
    return wt.T.contiguous(), keep.T.contiguous()


def _block_of(name: str) -> str:
    """The decoder block a layer belongs to: its name up to the first numeric part
    (``model.layers.3.mlp.up_proj`` → ``model.layers.3``); its own name if none."""
    parts = name.split(".")
    digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return name if digit is None else ".".join(parts[: digit + 1])


def _sparsegpt_model(
    model: nn.Module, layers: dict[str, nn.Module], calibration: Sequence[dict], sparsity: float,
    nm: tuple[int, int] | None,
) -> dict[str, torch.Tensor]:
    """SparseGPT over ``layers``, sequentially block by block as in the paper: the layers of a decoder
    block (:func:`_block_of`) get their Hessians from one calibration pass through the model whose
    earlier blocks are already pruned, the pass stopping at the next block's first layer."""
    tokens: dict = {}  # per batch: the padding mask and the layers already seen
    order: dict[str, int] = {}

    def first_call(name: str, module: nn.Module, args: tuple) -> None:
        order.setdefault(name, len(order))

    run_calibration(model, calibration[:1], tokens, [(m, partial(first_call, name)) for name, m in layers.items()])
    missing = [name for name in layers if name not in order]
    if missing:
        raise ValueError(f"sparsegpt: {missing} not called by the model's forward on the calibration batches")
    blocks: dict[str, list[str]] = {}
    for name in sorted(layers, key=order.__getitem__):
        blocks.setdefault(_block_of(name), []).append(name)
    groups = list(blocks.values())
    masks = {}
    for g, group in enumerate(groups):
        hessians = {n: torch.zeros(layers[n].in_features, layers[n].in_features, device=layers[n].weight.device)
                    for n in group}
        counts = dict.fromkeys(group, 0)

        def accumulate(name: str, module: nn.Module, args: tuple) -> None:
            x = layer_tokens(args[0], tokens).to(hessians[name].device, torch.float32)
            hessians[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
            tokens.setdefault("seen", set()).add(name)

        def stop(module: nn.Module, args: tuple) -> None:
            if tokens.get("seen", set()).issuperset(group):
                raise StopForward

        later = [n for rest in groups[g + 1 :] for n in rest]
        run_calibration(model, calibration, tokens,
                        [(layers[n], partial(accumulate, n)) for n in group] + [(layers[n], stop) for n in later])
        with torch.no_grad():
            for name in group:
                weight = layers[name].weight
                hessian = hessians.pop(name).mul_(2 / max(counts[name], 1))
                pruned, masks[name] = sparsegpt_layer(weight, hessian, sparsity, nm)
                del hessian
                weight.copy_(pruned.to(weight.dtype))
                weight.masked_fill_(~masks[name], 0)  # exact zeros in any dtype
    return masks


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
            unstructured, each output row loses ``round(sparsity·in)`` weights. ``"sparsegpt"``
            (Frantar & Alistarh 2023, :func:`sparsegpt_layer`) chooses the weights by their OBS
            saliency and updates the kept ones to reconstruct each layer's outputs on ``calibration``,
            block after block (each block's inputs come from the already pruned earlier blocks);
            unstructured, each layer loses exactly ``round(sparsity·numel)`` weights. Its cost:
            accumulating ``XᵀX`` (tokens·in² multiply-adds), the per-layer solve, and per decoder
            block the forward pass of ``calibration`` up to that block (about L/2 full passes for L
            blocks); measured in ``benchmarks/costs.md``.
        calibration: tokenized batches for Wanda and SparseGPT: dicts of ``input_ids`` ``(B, T)`` and optional
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
    if method in ("wanda", "sparsegpt"):
        if not calibration:
            raise ValueError(
                f"method={method!r} needs calibration=: a list of tokenized batches "
                "(dicts with input_ids and optional attention_mask)"
            )
        embeddings = [name for name, m in layers.items() if isinstance(m, nn.Embedding)]
        if embeddings:
            raise ValueError(
                f"{method} scores linear-layer inputs; prune the embeddings {embeddings} with method='magnitude'"
            )
    if method == "sparsegpt":
        return _sparsegpt_model(model, layers, calibration, sparsity, nm)
    if method == "wanda":
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


def pruned_weights(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(weight, pruned positions)]`` of every layer of ``model`` (plain or wrapped, see
    :func:`resolve_masks`) that ``masks`` covers: what :func:`zero_pruned` keeps at zero."""
    modules = dict(model.named_modules())
    return [(modules[name].weight, ~mask) for name, mask in resolve_masks(model, masks).items()]


@torch.no_grad()
def zero_pruned(pruned: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Zero the pruned positions of each weight in place (:func:`pruned_weights`): the one place
    masks are re-applied, by :class:`SparsityCallback`, :func:`apply_masks` and block reconstruction."""
    for weight, positions in pruned:
        weight.masked_fill_(positions, 0)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights of ``model`` (plain or wrapped, see :func:`resolve_masks`) in place."""
    zero_pruned(pruned_weights(model, masks))
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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._pruned = pruned_weights(model, self.masks)
        zero_pruned(self._pruned)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._pruned:
            self._pruned = pruned_weights(model, self.masks)
        zero_pruned(self._pruned)


@dataclass
class PruneOptions:
    """The options of :class:`PruneDegradation` (see :func:`prune`)."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    method: str = "magnitude"

    def __post_init__(self):
        _parse(self.sparsity, self.pattern, self.method)


class PruneDegradation(Degradation):
    """Pruning (see :func:`prune`); the masks are kept through recovery by :class:`SparsityCallback`."""

    kind = "prune"
    Options = PruneOptions

    def __init__(self, options: PruneOptions | None = None, **fields):
        super().__init__(options, **fields)
        o = self.options
        nm = _parse(o.sparsity, o.pattern, o.method)
        self.sparsity = o.sparsity if nm is None else 1 - nm[0] / nm[1]
        self.pattern, self.method = o.pattern, o.method
        self.measured: float | None = None

    @classmethod
    def keeping(cls, masks: dict[str, torch.Tensor]) -> PruneDegradation:
        """The degradation of a model pruned elsewhere, whose ``masks`` are to be kept."""
        kept = cls()
        kept.masks = masks
        return kept

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

    def callbacks(self, model: nn.Module | None = None) -> list[TrainerCallback]:
        if self.masks is None:
            raise ValueError("no masks yet: call apply(model) before callbacks()")
        return [SparsityCallback(self.masks)]
