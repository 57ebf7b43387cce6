"""The GPU benchmark: one prepared script, about 11 minutes on one GPU, no network, each part in
its own time box (a subprocess stopped at its limit; what it finished is kept, the rest is
reported as not measured).

    python benchmarks/gpu.py            # on a CUDA machine; writes benchmarks/results/gpu.md + gpu.json
    python benchmarks/gpu.py --parts loss steps profile        # the same in two calls of at most
    python benchmarks/gpu.py --update --parts capacity job-default job-int2   # 10 minutes each
    python benchmarks/gpu.py --smoke    # every part at toy sizes on CPU in about a minute (a test runs it)

Parts:
- loss: the KD loss alone (forward KL, forward + backward, bf16 inputs, N = 16,384 positions) at
  H 1024 / V 151,936 and H 4096 / V 128,256: hf-sdft's fused loss with its default chunk kernel
  (Triton on CUDA) and with the PyTorch chunk, Liger's ``LigerFusedLinearJSD(jsd_beta=0)`` when
  liger-kernel is installed, and the unfused loss on full logits (first shape only). Median time
  of 5 calls after 2 warm-ups; peak memory above the inputs. Where the memory goes (first shape):
  the default call with its head gradient accumulated by row blocks, and with 128-row chunks; on
  CUDA, the blocks alive at the default call's peak by allocation site (the allocator's memory
  history).
- steps: seconds per optimizer step of a Qwen3-0.6B-shaped model (random weights, batch 8 × 1024
  tokens, ``bf16``, AdamW, median of 6 steps after 2) and peak memory: plain ``Trainer`` CE, SDFT
  default, SDFT with the PyTorch chunk, SDFT unfused, SDFT + CKA loss (all positions, and 2048 sampled), int4 and int2 QAT students
  (SDFT default), and the bare CE and forward-KL loops (AdamW, no Trainer, bf16 autocast).
- profile: one SDFT default step of the steps part's shape under ``torch.profiler``: the top
  operators by self time on the device, and the host syncs (CUDA synchronize calls, ``.item()``,
  ``nonzero``).
- capacity: what fits on this GPU for Qwen3-8B's shape (random weights, the bfloat16 teacher on the
  GPU): for a LoRA student (r 16 on every linear layer, the teacher its frozen base, adapters off)
  and an int4 QAT student (full fine-tuning, groups of 128), per sequence length (1024, 2048,
  4096) the largest batch (doubling from 1) that trains 3 SDFT steps without running out of
  memory, with its step time, tokens/s and peak memory. ``--smoke``: a toy shape on CPU, batches
  1 and 2 only (no memory limit there).
- jobs: ``hf-sdft recover`` with its defaults, and the quanto-int2 recipe with the embedded
  model's small-model settings: wall time and R.

Everything is built from configs or shipped with the project; run with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, bare_loss  # noqa: E402

BUDGET_S = {"loss": 90, "steps": 170, "profile": 60, "capacity": 240, "job-default": 75,
            "job-int2": 75}  # GPU time boxes: 710 s (two calls of the device tool: --parts loss steps profile, then the rest)
SMOKE_BUDGET_S = {"loss": 60, "steps": 90, "profile": 60, "capacity": 90, "job-default": 120, "job-int2": 120}
CAPACITY_SEQS, CAPACITY_MAX_BATCH = (1024, 2048, 4096), 64
SHAPES = [(1024, 151_936), (4096, 128_256)]  # (hidden, vocabulary): Qwen3-0.6B's head, Llama-3-8B's head
SMALL_MODEL = ["--block_size", "128", "--learning_rate", "1e-3", "--per_device_train_batch_size", "16",
               "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false"]
TARGETS = {  # row: (baseline row, target ratio), issue 27's
    "SDFT default": ("plain CE (Trainer)", 1.30),
    "SDFT + CKA loss (cka_weight 0.1)": ("SDFT default", 1.10),
    "SDFT + CKA loss on 2048 sampled positions": ("SDFT default", 1.10),
    "SDFT int4 QAT": ("SDFT default", 1.10),
    "SDFT int2 QAT": ("SDFT default", 1.10),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset() -> int:
    """Resets the peak-memory counter; returns the bytes allocated now (0 on CPU: not measured)."""
    if not torch.cuda.is_available():
        return 0
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(base: int) -> float | None:
    return (torch.cuda.max_memory_allocated() - base) / 2**30 if torch.cuda.is_available() else None


class Saver:
    """Results of one part, written to its JSON file after every row (a part stopped at its time
    box keeps what it finished)."""

    def __init__(self, path: Path):
        self.path, self.rows = path, {}

    def __setitem__(self, key, value):
        self.rows[key] = value
        self.path.write_text(json.dumps(self.rows, indent=1))
        print(key, value, flush=True)


# ---------------------------------------------------------------------------- loss alone


def time_calls(fn, warmup: int, reps: int) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` and its peak memory above what was allocated before (GiB)."""
    for _ in range(warmup):
        fn()
    sync()
    base = peak_reset()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak_gib(base)


