"""Configuration dataclasses: the distillation fields on top of transformers/TRL arguments."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.utils import logging
from transformers.trainer_utils import SchedulerType
from trl import SFTConfig

from .data import DEFAULT_SPLITS, TXT_SAMPLE_BY
from .losses import KERNELS, LOSS_TYPES


TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TEACHER_CONTEXTS = ("prompt", "demonstration")
TEACHER_KINDS = ("base", "ema")
VLLM_MODES = ("colocate", "server")


def parse_layers(value) -> str | list[int]:
    """``"all"``, a list of ints, or a comma-separated string ``"0,2,3"`` → ``"all"`` or ``list[int]``."""
    if value is None or value == "all":
        return "all"
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"layers must be 'all' or decoder-layer indices like '0,2,3', got {value!r}") from None
    layers = [int(v) for v in value]
    if not layers:
        raise ValueError("layers is empty: give 'all' or at least one decoder-layer index")
    return layers


@dataclass
class SDFTArguments:
    """Fields shared by :class:`SDFTConfig` and :class:`SDFTSFTConfig`.

    Total loss = output_loss_weight·[(1 − kd_ratio)·CE + kd_ratio·KD] + cka_weight·(1 − mean CKA over cka_layers).
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The original, undegraded model (Hub id or folder). Omit when passing teacher_model= or "
                  "when the student is a PEFT model whose base (adapters disabled) is the teacher."},
    )
    kd_loss: str = field(default="forward_kl", metadata={"help": f"One of {', '.join(LOSS_TYPES)} (cakld: BitDistiller's "
                                                                 "γ·reverse KL + (1 − γ)·forward KL, see cakld_gamma)."})
    kd_beta: float = field(default=0.5, metadata={"help": "JSD mixture weight β in [0, 1]: 0 = forward KL, 1 = reverse KL."})
    cakld_gamma: float | None = field(
        default=None,
        metadata={"help": "kd_loss cakld: γ in [0, 1], the weight of reverse KL (1 − γ: forward KL). Unset: BitDistiller's "
                  "γ, the teacher's mean probability of the label tokens, estimated before training over "
                  "cakld_calibration_batches training batches (logged as cakld_gamma)."},
    )
    cakld_calibration_batches: int = field(
        default=20, metadata={"help": "kd_loss cakld without cakld_gamma: training batches (a seeded random sample) "
                              "the teacher's γ is averaged over (BitDistiller's train.py uses 20)."}
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; the KD loss is scaled by T²."})
    kd_ratio: float = field(default=1.0, metadata={"help": "Weight of KD vs CE: (1 − kd_ratio)·CE + kd_ratio·KD."})
    cka_weight: float = field(default=0.0, metadata={"help": "Weight of the CKA regulariser 1 − mean CKA (0 = off)."})
    output_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the output loss (CE and KD); 0 trains on the CKA loss alone "
                               "(CE and KD are still logged)."}
    )
    cka_layers: str = field(
        default="all", metadata={"help": "'all' or decoder-layer indices ('0,2,3' or a YAML list) for the CKA loss."}
    )
    kd_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk in the KD loss, to cap float32 logits memory "
                                "(fused: default sized from the vocabulary and hidden size)."}
    )
    kd_fused: bool = field(
        default=True,
        metadata={"help": "Apply the output heads inside the loss, chunk by chunk, so that no (tokens × vocabulary) "
                  "logits exist (when both models have a plain linear head); false = the model's own logits."},
    )
    kd_kernel: str = field(
        default="auto",
        metadata={"help": "Chunk kernel of the fused loss: auto (Triton on CUDA for forward/reverse KL when triton "
                  "is installed, else PyTorch), triton (required), torch."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype of the online teacher: {', '.join(TEACHER_DTYPES)} (auto = bfloat16 where the "
                  "device supports it, else the student's dtype)."},
    )
    teacher_device: str | None = field(
        default=None, metadata={"help": "Device of the online teacher (e.g. cuda:1 or cpu); default: the student's."}
    )
    use_kernels: bool = field(
        default=False,
        metadata={"help": "Let transformers swap layers of the models hf-sdft loads (teacher, student) for the Hub's "
                  "kernels-community kernels (transformers' own default when the kernels package is installed). "
                  "Needs network or those kernels in the local cache: offline without them, loading or training "
                  "fails. Default false: the plain PyTorch layers."},
    )

    on_policy_ratio: float = field(
        default=0.0, metadata={"help": "Fraction λ of batches replaced by the student's own samples (GKD-style): "
                               "the student continues each prompt, the teacher grades every sampled token (KD only)."}
    )
    prompt_length: int = field(
        default=32, metadata={"help": "On-policy prompts of plain-text blocks: their first prompt_length tokens "
                              "(chat data: the prompt part)."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per on-policy prompt."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of on-policy batches."})
    generation_top_p: float = field(default=1.0, metadata={"help": "Nucleus (top-p) sampling of on-policy batches."})
    generation_top_k: int = field(default=0, metadata={"help": "Top-k sampling of on-policy batches (0 = off)."})
    teacher_context: str = field(
        default="prompt",
        metadata={"help": "What the teacher sees on on-policy batches: prompt (the student's) | demonstration "
                  "(teacher_prompt_template with the reference answer or privileged_context)."},
    )
    teacher_prompt_template: str = field(
        default="{prompt}\n\n{privileged_context}",
        metadata={"help": "The demonstration teacher's prompt (TRL's SDFT field): {prompt} and {privileged_context}."},
    )
    teacher_model_kind: str = field(
        default="base", metadata={"help": "base (the frozen original) | ema (an exponential average of the student)."}
    )
    teacher_update_rate: float = field(default=0.05, metadata={"help": "EMA rate per optimizer step (ema teacher)."})
    quant_scales_lr_ratio: float = field(
        default=0.1,
        metadata={"help": "Learning rate of learned quantization scales and shifts (quant_learn_scales) relative to "
                  "learning_rate, without weight decay: Adam moves a parameter by about the learning rate per step, "
                  "large for a scale of 1e-2."},
    )
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample on-policy batches with vLLM through TRL's integration (CUDA and "
                                 "pip install 'trl[vllm]'); else model.generate."}
    )
    vllm_mode: str = field(
        default="colocate", metadata={"help": "colocate (vLLM in the training processes) | server (a running vllm serve, see README)."}
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Server mode: the server's URL (else vllm_server_host and _port)."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: the server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: the server's port."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Server mode: seconds to wait for the server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Server mode: port of the weight-update group."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM's context length (prompt + max_new_tokens; unset: the model config's, "
                                "which a long-context model's KV cache may not fit)."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Colocate mode: fraction of GPU memory vLLM reserves (weights and KV cache)."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate mode: GPUs per vLLM engine."})

    def __post_init__(self):
        if self.kd_loss not in LOSS_TYPES:
            raise ValueError(f"kd_loss={self.kd_loss!r} is unknown: choose one of {', '.join(LOSS_TYPES)}")
        if not 0.0 <= self.kd_beta <= 1.0:
            raise ValueError(f"kd_beta={self.kd_beta} must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature={self.kd_temperature} must be > 0")
        if self.cakld_gamma is not None and not 0.0 <= self.cakld_gamma <= 1.0:
            raise ValueError(f"cakld_gamma={self.cakld_gamma} must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
        if self.cakld_gamma is not None and self.kd_loss != "cakld":
            raise ValueError(f"cakld_gamma={self.cakld_gamma} weighs CAKLD's two KLs but kd_loss={self.kd_loss!r}: set "
                             "kd_loss cakld, or leave cakld_gamma unset")
        if self.cakld_calibration_batches < 1:
            raise ValueError(f"cakld_calibration_batches={self.cakld_calibration_batches} must be a positive number "
                             "of batches")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio={self.kd_ratio} must be in [0, 1] (1 = distillation only, 0 = plain CE)")
        if self.cka_weight < 0:
            raise ValueError(f"cka_weight={self.cka_weight} must be >= 0")
        if self.output_loss_weight < 0:
            raise ValueError(f"output_loss_weight={self.output_loss_weight} must be >= 0")
        if self.output_loss_weight == 0 and self.cka_weight == 0:
            raise ValueError("output_loss_weight=0 and cka_weight=0 leave nothing to train: set cka_weight > 0")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size={self.kd_chunk_size} must be a positive number of positions")
        if self.kd_kernel not in KERNELS:
            raise ValueError(f"kd_kernel={self.kd_kernel!r}: choose one of {', '.join(KERNELS)}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: choose one of {', '.join(TEACHER_DTYPES)}")
        self._check_generation()
        self.cka_layers = parse_layers(self.cka_layers)
        super().__post_init__()

    def _check_generation(self):
        if not 0.0 <= self.on_policy_ratio <= 1.0:
            raise ValueError(f"on_policy_ratio={self.on_policy_ratio} must be in [0, 1] (0 = off-policy, 1 = every batch)")
        for name in ("prompt_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number of tokens")
        if self.generation_temperature <= 0 or not 0.0 < self.generation_top_p <= 1.0 or self.generation_top_k < 0:
            raise ValueError("generation_temperature must be > 0, generation_top_p in (0, 1] and generation_top_k >= 0")
        if self.teacher_context not in TEACHER_CONTEXTS:
            raise ValueError(f"teacher_context={self.teacher_context!r}: choose one of {', '.join(TEACHER_CONTEXTS)}")
        if self.teacher_context == "demonstration" and self.on_policy_ratio == 0:
            raise ValueError("teacher_context='demonstration' grades the student's own samples: set on_policy_ratio > 0 "
                             "(1 = every batch)")
        if "{prompt}" not in self.teacher_prompt_template or "{privileged_context}" not in self.teacher_prompt_template:
            raise ValueError("teacher_prompt_template must contain {prompt} and {privileged_context}")
        if self.teacher_model_kind not in TEACHER_KINDS:
            raise ValueError(f"teacher_model_kind={self.teacher_model_kind!r}: choose one of {', '.join(TEACHER_KINDS)}")
        if self.quant_scales_lr_ratio < 0:
            raise ValueError(f"quant_scales_lr_ratio={self.quant_scales_lr_ratio} must be ≥ 0")
        if not 0.0 < self.teacher_update_rate <= 1.0:
            raise ValueError(f"teacher_update_rate={self.teacher_update_rate} must be in (0, 1]")
        if self.use_vllm and self.on_policy_ratio == 0:
            raise ValueError("use_vllm samples on-policy batches: set on_policy_ratio > 0, or use_vllm false")
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode={self.vllm_mode!r}: choose one of {', '.join(VLLM_MODES)}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0 or self.vllm_tensor_parallel_size < 1:
            raise ValueError("vllm_gpu_memory_utilization must be in (0, 1] and vllm_tensor_parallel_size >= 1")

    def resolve_teacher_dtype(self, student_dtype: torch.dtype) -> torch.dtype:
        """The teacher's dtype: as set, or for ``auto`` bfloat16 where this device runs it natively, else the student's."""
        if self.teacher_dtype == "auto":
            return torch.bfloat16 if bf16_supported(self.use_cpu) else student_dtype
        return getattr(torch, self.teacher_dtype)


@dataclass
class SDFTConfig(SDFTArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus the SDFT fields; for :class:`~hf_sdft.SDFTTrainer`."""


@dataclass
class SDFTSFTConfig(SDFTArguments, SFTConfig):
    """``trl.SFTConfig`` plus the SDFT fields; for :class:`~hf_sdft.SDFTSFTTrainer`."""


logger = logging.get_logger(__name__)
DEGRADATION_KINDS = ("quanto", "prune", "forgetting", "none")
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
    quant_weights: str = field(default="int4", metadata={"help": "int8 | int4 | int2"})
    quant_activations: str | None = field(default=None, metadata={"help": "None | int8 | fp8"})
    quant_group_size: str = field(
        default="channel", metadata={"help": "'auto' (quanto: 128), 'channel' (one scale per output row) or an int"}
    )
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
                  "block output over the calibration_blocks (EfficientQAT's Block-AP); off by default, not "
                  "benchmarked yet. Skipped when resuming from a checkpoint."},
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
        default=None, metadata={"help": "lm-evaluation-harness tasks scored on teacher, degraded and recovered "
                                "models (comma-separated; needs hf-sdft[eval]), e.g. sdft_kjv_nextline."})
    eval_limit: int | None = field(default=None, metadata={"help": "Cap on examples per lm-eval task."})

    def __post_init__(self):
        choices = {"degradation": DEGRADATION_KINDS, "forgetting_mode": FORGETTING_MODES,
                   "txt_sample_by": TXT_SAMPLE_BY, "default_data": tuple(DEFAULT_SPLITS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
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
        if self.teacher_cache is not None and not Path(self.teacher_cache, "dataset_info.json").is_file():
            raise FileNotFoundError(f"teacher_cache={self.teacher_cache} is not a folder written by hf-sdft cache-teacher")

    @property
    def uses_narrow_task(self) -> bool:
        """Forgetting degrades on the narrow task; any run measures it when one is named."""
        named = self.narrow_dataset_name or self.narrow_train_file or self.narrow_eval_file
        return self.degradation == "forgetting" or bool(named)

    def group_size(self):
        if self.quant_group_size in ("auto", "channel"):
            return "auto" if self.quant_group_size == "auto" else None
        return int(self.quant_group_size)

    def build_degradation(self):
        """The registered degradation to apply (None for forgetting, none, or your own student)."""
        from .compress import get_degradation

        if self.student_name_or_path is not None:
            return None
        if self.degradation == "quanto":
            return get_degradation("quanto", weights=self.quant_weights, activations=self.quant_activations,
                                   group_size=self.group_size(), clip_search=self.quant_clip_search,
                                   learn_scales=self.quant_learn_scales)
        if self.degradation == "prune":
            return get_degradation("prune", sparsity=self.prune_sparsity, pattern=self.prune_pattern,
                                   method=self.prune_method)
        return None


@dataclass
class RecoveryConfig(SDFTConfig):
    """``SDFTConfig`` for the recovery job. The defaults are the embedded 1.1M-parameter default
    model's own small-model settings (``hf-sdft recover`` with no arguments, on CPU); the recipes in
    ``recipes/`` set real-model values (learning rate, accumulation, bf16)."""

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
    fp16: bool | None = field(
        default=None,
        metadata={"help": "float16 mixed precision (with a GradScaler). Unset: on where bf16 was asked for (the "
                  "recipes) but the GPU has no bf16 (T4, V100); false trains in float32 there."},
    )
    seed: int = 0

    def __post_init__(self):
        self.bf16, self.fp16 = resolve_mixed_precision(self.bf16, self.fp16, self.use_cpu)
        super().__post_init__()


def resolve_mixed_precision(bf16: bool, fp16: bool | None, use_cpu: bool = False) -> tuple[bool, bool]:
    """``(bf16, fp16)`` to train with. bf16 asked for where the device has none: fp16 on a CUDA GPU
    (T4, V100) unless ``fp16`` is set, else float32 (logged); ``fp16`` set is kept as set."""
    if bf16 and not bf16_supported(use_cpu):
        if fp16 is None and not use_cpu and torch.cuda.is_available():
            logger.warning("bf16 was asked for but this GPU has no bf16 support (e.g. T4, V100): training in fp16 "
                           "mixed precision with a GradScaler (--fp16 false: float32)")
            return False, True
        if not fp16:
            logger.warning("bf16 was asked for but this device has no bf16 support: training in float32")
        return False, bool(fp16)
    return bf16, bool(fp16)


def bf16_supported(use_cpu: bool = False) -> bool:
    """Whether mixed-precision bf16 training runs natively here (a CUDA/XPU device with bf16). On
    CUDA not emulated bf16: ``torch.cuda.is_bf16_supported()`` alone is true on T4 and V100 too."""
    if use_cpu:
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def as_sft_config(args: SDFTConfig, **overrides) -> SDFTSFTConfig:
    """The same settings as an :class:`SDFTSFTConfig` (for :class:`~hf_sdft.SDFTSFTTrainer`)."""
    values = {f.name: getattr(args, f.name) for f in fields(SDFTConfig) if f.init}
    return SDFTSFTConfig(**(values | overrides))
