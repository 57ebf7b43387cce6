"""``CKACallback``: an observer that measures per-layer student↔teacher CKA during training."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from hf_sdft.cka.measure import CKA_PREFIX, measure_cka, per_layer
from hf_sdft.data import tokenize_probe
from hf_sdft.modeling import parse_layers


class CKACallback(TrainerCallback):
    """Logs per-layer student↔teacher CKA on a fixed probe set: ``cka/layer_{i}`` and ``cka/mean``.

    Measures at train begin, every ``every_n_steps`` steps (or at each evaluation when it
    is None) and at train end. The values go into ``TrainerState.log_history``, so they are
    saved in ``trainer_state.json`` with every checkpoint and continue after resume; read
    them back with :func:`cka_history`.

    Works with any ``Trainer``: pass ``teacher_model=`` (``SDFTTrainer`` / ``SDFTSFTTrainer``
    supply their own teacher and bind the callback, so its values also reach ``report_to``).
    For another trainer call :meth:`bind` to log through it.

    Args:
        probe_dataset: texts, or examples with ``input_ids`` (and optionally ``attention_mask``).
        max_tokens: cap on probe tokens (rows of the CKA); the same tokens every time.
        debiased: unbiased HSIC per minibatch (Nguyen et al. 2021); needs ≥ 4 tokens a batch.
    """

    def __init__(
        self,
        probe_dataset,
        teacher_model: nn.Module | None = None,
        *,
        layers="all",
        every_n_steps: int | None = None,
        max_tokens: int = 4096,
        debiased: bool = False,
        batch_size: int = 8,
        tokenizer=None,
    ):
        if probe_dataset is None or len(probe_dataset) == 0:
            raise ValueError("CKACallback needs a non-empty probe_dataset (texts or tokenized examples)")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be a positive number of steps or None")
        if max_tokens < 4:
            raise ValueError(f"max_tokens={max_tokens} is too small to measure CKA (need at least 4 tokens)")
        self.probe_dataset = probe_dataset
        self.teacher_model = teacher_model
        self.layers = parse_layers(layers)
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self.debiased = debiased
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.trainer = None
        self._batches = None

    def bind(self, trainer) -> None:
        """Log through ``trainer.log`` and, if no teacher was given, use ``trainer.teacher_model``."""
        self.trainer = trainer

    def _teacher(self) -> tuple[bool, nn.Module | None]:
        if self.teacher_model is not None:
            return True, self.teacher_model
        if self.trainer is not None and hasattr(self.trainer, "teacher_model"):
            return True, self.trainer.teacher_model
        return False, None

    def measure(self, model: nn.Module, tokenizer=None) -> dict[str, float]:
        found, teacher = self._teacher()
        if not found:
            raise ValueError("CKACallback has no teacher: pass teacher_model= or use it with an SDFT trainer")
        if self._batches is None:
            self._batches = tokenize_probe(self.probe_dataset, self.tokenizer or tokenizer, self.max_tokens, self.batch_size)
        layers, values = measure_cka(model, teacher, self._batches, self.layers, debiased=self.debiased)
        logs = {f"{CKA_PREFIX}layer_{i}": v for i, v in per_layer(layers, values).items()}
        logs[f"{CKA_PREFIX}mean"] = float(values.mean())
        return logs

    def _record(self, state, control, model, tokenizer) -> None:
        if any(e.get("step") == state.global_step and f"{CKA_PREFIX}mean" in e for e in state.log_history):
            return  # already measured at this step (e.g. resumed from a checkpoint taken here)
        logs = self.measure(model, tokenizer)
        if self.trainer is not None:
            pending = control.should_log
            self.trainer.log(logs)  # on_log clears should_log: keep the Trainer's own pending log
            control.should_log = self.trainer.control.should_log = pending
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._record(state, control, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._record(state, control, model, processing_class)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_n_steps is None:
            self._record(state, control, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._record(state, control, model, processing_class)
