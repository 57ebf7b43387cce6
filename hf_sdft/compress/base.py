"""The degradation registry: each way of degrading a model is one :class:`Degradation`, with its
options (one dataclass, ``Options``) and the hooks that keep its invariants through recovery
(:meth:`~Degradation.callbacks`, :meth:`~Degradation.param_groups`,
:attr:`~Degradation.is_quantized`). A new degradation is one module plus one line in
:data:`DEGRADATIONS`."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn
from transformers import TrainerCallback


class _Registry(Mapping):
    """``{kind: Degradation subclass}``, each class imported the first time it is looked up (so
    that importing :mod:`hf_sdft.compress` loads no backend, optimum-quanto included)."""

    def __init__(self, paths: dict[str, str]):
        self._paths = dict(paths)  # kind → "module:Class"
        self._loaded: dict[str, type[Degradation]] = {}

    def __getitem__(self, kind: str) -> type[Degradation]:
        if kind not in self._loaded:
            module, _, name = self._paths[kind].partition(":")
            self._loaded[kind] = getattr(importlib.import_module(module), name)
        return self._loaded[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def add(self, cls: type[Degradation]) -> None:
        self._paths[cls.kind] = f"{cls.__module__}:{cls.__qualname__}"
        self._loaded[cls.kind] = cls


DEGRADATIONS = _Registry({
    "quanto": "hf_sdft.compress.quantize:QuantoDegradation",
    "prune": "hf_sdft.compress.prune:PruneDegradation",
    "fp4": "hf_sdft.compress.fp4_student:FP4Degradation",
})


def register_degradation(cls: type[Degradation]) -> type[Degradation]:
    """Register a degradation defined outside this package (the built-in ones are listed above)."""
    DEGRADATIONS.add(cls)
    return cls


def get_degradation(kind: str, **options) -> Degradation:
    """Build a registered degradation by name (``quanto``, ``prune``...) with its options."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}: choose one of {', '.join(sorted(DEGRADATIONS))}")
    return DEGRADATIONS[kind](**options)


@dataclasses.dataclass
class NoOptions:
    """A degradation without options."""


class Degradation:
    """A way of degrading a model whose invariants must hold through recovery training.

    Subclasses set ``kind`` and ``Options`` (a dataclass of their options, the keyword arguments of
    the constructor, read back as ``self.options``), implement :meth:`apply` and :meth:`describe`,
    and override :meth:`tags`, :meth:`callbacks`, :meth:`param_groups` and :attr:`is_quantized`
    where they have more to say. ``masks``: the keep-masks of a pruned model, once known.
    """

    kind: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    is_quantized: ClassVar[bool] = False  # its layers are quantized (saved in quanto's format, LoRA on a frozen base)

    def __init__(self, options=None, **fields):
        if options is not None and fields:
            raise TypeError("give the options as one dataclass or as keyword arguments, not both")
        self.options = options if options is not None else self.Options(**fields)
        self.masks: dict[str, torch.Tensor] | None = None

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)]

    def apply(self, model: nn.Module, calibration: list[dict] | None = None) -> nn.Module:
        """Degrade ``model`` in place (``calibration``: tokenized batches) and return it."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What was done, for ``sdft_stats.json`` and the model card: ``{"kind": ..., ...}``."""
        raise NotImplementedError

    def tags(self) -> list[str]:
        """Hub tags, e.g. ``["quanto", "int4"]``."""
        return [self.kind]

    def callbacks(self, model: nn.Module | None = None) -> list[TrainerCallback]:
        """Callbacks that keep the degradation's invariants during training (e.g. masks)."""
        return []

    def param_groups(self, model: nn.Module, lr: float, ratio: float) -> list[dict]:
        """Optimizer groups of its own parameters, apart from the weights (e.g. learned
        quantization scales at ``lr × ratio``); ``[]`` when it has none."""
        return []
