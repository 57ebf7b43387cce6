"""FSDP2 on two gloo CPU ranks through `accelerate launch --use_fsdp --fsdp_version 2`.

accelerate 1.16 turns FSDP on only for GPU-type devices: on CPU it keeps MULTI_CPU (DDP) and
drops the plugin, which the trainer refuses (first test; it fails the day accelerate runs FSDP
on CPU). torch 2.13's ``fully_shard`` itself runs on a CPU mesh over gloo, so the second test
lets the worker keep the plugin (tests/fsdp_worker.py ``allow_fsdp_on_cpu``) and checks the
sharded teacher and the loss against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks: on GPUs accelerate runs FSDP itself")]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
FSDP2 = ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
         "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_reshard_after_forward", "true"]
STEPS = 4


def run(cmd, ok=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def launch_fsdp2(out, per_device_batch, *extra, ok=True):
    return run([sys.executable, "-m", "accelerate.commands.launch", *FSDP2, "tests/fsdp_worker.py", str(out),
                str(per_device_batch), str(STEPS), *extra], ok=ok)


def test_fsdp_launch_on_cpu_is_refused_not_silently_ddp(tmp_path):
    proc = launch_fsdp2(tmp_path / "r.json", 4, ok=False)
    assert proc.returncode != 0
    assert ("the launch asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate 1.16.0 runs MULTI_CPU: it turns "
            "FSDP on only for GPU-type devices") in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_sharded_teacher_two_ranks_match_one_process(tmp_path):
    launch_fsdp2(tmp_path / "two.json", 4, "allow_fsdp_on_cpu")
    run([sys.executable, "tests/fsdp_worker.py", str(tmp_path / "one.json"), "8", str(STEPS)])
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert (two["world_size"], two["distributed_type"], one["world_size"]) == (2, "DistributedType.FSDP", 1)
    for teacher in (two["teacher"], two["teacher_after_training"]):  # resharded after its no-grad forwards too
        assert teacher["root_is_fsdp"] and teacher["all_dtensor"] and teacher["layer_units"] == 2
        assert teacher["local_numel"] == teacher["full_numel"] // 2  # rank 0's shard: half of every dim-0 split
        assert not teacher["requires_grad"] and not teacher["training"] and teacher["dtypes"] == ["torch.float32"]
    assert two["student"]["root_is_fsdp"] and two["student"]["local_numel"] == two["teacher"]["local_numel"]
    assert not one["teacher"]["root_is_fsdp"] and one["teacher"]["local_numel"] == one["teacher"]["full_numel"]
    keys = ("loss", "kd_loss", "ce_loss", "grad_norm")
    two_logs, one_logs = ([e[k] for e in r["log_history"] if "loss" in e for k in keys] for r in (two, one))
    assert len(two_logs) == len(one_logs) == STEPS * len(keys)
    # float32 sums in another order (all-gathers, gradient reduce-scatter): measured < 1e-6 relative
    assert two_logs == pytest.approx(one_logs, rel=1e-5)
    assert two_logs[0] > two_logs[-len(keys)] * 1.1  # the loss went down: it trained
