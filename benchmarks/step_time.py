"""Step-time cost of distillation, measured side by side in one run on the embedded default model.

    python benchmarks/step_time.py [--steps 40] [--repeats 3]

Rows: plain CE fine-tuning (transformers Trainer), SDFT with KD, SDFT with KD + CKA loss on
all layers, SDFT with chunked KD. Each configuration runs ``--repeats`` times, interleaved, and
the median seconds per optimizer step is reported as a ratio to plain CE. Writes
``benchmarks/results/step_time.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_sdft import SDFTConfig, SDFTTrainer
from hf_sdft.data import default_data_file, default_model_path, load_texts, pack_blocks

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {
    "plain CE (Trainer)": None,
    "SDFT, KD": {},
    "SDFT, KD + CKA (all layers)": {"cka_weight": 0.1},
    "SDFT, KD chunked (256 positions)": {"kd_chunk_size": 256},
}


def seconds_per_step(name: str, extra: dict | None, teacher, tokenizer, train, steps: int) -> float:
    common = dict(output_dir="/tmp/hf-sdft-step-time", max_steps=steps, per_device_train_batch_size=16,
                  learning_rate=1e-3, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10**6,
                  use_cpu=not torch.cuda.is_available())
    student = copy.deepcopy(teacher).requires_grad_(True)
    if extra is None:
        trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=train, processing_class=tokenizer)
    else:
        trainer = SDFTTrainer(model=student, args=SDFTConfig(**common, **extra), teacher_model=copy.deepcopy(teacher),
                              train_dataset=train, processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    teacher = AutoModelForCausalLM.from_pretrained(default_model_path())
    train = pack_blocks(tokenizer, load_texts(data_file=default_data_file("train")), 128)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(a.repeats):  # interleaved, so that machine load hits every row alike
        for name, extra in CONFIGS.items():
            times[name].append(seconds_per_step(name, extra, teacher, tokenizer, train, a.steps))
    base = statistics.median(times["plain CE (Trainer)"])
    lines = [
        "# Step time: SDFT vs plain fine-tuning (embedded default model)", "",
        f"Command: `python benchmarks/step_time.py --steps {a.steps} --repeats {a.repeats}` "
        f"on {'GPU' if torch.cuda.is_available() else 'CPU'}; batch 16 × 128 tokens; median of {a.repeats} "
        "interleaved runs. The SDFT rows include the teacher's forward pass.", "",
        "| configuration | s / step (median) | ratio to plain CE |", "|---|---:|---:|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3f} | {med / base:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
