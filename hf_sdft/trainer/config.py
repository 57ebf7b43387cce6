"""Configuration dataclasses: the distillation fields on top of transformers/TRL arguments."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments
from transformers.utils import logging
from trl import SFTConfig

from hf_sdft.compress.fake_quant import SCALES_LR_RATIO, compiled_fake_quant_available
from hf_sdft.modeling import parse_layers
from hf_sdft.trainer.fused import KERNELS
from hf_sdft.trainer.losses import LOSS_TYPES

logger = logging.get_logger(__name__)

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TEACHER_CONTEXTS = ("prompt", "demonstration")
TEACHER_KINDS = ("base", "ema")
VLLM_MODES = ("colocate", "server")


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
    cka_tokens: int | None = field(
        default=None, metadata={"help": "CKA loss on this many random attended positions per step (drawn once, shared "
                                "by the layers; e.g. 2048) instead of every position: cheaper on long batches. "
                                "Unset: every position."}
    )
    kd_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk in the KD loss, to cap float32 logits memory "
                                "(fused: default sized from the vocabulary and hidden size)."}
    )
    kd_chunk_memory_mb: float | None = field(
        default=None, metadata={"help": "Memory (MiB) a chunk of the fused KD loss may hold; the chunk shrinks to fit "
                                "(kd_chunk_size unset). Unset: half of the GPU's free memory at each call; no cap "
                                "on CPU."}
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
        default=SCALES_LR_RATIO,
        metadata={"help": "Learning rate of learned quantization scales and shifts (quant_learn_scales) relative to "
                  "learning_rate, without weight decay: Adam moves a parameter by about the learning rate per step, "
                  "large for a scale of 1e-2."},
    )
    quant_reuse_grid: str = field(
        default="auto",
        metadata={"help": "Fake-quantized students: compute each layer's fake-quantized weight once per optimizer "
                  "step and reuse it across gradient-accumulation micro-batches and gradient checkpointing's "
                  "recompute, keeping one copy of those weights between forwards: auto (when "
                  "gradient_accumulation_steps > 1 or gradient_checkpointing) | true | false."},
    )
    quant_compile: str = field(
        default="auto",
        metadata={"help": "Fake-quantized students: compute the min/max grid as one fused kernel (torch.compile; "
                  "inductor generates Triton on CUDA, no nvcc), the same values bit for bit: auto (on a CUDA GPU "
                  "with Triton; CPU keeps plain PyTorch) | true (required: an error where unavailable) | false."},
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
        if self.cka_tokens is not None and self.cka_tokens < 2:
            raise ValueError(f"cka_tokens={self.cka_tokens} must be at least 2 positions (CKA compares rows)")
        if self.output_loss_weight < 0:
            raise ValueError(f"output_loss_weight={self.output_loss_weight} must be >= 0")
        if self.output_loss_weight == 0 and self.cka_weight == 0:
            raise ValueError("output_loss_weight=0 and cka_weight=0 leave nothing to train: set cka_weight > 0")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size={self.kd_chunk_size} must be a positive number of positions")
        if self.kd_chunk_memory_mb is not None and self.kd_chunk_memory_mb <= 0:
            raise ValueError(f"kd_chunk_memory_mb={self.kd_chunk_memory_mb} must be a positive number of MiB")
        if self.kd_kernel not in KERNELS:
            raise ValueError(f"kd_kernel={self.kd_kernel!r}: choose one of {', '.join(KERNELS)}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: choose one of {', '.join(TEACHER_DTYPES)}")
        if getattr(self, "loss_type", "nll") != "nll" or getattr(self, "label_smoothing_factor", 0.0):
            raise ValueError(
                "SDFT computes its own loss: loss_type must be 'nll' and label_smoothing_factor 0 "
                f"(got {getattr(self, 'loss_type', 'nll')!r}, {getattr(self, 'label_smoothing_factor', 0.0)})"
            )
        self._check_fields()
        self.cka_layers = parse_layers(self.cka_layers)
        super().__post_init__()

    def _check_fields(self):
        """The ranges and choices of the on-policy, generation, vLLM, teacher (kind, EMA rate) and
        learned-scale (``quant_scales_lr_ratio``) fields."""
        if not 0.0 <= self.on_policy_ratio <= 1.0:
            raise ValueError(f"on_policy_ratio={self.on_policy_ratio} must be in [0, 1] (0 = off-policy, 1 = every batch)")
        for name in ("prompt_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number of tokens")
        if self.generation_temperature <= 0 or not 0.0 < self.generation_top_p <= 1.0 or self.generation_top_k < 0:
            raise ValueError("generation_temperature must be > 0, generation_top_p in (0, 1] and generation_top_k >= 0")
        if str(self.quant_reuse_grid).lower() not in ("auto", "true", "false"):
            raise ValueError(f"quant_reuse_grid={self.quant_reuse_grid!r}: choose auto, true or false")
        self._check_quant_compile()
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

    def _check_quant_compile(self):
        """``quant_compile``: a choice of auto, true or false; true only where the compiled grid runs
        (a CUDA GPU with Triton, :func:`~hf_sdft.compress.fake_quant.compiled_fake_quant_available`)."""
        choice = str(self.quant_compile).lower()
        if choice not in ("auto", "true", "false"):
            raise ValueError(f"quant_compile={self.quant_compile!r}: choose auto, true or false")
        if choice == "true" and (self.use_cpu or not compiled_fake_quant_available("cuda")):
            raise ValueError("quant_compile=true needs a CUDA GPU with Triton (the fused fake quantization is a "
                             "Triton kernel generated by torch.compile): none here; set quant_compile auto (plain "
                             "PyTorch where it is unavailable) or false")

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
