"""CKA-QAD's claim at our scale: NVFP4 and MXFP4 quantization-aware distillation with KL only vs
KL + the CKA regulariser, on both models, several seeds, plus int4 in groups of 16 (symmetric,
float16 scales: about the same bits per weight as NVFP4's 4.5) as a reference.

    python benchmarks/fp4.py                         # both models, seeds 0 1, 100 steps
    python benchmarks/fp4.py --models embedded --seeds 0 --steps 50

Per model and format: the round-to-nearest start (measured once: it does not depend on the seed),
then per seed ``KL`` (recipes/nvfp4.yaml, recipes/mxfp4.yaml, or int4 g16) and ``KL+CKA`` (the same
with ``--cka_weight`` of recipes/nvfp4-cka.yaml). Each with small-model overrides (100 steps × 8 ×
128 tokens, fp32, learning rate 1e-4, held-out perplexity every 10 steps, the best state kept).
Measured on the held-out set: perplexity and R (from the
round-to-nearest start), mean KL(teacher ‖ student) per scored token, top-1 agreement with the
teacher, mean and per-layer linear CKA on the probe set before and after, and the training
time per step relative to the KL-only run of the same seed (shared 2-core CPU: noisy).
Writes ``benchmarks/results/fp4.md`` and ``fp4.json``.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F
from common import RESULTS, ROOT, command, parse_and_load

from hf_sdft.cli import _recipe_parser
from hf_sdft.jobs.evaluation import measure, recovery_ratio
from hf_sdft.jobs.recover import load, make_student, train

SECOND = ROOT / "tests" / "assets" / "second_model"
BUDGET = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--block_size", "128",
          "--bf16", "false", "--gradient_checkpointing", "false", "--warmup_steps", "10", "--save_strategy", "no",
          "--disable_tqdm", "true", "--logging_steps", "50", "--cka_every_n_steps", "1000", "--learning_rate", "1e-4",
          "--eval_every_n_steps", "10"]  # 4-bit grids barely hurt these models: 1e-3 overshoots (benchmarks/export.py)
MODELS = {"embedded": [],
          "second": ["--model_name_or_path", str(SECOND / "model"), "--train_file", str(SECOND / "data" / "train.txt"),
                     "--eval_file", str(SECOND / "data" / "eval.txt"), "--txt_sample_by", "paragraph"]}
FORMATS = {"nvfp4": ["--config", str(ROOT / "recipes" / "nvfp4.yaml")], "mxfp4": ["--config", str(ROOT / "recipes" / "mxfp4.yaml")],
           "int4-g16": ["--config", str(ROOT / "recipes" / "nvfp4.yaml"), "--quant_weights", "int4", "--quant_group_size", "16",
                        "--quant_scheme", "symmetric", "--quant_fp16_scales", "true"]}
CKA_WEIGHT = "0.1"  # recipes/nvfp4-cka.yaml's


@torch.no_grad()
def fidelity(student, teacher, batches) -> dict:
    """Mean KL(teacher ‖ student) per scored token (nats) and top-1 agreement, on held-out batches."""
    kl = agree = n = 0.0
    for batch in batches:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels", ids)
        keep = labels[:, 1:] != -100
        if mask is not None:
            keep &= mask[:, 1:].bool()
        t = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].double(), -1)
        s = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].double(), -1)
        kl += (t.exp() * (t - s)).sum().item()
        agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
        n += keep.sum().item()
    return {"kl_per_token": kl / n, "top1_agreement": agree / n}


def run(model: str, fmt: str, seed: int, steps: int, cka: bool | None, out) -> dict:
    """One arm; ``cka`` None measures the round-to-nearest start only (no training)."""
    name = f"{model}_{fmt}_{'rtn' if cka is None else 'kl_cka' if cka else 'kl'}_s{seed}"
    argv = [*FORMATS[fmt], *MODELS[model], *BUDGET, "--max_steps", str(steps), "--seed", str(seed),
            "--cka_weight", CKA_WEIGHT if cka else "0.0", "--output_dir", str(out / name)]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    torch.manual_seed(seed)
    t0 = time.time()
    original = load(rec, args, model_args)
    teacher_ppl = measure(original.model, None, original.data)["ppl"]
    student = make_student(original, rec, args, model_args)
    teacher = original.model.requires_grad_(False).eval()
    before = measure(student.model, teacher, original.data)
    result = {"command": command(argv), "teacher_ppl": teacher_ppl, "start_ppl": before["ppl"],
              "cka_before": before["cka_mean"], "cka_layers_before": before["cka"]}
    if cka is None:
        student.model.eval()
        result |= fidelity(student.model, teacher, original.data.eval.batches)
        return result
    trainer = train(student, original, rec, args, model_args)
    student.model.eval()
    after = measure(student.model, teacher, original.data)
    runtime = next((e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e), None)
    result |= {"ppl": after["ppl"], "R": recovery_ratio(teacher_ppl, before["ppl"], after["ppl"]),
               "cka_after": after["cka_mean"], "cka_layers_after": after["cka"],
               "step_seconds": runtime / steps if runtime else None, "seconds": time.time() - t0}
    result |= fidelity(student.model, teacher, original.data.eval.batches)
    print(f"{name}: ppl {before['ppl']:.3f} -> {after['ppl']:.3f} R {result['R']:.3f} "
          f"CKA {before['cka_mean']:.4f} -> {after['cka_mean']:.4f} KL {result['kl_per_token']:.4f}", flush=True)
    return result


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "not measured"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def report(results: dict, steps: int) -> str:
    lines = ["# FP4 quantization-aware distillation: KL only vs KL + CKA (CKA-QAD)", "",
             f"`python benchmarks/fp4.py` — {steps} steps × 8 × 128 tokens, fp32, learning rate 1e-4 (the state with "
             "the best held-out perplexity kept, evaluated every 10 steps), CPU "
             "(2 shared cores), CKA weight " + CKA_WEIGHT + ". Mean ± standard deviation over seeds "
             f"({', '.join(sorted({k.rsplit('_s', 1)[1] for m in results.values() for k in m if '_s' in k}))}). "
             "R counts from each format's round-to-nearest start. KL: mean KL(teacher ‖ student) per held-out "
             "token (nats). Step time: train seconds per step over the KL-only run's of the same seed.", ""]
    for model, runs in results.items():
        lines += [f"## {model}", "", "| format | arm | perplexity | R | KL / token | top-1 agreement | "
                  "mean CKA before → after | step time vs KL |", "|---|---|---|---|---|---|---|---|"]
        for fmt in FORMATS:
            rtn = runs.get(f"{fmt}_rtn")
            if rtn is None:
                continue
            lines.append(f"| {fmt} | round-to-nearest start | {rtn['start_ppl']:.3f} | 0 | {rtn['kl_per_token']:.4f} | "
                         f"{rtn['top1_agreement']:.4f} | {rtn['cka_before']:.4f} | — |")
            for arm in ("kl", "kl_cka"):
                rs = [r for k, r in runs.items() if k.startswith(f"{fmt}_{arm}_s") and "error" not in r]
                if not rs:
                    continue
                ratio = []
                for k, r in runs.items():
                    if k.startswith(f"{fmt}_{arm}_s"):
                        base = runs.get(k.replace(f"_{arm}_s", "_kl_s"))
                        if base and r.get("step_seconds") and base.get("step_seconds"):
                            ratio.append(r["step_seconds"] / base["step_seconds"])
                label = "KL only" if arm == "kl" else "KL + CKA"
                lines.append(f"| {fmt} | {label} | {mean_sd([r['ppl'] for r in rs])} | {mean_sd([r['R'] for r in rs])} | "
                             f"{mean_sd([r['kl_per_token'] for r in rs])} | {mean_sd([r['top1_agreement'] for r in rs])} | "
                             f"{rs[0]['cka_before']:.4f} → {mean_sd([r['cka_after'] for r in rs])} | "
                             f"{mean_sd(ratio) if arm == 'kl_cka' else '1'} |")
        lines += ["", "Per-layer CKA (seed mean) before → after:", ""]
        for fmt in FORMATS:
            for arm in ("kl", "kl_cka"):
                rs = [r for k, r in runs.items() if k.startswith(f"{fmt}_{arm}_s") and "error" not in r]
                if rs:
                    layers = rs[0]["cka_layers_after"]
                    after = {layer: statistics.mean(r["cka_layers_after"][layer] for r in rs) for layer in layers}
                    cells = ", ".join(f"{layer}: {rs[0]['cka_layers_before'][layer]:.3f} → {after[layer]:.3f}"
                                      for layer in layers)
                    lines.append(f"- {fmt} {arm}: {cells}")
        lines.append("")
    lines += ["Commands of every row are in `fp4.json`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    saved = RESULTS / "fp4.json"
    a, results = parse_and_load(__doc__, saved, str(ROOT / "outputs" / "bench-fp4"), models=MODELS,
                                formats=FORMATS, seeds=["0", "1"],
                                extra=[("--steps", {"type": int, "default": 100})])
    from pathlib import Path

    out = Path(a.out)
    if not a.report_only:
        for model in a.models:
            runs = results.setdefault(model, {})
            for fmt in a.formats:
                runs[f"{fmt}_rtn"] = run(model, fmt, 0, a.steps, None, out)
                for seed in map(int, a.seeds):
                    for cka in (False, True):
                        key = f"{fmt}_{'kl_cka' if cka else 'kl'}_s{seed}"
                        try:
                            runs[key] = run(model, fmt, seed, a.steps, cka, out)
                        except Exception as e:  # reported, not hidden
                            runs[key] = {"error": f"{type(e).__name__}: {e}"}
                            print(key, runs[key], flush=True)
                        saved.write_text(json.dumps(results, indent=1))
                        (RESULTS / "fp4.md").write_text(report(results, a.steps))
    saved.write_text(json.dumps(results, indent=1))
    (RESULTS / "fp4.md").write_text(report(results, a.steps))


if __name__ == "__main__":
    main()
