"""Never hand back a model worse than the one given: held-out perplexity at step 0 and at every
evaluation, the best state kept (the degraded start included) and restored at the end of training.

:class:`KeepBestCallback` measures the student's held-out perplexity (``held_out_ppl`` in the log
history, so it is saved with every checkpoint and survives a resume) when training begins, every
``every_n_steps`` optimizer steps and at the last step. Whenever the perplexity is strictly lower
than the best so far, the student's trainable tensors (all that training changes: weights whose
pruned zeros were re-applied, FakeQuantLinear's latent weights and learned scales, LoRA adapters)
are written to ``output_dir/best_state/step-N.safetensors``; at the end of training the best is
copied back into the student, so masks and quantization grids are those of the kept step. Ties keep
the earlier state (the start wins against an equal end). With ``patience`` it also stops training
after that many evaluations without improvement.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from hf_sdft.distributed import wait_for_everyone
from hf_sdft.jobs.evaluation import perplexity
from hf_sdft.modeling import unwrap

logger = logging.get_logger(__name__)

BEST_DIR = "best_state"
PPL_KEY = "held_out_ppl"


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: CPU copy}`` of every parameter that training can change (``requires_grad``)."""
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in unwrap(model).named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (from :func:`trainable_tensors`) back into ``model``'s parameters, in place."""
    params = dict(unwrap(model).named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"the kept state names parameters this model does not have: {', '.join(missing[:5])}")
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))


def eval_period(every_n_steps: int | None, args) -> int:
    """Steps between held-out evaluations: ``every_n_steps``, else the checkpoint period
    (``save_steps``, a fraction of ``max_steps`` when below 1), else only at the end."""
    if every_n_steps is not None:
        return int(every_n_steps)
    steps = float(args.save_steps or 0)
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "steps" or steps <= 0:
        return 0
    return math.ceil(args.max_steps * steps) if steps < 1 else int(steps)


