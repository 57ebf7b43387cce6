"""torch.distributed helpers for the measurements and the job (no-ops in one process)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def progress_disabled() -> bool | None:
    """tqdm's ``disable``: off on non-main processes, automatic (TTY only) on the main one."""
    return True if rank_and_world()[0] != 0 else None


def shard(items: Sequence[T]) -> list[tuple[T, bool]]:
    """This process's share of ``items``: every world-size-th one, padded with ``(items[0], False)``
    so that every process runs as many forwards (sharded models need all processes in each).
    Results of padding entries (flag False) must be discarded."""
    rank, world = rank_and_world()
    mine = [(items[i], True) for i in range(rank, len(items), world)]
    return mine + [(items[0], False)] * (-(-len(items) // world) - len(mine))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over processes in place (through CUDA under NCCL) and return it."""
    if rank_and_world()[1] == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = tensor.to(device)
    dist.all_reduce(buf)
    tensor.copy_(buf.cpu())
    return tensor


def check_fsdp_launch(accelerator) -> None:
    """Fail when the launch asked for FSDP (``ACCELERATE_USE_FSDP``) but the accelerator did not
    turn it on: accelerate then trains with DDP, each rank holding whole models."""
    import accelerate

    state = accelerator.state
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and getattr(state, "fsdp_plugin", None) is None:
        raise RuntimeError(
            f"the launch asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate {accelerate.__version__} runs "
            f"{state.distributed_type.value}: it turns FSDP on only for GPU-type devices, so every rank would hold "
            "the whole student and teacher. On CPU drop --use_fsdp (--multi_gpu with use_cpu true: DDP over "
            "gloo); to shard, run on GPUs"
        )


def wait_for_everyone() -> None:
    """A barrier under torch.distributed; nothing otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
