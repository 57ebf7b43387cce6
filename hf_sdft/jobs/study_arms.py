"""The arms of the alignment study (:mod:`hf_sdft.jobs.study`): the ways of recovering it compares,
read by the study's runs and by its report (:mod:`hf_sdft.jobs.study_report`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hf_sdft.trainer.config import SDFTConfig


@dataclass(frozen=True)
class Arm:
    """One way of recovering: the loss parts it trains on and which parameters it trains."""

    name: str
    description: str
    kd_ratio: float = 1.0
    cka: bool = False  # the CKA regulariser is on
    output: bool = True  # the output loss (CE / KD) trains
    head_only: bool = False  # only the final norm and output head train

    @property
    def needs_teacher_online(self) -> bool:
        """The teacher runs during training (the CKA loss needs its hidden states, which no cache holds)."""
        return self.cka

    def training_args(self, args: SDFTConfig, seed: int, output_dir: str, cka_weight: float) -> SDFTConfig:
        return dataclasses.replace(
            args, seed=seed, output_dir=output_dir, kd_ratio=self.kd_ratio, cka_weight=cka_weight if self.cka else 0.0,
            output_loss_weight=1.0 if self.output else 0.0, save_strategy="no", push_to_hub=False, report_to="none",
            resume_from_checkpoint=None,
        )


ARMS = {arm.name: arm for arm in (
    Arm("ce", "plain fine-tuning (cross-entropy on the data)", kd_ratio=0.0),
    Arm("kd", "distillation only (KD)"),
    Arm("kd+cka", "KD + the CKA regulariser", cka=True),
    Arm("cka", "the CKA regulariser alone: geometry pushed, outputs not", cka=True, output=False),
    Arm("head-kd", "KD with only the final norm and output head trainable: outputs pushed, geometry frozen",
        head_only=True),
)}
INTERVENTIONS = ("cka", "head-kd")
