"""Run by tests/trainer/test_fsdp.py: a few SDFTTrainer steps on the tiny model, under
`accelerate launch --use_fsdp --fsdp_version 2` (two gloo CPU ranks) or in one plain process;
rank 0 writes the logged losses and how the teacher was prepared."""

import copy
import json
import sys

from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from hf_sdft import SDFTConfig, SDFTTrainer
from hf_sdft.data import pack_blocks
from tests.helpers import cpu_args, make_model, make_texts, make_tokenizer, perturb


def local_numel(model) -> int:
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def teacher_layout(teacher) -> dict:
    """How the teacher's parameters are held on this rank: FSDP2 units, DTensors, local sizes."""
    params = list(teacher.parameters())
    return {
        "root_is_fsdp": isinstance(teacher, FSDPModule),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in teacher.modules()),
        "layer_units": sum(isinstance(m, FSDPModule) for m in teacher.model.layers),
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "local_numel": local_numel(teacher),
        "full_numel": sum(p.numel() for p in params),
        "requires_grad": any(p.requires_grad for p in params),
        "training": teacher.training,
        "dtypes": sorted({str(p.dtype) for p in params}),
    }


def allow_fsdp_on_cpu() -> None:
    """accelerate 1.16 turns FSDP on only for GPU-type devices: on CPU ranks `AcceleratorState`
    silently keeps MULTI_CPU (DDP) and drops the FSDP plugin. Keep the plugin and set FSDP; the
    rest (plugin from the launch flags, fully_shard on the gloo ranks, the Trainer) is unchanged."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states copy it

    AcceleratorState.__init__ = patched


def main(out_file: str, per_device_batch: str, max_steps: str, mode: str = "") -> None:
    if mode == "allow_fsdp_on_cpu":
        allow_fsdp_on_cpu()
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    tokenizer = make_tokenizer()
    blocks = pack_blocks(tokenizer, make_texts(400, seed=1), 32, 64)
    args = SDFTConfig(output_dir=str(out_file) + ".run", **cpu_args(
        per_device_train_batch_size=int(per_device_batch), max_steps=int(max_steps), learning_rate=1e-2,
        kd_ratio=0.5))
    trainer = SDFTTrainer(model=student, args=args, teacher_model=teacher, train_dataset=blocks,
                          processing_class=tokenizer)
    layout = teacher_layout(trainer.teacher_model)
    trainer.train()
    student = trainer.model_wrapped
    state = trainer.accelerator.state
    if state.is_main_process:
        result = {"world_size": state.num_processes, "distributed_type": str(state.distributed_type),
                  "teacher": layout, "teacher_after_training": teacher_layout(trainer.teacher_model),
                  "student": {"root_is_fsdp": isinstance(student, FSDPModule), "local_numel": local_numel(student)},
                  "log_history": trainer.state.log_history}
        with open(out_file, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
