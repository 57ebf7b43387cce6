"""The recovery job's configuration: where the student comes from, which data, what to measure
(:class:`RecoveryArguments`), and the trainer config with the embedded model's defaults (:class:`RecoveryConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_utils import SchedulerType

from hf_sdft.compress import DEGRADATIONS
from hf_sdft.compress.fp4 import FP4_FORMATS
from hf_sdft.data import DEFAULT_SPLITS, TXT_SAMPLE_BY
from hf_sdft.export import EXPORT_FORMATS
from hf_sdft.modeling import comma_list
from hf_sdft.trainer.config import SDFTConfig, resolve_mixed_precision

DEGRADATION_KINDS = ("quanto", "prune", "forgetting", "none")
DEGRADATION_PREFIXES = {"quanto": "quant", "prune": "prune"}  # a registered degradation's options: <prefix>_<option>


FORGETTING_MODES = ("recover", "prevent", "rewrite")


@dataclass
class RecoveryArguments:
    """The recovery job's own fields (``hf-sdft recover``): where the student comes from (your
    own with ``student_name_or_path``, or degraded here as ``degradation`` says), which data,
    and what to measure. Unset data sources fall back to the data shipped with the embedded model."""

    student_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Your degraded student (folder or Hub id: transformers, quanto, or a PEFT adapter folder), "
                  "recovered from model_name_or_path; the degradation step is skipped."},
    )
    keep_sparsity: bool = field(
        default=True, metadata={"help": "Keep the zeros of a pruned student exactly (masks detected from its weights)."}
    )
    degradation: str = field(default="quanto", metadata={"help": f"One of {', '.join(DEGRADATION_KINDS)}."})
    quant_weights: str = field(
        default="int2", metadata={"help": "int8 | int4 | int2 (default int2 in groups of 32, as recipes/quanto-int2.yaml: "
                                  "a degradation the embedded model feels; int4 barely hurts it) | nvfp4 | mxfp4 "
                                  "(FP4, hf_sdft.compress.fp4: blocks of 16 / 32 fixed by the format, quant_group_size, "
                                  "quant_scheme and quant_fp16_scales do not apply; saved as compressed-tensors)"})
    quant_activations: str | None = field(default=None, metadata={"help": "None | int8 | fp8"})
    quant_group_size: str = field(
        default="32", metadata={"help": "'auto' (quanto: 128), 'channel' (one scale per output row) or an int"}
    )
    quant_scheme: str = field(
        default="asymmetric",
        metadata={"help": "int4 / int2 grid: asymmetric (quanto's, scale·code − shift; GGUF Q4_1) | symmetric "
                  "(scale·q, q signed, no zero point: compressed-tensors for vLLM / SGLang, GGUF Q4_0). int8 is "
                  "symmetric either way."})
    quant_fp16_scales: bool = field(
        default=True,
        metadata={"help": "Keep every quantization scale (and shift) on float16 values while training, as GGUF "
                  "stores them, so that hf-sdft export writes the trained grid exactly."})
    quant_clip_search: bool = field(
        default=False,
        metadata={"help": "Search each group's clipping range (min/max shrunk by 1.0..0.5) for the least layer-output "
                  "error on calibration_blocks' inputs (AWQ / BitDistiller style); saved in quanto's format."},
    )
    quant_learn_scales: bool = field(
        default=False,
        metadata={"help": "Train the quantization scales and shifts with the loss (LSQ / OmniQuant style; full QAT, "
                  "also an own quanto student's), at learning_rate × quant_scales_lr_ratio."},
    )
    prune_sparsity: float = field(default=0.5, metadata={"help": "Fraction of weights zeroed (unstructured)."})
    prune_pattern: str = field(default="unstructured", metadata={"help": "unstructured | N:M, e.g. 2:4"})
    prune_method: str = field(default="magnitude", metadata={"help": "magnitude | wanda | sparsegpt"})
    calibration_blocks: int = field(
        default=16, metadata={"help": "Training blocks for Wanda / SparseGPT / activation scales / the clipping search "
                              "/ block reconstruction."})
    block_reconstruction: bool = field(
        default=False,
        metadata={"help": "Before end-to-end training, train each decoder block of the student alone on the teacher's "
                  "block output over the calibration_blocks (EfficientQAT's Block-AP); off by default; the "
                  "recipes that benchmark better with it turn it on (benchmarks/recovery.md). Skipped when resuming "
                  "from a checkpoint."},
    )
    block_reconstruction_steps: int = field(
        default=100, metadata={"help": "AdamW steps per decoder block of the block reconstruction (one batch of "
                               "4 calibration blocks a step, cycling)."})
    block_reconstruction_lr: float = field(
        default=1e-4, metadata={"help": "Learning rate of the block reconstruction (learned quantization scales: "
                                "× quant_scales_lr_ratio)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id for recovery training."})
    dataset_config_name: str | None = None
    dataset_train_split: str = field(default="train", metadata={"help": "Hub split for training (and the narrow task's)."})
    dataset_test_split: str = field(default="validation", metadata={"help": "Hub split held out for measurements."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local recovery data: .txt, or .jsonl/.parquet/.csv with a text column or "
                                "chat data (messages, or prompt + completion)."})
    eval_file: str | None = field(default=None, metadata={"help": "Local held-out data for perplexity and CKA."})
    dataset_text_field: str = "text"
    txt_sample_by: str = field(
        default="document",
        metadata={"help": "How a .txt file splits into documents (EOS after each, line breaks kept): document "
                  "(the whole file) | paragraph (at blank lines) | line."},
    )
    default_data: str = field(
        default="text", metadata={"help": "Shipped data for unset sources (embedded model only): text | chat."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training block / longest chat example."})
    max_eval_blocks: int | None = field(default=200, metadata={"help": "Cap on evaluation blocks (or chat examples)."})
    probe_blocks: int = field(default=32, metadata={"help": "Held-out blocks (or examples) used as the CKA probe set."})
    cka_every_n_steps: int | None = field(default=50, metadata={"help": "CKA measurement period (steps)."})
    narrow_dataset_name: str | None = None
    narrow_train_file: str | None = field(default=None, metadata={"help": "Narrow task for the forgetting recipe."})
    narrow_eval_file: str | None = field(default=None, metadata={"help": "Narrow task held out (its perplexity is reported)."})
    forgetting_mode: str = field(
        default="recover",
        metadata={"help": "recover (SFT, then SDFT) | prevent (CE+KD in one run) | rewrite (the original rewrites the "
                  "narrow responses, hf-sdft rewrite, then SFT on the rewrites)"},
    )
    rewrite_answer_regex: str | None = field(
        default=None, metadata={"help": "rewrite mode: a rewrite whose answer (group 1) differs from the reference's "
                                "keeps the reference, e.g. 'is (-?[0-9]+)'."})
    forgetting_steps: int = field(default=200, metadata={"help": "Plain SFT steps on the narrow task."})
    forgetting_learning_rate: float = 1e-3
    eval_batch_size: int = 16
    teacher_cache: str | None = field(
        default=None, metadata={"help": "A folder written by hf-sdft cache-teacher: train from the teacher's cached "
                                "top-k outputs instead of running it (the original still measures perplexity and CKA)."})
    eval_tasks: str | None = field(
        default=None, metadata={"aliases": ["--tasks"], "help": "lm-evaluation-harness tasks scored on every model "
                                "measured (comma-separated; needs hf-sdft[eval]), e.g. sdft_kjv_nextline."})
    eval_limit: int | None = field(
        default=None, metadata={"aliases": ["--limit"], "help": "Cap on examples per lm-eval task."})

    export_formats: str | None = field(
        default=None,
        metadata={"help": "After saving, also write the recovered student in these serving formats, each in "
                  "output_dir/FORMAT, and measure its perplexity as transformers (and llama.cpp) load it: "
                  "comma-separated, of compressed-tensors (vLLM, SGLang, transformers), gguf (llama.cpp, Ollama), "
                  "dense. A student with no exact form in one is refused unless export_allow_rounding."})
    export_allow_rounding: bool = field(
        default=False, metadata={"help": "Re-quantize for an export format with no exact form, reporting the error."})
    hub_format: str = field(
        default="auto",
        metadata={"help": "What push_to_hub puts at the repository's root: an export format, 'native' (the saved "
                  "student as hf-sdft saves it), or 'auto': compressed-tensors for a quantized student with an "
                  "exact form there, else dense. Other exported formats go in subfolders."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete the checkpoints and outputs of another run found in output_dir, then start. "
                  "Without it such a folder is refused (naming the differing settings); a folder of this same "
                  "run is resumed, or left as it is when complete."})

    # issue 26 item 8: memory bounded by the batch (hf_sdft.data.pack_arrow)
    streaming: bool = field(
        default=False, metadata={"help": "Stream the Hub training dataset (dataset_name) instead of downloading it "
                                 "whole; blocks are packed into Arrow files on disk as they arrive."})
    max_train_blocks: int | None = field(
        default=None, metadata={"help": "Cap on training blocks (plain text) or examples (chat): reading stops there."})

    # issue 26 item 10: keep the best state (hf_sdft.jobs.best_state)
    keep_best_model: bool = field(
        default=True,
        metadata={"help": "Measure held-out perplexity at step 0 and every eval_every_n_steps, and hand back the "
                  "state with the lowest one, the degraded start included (masks and quantization grids intact)."})
    eval_every_n_steps: int | None = field(
        default=None, metadata={"help": "Held-out perplexity period (steps) for keep_best_model and "
                                "early_stopping_patience; unset: at every checkpoint (save_steps), and the last step."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop training after this many held-out evaluations without a lower "
                                "perplexity than the best so far."})

    def __post_init__(self):
        choices = {"degradation": DEGRADATION_KINDS, "forgetting_mode": FORGETTING_MODES,
                   "txt_sample_by": TXT_SAMPLE_BY, "default_data": tuple(DEFAULT_SPLITS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for fmt in self.export_list:
            if fmt not in EXPORT_FORMATS:
                raise ValueError(f"export_formats: unknown format {fmt!r}: choose among {', '.join(EXPORT_FORMATS)}")
        if self.hub_format not in ("auto", "native", *EXPORT_FORMATS):
            raise ValueError(f"hub_format={self.hub_format!r}: choose auto, native or one of "
                             f"{', '.join(EXPORT_FORMATS)}")
        for name in ("train_file", "eval_file", "narrow_train_file", "narrow_eval_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name}={path} does not exist")
        if self.block_reconstruction_steps < 1 or self.block_reconstruction_lr <= 0:
            raise ValueError(f"block_reconstruction_steps={self.block_reconstruction_steps} must be at least 1 and "
                             f"block_reconstruction_lr={self.block_reconstruction_lr} positive")
        if self.block_reconstruction and self.degradation == "forgetting" and self.student_name_or_path is None \
                and self.forgetting_mode != "recover":
            raise ValueError(f"block_reconstruction reconstructs the degraded student, which forgetting_mode "
                             f"{self.forgetting_mode} does not train (it starts from the original): use recover")
        if self.block_reconstruction and self.quant_activations is not None and self.student_name_or_path is None \
                and self.degradation == "quanto":
            raise ValueError("block_reconstruction needs weight-only quantization (FakeQuantLinear): quantized "
                             "activations (quant_activations) have no straight-through gradient here")
        self._check_counts()
        if self.teacher_cache is not None and not Path(self.teacher_cache, "dataset_info.json").is_file():
            raise FileNotFoundError(f"teacher_cache={self.teacher_cache} is not a folder written by hf-sdft cache-teacher")
        self.check_degradation_options()

    def check_degradation_options(self) -> None:
        """The degradation's options (bit width, group size, scheme, sparsity, pattern, method) checked
        now, before any model or data is loaded, with the option's flag named."""
        if self.degradation == "quanto" and self.student_name_or_path is None:
            group = str(self.quant_group_size).strip()
            if group not in ("auto", "channel") and not (group.isdigit() and int(group) > 0):
                raise ValueError(f"quant_group_size={self.quant_group_size!r}: give a positive number of weights per "
                                 "scale (e.g. 32, 64, 128), 'auto' (quanto's 128) or 'channel' (one scale per row)")
        if self.degradation in ("quanto", "prune"):
            try:
                self.build_degradation()
            except ValueError as err:
                prefix = DEGRADATION_PREFIXES[self.degradation]
                raise ValueError(f"{self.degradation} options ({prefix}_*): {err}") from None

    def _check_counts(self) -> None:
        for name in ("eval_every_n_steps", "early_stopping_patience", "max_train_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1 (or unset)")

    @property
    def export_list(self) -> list[str]:
        return comma_list(self.export_formats) if self.export_formats else []

    @property
    def uses_narrow_task(self) -> bool:
        """Forgetting degrades on the narrow task; any run measures it when one is named."""
        named = self.narrow_dataset_name or self.narrow_train_file or self.narrow_eval_file
        return self.degradation == "forgetting" or bool(named)

    def build_degradation(self):
        """The registered degradation to apply (None for forgetting, none, or your own student): its
        options are this job's fields named ``<prefix>_<option>`` (``DEGRADATION_PREFIXES``)."""
        if self.student_name_or_path is not None or self.degradation not in DEGRADATIONS:
            return None
        if self.degradation == "quanto" and self.quant_weights in FP4_FORMATS:  # FP4: its own degradation
            if self.quant_activations is not None:
                raise ValueError(f"quant_activations={self.quant_activations!r} with quant_weights {self.quant_weights}: "
                                 "FP4 students here are weight-only (W4A16); leave quant_activations unset")
            return DEGRADATIONS["fp4"](fmt=self.quant_weights, clip_search=self.quant_clip_search,
                                       learn_scales=self.quant_learn_scales)
        prefix = DEGRADATION_PREFIXES[self.degradation]
        cls = DEGRADATIONS[self.degradation]
        return cls(**{name: getattr(self, f"{prefix}_{name}") for name in cls.option_names()
                      if hasattr(self, f"{prefix}_{name}")})


@dataclass
class RecoveryConfig(SDFTConfig):
    """``SDFTConfig`` for the recovery job. The defaults are the embedded 1.1M-parameter default
    model's own small-model settings (``hf-sdft recover`` with no arguments, on CPU); the recipes in
    ``recipes/`` set real-model values (learning rate, accumulation, bf16)."""

    output_dir: str | None = "outputs/quanto-int2"
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
    fp16: bool | None = field(
        default=None,
        metadata={"help": "float16 mixed precision (with a GradScaler). Unset: on where bf16 was asked for (the "
                  "recipes) but the GPU has no bf16 (T4, V100); false trains in float32 there."},
    )
    seed: int = 0

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: the recovery trains a fixed number of optimizer steps; "
                             "give at least 1 (--max_steps N)")
        self.requested_precision = "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"
        self.bf16, self.fp16 = resolve_mixed_precision(self.bf16, self.fp16, self.use_cpu)
        super().__post_init__()
