"""Degradations behind one small registry (:mod:`.base`): ``quanto`` (quantization-aware training on
optimum-quanto's grid, in :mod:`.quantize` and :mod:`.fake_quant`) and ``prune`` (unstructured /
N:M pruning with kept masks, in :mod:`.prune`). Importing this package loads no backend: a
degradation's module (optimum-quanto for ``quanto``) is imported when it is first looked up."""

from hf_sdft.compress.base import DEGRADATIONS, Degradation, get_degradation, register_degradation

__all__ = ["DEGRADATIONS", "Degradation", "get_degradation", "register_degradation"]
