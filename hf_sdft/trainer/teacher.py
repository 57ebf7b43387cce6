"""The frozen teacher: loading, validation against the student, placement (sharded under FSDP2)
(the context its forward passes run in, shared with CKA, is
:func:`hf_sdft.modeling.teacher_context`)."""

from __future__ import annotations

from torch import nn

from hf_sdft.modeling import check_vocabularies, output_vocab_size, unwrap


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


def freeze_teacher(model: nn.Module) -> nn.Module:
    """The teacher in eval mode with no parameter requiring a gradient (it is never trained)."""
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
