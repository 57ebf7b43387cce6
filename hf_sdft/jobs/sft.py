"""The training stages of the recovery job: the trainer for a recovery (``SDFTTrainer`` on packed
text, ``SDFTSFTTrainer`` on chat / instruction data) and the narrow-task fine-tuning of the
forgetting recipe (plain CE as the degradation, or CE + KD to the original in ``prevent`` mode)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformers import Trainer

from hf_sdft.data import pad
from hf_sdft.jobs.cards import write_stats_card
from hf_sdft.trainer.config import SDFTConfig, as_sft_config
from hf_sdft.trainer.sdft_trainer import SDFTSFTTrainer, SDFTTrainer
from hf_sdft.trainer.teacher_cache import cache_metadata


def make_trainer(student, args: SDFTConfig, teacher, train_dataset, tokenizer, fmt: str, callbacks=()):
    """A trainer of ``student`` on pre-tokenized ``train_dataset`` (``input_ids``, ``labels``).

    ``teacher=None``: a plain ``transformers.Trainer`` (cross-entropy only), unless the dataset is
    a teacher cache (then the SDFT trainer distils from it). ``fmt="chat"``:
    :class:`~hf_sdft.SDFTSFTTrainer` (TRL's dataset preparation is skipped: the labels already
    hold the completion-only mask).
    """
    kwargs = dict(model=student, train_dataset=train_dataset, processing_class=tokenizer, data_collator=pad,
                  callbacks=list(callbacks))
    if teacher is None and cache_metadata(train_dataset) is None:
        return Trainer(args=args, **kwargs)
    if fmt == "chat":
        sft_args = as_sft_config(args, packing=False, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SDFTSFTTrainer(args=sft_args, teacher_model=teacher, **kwargs)
    else:
        trainer = SDFTTrainer(args=args, teacher_model=teacher, **kwargs)
    trainer.model_card_writer = write_stats_card  # push_to_hub publishes the recovery's card
    return trainer


def sft_on_narrow(student, tokenizer, data, args: SDFTConfig, rec, kd_teacher=None):
    """Fine-tune ``student`` in place on ``data.narrow_train``: plain CE (the forgetting
    degradation), or CE + KD to ``kd_teacher`` (``prevent`` mode, ``args``' KD and CKA settings)."""
    prevent = kd_teacher is not None
    stage_args = dataclasses.replace(
        args, output_dir=str(Path(args.output_dir) / ("prevent" if prevent else "forgetting-sft")),
        max_steps=rec.forgetting_steps, learning_rate=rec.forgetting_learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, save_strategy="no", push_to_hub=False, hub_token=None, report_to="none",
        resume_from_checkpoint=None,
        kd_ratio=args.kd_ratio if prevent else 0.0, cka_weight=args.cka_weight if prevent else 0.0,
    )
    make_trainer(student, stage_args, kd_teacher, data.narrow_train, tokenizer, data.fmt).train()
    return student
