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

    python benchmarks/recovery.py --additions --seeds 0 1       # each addition alone and all together
    python benchmarks/recovery.py --budget --steps 25 50 100 200 400   # R vs budget, old vs new default

``--additions`` (``recovery_additions.json``): per recipe, the bare KD loop, the old default (forward
KL from the round-to-nearest / magnitude / Wanda start), each addition alone (better start, learned
scales, CAKLD, block reconstruction) and all of them together, for every seed. R is always counted
from the old default's degraded student of the same seed, so a better start counts as recovery;
each row also shows its own start's perplexity. ``--budget`` (``recovery_budget.json``): R of the
old and the new default at several step counts, a table and ``recovery_budget.png``.
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
from hf_sdft.jobs.evaluation import measure, recovery_ratio
from hf_sdft.jobs.recover import load, make_student, run_recovery

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
OLD_DEFAULT = ["--kd_loss", "forward_kl", "--quant_clip_search", "false", "--quant_learn_scales", "false",
               "--block_reconstruction", "false"]  # the recipes' defaults before the additions
BETTER_START = {"quanto-int2": ["--quant_clip_search", "true"], "prune-50": ["--prune_method", "sparsegpt"],
                "prune-2of4": ["--prune_method", "sparsegpt"], "forgetting": None}
OLD_START = {"quanto-int2": [], "prune-50": ["--prune_method", "magnitude"], "prune-2of4": ["--prune_method", "wanda"],
             "forgetting": []}


def additions(recipe: str) -> dict[str, list[str] | None]:
    """Arm name → flags on top of the old default (None: the bare loop). Additions that do not
    apply to a recipe (learned scales without quantization, a better start after SFT) are left out."""
    arms = {"bare KD loop": None, "old default": []}
    extra = {"better start": BETTER_START[recipe],
             "learned scales": ["--quant_learn_scales", "true"] if recipe.startswith("quanto") else None,
             "cakld": ["--kd_loss", "cakld"], "block reconstruction": ["--block_reconstruction", "true"]}
    arms.update({name: flags for name, flags in extra.items() if flags is not None})
    arms["all together"] = [f for flags in extra.values() if flags for f in flags]
    return arms


def argv_for(model: str, recipe: str, method: str, out: Path, lr: str | None = None, extra=()) -> list[str]:
    flags, narrow = MODELS[model]
    if lr is not None:  # the recovery's learning rate; the degradation (forgetting SFT) stays the same
        flags = [lr if prev == "--learning_rate" else f for prev, f in zip([None, *flags], flags)]
    loss = ["--kd_ratio", "0.0"] if method == "plain CE" else ["--kd_ratio", "1.0"]
    return ["--config", f"recipes/{recipe}.yaml", *flags, *(narrow if recipe == "forgetting" else []), *BUDGET,
            *loss, *extra, "--output_dir", str(out)]


def run_arm(model: str, recipe: str, name: str, flags: list[str] | None, out: Path, seed: int, steps: int = 100) -> dict:
    """One arm of ``--additions`` / ``--budget``: the job with the old default plus ``flags``, or the
    bare loop (``flags`` None) on the old default's student."""
    extra = [*OLD_DEFAULT, *OLD_START[recipe], *(flags or []), "--seed", str(seed), "--max_steps", str(steps)]
    argv = argv_for(model, recipe, "KD", out / f"{model}_{recipe}_{name.replace(' ', '_')}_s{seed}_{steps}", extra=extra)
    try:
        r = bare_kd_loop(argv) if flags is None else job(argv)
    except Exception as e:  # a failing arm is reported, not hidden, and does not stop the others
        return {"error": f"{type(e).__name__}: {e}", "command": command(argv)}
    print(f"{model:<9} {recipe:<11} {name:<21} seed {seed} steps {steps:<4} R={fmt(r['R'])} ppl={r['ppl']} "
          f"{r['seconds']:.0f}s", flush=True)
    return r


