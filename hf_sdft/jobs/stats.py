"""The figures of a recovery run: ``sdft_stats.json`` and the table ``hf-sdft recover`` prints."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from hf_sdft.cka.measure import cka_history
from hf_sdft.data import default_model_path
from hf_sdft.jobs.downstream import evaluate_tasks
from hf_sdft.jobs.evaluation import recovery_ratio


def downstream_scores(rec, tokenizer, models: dict) -> dict:
    """lm-evaluation-harness scores ``{name: {task: {metric: value}}}`` of each of ``models``
    on ``rec.eval_tasks`` (``{}`` when no task is set)."""
    if not rec.eval_tasks:
        return {}
    return {name: evaluate_tasks(model, tokenizer, rec.eval_tasks, limit=rec.eval_limit)
            for name, model in models.items()}


GENERATION_FIELDS = ("on_policy_ratio", "prompt_length", "max_new_tokens", "generation_temperature", "generation_top_p",
                     "generation_top_k", "teacher_context", "teacher_model_kind", "use_vllm")


def build_stats(rec, args, model_args, model_path, student, teacher_m, before, after, trainer, downstream,
                seconds) -> dict:
    """Every figure of the run; ``teacher_m`` / ``before`` / ``after`` come from
    :func:`~hf_sdft.jobs.evaluation.measure`, ``student`` is a :class:`~hf_sdft.jobs.student.Student`."""
    steps = trainer.state.global_step if trainer is not None else rec.forgetting_steps
    stats = {
        "base_model": model_path,
        "degradation": student.description,
        "tags": student.tags,
        "recovery": {
            "kd_loss": args.kd_loss, "kd_beta": args.kd_beta, "kd_temperature": args.kd_temperature,
            **({"cakld_gamma": getattr(trainer, "cakld_gamma", args.cakld_gamma)} if args.kd_loss == "cakld" else {}),
            "kd_ratio": args.kd_ratio, "cka_weight": args.cka_weight, "learning_rate": args.learning_rate,
            "steps": steps, "tokens_seen": steps * args.per_device_train_batch_size
            * args.gradient_accumulation_steps * args.world_size * rec.block_size,
            "lora": bool(model_args.use_peft), "lora_r": model_args.lora_r if model_args.use_peft else None,
            "train_seconds": next((e["train_runtime"] for e in reversed(trainer.state.log_history)
                                   if "train_runtime" in e), None) if trainer is not None else None,
            **({"generation": {name: getattr(args, name) for name in GENERATION_FIELDS}} if args.on_policy_ratio > 0 else {}),
            **({"forgetting_mode": rec.forgetting_mode} if rec.degradation == "forgetting" else {}),
            **({"quant_scales_lr_ratio": args.quant_scales_lr_ratio}
               if student.description.get("learned_scales") else {}),
        },
        "data": {k: v for k, v in asdict(rec).items() if k.endswith(("_file", "_name", "_split")) and v is not None},
        "perplexity": {"teacher": teacher_m["ppl"], "degraded": before["ppl"], "recovered": after["ppl"]},
        "recovery_ratio": recovery_ratio(teacher_m["ppl"], before["ppl"], after["ppl"]),
        "cka": {"before": before["cka"], "after": after["cka"], "mean_before": before["cka_mean"],
                "mean_after": after["cka_mean"]},
        "cka_history": [] if trainer is None else cka_history(trainer.state.log_history),
        "seconds": round(seconds, 1),
        "world_size": args.world_size,
    }
    if "narrow_ppl" in before:
        stats["narrow_perplexity"] = {"teacher": teacher_m["narrow_ppl"], "degraded": before["narrow_ppl"],
                                      "recovered": after["narrow_ppl"]}
    if downstream:
        stats["downstream"] = downstream
    return stats


def model_record(revision: str | None, model_args, args, teacher_dtypes: dict) -> dict:
    """How the models were really loaded and trained: the original's Hub commit (None for a local
    folder), the attention implementation, and the precisions used — the mixed precision asked for
    and the one used after the device's fallback, the teacher's dtype when measured and after
    training (the trainer may convert it to ``teacher_dtype`` in place), the device."""
    used = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return {
        "revision": revision, "revision_requested": getattr(model_args, "model_revision", None),
        "attn_implementation": getattr(model_args, "attn_implementation", None) or "default",
        "precision": {"requested": getattr(args, "requested_precision", used), "used": used,
                      "student_weights": "float32", "teacher_measured": teacher_dtypes.get("measured"),
                      "teacher_after_training": teacher_dtypes.get("after_training"), "device": str(args.device)},
    }


def portable_paths(stats: dict, model_path: str) -> None:
    """Local paths in ``stats`` replaced by base names (a Hub id stays): the stats are uploaded with
    the model. What the card needs from a local base (is it the embedded model, its license) is
    kept beside it."""
    base = Path(model_path).expanduser()
    if base.is_dir():
        stats["base_model"] = base.name
        stats["base_model_local"] = True
        stats["base_model_default"] = base.resolve() == Path(default_model_path()).resolve()
        readme = base / "README.md"
        if readme.is_file():
            from huggingface_hub import metadata_load

            license_ = (metadata_load(readme) or {}).get("license")
            if license_:
                stats["base_model_license"] = license_
    stats["data"] = {k: Path(v).name if k.endswith("_file") else v for k, v in stats.get("data", {}).items()}
    student = stats.get("degradation", {}).get("student")
    if student and Path(student).expanduser().exists():
        stats["degradation"]["student"] = Path(student).name


def format_table(stats: dict) -> str:
    ppl, cka = stats["perplexity"], stats["cka"]
    r = stats["recovery_ratio"]
    rows = [
        ("teacher perplexity", f"{ppl['teacher']:.3f}"),
        ("degraded perplexity", f"{ppl['degraded']:.3f}"),
        *([("after block reconstruction", f"{ppl['after_blocks']:.3f}")] if "after_blocks" in ppl else []),
        ("recovered perplexity", f"{ppl['recovered']:.3f}"),
        *kept_rows(stats),
        ("recovery ratio R", "n/a (nothing lost)" if r is None else f"{r:.3f}"),
        ("mean CKA before", f"{cka['mean_before']:.4f}"),
        ("mean CKA after", f"{cka['mean_after']:.4f}"),
    ]
    if "narrow_perplexity" in stats:
        n = stats["narrow_perplexity"]
        rows += [("narrow ppl degraded", f"{n['degraded']:.3f}"), ("narrow ppl recovered", f"{n['recovered']:.3f}")]
    for model, tasks in stats.get("downstream", {}).items():
        rows += [(f"{task} {metric} ({model})", f"{value:.4f}") for task, metrics in tasks.items()
                 for metric, value in metrics.items() if "stderr" not in metric]
    width = max(len(k) for k, _ in rows)
    kind = stats["degradation"].get("kind")
    details = {k: v for k, v in stats["degradation"].items() if k != "kind"}
    lines = [f"hf-sdft recovery — {kind} {json.dumps(_brief(details))}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def kept_rows(stats: dict) -> list[tuple[str, str]]:
    """The table's line on the state handed back (``stats["kept"]``, :mod:`hf_sdft.jobs.best_state`)."""
    kept = stats.get("kept")
    if not kept:
        return []
    return [("kept state", f"step {kept['step']} of {kept['last_step']}: {kept['reason']}")]


def _brief(details: dict) -> dict:
    """The degradation summary without per-layer listings."""
    return {k: _brief(v) if isinstance(v, dict) else v for k, v in details.items() if k != "layers"}
