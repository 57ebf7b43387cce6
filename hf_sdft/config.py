"""Configuration dataclasses: the distillation fields on top of transformers/TRL arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from .losses import LOSS_TYPES


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

    Total loss = (1 − kd_ratio)·CE + kd_ratio·KD + cka_weight·(1 − mean CKA over cka_layers).
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The original, undegraded model (Hub id or folder). Omit when passing teacher_model= or "
                  "when the student is a PEFT model whose base (adapters disabled) is the teacher."},
    )
    kd_loss: str = field(default="forward_kl", metadata={"help": f"One of {', '.join(LOSS_TYPES)}."})
    kd_beta: float = field(default=0.5, metadata={"help": "JSD mixture weight β in [0, 1]: 0 = forward KL, 1 = reverse KL."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; the KD loss is scaled by T²."})
    kd_ratio: float = field(default=1.0, metadata={"help": "Weight of KD vs CE: (1 − kd_ratio)·CE + kd_ratio·KD."})
    cka_weight: float = field(default=0.0, metadata={"help": "Weight of the CKA regulariser 1 − mean CKA (0 = off)."})
    cka_layers: str = field(
        default="all", metadata={"help": "'all' or decoder-layer indices ('0,2,3' or a YAML list) for the CKA loss."}
    )
    kd_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk in the KD loss, to cap float32 logits memory."}
    )

    def __post_init__(self):
        if self.kd_loss not in LOSS_TYPES:
            raise ValueError(f"kd_loss={self.kd_loss!r} is unknown: choose one of {', '.join(LOSS_TYPES)}")
        if not 0.0 <= self.kd_beta <= 1.0:
            raise ValueError(f"kd_beta={self.kd_beta} must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature={self.kd_temperature} must be > 0")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio={self.kd_ratio} must be in [0, 1] (1 = distillation only, 0 = plain CE)")
        if self.cka_weight < 0:
            raise ValueError(f"cka_weight={self.cka_weight} must be >= 0")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size={self.kd_chunk_size} must be a positive number of positions")
        self.cka_layers = parse_layers(self.cka_layers)
        super().__post_init__()


@dataclass
class SDFTConfig(SDFTArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus the SDFT fields; for :class:`~hf_sdft.SDFTTrainer`."""


@dataclass
class SDFTSFTConfig(SDFTArguments, SFTConfig):
    """``trl.SFTConfig`` plus the SDFT fields; for :class:`~hf_sdft.SDFTSFTTrainer`."""
