"""Model introspection used on teachers and students alike: unwrapping wrappers, finding the
decoder layers and the output head, loading with the project's defaults, and capturing the hidden
states of chosen layers with forward hooks that exist only inside a ``with``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn


def parse_layers(value) -> str | list[int]:
    """``"all"``, a list of ints, or a comma-separated string ``"0,2,3"`` → ``"all"`` or ``list[int]``."""
    if value is None or value == "all":
        return "all"
    if isinstance(value, str):
        try:
            value = [int(v) for v in comma_list(value)]
        except ValueError:
            raise ValueError(f"layers must be 'all' or decoder-layer indices like '0,2,3', got {value!r}") from None
    layers = [int(v) for v in value]
    if not layers:
        raise ValueError("layers is empty: give 'all' or at least one decoder-layer index")
    return layers


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


def is_peft(model: nn.Module) -> bool:
    """A PEFT model whose adapters can be disabled (its base is then the teacher)."""
    inner = unwrap(model)
    return hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config")


def check_safetensors(folder) -> None:
    """Raise an ``OSError`` naming the file when a ``*.safetensors`` file of a local model folder is
    truncated or corrupt (safetensors' own error names no file). Reads only each file's header."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as err:
            raise OSError(f"{file.resolve()} is truncated or corrupt ({err}): re-save the model there, or "
                          "re-download it (delete the file first)") from None


def from_pretrained(name_or_path, *, use_kernels: bool = False, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with transformers' Hub kernels off unless
    ``use_kernels``. transformers (with the ``kernels`` package) otherwise kernelizes every model
    it loads, fetching ``kernels-community/*`` layers from the Hub on load and on ``model.train()``,
    which fails offline (HF_HUB_OFFLINE=1) when they are not cached. Every model hf-sdft loads
    by name goes through here; a local folder's weights are checked first (:func:`check_safetensors`)."""
    from transformers import AutoModelForCausalLM

    if Path(name_or_path).is_dir():
        check_safetensors(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name_or_path, use_kernels=use_kernels, **kwargs)


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


def check_vocabularies(student: int, teacher: int, what: str = "output logits", teacher_name: str = "teacher") -> None:
    """Raise when the student's and the teacher's vocabularies differ: distillation compares their
    distributions token by token (the one vocabulary check, wherever the two meet)."""
    if student != teacher:
        raise ValueError(
            f"student and {teacher_name} vocabularies differ: student has {student} {what}, {teacher_name} {teacher}. "
            f"Distillation needs the same tokenizer on both sides: resize_token_embeddings() one of them or pick a "
            f"matching {teacher_name}"
        )


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode (no dropout) inside the ``with``; each back in its own mode after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def comma_list(value) -> list[str]:
    """``"a, b,c"`` (or a list) → ``["a", "b", "c"]``: the comma-separated values of a config field."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


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
        with evaluating(peft_model), peft_model.disable_adapter():  # no dropout in the teacher's targets
            yield peft_model


def model_folder(name_or_path: str, what: str = "model", revision: str | None = None) -> Path:
    """A local folder for ``name_or_path``: itself, or the Hub snapshot of that repo id at
    ``revision`` (a branch, tag or commit; None: main). A revision other than main is refused for a
    local folder, which has none."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision not in (None, "main"):
            raise ValueError(f"model_revision={revision!r} names a Hub revision but {what} {name_or_path} is a local "
                             "folder: drop --model_revision, or give the Hub id")
        return path
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or path.exists()
    if looks_local:
        raise FileNotFoundError(f"{what} {name_or_path}: no such folder. Give an existing model folder or a Hub id")
    from huggingface_hub import snapshot_download  # lazy: the Hub client only for a repo id

    try:
        return Path(snapshot_download(name_or_path, revision=revision))
    except Exception as err:  # offline, unknown repo, gated...
        raise OSError(
            f"{what} {name_or_path!r} is not a local folder and could not be fetched from the Hub ({err}). "
            "Check the path, or the repo id and your network / HF_HUB_OFFLINE setting"
        ) from None
