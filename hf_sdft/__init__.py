"""hf-sdft: recover degraded LLMs by self-distillation from their original, and track
student↔teacher hidden-layer alignment with CKA."""

from .callbacks import CKACallback, cka_history, measure_cka
from .cka import MinibatchCKA, linear_cka, rbf_cka
from .config import SDFTConfig, SDFTSFTConfig
from .losses import distillation_loss
from .trainer import SDFTSFTTrainer, SDFTTrainer

__version__ = "0.1.0"
__all__ = [
    "CKACallback",
    "MinibatchCKA",
    "SDFTConfig",
    "SDFTSFTConfig",
    "SDFTSFTTrainer",
    "SDFTTrainer",
    "cka_history",
    "distillation_loss",
    "linear_cka",
    "measure_cka",
    "rbf_cka",
]
