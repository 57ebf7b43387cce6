"""Recovery benchmark on two unlike models: every recipe, one fixed budget, three ways.

    python benchmarks/recovery.py                               # both models, all recipes
    python benchmarks/recovery.py --models second --recipes prune-50 --update   # redo one table

Models: ``embedded`` (the 1.1M Llama shipped in hf_sdft/default_model, KJV text) and ``second``
(tests/assets/second_model: a Qwen2-architecture model on another public-domain corpus, its
.txt data split into its training documents with ``--txt_sample_by paragraph``). Each recipe of
``recipes/`` runs with small-model overrides (100 steps × 8 × 128 tokens, fp32, the model's
learning rate) and the same degraded student is recovered by (1) plain CE fine-tuning through
the job (``--kd_ratio 0``), (2) the job's self-distillation (forward KL), (3) a bare forward-KL
loop written here (AdamW, no Trainer, same batches, schedule and learning rate). Writes
``benchmarks/results/recovery.md`` and ``recovery.json``; every row carries its command.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, ROOT, command, parse_and_load

from hf_sdft.cli import _recipe_parser
from hf_sdft.evaluation import measure, recovery_ratio
from hf_sdft.recover import load, make_student, run_recovery

SECOND = ROOT / "tests" / "assets" / "second_model"
TARGETS = {"quanto-int2": 0.7, "prune-50": 0.8, "prune-2of4": 0.6, "forgetting": 0.9}
BUDGET = [  # 100 steps × 8 × 128 tokens on CPU, the same for every model and method
    "--max_steps", "100", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--block_size", "128",
    "--bf16", "false", "--gradient_checkpointing", "false", "--warmup_steps", "10", "--save_strategy", "no",
    "--disable_tqdm", "true", "--logging_steps", "50", "--cka_every_n_steps", "50", "--forgetting_steps", "200",
]
MODELS = {  # name: (flags choosing the model, its data and learning rate; the narrow task's flags)
    "embedded": (["--learning_rate", "1e-3", "--forgetting_learning_rate", "1e-3"], []),
    "second": (["--model_name_or_path", str(SECOND / "model"), "--train_file", str(SECOND / "data" / "train.txt"),
                "--eval_file", str(SECOND / "data" / "eval.txt"), "--txt_sample_by", "paragraph",
                "--learning_rate", "1e-3", "--forgetting_learning_rate", "1e-3"],
               ["--narrow_train_file", str(SECOND / "data" / "narrow_train.txt"),
                "--narrow_eval_file", str(SECOND / "data" / "narrow_eval.txt")]),
}
METHODS = ("plain CE", "KD (hf-sdft)", "bare KD loop")


def argv_for(model: str, recipe: str, method: str, out: Path, lr: str | None = None) -> list[str]:
    flags, narrow = MODELS[model]
    if lr is not None:  # the recovery's learning rate; the degradation (forgetting SFT) stays the same
        flags = [lr if prev == "--learning_rate" else f for prev, f in zip([None, *flags], flags)]
    loss = ["--kd_ratio", "0.0"] if method == "plain CE" else ["--kd_ratio", "1.0"]
    return ["--config", f"recipes/{recipe}.yaml", *flags, *(narrow if recipe == "forgetting" else []), *BUDGET,
            *loss, "--output_dir", str(out)]


def job(argv: list[str]) -> dict:
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    t0 = time.time()
    stats = run_recovery(rec, args, model_args)
    return {"R": stats["recovery_ratio"], "ppl": stats["perplexity"], "cka_before": stats["cka"]["mean_before"],
            "cka_after": stats["cka"]["mean_after"], "seconds": time.time() - t0, "command": command(argv),
            "degradation": stats["degradation"], "narrow": stats.get("narrow_perplexity")}


def bare_kd_loop(argv: list[str]) -> dict:
    """The 40-line baseline: the job's own degraded student, then AdamW on forward KL."""
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    original = load(rec, args, model_args)
    teacher_ppl = measure(original.model, None, original.data)["ppl"]
    student = make_student(original, rec, args, model_args)
    teacher = original.model.requires_grad_(False).eval()
    degraded_ppl = measure(student.model, None, original.data)["ppl"]
    model, masks = student.model.train(), student.masks or {}
    pruned = {n: ~m for n, m in masks.items()}
    modules = dict(model.named_modules())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                            weight_decay=args.weight_decay)
    steps, warmup = args.max_steps, args.get_warmup_steps(args.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(max(s - warmup, 0), steps) / max(1, steps - warmup))))
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(steps):
        idx = torch.randint(len(original.data.train), (args.per_device_train_batch_size,), generator=g).tolist()
        rows = original.data.train.select(idx)
        ids = torch.tensor(rows["input_ids"])
        labels = torch.tensor(rows["labels"])[:, 1:]
        keep = labels != -100
        with torch.no_grad():
            t = F.log_softmax(teacher(input_ids=ids).logits[:, :-1][keep].float(), -1)
        s = F.log_softmax(model(input_ids=ids).logits[:, :-1][keep].float(), -1)
        loss = (t.exp() * (t - s)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step(), sched.step(), opt.zero_grad()
        with torch.no_grad():
            for name, drop in pruned.items():
                modules[name].weight.masked_fill_(drop, 0)
    after = measure(model, teacher, original.data)
    return {"R": recovery_ratio(teacher_ppl, degraded_ppl, after["ppl"]),
            "ppl": {"teacher": teacher_ppl, "degraded": degraded_ppl, "recovered": after["ppl"]},
            "cka_before": None, "cka_after": after["cka_mean"], "seconds": time.time() - t0,
            "command": "bare_kd_loop() in benchmarks/recovery.py, student as in: " + command(argv), "narrow": None}


def fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_report(runs: dict) -> None:
    lines = [
        "# Recovery benchmark: two models, every recipe, 100 steps × 8 × 128 tokens", "",
        "Command: `python benchmarks/recovery.py`. In each table every row starts from the same degraded student "
        "(same seed) and uses the same data, batches per step, schedule (cosine, 10 warm-up steps) and learning rate; "
        "only the loss and the training loop differ. R = (ppl_degraded − ppl_recovered) / (ppl_degraded − "
        "ppl_teacher), perplexity on held-out text read as the model was trained. Time: the whole run (load, degrade, "
        "measure, train, measure) as a ratio to the plain-CE row, measured in this run.", "",
    ]
    for model, recipes in runs.items():
        lines += [f"## {model}", ""]
        lines += ["| recipe | method | teacher ppl | degraded ppl | recovered ppl | R | target | mean CKA after |"
                  " time ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for recipe, methods in recipes.items():
            ce = methods["plain CE"]["seconds"]
            for method, r in methods.items():
                p = r["ppl"]
                lines.append(f"| {recipe} | {method} | {p['teacher']:.3f} | {p['degraded']:.3f} | {p['recovered']:.3f} "
                             f"| {fmt(r['R'])} | {TARGETS[recipe]} | {fmt(r['cka_after'], 4)} | {r['seconds'] / ce:.2f} |")
        lines += ["", "Verdicts:", ""]
        for recipe, methods in recipes.items():
            kd = methods["KD (hf-sdft)"]["R"] or 0
            beats = [m for m in ("plain CE", "bare KD loop") if kd > (methods[m]["R"] or 0)]
            lines.append(f"- {recipe}: R = {kd:.3f}, target {TARGETS[recipe]} "
                         f"{'met' if kd >= TARGETS[recipe] else 'NOT met'}; beats "
                         f"{' and '.join(beats) if beats else 'neither baseline'}"
                         f"{'' if len(beats) == 2 else ' (does not beat ' + ', '.join(m for m in ('plain CE', 'bare KD loop') if m not in beats) + ')'}.")
        lines += ["", "Commands:", ""]
        lines += [f"- {recipe}, {method}: `{r['command']}`" for recipe, methods in recipes.items()
                  for method, r in methods.items()]
        lines.append("")
    discussion = ROOT / "benchmarks" / "discussion.md"  # hand-written reading of the numbers
    if discussion.exists():
        lines += [discussion.read_text()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "recovery.json").write_text(json.dumps(runs, indent=2))


def main() -> None:
    lr = ("--lr", {"default": None, "help": "learning rate for every run instead of the model's (tables named "
                   "'MODEL, lr X')"})
    a, runs = parse_and_load(__doc__, RESULTS / "recovery.json", "/tmp/hf-sdft-bench", [lr], models=MODELS,
                             recipes=TARGETS)
    if not a.report_only:
        for model in a.models:
            table = model if a.lr is None else f"{model}, lr {a.lr}"
            for recipe in a.recipes:
                results = {}
                for method in METHODS:
                    argv = argv_for(model, recipe, method, Path(a.out) / table.replace(", ", "_").replace(" ", "_") /
                                    recipe / method.replace(" ", "_"), a.lr)
                    results[method] = bare_kd_loop(argv) if method == "bare KD loop" else job(argv)
                    print(f"{model:<9} {recipe:<11} {method:<13} R={fmt(results[method]['R'])} "
                          f"ppl={results[method]['ppl']} {results[method]['seconds']:.0f}s", flush=True)
                runs.setdefault(table, {})[recipe] = results
                write_report(runs)  # keep partial results
    write_report(runs)
    print((RESULTS / "recovery.md").read_text())


if __name__ == "__main__":
    main()
