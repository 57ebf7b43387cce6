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
    assert results["smoke"] and set(results["parts"]) == {"loss", "steps", "profile", "capacity", "job-default",
                                                          "job-int2"}
    for name, part in results["parts"].items():
        assert part["status"] == "ok", (name, part["status"])
    loss = results["parts"]["loss"]["rows"]
    assert all(row["ms"] > 0 for key, row in loss.items() if "Liger" not in key)
    assert loss["H 64 / V 1000 | Liger LigerFusedLinearJSD(jsd_beta=0)"]["error"] in ("needs CUDA", "liger-kernel not installed")
    assert {"H 64 / V 1000 | hf-sdft fused (default kernel, head gradient by row blocks)",
            "H 64 / V 1000 | hf-sdft fused (default kernel, 128-row chunks)"} <= set(loss)
    profiled = results["parts"]["profile"]["rows"]  # one step: the fused loss's row index is its one nonzero
    assert profiled["clock"] == "CPU" and len(profiled["top operators"]) == 20
    assert sum(r["self_ms"] for r in profiled["top operators"]) > 0
    assert profiled["host syncs"]["aten::nonzero"] >= 1, profiled["host syncs"]
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


def test_live_at_peak_reads_an_allocator_trace():
    """The memory-history reader of benchmarks/gpu.py on a trace of the CUDA allocator's format:
    the peak is where the most bytes were live, and each block counts at its first hf_sdft frame."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)

    def frames(ours_line):
        return [{"filename": "/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
                {"filename": "/repo/hf_sdft/trainer/fused.py", "line": ours_line, "name": "_fused_chunks"}]

    mib = 2**20
    trace = [{"action": "alloc", "addr": 1, "size": 600 * mib, "frames": frames(10)},
             {"action": "alloc", "addr": 2, "size": 150 * mib, "frames": frames(20)},
             {"action": "alloc", "addr": 3, "size": 150 * mib, "frames": frames(20)},
             {"action": "free_requested", "addr": 2, "size": 150 * mib, "frames": []},
             {"action": "free_completed", "addr": 2, "size": 150 * mib, "frames": []},
             {"action": "alloc", "addr": 4, "size": 100 * mib, "frames": [frames(30)[0]]}]
    result = gpu.live_at_peak(trace)
    assert result["peak_mib"] == 900
    assert result["sites"] == [{"where": "fused.py:10 _fused_chunks", "mib": 600, "blocks": 1},
                               {"where": "fused.py:20 _fused_chunks", "mib": 300, "blocks": 2}]
