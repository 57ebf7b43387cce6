"""The frozen teacher: loading, validation against the student, placement (sharded under FSDP2)
and the context its forward passes run in (model introspection shared with students:
:mod:`hf_sdft.modeling`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hf_sdft.modeling import check_vocabularies, evaluating, from_pretrained, is_peft, output_vocab_size, unwrap


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
    check_vocabularies(output_vocab_size(student), output_vocab_size(teacher))


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
        with evaluating(peft_model), peft_model.disable_adapter():  # no dropout in the teacher's targets
            yield peft_model


