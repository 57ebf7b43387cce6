"""Loading back every student format hf-sdft saves or recovers — transformers, quanto, a PEFT
adapter folder (on its saved quantized base or on the base it names) — with :func:`load_model`, and
what a dense checkpoint's zeros say about how it was pruned (:func:`detect_sparsity`)."""

from __future__ import annotations

import json

import torch
from torch import nn

from hf_sdft.compress.prune import prunable_layers, sparsity_report
from hf_sdft.compress.quantize import QMAP_FILE, load_quantized
from hf_sdft.modeling import check_safetensors, from_pretrained, model_folder

QUANTIZED_BASE = "quantized_base"
ADAPTER_CONFIG = "adapter_config.json"
MIN_LAYER_SPARSITY = 0.01  # a layer with at least this fraction of exact zeros counts as pruned
NM_PATTERNS = ((2, 4), (4, 8), (1, 4))


def load_model(name_or_path: str, use_kernels: bool = False) -> nn.Module:
    """A causal LM saved by hf-sdft, transformers or quanto, or a PEFT adapter folder on its
    base, as saved (quantized layers frozen to integer weights, adapters trainable). Hub kernels
    stay off unless ``use_kernels`` (see :func:`~hf_sdft.modeling.from_pretrained`)."""
    folder = model_folder(name_or_path)
    if (folder / ADAPTER_CONFIG).exists():
        from peft import PeftModel  # lazy: peft only for an adapter folder

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