def row_blocks(fn):
    """``fn()`` with the fused loss's head gradient accumulated by row blocks (its CPU way) instead
    of one float32-accumulating GEMM per chunk."""
    from hf_sdft.trainer import fused

    saved = dict(fused._FP32_ACCUMULATING_MM)
    fused._FP32_ACCUMULATING_MM[device()] = False
    try:
        fn()
    finally:
        fused._FP32_ACCUMULATING_MM.clear()
        fused._FP32_ACCUMULATING_MM.update(saved)


def live_at_peak(trace: list[dict], top: int = 12) -> dict:
    """From a CUDA allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``): the
    peak of bytes allocated during the trace and the blocks alive at it, summed per allocation
    site (the first hf_sdft frame, else the first frame outside torch), largest first."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        action, addr = event["action"], event["addr"]
        if action == "alloc":
            live[addr] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in ("free_requested", "free_completed") and addr in live:
            total -= live.pop(addr)["size"]
    sites: dict[str, list] = {}
    for event in at_peak.values():
        frames = event.get("frames") or []
        ours = [f for f in frames if "/hf_sdft/" in f["filename"]] or \
            [f for f in frames if "/torch/" not in f["filename"]] or frames
        where = f"{Path(ours[0]['filename']).name}:{ours[0]['line']} {ours[0]['name']}" if ours else "unknown"
        site = sites.setdefault(where, [0, 0])
        site[0] += event["size"]
        site[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_mib": peak / 2**20, "sites": [{"where": w, "mib": b / 2**20, "blocks": n} for w, (b, n) in ranked]}


def memory_at_peak(fn) -> dict:
    """One ``fn()`` under the CUDA allocator's memory history: :func:`live_at_peak` of its trace."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])


