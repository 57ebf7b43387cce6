"""The degradation registry: each way of degrading a model is one :class:`Degradation`."""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import TrainerCallback

DEGRADATIONS: dict[str, type[Degradation]] = {}


def register_degradation(cls: type[Degradation]) -> type[Degradation]:
    DEGRADATIONS[cls.kind] = cls
    return cls


def get_degradation(kind: str, **options) -> Degradation:
    """Build a registered degradation by name (``quanto``, ``prune``...) with its options."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}: choose one of {', '.join(sorted(DEGRADATIONS))}")
    return DEGRADATIONS[kind](**options)


class Degradation:
    """A way of degrading a model whose invariants must hold through recovery training.

    Subclasses set ``kind``, implement :meth:`apply` and :meth:`describe`, and override
    :meth:`tags` and :meth:`callbacks` where they have more to say.
    """

    kind: ClassVar[str]

    def apply(self, model: nn.Module, calibration: list[dict] | None = None) -> nn.Module:
        """Degrade ``model`` in place (``calibration``: tokenized batches) and return it."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What was done, for ``sdft_stats.json`` and the model card: ``{"kind": ..., ...}``."""
        raise NotImplementedError

    def tags(self) -> list[str]:
        """Hub tags, e.g. ``["quanto", "int4"]``."""
        return [self.kind]

    def callbacks(self, model: nn.Module) -> list[TrainerCallback]:
        """Callbacks that keep the degradation's invariants during training (e.g. masks)."""
        return []
