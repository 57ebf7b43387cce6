"""Downstream evaluation with lm-evaluation-harness (``pip install "hf-sdft[eval]"``).

:func:`evaluate_tasks` scores an already-loaded model object (plain transformers, PEFT-wrapped
or optimum-quanto-quantized) on lm-eval tasks. The tasks shipped in ``hf_sdft/eval_tasks``
(:func:`shipped_tasks`, e.g. ``sdft_kjv_nextline``; built by ``scripts/build_eval_tasks.py``)
read local files and run offline; any other name is looked up among lm-eval's own tasks,
whose data usually comes from the Hub.
"""

from __future__ import annotations

import contextlib
import logging
from functools import lru_cache
from importlib import resources

from hf_sdft.modeling import comma_list, evaluating

TASKS_DIR = resources.files("hf_sdft") / "eval_tasks"


def shipped_tasks() -> list[str]:
    """Names of the tasks shipped with hf-sdft (one ``<name>.yaml`` each)."""
    return sorted(p.name.removesuffix(".yaml") for p in TASKS_DIR.iterdir() if p.name.endswith(".yaml"))


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@lru_cache(maxsize=1)
def _all_tasks_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))  # indexes every lm-eval task: ~15 s, so only when needed


def _task_manager(names: list[str]):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = _all_tasks_manager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}: shipped tasks are {', '.join(shipped_tasks())} "
            "(any lm-eval task name works too)"
        )
    return manager


def evaluate_tasks(
    model, tokenizer, tasks: list[str] | str, *, batch_size: int = 8, limit: int | None = None, device=None
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` (zero-shot) on lm-eval ``tasks`` (a list or a comma-separated string).

    Args:
        limit: score only the first ``limit`` items of each task (for quick checks).
        device: move ``model`` there first (in place); by default it stays where it is.

    Returns:
        ``{task: {metric: value}}``, e.g. ``{"sdft_kjv_nextline": {"acc": 0.41, "acc_stderr": 0.03,
        "acc_norm": 0.39, "acc_norm_stderr": 0.03}}`` (metrics under a filter other than lm-eval's
        default are named ``metric,filter``). The model's train/eval mode and the global RNGs are
        left as they were.
    """
    names = comma_list(tasks)
    if not names:
        raise ValueError(f"no task given: shipped tasks are {', '.join(shipped_tasks())}")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError('downstream evaluation needs lm-evaluation-harness: pip install "hf-sdft[eval]"') from e

    if device is not None:
        model.to(device)
    with _quiet(), evaluating(model):  # HFLM sets eval mode; the caller's mode comes back after
        manager = _task_manager(names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # don't reseed the caller's RNGs
        )
    return {
        task: {
            key.removesuffix(",none"): float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len"
        }
        for task, metrics in out["results"].items()
    }