def part_loss(a, save: Saver) -> None:
    from hf_sdft.trainer.fused import fused_linear_kd_ce_loss
    from hf_sdft.trainer.losses import distillation_loss

    dev, dtype = device(), torch.bfloat16 if device().type == "cuda" else torch.float32
    n, shapes, reps = (16_384, SHAPES, 5) if not a.smoke else (256, [(64, 1000)], 2)
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        LigerFusedLinearJSD = None
    if dev.type == "cuda":  # is the float32-accumulating GEMM the fused loss prefers there available?
        acc, x = torch.zeros(64, 64, device=dev), torch.randn(64, 64, device=dev, dtype=dtype)
        try:
            torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
            save["_probe"] = {"addmm(out_dtype=float32)": "available"}
        except Exception as e:  # noqa: BLE001 - the reason is the finding
            save["_probe"] = {"addmm(out_dtype=float32)": f"unavailable: {e!r}"[:300]}
    for hidden, vocab in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        hs = (torch.randn(n, hidden, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
        ws = (torch.randn(vocab, hidden, device=dev, generator=g) / hidden**0.5).to(dtype).requires_grad_()
        ht = (torch.randn(n, hidden, device=dev, generator=g) * 0.5).to(dtype)
        wt = (torch.randn(vocab, hidden, device=dev, generator=g) / hidden**0.5).to(dtype)

        def backward(loss):
            loss.backward()
            hs.grad = ws.grad = None

        def default():
            backward(fused_linear_kd_ce_loss(hs, ws, ht, wt, kd_ratio=1.0)[0])

        methods = {
            "hf-sdft fused (default kernel)": default,
            "hf-sdft fused (PyTorch chunk)": lambda: backward(
                fused_linear_kd_ce_loss(hs, ws, ht, wt, kd_ratio=1.0, kernel="torch")[0]),
        }
        if hidden == shapes[0][0]:  # where the memory above Liger's goes: the head-gradient GEMM, the chunk?
            methods["hf-sdft fused (default kernel, head gradient by row blocks)"] = lambda: row_blocks(default)
            methods["hf-sdft fused (default kernel, 128-row chunks)"] = lambda: backward(
                fused_linear_kd_ce_loss(hs, ws, ht, wt, kd_ratio=1.0, chunk_size=128)[0])
        if LigerFusedLinearJSD is not None and dev.type == "cuda":
            liger = LigerFusedLinearJSD(jsd_beta=0.0)  # β = 0: forward KL
            methods["Liger LigerFusedLinearJSD(jsd_beta=0)"] = lambda: backward(liger(hs, ws, ht, wt, None))
        if hidden == shapes[0][0]:
            methods["unfused (full logits)"] = lambda: backward(distillation_loss(hs @ ws.T, ht @ wt.T))
        for name, fn in methods.items():
            key = f"H {hidden} / V {vocab} | {name}"
            try:
                seconds, gib = time_calls(fn, 2 if not a.smoke else 1, reps)
                save[key] = {"ms": seconds * 1e3, "peak_gib": gib}
            except torch.OutOfMemoryError as e:
                save[key] = {"error": f"out of memory: {str(e)[:120]}"}
                hs.grad = ws.grad = None
        if dev.type == "cuda":
            save[f"_memory at peak | H {hidden} / V {vocab}"] = memory_at_peak(default)
        if LigerFusedLinearJSD is None:
            save[f"H {hidden} / V {vocab} | Liger LigerFusedLinearJSD(jsd_beta=0)"] = {"error": "liger-kernel not installed"}
        elif dev.type != "cuda":
            save[f"H {hidden} / V {vocab} | Liger LigerFusedLinearJSD(jsd_beta=0)"] = {"error": "needs CUDA"}
        del hs, ws, ht, wt


# ---------------------------------------------------------------------------- training steps


def step_clock():
    """A ``TrainerCallback`` whose ``ends`` records when each optimizer step ends (device synced)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())

    return Clock()


def qwen3_shape(smoke: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    size = dict(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28) if not smoke \
        else dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return Qwen3ForCausalLM(Qwen3Config(**size, num_attention_heads=16, num_key_value_heads=8, head_dim=128 if not smoke
                                        else 8, max_position_embeddings=4096, tie_word_embeddings=True))


STEP_SHAPE = (8, 1024, 2, 6)  # batch, sequence, warm-up steps, timed steps


def step_inputs(smoke: bool, rows: int, seq: int):
    """The steps' model (Qwen3-0.6B's shape), its frozen copy as the teacher (bfloat16 on CUDA),
    ``rows`` random sequences of ``seq`` tokens and the dataset of them."""
    from datasets import Dataset

    base = qwen3_shape(smoke)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(base.config.vocab_size, (rows, seq), generator=g)
    dev = device()
    teacher = copy.deepcopy(base).to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return base, teacher.requires_grad_(False).eval(), ids, Dataset.from_dict({"input_ids": ids.tolist(),
                                                                               "labels": ids.tolist()})


def step_args(dev: torch.device, batch: int, steps: int) -> dict:
    """The training arguments every timed Trainer shares (bf16 on CUDA, nothing saved or logged)."""
    return dict(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                learning_rate=1e-5, save_strategy="no", report_to="none", disable_tqdm=True,
                logging_steps=10**6, use_cpu=dev.type == "cpu", bf16=dev.type == "cuda", dataloader_drop_last=True,
                seed=0)


def part_steps(a, save: Saver) -> None:
    from transformers import Trainer, TrainingArguments

    from hf_sdft import SDFTConfig, SDFTTrainer
    from hf_sdft.compress.quantize import quantize_student
    from hf_sdft.data import pad

    dev = device()
    batch, seq, warmup, timed = STEP_SHAPE if not a.smoke else (2, 64, 1, 2)
    base, teacher, ids, train = step_inputs(a.smoke, batch * (warmup + timed + 1), seq)
    half = dev.type == "cuda"

    def median_step(ends):
        return statistics.median(b - a_ for a_, b in zip(ends[warmup - 1:], ends[warmup:]))

    def trainer_row(extra: dict | None, quant: str | None = None):
        common = step_args(dev, batch, warmup + timed)
        student = copy.deepcopy(base)
        if quant:
            quantize_student(student, quant, group_size=32 if quant == "int2" else "auto")
        student = student.to(dev).requires_grad_(True)
        mem0, clock = peak_reset(), step_clock()
        if extra is None:
            trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=train, data_collator=pad,
                              callbacks=[clock])
        else:
            trainer = SDFTTrainer(model=student, args=SDFTConfig(**common, **extra), teacher_model=teacher,
                                  train_dataset=train, data_collator=pad, callbacks=[clock])
        trainer.train()
        return {"s_per_step": median_step(clock.ends), "peak_gib": peak_gib(mem0)}

    def bare_row(kd: bool):
        student = copy.deepcopy(base).to(dev).requires_grad_(True).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        mem0, ends = peak_reset(), []
        for i in range(warmup + timed):
            x = ids[i * batch:(i + 1) * batch].to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=half):
                loss = bare_loss(student, teacher, x, kd)
            loss.backward()
            opt.step(), opt.zero_grad()
            sync()
            ends.append(time.perf_counter())
        return {"s_per_step": median_step(ends), "peak_gib": peak_gib(mem0)}

    rows = {
        "plain CE (Trainer)": lambda: trainer_row(None),
        "SDFT default": lambda: trainer_row({}),
        "SDFT PyTorch chunk (kd_kernel torch)": lambda: trainer_row({"kd_kernel": "torch"}),
        "SDFT unfused (kd_fused false)": lambda: trainer_row({"kd_fused": False}),
        "SDFT + CKA loss (cka_weight 0.1)": lambda: trainer_row({"cka_weight": 0.1}),
        "SDFT + CKA loss on 2048 sampled positions": lambda: trainer_row({"cka_weight": 0.1, "cka_tokens": 2048}),
        "bare CE loop": lambda: bare_row(False),
        "bare forward-KL loop": lambda: bare_row(True),
        "SDFT int4 QAT": lambda: trainer_row({}, "int4"),  # last: a slow first QAT forward costs only these rows
        "SDFT int2 QAT": lambda: trainer_row({}, "int2"),
    }
    for name, row in rows.items():
        if a.rows and name not in a.rows:
            continue
        t0 = time.perf_counter()
        try:
            result = row()
        except torch.OutOfMemoryError as e:
            result = {"error": f"out of memory: {str(e)[:120]}"}
        save[name] = {**result, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- one step, profiled

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
               "aten::nonzero")  # the host waits for the device (the last two: where, in torch's ops)


def part_profile(a, save: Saver) -> None:
    """One SDFT default step (the steps part's shape, after its warm-up steps) under torch.profiler:
    the operators with the most self time on the device (CPU with ``--smoke``) and the host syncs."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    from hf_sdft import SDFTConfig, SDFTTrainer
    from hf_sdft.data import pad

    dev = device()
    batch, seq, warmup, _ = STEP_SHAPE if not a.smoke else (2, 64, 1, 2)
    base, teacher, _, train = step_inputs(a.smoke, batch * (warmup + 2), seq)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=1, repeat=1))

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            prof.step()

    trainer = SDFTTrainer(model=copy.deepcopy(base).to(dev), args=SDFTConfig(**step_args(dev, batch, warmup + 1)),
                          teacher_model=teacher, train_dataset=train, data_collator=pad, callbacks=[Step()])
    with prof:
        trainer.train()
    events = prof.key_averages()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1
    top = sorted((e for e in events if not e.key.startswith("ProfilerStep")), key=lambda e: -getattr(e, key))[:20]
    save["top operators"] = [{"name": e.key[:90], "calls": e.count, "self_ms": getattr(e, key) / 1e3,
                              "share": getattr(e, key) / total} for e in top]
    save["host syncs"] = {name: sum(e.count for e in events if e.key == name) for name in SYNC_EVENTS}
    save["clock"] = "device (CUDA kernels)" if dev.type == "cuda" else "CPU"


