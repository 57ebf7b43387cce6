"""benchmarks/gpu.py --smoke: every part of the GPU benchmark at toy sizes on CPU, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_every_part_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["smoke"] and set(results["parts"]) == {"loss", "steps", "capacity", "job-default", "job-int2"}
    for name, part in results["parts"].items():
        assert part["status"] == "ok", (name, part["status"])
    loss = results["parts"]["loss"]["rows"]
    assert all(row["ms"] > 0 for key, row in loss.items() if "Liger" not in key)
    assert loss["H 64 / V 1000 | Liger LigerFusedLinearJSD(jsd_beta=0)"]["error"] in ("needs CUDA", "liger-kernel not installed")
    steps = results["parts"]["steps"]["rows"]
    assert {"plain CE (Trainer)", "SDFT default", "SDFT int4 QAT", "SDFT int2 QAT", "bare forward-KL loop"} <= set(steps)
    assert all(row["s_per_step"] > 0 for row in steps.values())
    capacity = results["parts"]["capacity"]["rows"]  # toy shape, batches 1 and 2 (no memory limit on CPU)
    assert set(capacity) == {f"{s} | {n}" for s in ("LoRA r16 (all linear), base = teacher",
                                                    "int4 QAT, full fine-tuning (groups of 128)") for n in (32, 64)}
    assert all(row["batch"] == 2 and row["tokens_per_s"] > 0 for row in capacity.values()), capacity
    for job in ("job-default", "job-int2"):
        row = results["parts"][job]["rows"]["job"]
        assert row["ppl"]["degraded"] > row["ppl"]["teacher"] and row["R"] is not None
    report = (tmp_path / "gpu.md").read_text()
    assert "CPU (no CUDA device)" in report and "toy sizes" in report and "not measured" not in report.split("## The recovery job")[1]
