"""Generation-based self-distillation on two unlike models: on-policy fractions λ, the
demonstration-conditioned teacher and rewriting.

    python benchmarks/generation.py                      # everything (about 40 min on 2 CPU cores)
    python benchmarks/generation.py --models embedded --tables chat --update

Models and budget as in ``benchmarks/recovery.py`` (100 steps × 8 × 128 tokens, the model's
learning rate). Tables:

- ``text``: recipes/forgetting-onpolicy.yaml (plain-text forgetting, recovered with reverse KL)
  with λ = 0, 0.5, 1, plus λ = 0 given as many steps as the λ = 1 run's wall-clock allowed;
- ``int2``: recipes/quanto-int2-onpolicy.yaml with the same λ values;
- ``text-losses``, ``chat-losses``: the text and chat tables' λ = 0 and λ = 1 with forward KL and JSD
  (β 0.5) in place of reverse KL — is the narrow skill lost to reverse KL's zero-forcing or to sampling?
- ``chat`` (embedded model only: the second model has no chat template): recipes/forgetting-chat.yaml
  recovered with λ = 0, 0.5, 1 (reverse KL) and λ = 0 at equal wall-clock; then the two variants
  that replace the narrow SFT itself: forgetting-demonstration (on-policy, the teacher sees the
  reference answer) and forgetting-rewrite (SFT on the original's rewrites).

Writes ``benchmarks/results/generation.md`` (and ``generation.json``); every row carries its command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import RESULTS, command, parse_and_load
from recovery import MODELS

from hf_sdft.cli import _recipe_parser
from hf_sdft.jobs.recover import run_recovery

BUDGET = [
    "--max_steps", "100", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
    "--block_size", "128", "--bf16", "false", "--gradient_checkpointing", "false", "--warmup_steps", "10",
    "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "50", "--cka_every_n_steps", "50",
    "--forgetting_steps", "200", "--max_new_tokens", "64", "--prompt_length", "32", "--kd_loss", "reverse_kl",
]
TABLES = {  # name: (recipe, models, narrow flags needed)
    "text": ("forgetting-onpolicy", ("embedded", "second"), True),
    "int2": ("quanto-int2-onpolicy", ("embedded", "second"), False),
    "chat": ("forgetting-chat", ("embedded",), True),
    "text-losses": ("forgetting-onpolicy", ("embedded", "second"), True),
    "chat-losses": ("forgetting-chat", ("embedded",), True),
}
RATIOS = ("0", "0.5", "1")
LOSSES = ("forward_kl", "jsd")  # the *-losses tables: λ = 0 and 1 with these instead of reverse KL


def argv_for(model: str, recipe: str, narrow: bool, out: Path, *extra: str) -> list[str]:
    flags, narrow_flags = MODELS[model]
    budget = BUDGET[:-2] if "--kd_loss" in extra else BUDGET  # BUDGET ends with its own --kd_loss
    return ["--config", f"recipes/{recipe}.yaml", *flags, *(narrow_flags if narrow else []), *budget, *extra,
            "--output_dir", str(out)]


def job(argv: list[str]) -> dict:
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    started = time.time()
    stats = run_recovery(rec, args, model_args)
    steps = stats["recovery"]["steps"]
    seconds = stats["recovery"]["train_seconds"] or stats["seconds"]  # prevent / rewrite: the whole job
    return {"R": stats["recovery_ratio"], "ppl": stats["perplexity"], "narrow": stats.get("narrow_perplexity"),
            "seconds": time.time() - started, "train_seconds": seconds, "steps": steps,
            "seconds_per_step": (seconds / steps) if seconds else None, "command": command(argv)}


def run_table(name: str, model: str, out: Path) -> dict:
    recipe, _, narrow = TABLES[name]
    rows = {}
    if name.endswith("-losses"):
        for loss in LOSSES:
            for ratio in ("0", "1"):
                rows[f"{loss}, λ = {ratio}"] = job(argv_for(model, recipe, narrow,
                                                            out / f"{loss}-l{ratio}", "--on_policy_ratio", ratio,
                                                            "--kd_loss", loss))
        return rows
    for ratio in RATIOS:
        rows[f"λ = {ratio}"] = job(argv_for(model, recipe, narrow, out / f"l{ratio}",
                                            "--on_policy_ratio", ratio))
    budget = rows["λ = 1"]["train_seconds"] / rows["λ = 0"]["seconds_per_step"]
    rows["λ = 0, λ = 1's wall-clock"] = job(argv_for(model, recipe, narrow, out / "l0-time",
                                                      "--on_policy_ratio", "0", "--max_steps", str(round(budget))))
    if name == "chat":
        for variant in ("forgetting-demonstration", "forgetting-rewrite"):
            extra = ["--rewrite_answer_regex", "is (-?[0-9]+)"] if variant.endswith("rewrite") else []
            rows[variant] = job(argv_for(model, variant, False, out / variant, *extra))
    return rows


def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_report(tables: dict) -> None:
    lines = ["# Generation-based self-distillation", "",
             "Made by `python benchmarks/generation.py` (see its docstring): 100 steps × 8 × 128 tokens, reverse KL, "
             "64 sampled tokens per on-policy prompt (prompts: the first 32 tokens of a block, or a chat example's "
             "prompt), on 2 shared CPU cores. R: fraction of the general perplexity gap closed (for the "
             "demonstration and rewrite rows, which replace the narrow SFT itself, the gap between plain SFT and "
             "the original). Numbers as they came out.", ""]
    for key, rows in tables.items():
        lines += [f"## {key}", "", "| run | R | general ppl: teacher / degraded / after | narrow ppl: teacher / "
                  "degraded / after | s / step | command |", "|---|---:|---|---|---:|---|"]
        for run, r in rows.items():
            p, n = r["ppl"], r["narrow"]
            narrow = " / ".join(fmt(n[k], ".1f") for k in ("teacher", "degraded", "recovered")) if n else "n/a"
            lines.append(f"| {run} | {fmt(r['R'])} | {p['teacher']:.2f} / {p['degraded']:.2f} / {p['recovered']:.2f} | "
                         f"{narrow} | {fmt(r['seconds_per_step'], '.2f')} | `{r['command']}` |")
        lines.append("")
    reading = Path(__file__).with_name("generation_discussion.md")  # the hand-written reading of the numbers
    if reading.exists():
        lines[4:4] = [reading.read_text(), ""]
    (RESULTS / "generation.md").write_text("\n".join(lines))


def main() -> None:
    a, tables = parse_and_load(__doc__, RESULTS / "generation.json", "/tmp/hf-sdft-generation", models=MODELS, tables=TABLES)
    if not a.report_only:
        for name in a.tables:
            for model in (m for m in a.models if m in TABLES[name][1]):
                key = f"{model}, {name}"
                tables[key] = run_table(name, model, Path(a.out) / f"{model}-{name}")
                (RESULTS / "generation.json").write_text(json.dumps(tables, indent=1))
                write_report(tables)
    write_report(tables)


if __name__ == "__main__":
    main()
