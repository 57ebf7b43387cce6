"""The trainer library: configs (:mod:`.config`), the trainers (:mod:`.sdft_trainer`), pure loss
functions (:mod:`.losses`, CUDA chunk kernel :mod:`.kd_triton`), the teacher (:mod:`.teacher`),
on-policy sampling (:mod:`.on_policy`, :mod:`.vllm_sampling`) and the teacher cache
(:mod:`.teacher_cache`)."""

from hf_sdft.trainer.config import SDFTConfig, SDFTSFTConfig
from hf_sdft.trainer.losses import distillation_loss
from hf_sdft.trainer.sdft_trainer import SDFTSFTTrainer, SDFTTrainer

__all__ = ["SDFTConfig", "SDFTSFTConfig", "SDFTSFTTrainer", "SDFTTrainer", "distillation_loss"]
