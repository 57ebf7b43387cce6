"""SDFT trainers: a frozen teacher's next-token distribution (and optionally its hidden-layer
geometry) is distilled into the student.

``SDFTTrainer`` extends ``transformers.Trainer``; ``SDFTSFTTrainer`` extends ``trl.SFTTrainer``
(chat templates, packing, completion-only loss). Both share :class:`SDFTMixin`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from trl import SFTTrainer

from .cka import linear_cka
from .losses import distillation_loss, token_cross_entropy
from .teacher import (
    capture_layers,
    check_teacher,
    freeze,
    load_teacher,
    resolve_layers,
    is_peft,
    teacher_context,
)


class SDFTMixin:
    """Adds the teacher, the KD/CKA losses and per-part logging to a Trainer subclass.

    Args:
        teacher_model: the original (undegraded) model, or its path / Hub id. ``None``
            loads ``args.teacher_model_name_or_path``; with neither, the student must be a
            PEFT model and its base with adapters disabled is the teacher.
    """

    _tag_names = ["hf-sdft", "sdft"]

    def __init__(self, model=None, args=None, *pos, teacher_model: nn.Module | str | None = None, **kwargs):
        if teacher_model is None and getattr(args, "teacher_model_name_or_path", None):
            teacher_model = args.teacher_model_name_or_path
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(teacher_model)
        if teacher_model is not None and isinstance(model, nn.Module):
            check_teacher(model, teacher_model)  # fail before any dataset preparation
        super().__init__(model, args, *pos, **kwargs)
        if teacher_model is None and not is_peft(self.model):
            raise ValueError(
                "no teacher: pass teacher_model= (the original model or its path), set "
                "teacher_model_name_or_path, or train a PEFT student whose base model is the teacher"
            )
        if teacher_model is not None:
            check_teacher(self.model, teacher_model)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "the student has no trainable parameter (was it copied from a frozen teacher?): "
                "call student.requires_grad_(True), or give it PEFT adapters"
            )
        reference = teacher_model if teacher_model is not None else self.model
        self.cka_loss_layers = (
            resolve_layers(self.args.cka_layers, self.model, reference) if self.args.cka_weight > 0 else []
        )
        self.teacher_model = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        if getattr(self.args, "loss_type", "nll") != "nll" or self.args.label_smoothing_factor:
            raise ValueError(
                "SDFT computes its own loss: loss_type must be 'nll' and label_smoothing_factor 0 "
                f"(got {getattr(self.args, 'loss_type', 'nll')!r}, {self.args.label_smoothing_factor})"
            )
        if self.cka_loss_layers and self.args.n_gpu > 1:
            raise ValueError(
                "cka_weight > 0 under torch.nn.DataParallel (one process, several GPUs) is not supported: "
                "launch one process per GPU with accelerate launch / torchrun"
            )
        # compute_loss normalises CE and KD by the token count of the whole accumulated batch,
        # counted over labels[..., 1:] (the causal shift compute_loss applies)
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._loss_shifts_labels = True
        self._sdft_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        from .callbacks import CKACallback

        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CKACallback):
                cb.bind(self)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return freeze(prepare_deepspeed(teacher, self.accelerator))
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return freeze(prepare_fsdp(teacher, self.accelerator))
        return freeze(teacher.to(self.accelerator.device))

    def teacher_logits_and_hidden(self, model_inputs: dict, layers) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Teacher logits ``(B, T, V)`` and hidden states of ``layers`` (no grad)."""
        with teacher_context(self.model, self.teacher_model) as teacher, capture_layers(teacher, layers) as hidden:
            logits = teacher(**model_inputs).logits
        return logits, hidden

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        model_inputs["use_cache"] = False
        layers = self.cka_loss_layers
        with capture_layers(model, layers) as student_hidden:
            outputs = model(**model_inputs)
        teacher_logits, teacher_hidden = self.teacher_logits_and_hidden(model_inputs, layers)

        shift_labels = labels[..., 1:]
        mask = shift_labels != -100
        n_local = int(mask.sum())
        if n_local == 0:
            raise ValueError(
                "a batch has no supervised token (every label is -100): check max_length/truncation, "
                "completion_only_loss or how labels are built"
            )
        student_logits = outputs.logits[..., :-1, :]
        denom = num_items_in_batch if num_items_in_batch is not None else n_local
        with torch.set_grad_enabled(torch.is_grad_enabled() and args.kd_ratio < 1.0):  # else logged only
            ce_sum = token_cross_entropy(student_logits, shift_labels, num_items_in_batch=1)
        kd_sum = distillation_loss(
            student_logits, teacher_logits[..., :-1, :], mask, loss_type=args.kd_loss, beta=args.kd_beta,
            temperature=args.kd_temperature, num_items_in_batch=1, chunk_size=args.kd_chunk_size,
        )
        token_loss = ((1.0 - args.kd_ratio) * ce_sum + args.kd_ratio * kd_sum) / denom
        if num_items_in_batch is not None and args.average_tokens_across_devices:
            token_loss = token_loss * self.accelerator.num_processes  # DDP averages the per-rank gradients
        elif num_items_in_batch is None and model.training:
            token_loss = token_loss / self.current_gradient_accumulation_steps
        loss = token_loss
        metrics = {"ce_loss": ce_sum.detach() / n_local, "kd_loss": kd_sum.detach() / n_local}

        if layers:
            rows = inputs.get("attention_mask")
            rows = rows.bool() if rows is not None else torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
            ckas = [linear_cka(student_hidden[i][rows], teacher_hidden[i][rows].detach()) for i in layers]
            cka_loss = (1.0 - torch.stack(ckas).mean()).float()
            weighted = args.cka_weight * cka_loss
            loss = loss + (weighted / self.current_gradient_accumulation_steps if model.training else weighted)
            metrics["cka_loss"] = cka_loss.detach()
        for key, value in metrics.items():
            self._sdft_metrics[mode][key].append(self.accelerator.gather(value.float().reshape(1)).mean().item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if mode == "eval" or "loss" in logs:  # only the Trainer's own logging events, not a callback's
            window = self._sdft_metrics[mode]
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in window.items() if v})
            window.clear()
        super().log(logs, start_time)

    def create_model_card(self, *args, **kwargs):
        """The hf-sdft card when the output folder holds recovery stats; otherwise the
        parent's card with the ``hf-sdft`` tags added (TRL trainers add ``_tag_names`` themselves)."""
        from .cards import STATS_FILE, write_card

        if (Path(self.args.output_dir) / STATS_FILE).exists():
            write_card(self.args.output_dir, self.args.hub_model_id)
            return
        if not isinstance(self, SFTTrainer):
            tags = kwargs.get("tags") or []
            kwargs["tags"] = sorted({*([tags] if isinstance(tags, str) else tags), *self._tag_names})
        super().create_model_card(*args, **kwargs)


class SDFTTrainer(SDFTMixin, Trainer):
    """``transformers.Trainer`` with self-distillation from a frozen teacher.

    Use with :class:`~hf_sdft.SDFTConfig`. Batches need ``labels`` (−100 = not supervised),
    e.g. from ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``.
    """


class SDFTSFTTrainer(SDFTMixin, SFTTrainer):
    """``trl.SFTTrainer`` with self-distillation from a frozen teacher; use with
    :class:`~hf_sdft.SDFTSFTConfig`."""

    _tag_names = ["trl", "sft", "hf-sdft", "sdft"]
