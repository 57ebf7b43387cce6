"""The frozen teacher: loading, validation against the student, forward passes, and
capturing the hidden states of chosen decoder layers with forward hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / torch.compile wrappers (not PEFT)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``config.num_hidden_layers`` long)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    expected = getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if expected is not None:
        candidates = [m for m in candidates if len(m) == expected]
    if not candidates:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: expected an nn.ModuleList of "
            f"{expected if expected is not None else 'decoder'} blocks"
        )
    return max(candidates, key=len)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layers(layers, model: nn.Module, other: nn.Module | None = None, what: str = "cka_layers") -> list[int]:
    """Turn ``"all"`` or indices into a checked list of decoder-layer indices."""
    n = num_layers(model)
    m = num_layers(other) if other is not None else n
    if layers == "all":
        if n != m:
            raise ValueError(
                f"{what}='all' but the student has {n} decoder layers and the teacher {m}: list the layers to compare"
            )
        return list(range(n))
    bad = [i for i in layers if not (0 <= i < min(n, m))]
    if bad:
        raise ValueError(
            f"{what}={list(layers)} names layers {bad} that the models do not have "
            f"(student has {n} decoder layers, teacher {m}; valid indices 0..{min(n, m) - 1})"
        )
    return list(layers)


class LayersCaptured(Exception):
    """Raised by :func:`capture_layers` (``stop=True``) once the last listed layer has run."""


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: Sequence[int], *, stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes of ``model`` record ``{layer: hidden (B, T, D)}``.

    Hooks exist only while the block runs and only on the listed layers. ``stop=True`` ends each
    forward with :class:`LayersCaptured` right after the last listed layer (no later layer, final
    norm or output head runs): run it through :func:`forward_until_captured`.
    """
    captured: dict[int, torch.Tensor] = {}
    if not layers:
        yield captured
        return
    blocks = decoder_layers(model)
    last = max(layers)

    def hook_for(i: int):
        def hook(_module, _args, output):
            captured[i] = output[0] if isinstance(output, (tuple, list)) else output
            if stop and i == last:
                raise LayersCaptured

        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def forward_until_captured(model: nn.Module, **inputs) -> None:
    """``model(**inputs)`` inside ``capture_layers(model, layers, stop=True)``."""
    try:
        model(**inputs)
    except LayersCaptured:
        pass


def output_vocab_size(model: nn.Module) -> int:
    emb = unwrap(model).get_output_embeddings()
    if emb is None:
        return unwrap(model).config.vocab_size
    weight = emb.weight
    return int(weight.shape[0])


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Raise if the teacher is the student, shares its weights, or has another vocabulary."""
    if teacher is student or unwrap(teacher) is unwrap(student):
        raise ValueError(
            "teacher_model is the student object itself: pass a separate copy of the original model "
            "(e.g. copy.deepcopy(model) before degrading it, or load it again with from_pretrained)"
        )
    def storages(model):  # frozen quanto weights and ZeRO-3 placeholders report data_ptr() 0
        return {("ptr", p.data_ptr()) if p.numel() and p.data_ptr() else ("id", id(p)) for p in model.parameters()}

    if storages(student) & storages(teacher):
        raise ValueError(
            "teacher_model shares weight tensors with the student, so training the student would change the teacher: "
            "load or deepcopy the teacher separately"
        )
    vs, vt = output_vocab_size(student), output_vocab_size(teacher)
    if vs != vt:
        raise ValueError(
            f"student and teacher vocabularies differ: student has {vs} output logits, teacher {vt}. "
            "SDFT needs the same tokenizer on both sides; resize_token_embeddings() one of them or pick a matching teacher"
        )


def is_peft(model: nn.Module) -> bool:
    """A PEFT model whose adapters can be disabled (its base is then the teacher)."""
    inner = unwrap(model)
    return hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config")


def from_pretrained(name_or_path, *, use_kernels: bool = False, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with transformers' Hub kernels off unless
    ``use_kernels``. transformers (with the ``kernels`` package) otherwise kernelizes every model
    it loads, fetching ``kernels-community/*`` layers from the Hub on load and on ``model.train()``,
    which fails offline (HF_HUB_OFFLINE=1) when they are not cached. Every model hf-sdft loads
    by name goes through here."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, use_kernels=use_kernels, **kwargs)


def load_teacher(name_or_path: str, dtype: str | torch.dtype = "auto", use_kernels: bool = False) -> nn.Module:
    return from_pretrained(name_or_path, dtype=dtype, use_kernels=use_kernels)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def shard_teacher_fsdp2(teacher: nn.Module, accelerator) -> nn.Module:
    """Shard the frozen ``teacher`` with FSDP2 like accelerate shards the student: one unit per
    decoder layer (the plugin's ``transformer_cls_names_to_wrap``, else the teacher's
    ``_no_split_modules``) plus the root, on the accelerator's mesh with the plugin's offload policy.
    Every unit reshards after forward (the teacher has no backward that would reuse the gathered
    weights), and its parameters stay in their own dtype (``teacher_dtype``): no FSDP
    mixed-precision policy (the trainer autocasts its forward like the student's)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(teacher, FSDPModule):
        return teacher
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {"reshard_after_forward": True, "offload_policy": plugin.cpu_offload}
    if mesh is not None:
        kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    names = {*(plugin.transformer_cls_names_to_wrap or []), *(getattr(teacher, "_no_split_modules", None) or [])}
    layers = [m for m in teacher.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"FSDP2 teacher: none of the layer classes {sorted(names)} is in {type(teacher).__name__}: "
                         "set fsdp_transformer_layer_cls_to_wrap to the teacher's decoder layer class")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher


@contextlib.contextmanager
def teacher_context(student: nn.Module, teacher: nn.Module | None) -> Iterator[nn.Module]:
    """Yield the module that computes the teacher's outputs, under ``torch.no_grad()``.

    ``teacher=None`` means "the PEFT student's base model with its adapters disabled".
    """
    with torch.no_grad():
        if teacher is not None:
            yield teacher
            return
        peft_model = unwrap(student)
        if not is_peft(peft_model):
            raise ValueError("teacher_model=None needs a PEFT student (its base model is the teacher)")
        was_training = peft_model.training
        peft_model.eval()  # no dropout in the teacher's targets
        try:
            with peft_model.disable_adapter():
                yield peft_model
        finally:
            peft_model.train(was_training)


# config fields of models whose logits are not the plain head output (soft-capping, scaling)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_head(model: nn.Module) -> tuple[nn.Linear | None, str]:
    """The output head of ``model`` when its logits are exactly ``head(hidden)`` (a plain
    ``nn.Linear``, no logit soft-capping or scaling), else ``(None, why)``."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        return None, f"{type(inner).__name__} exposes no output embeddings"
    if type(head) is not nn.Linear:
        return None, f"its output head is a {type(head).__name__} (adapted or quantized), not a plain nn.Linear"
    config = getattr(inner, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    for name in LOGIT_TRANSFORMS:
        value = getattr(text, name, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            return None, f"it transforms its logits ({name}={value}), which the fused loss does not apply"
    return head, ""


@contextlib.contextmanager
def head_input(head: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, a forward pass through ``head`` records its input as ``["hidden"]``
    ``(B, T, H)`` and hands the head an empty slice instead, so no logits are computed."""
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(_module, args):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()
