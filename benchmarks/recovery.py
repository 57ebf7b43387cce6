"""Recovery benchmark on the embedded default model: every recipe, one fixed budget, three ways.

    python benchmarks/recovery.py                  # all recipes (~40 min on 2 CPU cores)
    python benchmarks/recovery.py --recipes quanto-int4 --max_steps 100 --update   # redo one table

For each recipe the same degraded student, data, steps and learning rate are recovered by
(1) plain CE fine-tuning, (2) KD only, (3) KD + CKA regulariser. First it reports what each
degradation costs before any training. Writes ``benchmarks/results/recovery.md`` and
``recovery.json``. Times are measured side by side in one run and reported as ratios to
the plain-CE row of the same recipe.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sdft.cli import _recipe_parser
from hf_sdft.data import as_batches, default_model_path
from hf_sdft.evaluation import perplexity
from hf_sdft.recover import RecoveryArguments, load_data, run_recovery

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"quanto-int4": 0.9, "quanto-int2": 0.7, "prune-50": 0.7, "prune-2of4": 0.5, "forgetting": 0.8,
           "forgetting-prevent": 0.8}
METHODS = {  # name: overrides on top of the recipe
    "plain CE": ["--kd_ratio", "0.0", "--cka_weight", "0.0"],
    "KD": ["--kd_ratio", "1.0", "--cka_weight", "0.0"],
    "KD + CKA": ["--kd_ratio", "1.0", "--cka_weight", "0.1"],
}
PREVENT_METHODS = {  # forgetting-prevent: the narrow task itself is trained, CE is always on
    "plain CE": ["--kd_ratio", "0.0", "--cka_weight", "0.0"],
    "KD": ["--kd_ratio", "0.5", "--cka_weight", "0.0"],
    "KD + CKA": ["--kd_ratio", "0.5", "--cka_weight", "0.1"],
}
COSTS = [  # degradation options whose cost is reported before any training
    ("int8", ["--degradation", "quanto", "--quant_weights", "int8"]),
    ("int4, quanto default groups (128)", ["--degradation", "quanto", "--quant_weights", "int4", "--quant_group_size", "auto"]),
    ("int4, groups of 32", ["--degradation", "quanto", "--quant_weights", "int4", "--quant_group_size", "32"]),
    ("int4, one scale per channel", ["--degradation", "quanto", "--quant_weights", "int4", "--quant_group_size", "channel"]),
    ("int2, groups of 32", ["--degradation", "quanto", "--quant_weights", "int2", "--quant_group_size", "32"]),
    ("50% unstructured, magnitude", ["--degradation", "prune", "--prune_method", "magnitude"]),
    ("50% unstructured, Wanda", ["--degradation", "prune", "--prune_method", "wanda"]),
    ("2:4, magnitude", ["--degradation", "prune", "--prune_pattern", "2:4", "--prune_method", "magnitude"]),
    ("2:4, Wanda", ["--degradation", "prune", "--prune_pattern", "2:4", "--prune_method", "wanda"]),
]


def parse(argv: list[str]):
    return _recipe_parser().parse_args_and_config(argv)


def degradation_costs() -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    teacher = AutoModelForCausalLM.from_pretrained(default_model_path())
    data = load_data(RecoveryArguments(), tokenizer, default_model=True)
    base = perplexity(teacher, data.eval_batches)
    rows = []
    for label, flags in COSTS:
        rec = parse(flags)[0]
        student = copy.deepcopy(teacher)
        rec.build_degradation().apply(student, calibration=as_batches(data.train.select(range(rec.calibration_blocks)), 4))
        ppl = perplexity(student, data.eval_batches)
        rows.append({"degradation": label, "ppl_teacher": base, "ppl_degraded": ppl, "increase": ppl / base - 1})
        print(f"cost  {label:<36} ppl {base:.3f} -> {ppl:.3f}", flush=True)
    return rows


def run(recipe: str, method: str, flags: list[str], max_steps: int, out: Path) -> dict:
    config = "forgetting" if recipe.startswith("forgetting") else recipe
    extra = ["--forgetting_mode", "prevent"] if recipe == "forgetting-prevent" else []
    argv = ["--config", str(ROOT / "recipes" / f"{config}.yaml"), *extra, *flags, "--max_steps", str(max_steps),
            "--output_dir", str(out / recipe / method.replace(" ", "").replace("+", "_")), "--save_strategy", "no",
            "--disable_tqdm", "true", "--logging_steps", "50"]
    if recipe == "forgetting-prevent":
        argv += ["--forgetting_steps", str(max_steps)]
    rec, args, model_args = parse(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    stats = run_recovery(rec, args, model_args)
    stats["bench_seconds"] = time.time() - t0
    print(f"run   {recipe:<20} {method:<9} R={stats['recovery_ratio']} ppl={stats['perplexity']} "
          f"cka {stats['cka']['mean_before']:.4f}->{stats['cka']['mean_after']:.4f} {stats['bench_seconds']:.0f}s", flush=True)
    return stats


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_report(costs: list[dict], runs: dict, max_steps: int) -> None:
    lines = [
        "# Recovery benchmark (embedded default model)", "",
        f"Command: `python benchmarks/recovery.py --max_steps {max_steps}`. Every row of a table starts from the same "
        "degraded student and uses the same data, steps, batch and learning rate; only the loss differs. "
        "R = (ppl_degraded − ppl_recovered) / (ppl_degraded − ppl_teacher); time is the whole run "
        "(degrade, measure, train, measure) as a ratio to the plain-CE row of the same table, measured in this run.", "",
        "## What each degradation costs (no training)", "",
        "| degradation | teacher ppl | degraded ppl | increase |", "|---|---|---|---|",
    ]
    lines += [f"| {r['degradation']} | {r['ppl_teacher']:.3f} | {r['ppl_degraded']:.3f} | {100 * r['increase']:.1f}% |"
              for r in costs]
    for recipe, methods in runs.items():
        first = next(iter(methods.values()))
        lines += ["", f"## {recipe} — target R ≥ {TARGETS[recipe]}", "", f"Degradation: `{json.dumps(first['degradation'])}`", ""]
        narrow = "narrow_perplexity" in first
        head = "| method | teacher ppl | degraded ppl | recovered ppl | R | mean CKA before | mean CKA after |"
        head += " narrow ppl (degraded → recovered) |" if narrow else ""
        head += " time ratio |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        ce_time = methods["plain CE"]["bench_seconds"]
        for method, s in methods.items():
            p, c = s["perplexity"], s["cka"]
            row = (f"| {method} | {p['teacher']:.3f} | {p['degraded']:.3f} | {p['recovered']:.3f} | "
                   f"{fmt(s['recovery_ratio'])} | {c['mean_before']:.4f} | {c['mean_after']:.4f} |")
            if narrow:
                n = s["narrow_perplexity"]
                row += f" {n['degraded']:.3f} → {n['recovered']:.3f} |"
            row += f" {s['bench_seconds'] / ce_time:.2f} |"
            lines.append(row)
        lines.append("")
        for method in ("KD", "KD + CKA"):
            r = methods[method]["recovery_ratio"]
            verdict = "met" if r is not None and r >= TARGETS[recipe] else f"NOT met, short by {TARGETS[recipe] - (r or 0):.3f}"
            lines.append(f"- {method}: R = {fmt(r)} — target {TARGETS[recipe]} {verdict}; "
                         f"{'beats' if (r or 0) > (methods['plain CE']['recovery_ratio'] or 0) else 'does NOT beat'} "
                         "plain CE.")
    discussion = ROOT / "benchmarks" / "discussion.md"  # hand-written reading of the numbers
    if discussion.exists():
        lines += ["", discussion.read_text()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "recovery.json").write_text(json.dumps({"costs": costs, "runs": runs, "max_steps": max_steps}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="*", default=list(TARGETS))
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--out", default="/tmp/hf-sdft-bench")
    p.add_argument("--update", action="store_true",
                   help="keep the other recipes' tables from results/recovery.json (each table is still one run)")
    p.add_argument("--report_only", action="store_true", help="rewrite recovery.md from recovery.json, run nothing")
    a = p.parse_args()
    previous = RESULTS / "recovery.json"
    if a.report_only:
        saved = json.loads(previous.read_text())
        write_report(saved["costs"], saved["runs"], saved.get("max_steps", a.max_steps))
        return
    costs = degradation_costs()
    runs: dict[str, dict] = json.loads(previous.read_text())["runs"] if a.update and previous.exists() else {}
    for recipe in a.recipes:
        methods = PREVENT_METHODS if recipe == "forgetting-prevent" else METHODS
        runs[recipe] = {m: run(recipe, m, flags, a.max_steps, Path(a.out)) for m, flags in methods.items()}
        write_report(costs, runs, a.max_steps)  # keep partial results
    print((RESULTS / "recovery.md").read_text())


if __name__ == "__main__":
    main()
