"""The recovery job: degrade a model, measure, recover it by self-distillation, measure again.

Run by ``hf-sdft recover`` (see :mod:`hf_sdft.cli`); every figure goes to
``output_dir/sdft_stats.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed
from transformers.trainer_utils import SchedulerType, get_last_checkpoint

from .cards import STATS_FILE, push_recovered, write_card
from .callbacks import CKACallback, cka_history, measure_cka, per_layer, tokenize_probe
from .compress import get_degradation
from .compress.prune import merge_lora
from .compress.quantize import freeze_base, save_quantized
from .config import SDFTConfig
from .data import as_batches, default_data_file, default_model_path, load_texts, pack_blocks
from .evaluation import perplexity, recovery_ratio
from .trainer import SDFTTrainer

DEGRADATION_KINDS = ("quanto", "prune", "forgetting", "none")


@dataclass
class RecoveryArguments:
    """What to degrade and which data to use. Unset data fields fall back to the text
    shipped with the embedded default model."""

    degradation: str = field(default="quanto", metadata={"help": f"One of {', '.join(DEGRADATION_KINDS)}."})
    quant_weights: str = field(default="int4", metadata={"help": "int8 | int4 | int2"})
    quant_activations: str | None = field(default=None, metadata={"help": "None | int8 | fp8"})
    quant_group_size: str = field(
        default="channel", metadata={"help": "'auto' (quanto: 128), 'channel' (one scale per output row) or an int"}
    )
    prune_sparsity: float = field(default=0.5, metadata={"help": "Fraction of weights zeroed (unstructured)."})
    prune_pattern: str = field(default="unstructured", metadata={"help": "unstructured | N:M, e.g. 2:4"})
    prune_method: str = field(default="magnitude", metadata={"help": "magnitude | wanda"})
    calibration_blocks: int = field(default=16, metadata={"help": "Training blocks used for Wanda / activation scales."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id for recovery training."})
    dataset_config_name: str | None = None
    train_file: str | None = field(default=None, metadata={"help": "Local .txt/.jsonl/.parquet recovery text."})
    eval_file: str | None = field(default=None, metadata={"help": "Local held-out text for perplexity and CKA."})
    dataset_text_field: str = "text"
    block_size: int = field(default=128, metadata={"help": "Tokens per training / evaluation block."})
    max_eval_blocks: int | None = field(default=200, metadata={"help": "Cap on evaluation blocks."})
    probe_blocks: int = field(default=32, metadata={"help": "Held-out blocks used as the CKA probe set."})
    cka_every_n_steps: int | None = field(default=50, metadata={"help": "CKA measurement period (steps)."})
    narrow_dataset_name: str | None = None
    narrow_train_file: str | None = field(default=None, metadata={"help": "Narrow task for the forgetting recipe."})
    narrow_eval_file: str | None = None
    forgetting_mode: str = field(default="recover", metadata={"help": "recover (SFT, then SDFT) | prevent (CE+KD in one run)"})
    forgetting_steps: int = field(default=200, metadata={"help": "Plain SFT steps on the narrow task."})
    forgetting_learning_rate: float = 1e-3
    eval_batch_size: int = 16

    def __post_init__(self):
        if self.degradation not in DEGRADATION_KINDS:
            raise ValueError(f"degradation={self.degradation!r}: choose one of {', '.join(DEGRADATION_KINDS)}")
        if self.forgetting_mode not in ("recover", "prevent"):
            raise ValueError(f"forgetting_mode={self.forgetting_mode!r}: choose recover or prevent")
        for name in ("train_file", "eval_file", "narrow_train_file", "narrow_eval_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{name}={path} does not exist")

    def group_size(self):
        if self.quant_group_size in ("auto", "channel"):
            return "auto" if self.quant_group_size == "auto" else None
        return int(self.quant_group_size)

    def build_degradation(self):
        if self.degradation == "quanto":
            return get_degradation("quanto", weights=self.quant_weights, activations=self.quant_activations,
                                   group_size=self.group_size())
        if self.degradation == "prune":
            return get_degradation("prune", sparsity=self.prune_sparsity, pattern=self.prune_pattern,
                                   method=self.prune_method)
        return None


@dataclass
class RecoveryConfig(SDFTConfig):
    """``SDFTConfig`` whose defaults are the embedded default recipe (quanto-int4, CPU-sized)."""

    output_dir: str | None = "outputs/quanto-int4"
    max_steps: int = 300
    per_device_train_batch_size: int = 16
    learning_rate: float = 1e-3
    lr_scheduler_type: SchedulerType | str = "cosine"
    warmup_steps: float = 20
    logging_steps: float = 25
    save_steps: float = 100
    save_total_limit: int | None = 2
    report_to: None | str | list[str] = "none"
    bf16: bool = False
    seed: int = 0


@dataclass
class RecoveryData:
    train: object
    eval_batches: list
    probe: object  # held-out blocks: the CKA probe set
    probe_batches: list
    narrow_train: object = None
    narrow_eval_batches: list | None = None


def held_out(tokenizer, texts: list[str], block_size: int, max_blocks: int | None, probe_blocks: int,
             batch_size: int = 16):
    """Held-out text as (perplexity batches, probe blocks, CKA probe batches): the first
    ``probe_blocks`` evaluation blocks are the CKA probe set."""
    blocks = pack_blocks(tokenizer, texts, block_size, max_blocks)
    probe = blocks.select(range(min(probe_blocks, len(blocks))))
    return as_batches(blocks, batch_size), probe, tokenize_probe(probe, None, len(probe) * block_size, batch_size=8)


def load_data(rec: RecoveryArguments, tokenizer, default_model: bool) -> RecoveryData:
    def texts(name, file, fallback):
        if file is None and name is None:
            if not default_model:
                raise ValueError(f"set dataset_name or a data file for the {fallback} split of a non-default model")
            file = default_data_file(fallback)
        return load_texts(dataset_name=name, dataset_config_name=rec.dataset_config_name, data_file=file,
                          split="validation" if "eval" in fallback else "train", text_field=rec.dataset_text_field)

    train = pack_blocks(tokenizer, texts(rec.dataset_name, rec.train_file, "train"), rec.block_size)
    eval_batches, probe, probe_batches = held_out(
        tokenizer, texts(rec.dataset_name, rec.eval_file, "eval"), rec.block_size, rec.max_eval_blocks,
        rec.probe_blocks, rec.eval_batch_size,
    )
    data = RecoveryData(train=train, eval_batches=eval_batches, probe=probe, probe_batches=probe_batches)
    if rec.degradation == "forgetting":
        data.narrow_train = pack_blocks(tokenizer, texts(rec.narrow_dataset_name, rec.narrow_train_file, "narrow_train"),
                                        rec.block_size)
        narrow_eval = pack_blocks(tokenizer, texts(rec.narrow_dataset_name, rec.narrow_eval_file, "narrow_eval"),
                                  rec.block_size, rec.max_eval_blocks)
        data.narrow_eval_batches = as_batches(narrow_eval, rec.eval_batch_size)
    return data


def degrade_student(teacher, tokenizer, data: RecoveryData, rec: RecoveryArguments, args, degradation):
    """A trainable copy of ``teacher`` degraded as ``rec`` says (quantized, pruned, or SFT'd)."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    if rec.degradation == "forgetting":
        sft_on_narrow(student, tokenizer, data, args, rec)
    elif degradation is not None:
        calibration = data.train.select(range(min(rec.calibration_blocks, len(data.train))))
        degradation.apply(student, calibration=as_batches(calibration, 4))
    return student


def load_teacher_and_data(rec: RecoveryArguments, model_args):
    """(model path, tokenizer, float32 teacher, data) for a recipe; unset paths mean the embedded default."""
    default_model = model_args.model_name_or_path is None
    model_path = default_model_path() if default_model else model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    teacher = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model_path, tokenizer, teacher, load_data(rec, tokenizer, default_model)


def measure(model, teacher, data: RecoveryData) -> dict:
    """Perplexity on the eval text (and the narrow task), and per-layer CKA to ``teacher``
    (skipped when ``teacher`` is None: the teacher's own figures)."""
    out = {"ppl": perplexity(model, data.eval_batches)}
    if teacher is not None:
        layers, cka = measure_cka(model, teacher, data.probe_batches)
        out |= {"cka": per_layer(layers, cka), "cka_mean": float(cka.mean())}
    if data.narrow_eval_batches is not None:
        out["narrow_ppl"] = perplexity(model, data.narrow_eval_batches)
    return out


def sft_on_narrow(student, tokenizer, data: RecoveryData, args: SDFTConfig, rec: RecoveryArguments, kd_teacher=None):
    """Fine-tune on the narrow task: plain CE (the degradation), or CE + KD (``prevent`` mode)."""
    out = str(Path(args.output_dir) / ("prevent" if kd_teacher is not None else "forgetting-sft"))
    stage_args = SDFTConfig(
        output_dir=out, max_steps=rec.forgetting_steps, learning_rate=rec.forgetting_learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size, lr_scheduler_type="constant",
        save_strategy="no", report_to="none", logging_steps=args.logging_steps, seed=args.seed, bf16=False,
        use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
        kd_ratio=args.kd_ratio if kd_teacher is not None else 0.0, kd_loss=args.kd_loss, kd_beta=args.kd_beta,
        kd_temperature=args.kd_temperature, cka_weight=args.cka_weight if kd_teacher is not None else 0.0,
        cka_layers=args.cka_layers,
    )
    if kd_teacher is None:
        trainer = Trainer(model=student, args=stage_args, train_dataset=data.narrow_train, processing_class=tokenizer)
    else:
        trainer = SDFTTrainer(model=student, args=stage_args, teacher_model=kd_teacher,
                              train_dataset=data.narrow_train, processing_class=tokenizer)
    trainer.train()
    return student


QUANTIZED_BASE = "quantized_base"


def add_lora(student, model_args, quanto: bool, output_dir: str, should_save: bool):
    """Wrap the student with LoRA adapters (TRL ``ModelConfig`` fields). A quantized base
    is frozen to integer weights first (the memory-light path) and, since it never changes
    afterwards, saved right away to ``output_dir/quantized_base``."""
    from peft import get_peft_model
    from trl import get_peft_config

    if quanto:
        freeze_base(student)
        if should_save:
            save_quantized(student, Path(output_dir) / QUANTIZED_BASE)
    return get_peft_model(student, get_peft_config(model_args))


def save_student(student, tokenizer, degradation, output_dir: str, lora: bool) -> tuple[str, str]:
    """Save the recovered student; returns (format, Python that loads it from ``{path}``)."""
    quanto = getattr(degradation, "kind", None) == "quanto"
    if quanto and lora:  # the quantized base was saved by add_lora
        student.save_pretrained(output_dir)
        fmt = "quanto+lora"
        code = (
            "from peft import PeftModel\n"
            "from hf_sdft.compress.quantize import load_quantized\n\n"
            f'base = load_quantized("{{path}}", subfolder="{QUANTIZED_BASE}")\n'
            'model = PeftModel.from_pretrained(base, "{path}")'
        )
    elif quanto:
        degradation.save(student, output_dir)
        fmt = "quanto"
        code = degradation.loading_code("{path}")
    else:
        student.save_pretrained(output_dir)
        fmt = "transformers"
        code = 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{path}")'
    tokenizer.save_pretrained(output_dir)
    return fmt, code


def run_recovery(rec: RecoveryArguments, args: SDFTConfig, model_args) -> dict:
    """The whole job; returns the stats dict (also written to ``output_dir/sdft_stats.json``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but training is not distributed (world size {args.world_size}): "
            "each would train alone and overwrite the others' output. On CPU pass --use_cpu true"
        )
    started = time.time()
    set_seed(args.seed)
    model_path, tokenizer, teacher, data = load_teacher_and_data(rec, model_args)
    degradation = rec.build_degradation()
    quanto = getattr(degradation, "kind", None) == "quanto"
    before_teacher = measure(teacher, None, data)
    student = degrade_student(teacher, tokenizer, data, rec, args, degradation)
    teacher.requires_grad_(False).eval()
    before = measure(student, teacher, data)

    if rec.degradation == "forgetting" and rec.forgetting_mode == "prevent":
        student = copy.deepcopy(teacher).requires_grad_(True)  # one run: narrow CE + KD to the original
        sft_on_narrow(student, tokenizer, data, args, rec, kd_teacher=teacher)
        trainer = None
    else:
        if model_args.use_peft:
            student = add_lora(student, model_args, quanto, args.output_dir, args.should_save)
        callbacks = [CKACallback(data.probe, every_n_steps=rec.cka_every_n_steps,
                                 max_tokens=len(data.probe) * rec.block_size)]
        if degradation is not None:
            callbacks += degradation.callbacks(student)
        # the recovered student (with its card) is pushed once at the end, never the checkpoints
        trainer = SDFTTrainer(model=student, args=dataclasses.replace(args, push_to_hub=False), teacher_model=teacher,
                              train_dataset=data.train, processing_class=tokenizer, callbacks=callbacks)
        resume = args.resume_from_checkpoint
        if resume is None and Path(args.output_dir).is_dir():
            resume = get_last_checkpoint(args.output_dir)
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_state()  # trainer_state.json next to the model: loss curves for the card
        if model_args.use_peft and not quanto:  # adapters on an integer base stay adapters
            masks = getattr(degradation, "masks", None)
            student = merge_lora(student, masks) if masks else student.merge_and_unload()
    after = measure(student, teacher, data)
    stats = build_stats(rec, args, model_args, model_path, degradation, before_teacher, before, after, trainer,
                        time.time() - started)
    if args.should_save:
        fmt, code = save_student(student, tokenizer, degradation, args.output_dir,
                                 lora=bool(model_args.use_peft) and quanto)
        stats["format"], stats["loading_code"] = fmt, code
        Path(args.output_dir, STATS_FILE).write_text(json.dumps(stats, indent=2))
        if args.push_to_hub:
            push_recovered(args.output_dir, args.hub_model_id or Path(args.output_dir).name,
                           private=bool(args.hub_private_repo), token=args.hub_token)
        else:
            write_card(args.output_dir)
    return stats


def build_stats(rec, args, model_args, model_path, degradation, teacher_m, before, after, trainer, seconds) -> dict:
    if rec.degradation == "forgetting":
        described = {"kind": "forgetting", "mode": rec.forgetting_mode, "sft_steps": rec.forgetting_steps,
                     "sft_learning_rate": rec.forgetting_learning_rate}
        tags = ["forgetting"]
    elif degradation is not None:
        described, tags = degradation.describe(), degradation.tags()
    else:
        described, tags = {"kind": "none"}, []
    steps = trainer.state.global_step if trainer is not None else rec.forgetting_steps
    stats = {
        "base_model": model_path,
        "degradation": described,
        "tags": tags,
        "recovery": {
            "kd_loss": args.kd_loss, "kd_beta": args.kd_beta, "kd_temperature": args.kd_temperature,
            "kd_ratio": args.kd_ratio, "cka_weight": args.cka_weight, "learning_rate": args.learning_rate,
            "steps": steps, "tokens_seen": steps * args.per_device_train_batch_size
            * args.gradient_accumulation_steps * args.world_size * rec.block_size,
            "lora": bool(model_args.use_peft), "lora_r": model_args.lora_r if model_args.use_peft else None,
        },
        "data": {k: v for k, v in asdict(rec).items() if k.endswith(("_file", "_name")) and v is not None},
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
    return stats


def format_table(stats: dict) -> str:
    ppl, cka = stats["perplexity"], stats["cka"]
    r = stats["recovery_ratio"]
    rows = [
        ("teacher perplexity", f"{ppl['teacher']:.3f}"),
        ("degraded perplexity", f"{ppl['degraded']:.3f}"),
        ("recovered perplexity", f"{ppl['recovered']:.3f}"),
        ("recovery ratio R", "n/a (nothing lost)" if r is None else f"{r:.3f}"),
        ("mean CKA before", f"{cka['mean_before']:.4f}"),
        ("mean CKA after", f"{cka['mean_after']:.4f}"),
    ]
    if "narrow_perplexity" in stats:
        n = stats["narrow_perplexity"]
        rows += [("narrow ppl degraded", f"{n['degraded']:.3f}"), ("narrow ppl recovered", f"{n['recovered']:.3f}")]
    width = max(len(k) for k, _ in rows)
    kind = stats["degradation"].get("kind")
    lines = [f"hf-sdft recovery — {kind} {json.dumps({k: v for k, v in stats['degradation'].items() if k != 'kind'})}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