# ---------------------------------------------------------------------------- what fits on one GPU


def qwen3_8b_shape(smoke: bool, dev: torch.device):
    """Qwen3-8B's shape (36 layers, hidden 4096, GQA 32/8, head 128, V 151,936, untied head), random
    bfloat16 weights built on ``dev`` (float32 toy shape on CPU with ``smoke``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    size = dict(vocab_size=151_936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128) if not smoke else \
        dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=8)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return Qwen3ForCausalLM(Qwen3Config(**size, max_position_embeddings=8192, tie_word_embeddings=False))
    finally:
        torch.set_default_dtype(previous)


def part_capacity(a, save: Saver) -> None:
    import gc

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from hf_sdft import SDFTConfig, SDFTTrainer
    from hf_sdft.compress.quantize import quantize_student
    from hf_sdft.data import pad

    dev = device()
    teacher = qwen3_8b_shape(a.smoke, dev).requires_grad_(False).eval()
    vocab = teacher.config.vocab_size
    seqs, max_batch = ((32, 64), 2) if a.smoke else (CAPACITY_SEQS, CAPACITY_MAX_BATCH)

    def lora_student():
        return get_peft_model(teacher, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")), None

    def qat_student():
        group = 32 if a.smoke else 128  # the toy shape's layers are 64 wide
        return quantize_student(copy.deepcopy(teacher), "int4", group_size=group).requires_grad_(True), teacher

    def trial(make, batch: int, seq: int) -> dict:
        """3 SDFT steps at ``batch`` × ``seq``: median step time of the last two, peak memory."""
        student, teacher_model = make()
        ids = torch.randint(vocab, (batch * 3, seq), generator=torch.Generator().manual_seed(0))
        train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
        args = SDFTConfig(output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=batch,
                          learning_rate=1e-5, save_strategy="no", report_to="none", disable_tqdm=True,
                          logging_steps=10**6, use_cpu=dev.type == "cpu", bf16=dev.type == "cuda",
                          gradient_checkpointing=True, dataloader_drop_last=True, seed=0)
        clock, mem0 = step_clock(), peak_reset()
        try:
            trainer = SDFTTrainer(model=student, args=args, teacher_model=teacher_model, train_dataset=train,
                                  data_collator=pad, callbacks=[clock])
            trainer.train()
            step = statistics.median(b - a_ for a_, b in zip(clock.ends[:-1], clock.ends[1:]))
            return {"s_per_step": step, "tokens_per_s": batch * seq / step, "peak_gib": peak_gib(mem0)}
        finally:
            if hasattr(student, "unload"):
                student.unload()  # the teacher back as it was, for the next trial
            del student
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    for label, make in (("LoRA r16 (all linear), base = teacher", lora_student),
                        ("int4 QAT, full fine-tuning (groups of 128)", qat_student)):
        for seq in seqs:
            best, batch = None, 1
            while batch <= max_batch:
                try:
                    best = {"batch": batch, **trial(make, batch, seq)}
                except torch.OutOfMemoryError:
                    break
                batch *= 2
            save[f"{label} | {seq}"] = best or {"batch": 0, "error": "out of memory at batch 1"}
            if best is None:
                break  # a longer sequence cannot fit either


# ---------------------------------------------------------------------------- the recovery job


def part_job(a, save: Saver, recipe: str | None) -> None:
    out = Path(tempfile.mkdtemp()) / "job"
    argv = [sys.executable, "-m", "hf_sdft.cli", "recover", "--output_dir", str(out), "--disable_tqdm", "true"]
    if recipe:
        argv += ["--config", f"recipes/{recipe}.yaml", *SMALL_MODEL, "--max_steps", "300", "--logging_steps", "50",
                 "--save_steps", "1000", "--cka_every_n_steps", "100"]
    if not torch.cuda.is_available():
        argv += ["--use_cpu", "true", "--bf16", "false"]
    if a.smoke:
        argv += ["--max_steps", "2", "--max_eval_blocks", "8", "--probe_blocks", "4", "--cka_every_n_steps", "2"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stats_file = out / "sdft_stats.json"
    if not stats_file.exists():
        save["job"] = {"error": proc.stderr[-1500:], "wall_s": wall}
        return
    stats = json.loads(stats_file.read_text())
    save["job"] = {"wall_s": wall, "exit": proc.returncode, **({"error": proc.stderr[-1500:]} if proc.returncode else {}),
                   "R": stats["recovery_ratio"], "ppl": stats["perplexity"],
                   "degradation": stats["degradation"], "train_s": stats["recovery"]["train_seconds"],
                   "command": "hf-sdft recover " + " ".join(argv[5:])}


# ---------------------------------------------------------------------------- driver and report


def environment() -> dict:
    import importlib.metadata as md

    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "unset")}
    for pkg in ("torch", "transformers", "trl", "accelerate", "optimum-quanto", "liger-kernel", "triton", "kernels"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "not installed"
    return env


def run_part(part: str, a, work: Path) -> dict:
    """Runs ``part`` in a subprocess within its time box; returns what it saved (and why it stopped)."""
    limit = (SMOKE_BUDGET_S if a.smoke else BUDGET_S)[part]
    path = work / f"{part}.json"
    argv = [sys.executable, __file__, "--part", part, "--part_out", str(path), *(["--smoke"] if a.smoke else []),
            *(["--rows", *a.rows] if a.rows else [])]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, timeout=limit, capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {proc.stderr[-1200:]}"
    except subprocess.TimeoutExpired:
        status = f"stopped at its {limit} s time box"
    result = json.loads(path.read_text()) if path.exists() else {}
    print(f"[{part}] {status} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"status": status, "limit_s": limit, "wall_s": time.perf_counter() - t0, "rows": result}


def fmt(x, spec=".3f", unit=""):
    return "not measured" if x is None else f"{x:{spec}}{unit}"


def report(results: dict) -> str:
    env = results["environment"]
    lines = ["# GPU benchmark", "", f"Measured on **{env['device']}** with `python benchmarks/gpu.py`"
             + (" --smoke (toy sizes: these figures say nothing about a GPU)" if results["smoke"] else "")
             + f", {results['date']}. Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device")
             + ". Figures not in a table were not measured.", ""]
    parts = results["parts"]

    def status(part):
        p = parts.get(part)
        return "not run" if p is None else ("" if p["status"] == "ok" else f"**{p['status'].splitlines()[0][:300]}**")

    loss = parts.get("loss", {}).get("rows", {})
    lines += ["## The KD loss alone (forward KL, forward + backward, bf16, N = 16,384)", "", status("loss"), "",
              "| shape | method | ms | peak GiB above inputs | vs Liger: time / memory |", "|---|---|---:|---:|---:|"]
    for key, row in loss.items():
        if key.startswith("_"):
            continue
        shape, method = key.split(" | ")
        liger = loss.get(f"{shape} | Liger LigerFusedLinearJSD(jsd_beta=0)", {})
        vs = "" if "ms" not in liger or "ms" not in row or method.startswith("Liger") else \
            f"{row['ms'] / liger['ms']:.2f}× / " + (f"{row['peak_gib'] / liger['peak_gib']:.2f}×"
                                                     if row.get("peak_gib") and liger.get("peak_gib") else "–")
        if "error" in row:
            lines.append(f"| {shape} | {method} | {row['error'][:80]} | | |")
        else:
            lines.append(f"| {shape} | {method} | {row['ms']:.1f} | {fmt(row['peak_gib'], '.2f')} | {vs} |")
    for name, value in loss.get("_probe", {}).items():
        lines += ["", f"`{name}` on this device: {value}."]
    for key, row in loss.items():
        if key.startswith("_memory at peak"):
            lines += ["", f"Memory of one default fused call at its peak ({key.split(' | ')[1]}, "
                      f"{row['peak_mib']:.0f} MiB above the inputs, CUDA allocator history), by allocation site:", "",
                      "| site | MiB | blocks |", "|---|---:|---:|"]
            lines += [f"| `{site['where']}` | {site['mib']:.1f} | {site['blocks']} |" for site in row["sites"]]
    steps = parts.get("steps", {}).get("rows", {})
    lines += ["", "## Training steps (Qwen3-0.6B shape, random weights, batch 8 × 1024, bf16, AdamW)", "", status("steps"), "",
              "| row | s / step | × plain CE | peak GiB | target |", "|---|---:|---:|---:|---|"]
    ce = steps.get("plain CE (Trainer)", {}).get("s_per_step")
    bare_ce = steps.get("bare CE loop", {}).get("s_per_step")
    for name, row in steps.items():
        if "error" in row:
            lines.append(f"| {name} | {row['error'][:80]} | | | |")
            continue
        ref = bare_ce if name.startswith("bare") else ce
        ratio = f"{row['s_per_step'] / ref:.2f}" + (" (× bare CE)" if name.startswith("bare") else "") if ref else "–"
        target = ""
        if name in TARGETS:
            base_name, limit = TARGETS[name]
            base = steps.get(base_name, {}).get("s_per_step")
            if base:
                got = row["s_per_step"] / base
                target = f"≤ {limit}× {base_name}: {got:.2f}× — {'met' if got <= limit else 'missed'}"
        lines.append(f"| {name} | {row['s_per_step']:.3f} | {ratio} | {fmt(row['peak_gib'], '.1f')} | {target} |")
    for name in ("plain CE (Trainer)", "SDFT default", "SDFT int4 QAT", "SDFT int2 QAT"):
        if name not in steps:
            lines.append(f"| {name} | not measured | | | |")
    profiled = parts.get("profile", {}).get("rows", {})
    lines += ["", "## One SDFT default step, profiled (steps part's shape)", "", status("profile")]
    if profiled.get("top operators"):
        lines += ["", f"Self time on the {profiled['clock']} clock, top operators:", "",
                  "| operator | calls | self ms | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{r['name']}` | {r['calls']} | {r['self_ms']:.2f} | {r['share']:.1%} |"
                  for r in profiled["top operators"]]
        lines += ["", "Host syncs in the step: " + ", ".join(f"{k} {v}" for k, v in profiled["host syncs"].items()) + "."]
    else:
        lines += ["", "not measured"]
    capacity = parts.get("capacity", {}).get("rows", {})
    lines += ["", "## What fits: Qwen3-8B shape, bfloat16 teacher on the GPU, SDFT with gradient checkpointing", "",
              status("capacity"), "", "| student | sequence | largest batch | s / step | tokens / s | peak GiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, row in capacity.items():
        student, seq = key.split(" | ")
        if "error" in row:
            lines.append(f"| {student} | {seq} | 0 ({row['error']}) | | | |")
        else:
            lines.append(f"| {student} | {seq} | {row['batch']} | {row['s_per_step']:.3f} | {row['tokens_per_s']:.0f} | "
                         f"{fmt(row['peak_gib'], '.1f')} |")
    if not capacity:
        lines.append("| LoRA / int4 QAT | | not measured | | | |")
    lines += ["", "## The recovery job", "", "| job | wall s | R | perplexity teacher / degraded / recovered | status |",
              "|---|---:|---:|---|---|"]
    for part, label in (("job-default", "`hf-sdft recover` (defaults)"), ("job-int2", "quanto-int2 recipe, small-model flags")):
        row = parts.get(part, {}).get("rows", {}).get("job")
        error = (row or {}).get("error", "not run")[-200:].replace("\n", " ")
        if not row or "R" not in row:
            lines.append(f"| {label} | not measured | | | {status(part) or error} |")
            continue
        ppl = row["ppl"]
        lines.append(f"| {label} | {row['wall_s']:.0f} | {fmt(row['R'])} | {ppl.get('teacher', 0):.2f} / "
                     f"{ppl.get('degraded', 0):.2f} / {ppl.get('recovered', 0):.2f} | "
                     f"{status(part) or (('failed after training: ' + error) if 'error' in row else 'ok')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, about a minute")
    p.add_argument("--out", default=None, help="folder for gpu.md / gpu.json (default: benchmarks/results, "
                   "or outputs/gpu-smoke with --smoke)")
    p.add_argument("--parts", nargs="*", default=list(BUDGET_S))
    p.add_argument("--rows", nargs="*", default=[], help="only these rows of the steps part (default: all)")
    p.add_argument("--update", action="store_true", help="keep the other parts' results from the output folder's gpu.json")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--part_out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.part:  # inside a part's subprocess
        save = Saver(Path(a.part_out))
        if a.part == "loss":
            part_loss(a, save)
        elif a.part == "steps":
            part_steps(a, save)
        elif a.part == "capacity":
            part_capacity(a, save)
        elif a.part == "profile":
            part_profile(a, save)
        else:
            part_job(a, save, None if a.part == "job-default" else "quanto-int2")
        return
    if not torch.cuda.is_available() and not a.smoke:
        sys.exit("no CUDA device: run with --smoke for the CPU check (figures from a CPU are not GPU figures)")
    out = Path(a.out or (ROOT / "outputs" / "gpu-smoke" if a.smoke else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    results = {"smoke": a.smoke, "date": time.strftime("%Y-%m-%d"), "environment": environment(), "parts": {}}
    if a.update and (out / "gpu.json").exists():
        results["parts"] = json.loads((out / "gpu.json").read_text())["parts"]
    for part in a.parts:
        new = run_part(part, a, work)
        if a.rows and part == "steps":  # the other rows stay as they were measured
            new["rows"] = {**results["parts"].get(part, {}).get("rows", {}), **new["rows"]}
        results["parts"][part] = new
        (out / "gpu.json").write_text(json.dumps(results, indent=1))
        (out / "gpu.md").write_text(report(results))
    print(f"wrote {out / 'gpu.md'}")


if __name__ == "__main__":
    main()