def against(ref: dict, r: dict) -> float | None:
    """R of ``r`` counted from ``ref``'s degraded student (the old default's start, same seed)."""
    if "error" in r or "error" in ref:
        return None
    return recovery_ratio(ref["ppl"]["teacher"], ref["ppl"]["degraded"], r["ppl"]["recovered"])


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
    lines += additions_report() + budget_report()
    discussion = ROOT / "benchmarks" / "discussion.md"  # hand-written reading of the numbers
    if discussion.exists():
        lines += [discussion.read_text()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "recovery.json").write_text(json.dumps(runs, indent=2))


def load_json(name: str) -> dict:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else {}


def mean_spread(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    return (sum(vals) / len(vals), max(vals) - min(vals)) if vals else (None, None)


# recipe → the arm that became its default: the highest mean R over both models and both seeds in
# --additions (a tie goes to fewer additions); recipes/*.yaml say why
NEW_DEFAULT = {"quanto-int2": "better start", "prune-50": "block reconstruction", "prune-2of4": "all together",
               "forgetting": "block reconstruction"}


def additions_report() -> list[str]:
    runs = load_json("recovery_additions.json")
    if not runs:
        return []
    lines = ["# Each addition alone and all together (issue 19)", "",
             "Command: `python benchmarks/recovery.py --additions --seeds 0 1`. Same budget as above (100 steps × 8 × "
             "128 tokens, each model's learning rate); every arm is the old default (forward KL, round-to-nearest "
             "int2 / magnitude or Wanda pruning / plain SFT, no block phase) plus one addition. **R is counted from "
             "the old default's degraded student of the same seed**, so a start that loses less counts as "
             "recovery; 'start ppl' is each arm's own degraded perplexity before training (→ after the block "
             "reconstruction phase, where it ran). Spread: the largest minus the smallest R over the seeds. Time: the whole "
             "run as a ratio to the old default's, seed 0.", ""]
    for model, recipes in runs.items():
        lines += [f"## {model}: additions", "",
                  "| recipe | arm | start ppl | recovered ppl | R per seed | R mean | spread | time ratio |",
                  "|---|---|---|---|---|---:|---:|---:|"]
        verdicts = []
        for recipe, arms in recipes.items():
            ref = arms["old default"]
            summary = {}
            for arm, seeds in arms.items():
                rs = [against(ref.get(sd, {"error": "missing"}), r) for sd, r in seeds.items()]
                m, spread = mean_spread(rs)
                summary[arm] = (m, spread)
                ok = [r for r in seeds.values() if "error" not in r]
                starts = " / ".join(f"{r['ppl']['degraded']:.2f}" + (f" → {r['ppl']['after_blocks']:.2f}" if
                                     r["ppl"].get("after_blocks") else "") for r in ok) or "—"
                after = " / ".join(f"{r['ppl']['recovered']:.2f}" for r in ok) or "—"
                errors = "; ".join(r["error"][:80] for r in seeds.values() if "error" in r)
                base, this = ref.get("0", {}).get("seconds"), seeds.get("0", {}).get("seconds")
                ratio = f"{this / base:.2f}" if base and this else "n/a"
                lines.append(f"| {recipe} | {arm} | {starts} | {after} | {' / '.join(fmt(r) for r in rs)} | {fmt(m)} "
                             f"| {fmt(spread)} | {ratio} |" + (f" error: {errors}" if errors else ""))
            best = max((a for a in summary if summary[a][0] is not None and a != "bare KD loop"),
                       key=lambda a: summary[a][0])
            bare_m, bare_s = summary["bare KD loop"]
            margin = summary[best][0] - bare_m
            noise = max(bare_s or 0, summary[best][1] or 0)
            verdicts.append(f"- {recipe}: best arm **{best}**, R {summary[best][0]:.3f} (old default "
                            f"{fmt(summary['old default'][0])}, bare KD loop {bare_m:.3f}); ahead of the bare loop by "
                            f"{margin:+.3f}, {'more' if margin > noise else 'NOT more'} than the seed spread {noise:.3f}.")
        lines += ["", "Per recipe:", "", *verdicts, ""]
    return lines


def budget_report() -> list[str]:
    runs = load_json("recovery_budget.json")
    if not runs:
        return []
    lines = ["# R vs budget: old and new default", "",
             "Command: `python benchmarks/recovery.py --budget --steps 25 50 100 200 400`. Same settings as above, only "
             "max_steps changes (warm-up 10 steps, cosine to 0 at the last step); R counted from the old default's "
             "degraded student at the same step count and seed; one seed (0).", "",
             "![R vs budget](recovery_budget.png)", ""]
    for model, recipes in runs.items():
        for recipe, arms in recipes.items():
            steps = sorted({int(s) for runs_ in arms.values() for s in runs_}, key=int)
            lines += [f"## {model}, {recipe}", "", "| steps | " + " | ".join(f"R {a}" for a in arms) + " |",
                      "|---:|" + "---:|" * len(arms)]
            for st in steps:
                ref = arms["old default"].get(str(st), {"error": "missing"})
                lines.append(f"| {st} | " + " | ".join(fmt(against(ref, r[str(st)]) if str(st) in r else None)
                                                       for r in arms.values()) + " |")
            lines.append("")
    plot_budget(runs)
    return lines


def plot_budget(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, r, arms) for m, recipes in runs.items() for r, arms in recipes.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (model, recipe, arms) in zip(axes[0], panels):
        for arm, by_steps in arms.items():
            steps = sorted(int(s) for s in by_steps)
            r = [against(arms["old default"].get(str(s), {"error": "missing"}), by_steps[str(s)]) for s in steps]
            ax.plot(steps, [float("nan") if v is None else v for v in r], marker="o", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}: {recipe}", fontsize=9)
        ax.set_xlabel("training steps (× 8 × 128 tokens)")
        ax.set_ylabel("R (from the old start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "recovery_budget.png", dpi=110)
    plt.close(fig)


def record(name: str, keys: tuple[str, ...], result: dict) -> None:
    """Store one arm's result under ``keys`` in ``name``, re-read just before writing, so that runs
    of other models in parallel processes are kept."""
    runs = load_json(name)
    node = runs
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = result
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".{name}.{id(runs)}"
    tmp.write_text(json.dumps(runs, indent=2))
    tmp.replace(RESULTS / name)


def run_additions(a) -> None:
    for model in a.models:
        for recipe in a.recipes:
            for arm, flags in additions(recipe).items():
                for seed in a.seeds:
                    r = run_arm(model, recipe, arm, flags, Path(a.out), int(seed))
                    record("recovery_additions.json", (model, recipe, arm, str(seed)), r)


def run_budget(a) -> None:
    for model in a.models:
        for recipe in a.recipes:
            new = additions(recipe)[NEW_DEFAULT.get(recipe, "old default")]
            for arm, flags in {"old default": [], "new default": new}.items():
                for steps in a.steps:
                    r = run_arm(model, recipe, arm, flags, Path(a.out), int(a.seeds[0]), int(steps))
                    record("recovery_budget.json", (model, recipe, arm, str(steps)), r)


def main() -> None:
    lr = ("--lr", {"default": None, "help": "learning rate for every run instead of the model's (tables named "
                   "'MODEL, lr X')"})
    modes = [("--additions", {"action": "store_true", "help": "each addition alone and all together"}),
             ("--budget", {"action": "store_true", "help": "R vs max_steps for the old and the new default"})]
    a, runs = parse_and_load(__doc__, RESULTS / "recovery.json", "/tmp/hf-sdft-bench", [lr, *modes], models=MODELS,
                             recipes=TARGETS, seeds=["0"], steps=["25", "50", "100", "200", "400"])
    if a.additions or a.budget:
        runs = json.loads((RESULTS / "recovery.json").read_text())
        if not a.report_only:
            (run_additions if a.additions else run_budget)(a)
    elif not a.report_only:
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