class KeepBestCallback(TrainerCallback):
    """Measures held-out perplexity of the trained model on ``batches`` (fixed eval batches, see
    :func:`~hf_sdft.jobs.evaluation.perplexity`) at train begin, every ``every_n_steps`` steps
    (0: only at begin and end) and at the last step; keeps the best state in ``folder`` and restores
    it at train end. ``summary`` says which step was kept and why (``None`` before training ends)."""

    def __init__(self, batches, folder: str | Path, *, every_n_steps: int = 0, patience: int | None = None,
                 restore: bool = True):
        if patience is not None and patience < 1:
            raise ValueError(f"early_stopping_patience={patience} must be at least 1 evaluation")
        self.batches = batches
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.patience = patience
        self.restore = restore
        self.trainer = None
        self.best: tuple[int, float] | None = None  # (step, perplexity)
        self.stopped_early_at: int | None = None
        self.summary: dict | None = None

    def bind(self, trainer) -> None:
        """Log through ``trainer.log`` (the values then also reach ``report_to``)."""
        self.trainer = trainer

    def _file(self, step: int) -> Path:
        return self.folder / f"step-{step}.safetensors"

    def _keep(self, args, model, step: int) -> None:
        """Write the model's trainable tensors as the state of ``step`` (process 0)."""
        if args.should_save:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(trainable_tensors(model), str(self._file(step)))

    @staticmethod
    def history(state) -> list[tuple[int, float]]:
        """``[(step, held-out perplexity)]`` measured so far (from the log history: kept through resumes)."""
        seen = {}
        for entry in state.log_history:
            if PPL_KEY in entry and entry.get("step", 0) <= state.global_step:
                seen[entry["step"]] = entry[PPL_KEY]
        return sorted(seen.items())

    def _evaluate(self, args, state, control, model) -> None:
        if any(step == state.global_step for step, _ in self.history(state)):
            return  # measured at this step already (a resume from a checkpoint taken here)
        ppl = perplexity(model, self.batches)
        logs = {PPL_KEY: ppl}
        if self.trainer is not None:
            pending = control.should_log
            self.trainer.log(logs)  # on_log clears should_log: keep the Trainer's own pending log
            control.should_log = self.trainer.control.should_log = pending
        else:
            state.log_history.append({**logs, "step": state.global_step})
        if self.best is None or ppl < self.best[1]:
            self.best = (state.global_step, ppl)
            if self.restore:
                self._keep(args, model, state.global_step)
        elif self.patience is not None:
            since = sum(1 for step, _ in self.history(state) if step > self.best[0])
            if since >= self.patience:
                self.stopped_early_at = state.global_step
                control.should_training_stop = True
                logger.warning(f"early stopping at step {state.global_step}: held-out perplexity has not improved on "
                               f"{self.best[1]:.4f} (step {self.best[0]}) for {since} evaluations")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        history = self.history(state)
        self.best = None
        if history:  # resumed: the best so far, as the checkpoint's log history says
            best = min(history, key=lambda sp: (sp[1], sp[0]))
            if not self.restore or self._file(best[0]).is_file():
                self.best = best
            else:  # e.g. a finished run's folder, resumed for more steps: the checkpoint is the first candidate
                logger.warning(f"the best state so far (step {best[0]}, held-out perplexity {best[1]:.4f}) is not in "
                               f"{self.folder}: it can no longer be handed back; candidates start at step "
                               f"{state.global_step}")
                here = dict(history).get(state.global_step)
                if here is not None:
                    self.best = (state.global_step, here)
                    self._keep(args, model, state.global_step)
        self._evaluate(args, state, control, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.every_n_steps
        if (every and state.global_step % every == 0) or state.global_step >= state.max_steps:
            self._evaluate(args, state, control, model)

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint now records the best so far: the states it superseded are no longer needed."""
        if args.should_save and self.best is not None and self.folder.is_dir():
            for f in self.folder.glob("step-*.safetensors"):
                if f != self._file(self.best[0]):
                    f.unlink()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._evaluate(args, state, control, model)  # an early stop or a max_steps not on the period
        history = self.history(state)
        last_step, last_ppl = history[-1]
        kept_step, kept_ppl = self.best
        restored = self.restore and kept_step != last_step
        if restored:
            wait_for_everyone()  # process 0 wrote the file
            restore_tensors(model, load_file(str(self._file(kept_step))))
        if kept_step == 0:
            why = (f"the start (step 0) had the lowest held-out perplexity ({kept_ppl:.4f}); training did not "
                   f"improve on it")
        elif kept_step == last_step:
            why = f"the last step had the lowest held-out perplexity ({kept_ppl:.4f})"
        else:
            why = (f"step {kept_step} had the lowest held-out perplexity ({kept_ppl:.4f}, last step {last_step}: "
                   f"{last_ppl:.4f})")
        self.summary = {"step": kept_step, "perplexity": kept_ppl, "last_step": last_step, "restored": restored,
                        "reason": why, "early_stopped_at": self.stopped_early_at,
                        "history": [{"step": s, "perplexity": p} for s, p in history]}
        logger.warning(f"kept step {kept_step}: {why}")
        # the kept state's file stays until the job's outputs are in place (drop_kept_states): a
        # crash while saving is re-run from the last checkpoint, and restores it again (finish_loaded)


def keep_best_callbacks(rec, args, batches) -> list[KeepBestCallback]:
    """The recovery job's :class:`KeepBestCallback` (one, in a list to splice into the callbacks),
    as ``rec`` (``keep_best_model``, ``eval_every_n_steps``, ``early_stopping_patience``) says: with
    ``keep_best_model`` off the perplexities are still measured and reported, the last state handed back."""
    return [KeepBestCallback(batches, Path(args.output_dir) / BEST_DIR, every_n_steps=eval_period(
        rec.eval_every_n_steps, args), patience=rec.early_stopping_patience, restore=rec.keep_best_model)]


def _keep_best(trainer) -> KeepBestCallback | None:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, KeepBestCallback)] if trainer else []
    return found[0] if found else None


def bind_keep_best(trainer) -> None:
    if (cb := _keep_best(trainer)) is not None:
        cb.bind(trainer)


def finish_loaded(trainer) -> None:
    """A checkpoint already at the last step, loaded instead of trained (a run that crashed while
    saving): the kept state is restored as at the end of training."""
    if (cb := _keep_best(trainer)) is not None:
        model = trainer.model
        cb.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
        cb.on_train_end(trainer.args, trainer.state, trainer.control, model=model)


def drop_kept_states(output_dir: str | Path) -> None:
    """Delete the kept states (``output_dir/best_state``) once the job's outputs are in place."""
    shutil.rmtree(Path(output_dir) / BEST_DIR, ignore_errors=True)


def add_kept(stats: dict, trainer) -> None:
    """``stats["kept"]``: which step's state the job hands back and why (see :class:`KeepBestCallback`)."""
    cb = _keep_best(trainer)
    if cb is not None and cb.summary is not None:
        stats["kept"] = cb.summary | {"keep_best_model": cb.restore}
