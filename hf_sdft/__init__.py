"""hf-sdft: recover degraded LLMs by self-distillation from their original, and track
student↔teacher hidden-layer alignment with CKA."""

from hf_sdft.cka.callback import CKACallback
from hf_sdft.cka.measure import cka_history, measure_cka
from hf_sdft.cka.metric import MinibatchCKA, linear_cka, rbf_cka
from hf_sdft.trainer.config import SDFTConfig, SDFTSFTConfig
from hf_sdft.trainer.losses import distillation_loss
from hf_sdft.trainer.sdft_trainer import SDFTSFTTrainer, SDFTTrainer

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
