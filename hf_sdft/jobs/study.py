"""The alignment study, ``hf-sdft study``: does student↔teacher CKA track recovery, and does it cause it?

The student is degraded once (or is your own, ``student_name_or_path``); copies of it then recover
under several *arms* with the same data, steps, seeds and learning rate. Each run measures held-out
perplexity, the held-out KL(teacher ‖ student) and per-layer CKA at fixed steps, so each arm draws
a trajectory of (CKA, perplexity) points. Two arms are interventions that separate geometry from
output matching: ``cka`` pushes the geometry alone, ``head-kd`` matches outputs with every decoder
layer frozen. :mod:`hf_sdft.jobs.study_report` turns the points into statistics, verdicts and plots.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_from_disk
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback, set_seed

from hf_sdft.cka.measure import measure_cka, per_layer
from hf_sdft.distributed import progress_disabled
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.jobs.evaluation import held_out_sums, perplexity, perplexity_of
from hf_sdft.jobs.recover import check_launch, load, make_student
from hf_sdft.jobs.sft import make_trainer
from hf_sdft.jobs.study_arms import ARMS, Arm
from hf_sdft.modeling import comma_list, decoder_layers, is_peft, unwrap
from hf_sdft.trainer.config import SDFTConfig


def _csv(value: str, what: str) -> list[str]:
    items = comma_list(value)
    if not items:
        raise ValueError(f"{what} is empty")
    return items


@dataclass
class StudyArguments:
    """The study's own fields (``hf-sdft study``); the recipe's fields set the data, budget and degradation."""

    arms: str = field(default=",".join(ARMS), metadata={"help": f"Comma-separated arms, of: {', '.join(ARMS)}."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated training seeds (data order) per arm."})
    measure_points: int = field(
        default=4, metadata={"help": "Measurements per run, evenly spaced up to max_steps (plus the degraded start)."}
    )
    study_cka_weight: float = field(default=1.0, metadata={"help": "CKA loss weight of the kd+cka and cka arms."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Resamples of the bootstrap intervals."})
    study_dir: str | None = field(default=None, metadata={"help": "Where study.json/study.md go (default: output_dir/study)."})

    def __post_init__(self):
        self.arm_names = _csv(self.arms, "arms")
        unknown = [a for a in self.arm_names if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}: choose from {', '.join(ARMS)}")
        if len(set(self.arm_names)) != len(self.arm_names):
            raise ValueError(f"arms={self.arms!r} names an arm twice")
        try:
            self.seed_list = [int(s) for s in _csv(self.seeds, "seeds")]
        except ValueError:
            raise ValueError(f"seeds={self.seeds!r}: give integers like '0,1,2'") from None
        if self.measure_points < 1:
            raise ValueError(f"measure_points={self.measure_points} must be at least 1")
        if self.study_cka_weight <= 0 and any(ARMS[a].cka for a in self.arm_names):
            raise ValueError("study_cka_weight must be > 0 for the kd+cka and cka arms")

    def measure_steps(self, max_steps: int) -> list[int]:
        """Steps measured in each run: ``measure_points`` evenly spaced, the last one ``max_steps``."""
        if max_steps < 1:
            raise ValueError("the study needs a step budget: set max_steps (e.g. --max_steps 60)")
        return sorted({max(1, round(k * max_steps / self.measure_points)) for k in range(1, self.measure_points + 1)})


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Leave only the output head and the norms outside the decoder layers (the final norm)
    trainable; a head tied to the input embeddings is untied first (a copy), so that training it
    leaves every decoder layer's inputs, and so its geometry, exactly as they were. Returns the
    names of the trainable parameters."""
    inner = unwrap(model)
    head, embeddings = inner.get_output_embeddings(), inner.get_input_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} exposes no output head: the head-kd arm cannot run")
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        for config in {id(c): c for c in (inner.config, inner.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    inner.requires_grad_(False)
    in_layers = {id(m) for m in decoder_layers(inner).modules()}
    head.requires_grad_(True)
    for module in inner.modules():
        if id(module) not in in_layers and "norm" in type(module).__name__.lower():
            module.requires_grad_(True)
    return [name for name, p in inner.named_parameters() if p.requires_grad]


def measure_point(model: nn.Module, teacher: nn.Module, data) -> dict:
    """Held-out perplexity, KL(teacher ‖ model) per scored token (nats), and per-layer CKA on
    the probe set of ``data`` (a :class:`~hf_sdft.data.RecoveryData`)."""
    nll, count, kl = held_out_sums(model, data.eval.batches, teacher).tolist()
    ppl = perplexity_of(nll, count)
    layers, cka = measure_cka(model, teacher, data.eval.probe_batches)
    return {"ppl": ppl, "kd": kl / count, "cka_mean": float(cka.mean()), "cka": per_layer(layers, cka)}


class TrajectoryCallback(TrainerCallback):
    """Observer: at each of ``steps`` it measures the model with ``measure(model)`` and keeps
    ``{"step": …, **measure(model)}`` in :attr:`points`."""

    def __init__(self, steps: list[int], measure):
        self.steps, self.measure, self.points = set(steps), measure, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and all(p["step"] != state.global_step for p in self.points):
            self.points.append({"step": state.global_step, **self.measure(model)})


def run_arm(arm: Arm, seed: int, base, original, rec: RecoveryArguments, args: SDFTConfig, study: StudyArguments,
            output_dir: Path) -> list[dict]:
    """Recover a copy of the ``base`` student under ``arm`` with ``seed``; its trajectory points."""
    teacher, data = original.model, original.data
    student = copy.deepcopy(base)
    if arm.head_only:
        freeze_all_but_head(student.model)
    run_args = arm.training_args(args, seed, str(output_dir / "runs" / f"{arm.name}-seed{seed}"), study.study_cka_weight)
    trajectory = TrajectoryCallback(study.measure_steps(args.max_steps), lambda m: measure_point(m, teacher, data))
    from_cache = rec.teacher_cache is not None and arm.kd_ratio > 0 and not arm.needs_teacher_online
    train_data = load_from_disk(rec.teacher_cache) if from_cache else data.train
    run_teacher = teacher if arm.kd_ratio > 0 and not from_cache else None
    set_seed(seed)
    trainer = make_trainer(student.model, run_args, run_teacher, train_data, original.tokenizer, data.fmt,
                           [trajectory, *student.callbacks()])
    trainer.train()
    return [{"arm": arm.name, "seed": seed, **point} for point in trajectory.points]


def run_study(rec: RecoveryArguments, args: SDFTConfig, model_args, study: StudyArguments) -> dict:
    """The whole study; returns the result written to ``study_dir/study.json`` (see
    :func:`hf_sdft.jobs.study_report.analyse`)."""
    # lazy: the report's plots import matplotlib, needed only once the study's runs are done
    from hf_sdft.jobs.study_report import analyse, write_report

    check_launch(args)
    if model_args.use_peft:
        raise ValueError("the study trains full students (head-kd freezes layers of the model itself): drop use_peft")
    output_dir = Path(study.study_dir or Path(args.output_dir) / "study")
    set_seed(args.seed)
    original = load(rec, args, model_args)
    teacher_ppl = perplexity(original.model, original.data.eval.batches)
    base = make_student(original, rec, args, model_args)
    if is_peft(base.model):
        raise ValueError("the study trains full students: give a merged (not adapter) student_name_or_path")
    original.model.requires_grad_(False).eval()
    points = [{"arm": "degraded", "seed": None, "step": 0, **measure_point(base.model, original.model, original.data)}]
    runs = [(ARMS[name], seed) for seed in study.seed_list for name in study.arm_names]
    for arm, seed in tqdm(runs, desc="study runs", disable=progress_disabled()):
        points += run_arm(arm, seed, base, original, rec, args, study, output_dir)
    settings = {
        "model": original.path, "degradation": base.description, "arms": study.arm_names, "seeds": study.seed_list,
        "max_steps": args.max_steps, "learning_rate": args.learning_rate,
        "batch": f"{args.per_device_train_batch_size} × {rec.block_size} tokens × {args.gradient_accumulation_steps}",
        "measure_steps": study.measure_steps(args.max_steps), "cka_weight": study.study_cka_weight,
        "kd_loss": args.kd_loss, "eval_items": sum(len(b["input_ids"]) for b in original.data.eval.batches),
        "probe_items": len(original.data.eval.probe),
    }
    result = analyse(points, teacher_ppl, settings, resamples=study.bootstrap_resamples)
    if args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "study.json").write_text(json.dumps(result, indent=2))
        write_report(result, output_dir)
    return result
